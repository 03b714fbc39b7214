//! Who may connect: the client certificate must chain to a configured CA, not be revoked (rustls'
//! WebPKI verifier), and then pass the identity policy: CN or DNS SAN in `allowed_subjects`, and
//! the leaf's fingerprint in `pinned_fingerprints` when pins are set. Every refusal is logged once,
//! here, with subject, issuer, fingerprint and the rule that refused it.

use std::sync::Arc;

use rustls::client::danger::HandshakeSignatureValid;
use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, Error, SignatureScheme};

use super::Pin;
use crate::admission::ClientSettings;
use crate::tls::inspect::CertSummary;

/// The rule a client certificate broke.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PolicyViolation {
    /// Neither the CN nor any DNS SAN is in `allowed_subjects`.
    Subject,
    /// Pins are set and the leaf's fingerprint is not among them.
    Pin,
}

impl PolicyViolation {
    /// Label for logs and metrics.
    pub fn rule(self) -> &'static str {
        match self {
            PolicyViolation::Subject => "subject_not_allowed",
            PolicyViolation::Pin => "fingerprint_not_pinned",
        }
    }
}

/// The identity rules applied after the chain is verified.
#[derive(Debug, Clone)]
pub struct ClientIdentityPolicy {
    allowed_subjects: Vec<String>,
    pins: Vec<Pin>,
}

impl ClientIdentityPolicy {
    /// Builds the policy from `[client]`.
    pub fn new(client: &ClientSettings) -> Self {
        ClientIdentityPolicy {
            allowed_subjects: client.allowed_subjects.clone(),
            pins: client.pinned_fingerprints.clone(),
        }
    }

    /// Checks a verified leaf. The NHS proxy certificates carry no subjectAltName, so the CN is
    /// what identifies them (BARS-CONTEXT.md); DNS SANs are accepted too for other PKIs.
    pub fn check(&self, leaf: &CertSummary) -> Result<(), PolicyViolation> {
        let allowed = |name: &str| {
            self.allowed_subjects
                .iter()
                .any(|s| s.eq_ignore_ascii_case(name))
        };
        let subject_ok = leaf.common_name.as_deref().is_some_and(allowed)
            || leaf.dns_names.iter().any(|d| allowed(d));
        if !subject_ok {
            return Err(PolicyViolation::Subject);
        }
        if !self.pins.is_empty()
            && !self.pins.iter().any(|p| match p {
                Pin::Sha256(h) => *h == leaf.sha256,
                Pin::Sha1(h) => *h == leaf.sha1,
            })
        {
            return Err(PolicyViolation::Pin);
        }
        Ok(())
    }
}

/// A client certificate verifier: WebPKI chain and CRL checks, then [`ClientIdentityPolicy`].
#[derive(Debug)]
pub struct PolicyVerifier {
    chain: Arc<dyn ClientCertVerifier>,
    policy: ClientIdentityPolicy,
}

impl PolicyVerifier {
    /// Wraps a chain verifier with the identity policy.
    pub fn new(chain: Arc<dyn ClientCertVerifier>, policy: ClientIdentityPolicy) -> Self {
        PolicyVerifier { chain, policy }
    }
}

fn log_refusal(end_entity: &CertificateDer<'_>, rule: &str, detail: &str) {
    match CertSummary::from_der(end_entity) {
        Ok(leaf) => tracing::warn!(
            subject = %leaf.subject,
            issuer = %leaf.issuer,
            sha256 = %leaf.sha256_hex(),
            rule,
            detail,
            "client certificate refused"
        ),
        Err(_) => tracing::warn!(rule, detail, "client certificate refused (unparsable)"),
    }
}

impl ClientCertVerifier for PolicyVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.chain.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, Error> {
        if let Err(e) = self
            .chain
            .verify_client_cert(end_entity, intermediates, now)
        {
            let rule = match &e {
                Error::InvalidCertificate(CertificateError::Revoked) => "revoked",
                Error::InvalidCertificate(
                    CertificateError::Expired | CertificateError::ExpiredContext { .. },
                ) => "expired",
                Error::InvalidCertificate(
                    CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. },
                ) => "not_yet_valid",
                Error::InvalidCertificate(CertificateError::UnknownIssuer) => "unknown_issuer",
                _ => "chain",
            };
            log_refusal(end_entity, rule, &e.to_string());
            return Err(e);
        }
        let leaf = CertSummary::from_der(end_entity).map_err(|detail| {
            log_refusal(end_entity, "unparsable", &detail);
            Error::InvalidCertificate(CertificateError::BadEncoding)
        })?;
        if let Err(violation) = self.policy.check(&leaf) {
            log_refusal(end_entity, violation.rule(), "identity policy");
            return Err(Error::InvalidCertificate(
                CertificateError::ApplicationVerificationFailure,
            ));
        }
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.chain.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.chain.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.chain.supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::admission::Environment;
    use rustls_pki_types::pem::PemObject;

    fn prod_leaf() -> CertSummary {
        let path = format!(
            "{}/tests/fixtures/nhs-certs/bars-proxy-spineservices-nhs-uk-prod-client.pem",
            env!("CARGO_MANIFEST_DIR")
        );
        CertSummary::from_der(&CertificateDer::from_pem_file(path).unwrap()).unwrap()
    }

    fn policy(subjects: &[&str], pins: &[&str]) -> ClientIdentityPolicy {
        ClientIdentityPolicy::new(&ClientSettings {
            environment: Environment::Custom,
            allowed_ips: vec![],
            allowed_subjects: subjects.iter().map(|s| s.to_string()).collect(),
            pinned_fingerprints: pins
                .iter()
                .map(|p| crate::tls::parse_pin(p).unwrap())
                .collect(),
        })
    }

    #[test]
    fn real_prod_proxy_cert_passes_on_its_cn_without_san() {
        assert_eq!(
            policy(&["bars-proxy.spineservices.nhs.uk"], &[]).check(&prod_leaf()),
            Ok(())
        );
    }

    #[test]
    fn subject_match_is_case_insensitive() {
        assert_eq!(
            policy(&["BARS-PROXY.SpineServices.nhs.uk"], &[]).check(&prod_leaf()),
            Ok(())
        );
    }

    #[test]
    fn the_int_subject_does_not_admit_the_prod_proxy() {
        assert_eq!(
            policy(&["int.api.service.nhs.uk"], &[]).check(&prod_leaf()),
            Err(PolicyViolation::Subject)
        );
    }

    #[test]
    fn pins_accept_the_published_sha1_thumbprint_and_the_sha256() {
        let subj = ["bars-proxy.spineservices.nhs.uk"];
        assert_eq!(
            policy(&subj, &["57c911af253c2f8c362654f78f13e73051eeede3"]).check(&prod_leaf()),
            Ok(())
        );
        assert_eq!(
            policy(
                &subj,
                &["b51d8a07064b779d6a4e8ada1ec73c8f888b9060c9ff846cab119becb1467d1d"]
            )
            .check(&prod_leaf()),
            Ok(())
        );
        assert_eq!(
            policy(&subj, &["ce7808839f72ea8ed4548b4de37546bed5d6dc9f"]).check(&prod_leaf()),
            Err(PolicyViolation::Pin)
        );
    }
}

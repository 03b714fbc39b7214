//! Reading certificates and CRLs for people: subject, issuer, fingerprints, validity. Used by
//! `check`, the expiry metrics, the identity policy and the headers passed to the legacy receiver.

use sha1::Sha1;
use sha2::{Digest, Sha256};
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};
use x509_parser::revocation_list::CertificateRevocationList;

/// A certificate's facts that operators and the identity policy care about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertSummary {
    /// Subject DN in RFC 4514 order as x509-parser prints it, e.g. `O=nhs, OU=Devices, CN=...`.
    pub subject: String,
    /// Issuer DN.
    pub issuer: String,
    /// The subject's first common name, if any.
    pub common_name: Option<String>,
    /// DNS subjectAltNames.
    pub dns_names: Vec<String>,
    /// SHA-256 of the DER certificate.
    pub sha256: [u8; 32],
    /// SHA-1 of the DER certificate (the NHS guide's "thumbprint").
    pub sha1: [u8; 20],
    /// Serial number, hex.
    pub serial: String,
    /// notBefore, Unix seconds.
    pub not_before: i64,
    /// notAfter, Unix seconds.
    pub not_after: i64,
    /// Whether this is a CA certificate (basicConstraints cA).
    pub is_ca: bool,
    /// The basicConstraints cA flag, or `None` when the certificate has no basicConstraints
    /// (old version-1 roots): a `client_ca` entry must not be `Some(false)`.
    pub ca_constraint: Option<bool>,
}

impl CertSummary {
    /// Parses a DER certificate.
    pub fn from_der(der: &[u8]) -> Result<CertSummary, String> {
        let (_, cert) = X509Certificate::from_der(der)
            .map_err(|e| format!("not a valid X.509 certificate: {e}"))?;
        let common_name = cert
            .subject()
            .iter_common_name()
            .next()
            .and_then(|cn| cn.as_str().ok())
            .map(str::to_string);
        let dns_names = cert
            .subject_alternative_name()
            .ok()
            .flatten()
            .map(|san| {
                san.value
                    .general_names
                    .iter()
                    .filter_map(|n| match n {
                        GeneralName::DNSName(d) => Some(d.to_string()),
                        _ => None,
                    })
                    .collect()
            })
            .unwrap_or_default();
        let ca_constraint = cert
            .basic_constraints()
            .ok()
            .flatten()
            .map(|bc| bc.value.ca);
        let is_ca = ca_constraint == Some(true);
        Ok(CertSummary {
            subject: cert.subject().to_string(),
            issuer: cert.issuer().to_string(),
            common_name,
            dns_names,
            sha256: Sha256::digest(der).into(),
            sha1: Sha1::digest(der).into(),
            serial: cert.raw_serial_as_string(),
            not_before: cert.validity().not_before.timestamp(),
            not_after: cert.validity().not_after.timestamp(),
            is_ca,
            ca_constraint,
        })
    }

    /// Whether subject and issuer are the same name (a self-signed certificate, such as a root
    /// or an `openssl req -x509` test certificate).
    pub fn is_self_issued(&self) -> bool {
        self.subject == self.issuer
    }

    /// The SHA-256 fingerprint as lower-case hex.
    pub fn sha256_hex(&self) -> String {
        hex::encode(self.sha256)
    }

    /// The SHA-1 fingerprint as lower-case hex.
    pub fn sha1_hex(&self) -> String {
        hex::encode(self.sha1)
    }

    /// Whole days from `now` (Unix seconds) until notAfter; negative once expired.
    pub fn days_left(&self, now: i64) -> i64 {
        (self.not_after - now).div_euclid(86_400)
    }

    /// The identity to show for this certificate: its CN, else its first DNS name, else the DN.
    pub fn display_name(&self) -> &str {
        self.common_name
            .as_deref()
            .or(self.dns_names.first().map(String::as_str))
            .unwrap_or(&self.subject)
    }
}

/// A CRL's facts for `check`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CrlSummary {
    /// Issuer DN.
    pub issuer: String,
    /// thisUpdate, Unix seconds.
    pub this_update: i64,
    /// nextUpdate, Unix seconds, if given.
    pub next_update: Option<i64>,
    /// How many certificates it revokes.
    pub revoked: usize,
    /// The CRL's version: 1 (no extensions, no CRL number) or 2. rustls accepts only 2.
    pub version: u32,
}

impl CrlSummary {
    /// Parses a DER CRL.
    pub fn from_der(der: &[u8]) -> Result<CrlSummary, String> {
        let (_, crl) = CertificateRevocationList::from_der(der)
            .map_err(|e| format!("not a valid X.509 CRL: {e}"))?;
        Ok(CrlSummary {
            issuer: crl.issuer().to_string(),
            this_update: crl.last_update().timestamp(),
            next_update: crl.next_update().map(|t| t.timestamp()),
            revoked: crl.iter_revoked_certificates().count(),
            // The version field is absent in a v1 CRL; present, it holds 1 for version 2.
            version: crl.version().map_or(1, |v| v.0 + 1),
        })
    }
}

/// Current Unix time in seconds.
pub fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// Formats Unix seconds as an RFC 3339 UTC date-time.
pub fn format_time(unix: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(unix)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| unix.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::CertificateDer;

    fn fixture(name: &str) -> CertificateDer<'static> {
        let path = format!(
            "{}/tests/fixtures/nhs-certs/{name}",
            env!("CARGO_MANIFEST_DIR")
        );
        CertificateDer::from_pem_file(path).expect("fixture PEM")
    }

    #[test]
    fn real_nhs_proxy_certificates_have_the_published_cn_and_thumbprints() {
        let cases = [
            (
                "int-api-service-nhs-uk-ptl-client.pem",
                "int.api.service.nhs.uk",
                "NHS INT Level 1C",
                "ce7808839f72ea8ed4548b4de37546bed5d6dc9f",
                "a9fa12231e9adb8281cb5c2590c54cf43fefdfdfa79863b11b38f45d6d3d0c51",
            ),
            (
                "bars-proxy-spineservices-nhs-uk-prod-client.pem",
                "bars-proxy.spineservices.nhs.uk",
                "NHS Level 1C",
                "57c911af253c2f8c362654f78f13e73051eeede3",
                "b51d8a07064b779d6a4e8ada1ec73c8f888b9060c9ff846cab119becb1467d1d",
            ),
        ];
        for (file, cn, issuer_cn, sha1, sha256) in cases {
            let s = CertSummary::from_der(&fixture(file)).unwrap();
            assert_eq!(s.common_name.as_deref(), Some(cn), "{file}");
            assert!(s.subject.contains("OU=Devices"), "{}", s.subject);
            assert!(
                s.issuer.contains(&format!("CN={issuer_cn}")),
                "{}",
                s.issuer
            );
            assert!(s.dns_names.is_empty(), "the NHS proxy certs carry no SAN");
            assert_eq!(s.sha1_hex(), sha1, "{file}");
            assert_eq!(s.sha256_hex(), sha256, "{file}");
            assert!(
                s.days_left(unix_now()) < 0,
                "these published certificates have expired"
            );
            assert!(!s.is_ca);
        }
    }

    #[test]
    fn server_certificate_san_is_read() {
        let s =
            CertSummary::from_der(&fixture("int-api-service-nhs-uk-digicert-server.pem")).unwrap();
        assert_eq!(s.dns_names, vec!["int.api.service.nhs.uk"]);
        assert_eq!(s.sha1_hex(), "634680dfafcf3a6e229741ae7ad5b98dbe70d822");
        assert_eq!(
            s.sha256_hex(),
            "c0d48f585c660a9129a87a668da97964f37ed05497c7b6a7b2640bf9efd8b1a3"
        );
        assert_eq!(format_time(s.not_after)[..10], *"2023-04-07");
    }

    #[test]
    fn garbage_is_not_a_certificate() {
        assert!(CertSummary::from_der(b"\x30\x03abc").is_err());
    }
}

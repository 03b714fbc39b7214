//! The NHS certificate authorities `check` recognises among the configured `tls.client_ca`
//! entries, so an operator sees "NHS Authentication G2 (PROD)" instead of a bare fingerprint and
//! is warned when the CAs do not match `client.environment`.
//!
//! Source: NHS England's PKI pages (BARS-CONTEXT.md, "Certificate authorities in service"): the
//! G2 generation has been in service since 2024; the G1 chains ("NHS Level 1C", "NHS Root
//! Authority") expired on 4 June 2024. Only thumbprints NHS England publishes, as quoted in the
//! project's sources, are listed: the PROD G2 pair. The path-to-live (INT) G2 CAs are on NHS
//! England's "path to live environments" PKI page; add them here, with the page as the source,
//! once their published thumbprints are copied in.

use crate::tls::inspect::CertSummary;

/// The environment an NHS CA serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NhsEnvironment {
    /// Production.
    Prod,
    /// Path to live (INT).
    Int,
}

impl NhsEnvironment {
    /// `PROD` or `INT`, as the report prints it.
    pub fn label(self) -> &'static str {
        match self {
            NhsEnvironment::Prod => "PROD",
            NhsEnvironment::Int => "INT",
        }
    }
}

/// A CA NHS England publishes, identified by its SHA-1 thumbprint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KnownCa {
    /// Its name as NHS England publishes it, e.g. `NHS Authentication G2`.
    pub name: &'static str,
    /// The environment it serves.
    pub environment: NhsEnvironment,
    /// SHA-1 of the DER certificate, as published (colon-separated upper-case hex).
    pub sha1: &'static str,
}

/// The NHS CAs in service, with the thumbprints NHS England publishes (PKI pages, PROD G2).
pub const KNOWN_CAS: &[KnownCa] = &[
    KnownCa {
        name: "NHS Root Authority G2",
        environment: NhsEnvironment::Prod,
        sha1: "7E:05:FA:62:9B:5E:66:DB:B8:0E:97:41:7D:24:73:CB:CF:5A:31:06",
    },
    KnownCa {
        name: "NHS Authentication G2",
        environment: NhsEnvironment::Prod,
        sha1: "1F:30:1F:CA:68:4D:9E:13:AD:4D:BA:7C:8F:2B:A1:26:F9:C4:C0:15",
    },
];

/// CNs of the retired G1 CAs (expired 4 June 2024): a `client_ca` still naming one of them is a
/// copy of an outdated guide.
pub const RETIRED_G1_CNS: &[&str] = &[
    "NHS Root Authority",
    "NHS Level 1C",
    "NHS PTL Root Authority",
    "NHS INT Level 1C",
];

fn sha1_bytes(published: &str) -> Vec<u8> {
    // The table above is constant and well-formed; a typo would make the lookup miss, which the
    // unit test below catches.
    hex::decode(published.replace(':', "")).unwrap_or_default()
}

/// The published NHS CA this certificate is, if any.
pub fn identify(cert: &CertSummary) -> Option<&'static KnownCa> {
    KNOWN_CAS.iter().find(|ca| sha1_bytes(ca.sha1) == cert.sha1)
}

/// Whether this certificate is one of the retired G1 NHS CAs (by CN).
pub fn is_retired_g1(cert: &CertSummary) -> bool {
    cert.common_name
        .as_deref()
        .is_some_and(|cn| RETIRED_G1_CNS.contains(&cn))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn summary_with_sha1(sha1: [u8; 20], cn: &str) -> CertSummary {
        CertSummary {
            subject: format!("CN={cn}"),
            issuer: format!("CN={cn}"),
            common_name: Some(cn.to_string()),
            dns_names: vec![],
            sha256: [0; 32],
            sha1,
            serial: "01".into(),
            not_before: 0,
            not_after: 0,
            is_ca: true,
            ca_constraint: Some(true),
        }
    }

    #[test]
    fn every_published_thumbprint_is_twenty_bytes() {
        for ca in KNOWN_CAS {
            assert_eq!(sha1_bytes(ca.sha1).len(), 20, "{}", ca.name);
        }
    }

    #[test]
    fn the_prod_g2_sub_ca_is_recognised_by_its_published_thumbprint() {
        let sha1: [u8; 20] =
            sha1_bytes("1F:30:1F:CA:68:4D:9E:13:AD:4D:BA:7C:8F:2B:A1:26:F9:C4:C0:15")
                .try_into()
                .unwrap();
        let ca = identify(&summary_with_sha1(sha1, "NHS Authentication G2")).unwrap();
        assert_eq!(ca.name, "NHS Authentication G2");
        assert_eq!(ca.environment, NhsEnvironment::Prod);
        // A certificate that only shares the name is not recognised.
        assert!(identify(&summary_with_sha1([7; 20], "NHS Authentication G2")).is_none());
    }

    #[test]
    fn retired_g1_cas_are_named_by_cn() {
        assert!(is_retired_g1(&summary_with_sha1([0; 20], "NHS Level 1C")));
        assert!(!is_retired_g1(&summary_with_sha1(
            [0; 20],
            "NHS Authentication G2"
        )));
    }
}

//! `[tls]` settings: the server identity, the trusted client CAs and CRLs, the lowest version; and
//! the client certificate pins of `[client]`. Read from TOML by `config.rs`.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

/// Where the server certificate and key come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerIdentitySource {
    /// PEM chain (leaf first) and a PEM key (PKCS#8 plain or encrypted, PKCS#1, SEC1).
    Pem {
        /// `tls.certificate`.
        certificate: PathBuf,
        /// `tls.private_key`.
        private_key: PathBuf,
        /// `tls.private_key_password_file`, if set.
        password_file: Option<PathBuf>,
    },
    /// A PKCS#12 (`.pfx`) bundle.
    Pkcs12 {
        /// `tls.pkcs12`.
        path: PathBuf,
        /// `tls.pkcs12_password_file`, if set.
        password_file: Option<PathBuf>,
    },
}

/// Lowest TLS version offered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum TlsVersion {
    /// TLS 1.2 and 1.3.
    #[serde(rename = "1.2")]
    Tls12,
    /// TLS 1.3 only.
    #[serde(rename = "1.3")]
    Tls13,
}

/// `[tls]`: the server identity and what client certificates are trusted.
#[derive(Debug, Clone)]
pub struct TlsSettings {
    /// The server certificate and key.
    pub identity: ServerIdentitySource,
    /// Trusted client CAs (roots and sub-CAs).
    pub client_ca: Vec<PathBuf>,
    /// CRLs (PEM or DER).
    pub client_crl: Vec<PathBuf>,
    /// Lowest TLS version.
    pub min_version: TlsVersion,
    /// Polling fallback for reloads.
    pub reload_interval: Duration,
}

/// A pinned client leaf certificate fingerprint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Pin {
    /// SHA-256 of the DER certificate.
    Sha256([u8; 32]),
    /// SHA-1 of the DER certificate (the "thumbprint" the NHS guide publishes).
    Sha1([u8; 20]),
}

/// Parses a hex fingerprint (colons and case ignored) as SHA-256 or SHA-1.
pub fn parse_pin(text: &str) -> Option<Pin> {
    let clean: String = text
        .chars()
        .filter(|c| *c != ':' && !c.is_whitespace())
        .collect();
    let bytes = hex::decode(clean).ok()?;
    match bytes.len() {
        32 => Some(Pin::Sha256(bytes.try_into().ok()?)),
        20 => Some(Pin::Sha1(bytes.try_into().ok()?)),
        _ => None,
    }
}

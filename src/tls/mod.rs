//! TLS-MA termination: loading the material, building an immutable rustls `ServerConfig` (TLS 1.2
//! and 1.3, ALPN h2 and http/1.1, client certificates required), and reading the client identity
//! off an established connection.
//!
//! A `ServerConfig` is built whole at start and at every reload and swapped in atomically; a
//! handshake reads whichever is current (see `gateway.rs`).

pub mod inspect;
pub mod material;
pub mod policy;

use std::path::PathBuf;
use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::server::{ServerConnection, ServerSessionMemoryCache, WebPkiClientVerifier};
use rustls::RootCertStore;

use crate::config::{ClientSettings, TlsSettings, TlsVersion};
use inspect::{unix_now, CertSummary, CrlSummary};
use material::{load_material, MaterialError, TlsMaterial};
use policy::{ClientIdentityPolicy, PolicyVerifier};

/// TLS sessions remembered for resumption. Resumption skips the RSA signature, the costliest
/// part of a handshake; a new `ServerConfig` (every reload) starts a new cache, so a resumed
/// session never outlives a CA, CRL or policy change.
const SESSION_CACHE_SIZE: usize = 4096;

/// A ready-to-serve TLS configuration and what it was built from (for `check` and metrics).
#[derive(Debug, Clone)]
pub struct LoadedTls {
    /// The rustls configuration handshakes use.
    pub server_config: Arc<rustls::ServerConfig>,
    /// The served chain, leaf first.
    pub server_chain: Vec<CertSummary>,
    /// The trusted client CAs, with their files.
    pub client_cas: Vec<(PathBuf, CertSummary)>,
    /// The CRLs, with their files.
    pub crls: Vec<(PathBuf, CrlSummary)>,
    /// The client certificate verifier `server_config` uses, to re-check resumed sessions.
    pub client_verifier: Arc<PolicyVerifier>,
}

impl LoadedTls {
    /// The served leaf certificate.
    pub fn server_leaf(&self) -> &CertSummary {
        // Safe: `load` refuses an empty chain.
        &self.server_chain[0]
    }
}

/// The crypto provider: ring (see Cargo.toml for why).
pub fn crypto_provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Reads the TLS files and builds the server configuration, validating it exactly as `check`
/// does. Blocking (file reads): call from `spawn_blocking` on a running gateway.
pub fn load(tls: &TlsSettings, client: &ClientSettings) -> Result<LoadedTls, MaterialError> {
    let material = load_material(tls)?;
    build(material, tls, client)
}

fn build(
    material: TlsMaterial,
    tls: &TlsSettings,
    client: &ClientSettings,
) -> Result<LoadedTls, MaterialError> {
    let TlsMaterial {
        identity,
        client_cas,
        crls,
    } = material;
    let (chain_key, chain_path) = identity.chain_source.clone();
    let chain_err = |problem: String| MaterialError {
        key: chain_key.clone(),
        path: chain_path.clone(),
        problem,
    };
    let server_chain = identity
        .chain
        .iter()
        .map(|c| CertSummary::from_der(c).map_err(&chain_err))
        .collect::<Result<Vec<_>, _>>()?;
    let leaf = server_chain
        .first()
        .ok_or_else(|| chain_err("no certificate".into()))?;
    if leaf.is_ca {
        return Err(chain_err(
            "the first certificate is a CA: put the server (leaf) certificate first, then intermediates".into(),
        ));
    }
    let now = unix_now();
    if leaf.not_after < now {
        return Err(chain_err(format!(
            "the server certificate {} expired on {}",
            leaf.display_name(),
            inspect::format_time(leaf.not_after)
        )));
    }
    if leaf.not_before > now {
        return Err(chain_err(format!(
            "the server certificate {} is not valid until {}",
            leaf.display_name(),
            inspect::format_time(leaf.not_before)
        )));
    }

    let provider = crypto_provider();
    let mut roots = RootCertStore::empty();
    let mut ca_summaries = Vec::new();
    for (path, der) in &client_cas {
        let ca_err = |problem: String| MaterialError {
            key: "tls.client_ca".into(),
            path: path.clone(),
            problem,
        };
        let summary = CertSummary::from_der(der).map_err(ca_err)?;
        roots
            .add(der.clone())
            .map_err(|e| ca_err(format!("not usable as a trust anchor: {e}")))?;
        ca_summaries.push((path.clone(), summary));
    }
    let mut crl_summaries = Vec::new();
    for (path, der) in &crls {
        let summary = CrlSummary::from_der(der).map_err(|problem| MaterialError {
            key: "tls.client_crl".into(),
            path: path.clone(),
            problem,
        })?;
        crl_summaries.push((path.clone(), summary));
    }

    // The NHS guide has receivers trust the roots and the sub-CAs, so each is a trust anchor and
    // the client's leaf is what a CRL revokes. An expired CRL is reported by `check` and the
    // metrics but not enforced: refusing every client on a late CRL is an outage, not safety.
    let chain_verifier =
        WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
            .with_crls(crls.into_iter().map(|(_, c)| c))
            .only_check_end_entity_revocation()
            .allow_unknown_revocation_status()
            .build()
            .map_err(|e| MaterialError {
                key: "tls.client_ca".into(),
                path: tls.client_ca.first().cloned().unwrap_or_default(),
                problem: format!("cannot build the client verifier: {e}"),
            })?;
    let verifier = Arc::new(PolicyVerifier::new(
        chain_verifier,
        ClientIdentityPolicy::new(client),
    ));

    let versions: &[&'static rustls::SupportedProtocolVersion] = match tls.min_version {
        TlsVersion::Tls12 => &[&rustls::version::TLS13, &rustls::version::TLS12],
        TlsVersion::Tls13 => &[&rustls::version::TLS13],
    };
    let (key_key, key_path) = identity.key_source.clone();
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(versions)
        .map_err(|e| chain_err(format!("unsupported TLS versions: {e}")))?
        .with_client_cert_verifier(verifier.clone())
        .with_single_cert(identity.chain, identity.key)
        .map_err(|e| match e {
            // rustls parses the leaf here too: a certificate it cannot use is the certificate's fault.
            rustls::Error::InvalidCertificate(_) | rustls::Error::NoCertificatesPresented => {
                chain_err(format!("the server certificate cannot be used: {e}"))
            }
            rustls::Error::InconsistentKeys(_) => MaterialError {
                key: key_key,
                path: key_path,
                problem: format!(
                    "the private key does not match the certificate in {} ({})",
                    chain_key,
                    chain_path.display()
                ),
            },
            other => MaterialError {
                key: key_key,
                path: key_path,
                problem: format!("the private key cannot be used: {other}"),
            },
        })?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    config.session_storage = ServerSessionMemoryCache::new(SESSION_CACHE_SIZE);
    Ok(LoadedTls {
        server_config: Arc::new(config),
        server_chain,
        client_cas: ca_summaries,
        crls: crl_summaries,
        client_verifier: verifier,
    })
}

/// The verified client certificate of a connection, as passed to the legacy receiver.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientIdentity {
    /// The subject DN.
    pub subject: String,
    /// SHA-256 of the leaf, lower-case hex.
    pub sha256_hex: String,
}

/// Re-checks the client certificate of a *resumed* session; full handshakes were checked by the
/// verifier already. rustls resumes a session (TLS 1.2 session id, TLS 1.3 ticket) without
/// looking at the client certificate again and with no age limit, so a client that connected
/// before its certificate expired could go on resuming after the expiry (found by
/// scripts/tls-scan.sh). A reload starts a new session cache, so only time can change the
/// verdict; the whole verifier runs anyway (chain, validity dates, CRLs, identity policy), and
/// logs its refusal as for a full handshake.
pub fn recheck_resumed(
    conn: &ServerConnection,
    verifier: &PolicyVerifier,
) -> Result<(), rustls::Error> {
    if conn.handshake_kind() != Some(rustls::HandshakeKind::Resumed) {
        return Ok(());
    }
    let chain = conn
        .peer_certificates()
        .ok_or(rustls::Error::NoCertificatesPresented)?;
    let (leaf, intermediates) = chain
        .split_first()
        .ok_or(rustls::Error::NoCertificatesPresented)?;
    use rustls::server::danger::ClientCertVerifier as _;
    verifier
        .verify_client_cert(leaf, intermediates, rustls::pki_types::UnixTime::now())
        .map(|_| ())
}

/// Reads the client identity off a completed handshake. `None` only if the peer sent no
/// certificate, which the mandatory client auth makes impossible; callers refuse it anyway.
pub fn client_identity(conn: &ServerConnection) -> Option<ClientIdentity> {
    let leaf = conn.peer_certificates()?.first()?;
    let summary = CertSummary::from_der(leaf).ok()?;
    Some(ClientIdentity {
        sha256_hex: summary.sha256_hex(),
        subject: summary.subject,
    })
}

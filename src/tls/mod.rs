//! TLS-MA termination: loading the material, building an immutable rustls `ServerConfig` (TLS 1.2
//! and 1.3, ALPN h2 and http/1.1, client certificates required), and reading the client identity
//! off an established connection.
//!
//! A `ServerConfig` is built whole at start and at every reload and swapped in atomically; a
//! handshake reads whichever is current (see `gateway.rs`).

pub mod errors;
pub mod inspect;
pub mod material;
pub mod nhs;
pub mod policy;
mod settings;

pub use settings::{parse_pin, Pin, ServerIdentitySource, TlsSettings, TlsVersion};

use std::path::PathBuf;
use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::server::{ServerConnection, ServerSessionMemoryCache, WebPkiClientVerifier};
use rustls::RootCertStore;

use crate::admission::ClientSettings;
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
        return Err(chain_err(server_ca_problem(&server_chain)));
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
            key: indexed_key("tls.client_ca", &tls.client_ca, path),
            path: path.clone(),
            problem,
        };
        let summary = CertSummary::from_der(der).map_err(ca_err)?;
        if let Some(problem) = client_ca_problem(&summary, now) {
            return Err(ca_err(problem));
        }
        roots
            .add(der.clone())
            .map_err(|e| ca_err(format!("not usable as a trust anchor: {e}")))?;
        ca_summaries.push((path.clone(), summary));
    }
    let mut crl_summaries = Vec::new();
    let roots = Arc::new(roots);
    for (path, der) in &crls {
        let crl_err = |problem: String| MaterialError {
            key: indexed_key("tls.client_crl", &tls.client_crl, path),
            path: path.clone(),
            problem,
        };
        let summary = CrlSummary::from_der(der).map_err(crl_err)?;
        if summary.version == 1 {
            return Err(crl_err(V1_CRL_PROBLEM.into()));
        }
        // rustls parses the CRLs only when the verifier is built, and its error does not say
        // which CRL failed: try each alone so the message names its key and file.
        if let Err(e) = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
            .with_crls([der.clone()])
            .build()
        {
            return Err(crl_err(format!("rustls cannot use this CRL: {e}")));
        }
        crl_summaries.push((path.clone(), summary));
    }

    // The NHS guide has receivers trust the roots and the sub-CAs, so each is a trust anchor and
    // the client's leaf is what a CRL revokes. An expired CRL is reported by `check` and the
    // metrics but not enforced: refusing every client on a late CRL is an outage, not safety.
    let chain_verifier = WebPkiClientVerifier::builder_with_provider(roots, provider.clone())
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

/// What `openssl ca -gencrl` makes without a `crlnumber` file, and how to fix it.
const V1_CRL_PROBLEM: &str = "a version 1 CRL (no extensions, no CRL number), as `openssl ca \
     -gencrl` makes when the CA has no crlnumber file; rustls accepts only version 2 CRLs. \
     Reissue it as v2: create the CA's serial file for CRLs (`echo 1000 > crlnumber`), set \
     `crlnumber = $dir/crlnumber` in the [CA_default] section of its openssl.cnf, and run \
     `openssl ca -gencrl -out crl.pem` again";

/// The config key of the list entry that named `path`, e.g. `tls.client_ca[1]`.
fn indexed_key(key: &str, entries: &[PathBuf], path: &std::path::Path) -> String {
    match entries.iter().position(|p| p == path) {
        Some(i) => format!("{key}[{i}]"),
        None => key.to_string(),
    }
}

/// Why a trusted client CA cannot do its job, if it cannot: a handshake needs the CA to have
/// issued the client's chain, so a leaf or an expired CA makes every handshake fail.
fn client_ca_problem(ca: &CertSummary, now: i64) -> Option<String> {
    let not_a_ca = match ca.ca_constraint {
        Some(is_ca) => !is_ca,
        // No basicConstraints at all: an old version-1 root is still a CA if self-signed.
        None => !ca.is_self_issued(),
    };
    if not_a_ca {
        return Some(format!(
            "{} is not a CA certificate (basicConstraints CA:FALSE or absent; issued by {}): it \
             cannot have issued the client's certificate, so every handshake would fail. It looks \
             like a leaf, such as the BaRS proxy's own certificate: configure the CAs that issue \
             it instead (PROD: NHS Root Authority G2 and NHS Authentication G2; \
             docs/operations.md, \"Certificates\")",
            ca.display_name(),
            ca.issuer
        ));
    }
    if ca.not_after < now {
        return Some(format!(
            "the CA {} expired on {}: no client certificate can chain to it, so every handshake \
             would fail{}",
            ca.display_name(),
            inspect::format_time(ca.not_after),
            if nhs::is_retired_g1(ca) {
                ". It is a retired G1 NHS CA: the NHS moved to the G2 CAs in 2024 \
                 (docs/operations.md, \"Certificates\")"
            } else {
                ""
            }
        ));
    }
    None
}

/// What is wrong with a served chain whose first certificate is a CA.
fn server_ca_problem(chain: &[CertSummary]) -> String {
    let first = &chain[0];
    if chain.iter().skip(1).any(|c| !c.is_ca) {
        return "the first certificate is a CA and a server (leaf) certificate comes later: put \
                the server certificate first, then the intermediates"
            .into();
    }
    let what = if first.is_self_issued() {
        "a self-signed CA certificate (basicConstraints CA:TRUE)"
    } else {
        "a CA certificate (basicConstraints CA:TRUE)"
    };
    format!(
        "{} is {what}, not a server certificate: the file holds no certificate for this server. \
         A test certificate made with `openssl req -x509` is a CA by default; a BaRS receiver \
         serves the certificate the NHS issued for its FQDN from a CSR (docs/operations.md, \
         \"Certificates\"), leaf first, then the intermediates",
        first.display_name()
    )
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

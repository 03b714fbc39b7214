//! Loading TLS material from files: the server chain and key (PEM in every form OpenSSL writes,
//! including encrypted PKCS#8, or a PKCS#12 bundle), the client CAs and the CRLs.
//!
//! Every error names the config key and the file, so `check` and a failed reload say exactly what
//! to fix.

use std::path::{Path, PathBuf};

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{
    CertificateDer, CertificateRevocationListDer, PrivateKeyDer, PrivatePkcs8KeyDer,
};

use super::{ServerIdentitySource, TlsSettings};

/// The systemd credential name looked up in `$CREDENTIALS_DIRECTORY` for a key password.
pub const KEY_PASSWORD_CREDENTIAL: &str = "key-password";

/// A problem with a TLS file, naming the config key and the file.
#[derive(Debug, thiserror::Error)]
#[error("{key} ({}): {problem}", path.display())]
pub struct MaterialError {
    /// The config key, e.g. `tls.private_key`.
    pub key: String,
    /// The file.
    pub path: PathBuf,
    /// What is wrong.
    pub problem: String,
}

impl MaterialError {
    fn new(key: impl Into<String>, path: &Path, problem: impl Into<String>) -> Self {
        MaterialError {
            key: key.into(),
            path: path.to_path_buf(),
            problem: problem.into(),
        }
    }
}

/// The server's certificate chain (leaf first) and private key.
#[derive(Debug)]
pub struct ServerIdentity {
    /// Leaf first, then intermediates.
    pub chain: Vec<CertificateDer<'static>>,
    /// The private key.
    pub key: PrivateKeyDer<'static>,
    /// Where the chain came from, for messages.
    pub chain_source: (String, PathBuf),
    /// Where the key came from, for messages.
    pub key_source: (String, PathBuf),
}

/// Everything read from disk for one TLS configuration.
#[derive(Debug)]
pub struct TlsMaterial {
    /// The server identity.
    pub identity: ServerIdentity,
    /// Trusted client CAs with the file each came from.
    pub client_cas: Vec<(PathBuf, CertificateDer<'static>)>,
    /// CRLs with the file each came from.
    pub crls: Vec<(PathBuf, CertificateRevocationListDer<'static>)>,
}

/// Reads every file the TLS settings name. Blocking: call off the async runtime's hot path.
pub fn load_material(tls: &TlsSettings) -> Result<TlsMaterial, MaterialError> {
    let identity = load_server_identity(&tls.identity)?;
    let mut client_cas = Vec::new();
    for (i, path) in tls.client_ca.iter().enumerate() {
        let key = format!("tls.client_ca[{i}]");
        for cert in read_certificates(&key, path)? {
            client_cas.push((path.clone(), cert));
        }
    }
    let mut crls = Vec::new();
    for (i, path) in tls.client_crl.iter().enumerate() {
        let key = format!("tls.client_crl[{i}]");
        for crl in read_crls(&key, path)? {
            crls.push((path.clone(), crl));
        }
    }
    Ok(TlsMaterial {
        identity,
        client_cas,
        crls,
    })
}

/// Every file the TLS settings name (for change detection by the reloader).
pub fn watched_files(tls: &TlsSettings) -> Vec<PathBuf> {
    let mut files = Vec::new();
    match &tls.identity {
        ServerIdentitySource::Pem {
            certificate,
            private_key,
            password_file,
        } => {
            files.push(certificate.clone());
            files.push(private_key.clone());
            files.extend(password_file.clone());
        }
        ServerIdentitySource::Pkcs12 {
            path,
            password_file,
        } => {
            files.push(path.clone());
            files.extend(password_file.clone());
        }
    }
    files.extend(tls.client_ca.iter().cloned());
    files.extend(tls.client_crl.iter().cloned());
    files
}

fn read_file(key: &str, path: &Path) -> Result<Vec<u8>, MaterialError> {
    std::fs::read(path).map_err(|e| MaterialError::new(key, path, format!("cannot read: {e}")))
}

/// Reads certificates from a PEM file (one or more `CERTIFICATE` blocks) or a single DER file.
pub fn read_certificates(
    key: &str,
    path: &Path,
) -> Result<Vec<CertificateDer<'static>>, MaterialError> {
    read_pem_or_der(key, path, "CERTIFICATE", "certificate")
}

fn read_crls(
    key: &str,
    path: &Path,
) -> Result<Vec<CertificateRevocationListDer<'static>>, MaterialError> {
    read_pem_or_der(key, path, "X509 CRL", "CRL")
}

/// Every `label` block of a PEM file, or the whole file as one DER object.
fn read_pem_or_der<T: PemObject + From<Vec<u8>>>(
    key: &str,
    path: &Path,
    label: &str,
    what: &str,
) -> Result<Vec<T>, MaterialError> {
    let bytes = read_file(key, path)?;
    if looks_like_pem(&bytes) {
        let bytes = without_byte_order_marks(bytes);
        let items = T::pem_slice_iter(&bytes)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| MaterialError::new(key, path, format!("invalid PEM: {e}")))?;
        if items.is_empty() {
            return Err(MaterialError::new(
                key,
                path,
                format!("no {label} block found"),
            ));
        }
        Ok(items)
    } else if bytes.first() == Some(&0x30) {
        Ok(vec![T::from(bytes)])
    } else {
        Err(MaterialError::new(
            key,
            path,
            format!("neither a PEM nor a DER {what}"),
        ))
    }
}

/// The UTF-8 byte-order mark some Windows editors put at the start of a text file (and that
/// `cat a.pem b.pem` then carries into the middle of one). It is never part of PEM, and a PEM
/// parser would skip the `-----BEGIN` line it sticks to, so it is removed wherever it is.
const UTF8_BOM: &[u8] = b"\xEF\xBB\xBF";

fn without_byte_order_marks(bytes: Vec<u8>) -> Vec<u8> {
    if !bytes.windows(UTF8_BOM.len()).any(|w| w == UTF8_BOM) {
        return bytes;
    }
    let mut out = Vec::with_capacity(bytes.len());
    let mut rest = bytes.as_slice();
    while let Some(at) = rest.windows(UTF8_BOM.len()).position(|w| w == UTF8_BOM) {
        out.extend_from_slice(&rest[..at]);
        rest = &rest[at + UTF8_BOM.len()..];
    }
    out.extend_from_slice(rest);
    out
}

fn looks_like_pem(bytes: &[u8]) -> bool {
    bytes.windows(11).any(|w| w == b"-----BEGIN ")
}

/// Loads the server identity from PEM files or a PKCS#12 bundle.
pub fn load_server_identity(
    source: &ServerIdentitySource,
) -> Result<ServerIdentity, MaterialError> {
    match source {
        ServerIdentitySource::Pem {
            certificate,
            private_key,
            password_file,
        } => {
            let chain = read_certificates("tls.certificate", certificate)?;
            let key = read_private_key(private_key, password_file.as_deref())?;
            Ok(ServerIdentity {
                chain,
                key,
                chain_source: ("tls.certificate".into(), certificate.clone()),
                key_source: ("tls.private_key".into(), private_key.clone()),
            })
        }
        ServerIdentitySource::Pkcs12 {
            path,
            password_file,
        } => load_pkcs12(path, password_file.as_deref()),
    }
}

/// The password for an encrypted key: the configured file, else the systemd credential.
fn read_password(key: &str, configured: Option<&Path>) -> Result<Option<String>, MaterialError> {
    read_secret(key, configured, KEY_PASSWORD_CREDENTIAL)
}

/// A one-line secret (password, API key): the configured file, else the systemd credential
/// `credential` in `$CREDENTIALS_DIRECTORY`; `None` when neither exists. A trailing newline is not
/// part of the secret.
pub fn read_secret(
    key: &str,
    configured: Option<&Path>,
    credential: &str,
) -> Result<Option<String>, MaterialError> {
    let path = match configured {
        Some(p) => p.to_path_buf(),
        None => match std::env::var_os("CREDENTIALS_DIRECTORY") {
            Some(dir) => {
                let p = Path::new(&dir).join(credential);
                if !p.exists() {
                    return Ok(None);
                }
                p
            }
            None => return Ok(None),
        },
    };
    let text = std::fs::read_to_string(&path)
        .map_err(|e| MaterialError::new(key, &path, format!("cannot read: {e}")))?;
    // A password file written with `echo` ends in a newline that is not part of the password.
    let password = text.trim_end_matches(['\r', '\n']).to_string();
    // The unit's `SetCredential=key-password:\n` is the credential when the file for
    // `LoadCredential=` is absent (an unencrypted key needs none): empty once trimmed, it means
    // "no password", so an encrypted key gets the "the key is encrypted" message.
    if configured.is_none() && password.is_empty() {
        return Ok(None);
    }
    Ok(Some(password))
}

fn read_private_key(
    path: &Path,
    password_file: Option<&Path>,
) -> Result<PrivateKeyDer<'static>, MaterialError> {
    read_private_key_as(
        PrivateKeyKeys {
            key: "tls.private_key",
            password_key: "tls.private_key_password_file",
            credential: KEY_PASSWORD_CREDENTIAL,
        },
        path,
        password_file,
    )
}

/// The config keys and systemd credential a private key is read under, for messages.
#[derive(Debug, Clone, Copy)]
pub struct PrivateKeyKeys {
    /// The key file's config key, e.g. `tls.private_key`.
    pub key: &'static str,
    /// The password file's config key.
    pub password_key: &'static str,
    /// The systemd credential holding the password when no file is configured.
    pub credential: &'static str,
}

/// Reads a PEM or DER private key (PKCS#8 plain or encrypted, PKCS#1, SEC1), errors naming `keys`.
pub fn read_private_key_as(
    keys: PrivateKeyKeys,
    path: &Path,
    password_file: Option<&Path>,
) -> Result<PrivateKeyDer<'static>, MaterialError> {
    let name = keys.key;
    let mut bytes = read_file(name, path)?;
    if looks_like_pem(&bytes) {
        bytes = without_byte_order_marks(bytes);
    }
    let text = String::from_utf8_lossy(&bytes);
    if text.contains("-----BEGIN ENCRYPTED PRIVATE KEY-----") {
        let password =
            read_secret(keys.password_key, password_file, keys.credential)?.ok_or_else(|| {
                MaterialError::new(
                    name,
                    path,
                    format!(
                        "the key is encrypted: set {} or provide the systemd credential {}",
                        keys.password_key, keys.credential
                    ),
                )
            })?;
        return decrypt_pkcs8(name, path, &bytes, &password);
    }
    if text.contains("Proc-Type: 4,ENCRYPTED") {
        return Err(MaterialError::new(
            name,
            path,
            "legacy OpenSSL PEM encryption is not supported: convert with \
             `openssl pkcs8 -topk8 -v2 aes-256-cbc -in old.key -out new.key`",
        ));
    }
    if looks_like_pem(&bytes) {
        return PrivateKeyDer::from_pem_slice(&bytes).map_err(|e| {
            MaterialError::new(
                name,
                path,
                format!("no usable private key (PKCS#8, PKCS#1 RSA or SEC1 EC PEM expected): {e}"),
            )
        });
    }
    if bytes.first() == Some(&0x30) {
        return PrivateKeyDer::try_from(bytes)
            .map_err(|e| MaterialError::new(name, path, format!("invalid DER private key: {e}")));
    }
    Err(MaterialError::new(
        name,
        path,
        "not a PEM or DER private key",
    ))
}

fn decrypt_pkcs8(
    name: &str,
    path: &Path,
    pem: &[u8],
    password: &str,
) -> Result<PrivateKeyDer<'static>, MaterialError> {
    let text = std::str::from_utf8(pem)
        .map_err(|_| MaterialError::new(name, path, "the PEM file is not UTF-8"))?;
    let begin = text
        .find("-----BEGIN ENCRYPTED PRIVATE KEY-----")
        .unwrap_or_default();
    let (label, der) = pkcs8::der::pem::decode_vec(&text.as_bytes()[begin..])
        .map_err(|e| MaterialError::new(name, path, format!("invalid PEM: {e}")))?;
    if label != "ENCRYPTED PRIVATE KEY" {
        return Err(MaterialError::new(
            name,
            path,
            "expected an ENCRYPTED PRIVATE KEY block",
        ));
    }
    let info = pkcs8::EncryptedPrivateKeyInfoRef::try_from(der.as_slice())
        .map_err(|e| MaterialError::new(name, path, format!("invalid encrypted PKCS#8: {e}")))?;
    let doc = info.decrypt(password.as_bytes()).map_err(|e| {
        MaterialError::new(
            name,
            path,
            format!("cannot decrypt the key (wrong password, or an unsupported cipher): {e}"),
        )
    })?;
    Ok(PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(
        doc.as_bytes().to_vec(),
    )))
}

fn load_pkcs12(path: &Path, password_file: Option<&Path>) -> Result<ServerIdentity, MaterialError> {
    const KEY: &str = "tls.pkcs12";
    let bytes = read_file(KEY, path)?;
    // `openssl pkcs12 -export -passout pass:` makes an empty password, which is legal.
    let password = read_password("tls.pkcs12_password_file", password_file)?.unwrap_or_default();
    let store = p12_keystore::KeyStore::from_pkcs12(
        &bytes,
        &password,
        p12_keystore::Pkcs12ImportPolicy::default(),
    )
    .map_err(|e| {
        MaterialError::new(
            KEY,
            path,
            format!("cannot open the PKCS#12 bundle (wrong password or not a .pfx): {e}"),
        )
    })?;
    let (_, chain) = store.private_key_chain().ok_or_else(|| {
        MaterialError::new(
            KEY,
            path,
            "the bundle holds no private key with its certificate",
        )
    })?;
    let certs: Vec<CertificateDer<'static>> = chain
        .certs()
        .iter()
        .map(|c| CertificateDer::from(c.as_der().to_vec()))
        .collect();
    if certs.is_empty() {
        return Err(MaterialError::new(
            KEY,
            path,
            "the bundle holds no certificate for its key",
        ));
    }
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(chain.key().as_der().to_vec()));
    Ok(ServerIdentity {
        chain: certs,
        key,
        chain_source: (KEY.into(), path.to_path_buf()),
        key_source: (KEY.into(), path.to_path_buf()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_order_marks_are_removed_wherever_they_are() {
        let text = b"\xEF\xBB\xBF-----BEGIN X-----\nAA==\n-----END X-----\n\xEF\xBB\xBF-----BEGIN X-----\n";
        let clean = without_byte_order_marks(text.to_vec());
        assert!(clean.starts_with(b"-----BEGIN X-----"));
        assert!(!clean.windows(3).any(|w| w == UTF8_BOM));
        assert_eq!(clean.len(), text.len() - 6);
        let plain = b"-----BEGIN X-----\n".to_vec();
        assert_eq!(without_byte_order_marks(plain.clone()), plain);
    }
}

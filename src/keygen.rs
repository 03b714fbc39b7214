//! `bars-gateway keygen`: the onboarding step of a BaRS sender (NHS API platform, "signed JWT
//! authentication"): an RSA key pair, the public key as PEM to register with the platform, and a
//! JWKS document carrying the chosen `kid`. Also the public half of a configured key for `check`.
//!
//! RSA generation is RustCrypto's `rsa` (ring, which signs, cannot generate RSA keys); it runs in
//! pure Rust, so a fresh machine needs no openssl.

use std::io::Write as _;
use std::path::{Path, PathBuf};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use rsa::pkcs1::DecodeRsaPrivateKey as _;
use rsa::pkcs8::{DecodePrivateKey as _, EncodePrivateKey as _, EncodePublicKey as _, LineEnding};
use rsa::traits::PublicKeyParts as _;
use rsa::{RsaPrivateKey, RsaPublicKey};
use rustls_pki_types::PrivateKeyDer;

/// Key size written by default: the NHS guide's `openssl genrsa 4096`.
pub const DEFAULT_BITS: usize = 4096;
/// PBKDF2-SHA256 rounds for an encrypted key (OWASP 2023 guidance for PBKDF2-HMAC-SHA256).
const PBKDF2_ROUNDS: u32 = 600_000;

/// Why keygen failed.
#[derive(Debug, thiserror::Error)]
pub enum KeygenError {
    /// The KID is unusable.
    #[error("--kid {0:?}: use letters, digits, '-', '_' and '.', like MySupplier-INT-1")]
    BadKid(String),
    /// A file exists already (keygen never overwrites a key).
    #[error("{}: exists already; choose another --out or a new --kid", .0.display())]
    Exists(PathBuf),
    /// A file could not be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// Key generation or encoding failed.
    #[error("key generation failed: {0}")]
    Crypto(String),
}

/// What keygen wrote.
#[derive(Debug)]
pub struct Generated {
    /// The private key (PKCS#8 PEM, encrypted when a password was given), mode 0600.
    pub private_key: PathBuf,
    /// The public key (SPKI PEM) to register with the platform.
    pub public_key: PathBuf,
    /// The JWKS document with the `kid`.
    pub jwks: PathBuf,
}

/// Checks a KID: non-empty, `[A-Za-z0-9._-]` (it goes into a JWT header and file names).
pub fn check_kid(kid: &str) -> Result<(), KeygenError> {
    let ok = !kid.is_empty()
        && kid.len() <= 128
        && kid
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(())
    } else {
        Err(KeygenError::BadKid(kid.to_string()))
    }
}

/// Generates a `bits`-bit RSA key and writes `<kid>.key`, `<kid>.pub.pem` and `<kid>.jwks.json`
/// into `out`. With `password`, the private key is encrypted PKCS#8 (PBKDF2-SHA256, AES-256-CBC,
/// as `openssl genpkey -aes256` writes it).
pub fn generate(
    kid: &str,
    out: &Path,
    bits: usize,
    password: Option<&str>,
) -> Result<Generated, KeygenError> {
    check_kid(kid)?;
    let files = Generated {
        private_key: out.join(format!("{kid}.key")),
        public_key: out.join(format!("{kid}.pub.pem")),
        jwks: out.join(format!("{kid}.jwks.json")),
    };
    for f in [&files.private_key, &files.public_key, &files.jwks] {
        if f.exists() {
            return Err(KeygenError::Exists(f.clone()));
        }
    }
    std::fs::create_dir_all(out).map_err(|source| KeygenError::Io {
        path: out.to_path_buf(),
        source,
    })?;
    let crypto = |e: &dyn std::fmt::Display| KeygenError::Crypto(e.to_string());
    let key = RsaPrivateKey::new(&mut rsa::rand_core::OsRng, bits).map_err(|e| crypto(&e))?;
    let der = key.to_pkcs8_der().map_err(|e| crypto(&e))?;
    let private_pem: String = match password {
        None => der
            .to_pem("PRIVATE KEY", LineEnding::LF)
            .map_err(|e| crypto(&e))?
            .to_string(),
        Some(password) => encrypt(der.as_bytes(), password)?,
    };
    let (public_pem, jwks) = public_documents_of(&key, kid)?;
    write_private(&files.private_key, private_pem.as_bytes())?;
    write(&files.public_key, public_pem.as_bytes())?;
    write(
        &files.jwks,
        format!(
            "{}\n",
            serde_json::to_string_pretty(&jwks).unwrap_or_default()
        )
        .as_bytes(),
    )?;
    Ok(files)
}

fn encrypt(pkcs8_der: &[u8], password: &str) -> Result<String, KeygenError> {
    use ring::rand::SecureRandom as _;
    let crypto = |e: &dyn std::fmt::Display| KeygenError::Crypto(e.to_string());
    let mut salt = [0u8; 16];
    let mut iv = [0u8; 16];
    let rng = ring::rand::SystemRandom::new();
    rng.fill(&mut salt)
        .and_then(|()| rng.fill(&mut iv))
        .map_err(|_| KeygenError::Crypto("the system RNG failed".into()))?;
    let params =
        pkcs8::pkcs5::pbes2::Parameters::generate_pbkdf2_sha256_aes256cbc(PBKDF2_ROUNDS, &salt, iv)
            .map_err(|e| crypto(&e))?;
    let info = pkcs8::PrivateKeyInfoRef::try_from(pkcs8_der).map_err(|e| crypto(&e))?;
    let encrypted = info
        .encrypt_with_params(params, password.as_bytes())
        .map_err(|e| crypto(&e))?;
    Ok(encrypted
        .to_pem("ENCRYPTED PRIVATE KEY", pkcs8::LineEnding::LF)
        .map_err(|e| crypto(&e))?
        .to_string())
}

/// The public key PEM (SPKI) and a JWKS document (`kty` RSA, `alg` RS512, `use` sig, `kid`) for a
/// loaded private key (PKCS#8 or PKCS#1).
pub fn public_documents(
    key: &PrivateKeyDer<'_>,
    kid: &str,
) -> Result<(String, serde_json::Value), KeygenError> {
    let crypto = |e: &dyn std::fmt::Display| KeygenError::Crypto(e.to_string());
    let key = match key {
        PrivateKeyDer::Pkcs8(k) => {
            RsaPrivateKey::from_pkcs8_der(k.secret_pkcs8_der()).map_err(|e| crypto(&e))?
        }
        PrivateKeyDer::Pkcs1(k) => {
            RsaPrivateKey::from_pkcs1_der(k.secret_pkcs1_der()).map_err(|e| crypto(&e))?
        }
        _ => return Err(KeygenError::Crypto("not an RSA key".into())),
    };
    public_documents_of(&key, kid)
}

fn public_documents_of(
    key: &RsaPrivateKey,
    kid: &str,
) -> Result<(String, serde_json::Value), KeygenError> {
    let public = RsaPublicKey::from(key);
    let pem = public
        .to_public_key_pem(LineEnding::LF)
        .map_err(|e| KeygenError::Crypto(e.to_string()))?;
    let jwks = serde_json::json!({"keys": [{
        "kty": "RSA",
        "n": URL_SAFE_NO_PAD.encode(public.n().to_bytes_be()),
        "e": URL_SAFE_NO_PAD.encode(public.e().to_bytes_be()),
        "alg": "RS512",
        "kid": kid,
        "use": "sig",
    }]});
    Ok((pem, jwks))
}

fn write(path: &Path, bytes: &[u8]) -> Result<(), KeygenError> {
    std::fs::write(path, bytes).map_err(|source| KeygenError::Io {
        path: path.to_path_buf(),
        source,
    })
}

fn write_private(path: &Path, bytes: &[u8]) -> Result<(), KeygenError> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let io = |source| KeygenError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(io)?;
    file.write_all(bytes).map_err(io)
}

/// The text printed after a successful keygen: the files and the onboarding steps.
pub fn next_steps(kid: &str, files: &Generated, encrypted: bool) -> String {
    format!(
        "Wrote
  private key  {priv} (mode 0600{enc}; keep it secret, never send it)
  public key   {public}
  JWKS         {jwks}

Next steps (NHS API platform, signed JWT authentication):
  1. In the developer portal, open your application for this environment and register the public
     key {public} with the key id (KID) {kid} (or host {jwks} at your JWKS URL).
  2. Put the private key where the gateway reads it, e.g. /etc/bars-gateway/egress/{kid}.key, and
     set in [egress]:
       key_id = \"{kid}\"
       signing_key = \"/etc/bars-gateway/egress/{kid}.key\"{pw}
       api_key_file = \"/etc/bars-gateway/egress/api-key\"   # the application's API key
  3. Run `bars-gateway check` (it loads the key and prints its JWKS), then reload or restart.
  Rotation: register the next key (e.g. ...-2) alongside this one, switch key_id and signing_key,
  and remove the old key from the portal once the gateway runs on the new one.
",
        priv = files.private_key.display(),
        public = files.public_key.display(),
        jwks = files.jwks.display(),
        enc = if encrypted { ", encrypted" } else { "" },
        pw = if encrypted {
            "\n       signing_key_password_file = \"/etc/bars-gateway/egress/key-password\""
        } else {
            ""
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kids_are_checked() {
        assert!(check_kid("MySupplier-INT-1").is_ok());
        for bad in ["", "has space", "../up", "a/b"] {
            assert!(check_kid(bad).is_err(), "{bad:?}");
        }
    }
}

//! A throwaway development PKI shaped like the NHS one: a root, a sub-CA under it, a server leaf
//! for `localhost`, and client leaves that carry only a CN (the BaRS proxy's certificates have no
//! subjectAltName, BARS-CONTEXT.md "Transport"). Keys are ECDSA P-256, made in memory with rcgen.
//!
//! [`DevCa`] is the building block (the end-to-end test harness can issue its own expired,
//! revoked or impostor leaves with it); [`write_demo_pki`] is the set `bars-gateway demo` uses.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, Certificate, CertificateParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SerialNumber,
};

/// CN of the demo root CA.
pub const ROOT_CN: &str = "bars-gateway demo Root Authority";
/// CN of the demo sub-CA, which issues the server and the trusted client certificates.
pub const SUB_CA_CN: &str = "bars-gateway demo Level 1C";
/// CN of the self-signed CA the gateway does not trust.
pub const UNTRUSTED_CA_CN: &str = "bars-gateway demo untrusted CA";

/// Why the PKI could not be made or written.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    /// rcgen refused to make a key or certificate.
    #[error("cannot generate {what}: {source}")]
    Generate {
        /// What was being made, e.g. `the sub-CA certificate`.
        what: String,
        /// rcgen's error.
        source: rcgen::Error,
    },
    /// A PEM file could not be written.
    #[error("cannot write {}: {source}", path.display())]
    Write {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
}

fn generate<T>(what: &str, result: Result<T, rcgen::Error>) -> Result<T, PkiError> {
    result.map_err(|source| PkiError::Generate {
        what: what.to_string(),
        source,
    })
}

/// A certificate and its private key, both PEM.
#[derive(Debug, Clone)]
pub struct IssuedCert {
    /// The certificate (PEM).
    pub cert_pem: String,
    /// The private key (PKCS#8 PEM).
    pub key_pem: String,
}

/// A certificate authority that can issue sub-CAs and leaves.
pub struct DevCa {
    cert: Certificate,
    issuer: Issuer<'static, KeyPair>,
}

/// Parameters of a CA certificate: `O=nhs, OU=CA, CN=<cn>`, may sign certificates and CRLs.
pub fn ca_params(cn: &str) -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "nhs");
    dn.push(DnType::OrganizationalUnitName, "CA");
    dn.push(DnType::CommonName, cn);
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params
}

/// Parameters of a client leaf shaped like the BaRS proxy's: `O=nhs, OU=Devices, CN=<cn>`, no
/// subjectAltName, clientAuth only. `serial` of `None` derives one from the public key.
pub fn client_params(cn: &str, serial: Option<u64>) -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "nhs");
    dn.push(DnType::OrganizationalUnitName, "Devices");
    dn.push(DnType::CommonName, cn);
    params.distinguished_name = dn;
    params.serial_number = serial.map(SerialNumber::from);
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params
}

/// Parameters of a server leaf for `names` (DNS names or IP addresses), CN = the first name.
pub fn server_params(names: &[&str]) -> Result<CertificateParams, PkiError> {
    let sans: Vec<String> = names.iter().map(|n| n.to_string()).collect();
    let mut params = generate(
        "the server certificate's names",
        CertificateParams::new(sans),
    )?;
    if let Some(first) = names.first() {
        params.distinguished_name.push(DnType::CommonName, *first);
    }
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    Ok(params)
}

impl DevCa {
    /// A self-signed root CA.
    pub fn root(cn: &str) -> Result<DevCa, PkiError> {
        let key = generate("a CA key", KeyPair::generate())?;
        let params = ca_params(cn);
        let cert = generate(
            &format!("the CA certificate {cn:?}"),
            params.self_signed(&key),
        )?;
        Ok(DevCa {
            cert,
            issuer: Issuer::new(params, key),
        })
    }

    /// A sub-CA signed by this CA.
    pub fn sub_ca(&self, cn: &str) -> Result<DevCa, PkiError> {
        let key = generate("a CA key", KeyPair::generate())?;
        let params = ca_params(cn);
        let cert = generate(
            &format!("the CA certificate {cn:?}"),
            params.signed_by(&key, &self.issuer),
        )?;
        Ok(DevCa {
            cert,
            issuer: Issuer::new(params, key),
        })
    }

    /// Issues a leaf from `params` with a fresh key.
    pub fn issue(&self, params: &CertificateParams) -> Result<IssuedCert, PkiError> {
        let key = generate("a leaf key", KeyPair::generate())?;
        let cert = generate("a leaf certificate", params.signed_by(&key, &self.issuer))?;
        Ok(IssuedCert {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// This CA's certificate (PEM).
    pub fn cert_pem(&self) -> String {
        self.cert.pem()
    }

    /// The signer, for CRLs and anything else rcgen signs.
    pub fn issuer(&self) -> &Issuer<'static, KeyPair> {
        &self.issuer
    }
}

/// The files of the demo PKI.
#[derive(Debug, Clone)]
pub struct DemoPki {
    /// The directory holding them.
    pub dir: PathBuf,
    /// `root.pem`: the root CA, what a client trusts (`curl --cacert`).
    pub root: PathBuf,
    /// `sub-ca.pem`: the sub-CA that issued the server and trusted client certificates.
    pub sub_ca: PathBuf,
    /// `server-chain.pem`: the server leaf for localhost and 127.0.0.1, then the sub-CA.
    pub server_chain: PathBuf,
    /// `server.key`.
    pub server_key: PathBuf,
    /// `client.pem`: the trusted client, CN = the client CN given to [`write_demo_pki`].
    pub client_cert: PathBuf,
    /// `client.key`.
    pub client_key: PathBuf,
    /// `untrusted-ca.pem`: a CA the gateway does not trust.
    pub untrusted_ca: PathBuf,
    /// `untrusted-client.pem`: the same CN, issued by the untrusted CA.
    pub untrusted_client_cert: PathBuf,
    /// `untrusted-client.key`.
    pub untrusted_client_key: PathBuf,
}

/// Makes the demo PKI and writes it as PEM files into `dir`: root → sub-CA → server leaf
/// (`localhost`, `127.0.0.1`) and a client leaf with CN `client_cn`; plus an untrusted CA and a
/// client leaf with the same CN from it.
pub fn write_demo_pki(dir: &Path, client_cn: &str) -> Result<DemoPki, PkiError> {
    let pki = DemoPki {
        dir: dir.to_path_buf(),
        root: dir.join("root.pem"),
        sub_ca: dir.join("sub-ca.pem"),
        server_chain: dir.join("server-chain.pem"),
        server_key: dir.join("server.key"),
        client_cert: dir.join("client.pem"),
        client_key: dir.join("client.key"),
        untrusted_ca: dir.join("untrusted-ca.pem"),
        untrusted_client_cert: dir.join("untrusted-client.pem"),
        untrusted_client_key: dir.join("untrusted-client.key"),
    };
    let root = DevCa::root(ROOT_CN)?;
    let sub = root.sub_ca(SUB_CA_CN)?;
    let server = sub.issue(&server_params(&["localhost", "127.0.0.1"])?)?;
    let client = sub.issue(&client_params(client_cn, None))?;
    let untrusted = DevCa::root(UNTRUSTED_CA_CN)?;
    let untrusted_client = untrusted.issue(&client_params(client_cn, None))?;

    write_pem(&pki.root, &root.cert_pem())?;
    write_pem(&pki.sub_ca, &sub.cert_pem())?;
    write_pem(
        &pki.server_chain,
        &format!("{}{}", server.cert_pem, sub.cert_pem()),
    )?;
    write_pem(&pki.server_key, &server.key_pem)?;
    write_pem(&pki.client_cert, &client.cert_pem)?;
    write_pem(&pki.client_key, &client.key_pem)?;
    write_pem(&pki.untrusted_ca, &untrusted.cert_pem())?;
    write_pem(&pki.untrusted_client_cert, &untrusted_client.cert_pem)?;
    write_pem(&pki.untrusted_client_key, &untrusted_client.key_pem)?;
    Ok(pki)
}

fn write_pem(path: &Path, text: &str) -> Result<(), PkiError> {
    std::fs::write(path, text).map_err(|source| PkiError::Write {
        path: path.to_path_buf(),
        source,
    })
}

//! The properties a TLS scanner checks (docs/security.md §4 records the sslyze run), checked
//! here without one, fast enough for every CI run: only TLS 1.2 and 1.3; only forward-secret AEAD
//! suites; every suite and key exchange group the gateway offers works; no compression; no
//! renegotiation; a client certificate always requested and required.
//!
//! rustls cannot offer a CBC, RSA-key-exchange, NULL or anonymous suite, an old version or
//! compression, so those ClientHellos are built byte by byte (as `tls_handshake.rs` does for
//! TLS 1.1) and the test reads the server's first answer off the socket. The renegotiation attempt
//! needs a ClientHello *inside* an established TLS 1.2 session: the client's traffic keys are
//! taken from rustls (`dangerous_extract_secrets`) and the record encrypted by hand.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bars_gateway::demo::pki::{ca_params, server_params};
use common::*;
use rustls::crypto::cipher::{InboundOpaqueMessage, OutboundChunks, OutboundPlainMessage};
use rustls::crypto::{CryptoProvider, SupportedKxGroup};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{
    CipherSuite, ConnectionTrafficSecrets, ContentType, ProtocolVersion, SupportedCipherSuite,
    SupportedProtocolVersion,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A throwaway RSA-2048 key for the RSA server certificate below (rcgen with ring cannot generate
/// RSA keys, and this test must not need openssl). Test-only: it signs nothing but this test's
/// handshakes, with a certificate made at run time.
const RSA_SERVER_KEY: &str = "\
-----BEGIN PRIVATE KEY-----
MIIEvAIBADANBgkqhkiG9w0BAQEFAASCBKYwggSiAgEAAoIBAQDrPVtvIeSNQ8Uu
GTnGStEewOzORxMBfmeAzspRxJPgVxZeA4rLrUtOodgsY/2+MvIf3HSVyvWqznEg
Ay9JJqYxpEFrZ0UyWKYViSnVAku5BjMZYdwuFpEp7hGUM/Np+SqWcmLl5WOJwYdX
qji8OqZPXCP42n75AfHDNtAf2tibQtVQwqkamCmXAudTh8Eb7WkXppaOiw2Hap1g
8WZBsiMYb59dCTTesrRVc8z1/PZQ0N8YDuCXjd2kxaGJzLNjGiN+WtZxVH+ZwdKK
y/Zvbe63YX/lDHlRB/9MnBFBe5zo+HPjSCSZ5q16zKhLn2xBEbwmdWsK9YhdeVw4
337NOP9fAgMBAAECggEADw/R07xGT3sy3ABBJZPzGXZ90w6pm14LZNZuDYKPe1I9
fDiFga6vVIdipCOk2AbtX3ffPnC3079oboXLAx0xOprLQNlkYf8GEflDJJXYi64S
Gy0btWxm0ASjuysBCgcqSxFjiVfAzKMHtj0PvpGSG3Zeq+za1g5h+z9TtRkZ5wWR
iRb121zaEqQgVel17+Rc783/AAwCNzoD1N2gnBCCyRYZ8U+/ofwvp6In/3Dh025w
dTYw7ZjtbOY4c5YDGD2PCJ29rxcntA4daHfN7fGHD320K8OsWTECK0GJvuLuMADP
dD4cmXxivjb8u5cw7kdj6b1Qdt2F22pIYO/lwivxwQKBgQD1ndpN4FVEK+cfsbg1
NBOrxpeJO+S8zHKCVJA+y+78LbTC2qs5tmV9hcz7GvrfSi469x7TYVyWX15QFkhT
nOA/OoYqB8qnviA5TDp8QLR8RuiIejz7VhIrs3UPep/lpI8hcBiZROmFfcmyn1by
Du1I4wSAyfw8lUAJ5iXa1oTcHwKBgQD1LzOfjAzbbHV5Jy02mEmzI23KBKZ7e467
JAsAiQsuYmyq56OVosvovfNTdhFGW/WRaQpGy74DL786zwgJ8N8gHQXmGw0dV+0J
jiFR+SbaxayrzLe2YV77gwtuYstXQ9JhbJfEDalELZcmxQGVq/IbXP1VQECupkOv
aHUq1o90wQKBgCFy3tDuNQ50oCQb0sdEEU26XNaulmbzvMBs/bvfj+s92jkTCHBy
m32tpA2qTfHsq0ESeFs3DiHYWQK1FiJ04cEamjzNFNclOEQ1Ul2rfijSi0ZSx00/
GnhjFxUFkRL4Bxn5pw/wZ5DrYXV256NNTxk2+V0EpNonRTJT6mHUBwHnAoGAAQKW
xdt/2g+SVFNy/jyWYSSOOTzXqr6RkffOC8yEvUYuiG234M/w4x6VOAzOeWm7k0PJ
hQ0l1UGHGijsMY5KfQlhktcdsLdCBL4PKRVLsa8KzRJk112DVKnvjB7gE5X18ezO
m0IrJlrBuqkpHoK81pwFdypymcWZlclqYijMIoECgYBWDdNYEjUxpGv7NMfIsJ59
fM+0cHDO+vetaHj4dvKTBraZRsH2q0Kb3RLZQYU0N2EdWK+68zvlNnGbyzDqe5g8
B6RHoUKsG73D2mCCkdxlbMBZwGda+IF9QPSNb+tisfp2c1p5Ob8sw1PD8EmBUU2w
IXjEUOIaO5XPwdgJ9ZEH1g==
-----END PRIVATE KEY-----
";

/// How long to wait for the gateway's answer to a hand-built hello.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);

// --- TLS constants (RFC 8446 / RFC 5246 / IANA registries) ---------------------------------------
const HANDSHAKE: u8 = 22;
const ALERT: u8 = 21;
const APPLICATION_DATA: u8 = 23;
const FATAL: u8 = 2;
const WARNING: u8 = 1;
const HANDSHAKE_FAILURE: u8 = 40;
const ILLEGAL_PARAMETER: u8 = 47;
const PROTOCOL_VERSION: u8 = 70;
const NO_RENEGOTIATION: u8 = 100;
const SERVER_HELLO: u8 = 2;
const CERTIFICATE_REQUEST: u8 = 13;
const SERVER_HELLO_DONE: u8 = 14;
const COMPRESSION_NULL: u8 = 0;
const COMPRESSION_DEFLATE: u8 = 1;

/// A gateway whose server certificate has an RSA-2048 key, like the NHS-issued ones, so that the
/// ECDHE_RSA suites can be negotiated (the standard rig's key is ECDSA P-256).
async fn rsa_rig() -> Rig {
    let pki = TestPki::new();
    let sub_key =
        rcgen::KeyPair::from_pem(&std::fs::read_to_string(pki.path("sub.key")).unwrap()).unwrap();
    let sub = rcgen::Issuer::new(ca_params("Test NHS Level 1C"), sub_key);
    let key = rcgen::KeyPair::from_pem(RSA_SERVER_KEY).unwrap();
    let cert = server_params(&["localhost", "127.0.0.1"])
        .unwrap()
        .signed_by(&key, &sub)
        .unwrap();
    let sub_pem = std::fs::read_to_string(pki.path("sub.pem")).unwrap();
    std::fs::write(
        pki.path("rsa-server-chain.pem"),
        format!("{}{sub_pem}", cert.pem()),
    )
    .unwrap();
    std::fs::write(pki.path("rsa-server.key"), RSA_SERVER_KEY).unwrap();
    let upstream = TestUpstream::start().await;
    let config = pki
        .config_toml(&upstream.url())
        .replace("\"server-chain.pem\"", "\"rsa-server-chain.pem\"")
        .replace("\"server.key\"", "\"rsa-server.key\"");
    let gateway = TestGateway::start(pki.settings(&config)).await;
    Rig {
        pki,
        upstream,
        gateway,
    }
}

/// A client trusting the test root and presenting the proxy's certificate (or none), offering
/// exactly `suites` and `groups` over `versions`.
fn client_offering(
    pki: &TestPki,
    versions: &[&'static SupportedProtocolVersion],
    suites: Vec<SupportedCipherSuite>,
    groups: Vec<&'static dyn SupportedKxGroup>,
    with_certificate: bool,
) -> rustls::ClientConfig {
    let provider = CryptoProvider {
        cipher_suites: suites,
        kx_groups: groups,
        ..rustls::crypto::ring::default_provider()
    };
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_file(pki.path("root.pem")).unwrap())
        .unwrap();
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(provider))
        .with_protocol_versions(versions)
        .unwrap()
        .with_root_certificates(roots);
    let mut config = if with_certificate {
        let chain = vec![CertificateDer::from_pem_file(pki.path("client-proxy.pem")).unwrap()];
        let key = PrivateKeyDer::from_pem_file(pki.path("client-proxy.key")).unwrap();
        builder.with_client_auth_cert(chain, key).unwrap()
    } else {
        builder.with_no_client_auth()
    };
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    config
}

/// What a handshake negotiated and the status of one `GET /metadata` sent over it.
#[derive(Debug)]
struct Served {
    version: ProtocolVersion,
    suite: CipherSuite,
    group: String,
    status: u16,
}

async fn handshake_and_get(
    addr: SocketAddr,
    config: rustls::ClientConfig,
) -> Result<Served, String> {
    let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    let (_, conn) = tls.get_ref();
    let version = conn.protocol_version().ok_or("no version")?;
    let suite = conn.negotiated_cipher_suite().ok_or("no suite")?.suite();
    let group = conn
        .negotiated_key_exchange_group()
        .map(|g| format!("{:?}", g.name()))
        .unwrap_or_default();
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
            .await
            .map_err(|e| format!("http handshake: {e}"))?;
    tokio::spawn(connection);
    let response = tokio::time::timeout(Duration::from_secs(20), sender.send_request(metadata()))
        .await
        .map_err(|_| "no response in 20 s".to_string())?
        .map_err(|e| format!("request: {e}"))?;
    Ok(Served {
        version,
        suite,
        group,
        status: response.status().as_u16(),
    })
}

fn is_forward_secret_aead(suite: SupportedCipherSuite) -> bool {
    match suite {
        // Every TLS 1.3 suite is AEAD with (EC)DHE; the ring provider has these three.
        SupportedCipherSuite::Tls13(s) => matches!(
            s.common.suite,
            CipherSuite::TLS13_AES_128_GCM_SHA256
                | CipherSuite::TLS13_AES_256_GCM_SHA384
                | CipherSuite::TLS13_CHACHA20_POLY1305_SHA256
        ),
        SupportedCipherSuite::Tls12(s) => {
            let name = format!("{:?}", s.common.suite);
            name.starts_with("TLS_ECDHE_")
                && (name.contains("_GCM_") || name.ends_with("_CHACHA20_POLY1305_SHA256"))
        }
    }
}

#[test]
fn every_cipher_suite_and_group_the_gateway_offers_is_forward_secret_and_aead() {
    let provider = bars_gateway::tls::crypto_provider();
    assert_eq!(
        provider.cipher_suites.len(),
        9,
        "{:?}",
        provider.cipher_suites
    );
    for suite in &provider.cipher_suites {
        assert!(is_forward_secret_aead(*suite), "{suite:?}");
    }
    let groups: Vec<String> = provider
        .kx_groups
        .iter()
        .map(|g| format!("{:?}", g.name()))
        .collect();
    assert_eq!(groups, ["X25519", "secp256r1", "secp384r1"]);
}

#[tokio::test]
async fn each_tls13_suite_the_gateway_offers_serves_a_request_with_ecdsa_and_rsa_certificates() {
    for rig in [Rig::start().await, rsa_rig().await] {
        for suite in bars_gateway::tls::crypto_provider().cipher_suites.iter() {
            let SupportedCipherSuite::Tls13(_) = suite else {
                continue;
            };
            let config = client_offering(
                &rig.pki,
                &[&rustls::version::TLS13],
                vec![*suite],
                rustls::crypto::ring::default_provider().kx_groups,
                true,
            );
            let served = handshake_and_get(rig.gateway.addr, config).await.unwrap();
            assert_eq!(served.version, ProtocolVersion::TLSv1_3);
            assert_eq!(served.suite, suite.suite());
            assert_eq!(served.status, 200, "{served:?}");
        }
    }
}

#[tokio::test]
async fn each_tls12_suite_the_gateway_offers_serves_a_request_with_a_matching_certificate() {
    let (ecdsa, rsa) = (Rig::start().await, rsa_rig().await);
    let mut served_suites = Vec::new();
    for suite in bars_gateway::tls::crypto_provider().cipher_suites.iter() {
        let SupportedCipherSuite::Tls12(_) = suite else {
            continue;
        };
        let rig = if format!("{:?}", suite.suite()).contains("ECDSA") {
            &ecdsa
        } else {
            &rsa
        };
        let config = client_offering(
            &rig.pki,
            &[&rustls::version::TLS12],
            vec![*suite],
            rustls::crypto::ring::default_provider().kx_groups,
            true,
        );
        let served = handshake_and_get(rig.gateway.addr, config).await.unwrap();
        assert_eq!(served.version, ProtocolVersion::TLSv1_2);
        assert_eq!(served.suite, suite.suite());
        assert_eq!(served.status, 200, "{served:?}");
        served_suites.push(served.suite);
    }
    assert_eq!(served_suites.len(), 6, "{served_suites:?}");
}

#[tokio::test]
async fn each_key_exchange_group_the_gateway_offers_is_negotiated_over_tls12_and_tls13() {
    let rig = Rig::start().await;
    for group in bars_gateway::tls::crypto_provider().kx_groups.iter() {
        for version in [&rustls::version::TLS12, &rustls::version::TLS13] {
            let config = client_offering(
                &rig.pki,
                &[version],
                rustls::crypto::ring::default_provider().cipher_suites,
                vec![*group],
                true,
            );
            let served = handshake_and_get(rig.gateway.addr, config).await.unwrap();
            assert_eq!(served.group, format!("{:?}", group.name()));
            assert_eq!(served.status, 200);
        }
    }
}

#[tokio::test]
async fn a_client_without_a_certificate_is_refused_over_tls12_and_tls13() {
    let rig = Rig::start().await;
    for version in [&rustls::version::TLS12, &rustls::version::TLS13] {
        let config = client_offering(
            &rig.pki,
            &[version],
            rustls::crypto::ring::default_provider().cipher_suites,
            rustls::crypto::ring::default_provider().kx_groups,
            false,
        );
        let refused = handshake_and_get(rig.gateway.addr, config).await;
        assert!(refused.is_err(), "{version:?}: {refused:?}");
    }
    assert_eq!(rig.upstream.count(), 0);
}

// --- Hand-built ClientHellos --------------------------------------------------------------------

/// One TLS extension: type, length, data.
fn extension(kind: u16, data: &[u8]) -> Vec<u8> {
    let mut out = kind.to_be_bytes().to_vec();
    out.extend((data.len() as u16).to_be_bytes());
    out.extend(data);
    out
}

/// The extensions a real TLS 1.2 client sends, so that only the suites (or compression) are
/// wrong: signature_algorithms (ECDSA P-256, RSA-PSS and PKCS#1 with SHA-256), supported_groups
/// (x25519, secp256r1), ec_point_formats (uncompressed), extended_master_secret and an empty
/// renegotiation_info (RFC 5746).
fn tls12_extensions() -> Vec<u8> {
    let mut out = extension(0x000d, &[0x00, 0x06, 0x04, 0x03, 0x08, 0x04, 0x04, 0x01]);
    out.extend(extension(0x000a, &[0x00, 0x04, 0x00, 0x1d, 0x00, 0x17]));
    out.extend(extension(0x000b, &[0x01, 0x00]));
    out.extend(extension(0x0017, &[]));
    out.extend(extension(0xff01, &[0x00]));
    out
}

/// TLS 1.2's extensions plus supported_versions (TLS 1.3 only) and an x25519 key_share.
fn tls13_extensions() -> Vec<u8> {
    let mut out = tls12_extensions();
    out.extend(extension(0x002b, &[0x02, 0x03, 0x04]));
    let mut share = vec![0x00, 0x24, 0x00, 0x1d, 0x00, 0x20];
    share.extend([0x09; 32]);
    out.extend(extension(0x0033, &share));
    out
}

/// A ClientHello handshake message (no record header).
fn client_hello_message(
    version: u16,
    suites: &[u16],
    compression: &[u8],
    extensions: &[u8],
) -> Vec<u8> {
    let mut body = version.to_be_bytes().to_vec();
    body.extend([0x42; 32]); // random
    body.push(0); // no session id
    body.extend(((suites.len() * 2) as u16).to_be_bytes());
    for suite in suites {
        body.extend(suite.to_be_bytes());
    }
    body.push(compression.len() as u8);
    body.extend(compression);
    body.extend((extensions.len() as u16).to_be_bytes());
    body.extend(extensions);
    let mut message = vec![0x01]; // client_hello
    message.extend(&(body.len() as u32).to_be_bytes()[1..]);
    message.extend(body);
    message
}

/// A plaintext record (record version TLS 1.0, as real clients write their first record).
fn record(content_type: u8, payload: &[u8]) -> Vec<u8> {
    let mut out = vec![content_type, 0x03, 0x01];
    out.extend((payload.len() as u16).to_be_bytes());
    out.extend(payload);
    out
}

fn client_hello(version: u16, suites: &[u16], compression: &[u8], extensions: &[u8]) -> Vec<u8> {
    record(
        HANDSHAKE,
        &client_hello_message(version, suites, compression, extensions),
    )
}

/// Reads whole records until `done` says so, the peer closes, or [`ANSWER_TIMEOUT`] passes.
async fn read_records(
    tcp: &mut TcpStream,
    done: impl Fn(&[(u8, Vec<u8>)]) -> bool,
) -> Vec<(u8, Vec<u8>)> {
    let mut records = Vec::new();
    let read = async {
        loop {
            let mut header = [0u8; 5];
            if tcp.read_exact(&mut header).await.is_err() {
                return;
            }
            let len = usize::from(u16::from_be_bytes([header[3], header[4]]));
            let mut payload = vec![0u8; len];
            if tcp.read_exact(&mut payload).await.is_err() {
                return;
            }
            records.push((header[0], payload));
            if done(&records) {
                return;
            }
        }
    };
    let _ = tokio::time::timeout(ANSWER_TIMEOUT, read).await;
    records
}

/// Sends `hello` and returns the gateway's answer if it is exactly one alert record.
async fn alert_for(addr: SocketAddr, hello: &[u8]) -> Result<(u8, u8), String> {
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    tcp.write_all(hello).await.unwrap();
    let records = read_records(&mut tcp, |_| false).await;
    match records.as_slice() {
        [(ALERT, alert)] if alert.len() == 2 => Ok((alert[0], alert[1])),
        other => Err(format!("expected one alert record, got {other:?}")),
    }
}

/// The cipher suite of the ServerHello the gateway answers `hello` with, if it answers with one.
async fn server_hello_suite(addr: SocketAddr, hello: &[u8]) -> Option<u16> {
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    tcp.write_all(hello).await.unwrap();
    let records = read_records(&mut tcp, |records| !handshake_messages(records).is_empty()).await;
    let messages = handshake_messages(&records);
    let (SERVER_HELLO, body) = messages.first()? else {
        return None;
    };
    let suite_at = 35 + usize::from(body[34]);
    Some(u16::from_be_bytes([body[suite_at], body[suite_at + 1]]))
}

/// The handshake messages (type, body) in a run of plaintext handshake records.
fn handshake_messages(records: &[(u8, Vec<u8>)]) -> Vec<(u8, Vec<u8>)> {
    let bytes: Vec<u8> = records
        .iter()
        .filter(|(kind, _)| *kind == HANDSHAKE)
        .flat_map(|(_, payload)| payload.iter().copied())
        .collect();
    let mut messages = Vec::new();
    let mut rest = bytes.as_slice();
    while rest.len() >= 4 {
        let len = u32::from_be_bytes([0, rest[1], rest[2], rest[3]]) as usize;
        if rest.len() < 4 + len {
            break;
        }
        messages.push((rest[0], rest[4..4 + len].to_vec()));
        rest = &rest[4 + len..];
    }
    messages
}

#[tokio::test]
async fn tls12_hellos_offering_only_non_forward_secret_or_non_aead_suites_get_a_handshake_failure_alert(
) {
    let rig = rsa_rig().await;
    let offers: &[(&str, &[u16])] = &[
        (
            "ECDHE with CBC",
            &[
                0xc013, 0xc014, 0xc027, 0xc028, 0xc009, 0xc00a, 0xc023, 0xc024,
            ],
        ),
        ("RSA key exchange with GCM", &[0x009c, 0x009d]),
        (
            "RSA key exchange with CBC",
            &[0x002f, 0x0035, 0x003c, 0x003d],
        ),
        (
            "finite-field DHE",
            &[0x009e, 0x009f, 0x0033, 0x0039, 0xccaa],
        ),
        (
            "NULL encryption",
            &[0x0000, 0x0001, 0x0002, 0x003b, 0xc006, 0xc010],
        ),
        (
            "RC4 and 3DES",
            &[0x0004, 0x0005, 0x000a, 0xc011, 0xc012, 0xc007, 0xc008],
        ),
        (
            "anonymous",
            &[0x0018, 0x001b, 0x0034, 0x00a6, 0xc018, 0xc019],
        ),
        ("export", &[0x0003, 0x0006, 0x0008, 0x0014]),
        ("PSK and SRP", &[0x00a8, 0x00a9, 0xc0a4, 0xc01d, 0xc020]),
        (
            "CCM and ARIA/Camellia GCM",
            &[0xc0ac, 0xc0ad, 0xc09c, 0xc05c, 0xc08a],
        ),
    ];
    // The control: the same hello offering a suite the gateway serves gets a ServerHello, so a
    // refusal below is about the suites and nothing else.
    let served = client_hello(0x0303, &[0xc02f], &[COMPRESSION_NULL], &tls12_extensions());
    assert_eq!(
        server_hello_suite(rig.gateway.addr, &served).await,
        Some(0xc02f)
    );
    for (what, suites) in offers {
        let hello = client_hello(0x0303, suites, &[COMPRESSION_NULL], &tls12_extensions());
        assert_eq!(
            alert_for(rig.gateway.addr, &hello).await,
            Ok((FATAL, HANDSHAKE_FAILURE)),
            "{what}"
        );
    }
    assert_eq!(rig.upstream.count(), 0);
}

#[tokio::test]
async fn tls13_hellos_offering_only_ccm_or_integrity_only_suites_get_a_handshake_failure_alert() {
    let rig = Rig::start().await;
    // TLS_AES_128_CCM_SHA256, TLS_AES_128_CCM_8_SHA256, TLS_SHA256_SHA256 and TLS_SHA384_SHA384
    // (RFC 9150: authentication without encryption).
    let served = client_hello(0x0303, &[0x1301], &[COMPRESSION_NULL], &tls13_extensions());
    assert_eq!(
        server_hello_suite(rig.gateway.addr, &served).await,
        Some(0x1301),
        "the control: TLS_AES_128_GCM_SHA256 is served"
    );
    for suites in [&[0x1304u16, 0x1305][..], &[0xc0b4, 0xc0b5]] {
        let hello = client_hello(0x0303, suites, &[COMPRESSION_NULL], &tls13_extensions());
        assert_eq!(
            alert_for(rig.gateway.addr, &hello).await,
            Ok((FATAL, HANDSHAKE_FAILURE)),
            "{suites:x?}"
        );
    }
    assert_eq!(rig.upstream.count(), 0);
}

#[tokio::test]
async fn ssl3_and_tls10_hellos_get_a_protocol_version_alert() {
    let rig = Rig::start().await;
    for version in [0x0300u16, 0x0301] {
        // ECDHE-GCM suites the gateway does serve: the version is the only thing wrong.
        let hello = client_hello(
            version,
            &[0xc02b, 0xc02f],
            &[COMPRESSION_NULL],
            &tls12_extensions(),
        );
        assert_eq!(
            alert_for(rig.gateway.addr, &hello).await,
            Ok((FATAL, PROTOCOL_VERSION)),
            "{version:#06x}"
        );
    }
    assert_eq!(rig.upstream.count(), 0);
}

#[tokio::test]
async fn an_sslv2_format_hello_gets_no_server_hello() {
    let rig = Rig::start().await;
    // SSLv2-compatible CLIENT-HELLO (RFC 5246 appendix E.2) asking for TLS 1.2 with SSL2 and TLS
    // suites: a two-byte header with the high bit set, then msg_type 1.
    let mut body = vec![0x01, 0x03, 0x03, 0x00, 0x09, 0x00, 0x00, 0x00, 0x10];
    body.extend([0x07, 0x00, 0xc0, 0x00, 0x00, 0x2f, 0x00, 0x00, 0x35]);
    body.extend([0x42; 16]);
    let mut hello = vec![0x80 | (body.len() >> 8) as u8, body.len() as u8];
    hello.extend(body);
    let mut tcp = TcpStream::connect(rig.gateway.addr).await.unwrap();
    tcp.write_all(&hello).await.unwrap();
    let records = read_records(&mut tcp, |_| false).await;
    assert!(
        records.iter().all(|(kind, _)| *kind == ALERT),
        "expected nothing or an alert, got {records:?}"
    );
    assert_eq!(rig.upstream.count(), 0);
}

#[tokio::test]
async fn a_hello_offering_only_deflate_compression_gets_an_illegal_parameter_alert() {
    let rig = Rig::start().await;
    for extensions in [tls12_extensions(), tls13_extensions()] {
        let hello = client_hello(
            0x0303,
            &[0xc02b, 0x1301],
            &[COMPRESSION_DEFLATE],
            &extensions,
        );
        assert_eq!(
            alert_for(rig.gateway.addr, &hello).await,
            Ok((FATAL, ILLEGAL_PARAMETER))
        );
    }
    assert_eq!(rig.upstream.count(), 0);
}

#[tokio::test]
async fn a_tls12_hello_offering_deflate_and_null_gets_null_compression_an_aead_suite_and_a_certificate_request(
) {
    let rig = Rig::start().await;
    let hello = client_hello(
        0x0303,
        &[0xc02b],
        &[COMPRESSION_DEFLATE, COMPRESSION_NULL],
        &tls12_extensions(),
    );
    let mut tcp = TcpStream::connect(rig.gateway.addr).await.unwrap();
    tcp.write_all(&hello).await.unwrap();
    let records = read_records(&mut tcp, |records| {
        handshake_messages(records)
            .iter()
            .any(|(kind, _)| *kind == SERVER_HELLO_DONE)
    })
    .await;
    let messages = handshake_messages(&records);
    let kinds: Vec<u8> = messages.iter().map(|(kind, _)| *kind).collect();
    // ServerHello, Certificate, ServerKeyExchange, CertificateRequest, ServerHelloDone.
    assert_eq!(
        kinds,
        [SERVER_HELLO, 11, 12, CERTIFICATE_REQUEST, SERVER_HELLO_DONE]
    );
    let server_hello = &messages[0].1;
    assert_eq!(&server_hello[..2], &[0x03, 0x03], "TLS 1.2");
    let session_id_len = usize::from(server_hello[34]);
    let after_session = &server_hello[35 + session_id_len..];
    assert_eq!(
        &after_session[..2],
        &[0xc0, 0x2b],
        "ECDHE-ECDSA-AES128-GCM-SHA256"
    );
    assert_eq!(after_session[2], COMPRESSION_NULL, "compression method");
    assert_eq!(rig.upstream.count(), 0);
}

#[tokio::test]
async fn a_renegotiation_attempt_gets_a_no_renegotiation_warning_and_the_connection_goes_on_serving_http(
) {
    let rig = Rig::start().await;
    let suite = rustls::crypto::ring::cipher_suite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256;
    let SupportedCipherSuite::Tls12(tls12_suite) = suite else {
        unreachable!("a TLS 1.2 suite");
    };
    let mut config = client_offering(
        &rig.pki,
        &[&rustls::version::TLS12],
        vec![suite],
        rustls::crypto::ring::default_provider().kx_groups,
        true,
    );
    config.enable_secret_extraction = true;
    let tcp = TcpStream::connect(rig.gateway.addr).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap();
    let (mut tcp, conn) = tls.into_inner();
    let secrets = conn.dangerous_extract_secrets().unwrap();
    let aes_gcm = |secrets: ConnectionTrafficSecrets| match secrets {
        ConnectionTrafficSecrets::Aes128Gcm { key, iv } => (key, iv),
        _ => panic!("expected AES-128-GCM secrets"),
    };
    let ((tx_seq, tx), (rx_seq, rx)) = (secrets.tx, secrets.rx);
    let (tx_key, tx_iv) = aes_gcm(tx);
    let (rx_key, rx_iv) = aes_gcm(rx);
    // TLS 1.2 GCM: a 4-byte implicit salt, then the 8-byte explicit nonce part.
    let mut encrypter =
        tls12_suite
            .aead_alg
            .encrypter(tx_key, &tx_iv.as_ref()[..4], &tx_iv.as_ref()[4..]);
    let mut decrypter = tls12_suite.aead_alg.decrypter(rx_key, &rx_iv.as_ref()[..4]);
    let mut encrypt = |typ: ContentType, payload: &[u8], seq: u64| {
        let chunks = [payload];
        encrypter
            .encrypt(
                OutboundPlainMessage {
                    typ,
                    version: ProtocolVersion::TLSv1_2,
                    payload: OutboundChunks::new(&chunks),
                },
                seq,
            )
            .unwrap()
            .encode()
    };

    // A ClientHello inside the session is a renegotiation request; then a request on the same
    // connection, which must still be served.
    let renegotiate =
        client_hello_message(0x0303, &[0xc02b], &[COMPRESSION_NULL], &tls12_extensions());
    tcp.write_all(&encrypt(ContentType::Handshake, &renegotiate, tx_seq))
        .await
        .unwrap();
    let request = b"GET /metadata HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n";
    tcp.write_all(&encrypt(ContentType::ApplicationData, request, tx_seq + 1))
        .await
        .unwrap();

    let records = read_records(&mut tcp, |records| {
        records.iter().any(|(kind, _)| *kind == APPLICATION_DATA)
    })
    .await;
    let mut plain = Vec::new();
    for (seq, (kind, mut payload)) in (rx_seq..).zip(records) {
        let message = InboundOpaqueMessage::new(
            ContentType::from(kind),
            ProtocolVersion::TLSv1_2,
            &mut payload,
        );
        let decrypted = decrypter.decrypt(message, seq).unwrap();
        plain.push((u8::from(decrypted.typ), decrypted.payload.to_vec()));
    }
    assert_eq!(
        plain.first(),
        Some(&(ALERT, vec![WARNING, NO_RENEGOTIATION])),
        "{plain:?}"
    );
    assert!(
        !plain.iter().any(|(kind, _)| *kind == HANDSHAKE),
        "the gateway answered the renegotiation with a handshake: {plain:?}"
    );
    let response = plain
        .iter()
        .find(|(kind, _)| *kind == APPLICATION_DATA)
        .map(|(_, bytes)| String::from_utf8_lossy(bytes).to_string())
        .unwrap_or_default();
    assert!(response.starts_with("HTTP/1.1 "), "{plain:?}");
    // The request lacks the BaRS ids: refused by the pipeline, so nothing was forwarded.
    assert_eq!(rig.upstream.count(), 0);
}

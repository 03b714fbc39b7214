//! TLS-MA over real handshakes: who gets in, who is refused in the handshake, and that refused
//! clients never reach the upstream.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::*;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[tokio::test]
async fn proxy_client_is_forwarded_with_the_body_byte_identical() {
    let rig = Rig::start().await;
    let request = process_message();
    let sent_body = Bytes::from_static(include_bytes!(
        "fixtures/bars-examples/process-message-validation-request.json"
    ));
    let reply = rig.send(request).await;
    assert_eq!(reply.status, 200);
    assert_eq!(
        reply.body,
        Bytes::from_static(br#"{"resourceType":"Bundle"}"#)
    );
    let seen = rig.upstream.only();
    assert_eq!(seen.method, "POST");
    assert_eq!(seen.uri.path(), "/$process-message");
    assert_eq!(
        seen.body, sent_body,
        "body must reach the upstream byte for byte"
    );
    assert_eq!(
        seen.headers["x-client-cert-sha256"],
        rig.pki.client_sha256(ClientCert::Proxy).as_str()
    );
    let subject = seen.headers["x-client-cert-subject"]
        .to_str()
        .unwrap()
        .to_string();
    assert!(
        subject.contains("CN=bars-proxy.spineservices.nhs.uk"),
        "{subject}"
    );
}

async fn assert_refused_in_handshake(rig: &Rig, cert: Option<ClientCert>, alert: &str) {
    let result = send(rig.gateway.addr, rig.pki.client_config(cert), metadata()).await;
    let err = result.expect_err("the handshake must fail");
    assert!(err.contains(alert), "expected alert {alert}, got: {err}");
    assert_eq!(
        rig.upstream.count(),
        0,
        "a refused client must never reach the upstream"
    );
}

#[tokio::test]
async fn client_without_certificate_is_refused_in_the_handshake() {
    let rig = Rig::start().await;
    assert_refused_in_handshake(&rig, None, "CertificateRequired").await;
}

#[tokio::test]
async fn client_from_an_unknown_ca_is_refused_in_the_handshake() {
    let rig = Rig::start().await;
    assert_refused_in_handshake(&rig, Some(ClientCert::Rogue), "UnknownCA").await;
}

#[tokio::test]
async fn client_from_an_impostor_ca_with_the_trusted_name_is_refused() {
    let rig = Rig::start().await;
    // Same issuer name as the trusted sub-CA, other key: the signature check fails.
    assert_refused_in_handshake(&rig, Some(ClientCert::Impostor), "DecryptError").await;
}

#[tokio::test]
async fn expired_client_is_refused_in_the_handshake() {
    let rig = Rig::start().await;
    assert_refused_in_handshake(&rig, Some(ClientCert::Expired), "CertificateExpired").await;
}

#[tokio::test]
async fn revoked_client_is_refused_in_the_handshake() {
    let rig = Rig::start().await;
    assert_refused_in_handshake(&rig, Some(ClientCert::Revoked), "CertificateRevoked").await;
}

#[tokio::test]
async fn revoked_client_is_admitted_when_no_crl_is_configured() {
    // Proves the previous test fails because of the CRL, not because of the certificate itself.
    let rig = Rig::start_with(|s| s.tls.client_crl.clear()).await;
    let reply = send(
        rig.gateway.addr,
        rig.pki.client_config(Some(ClientCert::Revoked)),
        metadata(),
    )
    .await
    .expect("admitted without a CRL");
    assert_eq!(reply.status, 200);
}

#[tokio::test]
async fn client_with_another_subject_is_refused_in_the_handshake() {
    let rig = Rig::start().await;
    assert_refused_in_handshake(&rig, Some(ClientCert::WrongSubject), "AccessDenied").await;
}

#[tokio::test]
async fn client_whose_fingerprint_is_not_pinned_is_refused() {
    let rig = Rig::start_with(|s| {
        s.client.pinned_fingerprints =
            vec![bars_gateway::config::parse_pin(&"ab".repeat(32)).unwrap()];
    })
    .await;
    assert_refused_in_handshake(&rig, Some(ClientCert::Proxy), "AccessDenied").await;
}

#[tokio::test]
async fn client_whose_fingerprint_is_pinned_is_admitted() {
    let pki = TestPki::new();
    let upstream = TestUpstream::start().await;
    let mut settings = pki.settings(&pki.config_toml(&upstream.url()));
    settings.client.pinned_fingerprints =
        vec![bars_gateway::config::parse_pin(&pki.client_sha256(ClientCert::Proxy)).unwrap()];
    let reply = metadata_through(settings, &pki).await;
    assert_eq!(reply.status, 200);
    assert_eq!(upstream.count(), 1);
}

#[tokio::test]
async fn tls12_client_is_served() {
    let rig = Rig::start().await;
    let config = rig.pki.client_config_with(
        Some(ClientCert::Proxy),
        &[&rustls::version::TLS12],
        vec![b"http/1.1".to_vec()],
    );
    let reply = send(rig.gateway.addr, config, metadata()).await.unwrap();
    assert_eq!(reply.status, 200);
}

#[tokio::test]
async fn tls12_is_refused_when_min_version_is_1_3() {
    let rig =
        Rig::start_with(|s| s.tls.min_version = bars_gateway::config::TlsVersion::Tls13).await;
    let config = rig.pki.client_config_with(
        Some(ClientCert::Proxy),
        &[&rustls::version::TLS12],
        vec![b"http/1.1".to_vec()],
    );
    let err = send(rig.gateway.addr, config, metadata())
        .await
        .unwrap_err();
    assert!(err.contains("ProtocolVersion"), "{err}");
    assert_eq!(rig.upstream.count(), 0);
}

/// A TLS 1.1 ClientHello, byte by byte (no TLS 1.1 client exists in rustls): version 0x0302,
/// no supported_versions extension, offering ECDHE-GCM suites the gateway does support, so the
/// version is the only reason to refuse it.
fn tls11_client_hello() -> Vec<u8> {
    let mut hello = vec![0x03, 0x02]; // client_version TLS 1.1
    hello.extend([0x42; 32]); // random
    hello.push(0); // session id
    hello.extend([0x00, 0x04, 0xc0, 0x2b, 0xc0, 0x2f]); // ECDHE-ECDSA/RSA-AES128-GCM-SHA256
    hello.extend([0x01, 0x00]); // compression: null
                                // Extensions a real client sends, so that nothing but the version is wrong:
                                // signature_algorithms (ecdsa_secp256r1_sha256, rsa_pss_rsae_sha256, rsa_pkcs1_sha256),
                                // supported_groups (x25519, secp256r1), ec_point_formats (uncompressed).
    let extensions: [u8; 28] = [
        0x00, 0x0d, 0x00, 0x08, 0x00, 0x06, 0x04, 0x03, 0x08, 0x04, 0x04, 0x01, //
        0x00, 0x0a, 0x00, 0x06, 0x00, 0x04, 0x00, 0x1d, 0x00, 0x17, //
        0x00, 0x0b, 0x00, 0x02, 0x01, 0x00,
    ];
    hello.extend([0x00, extensions.len() as u8]);
    hello.extend(extensions);
    let mut handshake = vec![0x01, 0x00, 0x00, hello.len() as u8];
    handshake.extend(hello);
    let mut record = vec![0x16, 0x03, 0x01, 0x00, handshake.len() as u8];
    record.extend(handshake);
    record
}

#[tokio::test]
async fn tls11_client_hello_gets_a_protocol_version_alert() {
    let rig = Rig::start().await;
    let mut tcp = TcpStream::connect(rig.gateway.addr).await.unwrap();
    tcp.write_all(&tls11_client_hello()).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), tcp.read_to_end(&mut answer))
        .await
        .expect("the gateway answers and closes")
        .unwrap();
    // An alert record (21), fatal (2), protocol_version (70).
    assert!(answer.len() >= 7, "{answer:?}");
    assert_eq!(answer[0], 0x15, "expected an alert record, got {answer:?}");
    assert_eq!(
        &answer[5..7],
        &[0x02, 70],
        "expected a fatal protocol_version alert"
    );
    assert_eq!(rig.upstream.count(), 0);
}

#[tokio::test]
async fn h2_is_negotiated_by_alpn_and_forwarded() {
    let rig = Rig::start().await;
    let config = rig.pki.client_config_with(
        Some(ClientCert::Proxy),
        &[&rustls::version::TLS13],
        vec![b"h2".to_vec()],
    );
    let tcp = TcpStream::connect(rig.gateway.addr).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(config)
        .connect(
            rustls::pki_types::ServerName::try_from("localhost").unwrap(),
            tcp,
        )
        .await
        .unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (mut sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        TokioIo::new(tls),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    let request = bars_request("GET", "https://localhost/metadata", Bytes::new())
        .body(Full::new(Bytes::new()))
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    assert_eq!(response.status(), 200);
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(body, Bytes::from_static(br#"{"resourceType":"Bundle"}"#));
    assert_eq!(rig.upstream.only().uri.path(), "/metadata");
}

/// Connects (resuming a session when `config` holds one), sends one request, and reports how
/// the handshake went and what came back.
async fn send_noting_resumption(
    addr: std::net::SocketAddr,
    config: std::sync::Arc<rustls::ClientConfig>,
) -> (Option<rustls::HandshakeKind>, Result<u16, String>) {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let tls = match tokio_rustls::TlsConnector::from(config)
        .connect(
            rustls::pki_types::ServerName::try_from("localhost").unwrap(),
            tcp,
        )
        .await
    {
        Ok(tls) => tls,
        Err(e) => return (None, Err(format!("handshake: {e}"))),
    };
    let kind = tls.get_ref().1.handshake_kind();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .unwrap();
    tokio::spawn(conn);
    let status = sender
        .send_request(metadata())
        .await
        .map(|r| r.status().as_u16())
        .map_err(|e| e.to_string());
    (kind, status)
}

/// rustls resumes a session without looking at the client certificate again: without the
/// gateway's re-check, a client could go on resuming after its certificate expired.
#[tokio::test]
async fn a_resumed_session_is_refused_once_the_client_certificate_has_expired() {
    use rustls::HandshakeKind::{Full as FullHandshake, Resumed};
    let rig = Rig::start().await;
    let not_after = rig.pki.issue_short_lived_client(Duration::from_secs(3));
    let clients: Vec<_> = [&rustls::version::TLS13, &rustls::version::TLS12]
        .into_iter()
        .map(|version| {
            rig.pki.client_config_with(
                Some(ClientCert::ShortLived),
                &[version],
                vec![b"http/1.1".to_vec()],
            )
        })
        .collect();
    for client in &clients {
        let first = send_noting_resumption(rig.gateway.addr, client.clone()).await;
        assert_eq!(first, (Some(FullHandshake), Ok(200)));
        let resumed = send_noting_resumption(rig.gateway.addr, client.clone()).await;
        assert_eq!(
            resumed,
            (Some(Resumed), Ok(200)),
            "resumption works while valid"
        );
    }
    // Nothing signals an expiry: wait for the wall clock to pass notAfter (second resolution).
    while std::time::SystemTime::now() < not_after + Duration::from_secs(1) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for client in &clients {
        let (kind, status) = send_noting_resumption(rig.gateway.addr, client.clone()).await;
        assert_eq!(kind, Some(Resumed));
        assert!(status.is_err(), "served after expiry: {status:?}");
    }
    // A full handshake with the expired certificate is refused by the verifier, as before.
    let fresh = rig.pki.client_config(Some(ClientCert::ShortLived));
    let (_, status) = send_noting_resumption(rig.gateway.addr, fresh).await;
    assert!(status.is_err(), "{status:?}");
    assert_eq!(
        rig.upstream.count(),
        4,
        "only the requests made while valid arrive"
    );
    assert_eq!(
        metric_of(
            rig.gateway.admin.unwrap(),
            "bars_gateway_tls_handshake_failures_total{reason=\"bad_certificate\"}"
        )
        .await,
        3.0
    );
}

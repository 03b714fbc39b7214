//! Forwarding to the legacy receiver: what it gets, what the client gets back, and how upstream
//! failures become BaRS errors with the ids echoed.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::*;
use http::StatusCode;
use http_body_util::Full;

#[tokio::test]
async fn authorization_never_reaches_the_upstream() {
    let rig = Rig::start().await;
    let request = bars_request("GET", "/metadata", Bytes::new())
        .header("authorization", "Bearer sender-token-for-the-proxy")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let reply = rig.send(request).await;
    assert_eq!(reply.status, 200);
    assert!(rig.upstream.only().headers.get("authorization").is_none());
}

#[tokio::test]
async fn spoofed_forwarding_and_client_cert_headers_are_replaced() {
    let rig = Rig::start().await;
    let request = bars_request("GET", "/metadata", Bytes::new())
        .header("x-forwarded-for", "6.6.6.6")
        .header("x-forwarded-proto", "http")
        .header("forwarded", "for=6.6.6.6")
        .header(
            "x-client-cert-subject",
            "CN=bars-proxy.spineservices.nhs.uk",
        )
        .header("x-client-cert-sha256", "00".repeat(32))
        .body(Full::new(Bytes::new()))
        .unwrap();
    rig.send(request).await;
    let seen = rig.upstream.only();
    assert_eq!(seen.headers["x-forwarded-for"], "127.0.0.1");
    assert_eq!(seen.headers.get_all("x-forwarded-for").iter().count(), 1);
    assert_eq!(seen.headers["x-forwarded-proto"], "https");
    assert!(seen.headers.get("forwarded").is_none());
    assert_eq!(
        seen.headers["x-client-cert-sha256"],
        rig.pki.client_sha256(ClientCert::Proxy).as_str()
    );
    assert_eq!(
        seen.headers.get_all("x-client-cert-subject").iter().count(),
        1
    );
    assert!(seen.headers["x-client-cert-subject"]
        .to_str()
        .unwrap()
        .contains("OU=Devices"));
}

#[tokio::test]
async fn hop_by_hop_headers_are_not_forwarded() {
    let rig = Rig::start().await;
    let request = bars_request("GET", "/metadata", Bytes::new())
        .header("connection", "keep-alive, x-hop")
        .header("x-hop", "secret")
        .header("te", "trailers")
        .header("proxy-authorization", "Basic Zm9vOmJhcg==")
        .body(Full::new(Bytes::new()))
        .unwrap();
    rig.send(request).await;
    let seen = rig.upstream.only();
    for name in ["x-hop", "te", "proxy-authorization"] {
        assert!(
            seen.headers.get(name).is_none(),
            "{name} must not be forwarded"
        );
    }
    assert_eq!(seen.headers["host"], rig.upstream.addr.to_string().as_str());
}

#[tokio::test]
async fn upstream_answer_is_streamed_back_with_the_ids_echoed() {
    let rig = Rig::start().await;
    rig.upstream.set_reply(Reply::With(
        StatusCode::CREATED,
        vec![
            (
                "location",
                "https://receiver.example/ServiceRequest/ID-12345",
            ),
            ("x-request-id", "something-else"),
            ("content-type", "application/fhir+json"),
        ],
        Bytes::from_static(include_bytes!(
            "fixtures/bars-examples/process-message-validation-response.json"
        )),
    ));
    let request = process_message();
    let sent_id = request.headers()["x-request-id"].clone();
    let sent_correlation = request.headers()["x-correlation-id"].clone();
    let reply = rig.send(request).await;
    assert_eq!(reply.status, StatusCode::CREATED);
    assert_eq!(
        reply.headers["location"],
        "https://receiver.example/ServiceRequest/ID-12345"
    );
    assert_eq!(
        reply.headers["x-request-id"], sent_id,
        "the request's id wins over the upstream's"
    );
    assert_eq!(reply.headers["x-correlation-id"], sent_correlation);
    assert_eq!(
        reply.body,
        Bytes::from_static(include_bytes!(
            "fixtures/bars-examples/process-message-validation-response.json"
        ))
    );
}

#[tokio::test]
async fn upstream_down_gets_503_transient_with_the_ids_echoed() {
    let pki = TestPki::new();
    let settings = pki.settings(&pki.config_toml(&dead_port_url().await));
    let gateway = TestGateway::start(settings).await;
    let request = process_message();
    let sent_id = request.headers()["x-request-id"].clone();
    let reply = send(
        gateway.addr,
        pki.client_config(Some(ClientCert::Proxy)),
        request,
    )
    .await
    .unwrap();
    reply.assert_outcome(503, "REC_SERVICE_UNAVAILABLE", "transient");
    assert_eq!(reply.headers["x-request-id"], sent_id);
    assert_eq!(
        reply.headers["x-correlation-id"],
        "9562466f-c982-4bd5-bb0e-255e9f5e6689"
    );
}

#[tokio::test]
async fn upstream_that_never_answers_gets_408_timeout() {
    let rig = Rig::start_with(|s| s.upstream.request_timeout = Duration::from_millis(300)).await;
    rig.upstream.set_reply(Reply::Never);
    let reply = rig.send(process_message()).await;
    reply.assert_outcome(408, "REC_TIMEOUT", "timeout");
    assert_eq!(
        reply.headers["x-correlation-id"],
        "9562466f-c982-4bd5-bb0e-255e9f5e6689"
    );
    assert_eq!(
        rig.upstream.count(),
        1,
        "the request did reach the upstream once"
    );
}

#[tokio::test]
async fn body_over_max_body_gets_413_without_reaching_the_upstream() {
    let rig = Rig::start_with(|s| s.upstream.max_body = 1024).await;
    let reply = rig.send(process_message()).await; // 35 KB with Content-Length
    reply.assert_outcome(413, "REC_BAD_REQUEST", "too-long");
    assert!(reply.diagnostics().contains("1024 bytes"));
    assert_eq!(rig.upstream.count(), 0);
}

#[tokio::test]
async fn chunked_body_over_max_body_gets_413() {
    let rig = Rig::start_with(|s| s.upstream.max_body = 1024).await;
    // A streamed body without Content-Length: the limit trips while forwarding.
    let request = bars_request("POST", "/$process-message", Bytes::new())
        .body(Chunks(8))
        .unwrap();
    let mut sender = connect_http1(
        rig.gateway.addr,
        rig.pki.client_config(Some(ClientCert::Proxy)),
    )
    .await;
    let response = sender.send_request(request).await.unwrap();
    assert_eq!(response.status(), 413);
    // The upstream may have seen the start of a chunked request that never completed; it must
    // not have received a complete one.
    for seen in rig.upstream.seen() {
        assert!(
            seen.body.len() <= 1024,
            "an over-limit body must never be delivered whole"
        );
    }
}

/// A body of `n` 512-byte chunks with no length known in advance (sent chunked).
struct Chunks(usize);

impl http_body::Body for Chunks {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, Self::Error>>> {
        if self.0 == 0 {
            return std::task::Poll::Ready(None);
        }
        self.0 -= 1;
        std::task::Poll::Ready(Some(Ok(hyper::body::Frame::data(Bytes::from(vec![
            b'x';
            512
        ])))))
    }
}

#[tokio::test]
async fn upstream_base_path_is_prefixed_and_query_kept() {
    let pki = TestPki::new();
    let upstream = TestUpstream::start().await;
    let settings = pki.settings(&pki.config_toml(&format!("{}/legacy/fhir/", upstream.url())));
    let gateway = TestGateway::start(settings).await;
    let request = bars_request("GET", "/Slot?status=free&start=ge2026-11-23", Bytes::new())
        .body(Full::new(Bytes::new()))
        .unwrap();
    let reply = send(
        gateway.addr,
        pki.client_config(Some(ClientCert::Proxy)),
        request,
    )
    .await
    .unwrap();
    assert_eq!(reply.status, 200);
    let seen = upstream.only();
    assert_eq!(seen.uri.path(), "/legacy/fhir/Slot");
    assert_eq!(seen.uri.query(), Some("status=free&start=ge2026-11-23"));
}

#[tokio::test]
async fn many_requests_on_one_kept_alive_connection_all_arrive() {
    let rig = Rig::start().await;
    let mut sender = connect_http1(
        rig.gateway.addr,
        rig.pki.client_config(Some(ClientCert::Proxy)),
    )
    .await;
    for _ in 0..20 {
        sender.ready().await.unwrap();
        let response = sender.send_request(metadata()).await.unwrap();
        assert_eq!(response.status(), 200);
        http_body_util::BodyExt::collect(response.into_body())
            .await
            .unwrap();
    }
    assert_eq!(rig.upstream.count(), 20);
}

#[tokio::test]
async fn a_header_section_over_the_limit_gets_431_as_an_operation_outcome_with_the_ids() {
    let rig = Rig::start().await; // listen.max_header_bytes: the default 32 KiB
    let request = bars_request("GET", "/metadata", Bytes::new())
        .header("x-note", "a".repeat(40 * 1024))
        .body(Full::new(Bytes::new()))
        .unwrap();
    let sent_id = request.headers()["x-request-id"].clone();
    let reply = rig.send(request).await;
    reply.assert_outcome(431, "REC_BAD_REQUEST", "too-long");
    assert_eq!(
        reply.diagnostics(),
        "Request header section exceeds the limit of 32768 bytes"
    );
    assert_eq!(reply.headers["x-request-id"], sent_id);
    assert_eq!(rig.upstream.count(), 0);
}

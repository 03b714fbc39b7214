//! Retry deduplication (DESIGN.md §5) against a counting upstream: nothing lost, nothing doubled.

mod common;

use std::sync::Arc;
use std::time::Duration;

use bars_gateway::config::{DedupBackend, OnStoreError};
use bytes::Bytes;
use common::*;
use http::{Request, StatusCode};
use http_body_util::Full;
use tokio::sync::Semaphore;

/// A `POST /$process-message` with a fixed X-Request-Id and the given body.
fn post(id: &str, body: &'static [u8]) -> Request<Full<Bytes>> {
    let mut request = bars_request("POST", "/$process-message", Bytes::new())
        .body(Full::new(Bytes::from_static(body)))
        .unwrap();
    request
        .headers_mut()
        .insert("x-request-id", id.parse().unwrap());
    request
}

fn new_id() -> String {
    uuid::Uuid::new_v4().to_string()
}

const BODY: &[u8] =
    include_bytes!("fixtures/bars-examples/process-message-validation-request.json");

#[tokio::test]
async fn retry_of_a_processed_request_gets_409_duplicate_with_the_reference_id() {
    let rig = Rig::start().await;
    rig.upstream.set_reply(Reply::With(
        StatusCode::CREATED,
        vec![(
            "location",
            "https://receiver.example/ServiceRequest/ID-12345",
        )],
        Bytes::from_static(b"{}"),
    ));
    let id = new_id();
    assert_eq!(rig.send(post(&id, BODY)).await.status, StatusCode::CREATED);
    let retry = rig.send(post(&id, BODY)).await;
    retry.assert_outcome(409, "REC_CONFLICT", "duplicate");
    assert_eq!(
        retry.diagnostics(),
        "This message has already been received and processed. Reference ID: ID-12345"
    );
    assert_eq!(retry.headers["x-request-id"], id.as_str());
    assert_eq!(
        rig.upstream.count(),
        1,
        "the retry must not reach the upstream"
    );
}

#[tokio::test]
async fn retry_with_a_fresh_access_token_is_still_a_retry() {
    let rig = Rig::start().await;
    let id = new_id();
    let mut first = post(&id, BODY);
    first
        .headers_mut()
        .insert("authorization", "Bearer one".parse().unwrap());
    rig.send(first).await;
    let mut retry = post(&id, BODY);
    retry
        .headers_mut()
        .insert("authorization", "Bearer two".parse().unwrap());
    rig.send(retry)
        .await
        .assert_outcome(409, "REC_CONFLICT", "duplicate");
    assert_eq!(rig.upstream.count(), 1);
}

#[tokio::test]
async fn retry_while_the_original_is_in_flight_gets_425_then_409() {
    let rig = Rig::start().await;
    let gate = Arc::new(Semaphore::new(0));
    rig.upstream
        .set_reply(Reply::Gated(gate.clone(), StatusCode::OK));
    let id = new_id();
    let addr = rig.gateway.addr;
    let config = rig.pki.client_config(Some(ClientCert::Proxy));
    let original = tokio::spawn({
        let id = id.clone();
        async move { send(addr, config, post(&id, BODY)).await.unwrap() }
    });
    rig.upstream.wait_for_count(1).await;
    let early = rig.send(post(&id, BODY)).await;
    early.assert_outcome(425, "REC_TOO_EARLY", "duplicate");
    gate.add_permits(1);
    assert_eq!(original.await.unwrap().status, 200);
    rig.send(post(&id, BODY))
        .await
        .assert_outcome(409, "REC_CONFLICT", "duplicate");
    assert_eq!(rig.upstream.count(), 1);
}

#[tokio::test]
async fn same_id_with_another_body_gets_422() {
    let rig = Rig::start().await;
    let id = new_id();
    rig.send(post(&id, BODY)).await;
    let reuse = rig.send(post(&id, b"{\"resourceType\":\"Bundle\"}")).await;
    reuse.assert_outcome(422, "REC_UNPROCESSABLE_ENTITY", "invalid");
    assert_eq!(
        reuse.diagnostics(),
        "X-Request-Id already used for a different request"
    );
    assert_eq!(rig.upstream.count(), 1);
}

#[tokio::test]
async fn transient_upstream_failure_lets_the_retry_through() {
    let rig = Rig::start().await;
    rig.upstream.set_reply(Reply::With(
        StatusCode::SERVICE_UNAVAILABLE,
        vec![],
        Bytes::new(),
    ));
    let id = new_id();
    assert_eq!(rig.send(post(&id, BODY)).await.status, 503);
    rig.upstream.set_reply(Reply::With(
        StatusCode::OK,
        vec![],
        Bytes::from_static(b"{}"),
    ));
    assert_eq!(rig.send(post(&id, BODY)).await.status, 200);
    assert_eq!(
        rig.upstream.count(),
        2,
        "the retry of a transient failure is delivered"
    );
    rig.send(post(&id, BODY))
        .await
        .assert_outcome(409, "REC_CONFLICT", "duplicate");
    assert_eq!(rig.upstream.count(), 2);
}

#[tokio::test]
async fn upstream_timeout_keeps_the_id_in_flight_so_the_retry_is_not_delivered_twice() {
    // Issue 13: the legacy system often finishes the work after the sender's deadline; a retry
    // delivered then would be a duplicate referral (tests/delivery.rs has the late answers).
    let rig = Rig::start_with(|s| s.upstream.request_timeout = Duration::from_millis(300)).await;
    rig.upstream.set_reply(Reply::Never);
    let id = new_id();
    rig.send(post(&id, BODY))
        .await
        .assert_outcome(408, "REC_TIMEOUT", "timeout");
    rig.send(post(&id, BODY))
        .await
        .assert_outcome(425, "REC_TOO_EARLY", "duplicate");
    assert_eq!(rig.upstream.count(), 1);
}

#[tokio::test]
async fn deterministic_4xx_is_replayed_to_the_retry() {
    let rig = Rig::start().await;
    let oo: &'static [u8] =
        include_bytes!("fixtures/bars-examples/oo-400-REC_BAD_REQUEST-invalid.json");
    rig.upstream.set_reply(Reply::With(
        StatusCode::BAD_REQUEST,
        vec![("content-type", "application/fhir+json")],
        Bytes::from_static(oo),
    ));
    let id = new_id();
    let first = rig.send(post(&id, BODY)).await;
    assert_eq!(first.status, 400);
    assert_eq!(first.body, Bytes::from_static(oo));
    let retry = rig.send(post(&id, BODY)).await;
    assert_eq!(retry.status, 400);
    assert_eq!(retry.body, Bytes::from_static(oo), "the same answer again");
    assert_eq!(retry.headers["content-type"], "application/fhir+json");
    assert_eq!(retry.headers["x-request-id"], id.as_str());
    assert_eq!(rig.upstream.count(), 1);
}

#[tokio::test]
async fn get_is_not_deduplicated() {
    let rig = Rig::start().await;
    let id = new_id();
    for _ in 0..2 {
        let mut request = metadata();
        request
            .headers_mut()
            .insert("x-request-id", id.parse().unwrap());
        assert_eq!(rig.send(request).await.status, 200);
    }
    assert_eq!(rig.upstream.count(), 2);
}

#[tokio::test]
async fn an_id_is_forgotten_after_the_ttl() {
    let rig = Rig::start_with(|s| s.dedup.ttl = Duration::from_millis(300)).await;
    let id = new_id();
    rig.send(post(&id, BODY)).await;
    rig.send(post(&id, BODY))
        .await
        .assert_outcome(409, "REC_CONFLICT", "duplicate");
    // The expiry itself is what is tested: time has to pass (no signal to wait for).
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(rig.send(post(&id, BODY)).await.status, 200);
    assert_eq!(rig.upstream.count(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_concurrent_identical_retries_reach_the_upstream_once() {
    let rig = Rig::start().await;
    let id = new_id();
    let tasks: Vec<_> = (0..100)
        .map(|_| {
            let addr = rig.gateway.addr;
            let config = rig.pki.client_config(Some(ClientCert::Proxy));
            let id = id.clone();
            tokio::spawn(async move { send(addr, config, post(&id, BODY)).await.unwrap().status })
        })
        .collect();
    let mut statuses = Vec::new();
    for t in tasks {
        statuses.push(t.await.unwrap().as_u16());
    }
    assert_eq!(rig.upstream.count(), 1, "exactly one delivery");
    assert_eq!(
        statuses.iter().filter(|s| **s == 200).count(),
        1,
        "{statuses:?}"
    );
    assert!(
        statuses.iter().all(|s| [200, 409, 425].contains(s)),
        "{statuses:?}"
    );
}

#[tokio::test]
async fn a_client_that_disconnects_mid_request_does_not_cause_a_double_delivery() {
    let rig = Rig::start().await;
    let gate = Arc::new(Semaphore::new(0));
    rig.upstream
        .set_reply(Reply::Gated(gate.clone(), StatusCode::CREATED));
    let id = new_id();
    let addr = rig.gateway.addr;
    let config = rig.pki.client_config(Some(ClientCert::Proxy));
    let client = tokio::spawn({
        let id = id.clone();
        async move { send(addr, config, post(&id, BODY)).await }
    });
    rig.upstream.wait_for_count(1).await;
    client.abort(); // the sender goes away while the receiver is processing
    let _ = client.await;
    gate.add_permits(1); // the receiver finishes processing
                         // The retry is answered here; until the original's outcome is recorded it is "in flight".
    let mut retry = rig.send(post(&id, BODY)).await;
    for _ in 0..200 {
        if retry.status != StatusCode::TOO_EARLY {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
        retry = rig.send(post(&id, BODY)).await;
    }
    retry.assert_outcome(409, "REC_CONFLICT", "duplicate");
    assert_eq!(rig.upstream.count(), 1);
}

// --- Redis -----------------------------------------------------------------------------------

async fn redis_rig(
    redis: &RedisServer,
    upstream_url: &str,
    pki: &TestPki,
    on_error: OnStoreError,
) -> TestGateway {
    let mut settings = pki.settings(&pki.config_toml(upstream_url));
    settings.dedup.backend = DedupBackend::Redis { url: redis.url() };
    settings.dedup.on_store_error = on_error;
    TestGateway::start(settings).await
}

#[tokio::test]
async fn two_gateways_sharing_redis_behave_as_one() {
    let Some(redis) = RedisServer::start().await else {
        return;
    };
    redis.wait_ready().await;
    let pki = TestPki::new();
    let upstream = TestUpstream::start().await;
    let a = redis_rig(&redis, &upstream.url(), &pki, OnStoreError::Reject).await;
    let b = redis_rig(&redis, &upstream.url(), &pki, OnStoreError::Reject).await;
    let config = pki.client_config(Some(ClientCert::Proxy));
    let id = new_id();
    assert_eq!(
        send(a.addr, config.clone(), post(&id, BODY))
            .await
            .unwrap()
            .status,
        200
    );
    send(b.addr, config.clone(), post(&id, BODY))
        .await
        .unwrap()
        .assert_outcome(409, "REC_CONFLICT", "duplicate");
    send(b.addr, config.clone(), post(&id, b"{}"))
        .await
        .unwrap()
        .assert_outcome(422, "REC_UNPROCESSABLE_ENTITY", "invalid");
    assert_eq!(upstream.count(), 1);
}

#[tokio::test]
async fn redis_dedup_survives_a_gateway_restart() {
    let Some(redis) = RedisServer::start().await else {
        return;
    };
    redis.wait_ready().await;
    let pki = TestPki::new();
    let upstream = TestUpstream::start().await;
    let config = pki.client_config(Some(ClientCert::Proxy));
    let id = new_id();
    let first = redis_rig(&redis, &upstream.url(), &pki, OnStoreError::Reject).await;
    send(first.addr, config.clone(), post(&id, BODY))
        .await
        .unwrap();
    first.stop().await;
    let second = redis_rig(&redis, &upstream.url(), &pki, OnStoreError::Reject).await;
    send(second.addr, config, post(&id, BODY))
        .await
        .unwrap()
        .assert_outcome(409, "REC_CONFLICT", "duplicate");
    assert_eq!(upstream.count(), 1);
}

#[tokio::test]
async fn redis_down_means_503_with_reject_and_forwarding_with_allow() {
    let Some(mut redis) = RedisServer::start().await else {
        return;
    };
    redis.wait_ready().await;
    let pki = TestPki::new();
    let upstream = TestUpstream::start().await;
    let reject = redis_rig(&redis, &upstream.url(), &pki, OnStoreError::Reject).await;
    let allow = redis_rig(&redis, &upstream.url(), &pki, OnStoreError::Allow).await;
    let config = pki.client_config(Some(ClientCert::Proxy));
    assert_eq!(
        send(reject.addr, config.clone(), post(&new_id(), BODY))
            .await
            .unwrap()
            .status,
        200
    );
    redis.stop();
    let refused = send(reject.addr, config.clone(), post(&new_id(), BODY))
        .await
        .unwrap();
    refused.assert_outcome(503, "REC_SERVICE_UNAVAILABLE", "transient");
    assert_eq!(
        upstream.count(),
        1,
        "with reject, nothing is forwarded unprotected"
    );
    let allowed = send(allow.addr, config.clone(), post(&new_id(), BODY))
        .await
        .unwrap();
    assert_eq!(allowed.status, 200);
    assert_eq!(
        upstream.count(),
        2,
        "with allow, it is forwarded without dedup"
    );
    // Redis comes back: dedup works again without a gateway restart.
    redis.restart();
    redis.wait_ready().await;
    let id = new_id();
    let mut first = send(reject.addr, config.clone(), post(&id, BODY))
        .await
        .unwrap();
    for _ in 0..100 {
        if first.status != StatusCode::SERVICE_UNAVAILABLE {
            break;
        }
        // The connection manager reconnects on its own schedule: retry as a sender would.
        tokio::time::sleep(Duration::from_millis(50)).await;
        first = send(reject.addr, config.clone(), post(&id, BODY))
            .await
            .unwrap();
    }
    assert_eq!(first.status, 200);
    send(reject.addr, config, post(&id, BODY))
        .await
        .unwrap()
        .assert_outcome(409, "REC_CONFLICT", "duplicate");
}

#[tokio::test]
async fn the_gateway_starts_with_redis_down_and_is_not_ready() {
    let Some(mut redis) = RedisServer::start().await else {
        return;
    };
    redis.wait_ready().await;
    redis.stop();
    let pki = TestPki::new();
    let upstream = TestUpstream::start().await;
    let gateway = redis_rig(&redis, &upstream.url(), &pki, OnStoreError::Reject).await;
    let admin = gateway.admin.unwrap();
    let readyz = http_get(admin, "/readyz").await;
    assert_eq!(readyz.0, 503, "{}", readyz.1);
    let reply = send(
        gateway.addr,
        pki.client_config(Some(ClientCert::Proxy)),
        post(&new_id(), BODY),
    )
    .await
    .unwrap();
    reply.assert_outcome(503, "REC_SERVICE_UNAVAILABLE", "transient");
    assert_eq!(upstream.count(), 0);
}

/// A plain HTTP GET to the admin listener: (status, body).
async fn http_get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
            .await
            .unwrap();
    tokio::spawn(conn);
    let response = sender
        .send_request(
            Request::get(path)
                .header("host", "admin")
                .body(Full::new(Bytes::new()))
                .unwrap(),
        )
        .await
        .unwrap();
    let status = response.status().as_u16();
    let body = http_body_util::BodyExt::collect(response.into_body())
        .await
        .unwrap()
        .to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

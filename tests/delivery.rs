//! Exactly once under slow and broken legacy systems (DESIGN.md §5, issue 13): a referral is
//! delivered to the legacy system once, or the sender is told that it was not. Each case runs with
//! the memory store and with Redis (two gateways sharing one Redis: the retry goes to the other
//! replica), against a stub legacy receiver that misbehaves on purpose, over real TLS.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bars_gateway::config::{DedupBackend, Settings};
use bytes::Bytes;
use common::legacy::{answer, chunked, ok_json, Act, Legacy};
use common::*;
use http::Request;
use http_body_util::Full;
use tokio::sync::Semaphore;

#[derive(Debug, Clone, Copy)]
enum Store {
    Memory,
    Redis,
}

/// Runs a case once per store: `name::memory` and `name::redis`.
macro_rules! both_stores {
    ($name:ident) => {
        mod $name {
            #[tokio::test]
            async fn memory() {
                super::$name(super::Store::Memory).await
            }
            #[tokio::test]
            async fn redis() {
                super::$name(super::Store::Redis).await
            }
        }
    };
}

/// A stub legacy system behind one gateway (memory) or two sharing one Redis.
struct Bed {
    pki: TestPki,
    legacy: Legacy,
    gateways: Vec<TestGateway>,
    _redis: Option<RedisServer>,
}

impl Bed {
    /// `None` when the store cannot be had here (no redis-server: SKIPPED).
    async fn start(store: Store, script: Vec<Act>, adjust: impl Fn(&mut Settings)) -> Option<Bed> {
        let redis = match store {
            Store::Memory => None,
            Store::Redis => {
                let redis = RedisServer::start().await?;
                redis.wait_ready().await;
                Some(redis)
            }
        };
        let pki = TestPki::new();
        let legacy = Legacy::start(script).await;
        let mut gateways = Vec::new();
        for _ in 0..redis.as_ref().map_or(1, |_| 2) {
            let mut settings = pki.settings(&pki.config_toml(&legacy.url()));
            if let Some(redis) = &redis {
                settings.dedup.backend = DedupBackend::Redis { url: redis.url() };
            }
            adjust(&mut settings);
            gateways.push(TestGateway::start(settings).await);
        }
        Some(Bed {
            pki,
            legacy,
            gateways,
            _redis: redis,
        })
    }

    /// Sends through replica `n` (there is one with the memory store).
    async fn try_send(&self, n: usize, request: Request<Full<Bytes>>) -> Result<Reply2, String> {
        let gateway = &self.gateways[n % self.gateways.len()];
        send(
            gateway.addr,
            self.pki.client_config(Some(ClientCert::Proxy)),
            request,
        )
        .await
    }

    async fn send(&self, n: usize, request: Request<Full<Bytes>>) -> Reply2 {
        self.try_send(n, request).await.expect("an answer")
    }

    /// The admin address of replica `n`.
    fn admin(&self, n: usize) -> SocketAddr {
        self.gateways[n % self.gateways.len()].admin.unwrap()
    }

    /// Sends `post(id)` through replica `n`, which must answer 408 REC_TIMEOUT with the ids.
    async fn times_out(&self, n: usize, id: &str) {
        let reply = self.send(n, post(id)).await;
        reply.assert_outcome(408, "REC_TIMEOUT", "timeout");
        assert_ids_echoed(&reply, id);
    }

    async fn dedup_outcome(&self, n: usize, outcome: &str) -> f64 {
        metric_of(
            self.admin(n),
            &format!("bars_gateway_dedup_total{{outcome=\"{outcome}\"}}"),
        )
        .await
    }

    async fn wait_for_outcome(&self, n: usize, outcome: &str, count: f64) {
        wait_for_metric_of(
            self.admin(n),
            &format!("bars_gateway_dedup_total{{outcome=\"{outcome}\"}}"),
            |v| v >= count,
        )
        .await;
    }
}

fn new_id() -> String {
    uuid::Uuid::new_v4().to_string()
}

const BODY: &[u8] =
    include_bytes!("fixtures/bars-examples/process-message-validation-request.json");

/// A `POST /$process-message` with this X-Request-Id (same content every time: a retry).
fn post(id: &str) -> Request<Full<Bytes>> {
    let mut request = bars_request("POST", "/$process-message", Bytes::new())
        .body(Full::new(Bytes::from_static(BODY)))
        .unwrap();
    request
        .headers_mut()
        .insert("x-request-id", id.parse().unwrap());
    request
}

fn assert_ids_echoed(reply: &Reply2, id: &str) {
    assert_eq!(reply.headers["x-request-id"], id);
    assert!(reply.headers.contains_key("x-correlation-id"));
}

fn short_deadline(s: &mut Settings) {
    s.upstream.request_timeout = Duration::from_millis(300);
}

const OO_422: &[u8] = br#"{"resourceType":"OperationOutcome","issue":[{"severity":"error","code":"invalid","details":{"coding":[{"system":"https://fhir.nhs.uk/CodeSystem/http-error-codes","code":"REC_UNPROCESSABLE_ENTITY"}]},"diagnostics":"late refusal"}]}"#;

// ---- 1. A deadline ends the sender's wait, not the legacy system's work ---------------------

async fn a_late_2xx_is_recorded_and_retries_get_409_not_a_second_delivery(store: Store) {
    let gate = Arc::new(Semaphore::new(0));
    let late = answer(
        "201 Created",
        &[
            ("content-type", "application/fhir+json"),
            ("location", "/ServiceRequest/late-1"),
        ],
        b"{}",
    );
    let Some(bed) = Bed::start(store, vec![Act::Gated(gate.clone(), late)], short_deadline).await
    else {
        return;
    };
    let id = new_id();
    bed.times_out(0, &id).await;
    // Meanwhile (on the other replica with Redis) the id is still in flight.
    let retry = bed.send(1, post(&id)).await;
    retry.assert_outcome(425, "REC_TOO_EARLY", "duplicate");
    assert_ids_echoed(&retry, &id);
    gate.add_permits(1); // the legacy system finishes, late
    bed.wait_for_outcome(0, "late", 1.0).await;
    let retry = bed.send(1, post(&id)).await;
    retry.assert_outcome(409, "REC_CONFLICT", "duplicate");
    assert!(retry.diagnostics().ends_with("Reference ID: late-1"));
    assert_eq!(bed.legacy.count(), 1, "delivered once");
}
both_stores!(a_late_2xx_is_recorded_and_retries_get_409_not_a_second_delivery);

async fn a_late_deterministic_4xx_is_replayed_whole(store: Store) {
    let gate = Arc::new(Semaphore::new(0));
    let late = answer(
        "422 Unprocessable Entity",
        &[("content-type", "application/fhir+json")],
        OO_422,
    );
    let Some(bed) = Bed::start(store, vec![Act::Gated(gate.clone(), late)], short_deadline).await
    else {
        return;
    };
    let id = new_id();
    bed.times_out(0, &id).await;
    gate.add_permits(1);
    bed.wait_for_outcome(0, "late", 1.0).await;
    let retry = bed.send(1, post(&id)).await;
    assert_eq!(retry.status, 422);
    assert_eq!(retry.body, Bytes::from_static(OO_422));
    assert_ids_echoed(&retry, &id);
    assert_eq!(bed.legacy.count(), 1);
}
both_stores!(a_late_deterministic_4xx_is_replayed_whole);

async fn a_late_503_is_forgotten_and_the_retry_delivered_unmarked(store: Store) {
    let gate = Arc::new(Semaphore::new(0));
    let late = answer("503 Service Unavailable", &[], b"");
    let Some(bed) = Bed::start(store, vec![Act::Gated(gate.clone(), late)], short_deadline).await
    else {
        return;
    };
    let id = new_id();
    bed.times_out(0, &id).await;
    gate.add_permits(1);
    // Released once the late 503 is read: the retry is delivered (polled: 425 until then).
    let mut retry = bed.send(1, post(&id)).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while retry.status == 425 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
        retry = bed.send(1, post(&id)).await;
    }
    assert_eq!(retry.status, 200);
    assert_eq!(
        bed.legacy.count(),
        2,
        "a transient answer is not a delivery"
    );
    assert_eq!(
        bed.legacy.received()[1].header("x-bars-possible-duplicate"),
        None,
        "a 503 is a certain answer: nothing to mark"
    );
}
both_stores!(a_late_503_is_forgotten_and_the_retry_delivered_unmarked);

async fn request_timeout_bounds_the_body_read_and_the_upstream_wait_together(store: Store) {
    // Each half alone is within the 500 ms deadline; together they are not.
    let slow = Act::Delayed(Duration::from_millis(300), ok_json());
    let Some(bed) = Bed::start(store, vec![slow], |s| {
        s.upstream.request_timeout = Duration::from_millis(500)
    })
    .await
    else {
        return;
    };
    let id = new_id();
    let (tx, body) = http_body_util::channel::Channel::<Bytes, std::convert::Infallible>::new(2);
    let mut request = bars_request("POST", "/$process-message", Bytes::new())
        .header("content-length", BODY.len())
        .body(body)
        .unwrap();
    request
        .headers_mut()
        .insert("x-request-id", id.parse().unwrap());
    let gateway = &bed.gateways[0];
    let mut sender =
        connect_http1(gateway.addr, bed.pki.client_config(Some(ClientCert::Proxy))).await;
    let writer = tokio::spawn(async move {
        let mut tx = tx;
        tx.send_data(Bytes::from_static(&BODY[..100]))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await; // a slow sender
        tx.send_data(Bytes::from_static(&BODY[100..]))
            .await
            .unwrap();
    });
    let response = sender.send_request(request).await.unwrap();
    writer.await.unwrap();
    assert_eq!(response.status(), 408, "the sender's whole wait is bounded");
    // The exchange went on and is recorded: the retry is not delivered again.
    bed.wait_for_outcome(0, "late", 1.0).await;
    bed.send(1, post(&id))
        .await
        .assert_outcome(409, "REC_CONFLICT", "duplicate");
    assert_eq!(bed.legacy.count(), 1);
}
both_stores!(request_timeout_bounds_the_body_read_and_the_upstream_wait_together);

#[tokio::test]
async fn the_in_flight_claim_in_redis_outlives_the_completion_timeout() {
    let gate = Arc::new(Semaphore::new(0));
    let Some(bed) = Bed::start(
        Store::Redis,
        vec![Act::Gated(gate.clone(), ok_json())],
        |s| {
            s.upstream.request_timeout = Duration::from_millis(300);
            s.upstream.completion_timeout = Duration::from_secs(90);
        },
    )
    .await
    else {
        return;
    };
    let id = new_id();
    bed.times_out(0, &id).await;
    let redis = bed._redis.as_ref().unwrap();
    let client = redis::Client::open(redis.url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let pttl: i64 = redis::cmd("PTTL")
        .arg(format!("bars-gateway:dedup:{id}"))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(
        pttl > 90_000,
        "the in-flight entry must outlive completion_timeout: PTTL {pttl} ms"
    );
    gate.add_permits(1);
}

// ---- 2. An outcome the gateway cannot know is marked, not guessed ----------------------------

async fn a_reset_after_the_request_was_written_releases_the_id_and_marks_the_retry(store: Store) {
    let Some(bed) = Bed::start(store, vec![Act::Reset], |_| {}).await else {
        return;
    };
    let id = new_id();
    let first = bed.send(0, post(&id)).await;
    first.assert_outcome(503, "REC_SERVICE_UNAVAILABLE", "transient");
    assert_ids_echoed(&first, &id);
    assert_eq!(bed.dedup_outcome(0, "uncertain").await, 1.0);
    let retry = bed.send(1, post(&id)).await;
    assert_eq!(retry.status, 200, "never lost: the retry is delivered");
    assert_ids_echoed(&retry, &id);
    let received = bed.legacy.received();
    assert_eq!(received.len(), 2);
    assert_eq!(received[0].header("x-bars-possible-duplicate"), None);
    assert_eq!(
        received[1].header("x-bars-possible-duplicate"),
        Some("true"),
        "the legacy system is told an earlier attempt may have been processed"
    );
    bed.send(0, post(&id))
        .await
        .assert_outcome(409, "REC_CONFLICT", "duplicate");
    assert_eq!(bed.legacy.count(), 2);
}
both_stores!(a_reset_after_the_request_was_written_releases_the_id_and_marks_the_retry);

async fn a_close_without_an_answer_is_uncertain_too(store: Store) {
    let Some(bed) = Bed::start(store, vec![Act::Close], |_| {}).await else {
        return;
    };
    let id = new_id();
    bed.send(0, post(&id))
        .await
        .assert_outcome(503, "REC_SERVICE_UNAVAILABLE", "transient");
    assert_eq!(bed.send(1, post(&id)).await.status, 200);
    assert_eq!(
        bed.legacy.received()[1].header("x-bars-possible-duplicate"),
        Some("true")
    );
}
both_stores!(a_close_without_an_answer_is_uncertain_too);

async fn a_marked_retry_that_fails_transiently_keeps_the_mark(store: Store) {
    let script = vec![
        Act::Reset,
        Act::Answer(answer("503 Service Unavailable", &[], b"")),
    ];
    let Some(bed) = Bed::start(store, script, |_| {}).await else {
        return;
    };
    let id = new_id();
    assert_eq!(bed.send(0, post(&id)).await.status, 503);
    assert_eq!(bed.send(1, post(&id)).await.status, 503);
    assert_eq!(bed.send(0, post(&id)).await.status, 200);
    let received = bed.legacy.received();
    assert_eq!(received.len(), 3);
    assert_eq!(
        received[2].header("x-bars-possible-duplicate"),
        Some("true"),
        "the first attempt's outcome is still unknown"
    );
}
both_stores!(a_marked_retry_that_fails_transiently_keeps_the_mark);

async fn a_connect_failure_is_certainly_not_a_delivery_and_stays_unmarked(store: Store) {
    // The legacy system is down: nothing listens on its port until the test starts it.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    let url = bars_gateway::config::UpstreamUrl {
        uri: format!("http://{addr}").parse().unwrap(),
        authority: addr.to_string(),
        base_path: String::new(),
    };
    let Some(bed) = Bed::start(store, vec![], move |s| s.upstream.url = Some(url.clone())).await
    else {
        return;
    };
    let id = new_id();
    bed.send(0, post(&id))
        .await
        .assert_outcome(503, "REC_SERVICE_UNAVAILABLE", "transient");
    assert_eq!(bed.dedup_outcome(0, "uncertain").await, 0.0);
    let up = Legacy::start_on(tokio::net::TcpListener::bind(addr).await.unwrap(), vec![]);
    assert_eq!(bed.send(1, post(&id)).await.status, 200);
    assert_eq!(up.count(), 1);
    assert_eq!(up.received()[0].header("x-bars-possible-duplicate"), None);
}
both_stores!(a_connect_failure_is_certainly_not_a_delivery_and_stays_unmarked);

async fn no_answer_by_the_completion_timeout_is_uncertain(store: Store) {
    let never = Arc::new(Semaphore::new(0));
    let Some(bed) = Bed::start(store, vec![Act::Gated(never.clone(), ok_json())], |s| {
        s.upstream.request_timeout = Duration::from_millis(200);
        s.upstream.completion_timeout = Duration::from_millis(600);
    })
    .await
    else {
        return;
    };
    let id = new_id();
    bed.times_out(0, &id).await;
    bed.wait_for_outcome(0, "uncertain", 1.0).await;
    let retry = bed.send(1, post(&id)).await;
    assert_eq!(retry.status, 200);
    assert_eq!(
        bed.legacy.received()[1].header("x-bars-possible-duplicate"),
        Some("true")
    );
    assert_eq!(bed.legacy.count(), 2);
}
both_stores!(no_answer_by_the_completion_timeout_is_uncertain);

#[tokio::test]
async fn a_client_sent_possible_duplicate_header_never_reaches_the_legacy_system() {
    let legacy = Legacy::start(vec![]).await;
    let url = legacy.upstream_url();
    let rig = Rig::start_with(|s| s.upstream.url = Some(url)).await;
    let mut request = post(&new_id());
    request
        .headers_mut()
        .insert("x-bars-possible-duplicate", "true".parse().unwrap());
    assert_eq!(rig.send(request).await.status, 200);
    assert_eq!(
        legacy.received()[0].header("x-bars-possible-duplicate"),
        None
    );
}

// ---- 3. A replayed 4xx is the original 4xx, whole -------------------------------------------

async fn a_chunked_4xx_is_replayed_whole(store: Store) {
    let (a, b) = OO_422.split_at(40);
    let refusal = chunked(
        "422 Unprocessable Entity",
        &[("content-type", "application/fhir+json")],
        &[a, b],
    );
    let Some(bed) = Bed::start(store, vec![Act::Answer(refusal)], |_| {}).await else {
        return;
    };
    let id = new_id();
    let first = bed.send(0, post(&id)).await;
    assert_eq!(first.status, 422);
    assert_eq!(first.body, Bytes::from_static(OO_422), "streamed whole");
    let retry = bed.send(1, post(&id)).await;
    assert_eq!(retry.status, 422);
    assert_eq!(retry.body, Bytes::from_static(OO_422), "replayed whole");
    assert_eq!(retry.headers["content-type"], "application/fhir+json");
    assert_ids_echoed(&retry, &id);
    assert_eq!(bed.legacy.count(), 1);
}
both_stores!(a_chunked_4xx_is_replayed_whole);

async fn a_4xx_over_max_replay_bytes_is_replayed_as_a_gateway_outcome_with_its_status(
    store: Store,
) {
    let big = vec![b'x'; 70 * 1024];
    let refusal = answer(
        "400 Bad Request",
        &[("content-type", "application/fhir+json")],
        &big,
    );
    let Some(bed) = Bed::start(store, vec![Act::Answer(refusal)], |_| {}).await else {
        return;
    };
    let id = new_id();
    let first = bed.send(0, post(&id)).await;
    assert_eq!(first.status, 400);
    assert_eq!(
        first.body.len(),
        big.len(),
        "the first sender gets it whole"
    );
    let retry = bed.send(1, post(&id)).await;
    retry.assert_outcome(400, "REC_BAD_REQUEST", "processing");
    assert!(
        retry.diagnostics().contains("too large to keep"),
        "{}",
        retry.diagnostics()
    );
    assert_ids_echoed(&retry, &id);
    assert_eq!(bed.legacy.count(), 1);
}
both_stores!(a_4xx_over_max_replay_bytes_is_replayed_as_a_gateway_outcome_with_its_status);

// ---- 4. "Reference ID" that a real receiver can give ----------------------------------------

async fn reference_case(store: Store, reply: Vec<u8>, expected: Option<&str>) {
    let Some(bed) = Bed::start(store, vec![Act::Answer(reply)], |_| {}).await else {
        return;
    };
    let id = new_id();
    assert_eq!(bed.send(0, post(&id)).await.status, 200);
    let retry = bed.send(1, post(&id)).await;
    retry.assert_outcome(409, "REC_CONFLICT", "duplicate");
    match expected {
        Some(reference) => assert_eq!(
            retry.diagnostics(),
            format!(
                "This message has already been received and processed. Reference ID: {reference}"
            )
        ),
        None => assert_eq!(
            retry.diagnostics(),
            "This message has already been received and processed"
        ),
    }
    assert_eq!(bed.legacy.count(), 1);
}

async fn the_reference_comes_from_the_json_body_id_without_location(store: Store) {
    let body = br#"{"resourceType":"Bundle","id":"c1ab3fba-6bae-4ba4-b257-5a87c44d4a91","type":"message","entry":[{"resource":{"resourceType":"MessageHeader","id":"inner"}}]}"#;
    let reply = chunked(
        "200 OK",
        &[("content-type", "application/fhir+json")],
        &[&body[..30], &body[30..]],
    );
    reference_case(store, reply, Some("c1ab3fba-6bae-4ba4-b257-5a87c44d4a91")).await;
}
both_stores!(the_reference_comes_from_the_json_body_id_without_location);

async fn the_reference_comes_from_the_xml_body_id_without_location(store: Store) {
    let body = br#"<?xml version="1.0" encoding="UTF-8"?><Bundle xmlns="http://hl7.org/fhir"><id value="xml-ref-7"/><type value="message"/><entry><resource><MessageHeader><id value="inner"/></MessageHeader></resource></entry></Bundle>"#;
    let reply = answer("200 OK", &[("content-type", "application/fhir+xml")], body);
    reference_case(store, reply, Some("xml-ref-7")).await;
}
both_stores!(the_reference_comes_from_the_xml_body_id_without_location);

async fn without_location_or_body_id_the_409_has_no_reference(store: Store) {
    let reply = answer(
        "200 OK",
        &[("content-type", "application/fhir+json")],
        b"{}",
    );
    reference_case(store, reply, None).await;
}
both_stores!(without_location_or_body_id_the_409_has_no_reference);

// ---- 5. A response from the legacy system reaches the sender intact, or not at all ----------

/// A chunked body under a stale `Content-Length: 5`.
fn te_and_cl() -> Vec<u8> {
    let (a, b) = WHOLE.split_at(19);
    chunked(
        "200 OK",
        &[
            ("content-type", "application/fhir+json"),
            ("content-length", "5"),
        ],
        &[a, b],
    )
}

const WHOLE: &[u8] = br#"{"resourceType":"Bundle","type":"x"}  "#;

async fn a_response_with_both_transfer_encoding_and_content_length_arrives_whole(store: Store) {
    let script = vec![Act::Answer(te_and_cl()), Act::Answer(te_and_cl())];
    let Some(bed) = Bed::start(store, script, |_| {}).await else {
        return;
    };
    let whole = WHOLE;
    let post_reply = bed.send(0, post(&new_id())).await;
    assert_eq!(post_reply.status, 200);
    assert_eq!(
        post_reply.body,
        Bytes::from_static(whole),
        "deduplicated path"
    );
    assert_ne!(
        post_reply
            .headers
            .get("content-length")
            .map(|v| v.as_bytes()),
        Some(&b"5"[..])
    );
    let get_reply = bed.send(0, metadata()).await;
    assert_eq!(get_reply.status, 200);
    assert_eq!(get_reply.body, Bytes::from_static(whole), "streamed path");
    assert_eq!(bed.legacy.count(), 2);
}
both_stores!(a_response_with_both_transfer_encoding_and_content_length_arrives_whole);

async fn broken_body_case(store: Store, broken: Vec<u8>, what: &str) {
    let Some(bed) = Bed::start(store, vec![Act::AnswerThenClose(broken)], |_| {}).await else {
        return;
    };
    let id = new_id();
    let first = bed.try_send(0, post(&id)).await;
    assert!(
        first.is_err(),
        "{what}: the sender must get a closed connection, not a truncated answer: {first:?}"
    );
    assert_eq!(
        metric_of(
            bed.admin(0),
            "bars_gateway_upstream_failures_total{kind=\"broken_body\"}"
        )
        .await,
        1.0,
        "{what}"
    );
    bed.wait_for_outcome(0, "uncertain", 1.0).await;
    // The retry is delivered, marked; its answer is good this time.
    assert_eq!(bed.send(1, post(&id)).await.status, 200, "{what}");
    let received = bed.legacy.received();
    assert_eq!(received.len(), 2, "{what}");
    assert_eq!(
        received[1].header("x-bars-possible-duplicate"),
        Some("true"),
        "{what}"
    );
    // A read is not deduplicated: the sender gets a closed connection all the same.
    bed.legacy
        .then(vec![Act::AnswerThenClose(answer_cut_short())]);
    assert!(bed.try_send(0, metadata()).await.is_err(), "{what}: GET");
}

fn answer_cut_short() -> Vec<u8> {
    b"HTTP/1.1 200 OK\r\ncontent-type: application/fhir+json\r\ncontent-length: 1000\r\n\r\n{\"resourceType\":".to_vec()
}

async fn a_body_that_breaks_off_is_a_closed_connection_counted_and_uncertain(store: Store) {
    broken_body_case(store, answer_cut_short(), "premature close").await;
    broken_body_case(
        store,
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\n{\"a\":\r\nZZ\r\nxx\r\n"
            .to_vec(),
        "invalid chunk size",
    )
    .await;
    broken_body_case(
        store,
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\n{\"a\":\r\n".to_vec(),
        "chunked body closed before its last chunk",
    )
    .await;
}
both_stores!(a_body_that_breaks_off_is_a_closed_connection_counted_and_uncertain);

async fn an_unsolicited_upgrade_is_answered_503_and_never_switched_to(store: Store) {
    let upgrade =
        b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: upgrade\r\n\r\n"
            .to_vec();
    let Some(bed) = Bed::start(
        store,
        vec![Act::Answer(upgrade.clone()), Act::Answer(upgrade)],
        |_| {},
    )
    .await
    else {
        return;
    };
    let id = new_id();
    let reply = bed.send(0, post(&id)).await;
    reply.assert_outcome(503, "REC_SERVICE_UNAVAILABLE", "transient");
    assert_ids_echoed(&reply, &id);
    assert!(reply.diagnostics().contains("unusable response"));
    assert!(reply.headers.get("upgrade").is_none());
    bed.send(0, metadata())
        .await
        .assert_outcome(503, "REC_SERVICE_UNAVAILABLE", "transient");
    // The deduplicated one may have been processed: its retry is delivered, marked.
    assert_eq!(bed.send(1, post(&id)).await.status, 200);
    assert_eq!(
        bed.legacy.received()[2].header("x-bars-possible-duplicate"),
        Some("true")
    );
}
both_stores!(an_unsolicited_upgrade_is_answered_503_and_never_switched_to);

fn with_header_bytes(total: usize) -> Vec<u8> {
    let filler = "f".repeat(4000);
    let headers: Vec<(&str, &str)> =
        std::iter::repeat_n(("x-filler", filler.as_str()), total / 4012)
            .chain([("content-type", "application/fhir+json")])
            .collect();
    answer("200 OK", &headers, b"{}")
}

async fn a_response_header_section_over_the_limit_is_answered_503(store: Store) {
    let script = vec![
        Act::Answer(with_header_bytes(70 * 1024)),
        Act::Answer(with_header_bytes(40 * 1024)),
    ];
    let Some(bed) = Bed::start(store, script, |_| {}).await else {
        return;
    };
    let id = new_id();
    let reply = bed.send(0, post(&id)).await;
    reply.assert_outcome(503, "REC_SERVICE_UNAVAILABLE", "transient");
    assert_ids_echoed(&reply, &id);
    assert_eq!(
        bed.send(0, metadata()).await.status,
        200,
        "a head under the 64KiB default is passed on"
    );
}
both_stores!(a_response_header_section_over_the_limit_is_answered_503);

// ---- what the operator sees --------------------------------------------------------------------

/// Every log line of this test process, as JSON (the in-process gateways log through it).
fn captured_logs() -> &'static std::sync::Mutex<Vec<u8>> {
    static LOGS: std::sync::OnceLock<&'static std::sync::Mutex<Vec<u8>>> =
        std::sync::OnceLock::new();
    LOGS.get_or_init(|| {
        let logs: &'static std::sync::Mutex<Vec<u8>> =
            Box::leak(Box::new(std::sync::Mutex::new(Vec::new())));
        struct Writer(&'static std::sync::Mutex<Vec<u8>>);
        impl std::io::Write for Writer {
            fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(buf);
                Ok(buf.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        tracing_subscriber::fmt()
            .json()
            .with_env_filter("info")
            .with_writer(move || Writer(logs))
            .init();
        logs
    })
}

/// The captured log lines that mention `id`, parsed.
fn log_lines_about(id: &str) -> Vec<serde_json::Value> {
    let logs = captured_logs().lock().unwrap();
    String::from_utf8_lossy(&logs)
        .lines()
        .filter(|l| l.contains(id))
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

#[tokio::test]
async fn a_broken_body_is_audited_as_an_upstream_failure_and_the_uncertain_outcome_logged_with_both_ids(
) {
    captured_logs();
    let Some(bed) = Bed::start(
        Store::Memory,
        vec![Act::AnswerThenClose(answer_cut_short())],
        |s| s.log.audit = true,
    )
    .await
    else {
        return;
    };
    let id = new_id();
    assert!(bed.try_send(0, post(&id)).await.is_err());
    bed.wait_for_outcome(0, "uncertain", 1.0).await;
    let lines = log_lines_about(&id);
    let audit = lines
        .iter()
        .find(|l| l["target"] == "audit")
        .unwrap_or_else(|| panic!("an audit record for {id}: {lines:#?}"));
    assert_eq!(
        audit["fields"]["status"], 502,
        "not the 200 its head said: {audit}"
    );
    assert_ne!(audit["fields"]["upstream_error"], "-", "{audit}");
    let warn = lines
        .iter()
        .find(|l| {
            l["level"] == "WARN"
                && l["fields"]["message"]
                    .as_str()
                    .is_some_and(|m| m.starts_with("uncertain outcome"))
        })
        .unwrap_or_else(|| panic!("a WARN uncertain-outcome line for {id}: {lines:#?}"));
    assert_eq!(warn["fields"]["request_id"], id.as_str());
    assert!(warn["fields"]["correlation_id"]
        .as_str()
        .is_some_and(|c| c.len() == 36));
    assert!(
        lines.iter().any(|l| l["level"] == "WARN"
            && l["fields"]["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("upstream response body broke off"))),
        "{lines:#?}"
    );
}

async fn bare_lf_chunk_framing_reaches_the_sender_whole_or_not_at_all(store: Store) {
    let bare = b"HTTP/1.1 200 OK\r\ncontent-type: application/fhir+json\r\ntransfer-encoding: chunked\r\n\r\n5\n{\"a\":\n2\n1}\n0\n\n".to_vec();
    let Some(bed) = Bed::start(store, vec![Act::AnswerThenClose(bare)], |_| {}).await else {
        return;
    };
    let id = new_id();
    match bed.try_send(0, post(&id)).await {
        Ok(reply) => {
            assert_eq!(reply.status, 200);
            assert_eq!(reply.body, Bytes::from_static(b"{\"a\":1}"), "whole");
            bed.send(1, post(&id))
                .await
                .assert_outcome(409, "REC_CONFLICT", "duplicate");
            assert_eq!(bed.legacy.count(), 1);
        }
        Err(e) => {
            // Broken before its first byte, the head is never sent either: a closed connection.
            assert!(e.starts_with("body") || e.starts_with("request"), "{e}");
            bed.wait_for_outcome(0, "uncertain", 1.0).await;
            assert_eq!(bed.send(1, post(&id)).await.status, 200);
            assert_eq!(bed.legacy.count(), 2);
        }
    }
}
both_stores!(bare_lf_chunk_framing_reaches_the_sender_whole_or_not_at_all);

#[tokio::test]
async fn delivery_refusals_are_fhir_xml_when_the_caller_prefers_xml() {
    let gate = Arc::new(Semaphore::new(0));
    let upgrade = b"HTTP/1.1 101 Switching Protocols\r\nupgrade: h2c\r\n\r\n".to_vec();
    let big = answer("400 Bad Request", &[], &vec![b'x'; 70 * 1024]);
    let script = vec![
        Act::Gated(gate.clone(), ok_json()),
        Act::Answer(upgrade),
        Act::Answer(big),
    ];
    let Some(bed) = Bed::start(Store::Memory, script, short_deadline).await else {
        return;
    };
    let xml = |id: &str| {
        let mut request = post(id);
        request.headers_mut().insert(
            "accept",
            "application/fhir+xml; version=1.0.0".parse().unwrap(),
        );
        request
    };
    let (late, upgraded, refused) = (new_id(), new_id(), new_id());
    assert_xml_outcome(
        &bed.send(0, xml(&late)).await,
        408,
        "REC_TIMEOUT",
        "timeout",
    );
    assert_xml_outcome(
        &bed.send(0, xml(&late)).await,
        425,
        "REC_TOO_EARLY",
        "duplicate",
    );
    gate.add_permits(1);
    bed.wait_for_outcome(0, "late", 1.0).await;
    let duplicate = bed.send(0, xml(&late)).await;
    let diagnostics = assert_xml_outcome(&duplicate, 409, "REC_CONFLICT", "duplicate");
    assert!(diagnostics.starts_with("This message has already been received"));
    assert_ids_echoed(&duplicate, &late);
    let mut other = xml(&late);
    *other.body_mut() = Full::new(Bytes::from_static(b"{}"));
    assert_xml_outcome(
        &bed.send(0, other).await,
        422,
        "REC_UNPROCESSABLE_ENTITY",
        "invalid",
    );
    assert_xml_outcome(
        &bed.send(0, xml(&upgraded)).await,
        503,
        "REC_SERVICE_UNAVAILABLE",
        "transient",
    );
    assert_eq!(
        bed.send(0, xml(&refused)).await.status,
        400,
        "the original, as sent"
    );
    let replay = bed.send(0, xml(&refused)).await;
    let diagnostics = assert_xml_outcome(&replay, 400, "REC_BAD_REQUEST", "processing");
    assert!(diagnostics.contains("too large to keep"), "{diagnostics}");
}

//! Slow peers: a header section or body trickled in, a stalled body, a client that stops reading
//! its response, an idle kept-alive connection. Each is cut off by its configured timeout and the
//! legacy receiver never gets an incomplete request.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::raw_http::*;
use common::*;
use tokio::io::AsyncWriteExt;

/// Writes `bytes` one at a time, `gap` apart, until the peer closes; returns how many were written
/// before the close was seen (all of them if it never closed).
async fn trickle(conn: &mut Reader<Tls>, bytes: &[u8], gap: Duration) -> usize {
    for (sent, byte) in bytes.iter().enumerate() {
        if conn.io.write_all(&[*byte]).await.is_err() || conn.io.flush().await.is_err() {
            return sent;
        }
        tokio::select! {
            read = conn.fill() => match read {
                Ok(true) => panic!("the gateway answered a request still being sent: {:?}",
                    String::from_utf8_lossy(&conn.buf)),
                _ => return sent + 1,
            },
            // The slowness under test, not synchronisation.
            _ = tokio::time::sleep(gap) => {}
        }
    }
    bytes.len()
}

#[tokio::test]
async fn a_header_section_sent_one_byte_at_a_time_is_cut_off_at_the_header_read_timeout() {
    let rig = Rig::start_with(|s| s.listen.header_read_timeout = Duration::from_millis(300)).await;
    let mut conn = open(&rig).await;
    let bytes = request_bytes(GET, "", b"");
    // ~1.2 KB at one byte per 50 ms would take a minute.
    let sent = trickle(&mut conn, &bytes, Duration::from_millis(50)).await;
    assert!(
        sent < bytes.len(),
        "the slow header section was never cut off"
    );
    assert!(conn.is_closed().await);
    assert_eq!(rig.upstream.count(), 0);
}

#[tokio::test]
async fn a_slow_second_request_on_a_kept_alive_connection_is_cut_off_too() {
    let rig = Rig::start_with(|s| s.listen.header_read_timeout = Duration::from_millis(300)).await;
    let mut conn = open(&rig).await;
    let first = conn.exchange(&request_bytes(GET, "", b"")).await;
    assert_eq!(first.status(), Some(200), "{first:?}");
    let bytes = request_bytes(GET, "", b"");
    let sent = trickle(&mut conn, &bytes, Duration::from_millis(50)).await;
    assert!(
        sent < bytes.len(),
        "the slow second request was never cut off"
    );
    assert_eq!(
        rig.upstream.count(),
        1,
        "only the first request was forwarded"
    );
}

#[tokio::test]
async fn a_body_that_trickles_slower_than_the_request_timeout_is_refused_and_never_forwarded() {
    let rig = Rig::start_with(|s| s.upstream.request_timeout = Duration::from_millis(400)).await;
    let mut conn = open(&rig).await;
    let id = new_id();
    let head = request_bytes_with_id(POST, &id, "Content-Length: 1000\r\n", b"");
    conn.io.write_all(&head).await.unwrap();
    // The body trickles: one byte per 50 ms, 1000 bytes would take 50 s.
    let body = vec![b'x'; 1000];
    let sent = tokio::time::timeout(SAFETY_NET, async {
        for (sent, byte) in body.iter().enumerate() {
            if conn.io.write_all(&[*byte]).await.is_err() {
                return sent;
            }
            tokio::select! {
                _ = conn.find_filling(b"\r\n\r\n", 0) => return sent + 1,
                _ = tokio::time::sleep(Duration::from_millis(50)) => {}
            }
        }
        body.len()
    })
    .await
    .expect("the gateway gives up on the body");
    assert!(sent < body.len());
    let Outcome::Answer(answer) = conn.answer().await else {
        panic!("expected an answer")
    };
    assert_eq!(answer.status(), 408, "{}", answer.head);
    assert_eq!(answer.header("x-request-id").as_deref(), Some(id.as_str()));
    let oo: serde_json::Value = serde_json::from_slice(&answer.body).unwrap();
    assert_eq!(
        oo["issue"][0]["diagnostics"],
        "The request body was not received in time"
    );
    assert_eq!(rig.upstream.count(), 0);
}

#[tokio::test]
async fn a_stalled_body_on_a_streamed_method_gets_408_and_the_upstream_never_gets_a_complete_request(
) {
    let (rig, upstream) = raw_rig(RawReply::Ok, |s| {
        s.dedup.methods.clear();
        s.upstream.request_timeout = Duration::from_millis(400);
    })
    .await;
    let mut conn = open(&rig).await;
    let outcome = conn
        .exchange(&request_bytes(
            POST,
            "Content-Length: 1000\r\n",
            b"only the start",
        ))
        .await;
    assert_eq!(outcome.status(), Some(408), "{outcome:?}");
    assert!(
        upstream.received().is_empty(),
        "an incomplete body was delivered as complete"
    );
}

#[tokio::test]
async fn a_client_that_stops_reading_a_large_response_is_disconnected_after_the_idle_timeout() {
    let rig = Rig::start_with(|s| s.listen.idle_timeout = Duration::from_millis(300)).await;
    // Far more than the loopback socket buffers and TLS buffers can absorb.
    rig.upstream.set_reply(Reply::With(
        http::StatusCode::OK,
        vec![("content-type", "application/fhir+json")],
        Bytes::from(vec![b' '; 32 << 20]),
    ));
    let mut conn = open(&rig).await;
    conn.io
        .write_all(&request_bytes(GET, "", b""))
        .await
        .unwrap();
    rig.upstream.wait_for_count(1).await;
    // The client never reads: once the buffers are full no byte moves, and after an idle timeout
    // (asked to close) and another (still stuck) the gateway lets the connection go.
    wait_for_metric_of(
        rig.gateway.admin.unwrap(),
        "bars_gateway_connections_open",
        |open| open == 0.0,
    )
    .await;
    drop(conn);
}

#[tokio::test]
async fn an_idle_kept_alive_http1_connection_outlives_the_header_read_timeout_and_closes_when_idle()
{
    // hyper's own header timer also runs while a kept-alive connection waits for its next request;
    // the gateway keeps it as a backstop at idle_timeout, so an idle connection lives for
    // idle_timeout (no handshake per quiet spell) while a started header section still gets only
    // header_read_timeout (the slowloris tests).
    let rig = Rig::start_with(|s| {
        s.listen.header_read_timeout = Duration::from_millis(200);
        s.listen.idle_timeout = Duration::from_millis(1500);
    })
    .await;
    let mut conn = open(&rig).await;
    assert_eq!(
        conn.exchange(&request_bytes(GET, "", b"")).await.status(),
        Some(200)
    );
    // Idle for three header timeouts: that is the behaviour under test, time has to pass.
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(
        conn.exchange(&request_bytes(GET, "", b"")).await.status(),
        Some(200),
        "a kept-alive connection must survive an idle spell shorter than idle_timeout"
    );
    assert!(conn.is_closed().await, "closed once idle for idle_timeout");
    assert_eq!(rig.upstream.count(), 2);
}

//! Resource limits: connections beyond `max_connections` closed at accept, header sections over
//! `max_header_bytes` or 100 fields answered 431, bodies over `max_body` answered 413, each never
//! forwarded.

mod common;

use common::raw_http::*;
use common::*;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

#[tokio::test]
async fn a_third_connection_beyond_max_connections_is_closed_at_accept_and_counted() {
    let rig = Rig::start_with(|s| s.listen.max_connections = 2).await;
    let mut first = open(&rig).await;
    let mut second = open(&rig).await;
    // An answer on each proves both hold their slot.
    for conn in [&mut first, &mut second] {
        assert_eq!(
            conn.exchange(&request_bytes(GET, "", b"")).await.status(),
            Some(200)
        );
    }
    let mut third = TcpStream::connect(rig.gateway.addr).await.unwrap();
    let mut buf = [0u8; 64];
    let read = tokio::time::timeout(SAFETY_NET, third.read(&mut buf))
        .await
        .expect("the third connection is closed at once");
    assert!(
        matches!(read, Ok(0) | Err(_)),
        "the third connection got bytes: {read:?}"
    );
    assert_eq!(
        metric_of(
            rig.gateway.admin.unwrap(),
            "bars_gateway_rejections_total{reason=\"max_connections\"}"
        )
        .await,
        1.0
    );
    // A slot frees when a connection ends.
    drop(first);
    wait_for_metric_of(
        rig.gateway.admin.unwrap(),
        "bars_gateway_connections_open",
        |open| open <= 1.0,
    )
    .await;
    let mut fourth = open(&rig).await;
    assert_eq!(
        fourth.exchange(&request_bytes(GET, "", b"")).await.status(),
        Some(200)
    );
    assert_eq!(rig.upstream.count(), 3);
}

#[tokio::test]
async fn a_header_section_over_max_header_bytes_gets_431_and_is_never_forwarded() {
    let rig = Rig::start().await; // listen.max_header_bytes: the default 32 KiB
    let big = format!("X-Note: {}\r\n", "a".repeat(40 * 1024));
    let outcome = exchange(&rig, &request_bytes(GET, &big, b"")).await;
    assert!(matches!(outcome.status(), Some(431) | None), "{outcome:?}");
    assert_eq!(rig.upstream.count(), 0);
    // Many fields each under the limit but together over it.
    let many: String = (0..40)
        .map(|i| format!("X-Note-{i}: {}\r\n", "b".repeat(1000)))
        .collect();
    let outcome = exchange(&rig, &request_bytes(GET, &many, b"")).await;
    assert!(matches!(outcome.status(), Some(431) | None), "{outcome:?}");
    assert_eq!(rig.upstream.count(), 0);
    // Under the limit is served.
    let fine = format!("X-Note: {}\r\n", "a".repeat(20 * 1024));
    assert_eq!(
        exchange(&rig, &request_bytes(GET, &fine, b""))
            .await
            .status(),
        Some(200)
    );
}

#[tokio::test]
async fn more_than_100_header_fields_get_431_and_are_never_forwarded() {
    let rig = Rig::start().await;
    let many: String = (0..100).map(|i| format!("X-Note-{i}: {i}\r\n")).collect();
    let outcome = exchange(&rig, &request_bytes(GET, &many, b"")).await;
    assert!(matches!(outcome.status(), Some(431) | None), "{outcome:?}");
    assert_eq!(rig.upstream.count(), 0);
}

#[tokio::test]
async fn bodies_over_max_body_get_413_by_content_length_and_by_chunked_and_are_never_forwarded() {
    for streamed in [false, true] {
        let rig = Rig::start_with(|s| {
            s.upstream.max_body = 1024;
            if streamed {
                s.dedup.methods.clear();
            }
        })
        .await;
        let id = new_id();
        let by_length = request_bytes_with_id(POST, &id, "Content-Length: 2000\r\n", &[b'x'; 2000]);
        let Outcome::Answer(answer) = exchange(&rig, &by_length).await else {
            panic!("expected a 413")
        };
        assert_eq!(answer.status(), 413, "streamed {streamed}: {}", answer.head);
        assert_eq!(
            answer.header("content-type").as_deref(),
            Some("application/fhir+json")
        );
        assert_eq!(answer.header("x-request-id").as_deref(), Some(id.as_str()));
        let oo: serde_json::Value = serde_json::from_slice(&answer.body).unwrap();
        assert_eq!(oo["issue"][0]["code"], "too-long");
        assert_eq!(rig.upstream.count(), 0, "streamed {streamed}");

        let mut chunked = Vec::new();
        for _ in 0..4 {
            chunked.extend_from_slice(b"200\r\n");
            chunked.extend_from_slice(&[b'y'; 512]);
            chunked.extend_from_slice(b"\r\n");
        }
        chunked.extend_from_slice(b"0\r\n\r\n");
        let outcome = exchange(
            &rig,
            &request_bytes(POST, "Transfer-Encoding: chunked\r\n", &chunked),
        )
        .await;
        assert_eq!(
            outcome.status(),
            Some(413),
            "streamed {streamed}: {outcome:?}"
        );
        for seen in rig.upstream.seen() {
            assert!(
                seen.body.len() <= 1024,
                "an over-limit body was delivered whole"
            );
        }
        if !streamed {
            assert_eq!(rig.upstream.count(), 0);
        }
    }
}

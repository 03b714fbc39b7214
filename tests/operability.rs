//! What ops teams watch: the admin endpoints, every metric family of DESIGN.md §6, readiness that
//! follows the upstream, and one audit record per request with exactly the fields promised.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http::Request;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// A plain HTTP GET to the admin listener: (status, body).
async fn admin_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(conn);
    let request = Request::get(path)
        .header("host", "admin")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    let status = response.status().as_u16();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

/// Polls `/readyz` (its readiness is computed in the background every 2 s) until it answers
/// `want`, up to 15 s.
async fn wait_for_readyz(admin: SocketAddr, want: u16) {
    readyz_until(admin, |status, _| status == want).await;
}

#[tokio::test]
async fn every_metric_family_appears_after_traffic() {
    let rig = Rig::start().await;
    let admin = rig.gateway.admin.unwrap();
    // A forwarded request, its retry (dedup), a refused request and a refused handshake.
    let request = process_message();
    let id = request.headers()["x-request-id"].clone();
    assert_eq!(rig.send(request).await.status, 200);
    let mut retry = process_message();
    retry.headers_mut().insert("x-request-id", id);
    assert_eq!(rig.send(retry).await.status, 409);
    let bad = bars_request("GET", "/nowhere", Bytes::new())
        .body(Full::new(Bytes::new()))
        .unwrap();
    assert_eq!(rig.send(bad).await.status, 404);
    assert!(send(
        rig.gateway.addr,
        rig.pki.client_config(Some(ClientCert::Rogue)),
        metadata()
    )
    .await
    .is_err());
    rig.gateway.reloader.reload().await.unwrap();

    let (status, metrics) = admin_get(admin, "/metrics").await;
    assert_eq!(status, 200);
    for expected in [
        "bars_gateway_requests_total{status=\"200\"} 1",
        "bars_gateway_requests_total{status=\"409\"} 1",
        "bars_gateway_rejections_total{reason=\"duplicate\"} 1",
        "bars_gateway_rejections_total{reason=\"not_found\"} 1",
        "bars_gateway_dedup_total{outcome=\"first\"} 1",
        "bars_gateway_dedup_total{outcome=\"duplicate\"} 1",
        "bars_gateway_upstream_duration_seconds_count 1",
        "bars_gateway_upstream_duration_seconds_bucket{le=\"5.0\"} 1",
        "bars_gateway_tls_handshake_failures_total{reason=\"bad_certificate\"} 1",
        "bars_gateway_certificate_expiry_timestamp_seconds{role=\"server\",subject=\"CN=localhost\"}",
        "bars_gateway_certificate_expiry_timestamp_seconds{role=\"client_ca\",subject=\"O=nhs, OU=CA, CN=Test NHS Root Authority\"}",
        "bars_gateway_reloads_total{result=\"success\"} 1",
        "bars_gateway_connections_open",
        "bars_gateway_ready",
        "bars_gateway_build_info{version=\"",
    ] {
        assert!(metrics.contains(expected), "missing {expected:?} in:\n{metrics}");
    }
}

#[tokio::test]
async fn healthz_is_always_ok_and_readyz_follows_the_upstream() {
    let rig = Rig::start().await;
    let admin = rig.gateway.admin.unwrap();
    assert_eq!(
        admin_get(admin, "/healthz").await,
        (200, "ok\n".to_string())
    );
    wait_for_readyz(admin, 200).await;
    rig.upstream.stop();
    wait_for_readyz(admin, 503).await;
    assert_eq!(
        admin_get(admin, "/healthz").await.0,
        200,
        "alive even when not ready"
    );
    assert_eq!(admin_get(admin, "/nothing").await.0, 404);
}

#[tokio::test]
async fn each_request_writes_one_audit_record_with_the_promised_fields() {
    let pki = TestPki::new();
    let upstream = TestUpstream::start().await;
    let (mut child, port, lines) = spawn_gateway_with(&pki, &upstream.url(), |toml| {
        toml.replace("format = \"text\"", "format = \"json\"")
            .replace("audit = false", "audit = true")
    });
    wait_for_line(&lines, "bars-gateway listening");
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let config = pki.client_config(Some(ClientCert::Proxy));
    let request = process_message();
    let request_id = request.headers()["x-request-id"]
        .to_str()
        .unwrap()
        .to_string();
    assert_eq!(
        send(addr, config.clone(), request).await.unwrap().status,
        200
    );
    let mut refused = metadata();
    refused.headers_mut().insert(
        "accept",
        "application/fhir+json; version=9.0.0".parse().unwrap(),
    );
    assert_eq!(send(addr, config, refused).await.unwrap().status, 406);

    let mut audits = Vec::new();
    let mut all_lines = Vec::new();
    while audits.len() < 2 {
        let line = lines
            .recv_timeout(Duration::from_secs(20))
            .expect("audit records within 20 s");
        all_lines.push(line.clone());
        let Ok(record) = serde_json::from_str::<serde_json::Value>(&line) else {
            continue;
        };
        if record["target"] == "audit" {
            audits.push(record);
        }
    }
    let first = &audits[0];
    assert_eq!(first["client"], "127.0.0.1");
    assert!(first["cert_subject"]
        .as_str()
        .unwrap()
        .contains("CN=bars-proxy.spineservices.nhs.uk"));
    assert_eq!(
        first["cert_sha256"],
        pki.client_sha256(ClientCert::Proxy).as_str()
    );
    assert_eq!(first["method"], "POST");
    assert_eq!(first["path"], "/$process-message");
    assert_eq!(first["request_id"], request_id.as_str());
    assert_eq!(
        first["correlation_id"],
        "9562466f-c982-4bd5-bb0e-255e9f5e6689"
    );
    assert_eq!(
        first["bars_target"],
        "https://fhir.nhs.uk/Id/dos-service-id|2000011147"
    );
    assert_eq!(first["ods_code"], "A1001");
    assert_eq!(
        first["software"],
        "https://consumersupplier.com/Id/device-identifier|SUPP-APP-1"
    );
    assert_eq!(first["status"], 200);
    assert_eq!(first["bars_code"], "-");
    assert_eq!(first["dedup"], "first");
    assert!(first["upstream_ms"].is_u64(), "{first}");
    assert!(first["timestamp"].is_string());
    let second = &audits[1];
    assert_eq!(second["status"], 406);
    assert_eq!(second["bars_code"], "REC_NOT_ACCEPTABLE");

    // Never bodies, never decoded practitioner data.
    let log = all_lines.join("\n");
    let body = include_str!("fixtures/bars-examples/process-message-validation-request.json");
    let body_json: serde_json::Value = serde_json::from_str(body).unwrap();
    let some_body_value = body_json["entry"][0]["fullUrl"].as_str().unwrap();
    assert!(
        !log.contains(some_body_value),
        "a body value leaked into the log"
    );
    assert!(
        !log.contains("General practitioner"),
        "decoded practitioner data leaked"
    );
    assert!(
        !log.contains("100334993514"),
        "the practitioner's role profile id leaked"
    );

    signal(&child, "-TERM");
    assert_eq!(child.wait().unwrap().code(), Some(0));
}

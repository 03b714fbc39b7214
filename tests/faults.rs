//! Faults: an upstream killed and restarted under load, one that never answers, resets or stalls
//! mid-body, and a certificate made unreadable before a reload. The gateway answers each with the
//! documented status, never forwards a request twice, and keeps serving.

mod common;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use common::raw_http::*;
use common::*;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::{oneshot, Notify};
use tokio::task::JoinHandle;

// ---- faults ------------------------------------------------------------------------------------

/// A hyper upstream that can be killed (listener and every connection closed at once) and
/// restarted on the same port; records the X-Request-Id of every request it receives.
struct KillableUpstream {
    addr: SocketAddr,
    ids: Arc<Mutex<Vec<String>>>,
    running: Option<(oneshot::Sender<()>, JoinHandle<()>)>,
}

impl KillableUpstream {
    async fn start() -> KillableUpstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut upstream = KillableUpstream {
            addr: listener.local_addr().unwrap(),
            ids: Arc::default(),
            running: None,
        };
        upstream.serve(listener);
        upstream
    }

    fn serve(&mut self, listener: TcpListener) {
        let (stop, mut stopped) = oneshot::channel::<()>();
        let ids = self.ids.clone();
        let task = tokio::spawn(async move {
            let mut connections = tokio::task::JoinSet::new();
            loop {
                let accepted = tokio::select! {
                    _ = &mut stopped => break,
                    accepted = listener.accept() => accepted,
                };
                let Ok((stream, _)) = accepted else { break };
                let ids = ids.clone();
                connections.spawn(async move {
                    let service = hyper::service::service_fn(
                        move |request: http::Request<hyper::body::Incoming>| {
                            let ids = ids.clone();
                            async move {
                                let id = request.headers()["x-request-id"]
                                    .to_str()
                                    .unwrap()
                                    .to_string();
                                let _ = request.into_body().collect().await;
                                ids.lock().unwrap().push(id);
                                Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(
                                    Bytes::from_static(b"{}"),
                                )))
                            }
                        },
                    );
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
            // Abort every connection and wait until each is gone: killed means no socket left.
            connections.shutdown().await;
        });
        self.running = Some((stop, task));
    }

    async fn kill(&mut self) {
        let (stop, task) = self.running.take().expect("running");
        let _ = stop.send(());
        task.await.unwrap();
    }

    async fn restart(&mut self) {
        let listener = TcpListener::bind(self.addr)
            .await
            .expect("the port is free again");
        self.serve(listener);
    }

    fn ids(&self) -> Vec<String> {
        self.ids.lock().unwrap().clone()
    }
}

/// A `POST /$process-message` (35 KB example body) with the given X-Request-Id.
fn process_message_with_id(id: &str) -> http::Request<Full<Bytes>> {
    let mut request = process_message();
    request
        .headers_mut()
        .insert("x-request-id", id.parse().unwrap());
    request
}

/// What the load clients got: (id, status), in arrival order.
#[derive(Default)]
struct Tally {
    results: Mutex<Vec<(String, u16)>>,
    changed: Notify,
}

impl Tally {
    fn count(&self, status: u16) -> usize {
        self.results
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, s)| *s == status)
            .count()
    }

    async fn wait_until(&self, done: impl Fn(&Tally) -> bool) {
        tokio::time::timeout(SAFETY_NET, async {
            loop {
                let changed = self.changed.notified();
                tokio::pin!(changed);
                changed.as_mut().enable();
                if done(self) {
                    return;
                }
                changed.await;
            }
        })
        .await
        .expect("the load reaches the expected state");
    }
}

#[tokio::test]
async fn upstream_killed_and_restarted_under_load_gets_503s_then_recovers_and_forwards_nothing_twice(
) {
    let pki = TestPki::new();
    let mut upstream = KillableUpstream::start().await;
    let settings = pki.settings(&pki.config_toml(&format!("http://{}", upstream.addr)));
    let gateway = TestGateway::start(settings).await;
    let tally = Arc::new(Tally::default());
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut load = Vec::new();
    for _ in 0..3 {
        let (tally, stop, addr) = (tally.clone(), stop.clone(), gateway.addr);
        let config = pki.client_config(Some(ClientCert::Proxy));
        load.push(tokio::spawn(async move {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let id = new_id();
                let reply = send(addr, config.clone(), process_message_with_id(&id))
                    .await
                    .unwrap();
                assert_eq!(reply.headers["x-request-id"], id.as_str(), "id echoed");
                assert_eq!(
                    reply.headers["x-correlation-id"],
                    "9562466f-c982-4bd5-bb0e-255e9f5e6689"
                );
                match reply.status.as_u16() {
                    200 => {}
                    503 => reply.assert_outcome(503, "REC_SERVICE_UNAVAILABLE", "transient"),
                    other => panic!(
                        "unexpected {other}: {}",
                        String::from_utf8_lossy(&reply.body)
                    ),
                }
                tally
                    .results
                    .lock()
                    .unwrap()
                    .push((id, reply.status.as_u16()));
                tally.changed.notify_waiters();
            }
        }));
    }
    tally.wait_until(|t| t.count(200) >= 10).await;
    upstream.kill().await;
    tally.wait_until(|t| t.count(503) >= 5).await;
    upstream.restart().await;
    let served = tally.count(200);
    tally.wait_until(|t| t.count(200) >= served + 10).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for task in load {
        task.await.unwrap();
    }

    let results = tally.results.lock().unwrap().clone();
    let seen = upstream.ids();
    let mut unique = seen.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(
        unique.len(),
        seen.len(),
        "the gateway forwarded a request twice"
    );
    for (id, status) in &results {
        if *status == 200 {
            assert!(
                seen.contains(id),
                "{id} answered 200 but never reached the upstream"
            );
        }
    }
    let failed: Vec<&String> = results
        .iter()
        .filter(|(_, s)| *s == 503)
        .map(|(id, _)| id)
        .collect();
    println!(
        "{} requests: {} forwarded, {} got 503",
        results.len(),
        seen.len(),
        failed.len()
    );
    // A 503 is transient: the sender's retry goes through; a retry of a 200 is a duplicate.
    let config = pki.client_config(Some(ClientCert::Proxy));
    for id in failed {
        let retry = send(gateway.addr, config.clone(), process_message_with_id(id))
            .await
            .unwrap();
        assert_eq!(retry.status, 200, "retry of {id} after a 503");
    }
    let (done, _) = results.iter().find(|(_, s)| *s == 200).unwrap();
    let retry = send(gateway.addr, config, process_message_with_id(done))
        .await
        .unwrap();
    retry.assert_outcome(409, "REC_CONFLICT", "duplicate");
}

#[tokio::test]
async fn an_upstream_that_accepts_and_never_answers_gets_408_and_the_retry_425_while_it_may_still_answer(
) {
    let (rig, upstream) = raw_rig(RawReply::Silent, |s| {
        s.upstream.request_timeout = Duration::from_millis(300)
    })
    .await;
    let id = new_id();
    let reply = rig.send(process_message_with_id(&id)).await;
    reply.assert_outcome(408, "REC_TIMEOUT", "timeout");
    assert_eq!(reply.headers["x-request-id"], id.as_str());
    upstream.wait_for_count(1).await;
    // The deadline ended the sender's wait, not the legacy system's work (issue 13).
    let retry = rig.send(process_message_with_id(&id)).await;
    retry.assert_outcome(425, "REC_TOO_EARLY", "duplicate");
    assert_eq!(retry.headers["x-request-id"], id.as_str());
    assert_eq!(
        upstream.received().len(),
        1,
        "a timed-out request may still be processed: its retry is not delivered meanwhile"
    );
}

/// Sends one request and reads the answer as far as it goes: the status, then the whole body or
/// the error that cut it off.
async fn send_and_read_body(
    rig: &Rig,
    request: http::Request<Full<Bytes>>,
) -> (u16, Result<Bytes, String>) {
    let conn = open(rig).await;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(conn.io))
        .await
        .unwrap();
    tokio::spawn(connection);
    let response = sender.send_request(request).await.unwrap();
    let status = response.status().as_u16();
    let body = response.into_body().collect().await;
    (
        status,
        body.map(|b| b.to_bytes()).map_err(|e| e.to_string()),
    )
}

#[tokio::test]
async fn an_upstream_that_resets_mid_body_ends_the_client_response_promptly() {
    let (rig, upstream) = raw_rig(RawReply::HalfBodyThenClose, |s| {
        s.upstream.request_timeout = Duration::from_millis(500)
    })
    .await;
    let id = new_id();
    let (status, body) = tokio::time::timeout(
        SAFETY_NET,
        send_and_read_body(&rig, process_message_with_id(&id)),
    )
    .await
    .expect("the client is not left hanging");
    // The upstream's status line had arrived: the client sees it, then the body breaks off.
    assert_eq!(status, 200);
    assert!(
        body.is_err(),
        "a truncated body must not look complete: {body:?}"
    );
    assert_eq!(upstream.received().len(), 1);
    // A body that broke off is no usable answer: the outcome is uncertain, so the retry is
    // delivered (never lost), marked as a possible duplicate for the legacy system (issue 13).
    wait_for_metric_of(
        rig.gateway.admin.unwrap(),
        "bars_gateway_dedup_total{outcome=\"uncertain\"}",
        |v| v >= 1.0,
    )
    .await;
    let (status, _) = send_and_read_body(&rig, process_message_with_id(&id)).await;
    assert_eq!(status, 200);
    upstream.wait_for_count(2).await;
    let seen = upstream.received();
    assert_eq!(
        seen[0].headers("x-bars-possible-duplicate"),
        Vec::<String>::new()
    );
    assert_eq!(seen[1].headers("x-bars-possible-duplicate"), ["true"]);
}

#[tokio::test]
async fn an_upstream_that_stalls_mid_body_is_cut_off_after_the_request_timeout() {
    let (rig, upstream) = raw_rig(RawReply::HalfBodyThenStall, |s| {
        s.upstream.request_timeout = Duration::from_millis(500)
    })
    .await;
    let (status, body) = tokio::time::timeout(SAFETY_NET, send_and_read_body(&rig, metadata()))
        .await
        .expect("the client is not left hanging");
    assert_eq!(status, 200);
    assert!(
        body.is_err(),
        "a truncated body must not look complete: {body:?}"
    );
    assert_eq!(upstream.received().len(), 1);
}

/// Makes `path` unreadable: `chmod 000` where that stops reads; where it does not (root, or
/// CAP_DAC_OVERRIDE), replaces the file with a directory of the same name. Returns which.
fn make_unreadable(path: &std::path::Path) -> &'static str {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o000)).unwrap();
    if std::fs::read(path).is_err() {
        return "chmod 000";
    }
    std::fs::remove_file(path).unwrap();
    std::fs::create_dir(path).unwrap();
    "a directory in place of the file (chmod 000 does not stop this process reading)"
}

#[tokio::test]
async fn an_unreadable_certificate_at_reload_keeps_the_old_material_in_service() {
    let rig = Rig::start().await;
    let config = rig.pki.client_config(Some(ClientCert::Proxy));
    let before = served_certificate(rig.gateway.addr, config.clone()).await;
    let how = make_unreadable(&rig.pki.path("server-chain.pem"));
    println!("unreadable by: {how}");
    let err = rig.gateway.reloader.reload().await.unwrap_err().to_string();
    assert!(
        err.contains("tls.certificate") && err.contains("server-chain.pem"),
        "{how}: {err}"
    );
    assert_eq!(served_certificate(rig.gateway.addr, config).await, before);
    assert_eq!(rig.send(metadata()).await.status, 200);
}

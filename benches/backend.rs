//! The legacy receiver stand-in for `benches/run.sh`: a fast static HTTP/1.1 server (keep-alive,
//! multi-thread runtime) that reads the request body and answers 200 with a small FHIR JSON body.
//! bars-gateway and nginx are both pointed at the same instance, so the backend's cost is common
//! to both sides of every ratio.
//!
//! Usage: `backend ADDR [LIFETIME_SECONDS]`. It exits by itself after the lifetime (default 1800 s)
//! so a crashed script never leaves it running. Given only cargo bench's `--bench` flag (a plain
//! `cargo bench`), it prints usage and exits.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderValue, CONTENT_TYPE};
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

/// What every request gets: small, like a legacy receiver's acknowledgement.
const BODY: &[u8] = br#"{"resourceType":"OperationOutcome","issue":[{"severity":"information","code":"informational","diagnostics":"ok"}]}"#;

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    let Some(addr) = args.first().and_then(|a| a.parse::<SocketAddr>().ok()) else {
        eprintln!("usage: backend ADDR [LIFETIME_SECONDS]   (benches/run.sh starts it)");
        return;
    };
    let lifetime = args
        .get(1)
        .and_then(|s| s.parse::<u64>().ok())
        .unwrap_or(1800);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("backend: cannot start the runtime: {e}");
            std::process::exit(1);
        }
    };
    if let Err(e) = runtime.block_on(serve(addr, Duration::from_secs(lifetime))) {
        eprintln!("backend: {e}");
        std::process::exit(1);
    }
}

async fn serve(addr: SocketAddr, lifetime: Duration) -> std::io::Result<()> {
    let listener = TcpListener::bind(addr).await?;
    let deadline = tokio::time::sleep(lifetime);
    tokio::pin!(deadline);
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(_) => {
                    // EMFILE and the like: back off rather than spin.
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            },
            _ = &mut deadline => return Ok(()),
        };
        let _ = stream.set_nodelay(true);
        tokio::spawn(async move {
            let _ = http1::Builder::new()
                .keep_alive(true)
                .serve_connection(TokioIo::new(stream), service_fn(answer))
                .await;
        });
    }
}

async fn answer(request: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    // Read the whole body, as a real receiver would, so the connection can be reused.
    let _ = request.into_body().collect().await;
    let mut response = Response::new(Full::new(Bytes::from_static(BODY)));
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("application/fhir+json"),
    );
    Ok(response)
}

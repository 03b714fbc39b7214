//! The drain signal every listener and background task waits on (the gateway's, admin's, egress's),
//! and the accept step every listener shares (public, admin, egress).

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// The next connection on `listener`, or `None` once `flag` drains. A failed accept (typically
/// EMFILE) is logged as `message` and retried after `backoff` instead of spinning.
pub(crate) async fn accept_until_drained(
    listener: &TcpListener,
    flag: &mut watch::Receiver<bool>,
    message: &'static str,
    backoff: Duration,
) -> Option<(TcpStream, SocketAddr)> {
    accept_until(listener, std::pin::pin!(drained(flag)), message, backoff).await
}

/// The next connection on `listener`, or `None` once `stop` resolves (the public listener stops
/// on the shutdown signal, before the drain flag turns). Failed accepts as above.
pub(crate) async fn accept_until<F: Future<Output = ()>>(
    listener: &TcpListener,
    mut stop: Pin<&mut F>,
    message: &'static str,
    backoff: Duration,
) -> Option<(TcpStream, SocketAddr)> {
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => return Some(a),
                Err(e) => {
                    // Typically EMFILE: back off instead of spinning.
                    tracing::warn!(error = %e, "{message}");
                    tokio::time::sleep(backoff).await;
                }
            },
            _ = stop.as_mut() => return None,
        }
    }
}

/// Resolves once the drain flag turns true (or its sender is gone).
pub(crate) async fn drained(flag: &mut watch::Receiver<bool>) {
    loop {
        if *flag.borrow_and_update() {
            return;
        }
        if flag.changed().await.is_err() {
            return;
        }
    }
}

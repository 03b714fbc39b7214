//! The drain signal every listener and background task waits on (the gateway's, admin's, egress's).

use tokio::sync::watch;

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

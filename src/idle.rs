//! Idle connection detection: a connection with no request in flight and no bytes moving for
//! `listen.idle_timeout` is closed gracefully. hyper has no such timer of its own for HTTP/1.1
//! keep-alive, and an idle mTLS connection still holds memory and a `max_connections` slot.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;

/// Shared between a connection's IO and its requests: last activity and requests in flight.
#[derive(Debug, Clone)]
pub struct IdleWatch {
    inner: Arc<IdleState>,
}

#[derive(Debug)]
struct IdleState {
    origin: Instant,
    timeout: Duration,
    last_activity_ms: AtomicU64,
    in_flight: AtomicUsize,
}

/// Marks a request in flight until dropped.
#[derive(Debug)]
pub struct Busy {
    inner: Arc<IdleState>,
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.inner.touch();
        self.inner.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

impl IdleState {
    fn touch(&self) {
        let ms = self.origin.elapsed().as_millis() as u64;
        self.last_activity_ms.store(ms, Ordering::Relaxed);
    }
}

impl IdleWatch {
    /// A watch that expires after `timeout` of idleness.
    pub fn new(timeout: Duration) -> IdleWatch {
        IdleWatch {
            inner: Arc::new(IdleState {
                origin: Instant::now(),
                timeout,
                last_activity_ms: AtomicU64::new(0),
                in_flight: AtomicUsize::new(0),
            }),
        }
    }

    /// Marks a request in flight for as long as the guard lives.
    pub fn busy(&self) -> Busy {
        self.inner.in_flight.fetch_add(1, Ordering::Relaxed);
        Busy {
            inner: self.inner.clone(),
        }
    }

    /// Resolves once the connection has been idle for the timeout.
    pub async fn expired(&self) {
        loop {
            let last = Duration::from_millis(self.inner.last_activity_ms.load(Ordering::Relaxed));
            let deadline = self.inner.origin + last + self.inner.timeout;
            tokio::time::sleep_until(deadline).await;
            let now_last =
                Duration::from_millis(self.inner.last_activity_ms.load(Ordering::Relaxed));
            if now_last == last && self.inner.in_flight.load(Ordering::Relaxed) == 0 {
                return;
            }
            if self.inner.in_flight.load(Ordering::Relaxed) > 0 {
                // A request is being processed (e.g. waiting on the upstream): not idle.
                self.inner.touch();
            }
        }
    }
}

/// An IO wrapper that records activity on every read or write that moves bytes.
#[derive(Debug)]
pub struct ActivityIo<T> {
    io: T,
    watch: IdleWatch,
}

impl<T> ActivityIo<T> {
    /// Wraps `io`, reporting activity to `watch`.
    pub fn new(io: T, watch: IdleWatch) -> Self {
        ActivityIo { io, watch }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for ActivityIo<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let result = Pin::new(&mut self.io).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.watch.inner.touch();
        }
        result
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for ActivityIo<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let result = Pin::new(&mut self.io).poll_write(cx, data);
        if matches!(result, Poll::Ready(Ok(n)) if n > 0) {
            self.watch.inner.touch();
        }
        result
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let result = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        if matches!(result, Poll::Ready(Ok(n)) if n > 0) {
            self.watch.inner.touch();
        }
        result
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn an_idle_connection_expires_after_the_timeout() {
        let watch = IdleWatch::new(Duration::from_secs(60));
        let start = Instant::now();
        watch.expired().await;
        assert!(start.elapsed() >= Duration::from_secs(60));
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_in_flight_keeps_the_connection_alive() {
        let watch = IdleWatch::new(Duration::from_secs(10));
        let busy = watch.busy();
        let w = watch.clone();
        let expiry = tokio::spawn(async move { w.expired().await });
        tokio::time::sleep(Duration::from_secs(35)).await;
        assert!(
            !expiry.is_finished(),
            "expired while a request was in flight"
        );
        drop(busy);
        let at_release = Instant::now();
        expiry.await.unwrap();
        assert!(at_release.elapsed() >= Duration::from_secs(10));
    }
}

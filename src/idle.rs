//! Connection timers: a connection with no request in flight and no bytes moving for
//! `listen.idle_timeout` is closed gracefully (an idle mTLS connection still holds memory and a
//! `max_connections` slot), and on HTTP/1 a request whose header section has started to arrive
//! must be complete within `listen.header_read_timeout` (slowloris).
//!
//! hyper's own `header_read_timeout` cannot tell the two apart: it also runs while a kept-alive
//! connection waits for its next request (hyper#3828), which would close every idle connection
//! after the short header timeout and make the BaRS proxy pay a full RSA handshake after each
//! quiet spell. So hyper's timer is only a backstop at `idle_timeout`, and these timers decide.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::Notify;
use tokio::time::Instant;

/// Why a connection's time is up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Expiry {
    /// No request in flight and no bytes moving for the idle timeout: close gracefully.
    Idle,
    /// A request's header section started but did not complete in time: drop the connection.
    HeaderTimeout,
}

/// Shared between a connection's IO and its requests: last activity and requests in flight.
#[derive(Debug, Clone)]
pub(crate) struct IdleWatch {
    inner: Arc<IdleState>,
}

#[derive(Debug)]
struct IdleState {
    origin: Instant,
    timeout: Duration,
    last_activity_ms: AtomicU64,
    in_flight: AtomicUsize,
    /// `None` disables the header timer (h2: pings and window updates are not request starts).
    header_timeout: Option<Duration>,
    /// When the pending request's first byte arrived, in ms since `origin` plus one; 0 = none.
    header_started: AtomicU64,
    /// Wakes the timer task when a header section starts.
    header_start: Notify,
}

/// Marks a request in flight until dropped.
#[derive(Debug)]
pub(crate) struct Busy {
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

    /// Bytes arrived: with no request in flight they start the next request's header section.
    fn received(&self) {
        self.touch();
        if self.header_timeout.is_some()
            && self.in_flight.load(Ordering::Relaxed) == 0
            && self.header_started.load(Ordering::Relaxed) == 0
        {
            let ms = self.origin.elapsed().as_millis() as u64 + 1;
            self.header_started.store(ms, Ordering::Relaxed);
            self.header_start.notify_one();
        }
    }
}

impl IdleWatch {
    /// A watch that expires after `timeout` of idleness, or `header_timeout` after a request's
    /// first byte if the request has not reached the service by then (`None`: no header timer).
    pub(crate) fn new(timeout: Duration, header_timeout: Option<Duration>) -> IdleWatch {
        IdleWatch {
            inner: Arc::new(IdleState {
                origin: Instant::now(),
                timeout,
                last_activity_ms: AtomicU64::new(0),
                in_flight: AtomicUsize::new(0),
                header_timeout,
                header_started: AtomicU64::new(0),
                header_start: Notify::new(),
            }),
        }
    }

    /// Marks a request in flight for as long as the guard lives; its header section is complete.
    pub(crate) fn busy(&self) -> Busy {
        self.inner.in_flight.fetch_add(1, Ordering::Relaxed);
        self.inner.header_started.store(0, Ordering::Relaxed);
        Busy {
            inner: self.inner.clone(),
        }
    }

    /// Resolves once the connection has been idle for the timeout, or a header section has taken
    /// too long.
    pub(crate) async fn expired(&self) -> Expiry {
        let s = &self.inner;
        loop {
            let last = Duration::from_millis(s.last_activity_ms.load(Ordering::Relaxed));
            let mut deadline = s.origin + last + s.timeout;
            let started = s.header_started.load(Ordering::Relaxed);
            if let (Some(limit), true) = (s.header_timeout, started > 0) {
                deadline = deadline.min(s.origin + Duration::from_millis(started - 1) + limit);
            }
            tokio::select! {
                _ = tokio::time::sleep_until(deadline) => {}
                // A header section started: recompute the deadline.
                _ = s.header_start.notified() => continue,
            }
            let started_now = s.header_started.load(Ordering::Relaxed);
            if let (Some(limit), true) = (s.header_timeout, started_now > 0) {
                if s.origin + Duration::from_millis(started_now - 1) + limit <= Instant::now() {
                    return Expiry::HeaderTimeout;
                }
            }
            let now_last = Duration::from_millis(s.last_activity_ms.load(Ordering::Relaxed));
            if now_last == last && s.in_flight.load(Ordering::Relaxed) == 0 && started_now == 0 {
                return Expiry::Idle;
            }
            if s.in_flight.load(Ordering::Relaxed) > 0 {
                // A request is being processed (e.g. waiting on the upstream): not idle.
                s.touch();
            }
        }
    }
}

/// An IO wrapper that records activity on every read or write that moves bytes (and, on
/// HTTP/1, shows what it reads to the request framing watch).
#[derive(Debug)]
pub(crate) struct ActivityIo<T> {
    io: T,
    watch: IdleWatch,
    framing: Option<std::sync::Arc<crate::framing::FramingWatch>>,
}

impl<T> ActivityIo<T> {
    /// Wraps `io`, reporting activity to `watch` and the bytes read to `framing`.
    pub(crate) fn new(
        io: T,
        watch: IdleWatch,
        framing: Option<std::sync::Arc<crate::framing::FramingWatch>>,
    ) -> Self {
        ActivityIo { io, watch, framing }
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
            self.watch.inner.received();
            if let Some(framing) = &self.framing {
                framing.feed(&buf.filled()[before..]);
            }
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
        let watch = IdleWatch::new(Duration::from_secs(60), None);
        let start = Instant::now();
        assert_eq!(watch.expired().await, Expiry::Idle);
        assert!(start.elapsed() >= Duration::from_secs(60));
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_in_flight_keeps_the_connection_alive() {
        let watch = IdleWatch::new(Duration::from_secs(10), None);
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

    #[tokio::test(start_paused = true)]
    async fn a_started_header_section_must_complete_within_the_header_timeout() {
        let watch = IdleWatch::new(Duration::from_secs(60), Some(Duration::from_secs(10)));
        let w = watch.clone();
        let expiry = tokio::spawn(async move { w.expired().await });
        tokio::time::sleep(Duration::from_secs(30)).await;
        assert!(
            !expiry.is_finished(),
            "idle for 30 s is fine: no request has started"
        );
        let started = Instant::now();
        watch.inner.received(); // the first bytes of a request head
        assert_eq!(expiry.await.unwrap(), Expiry::HeaderTimeout);
        assert!(started.elapsed() >= Duration::from_secs(10));
        assert!(started.elapsed() < Duration::from_secs(11));
    }

    #[tokio::test(start_paused = true)]
    async fn a_header_section_that_completes_in_time_stops_the_header_timer() {
        let watch = IdleWatch::new(Duration::from_secs(60), Some(Duration::from_secs(10)));
        let w = watch.clone();
        let expiry = tokio::spawn(async move { w.expired().await });
        watch.inner.received();
        tokio::time::sleep(Duration::from_secs(5)).await;
        drop(watch.busy()); // the head was complete: the request ran and finished
        tokio::time::sleep(Duration::from_secs(30)).await;
        assert!(
            !expiry.is_finished(),
            "the header timer stopped with the request"
        );
        assert_eq!(expiry.await.unwrap(), Expiry::Idle);
    }
}

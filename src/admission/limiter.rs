//! The refusal log limiter: at most one log line per client address per interval, in bounded
//! memory.

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use tracing::{debug, info, warn};

use super::AdmissionError;

/// Rate limiter for refusal logs: at most one log line per address per minute, bounded memory
/// (an attacker spraying addresses must not grow it without bound nor flood the log).
///
/// Suppressed lines lose nothing that matters: every refusal is still counted in
/// `bars_gateway_rejections_total{reason}`. When `max_tracked` addresses are all within their
/// interval, new addresses are not logged (no eviction, which would let a spray log every
/// address), and the limiter says so itself once per interval.
pub struct RefusalLogLimiter {
    interval: Duration,
    max_tracked: usize,
    state: Mutex<LimiterState>,
}

/// Addresses logged within the interval; `order` holds the same entries oldest first, so expiry is
/// amortised O(1) instead of a scan of the map under the lock on every refusal.
#[derive(Default)]
pub(super) struct LimiterState {
    // std's SipHash map: keys are attacker-chosen, so a keyed hash keeps lookups O(1).
    last_logged: HashMap<IpAddr, Instant>,
    order: VecDeque<(IpAddr, Instant)>,
    overflow_warned_at: Option<Instant>,
}

impl RefusalLogLimiter {
    /// Logs each address at most once per `interval`; tracks at most `max_tracked` (min 1) of them.
    pub fn new(interval: Duration, max_tracked: usize) -> Self {
        Self {
            interval,
            max_tracked: max_tracked.max(1),
            state: Mutex::new(LimiterState::default()),
        }
    }

    /// Whether a refusal from `ip` at `now` should be logged; records it when so.
    pub fn should_log(&self, ip: IpAddr, now: Instant) -> bool {
        let ip = ip.to_canonical();
        let warn_overflow = {
            // A panic while the lock was held leaves state that is still fine for a log limiter.
            let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
            state.expire(now, self.interval);
            if state.last_logged.contains_key(&ip) {
                return false;
            }
            if state.last_logged.len() < self.max_tracked {
                state.last_logged.insert(ip, now);
                state.order.push_back((ip, now));
                return true;
            }
            let warn = state
                .overflow_warned_at
                .is_none_or(|at| now.saturating_duration_since(at) >= self.interval);
            if warn {
                state.overflow_warned_at = Some(now);
            }
            warn
        };
        // Logged outside the lock: a slow log sink must not stall other connection tasks.
        if warn_overflow {
            warn!(
                max_tracked = self.max_tracked,
                interval = ?self.interval,
                "refusals from too many addresses to log each one; new addresses are counted in metrics but not logged until older entries expire"
            );
        }
        false
    }

    /// Logs an admission refusal, at most once per interval per client address (a refusal through a
    /// balancer is keyed by the client it relayed, not the balancer).
    pub fn log_refusal(&self, peer: SocketAddr, error: &AdmissionError) {
        if let AdmissionError::LocalNotAllowed { balancer } = error {
            // Balancer health checks arrive every few seconds by design: counted, not logged.
            debug!(peer = %peer, balancer = %balancer, reason = error.reason(), "balancer health check closed at admission");
            return;
        }
        let client = error.client_ip().unwrap_or(peer.ip()).to_canonical();
        if !self.should_log(client, Instant::now()) {
            return;
        }
        let reason = error.reason();
        match error {
            // PROXY header trouble: a balancer or the config is wrong, an operator should look.
            AdmissionError::ProxyHeaderMissing
            | AdmissionError::ProxyHeaderUntrusted
            | AdmissionError::ProxyHeaderMalformed(_) => {
                warn!(
                    peer = %peer,
                    client = %client,
                    reason,
                    error = %error,
                    "connection refused at admission"
                );
            }
            // Unknown addresses, silent peers and resets are routine internet noise.
            _ => {
                info!(
                    peer = %peer,
                    client = %client,
                    reason,
                    error = %error,
                    "connection refused at admission"
                );
            }
        }
    }

    /// How many addresses are currently remembered (never more than `max_tracked`).
    pub fn tracked(&self) -> usize {
        self.state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .last_logged
            .len()
    }
}

impl LimiterState {
    /// Forgets addresses whose interval has passed. `order` is sorted by time because callers pass
    /// `Instant::now()`; slight disorder between tasks only delays an expiry a little.
    fn expire(&mut self, now: Instant, interval: Duration) {
        while let Some(&(ip, at)) = self.order.front() {
            if now.saturating_duration_since(at) < interval {
                break;
            }
            self.order.pop_front();
            if self.last_logged.get(&ip) == Some(&at) {
                self.last_logged.remove(&ip);
            }
        }
    }
}

impl std::fmt::Debug for RefusalLogLimiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RefusalLogLimiter")
            .field("interval", &self.interval)
            .field("max_tracked", &self.max_tracked)
            .field("tracked", &self.tracked())
            .finish()
    }
}

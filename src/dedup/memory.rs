//! The in-process dedup store: a bounded moka cache. One replica only, and forgotten on restart
//! (documented): use the Redis store for several replicas or to survive restarts.

use std::sync::Arc;
use std::time::{Duration, Instant};

use moka::future::Cache;
use moka::notification::RemovalCause;
use moka::policy::EvictionPolicy;
use moka::Expiry;

use super::{Claim, Entry, Fingerprint};
use crate::bars::ids::RequestId;
use crate::metrics::{Metrics, OutcomeLabel};

/// In-flight claims live briefly, done entries for the configured ttl.
struct EntryExpiry {
    ttl: Duration,
    in_flight: Duration,
}

impl EntryExpiry {
    fn of(&self, entry: &Entry) -> Option<Duration> {
        Some(match entry {
            Entry::InFlight { .. } => self.in_flight,
            Entry::Done { .. } => self.ttl,
        })
    }
}

impl Expiry<RequestId, Entry> for EntryExpiry {
    fn expire_after_create(&self, _: &RequestId, entry: &Entry, _: Instant) -> Option<Duration> {
        self.of(entry)
    }

    fn expire_after_update(
        &self,
        _: &RequestId,
        entry: &Entry,
        _: Instant,
        _: Option<Duration>,
    ) -> Option<Duration> {
        self.of(entry)
    }
}

/// The moka-backed store.
pub struct MemoryStore {
    cache: Cache<RequestId, Entry>,
}

impl MemoryStore {
    /// A store of at most `max_entries`, evictions counted as `dedup_total{outcome="evicted"}`.
    pub fn new(
        max_entries: u64,
        ttl: Duration,
        in_flight: Duration,
        metrics: Arc<Metrics>,
    ) -> Self {
        let cache = Cache::builder()
            .max_capacity(max_entries)
            // Not moka's default TinyLFU: once the store is full, TinyLFU's admission rejects most
            // new keys (seen once or twice, like every victim), so a just-processed id was dropped
            // within moments and its retry delivered again. LRU always admits and evicts the least
            // recently used, i.e. the oldest unretried entry (found by scripts/soak.sh).
            .eviction_policy(EvictionPolicy::lru())
            .expire_after(EntryExpiry { ttl, in_flight })
            .eviction_listener(move |_, _, cause| {
                if cause == RemovalCause::Size {
                    metrics
                        .dedup
                        .get_or_create(&OutcomeLabel { outcome: "evicted" })
                        .inc();
                }
            })
            .build();
        MemoryStore { cache }
    }

    /// Atomically inserts an in-flight entry unless one exists.
    pub async fn claim(&self, id: RequestId, fingerprint: Fingerprint) -> Claim {
        let entry = self
            .cache
            .entry(id)
            .or_insert_with(async move { Entry::InFlight { fingerprint } })
            .await;
        if entry.is_fresh() {
            Claim::First
        } else {
            Claim::from_existing(Some(entry.into_value()), fingerprint)
        }
    }

    /// Records the answer.
    pub async fn complete(&self, id: RequestId, entry: Entry) {
        self.cache.insert(id, entry).await;
    }

    /// Forgets the id.
    pub async fn release(&self, id: RequestId) {
        self.cache.invalidate(&id).await;
    }

    /// Entries held (approximate; for benchmarks and tests).
    pub async fn entry_count(&self) -> u64 {
        self.cache.run_pending_tasks().await;
        self.cache.entry_count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store(max: u64) -> MemoryStore {
        store_with_metrics(max).0
    }

    fn store_with_metrics(max: u64) -> (MemoryStore, Arc<Metrics>) {
        let metrics = Arc::new(Metrics::new().0);
        let store = MemoryStore::new(
            max,
            Duration::from_secs(3600),
            Duration::from_secs(30),
            metrics.clone(),
        );
        (store, metrics)
    }

    fn id(n: u128) -> RequestId {
        RequestId(uuid::Uuid::from_u128(n))
    }

    #[tokio::test]
    async fn first_claim_wins_and_the_second_sees_in_flight() {
        let s = store(100);
        let fp = Fingerprint([1; 32]);
        assert_eq!(s.claim(id(1), fp).await, Claim::First);
        assert_eq!(
            s.claim(id(1), fp).await,
            Claim::Seen(Entry::InFlight { fingerprint: fp })
        );
        assert_eq!(s.claim(id(1), Fingerprint([2; 32])).await, Claim::Conflict);
    }

    #[tokio::test]
    async fn completed_entries_are_seen_done_and_released_ones_forgotten() {
        let s = store(100);
        let fp = Fingerprint([1; 32]);
        s.claim(id(1), fp).await;
        let done = Entry::Done {
            fingerprint: fp,
            status: 201,
            reference: None,
            replay: None,
        };
        s.complete(id(1), done.clone()).await;
        assert_eq!(s.claim(id(1), fp).await, Claim::Seen(done));
        s.claim(id(2), fp).await;
        s.release(id(2)).await;
        assert_eq!(s.claim(id(2), fp).await, Claim::First);
    }

    #[tokio::test]
    async fn concurrent_claims_of_one_id_have_exactly_one_winner() {
        let s = Arc::new(store(100));
        let fp = Fingerprint([3; 32]);
        let tasks: Vec<_> = (0..100)
            .map(|_| {
                let s = s.clone();
                tokio::spawn(async move { s.claim(id(9), fp).await })
            })
            .collect();
        let mut firsts = 0;
        for t in tasks {
            if t.await.unwrap() == Claim::First {
                firsts += 1;
            }
        }
        assert_eq!(firsts, 1);
    }

    #[tokio::test]
    async fn a_full_store_still_remembers_the_request_it_just_recorded() {
        let s = store(100);
        let fp = Fingerprint([4; 32]);
        let done = Entry::Done {
            fingerprint: fp,
            status: 200,
            reference: None,
            replay: None,
        };
        let mut forgotten = Vec::new();
        for n in 0..1000 {
            s.claim(id(n), fp).await;
            s.complete(id(n), done.clone()).await;
            // Runs the cache's pending admissions and evictions, as time would.
            s.entry_count().await;
            if s.claim(id(n), fp).await == Claim::First {
                forgotten.push(n);
            }
        }
        assert!(forgotten.is_empty(), "forgotten at once: {forgotten:?}");
    }

    #[tokio::test]
    async fn the_store_stays_within_max_entries_and_counts_evictions() {
        let (s, metrics) = store_with_metrics(1000);
        for n in 0..5000 {
            s.claim(id(n), Fingerprint([0; 32])).await;
        }
        assert!(s.entry_count().await <= 1000, "{}", s.entry_count().await);
        let evicted = metrics
            .dedup
            .get_or_create(&OutcomeLabel { outcome: "evicted" })
            .get();
        assert!(evicted >= 4000, "evictions counted: {evicted}");
    }
}

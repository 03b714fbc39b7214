//! The in-process dedup store: a bounded, sharded map of request ids. One replica only, and
//! forgotten on restart (documented): use the Redis store for several replicas or to survive
//! restarts.
//!
//! Not moka (DESIGN.md §8's first choice): moka's bookkeeping costs about 380 bytes per entry on
//! top of the payload (an `Arc`'d key, a value entry, access-order deque nodes, timer-wheel
//! nodes), 455 MB for the default 1,000,000 entries against the 300 MB goal of issue 5. This
//! store keeps a 72-byte table slot per entry plus a 20-byte queue record (BENCHMARKS.md).
//!
//! Each shard is a `HashMap` plus a queue of ids in the order they were claimed. A full shard
//! forgets its oldest claim first (FIFO): every id is admitted, so the request just recorded is
//! never the one dropped (moka's TinyLFU admission did that, and a retry was delivered twice).
//! Expired entries are dropped lazily (on lookup and from the front of the queue as claims come
//! in); they are never returned.

use std::collections::hash_map::RandomState;
use std::collections::{HashMap, VecDeque};
use std::hash::BuildHasher;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::time::Instant;

use super::{Claim, Entry, Fingerprint, Replay};
use crate::bars::ids::RequestId;
use crate::metrics::{Metrics, OutcomeLabel};

/// Entries per shard that fill 7/8 of a 65,536-bucket table, hashbrown's largest load: a
/// 1,000,000-entry store is 18 such shards with no table half empty after a doubling.
const SHARD_FILL: u64 = 57_344;

/// Fewest shards for stores big enough to see contention (fewer lock collisions than cores).
const MIN_SHARDS: u64 = 8;

/// Stale records (released or superseded claims) the queue may hold beyond the live entries
/// before it is compacted.
const QUEUE_SLACK: usize = 1024;

/// Most queue records a claim looks at for expired entries: bounds the work under the lock.
const SWEEP_BATCH: usize = 32;

/// What a shard keeps per id: 56 bytes, plus the 16-byte key.
struct Slot {
    fingerprint: Fingerprint,
    /// Milliseconds since the store's epoch.
    expires_ms: u64,
    /// The claim this slot belongs to; the queue record with the same sequence number is live.
    seq: u32,
    /// [`IN_FLIGHT`], [`UNCERTAIN`], or the upstream's status once done.
    status: u16,
    /// The rare extras of a done entry: the `Location` reference and a 4xx to replay.
    extra: Option<Box<Extra>>,
}

/// `Slot::status` of an in-flight claim.
const IN_FLIGHT: u16 = 0;
/// `Slot::status` of an uncertain outcome (an HTTP status is never below 100).
const UNCERTAIN: u16 = 1;

struct Extra {
    reference: Option<Box<str>>,
    replay: Option<Box<Replay>>,
}

impl Slot {
    fn new(entry: Entry, expires_ms: u64, seq: u32) -> Slot {
        match entry {
            Entry::InFlight { fingerprint } => Slot {
                fingerprint,
                expires_ms,
                seq,
                status: IN_FLIGHT,
                extra: None,
            },
            Entry::Uncertain { fingerprint } => Slot {
                fingerprint,
                expires_ms,
                seq,
                status: UNCERTAIN,
                extra: None,
            },
            Entry::Done {
                fingerprint,
                status,
                reference,
                replay,
            } => Slot {
                fingerprint,
                expires_ms,
                seq,
                // hyper's `StatusCode` is 100..=999: never one of the two markers.
                status: status.max(100),
                extra: (reference.is_some() || replay.is_some())
                    .then(|| Box::new(Extra { reference, replay })),
            },
        }
    }

    fn entry(&self) -> Entry {
        match self.status {
            IN_FLIGHT => {
                return Entry::InFlight {
                    fingerprint: self.fingerprint,
                }
            }
            UNCERTAIN => {
                return Entry::Uncertain {
                    fingerprint: self.fingerprint,
                }
            }
            _ => {}
        }
        let (reference, replay) = match &self.extra {
            Some(extra) => (extra.reference.clone(), extra.replay.clone()),
            None => (None, None),
        };
        Entry::Done {
            fingerprint: self.fingerprint,
            status: self.status,
            reference,
            replay,
        }
    }
}

struct Shard {
    map: HashMap<RequestId, Slot>,
    /// Ids in claim order, each with its claim's sequence number; a record whose number differs
    /// from the slot's (or whose slot is gone) is stale and skipped.
    order: VecDeque<(RequestId, u32)>,
    next_seq: u32,
    capacity: usize,
}

impl Shard {
    fn is_live(&self, record: &(RequestId, u32)) -> bool {
        self.map.get(&record.0).is_some_and(|s| s.seq == record.1)
    }

    /// Records a new claim of `id` (which must not be in the map), making room first. Returns how
    /// many unexpired entries were evicted for it.
    fn insert(&mut self, id: RequestId, entry: Entry, expires_ms: u64, now_ms: u64) -> u64 {
        let mut evicted = 0;
        while self.map.len() >= self.capacity {
            let Some(record) = self.order.pop_front() else {
                break;
            };
            if self.is_live(&record) {
                if let Some(slot) = self.map.remove(&record.0) {
                    if slot.expires_ms > now_ms {
                        evicted += 1;
                    }
                }
            }
        }
        let seq = self.next_seq;
        self.next_seq = self.next_seq.wrapping_add(1);
        self.map.insert(id, Slot::new(entry, expires_ms, seq));
        self.order.push_back((id, seq));
        self.compact();
        evicted
    }

    /// Drops expired entries from the front of the queue (a bounded number per call).
    fn sweep(&mut self, now_ms: u64) {
        for _ in 0..SWEEP_BATCH {
            let Some(&record) = self.order.front() else {
                return;
            };
            match self.map.get(&record.0) {
                Some(slot) if slot.seq == record.1 => {
                    if slot.expires_ms > now_ms {
                        return;
                    }
                    self.map.remove(&record.0);
                }
                _ => {}
            }
            self.order.pop_front();
        }
    }

    /// Keeps the queue within the live entries plus some slack. Stale records can only have
    /// been pushed since the last compaction, so a sequence number cannot wrap around onto one.
    fn compact(&mut self) {
        if self.order.len() > 2 * self.map.len() + QUEUE_SLACK {
            let map = &self.map;
            self.order
                .retain(|(id, seq)| map.get(id).is_some_and(|s| s.seq == *seq));
        }
    }
}

/// The in-process store.
pub struct MemoryStore {
    shards: Box<[Mutex<Shard>]>,
    hasher: RandomState,
    epoch: Instant,
    ttl_ms: u64,
    in_flight_ms: u64,
    metrics: Arc<Metrics>,
}

impl MemoryStore {
    /// A store of at most `max_entries`, evictions counted as `dedup_total{outcome="evicted"}`.
    /// Done entries live for `ttl`, in-flight claims for `in_flight`.
    pub fn new(
        max_entries: u64,
        ttl: Duration,
        in_flight: Duration,
        metrics: Arc<Metrics>,
    ) -> Self {
        let max_entries = max_entries.max(1);
        let shards = if max_entries >= MIN_SHARDS * 1024 {
            max_entries.div_ceil(SHARD_FILL).max(MIN_SHARDS)
        } else {
            1
        };
        // Shard capacities add up to max_entries exactly.
        let shards: Box<[Mutex<Shard>]> = (0..shards)
            .map(|i| {
                let capacity = max_entries / shards + u64::from(i < max_entries % shards);
                Mutex::new(Shard {
                    map: HashMap::new(),
                    order: VecDeque::new(),
                    next_seq: 0,
                    capacity: usize::try_from(capacity).unwrap_or(usize::MAX),
                })
            })
            .collect();
        MemoryStore {
            shards,
            hasher: RandomState::new(),
            epoch: Instant::now(),
            ttl_ms: millis(ttl),
            in_flight_ms: millis(in_flight),
            metrics,
        }
    }

    fn now_ms(&self) -> u64 {
        millis(self.epoch.elapsed())
    }

    /// The id's shard, chosen by a keyed hash: ids are the sender's choice, and must not be able
    /// to crowd one shard.
    fn shard(&self, id: &RequestId) -> MutexGuard<'_, Shard> {
        let index = (self.hasher.hash_one(id) % self.shards.len() as u64) as usize;
        // A panic under the lock leaves a consistent map (no code between two writes panics).
        self.shards[index]
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn count_evictions(&self, evicted: u64) {
        if evicted > 0 {
            self.metrics
                .dedup
                .get_or_create(&OutcomeLabel { outcome: "evicted" })
                .inc_by(evicted);
        }
    }

    /// Atomically records an in-flight claim unless an unexpired entry exists, and reports it. An
    /// uncertain entry of the same request is replaced by the claim (`Claim::AfterUncertain`).
    pub fn claim(&self, id: RequestId, fingerprint: Fingerprint) -> Claim {
        let now = self.now_ms();
        let mut shard = self.shard(&id);
        shard.sweep(now);
        if let Some(slot) = shard.map.get_mut(&id) {
            if slot.expires_ms > now {
                let claim = Claim::from_existing(Some(slot.entry()), fingerprint);
                if claim == Claim::AfterUncertain {
                    slot.status = IN_FLIGHT;
                    slot.expires_ms = now.saturating_add(self.in_flight_ms);
                }
                return claim;
            }
            shard.map.remove(&id);
        }
        let evicted = shard.insert(
            id,
            Entry::InFlight { fingerprint },
            now.saturating_add(self.in_flight_ms),
            now,
        );
        drop(shard);
        self.count_evictions(evicted);
        Claim::First
    }

    /// Records the answer, keeping the claim's place in the eviction order (or as a new entry
    /// if the claim was evicted meanwhile: the retry must still be recognised).
    pub fn complete(&self, id: RequestId, entry: Entry) {
        let now = self.now_ms();
        let expires = now.saturating_add(match entry {
            Entry::InFlight { .. } => self.in_flight_ms,
            Entry::Done { .. } | Entry::Uncertain { .. } => self.ttl_ms,
        });
        let mut shard = self.shard(&id);
        let evicted = match shard.map.get_mut(&id) {
            Some(slot) => {
                *slot = Slot::new(entry, expires, slot.seq);
                0
            }
            None => shard.insert(id, entry, expires, now),
        };
        drop(shard);
        self.count_evictions(evicted);
    }

    /// Forgets the id.
    pub fn release(&self, id: RequestId) {
        let mut shard = self.shard(&id);
        shard.map.remove(&id);
        shard.compact();
    }

    /// Entries held, expired ones not yet dropped included (for benchmarks and tests).
    pub fn entry_count(&self) -> u64 {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(PoisonError::into_inner).map.len() as u64)
            .sum()
    }

    /// How many shards the store has (for tests).
    pub fn shard_count(&self) -> usize {
        self.shards.len()
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
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

    fn done(fingerprint: Fingerprint, status: u16) -> Entry {
        Entry::Done {
            fingerprint,
            status,
            reference: None,
            replay: None,
        }
    }

    fn evictions(metrics: &Metrics) -> u64 {
        metrics
            .dedup
            .get_or_create(&OutcomeLabel { outcome: "evicted" })
            .get()
    }

    #[test]
    fn a_slot_is_56_bytes() {
        assert_eq!(std::mem::size_of::<Slot>(), 56);
        assert_eq!(std::mem::size_of::<RequestId>(), 16);
    }

    #[test]
    fn first_claim_wins_and_the_second_sees_in_flight() {
        let s = store(100);
        let fp = Fingerprint([1; 32]);
        assert_eq!(s.claim(id(1), fp), Claim::First);
        assert_eq!(
            s.claim(id(1), fp),
            Claim::Seen(Entry::InFlight { fingerprint: fp })
        );
        assert_eq!(s.claim(id(1), Fingerprint([2; 32])), Claim::Conflict);
    }

    #[test]
    fn an_uncertain_entry_lets_exactly_one_retry_through_marked() {
        let s = store(100);
        let fp = Fingerprint([1; 32]);
        assert_eq!(s.claim(id(1), fp), Claim::First);
        s.complete(id(1), Entry::Uncertain { fingerprint: fp });
        assert_eq!(s.claim(id(1), Fingerprint([2; 32])), Claim::Conflict);
        assert_eq!(s.claim(id(1), fp), Claim::AfterUncertain);
        assert_eq!(
            s.claim(id(1), fp),
            Claim::Seen(Entry::InFlight { fingerprint: fp }),
            "the marked retry holds the claim: a concurrent one gets 425"
        );
    }

    #[test]
    fn completed_entries_are_seen_done_and_released_ones_forgotten() {
        let s = store(100);
        let fp = Fingerprint([1; 32]);
        s.claim(id(1), fp);
        let done = Entry::Done {
            fingerprint: fp,
            status: 201,
            reference: Some("ID-1".into()),
            replay: Some(Box::new(Replay {
                too_large: false,
                content_type: Some("application/fhir+json".into()),
                body: b"{}".to_vec(),
            })),
        };
        s.complete(id(1), done.clone());
        assert_eq!(s.claim(id(1), fp), Claim::Seen(done));
        s.claim(id(2), fp);
        s.release(id(2));
        assert_eq!(s.claim(id(2), fp), Claim::First);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_claims_of_one_id_have_exactly_one_winner() {
        let s = Arc::new(store(100_000));
        assert!(s.shard_count() > 1);
        let fp = Fingerprint([3; 32]);
        let tasks: Vec<_> = (0..100)
            .map(|_| {
                let s = s.clone();
                tokio::spawn(async move { s.claim(id(9), fp) })
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

    #[test]
    fn a_full_store_still_remembers_the_request_it_just_recorded() {
        let s = store(100);
        let fp = Fingerprint([4; 32]);
        let mut forgotten = Vec::new();
        for n in 0..1000 {
            s.claim(id(n), fp);
            s.complete(id(n), done(fp, 200));
            if s.claim(id(n), fp) == Claim::First {
                forgotten.push(n);
            }
        }
        assert!(forgotten.is_empty(), "forgotten at once: {forgotten:?}");
    }

    #[test]
    fn a_full_store_forgets_its_oldest_claims_first() {
        let (s, metrics) = store_with_metrics(100);
        let fp = Fingerprint([5; 32]);
        for n in 0..150 {
            s.claim(id(n), fp);
            s.complete(id(n), done(fp, 200));
        }
        assert_eq!(s.entry_count(), 100);
        assert_eq!(evictions(&metrics), 50);
        // Looking the survivors up first: a lookup claims nothing and evicts nothing.
        for n in 50..150 {
            assert_eq!(s.claim(id(n), fp), Claim::Seen(done(fp, 200)), "{n}");
        }
        for n in 0..50 {
            assert_eq!(s.claim(id(n), fp), Claim::First, "{n}");
        }
    }

    #[test]
    fn the_store_stays_within_max_entries_and_counts_evictions() {
        for max in [1_000, 100_000] {
            let (s, metrics) = store_with_metrics(max);
            let total = max as u128 * 5;
            for n in 0..total {
                s.claim(id(n), Fingerprint([0; 32]));
            }
            assert_eq!(s.entry_count(), max, "shards: {}", s.shard_count());
            // Ids land on shards by hash, so a shard fills a little before the store does.
            let evicted = evictions(&metrics);
            let least = (total - u128::from(max)) as u64;
            assert!(
                (least..least + max / 10).contains(&evicted),
                "evictions counted: {evicted}"
            );
        }
    }

    #[test]
    fn a_million_entry_store_has_shards_that_fit_their_tables() {
        let s = store(1_000_000);
        assert_eq!(s.shard_count(), 18);
        let capacities: Vec<usize> = s
            .shards
            .iter()
            .map(|sh| sh.lock().unwrap().capacity)
            .collect();
        assert_eq!(capacities.iter().sum::<usize>(), 1_000_000);
        assert!(capacities.iter().all(|&c| c as u64 <= SHARD_FILL));
    }

    #[test]
    fn released_claims_do_not_grow_the_queue_without_bound() {
        let s = store(100);
        let fp = Fingerprint([6; 32]);
        for n in 0..100_000 {
            s.claim(id(n % 7), fp);
            s.release(id(n % 7));
        }
        let shard = s.shards[0].lock().unwrap();
        assert!(shard.map.is_empty());
        assert!(
            shard.order.len() <= QUEUE_SLACK + 1,
            "{}",
            shard.order.len()
        );
    }

    #[test]
    fn a_released_and_reclaimed_id_is_evicted_by_its_new_claim_not_its_old_one() {
        let s = store(3);
        let fp = Fingerprint([7; 32]);
        s.claim(id(1), fp);
        s.release(id(1));
        s.claim(id(2), fp);
        s.claim(id(1), fp); // claimed again: now the newest
        s.claim(id(3), fp);
        s.claim(id(4), fp); // full: the oldest live claim (2) goes, not 1's stale record
        assert_eq!(
            s.claim(id(1), fp),
            Claim::Seen(Entry::InFlight { fingerprint: fp })
        );
        assert_eq!(s.claim(id(2), fp), Claim::First);
    }

    #[tokio::test(start_paused = true)]
    async fn in_flight_claims_expire_before_done_entries() {
        let s = store(100);
        let fp = Fingerprint([8; 32]);
        s.claim(id(1), fp); // in flight: 30 s
        s.claim(id(2), fp);
        s.complete(id(2), done(fp, 201)); // done: 3600 s
        tokio::time::advance(Duration::from_secs(31)).await;
        assert_eq!(s.claim(id(1), fp), Claim::First, "in-flight claim expired");
        assert_eq!(s.claim(id(2), fp), Claim::Seen(done(fp, 201)));
        tokio::time::advance(Duration::from_secs(3600)).await;
        assert_eq!(s.claim(id(2), fp), Claim::First, "done entry expired");
    }

    #[tokio::test(start_paused = true)]
    async fn expired_entries_are_swept_as_claims_come_in() {
        let s = store(1000);
        let fp = Fingerprint([9; 32]);
        for n in 0..10 {
            s.claim(id(n), fp);
        }
        tokio::time::advance(Duration::from_secs(31)).await;
        s.claim(id(100), fp);
        assert_eq!(s.entry_count(), 1);
    }
}

//! Memory of the in-process dedup store: inserts N request ids (default 1,000,000, the default
//! `dedup.max_entries`) into `MemoryStore` the way the gateway does (claim in flight, then
//! complete as done with the upstream's status) and reports the process's RSS growth and bytes
//! per entry. RSS (from /proc/self/status) includes the allocator's overhead and fragmentation,
//! which is what an operator's memory limit sees.
//!
//! Usage: `dedup_memory [N] [--reference] [--variant store|hashmap-fifo]`;
//! `--reference` stores a 36-byte Location id with each entry (receivers that answer with
//! `Location`). `hashmap-fifo` is a yardstick, not the gateway's store: one plain
//! `HashMap<RequestId, (Entry, u32)>` plus an insertion-order queue, unsharded and without
//! expiry, with the same entries.
//! Run by `benches/run.sh`, or `cargo bench --bench dedup_memory`.

mod common;

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bars_gateway::bars::ids::RequestId;
use bars_gateway::dedup::memory::MemoryStore;
use bars_gateway::dedup::{Claim, Entry, Fingerprint};
use bars_gateway::metrics::Metrics;

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    let entries = args
        .iter()
        .find_map(|a| a.parse::<u64>().ok())
        .unwrap_or(1_000_000);
    let with_reference = args.iter().any(|a| a == "--reference");
    let variant = args
        .iter()
        .position(|a| a == "--variant")
        .and_then(|i| args.get(i + 1))
        .map(String::as_str)
        .unwrap_or("store")
        .to_owned();
    measure(entries, with_reference, &variant);
}

/// The n-th distinct request: its id and fingerprint, as unique requests have.
fn nth(n: u64) -> (RequestId, Fingerprint) {
    let id = RequestId(uuid::Uuid::from_u128(
        0x4000_8000_0000_0000_0000_0000_0000_0000 | u128::from(n),
    ));
    let mut fp = [0u8; 32];
    fp[..8].copy_from_slice(&n.to_le_bytes());
    fp[8..16].copy_from_slice(&n.wrapping_mul(0x9e37_79b9_7f4a_7c15).to_le_bytes());
    (id, Fingerprint(fp))
}

fn done(id: RequestId, fingerprint: Fingerprint, with_reference: bool) -> Entry {
    Entry::Done {
        fingerprint,
        status: 200,
        reference: with_reference.then(|| id.to_string().into_boxed_str()),
        replay: None,
    }
}

fn measure(entries: u64, with_reference: bool, variant: &str) {
    let ttl = Duration::from_secs(24 * 3600);
    let before_kb = common::self_rss_kb();
    let started = Instant::now();
    let mut firsts = 0u64;
    let held;
    // Each arm keeps its store alive until RSS is read.
    let _keep: Box<dyn std::any::Any> = match variant {
        "store" => {
            let (metrics, _registry) = Metrics::new();
            let store = MemoryStore::new(entries, ttl, Duration::from_secs(40), Arc::new(metrics));
            for n in 0..entries {
                let (id, fingerprint) = nth(n);
                if store.claim(id, fingerprint) == Claim::First {
                    firsts += 1;
                }
                store.complete(id, done(id, fingerprint, with_reference));
            }
            held = store.entry_count();
            Box::new(store)
        }
        "hashmap-fifo" => {
            let mut map: HashMap<RequestId, (Entry, u32)> = HashMap::new();
            let mut order: VecDeque<RequestId> = VecDeque::new();
            let epoch = Instant::now();
            for n in 0..entries {
                let (id, fingerprint) = nth(n);
                let now = epoch.elapsed().as_secs() as u32;
                if !map.contains_key(&id) {
                    if order.len() as u64 >= entries {
                        if let Some(oldest) = order.pop_front() {
                            map.remove(&oldest);
                        }
                    }
                    map.insert(id, (Entry::InFlight { fingerprint }, now));
                    order.push_back(id);
                    firsts += 1;
                }
                map.insert(id, (done(id, fingerprint, with_reference), now));
            }
            held = map.len() as u64;
            Box::new((map, order))
        }
        other => {
            eprintln!("dedup_memory: unknown variant {other:?} (store, hashmap-fifo)");
            std::process::exit(2);
        }
    };
    let elapsed = started.elapsed().as_secs_f64();
    let after_kb = common::self_rss_kb();
    let grown = after_kb.saturating_sub(before_kb) * 1024;
    println!(
        "RESULT dedup_memory variant={variant} entry_size={} entries={entries} reference={with_reference} first_claims={firsts} held={held} seconds={elapsed:.1} ops_per_s={:.0} rss_before_mb={:.1} rss_after_mb={:.1} growth_mb={:.1} bytes_per_entry={:.0}",
        std::mem::size_of::<Entry>(),
        entries as f64 / elapsed,
        before_kb as f64 / 1024.0,
        after_kb as f64 / 1024.0,
        grown as f64 / (1024.0 * 1024.0),
        grown as f64 / held.max(1) as f64,
    );
}

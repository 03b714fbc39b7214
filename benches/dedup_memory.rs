//! Memory of the in-process dedup store: inserts N request ids (default 1,000,000, the default
//! `dedup.max_entries`) into `MemoryStore` the way the gateway does (claim in flight, then
//! complete as done with the upstream's status) and reports the process's RSS growth and bytes
//! per entry. RSS (from /proc/self/status) includes the allocator's overhead and fragmentation,
//! which is what an operator's memory limit sees.
//!
//! Usage: `dedup_memory [N] [--reference]`; `--reference` stores a 36-byte Location id with each
//! entry (receivers that answer with `Location`). Run by `benches/run.sh`, or `cargo bench --bench
//! dedup_memory`.

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
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("dedup_memory: cannot start the runtime: {e}");
            std::process::exit(1);
        }
    };
    runtime.block_on(measure(entries, with_reference));
}

async fn measure(entries: u64, with_reference: bool) {
    let (metrics, _registry) = Metrics::new();
    let before_kb = rss_kb();
    let store = MemoryStore::new(
        entries,
        Duration::from_secs(24 * 3600),
        Duration::from_secs(40),
        Arc::new(metrics),
    );
    let started = Instant::now();
    let mut firsts = 0u64;
    for n in 0..entries {
        // Distinct ids and fingerprints, as unique requests have.
        let id = RequestId(uuid::Uuid::from_u128(
            0x4000_8000_0000_0000_0000_0000_0000_0000 | u128::from(n),
        ));
        let mut fp = [0u8; 32];
        fp[..8].copy_from_slice(&n.to_le_bytes());
        fp[8..16].copy_from_slice(&n.wrapping_mul(0x9e37_79b9_7f4a_7c15).to_le_bytes());
        let fingerprint = Fingerprint(fp);
        if store.claim(id, fingerprint).await == Claim::First {
            firsts += 1;
        }
        let reference = with_reference.then(|| id.to_string().into_boxed_str());
        store
            .complete(
                id,
                Entry::Done {
                    fingerprint,
                    status: 200,
                    reference,
                    replay: None,
                },
            )
            .await;
    }
    let held = store.entry_count().await;
    let elapsed = started.elapsed().as_secs_f64();
    let after_kb = rss_kb();
    let grown = after_kb.saturating_sub(before_kb) * 1024;
    println!(
        "RESULT dedup_memory entries={entries} reference={with_reference} first_claims={firsts} held={held} seconds={elapsed:.1} ops_per_s={:.0} rss_before_mb={:.1} rss_after_mb={:.1} growth_mb={:.1} bytes_per_entry={:.0}",
        entries as f64 / elapsed,
        before_kb as f64 / 1024.0,
        after_kb as f64 / 1024.0,
        grown as f64 / (1024.0 * 1024.0),
        grown as f64 / held.max(1) as f64,
    );
}

/// VmRSS of this process, kB.
fn rss_kb() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse().ok())
        })
        .unwrap_or(0)
}

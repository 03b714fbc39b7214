//! The connection threads (src/shards.rs): one per core, named `bars-shard-N`, serving the
//! public connections; they end when the gateway stops.

mod common;

use std::time::Duration;

use common::*;

/// Names of this process's threads that serve gateway connections.
fn shard_threads() -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir("/proc/self/task")
        .expect("/proc/self/task")
        .filter_map(|task| std::fs::read_to_string(task.ok()?.path().join("comm")).ok())
        .map(|name| name.trim().to_string())
        .filter(|name| name.starts_with("bars-shard-"))
        .collect();
    names.sort();
    names
}

#[tokio::test]
async fn connections_are_served_on_one_named_thread_per_core_which_end_with_the_gateway() {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let before = shard_threads().len();
    let rig = Rig::start().await;
    let mine = shard_threads().len() - before;
    assert_eq!(mine, cores, "one connection thread per core");
    // Requests on several connections are served (each connection lands on some shard).
    for _ in 0..cores + 1 {
        let reply = rig.send(metadata()).await;
        assert_eq!(reply.status, 200);
    }
    assert_eq!(rig.upstream.count(), cores + 1);
    rig.gateway.stop().await;
    // The threads end once stopped; thread exit has no signal to wait on, so poll, bounded.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while shard_threads().len() > before && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        shard_threads().len(),
        before,
        "the connection threads end with the gateway"
    );
}

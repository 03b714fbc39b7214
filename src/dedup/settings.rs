//! `[dedup]` settings: the store, how long ids are remembered, which methods, the store failure
//! policy. Read from TOML by `config.rs`.

use std::time::Duration;

use serde::Deserialize;

/// Which dedup store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DedupBackend {
    /// In-process bounded store (one replica; lost on restart).
    Memory,
    /// Shared Redis (several replicas behave as one; survives restarts).
    Redis {
        /// `redis://host:port/db` or `unix:///path/to/socket`.
        url: String,
    },
}

/// What to do when the dedup store cannot be consulted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnStoreError {
    /// 503 REC_SERVICE_UNAVAILABLE: the sender retries later (no risk of double delivery).
    Reject,
    /// Forward without dedup, logging loudly (availability over exactly-once).
    Allow,
}

/// `[dedup]`: retry deduplication by X-Request-Id (DESIGN.md §5).
#[derive(Debug, Clone, PartialEq)]
pub struct DedupSettings {
    /// The store.
    pub backend: DedupBackend,
    /// How long a processed request id is remembered.
    pub ttl: Duration,
    /// Memory store: most entries kept (older are evicted first).
    pub max_entries: u64,
    /// Methods deduplicated.
    pub methods: Vec<http::Method>,
    /// Store failure policy.
    pub on_store_error: OnStoreError,
    /// Largest answer body kept to replay a deterministic 4xx (and to find a 2xx's reference).
    pub max_replay_bytes: usize,
}

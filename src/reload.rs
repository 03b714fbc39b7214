//! Hot reload of TLS material and the admission lists, with zero dropped connections.
//!
//! One mechanism, three triggers: SIGHUP reloads at once; a change to any watched file (the
//! config file and every TLS file, seen through inotify on their directories, so atomic renames
//! and Kubernetes secret symlink swaps are noticed) and the `tls.reload_interval` poll reload when
//! the files' content hash changed. A reload re-reads the config file, builds a complete new
//! `ServerConfig` and admission policy off the hot path, validates them exactly as `check` does,
//! and swaps them in atomically: handshakes after the swap use them, established connections keep
//! theirs. If anything fails the old state stays in service.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sha2::{Digest, Sha256};
use tokio::sync::watch;

use crate::admission::{AdmissionPolicy, IpAllowlist};
use crate::config::{self, Settings};
use crate::gateway::{LiveState, Shared};
use crate::metrics::ResultLabel;
use crate::tls;

/// File events are collected for this long before the files are looked at: an operator (or
/// Kubernetes) replacing a certificate and its key produces several events in a burst.
pub const DEBOUNCE: Duration = Duration::from_millis(300);

/// What a successful reload did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReloadReport {
    /// Config keys that changed but only take effect after a restart.
    pub restart_required: Vec<&'static str>,
}

/// An active watch on the TLS and config files' directories.
pub struct FileWatch {
    _watcher: Option<notify::RecommendedWatcher>,
    events: tokio::sync::mpsc::UnboundedReceiver<()>,
}

/// Why a reload failed (the old state stays in service).
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    /// The config file is invalid.
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    /// TLS material is missing or invalid.
    #[error(transparent)]
    Tls(#[from] tls::material::MaterialError),
    /// The loading task died.
    #[error("reload task failed: {0}")]
    Task(String),
}

/// Reloads a running gateway's TLS material and admission lists.
pub struct Reloader {
    shared: Arc<Shared>,
    settings: Mutex<Settings>,
    /// Serialises reloads (SIGHUP, file events and polling may coincide).
    running: tokio::sync::Mutex<()>,
    /// Hash of the watched files' content at the last reload attempt.
    last_hash: Mutex<[u8; 32]>,
    /// Counts reloads, for whoever wants to wait for one (tests, operators' tooling).
    counts: watch::Sender<ReloadCounts>,
}

/// How many reloads succeeded and failed since start.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReloadCounts {
    /// Successful reloads.
    pub succeeded: u64,
    /// Failed reloads (the old state stayed in service).
    pub failed: u64,
}

/// The admission policy for a set of settings.
pub fn admission_policy(settings: &Settings) -> AdmissionPolicy {
    AdmissionPolicy {
        allowed_ips: IpAllowlist::new(settings.client.allowed_ips.clone()),
        trusted_proxies: IpAllowlist::new(settings.listen.trusted_proxies.clone()),
        proxy_header_timeout: settings.listen.header_read_timeout,
    }
}

/// Every file whose change triggers a reload: the config file and the TLS files.
pub fn watched_files(settings: &Settings) -> Vec<PathBuf> {
    let mut files = vec![settings.source.clone()];
    files.extend(tls::material::watched_files(&settings.tls));
    files
}

/// SHA-256 over the watched files' names and contents (a missing file hashes as missing).
pub fn content_hash(files: &[PathBuf]) -> [u8; 32] {
    let mut h = Sha256::new();
    for f in files {
        h.update(f.as_os_str().as_encoded_bytes());
        h.update([0]);
        match std::fs::read(f) {
            Ok(bytes) => {
                h.update((bytes.len() as u64).to_be_bytes());
                h.update(&bytes);
            }
            Err(_) => h.update(b"(missing)"),
        }
    }
    h.finalize().into()
}

/// The keys whose change needs a restart, comparing the settings in force with new ones.
fn restart_required(old: &Settings, new: &Settings) -> Vec<&'static str> {
    let mut keys = Vec::new();
    let differ =
        |a: &dyn std::fmt::Debug, b: &dyn std::fmt::Debug| format!("{a:?}") != format!("{b:?}");
    let l = (&old.listen, &new.listen);
    if l.0.address != l.1.address {
        keys.push("listen.address");
    }
    if l.0.header_read_timeout != l.1.header_read_timeout
        || l.0.idle_timeout != l.1.idle_timeout
        || l.0.max_connections != l.1.max_connections
        || l.0.max_header_bytes != l.1.max_header_bytes
        || l.0.shutdown_grace != l.1.shutdown_grace
    {
        keys.push("listen (limits)");
    }
    if differ(&old.upstream, &new.upstream) {
        keys.push("upstream");
    }
    if differ(&old.bars, &new.bars) {
        keys.push("bars");
    }
    if differ(&old.dedup, &new.dedup) {
        keys.push("dedup");
    }
    if differ(&old.admin, &new.admin) {
        keys.push("admin");
    }
    if differ(&old.log, &new.log) {
        keys.push("log");
    }
    keys
}

impl Reloader {
    /// A reloader for a gateway started with `settings`.
    pub fn new(shared: Arc<Shared>, settings: Settings) -> Reloader {
        let hash = content_hash(&watched_files(&settings));
        Reloader {
            shared,
            settings: Mutex::new(settings),
            running: tokio::sync::Mutex::new(()),
            last_hash: Mutex::new(hash),
            counts: watch::channel(ReloadCounts::default()).0,
        }
    }

    /// A receiver of the reload counts, changed after every reload attempt.
    pub fn subscribe(&self) -> watch::Receiver<ReloadCounts> {
        self.counts.subscribe()
    }

    fn current(&self) -> Settings {
        // A poisoned lock means a panic while holding it; the settings inside are still whole.
        self.settings
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Reloads now: re-reads the config file and every TLS file, validates, swaps.
    pub async fn reload(&self) -> Result<ReloadReport, ReloadError> {
        let _one_at_a_time = self.running.lock().await;
        let old = self.current();
        let files = watched_files(&old);
        let path = old.source.clone();
        let loaded = tokio::task::spawn_blocking(move || {
            let hash = content_hash(&files);
            let result = config::load(&path)
                .map_err(ReloadError::from)
                .and_then(|new| {
                    let tls = tls::load(&new.tls, &new.client)?;
                    Ok((new, tls))
                });
            (hash, result)
        })
        .await
        .map_err(|e| ReloadError::Task(e.to_string()));
        let (hash, result) = match loaded {
            Ok(pair) => pair,
            Err(e) => (
                *self.last_hash.lock().unwrap_or_else(|e| e.into_inner()),
                Err(e),
            ),
        };
        *self.last_hash.lock().unwrap_or_else(|e| e.into_inner()) = hash;
        let metrics = &self.shared.metrics;
        match result {
            Ok((new, tls)) => {
                let report = ReloadReport {
                    restart_required: restart_required(&old, &new),
                };
                metrics.record_certificates(&tls);
                metrics.record_reload(true);
                self.shared.live.store(Arc::new(LiveState {
                    tls,
                    admission: admission_policy(&new),
                }));
                metrics
                    .reloads
                    .get_or_create(&ResultLabel { result: "success" })
                    .inc();
                if !report.restart_required.is_empty() {
                    tracing::warn!(
                        keys = ?report.restart_required,
                        "the config file changed settings that only take effect after a restart"
                    );
                }
                // Keep the restart-only settings in force as they were; take the reloadable ones.
                {
                    let mut current = self.settings.lock().unwrap_or_else(|e| e.into_inner());
                    current.tls = new.tls;
                    current.client = new.client;
                    current.listen.trusted_proxies = new.listen.trusted_proxies;
                }
                self.counts.send_modify(|c| c.succeeded += 1);
                tracing::info!("TLS material and admission lists reloaded");
                Ok(report)
            }
            Err(e) => {
                metrics.record_reload(false);
                metrics
                    .reloads
                    .get_or_create(&ResultLabel { result: "failure" })
                    .inc();
                tracing::error!(error = %e, "reload failed; the previous TLS material and lists stay in service");
                self.counts.send_modify(|c| c.failed += 1);
                Err(e)
            }
        }
    }

    /// Reloads if the watched files' content changed since the last attempt.
    pub async fn reload_if_changed(&self) -> Option<Result<ReloadReport, ReloadError>> {
        let files = watched_files(&self.current());
        let hash = tokio::task::spawn_blocking(move || content_hash(&files))
            .await
            .ok()?;
        if hash == *self.last_hash.lock().unwrap_or_else(|e| e.into_inner()) {
            return None;
        }
        Some(self.reload().await)
    }

    /// Starts watching the files' directories now (at bind, so that no change made after the
    /// gateway is bound can be missed); [`Reloader::watch`] then acts on the events.
    pub fn start_watching(&self) -> FileWatch {
        let (tx, events) = tokio::sync::mpsc::unbounded_channel::<()>();
        FileWatch {
            _watcher: self.start_file_watcher(tx),
            events,
        }
    }

    /// Acts on file events and polls every `tls.reload_interval`, reloading on change, until
    /// `shutdown` turns true.
    pub async fn watch(self: Arc<Self>, files: FileWatch, mut shutdown: watch::Receiver<bool>) {
        let FileWatch {
            _watcher,
            events: mut rx,
        } = files;
        let interval = self.current().tls.reload_interval;
        let mut poll = tokio::time::interval(interval);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        poll.tick().await; // the first tick is immediate
        loop {
            tokio::select! {
                _ = poll.tick() => {}
                Some(()) = rx.recv() => {
                    // Debounce: let the burst of events finish, then look once.
                    tokio::time::sleep(DEBOUNCE).await;
                    while rx.try_recv().is_ok() {}
                }
                _ = crate::drained(&mut shutdown) => return,
            }
            let _ = self.reload_if_changed().await;
        }
    }

    fn start_file_watcher(
        &self,
        tx: tokio::sync::mpsc::UnboundedSender<()>,
    ) -> Option<notify::RecommendedWatcher> {
        use notify::Watcher;
        let mut watcher = match notify::recommended_watcher(
            move |event: notify::Result<notify::Event>| {
                if event.is_ok() {
                    let _ = tx.send(());
                }
            },
        ) {
            Ok(w) => w,
            Err(e) => {
                tracing::warn!(error = %e, "file watching unavailable; relying on tls.reload_interval polling");
                return None;
            }
        };
        let mut dirs: Vec<PathBuf> = watched_files(&self.current())
            .iter()
            .filter_map(|f| f.parent().map(Path::to_path_buf))
            .collect();
        dirs.sort();
        dirs.dedup();
        for dir in dirs {
            // The directory, not the file: a rename into place replaces the file's inode.
            if let Err(e) = watcher.watch(&dir, notify::RecursiveMode::NonRecursive) {
                tracing::warn!(dir = %dir.display(), error = %e, "cannot watch directory; relying on polling for it");
            }
        }
        Some(watcher)
    }
}

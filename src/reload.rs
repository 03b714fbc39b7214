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

use arc_swap::ArcSwap;

use crate::config::{self, Settings};
use crate::live::LiveState;
use crate::metrics::{Metrics, ResultLabel};
use crate::tls::{self, LoadedTls};

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

/// How the reloader builds the state it swaps in, from new settings and their TLS material.
pub type BuildLive = fn(&Settings, LoadedTls) -> LiveState;

/// Reloads a running gateway's TLS material and admission lists.
pub struct Reloader {
    /// The swappable state, shared with the connections that read it.
    live: Arc<ArcSwap<LiveState>>,
    build: BuildLive,
    metrics: Arc<Metrics>,
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
    if old.upstream != new.upstream {
        keys.push("upstream");
    }
    if old.bars != new.bars {
        keys.push("bars");
    }
    if old.dedup != new.dedup {
        keys.push("dedup");
    }
    if old.admin != new.admin {
        keys.push("admin");
    }
    if old.log != new.log {
        keys.push("log");
    }
    if old.egress != new.egress {
        keys.push("egress");
    }
    keys
}

impl Reloader {
    /// A reloader for a gateway started with `settings`: it swaps `live` for what `build` makes
    /// of each valid new config, and counts reloads in `metrics`.
    pub fn new(
        live: Arc<ArcSwap<LiveState>>,
        build: BuildLive,
        metrics: Arc<Metrics>,
        settings: Settings,
    ) -> Reloader {
        let hash = content_hash(&watched_files(&settings));
        Reloader {
            live,
            build,
            metrics,
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
        let metrics = &self.metrics;
        match result {
            Ok((new, tls)) => {
                let report = ReloadReport {
                    restart_required: restart_required(&old, &new),
                };
                metrics.record_certificates(&tls);
                metrics.record_reload(true);
                self.live.store(Arc::new((self.build)(&new, tls)));
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

#[cfg(test)]
mod tests {
    use super::restart_required;
    use crate::config::tests::MINIMAL;
    use crate::config::{parse, Settings};
    use std::path::Path;
    use std::time::Duration;

    fn settings() -> Settings {
        parse(MINIMAL, Path::new("/etc/gw/config.toml")).expect("valid config")
    }

    #[test]
    fn reloadable_changes_need_no_restart() {
        let old = settings();
        let mut new = old.clone();
        new.client.allowed_ips = vec!["10.0.0.1/32".parse().unwrap()];
        new.listen.trusted_proxies = vec!["10.0.0.2/32".parse().unwrap()];
        new.tls.reload_interval = Duration::from_secs(7);
        assert_eq!(restart_required(&old, &new), Vec::<&str>::new());
    }

    #[test]
    fn each_restart_only_section_is_named() {
        let old = settings();
        let mut new = old.clone();
        new.listen.max_connections += 1;
        new.upstream.request_timeout += Duration::from_secs(1);
        new.bars.require_identity_headers = !new.bars.require_identity_headers;
        new.dedup.ttl += Duration::from_secs(1);
        new.admin.address = Some("127.0.0.1:9999".parse().unwrap());
        new.log.audit = !new.log.audit;
        assert_eq!(
            restart_required(&old, &new),
            [
                "listen (limits)",
                "upstream",
                "bars",
                "dedup",
                "admin",
                "log"
            ]
        );
        let mut moved = old.clone();
        moved.listen.address = "127.0.0.1:1".parse().unwrap();
        assert_eq!(restart_required(&old, &moved), ["listen.address"]);
    }

    #[test]
    fn an_egress_change_needs_a_restart() {
        let without = settings();
        let sandbox = format!("{MINIMAL}\n[egress]\nenvironment = \"sandbox\"\n");
        let with = parse(&sandbox, Path::new("/etc/gw/config.toml")).expect("valid config");
        assert_eq!(restart_required(&without, &with), ["egress"]);
        assert_eq!(restart_required(&with, &without), ["egress"]);
        assert_eq!(restart_required(&with, &with.clone()), Vec::<&str>::new());
        let mut retried = with.clone();
        retried.egress.as_mut().unwrap().retry.max_attempts += 1;
        assert_eq!(restart_required(&with, &retried), ["egress"]);
    }
}

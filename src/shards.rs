//! One single-threaded runtime per core for the public connections, the nginx model.
//!
//! On Tokio's work-stealing runtime a request, the task of its pooled upstream connection and its
//! response wake one another across cores, and each wake-up of a parked worker is a futex call.
//! Here every admitted connection is handed, once, to the least loaded *shard*: a thread running a
//! current-thread runtime with its own upstream connection pool, where the connection's TLS, HTTP,
//! checks, upstream exchange and dedup task then all run. The accept loop, the admin listener,
//! the reloader and egress stay on the main runtime; the shards share everything else (live TLS
//! state, dedup store, metrics) through `Arc`s.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::net::TcpStream;
use tokio::sync::watch;

use crate::gateway::{self, Shared};

/// The shards; dropping it stops their threads (connections still open on them are dropped).
pub(crate) struct Shards {
    shards: Vec<Shard>,
    stop: watch::Sender<bool>,
}

struct Shard {
    runtime: tokio::runtime::Handle,
    shared: Arc<Shared>,
    /// Connections this shard is serving, to pick the least loaded.
    open: Arc<AtomicUsize>,
}

/// How many shards to run: one per core the process may use.
pub(crate) fn default_count() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

impl Shards {
    /// Starts `count` shard threads; `shared_for(i)` gives shard `i` its state (its own upstream
    /// pool, the rest shared).
    pub(crate) fn start(
        count: usize,
        mut shared_for: impl FnMut(usize) -> Arc<Shared>,
    ) -> std::io::Result<Shards> {
        let (stop, stopped) = watch::channel(false);
        let mut shards = Vec::with_capacity(count.max(1));
        for i in 0..count.max(1) {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let handle = runtime.handle().clone();
            let mut stopped = stopped.clone();
            std::thread::Builder::new()
                .name(format!("bars-shard-{i}"))
                .spawn(move || {
                    // Spawned tasks run while this thread drives the runtime.
                    runtime.block_on(async move {
                        let _ = stopped.wait_for(|stop| *stop).await;
                    });
                })?;
            shards.push(Shard {
                runtime: handle,
                shared: shared_for(i),
                open: Arc::new(AtomicUsize::new(0)),
            });
        }
        Ok(Shards { shards, stop })
    }

    /// Serves `stream` on the least loaded shard. `done` runs there when the connection ends.
    pub(crate) fn serve(
        &self,
        stream: TcpStream,
        peer: SocketAddr,
        drain: watch::Receiver<bool>,
        done: impl FnOnce() + Send + 'static,
    ) {
        let Some(shard) = self
            .shards
            .iter()
            .min_by_key(|s| s.open.load(Ordering::Relaxed))
        else {
            return;
        };
        // A socket belongs to the reactor that registered it: move it to the shard's.
        let stream = match stream.into_std() {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(peer = %peer, error = %e, "cannot hand the connection to a shard");
                done();
                return;
            }
        };
        let shared = shard.shared.clone();
        let open = shard.open.clone();
        open.fetch_add(1, Ordering::Relaxed);
        shard.runtime.spawn(async move {
            match TcpStream::from_std(stream) {
                Ok(stream) => gateway::serve_connection(shared, stream, peer, drain).await,
                Err(e) => {
                    tracing::warn!(peer = %peer, error = %e, "cannot register the connection on its shard")
                }
            }
            open.fetch_sub(1, Ordering::Relaxed);
            done();
        });
    }
}

impl Drop for Shards {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

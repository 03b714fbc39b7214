//! The mTLS load generator of `benches/run.sh`: one client for bars-gateway and nginx alike.
//!
//! Modes:
//! - `get`: keep-alive `GET /metadata` with the full BaRS header set (every NHSD-* header of
//!   `headers-examples.json`, the ids, Accept, an Authorization token), one connection per worker;
//! - `post`: keep-alive `POST /$process-message` with a body file (the 35 KB example) and a unique
//!   X-Request-Id per request, so dedup sees only first sights;
//! - `connect`: a new TCP + TLS 1.3 connection per request (full handshake: resumption off),
//!   `GET /metadata` with `Connection: close`;
//! - `hold`: opens `--connections` TLS connections (one request each, then idle), reports the
//!   servers' RSS while they are held, then closes them;
//! - `rate`: open loop, the added latency a user feels: `GET /metadata` (full header set) at a
//!   fixed `--rate` per second over `--concurrency` keep-alive connections, each request on its
//!   schedule whatever happened to the one before; its latency counts from the time it was due,
//!   so a stall shows as the queue it builds (no coordinated omission).
//!
//! `--plain` talks HTTP/1.1 without TLS (the backend, directly: the baseline of `rate`).
//!
//! Except in `rate`, every worker keeps one request in flight (fixed concurrency). The run is bounded by a warm-up,
//! a measured window and `--max-requests`; requests completing inside the window are counted,
//! and their latencies sorted for percentiles (a sorted vector is an exact histogram). With
//! `--server-pids`, the CPU time those processes used in the window (from /proc) is reported too:
//! CPU per request is steadier than req/s on a shared machine.
//!
//! Prints one `RESULT key=value ...` line; diagnostics go to stderr. Given only cargo bench's
//! `--bench` flag (a plain `cargo bench`), it prints usage and exits.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::{Parser, ValueEnum};
use http::header::{HeaderName, HeaderValue};
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use rustls::client::Resumption;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

mod common;
use common::{cpu_seconds, rss_kb, self_cpu_seconds};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Time allowed for one connection setup or one request; past it the attempt counts as an error.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Mode {
    Get,
    Post,
    Connect,
    Hold,
    Rate,
}

/// Drives an mTLS HTTP/1.1 server (bars-gateway or nginx) at fixed concurrency.
#[derive(Debug, Parser)]
#[command(name = "loadgen")]
struct Args {
    /// Server address (TLS).
    #[arg(long)]
    addr: SocketAddr,
    /// What to send.
    #[arg(long, value_enum)]
    mode: Mode,
    /// Requests in flight (one per worker), or handshakes in flight for `hold`.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Measured window, seconds (for `hold`: the limit for opening the connections).
    #[arg(long, default_value_t = 8.0)]
    duration: f64,
    /// Warm-up before the window, seconds (not counted).
    #[arg(long, default_value_t = 1.0)]
    warmup: f64,
    /// Stop after this many requests, whatever the time.
    #[arg(long, default_value_t = 5_000_000)]
    max_requests: u64,
    /// CA that issued the server certificate (PEM).
    #[arg(long)]
    ca: PathBuf,
    /// Client certificate chain (PEM).
    #[arg(long)]
    cert: PathBuf,
    /// Client private key (PEM).
    #[arg(long)]
    key: PathBuf,
    /// `headers-examples.json` (its `valid_process_message_request.headers`).
    #[arg(long)]
    headers: PathBuf,
    /// Request body for `post`.
    #[arg(long)]
    body: Option<PathBuf>,
    /// Name printed in the result line.
    #[arg(long, default_value = "-")]
    label: String,
    /// Server processes whose CPU time (and, for `hold`, RSS) is reported.
    #[arg(long, value_delimiter = ',')]
    server_pids: Vec<u32>,
    /// `hold`: connections to open.
    #[arg(long, default_value_t = 10_000)]
    connections: usize,
    /// `hold`: seconds to keep them open once all are up.
    #[arg(long, default_value_t = 3.0)]
    hold: f64,
    /// `rate`: requests per second, spread evenly over the connections (open loop).
    #[arg(long, default_value_t = 500.0)]
    rate: f64,
    /// Plain HTTP/1.1, no TLS (the backend itself).
    #[arg(long)]
    plain: bool,
}

fn main() {
    let raw: Vec<String> = std::env::args().filter(|a| a != "--bench").collect();
    if raw.len() == 1 {
        eprintln!("loadgen: run through benches/run.sh (or see --help)");
        return;
    }
    let args = Args::parse_from(raw);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("loadgen: cannot start the runtime: {e}");
            std::process::exit(1);
        }
    };
    // A hard bound on the whole run, whatever happens to the server.
    let limit = Duration::from_secs_f64(args.warmup + args.duration + args.hold + 60.0);
    let outcome = runtime.block_on(async {
        match tokio::time::timeout(limit, run(args)).await {
            Ok(r) => r,
            Err(_) => Err("run exceeded its time limit".into()),
        }
    });
    // Held connections and stuck tasks must not delay the exit.
    runtime.shutdown_timeout(Duration::from_millis(200));
    if let Err(e) = outcome {
        eprintln!("loadgen: {e}");
        std::process::exit(1);
    }
}

/// Everything workers share.
struct Ctx {
    addr: SocketAddr,
    /// `None`: plain HTTP.
    connector: Option<TlsConnector>,
    server_name: ServerName<'static>,
    method: Method,
    path: &'static str,
    fixed_headers: Vec<(HeaderName, HeaderValue)>,
    body: Bytes,
    close: bool,
    measure_start: Instant,
    end: Instant,
    max_requests: u64,
    started: AtomicU64,
}

impl Ctx {
    /// Claims one request from the budget.
    fn take_one(&self) -> bool {
        self.started.fetch_add(1, Ordering::Relaxed) < self.max_requests
    }

    fn request(&self, request_id: &str) -> Result<Request<Full<Bytes>>, BoxError> {
        let mut request = Request::new(Full::new(self.body.clone()));
        *request.method_mut() = self.method.clone();
        *request.uri_mut() = http::Uri::from_static(self.path);
        let headers = request.headers_mut();
        headers.reserve(self.fixed_headers.len() + 4);
        for (name, value) in &self.fixed_headers {
            headers.append(name.clone(), value.clone());
        }
        headers.insert("x-request-id", HeaderValue::from_str(request_id)?);
        if !self.body.is_empty() {
            headers.insert(http::header::CONTENT_LENGTH, self.body.len().into());
        }
        if self.close {
            headers.insert(http::header::CONNECTION, HeaderValue::from_static("close"));
        }
        Ok(request)
    }
}

/// Unique, well-formed (version 4) request ids without a syscall per id.
struct IdGen {
    seed: u64,
    counter: u64,
    text: [u8; 36],
}

impl IdGen {
    fn new(worker: usize) -> IdGen {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        IdGen {
            seed: nanos ^ ((worker as u64) << 48) ^ u64::from(std::process::id()),
            counter: 0,
            text: [0; 36],
        }
    }

    fn next(&mut self) -> &str {
        self.counter += 1;
        let mut bytes = [0u8; 16];
        bytes[..8].copy_from_slice(&self.seed.to_be_bytes());
        bytes[8..].copy_from_slice(&self.counter.to_be_bytes());
        uuid::Builder::from_random_bytes(bytes)
            .into_uuid()
            .hyphenated()
            .encode_lower(&mut self.text)
    }
}

/// One worker's counts and the latencies (µs) of its requests completed inside the window.
#[derive(Default)]
struct WorkerStats {
    ok: u64,
    non_2xx: u64,
    errors: u64,
    first_status: Option<u16>,
    first_error: Option<String>,
    latencies_us: Vec<u32>,
}

impl WorkerStats {
    fn record(&mut self, ctx: &Ctx, started: Instant, status: StatusCode) {
        let done = Instant::now();
        if done < ctx.measure_start || done > ctx.end {
            return;
        }
        if status.is_success() {
            self.ok += 1;
        } else {
            self.non_2xx += 1;
            self.first_status.get_or_insert(status.as_u16());
        }
        let us = done.duration_since(started).as_micros();
        self.latencies_us.push(us.min(u128::from(u32::MAX)) as u32);
    }

    fn error(&mut self, ctx: &Ctx, e: impl std::fmt::Display) {
        let now = Instant::now();
        if now >= ctx.measure_start && now <= ctx.end {
            self.errors += 1;
        }
        if self.first_error.is_none() {
            self.first_error = Some(e.to_string());
        }
    }

    fn merge(&mut self, other: WorkerStats) {
        self.ok += other.ok;
        self.non_2xx += other.non_2xx;
        self.errors += other.errors;
        if self.first_status.is_none() {
            self.first_status = other.first_status;
        }
        if self.first_error.is_none() {
            self.first_error = other.first_error;
        }
        self.latencies_us.extend(other.latencies_us);
    }
}

async fn run(args: Args) -> Result<(), BoxError> {
    let connector = if args.plain {
        None
    } else {
        Some(TlsConnector::from(client_config(&args)?))
    };
    let (method, path, close) = match args.mode {
        Mode::Get | Mode::Hold | Mode::Rate => (Method::GET, "/metadata", false),
        Mode::Post => (Method::POST, "/$process-message", false),
        Mode::Connect => (Method::GET, "/metadata", true),
    };
    let body = match (&args.body, args.mode) {
        (Some(path), Mode::Post) => Bytes::from(std::fs::read(path)?),
        (None, Mode::Post) => return Err("--body is required for post".into()),
        _ => Bytes::new(),
    };
    let now = Instant::now();
    let measure_start = now + Duration::from_secs_f64(args.warmup);
    let ctx = Arc::new(Ctx {
        addr: args.addr,
        connector,
        server_name: ServerName::try_from("localhost")?,
        fixed_headers: fixed_headers(&args.headers, method == Method::POST)?,
        method,
        path,
        body,
        close,
        measure_start,
        end: measure_start + Duration::from_secs_f64(args.duration),
        max_requests: args.max_requests,
        started: AtomicU64::new(0),
    });
    if args.mode == Mode::Hold {
        return hold(ctx, &args).await;
    }

    // CPU of the servers (and of this client) over the window only.
    let pids = args.server_pids.clone();
    let sampler = {
        let ctx = ctx.clone();
        tokio::spawn(async move {
            tokio::time::sleep_until(ctx.measure_start.into()).await;
            let before = (cpu_seconds(&pids), self_cpu_seconds(), machine_ticks());
            tokio::time::sleep_until(ctx.end.into()).await;
            let after = (cpu_seconds(&pids), self_cpu_seconds(), machine_ticks());
            let machine = MachineCpu::between(before.2, after.2);
            (after.0 - before.0, after.1 - before.1, machine)
        })
    };
    let mut workers = tokio::task::JoinSet::new();
    let count = args.concurrency.max(1);
    for i in 0..count {
        let ctx = ctx.clone();
        if args.mode == Mode::Connect {
            workers.spawn(connect_worker(ctx, i));
        } else if args.mode == Mode::Rate {
            // Worker i sends requests i, i + count, i + 2 count, ... of one evenly spaced
            // schedule at `rate` per second.
            let interval = Duration::from_secs_f64(count as f64 / args.rate.max(0.001));
            let first = now + Duration::from_secs_f64(i as f64 / args.rate.max(0.001));
            workers.spawn(keepalive_worker(ctx, i, Some((first, interval))));
        } else {
            workers.spawn(keepalive_worker(ctx, i, None));
        }
    }
    let mut total = WorkerStats::default();
    while let Some(stats) = workers.join_next().await {
        total.merge(stats?);
    }
    let (server_cpu, client_cpu, machine) = sampler.await?;
    report(&args, &total, server_cpu, client_cpu, machine);
    Ok(())
}

fn report(args: &Args, total: &WorkerStats, server_cpu: f64, client_cpu: f64, machine: MachineCpu) {
    let mut lat = total.latencies_us.clone();
    lat.sort_unstable();
    let pct = |q: f64| -> f64 {
        if lat.is_empty() {
            return 0.0;
        }
        let i = ((q * lat.len() as f64) as usize).min(lat.len() - 1);
        f64::from(lat[i]) / 1000.0
    };
    let completed = total.ok + total.non_2xx;
    let rps = total.ok as f64 / args.duration;
    let cpu_us_per_req = if total.ok > 0 {
        server_cpu * 1e6 / total.ok as f64
    } else {
        0.0
    };
    if let Some(e) = &total.first_error {
        eprintln!("loadgen[{}]: first error: {e}", args.label);
    }
    if let Some(s) = total.first_status {
        eprintln!("loadgen[{}]: first non-2xx status: {s}", args.label);
    }
    println!(
        "RESULT label={} mode={:?}{} conc={} window_s={:.1} completed={} ok={} rps={:.0} p50_ms={:.3} p90_ms={:.3} p99_ms={:.3} max_ms={:.3} errors={} non2xx={} server_cpu_s={:.2} server_cpu_us_per_req={:.1} client_cpu_s={:.2} machine_busy_pct={:.0} machine_steal_pct={:.1}",
        args.label,
        args.mode,
        if args.mode == Mode::Rate {
            format!(" rate={:.0}", args.rate)
        } else {
            String::new()
        },
        args.concurrency,
        args.duration,
        completed,
        total.ok,
        rps,
        pct(0.50),
        pct(0.90),
        pct(0.99),
        lat.last().map(|v| f64::from(*v) / 1000.0).unwrap_or(0.0),
        total.errors,
        total.non_2xx,
        server_cpu,
        cpu_us_per_req,
        client_cpu,
        machine.busy_pct,
        machine.steal_pct,
    );
}

/// One connection, reused until it fails; one request in flight. Closed loop (`schedule` None):
/// the next request goes as soon as the last one is answered. Open loop (`Some((first,
/// interval))`): requests go on their schedule, and each latency counts from the time the
/// request was due, so a request that waits for a slow predecessor is charged for the wait.
async fn keepalive_worker(
    ctx: Arc<Ctx>,
    index: usize,
    schedule: Option<(Instant, Duration)>,
) -> WorkerStats {
    let mut stats = WorkerStats::default();
    let mut ids = IdGen::new(index);
    let mut sender: Option<SendRequest<Full<Bytes>>> = None;
    let mut due = schedule.map(|(first, _)| first);
    while due.unwrap_or_else(Instant::now) < ctx.end && ctx.take_one() {
        let started = match (due.as_mut(), schedule) {
            (Some(due), Some((_, interval))) => {
                tokio::time::sleep_until((*due).into()).await;
                let scheduled = *due;
                *due += interval;
                Some(scheduled)
            }
            _ => None,
        };
        let s = match sender.as_mut() {
            Some(s) => s,
            None => match tokio::time::timeout(ATTEMPT_TIMEOUT, connect(&ctx)).await {
                Ok(Ok(s)) => sender.insert(s),
                Ok(Err(e)) => {
                    stats.error(&ctx, e);
                    if schedule.is_none() {
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                    continue;
                }
                Err(_) => {
                    stats.error(&ctx, "connect timed out");
                    continue;
                }
            },
        };
        let request = match ctx.request(ids.next()) {
            Ok(r) => r,
            Err(e) => {
                stats.error(&ctx, e);
                break;
            }
        };
        let started = started.unwrap_or_else(Instant::now);
        match tokio::time::timeout(ATTEMPT_TIMEOUT, send(s, request)).await {
            Ok(Ok(status)) => stats.record(&ctx, started, status),
            Ok(Err(e)) => {
                stats.error(&ctx, e);
                sender = None;
            }
            Err(_) => {
                stats.error(&ctx, "request timed out");
                sender = None;
            }
        }
    }
    stats
}

/// A new connection (full handshake) for every request.
async fn connect_worker(ctx: Arc<Ctx>, index: usize) -> WorkerStats {
    let mut stats = WorkerStats::default();
    let mut ids = IdGen::new(index);
    while Instant::now() < ctx.end && ctx.take_one() {
        let request = match ctx.request(ids.next()) {
            Ok(r) => r,
            Err(e) => {
                stats.error(&ctx, e);
                break;
            }
        };
        let started = Instant::now();
        let attempt = async {
            let mut sender = connect(&ctx).await?;
            send(&mut sender, request).await
        };
        match tokio::time::timeout(ATTEMPT_TIMEOUT, attempt).await {
            Ok(Ok(status)) => stats.record(&ctx, started, status),
            Ok(Err(e)) => stats.error(&ctx, e),
            Err(_) => stats.error(&ctx, "connection + request timed out"),
        }
    }
    stats
}

/// Opens `--connections` connections, one request each, reports the servers' RSS while they are
/// all held idle, then closes them.
async fn hold(ctx: Arc<Ctx>, args: &Args) -> Result<(), BoxError> {
    let before_kb = rss_kb(&args.server_pids);
    let deadline = Instant::now() + Duration::from_secs_f64(args.duration);
    let workers = args.concurrency.max(1);
    let per_worker = args.connections.div_ceil(workers);
    let mut set = tokio::task::JoinSet::new();
    for w in 0..workers {
        let ctx = ctx.clone();
        let count = per_worker.min(args.connections.saturating_sub(w * per_worker));
        set.spawn(async move {
            let mut held = Vec::with_capacity(count);
            let mut failed = 0u64;
            let mut first_error = None;
            let mut ids = IdGen::new(w);
            for _ in 0..count {
                if Instant::now() > deadline {
                    break;
                }
                let request = match ctx.request(ids.next()) {
                    Ok(r) => r,
                    Err(e) => {
                        first_error.get_or_insert(e.to_string());
                        break;
                    }
                };
                let attempt = async {
                    let mut sender = connect(&ctx).await?;
                    let status = send(&mut sender, request).await?;
                    if !status.is_success() {
                        return Err(format!("status {status}").into());
                    }
                    Ok::<_, BoxError>(sender)
                };
                match tokio::time::timeout(ATTEMPT_TIMEOUT, attempt).await {
                    Ok(Ok(sender)) => held.push(sender),
                    Ok(Err(e)) => {
                        failed += 1;
                        first_error.get_or_insert(e.to_string());
                    }
                    Err(_) => {
                        failed += 1;
                        first_error.get_or_insert("timed out".into());
                    }
                }
            }
            (held, failed, first_error)
        });
    }
    let opening = Instant::now();
    let mut held = Vec::with_capacity(args.connections);
    let mut failed = 0;
    while let Some(joined) = set.join_next().await {
        let (h, f, e) = joined?;
        held.extend(h);
        failed += f;
        if let Some(e) = e {
            eprintln!("loadgen[{}]: hold: {e}", args.label);
        }
    }
    let opened_in = opening.elapsed().as_secs_f64();
    // Let the servers settle (tasks parked, buffers released) before reading their RSS.
    tokio::time::sleep(Duration::from_secs_f64(args.hold.max(1.0))).await;
    let alive = held.iter().filter(|s| !s.is_closed()).count();
    let during_kb = rss_kb(&args.server_pids);
    let per_conn = if alive > 0 {
        (during_kb.saturating_sub(before_kb)) as f64 / alive as f64
    } else {
        0.0
    };
    println!(
        "RESULT label={} mode=Hold opened={} alive={} failed={} opened_in_s={:.1} rss_before_kb={} rss_held_kb={} kb_per_conn={:.1}",
        args.label,
        held.len(),
        alive,
        failed,
        opened_in,
        before_kb,
        during_kb,
        per_conn,
    );
    drop(held);
    Ok(())
}

async fn connect(ctx: &Ctx) -> Result<SendRequest<Full<Bytes>>, BoxError> {
    let tcp = TcpStream::connect(ctx.addr).await?;
    tcp.set_nodelay(true)?;
    let Some(connector) = &ctx.connector else {
        let (sender, connection) = http1::handshake(TokioIo::new(tcp)).await?;
        tokio::spawn(async move {
            let _ = connection.await;
        });
        return Ok(sender);
    };
    let tls = connector.connect(ctx.server_name.clone(), tcp).await?;
    let (sender, connection) = http1::handshake(TokioIo::new(tls)).await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(sender)
}

async fn send(
    sender: &mut SendRequest<Full<Bytes>>,
    request: Request<Full<Bytes>>,
) -> Result<StatusCode, BoxError> {
    sender.ready().await?;
    let response = sender.send_request(request).await?;
    let status = response.status();
    response.into_body().collect().await?;
    Ok(status)
}

/// TLS 1.3 only, the client certificate, HTTP/1.1 by ALPN, no session resumption (every new
/// connection is a full handshake).
fn client_config(args: &Args) -> Result<Arc<rustls::ClientConfig>, BoxError> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(&args.ca)? {
        roots.add(cert?)?;
    }
    let chain = CertificateDer::pem_file_iter(&args.cert)?.collect::<Result<Vec<_>, _>>()?;
    let key = PrivateKeyDer::from_pem_file(&args.key)?;
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])?
    .with_root_certificates(roots)
    .with_client_auth_cert(chain, key)?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    config.resumption = Resumption::disabled();
    Ok(Arc::new(config))
}

/// The example's header set (minus Content-Type on a GET), plus Host and an access token the
/// proxies must strip. X-Request-Id is set per request.
fn fixed_headers(path: &Path, with_body: bool) -> Result<Vec<(HeaderName, HeaderValue)>, BoxError> {
    let json: serde_json::Value = serde_json::from_slice(&std::fs::read(path)?)?;
    let map = json["valid_process_message_request"]["headers"]
        .as_object()
        .ok_or("headers-examples.json: no valid_process_message_request.headers")?;
    let mut out = vec![
        (http::header::HOST, HeaderValue::from_static("localhost")),
        (
            http::header::AUTHORIZATION,
            HeaderValue::from_static("Bearer g1112R_ccQ1Ebbb4gtHBP1aaaNM"),
        ),
    ];
    for (name, value) in map {
        let name = HeaderName::from_bytes(name.as_bytes())?;
        if name == "x-request-id" || (!with_body && name == http::header::CONTENT_TYPE) {
            continue;
        }
        let value = value.as_str().ok_or("header value is not a string")?;
        out.push((name, HeaderValue::from_str(value)?));
    }
    Ok(out)
}

/// How busy the whole machine (every core, every process) was over the window.
#[derive(Debug, Clone, Copy)]
struct MachineCpu {
    busy_pct: f64,
    steal_pct: f64,
}

impl MachineCpu {
    fn between(before: [u64; 8], after: [u64; 8]) -> MachineCpu {
        let d: Vec<f64> = (0..8)
            .map(|i| after[i].saturating_sub(before[i]) as f64)
            .collect();
        let total: f64 = d.iter().sum();
        if total == 0.0 {
            return MachineCpu {
                busy_pct: 0.0,
                steal_pct: 0.0,
            };
        }
        // user nice system idle iowait irq softirq steal
        MachineCpu {
            busy_pct: 100.0 * (total - d[3] - d[4]) / total,
            steal_pct: 100.0 * d[7] / total,
        }
    }
}

/// The first eight counters of the `cpu` line of /proc/stat.
fn machine_ticks() -> [u64; 8] {
    let mut out = [0u64; 8];
    if let Some(line) = std::fs::read_to_string("/proc/stat")
        .ok()
        .and_then(|s| s.lines().next().map(str::to_owned))
    {
        for (slot, field) in out.iter_mut().zip(line.split_whitespace().skip(1)) {
            *slot = field.parse().unwrap_or(0);
        }
    }
    out
}

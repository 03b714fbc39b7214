//! Configuration: TOML with unknown keys refused, turned in one step into validated settings, one
//! struct per section, each defined by the module that uses it (`tls::TlsSettings`,
//! `admission::ClientSettings`, `upstream::UpstreamSettings`, `bars::BarsSettings`,
//! `dedup::DedupSettings`, `admin::AdminSettings`, `logging::LogSettings`,
//! `egress::settings::EgressSettings`; `[listen]`, read by the gateway's accept loop, stays here)
//! and re-exported here. This file reads the TOML into them (`values.rs`: durations, sizes and the
//! key an error is about) and validates them. Every error names the file and the key.
//!
//! Relative paths are resolved against the directory of the config file, so a config and its
//! certificates can move together.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use http::header::HeaderName;
use http::Uri;
use ipnet::IpNet;
use serde::Deserialize;

use crate::admission::parse_cidr;
use crate::bars::identity::TargetIdentifier;

mod values;
pub(crate) use values::{ByteSize, HumanDuration};

// Each section's settings type lives in the module that uses it; re-exported here, where the
// TOML is read into them.
pub use crate::admin::AdminSettings;
pub use crate::admission::{
    ClientSettings, Environment, INT_PROXY_IPS, INT_PROXY_SUBJECT, PROD_PROXY_IPS,
    PROD_PROXY_SUBJECT,
};
pub use crate::bars::BarsSettings;
pub use crate::dedup::{DedupBackend, DedupSettings, OnStoreError};
pub use crate::logging::{LogFormat, LogSettings};
pub use crate::tls::{parse_pin, Pin, ServerIdentitySource, TlsSettings, TlsVersion};
pub use crate::upstream::{UpstreamSettings, UpstreamUrl};

/// The default config path (DESIGN.md §2).
pub const DEFAULT_CONFIG_PATH: &str = "/etc/bars-gateway/config.toml";

/// A configuration problem, naming the file and the key.
#[derive(Debug, thiserror::Error)]
#[error("{}: {key}: {message}", file.display())]
pub struct ConfigError {
    /// The config file.
    pub file: PathBuf,
    /// The dotted key, e.g. `tls.certificate`, or `(file)` for problems with the file itself.
    pub key: String,
    /// What is wrong.
    pub message: String,
}

/// Everything `run` needs, validated.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The file these settings came from.
    pub source: PathBuf,
    /// `[listen]`.
    pub listen: ListenSettings,
    /// `[tls]`.
    pub tls: TlsSettings,
    /// `[client]`.
    pub client: ClientSettings,
    /// `[upstream]`.
    pub upstream: UpstreamSettings,
    /// `[bars]`.
    pub bars: BarsSettings,
    /// `[dedup]`.
    pub dedup: DedupSettings,
    /// `[admin]`.
    pub admin: AdminSettings,
    /// `[log]`.
    pub log: LogSettings,
    /// `[egress]`: the legacy system as a BaRS sender (DESIGN.md §5b); `None` when absent.
    pub egress: Option<crate::egress::settings::EgressSettings>,
}

/// `[listen]`: the public TLS listener and its connection limits.
#[derive(Debug, Clone)]
pub struct ListenSettings {
    /// Address to bind.
    pub address: SocketAddr,
    /// L4 balancers allowed (and required) to send a PROXY protocol header.
    pub trusted_proxies: Vec<IpNet>,
    /// Time allowed for the TLS handshake and for each request's header section (slowloris).
    pub header_read_timeout: Duration,
    /// A connection with no request in flight and no bytes moving for this long is closed.
    pub idle_timeout: Duration,
    /// Connections beyond this many are closed at accept.
    pub max_connections: usize,
    /// Largest request header section accepted.
    pub max_header_bytes: usize,
    /// On SIGTERM, how long requests in flight may take to finish.
    pub shutdown_grace: Duration,
}

// ---------------------------------------------------------------------------------------------
// Raw TOML model: exactly the keys of DESIGN.md §3, unknown keys refused.

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    listen: RawListen,
    tls: Option<RawTls>,
    #[serde(default)]
    client: RawClient,
    #[serde(default)]
    upstream: RawUpstream,
    #[serde(default)]
    bars: RawBars,
    #[serde(default)]
    dedup: RawDedup,
    #[serde(default)]
    admin: RawAdmin,
    #[serde(default)]
    log: RawLog,
    egress: Option<crate::egress::settings::RawEgress>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDedup {
    store: Option<StoreKind>,
    ttl: Option<HumanDuration>,
    max_entries: Option<u64>,
    methods: Option<Vec<String>>,
    redis_url: Option<String>,
    on_store_error: Option<OnStoreError>,
    max_replay_bytes: Option<ByteSize>,
}

/// `dedup.store`.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "lowercase")]
enum StoreKind {
    Memory,
    Redis,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawListen {
    address: Option<String>,
    trusted_proxies: Option<Vec<String>>,
    header_read_timeout: Option<HumanDuration>,
    idle_timeout: Option<HumanDuration>,
    max_connections: Option<usize>,
    max_header_bytes: Option<ByteSize>,
    shutdown_grace: Option<HumanDuration>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTls {
    certificate: Option<String>,
    private_key: Option<String>,
    private_key_password_file: Option<String>,
    pkcs12: Option<String>,
    pkcs12_password_file: Option<String>,
    client_ca: Option<Vec<String>>,
    client_crl: Option<Vec<String>>,
    min_version: Option<TlsVersion>,
    reload_interval: Option<HumanDuration>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawClient {
    environment: Option<Environment>,
    allowed_ips: Option<Vec<String>>,
    allowed_subjects: Option<Vec<String>>,
    pinned_fingerprints: Option<Vec<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUpstream {
    url: Option<String>,
    connect_timeout: Option<HumanDuration>,
    request_timeout: Option<HumanDuration>,
    completion_timeout: Option<HumanDuration>,
    max_response_header_bytes: Option<ByteSize>,
    max_body: Option<ByteSize>,
    strip_headers: Option<Vec<String>>,
    route: Option<Vec<RawRoute>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRoute {
    target: String,
    url: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBars {
    base_path: Option<String>,
    require_identity_headers: Option<bool>,
    accepted_major_versions: Option<Vec<u64>>,
    allowed_paths: Option<RawAllowedPaths>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum RawAllowedPaths {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAdmin {
    address: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLog {
    level: Option<String>,
    format: Option<LogFormat>,
    audit: Option<bool>,
}

// ---------------------------------------------------------------------------------------------

/// Reads and validates the config file.
pub fn load(path: &Path) -> Result<Settings, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
        file: path.to_path_buf(),
        key: "(file)".into(),
        message: format!("cannot read: {e}"),
    })?;
    parse(&text, path)
}

/// Validates config text as if read from `path` (relative paths resolve against its directory).
pub fn parse(text: &str, path: &Path) -> Result<Settings, ConfigError> {
    let v = Validator {
        file: path.to_path_buf(),
        dir: path
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from(".")),
    };
    let raw: RawConfig = v.read_toml(text)?;
    Ok(Settings {
        source: path.to_path_buf(),
        listen: v.listen(raw.listen)?,
        tls: v.tls(raw.tls)?,
        client: v.client(raw.client)?,
        upstream: v.upstream(raw.upstream)?,
        bars: v.bars(raw.bars)?,
        dedup: v.dedup(raw.dedup)?,
        admin: v.admin(raw.admin)?,
        log: v.log(raw.log)?,
        egress: raw
            .egress
            .map(|raw| crate::egress::settings::validate(raw, &v))
            .transpose()?,
    })
}

/// Turns raw values into settings, every error naming the file and the key (shared with
/// `egress::settings`).
pub(crate) struct Validator {
    pub(crate) file: PathBuf,
    pub(crate) dir: PathBuf,
}

impl Validator {
    /// Deserializes config text; an error names the key it is about when its position lies in
    /// one (a wrong value, an unknown key), else `(syntax)` and the line.
    pub(crate) fn read_toml<T: serde::de::DeserializeOwned>(
        &self,
        text: &str,
    ) -> Result<T, ConfigError> {
        toml::from_str(text).map_err(|e| {
            let message = e.message().to_string();
            let Some(span) = e.span() else {
                return self.err("(syntax)", message);
            };
            match values::key_at(text, span.start) {
                Some(key) => self.err(&key, message),
                None => {
                    let line = text[..span.start.min(text.len())].matches('\n').count() + 1;
                    self.err("(syntax)", format!("{message} (line {line})"))
                }
            }
        })
    }

    pub(crate) fn err(&self, key: &str, message: impl Into<String>) -> ConfigError {
        ConfigError {
            file: self.file.clone(),
            key: key.to_string(),
            message: message.into(),
        }
    }

    pub(crate) fn path(&self, key: &str, value: &str) -> Result<PathBuf, ConfigError> {
        if value.trim().is_empty() {
            return Err(self.err(key, "must not be empty"));
        }
        let p = Path::new(value);
        Ok(if p.is_absolute() {
            p.to_path_buf()
        } else {
            self.dir.join(p)
        })
    }

    pub(crate) fn optional_path(
        &self,
        key: &str,
        value: Option<String>,
    ) -> Result<Option<PathBuf>, ConfigError> {
        match value {
            Some(v) if !v.trim().is_empty() => self.path(key, &v).map(Some),
            _ => Ok(None),
        }
    }

    fn socket_addr(&self, key: &str, value: &str) -> Result<SocketAddr, ConfigError> {
        value.trim().parse().map_err(|_| {
            self.err(
                key,
                format!("{value:?} is not an address like \"0.0.0.0:8443\""),
            )
        })
    }

    fn cidrs(&self, key: &str, values: &[String]) -> Result<Vec<IpNet>, ConfigError> {
        values
            .iter()
            .enumerate()
            .map(|(i, v)| parse_cidr(v).map_err(|m| self.err(&format!("{key}[{i}]"), m)))
            .collect()
    }

    fn listen(&self, raw: RawListen) -> Result<ListenSettings, ConfigError> {
        let address = self.socket_addr(
            "listen.address",
            raw.address.as_deref().unwrap_or("0.0.0.0:8443"),
        )?;
        let max_connections = raw.max_connections.unwrap_or(10_000);
        if max_connections == 0 {
            return Err(self.err("listen.max_connections", "must be at least 1"));
        }
        let max_header_bytes = ByteSize::or(raw.max_header_bytes, 32 << 10);
        // hyper's HTTP/1 read buffer cannot be smaller than 8 KiB.
        if !(8192..=1 << 20).contains(&max_header_bytes) {
            return Err(self.err("listen.max_header_bytes", "must be between 8KiB and 1MiB"));
        }
        Ok(ListenSettings {
            address,
            trusted_proxies: self.cidrs(
                "listen.trusted_proxies",
                raw.trusted_proxies.as_deref().unwrap_or_default(),
            )?,
            header_read_timeout: HumanDuration::or(raw.header_read_timeout, secs(10)),
            idle_timeout: HumanDuration::or(raw.idle_timeout, secs(60)),
            max_connections,
            max_header_bytes: max_header_bytes as usize,
            shutdown_grace: HumanDuration::or(raw.shutdown_grace, secs(30)),
        })
    }

    fn tls(&self, raw: Option<RawTls>) -> Result<TlsSettings, ConfigError> {
        let mut raw = raw.ok_or_else(|| self.err("tls", "the [tls] section is required"))?;
        // An empty string means "not set" (the example config writes the password file as "").
        for value in [
            &mut raw.certificate,
            &mut raw.private_key,
            &mut raw.private_key_password_file,
            &mut raw.pkcs12,
            &mut raw.pkcs12_password_file,
        ] {
            if value.as_deref().is_some_and(|v| v.trim().is_empty()) {
                *value = None;
            }
        }
        let identity = match (raw.pkcs12, raw.certificate, raw.private_key) {
            (Some(p12), None, None) => {
                if raw.private_key_password_file.is_some() {
                    return Err(self.err(
                        "tls.private_key_password_file",
                        "goes with tls.private_key; a PKCS#12 bundle takes tls.pkcs12_password_file",
                    ));
                }
                ServerIdentitySource::Pkcs12 {
                    path: self.path("tls.pkcs12", &p12)?,
                    password_file: self
                        .optional_path("tls.pkcs12_password_file", raw.pkcs12_password_file)?,
                }
            }
            (Some(_), _, _) => {
                return Err(self.err(
                    "tls.pkcs12",
                    "set either tls.pkcs12 or tls.certificate + tls.private_key, not both",
                ))
            }
            (None, Some(cert), Some(key)) => {
                if raw.pkcs12_password_file.is_some() {
                    return Err(self.err("tls.pkcs12_password_file", "goes with tls.pkcs12"));
                }
                ServerIdentitySource::Pem {
                    certificate: self.path("tls.certificate", &cert)?,
                    private_key: self.path("tls.private_key", &key)?,
                    password_file: self.optional_path(
                        "tls.private_key_password_file",
                        raw.private_key_password_file,
                    )?,
                }
            }
            (None, None, _) => {
                return Err(self.err(
                    "tls.certificate",
                    "required (the server certificate chain, PEM), unless tls.pkcs12 is set",
                ))
            }
            (None, Some(_), None) => {
                return Err(self.err("tls.private_key", "required with tls.certificate"))
            }
        };
        let client_ca = raw.client_ca.unwrap_or_default();
        if client_ca.is_empty() {
            return Err(self.err(
                "tls.client_ca",
                "at least one CA is required (the NHS root and sub-CA of your environment)",
            ));
        }
        let client_ca = client_ca
            .iter()
            .enumerate()
            .map(|(i, p)| self.path(&format!("tls.client_ca[{i}]"), p))
            .collect::<Result<_, _>>()?;
        let client_crl = raw
            .client_crl
            .unwrap_or_default()
            .iter()
            .enumerate()
            .map(|(i, p)| self.path(&format!("tls.client_crl[{i}]"), p))
            .collect::<Result<_, _>>()?;
        let min_version = raw.min_version.unwrap_or(TlsVersion::Tls12);
        Ok(TlsSettings {
            identity,
            client_ca,
            client_crl,
            min_version,
            reload_interval: HumanDuration::or(raw.reload_interval, secs(60)),
        })
    }

    fn client(&self, raw: RawClient) -> Result<ClientSettings, ConfigError> {
        let environment = raw.environment.unwrap_or(Environment::Custom);
        let (preset_ips, preset_subject): (&[&str], Option<&str>) = match environment {
            Environment::Int => (&INT_PROXY_IPS, Some(INT_PROXY_SUBJECT)),
            Environment::Prod => (&PROD_PROXY_IPS, Some(PROD_PROXY_SUBJECT)),
            Environment::Custom => (&[], None),
        };
        let ips: Vec<String> = match raw.allowed_ips {
            Some(list) => list,
            None if environment == Environment::Custom => return Err(self.err(
                "client.allowed_ips",
                "required with environment = \"custom\" (or set environment = \"int\" or \"prod\")",
            )),
            None => preset_ips.iter().map(|s| s.to_string()).collect(),
        };
        if ips.is_empty() {
            // Fail closed: allowing everyone must be written out.
            return Err(self.err(
                "client.allowed_ips",
                "must not be empty; to allow every address write [\"0.0.0.0/0\", \"::/0\"] explicitly",
            ));
        }
        let allowed_ips = self.cidrs("client.allowed_ips", &ips)?;
        let subjects: Vec<String> =
            match raw.allowed_subjects {
                Some(list) => list,
                None => match preset_subject {
                    Some(s) => vec![s.to_string()],
                    None => return Err(self.err(
                        "client.allowed_subjects",
                        "required with environment = \"custom\" (the BaRS proxy certificate's CN)",
                    )),
                },
            };
        if subjects.is_empty() {
            return Err(self.err("client.allowed_subjects", "must name at least one subject"));
        }
        let mut allowed_subjects = Vec::with_capacity(subjects.len());
        for (i, s) in subjects.iter().enumerate() {
            let s = s.trim();
            if s.is_empty() || s.contains(['=', ',']) {
                return Err(self.err(
                    &format!("client.allowed_subjects[{i}]"),
                    "must be a CN or DNS name like \"bars-proxy.spineservices.nhs.uk\" (not a full DN)",
                ));
            }
            allowed_subjects.push(s.to_ascii_lowercase());
        }
        let pinned_fingerprints = raw
            .pinned_fingerprints
            .unwrap_or_default()
            .iter()
            .enumerate()
            .map(|(i, p)| {
                parse_pin(p).ok_or_else(|| {
                    self.err(
                        &format!("client.pinned_fingerprints[{i}]"),
                        "must be a SHA-256 (64 hex digits) or SHA-1 (40 hex digits) fingerprint; colons allowed",
                    )
                })
            })
            .collect::<Result<_, _>>()?;
        Ok(ClientSettings {
            environment,
            allowed_ips,
            allowed_subjects,
            pinned_fingerprints,
        })
    }

    fn upstream_url(&self, key: &str, value: &str) -> Result<UpstreamUrl, ConfigError> {
        let uri: Uri = value
            .trim()
            .parse()
            .map_err(|e| self.err(key, format!("{value:?} is not a URL: {e}")))?;
        if uri.scheme_str() != Some("http") {
            return Err(self.err(
                key,
                "must be an http:// URL (the gateway forwards over plain HTTP to the legacy receiver)",
            ));
        }
        let authority = uri
            .authority()
            .ok_or_else(|| self.err(key, "needs a host"))?
            .as_str()
            .to_string();
        if authority.contains('@') {
            return Err(self.err(key, "must not carry user information"));
        }
        if uri.query().is_some() {
            return Err(self.err(key, "must not carry a query string"));
        }
        let base_path = uri.path().trim_end_matches('/').to_string();
        Ok(UpstreamUrl {
            uri,
            authority,
            base_path,
        })
    }

    fn upstream(&self, raw: RawUpstream) -> Result<UpstreamSettings, ConfigError> {
        let url = raw
            .url
            .filter(|u| !u.trim().is_empty())
            .map(|u| self.upstream_url("upstream.url", &u))
            .transpose()?;
        let mut routes = Vec::new();
        for (i, r) in raw.route.unwrap_or_default().into_iter().enumerate() {
            let target: TargetIdentifier = r.target.parse().map_err(|_| {
                self.err(
                    &format!("upstream.route[{i}].target"),
                    "must be \"system|value\", e.g. \"https://fhir.nhs.uk/Id/dos-service-id|2000011147\"",
                )
            })?;
            if routes.iter().any(|(t, _)| t == &target) {
                return Err(self.err(&format!("upstream.route[{i}].target"), "appears twice"));
            }
            routes.push((
                target,
                self.upstream_url(&format!("upstream.route[{i}].url"), &r.url)?,
            ));
        }
        if url.is_none() && routes.is_empty() {
            return Err(self.err(
                "upstream.url",
                "required (the legacy receiver, e.g. \"http://127.0.0.1:8080\") unless [[upstream.route]] entries are given",
            ));
        }
        let strip_headers = raw
            .strip_headers
            .unwrap_or_else(|| vec!["Authorization".to_string()])
            .iter()
            .enumerate()
            .map(|(i, h)| {
                HeaderName::from_bytes(h.trim().as_bytes()).map_err(|_| {
                    self.err(
                        &format!("upstream.strip_headers[{i}]"),
                        format!("{h:?} is not a header name"),
                    )
                })
            })
            .collect::<Result<_, _>>()?;
        let max_body = ByteSize::or(raw.max_body, 10 << 20);
        if max_body == 0 {
            return Err(self.err("upstream.max_body", "must be greater than zero"));
        }
        let request_timeout = HumanDuration::or(raw.request_timeout, secs(5));
        let completion_timeout = HumanDuration::or(raw.completion_timeout, secs(120));
        if completion_timeout < request_timeout {
            return Err(self.err(
                "upstream.completion_timeout",
                format!(
                    "must be at least upstream.request_timeout ({}): a late answer is waited for after the sender's deadline, not before",
                    humantime::format_duration(request_timeout)
                ),
            ));
        }
        let max_response_header_bytes = ByteSize::or(raw.max_response_header_bytes, 64 << 10);
        if max_response_header_bytes < 1024 {
            return Err(self.err(
                "upstream.max_response_header_bytes",
                "must be at least 1KiB",
            ));
        }
        Ok(UpstreamSettings {
            url,
            connect_timeout: HumanDuration::or(raw.connect_timeout, secs(2)),
            request_timeout,
            completion_timeout,
            max_response_header_bytes: usize::try_from(max_response_header_bytes)
                .unwrap_or(usize::MAX),
            max_body,
            strip_headers,
            routes,
        })
    }

    fn bars(&self, raw: RawBars) -> Result<BarsSettings, ConfigError> {
        let base_path = raw.base_path.unwrap_or_default().trim().to_string();
        let base_path = base_path.trim_end_matches('/').to_string();
        if !base_path.is_empty() && !is_clean_prefix(&base_path) {
            return Err(self.err(
                "bars.base_path",
                "must be \"\" or a path like \"/bars/FHIR/R4\" (no dot segments, '%', '?', or '//')",
            ));
        }
        let accepted_major_versions = raw.accepted_major_versions.unwrap_or_else(|| vec![1]);
        if accepted_major_versions.is_empty() {
            return Err(self.err(
                "bars.accepted_major_versions",
                "must list at least one major version",
            ));
        }
        let entries = match raw.allowed_paths {
            None => vec!["bars".to_string()],
            Some(RawAllowedPaths::One(s)) => vec![s],
            Some(RawAllowedPaths::Many(v)) => v,
        };
        if entries.is_empty() {
            return Err(self.err(
                "bars.allowed_paths",
                "must not be empty: use \"bars\" for the BaRS endpoints",
            ));
        }
        let mut bars_endpoints = false;
        let mut extra_prefixes = Vec::new();
        for (i, e) in entries.iter().enumerate() {
            let e = e.trim();
            if e == "bars" {
                bars_endpoints = true;
            } else if is_clean_prefix(e.trim_end_matches('/')) {
                extra_prefixes.push(e.trim_end_matches('/').to_string());
            } else {
                return Err(self.err(
                    &format!("bars.allowed_paths[{i}]"),
                    format!("{e:?} must be \"bars\" or a path prefix like \"/Patient\""),
                ));
            }
        }
        Ok(BarsSettings {
            base_path,
            require_identity_headers: raw.require_identity_headers.unwrap_or(false),
            accepted_major_versions,
            bars_endpoints,
            extra_prefixes,
        })
    }

    fn dedup(&self, raw: RawDedup) -> Result<DedupSettings, ConfigError> {
        let backend = match raw.store.unwrap_or(StoreKind::Memory) {
            StoreKind::Memory => DedupBackend::Memory,
            StoreKind::Redis => {
                let url = raw
                    .redis_url
                    .unwrap_or_else(|| "redis://127.0.0.1:6379".to_string());
                if url.starts_with("rediss://") {
                    return Err(self.err(
                        "dedup.redis_url",
                        "TLS to Redis (rediss://) is not supported: run Redis on the same host or a \
                         private network, or reach it through a local TLS tunnel (stunnel)",
                    ));
                }
                if !(url.starts_with("redis://") || url.starts_with("unix://")) {
                    return Err(self.err(
                        "dedup.redis_url",
                        format!("{url:?} is not a redis:// or unix:// URL"),
                    ));
                }
                DedupBackend::Redis { url }
            }
        };
        let max_entries = raw.max_entries.unwrap_or(1_000_000);
        if max_entries == 0 {
            return Err(self.err("dedup.max_entries", "must be at least 1"));
        }
        let methods = raw
            .methods
            .unwrap_or_else(|| {
                ["POST", "PUT", "PATCH", "DELETE"]
                    .map(String::from)
                    .to_vec()
            })
            .iter()
            .enumerate()
            .map(|(i, m)| {
                http::Method::from_bytes(m.trim().to_ascii_uppercase().as_bytes()).map_err(|_| {
                    self.err(
                        &format!("dedup.methods[{i}]"),
                        format!("{m:?} is not an HTTP method"),
                    )
                })
            })
            .collect::<Result<_, _>>()?;
        let on_store_error = raw.on_store_error.unwrap_or(OnStoreError::Reject);
        Ok(DedupSettings {
            backend,
            ttl: HumanDuration::or(raw.ttl, secs(24 * 3600)),
            max_entries,
            methods,
            on_store_error,
            max_replay_bytes: usize::try_from(ByteSize::or(raw.max_replay_bytes, 64 << 10))
                .unwrap_or(usize::MAX),
        })
    }

    fn admin(&self, raw: RawAdmin) -> Result<AdminSettings, ConfigError> {
        let address = match raw.address.as_deref().map(str::trim) {
            Some("") => None,
            Some(a) => Some(self.socket_addr("admin.address", a)?),
            None => Some(self.socket_addr("admin.address", "127.0.0.1:9090")?),
        };
        Ok(AdminSettings { address })
    }

    fn log(&self, raw: RawLog) -> Result<LogSettings, ConfigError> {
        let level = raw.level.unwrap_or_else(|| "info".into());
        check_log_filter(&level).map_err(|m| self.err("log.level", m))?;
        let format = raw.format.unwrap_or(LogFormat::Json);
        Ok(LogSettings {
            level,
            format,
            audit: raw.audit.unwrap_or(true),
        })
    }
}

/// `n` seconds, for the defaults.
const fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

/// The level names `log.level` accepts, alone or after `target=`.
const LOG_LEVELS: [&str; 6] = ["error", "warn", "info", "debug", "trace", "off"];

/// Checks a `log.level` value: a level, or a `tracing` filter whose every directive ends in a
/// level (`info,bars_gateway=debug`). A bare word that is not a level is refused: `tracing`
/// reads "warning" as "every level of the target named warning", which silences every line,
/// ERROR included.
fn check_log_filter(value: &str) -> Result<(), String> {
    let known = LOG_LEVELS.join(", ");
    let directives: Vec<&str> = value
        .split(',')
        .map(str::trim)
        .filter(|d| !d.is_empty())
        .collect();
    if directives.is_empty() {
        return Err(format!("must name a level: one of {known}"));
    }
    for directive in directives {
        let (target, level) = match directive.rsplit_once('=') {
            Some((target, level)) => (Some(target), level.trim()),
            None => (None, directive),
        };
        if !LOG_LEVELS.contains(&level.to_ascii_lowercase().as_str()) {
            let hint = match level.to_ascii_lowercase().as_str() {
                "warning" => " (did you mean \"warn\"?)",
                "information" | "informational" | "notice" => " (did you mean \"info\"?)",
                "err" | "fatal" | "critical" | "crit" => " (did you mean \"error\"?)",
                "verbose" => " (did you mean \"debug\"?)",
                _ => "",
            };
            return Err(match target {
                None => format!(
                    "{level:?} is not a level{hint}: use one of {known}, or a filter like \
                     \"info,bars_gateway=debug\""
                ),
                Some(t) => format!(
                    "{directive:?}: {level:?} is not a level for {t:?}{hint}: use one of {known}"
                ),
            });
        }
    }
    tracing_subscriber::EnvFilter::try_new(value)
        .map(|_| ())
        .map_err(|e| format!("{value:?} is not a valid filter: {e}"))
}

/// A path prefix we are willing to route on: starts with '/', plain segments only.
fn is_clean_prefix(p: &str) -> bool {
    p.starts_with('/')
        && p.len() > 1
        && p[1..].split('/').all(|seg| {
            !seg.is_empty()
                && seg != "."
                && seg != ".."
                && seg
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-._~$".contains(&b))
        })
}

/// Parses a size like `32KiB`, `10MiB`, `1GiB`, `10MB` or a plain byte count.
pub fn parse_size(text: &str) -> Option<u64> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num.parse().ok()?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kib" | "k" => 1 << 10,
        "mib" | "m" => 1 << 20,
        "gib" | "g" => 1 << 30,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        _ => return None,
    };
    n.checked_mul(mult)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// The smallest valid config (also used by the reloader's tests).
    pub(crate) const MINIMAL: &str = r#"
[tls]
certificate = "server.pem"
private_key = "/abs/server.key"
client_ca = ["ca.pem"]

[client]
environment = "prod"

[upstream]
url = "http://127.0.0.1:8080/legacy/fhir/"
"#;

    fn parse_ok(text: &str) -> Settings {
        parse(text, Path::new("/etc/gw/config.toml")).expect("valid config")
    }

    fn parse_err(text: &str) -> String {
        parse(text, Path::new("/etc/gw/config.toml"))
            .expect_err("invalid config")
            .to_string()
    }

    #[test]
    fn minimal_config_gets_documented_defaults_and_prod_presets() {
        let s = parse_ok(MINIMAL);
        assert_eq!(s.listen.address, "0.0.0.0:8443".parse().unwrap());
        assert_eq!(s.listen.header_read_timeout, Duration::from_secs(10));
        assert_eq!(s.listen.max_header_bytes, 32 * 1024);
        assert_eq!(s.upstream.request_timeout, Duration::from_secs(5));
        assert_eq!(s.upstream.max_body, 10 * 1024 * 1024);
        assert_eq!(s.upstream.strip_headers, vec![http::header::AUTHORIZATION]);
        assert_eq!(
            s.client.allowed_ips,
            vec![
                "34.89.0.111/32".parse::<IpNet>().unwrap(),
                "34.89.69.6/32".parse().unwrap()
            ]
        );
        assert_eq!(
            s.client.allowed_subjects,
            vec!["bars-proxy.spineservices.nhs.uk"]
        );
        let url = s.upstream.url.unwrap();
        assert_eq!(url.base_path, "/legacy/fhir");
        assert_eq!(url.authority, "127.0.0.1:8080");
        assert_eq!(
            s.tls.identity,
            ServerIdentitySource::Pem {
                certificate: "/etc/gw/server.pem".into(),
                private_key: "/abs/server.key".into(),
                password_file: None
            }
        );
        assert_eq!(s.tls.client_ca, vec![PathBuf::from("/etc/gw/ca.pem")]);
        assert_eq!(s.admin.address, Some("127.0.0.1:9090".parse().unwrap()));
        assert_eq!(s.log.format, LogFormat::Json);
    }

    #[test]
    fn int_preset_sets_int_addresses_and_subject_and_explicit_keys_win() {
        let text = MINIMAL.replace("\"prod\"", "\"int\"");
        let s = parse_ok(&text);
        assert_eq!(
            s.client.allowed_ips[0],
            "35.197.254.55/32".parse::<IpNet>().unwrap()
        );
        assert_eq!(s.client.allowed_subjects, vec!["int.api.service.nhs.uk"]);
        let text = MINIMAL.replace(
            "environment = \"prod\"",
            "environment = \"int\"\nallowed_subjects = [\"Other.Example\"]",
        );
        let s = parse_ok(&text);
        assert_eq!(s.client.allowed_subjects, vec!["other.example"]);
        assert_eq!(s.client.allowed_ips.len(), 2);
    }

    #[test]
    fn unknown_key_is_refused_naming_it() {
        let msg = parse_err(&MINIMAL.replace("[upstream]", "[upstream]\ntimeout = \"5s\""));
        assert!(msg.contains("unknown field `timeout`"), "{msg}");
        assert!(msg.starts_with("/etc/gw/config.toml: "), "{msg}");
    }

    #[test]
    fn empty_allowed_ips_fails_closed() {
        let msg = parse_err(&MINIMAL.replace(
            "environment = \"prod\"",
            "allowed_ips = []\nallowed_subjects=[\"a\"]",
        ));
        assert!(msg.contains("client.allowed_ips"), "{msg}");
        let msg = parse_err(&MINIMAL.replace("environment = \"prod\"", "environment = \"custom\""));
        assert!(msg.contains("client.allowed_ips: required"), "{msg}");
    }

    #[test]
    fn completion_timeout_defaults_to_two_minutes_and_must_cover_the_request_timeout() {
        let s = parse_ok(MINIMAL);
        assert_eq!(s.upstream.completion_timeout, Duration::from_secs(120));
        assert_eq!(s.upstream.max_response_header_bytes, 64 * 1024);
        assert_eq!(s.dedup.max_replay_bytes, 64 * 1024);
        let msg = parse_err(&MINIMAL.replace(
            "[upstream]",
            "[upstream]\nrequest_timeout = \"10s\"\ncompletion_timeout = \"5s\"",
        ));
        assert!(
            msg.contains(
                "upstream.completion_timeout: must be at least upstream.request_timeout (10s)"
            ),
            "{msg}"
        );
        let msg = parse_err(&MINIMAL.replace(
            "[upstream]",
            "[upstream]\nmax_response_header_bytes = \"lots\"",
        ));
        assert!(msg.contains("upstream.max_response_header_bytes"), "{msg}");
    }

    #[test]
    fn bad_values_name_their_key() {
        let cases = [
            (
                "[upstream]",
                "[upstream]\nrequest_timeout = \"soon\"",
                "upstream.request_timeout",
            ),
            (
                "[upstream]",
                "[upstream]\nmax_body = \"ten\"",
                "upstream.max_body",
            ),
            (
                "url = \"http://127.0.0.1:8080/legacy/fhir/\"",
                "url = \"https://x\"",
                "upstream.url",
            ),
            (
                "[client]",
                "[client]\npinned_fingerprints = [\"abc\"]",
                "client.pinned_fingerprints[0]",
            ),
            (
                "[client]",
                "[client]\nallowed_subjects = [\"CN=x, O=nhs\"]",
                "client.allowed_subjects[0]",
            ),
            ("[tls]", "[tls]\nmin_version = \"1.1\"", "tls.min_version"),
            ("[tls]", "[tls]\npkcs12 = \"x.pfx\"", "tls.pkcs12"),
            (
                "client_ca = [\"ca.pem\"]",
                "client_ca = []",
                "tls.client_ca",
            ),
            (
                "[client]",
                "[bars]\nallowed_paths = [\"../x\"]\n[client]",
                "bars.allowed_paths[0]",
            ),
        ];
        for (from, to, key) in cases {
            let msg = parse_err(&MINIMAL.replace(from, to));
            assert!(msg.contains(key), "expected {key} in {msg}");
        }
    }

    #[test]
    fn errors_serde_reports_name_the_key_they_are_about() {
        let cases = [
            (
                "[upstream]",
                "[upstream]\ntimeout = \"5s\"",
                "upstream.timeout: unknown field `timeout`",
            ),
            (
                "[upstream]",
                "[upstream]\nrequest_timeout = 5",
                "upstream.request_timeout: invalid type",
            ),
            (
                "[upstream]",
                "[upstream]\nrequest_timeout = \"0s\"",
                "upstream.request_timeout: must be greater than zero",
            ),
            (
                "[tls]",
                "[tls]\nmin_version = \"1.1\"",
                "tls.min_version: unknown variant `1.1`",
            ),
            (
                "[client]",
                "[client]\nallowed_ips = [\"1.2.3.4/32\", 7]",
                "client.allowed_ips[1]: invalid type",
            ),
            (
                "[upstream]",
                "[upstream]\n[[upstream.route]]\nurl = \"http://x\"\n[upstream",
                "(syntax): ",
            ),
            (
                "[upstream]",
                "[log]\nformat = \"xml\"\n[upstream]",
                "log.format: unknown variant `xml`",
            ),
        ];
        for (from, to, expected) in cases {
            let msg = parse_err(&MINIMAL.replace(from, to));
            assert!(msg.starts_with("/etc/gw/config.toml: "), "{msg}");
            assert!(msg.contains(expected), "expected {expected:?} in {msg}");
        }
    }

    #[test]
    fn dedup_defaults_and_choices() {
        let s = parse_ok(MINIMAL);
        assert_eq!(s.dedup.backend, DedupBackend::Memory);
        assert_eq!(s.dedup.ttl, Duration::from_secs(24 * 3600));
        assert_eq!(s.dedup.methods.len(), 4);
        assert_eq!(s.dedup.on_store_error, OnStoreError::Reject);
        let s = parse_ok(&format!("{MINIMAL}\n[dedup]\nstore = \"redis\"\nmethods = [\"post\"]\non_store_error = \"allow\"\n"));
        assert_eq!(
            s.dedup.backend,
            DedupBackend::Redis {
                url: "redis://127.0.0.1:6379".into()
            }
        );
        assert_eq!(s.dedup.methods, vec![http::Method::POST]);
        assert_eq!(s.dedup.on_store_error, OnStoreError::Allow);
        let msg = parse_err(&format!(
            "{MINIMAL}\n[dedup]\nstore = \"redis\"\nredis_url = \"rediss://r:6380\"\n"
        ));
        assert!(
            msg.contains("dedup.redis_url") && msg.contains("not supported"),
            "{msg}"
        );
        let msg = parse_err(&format!("{MINIMAL}\n[dedup]\nstore = \"disk\"\n"));
        assert!(msg.contains("dedup.store"), "{msg}");
    }

    #[test]
    fn sizes_and_pins_parse() {
        assert_eq!(parse_size("32KiB"), Some(32768));
        assert_eq!(parse_size("10MiB"), Some(10 << 20));
        assert_eq!(parse_size("100"), Some(100));
        assert_eq!(parse_size("1 GB"), Some(1_000_000_000));
        assert_eq!(parse_size("MiB"), None);
        assert!(matches!(
            parse_pin("CE:78:08:83:9f:72:ea:8e:d4:54:8b:4d:e3:75:46:be:d5:d6:dc:9f"),
            Some(Pin::Sha1(_))
        ));
        assert!(matches!(
            parse_pin("b51d8a07064b779d6a4e8ada1ec73c8f888b9060c9ff846cab119becb1467d1d"),
            Some(Pin::Sha256(_))
        ));
    }

    #[test]
    fn the_example_config_is_valid() {
        let text = include_str!("../config.example.toml");
        let s = parse_ok(text);
        assert_eq!(s.client.environment, Environment::Prod);
        assert_eq!(s.client.allowed_subjects, vec![PROD_PROXY_SUBJECT]);
        // Its commented-out keys are valid too once uncommented.
        let uncommented = text
            .replace("# pkcs12 = ", "pkcs12 = ")
            .replace("# pkcs12_password_file = ", "pkcs12_password_file = ")
            .replace("certificate = \"/etc", "# certificate = \"/etc")
            .replace("private_key = \"/etc", "# private_key = \"/etc")
            .replace("# allowed_ips = ", "allowed_ips = ")
            .replace("# allowed_subjects = ", "allowed_subjects = ")
            .replace("# [[upstream.route]]", "[[upstream.route]]")
            .replace("# target = ", "target = ")
            .replace("# url = \"http://10", "url = \"http://10");
        let s = parse_ok(&uncommented);
        assert!(matches!(
            s.tls.identity,
            ServerIdentitySource::Pkcs12 { .. }
        ));
        assert_eq!(s.upstream.routes.len(), 1);
    }

    #[test]
    fn log_level_must_be_a_level_not_a_word_that_silences_everything() {
        for bad in [
            "warning",
            "information",
            "WARNING",
            "info,bars_gateway=verbose",
            "",
        ] {
            let msg = parse_err(&format!("{MINIMAL}\n[log]\nlevel = \"{bad}\"\n"));
            assert!(msg.contains("log.level"), "{bad}: {msg}");
        }
        let msg = parse_err(&format!("{MINIMAL}\n[log]\nlevel = \"warning\"\n"));
        assert!(msg.contains("did you mean \"warn\""), "{msg}");
        for good in [
            "warn",
            "INFO",
            "error",
            "info,bars_gateway=debug",
            "off",
            "debug,hyper=warn",
        ] {
            let s = parse_ok(&format!("{MINIMAL}\n[log]\nlevel = \"{good}\"\n"));
            assert_eq!(s.log.level, good);
        }
    }

    #[test]
    fn allowed_paths_may_widen_the_bars_set() {
        let s = parse_ok(&MINIMAL.replace(
            "[client]",
            "[bars]\nallowed_paths = [\"bars\", \"/Patient/\"]\n[client]",
        ));
        assert!(s.bars.bars_endpoints);
        assert_eq!(s.bars.extra_prefixes, vec!["/Patient"]);
    }
}

//! `bars-gateway check`: loads and validates everything `run` would, and prints a report an
//! operator can read: certificates with fingerprints and days to expiry, CRLs, the effective
//! admission lists and the upstreams. Exit 0 when all is usable, 1 otherwise.

use std::fmt::Write as _;
use std::path::Path;

use crate::config::{self, DedupBackend, Environment, ServerIdentitySource, Settings};
use crate::tls::inspect::{format_time, unix_now, CertSummary};
use crate::tls::nhs::{self, NhsEnvironment};

/// Certificates expiring within this many days get a warning.
pub const EXPIRY_WARNING_DAYS: i64 = 30;

/// The outcome of `check`.
#[derive(Debug)]
pub struct CheckReport {
    /// The human-readable report.
    pub text: String,
    /// Problems that make the configuration unusable (exit 1).
    pub errors: Vec<String>,
    /// Problems that need attention soon (exit 0).
    pub warnings: Vec<String>,
}

impl CheckReport {
    /// Whether `run` would start.
    pub fn ok(&self) -> bool {
        self.errors.is_empty()
    }
}

/// Checks the config file at `path`.
pub fn check(path: &Path) -> CheckReport {
    let mut report = CheckReport {
        text: format!(
            "bars-gateway {} check of {}\n",
            env!("CARGO_PKG_VERSION"),
            path.display()
        ),
        errors: Vec::new(),
        warnings: Vec::new(),
    };
    let settings = match config::load(path) {
        Ok(s) => s,
        Err(e) => {
            report.errors.push(e.to_string());
            return finish(report);
        }
    };
    let _ = writeln!(report.text, "config: ok");
    describe_settings(&settings, &mut report.text);
    warn_about_replaced_presets(&settings, &mut report);
    describe_dedup(&settings, &mut report);
    match crate::tls::load(&settings.tls, &settings.client) {
        Err(e) => report.errors.push(e.to_string()),
        Ok(loaded) => {
            let now = unix_now();
            let _ = writeln!(
                report.text,
                "\nserver certificate chain ({}):",
                identity_source(&settings)
            );
            for (i, cert) in loaded.server_chain.iter().enumerate() {
                let role = if i == 0 { "server" } else { "intermediate" };
                describe_cert(&mut report, role, cert, now);
            }
            if loaded.server_leaf().is_self_issued() {
                report.warnings.push(format!(
                    "{}: the server certificate {} is self-signed: the BaRS proxy trusts only \
                     certificates issued under the NHS root. Request one with a CSR (README, \
                     docs/operations.md \"Certificates\")",
                    identity_source(&settings),
                    loaded.server_leaf().display_name()
                ));
            } else if let [leaf] = loaded.server_chain.as_slice() {
                if leaf.subject != leaf.issuer {
                    report.warnings.push(format!(
                        "{}: the server certificate is served alone, without the CA that issued it \
                         ({}); a client that trusts only the root cannot verify it. Append the \
                         intermediate to the PEM, or build the .pfx with `openssl pkcs12 -export \
                         ... -certfile <intermediate>.pem`",
                        identity_source(&settings),
                        leaf.issuer
                    ));
                }
            }
            let _ = writeln!(report.text, "  private key: matches the server certificate");
            let _ = writeln!(report.text, "\ntrusted client CAs:");
            for (file, cert) in &loaded.client_cas {
                let _ = writeln!(report.text, "  file: {}", file.display());
                describe_cert(&mut report, "client CA", cert, now);
                if let Some(known) = nhs::identify(cert) {
                    let _ = writeln!(
                        report.text,
                        "    recognised: {} ({})",
                        known.name,
                        known.environment.label()
                    );
                }
            }
            warn_about_ca_environment(&settings, &loaded.client_cas, &mut report);
            if !loaded.crls.is_empty() {
                let _ = writeln!(report.text, "\nCRLs:");
            }
            for (file, crl) in &loaded.crls {
                let next = crl
                    .next_update
                    .map(format_time)
                    .unwrap_or_else(|| "-".into());
                let _ = writeln!(
                    report.text,
                    "  {}\n    issuer: {}\n    revoked: {}\n    this update: {}\n    next update: {}",
                    file.display(),
                    crl.issuer,
                    crl.revoked,
                    format_time(crl.this_update),
                    next
                );
                if crl.next_update.is_some_and(|n| n < now) {
                    report.warnings.push(format!(
                        "tls.client_crl ({}): the CRL's next update ({next}) has passed: fetch a fresh one",
                        file.display()
                    ));
                }
            }
        }
    }
    if let Some(egress) = &settings.egress {
        crate::egress::report::describe(egress, &mut report.text, &mut report.errors);
    }
    finish(report)
}

/// Warns when the configured CAs do not fit `client.environment`: PROD without a PROD NHS CA
/// (the PROD proxy's certificate would not verify), or INT with a PROD one.
fn warn_about_ca_environment(
    settings: &Settings,
    cas: &[(std::path::PathBuf, CertSummary)],
    report: &mut CheckReport,
) {
    let known: Vec<_> = cas.iter().filter_map(|(_, c)| nhs::identify(c)).collect();
    let has_prod = known.iter().any(|k| k.environment == NhsEnvironment::Prod);
    let names = |env: NhsEnvironment| {
        nhs::KNOWN_CAS
            .iter()
            .filter(|k| k.environment == env)
            .map(|k| k.name)
            .collect::<Vec<_>>()
            .join(" and ")
    };
    match settings.client.environment {
        Environment::Prod if !has_prod => report.warnings.push(format!(
            "client.environment = \"prod\" but no PROD NHS CA is among tls.client_ca (expected \
             {}, recognised by their published thumbprints): the PROD BaRS proxy's certificate \
             will not verify. See docs/operations.md, \"Certificates\"",
            names(NhsEnvironment::Prod)
        )),
        Environment::Int if has_prod => report.warnings.push(
            "client.environment = \"int\" but tls.client_ca holds a PROD NHS CA: INT (path to \
             live) clients chain to the path-to-live CAs, and a PROD CA on an INT receiver admits \
             PROD certificates. See docs/operations.md, \"Certificates\""
                .into(),
        ),
        _ => {}
    }
}

/// Warns when an explicit `allowed_ips` or `allowed_subjects` replaces the environment preset
/// (allowed, but an old copy-pasted list is a common reason the proxy is refused).
fn warn_about_replaced_presets(settings: &Settings, report: &mut CheckReport) {
    let (env, ips, subject): (&str, &[&str], &str) = match settings.client.environment {
        Environment::Int => ("int", &config::INT_PROXY_IPS, config::INT_PROXY_SUBJECT),
        Environment::Prod => ("prod", &config::PROD_PROXY_IPS, config::PROD_PROXY_SUBJECT),
        Environment::Custom => return,
    };
    let preset: Vec<ipnet::IpNet> = ips.iter().filter_map(|s| s.parse().ok()).collect();
    if settings.client.allowed_ips != preset {
        report.warnings.push(format!(
            "client.allowed_ips replaces the {env} preset ({}); the BaRS proxy connects from those \
             addresses only: remove the key to use the preset",
            ips.join(", ")
        ));
    }
    if settings.client.allowed_subjects != [subject] {
        report.warnings.push(format!(
            "client.allowed_subjects replaces the {env} preset ({subject}): remove the key to use \
             the preset"
        ));
    }
}

/// `redis://user:password@host:6379/0` with the password replaced by `***` (a lone userinfo,
/// which some write as the password, is replaced whole).
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    match authority.rsplit_once('@') {
        Some((userinfo, host)) => match userinfo.split_once(':') {
            Some((user, _password)) => format!("{scheme}://{user}:***@{host}{path}"),
            None => format!("{scheme}://***@{host}{path}"),
        },
        None => url.to_string(),
    }
}

/// How long `check` waits for Redis to answer PING.
const REDIS_CHECK_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// The `[dedup]` section: store, TTL, the Redis URL (password redacted) and whether Redis
/// answers PING. An unreachable Redis is a warning: `run` starts without it and follows
/// `dedup.on_store_error`.
fn describe_dedup(settings: &Settings, report: &mut CheckReport) {
    let d = &settings.dedup;
    let methods: Vec<&str> = d.methods.iter().map(|m| m.as_str()).collect();
    let on_error = match d.on_store_error {
        config::OnStoreError::Reject => "reject",
        config::OnStoreError::Allow => "allow",
    };
    let _ = writeln!(report.text, "\ndedup:");
    match &d.backend {
        DedupBackend::Memory => {
            let _ = writeln!(
                report.text,
                "  store: memory (at most {} entries, lost on restart)",
                d.max_entries
            );
        }
        DedupBackend::Redis { url } => {
            let _ = writeln!(report.text, "  store: redis {}", redact_url(url));
            match ping_redis(url) {
                Ok(()) => {
                    let _ = writeln!(report.text, "  redis: answers PING");
                }
                Err(e) => {
                    let _ = writeln!(report.text, "  redis: no answer ({e})");
                    report.warnings.push(format!(
                        "dedup.redis_url ({}): Redis does not answer PING ({e}); the gateway \
                         starts anyway, reports not ready and follows dedup.on_store_error = \
                         \"{on_error}\" until it does",
                        redact_url(url)
                    ));
                }
            }
        }
    }
    let _ = writeln!(
        report.text,
        "  ttl: {}\n  methods: {}\n  on store error: {on_error}",
        humantime::format_duration(d.ttl),
        methods.join(", ")
    );
}

fn ping_redis(url: &str) -> Result<(), String> {
    let client = redis::Client::open(url).map_err(|e| e.to_string())?;
    let mut connection = client
        .get_connection_with_timeout(REDIS_CHECK_TIMEOUT)
        .map_err(|e| e.to_string())?;
    connection
        .set_read_timeout(Some(REDIS_CHECK_TIMEOUT))
        .map_err(|e| e.to_string())?;
    let pong: String = redis::cmd("PING")
        .query(&mut connection)
        .map_err(|e| e.to_string())?;
    if pong == "PONG" {
        Ok(())
    } else {
        Err(format!("unexpected answer {pong:?}"))
    }
}

fn finish(mut report: CheckReport) -> CheckReport {
    for w in &report.warnings {
        let _ = writeln!(report.text, "WARNING: {w}");
    }
    for e in &report.errors {
        let _ = writeln!(report.text, "ERROR: {e}");
    }
    let verdict = if report.ok() { "OK" } else { "FAILED" };
    let _ = writeln!(report.text, "\nresult: {verdict}");
    report
}

fn identity_source(settings: &Settings) -> String {
    match &settings.tls.identity {
        ServerIdentitySource::Pem {
            certificate,
            private_key,
            ..
        } => {
            format!(
                "tls.certificate {}, tls.private_key {}",
                certificate.display(),
                private_key.display()
            )
        }
        ServerIdentitySource::Pkcs12 { path, .. } => format!("tls.pkcs12 {}", path.display()),
    }
}

fn describe_cert(report: &mut CheckReport, role: &str, cert: &CertSummary, now: i64) {
    let days = cert.days_left(now);
    let _ = writeln!(
        report.text,
        "  {role}: {}\n    issuer: {}\n    sha256: {}\n    sha1: {}\n    not after: {} ({days} days left)",
        cert.subject,
        cert.issuer,
        cert.sha256_hex(),
        cert.sha1_hex(),
        format_time(cert.not_after),
    );
    if days < 0 {
        report
            .warnings
            .push(format!("{role} {} has expired", cert.display_name()));
    } else if days < EXPIRY_WARNING_DAYS {
        report.warnings.push(format!(
            "{role} {} expires in {days} days ({})",
            cert.display_name(),
            format_time(cert.not_after)
        ));
    }
}

fn describe_settings(s: &Settings, out: &mut String) {
    let env = match s.client.environment {
        Environment::Int => "int",
        Environment::Prod => "prod",
        Environment::Custom => "custom",
    };
    let list = |v: Vec<String>| {
        if v.is_empty() {
            "(none)".to_string()
        } else {
            v.join(", ")
        }
    };
    let _ = writeln!(out, "listen: {}", s.listen.address);
    let _ = writeln!(
        out,
        "trusted proxies (PROXY protocol): {}",
        list(
            s.listen
                .trusted_proxies
                .iter()
                .map(|n| n.to_string())
                .collect()
        )
    );
    let _ = writeln!(out, "client environment: {env}");
    let _ = writeln!(
        out,
        "allowed client addresses: {}",
        list(s.client.allowed_ips.iter().map(|n| n.to_string()).collect())
    );
    let _ = writeln!(
        out,
        "allowed client subjects: {}",
        list(s.client.allowed_subjects.clone())
    );
    let _ = writeln!(
        out,
        "pinned fingerprints: {}",
        s.client.pinned_fingerprints.len()
    );
    match &s.upstream.url {
        Some(u) => {
            let _ = writeln!(out, "upstream: {}", u.uri);
        }
        None => {
            let _ = writeln!(out, "upstream: (none: only routes)");
        }
    }
    for (target, url) in &s.upstream.routes {
        let _ = writeln!(out, "  route {target} -> {}", url.uri);
    }
    let base = if s.bars.base_path.is_empty() {
        "/"
    } else {
        &s.bars.base_path
    };
    let _ = writeln!(out, "BaRS base path: {base}");
    match s.admin.address {
        Some(a) => {
            let _ = writeln!(out, "admin: http://{a}");
        }
        None => {
            let _ = writeln!(out, "admin: disabled");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redis_passwords_never_reach_the_report() {
        assert_eq!(
            redact_url("redis://gw:s3cret@10.0.0.7:6379/2"),
            "redis://gw:***@10.0.0.7:6379/2"
        );
        assert_eq!(redact_url("redis://:s3cret@r:6379"), "redis://:***@r:6379");
        assert_eq!(redact_url("redis://s3cret@r"), "redis://***@r");
        assert_eq!(
            redact_url("redis://127.0.0.1:6379"),
            "redis://127.0.0.1:6379"
        );
        assert_eq!(
            redact_url("unix:///run/redis/redis.sock"),
            "unix:///run/redis/redis.sock"
        );
    }
}

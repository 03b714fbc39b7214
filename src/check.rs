//! `bars-gateway check`: loads and validates everything `run` would, and prints a report an
//! operator can read: certificates with fingerprints and days to expiry, CRLs, the effective
//! admission lists and the upstreams. Exit 0 when all is usable, 1 otherwise.

use std::fmt::Write as _;
use std::path::Path;

use crate::config::{self, Environment, ServerIdentitySource, Settings};
use crate::tls::inspect::{format_time, unix_now, CertSummary};

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
            if let [leaf] = loaded.server_chain.as_slice() {
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
            }
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

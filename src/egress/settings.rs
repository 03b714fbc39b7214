//! `[egress]`: the raw TOML section (unknown keys refused) and its validated form. Every error names
//! the config file and the key, like the rest of `config.rs`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use http::Uri;
use ipnet::IpNet;
use serde::Deserialize;

use crate::admission::parse_cidr;
use crate::config::{ByteSize, ConfigError, HumanDuration, Validator};

/// The BaRS API base URL in INT (BARS-CONTEXT.md "The sender side").
pub(crate) const INT_API_BASE: &str = "https://int.api.service.nhs.uk/booking-and-referral/FHIR/R4";
/// The NHS API platform's OAuth 2.0 token endpoint in INT.
pub(crate) const INT_TOKEN_URL: &str = "https://int.api.service.nhs.uk/oauth2/token";
/// The BaRS API base URL in PROD.
pub(crate) const PROD_API_BASE: &str = "https://api.service.nhs.uk/booking-and-referral/FHIR/R4";
/// The token endpoint in PROD.
pub(crate) const PROD_TOKEN_URL: &str = "https://api.service.nhs.uk/oauth2/token";
/// The BaRS sandbox: open, no token.
pub(crate) const SANDBOX_API_BASE: &str =
    "https://sandbox.api.service.nhs.uk/booking-and-referral/FHIR/R4";

/// The systemd credential looked up in `$CREDENTIALS_DIRECTORY` when `api_key_file` is not set.
pub(crate) const API_KEY_CREDENTIAL: &str = "api-key";
/// The systemd credential holding the password of an encrypted `signing_key`.
pub(crate) const SIGNING_KEY_PASSWORD_CREDENTIAL: &str = "egress-key-password";

/// Which NHS API platform environment the presets point at.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EgressEnvironment {
    /// Path to Live integration.
    Int,
    /// Production.
    Prod,
    /// The open sandbox: no token, no key.
    Sandbox,
    /// No presets: `api_base` (and `token_url` unless `authentication = false`) must be given.
    Custom,
}

/// How the gateway authenticates to the BaRS API.
#[derive(Debug, Clone, PartialEq)]
pub struct SignedJwtSettings {
    /// The OAuth 2.0 token endpoint (also the JWT's `aud`).
    pub token_url: Uri,
    /// The `kid` registered with the platform, e.g. `MySupplier-INT-1`.
    pub key_id: String,
    /// The RSA private key (PEM: PKCS#8 plain or encrypted, or PKCS#1).
    pub signing_key: PathBuf,
    /// Password file of an encrypted `signing_key`.
    pub signing_key_password_file: Option<PathBuf>,
    /// The API key file; `None` = the systemd credential `api-key`.
    pub api_key_file: Option<PathBuf>,
}

/// The retry rules of BaRS senders (BARS-CONTEXT.md "Retries"), bounded.
#[derive(Debug, Clone, PartialEq)]
pub struct RetrySettings {
    /// Most attempts per request, the first included.
    pub max_attempts: u32,
    /// Wall time from the first attempt after which no new attempt starts.
    pub retry_budget: Duration,
    /// Time allowed for one attempt's response headers.
    pub attempt_timeout: Duration,
    /// First backoff; doubled each retry, with jitter.
    pub initial_backoff: Duration,
    /// Largest backoff between two attempts (a longer `Retry-After` still wins, within the budget).
    pub max_backoff: Duration,
}

/// `[egress]`, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct EgressSettings {
    /// The plain-HTTP listener for the legacy system.
    pub address: SocketAddr,
    /// Who may send through it (default loopback only).
    pub allowed_ips: Vec<IpNet>,
    /// The preset in force.
    pub environment: EgressEnvironment,
    /// BaRS API base URL (`https`, may carry a path).
    pub api_base: Uri,
    /// Signed-JWT authentication; `None` for the sandbox.
    pub auth: Option<SignedJwtSettings>,
    /// Extra CA files trusted for the BaRS API and token endpoint instead of the system store.
    pub ca: Vec<PathBuf>,
    /// The sender's ODS code, for NHSD-End-User-Organisation.
    pub ods_code: Option<String>,
    /// The sender organisation's name.
    pub organisation_name: Option<String>,
    /// NHSD-Requesting-Software: product name.
    pub software_name: String,
    /// NHSD-Requesting-Software: product version.
    pub software_version: String,
    /// NHSD-Requesting-Software: device identifier (`system|value` or a bare value).
    pub device_id: String,
    /// The BaRS API version for `Accept` and `Content-Type` when the legacy system sends none.
    pub bars_version: String,
    /// Retry rules.
    pub retry: RetrySettings,
    /// TCP connect timeout to the BaRS API and the token endpoint.
    pub connect_timeout: Duration,
    /// Largest request body accepted from the legacy system (it is kept for retries).
    pub max_body: u64,
}

/// The raw `[egress]` table.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawEgress {
    address: Option<String>,
    allowed_ips: Option<Vec<String>>,
    environment: Option<EgressEnvironment>,
    api_base: Option<String>,
    token_url: Option<String>,
    key_id: Option<String>,
    signing_key: Option<String>,
    signing_key_password_file: Option<String>,
    api_key_file: Option<String>,
    ca: Option<Vec<String>>,
    ods_code: Option<String>,
    organisation_name: Option<String>,
    software_name: Option<String>,
    software_version: Option<String>,
    device_id: Option<String>,
    bars_version: Option<String>,
    max_attempts: Option<u32>,
    retry_budget: Option<HumanDuration>,
    attempt_timeout: Option<HumanDuration>,
    initial_backoff: Option<HumanDuration>,
    max_backoff: Option<HumanDuration>,
    connect_timeout: Option<HumanDuration>,
    max_body: Option<ByteSize>,
}

/// The `[egress]` checks on top of config.rs's validator: keys are prefixed `egress.`.
struct Check<'a>(&'a Validator);

impl Check<'_> {
    fn err(&self, key: &str, message: impl Into<String>) -> ConfigError {
        self.0.err(&format!("egress.{key}"), message)
    }

    fn path(&self, key: &str, value: &str) -> Result<PathBuf, ConfigError> {
        self.0.path(&format!("egress.{key}"), value)
    }

    fn optional_path(
        &self,
        key: &str,
        value: Option<String>,
    ) -> Result<Option<PathBuf>, ConfigError> {
        self.0.optional_path(&format!("egress.{key}"), value)
    }

    fn https_url(&self, key: &str, value: &str) -> Result<Uri, ConfigError> {
        let uri: Uri = value
            .trim()
            .trim_end_matches('/')
            .parse()
            .map_err(|e| self.err(key, format!("{value:?} is not a URL: {e}")))?;
        if uri.scheme_str() != Some("https") {
            return Err(self.err(key, "must be an https:// URL"));
        }
        if uri.host().is_none_or(str::is_empty) {
            return Err(self.err(key, "has no host"));
        }
        if uri.query().is_some() {
            return Err(self.err(key, "must not carry a query"));
        }
        Ok(uri)
    }

    fn text(&self, key: &str, value: Option<String>) -> Result<Option<String>, ConfigError> {
        match value {
            None => Ok(None),
            Some(v) if v.trim().is_empty() => Ok(None),
            Some(v) if v.chars().any(char::is_control) => {
                Err(self.err(key, "must not contain control characters"))
            }
            Some(v) => Ok(Some(v.trim().to_string())),
        }
    }
}

/// Validates `[egress]` (relative paths resolve against the config file's directory).
pub(crate) fn validate(raw: RawEgress, v: &Validator) -> Result<EgressSettings, ConfigError> {
    let c = Check(v);
    let address_text = raw.address.as_deref().unwrap_or("127.0.0.1:8081");
    let address: SocketAddr = address_text.trim().parse().map_err(|_| {
        c.err(
            "address",
            format!("{address_text:?} is not an address like \"127.0.0.1:8081\""),
        )
    })?;
    let allowed_ips = raw
        .allowed_ips
        .unwrap_or_else(|| vec!["127.0.0.1/32".into(), "::1/128".into()])
        .iter()
        .enumerate()
        .map(|(i, v)| parse_cidr(v).map_err(|m| c.err(&format!("allowed_ips[{i}]"), m)))
        .collect::<Result<Vec<_>, _>>()?;
    if allowed_ips.is_empty() {
        return Err(c.err(
            "allowed_ips",
            "must list at least one CIDR (it fails closed)",
        ));
    }
    let environment = raw.environment.unwrap_or(EgressEnvironment::Int);
    let (api_preset, token_preset) = match environment {
        EgressEnvironment::Int => (Some(INT_API_BASE), Some(INT_TOKEN_URL)),
        EgressEnvironment::Prod => (Some(PROD_API_BASE), Some(PROD_TOKEN_URL)),
        EgressEnvironment::Sandbox => (Some(SANDBOX_API_BASE), None),
        EgressEnvironment::Custom => (None, None),
    };
    let api_base_text = raw
        .api_base
        .as_deref()
        .or(api_preset)
        .ok_or_else(|| c.err("api_base", "required with environment = \"custom\""))?;
    let api_base = c.https_url("api_base", api_base_text)?;
    let ca = raw
        .ca
        .unwrap_or_default()
        .iter()
        .enumerate()
        .map(|(i, p)| c.path(&format!("ca[{i}]"), p))
        .collect::<Result<Vec<_>, _>>()?;
    // The sandbox is open; every other environment needs the signed-JWT flow, and a custom one
    // (a test stand-in) uses it when a token_url is given.
    let token_url_text = raw.token_url.as_deref().or(token_preset);
    let auth = match (environment, token_url_text) {
        (EgressEnvironment::Sandbox, _) | (EgressEnvironment::Custom, None) => None,
        (_, None) => None,
        (_, Some(token_url)) => {
            let token_url = c.https_url("token_url", token_url)?;
            let key_id = c.text("key_id", raw.key_id)?.ok_or_else(|| {
                c.err(
                    "key_id",
                    "required: the KID registered with the platform, e.g. \"MySupplier-INT-1\"",
                )
            })?;
            let signing_key = c.path(
                "signing_key",
                raw.signing_key.as_deref().ok_or_else(|| {
                    c.err(
                        "signing_key",
                        "required: the RSA private key (PEM) whose public key is registered",
                    )
                })?,
            )?;
            Some(SignedJwtSettings {
                token_url,
                key_id,
                signing_key,
                signing_key_password_file: c
                    .optional_path("signing_key_password_file", raw.signing_key_password_file)?,
                api_key_file: c.optional_path("api_key_file", raw.api_key_file)?,
            })
        }
    };
    let ods_code = c.text("ods_code", raw.ods_code)?;
    if let Some(code) = &ods_code {
        if !code.chars().all(|ch| ch.is_ascii_alphanumeric()) {
            return Err(c.err(
                "ods_code",
                "an ODS code is letters and digits, e.g. \"A1001\"",
            ));
        }
    }
    let max_attempts = raw.max_attempts.unwrap_or(4);
    if max_attempts == 0 {
        return Err(c.err("max_attempts", "must be at least 1"));
    }
    let retry = RetrySettings {
        max_attempts,
        retry_budget: HumanDuration::or(raw.retry_budget, Duration::from_secs(30)),
        attempt_timeout: HumanDuration::or(raw.attempt_timeout, Duration::from_secs(10)),
        initial_backoff: HumanDuration::or(raw.initial_backoff, Duration::from_millis(500)),
        max_backoff: HumanDuration::or(raw.max_backoff, Duration::from_secs(8)),
    };
    let max_body = ByteSize::or(raw.max_body, 10 << 20);
    let bars_version = c
        .text("bars_version", raw.bars_version)?
        .unwrap_or_else(|| "1.1.0".into());
    if bars_version.split('.').any(|p| p.parse::<u64>().is_err()) {
        return Err(c.err("bars_version", "must be a version like \"1.1.0\""));
    }
    Ok(EgressSettings {
        address,
        allowed_ips,
        environment,
        api_base,
        auth,
        ca,
        ods_code,
        organisation_name: c.text("organisation_name", raw.organisation_name)?,
        software_name: c
            .text("software_name", raw.software_name)?
            .unwrap_or_else(|| "bars-gateway".into()),
        software_version: c
            .text("software_version", raw.software_version)?
            .unwrap_or_else(|| env!("CARGO_PKG_VERSION").into()),
        device_id: c
            .text("device_id", raw.device_id)?
            .unwrap_or_else(|| "bars-gateway".into()),
        bars_version,
        retry,
        connect_timeout: HumanDuration::or(raw.connect_timeout, Duration::from_secs(5)),
        max_body,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn parse(text: &str) -> Result<EgressSettings, ConfigError> {
        #[derive(serde::Deserialize)]
        struct Doc {
            egress: RawEgress,
        }
        let v = Validator {
            file: "/etc/bg/config.toml".into(),
            dir: "/etc/bg".into(),
        };
        let doc: Doc = v.read_toml(&format!("[egress]\n{text}"))?;
        validate(doc.egress, &v)
    }

    #[test]
    fn int_preset_needs_a_key_id_and_a_signing_key() {
        let e = parse("").unwrap_err().to_string();
        assert!(e.contains("egress.key_id"), "{e}");
        let s = parse("key_id = \"S-INT-1\"\nsigning_key = \"k.pem\"").unwrap();
        assert_eq!(s.api_base.to_string(), INT_API_BASE);
        let auth = s.auth.unwrap();
        assert_eq!(auth.token_url.to_string(), INT_TOKEN_URL);
        assert_eq!(auth.signing_key, Path::new("/etc/bg/k.pem"));
        assert_eq!(s.retry.max_attempts, 4);
        assert_eq!(s.retry.retry_budget, Duration::from_secs(30));
        assert_eq!(s.address.to_string(), "127.0.0.1:8081");
        assert_eq!(s.allowed_ips.len(), 2);
    }

    #[test]
    fn sandbox_needs_no_key_and_custom_needs_an_api_base() {
        let s = parse("environment = \"sandbox\"").unwrap();
        assert!(s.auth.is_none());
        assert_eq!(s.api_base.to_string(), SANDBOX_API_BASE);
        let e = parse("environment = \"custom\"").unwrap_err().to_string();
        assert!(e.contains("egress.api_base"), "{e}");
    }

    #[test]
    fn the_example_configs_egress_block_is_valid_once_uncommented() {
        let text = include_str!("../../config.example.toml");
        let start = text.find("# [egress]\n").expect("an [egress] block");
        let end = start + text[start..].find("\n[admin]").expect("[admin] after it");
        let block: String = text[start..end]
            .lines()
            .filter_map(|l| l.strip_prefix("# "))
            .filter(|l| l.starts_with("[egress]") || l.contains(" = "))
            .map(|l| format!("{l}\n"))
            .collect();
        let table: toml::Table = toml::from_str(&block).unwrap();
        let raw: RawEgress = table["egress"].clone().try_into().unwrap();
        let v = Validator {
            file: "/etc/bg/config.toml".into(),
            dir: "/etc/bg".into(),
        };
        let s = validate(raw, &v).unwrap();
        assert_eq!(s.environment, EgressEnvironment::Int);
        assert_eq!(s.ods_code.as_deref(), Some("A1001"));
        assert_eq!(s.retry.max_attempts, 4);
        assert!(s.auth.is_some());
    }

    #[test]
    fn bad_values_name_their_key() {
        for (text, key) in [
            ("environment = \"dev\"", "egress.environment"),
            (
                "environment = \"sandbox\"\napi_base = \"http://x\"",
                "egress.api_base",
            ),
            (
                "environment = \"sandbox\"\nmax_attempts = 0",
                "egress.max_attempts",
            ),
            (
                "environment = \"sandbox\"\nretry_budget = \"soon\"",
                "egress.retry_budget",
            ),
            (
                "environment = \"sandbox\"\nallowed_ips = []",
                "egress.allowed_ips",
            ),
            (
                "environment = \"sandbox\"\nods_code = \"A 1\"",
                "egress.ods_code",
            ),
            (
                "environment = \"sandbox\"\nbars_version = \"v1\"",
                "egress.bars_version",
            ),
        ] {
            let e = parse(text).unwrap_err().to_string();
            assert!(e.contains(key), "{text}: {e}");
            assert!(e.contains("/etc/bg/config.toml"), "{e}");
        }
    }
}

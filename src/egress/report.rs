//! The `[egress]` section of `bars-gateway check`: the endpoints, the signing key (loads, RSA,
//! at least 2048 bits, RS512 signs), the API key (present, never printed), and the public key and
//! JWKS to register with the NHS API platform.

use std::fmt::Write as _;

use super::settings::EgressSettings;
use super::token::{ApiKey, SigningKey};

/// Appends the egress report to `text`; problems that would stop `run` go to `errors`.
pub(crate) fn describe(settings: &EgressSettings, text: &mut String, errors: &mut Vec<String>) {
    let _ = writeln!(text, "\negress (the legacy system as a BaRS sender):");
    let _ = writeln!(
        text,
        "  listen: {} (allowed: {})",
        settings.address,
        join(&settings.allowed_ips)
    );
    let _ = writeln!(text, "  environment: {:?}", settings.environment);
    let _ = writeln!(text, "  api_base: {}", settings.api_base);
    let _ = writeln!(
        text,
        "  retries: at most {} attempts within {:?}, {:?} per attempt",
        settings.retry.max_attempts, settings.retry.retry_budget, settings.retry.attempt_timeout
    );
    if let Err(e) = super::client::build(settings) {
        errors.push(e.to_string());
    }
    let Some(auth) = &settings.auth else {
        let _ = writeln!(text, "  authentication: none (sandbox)");
        return;
    };
    let _ = writeln!(text, "  token_url: {}", auth.token_url);
    let _ = writeln!(text, "  key id (kid): {}", auth.key_id);
    match ApiKey::load(auth.api_key_file.as_deref()) {
        Ok(_) => {
            let _ = writeln!(text, "  API key: present (not shown)");
        }
        Err(e) => errors.push(e.to_string()),
    }
    let key = match SigningKey::load(auth) {
        Ok(k) => k,
        Err(e) => {
            errors.push(e.to_string());
            return;
        }
    };
    let _ = writeln!(
        text,
        "  signing key: {} (RS512, {}-bit RSA)",
        auth.signing_key.display(),
        key.bits()
    );
    match crate::keygen::public_documents(&key.der, &auth.key_id) {
        Ok((pem, jwks)) => {
            let _ = writeln!(
                text,
                "  public key (register it with the platform under the kid above):"
            );
            for line in pem.lines() {
                let _ = writeln!(text, "    {line}");
            }
            let _ = writeln!(text, "  JWKS:\n    {jwks}");
        }
        Err(e) => errors.push(format!("egress.signing_key: {e}")),
    }
}

fn join(nets: &[ipnet::IpNet]) -> String {
    nets.iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

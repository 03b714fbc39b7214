//! `check` and `run` catch the certificate, CRL and config mistakes a newcomer makes on the way
//! to INT, with a message that says what is wrong and which key and file it is about: a client
//! leaf or an expired CA as `client_ca`, a CA as the server certificate, a version-1 CRL, a stale
//! CRL, a UTF-8 byte-order mark, a mistyped log level, an unreachable Redis.

mod common;

use std::path::Path;
use std::process::Command;

use bars_gateway::check::check;
use bars_gateway::demo::pki::ca_params;
use common::*;
use rcgen::{CertificateRevocationListParams, KeyIdMethod, KeyPair, SerialNumber};

/// Writes `toml` as the PKI's config and runs the library's `check` on it.
fn check_with(pki: &TestPki, toml: &str) -> bars_gateway::check::CheckReport {
    std::fs::write(pki.path("config.toml"), toml).unwrap();
    check(&pki.path("config.toml"))
}

fn base(pki: &TestPki) -> String {
    pki.config_toml("http://127.0.0.1:8080")
}

/// `bars-gateway run` on `config`, expected to refuse to start: (exit code, stderr).
fn run_refuses(config: &Path) -> (Option<i32>, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_bars-gateway"))
        .args(["run", "--config", config.to_str().unwrap()])
        .env_remove("RUST_LOG")
        .env_remove("JOURNAL_STREAM")
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn a_client_leaf_as_client_ca_is_an_error_in_check_and_run() {
    let pki = TestPki::new();
    // The file a newcomer reaches for first: the BaRS proxy's own (leaf) certificate.
    let toml = base(&pki).replace(
        "client_ca = [\"root.pem\", \"sub.pem\"]",
        "client_ca = [\"root.pem\", \"client-proxy.pem\"]",
    );
    let report = check_with(&pki, &toml);
    assert!(!report.ok(), "{}", report.text);
    let error = report.errors.join("\n");
    assert!(
        error.contains("tls.client_ca[1]")
            && error.contains("client-proxy.pem")
            && error.contains("not a CA certificate")
            && error.contains(PROXY_CN),
        "{error}"
    );
    let (code, stderr) = run_refuses(&pki.path("config.toml"));
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains("tls.client_ca[1]") && stderr.contains("not a CA certificate"),
        "{stderr}"
    );
}

#[test]
fn an_expired_client_ca_is_an_error() {
    let pki = TestPki::new();
    let key = KeyPair::generate().unwrap();
    let mut params = ca_params("Expired Test Root");
    params.not_before = rcgen::date_time_ymd(2015, 1, 1);
    params.not_after = rcgen::date_time_ymd(2020, 1, 1);
    let cert = params.self_signed(&key).unwrap();
    std::fs::write(pki.path("expired-ca.pem"), cert.pem()).unwrap();
    let toml = base(&pki).replace(
        "client_ca = [\"root.pem\", \"sub.pem\"]",
        "client_ca = [\"root.pem\", \"sub.pem\", \"expired-ca.pem\"]",
    );
    let report = check_with(&pki, &toml);
    let error = report.errors.join("\n");
    assert!(
        error.contains("tls.client_ca[2]")
            && error.contains("expired-ca.pem")
            && error.contains("expired on 2020-01-01"),
        "{}",
        report.text
    );
}

#[test]
fn prod_without_a_prod_nhs_ca_is_warned_about() {
    let pki = TestPki::new();
    let toml = base(&pki).replace(
        "allowed_ips = [\"127.0.0.1/32\"]\nallowed_subjects = [\"bars-proxy.spineservices.nhs.uk\"]",
        "environment = \"prod\"",
    );
    let report = check_with(&pki, &toml);
    assert!(report.ok(), "{}", report.text);
    let warnings = report.warnings.join("\n");
    assert!(
        warnings.contains("client.environment = \"prod\" but no PROD NHS CA")
            && warnings.contains("NHS Root Authority G2 and NHS Authentication G2"),
        "{}",
        report.text
    );
    // The test CAs are nobody's published CA: nothing is "recognised".
    assert!(!report.text.contains("recognised:"), "{}", report.text);
}

#[test]
fn an_allowed_ips_list_replacing_the_preset_is_warned_about() {
    let pki = TestPki::new();
    let toml = base(&pki).replace(
        "allowed_ips = [\"127.0.0.1/32\"]",
        "environment = \"int\"\nallowed_ips = [\"127.0.0.1/32\"]",
    );
    let report = check_with(&pki, &toml);
    let warnings = report.warnings.join("\n");
    assert!(
        warnings.contains("client.allowed_ips replaces the int preset (35.197.254.55/32"),
        "{}",
        report.text
    );
}

#[test]
fn crl_errors_name_tls_client_crl_and_the_crl_file() {
    let pki = TestPki::new();
    std::fs::write(
        pki.path("broken.crl"),
        "-----BEGIN X509 CRL-----\nMAA=\n-----END X509 CRL-----\n",
    )
    .unwrap();
    let toml = base(&pki).replace(
        "client_crl = [\"sub.crl.pem\"]",
        "client_crl = [\"sub.crl.pem\", \"broken.crl\"]",
    );
    let report = check_with(&pki, &toml);
    let error = report.errors.join("\n");
    assert!(
        error.contains("tls.client_crl[1]") && error.contains("broken.crl"),
        "{error}"
    );
    assert!(!error.contains("tls.client_ca"), "{error}");
}

#[test]
fn a_version_1_crl_from_openssl_ca_gets_a_message_saying_how_to_reissue_it() {
    if !tool_runs("openssl", "version") {
        return skip(
            "a_version_1_crl_from_openssl_ca_gets_a_message_saying_how_to_reissue_it",
            "openssl is not on PATH (apt-get install openssl)",
        );
    }
    let pki = TestPki::new();
    let d = pki.dir.path();
    // `openssl ca -gencrl` with no crlnumber file and no crl_extensions: a version-1 CRL.
    std::fs::write(d.join("index.txt"), "").unwrap();
    std::fs::write(
        d.join("ca.cnf"),
        "[ca]\ndefault_ca = CA_default\n[CA_default]\ndatabase = index.txt\n\
         certificate = sub.pem\nprivate_key = sub.key\ndefault_md = sha256\ndefault_crl_days = 30\n",
    )
    .unwrap();
    let out = Command::new("openssl")
        .current_dir(d)
        .args(["ca", "-config", "ca.cnf", "-gencrl", "-out", "v1.crl"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "openssl ca -gencrl: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = Command::new("openssl")
        .current_dir(d)
        .args(["crl", "-in", "v1.crl", "-noout", "-text"])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&text.stdout).contains("Version 1"),
        "the fixture is a v1 CRL"
    );
    let toml = base(&pki).replace(
        "client_crl = [\"sub.crl.pem\"]",
        "client_crl = [\"v1.crl\"]",
    );
    let report = check_with(&pki, &toml);
    let error = report.errors.join("\n");
    assert!(
        error.contains("tls.client_crl[0]")
            && error.contains("v1.crl")
            && error.contains("version 1 CRL")
            && error.contains("crlnumber"),
        "{error}"
    );
}

#[test]
fn check_reports_each_crl_and_warns_when_one_is_past_its_next_update() {
    let pki = TestPki::new();
    let sub_key =
        KeyPair::from_pem(&std::fs::read_to_string(pki.path("sub.key")).unwrap()).unwrap();
    let sub = rcgen::Issuer::new(ca_params("Test NHS Level 1C"), sub_key);
    let now = time::OffsetDateTime::now_utc();
    let stale = CertificateRevocationListParams {
        this_update: now - time::Duration::days(40),
        next_update: now - time::Duration::days(10),
        crl_number: SerialNumber::from(7u64),
        issuing_distribution_point: None,
        revoked_certs: vec![],
        key_identifier_method: KeyIdMethod::Sha256,
    }
    .signed_by(&sub)
    .unwrap();
    std::fs::write(pki.path("stale.crl.pem"), stale.pem().unwrap()).unwrap();
    let toml = base(&pki).replace(
        "client_crl = [\"sub.crl.pem\"]",
        "client_crl = [\"sub.crl.pem\", \"stale.crl.pem\"]",
    );
    let report = check_with(&pki, &toml);
    assert!(report.ok(), "a stale CRL is a warning: {}", report.text);
    assert!(
        report
            .text
            .contains("issuer: O=nhs, OU=CA, CN=Test NHS Level 1C")
            && report.text.contains("revoked: 1")
            && report.text.contains("revoked: 0")
            && report.text.contains("next update: "),
        "{}",
        report.text
    );
    let warnings = report.warnings.join("\n");
    assert!(
        warnings.contains("tls.client_crl")
            && warnings.contains("stale.crl.pem")
            && warnings.contains("has passed"),
        "{warnings}"
    );
}

#[test]
fn a_ca_as_the_server_certificate_is_named_for_what_it_is() {
    let pki = TestPki::new();
    // The sub-CA and its key: a CA:TRUE certificate with nothing after it.
    let toml = base(&pki).replace(
        "certificate = \"server-chain.pem\"\nprivate_key = \"server.key\"",
        "certificate = \"sub.pem\"\nprivate_key = \"sub.key\"",
    );
    let error = check_with(&pki, &toml).errors.join("\n");
    assert!(
        error.contains("tls.certificate")
            && error.contains(
                "is a CA certificate (basicConstraints CA:TRUE), not a server certificate"
            ),
        "{error}"
    );
    assert!(
        !error.contains("put the server"),
        "not an ordering problem: {error}"
    );

    // A self-signed CA, as `openssl req -x509` makes by default.
    let key = KeyPair::generate().unwrap();
    let cert = ca_params("my-receiver.example").self_signed(&key).unwrap();
    std::fs::write(pki.path("self-signed.pem"), cert.pem()).unwrap();
    std::fs::write(pki.path("self-signed.key"), key.serialize_pem()).unwrap();
    let toml = base(&pki).replace(
        "certificate = \"server-chain.pem\"\nprivate_key = \"server.key\"",
        "certificate = \"self-signed.pem\"\nprivate_key = \"self-signed.key\"",
    );
    let error = check_with(&pki, &toml).errors.join("\n");
    assert!(
        error.contains("is a self-signed CA certificate") && error.contains("CSR"),
        "{error}"
    );

    // The chain in the wrong order is still called that.
    let chain = std::fs::read_to_string(pki.path("server-chain.pem")).unwrap();
    let end = "-----END CERTIFICATE-----\n";
    let split = chain.find(end).unwrap() + end.len();
    std::fs::write(
        pki.path("reversed.pem"),
        format!("{}{}", &chain[split..], &chain[..split]),
    )
    .unwrap();
    let toml = base(&pki).replace(
        "certificate = \"server-chain.pem\"",
        "certificate = \"reversed.pem\"",
    );
    let error = check_with(&pki, &toml).errors.join("\n");
    assert!(
        error.contains("put the server certificate first"),
        "{error}"
    );
}

#[test]
fn a_utf8_byte_order_mark_before_a_pem_block_is_tolerated() {
    let pki = TestPki::new();
    for name in ["server-chain.pem", "server.key", "root.pem", "sub.crl.pem"] {
        let text = std::fs::read(pki.path(name)).unwrap();
        let mut with_bom = b"\xEF\xBB\xBF".to_vec();
        with_bom.extend_from_slice(&text);
        std::fs::write(pki.path(name), with_bom).unwrap();
    }
    let report = check_with(&pki, &base(&pki));
    assert!(report.ok(), "{}", report.text);
    assert!(
        report.text.contains("server: CN=localhost"),
        "{}",
        report.text
    );
}

#[test]
fn an_unknown_log_level_is_a_config_error_naming_the_key() {
    let pki = TestPki::new();
    let toml = base(&pki).replace("level = \"warn\"", "level = \"warning\"");
    let report = check_with(&pki, &toml);
    let error = report.errors.join("\n");
    assert!(
        error.contains("config.toml") && error.contains("log.level") && error.contains("\"warn\""),
        "{error}"
    );
}

#[test]
fn check_describes_the_memory_dedup_store() {
    let pki = TestPki::new();
    let report = check_with(&pki, &base(&pki));
    assert!(
        report
            .text
            .contains("dedup:\n  store: memory (at most 1000000 entries")
            && report.text.contains("ttl: 1day")
            && report.text.contains("on store error: reject"),
        "{}",
        report.text
    );
}

#[tokio::test]
async fn check_pings_redis_warns_when_it_does_not_answer_and_never_prints_its_password() {
    let pki = TestPki::new();
    let dead = free_port();
    let toml = format!(
        "{}\n[dedup]\nstore = \"redis\"\nredis_url = \"redis://gw:s3cret@127.0.0.1:{dead}/0\"\n",
        base(&pki)
    );
    let report = tokio::task::spawn_blocking({
        let path = pki.path("config.toml");
        std::fs::write(&path, &toml).unwrap();
        move || check(&path)
    })
    .await
    .unwrap();
    assert!(report.ok(), "Redis down is a warning: {}", report.text);
    assert!(
        report
            .text
            .contains(&format!("store: redis redis://gw:***@127.0.0.1:{dead}/0")),
        "{}",
        report.text
    );
    assert!(!report.text.contains("s3cret"), "{}", report.text);
    assert!(
        report.warnings.join("\n").contains("does not answer PING"),
        "{}",
        report.text
    );

    let Some(redis) = RedisServer::start().await else {
        return;
    };
    redis.wait_ready().await;
    let toml = format!(
        "{}\n[dedup]\nstore = \"redis\"\nredis_url = \"{}\"\n",
        base(&pki),
        redis.url()
    );
    let path = pki.path("config.toml");
    std::fs::write(&path, &toml).unwrap();
    let report = tokio::task::spawn_blocking(move || check(&path))
        .await
        .unwrap();
    assert!(
        report.text.contains("redis: answers PING"),
        "{}",
        report.text
    );
    assert!(report.warnings.is_empty(), "{}", report.text);
}

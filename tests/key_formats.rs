//! Server key formats an NHS operator actually has: the encrypted PKCS#8 key that
//! `openssl genpkey -aes256` makes, and the `.pfx` of `openssl pkcs12 -export` (NHS guide), each
//! loaded and used in a real handshake; and `check`'s verdicts and exit codes.
//!
//! The material is made by the real `openssl` CLI; without it these tests print SKIPPED (CI
//! installs it, and fails them if it is missing).

mod common;

use std::path::Path;
use std::process::Command;

use bars_gateway::config::ServerIdentitySource;
use common::*;

fn have_openssl() -> bool {
    let ok = Command::new("openssl")
        .arg("version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        skip(
            "this openssl-made material test",
            "`openssl` is not on PATH (apt-get install openssl)",
        );
    }
    ok
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "openssl {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// An RSA-2048 server key encrypted with AES-256 (as the NHS guide has operators make it) and a
/// certificate for it from the test sub-CA: `rsa.key` (password "key pass"), `rsa-chain.pem`.
fn make_encrypted_rsa_server(pki: &TestPki) {
    make_encrypted_rsa_server_valid_for(pki, "30");
}

fn make_encrypted_rsa_server_valid_for(pki: &TestPki, days: &str) {
    let d = pki.dir.path();
    openssl(
        d,
        &[
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:2048",
            "-aes256",
            "-pass",
            "pass:key pass",
            "-out",
            "rsa.key",
        ],
    );
    openssl(
        d,
        &[
            "req",
            "-new",
            "-key",
            "rsa.key",
            "-passin",
            "pass:key pass",
            "-subj",
            "/CN=localhost",
            "-out",
            "rsa.csr",
        ],
    );
    std::fs::write(
        d.join("ext.cnf"),
        "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    openssl(
        d,
        &[
            "x509",
            "-req",
            "-in",
            "rsa.csr",
            "-CA",
            "sub.pem",
            "-CAkey",
            "sub.key",
            "-set_serial",
            "77",
            "-days",
            days,
            "-extfile",
            "ext.cnf",
            "-out",
            "rsa.pem",
        ],
    );
    let chain = format!(
        "{}{}",
        std::fs::read_to_string(d.join("rsa.pem")).unwrap(),
        std::fs::read_to_string(d.join("sub.pem")).unwrap()
    );
    std::fs::write(d.join("rsa-chain.pem"), chain).unwrap();
    std::fs::write(d.join("key-password"), "key pass\n").unwrap();
}

/// `openssl pkcs12 -export` of `rsa.pem` + `rsa.key`, with `args` for the rest (output, password,
/// chain and algorithms).
fn export_pkcs12(pki: &TestPki, args: &[&str]) {
    let mut all = vec!["pkcs12", "-export", "-in", "rsa.pem", "-inkey", "rsa.key"];
    all.extend(["-passin", "pass:key pass"]);
    all.extend(args);
    openssl(pki.dir.path(), &all);
}

/// `pki`'s gateway config serving the PKCS#12 bundle `bundle` (made by [`export_pkcs12`]) instead
/// of the PEM pair, its password written to the file `pfx-password`.
fn pkcs12_config(pki: &TestPki, upstream_url: &str, bundle: &str, password: &str) -> String {
    std::fs::write(pki.path("pfx-password"), password).unwrap();
    pki.config_toml(upstream_url).replace(
        "certificate = \"server-chain.pem\"\nprivate_key = \"server.key\"",
        &format!("pkcs12 = \"{bundle}\"\npkcs12_password_file = \"pfx-password\""),
    )
}

#[tokio::test]
async fn encrypted_pkcs8_key_from_genpkey_aes256_serves_handshakes() {
    if !have_openssl() {
        return;
    }
    let pki = TestPki::new();
    make_encrypted_rsa_server(&pki);
    assert!(std::fs::read_to_string(pki.path("rsa.key"))
        .unwrap()
        .contains("BEGIN ENCRYPTED PRIVATE KEY"));
    let upstream = TestUpstream::start().await;
    let mut settings = pki.settings(&pki.config_toml(&upstream.url()));
    settings.tls.identity = ServerIdentitySource::Pem {
        certificate: pki.path("rsa-chain.pem"),
        private_key: pki.path("rsa.key"),
        password_file: Some(pki.path("key-password")),
    };
    let reply = metadata_through(settings, &pki).await;
    assert_eq!(reply.status, 200);
    assert_eq!(upstream.count(), 1);
}

#[test]
fn encrypted_key_with_a_wrong_password_is_refused_naming_the_key() {
    if !have_openssl() {
        return;
    }
    let pki = TestPki::new();
    make_encrypted_rsa_server(&pki);
    std::fs::write(pki.path("key-password"), "not it\n").unwrap();
    let settings = pki.settings(&pki.config_toml("http://127.0.0.1:1"));
    let source = ServerIdentitySource::Pem {
        certificate: pki.path("rsa-chain.pem"),
        private_key: pki.path("rsa.key"),
        password_file: Some(pki.path("key-password")),
    };
    let err = bars_gateway::tls::material::load_server_identity(&source)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("tls.private_key") && err.contains("rsa.key"),
        "{err}"
    );
    assert!(err.contains("wrong password"), "{err}");
    drop(settings);
}

#[test]
fn encrypted_key_without_a_password_says_how_to_provide_one() {
    if !have_openssl() {
        return;
    }
    let pki = TestPki::new();
    make_encrypted_rsa_server(&pki);
    let source = ServerIdentitySource::Pem {
        certificate: pki.path("rsa-chain.pem"),
        private_key: pki.path("rsa.key"),
        password_file: None,
    };
    // CREDENTIALS_DIRECTORY is not set in the test environment.
    let err = bars_gateway::tls::material::load_server_identity(&source)
        .unwrap_err()
        .to_string();
    assert!(err.contains("private_key_password_file"), "{err}");
}

#[tokio::test]
async fn pkcs12_bundle_from_openssl_export_serves_handshakes() {
    if !have_openssl() {
        return;
    }
    let pki = TestPki::new();
    make_encrypted_rsa_server(&pki);
    // The NHS guide's command; OpenSSL 3 defaults to AES-256-CBC with PBKDF2 and a SHA-256 MAC.
    export_pkcs12(
        &pki,
        &[
            "-certfile",
            "sub.pem",
            "-passout",
            "pass:pfx pass",
            "-out",
            "receiver.pfx",
        ],
    );
    let upstream = TestUpstream::start().await;
    let toml = pkcs12_config(&pki, &upstream.url(), "receiver.pfx", "pfx pass");
    let settings = pki.settings(&toml);
    assert!(matches!(
        settings.tls.identity,
        ServerIdentitySource::Pkcs12 { .. }
    ));
    let reply = metadata_through(settings, &pki).await;
    assert_eq!(reply.status, 200);
    assert_eq!(upstream.count(), 1);
}

#[test]
fn pkcs12_with_a_wrong_password_is_refused_naming_the_file() {
    if !have_openssl() {
        return;
    }
    let pki = TestPki::new();
    make_encrypted_rsa_server(&pki);
    export_pkcs12(&pki, &["-passout", "pass:right", "-out", "receiver.pfx"]);
    std::fs::write(pki.path("pfx-password"), "wrong").unwrap();
    let source = ServerIdentitySource::Pkcs12 {
        path: pki.path("receiver.pfx"),
        password_file: Some(pki.path("pfx-password")),
    };
    let err = bars_gateway::tls::material::load_server_identity(&source)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("tls.pkcs12") && err.contains("receiver.pfx"),
        "{err}"
    );
}

fn run_cli(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_bars-gateway"))
        .args(args)
        .env_remove("BARS_GATEWAY_CONFIG")
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn check_reports_certificates_and_exits_0_for_a_good_config() {
    let pki = TestPki::new();
    std::fs::write(
        pki.path("config.toml"),
        pki.config_toml("http://127.0.0.1:8080"),
    )
    .unwrap();
    let config = pki.path("config.toml");
    let (code, out, _) = run_cli(&["check", "--config", config.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("server: CN=localhost"), "{out}");
    assert!(
        out.contains("client CA: O=nhs, OU=CA, CN=Test NHS Root Authority"),
        "{out}"
    );
    assert!(out.contains("sha256: "), "{out}");
    assert!(out.contains("days left"), "{out}");
    assert!(out.contains("private key: matches"), "{out}");
    assert!(
        out.contains("allowed client subjects: bars-proxy.spineservices.nhs.uk"),
        "{out}"
    );
    assert!(out.contains("revoked: 1"), "{out}");
    assert!(!out.contains("WARNING"), "{out}");
    assert!(out.contains("result: OK"), "{out}");
}

/// The NHS guide's `.pfx` recipe without `-certfile`, or a PEM with the leaf only: the gateway
/// starts (a client holding the sub-CA still verifies it), but `check` says what is missing.
#[test]
fn check_warns_when_the_server_certificate_is_served_without_its_intermediate() {
    let pki = TestPki::new();
    let chain = std::fs::read_to_string(pki.path("server-chain.pem")).unwrap();
    let end = "-----END CERTIFICATE-----\n";
    let leaf = &chain[..chain.find(end).unwrap() + end.len()];
    std::fs::write(pki.path("leaf-only.pem"), leaf).unwrap();
    let toml = pki.config_toml("http://127.0.0.1:8080").replace(
        "certificate = \"server-chain.pem\"",
        "certificate = \"leaf-only.pem\"",
    );
    std::fs::write(pki.path("config.toml"), toml).unwrap();
    let config = pki.path("config.toml");
    let (code, out, _) = run_cli(&["check", "--config", config.to_str().unwrap()]);
    assert_eq!(code, 0, "a missing intermediate is a warning: {out}");
    assert!(
        out.contains("WARNING: tls.certificate")
            && out.contains("leaf-only.pem")
            && out.contains("served alone, without the CA that issued it")
            && out.contains("Test NHS Level 1C"),
        "{out}"
    );
}

#[test]
fn check_refuses_a_key_that_does_not_match_the_certificate() {
    let pki = TestPki::new();
    let toml = pki.config_toml("http://127.0.0.1:8080").replace(
        "private_key = \"server.key\"",
        "private_key = \"other.key\"",
    );
    std::fs::write(pki.path("config.toml"), toml).unwrap();
    let config = pki.path("config.toml");
    let (code, out, _) = run_cli(&["check", "--config", config.to_str().unwrap()]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("ERROR: tls.private_key"), "{out}");
    assert!(out.contains("other.key"), "{out}");
    assert!(out.contains("does not match the certificate"), "{out}");
}

#[test]
fn check_warns_when_a_certificate_expires_within_30_days() {
    if !have_openssl() {
        return;
    }
    let pki = TestPki::new();
    make_encrypted_rsa_server_valid_for(&pki, "10");
    let toml = pki.config_toml("http://127.0.0.1:8080").replace(
        "certificate = \"server-chain.pem\"\nprivate_key = \"server.key\"",
        "certificate = \"rsa-chain.pem\"\nprivate_key = \"rsa.key\"\nprivate_key_password_file = \"key-password\"",
    );
    std::fs::write(pki.path("config.toml"), toml).unwrap();
    let config = pki.path("config.toml");
    let (code, out, _) = run_cli(&["check", "--config", config.to_str().unwrap()]);
    assert_eq!(code, 0, "a near expiry is a warning, not an error: {out}");
    assert!(
        out.contains("WARNING: server localhost expires in "),
        "{out}"
    );
}

#[test]
fn check_and_run_name_the_file_and_key_of_a_config_error_and_exit_1() {
    let pki = TestPki::new();
    let toml = pki
        .config_toml("http://127.0.0.1:8080")
        .replace("[upstream]", "[upstream]\nretries = 3");
    std::fs::write(pki.path("config.toml"), toml).unwrap();
    let config = pki.path("config.toml");
    for command in ["check", "run"] {
        let (code, out, err) = run_cli(&[command, "--config", config.to_str().unwrap()]);
        assert_eq!(code, 1, "{command}: {out}{err}");
        let text = format!("{out}{err}");
        assert!(
            text.contains("config.toml") && text.contains("unknown field `retries`"),
            "{command}: {text}"
        );
    }
}

#[test]
fn run_refuses_to_start_with_a_missing_certificate_naming_it() {
    let pki = TestPki::new();
    std::fs::remove_file(pki.path("server-chain.pem")).unwrap();
    std::fs::write(
        pki.path("config.toml"),
        pki.config_toml("http://127.0.0.1:8080"),
    )
    .unwrap();
    let config = pki.path("config.toml");
    let (code, _, err) = run_cli(&["run", "--config", config.to_str().unwrap()]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("tls.certificate")
            && err.contains("server-chain.pem")
            && err.contains("cannot read"),
        "{err}"
    );
}

#[test]
fn usage_errors_exit_2_and_the_config_path_comes_from_the_environment() {
    let (code, _, _) = run_cli(&["frobnicate"]);
    assert_eq!(code, 2);
    let out = Command::new(env!("CARGO_BIN_EXE_bars-gateway"))
        .args(["check"])
        .env("BARS_GATEWAY_CONFIG", "/nonexistent/from-env.toml")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stdout).contains("/nonexistent/from-env.toml"));
}

#[tokio::test]
async fn pkcs12_bundle_with_legacy_3des_encryption_serves_handshakes() {
    if !have_openssl() {
        return;
    }
    let pki = TestPki::new();
    make_encrypted_rsa_server(&pki);
    // What older OpenSSL (1.1) and Windows exports make: PBE-SHA1-3DES with a SHA-1 MAC.
    export_pkcs12(
        &pki,
        &[
            "-certfile",
            "sub.pem",
            "-keypbe",
            "PBE-SHA1-3DES",
            "-certpbe",
            "PBE-SHA1-3DES",
            "-macalg",
            "sha1",
            "-passout",
            "pass:old",
            "-out",
            "legacy.pfx",
        ],
    );
    let upstream = TestUpstream::start().await;
    let toml = pkcs12_config(&pki, &upstream.url(), "legacy.pfx", "old");
    let reply = metadata_through(pki.settings(&toml), &pki).await;
    assert_eq!(reply.status, 200);
}

#[test]
fn the_key_password_comes_from_the_systemd_credential_when_no_file_is_configured() {
    if !have_openssl() {
        return;
    }
    let pki = TestPki::new();
    make_encrypted_rsa_server(&pki);
    let credentials = pki.path("credentials");
    std::fs::create_dir(&credentials).unwrap();
    std::fs::copy(pki.path("key-password"), credentials.join("key-password")).unwrap();
    let toml = pki.config_toml("http://127.0.0.1:8080").replace(
        "certificate = \"server-chain.pem\"\nprivate_key = \"server.key\"",
        "certificate = \"rsa-chain.pem\"\nprivate_key = \"rsa.key\"",
    );
    std::fs::write(pki.path("config.toml"), toml).unwrap();
    let check = |credentials_dir: Option<&Path>| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_bars-gateway"));
        cmd.args([
            "check",
            "--config",
            pki.path("config.toml").to_str().unwrap(),
        ]);
        match credentials_dir {
            Some(dir) => cmd.env("CREDENTIALS_DIRECTORY", dir),
            None => cmd.env_remove("CREDENTIALS_DIRECTORY"),
        };
        let out = cmd.output().unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    let (code, out) = check(Some(&credentials));
    assert_eq!(code, Some(0), "{out}");
    let (code, out) = check(None);
    assert_eq!(
        code,
        Some(1),
        "without the credential the encrypted key cannot be opened: {out}"
    );
    assert!(out.contains("private_key_password_file"), "{out}");
}

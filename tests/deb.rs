//! The Debian package starts: it creates the system user and /etc/bars-gateway/tls/, needs no
//! key-password credential for an unencrypted key, restarts the service on upgrade and ships a
//! stripped binary. The package is built by scripts/build-deb.sh (dpkg-deb) from the binary this
//! test build made, inspected with dpkg-deb, and installed into a throwaway root.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn run(command: &mut Command) -> String {
    let out = command.output().unwrap();
    assert!(
        out.status.success(),
        "{command:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Builds the package into `dir`, or `None` (SKIPPED; a failure under CI) without the tools.
fn build_deb(test: &str, dir: &Path) -> Option<PathBuf> {
    for (tool, arg, install) in [
        ("dpkg-deb", "--version", "apt-get install dpkg"),
        ("strip", "--version", "apt-get install binutils"),
        ("readelf", "--version", "apt-get install binutils"),
    ] {
        if !tool_runs(tool, arg) {
            skip(test, &format!("{tool} is not on PATH ({install})"));
            return None;
        }
    }
    let stdout = run(Command::new("bash")
        .arg(repo().join("scripts/build-deb.sh"))
        .args(["--binary", env!("CARGO_BIN_EXE_bars-gateway"), "--out"])
        .arg(dir));
    let deb = PathBuf::from(stdout.trim());
    assert!(deb.is_file(), "build-deb.sh printed {stdout:?}");
    Some(deb)
}

#[test]
fn the_package_has_the_user_the_tls_directory_the_upgrade_restart_and_a_stripped_binary() {
    let dir = tempfile::tempdir().unwrap();
    let Some(deb) = build_deb(
        "the_package_has_the_user_the_tls_directory_the_upgrade_restart_and_a_stripped_binary",
        dir.path(),
    ) else {
        return;
    };
    let info = run(Command::new("dpkg-deb").arg("--field").arg(&deb));
    assert!(info.contains("Package: bars-gateway"), "{info}");
    assert!(
        info.contains(&format!("Version: {}-1", env!("CARGO_PKG_VERSION"))),
        "{info}"
    );
    let contents = run(Command::new("dpkg-deb").arg("--contents").arg(&deb));
    for path in [
        "./usr/bin/bars-gateway",
        "./lib/systemd/system/bars-gateway.service",
        "./etc/bars-gateway/config.toml",
        "./usr/share/doc/bars-gateway/operations.md",
    ] {
        assert!(
            contents.lines().any(|l| l.ends_with(path)),
            "{path} missing:\n{contents}"
        );
    }

    let control = dir.path().join("control");
    run(Command::new("dpkg-deb")
        .arg("--control")
        .arg(&deb)
        .arg(&control));
    let conffiles = std::fs::read_to_string(control.join("conffiles")).unwrap();
    assert_eq!(conffiles.trim(), "/etc/bars-gateway/config.toml");
    let postinst = std::fs::read_to_string(control.join("postinst")).unwrap();
    assert!(
        postinst.contains("useradd") && postinst.contains("--system"),
        "{postinst}"
    );
    assert!(postinst.contains("etc/bars-gateway/tls"), "{postinst}");
    assert!(
        postinst.contains("try-restart bars-gateway.service"),
        "the service is restarted on upgrade:\n{postinst}"
    );
    let prerm = std::fs::read_to_string(control.join("prerm")).unwrap();
    assert!(prerm.contains("stop bars-gateway.service"), "{prerm}");

    let data = dir.path().join("data");
    run(Command::new("dpkg-deb")
        .arg("--extract")
        .arg(&deb)
        .arg(&data));
    let binary = data.join("usr/bin/bars-gateway");
    let sections = run(Command::new("readelf").args(["-S", "-W"]).arg(&binary));
    assert!(
        !sections.contains(".symtab") && !sections.contains(".debug_info"),
        "the packaged binary is not stripped:\n{sections}"
    );
    let version = run(Command::new(&binary).arg("--version"));
    assert!(version.contains(env!("CARGO_PKG_VERSION")), "{version}");

    // The unit needs no credential file for an unencrypted key: an empty default stands in.
    let unit =
        std::fs::read_to_string(data.join("lib/systemd/system/bars-gateway.service")).unwrap();
    assert!(
        unit.lines().any(|l| l == r"SetCredential=key-password:\n"),
        "no SetCredential= default for the key password:\n{unit}"
    );
}

#[test]
fn cargo_deb_metadata_and_the_script_ship_the_same_files() {
    let manifest: toml::Table =
        toml::from_str(&std::fs::read_to_string(repo().join("Cargo.toml")).unwrap()).unwrap();
    let deb = &manifest["package"]["metadata"]["deb"];
    assert_eq!(
        deb["maintainer-scripts"].as_str(),
        Some("packaging/debian/"),
        "cargo deb uses the same maintainer scripts"
    );
    let from_cargo: BTreeSet<(String, String)> = deb["assets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            let a = a.as_array().unwrap();
            let source = a[0].as_str().unwrap().to_string();
            let destination = a[1].as_str().unwrap();
            let file = source.rsplit('/').next().unwrap().to_string();
            let destination = match destination.strip_suffix('/') {
                Some(dir) => format!("{dir}/{file}"),
                None => destination.to_string(),
            };
            let source = if source == "target/release/bars-gateway" {
                "$binary".to_string()
            } else {
                source
            };
            (destination, source)
        })
        .collect();
    let script = std::fs::read_to_string(repo().join("scripts/build-deb.sh")).unwrap();
    let from_script: BTreeSet<(String, String)> = script
        .lines()
        .filter_map(|l| l.trim().strip_prefix("put "))
        .map(|args| {
            let words: Vec<&str> = args.split_whitespace().collect();
            let destination = words[0]
                .trim_matches('"')
                .replace("$doc", "usr/share/doc/bars-gateway");
            (destination, words[1].trim_matches('"').to_string())
        })
        .collect();
    assert_eq!(from_cargo, from_script);
}

/// Creates an empty root with the files dpkg and useradd need.
fn throwaway_root(root: &Path) {
    for dir in [
        "etc",
        "var/lib/dpkg/info",
        "var/lib/dpkg/updates",
        "var/log",
    ] {
        std::fs::create_dir_all(root.join(dir)).unwrap();
    }
    for (file, text) in [
        ("var/lib/dpkg/status", ""),
        ("var/lib/dpkg/available", ""),
        ("etc/passwd", "root:x:0:0:root:/root:/bin/sh\n"),
        ("etc/group", "root:x:0:\n"),
        ("etc/shadow", "root:*:19000:0:99999:7:::\n"),
        ("etc/gshadow", "root:*::\n"),
    ] {
        std::fs::write(root.join(file), text).unwrap();
    }
}

#[test]
fn the_package_installs_and_upgrades_in_a_throwaway_root() {
    const TEST: &str = "the_package_installs_and_upgrades_in_a_throwaway_root";
    let dir = tempfile::tempdir().unwrap();
    let Some(deb) = build_deb(TEST, dir.path()) else {
        return;
    };
    // dpkg --root with the maintainer scripts run on the host against $DPKG_ROOT: needs root
    // (file ownership) and dpkg and useradd on the host.
    let euid = run(Command::new("id").arg("-u"));
    if euid.trim() != "0" || !tool_runs("dpkg", "--version") || !tool_runs("useradd", "--help") {
        return skip(TEST, "installing into a root needs root, dpkg and useradd");
    }
    let root = dir.path().join("root");
    throwaway_root(&root);
    let install = || {
        run(Command::new("dpkg")
            .arg(format!("--root={}", root.display()))
            .args(["--force-script-chrootless", "--force-depends", "--install"])
            .arg(&deb)
            .env("DEBIAN_FRONTEND", "noninteractive"));
    };
    install();
    let passwd = std::fs::read_to_string(root.join("etc/passwd")).unwrap();
    let user = passwd
        .lines()
        .find(|l| l.starts_with("bars-gateway:"))
        .unwrap_or_else(|| panic!("no bars-gateway user:\n{passwd}"));
    assert!(user.ends_with(":/nonexistent:/usr/sbin/nologin"), "{user}");
    let group = std::fs::read_to_string(root.join("etc/group")).unwrap();
    let gid: u32 = group
        .lines()
        .find_map(|l| l.strip_prefix("bars-gateway:x:"))
        .and_then(|rest| rest.split(':').next()?.parse().ok())
        .unwrap_or_else(|| panic!("no bars-gateway group:\n{group}"));
    use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
    for dir in ["etc/bars-gateway", "etc/bars-gateway/tls"] {
        let meta = std::fs::metadata(root.join(dir)).unwrap();
        assert_eq!((meta.uid(), meta.gid()), (0, gid), "{dir}");
        assert_eq!(meta.permissions().mode() & 0o777, 0o750, "{dir}");
    }
    let config = std::fs::metadata(root.join("etc/bars-gateway/config.toml")).unwrap();
    assert_eq!(config.permissions().mode() & 0o777, 0o640);
    let installed = root.join("usr/bin/bars-gateway");
    assert!(run(Command::new(&installed).arg("--version")).contains(env!("CARGO_PKG_VERSION")));

    // Upgrade (here: reinstall), with an administrator's key in tls/: the user is not added
    // twice and the key stays.
    std::fs::write(root.join("etc/bars-gateway/tls/server.key"), "key").unwrap();
    install();
    let passwd = std::fs::read_to_string(root.join("etc/passwd")).unwrap();
    let users = passwd
        .lines()
        .filter(|l| l.starts_with("bars-gateway:"))
        .count();
    assert_eq!(users, 1, "{passwd}");
    assert!(root.join("etc/bars-gateway/tls/server.key").is_file());
}

#[test]
fn an_empty_key_password_credential_means_no_password() {
    const TEST: &str = "an_empty_key_password_credential_means_no_password";
    if !tool_runs("openssl", "version") {
        return skip(TEST, "openssl is not on PATH (apt-get install openssl)");
    }
    let pki = TestPki::new();
    // What the unit's `SetCredential=key-password:\n` gives when the password file is absent.
    let credentials = pki.path("credentials");
    std::fs::create_dir(&credentials).unwrap();
    std::fs::write(credentials.join("key-password"), "\n").unwrap();
    let check = |config: &str| {
        std::fs::write(pki.path("config.toml"), config).unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_bars-gateway"))
            .args([
                "check",
                "--config",
                pki.path("config.toml").to_str().unwrap(),
            ])
            .env("CREDENTIALS_DIRECTORY", &credentials)
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    // An unencrypted key starts with it.
    let (code, out) = check(&pki.config_toml("http://127.0.0.1:8080"));
    assert_eq!(code, Some(0), "{out}");
    // An encrypted key is told it needs a password, not that the password is wrong.
    run(Command::new("openssl").current_dir(pki.dir.path()).args([
        "genpkey",
        "-algorithm",
        "EC",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-aes256",
        "-pass",
        "pass:secret",
        "-out",
        "encrypted.key",
    ]));
    let (code, out) = check(&pki.config_toml("http://127.0.0.1:8080").replace(
        "private_key = \"server.key\"",
        "private_key = \"encrypted.key\"",
    ));
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("the key is encrypted"), "{out}");
}

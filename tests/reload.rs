//! Hot reload: certificates, CAs, CRLs and the admission lists change under a running gateway,
//! with no signal needed for file changes, the old state kept on bad input, and no request lost.

mod common;

use std::sync::Arc;
use std::time::Duration;

use bars_gateway::reload::ReloadCounts;
use common::*;
use http::StatusCode;
use tokio::sync::watch;

/// Waits (up to 20 s) until the reload counts satisfy `done`.
async fn wait_for(
    counts: &mut watch::Receiver<ReloadCounts>,
    done: impl Fn(&ReloadCounts) -> bool,
) -> ReloadCounts {
    let waited = tokio::time::timeout(Duration::from_secs(20), async {
        *counts.wait_for(|c| done(c)).await.expect("reloader alive")
    })
    .await;
    match waited {
        Ok(c) => c,
        Err(_) => panic!(
            "no such reload within 20 s; counts now {:?}",
            *counts.borrow()
        ),
    }
}

#[tokio::test]
async fn server_certificate_renamed_into_place_is_served_without_a_signal() {
    let rig = Rig::start().await;
    let config = rig.pki.client_config(Some(ClientCert::Proxy));
    let before = served_certificate(rig.gateway.addr, config.clone()).await;
    let mut counts = rig.gateway.reloader.subscribe();
    let rotated = rig.pki.reissue_server(2);
    assert_ne!(before, rotated);
    wait_for(&mut counts, |c| c.succeeded >= 1).await;
    assert_eq!(
        served_certificate(rig.gateway.addr, config.clone()).await,
        rotated
    );
    assert_eq!(rig.send(metadata()).await.status, 200);
}

#[tokio::test]
async fn a_garbage_certificate_keeps_the_old_one_in_service() {
    let rig = Rig::start().await;
    let config = rig.pki.client_config(Some(ClientCert::Proxy));
    let before = served_certificate(rig.gateway.addr, config.clone()).await;
    let mut counts = rig.gateway.reloader.subscribe();
    rig.pki.replace_file(
        "server-chain.pem",
        b"-----BEGIN CERTIFICATE-----\nnot base64 at all\n-----END CERTIFICATE-----\n",
    );
    let c = wait_for(&mut counts, |c| c.failed >= 1).await;
    assert_eq!(c.succeeded, 0);
    assert_eq!(served_certificate(rig.gateway.addr, config).await, before);
    assert_eq!(rig.send(metadata()).await.status, 200);
    // An explicit reload names the file and key.
    let err = rig.gateway.reloader.reload().await.unwrap_err().to_string();
    assert!(
        err.contains("tls.certificate") && err.contains("server-chain.pem"),
        "{err}"
    );
    assert_eq!(
        metric_of(
            rig.gateway.admin.unwrap(),
            "bars_gateway_reloads_total{result=\"failure\"}"
        )
        .await,
        2.0
    );
}

/// A full disk leaves a file empty or cut short where it was being rewritten in place.
#[tokio::test]
async fn tls_files_cut_short_by_a_full_disk_keep_the_old_material_in_service() {
    let rig = Rig::start().await;
    let config = rig.pki.client_config(Some(ClientCert::Proxy));
    let before = served_certificate(rig.gateway.addr, config.clone()).await;
    for (file, key) in [
        ("server-chain.pem", "tls.certificate"),
        ("server.key", "tls.private_key"),
    ] {
        let path = rig.pki.path(file);
        let whole = std::fs::read(&path).unwrap();
        for cut in [0, whole.len() / 2] {
            std::fs::write(&path, &whole[..cut]).unwrap();
            let err = rig.gateway.reloader.reload().await.unwrap_err().to_string();
            assert!(
                err.contains(key) && err.contains(file),
                "{file} cut at {cut}: {err}"
            );
            assert_eq!(
                served_certificate(rig.gateway.addr, config.clone()).await,
                before
            );
            assert_eq!(rig.send(metadata()).await.status, 200);
        }
        std::fs::write(&path, &whole).unwrap();
    }
    // Once the files are whole again, a reload succeeds.
    rig.gateway.reloader.reload().await.unwrap();
    assert_eq!(served_certificate(rig.gateway.addr, config).await, before);
}

#[tokio::test]
async fn a_key_that_does_not_match_keeps_the_old_material() {
    let rig = Rig::start().await;
    let config = rig.pki.client_config(Some(ClientCert::Proxy));
    let before = served_certificate(rig.gateway.addr, config.clone()).await;
    let mut counts = rig.gateway.reloader.subscribe();
    let other = std::fs::read(rig.pki.path("other.key")).unwrap();
    rig.pki.replace_file("server.key", &other);
    wait_for(&mut counts, |c| c.failed >= 1).await;
    assert_eq!(served_certificate(rig.gateway.addr, config).await, before);
}

#[tokio::test]
async fn a_new_ca_admits_a_client_that_was_refused() {
    let pki = TestPki::new();
    let upstream = TestUpstream::start().await;
    std::fs::copy(pki.path("root.pem"), pki.path("extra-ca.pem")).unwrap();
    let toml = pki.config_toml(&upstream.url()).replace(
        "client_ca = [\"root.pem\", \"sub.pem\"]",
        "client_ca = [\"root.pem\", \"sub.pem\", \"extra-ca.pem\"]",
    );
    let gateway = TestGateway::start(pki.settings(&toml)).await;
    let rogue = pki.client_config(Some(ClientCert::Rogue));
    let err = send(gateway.addr, rogue.clone(), metadata())
        .await
        .unwrap_err();
    assert!(err.contains("UnknownCA"), "{err}");
    let mut counts = gateway.reloader.subscribe();
    pki.replace_file(
        "extra-ca.pem",
        &std::fs::read(pki.path("rogue-ca.pem")).unwrap(),
    );
    wait_for(&mut counts, |c| c.succeeded >= 1).await;
    assert_eq!(
        send(gateway.addr, rogue, metadata()).await.unwrap().status,
        200
    );
    assert_eq!(upstream.count(), 1);
}

#[tokio::test]
async fn a_crl_update_revokes_a_client() {
    let pki = TestPki::new();
    let upstream = TestUpstream::start().await;
    std::fs::copy(pki.path("empty.crl.pem"), pki.path("current.crl.pem")).unwrap();
    let toml = pki.config_toml(&upstream.url()).replace(
        "client_crl = [\"sub.crl.pem\"]",
        "client_crl = [\"current.crl.pem\"]",
    );
    let gateway = TestGateway::start(pki.settings(&toml)).await;
    let revoked = pki.client_config(Some(ClientCert::Revoked));
    assert_eq!(
        send(gateway.addr, revoked.clone(), metadata())
            .await
            .unwrap()
            .status,
        200
    );
    let mut counts = gateway.reloader.subscribe();
    pki.replace_file(
        "current.crl.pem",
        &std::fs::read(pki.path("sub.crl.pem")).unwrap(),
    );
    wait_for(&mut counts, |c| c.succeeded >= 1).await;
    let err = send(gateway.addr, revoked, metadata()).await.unwrap_err();
    assert!(err.contains("CertificateRevoked"), "{err}");
    assert_eq!(upstream.count(), 1);
}

#[tokio::test]
async fn allowed_subjects_and_ips_change_with_the_config_file() {
    let rig = Rig::start().await;
    let mut counts = rig.gateway.reloader.subscribe();
    let toml = std::fs::read_to_string(rig.pki.path("config.toml"))
        .unwrap()
        .replace(
            &format!("allowed_subjects = [\"{PROXY_CN}\"]"),
            "allowed_subjects = [\"someone-else.nhs.uk\"]",
        );
    assert!(toml.contains("someone-else.nhs.uk"), "{toml}");
    rig.pki.replace_file("config.toml", toml.as_bytes());
    wait_for(&mut counts, |c| c.succeeded >= 1).await;
    let wrong = rig.pki.client_config(Some(ClientCert::WrongSubject));
    assert_eq!(
        send(rig.gateway.addr, wrong, metadata())
            .await
            .unwrap()
            .status,
        200
    );
    let proxy = rig.pki.client_config(Some(ClientCert::Proxy));
    let err = send(rig.gateway.addr, proxy.clone(), metadata())
        .await
        .unwrap_err();
    assert!(err.contains("AccessDenied"), "{err}");

    // Now drop 127.0.0.1 from the allowlist: new connections are closed at accept.
    let toml = toml.replace(
        "allowed_ips = [\"127.0.0.1/32\"]",
        "allowed_ips = [\"192.0.2.1/32\"]",
    );
    rig.pki.replace_file("config.toml", toml.as_bytes());
    wait_for(&mut counts, |c| c.succeeded >= 2).await;
    let wrong = rig.pki.client_config(Some(ClientCert::WrongSubject));
    let err = send(rig.gateway.addr, wrong, metadata()).await.unwrap_err();
    assert!(
        err.starts_with("handshake:"),
        "closed before any TLS byte: {err}"
    );
}

#[tokio::test]
async fn polling_reloads_only_when_the_content_changed() {
    let rig = Rig::start().await;
    // Unchanged files: the poll does nothing (no reload, no log line, no metric).
    assert!(rig.gateway.reloader.reload_if_changed().await.is_none());
    let counts = *rig.gateway.reloader.subscribe().borrow();
    assert_eq!(counts, ReloadCounts::default());
}

#[tokio::test]
async fn restart_only_changes_are_reported_and_not_applied() {
    let rig = Rig::start().await;
    let toml = std::fs::read_to_string(rig.pki.path("config.toml"))
        .unwrap()
        .replace("request_timeout = \"2s\"", "request_timeout = \"3s\"");
    std::fs::write(rig.pki.path("config.toml"), toml).unwrap();
    let report = rig.gateway.reloader.reload().await.unwrap();
    assert_eq!(report.restart_required, vec!["upstream"]);
    assert_eq!(rig.send(metadata()).await.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_reloads_during_two_hundred_requests_lose_none() {
    let rig = Arc::new(Rig::start().await);
    let reloads = {
        let rig = rig.clone();
        tokio::spawn(async move {
            for _ in 0..20 {
                rig.gateway.reloader.reload().await.unwrap();
                tokio::task::yield_now().await;
            }
        })
    };
    let config = rig.pki.client_config(Some(ClientCert::Proxy));
    // 100 on one kept-alive connection, interleaved with 100 on new connections.
    let mut kept = connect_http1(rig.gateway.addr, config.clone()).await;
    let mut ok = 0;
    for _ in 0..100 {
        kept.ready().await.unwrap();
        let response = kept.send_request(metadata()).await.unwrap();
        if response.status() == StatusCode::OK {
            ok += 1;
        }
        http_body_util::BodyExt::collect(response.into_body())
            .await
            .unwrap();
        if send(rig.gateway.addr, config.clone(), metadata())
            .await
            .unwrap()
            .status
            == StatusCode::OK
        {
            ok += 1;
        }
    }
    reloads.await.unwrap();
    let counts = *rig.gateway.reloader.subscribe().borrow();
    assert_eq!(counts.succeeded, 20);
    assert_eq!(ok, 200);
    assert_eq!(rig.upstream.count(), 200);
}

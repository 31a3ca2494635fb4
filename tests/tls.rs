//! `rediss://` works with the `tls` feature: run with `cargo test --features tls`.
#![cfg(feature = "tls")]

mod support;

use std::process::Command;
use std::time::Duration;

use job_async_redis::{Client, Config, Mode};
use support::{RedisServer, queue_name, reverse, spawn_worker};

#[tokio::test]
async fn jobs_run_over_tls_with_a_private_certificate_authority() {
    let dir = tempfile::tempdir().unwrap();
    let path = |name: &str| dir.path().join(name).to_str().unwrap().to_owned();
    std::fs::write(path("ext.cnf"), "subjectAltName=IP:127.0.0.1\n").unwrap();
    // A private certificate authority, and a server certificate it signs.
    openssl(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "1",
        "-subj",
        "/CN=test-ca",
        "-keyout",
        &path("ca.key"),
        "-out",
        &path("ca.pem"),
    ]);
    openssl(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        "/CN=127.0.0.1",
        "-keyout",
        &path("key.pem"),
        "-out",
        &path("server.csr"),
    ]);
    openssl(&[
        "x509",
        "-req",
        "-in",
        &path("server.csr"),
        "-CA",
        &path("ca.pem"),
        "-CAkey",
        &path("ca.key"),
        "-CAcreateserial",
        "-days",
        "1",
        "-extfile",
        &path("ext.cnf"),
        "-out",
        &path("cert.pem"),
    ]);
    let tls_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let (cert_s, key_s, ca_s) = (path("cert.pem"), path("key.pem"), path("ca.pem"));
    let server = RedisServer::start_with(&[
        "--tls-port",
        &tls_port.to_string(),
        "--tls-cert-file",
        &cert_s,
        "--tls-key-file",
        &key_s,
        "--tls-ca-cert-file",
        &ca_s,
        "--tls-auth-clients",
        "no",
    ]);
    let ca = std::fs::read(&ca_s).unwrap();
    let config = Config::new(format!("rediss://127.0.0.1:{tls_port}"))
        .tls_ca_pem(ca)
        .block_timeout(Duration::from_millis(500));
    let q = queue_name("tls");
    let worker = spawn_worker(config.clone(), &[&q], 2, reverse).await;
    let client = Client::connect(config).await.unwrap();
    let out: String = client
        .queue(&q, Mode::Simple)
        .await
        .unwrap()
        .submit("secret")
        .await
        .unwrap()
        .result_timeout(Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(out, "terces");
    assert_eq!(worker.stop().await.completed, 1);
    // Without the authority the server's certificate is refused.
    let untrusted = Config::new(format!("rediss://127.0.0.1:{tls_port}"));
    assert!(Client::connect(untrusted).await.is_err());
    drop(server);
}

fn openssl(args: &[&str]) {
    let status = Command::new("openssl")
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .expect("openssl is needed to make test certificates");
    assert!(status.success(), "openssl {args:?}");
}

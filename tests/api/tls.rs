//! TLS: the server over TLS and mTLS, clients that speak it, and
//! PostgreSQL reached over TLS. Certificates are made here, for each test.

use std::{path::PathBuf, time::Duration};

use oncely::{Settings, config::TlsFiles};
use oncely_client::{ClientError, OncelyClient, RetryPolicy, TlsOptions};
use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
use tokio::net::TcpListener;

use crate::support::{Backend, TestDb, email_request, eventually, test_settings};

/// A CA, a server certificate for 127.0.0.1 and a client certificate it
/// signed, as PEM files in a temporary folder.
struct Certificates {
    dir: tempfile::TempDir,
    ca: Vec<u8>,
    client: (Vec<u8>, Vec<u8>),
}

impl Certificates {
    fn new() -> Self {
        let ca_key = KeyPair::generate().expect("key");
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("params");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca_cert = ca_params.self_signed(&ca_key).expect("CA");
        let issuer = Issuer::new(ca_params, ca_key);
        let leaf = |names: Vec<String>| {
            let key = KeyPair::generate().expect("key");
            let cert = CertificateParams::new(names)
                .expect("params")
                .signed_by(&key, &issuer)
                .expect("sign");
            (cert.pem().into_bytes(), key.serialize_pem().into_bytes())
        };
        let server = leaf(vec!["127.0.0.1".into(), "localhost".into()]);
        let client = leaf(vec!["agent.example".into()]);
        let dir = tempfile::tempdir().expect("temporary directory");
        let ca = ca_cert.pem().into_bytes();
        for (name, bytes) in [
            ("ca.pem", &ca),
            ("server.pem", &server.0),
            ("server.key", &server.1),
        ] {
            std::fs::write(dir.path().join(name), bytes).expect("write");
        }
        Self { dir, ca, client }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn server_files(&self, mtls: bool) -> TlsFiles {
        TlsFiles {
            cert: self.path("server.pem"),
            key: self.path("server.key"),
            client_ca: mtls.then(|| self.path("ca.pem")),
        }
    }
}

/// Serves `settings` on a port of its own in the background; returns the
/// `https://` address.
async fn serve(settings: Settings) -> (String, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let server = tokio::spawn(async move {
        let _ = oncely::serve(listener, settings, std::future::pending()).await;
    });
    (format!("https://127.0.0.1:{}", addr.port()), server)
}

fn one_attempt() -> RetryPolicy {
    RetryPolicy {
        max_attempts: 1,
        attempt_timeout: Duration::from_secs(5),
        ..RetryPolicy::default()
    }
}

/// Creates a task through `client`, waiting for the server to come up.
async fn create_eventually(client: &OncelyClient) {
    eventually(Duration::from_secs(60), "a create over TLS", || async {
        client.create_task(email_request()).await.ok()
    })
    .await;
}

async fn a_tls_server_serves_tls_clients_and_refuses_plaintext(backend: Backend) {
    let certs = Certificates::new();
    let db = TestDb::new(backend).await;
    let mut settings = test_settings(&db.url);
    settings.tls = Some(certs.server_files(false));
    let (address, server) = serve(settings).await;
    let tls = TlsOptions {
        ca_pem: Some(certs.ca.clone()),
        identity_pem: None,
    };

    let secure = OncelyClient::connect_with_tls(&address, &tls).expect("client");
    create_eventually(&secure).await;
    let plaintext = OncelyClient::connect(address.replace("https://", "http://"))
        .expect("client")
        .with_retry_policy(one_attempt());
    let untrusting = OncelyClient::connect(&address)
        .expect("client")
        .with_retry_policy(one_attempt());
    let plain = plaintext.create_task(email_request()).await;
    let unknown_ca = untrusting.create_task(email_request()).await;

    assert!(
        matches!(
            plain,
            Err(ClientError::GaveUp { .. } | ClientError::Rejected(_))
        ),
        "{plain:?}"
    );
    assert!(
        unknown_ca.is_err(),
        "a server certificate from an unknown CA was trusted"
    );
    assert_eq!(db.count("tasks").await, 1);
    server.abort();
}

async fn mtls_refuses_a_client_without_a_certificate(backend: Backend) {
    let certs = Certificates::new();
    let db = TestDb::new(backend).await;
    let mut settings = test_settings(&db.url);
    settings.tls = Some(certs.server_files(true));
    let (address, server) = serve(settings).await;
    let with_identity = TlsOptions {
        ca_pem: Some(certs.ca.clone()),
        identity_pem: Some(certs.client.clone()),
    };
    let without = TlsOptions {
        ca_pem: Some(certs.ca.clone()),
        identity_pem: None,
    };

    // A certificate, but from a CA the server does not know.
    let stranger = TlsOptions {
        ca_pem: Some(certs.ca.clone()),
        identity_pem: Some(Certificates::new().client),
    };

    let known = OncelyClient::connect_with_tls(&address, &with_identity).expect("client");
    create_eventually(&known).await;
    let anonymous = OncelyClient::connect_with_tls(&address, &without)
        .expect("client")
        .with_retry_policy(one_attempt());
    let refused = anonymous.create_task(email_request()).await;
    let unknown = OncelyClient::connect_with_tls(&address, &stranger)
        .expect("client")
        .with_retry_policy(one_attempt())
        .create_task(email_request())
        .await;

    assert!(
        refused.is_err(),
        "a client without a certificate was served"
    );
    assert!(
        unknown.is_err(),
        "a client certificate from an unknown CA was accepted"
    );
    assert_eq!(db.count("tasks").await, 1);
    server.abort();
}

/// A client asked for `https://` never falls back to plaintext: against a
/// plaintext server, the call fails and nothing is created.
async fn clients_asked_for_https_never_fall_back_to_plaintext(backend: Backend) {
    let db = TestDb::new(backend).await;
    let (address, server) = serve(test_settings(&db.url)).await;
    let plain = address.replace("https://", "http://");
    let client = OncelyClient::connect(&plain).expect("client");
    create_eventually(&client).await;

    let secure = OncelyClient::connect(&address)
        .expect("client")
        .with_retry_policy(one_attempt())
        .create_task(email_request())
        .await;
    let cleanup = std::process::Command::new(crate::support::BINARY)
        .args(["cleanup", "--server", &address, "--timeout", "5s"])
        .output()
        .expect("run cleanup");

    assert!(secure.is_err(), "the client spoke plaintext: {secure:?}");
    assert!(
        !cleanup.status.success(),
        "cleanup spoke plaintext: {cleanup:?}"
    );
    assert_eq!(db.count("tasks").await, 1, "only the plaintext create");
    server.abort();
}

async fn cleanup_calls_a_tls_server_with_a_ca_file(backend: Backend) {
    let certs = Certificates::new();
    let db = TestDb::new(backend).await;
    let mut settings = test_settings(&db.url);
    settings.tls = Some(certs.server_files(false));
    let (address, server) = serve(settings).await;
    let client = OncelyClient::connect_with_tls(
        &address,
        &TlsOptions {
            ca_pem: Some(certs.ca.clone()),
            identity_pem: None,
        },
    )
    .expect("client");
    create_eventually(&client).await;

    let cleanup = |ca: Option<PathBuf>| {
        let mut command = std::process::Command::new(crate::support::BINARY);
        command.args(["cleanup", "--server", &address, "--timeout", "5s"]);
        if let Some(ca) = ca {
            command.arg("--ca-file").arg(ca);
        }
        command.output().expect("run cleanup")
    };
    let trusted = cleanup(Some(certs.path("ca.pem")));
    let untrusted = cleanup(None);

    assert!(trusted.status.success(), "{trusted:?}");
    assert!(!untrusted.status.success(), "an unknown CA was trusted");
    server.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_is_reached_over_tls_when_the_url_asks() {
    let db = TestDb::new(Backend::Postgres).await;
    let url = format!("{}?sslmode=require", db.url);
    let app = crate::support::TestApp::spawn_with(test_settings(&url)).await;

    app.create(Some(&crate::support::new_key()), email_request())
        .await
        .expect("create over a TLS connection to the database");

    let encrypted: bool = sqlx::query_scalar(
        "SELECT coalesce(bool_and(s.ssl), false) FROM pg_stat_ssl s \
         JOIN pg_stat_activity a USING (pid) \
         WHERE a.datname = current_database() AND a.application_name = 'oncely'",
    )
    .fetch_one(db.pg_pool())
    .await
    .expect("read pg_stat_ssl");
    assert!(encrypted, "the server's connections are not encrypted");
}

/// `verify-full` checks the database's certificate against a CA and its
/// name: this machine's PostgreSQL serves the Debian "snakeoil"
/// certificate, self-signed for `localhost`, so it is its own CA.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_verify_full_checks_the_certificate_and_its_name() {
    const SNAKEOIL: &str = "/etc/ssl/certs/ssl-cert-snakeoil.pem";
    let db = TestDb::new(Backend::Postgres).await;
    let database = db.url.rsplit('/').next().expect("a database name");
    let url = |ca: &str| {
        format!(
            "postgres://postgres@localhost:5432/{database}?sslmode=verify-full&sslrootcert={ca}"
        )
    };
    let other_ca = Certificates::new();
    std::fs::write(other_ca.path("other.pem"), &other_ca.ca).expect("write");

    let verified = oncely::storage::PgStore::connect(&test_settings(&url(SNAKEOIL)).database).await;
    let unverified = oncely::storage::PgStore::connect(
        &test_settings(&url(&other_ca.path("other.pem").display().to_string())).database,
    )
    .await;

    let store = verified.expect("the certificate verifies against its CA and name");
    oncely::storage::Store::ping(&store)
        .await
        .expect("ping over verified TLS");
    assert!(
        unverified.is_err(),
        "a certificate from another CA was trusted"
    );
}

conformance!(
    a_tls_server_serves_tls_clients_and_refuses_plaintext,
    mtls_refuses_a_client_without_a_certificate,
    clients_asked_for_https_never_fall_back_to_plaintext,
    cleanup_calls_a_tls_server_with_a_ca_file,
);

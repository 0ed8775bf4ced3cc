//! OTLP export: the real binary with `telemetry.otlp_endpoint` pointing at
//! a receiver this test starts, over HTTP and over HTTPS with a private CA
//! (`telemetry.otlp_tls_ca_path`); a command with a `traceparent` leads to
//! an exported span in the caller's trace, whose parent is the caller's
//! span. (Its own test binary: the exporter is process-global.)

mod support;

use axum::body::Bytes;
use axum::routing::post;
use futures_util::StreamExt;
use refund_sandbox::{Sandbox, SandboxConfig};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use support::broker::RabbitNode;
use support::{HYP_REFUND, WAIT};

fn hex(text: &str) -> Vec<u8> {
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&text[i..i + 2], 16).expect("hex"))
        .collect()
}

type Received = Arc<Mutex<Vec<Vec<u8>>>>;

/// What an OTLP/HTTP collector gets at /v1/traces.
fn receiver(received: &Received) -> axum::Router {
    let sink = received.clone();
    axum::Router::new().route(
        "/v1/traces",
        post(move |body: Bytes| {
            let sink = sink.clone();
            async move {
                sink.lock().expect("lock").push(body.to_vec());
                ""
            }
        }),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refund_spans_are_exported_under_the_callers_trace() {
    let received = Received::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let collector = format!("http://{}", listener.local_addr().expect("addr"));
    let app = receiver(&received);
    tokio::spawn(async move { axum::serve(listener, app).await });
    export_one_refund(&collector, None, &received).await;
}

/// An `https://` collector whose certificate a private CA signed: the
/// worker trusts it through `telemetry.otlp_tls_ca_path`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_reach_an_https_collector_signed_by_a_private_ca() {
    let certs = tempfile::tempdir().expect("cert dir");
    let files = refund_testkit::tls::certificates(certs.path());
    let received = Received::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let collector = format!(
        "https://localhost:{}",
        listener.local_addr().expect("addr").port()
    );
    tokio::spawn(serve_tls(listener, &files, receiver(&received)));
    export_one_refund(&collector, Some(&files.ca), &received).await;
}

/// Serves `app` over TLS with the test certificate.
fn serve_tls(
    listener: tokio::net::TcpListener,
    files: &refund_testkit::local_broker::TlsFiles,
    app: axum::Router,
) -> impl std::future::Future<Output = ()> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&files.cert)
        .expect("cert")
        .map(|c| c.expect("cert"))
        .collect();
    let key = PrivateKeyDer::from_pem_file(&files.key).expect("key");
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .expect("server config");
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let (acceptor, app) = (acceptor.clone(), app.clone());
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let service = hyper_util::service::TowerToHyperService::new(app);
                let _ = hyper_util::server::conn::auto::Builder::new(
                    hyper_util::rt::TokioExecutor::new(),
                )
                .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                .await;
            });
        }
    }
}

/// Runs the worker binary exporting to `collector`, sends one traced
/// refund, stops the worker (which flushes its exporter) and checks what
/// `received` got.
async fn export_one_refund(collector: &str, ca: Option<&std::path::Path>, received: &Received) {
    let amqp_url = tokio::task::spawn_blocking(|| RabbitNode::shared().vhost())
        .await
        .expect("vhost");
    let sandbox = Sandbox::new(SandboxConfig::default());
    let sandbox_url = format!(
        "http://{}",
        sandbox.spawn("127.0.0.1:0").await.expect("sandbox")
    );
    let dir = tempfile::tempdir().expect("dir");
    let store = dir.path().join("store");
    let config = dir.path().join("worker.toml");
    std::fs::write(
        &config,
        support::settings_layer(&amqp_url, &store, &sandbox_url),
    )
    .expect("config");
    let settings = support::test_settings(&amqp_url, &store, &sandbox_url);
    let (_connection, channel, mut events) = support::test_client(&amqp_url, &settings).await;
    let http_addr = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port");
    let mut child = Command::new(env!("CARGO_BIN_EXE_refund-worker"))
        .args(["run", "--config"])
        .arg(&config)
        .env("REFUND_WORKER__TELEMETRY__OTLP_ENDPOINT", collector)
        .envs(ca.map(|ca| ("REFUND_WORKER__TELEMETRY__OTLP_TLS_CA_PATH", ca)))
        .env("REFUND_WORKER__HTTP__ADDR", http_addr.to_string())
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("worker binary");

    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let ready = reqwest::get(format!("http://{http_addr}/readyz"))
            .await
            .is_ok_and(|r| r.status().is_success());
        if ready {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the worker never became ready"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let parent_span = "00f067aa0ba902b7";
    let parent = format!("00-{trace_id}-{parent_span}-01");
    support::publish_traced(&channel, "refunds.commands", HYP_REFUND, &parent).await;
    let event = tokio::time::timeout(WAIT, events.next())
        .await
        .expect("an event in time")
        .expect("stream")
        .expect("delivery");
    let traceparent = support::header(
        &event.properties.headers().clone().unwrap_or_default(),
        "traceparent",
    )
    .expect("the event carries the refund span");
    assert!(traceparent.contains(trace_id), "{traceparent}");

    // A clean stop flushes the exporter.
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while child.try_wait().expect("wait").is_none() {
        assert!(
            std::time::Instant::now() < deadline,
            "the worker did not stop"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let bodies = received.lock().expect("lock").clone();
    assert!(!bodies.is_empty(), "nothing exported");
    let contains = |needle: &[u8]| {
        bodies
            .iter()
            .any(|body| body.windows(needle.len()).any(|w| w == needle))
    };
    assert!(contains(&hex(trace_id)), "no span in the caller's trace");
    assert!(
        contains(&hex(parent_span)),
        "the caller's span is not the parent"
    );
    // The span the event names is the exported one.
    let span_id = traceparent.split('-').nth(2).expect("span id");
    assert!(
        contains(&hex(span_id)),
        "the event's span {span_id} was not exported"
    );
}

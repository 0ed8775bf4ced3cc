//! The doors: the operator API behind its token and off the public
//! listener, hardened provider callbacks, configuration errors an operator
//! can read, and the broker over TLS with a CA the test makes itself.

mod support;

use refund_sandbox::SandboxConfig;
use refund_testkit::local_broker::TlsFiles;
use refund_worker::service::app::App;
use serde_json::json;
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;
use support::broker::RabbitNode;
use support::{TestApp, HYP_REFUND, OPERATOR_TOKEN};

/// This binary's node has an AMQPS listener as well; every test starts it
/// this way before anything else can start it without.
fn tls_node() -> (&'static RabbitNode, &'static TlsFiles) {
    static FILES: OnceLock<(tempfile::TempDir, TlsFiles)> = OnceLock::new();
    let (_, files) = FILES.get_or_init(|| {
        let dir = tempfile::tempdir().expect("cert dir");
        let files = refund_testkit::tls::certificates(dir.path());
        (dir, files)
    });
    (RabbitNode::shared_tls(files), files)
}

async fn start_node() -> (&'static RabbitNode, &'static TlsFiles) {
    tokio::task::spawn_blocking(tls_node).await.expect("node")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_operator_api_needs_its_token_and_stays_off_the_public_listener() {
    start_node().await;
    let app = TestApp::start_with(SandboxConfig::default(), |s| {
        s.http.callback_addr = Some("127.0.0.1:0".into());
    })
    .await;
    let private = format!("http://{}", app.http_addr);
    let public = format!("http://{}", app.callback_addr.expect("callback listener"));
    let http = reqwest::Client::new();
    let status = |r: reqwest::Response| r.status().as_u16();
    // No token, a wrong one, a malformed header: 401, never 500.
    let url = format!("{private}/refunds/rf-x");
    assert_eq!(status(http.get(&url).send().await.expect("get")), 401);
    for header in [
        &b"Bearer wrong-token-0123456789"[..],
        b"Bearer",
        b"Basic Z3Vlc3Q6Z3Vlc3Q=",
        b"bearer test-operator-token-0123456789",
        b"Bearer \xff\xfe not text",
    ] {
        let value = reqwest::header::HeaderValue::from_bytes(header).expect("header value");
        let answer = http
            .get(&url)
            .header("authorization", value)
            .send()
            .await
            .expect("get");
        assert_eq!(status(answer), 401, "{header:?}");
    }
    // Nothing changes state without the token.
    let resolve = http
        .post(format!("{private}/refunds/rf-x/resolve"))
        .json(&json!({"not_executed": true, "by": "eve", "reason": "x"}))
        .send()
        .await
        .expect("post");
    assert_eq!(status(resolve), 401);
    // With the token: the API answers (404: no such refund).
    let answer = http
        .get(&url)
        .bearer_auth(OPERATOR_TOKEN)
        .send()
        .await
        .expect("get");
    assert_eq!(status(answer), 404);
    // The public listener serves callbacks only; the private one none.
    let answer = http
        .get(format!("{public}/refunds/rf-x"))
        .bearer_auth(OPERATOR_TOKEN)
        .send()
        .await
        .expect("get");
    assert_eq!(status(answer), 404);
    for path in ["/metrics", "/readyz"] {
        let answer = http
            .get(format!("{public}{path}"))
            .send()
            .await
            .expect("get");
        assert_eq!(status(answer), 404, "{path} on the public listener");
    }
    let callback = format!("/callbacks/paynet/rf-x/{}", "0".repeat(32));
    let body = json!({"xact_id": "x", "code": "0", "status": "approved", "message": "m"});
    let answer = http
        .post(format!("{private}{callback}"))
        .json(&body)
        .send()
        .await
        .expect("post");
    assert_eq!(
        status(answer),
        404,
        "callbacks are not on the private listener"
    );
    let answer = http
        .post(format!("{public}{callback}"))
        .json(&body)
        .send()
        .await
        .expect("post");
    assert_eq!(status(answer), 404, "unknown refund");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callbacks_are_post_only_bounded_and_do_not_tell_which_refunds_exist() {
    start_node().await;
    let config = SandboxConfig {
        // The callback from the sandbox comes late: the test posts first.
        paynet_callback_delay: Duration::from_secs(60),
        ..Default::default()
    };
    let mut app = TestApp::start_with(config, |s| {
        s.http.callback_max_body_bytes = 1024;
    })
    .await;
    app.publish(include_str!("../examples/paynet-refund.json"))
        .await;
    assert_eq!(app.next_event().await.0, "refund.pending");
    let base = format!("http://{}/callbacks/paynet", app.http_addr);
    let http = reqwest::Client::new();
    let body = json!({"xact_id": "x", "code": "0", "status": "approved", "message": "m"});
    // A known refund with a wrong token and an unknown refund: one answer.
    let wrong_token = http
        .post(format!(
            "{base}/rf-example-paynet-refund-1/{}",
            "0".repeat(32)
        ))
        .json(&body)
        .send()
        .await
        .expect("post");
    let unknown = http
        .post(format!("{base}/rf-nobody/{}", "0".repeat(32)))
        .json(&body)
        .send()
        .await
        .expect("post");
    assert_eq!(wrong_token.status(), unknown.status());
    assert_eq!(
        wrong_token.text().await.expect("body"),
        unknown.text().await.expect("body")
    );
    // Oversized, and not POST.
    let big = http
        .post(format!(
            "{base}/rf-example-paynet-refund-1/{}",
            "0".repeat(32)
        ))
        .body(vec![b'x'; 4096])
        .send()
        .await
        .expect("post");
    assert_eq!(big.status().as_u16(), 413);
    let get = http
        .get(format!(
            "{base}/rf-example-paynet-refund-1/{}",
            "0".repeat(32)
        ))
        .send()
        .await
        .expect("get");
    assert_eq!(get.status().as_u16(), 405);
    let metrics = http
        .get(format!("http://{}/metrics", app.http_addr))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    // The recorder is shared by this binary's tests: at least ours.
    let count = |reason: &str| -> f64 {
        let prefix = format!("refund_worker_callbacks_rejected_total{{reason=\"{reason}\"}} ");
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0.0)
    };
    assert!(count("not_found") >= 2.0, "{metrics}");
    assert!(count("too_large") >= 1.0, "{metrics}");
    // The refund is still pending: nothing forged got through.
    assert_eq!(
        refund_worker::ops::status_of(&app.record("rf-example-paynet-refund-1").await),
        "pending"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_token_the_operator_api_is_off() {
    start_node().await;
    let app = TestApp::start_with(SandboxConfig::default(), |s| {
        s.http.operator_token = None;
    })
    .await;
    let answer = reqwest::Client::new()
        .get(format!("http://{}/refunds", app.http_addr))
        .bearer_auth("anything-at-all-0123456789")
        .send()
        .await
        .expect("get");
    assert_eq!(answer.status().as_u16(), 403);
}

#[test]
fn a_configuration_error_is_one_line_naming_key_and_origin_with_status_2() {
    let output = Command::new(env!("CARGO_BIN_EXE_refund-worker"))
        .arg("run")
        .env("RUST_BACKTRACE", "1")
        .env("REFUND_WORKER__AMQP__PREFETCH", "0")
        .env("REFUND_WORKER__PROVIDERS__HYP_PAY__KIND", "hyp_pay")
        .env("REFUND_WORKER__PROVIDERS__HYP_PAY__MASOF", "0010131918")
        .env(
            "REFUND_WORKER__PROVIDERS__HYP_PAY__PASS_P",
            "secret-pass-value",
        )
        .output()
        .expect("run the binary");
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "{stderr}");
    assert!(lines[0].contains("amqp.prefetch"), "{stderr}");
    assert!(
        lines[0].contains("REFUND_WORKER__AMQP__PREFETCH"),
        "{stderr}"
    );
    assert!(!stderr.contains("backtrace") && !stderr.contains("secret-pass-value"));

    // A type error from the environment, in a provider account.
    let output = Command::new(env!("CARGO_BIN_EXE_refund-worker"))
        .arg("run")
        .env("RUST_BACKTRACE", "full")
        .env("REFUND_WORKER__PROVIDERS__CG__KIND", "creditguard")
        .env(
            "REFUND_WORKER__PROVIDERS__CG__BASE_URL",
            "https://cg.example/xpo/Relay",
        )
        .env("REFUND_WORKER__PROVIDERS__CG__USER", "u")
        .env("REFUND_WORKER__PROVIDERS__CG__PASSWORD", "p")
        .env(
            "REFUND_WORKER__PROVIDERS__CG__TERMINAL_NUMBER",
            "0882819014",
        )
        .env("REFUND_WORKER__PROVIDERS__CG__DEDUPE_REQUESTS", "maybe")
        .output()
        .expect("run the binary");
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(stderr.contains("maybe"), "{stderr}");
    assert!(
        stderr.contains("REFUND_WORKER__PROVIDERS__CG__DEDUPE_REQUESTS"),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_worker_talks_to_the_broker_over_tls_with_the_configured_ca() {
    let (node, files) = start_node().await;
    let ca = files.ca.clone();
    let mut app = TestApp::start_with(SandboxConfig::default(), |s| {
        s.amqp.url = refund_worker::values::secret::Secret::new(node.tls_url(s.amqp.url.expose()));
        s.amqp.tls_ca_path = Some(ca);
    })
    .await;
    assert!(app.settings.amqp.url.expose().starts_with("amqps://"));
    app.publish(HYP_REFUND).await;
    let (key, _) = app.next_event().await;
    assert_eq!(key, "refund.succeeded");

    // The same broker without its CA: start-up stops with a clear message.
    let mut untrusted = app.settings.clone();
    untrusted.amqp.tls_ca_path = None;
    untrusted.store.path = app.store_dir.path().join("other");
    let err = App::build(untrusted)
        .await
        .expect_err("an untrusted certificate stops start-up")
        .to_string();
    assert!(
        err.contains("not trusted") && err.contains("amqp.tls_ca_path"),
        "{err}"
    );
}

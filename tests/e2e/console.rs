//! The operator console: signing in, resolving an in-doubt refund and
//! replaying a dead letter through its forms (over HTTP), field checks and
//! races; and (ignored, run by hand) the same in headless Chromium with
//! screenshots for `docs/`.

use crate::support;

use refund_sandbox::{Fault, FaultKind, SandboxConfig};
use std::time::Duration;
use support::{TestApp, OPERATOR_TOKEN};

/// One refund in doubt (executed, then an HTML page) and one dead letter
/// (a 503 with no rounds left).
async fn scenario() -> TestApp {
    let mut app = TestApp::start_with(SandboxConfig::default(), |s| {
        s.retry.max_attempts = 1;
        s.retry.delayed_ms = vec![];
        support::policy_mut(s, "hyp_pay").breaker.failures = 0;
    })
    .await;
    app.sandbox.add_fault(Fault {
        fault: FaultKind::HtmlAfter,
        original_id: Some("12290620".into()),
        times: 1,
        stall_ms: 0,
    });
    app.sandbox.add_fault(Fault {
        fault: FaultKind::Unavailable,
        original_id: Some("12290621".into()),
        times: 1,
        stall_ms: 0,
    });
    app.publish(&support::with_refund_id(
        support::HYP_REFUND,
        "rf-console-doubt",
    ))
    .await;
    let dead = support::HYP_REFUND
        .replace("rf-example-hyp-refund-1", "rf-console-dead")
        .replace("12290620", "12290621");
    app.publish(&dead).await;
    assert_eq!(app.next_event().await.0, "refund.in_doubt");
    app.wait_depth("refunds.dead", 2).await;
    app
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("client")
}

/// Follows the console's redirect back to the page and returns its HTML.
async fn after(app: &TestApp, response: reqwest::Response) -> String {
    assert_eq!(
        response.status().as_u16(),
        303,
        "a form answers with a redirect"
    );
    let location = response.headers()["location"]
        .to_str()
        .expect("location")
        .to_string();
    client()
        .get(format!("http://{}{location}", app.http_addr))
        .header("cookie", format!("rw_operator={OPERATOR_TOKEN}"))
        .send()
        .await
        .expect("page")
        .text()
        .await
        .expect("html")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operators_resolve_and_replay_through_the_console() {
    let mut app = scenario().await;
    let base = format!("http://{}", app.http_addr);
    let http = client();
    // Not signed in: sent to the sign-in page; a wrong token is refused.
    let page = http
        .get(format!("{base}/console"))
        .send()
        .await
        .expect("get");
    assert_eq!(page.status().as_u16(), 303);
    let wrong = http
        .post(format!("{base}/console/login"))
        .form(&[("token", "not-the-token-at-all")])
        .send()
        .await
        .expect("post");
    assert_eq!(wrong.status().as_u16(), 401);
    let login = http
        .post(format!("{base}/console/login"))
        .form(&[("token", OPERATOR_TOKEN)])
        .send()
        .await
        .expect("post");
    let cookie = login.headers()["set-cookie"]
        .to_str()
        .expect("cookie")
        .to_string();
    assert!(
        cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"),
        "{cookie}"
    );
    let html = after(&app, login).await;
    assert!(
        html.contains("rf-console-doubt") && html.contains("rf-console-dead"),
        "{html}"
    );
    assert!(html.contains("provider_unavailable"), "{html}");
    // Dead letters are listed from a bounded read, with the queue's count.
    assert!(html.contains("id=\"dead-count\">2 of 2 shown"), "{html}");

    // A form without who and why is refused, naming the field.
    let signed = |request: reqwest::RequestBuilder| {
        request.header("cookie", format!("rw_operator={OPERATOR_TOKEN}"))
    };
    let missing = signed(http.post(format!("{base}/console/resolve/rf-console-doubt")))
        .form(&[("verdict", "executed"), ("executed", "405577500")])
        .send()
        .await
        .expect("post");
    assert!(after(&app, missing).await.contains("by is required"));
    // Replaying the in-doubt refund is refused.
    let early = signed(http.post(format!("{base}/console/replay/rf-console-doubt")))
        .send()
        .await
        .expect("post");
    assert!(after(&app, early).await.contains("in doubt"));

    // Resolve as executed: the succeeded event goes out.
    let txn = app.sandbox.journal()[0].new_id.clone();
    let resolve = signed(http.post(format!("{base}/console/resolve/rf-console-doubt")))
        .form(&[
            ("verdict", "executed"),
            ("executed", txn.as_str()),
            ("by", "dana"),
            ("reason", "seen in the back office"),
        ])
        .send()
        .await
        .expect("post");
    assert!(after(&app, resolve).await.contains("now succeeded"));
    let (key, event) = app.next_event().await;
    assert_eq!(key, "refund.succeeded");
    assert_eq!(event["provider_transaction_id"], txn.as_str());
    // A second operator resolving the same refund is told what happened.
    let again = signed(http.post(format!("{base}/console/resolve/rf-console-doubt")))
        .form(&[
            ("verdict", "not_executed"),
            ("by", "eli"),
            ("reason", "late"),
        ])
        .send()
        .await
        .expect("post");
    assert!(after(&app, again).await.contains("is succeeded"));

    // Replay the dead letter: executed now (the 503 is gone).
    let replay = signed(http.post(format!("{base}/console/replay/rf-console-dead")))
        .send()
        .await
        .expect("post");
    assert!(after(&app, replay).await.contains("replayed"));
    let (key, event) = app.next_event().await;
    assert_eq!(key, "refund.succeeded");
    assert_eq!(event["refund_id"], "rf-console-dead");
    // Edit without a change names the field.
    let edit = signed(http.post(format!("{base}/console/edit/rf-console-doubt")))
        .form(&[("set", ""), ("by", "dana"), ("reason", "x")])
        .send()
        .await
        .expect("post");
    assert!(after(&app, edit)
        .await
        .contains("set (path=value) is required"));
    let _ = Duration::ZERO;
}

/// The same through a real headless browser, writing the screenshots in
/// `docs/`. Needs Debian's `chromium` and `npm install` in
/// `scripts/console-check`: `cargo test --test e2e console -- --ignored`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs chromium and node (see scripts/console-check)"]
async fn the_console_in_a_real_browser() {
    let mut app = scenario().await;
    let txn = app.sandbox.journal()[0].new_id.clone();
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let output = tokio::process::Command::new("node")
        .arg(dir.join("scripts/console-check/check.mjs"))
        .arg(format!("http://{}", app.http_addr))
        .arg(OPERATOR_TOKEN)
        .arg("rf-console-doubt")
        .arg(&txn)
        .arg("rf-console-dead")
        .arg(dir.join("docs"))
        .output()
        .await
        .expect("node");
    assert!(
        output.status.success(),
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    let mut statuses = Vec::new();
    for _ in 0..2 {
        statuses.push(app.next_event().await.0);
    }
    assert_eq!(statuses, ["refund.succeeded", "refund.succeeded"]);
    assert_eq!(
        app.queue_depth("refunds.dead").await,
        1,
        "the in-doubt message stays until replayed"
    );
}

//! Operator tools against a real broker and a running worker: dead-letter
//! listing and replay (filters, limit, dry run, interruption), in-doubt
//! refunds refused until resolved, resolution both ways, metrics.

use crate::support;

use refund_sandbox::{Fault, FaultKind, SandboxConfig};
use refund_worker::ops::dlq::{Dlq, Filter};
use refund_worker::ops::status_of;
use refund_worker::worker::Resolution;
use std::time::Duration;
use support::{with_refund_id, TestApp, HYP_REFUND};

fn fault(kind: FaultKind, original: &str) -> Fault {
    Fault {
        fault: kind,
        original_id: Some(original.into()),
        times: 1,
        stall_ms: 0,
    }
}

fn refund_on(refund_id: &str, original: &str, minor: u64) -> String {
    serde_json::json!({
        "refund_id": refund_id,
        "provider": "hyp_pay",
        "transaction": { "id": original },
        "amount": { "minor": minor, "currency": "ILS" },
    })
    .to_string()
}

/// One attempt, no delay rounds: a 503 goes straight to the dead letters.
async fn start_impatient() -> TestApp {
    TestApp::start_with(SandboxConfig::default(), |s| {
        s.retry.max_attempts = 1;
        s.retry.delayed_ms = vec![];
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_are_listed_and_replayed_with_filters_limit_and_dry_run() {
    let mut app = start_impatient().await;
    let api = app.api();
    for (id, original) in [
        ("rf-out-1", "12290620"),
        ("rf-out-2", "12290621"),
        ("rf-out-3", "12290622"),
    ] {
        app.sandbox
            .add_fault(fault(FaultKind::Unavailable, original));
        app.publish(&refund_on(id, original, 100)).await;
    }
    app.publish_raw(b"not json", Some("application/json")).await;
    app.wait_depth("refunds.dead", 4).await;

    let outage = Filter {
        reason: Some("provider_unavailable".into()),
        ..Default::default()
    };
    {
        let dlq = Dlq::open(&app.settings.amqp).await.expect("browse");
        assert_eq!(dlq.messages().len(), 4);
        let listed: Vec<_> = dlq
            .messages()
            .iter()
            .filter(|m| outage.matches(m))
            .collect();
        assert_eq!(listed.len(), 3);
        assert!(listed
            .iter()
            .all(|m| m.provider.as_deref() == Some("hyp_pay") && m.attempts == 1));
        let old = Filter {
            older_than: Some(Duration::from_secs(3600)),
            ..Default::default()
        };
        assert_eq!(dlq.messages().iter().filter(|m| old.matches(m)).count(), 0);
        dlq.close().await;
    }
    app.wait_depth("refunds.dead", 4).await;

    // Dry run: nothing moves.
    let report = app.replay(&outage, None, true).await;
    assert_eq!((report.matched, report.done), (3, 3));
    app.wait_depth("refunds.dead", 4).await;
    assert!(app.sandbox.journal().is_empty());

    // Limit 1: one comes back and succeeds.
    let report = app.replay(&outage, Some(1), false).await;
    assert_eq!(report.done, 1);
    let (key, _) = app.next_event().await;
    assert_eq!(key, "refund.succeeded");
    app.wait_depth("refunds.dead", 3).await;

    // An interrupted replay (connection dropped without closing) loses
    // nothing: what was not confirmed and removed is back in the queue.
    let mut dlq = Dlq::open(&app.settings.amqp).await.expect("browse");
    let report = dlq
        .replay(
            &outage,
            Some(1),
            false,
            app.settings.store.retention().tombstones,
            async |id: &str| api.still_in_doubt(id).await,
            |_| {},
        )
        .await
        .expect("replay");
    assert_eq!(report.done, 1);
    drop(dlq);
    let (key, _) = app.next_event().await;
    assert_eq!(key, "refund.succeeded");
    app.wait_depth("refunds.dead", 2).await;

    // The rest, by refund id; the poison message stays.
    let report = app.replay(&outage, None, false).await;
    assert_eq!(report.done, 1);
    assert_eq!(app.next_event().await.0, "refund.succeeded");
    app.wait_depth("refunds.dead", 1).await;
    assert_eq!(app.sandbox.journal().len(), 3);

    // Purge by reason removes the poison message.
    let mut dlq = Dlq::open(&app.settings.amqp).await.expect("browse");
    let malformed = Filter {
        reason: Some("malformed".into()),
        ..Default::default()
    };
    let report = dlq.purge_poison(&malformed, None).await.expect("purge");
    dlq.close().await;
    assert_eq!(report.done, 1);
    app.wait_depth("refunds.dead", 0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_doubt_refunds_are_not_replayed_until_resolved_either_way() {
    let mut app = TestApp::start().await;
    let api = app.api();
    // A: executed, then an HTML page. B: an HTML page without executing.
    app.sandbox
        .add_fault(fault(FaultKind::HtmlAfter, "12290620"));
    app.sandbox
        .add_fault(fault(FaultKind::HtmlBefore, "12290621"));
    app.publish(&refund_on("rf-doubt-a", "12290620", 100)).await;
    app.publish(&refund_on("rf-doubt-b", "12290621", 100)).await;
    for _ in 0..2 {
        assert_eq!(app.next_event().await.0, "refund.in_doubt");
    }
    app.wait_depth("refunds.dead", 2).await;
    assert_eq!(app.sandbox.journal().len(), 1);
    let listed = api.list(Some("in_doubt"), 10).await.expect("list");
    assert_eq!(listed.len(), 2);

    // Replay refuses both.
    let everything = Filter::default();
    let report = app.replay(&everything, None, false).await;
    assert_eq!(report.done, 0);
    assert_eq!(report.skipped_in_doubt.len(), 2);
    app.wait_depth("refunds.dead", 2).await;

    // Resolution needs who and why, and exactly one verdict.
    let bad = Resolution {
        by: "ops".into(),
        reason: "".into(),
        executed: Some("1".into()),
        not_executed: false,
        performed: None,
    };
    assert!(api.resolve("rf-doubt-a", &bad).await.is_err());

    // A happened (the operator saw transaction 405577500 at Hyp).
    let txn = app.sandbox.journal()[0].new_id.clone();
    let resolved = api
        .resolve(
            "rf-doubt-a",
            &Resolution {
                executed: Some(txn.clone()),
                not_executed: false,
                performed: None,
                by: "dana".into(),
                reason: "seen in Hyp back office".into(),
            },
        )
        .await
        .expect("resolve executed");
    assert_eq!(status_of(&resolved), "succeeded");
    let (key, event) = app.next_event().await;
    assert_eq!(key, "refund.succeeded");
    assert_eq!(event["refund_id"], "rf-doubt-a");
    assert_eq!(event["provider_transaction_id"], txn.as_str());
    let history = resolved["history"].to_string();
    assert!(
        history.contains("dana") && history.contains("back office"),
        "{history}"
    );
    // Resolving it again is refused.
    assert!(api
        .resolve(
            "rf-doubt-a",
            &Resolution {
                executed: Some(txn.clone()),
                not_executed: false,
                performed: None,
                by: "dana".into(),
                reason: "again".into()
            }
        )
        .await
        .is_err());

    // B did not happen: one new attempt, through replay.
    let resolved = api
        .resolve(
            "rf-doubt-b",
            &Resolution {
                executed: None,
                not_executed: true,
                performed: None,
                by: "dana".into(),
                reason: "not in Hyp".into(),
            },
        )
        .await
        .expect("resolve not executed");
    assert_eq!(status_of(&resolved), "not_sent");
    let report = app.replay(&everything, None, false).await;
    assert_eq!(report.done, 2, "both resolved: both replayed");
    let mut keys = [app.next_event().await, app.next_event().await];
    keys.sort_by(|a, b| a.1["refund_id"].as_str().cmp(&b.1["refund_id"].as_str()));
    assert_eq!(keys[0].0, "refund.succeeded"); // A: the recorded resolution, re-published
    assert_eq!(keys[1].0, "refund.succeeded"); // B: executed now
    assert_eq!(keys[1].1["attempts"], 2);
    app.wait_depth("refunds.dead", 0).await;
    // A executed once (before the HTML page), B once (after resolution).
    let journal = app.sandbox.journal();
    assert_eq!(journal.len(), 2);
    assert_eq!(
        journal
            .iter()
            .filter(|e| e.original_id == "12290620")
            .count(),
        1
    );
    assert_eq!(
        journal
            .iter()
            .filter(|e| e.original_id == "12290621")
            .count(),
        1
    );
}

/// The value of the sample whose line starts with `series` (name and
/// labels), 0 when absent.
fn sample(body: &str, series: &str) -> f64 {
    body.lines()
        .find(|l| l.starts_with(series))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

async fn scrape(app: &TestApp) -> String {
    reqwest::get(format!("http://{}/metrics", app.http_addr))
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text")
}

/// Counts by the run's own account (`hyp_metrics`), so that the other tests
/// of this binary, which share the process's metrics, cannot move them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_exactly_what_a_run_did() {
    let mut app = TestApp::start_with(SandboxConfig::default(), |s| {
        let account = s.providers.get("hyp_pay").cloned().expect("hyp_pay");
        s.providers.insert("hyp_metrics".into(), account);
    })
    .await;
    let before = scrape(&app).await;
    let refund = HYP_REFUND.replace("\"hyp_pay\"", "\"hyp_metrics\"");
    app.publish(&with_refund_id(&refund, "rf-metrics-paid"))
        .await;
    assert_eq!(app.next_event().await.0, "refund.succeeded");
    app.publish(&with_refund_id(&refund, "rf-metrics-declined").replace("1050", "999900"))
        .await;
    assert_eq!(app.next_event().await.0, "refund.failed");
    app.publish(&with_refund_id(&refund, "rf-metrics-paid"))
        .await;
    assert_eq!(app.next_event().await.0, "refund.succeeded", "a duplicate");
    app.publish_raw(b"junk", None).await;
    let _ = app.next_dead_letter().await;
    let after = scrape(&app).await;
    let delta = |series: &str| sample(&after, series) - sample(&before, series);
    let ours = |status: &str| {
        format!("refund_worker_outcomes_total{{provider=\"hyp_metrics\",status=\"{status}\"}}")
    };
    assert_eq!(
        delta(&ours("succeeded")),
        1.0,
        "the duplicate is no new outcome"
    );
    assert_eq!(delta(&ours("failed")), 1.0);
    assert_eq!(
        delta("refund_worker_provider_call_seconds_count{provider=\"hyp_metrics\",class=\"confirmed\"}"),
        1.0
    );
    assert_eq!(
        delta("refund_worker_provider_call_seconds_count{provider=\"hyp_metrics\",class=\"declined\"}"),
        1.0
    );
    assert!(delta("refund_worker_dead_lettered_total{reason=\"malformed\"}") >= 1.0);
    assert!(delta("refund_worker_commands_received_total") >= 4.0);
    let health = reqwest::get(format!("http://{}/healthz", app.http_addr))
        .await
        .expect("healthz");
    assert!(health.status().is_success());
}

/// Every metric the alert rules and the dashboard use
/// (`deploy/monitoring/metric-names.txt`, kept by `scripts/check-deploy`)
/// is one the worker exports: present in a running worker's `/metrics`
/// after a run that touches each path, or, for the few a short run cannot
/// reach (a breaker opening, pruning), registered in `src/observability/metrics.rs`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_alerts_and_the_dashboard_use_only_exported_metrics() {
    let mut app = TestApp::start().await;
    app.publish(HYP_REFUND).await;
    assert_eq!(app.next_event().await.0, "refund.succeeded");
    app.publish_raw(b"junk", None).await;
    let _ = app.next_dead_letter().await;
    let body = scrape(&app).await;
    assert_eq!(sample(&body, "refund_worker_ready "), 1.0, "{body}");
    assert_eq!(sample(&body, "refund_worker_store_healthy "), 1.0);
    let source = include_str!("../../src/observability/metrics.rs");
    let names = include_str!("../../deploy/monitoring/metric-names.txt");
    let mut seen = 0;
    for name in names.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let exported = body.lines().any(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with(['{', ' ', '_']))
        });
        assert!(
            exported || source.contains(&format!("\"{name}\"")),
            "{name} is used by deploy/monitoring but the worker does not export it"
        );
        seen += usize::from(exported);
    }
    assert!(seen >= 10, "only {seen} of the names were in /metrics");
}

/// `refund-worker health` (the image's health check) answers with its exit
/// status: 0 for a ready worker, 1 when nothing answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_health_command_says_ready_or_not() {
    let app = TestApp::start().await;
    let run = |url: String| {
        std::process::Command::new(env!("CARGO_BIN_EXE_refund-worker"))
            .args(["health", "--worker-url", &url])
            .output()
            .expect("runs")
    };
    let ready = run(format!("http://{}", app.http_addr));
    assert!(ready.status.success(), "{ready:?}");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("port")
        .local_addr()
        .expect("addr")
        .port();
    let down = run(format!("http://127.0.0.1:{port}"));
    assert_eq!(down.status.code(), Some(1), "{down:?}");
}

/// Every key of `config/default.toml` is documented in
/// `docs/configuration.md` (as its dotted path in backticks).
#[test]
fn every_default_setting_is_documented() {
    let defaults: toml_value::Table = toml_value::parse(include_str!("../../config/default.toml"));
    let docs = include_str!("../../docs/configuration.md");
    let mut missing = Vec::new();
    for key in toml_value::dotted(&defaults, "") {
        if !docs.contains(&format!("`{key}`")) {
            missing.push(key);
        }
    }
    assert!(
        missing.is_empty(),
        "not in docs/configuration.md: {missing:?}"
    );
}

/// Just enough of a TOML reader for the defaults: the `config` crate
/// parses, this walks the keys.
mod toml_value {
    pub(super) type Table = serde_json::Map<String, serde_json::Value>;

    pub(super) fn parse(text: &str) -> Table {
        config::Config::builder()
            .add_source(config::File::from_str(text, config::FileFormat::Toml))
            .build()
            .expect("default.toml parses")
            .try_deserialize()
            .expect("a table")
    }

    pub(super) fn dotted(table: &Table, prefix: &str) -> Vec<String> {
        let mut keys = Vec::new();
        for (key, value) in table {
            let path = format!("{prefix}{key}");
            match value {
                serde_json::Value::Object(inner) if !inner.is_empty() => {
                    keys.extend(dotted(inner, &format!("{path}.")));
                }
                _ => keys.push(path),
            }
        }
        keys
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_report_adds_up_to_the_events_before_and_after_pruning() {
    use refund_sandbox::Seed;
    use std::collections::BTreeMap;
    let config = SandboxConfig {
        seed: Seed::hyp_pay_range(70_000_000, 6, 10_000),
        ..SandboxConfig::default()
    };
    let mut app = TestApp::start_with(config, |s| {
        s.store.retention = Some(Duration::from_secs(2));
        s.store.prune_interval = Some(Duration::from_millis(500));
    })
    .await;
    let api = app.api();
    // Three paid, one over its original (declined), one in doubt.
    app.sandbox
        .add_fault(fault(FaultKind::HtmlAfter, "70000004"));
    for (i, minor) in [(0, 100), (1, 250), (2, 1_000), (3, 20_000), (4, 700)] {
        app.publish(&refund_on(
            &format!("rf-report-{i}"),
            &format!("{}", 70_000_000 + i),
            minor,
        ))
        .await;
    }
    let mut expected: BTreeMap<String, (u64, u64)> = BTreeMap::new();
    for _ in 0..5 {
        let (_, event) = app.next_event().await;
        let entry = expected
            .entry(event["status"].as_str().unwrap_or_default().to_string())
            .or_default();
        entry.0 += 1;
        entry.1 += event["amount"]["minor"].as_u64().unwrap_or(0);
    }
    assert_eq!(expected["succeeded"], (3, 1_350));
    assert_eq!(expected["failed"], (1, 20_000));
    assert_eq!(expected["in_doubt"], (1, 700));
    let today = refund_worker::contract::event::now_rfc3339()[..10].to_string();
    let check = |report: serde_json::Value| {
        let rows = report.as_array().expect("rows").clone();
        assert_eq!(rows.len(), 1, "{report}");
        let row = &rows[0];
        assert_eq!(row["provider"], "hyp_pay");
        assert_eq!(row["currency"], "ILS");
        assert_eq!(row["day"], today.as_str());
        for (status, (count, minor)) in &expected {
            assert_eq!(row[status]["count"], *count, "{status}: {row}");
            assert_eq!(row[status]["minor"], *minor, "{status}: {row}");
        }
    };
    check(api.report(&today, &today).await.expect("report"));
    // The finished ones become tombstones; the report stays the same.
    let deadline = tokio::time::Instant::now() + support::WAIT;
    while api
        .refund("rf-report-0")
        .await
        .expect("api")
        .expect("known")["state"]["state"]
        != "tombstone"
    {
        assert!(tokio::time::Instant::now() < deadline, "never pruned");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    check(api.report(&today, &today).await.expect("report"));
    // Another day is empty; a bad date is refused.
    let empty = api
        .report("2020-01-01", "2020-01-02")
        .await
        .expect("report");
    assert_eq!(empty, serde_json::json!([]));
    assert!(api.report("yesterday", &today).await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_lettered_typo_is_edited_and_replayed_with_its_trail() {
    use refund_worker::providers::ProviderAccount;
    use refund_worker::worker::Decision;
    let mut app = TestApp::start_with(SandboxConfig::default(), |s| {
        // An account whose password the provider refuses: misconfigured.
        let mut typo = s.providers["hyp_pay"].clone();
        if let ProviderAccount::HypPay(a) = &mut typo {
            a.pass_p = refund_worker::values::secret::Secret::new("not-the-password");
        }
        s.providers.insert("hyp_typo".into(), typo);
    })
    .await;
    let api = app.api();
    app.publish(&HYP_REFUND.replace("\"hyp_pay\"", "\"hyp_typo\""))
        .await;
    app.wait_depth("refunds.dead", 1).await;
    let amqp = app.settings.amqp.clone();
    let decision = Decision {
        by: "dana".into(),
        reason: "wrong account name, ticket OPS-7".into(),
    };
    let id = "rf-example-hyp-refund-1";
    let fix = vec!["provider=hyp_pay".to_string()];
    // A dry run changes nothing; refund_id cannot be changed.
    refund_worker::ops::dlq_edit(&amqp, &api, id, &fix, &decision, true)
        .await
        .expect("dry run");
    app.wait_depth("refunds.dead", 1).await;
    assert_eq!(app.record(id).await["command"]["provider"], "hyp_typo");
    assert!(refund_worker::ops::dlq_edit(
        &amqp,
        &api,
        id,
        &["refund_id=other".to_string()],
        &decision,
        false
    )
    .await
    .is_err());
    // The edit: recorded, republished, executed once under the right account.
    refund_worker::ops::dlq_edit(&amqp, &api, id, &fix, &decision, false)
        .await
        .expect("edit");
    let (key, event) = app.next_event().await;
    assert_eq!(key, "refund.succeeded", "{event}");
    assert_eq!(event["provider"], "hyp_pay");
    app.wait_depth("refunds.dead", 0).await;
    let record = app.record(id).await;
    let history = record["history"].to_string();
    assert!(
        history.contains("command edited by dana") && history.contains("hyp_typo"),
        "{history}"
    );
    assert_eq!(app.sandbox.journal().len(), 1);
    // Nothing left to edit.
    assert!(
        refund_worker::ops::dlq_edit(&amqp, &api, id, &fix, &decision, false)
            .await
            .is_err()
    );
}

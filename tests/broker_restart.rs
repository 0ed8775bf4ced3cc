//! The broker goes away and comes back: readiness drops, the worker
//! reconnects by itself, re-declares the topology and keeps processing.
//! (Its own test binary: stopping the node would disturb other tests.)

mod support;

use std::time::Duration;
use support::{broker::RabbitNode, with_refund_id, TestApp, HYP_REFUND, WAIT};

/// Both tests stop the one node of this binary: one at a time.
static RESTARTS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_worker_survives_a_broker_restart() {
    let _one_at_a_time = RESTARTS.lock().await;
    let mut app = TestApp::start().await;
    app.publish(HYP_REFUND).await;
    let (key, _) = app.next_event().await;
    assert_eq!(key, "refund.succeeded");

    let node = RabbitNode::shared();
    tokio::task::spawn_blocking(|| RabbitNode::shared().stop_app())
        .await
        .expect("stop_app");
    let ready = format!("http://{}/readyz", app.http_addr);
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let status = reqwest::get(&ready)
            .await
            .map(|r| r.status().as_u16())
            .unwrap_or(0);
        if status == 503 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "readiness never dropped"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::task::spawn_blocking(|| RabbitNode::shared().start_app())
        .await
        .expect("start_app");
    let _ = node;
    app.wait_ready().await;

    // The test's own connection died with the broker: reconnect it.
    app.reconnect_test_client().await;
    app.publish(&with_refund_id(HYP_REFUND, "rf-after-restart"))
        .await;
    let (key, event) = app.next_event().await;
    assert_eq!(key, "refund.succeeded");
    assert_eq!(event["refund_id"], "rf-after-restart");
    // The first refund again: still executed only once.
    app.publish(HYP_REFUND).await;
    let (key, _) = app.next_event().await;
    assert_eq!(key, "refund.succeeded");
    assert_eq!(app.sandbox.journal().len(), 2);
}

/// A broker restart in the middle of a run with hundreds of refunds in
/// flight: afterwards every refund has exactly one outcome, the sandbox
/// executed each once, and the commands queue is empty.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_restart_under_load_loses_nothing_and_pays_nothing_twice() {
    use refund_sandbox::{SandboxConfig, Seed};
    use std::collections::{BTreeMap, BTreeSet};

    let _one_at_a_time = RESTARTS.lock().await;
    const N: usize = 200;
    let seed = Seed::hyp_pay_range(80_000_000, N, 10_000);
    let config = SandboxConfig {
        latency: Duration::from_millis(100),
        seed,
        ..SandboxConfig::default()
    };
    let mut app = TestApp::start_with(config, |s| s.amqp.prefetch = 32).await;
    // A durable event queue survives the restart (the exclusive one does not).
    app.capture_events("test.events").await;
    for i in 0..N {
        let body = serde_json::json!({
            "refund_id": format!("rf-restart-{i}"),
            "provider": "hyp_pay",
            "transaction": { "id": format!("{}", 80_000_000 + i) },
            "amount": { "minor": 1_000, "currency": "ILS" },
        });
        app.publish(&body.to_string()).await;
    }
    tokio::time::sleep(Duration::from_millis(400)).await;
    tokio::task::spawn_blocking(|| RabbitNode::shared().stop_app())
        .await
        .expect("stop");
    let executed_during = app.sandbox.journal().len();
    tokio::time::sleep(Duration::from_secs(1)).await;
    tokio::task::spawn_blocking(|| RabbitNode::shared().start_app())
        .await
        .expect("start");
    app.wait_ready().await;
    app.reconnect_test_client().await;

    let mut outcomes: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    while outcomes.len() < N && tokio::time::Instant::now() < deadline {
        match app.captured("test.events").await {
            Some(v) => {
                outcomes
                    .entry(v["refund_id"].as_str().unwrap_or_default().to_string())
                    .or_default()
                    .insert(v["status"].as_str().unwrap_or_default().to_string());
            }
            None => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
    assert_eq!(outcomes.len(), N, "every refund has an outcome");
    for (id, statuses) in &outcomes {
        assert_eq!(statuses.len(), 1, "{id}: {statuses:?}");
        assert!(statuses.contains("succeeded"), "{id}: {statuses:?}");
    }
    let journal = app.sandbox.journal();
    let originals: BTreeSet<_> = journal.iter().map(|e| e.original_id.clone()).collect();
    assert_eq!(
        journal.len(),
        N,
        "each executed once ({executed_during} before the restart)"
    );
    assert_eq!(originals.len(), N);
    assert_eq!(app.queue_depth("refunds.commands").await, 0);
}

/// The broker is down when Paynet calls back: a first callback is recorded
/// and answered 503 (Paynet tries again), a repeated one too; when the
/// broker is back, the outbox publishes the recorded final event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callbacks_during_a_broker_outage_get_503_and_the_outbox_publishes_later() {
    use refund_sandbox::SandboxConfig;
    use serde_json::json;

    let _one_at_a_time = RESTARTS.lock().await;
    let config = SandboxConfig {
        // The test posts the callbacks itself.
        paynet_callback_delay: Duration::from_secs(600),
        ..SandboxConfig::default()
    };
    let mut app = TestApp::start_with(config, |s| {
        s.store.outbox_sweep_interval = Some(Duration::from_secs(1));
    })
    .await;
    app.capture_events("test.outage.events").await;
    let paynet = |id: &str| {
        json!({"refund_id": id, "provider": "paynet",
               "transaction": {"xact_id": "xk_EAAAAAh7VYf9HG4+GR9ezqiMWAA8PY6P4eroE4BUUHRCLxGO"},
               "amount": {"minor": 1000, "currency": "TRY"}})
        .to_string()
    };
    app.publish(&paynet("rf-outage-1")).await;
    app.publish(&paynet("rf-outage-2")).await;
    for _ in 0..2 {
        assert_eq!(app.next_event().await.0, "refund.pending");
    }
    let http = reqwest::Client::new();
    let callback = |id: &str, token: &str| {
        http.post(format!(
            "http://{}/callbacks/paynet/{id}/{token}",
            app.http_addr
        ))
        .json(&json!({"xact_id": "x-1", "code": "0", "status": "approved", "message": "ok"}))
    };
    let token1 = app.record("rf-outage-1").await["callback_token"]
        .as_str()
        .expect("token")
        .to_string();
    let token2 = app.record("rf-outage-2").await["callback_token"]
        .as_str()
        .expect("token")
        .to_string();
    let first = callback("rf-outage-1", &token1).send().await.expect("post");
    assert!(first.status().is_success());

    tokio::task::spawn_blocking(|| RabbitNode::shared().stop_app())
        .await
        .expect("stop");
    let repeated = callback("rf-outage-1", &token1).send().await.expect("post");
    assert_eq!(
        repeated.status().as_u16(),
        503,
        "a repeat whose publish fails"
    );
    let during = callback("rf-outage-2", &token2).send().await.expect("post");
    assert_eq!(during.status().as_u16(), 503, "recorded, not yet published");
    assert_eq!(
        refund_worker::ops::status_of(&app.record("rf-outage-2").await),
        "succeeded"
    );
    tokio::task::spawn_blocking(|| RabbitNode::shared().start_app())
        .await
        .expect("start");
    app.wait_ready().await;
    app.reconnect_test_client().await;

    let deadline = tokio::time::Instant::now() + WAIT;
    let mut finals = std::collections::BTreeSet::new();
    while finals.len() < 2 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "final events published: {finals:?}"
        );
        match app.captured("test.outage.events").await {
            Some(e) if e["status"] == "succeeded" => {
                finals.insert(e["refund_id"].as_str().unwrap_or_default().to_string());
            }
            Some(_) => {}
            None => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    assert_eq!(app.sandbox.journal().len(), 2);
}

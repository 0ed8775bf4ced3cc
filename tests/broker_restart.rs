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
    use lapin::options::{BasicGetOptions, QueueBindOptions, QueueDeclareOptions};
    use lapin::types::FieldTable;
    use refund_worker::sandbox::{SandboxConfig, Seed};
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
    let declare = |app: &TestApp| {
        let channel = app.channel.clone();
        async move {
            channel
                .queue_declare(
                    "test.events".into(),
                    QueueDeclareOptions {
                        durable: true,
                        ..Default::default()
                    },
                    FieldTable::default(),
                )
                .await
                .expect("declare");
            channel
                .queue_bind(
                    "test.events".into(),
                    "refunds.events".into(),
                    "#".into(),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await
                .expect("bind");
        }
    };
    declare(&app).await;
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
        match app
            .channel
            .basic_get("test.events".into(), BasicGetOptions { no_ack: true })
            .await
        {
            Ok(Some(message)) => {
                let v: serde_json::Value =
                    serde_json::from_slice(&message.delivery.data).expect("json");
                outcomes
                    .entry(v["refund_id"].as_str().unwrap_or_default().to_string())
                    .or_default()
                    .insert(v["status"].as_str().unwrap_or_default().to_string());
            }
            Ok(None) => tokio::time::sleep(Duration::from_millis(50)).await,
            Err(_) => app.reconnect_test_client().await,
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

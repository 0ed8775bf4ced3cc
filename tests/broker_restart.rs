//! The broker goes away and comes back: readiness drops, the worker
//! reconnects by itself, re-declares the topology and keeps processing.
//! (Its own test binary: stopping the node would disturb other tests.)

mod support;

use std::time::Duration;
use support::{broker::RabbitNode, with_refund_id, TestApp, HYP_REFUND, WAIT};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_worker_survives_a_broker_restart() {
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

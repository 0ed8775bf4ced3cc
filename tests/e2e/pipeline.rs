//! The whole path through a real RabbitMQ node and the sandbox over HTTP:
//! command published → worker → Hyp Pay sandbox → event / dead letter.

use crate::support;

use refund_sandbox::{Fault, FaultKind, SandboxConfig};
use serde_json::Value;
use std::time::Duration;
use support::{header, with_refund_id, TestApp, HYP_CANCEL, HYP_DECLINE, HYP_REFUND, INVALID};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refund_succeeds_once_with_the_provider_transaction() {
    let mut app = TestApp::start().await;
    app.publish(HYP_REFUND).await;
    let (key, event) = app.next_event().await;
    assert_eq!(key, "refund.succeeded");
    assert_eq!(event["status"], "succeeded");
    assert_eq!(event["refund_id"], "rf-example-hyp-refund-1");
    assert_eq!(event["provider"], "hyp_pay");
    assert_eq!(event["operation"], "refund");
    assert_eq!(event["performed"], "refund");
    assert_eq!(event["amount"]["minor"], 1050);
    assert_eq!(event["amount"]["currency"], "ILS");
    assert_eq!(event["provider_code"], "0");
    assert_eq!(event["attempts"], 1);
    assert_eq!(event["order_id"], "ord-991");
    assert_eq!(event["metadata"]["ticket"], "CS-4411");
    assert!(event["error"].is_null());
    let journal = app.sandbox.journal();
    assert_eq!(journal.len(), 1);
    assert_eq!(journal[0].action, "zikoyAPI");
    assert_eq!(journal[0].original_id, "12290620");
    assert_eq!(journal[0].amount_minor, 1050);
    assert_eq!(event["provider_transaction_id"], journal[0].new_id.as_str());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_succeeds_as_a_cancel() {
    let mut app = TestApp::start().await;
    app.publish(HYP_CANCEL).await;
    let (key, event) = app.next_event().await;
    assert_eq!(key, "refund.succeeded");
    assert_eq!(event["operation"], "cancel");
    assert_eq!(event["performed"], "cancel");
    assert!(event["amount"].is_null());
    let journal = app.sandbox.journal();
    assert_eq!(journal.len(), 1);
    assert_eq!(journal[0].action, "CancelTrans");
    assert_eq!(journal[0].original_id, "405532558");

    // A second cancel of the same charge (a new refund_id) is declined: 920.
    app.publish(&with_refund_id(HYP_CANCEL, "rf-cancel-again"))
        .await;
    let (key, event) = app.next_event().await;
    assert_eq!(key, "refund.failed");
    assert_eq!(event["provider_code"], "920");
    assert_eq!(app.sandbox.journal().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_decline_is_failed_with_the_provider_code() {
    let mut app = TestApp::start().await;
    app.publish(HYP_DECLINE).await;
    let (key, event) = app.next_event().await;
    assert_eq!(key, "refund.failed");
    assert_eq!(event["status"], "failed");
    assert_eq!(event["provider_code"], "33");
    assert!(event["provider_message"]
        .as_str()
        .unwrap_or("")
        .contains("exceeds"));
    assert_eq!(event["error"]["kind"], "declined");
    assert!(app.sandbox.journal().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_duplicate_executes_once_and_republishes_the_same_event() {
    let mut app = TestApp::start().await;
    // Three copies at once (one prefetch window) and one later.
    for _ in 0..3 {
        app.publish(HYP_REFUND).await;
    }
    let mut ids = Vec::new();
    for _ in 0..3 {
        let (key, event) = app.next_event().await;
        assert_eq!(key, "refund.succeeded");
        ids.push(event["event_id"].as_str().map(str::to_string));
    }
    app.publish(HYP_REFUND).await;
    let (_, event) = app.next_event().await;
    ids.push(event["event_id"].as_str().map(str::to_string));
    ids.dedup();
    assert_eq!(ids.len(), 1, "every copy carries the same event_id");
    assert_eq!(app.sandbox.journal().len(), 1, "executed once");
    assert_eq!(app.sandbox.requests(), 1, "the provider was called once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_conflicting_duplicate_is_rejected_and_changes_nothing() {
    let mut app = TestApp::start().await;
    app.publish(HYP_REFUND).await;
    let (key, _) = app.next_event().await;
    assert_eq!(key, "refund.succeeded");
    let mut other: Value = serde_json::from_str(HYP_REFUND).expect("json");
    other["amount"]["minor"] = Value::from(2000);
    app.publish(&other.to_string()).await;
    let (key, event) = app.next_event().await;
    assert_eq!(key, "refund.rejected");
    assert_eq!(event["error"]["kind"], "conflicting_payload");
    assert_eq!(event["attempts"], 0);
    assert_eq!(app.sandbox.journal().len(), 1);
    // The original outcome is intact: a true duplicate still gets `succeeded`.
    app.publish(HYP_REFUND).await;
    let (key, _) = app.next_event().await;
    assert_eq!(key, "refund.succeeded");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_command_is_rejected_without_a_provider_call() {
    let mut app = TestApp::start().await;
    app.publish(INVALID).await;
    let (key, event) = app.next_event().await;
    assert_eq!(key, "refund.rejected");
    assert_eq!(event["refund_id"], "rf-example-invalid-1");
    assert_eq!(event["error"]["kind"], "invalid_command");
    assert!(event["error"]["message"]
        .as_str()
        .unwrap_or("")
        .contains("minor"));

    // Unknown provider account and a refund without an amount: rejected too.
    let mut unknown: Value = serde_json::from_str(HYP_REFUND).expect("json");
    unknown["refund_id"] = "rf-unknown-provider".into();
    unknown["provider"] = "nope".into();
    app.publish(&unknown.to_string()).await;
    let (_, event) = app.next_event().await;
    assert_eq!(event["error"]["kind"], "unknown_provider");
    let mut no_amount: Value = serde_json::from_str(HYP_REFUND).expect("json");
    no_amount["refund_id"] = "rf-no-amount".into();
    no_amount.as_object_mut().expect("object").remove("amount");
    app.publish(&no_amount.to_string()).await;
    let (_, event) = app.next_event().await;
    assert_eq!(event["status"], "rejected");
    assert!(event["error"]["message"]
        .as_str()
        .unwrap_or("")
        .contains("amount"));
    assert_eq!(app.sandbox.requests(), 0, "no provider call");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_messages_go_to_the_dead_letter_queue_and_unread_refunds_are_rejected() {
    let mut app = TestApp::start().await;
    app.publish_raw(b"this is not json", Some("application/json"))
        .await;
    let (body, headers) = app.next_dead_letter().await;
    assert_eq!(body, b"this is not json");
    assert_eq!(
        header(&headers, "x-refund-error-kind").as_deref(),
        Some("malformed")
    );
    assert!(header(&headers, "x-refund-error")
        .unwrap_or_default()
        .contains("not JSON"));
    assert_eq!(header(&headers, "x-refund-attempts").as_deref(), Some("0"));
    assert!(header(&headers, "x-refund-first-failure-at").is_some());
    assert!(header(&headers, "x-refund-last-failure-at").is_some());
    assert_eq!(
        header(&headers, "x-refund-original-routing-key").as_deref(),
        Some("refund.hyp_pay")
    );

    app.publish(r#"{"provider":"hyp_pay"}"#).await;
    let (_, headers) = app.next_dead_letter().await;
    assert_eq!(
        header(&headers, "x-refund-error-kind").as_deref(),
        Some("missing_refund_id")
    );

    // A refund that is not read (wrong content type, too large) is still
    // a refund: its sender gets `rejected`, naming why, and its dead letter
    // names it.
    app.publish_raw(HYP_REFUND.as_bytes(), Some("text/json"))
        .await;
    let (key, rejected) = app.next_event().await;
    assert_eq!(key, "refund.rejected", "{rejected}");
    assert_eq!(rejected["refund_id"], "rf-example-hyp-refund-1");
    assert_eq!(rejected["error"]["kind"], "invalid_command");
    assert!(rejected["error"]["message"]
        .as_str()
        .unwrap_or_default()
        .contains("\"text/json\""));
    let (_, headers) = app.next_dead_letter().await;
    assert_eq!(
        header(&headers, "x-refund-error-kind").as_deref(),
        Some("wrong_content_type")
    );
    assert_eq!(
        header(&headers, "x-refund-id").as_deref(),
        Some("rf-example-hyp-refund-1")
    );

    let big = format!(r#"{{"refund_id":"rf-big","pad":"{}"}}"#, "x".repeat(70_000));
    app.publish(&big).await;
    let (key, rejected) = app.next_event().await;
    assert_eq!(key, "refund.rejected", "{rejected}");
    assert_eq!(rejected["refund_id"], "rf-big");
    assert!(rejected["error"]["message"]
        .as_str()
        .unwrap_or_default()
        .contains("max_body_bytes"));
    let (_, headers) = app.next_dead_letter().await;
    assert_eq!(
        header(&headers, "x-refund-error-kind").as_deref(),
        Some("oversize")
    );
    assert_eq!(header(&headers, "x-refund-id").as_deref(), Some("rf-big"));

    // The worker carries on.
    app.publish(HYP_REFUND).await;
    let (key, _) = app.next_event().await;
    assert_eq!(key, "refund.succeeded");
    assert_eq!(app.queue_depth("refunds.commands").await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transient_503s_are_retried_and_executed_once() {
    let mut app = TestApp::start().await;
    app.sandbox.add_fault(Fault {
        fault: FaultKind::Unavailable,
        original_id: None,
        times: 2,
        stall_ms: 0,
    });
    app.publish(HYP_REFUND).await;
    let (key, event) = app.next_event().await;
    assert_eq!(key, "refund.succeeded");
    assert_eq!(event["attempts"], 3);
    assert_eq!(app.sandbox.journal().len(), 1);
    assert_eq!(app.sandbox.requests(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_outcome_is_in_doubt_and_never_sent_again() {
    let mut app = TestApp::start().await;
    // The sandbox executes the refund, then answers an HTML error page.
    app.sandbox.add_fault(Fault {
        fault: FaultKind::HtmlAfter,
        original_id: None,
        times: 1,
        stall_ms: 0,
    });
    app.publish(HYP_REFUND).await;
    let (key, event) = app.next_event().await;
    assert_eq!(key, "refund.in_doubt");
    assert_eq!(event["error"]["kind"], "outcome_unknown");
    let (body, headers) = app.next_dead_letter().await;
    assert_eq!(
        header(&headers, "x-refund-error-kind").as_deref(),
        Some("in_doubt")
    );
    assert_eq!(
        header(&headers, "x-refund-id").as_deref(),
        Some("rf-example-hyp-refund-1")
    );
    assert_eq!(app.sandbox.journal().len(), 1);

    // Replaying the parked message does not execute it again.
    app.publish_raw(&body, Some("application/json")).await;
    let (_, headers) = app.next_dead_letter().await;
    assert_eq!(
        header(&headers, "x-refund-error-kind").as_deref(),
        Some("in_doubt")
    );
    let (key, _) = app.next_event().await;
    assert_eq!(key, "refund.in_doubt");
    assert_eq!(app.sandbox.journal().len(), 1);
    assert_eq!(app.sandbox.requests(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_provider_is_in_doubt() {
    let mut app = TestApp::start().await;
    app.sandbox.add_fault(Fault {
        fault: FaultKind::StallAfter,
        original_id: None,
        times: 1,
        stall_ms: 10_000,
    });
    app.publish(HYP_REFUND).await;
    let (key, _) = app.next_event().await;
    assert_eq!(key, "refund.in_doubt");
    assert_eq!(app.sandbox.journal().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_recorded_outcome_survives_a_restart() {
    let mut app = TestApp::start().await;
    app.publish(HYP_REFUND).await;
    let (_, first) = app.next_event().await;
    app.stop_worker().await;
    app.spawn_worker().await;
    app.publish(HYP_REFUND).await;
    let (key, again) = app.next_event().await;
    assert_eq!(key, "refund.succeeded");
    assert_eq!(first["event_id"], again["event_id"]);
    assert_eq!(
        first["provider_transaction_id"],
        again["provider_transaction_id"]
    );
    assert_eq!(app.sandbox.journal().len(), 1);
    app.assert_no_event(Duration::from_millis(300)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_outage_waits_in_delay_queues_then_succeeds_once() {
    let mut app = TestApp::start_with(SandboxConfig::default(), |s| {
        s.retry.delayed_ms = vec![300, 600];
        // Delay-queue rounds alone (tests/pressure.rs has the breaker).
        support::policy_mut(s, "hyp_pay").breaker.failures = 0;
    })
    .await;
    // 3 in-process attempts per round: two rounds fail, the third succeeds.
    app.sandbox.add_fault(Fault {
        fault: FaultKind::Unavailable,
        original_id: None,
        times: 6,
        stall_ms: 0,
    });
    app.publish(HYP_REFUND).await;
    let (key, event) = app.next_event().await;
    assert_eq!(key, "refund.succeeded");
    assert_eq!(event["attempts"], 7);
    assert_eq!(app.sandbox.journal().len(), 1);
    assert_eq!(app.sandbox.requests(), 7);
    assert_eq!(app.queue_depth("refunds.retry.300ms").await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_longer_than_every_round_is_dead_lettered_with_its_history() {
    let mut app = TestApp::start_with(SandboxConfig::default(), |s| {
        s.retry.delayed_ms = vec![200];
        support::policy_mut(s, "hyp_pay").breaker.failures = 0;
    })
    .await;
    app.sandbox.add_fault(Fault {
        fault: FaultKind::Unavailable,
        original_id: None,
        times: 100,
        stall_ms: 0,
    });
    app.publish(HYP_REFUND).await;
    let (body, headers) = app.next_dead_letter().await;
    assert_eq!(body, HYP_REFUND.as_bytes());
    assert_eq!(
        header(&headers, "x-refund-error-kind").as_deref(),
        Some("provider_unavailable")
    );
    assert!(header(&headers, "x-refund-error")
        .unwrap_or_default()
        .contains("HTTP 503"));
    assert_eq!(header(&headers, "x-refund-attempts").as_deref(), Some("6"));
    assert_eq!(
        header(&headers, "x-refund-delayed-rounds").as_deref(),
        Some("1")
    );
    let first = header(&headers, "x-refund-first-failure-at").expect("first");
    let last = header(&headers, "x-refund-last-failure-at").expect("last");
    assert!(first < last, "{first} < {last}");
    assert_eq!(
        header(&headers, "x-refund-original-routing-key").as_deref(),
        Some("refund.hyp_pay")
    );
    assert!(app.sandbox.journal().is_empty());
    app.assert_no_event(Duration::from_millis(200)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refunds_beyond_the_original_amount_are_rejected() {
    let mut app = TestApp::start().await;
    let command = |id: &str, minor: u64| {
        serde_json::json!({
            "refund_id": id,
            "provider": "hyp_pay",
            "transaction": { "id": "12290622" },
            "amount": { "minor": minor, "currency": "ILS" },
            "original_amount": 10000,
        })
        .to_string()
    };
    app.publish(&command("rf-part-a", 6000)).await;
    assert_eq!(app.next_event().await.0, "refund.succeeded");
    app.publish(&command("rf-part-b", 5000)).await;
    let (key, event) = app.next_event().await;
    assert_eq!(key, "refund.rejected");
    assert_eq!(event["error"]["kind"], "over_refund");
    app.publish(&command("rf-part-c", 4000)).await;
    assert_eq!(app.next_event().await.0, "refund.succeeded");
    assert_eq!(app.sandbox.journal().len(), 2);
    // A single command over its own original is refused as invalid.
    app.publish(&command("rf-part-d", 20000)).await;
    let (_, event) = app.next_event().await;
    assert_eq!(event["error"]["kind"], "invalid_command");
    assert_eq!(app.sandbox.journal().len(), 2);

    // A declined refund releases its share. The sandbox's original 12290621
    // is 5000, so the provider declines 8000 (CCode=33); 4000 then fits
    // under the 10000 the commands claim, which it would not if the 8000
    // were still reserved.
    let on_small = |id: &str, minor: u64| command(id, minor).replace("12290622", "12290621");
    app.publish(&on_small("rf-small-e", 8000)).await;
    let (key, event) = app.next_event().await;
    assert_eq!(key, "refund.failed");
    assert_eq!(event["provider_code"], "33");
    app.publish(&on_small("rf-small-f", 4000)).await;
    assert_eq!(app.next_event().await.0, "refund.succeeded");
    assert_eq!(app.sandbox.journal().len(), 3);
}

/// With sled, a second worker on the same queue is refused; replicas that
/// share PostgreSQL are competing consumers (`tests/replicas.rs`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_worker_on_the_same_queue_is_refused_at_start() {
    if support::on_postgres() {
        eprintln!("sled only: replicas on PostgreSQL share the queue");
        return;
    }
    let mut app = TestApp::start().await;
    let mut second = app.settings.clone();
    second.store.path = app.store_dir.path().join("second-store");
    let built = refund_worker::service::app::App::build(second)
        .await
        .expect("build");
    let (_trigger, listener) = refund_worker::service::shutdown::channel();
    let err = tokio::time::timeout(Duration::from_secs(60), built.run(listener))
        .await
        .expect("the second worker stops by itself")
        .expect_err("refused");
    let message = err.to_string();
    assert!(
        message.contains("another worker") && message.contains("refunds.commands"),
        "{message}"
    );
    // The first one is unaffected.
    app.publish(HYP_REFUND).await;
    assert_eq!(app.next_event().await.0, "refund.succeeded");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_urls_are_tried_in_order_until_one_answers() {
    // A dead address, then this test's vhost, then another live vhost: the
    // worker must skip the dead one and stop at the first that answers.
    // Had it taken the last one (or any other order), its events would go
    // to the other vhost and this test's event queue would stay empty.
    let other = tokio::task::spawn_blocking(|| support::broker::RabbitNode::shared().vhost())
        .await
        .expect("another vhost");
    let mut app = TestApp::start_with(SandboxConfig::default(), |s| {
        let list = format!(
            "amqp://guest:guest@127.0.0.1:9/nowhere, {}, {other}",
            s.amqp.url.expose()
        );
        s.amqp.url = refund_worker::values::secret::Secret::new(list);
    })
    .await;
    app.publish(HYP_REFUND).await;
    assert_eq!(app.next_event().await.0, "refund.succeeded");
}

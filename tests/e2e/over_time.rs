//! Exactly once over time, on a real broker: a refund stays decided after
//! retention (tombstones), after its account is renamed, when the
//! provider's callback is the only answer, when its event was never
//! confirmed (the outbox), and when an operator purges or releases.

use crate::support;

use refund_sandbox::{Fault, FaultKind, SandboxConfig};
use refund_worker::contract::command::RefundCommand;
use refund_worker::contract::event::{OutcomeEvent, Status};
use refund_worker::ops::dlq::Filter;
use refund_worker::ops::{dlq_purge, status_of, PurgeScope, WorkerApi};
use refund_worker::store::ledger::LedgerChange;
use refund_worker::store::{RefundRecord, RefundState};
use refund_worker::worker::{Decision, Resolution};
use serde_json::{json, Value};
use std::time::Duration;
use support::{with_refund_id, TestApp, HYP_REFUND, WAIT};

const PAYNET_REFUND: &str = include_str!("../../examples/paynet-refund.json");

fn fault(kind: FaultKind, original: &str) -> Fault {
    Fault {
        fault: kind,
        original_id: Some(original.into()),
        times: 1,
        stall_ms: 0,
    }
}

fn api(app: &TestApp) -> WorkerApi {
    app.api()
}

/// Waits until the worker reports `refund_id` as a tombstone.
async fn wait_tombstoned(api: &WorkerApi, refund_id: &str) -> Value {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let record = api.refund(refund_id).await.expect("api").expect("known");
        if record["state"]["state"] == "tombstone" {
            return record;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{refund_id} never pruned: {record}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn metrics(app: &TestApp) -> String {
    reqwest::get(format!("http://{}/metrics", app.http_addr))
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text")
}

fn short_retention(s: &mut refund_worker::config::Settings) {
    s.store.retention = Some(Duration::from_secs(1));
    s.store.prune_interval = Some(Duration::from_millis(300));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pruned_refund_stays_decided_for_late_duplicates_and_replays() {
    let mut app = TestApp::start_with(SandboxConfig::default(), short_retention).await;
    let api = api(&app);
    // A: paid normally. B: executed, then an HTML page (in doubt), resolved
    // as executed by an operator; its parked message stays in the DLQ.
    app.publish(HYP_REFUND).await;
    let (key, paid) = app.next_event().await;
    assert_eq!(key, "refund.succeeded");
    app.sandbox
        .add_fault(fault(FaultKind::HtmlAfter, "12290621"));
    let doubtful = json!({
        "refund_id": "rf-pruned-doubt",
        "provider": "hyp_pay",
        "transaction": { "id": "12290621" },
        "amount": { "minor": 500, "currency": "ILS" },
    })
    .to_string();
    app.publish(&doubtful).await;
    assert_eq!(app.next_event().await.0, "refund.in_doubt");
    app.wait_depth("refunds.dead", 1).await;
    let txn = app.sandbox.journal()[1].new_id.clone();
    api.resolve(
        "rf-pruned-doubt",
        &Resolution {
            executed: Some(txn.clone()),
            by: "dana".into(),
            reason: "seen in the Hyp back office".into(),
            ..Default::default()
        },
    )
    .await
    .expect("resolve");
    let (key, resolved) = app.next_event().await;
    assert_eq!(key, "refund.succeeded");
    assert_eq!(resolved["provider_transaction_id"], txn.as_str());
    assert!(resolved["provider_message"].is_null(), "{resolved}");

    // Both records become tombstones.
    let a = wait_tombstoned(&api, "rf-example-hyp-refund-1").await;
    assert_eq!(status_of(&a), "succeeded");
    wait_tombstoned(&api, "rf-pruned-doubt").await;
    let text = metrics(&app).await;
    let pruned: f64 = text
        .lines()
        .find(|l| l.starts_with("refund_worker_store_pruned_total"))
        .and_then(|l| l.split_whitespace().last())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    assert!(pruned >= 2.0, "{text}");

    // A late duplicate of A: the recorded outcome, no provider call.
    app.publish(HYP_REFUND).await;
    let (key, again) = app.next_event().await;
    assert_eq!(key, "refund.succeeded");
    assert_eq!(again["event_id"], paid["event_id"]);
    assert_eq!(
        again["provider_transaction_id"],
        paid["provider_transaction_id"]
    );
    assert_eq!(again["order_id"], paid["order_id"]);
    // B's parked message replayed after pruning: the recorded outcome.
    let report = app.replay(&Filter::default(), None, false).await;
    assert_eq!(report.done, 1, "{report:?}");
    let (key, replayed) = app.next_event().await;
    assert_eq!(key, "refund.succeeded");
    assert_eq!(replayed["event_id"], resolved["event_id"]);
    app.wait_depth("refunds.dead", 0).await;
    // Another command under a tombstoned id is refused, nothing executed.
    let other = with_refund_id(&doubtful, "rf-example-hyp-refund-1");
    app.publish(&other).await;
    let (key, rejected) = app.next_event().await;
    assert_eq!(key, "refund.rejected");
    assert_eq!(rejected["error"]["kind"], "conflicting_payload");
    assert_eq!(app.sandbox.journal().len(), 2, "each refund executed once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renamed_account_never_turns_a_paid_refund_into_rejected() {
    let mut app = TestApp::start().await;
    app.publish(HYP_REFUND).await;
    let (_, paid) = app.next_event().await;
    assert_eq!(paid["status"], "succeeded");
    app.stop_worker().await;
    let account = app
        .settings
        .providers
        .remove("hyp_pay")
        .expect("hyp_pay account");
    app.settings
        .providers
        .insert("hyp_pay_terminal_2".into(), account);
    app.spawn_worker().await;

    app.publish(HYP_REFUND).await;
    let (key, again) = app.next_event().await;
    assert_eq!(key, "refund.succeeded", "{again}");
    assert_eq!(again["event_id"], paid["event_id"]);
    // A refund never seen still meets today's configuration.
    app.publish(&with_refund_id(HYP_REFUND, "rf-new-after-rename"))
        .await;
    let (key, rejected) = app.next_event().await;
    assert_eq!(key, "refund.rejected");
    assert_eq!(rejected["error"]["kind"], "unknown_provider");
    assert_eq!(app.sandbox.journal().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paynet_callback_settles_a_refund_in_doubt() {
    let config = SandboxConfig {
        paynet_callback_delay: Duration::from_millis(800),
        ..Default::default()
    };
    let mut app = TestApp::start_with(config, |_| {}).await;
    let api = api(&app);
    // Paynet executes, answers an error page, then posts its callback.
    let xact = "xk_EAAAAAh7VYf9HG4+GR9ezqiMWAA8PY6P4eroE4BUUHRCLxGO";
    app.sandbox.add_fault(fault(FaultKind::HtmlAfter, xact));
    app.publish(PAYNET_REFUND).await;
    let (key, doubt) = app.next_event().await;
    assert_eq!(key, "refund.in_doubt", "{doubt}");
    let (key, settled) = app.next_event().await;
    assert_eq!(key, "refund.succeeded", "{settled}");
    let journal = app.sandbox.journal();
    assert_eq!(journal.len(), 1);
    assert_eq!(
        settled["provider_transaction_id"],
        journal[0].new_id.as_str()
    );
    let record = api
        .refund("rf-example-paynet-refund-1")
        .await
        .expect("api")
        .expect("record");
    assert!(
        record["history"]
            .to_string()
            .contains("settled by the provider"),
        "{record}"
    );
    // The parked in-doubt message is now safe to replay: it re-publishes.
    app.wait_depth("refunds.dead", 1).await;
    let report = app.replay(&Filter::default(), None, false).await;
    assert_eq!(report.done, 1, "{report:?}");
    let (key, replayed) = app.next_event().await;
    assert_eq!(key, "refund.succeeded");
    assert_eq!(replayed["event_id"], settled["event_id"]);
    assert_eq!(app.sandbox.journal().len(), 1, "executed once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outcome_whose_event_was_never_confirmed_is_published_at_start() {
    let mut app = TestApp::start().await;
    app.stop_worker().await;
    // What a crash between the synced outcome and the broker's confirm
    // leaves behind: a finished record still marked in the outbox.
    let command = RefundCommand::parse(HYP_REFUND.as_bytes()).expect("command");
    let mut record = RefundRecord::attempting(&command);
    let mut event = OutcomeEvent::new(&command.refund_id, Status::Succeeded, &command.echo(), 1);
    event.provider_transaction_id = Some("405577501".into());
    record.state = RefundState::Finished {
        event: event.clone(),
    };
    {
        let store = app.open_store().await;
        store.claim(&mut record).await.expect("claim");
        store
            .commit(&mut record, LedgerChange::Keep)
            .await
            .expect("commit");
        store.close().await.expect("close");
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    app.spawn_worker().await;
    let (key, published) = app.next_event().await;
    assert_eq!(key, "refund.succeeded");
    assert_eq!(published["event_id"], event.event_id.as_str());
    assert_eq!(published["provider_transaction_id"], "405577501");
    // Confirmed: the outbox is empty and stays so.
    let deadline = tokio::time::Instant::now() + WAIT;
    while !metrics(&app)
        .await
        .contains("refund_worker_outbox_unconfirmed 0")
    {
        assert!(tokio::time::Instant::now() < deadline, "outbox not empty");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(app.sandbox.journal().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outcome_whose_confirm_fails_keeps_its_delivery_which_publishes_it_later() {
    use lapin::options::{QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions};
    use lapin::types::{AMQPValue, FieldTable};
    let mut app = TestApp::start().await;
    // A queue that refuses every event: the broker nacks each publish (the
    // test's own event queue still gets the copies).
    let mut refusing = FieldTable::default();
    refusing.insert("x-max-length".into(), AMQPValue::LongInt(0));
    refusing.insert(
        "x-overflow".into(),
        AMQPValue::LongString("reject-publish".into()),
    );
    app.channel
        .queue_declare(
            "events.refused".into(),
            QueueDeclareOptions::default(),
            refusing,
        )
        .await
        .expect("declare");
    app.channel
        .queue_bind(
            "events.refused".into(),
            app.settings.amqp.events_exchange.as_str().into(),
            "#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("bind");
    app.publish(HYP_REFUND).await;
    let refund_id = RefundCommand::parse(HYP_REFUND.as_bytes())
        .expect("command")
        .refund_id;
    let deadline = tokio::time::Instant::now() + WAIT;
    while app.record_state(&refund_id).await.as_deref() != Some("finished") {
        assert!(tokio::time::Instant::now() < deadline, "never finished");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Past the publisher's own tries.
    tokio::time::sleep(Duration::from_secs(1)).await;
    app.stop_worker().await;
    // The outcome was durable, but its event was never confirmed, so the
    // delivery was not acked: it is back in the commands queue, and the
    // outcome's outbox mark is still there too.
    assert_eq!(app.queue_depth(&app.settings.amqp.commands_queue).await, 1);
    {
        let store = app.open_store().await;
        let census = store.census(|_| None).await.expect("census");
        assert_eq!(census.unconfirmed, 1, "the outbox mark");
        store.close().await.expect("close");
    }
    // The copies the refusing queue's nacks left in the test's queue.
    app.drain_events(Duration::from_millis(500)).await;
    // Once events are accepted again, the redelivered command finds the
    // recorded outcome and publishes its event; the provider is not called.
    app.channel
        .queue_delete("events.refused".into(), QueueDeleteOptions::default())
        .await
        .expect("delete");
    tokio::time::sleep(Duration::from_millis(200)).await;
    app.spawn_worker().await;
    let (key, event) = app.next_event().await;
    assert_eq!(key, "refund.succeeded");
    assert_eq!(event["refund_id"], refund_id.as_str());
    app.wait_depth(&app.settings.amqp.commands_queue, 0).await;
    assert_eq!(app.sandbox.journal().len(), 1, "executed once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purge_keeps_undecided_refunds_unless_told_and_then_abandons_them() {
    let mut app = TestApp::start_with(SandboxConfig::default(), |s| {
        s.retry.max_attempts = 1;
        s.retry.delayed_ms = vec![];
    })
    .await;
    let api = api(&app);
    let on_original = |id: &str| {
        json!({
            "refund_id": id,
            "provider": "hyp_pay",
            "transaction": { "id": "12290622" },
            "amount": { "minor": 1000, "currency": "ILS" },
            "original_amount": 1000,
        })
        .to_string()
    };
    // Not sent (503): dead-lettered with its 1000 reserved.
    app.sandbox
        .add_fault(fault(FaultKind::Unavailable, "12290622"));
    app.publish(&on_original("rf-unsent")).await;
    app.publish_raw(b"not json", Some("application/json")).await;
    app.wait_depth("refunds.dead", 2).await;
    // The reservation holds: a second full refund is over the original.
    app.publish(&on_original("rf-second")).await;
    let (key, over) = app.next_event().await;
    assert_eq!(key, "refund.rejected");
    assert_eq!(over["error"]["kind"], "over_refund");

    // A filter that matches everything removes the poison message only.
    let everything = Filter {
        older_than: Some(Duration::ZERO),
        ..Default::default()
    };
    let report = dlq_purge(
        &app.settings.amqp,
        &api,
        &everything,
        &PurgeScope::default(),
        None,
    )
    .await
    .expect("purge");
    assert_eq!((report.done, report.skipped_refunds), (1, 1), "{report:?}");
    app.wait_depth("refunds.dead", 1).await;
    // Including refunds needs --yes, --by and --reason.
    let careless = PurgeScope {
        include_refunds: true,
        ..Default::default()
    };
    assert!(
        dlq_purge(&app.settings.amqp, &api, &everything, &careless, None)
            .await
            .is_err()
    );
    let careful = PurgeScope {
        include_refunds: true,
        yes: true,
        by: Some("dana".into()),
        reason: Some("order cancelled; refunded by bank transfer".into()),
        ..Default::default()
    };
    let report = dlq_purge(&app.settings.amqp, &api, &everything, &careful, None)
        .await
        .expect("purge");
    assert_eq!(report.abandoned, vec!["rf-unsent".to_string()]);
    app.wait_depth("refunds.dead", 0).await;
    let (key, abandoned) = app.next_event().await;
    assert_eq!(key, "refund.failed");
    assert_eq!(abandoned["refund_id"], "rf-unsent");
    assert_eq!(abandoned["error"]["kind"], "abandoned");
    assert!(abandoned["error"]["message"]
        .as_str()
        .is_some_and(|m| m.contains("dana")));

    // Its reservation is released: the full refund now goes through.
    app.publish(&on_original("rf-second")).await;
    assert_eq!(app.next_event().await.0, "refund.succeeded");
    // The abandoned refund stays decided: a re-send gets `failed` again.
    app.publish(&on_original("rf-unsent")).await;
    let (key, again) = app.next_event().await;
    assert_eq!(key, "refund.failed");
    assert_eq!(again["event_id"], abandoned["event_id"]);
    assert_eq!(app.sandbox.journal().len(), 1);

    // Release: refused for a paid refund, nothing to release for the other.
    let decision = Decision {
        by: "dana".into(),
        reason: "cleanup".into(),
    };
    assert!(api.release("rf-second", &decision).await.is_err());
    let released = api.release("rf-unsent", &decision).await.expect("release");
    assert_eq!(released["released"], json!([]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_in_doubt_episode_has_its_own_event_id() {
    let mut app = TestApp::start().await;
    let api = api(&app);
    // Two HTML pages without executing: in doubt twice, then paid.
    for _ in 0..2 {
        app.sandbox
            .add_fault(fault(FaultKind::HtmlBefore, "12290620"));
    }
    app.publish(HYP_REFUND).await;
    let (key, first) = app.next_event().await;
    assert_eq!(key, "refund.in_doubt");
    let not_executed = Resolution {
        not_executed: true,
        by: "dana".into(),
        reason: "not in the back office".into(),
        ..Default::default()
    };
    api.resolve("rf-example-hyp-refund-1", &not_executed)
        .await
        .expect("resolve");
    assert_eq!(app.replay(&Filter::default(), None, false).await.done, 1);
    let (key, second) = app.next_event().await;
    assert_eq!(key, "refund.in_doubt");
    assert_ne!(first["event_id"], second["event_id"]);
    api.resolve("rf-example-hyp-refund-1", &not_executed)
        .await
        .expect("resolve");
    assert_eq!(app.replay(&Filter::default(), None, false).await.done, 1);
    let (key, paid) = app.next_event().await;
    assert_eq!(key, "refund.succeeded");
    assert_eq!(paid["attempts"], 3);
    assert_eq!(app.sandbox.journal().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resolving_a_creditguard_refund_as_executed_says_what_was_performed() {
    let mut app = TestApp::start().await;
    let api = api(&app);
    app.sandbox
        .add_fault(fault(FaultKind::HtmlAfter, "118390001"));
    let plain = json!({
        "refund_id": "rf-cg-doubt",
        "provider": "creditguard_plain",
        "transaction": { "cg_uid": "118390001" },
        "amount": { "minor": 1000, "currency": "ILS" },
    })
    .to_string();
    app.publish(&plain).await;
    assert_eq!(app.next_event().await.0, "refund.in_doubt");
    let mut resolution = Resolution {
        executed: Some("118390555".into()),
        by: "dana".into(),
        reason: "CreditGuard console shows a cancel".into(),
        ..Default::default()
    };
    let refused = api.resolve("rf-cg-doubt", &resolution).await;
    assert!(
        refused
            .as_ref()
            .is_err_and(|e| e.to_string().contains("performed")),
        "{refused:?}"
    );
    resolution.performed = Some(refund_worker::contract::command::Operation::Cancel);
    api.resolve("rf-cg-doubt", &resolution)
        .await
        .expect("resolve");
    let (key, event) = app.next_event().await;
    assert_eq!(key, "refund.succeeded");
    assert_eq!(event["performed"], "cancel");
    assert!(event["provider_message"].is_null());
}

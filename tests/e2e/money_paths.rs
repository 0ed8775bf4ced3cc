//! The money paths around operators and faults: no refund dropped without
//! a trace, settled as "not paid" while it may have been paid, or paid
//! twice, whatever an operator, a configuration change or the broker does.
//! Each test names the finding it closes (shared review "money paths").

use crate::support;

use lapin::options::{
    BasicPublishOptions, QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions,
    QueuePurgeOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::BasicProperties;
use refund_sandbox::{Fault, FaultKind, SandboxConfig};
use refund_worker::contract::command::RefundCommand;
use refund_worker::ops::dlq::{Dlq, Filter};
use refund_worker::ops::{dlq_purge, PurgeScope, WorkerApi};
use refund_worker::store::{AttemptTrace, RefundRecord, RefundState};
use refund_worker::worker::Decision;
use serde_json::{json, Value};
use std::time::Duration;
use support::broker::RabbitNode;
use support::{TestApp, HYP_REFUND, OPERATOR_TOKEN, WAIT};

fn fault(kind: FaultKind, original: &str, times: u32) -> Fault {
    Fault {
        fault: kind,
        original_id: Some(original.into()),
        times,
        stall_ms: 0,
    }
}

fn api(app: &TestApp) -> WorkerApi {
    app.api()
}

fn everything() -> Filter {
    Filter {
        older_than: Some(Duration::ZERO),
        ..Default::default()
    }
}

fn careful() -> PurgeScope {
    PurgeScope {
        all: true,
        include_refunds: true,
        yes: true,
        by: Some("dana".into()),
        reason: Some("provider outage is over; the orders were refunded by bank transfer".into()),
    }
}

fn hyp(refund_id: &str, original: &str, minor: u64) -> String {
    json!({
        "refund_id": refund_id,
        "provider": "hyp_pay",
        "transaction": { "id": original },
        "amount": { "minor": minor, "currency": "ILS" },
    })
    .to_string()
}

/// Events until none arrives for `quiet`, by refund id.
async fn events_by_refund(app: &mut TestApp, quiet: Duration) -> Vec<(String, Value)> {
    let mut seen = Vec::new();
    loop {
        let next = tokio::time::timeout(quiet, app.next_event()).await;
        match next {
            Ok((key, event)) => seen.push((key, event)),
            Err(_) => return seen,
        }
    }
}

/// N1: refunds dead-lettered before they had a record (a breaker open past
/// the retry budget) each get a `failed` (`abandoned`) event and a record
/// when an operator purges them with --include-refunds; nothing is dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn breaker_open_dead_letters_purged_with_include_refunds_each_get_a_failed_event() {
    let mut app = TestApp::start_with(SandboxConfig::default(), |s| {
        s.retry.max_attempts = 1;
        s.retry.deadline_ms = 100;
        s.retry.delayed_ms = vec![300];
        let policy = support::policy_mut(s, "hyp_pay");
        policy.breaker.failures = 1;
        policy.breaker.cooldown = Duration::from_secs(600);
    })
    .await;
    app.sandbox
        .add_fault(fault(FaultKind::Unavailable, "12290622", 1000));
    // The first opens the breaker; the three after it meet the open
    // breaker before any claim.
    app.publish(&hyp("rf-outage-0", "12290622", 100)).await;
    app.wait_depth("refunds.dead", 1).await;
    for i in 1..4 {
        app.publish(&hyp(&format!("rf-outage-{i}"), "12290622", 100))
            .await;
    }
    app.wait_depth("refunds.dead", 4).await;
    let dlq = Dlq::open(&app.settings.amqp).await.expect("browse");
    let kinds: Vec<String> = dlq.messages().iter().map(|m| m.kind.clone()).collect();
    dlq.close().await;
    assert!(
        kinds.iter().all(|k| k == "provider_unavailable"),
        "{kinds:?}"
    );
    // At least one of them never had a record: the breaker kept it from
    // its claim.
    let mut unrecorded = 0;
    for i in 0..4 {
        if api(&app)
            .refund(&format!("rf-outage-{i}"))
            .await
            .expect("api")
            .is_none()
        {
            unrecorded += 1;
        }
    }
    assert!(unrecorded >= 1, "every refund got a record");

    let report = dlq_purge(
        &app.settings.amqp,
        &api(&app),
        &everything(),
        &careful(),
        None,
    )
    .await
    .expect("purge");
    assert_eq!(report.abandoned.len(), 4, "{report:?}");
    app.wait_depth("refunds.dead", 0).await;
    let events = events_by_refund(&mut app, Duration::from_secs(2)).await;
    for i in 0..4 {
        let id = format!("rf-outage-{i}");
        let mine: Vec<&(String, Value)> = events
            .iter()
            .filter(|(_, e)| e["refund_id"] == id.as_str())
            .collect();
        assert_eq!(mine.len(), 1, "{id}: {mine:?}");
        assert_eq!(mine[0].0, "refund.failed");
        assert_eq!(mine[0].1["error"]["kind"], "abandoned");
        // Recorded: a late copy is answered with it and never paid.
        let record = app.record(&id).await;
        assert_eq!(record["state"]["event"]["status"], "failed");
    }
    app.sandbox.clear_faults();
    app.publish(&hyp("rf-outage-0", "12290622", 100)).await;
    let (key, again) = app.next_event().await;
    assert_eq!(key, "refund.failed", "{again}");
    assert!(app.sandbox.journal().is_empty(), "nothing paid");
}

/// N2: a purge with --include-refunds keeps a refund in doubt (it may have
/// been paid): no `failed` event, its reservation kept, its message kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_purge_refuses_refunds_in_doubt() {
    let mut app = TestApp::start().await;
    app.sandbox
        .add_fault(fault(FaultKind::HtmlAfter, "12290621", 1));
    app.publish(&hyp("rf-doubt", "12290621", 500)).await;
    let (key, _) = app.next_event().await;
    assert_eq!(key, "refund.in_doubt");
    app.wait_depth("refunds.dead", 1).await;
    let report = dlq_purge(
        &app.settings.amqp,
        &api(&app),
        &everything(),
        &careful(),
        None,
    )
    .await
    .expect("purge");
    assert!(report.abandoned.is_empty(), "{report:?}");
    assert_eq!(report.refused.len(), 1, "{report:?}");
    assert!(report.refused[0].1.contains("resolve"), "{report:?}");
    app.wait_depth("refunds.dead", 1).await;
    app.assert_no_event(Duration::from_secs(1)).await;
    assert_eq!(app.record("rf-doubt").await["state"]["state"], "in_doubt");
    // Abandoning it alone is refused too.
    let decision = Decision {
        by: "dana".into(),
        reason: "cleanup".into(),
    };
    let refused = api(&app)
        .abandon("rf-doubt", &decision, None, false)
        .await
        .expect_err("in doubt");
    assert!(refused.to_string().contains("409"), "{refused}");
}

/// N3: a CreditGuard refund whose first attempt may have executed (its
/// answer lost) and whose repeat was not sent is neither abandoned nor
/// edited: both would settle as "not paid", and an edited replay would send
/// the same requestId with another body. A plain replay repeats the same
/// request, which the provider answers with the first outcome.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refund_not_sent_after_an_unknown_outcome_is_never_settled_as_not_paid() {
    let mut app = TestApp::start_with(SandboxConfig::default(), |s| {
        s.retry.max_attempts = 3;
        s.retry.delayed_ms = vec![];
    })
    .await;
    app.sandbox
        .add_fault(fault(FaultKind::HtmlAfter, "118390001", 1));
    app.sandbox
        .add_fault(fault(FaultKind::Unavailable, "118390001", 1000));
    let body = json!({
        "refund_id": "rf-cg-cutoff",
        "provider": "creditguard",
        "transaction": { "cg_uid": "118390001" },
        "amount": { "minor": 700, "currency": "ILS" },
    })
    .to_string();
    app.publish(&body).await;
    app.wait_depth("refunds.dead", 1).await;
    let record = app.record("rf-cg-cutoff").await;
    assert_eq!(record["state"]["state"], "not_sent", "{record}");
    assert_eq!(record["uncertain"].as_array().map(Vec::len), Some(1));
    assert_eq!(app.sandbox.journal().len(), 1, "the first attempt executed");

    let decision = Decision {
        by: "dana".into(),
        reason: "cleanup".into(),
    };
    let refused = api(&app)
        .abandon("rf-cg-cutoff", &decision, None, false)
        .await
        .expect_err("may have been paid");
    assert!(
        refused
            .to_string()
            .contains("may have reached the provider"),
        "{refused}"
    );
    let report = dlq_purge(
        &app.settings.amqp,
        &api(&app),
        &everything(),
        &careful(),
        None,
    )
    .await
    .expect("purge");
    assert_eq!(report.refused.len(), 1, "{report:?}");
    let edited = refund_worker::ops::dlq_edit(
        &app.settings.amqp,
        &api(&app),
        "rf-cg-cutoff",
        &["amount.minor=600".into()],
        &decision,
        false,
    )
    .await;
    assert!(edited.is_err(), "an edit of an uncertain refund");
    app.assert_no_event(Duration::from_millis(500)).await;

    // The outage ends; a replay repeats the same request: the first answer.
    app.sandbox.clear_faults();
    let report = app.replay(&Filter::default(), None, false).await;
    assert_eq!(report.done, 1, "{report:?}");
    let (key, event) = app.next_event().await;
    assert_eq!(key, "refund.succeeded", "{event}");
    assert_eq!(
        event["provider_transaction_id"],
        app.sandbox.journal()[0].new_id.as_str()
    );
    assert_eq!(app.sandbox.journal().len(), 1, "paid once");
}

/// N4: whether a cut-off attempt is repeated after a restart is decided by
/// what the attempt carried, never by today's configuration: an attempt
/// sent without a requestId is in doubt even when the account has
/// `dedupe_requests` on after the restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_off_attempt_is_decided_from_what_it_carried_not_from_todays_setting() {
    let mut app = TestApp::start().await;
    app.stop_worker().await;
    let body = json!({
        "refund_id": "rf-cg-crash",
        "provider": "creditguard",
        "transaction": { "cg_uid": "118390001" },
        "amount": { "minor": 800, "currency": "ILS" },
    })
    .to_string();
    // What a worker killed mid-call left: the attempt went to the terminal
    // when the account did not deduplicate (no requestId).
    let command = RefundCommand::parse(body.as_bytes()).expect("command");
    let mut record = RefundRecord::attempting(&command);
    record.attempt = Some(AttemptTrace {
        number: 1,
        kind: "creditguard".into(),
        request_id: None,
        terminal: Some("0882819014".into()),
        at: refund_worker::contract::event::now_rfc3339(),
    });
    {
        let store = app.open_store().await;
        store.claim(&mut record).await.expect("claim");
        store.sync_refund("rf-cg-crash").await.expect("sync");
        store.close().await.expect("close");
    }
    // Its message is still in the queue; the account deduplicates now.
    app.publish(&body).await;
    app.spawn_worker().await;
    let (key, event) = app.next_event().await;
    assert_eq!(key, "refund.in_doubt", "{event}");
    assert!(event["error"]["message"]
        .as_str()
        .unwrap_or_default()
        .contains("without a deduplication id"));
    assert!(app.sandbox.journal().is_empty(), "not repeated");
}

/// N6: a final event whose only carrier was its command (a transient
/// command lost in a broker restart, an expired one, a purge of the
/// commands queue) is published from its outbox mark.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outcome_whose_command_is_purged_before_its_event_is_confirmed_is_still_published() {
    let mut app = TestApp::start().await;
    // A queue that refuses every event: the broker nacks the publish, the
    // delivery stays unacked.
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
    let deadline = tokio::time::Instant::now() + WAIT;
    while app.record_state("rf-example-hyp-refund-1").await.as_deref() != Some("finished") {
        assert!(tokio::time::Instant::now() < deadline, "never finished");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    app.stop_worker().await;
    // The command is back in its queue, and an operator purges the queue.
    app.wait_depth("refunds.commands", 1).await;
    app.channel
        .queue_purge("refunds.commands".into(), QueuePurgeOptions::default())
        .await
        .expect("purge");
    app.channel
        .queue_delete("events.refused".into(), QueueDeleteOptions::default())
        .await
        .expect("delete");
    app.drain_events(Duration::from_millis(500)).await;
    app.spawn_worker().await;
    let (key, event) = app.next_event().await;
    assert_eq!(key, "refund.succeeded");
    assert_eq!(event["refund_id"], "rf-example-hyp-refund-1");
    assert_eq!(app.sandbox.journal().len(), 1);
}

/// N7: an unreadable record does not hold back the outbox: the events of
/// every other refund are published.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_unreadable_record_does_not_stop_the_outbox() {
    let mut app = TestApp::start().await;
    app.stop_worker().await;
    let command = RefundCommand::parse(HYP_REFUND.as_bytes()).expect("command");
    let mut record = RefundRecord::attempting(&command);
    let event = refund_worker::contract::event::OutcomeEvent::new(
        &command.refund_id,
        refund_worker::contract::event::Status::Succeeded,
        &command.echo(),
        1,
    );
    record.state = RefundState::Finished { event };
    {
        let store = app.open_store().await;
        store.claim(&mut record).await.expect("claim");
        store
            .commit(
                &mut record,
                refund_worker::store::ledger::LedgerChange::Keep,
            )
            .await
            .expect("commit");
        store.close().await.expect("close");
        // A record that cannot be read, marked in the outbox, sorting
        // before the good one.
        if support::on_postgres() {
            let url = app.settings.store.postgres.url.clone().expect("url");
            let (client, connection) = tokio_postgres::connect(url.expose(), tokio_postgres::NoTls)
                .await
                .expect("connect");
            tokio::spawn(connection);
            client
                .batch_execute(
                    "INSERT INTO refunds (refund_id, state, status, provider, revision, record, \
                     created_at, updated_at) VALUES ('aaa-broken', 'finished', 'succeeded', \
                     'hyp_pay', 1, '{\"garbage\": true}', now(), now()); \
                     INSERT INTO outbox (refund_id, event_id, since) \
                     VALUES ('aaa-broken', 'x', now() - interval '1 hour')",
                )
                .await
                .expect("insert");
        } else {
            let db = sled::open(&app.settings.store.path).expect("sled");
            db.open_tree("refunds")
                .and_then(|t| t.insert("aaa-broken", b"\x07garbage".to_vec()))
                .expect("insert");
            db.open_tree("outbox")
                .and_then(|t| t.insert("aaa-broken", b"x 1".to_vec()))
                .expect("insert");
            db.flush().expect("flush");
        }
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    app.spawn_worker().await;
    let (key, event) = app.next_event().await;
    assert_eq!(key, "refund.succeeded");
    assert_eq!(event["refund_id"], "rf-example-hyp-refund-1");
}

/// N8: an approval that contradicts a recorded `failed` puts the amount
/// back in the over-refund ledger: the charge cannot be refunded again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_contradicting_approval_reserves_the_paid_amount_again() {
    let config = SandboxConfig {
        paynet_callback_delay: Duration::from_secs(600),
        ..Default::default()
    };
    let mut app = TestApp::start_with(config, |_| {}).await;
    let paynet = |id: &str| {
        json!({
            "refund_id": id,
            "provider": "paynet",
            "transaction": { "xact_id": "xk_EAAAAAh7VYf9HG4+GR9ezqiMWAA8PY6P4eroE4BUUHRCLxGO" },
            "amount": { "minor": 600, "currency": "TRY" },
            "original_amount": 1000,
        })
        .to_string()
    };
    app.publish(&paynet("rf-pn-a")).await;
    assert_eq!(app.next_event().await.0, "refund.pending");
    let token = app.record("rf-pn-a").await["callback_token"]
        .as_str()
        .expect("token")
        .to_string();
    let url = format!("http://{}/callbacks/paynet/rf-pn-a/{token}", app.http_addr);
    let http = reqwest::Client::new();
    let post = |code: &str, status: &str| {
        http.post(&url)
            .json(&json!({"xact_id": "pn-1", "code": code, "status": status, "message": status}))
            .send()
    };
    assert!(post("1", "disapproved")
        .await
        .expect("post")
        .status()
        .is_success());
    assert_eq!(app.next_event().await.0, "refund.failed");
    assert!(post("0", "approved")
        .await
        .expect("post")
        .status()
        .is_success());
    app.assert_no_event(Duration::from_millis(500)).await;
    // 600 of 1000 was paid after all: another 600 is over the original.
    app.publish(&paynet("rf-pn-b")).await;
    let (key, over) = app.next_event().await;
    assert_eq!(key, "refund.rejected", "{over}");
    assert_eq!(over["error"]["kind"], "over_refund");
}

/// N10: a publisher channel the broker closes (the worker's permission to
/// write to the events exchange revoked) makes the worker not ready; it
/// pays nothing more until events can be published, then publishes every
/// outcome. (RabbitMQ checks a channel's permission once and caches it, so
/// the revocation takes effect on the channels of the next connection: the
/// test closes the vhost's connections after revoking.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_that_cannot_publish_events_is_not_ready_and_pays_nothing_more() {
    let mut app = TestApp::start().await;
    let node = RabbitNode::shared();
    let vhost = app.amqp_url.rsplit('/').next().expect("vhost").to_string();
    app.capture_events("events.captured").await;
    app.publish(&hyp("rf-perm-0", "12290620", 100)).await;
    assert_eq!(app.next_event().await.0, "refund.succeeded");
    node.set_permissions(&app.amqp_url, ".*", "^(?!refunds\\.events$).*", ".*");
    assert!(node.ctl(&["close_all_connections", "-p", &vhost, "permissions changed"]));
    app.reconnect_test_client().await;
    app.wait_ready().await;
    // The first refund after the change is paid: its event is refused,
    // and the broker closes the channel.
    app.publish(&hyp("rf-perm-1", "12290620", 100)).await;
    let readyz = format!("http://{}/readyz", app.http_addr);
    let deadline = tokio::time::Instant::now() + WAIT;
    while reqwest::get(&readyz)
        .await
        .expect("readyz")
        .status()
        .is_success()
    {
        assert!(tokio::time::Instant::now() < deadline, "still ready");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let paid = app.sandbox.journal().len();
    assert_eq!(paid, 2);
    for i in 2..6 {
        app.publish(&hyp(&format!("rf-perm-{i}"), "12290620", 100))
            .await;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        app.sandbox.journal().len(),
        paid,
        "paid while events were refused"
    );
    assert!(!reqwest::get(&readyz)
        .await
        .expect("readyz")
        .status()
        .is_success());

    node.set_permissions(&app.amqp_url, ".*", ".*", ".*");
    app.wait_ready().await;
    let mut finals: std::collections::BTreeMap<String, usize> = Default::default();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while (1..6).any(|i| !finals.contains_key(&format!("rf-perm-{i}"))) {
        assert!(tokio::time::Instant::now() < deadline, "{finals:?}");
        match app.captured("events.captured").await {
            Some(event) => {
                assert_eq!(event["status"], "succeeded", "{event}");
                let id = event["refund_id"].as_str().unwrap_or_default().to_string();
                *finals.entry(id).or_default() += 1;
            }
            None => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    app.wait_depth("refunds.commands", 0).await;
    assert_eq!(app.sandbox.journal().len(), 6, "each paid once");
    // Every outcome once: nothing more comes.
    tokio::time::sleep(Duration::from_secs(2)).await;
    while let Some(event) = app.captured("events.captured").await {
        let id = event["refund_id"].as_str().unwrap_or_default().to_string();
        *finals.entry(id).or_default() += 1;
    }
    for i in 1..6 {
        assert_eq!(finals[&format!("rf-perm-{i}")], 1, "{finals:?}");
    }
}

/// N11: a dead letter older than `store.tombstone_retention` is not
/// replayed (its refund's tombstone may be gone: nothing would stop a
/// second payment); it stays, with a message saying why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_old_dead_letter_is_not_replayed() {
    let mut app = TestApp::start().await;
    let mut headers = FieldTable::default();
    let long_ago = "2024-01-01T00:00:00Z";
    for (key, value) in [
        ("x-refund-error-kind", "provider_unavailable"),
        ("x-refund-error", "provider unavailable"),
        ("x-refund-first-failure-at", long_ago),
        ("x-refund-last-failure-at", long_ago),
        ("x-refund-id", "rf-example-hyp-refund-1"),
    ] {
        headers.insert(key.into(), AMQPValue::LongString(value.into()));
    }
    app.channel
        .basic_publish(
            app.settings.amqp.dead_letter_exchange.as_str().into(),
            "refund.hyp_pay".into(),
            BasicPublishOptions::default(),
            HYP_REFUND.as_bytes(),
            BasicProperties::default()
                .with_delivery_mode(2)
                .with_content_type("application/json".into())
                .with_headers(headers),
        )
        .await
        .expect("publish")
        .await
        .expect("confirm");
    app.wait_depth("refunds.dead", 1).await;
    let report = app.replay(&Filter::default(), None, false).await;
    assert_eq!(report.done, 0, "{report:?}");
    assert_eq!(
        report.skipped_too_old,
        vec!["rf-example-hyp-refund-1".to_string()]
    );
    app.wait_depth("refunds.dead", 1).await;
    app.assert_no_event(Duration::from_secs(1)).await;
    assert!(app.sandbox.journal().is_empty());
}

/// N12: a reservation that stands for a paid refund is never released,
/// even after the refund's tombstone expired (another refund of the charge
/// in doubt keeps the ledger).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paid_reservation_is_never_released() {
    let mut app = TestApp::start_with(SandboxConfig::default(), |s| {
        s.store.retention = Some(Duration::from_secs(1));
        s.store.tombstone_retention = Some(Duration::from_secs(1));
        s.store.prune_interval = Some(Duration::from_millis(300));
    })
    .await;
    let on_original = |id: &str, minor: u64| {
        json!({
            "refund_id": id,
            "provider": "hyp_pay",
            "transaction": { "id": "12290620" },
            "amount": { "minor": minor, "currency": "ILS" },
            "original_amount": 10000,
        })
        .to_string()
    };
    app.publish(&on_original("rf-paid", 6000)).await;
    assert_eq!(app.next_event().await.0, "refund.succeeded");
    app.sandbox
        .add_fault(fault(FaultKind::HtmlAfter, "12290620", 1));
    app.publish(&on_original("rf-doubtful", 1000)).await;
    assert_eq!(app.next_event().await.0, "refund.in_doubt");
    // The paid refund's record and then its tombstone go.
    let deadline = tokio::time::Instant::now() + WAIT;
    while api(&app).refund("rf-paid").await.expect("api").is_some() {
        assert!(tokio::time::Instant::now() < deadline, "never pruned");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let decision = Decision {
        by: "dana".into(),
        reason: "cleanup".into(),
    };
    let refused = api(&app)
        .release("rf-paid", &decision)
        .await
        .expect_err("paid");
    assert!(refused.to_string().contains("paid refund"), "{refused}");
    // 6000 paid + 1000 in doubt of 10000: 4000 is over.
    app.publish(&on_original("rf-more", 4000)).await;
    let (key, over) = app.next_event().await;
    assert_eq!(key, "refund.rejected", "{over}");
}

/// N13: a replay goes to the commands exchange whatever a header names
/// (a producer could have named the events exchange).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_goes_to_the_commands_exchange_whatever_a_header_says() {
    let mut app = TestApp::start().await;
    let mut headers = FieldTable::default();
    for (key, value) in [
        ("x-refund-error-kind", "provider_unavailable"),
        ("x-refund-id", "rf-example-hyp-refund-1"),
        ("x-refund-original-exchange", "refunds.events"),
        ("x-refund-original-routing-key", "refund.succeeded"),
    ] {
        headers.insert(key.into(), AMQPValue::LongString(value.into()));
    }
    app.channel
        .basic_publish(
            app.settings.amqp.dead_letter_exchange.as_str().into(),
            "x".into(),
            BasicPublishOptions::default(),
            HYP_REFUND.as_bytes(),
            BasicProperties::default()
                .with_delivery_mode(2)
                .with_content_type("application/json".into())
                .with_headers(headers),
        )
        .await
        .expect("publish")
        .await
        .expect("confirm");
    app.wait_depth("refunds.dead", 1).await;
    let report = app.replay(&Filter::default(), None, false).await;
    assert_eq!(report.done, 1);
    // The worker takes it as a command and pays it once; no command body
    // reached the events exchange.
    let (key, event) = app.next_event().await;
    assert_eq!(key, "refund.succeeded");
    assert!(
        event.get("event_id").is_some(),
        "an event, not the command: {event}"
    );
    assert_eq!(app.sandbox.journal().len(), 1);
}

/// N15: a command naming an account that does not exist is counted under
/// one label, `unknown`, not under its own name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_provider_names_share_one_metric_label() {
    let mut app = TestApp::start().await;
    app.publish(
        &json!({"refund_id": "rf-nobody", "provider": "no-such-account-4711",
        "transaction": {"id": "1"}})
        .to_string(),
    )
    .await;
    assert_eq!(app.next_event().await.0, "refund.rejected");
    let metrics = reqwest::get(format!("http://{}/metrics", app.http_addr))
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    assert!(!metrics.contains("no-such-account-4711"), "{metrics}");
    assert!(
        metrics.contains(r#"provider="unknown",status="rejected""#)
            || metrics.contains(r#"status="rejected",provider="unknown""#),
        "{metrics}"
    );
}

/// N1's footgun: the operator CLI pointed at a listener without the
/// operator API (the public callback listener) reports the wrong address;
/// it never reads the 404 as "no record".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_api_address_without_the_operator_api_is_an_error_not_no_record() {
    let app = TestApp::start_with(SandboxConfig::default(), |s| {
        s.http.callback_addr = Some("127.0.0.1:0".into());
    })
    .await;
    let public = app.callback_addr.expect("callback listener");
    let wrong = WorkerApi::new(&format!("http://{public}")).with_token(Some(
        refund_worker::values::secret::Secret::new(OPERATOR_TOKEN),
    ));
    let err = wrong
        .refund("rf-anything")
        .await
        .expect_err("wrong address");
    assert!(err.to_string().contains("http.addr"), "{err}");
    // The right one answers "no such refund" as such.
    assert!(api(&app)
        .refund("rf-anything")
        .await
        .expect("api")
        .is_none());
}

/// Unknown configuration keys stop the worker binary with status 2,
/// naming the key and the closest known one.
#[test]
fn a_misspelt_configuration_key_stops_the_worker_with_status_2() {
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_refund-worker"))
        .arg("run")
        .env("REFUND_WORKER__PROVIDERS__HYP_PAY__KIND", "hyp_pay")
        .env("REFUND_WORKER__PROVIDERS__HYP_PAY__MASOF", "0010131918")
        .env("REFUND_WORKER__PROVIDERS__HYP_PAY__PASS_P", "x")
        .env("REFUND_WORKER__HTTP__OPERATOR_TOKN", "0123456789abcdef0123")
        .env("REFUND_WORKER__HTTP__ADDR", "127.0.0.1:0")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run");
    // A worker that starts (ignoring the key) runs until stopped.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while child.try_wait().expect("wait").is_none() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("the worker started with an unknown key");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let output = child.wait_with_output().expect("output");
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("http.operator_tokn"), "{stderr}");
    assert!(
        stderr.contains("did you mean http.operator_token?"),
        "{stderr}"
    );
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
}

/// Review of N1/N5: a command the broker dead-lettered (expired in the
/// queue) is a refund whatever header its producer set: a forged
/// `x-refund-error-kind: malformed` does not make a purge drop it silently.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_command_is_a_refund_whatever_its_headers_say() {
    let mut app = TestApp::start().await;
    app.stop_worker().await;
    let mut headers = FieldTable::default();
    headers.insert(
        "x-refund-error-kind".into(),
        AMQPValue::LongString("malformed".into()),
    );
    app.channel
        .basic_publish(
            app.settings.amqp.commands_exchange.as_str().into(),
            "refund.hyp_pay".into(),
            BasicPublishOptions::default(),
            hyp("rf-expired", "12290620", 100).as_bytes(),
            BasicProperties::default()
                .with_delivery_mode(2)
                .with_content_type("application/json".into())
                .with_expiration("1".into())
                .with_headers(headers),
        )
        .await
        .expect("publish")
        .await
        .expect("confirm");
    app.wait_depth("refunds.dead", 1).await;
    app.spawn_worker().await;
    let report = dlq_purge(
        &app.settings.amqp,
        &api(&app),
        &everything(),
        &careful(),
        None,
    )
    .await
    .expect("purge");
    assert_eq!(
        report.abandoned,
        vec!["rf-expired".to_string()],
        "{report:?}"
    );
    let (key, event) = app.next_event().await;
    assert_eq!(key, "refund.failed", "{event}");
    assert_eq!(event["error"]["kind"], "abandoned");
}

/// Review of N5: a command that was not read (wrong content type) and was
/// answered `rejected` is purged with its rejection repeated, never
/// recorded as `failed`: a corrected command with the same id is paid.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_purged_unread_command_stays_rejected_and_its_id_stays_free() {
    let mut app = TestApp::start().await;
    app.publish_raw(HYP_REFUND.as_bytes(), Some("text/json"))
        .await;
    assert_eq!(app.next_event().await.0, "refund.rejected");
    app.wait_depth("refunds.dead", 1).await;
    let report = dlq_purge(
        &app.settings.amqp,
        &api(&app),
        &everything(),
        &careful(),
        None,
    )
    .await
    .expect("purge");
    assert_eq!(report.done, 1, "{report:?}");
    let (key, again) = app.next_event().await;
    assert_eq!(key, "refund.rejected", "{again}");
    app.publish(HYP_REFUND).await;
    assert_eq!(app.next_event().await.0, "refund.succeeded");
    assert_eq!(app.sandbox.journal().len(), 1);
}

/// Review: a copy of a recorded refund that the stricter reader refuses
/// (a key twice) is answered from its record, never `rejected` after
/// `succeeded`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_of_a_recorded_refund_that_is_no_longer_valid_is_answered_from_its_record() {
    let mut app = TestApp::start().await;
    app.publish(&hyp("rf-twice", "12290620", 100)).await;
    let (key, first) = app.next_event().await;
    assert_eq!(key, "refund.succeeded");
    let damaged =
        hyp("rf-twice", "12290620", 100).replacen('{', r#"{"order_id":"a","order_id":"b","#, 1);
    app.publish(&damaged).await;
    let (key, again) = app.next_event().await;
    assert_eq!(key, "refund.succeeded", "{again}");
    assert_eq!(again["event_id"], first["event_id"]);
    assert_eq!(app.sandbox.journal().len(), 1);
}

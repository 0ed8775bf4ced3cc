//! Payouts through Hyp Pay (`action=soft` with `zPass`) on a real broker and
//! the sandbox over HTTP: success and duplicates, every documented code, a
//! wrong `zPass`, a payout in doubt, the account's limits (a race for the
//! last of a daily limit included) and the card token kept out of every log
//! line, event, dead letter and operator view.
//!
//! The test account `hyp_payouts` pays out up to 50 000 per payout and
//! 100 000 per UTC day and currency; `hyp_pay` has payouts off.

use crate::support;

use refund_sandbox::{Fault, FaultKind, SandboxConfig};
use refund_worker::config::ProviderAccount;
use refund_worker::values::secret::Secret;
use serde_json::{json, Value};
use std::time::Duration;
use support::{header, TestApp};

const TOKEN: &str = "4724478937284730772";
const OTHER_TOKEN: &str = "4652588708969300772";

fn payout(refund_id: &str, provider: &str, minor: u64, token: &str) -> String {
    json!({
        "refund_id": refund_id,
        "provider": provider,
        "operation": "payout",
        "amount": {"minor": minor, "currency": "ILS"},
        "payout": {"card_token": token, "expiry_month": "05", "expiry_year": "31",
                   "holder_id": "203269535", "holder_name": "Jenny", "info": "goodwill credit"}
    })
    .to_string()
}

fn payouts_executed(app: &TestApp) -> Vec<u64> {
    let journal = app.sandbox.journal();
    journal
        .iter()
        .filter(|e| e.action == "soft")
        .map(|e| e.amount_minor)
        .collect()
}

fn code_fault(code: u32) -> Fault {
    Fault {
        fault: FaultKind::AnswerCode(code),
        original_id: Some(TOKEN.into()),
        times: 1,
        stall_ms: 0,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_payout_is_paid_once_and_a_duplicate_republishes_its_outcome() {
    support::init_logs();
    let mut app = TestApp::start().await;
    app.publish(&payout("po-ok-1", "hyp_payouts", 2500, TOKEN))
        .await;
    let (key, first) = app.next_event().await;
    assert_eq!(key, "refund.succeeded", "{first}");
    assert_eq!(first["operation"], "payout");
    assert_eq!(first["performed"], "payout");
    assert_eq!(first["provider_code"], "0");
    assert_eq!(first["payout"]["card_last4"], "0772");
    assert!(
        first["provider_transaction_id"].as_str().is_some(),
        "{first}"
    );
    assert_eq!(payouts_executed(&app), vec![2500]);

    app.publish(&payout("po-ok-1", "hyp_payouts", 2500, TOKEN))
        .await;
    let (key, again) = app.next_event().await;
    assert_eq!(key, "refund.succeeded");
    assert_eq!(again["event_id"], first["event_id"]);
    assert_eq!(payouts_executed(&app), vec![2500], "paid once");
    let shown = app.record("po-ok-1").await.to_string();
    assert!(!shown.contains(TOKEN) && shown.contains("0772"), "{shown}");
    for event in [first, again] {
        assert!(!event.to_string().contains(TOKEN));
    }
    assert!(
        !support::logs().contains(TOKEN),
        "the card token reached a log line"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_documented_code_ends_as_the_documentation_says() {
    support::init_logs();
    let mut app = TestApp::start().await;
    for (i, (code, status, kind)) in [
        (401, "refund.failed", "declined"),
        (402, "refund.failed", "declined"),
        (997, "refund.failed", "declined"),
    ]
    .into_iter()
    .enumerate()
    {
        app.sandbox.add_fault(code_fault(code));
        app.publish(&payout(&format!("po-code-{i}"), "hyp_payouts", 1000, TOKEN))
            .await;
        let (key, event) = app.next_event().await;
        assert_eq!(key, status, "{code}: {event}");
        assert_eq!(event["provider_code"], code.to_string(), "{event}");
        assert_eq!(event["error"]["kind"], kind, "{event}");
    }
    // 902 (wrong PassP): the account is misconfigured; dead-lettered.
    app.sandbox.add_fault(code_fault(902));
    app.publish(&payout("po-code-902", "hyp_payouts", 1000, TOKEN))
        .await;
    let (body, headers) = app.next_dead_letter().await;
    assert_eq!(
        header(&headers, "x-refund-error-kind").as_deref(),
        Some("provider_misconfigured")
    );
    assert!(!String::from_utf8_lossy(&body).contains(TOKEN), "masked");
    assert!(String::from_utf8_lossy(&body).contains("0772"));
    assert!(payouts_executed(&app).is_empty());
    assert!(
        !support::logs().contains(TOKEN),
        "the card token reached a log line"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_zpass_is_dead_lettered_once_and_never_retried() {
    support::init_logs();
    let mut app = TestApp::start_with(SandboxConfig::default(), |s| {
        if let Some(ProviderAccount::HypPay(a)) = s.providers.get_mut("hyp_payouts") {
            a.z_pass = Secret::new("not-the-zpass");
        }
    })
    .await;
    let before = app.sandbox.requests();
    app.publish(&payout("po-zpass-1", "hyp_payouts", 1000, TOKEN))
        .await;
    let (body, headers) = app.next_dead_letter().await;
    assert_eq!(
        header(&headers, "x-refund-error-kind").as_deref(),
        Some("provider_misconfigured")
    );
    let error = header(&headers, "x-refund-error").unwrap_or_default();
    assert!(error.contains("901") && error.contains("zPass"), "{error}");
    assert!(!String::from_utf8_lossy(&body).contains(TOKEN));
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(app.sandbox.requests() - before, 1, "sent once, not retried");
    assert!(payouts_executed(&app).is_empty());
    app.assert_no_event(Duration::from_millis(300)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_payout_in_doubt_is_never_sent_again() {
    support::init_logs();
    let mut app = TestApp::start().await;
    app.sandbox.add_fault(Fault {
        fault: FaultKind::HtmlAfter,
        original_id: Some(TOKEN.into()),
        times: 1,
        stall_ms: 0,
    });
    app.publish(&payout("po-doubt-1", "hyp_payouts", 3000, TOKEN))
        .await;
    let (key, event) = app.next_event().await;
    assert_eq!(key, "refund.in_doubt", "{event}");
    assert_eq!(event["payout"]["card_last4"], "0772");
    let (body, headers) = app.next_dead_letter().await;
    assert_eq!(
        header(&headers, "x-refund-error-kind").as_deref(),
        Some("in_doubt")
    );
    let text = String::from_utf8_lossy(&body).to_string();
    assert!(!text.contains(TOKEN) && text.contains("0772"), "{text}");
    // The same payout again (the producer's retry): still in doubt, not sent.
    app.publish(&payout("po-doubt-1", "hyp_payouts", 3000, TOKEN))
        .await;
    let (key, _) = app.next_event().await;
    assert_eq!(key, "refund.in_doubt");
    // And its masked dead letter replayed as it is: the record decides.
    app.publish(&text).await;
    let (key, _) = app.next_event().await;
    assert_eq!(key, "refund.in_doubt");
    assert_eq!(payouts_executed(&app), vec![3000], "executed once only");
    assert!(
        !support::logs().contains(TOKEN),
        "the card token reached a log line"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_are_enforced_and_one_of_two_racing_payouts_gets_the_last_of_the_day() {
    support::init_logs();
    let mut app = TestApp::start().await;
    // Payouts off on this account.
    app.publish(&payout("po-off-1", "hyp_pay", 1000, TOKEN))
        .await;
    let (key, e) = app.next_event().await;
    assert_eq!(
        (key.as_str(), &e["error"]["kind"]),
        ("refund.rejected", &json!("payouts_disabled"))
    );
    // Over the largest payout.
    app.publish(&payout("po-max-1", "hyp_payouts", 50001, TOKEN))
        .await;
    let (key, e) = app.next_event().await;
    assert_eq!(key, "refund.rejected");
    assert_eq!(e["error"]["kind"], "payout_max_amount_exceeded", "{e}");
    // 80 000 of the day's 100 000, then two of 20 000 at once.
    for (id, minor) in [("po-day-1", 40000), ("po-day-2", 40000)] {
        app.publish(&payout(id, "hyp_payouts", minor, TOKEN)).await;
        let (key, e) = app.next_event().await;
        assert_eq!(key, "refund.succeeded", "{e}");
    }
    // A declined payout frees its part of the day.
    app.sandbox.add_fault(code_fault(997));
    app.publish(&payout("po-declined", "hyp_payouts", 20000, TOKEN))
        .await;
    assert_eq!(app.next_event().await.0, "refund.failed");
    let (a, b) = (
        payout("po-race-a", "hyp_payouts", 20000, TOKEN),
        payout("po-race-b", "hyp_payouts", 20000, OTHER_TOKEN),
    );
    tokio::join!(app.publish(&a), app.publish(&b));
    let mut outcomes = Vec::new();
    for _ in 0..2 {
        let (key, e) = app.next_event().await;
        outcomes.push((key, e["error"]["kind"].clone()));
    }
    outcomes.sort_by(|x, y| x.0.cmp(&y.0));
    assert_eq!(
        outcomes,
        vec![
            (
                "refund.rejected".to_string(),
                json!("payout_daily_limit_exceeded")
            ),
            ("refund.succeeded".to_string(), Value::Null),
        ]
    );
    assert_eq!(payouts_executed(&app).iter().sum::<u64>(), 100000);
    app.publish(&payout("po-over", "hyp_payouts", 1, TOKEN))
        .await;
    assert_eq!(
        app.next_event().await.0,
        "refund.rejected",
        "the day is full"
    );
}

/// An edit of a command body.
type Change = Box<dyn Fn(&mut Value)>;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_payouts_are_rejected_naming_the_field_before_any_call() {
    support::init_logs();
    let mut app = TestApp::start().await;
    let base: Value =
        serde_json::from_str(&payout("po-bad", "hyp_payouts", 1000, TOKEN)).expect("json");
    let cases: Vec<(&str, Change, &str)> = vec![
        (
            "no-token",
            Box::new(|v| {
                v["payout"].as_object_mut().map(|p| p.remove("card_token"));
            }),
            "card_token",
        ),
        (
            "expiry",
            Box::new(|v| v["payout"]["expiry_month"] = json!("5")),
            "expiry_month",
        ),
        (
            "year",
            Box::new(|v| v["payout"]["expiry_year"] = json!("2031")),
            "expiry_year",
        ),
        (
            "holder",
            Box::new(|v| {
                v["payout"].as_object_mut().map(|p| p.remove("holder_name"));
            }),
            "holder_name",
        ),
        (
            "kind",
            Box::new(|v| v["provider"] = json!("creditguard")),
            "payout",
        ),
        (
            "no-payout",
            Box::new(|v| {
                v.as_object_mut().map(|o| o.remove("payout"));
            }),
            "payout",
        ),
    ];
    for (i, (name, change, field)) in cases.iter().enumerate() {
        let mut body = base.clone();
        body["refund_id"] = json!(format!("po-bad-{i}"));
        change(&mut body);
        app.publish(&body.to_string()).await;
        let (key, e) = app.next_event().await;
        assert_eq!(key, "refund.rejected", "{name}: {e}");
        assert_eq!(e["error"]["kind"], "invalid_command", "{name}: {e}");
        let message = e["error"]["message"].as_str().unwrap_or_default();
        assert!(message.contains(field), "{name}: {message}");
        assert!(!e.to_string().contains("472447893728473077"), "{name}: {e}");
    }
    assert_eq!(app.sandbox.requests(), 0, "no provider call");
}

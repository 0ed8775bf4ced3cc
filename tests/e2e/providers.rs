//! CreditGuard and Paynet through the real broker and the sandbox over
//! HTTP: every documented path from command to event.

use crate::support;

use refund_sandbox::{Fault, FaultKind};
use serde_json::{json, Value};
use std::time::Duration;
use support::{TestApp, WAIT};

const CG_REFUND: &str = include_str!("../../examples/creditguard-refund.json");
const CG_FALLBACK: &str = include_str!("../../examples/creditguard-fallback-cancel.json");
const CG_INSTALLMENTS: &str = include_str!("../../examples/creditguard-installments.json");
const CG_CANCEL: &str = include_str!("../../examples/creditguard-cancel.json");
const PAYNET_REFUND: &str = include_str!("../../examples/paynet-refund.json");

fn cg(refund_id: &str, transaction: Value, extra: Value) -> String {
    let mut v =
        json!({ "refund_id": refund_id, "provider": "creditguard", "transaction": transaction });
    if let (Some(obj), Some(more)) = (v.as_object_mut(), extra.as_object()) {
        obj.extend(more.clone());
    }
    v.to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn creditguard_refunds_partial_full_installments_and_cancels() {
    let mut app = TestApp::start().await;
    // Partial refund of a transmitted charge: a refund.
    app.publish(CG_REFUND).await;
    let (key, e) = app.next_event().await;
    assert_eq!(key, "refund.succeeded", "{e}");
    assert_eq!(e["performed"], "refund");
    assert_eq!(e["provider_code"], "000");
    assert_eq!(e["provider_message"], "Permitted transaction");
    // Full refund of a non-transmitted charge: CreditGuard cancels instead.
    app.publish(CG_FALLBACK).await;
    let (key, e) = app.next_event().await;
    assert_eq!(key, "refund.succeeded", "{e}");
    assert_eq!(e["operation"], "refund");
    assert_eq!(e["performed"], "cancel");
    // Installments, the documented example.
    app.publish(CG_INSTALLMENTS).await;
    let (key, e) = app.next_event().await;
    assert_eq!(key, "refund.succeeded", "{e}");
    assert_eq!(e["refund_id"], "rf-2026-000123");
    // cancelDeal.
    app.publish(CG_CANCEL).await;
    let (key, e) = app.next_event().await;
    assert_eq!(key, "refund.succeeded", "{e}");
    assert_eq!(e["performed"], "cancel");
    let journal = app.sandbox.journal();
    assert_eq!(journal.len(), 4);
    assert_eq!(
        journal
            .iter()
            .map(|e| (e.action.as_str(), e.amount_minor))
            .collect::<Vec<_>>(),
        vec![
            ("refund", 5000),
            ("cancel", 11400),
            ("refund", 20000),
            ("cancel", 36500)
        ]
    );
    // Every lookup element reaches the sandbox and finds the original.
    let lookups = json!({"org_uid":"25062617340908828192261","user":"customer123","auth_number":"7823673",
                         "card_id":"1092880571131111","card_expiration":"0629"});
    app.publish(&cg("rf-cg-lookups", lookups, json!({}))).await;
    let (key, e) = app.next_event().await;
    assert_eq!(key, "refund.failed", "already cancelled above: {e}");
    assert_eq!(e["provider_code"], "320");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn creditguard_declines_carry_the_documented_codes() {
    let mut app = TestApp::start().await;
    let cases = [
        ("rf-cg-310", json!({"cg_uid":"999"}), json!({}), "310"),
        (
            "rf-cg-321",
            json!({"cg_uid":"118390001"}),
            json!({"amount":{"minor":999999,"currency":"ILS"}}),
            "321",
        ),
        (
            "rf-cg-313",
            json!({"cg_uid":"118390001"}),
            json!({"operation":"cancel"}),
            "313",
        ),
        (
            "rf-cg-312",
            json!({"cg_uid":"999"}),
            json!({"operation":"cancel"}),
            "312",
        ),
        (
            "rf-cg-339",
            json!({"cg_uid":"118390001"}),
            json!({"amount":{"minor":2000,"currency":"ILS"},
                   "installments":{"credit_type":"Payments","first_payment":1000,"periodical_payment":1000,"number_of_payments":1}}),
            "339",
        ),
    ];
    for (id, transaction, extra, code) in cases {
        app.publish(&cg(id, transaction, extra)).await;
        let (key, e) = app.next_event().await;
        assert_eq!(key, "refund.failed", "{id}: {e}");
        assert_eq!(e["provider_code"], code, "{id}: {e}");
        assert!(e["provider_message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()));
    }
    // Checked before any call: a bad installment plan and a missing lookup.
    app.publish(&cg("rf-cg-plan", json!({"cg_uid":"119042011"}), json!({"amount":{"minor":20000,"currency":"ILS"},
        "installments":{"credit_type":"Payments","first_payment":10000,"periodical_payment":5000,"number_of_payments":1}}))).await;
    let (key, e) = app.next_event().await;
    assert_eq!(key, "refund.rejected");
    assert!(e["error"]["message"]
        .as_str()
        .unwrap_or("")
        .contains("must equal"));
    app.publish(&cg("rf-cg-nolookup", json!({"card_id":"1"}), json!({})))
        .await;
    assert_eq!(app.next_event().await.0, "refund.rejected");
    assert!(app.sandbox.journal().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn creditguard_with_dedupe_retries_an_unknown_outcome_safely() {
    let mut app = TestApp::start().await;
    // Executed, then an HTML page: the repeat with the same requestId gets
    // the first answer back, nothing is executed twice.
    app.sandbox.add_fault(Fault {
        fault: FaultKind::HtmlAfter,
        original_id: Some("118390001".into()),
        times: 1,
        stall_ms: 0,
    });
    app.publish(CG_REFUND).await;
    let (key, e) = app.next_event().await;
    assert_eq!(key, "refund.succeeded", "{e}");
    assert_eq!(e["attempts"], 2);
    assert_eq!(app.sandbox.journal().len(), 1);

    // The same on an account without dedupe: in doubt, never re-sent.
    app.sandbox.add_fault(Fault {
        fault: FaultKind::HtmlAfter,
        original_id: Some("118390001".into()),
        times: 1,
        stall_ms: 0,
    });
    let plain = cg(
        "rf-cg-plain",
        json!({"cg_uid":"118390001"}),
        json!({"amount":{"minor":1000,"currency":"ILS"}}),
    )
    .replace("\"creditguard\"", "\"creditguard_plain\"");
    app.publish(&plain).await;
    let (key, _) = app.next_event().await;
    assert_eq!(key, "refund.in_doubt");
    assert_eq!(app.sandbox.journal().len(), 2);
    assert_eq!(app.sandbox.requests(), 3);
}

async fn callback_token(app: &TestApp, refund_id: &str) -> String {
    let record = app.record(refund_id).await;
    record["callback_token"]
        .as_str()
        .expect("token")
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paynet_is_pending_then_final_and_callbacks_are_verified() {
    let mut app = TestApp::start().await;
    app.publish(PAYNET_REFUND).await;
    let (key, pending) = app.next_event().await;
    assert_eq!(key, "refund.pending", "{pending}");
    assert_eq!(pending["provider_code"], "0");
    let (key, done) = app.next_event().await;
    assert_eq!(key, "refund.succeeded", "{done}");
    assert_eq!(done["refund_id"], "rf-example-paynet-refund-1");
    let journal = app.sandbox.journal();
    assert_eq!(journal.len(), 1);
    assert_eq!(journal[0].amount_minor, 1000);
    assert_eq!(done["provider_transaction_id"], journal[0].new_id.as_str());

    let base = format!(
        "http://{}/callbacks/paynet/rf-example-paynet-refund-1",
        app.http_addr
    );
    let token = callback_token(&app, "rf-example-paynet-refund-1").await;
    let http = reqwest::Client::new();
    // A forged callback (wrong token) is ignored.
    let forged = http
        .post(format!("{base}/{}", "0".repeat(32)))
        .json(&json!({"xact_id": "x", "code": "1", "status": "no", "message": "forged"}))
        .send()
        .await
        .expect("post");
    assert_eq!(forged.status().as_u16(), 404);
    // The same answer again: no second event.
    let again = http
        .post(format!("{base}/{token}"))
        .json(&json!({"xact_id": journal[0].new_id, "code": "0", "status": "approved", "message": "again"}))
        .send()
        .await
        .expect("post");
    assert!(again.status().is_success());
    // A contradicting answer: recorded, logged, no new final event.
    let contra = http
        .post(format!("{base}/{token}"))
        .json(&json!({"xact_id": journal[0].new_id, "code": "1", "status": "withdrawn", "message": "approval withdrawn"}))
        .send()
        .await
        .expect("post");
    assert!(contra.status().is_success());
    let record = app.record("rf-example-paynet-refund-1").await;
    assert!(
        record["history"].to_string().contains("CONTRADICTS"),
        "{record}"
    );
    // The repeated "0" re-publishes the same event id at most; no "failed" ever.
    let deadline = tokio::time::Instant::now() + Duration::from_millis(500);
    while tokio::time::Instant::now() < deadline {
        if let Ok((key, e)) =
            tokio::time::timeout(Duration::from_millis(100), app.next_event()).await
        {
            assert_eq!(key, "refund.succeeded");
            assert_eq!(e["event_id"], done["event_id"]);
        }
    }
    let _ = WAIT;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paynet_disapproval_same_day_partials_and_unknown_transactions() {
    let mut app = TestApp::start().await;
    let paynet = |id: &str, xact: &str, amount: Option<u64>| {
        let mut v =
            json!({"refund_id": id, "provider": "paynet", "transaction": {"xact_id": xact}});
        if let Some(minor) = amount {
            v["amount"] = json!({"minor": minor, "currency": "TRY"});
        }
        v.to_string()
    };
    app.publish(&paynet(
        "rf-pn-no",
        "xk_DISAPPROVE000000000000000000000001",
        None,
    ))
    .await;
    assert_eq!(app.next_event().await.0, "refund.pending");
    let (key, e) = app.next_event().await;
    assert_eq!(key, "refund.failed", "{e}");
    assert_eq!(e["provider_code"], "1");
    // Same-day transactions can only be refunded in full.
    app.publish(&paynet(
        "rf-pn-sameday",
        "xk_SAMEDAY0000000000000000000000000001",
        Some(100),
    ))
    .await;
    let (key, e) = app.next_event().await;
    assert_eq!(key, "refund.failed", "{e}");
    assert_eq!(e["provider_code"], "11");
    // A full refund of it goes through (no amount sent, never "0").
    app.publish(&paynet(
        "rf-pn-sameday-full",
        "xk_SAMEDAY0000000000000000000000000001",
        None,
    ))
    .await;
    assert_eq!(app.next_event().await.0, "refund.pending");
    assert_eq!(app.next_event().await.0, "refund.succeeded");
    // Unknown transaction: no_data_error, failed.
    app.publish(&paynet("rf-pn-unknown", "xk_nope", None)).await;
    let (key, e) = app.next_event().await;
    assert_eq!(key, "refund.failed");
    assert_eq!(e["provider_code"], "12");
    let journal = app.sandbox.journal();
    assert_eq!(journal.len(), 1);
    assert_eq!(journal[0].amount_minor, 50000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paynet_command_redelivered_while_pending_is_not_sent_again() {
    let config = refund_sandbox::SandboxConfig {
        paynet_callback_delay: Duration::from_millis(1500),
        ..Default::default()
    };
    let mut app = TestApp::start_with(config, |_| {}).await;
    app.publish(PAYNET_REFUND).await;
    let (key, first) = app.next_event().await;
    assert_eq!(key, "refund.pending");
    app.publish(PAYNET_REFUND).await;
    let (key, again) = app.next_event().await;
    assert_eq!(key, "refund.pending");
    assert_eq!(first["event_id"], again["event_id"]);
    assert_eq!(app.next_event().await.0, "refund.succeeded");
    assert_eq!(app.sandbox.requests(), 1);
    assert_eq!(app.sandbox.journal().len(), 1);
}

/// A provider URL that answers with a redirect: the refund is not sent
/// where the redirect points (a 307 would re-send the POST there), it is
/// parked as misconfigured with the status named.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redirect_is_not_followed_but_parked_as_misconfigured() {
    use refund_worker::providers::ProviderAccount;
    use support::header;
    // Points every request at the sandbox's real Hyp Pay endpoint.
    let target = std::sync::Arc::new(std::sync::OnceLock::<String>::new());
    let moved = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let moved_url = format!("http://{}/p/", moved.local_addr().expect("addr"));
    let to = target.clone();
    let redirect = axum::Router::new().fallback(move || {
        let location = to.get().cloned().unwrap_or_default();
        async move {
            (
                axum::http::StatusCode::TEMPORARY_REDIRECT,
                [(axum::http::header::LOCATION, location)],
            )
        }
    });
    tokio::spawn(async move { axum::serve(moved, redirect).await });
    let app = TestApp::start_with(Default::default(), |s| {
        let mut account = s.providers["hyp_pay"].clone();
        if let ProviderAccount::HypPay(a) = &mut account {
            let _ = target.set(a.base_url.clone());
            a.base_url = moved_url.clone();
        }
        s.providers.insert("hyp_moved".into(), account);
    })
    .await;
    app.publish(&support::HYP_REFUND.replace("\"hyp_pay\"", "\"hyp_moved\""))
        .await;
    let (_, headers) = app.next_dead_letter().await;
    assert_eq!(
        header(&headers, "x-refund-error-kind").as_deref(),
        Some("provider_misconfigured")
    );
    let error = header(&headers, "x-refund-error").unwrap_or_default();
    assert!(error.contains("HTTP 307"), "{error}");
    assert_eq!(app.sandbox.requests(), 0, "the redirect was followed");
}

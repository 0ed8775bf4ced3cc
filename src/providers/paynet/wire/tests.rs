//! The wire module on the examples of the provider's documentation.

use super::*;
use crate::contract::command::RefundCommand;
use crate::providers::ProviderOutcome;

fn command(json: &str) -> RefundCommand {
    RefundCommand::parse(json.as_bytes()).expect("command")
}

#[test]
fn builds_the_documented_request() {
    let xact = "xk_EAAAAAh7VYf9HG4+GR9ezqiMWAA8PY6P4eroE4BUUHRCLxGO";
    let full = command(&format!(
        r#"{{"refund_id":"r","provider":"p","transaction":{{"xact_id":"{xact}"}}}}"#
    ));
    let body =
        serde_json::to_value(request_for(&full, "https://w/cb/r/t").expect("req")).expect("json");
    assert_eq!(
        body,
        serde_json::json!({"xact_id": xact, "succeedUrl": "https://w/cb/r/t"})
    );
    // "10.00 TL" => "1000"
    let partial = command(&format!(
        r#"{{"refund_id":"r","provider":"p","transaction":{{"xact_id":"{xact}"}},"amount":{{"minor":1000,"currency":"TRY"}}}}"#
    ));
    assert_eq!(
        request_for(&partial, "u").expect("req").amount.as_deref(),
        Some("1000")
    );
    let cancel = command(&format!(
        r#"{{"refund_id":"r","provider":"p","operation":"cancel","transaction":{{"xact_id":"{xact}"}}}}"#
    ));
    assert_eq!(request_for(&cancel, "u").expect("req").amount, None);
}

#[test]
fn refuses_what_paynet_cannot_take() {
    for (json, needle) in [
        (
            r#"{"refund_id":"r","provider":"p","transaction":{"id":"1"}}"#,
            "only transaction.xact_id",
        ),
        (
            r#"{"refund_id":"r","provider":"p","transaction":{"xact_id":""}}"#,
            "required",
        ),
        (
            r#"{"refund_id":"r","provider":"p","transaction":{"xact_id":"x"},"amount":{"minor":5,"currency":"JPY"}}"#,
            "hundredths",
        ),
    ] {
        let err = request_for(&command(json), "u").expect_err(json);
        assert!(err.contains(needle), "{json}: {err}");
    }
}

#[test]
fn classifies_the_documented_answers() {
    let ok =
        r#"{"object_name":"transaction_reversed_request","message":"Başarılı İşlem","code":0}"#;
    assert_eq!(
        classify(200, ok),
        ProviderOutcome::Accepted {
            code: "0".into(),
            message: "Başarılı İşlem".into()
        }
    );
    let error = |t: &str, rc: u32| {
        format!(r#"{{"type":"{t}","message":"m","code":"x","result_code":{rc}}}"#)
    };
    assert!(matches!(
        classify(400, &error("invalid_request_error", 11)),
        ProviderOutcome::Declined { .. }
    ));
    assert!(matches!(
        classify(404, &error("no_data_error", 12)),
        ProviderOutcome::Declined { .. }
    ));
    assert!(matches!(
        classify(400, &error("api_error", 1)),
        ProviderOutcome::Declined { .. }
    ));
    assert!(matches!(
        classify(401, &error("authorization_error", 7)),
        ProviderOutcome::Misconfigured { .. }
    ));
    assert!(matches!(
        classify(403, &error("api_error", 3)),
        ProviderOutcome::Misconfigured { .. }
    ));
    assert!(matches!(
        classify(500, &error("api_error", 8)),
        ProviderOutcome::Unknown { .. }
    ));
    assert!(matches!(
        classify(504, &error("api_error", 10)),
        ProviderOutcome::Unknown { .. }
    ));
    assert!(matches!(
        classify(400, &error("api_error", 100)),
        ProviderOutcome::Unknown { .. }
    ));
    // "Duplicate data": an identical earlier request exists and may have
    // been executed (Paynet has no idempotency key): never a final no.
    assert!(matches!(
        classify(400, &error("invalid_request_error", 5)),
        ProviderOutcome::Unknown { .. }
    ));
    assert!(matches!(
        classify(503, "busy"),
        ProviderOutcome::NotSent { .. }
    ));
    assert!(matches!(
        classify(502, "<html>"),
        ProviderOutcome::Unknown { .. }
    ));
    assert!(matches!(
        classify(200, "<html>"),
        ProviderOutcome::Unknown { .. }
    ));
}

#[test]
fn parses_callbacks() {
    let cb = parse_callback(br#"{"xact_id":"abc","code":"0","status":"approved","message":"ok"}"#)
        .expect("cb");
    assert!(cb.approved);
    assert_eq!(cb.xact_id, "abc");
    assert!(
        !parse_callback(br#"{"xact_id":"abc","code":1,"status":"no","message":"x"}"#)
            .expect("cb")
            .approved
    );
    assert!(parse_callback(br#"{"xact_id":"abc","code":"7"}"#).is_err());
    assert!(parse_callback(b"nope").is_err());
}

//! The wire module on the examples of the provider's documentation.

use super::*;
use crate::contract::command::{Operation, RefundCommand};
use crate::providers::hyp_pay::HypPayAccount;
use crate::providers::ProviderOutcome;
use crate::values::secret::Secret;

fn account() -> HypPayAccount {
    HypPayAccount {
        base_url: "https://pay.hyp.co.il/p/".into(),
        masof: "0010131918".into(),
        pass_p: Secret::new("your-api-password"),
        z_pass: Secret::new("8179"),
        payouts: Default::default(),
        policy: Default::default(),
    }
}

fn command(json: &str) -> RefundCommand {
    RefundCommand::parse(json.as_bytes()).expect("command")
}

#[test]
fn builds_the_documented_refund_request() {
    // Docs: ?action=zikoyAPI&Masof=0010131918&PassP=your-api-password&TransId=12290620&Amount=10
    let account = account();
    let cmd = command(
        r#"{"refund_id":"r1","provider":"hyp_pay","transaction":{"id":"12290620"},"amount":{"minor":1000,"currency":"ILS"}}"#,
    );
    let req = request_for(&cmd, &account).expect("request");
    let body = serde_urlencoded::to_string(req.fields()).expect("form");
    assert_eq!(
        body,
        "action=zikoyAPI&Masof=0010131918&PassP=your-api-password&TransId=12290620&Amount=10.00&UTF8=True&UTF8out=True"
    );
    assert!(!format!("{req:?}").contains("your-api-password"));
}

#[test]
fn formats_partial_amounts_with_two_decimals() {
    let account = account();
    let cmd = command(
        r#"{"refund_id":"r1","provider":"hyp_pay","transaction":{"id":"1"},"amount":{"minor":1050,"currency":"ILS"}}"#,
    );
    assert_eq!(
        request_for(&cmd, &account).expect("req").amount.as_deref(),
        Some("10.50")
    );
}

#[test]
fn builds_the_documented_cancel_request() {
    // Docs: ?action=CancelTrans&Masof=0010131918&PassP=your-api-password&TransId=405532558
    let account = account();
    let cmd = command(
        r#"{"refund_id":"r1","provider":"hyp_pay","operation":"cancel","transaction":{"id":"405532558"}}"#,
    );
    let req = request_for(&cmd, &account).expect("request");
    let body = serde_urlencoded::to_string(req.fields()).expect("form");
    assert_eq!(
        body,
        "action=CancelTrans&Masof=0010131918&PassP=your-api-password&TransId=405532558&UTF8=True&UTF8out=True"
    );
}

#[test]
fn refuses_commands_hyp_cannot_take() {
    let account = account();
    for (json, needle) in [
        (
            r#"{"refund_id":"r1","provider":"h","transaction":{"id":"1"}}"#,
            "amount is required",
        ),
        (
            r#"{"refund_id":"r1","provider":"h","transaction":{"cg_uid":"1"}}"#,
            "transaction.id",
        ),
        (
            r#"{"refund_id":"r1","provider":"h","transaction":{"id":"1&x=2"},"amount":{"minor":1,"currency":"ILS"}}"#,
            "not a Hyp Pay",
        ),
        (
            r#"{"refund_id":"r1","provider":"h","transaction":{"id":"1"},"amount":{"minor":1,"currency":"KWD"}}"#,
            "at most 2",
        ),
        (
            r#"{"refund_id":"r1","provider":"h","transaction":{"id":"1"},"amount":{"minor":1,"currency":"ILS"},"installments":{}}"#,
            "installments",
        ),
    ] {
        let err = request_for(&command(json), &account).expect_err(json);
        assert!(err.contains(needle), "{json}: {err}");
    }
}

#[test]
fn classifies_the_documented_refund_answers() {
    match classify(
        Operation::Refund,
        "Id=405577499&CCode=0&ACode=0476241&HeshASM=EZ",
    ) {
        ProviderOutcome::Confirmed {
            provider_txn,
            performed,
            code,
            ..
        } => {
            assert_eq!(provider_txn.as_deref(), Some("405577499"));
            assert_eq!(performed, Operation::Refund);
            assert_eq!(code, "0");
        }
        other => panic!("{other:?}"),
    }
    match classify(Operation::Refund, "CCode=33") {
        ProviderOutcome::Declined { code, message } => {
            assert_eq!(code, "33");
            assert!(message.contains("exceeds"));
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn classifies_the_documented_cancel_answers() {
    match classify(
        Operation::Cancel,
        "TransId=405532558&CCode=0&Hesh=EZ&ReversalStatus=777",
    ) {
        ProviderOutcome::Confirmed {
            provider_txn,
            performed,
            ..
        } => {
            assert_eq!(provider_txn.as_deref(), Some("405532558"));
            assert_eq!(performed, Operation::Cancel);
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        classify(Operation::Cancel, "TransId=412701022&CCode=920"),
        ProviderOutcome::Declined { code, .. } if code == "920"
    ));
}

#[test]
fn classifies_system_errors_as_unknown_and_credentials_as_misconfigured() {
    for body in [
        "",
        "<html><body>Error</body></html>",
        "  <!DOCTYPE html>",
        "Id=1&ACode=2",
        "CCode=abc",
    ] {
        assert!(
            matches!(
                classify(Operation::Refund, body),
                ProviderOutcome::Unknown { .. }
            ),
            "{body:?}"
        );
    }
    for code in ["999", "009", "599"] {
        assert!(matches!(
            classify(Operation::Refund, &format!("CCode={code}")),
            ProviderOutcome::Unknown { .. }
        ));
    }
    for code in ["901", "902", "903", "996", "997"] {
        assert!(matches!(
            classify(Operation::Refund, &format!("CCode={code}")),
            ProviderOutcome::Misconfigured { .. }
        ));
    }
    // Success is CCode=0 and nothing else.
    assert!(matches!(
        classify(Operation::Refund, "CCode=1"),
        ProviderOutcome::Declined { .. }
    ));
}

fn payout_command(currency: &str) -> RefundCommand {
    command(&format!(
        r#"{{"refund_id":"po-1","provider":"hyp_pay","operation":"payout",
            "amount":{{"minor":1000,"currency":"{currency}"}},
            "payout":{{"card_token":"4724478937284730772","expiry_month":"05","expiry_year":"31",
                       "holder_id":"203269535","holder_name":"Jenny","info":"payout"}}}}"#
    ))
}

#[test]
fn builds_the_documented_payout_request() {
    // Docs: ?action=soft&Masof=0010345518&PassP=your-api-password&zPass=8179&Amount=10
    //        &CC=4724478937284730772&Tmonth=05&Tyear=31&Token=True&UserId=203269535
    //        &ClientName=Jenny&Info=payout
    let account = account();
    let cmd = payout_command("ILS");
    let req = payout_request_for(&cmd, &account).expect("request");
    let body = serde_urlencoded::to_string(req.fields()).expect("form");
    assert_eq!(
        body,
        "action=soft&Masof=0010131918&PassP=your-api-password&zPass=8179&Amount=10.00\
         &CC=4724478937284730772&Tmonth=05&Tyear=31&Token=True&UserId=203269535\
         &ClientName=Jenny&Info=payout"
    );
    let usd = payout_request_for(&payout_command("USD"), &account).expect_err("ILS only");
    assert!(usd.contains("ILS"), "{usd}");
}

#[test]
fn classifies_the_documented_payout_answers() {
    let ok = classify_payout(
        "Id=5920751&CCode=0&Amount=10&ACode=0034903&Fild1=&Fild2=&Fild3=&Hesh=47",
        "10.00",
    );
    assert!(
        matches!(&ok, ProviderOutcome::Confirmed { provider_txn: Some(id), performed: Operation::Payout, .. } if id == "5920751"),
        "{ok:?}"
    );
    for (body, expect) in [
        (
            "Id=0&CCode=401&Amount=1&ACode=&Fild1=&Fild2=&Fild3=",
            "declined",
        ),
        ("Id=0&CCode=402&Amount=1&ACode=", "declined"),
        ("Id=0&CCode=997&Amount=1&ACode=", "declined"),
        ("Id=0&CCode=901&Amount=1&ACode=", "misconfigured"),
        ("Id=0&CCode=902&Amount=1&ACode=", "misconfigured"),
        ("Id=0&CCode=999&Amount=1&ACode=", "unknown"),
        ("<html><body>error</body></html>", "unknown"),
        ("Id=0&CCode=0&Amount=10&ACode=", "unknown"),
        ("Id=5920751&CCode=0&Amount=100&ACode=1", "unknown"),
    ] {
        let outcome = classify_payout(body, "10.00");
        let got = match outcome {
            ProviderOutcome::Declined { .. } => "declined",
            ProviderOutcome::Misconfigured { .. } => "misconfigured",
            ProviderOutcome::Unknown { .. } => "unknown",
            _ => "other",
        };
        assert_eq!(got, expect, "{body}");
    }
    match classify_payout("Id=0&CCode=901&Amount=1", "1") {
        ProviderOutcome::Misconfigured { message, .. } => assert!(message.contains("zPass")),
        other => panic!("{other:?}"),
    }
}

//! The wire module on the examples of the provider's documentation.

use super::*;
use crate::contract::command::{Operation, RefundCommand};
use crate::providers::ProviderOutcome;

const REFUND_RESPONSE: &str =
    include_str!("../../../../tests/fixtures/creditguard-refund-response.xml");
const CANCEL_RESPONSE: &str =
    include_str!("../../../../tests/fixtures/creditguard-cancel-response.xml");

fn command(json: &str) -> RefundCommand {
    RefundCommand::parse(json.as_bytes()).expect("command")
}

#[test]
fn builds_the_documented_full_refund_by_cg_uid() {
    let cmd = command(r#"{"refund_id":"r1","provider":"cg","transaction":{"cg_uid":"118372223"}}"#);
    let xml = to_xml(&request_for(&cmd, "0882819014", false).expect("doc")).expect("xml");
    assert_eq!(
        xml,
        "<ashrait><request><version>2000</version><language>Eng</language><command>refundDeal</command>\
         <refundDeal><terminalNumber>0882819014</terminalNumber><cgUid>118372223</cgUid></refundDeal></request></ashrait>"
    );
}

#[test]
fn builds_the_documented_installment_refund() {
    // Docs: cgUid 119042011, Payments, 10000 + 10000 × 1, total 20000.
    let cmd = command(
        r#"{"refund_id":"r1","provider":"cg","transaction":{"cg_uid":"119042011"},
            "amount":{"minor":20000,"currency":"ILS"},
            "installments":{"credit_type":"Payments","first_payment":10000,"periodical_payment":10000,"number_of_payments":1}}"#,
    );
    let doc = request_for(&cmd, "0882819014", true).expect("doc");
    let deal = doc.request.refund_deal.clone().expect("deal");
    assert_eq!(deal.total.as_deref(), Some("20000"));
    assert_eq!(deal.credit_type.as_deref(), Some("Payments"));
    assert_eq!(deal.first_payment.as_deref(), Some("10000"));
    assert_eq!(deal.periodical_payment.as_deref(), Some("10000"));
    assert_eq!(deal.number_of_payments.as_deref(), Some("1"));
    assert_eq!(doc.request.may_be_duplicate.as_deref(), Some("1"));
    assert_eq!(doc.request.request_id.as_deref().map(str::len), Some(20));
    // Round trip through XML, as the sandbox reads it.
    assert_eq!(
        parse_request(&to_xml(&doc).expect("xml")).expect("parse"),
        doc
    );
}

#[test]
fn builds_the_documented_cancel_and_every_lookup() {
    let cmd = command(
        r#"{"refund_id":"r1","provider":"cg","operation":"cancel","transaction":{
            "tran_id":"1","cg_uid":"2","org_uid":"25062617340908828192261","user":"customer123",
            "auth_number":"7823673","card_id":"1092880571131111","card_expiration":"0629"}}"#,
    );
    let doc = request_for(&cmd, "0882819014", false).expect("doc");
    assert_eq!(doc.request.command, "cancelDeal");
    let xml = to_xml(&doc).expect("xml");
    for part in [
        "<cancelDeal><terminalNumber>0882819014</terminalNumber>",
        "<tranId>1</tranId>",
        "<cgUid>2</cgUid>",
        "<user>customer123</user>",
        "<authNumber>7823673</authNumber>",
        "<cardId>1092880571131111</cardId><cardExpiration>0629</cardExpiration>",
        "<ashraitEmvData><orgUid>25062617340908828192261</orgUid></ashraitEmvData>",
    ] {
        assert!(xml.contains(part), "{part} missing in {xml}");
    }
    assert!(!xml.contains("<total>"));
}

#[test]
fn escapes_every_value() {
    let cmd = command(r#"{"refund_id":"r1","provider":"cg","transaction":{"user":"a<b>&\"c"}}"#);
    let xml = to_xml(&request_for(&cmd, "08&82", false).expect("doc")).expect("xml");
    assert!(xml.contains("<user>a&lt;b&gt;&amp;\"c</user>"), "{xml}");
    assert!(
        xml.contains("<terminalNumber>08&amp;82</terminalNumber>"),
        "{xml}"
    );
    let back = parse_request(&xml).expect("parse");
    assert_eq!(
        back.request.refund_deal.expect("deal").user.as_deref(),
        Some("a<b>&\"c")
    );
}

#[test]
fn refuses_what_creditguard_would_refuse() {
    for (json, needle) in [
        (
            r#"{"refund_id":"r","provider":"cg","transaction":{"id":"1"}}"#,
            "not a CreditGuard lookup",
        ),
        (
            r#"{"refund_id":"r","provider":"cg","transaction":{"card_expiration":"0629"}}"#,
            "go together",
        ),
        (
            r#"{"refund_id":"r","provider":"cg","transaction":{"card_id":"1","card_expiration":"1329"}}"#,
            "MMYY",
        ),
        (
            r#"{"refund_id":"r","provider":"cg","transaction":{"tran_id":""}}"#,
            "at least one",
        ),
        (
            r#"{"refund_id":"r","provider":"cg","transaction":{"tran_id":1}}"#,
            "must be a string",
        ),
        (
            r#"{"refund_id":"r","provider":"cg","transaction":{"cg_uid":"1"},"amount":{"minor":20000,"currency":"ILS"},
            "installments":{"credit_type":"Payments","first_payment":10000,"periodical_payment":5000,"number_of_payments":1}}"#,
            "must equal",
        ),
        (
            r#"{"refund_id":"r","provider":"cg","transaction":{"cg_uid":"1"},
            "installments":{"credit_type":"Payments","first_payment":1,"periodical_payment":1,"number_of_payments":1}}"#,
            "need an amount",
        ),
        (
            r#"{"refund_id":"r","provider":"cg","transaction":{"cg_uid":"1"},"amount":{"minor":2,"currency":"ILS"},
            "installments":{"credit_type":"Weird","first_payment":1,"periodical_payment":1,"number_of_payments":1}}"#,
            "Payments or SpecialCredit",
        ),
        (
            r#"{"refund_id":"r","provider":"cg","operation":"cancel","transaction":{"cg_uid":"1"},
            "installments":{"credit_type":"Payments","first_payment":1,"periodical_payment":1,"number_of_payments":1}}"#,
            "no installments",
        ),
    ] {
        let err = request_for(&command(json), "1", false).expect_err(json);
        assert!(err.contains(needle), "{json}: {err}");
    }
}

#[test]
fn request_id_is_stable_and_short() {
    assert_eq!(request_id("rf-2026-000123"), request_id("rf-2026-000123"));
    assert_ne!(request_id("rf-2026-000123"), request_id("rf-2026-000124"));
    assert_eq!(request_id(&"x".repeat(64)).len(), 20);
}

#[test]
fn parses_the_documented_refund_response_as_a_fallback_cancel() {
    let doc = parse_response(REFUND_RESPONSE).expect("parse");
    let deal = doc.response.refund_deal.as_ref().expect("block");
    assert_eq!(doc.response.tran_id.as_deref(), Some("118372255"));
    assert_eq!(deal.total.as_deref(), Some("11400"));
    assert_eq!(deal.cg_uid.as_deref(), Some("118372223"));
    assert_eq!(
        deal.currency.as_ref().and_then(|c| c.text.as_deref()),
        Some("ILS")
    );
    match classify(Operation::Refund, REFUND_RESPONSE) {
        ProviderOutcome::Confirmed {
            provider_txn,
            performed,
            code,
            message,
        } => {
            assert_eq!(provider_txn.as_deref(), Some("118372255"));
            assert_eq!(performed, Operation::Cancel, "transactionType code 52");
            assert_eq!(code, "000");
            assert_eq!(message.as_deref(), Some("Permitted transaction"));
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn parses_the_documented_cancel_response() {
    match classify(Operation::Cancel, CANCEL_RESPONSE) {
        ProviderOutcome::Confirmed {
            provider_txn,
            performed,
            ..
        } => {
            assert_eq!(provider_txn.as_deref(), Some("118374656"));
            assert_eq!(performed, Operation::Cancel);
        }
        other => panic!("{other:?}"),
    }
}

fn error_answer(result: &str, message: &str) -> String {
    format!(
        "<?xml version='1.0'?><ashrait><response><command>refundDeal</command><requestId /><tranId>1</tranId>\
         <result>{result}</result><message>{message}</message><userMessage>{message}</userMessage>\
         <refundDeal><status>{result}</status><statusText>{message}</statusText><total /></refundDeal></response></ashrait>"
    )
}

#[test]
fn classifies_every_documented_error_code() {
    for code in [
        "310", "312", "313", "314", "317", "320", "321", "332", "339", "340", "341",
    ] {
        match classify(Operation::Refund, &error_answer(code, "No")) {
            ProviderOutcome::Declined { code: c, message } => {
                assert_eq!(c, code);
                assert_eq!(message, "No");
            }
            other => panic!("{code}: {other:?}"),
        }
    }
    for code in ["319", "324"] {
        assert!(matches!(
            classify(Operation::Refund, &error_answer(code, "x")),
            ProviderOutcome::Misconfigured { .. }
        ));
    }
    for body in [
        "",
        "<html><body>down</body></html>",
        "<ashrait><response></response></ashrait>",
        "garbage<",
    ] {
        assert!(
            matches!(
                classify(Operation::Refund, body),
                ProviderOutcome::Unknown { .. }
            ),
            "{body}"
        );
    }
    assert!(matches!(
        classify(Operation::Refund, &error_answer("999", "?")),
        ProviderOutcome::Unknown { .. }
    ));
}

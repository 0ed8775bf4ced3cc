//! CreditGuard's wire format, pure: the `refundDeal` / `cancelDeal` XML of
//! the `int_in` form field, and the classification of the XML answer.
//!
//! From `provider-docs/creditguard-*.md`: lookup elements `tranId`, `cgUid`,
//! `orgUid` (inside `ashraitEmvData`), `user`, `authNumber`, `cardId` with
//! `cardExpiration`; `total` and the installment fields in currency
//! subunits; success is `result` `000` (and the command block's `status`
//! `000`); `transactionType code="52"` means refundDeal fell back to a
//! cancellation. From `provider-notes.md`: `mayBeDuplicate` + `requestId`
//! make a repeated request safe; `user` is a lookup element, never the
//! refund's own reference; `language` `Eng`.

use crate::command::{Operation, RefundCommand};
use crate::providers::ProviderOutcome;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The request document.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename = "ashrait")]
pub struct RequestDoc {
    /// The request.
    pub request: Request,
}

/// `<request>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    /// Always `2000`.
    pub version: String,
    /// `Eng`.
    pub language: String,
    /// `1` when the terminal deduplicates by `requestId`.
    #[serde(
        rename = "mayBeDuplicate",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub may_be_duplicate: Option<String>,
    /// Stable per refund (≤ 20 characters).
    #[serde(rename = "requestId", default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
    /// `refundDeal` or `cancelDeal`.
    pub command: String,
    /// The refund block.
    #[serde(
        rename = "refundDeal",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub refund_deal: Option<Deal>,
    /// The cancel block.
    #[serde(
        rename = "cancelDeal",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub cancel_deal: Option<Deal>,
}

/// The body of `refundDeal` / `cancelDeal`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Deal {
    /// The merchant's terminal.
    #[serde(rename = "terminalNumber")]
    pub terminal_number: String,
    /// Lookup: transaction step id.
    #[serde(rename = "tranId", default, skip_serializing_if = "Option::is_none")]
    pub tran_id: Option<String>,
    /// Lookup: CG identifier.
    #[serde(rename = "cgUid", default, skip_serializing_if = "Option::is_none")]
    pub cg_uid: Option<String>,
    /// Lookup: the original's `user` field.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// Lookup: authorization number.
    #[serde(
        rename = "authNumber",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub auth_number: Option<String>,
    /// Lookup: card token (with `cardExpiration`).
    #[serde(rename = "cardId", default, skip_serializing_if = "Option::is_none")]
    pub card_id: Option<String>,
    /// MMYY.
    #[serde(
        rename = "cardExpiration",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub card_expiration: Option<String>,
    /// Amount in subunits (refund only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total: Option<String>,
    /// `Payments` or `SpecialCredit` for installments.
    #[serde(
        rename = "creditType",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub credit_type: Option<String>,
    /// First installment (subunits).
    #[serde(
        rename = "firstPayment",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub first_payment: Option<String>,
    /// Each further installment (subunits).
    #[serde(
        rename = "periodicalPayment",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub periodical_payment: Option<String>,
    /// Number of payments of the refund.
    #[serde(
        rename = "numberOfPayments",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub number_of_payments: Option<String>,
    /// Lookup: Shva's id, wrapped.
    #[serde(
        rename = "ashraitEmvData",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub ashrait_emv_data: Option<EmvLookup>,
}

/// `<ashraitEmvData><orgUid>…</orgUid></ashraitEmvData>`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EmvLookup {
    /// Shva's transaction id.
    #[serde(rename = "orgUid", default)]
    pub org_uid: Option<String>,
}

/// The `requestId` for a refund: the first 20 hex digits of SHA-256 of the
/// `refund_id`. Stable across redeliveries and restarts, within
/// CreditGuard's 20-character limit whatever the `refund_id`'s length.
pub fn request_id(refund_id: &str) -> String {
    let digest = Sha256::digest(refund_id.as_bytes());
    crate::command::hex(&digest)[..20].to_string()
}

/// The command's installment plan, as the contract spells it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Installments {
    /// `Payments` or `SpecialCredit`.
    pub credit_type: String,
    /// First payment (minor units).
    pub first_payment: u64,
    /// Each further payment (minor units).
    pub periodical_payment: u64,
    /// Number of further payments.
    pub number_of_payments: u64,
}

const LOOKUPS: &[&str] = &[
    "tran_id",
    "cg_uid",
    "org_uid",
    "user",
    "auth_number",
    "card_id",
    "card_expiration",
];

/// Translates a command into the request document, or says which field is
/// wrong. `dedupe` adds `mayBeDuplicate` and `requestId`.
pub fn request_for(
    command: &RefundCommand,
    terminal_number: &str,
    dedupe: bool,
) -> Result<RequestDoc, String> {
    if let Some(extra) = command
        .transaction
        .keys()
        .find(|k| !LOOKUPS.contains(&k.as_str()))
    {
        return Err(format!(
            "transaction.{extra} is not a CreditGuard lookup (use tran_id, cg_uid, org_uid, user, auth_number, card_id + card_expiration)"
        ));
    }
    for (key, value) in &command.transaction {
        if !value.is_string() {
            return Err(format!("transaction.{key} must be a string"));
        }
    }
    let get = |k: &str| command.transaction_str(k).map(str::to_string);
    let mut deal = Deal {
        terminal_number: terminal_number.to_string(),
        tran_id: get("tran_id"),
        cg_uid: get("cg_uid"),
        user: get("user"),
        auth_number: get("auth_number"),
        card_id: get("card_id"),
        card_expiration: get("card_expiration"),
        ashrait_emv_data: get("org_uid").map(|org| EmvLookup { org_uid: Some(org) }),
        ..Default::default()
    };
    if deal.card_id.is_some() != deal.card_expiration.is_some() {
        return Err("transaction.card_id and transaction.card_expiration go together".into());
    }
    if let Some(exp) = &deal.card_expiration {
        let month = exp.get(..2).and_then(|m| m.parse::<u8>().ok());
        if exp.len() != 4
            || !exp.bytes().all(|b| b.is_ascii_digit())
            || !matches!(month, Some(1..=12))
        {
            return Err(format!("transaction.card_expiration {exp:?} must be MMYY"));
        }
    }
    if let Some(user) = &deal.user {
        if user.chars().count() > 19 {
            return Err("transaction.user is longer than 19 characters".into());
        }
    }
    let has_lookup = deal.tran_id.is_some()
        || deal.cg_uid.is_some()
        || deal.ashrait_emv_data.is_some()
        || deal.user.is_some()
        || deal.auth_number.is_some()
        || deal.card_id.is_some();
    if !has_lookup {
        return Err("transaction needs at least one CreditGuard lookup: tran_id, cg_uid, org_uid, user, auth_number, or card_id with card_expiration".into());
    }
    let installments: Option<Installments> = match &command.installments {
        None => None,
        Some(value) => {
            Some(serde_json::from_value(value.clone()).map_err(|e| format!("installments: {e}"))?)
        }
    };
    let command_name = match command.operation {
        Operation::Refund => {
            deal.total = command.amount.as_ref().map(|a| a.minor.to_string());
            if let Some(plan) = &installments {
                if !matches!(plan.credit_type.as_str(), "Payments" | "SpecialCredit") {
                    return Err(format!(
                        "installments.credit_type {:?} must be Payments or SpecialCredit",
                        plan.credit_type
                    ));
                }
                let total = command
                    .amount
                    .as_ref()
                    .ok_or("installments need an amount (the refund's total)")?
                    .minor;
                let planned = plan
                    .periodical_payment
                    .checked_mul(plan.number_of_payments)
                    .and_then(|p| p.checked_add(plan.first_payment));
                if planned != Some(total) {
                    return Err(format!(
                        "installments: first_payment + periodical_payment × number_of_payments = {} must equal amount.minor {total}",
                        planned.map(|p| p.to_string()).unwrap_or_else(|| "overflow".into())
                    ));
                }
                deal.credit_type = Some(plan.credit_type.clone());
                deal.first_payment = Some(plan.first_payment.to_string());
                deal.periodical_payment = Some(plan.periodical_payment.to_string());
                deal.number_of_payments = Some(plan.number_of_payments.to_string());
            }
            "refundDeal"
        }
        Operation::Cancel => {
            if installments.is_some() {
                return Err("a cancel takes no installments".into());
            }
            "cancelDeal"
        }
    };
    let (refund_deal, cancel_deal) = match command.operation {
        Operation::Refund => (Some(deal), None),
        Operation::Cancel => (None, Some(deal)),
    };
    Ok(RequestDoc {
        request: Request {
            version: "2000".into(),
            language: "Eng".into(),
            may_be_duplicate: dedupe.then(|| "1".into()),
            request_id: dedupe.then(|| request_id(&command.refund_id)),
            command: command_name.into(),
            refund_deal,
            cancel_deal,
        },
    })
}

/// Serialises the request document; every value is XML-escaped.
pub fn to_xml(doc: &RequestDoc) -> Result<String, String> {
    quick_xml::se::to_string(doc).map_err(|e| e.to_string())
}

/// Parses a request document (the sandbox's side).
pub fn parse_request(xml: &str) -> Result<RequestDoc, String> {
    quick_xml::de::from_str(xml).map_err(|e| e.to_string())
}

/// `<element code="52">Cancel</element>`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Coded {
    /// The `code` attribute.
    #[serde(rename = "@code", default)]
    pub code: Option<String>,
    /// The text.
    #[serde(rename = "$text", default)]
    pub text: Option<String>,
}

/// The answer document.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename = "ashrait")]
pub struct ResponseDoc {
    /// The response.
    pub response: Response,
}

/// `<response>`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Response {
    /// Echo of the command.
    #[serde(default)]
    pub command: Option<String>,
    /// Server time.
    #[serde(rename = "dateTime", default)]
    pub date_time: Option<String>,
    /// Echo of our requestId.
    #[serde(rename = "requestId", default)]
    pub request_id: Option<String>,
    /// The new transaction's id.
    #[serde(rename = "tranId", default)]
    pub tran_id: Option<String>,
    /// `000` on success.
    #[serde(default)]
    pub result: Option<String>,
    /// Message.
    #[serde(default)]
    pub message: Option<String>,
    /// Message for end users.
    #[serde(rename = "userMessage", default)]
    pub user_message: Option<String>,
    /// Extra detail.
    #[serde(rename = "additionalInfo", default)]
    pub additional_info: Option<String>,
    /// Protocol version.
    #[serde(default)]
    pub version: Option<String>,
    /// Language.
    #[serde(default)]
    pub language: Option<String>,
    /// The refund block.
    #[serde(rename = "refundDeal", default)]
    pub refund_deal: Option<DealResponse>,
    /// The cancel block.
    #[serde(rename = "cancelDeal", default)]
    pub cancel_deal: Option<DealResponse>,
}

/// The command block of an answer (the documented fields; the rest is
/// ignored).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DealResponse {
    /// `000` on success.
    #[serde(default)]
    pub status: Option<String>,
    /// Status text.
    #[serde(rename = "statusText", default)]
    pub status_text: Option<String>,
    /// Terminal.
    #[serde(rename = "terminalNumber", default)]
    pub terminal_number: Option<String>,
    /// Card token.
    #[serde(rename = "cardId", default)]
    pub card_id: Option<String>,
    /// Masked card number.
    #[serde(rename = "cardMask", default)]
    pub card_mask: Option<String>,
    /// `code="52"` Cancel when a refundDeal fell back to cancelling.
    #[serde(rename = "transactionType", default)]
    pub transaction_type: Option<Coded>,
    /// Credit type.
    #[serde(rename = "creditType", default)]
    pub credit_type: Option<Coded>,
    /// Currency.
    #[serde(default)]
    pub currency: Option<Coded>,
    /// Amount refunded (subunits).
    #[serde(default)]
    pub total: Option<String>,
    /// Number of payments.
    #[serde(rename = "numberOfPayments", default)]
    pub number_of_payments: Option<String>,
    /// Authorization number.
    #[serde(rename = "authNumber", default)]
    pub auth_number: Option<String>,
    /// Links to the original.
    #[serde(rename = "cgUid", default)]
    pub cg_uid: Option<String>,
    /// The `user` field.
    #[serde(default)]
    pub user: Option<String>,
}

/// The `transactionType` code of a cancellation.
pub const TRANSACTION_TYPE_CANCEL: &str = "52";

fn nonempty(v: &Option<String>) -> Option<String> {
    v.as_ref()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
}

/// Parses an answer document.
pub fn parse_response(xml: &str) -> Result<ResponseDoc, String> {
    quick_xml::de::from_str(xml.trim()).map_err(|e| e.to_string())
}

/// Turns a 200 answer's body into an outcome.
pub fn classify(operation: Operation, body: &str) -> ProviderOutcome {
    let trimmed = body.trim();
    if trimmed.is_empty() {
        return ProviderOutcome::Unknown {
            reason: "empty answer from CreditGuard".into(),
        };
    }
    if trimmed.to_ascii_lowercase().contains("<html") {
        return ProviderOutcome::Unknown {
            reason: "HTML answer from CreditGuard (system error)".into(),
        };
    }
    let doc = match parse_response(trimmed) {
        Ok(doc) => doc,
        Err(e) => {
            return ProviderOutcome::Unknown {
                reason: format!("unparsable CreditGuard answer: {e}"),
            }
        }
    };
    let response = doc.response;
    let Some(result) = nonempty(&response.result) else {
        return ProviderOutcome::Unknown {
            reason: "CreditGuard answer without result".into(),
        };
    };
    let block = match operation {
        Operation::Refund => response.refund_deal.as_ref(),
        Operation::Cancel => response.cancel_deal.as_ref(),
    };
    let status = block.and_then(|b| nonempty(&b.status));
    let message = nonempty(&response.message)
        .or_else(|| block.and_then(|b| nonempty(&b.status_text)))
        .unwrap_or_default();
    if result == "000" {
        if status.as_deref().is_some_and(|s| s != "000") {
            return ProviderOutcome::Unknown {
                reason: format!(
                    "CreditGuard result 000 but status {}",
                    status.unwrap_or_default()
                ),
            };
        }
        let performed = match operation {
            Operation::Cancel => Operation::Cancel,
            Operation::Refund => {
                let cancelled = block
                    .and_then(|b| b.transaction_type.as_ref())
                    .and_then(|t| t.code.as_deref())
                    == Some(TRANSACTION_TYPE_CANCEL);
                if cancelled {
                    Operation::Cancel
                } else {
                    Operation::Refund
                }
            }
        };
        return ProviderOutcome::Confirmed {
            provider_txn: nonempty(&response.tran_id),
            performed,
            code: result,
            message: Some(message),
        };
    }
    let code: u32 = result.parse().unwrap_or(u32::MAX);
    match code {
        // Terminal not permitted to cancel / refund: the account, not the refund.
        319 | 324 => ProviderOutcome::Misconfigured {
            code: result,
            message,
        },
        // Shva/issuer decisions and the documented refund/cancel errors.
        1..=299 | 310..=341 => ProviderOutcome::Declined {
            code: result,
            message,
        },
        // Anything undocumented may hide an executed refund: a person checks.
        _ => ProviderOutcome::Unknown {
            reason: format!("CreditGuard result {result}: {message}"),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const REFUND_RESPONSE: &str =
        include_str!("../../../tests/fixtures/creditguard-refund-response.xml");
    const CANCEL_RESPONSE: &str =
        include_str!("../../../tests/fixtures/creditguard-cancel-response.xml");

    fn command(json: &str) -> RefundCommand {
        RefundCommand::parse(json.as_bytes()).expect("command")
    }

    #[test]
    fn builds_the_documented_full_refund_by_cg_uid() {
        let cmd =
            command(r#"{"refund_id":"r1","provider":"cg","transaction":{"cg_uid":"118372223"}}"#);
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
        let cmd =
            command(r#"{"refund_id":"r1","provider":"cg","transaction":{"user":"a<b>&\"c"}}"#);
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
}

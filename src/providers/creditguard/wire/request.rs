//! Our command → the provider's request.

use crate::contract::command::{Operation, RefundCommand};
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
    crate::contract::command::hex(&digest)[..20].to_string()
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
        Operation::Payout => {
            return Err(format!(
                "operation: {}",
                "creditguard has no payout (only hyp_pay accounts do)"
            ))
        }
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
        Operation::Refund | Operation::Payout => (Some(deal), None),
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

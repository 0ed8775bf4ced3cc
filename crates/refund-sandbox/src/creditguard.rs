//! CreditGuard's `/xpo/Relay` as the sandbox serves it: form fields `user`,
//! `password`, `int_in` (the XML), `refundDeal` with its fallback to a
//! cancellation for non-transmitted full refunds, `cancelDeal`, every lookup
//! element, installments, and `mayBeDuplicate` + `requestId`.
//!
//! Documented codes: 310 no matching debit, 312 nothing to cancel, 313
//! already transmitted, 314 already cancelled, 317 missing parameters, 320
//! credit already performed, 321 amount differs (over the remaining amount),
//! 332 several matches, 339 credit type differs, 341 amount differs
//! (installment plan that does not add up). Chosen here (undocumented):
//! HTTP 401 for a wrong user/password, 322 for a repeated `requestId` with
//! different details.

use super::{Execution, FaultKind, Sandbox, SandboxState};
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response as HttpResponse};
use axum::Form;
use refund_worker::providers::creditguard::wire::{
    self, Coded, Deal, DealResponse, Response, ResponseDoc,
};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::time::Duration;

/// One original CreditGuard charge in the seed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CgOriginal {
    /// `tranId` of the debit.
    pub tran_id: String,
    /// `cgUid`.
    pub cg_uid: String,
    /// Shva's uid (`orgUid`).
    #[serde(default)]
    pub org_uid: Option<String>,
    /// The debit's `user` field.
    #[serde(default)]
    pub user: Option<String>,
    /// Authorization number.
    #[serde(default)]
    pub auth_number: Option<String>,
    /// Card token.
    #[serde(default)]
    pub card_id: Option<String>,
    /// MMYY.
    #[serde(default)]
    pub card_expiration: Option<String>,
    /// Charged amount (subunits).
    pub amount_minor: u64,
    /// Transmitted to Shva already.
    #[serde(default = "super::yes")]
    pub transmitted: bool,
    /// `RegularCredit`, `Payments` or `SpecialCredit`.
    #[serde(default = "regular")]
    pub credit_type: String,
}

fn regular() -> String {
    "RegularCredit".into()
}

/// State of one CreditGuard original.
#[derive(Debug, Clone, Serialize)]
pub struct CgState {
    /// As seeded.
    #[serde(flatten)]
    pub seed: CgOriginal,
    /// Refunded so far.
    pub refunded_minor: u64,
    /// Cancelled.
    pub cancelled: bool,
}

#[derive(Deserialize)]
pub(super) struct RelayForm {
    #[serde(default)]
    user: String,
    #[serde(default)]
    password: String,
    #[serde(default)]
    int_in: String,
}

enum Answer {
    Xml(String),
    Status(StatusCode),
    Html,
    StallThen(Duration, String),
}

/// Handles one Relay request.
pub(super) async fn handle(
    State(sandbox): State<Sandbox>,
    Form(form): Form<RelayForm>,
) -> HttpResponse {
    let answer = sandbox.answer(|state| decide(state, &form)).await;
    let xml = |body: String| {
        (
            StatusCode::OK,
            [(header::CONTENT_TYPE, "text/xml; charset=utf-8")],
            body,
        )
            .into_response()
    };
    match answer {
        Answer::Xml(body) => xml(body),
        Answer::Status(code) => code.into_response(),
        Answer::Html => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, "text/html")],
            "<html><body><h1>Internal error</h1></body></html>",
        )
            .into_response(),
        Answer::StallThen(stall, body) => {
            tokio::time::sleep(stall).await;
            xml(body)
        }
    }
}

fn decide(state: &mut SandboxState, form: &RelayForm) -> Answer {
    if form.user != state.config.cg_user || form.password != state.config.cg_password {
        return Answer::Status(StatusCode::UNAUTHORIZED);
    }
    let Ok(doc) = wire::parse_request(&form.int_in) else {
        return Answer::Xml(error(
            "refundDeal",
            None,
            "317",
            "Some parameters are missing for the required transaction.",
        ));
    };
    let request = doc.request;
    let command = request.command.clone();
    let deal = match command.as_str() {
        "refundDeal" => request.refund_deal.clone(),
        "cancelDeal" => request.cancel_deal.clone(),
        _ => None,
    };
    let Some(deal) = deal else {
        return Answer::Xml(error(
            &command,
            None,
            "317",
            "Some parameters are missing for the required transaction.",
        ));
    };
    let lookup = [
        &deal.tran_id,
        &deal.cg_uid,
        &deal.user,
        &deal.auth_number,
        &deal.card_id,
    ]
    .into_iter()
    .flatten()
    .next()
    .cloned()
    .or_else(|| {
        deal.ashrait_emv_data
            .as_ref()
            .and_then(|e| e.org_uid.clone())
    })
    .unwrap_or_default();
    // An outage answers before the gateway looks at the request.
    let fault = state.take_fault(&lookup);
    match fault.as_ref().map(|f| &f.fault) {
        Some(FaultKind::Unavailable) => return Answer::Status(StatusCode::SERVICE_UNAVAILABLE),
        Some(FaultKind::HtmlBefore) => return Answer::Html,
        _ => {}
    }
    // mayBeDuplicate: an identical earlier request returns its answer.
    let dedupe_key = (request.may_be_duplicate.as_deref() == Some("1"))
        .then(|| request.request_id.clone())
        .flatten();
    let fingerprint = format!(
        "{command}:{}",
        quick_xml::se::to_string(&deal).unwrap_or_default()
    );
    if let Some(id) = &dedupe_key {
        if let Some((earlier, answer)) = state.cg_requests.get(id) {
            return if *earlier == fingerprint {
                Answer::Xml(answer.clone())
            } else {
                Answer::Xml(error(
                    &command,
                    Some(id),
                    "322",
                    "Duplicate requestId with different details.",
                ))
            };
        }
    }
    let (executed, answer) = execute(state, &command, &deal, request.request_id.as_deref());
    if let Some(id) = dedupe_key {
        if executed {
            state.cg_requests.insert(id, (fingerprint, answer.clone()));
        }
    }
    match fault {
        Some(f) if executed && f.fault == FaultKind::HtmlAfter => Answer::Html,
        Some(f) if executed && f.fault == FaultKind::StallAfter => {
            Answer::StallThen(Duration::from_millis(f.stall_ms), answer)
        }
        _ => Answer::Xml(answer),
    }
}

fn find(state: &SandboxState, deal: &Deal) -> Vec<String> {
    let matches = |o: &CgOriginal| {
        if let Some(tran) = &deal.tran_id {
            return &o.tran_id == tran;
        }
        let eq = |want: &Option<String>, have: Option<&String>| {
            want.as_ref().is_none_or(|w| have == Some(w))
        };
        eq(&deal.cg_uid, Some(&o.cg_uid))
            && eq(&deal.user, o.user.as_ref())
            && eq(&deal.auth_number, o.auth_number.as_ref())
            && eq(&deal.card_id, o.card_id.as_ref())
            && eq(&deal.card_expiration, o.card_expiration.as_ref())
            && eq(
                &deal
                    .ashrait_emv_data
                    .as_ref()
                    .and_then(|e| e.org_uid.clone()),
                o.org_uid.as_ref(),
            )
    };
    let mut found: Vec<String> = state
        .cg_originals
        .values()
        .filter(|o| matches(&o.seed))
        .map(|o| o.seed.tran_id.clone())
        .collect();
    found.sort();
    found
}

fn execute(
    state: &mut SandboxState,
    command: &str,
    deal: &Deal,
    request_id: Option<&str>,
) -> (bool, String) {
    if deal.terminal_number != state.config.cg_terminal {
        return (
            false,
            error(
                command,
                request_id,
                "310",
                "There is no debit deal that matches the credit deal.",
            ),
        );
    }
    let has_lookup = deal.tran_id.is_some()
        || deal.cg_uid.is_some()
        || deal.user.is_some()
        || deal.auth_number.is_some()
        || deal.card_id.is_some()
        || deal.ashrait_emv_data.is_some();
    if !has_lookup || deal.card_id.is_some() != deal.card_expiration.is_some() {
        return (
            false,
            error(
                command,
                request_id,
                "317",
                "Some parameters are missing for the required transaction.",
            ),
        );
    }
    let found = find(state, deal);
    let refund = command == "refundDeal";
    let id =
        match found.as_slice() {
            [] if refund => {
                return (
                    false,
                    error(
                        command,
                        request_id,
                        "310",
                        "There is no debit deal that matches the credit deal.",
                    ),
                )
            }
            [] => {
                return (
                    false,
                    error(
                        command,
                        request_id,
                        "312",
                        "There is no transaction found for canceling.",
                    ),
                )
            }
            [one] => one.clone(),
            _ => return (
                false,
                error(
                    command,
                    request_id,
                    "332",
                    "More than one transaction was found for cancel/conditional refund commands.",
                ),
            ),
        };
    let Some(original) = state.cg_originals.get(&id).cloned() else {
        return (
            false,
            error(
                command,
                request_id,
                "310",
                "There is no debit deal that matches the credit deal.",
            ),
        );
    };
    let left = if original.cancelled {
        0
    } else {
        original.seed.amount_minor - original.refunded_minor
    };
    let (total, cancel) = if refund {
        let total = match deal.total.as_deref().map(str::parse::<u64>) {
            None => left,
            Some(Ok(t)) if t > 0 => t,
            Some(_) => {
                return (
                    false,
                    error(
                        command,
                        request_id,
                        "317",
                        "Some parameters are missing for the required transaction.",
                    ),
                )
            }
        };
        if left == 0 {
            return (
                false,
                error(
                    command,
                    request_id,
                    "320",
                    "A credit transaction has already been performed.",
                ),
            );
        }
        if total > left {
            return (
                false,
                error(
                    command,
                    request_id,
                    "321",
                    "The credit amount is different than the charge deal amount.",
                ),
            );
        }
        if let Some(ct) = &deal.credit_type {
            if original.seed.credit_type != *ct {
                return (
                    false,
                    error(
                        command,
                        request_id,
                        "339",
                        "Refund credit type is different from original transaction.",
                    ),
                );
            }
            let num = |v: &Option<String>| v.as_deref().and_then(|s| s.parse::<u64>().ok());
            let planned = match (
                num(&deal.first_payment),
                num(&deal.periodical_payment),
                num(&deal.number_of_payments),
            ) {
                (Some(f), Some(p), Some(n)) => p.checked_mul(n).and_then(|x| x.checked_add(f)),
                _ => None,
            };
            if planned != Some(total) {
                return (
                    false,
                    error(
                        command,
                        request_id,
                        "341",
                        "Refund amount is different from original transaction.",
                    ),
                );
            }
        }
        // Fallback: a full refund of a non-transmitted charge is a cancel.
        (
            total,
            !original.seed.transmitted
                && original.refunded_minor == 0
                && total == original.seed.amount_minor,
        )
    } else {
        if original.cancelled {
            return (
                false,
                error(
                    command,
                    request_id,
                    "314",
                    "The transaction has already been canceled.",
                ),
            );
        }
        if original.seed.transmitted || original.refunded_minor > 0 {
            return (
                false,
                error(
                    command,
                    request_id,
                    "313",
                    "The transaction for canceling has already been transmitted.",
                ),
            );
        }
        (original.seed.amount_minor, true)
    };
    let new_id = state.new_id();
    if let Some(o) = state.cg_originals.get_mut(&id) {
        o.refunded_minor += total;
        o.cancelled |= cancel;
    }
    state.journal.push(Execution {
        provider: "creditguard".into(),
        action: if cancel {
            "cancel".into()
        } else {
            "refund".into()
        },
        original_id: id.clone(),
        amount_minor: total,
        new_id: new_id.clone(),
    });
    let block = DealResponse {
        status: Some("000".into()),
        status_text: Some("Permitted transaction".into()),
        terminal_number: Some(deal.terminal_number.clone()),
        card_id: original.seed.card_id.clone(),
        card_mask: Some("411111******1111".into()),
        transaction_type: Some(if cancel {
            Coded {
                code: Some(wire::TRANSACTION_TYPE_CANCEL.into()),
                text: Some("Cancel".into()),
            }
        } else {
            Coded {
                code: Some("53".into()),
                text: Some("Refund".into()),
            }
        }),
        credit_type: Some(Coded {
            code: Some("1".into()),
            text: Some(original.seed.credit_type.clone()),
        }),
        currency: Some(Coded {
            code: Some("1".into()),
            text: Some("ILS".into()),
        }),
        total: Some(total.to_string()),
        number_of_payments: Some(
            deal.number_of_payments
                .clone()
                .unwrap_or_else(|| "0".into()),
        ),
        auth_number: original.seed.auth_number.clone(),
        cg_uid: Some(original.seed.cg_uid.clone()),
        user: original.seed.user.clone(),
    };
    (
        true,
        answer(
            command,
            request_id,
            Some(new_id),
            "000",
            "Permitted transaction",
            Some(block),
        ),
    )
}

fn answer(
    command: &str,
    request_id: Option<&str>,
    tran_id: Option<String>,
    result: &str,
    message: &str,
    block: Option<DealResponse>,
) -> String {
    let (refund_deal, cancel_deal) = if command == "cancelDeal" {
        (None, block)
    } else {
        (block, None)
    };
    let doc = ResponseDoc {
        response: Response {
            command: Some(command.to_string()),
            date_time: Some("2026-11-23 10:00".into()),
            request_id: Some(request_id.unwrap_or_default().to_string()),
            tran_id,
            result: Some(result.to_string()),
            message: Some(message.to_string()),
            user_message: Some(message.to_string()),
            additional_info: Some(String::new()),
            version: Some("2000".into()),
            language: Some("Eng".into()),
            refund_deal,
            cancel_deal,
        },
    };
    format!(
        "<?xml version='1.0'?>{}",
        quick_xml::se::to_string(&doc).unwrap_or_default()
    )
}

fn error(command: &str, request_id: Option<&str>, result: &str, message: &str) -> String {
    let block = DealResponse {
        status: Some(result.to_string()),
        status_text: Some(message.to_string()),
        ..Default::default()
    };
    answer(command, request_id, None, result, message, Some(block))
}

/// Original charges by `tran_id`.
pub(super) fn index(seed: &[CgOriginal]) -> HashMap<String, CgState> {
    seed.iter()
        .map(|o| {
            (
                o.tran_id.clone(),
                CgState {
                    seed: o.clone(),
                    refunded_minor: 0,
                    cancelled: false,
                },
            )
        })
        .collect()
}

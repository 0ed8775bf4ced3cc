//! Hyp Pay's payout (`action=soft` with `zPass`) as the sandbox serves it,
//! from the API page's "Perform a payout": success
//! `Id=…&CCode=0&Amount=…&ACode=…`; `401` no `ClientName`; `402` no `Info`;
//! `901` wrong `zPass`; `902` wrong `PassP` (checked before, for every
//! action); `997` a token it does not know (or a wrong expiry for it).
//! Faults are matched on the card token (`original_id` in a fault).

use super::hyp_pay::Answer;
use super::{Execution, FaultKind, SandboxState};
use axum::http::StatusCode;
use refund_worker::contract::money;
use std::time::Duration;

/// Answers one payout request.
pub(super) fn decide(state: &mut SandboxState, get: &dyn Fn(&str) -> Option<String>) -> Answer {
    let fail = |code: u32| {
        Answer::Text(format!(
            "Id=0&CCode={code}&Amount=&ACode=&Fild1=&Fild2=&Fild3="
        ))
    };
    if get("zPass").as_deref() != Some(state.config.hyp_z_pass.as_str()) {
        return fail(901);
    }
    let token = get("CC").unwrap_or_default();
    let fault = state.take_fault(&token);
    match fault.as_ref().map(|f| &f.fault) {
        Some(FaultKind::Unavailable) => return Answer::Html(StatusCode::SERVICE_UNAVAILABLE),
        Some(FaultKind::HtmlBefore) => return Answer::Html(StatusCode::OK),
        Some(FaultKind::AnswerCode(code)) => return fail(*code),
        _ => {}
    }
    if get("ClientName").filter(|n| !n.is_empty()).is_none() {
        return fail(401);
    }
    if get("Info").filter(|i| !i.is_empty()).is_none() {
        return fail(402);
    }
    let known = state.config.seed.hyp_pay_cards.iter().any(|c| {
        c.token == token
            && Some(&c.expiry_month) == get("Tmonth").as_ref()
            && Some(&c.expiry_year) == get("Tyear").as_ref()
    });
    let Some(amount) = get("Amount").and_then(|a| money::parse_decimal(&a, 2)) else {
        return fail(400);
    };
    if !known || get("Token").as_deref() != Some("True") || amount == 0 {
        return fail(997);
    }
    let text = execute(state, &token, amount, get("Amount").unwrap_or_default());
    match fault {
        Some(f) if f.fault == FaultKind::HtmlAfter => Answer::Html(StatusCode::OK),
        Some(f) if f.fault == FaultKind::StallAfter => {
            Answer::StallThen(Duration::from_millis(f.stall_ms), text)
        }
        _ => Answer::Text(text),
    }
}

/// Pays out and journals it (the token by its last four digits only).
fn execute(state: &mut SandboxState, token: &str, amount: u64, amount_text: String) -> String {
    let new_id = state.new_id();
    let chars: Vec<char> = token.chars().collect();
    let last4: String = chars[chars.len().saturating_sub(4)..].iter().collect();
    state.journal.push(Execution {
        provider: "hyp_pay".into(),
        action: "soft".into(),
        original_id: format!("card-{last4}"),
        amount_minor: amount,
        new_id: new_id.clone(),
    });
    let acode = format!("{:07}", state.next_id % 10_000_000);
    format!("Id={new_id}&CCode=0&Amount={amount_text}&ACode={acode}&Fild1=&Fild2=&Fild3=&Hesh=47")
}

//! A payout (`action=soft` with the credit password `zPass`), pure: the
//! form of the request and the classification of its answer, from the API
//! page's "Perform a payout" (`provider-docs/hyp-pay-api-actions.md`).
//!
//! The answer's codes differ from a refund's in one place: 997 is "Invalid
//! token" (the card cannot take the credit: a final decline), where for a
//! refund it is a terminal configuration error. 901 is a wrong `zPass`: the
//! account is misconfigured, and nothing was paid.

use super::response::read_answer;
use crate::contract::command::{Operation, RefundCommand};
use crate::contract::money;
use crate::providers::hyp_pay::HypPayAccount;
use crate::providers::ProviderOutcome;

/// The action of a payout.
pub const ACTION_PAYOUT: &str = "soft";

/// A payout request ready to be sent as a form, in ILS (the payout request
/// has no currency). The passwords and the card token stay in their
/// wrappers until [`PayoutRequest::fields`].
#[derive(Debug, Clone)]
pub struct PayoutRequest<'a> {
    /// The account.
    pub account: &'a HypPayAccount,
    /// The command.
    pub command: &'a RefundCommand,
    /// Decimal amount in major units.
    pub amount: String,
}

impl PayoutRequest<'_> {
    /// The form fields in the documented order.
    pub fn fields(&self) -> Vec<(&'static str, &str)> {
        // `payout_request_for` made sure the payout part is there.
        let Some(target) = self.command.payout.as_ref() else {
            return Vec::new();
        };
        vec![
            ("action", ACTION_PAYOUT),
            ("Masof", self.account.masof.as_str()),
            ("PassP", self.account.pass_p.expose()),
            ("zPass", self.account.z_pass.expose()),
            ("Amount", self.amount.as_str()),
            ("CC", target.card_token.expose()),
            ("Tmonth", target.expiry_month.as_str()),
            ("Tyear", target.expiry_year.as_str()),
            ("Token", "True"),
            ("UserId", target.holder_id.as_deref().unwrap_or("000000000")),
            ("ClientName", target.holder_name.as_str()),
            (
                "Info",
                target
                    .info
                    .as_deref()
                    .unwrap_or(self.command.refund_id.as_str()),
            ),
        ]
    }
}

/// Translates a payout command into a request, or says which field is
/// wrong.
pub fn payout_request_for<'a>(
    command: &'a RefundCommand,
    account: &'a HypPayAccount,
) -> Result<PayoutRequest<'a>, String> {
    let target = command
        .payout
        .as_ref()
        .ok_or("payout (the card to credit) is required")?;
    if target.card_token.is_masked() {
        return Err("payout.card_token is masked; the whole token is needed to pay".into());
    }
    let amount = command
        .amount
        .as_ref()
        .ok_or("amount is required for a payout")?;
    // The payout page has no currency field: a payout is in the terminal's
    // shekels. Sending another currency's amount (or an undocumented
    // `Coin`) could pay 100 USD as 100 ILS and see it confirmed.
    if amount.currency != "ILS" {
        return Err(format!(
            "amount.currency {}: Hyp Pay payouts are in ILS (the payout request has no currency)",
            amount.currency
        ));
    }
    Ok(PayoutRequest {
        account,
        command,
        amount: money::format_decimal(amount.minor, 2),
    })
}

/// What a payout code means, from the payout section of the API page.
pub fn describe_payout(code: u32) -> &'static str {
    match code {
        0 => "Success. The funds were sent to the card",
        401 => "First or last name is required but not provided",
        402 => "Transaction information is required but not provided",
        901 => "Wrong zPass",
        902 => "Authentication failure: wrong PassP",
        997 => "Invalid token",
        _ => super::describe(code),
    }
}

/// Turns a payout answer into an outcome. `sent` is the amount the
/// request carried (major units), which a success must confirm.
pub fn classify_payout(body: &str, sent: &str) -> ProviderOutcome {
    let answer = match read_answer(body) {
        Ok(answer) => answer,
        Err(unknown) => return unknown,
    };
    let (code, raw_code) = (answer.code, answer.raw_code.clone());
    let message = describe_payout(code).to_string();
    match code {
        0 => confirmed(
            answer.get("Id"),
            answer.get("Amount"),
            sent,
            raw_code,
            message,
        ),
        9 | 599 | 999 => ProviderOutcome::Unknown {
            reason: format!("Hyp Pay CCode={raw_code}: {message}"),
        },
        901 | 902 | 903 | 996 => ProviderOutcome::Misconfigured {
            code: raw_code,
            message,
        },
        _ => ProviderOutcome::Declined {
            code: raw_code,
            message,
        },
    }
}

/// `CCode=0` settles a payout as paid only with a transaction id and the
/// amount that was sent: anything else is a surprise whose outcome is not
/// known.
fn confirmed(
    id: Option<String>,
    amount: Option<String>,
    sent: &str,
    raw_code: String,
    message: String,
) -> ProviderOutcome {
    let Some(id) = id.filter(|id| !id.is_empty() && id != "0") else {
        return ProviderOutcome::Unknown {
            reason: "Hyp Pay CCode=0 for a payout without a transaction Id".into(),
        };
    };
    let same = |a: &str| money::parse_decimal(a, 2) == money::parse_decimal(sent, 2);
    if let Some(amount) = amount.filter(|a| !same(a)) {
        return ProviderOutcome::Unknown {
            reason: format!("Hyp Pay confirmed a payout of {amount}, not the {sent} sent"),
        };
    }
    ProviderOutcome::Confirmed {
        provider_txn: Some(id),
        performed: Operation::Payout,
        code: raw_code,
        message: Some(message),
    }
}

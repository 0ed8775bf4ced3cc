//! Our command → the provider's request.

use crate::contract::command::{Operation, RefundCommand};
use crate::contract::money;
use crate::providers::hyp_pay::HypPayAccount;

/// Refund action.
pub const ACTION_REFUND: &str = "zikoyAPI";
/// Cancel action.
pub const ACTION_CANCEL: &str = "CancelTrans";

/// A request ready to be sent as a form. `pass_p` stays a secret until
/// [`HypRequest::fields`] builds the body.
#[derive(Debug, Clone)]
pub struct HypRequest<'a> {
    /// `zikoyAPI` or `CancelTrans`.
    pub action: &'static str,
    /// The account.
    pub account: &'a HypPayAccount,
    /// Original transaction id.
    pub trans_id: String,
    /// Decimal amount in major units (refunds only).
    pub amount: Option<String>,
}

impl HypRequest<'_> {
    /// The form fields, in the documented order, with UTF-8 in and out.
    pub fn fields(&self) -> Vec<(&'static str, &str)> {
        let mut fields = vec![
            ("action", self.action),
            ("Masof", self.account.masof.as_str()),
            ("PassP", self.account.pass_p.expose()),
            ("TransId", self.trans_id.as_str()),
        ];
        if let Some(amount) = &self.amount {
            fields.push(("Amount", amount.as_str()));
        }
        fields.push(("UTF8", "True"));
        fields.push(("UTF8out", "True"));
        fields
    }
}

/// Translates a command into a request, or says which field is wrong.
pub fn request_for<'a>(
    command: &RefundCommand,
    account: &'a HypPayAccount,
) -> Result<HypRequest<'a>, String> {
    let trans_id = command
        .transaction_str("id")
        .ok_or("transaction.id (the Hyp Pay TransId of the original charge) is required")?;
    if !trans_id.bytes().all(|b| b.is_ascii_alphanumeric()) || trans_id.len() > 32 {
        return Err(format!(
            "transaction.id {trans_id:?} is not a Hyp Pay transaction id"
        ));
    }
    if let Some(extra) = command.transaction.keys().find(|k| k.as_str() != "id") {
        return Err(format!(
            "transaction.{extra} is not used by hyp_pay (only transaction.id)"
        ));
    }
    if command.installments.is_some() {
        return Err("installments are not supported by hyp_pay".into());
    }
    let (action, amount) = match command.operation {
        Operation::Refund => {
            let amount = command
                .amount
                .as_ref()
                .ok_or("amount is required for a hyp_pay refund")?;
            let digits = money::minor_digits(&amount.currency);
            if digits > 2 {
                return Err(format!(
                    "amount.currency {} has {digits} decimals; Hyp Pay amounts take at most 2",
                    amount.currency
                ));
            }
            (
                ACTION_REFUND,
                Some(money::format_decimal(amount.minor, digits)),
            )
        }
        Operation::Cancel => (ACTION_CANCEL, None),
        Operation::Payout => return Err("a payout is built by payout_request_for".into()),
    };
    Ok(HypRequest {
        action,
        account,
        trans_id: trans_id.to_string(),
        amount,
    })
}

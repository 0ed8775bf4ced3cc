//! Our command → the provider's request.

use crate::contract::command::{Operation, RefundCommand};
use crate::contract::money;
use serde::{Deserialize, Serialize};

/// The request body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReversedRequest {
    /// The original transaction.
    pub xact_id: String,
    /// Minor units as a string; absent for a full refund. Never "0": that
    /// would refund everything.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub amount: Option<String>,
    /// Where Paynet posts the final answer.
    #[serde(
        rename = "succeedUrl",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub succeed_url: Option<String>,
}

/// Translates a command, or says which field is wrong.
pub fn request_for(command: &RefundCommand, succeed_url: &str) -> Result<ReversedRequest, String> {
    if let Some(extra) = command.transaction.keys().find(|k| k.as_str() != "xact_id") {
        return Err(format!(
            "transaction.{extra} is not used by paynet (only transaction.xact_id)"
        ));
    }
    let xact_id = command
        .transaction_str("xact_id")
        .ok_or("transaction.xact_id (the Paynet transaction number) is required")?;
    if command.installments.is_some() {
        return Err("installments are not supported by paynet".into());
    }
    let amount = match (command.operation, &command.amount) {
        (Operation::Payout, _) => {
            return Err("operation: paynet has no payout (only hyp_pay accounts do)".into())
        }
        (Operation::Cancel, _) | (Operation::Refund, None) => None,
        (Operation::Refund, Some(amount)) => {
            if money::minor_digits(&amount.currency) != 2 {
                return Err(format!(
                    "amount.currency {}: Paynet amounts are in hundredths",
                    amount.currency
                ));
            }
            // minor > 0 is guaranteed by command validation: a partial refund
            // can never be sent as "0" (which would refund everything).
            Some(amount.minor.to_string())
        }
    };
    Ok(ReversedRequest {
        xact_id: xact_id.to_string(),
        amount,
        succeed_url: Some(succeed_url.to_string()),
    })
}

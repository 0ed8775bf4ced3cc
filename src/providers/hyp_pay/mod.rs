//! Hyp Pay integration: `zikoyAPI` (refund), `CancelTrans` (cancel) and
//! `soft` with the credit password (payout) sent as POST forms to the account's action URL. POST, not GET: a password in a
//! query string ends up in proxy and access logs. The pure translation lives
//! in [`wire`].

pub mod wire;

use super::{check_url, AccountError};
use super::{post_form, Endpoint, ProviderOutcome};
use crate::contract::command::{Operation, RefundCommand};
use crate::values::secret::Secret;
use serde::Deserialize;

/// A Hyp Pay terminal.
#[derive(Debug, Clone)]
pub struct HypPay {
    account: HypPayAccount,
    endpoint: Endpoint,
    http: reqwest::Client,
}

impl HypPay {
    /// Builds the integration.
    pub fn new(account: HypPayAccount, http: reqwest::Client) -> Self {
        let endpoint = Endpoint::new(account.base_url.clone());
        HypPay {
            account,
            endpoint,
            http,
        }
    }

    /// Checks what Hyp Pay needs: `transaction.id`, an amount for refunds,
    /// no installments.
    pub fn check(&self, command: &RefundCommand) -> Result<(), String> {
        match command.operation {
            Operation::Payout => wire::payout_request_for(command, &self.account).map(|_| ()),
            _ => wire::request_for(command, &self.account).map(|_| ()),
        }
    }

    /// The account's payout rules for a payout command, checked before it
    /// is claimed: the kind and message of a rejection, or the daily limit
    /// its claim reserves against (`None`: no daily limit).
    pub fn payout_rule(&self, command: &RefundCommand) -> Result<Option<u64>, PayoutRefused> {
        let payouts = &self.account.payouts;
        if !payouts.enabled {
            return Err(PayoutRefused {
                kind: "payouts_disabled",
                message: "payouts are not enabled on this account \
                          (providers.<name>.payouts.enabled)"
                    .into(),
            });
        }
        let amount = command.amount.as_ref().map_or(0, |a| a.minor);
        if let Some(max) = payouts.max_amount_minor.filter(|max| amount > *max) {
            return Err(PayoutRefused {
                kind: "payout_max_amount_exceeded",
                message: format!(
                    "a payout of {amount} exceeds payouts.max_amount_minor {max} of this account"
                ),
            });
        }
        Ok(payouts.daily_limit_minor)
    }

    /// Sends the command once.
    pub async fn execute(
        &self,
        command: &RefundCommand,
        traceparent: Option<&str>,
    ) -> ProviderOutcome {
        if command.operation == Operation::Payout {
            return self.pay_out(command, traceparent).await;
        }
        let form = match wire::request_for(command, &self.account) {
            Ok(form) => form,
            // check() ran before; this is unreachable in practice but must not panic.
            Err(message) => {
                return ProviderOutcome::NotSent {
                    reason: message,
                    retry_after: None,
                }
            }
        };
        let request = self.endpoint.post(&self.http).form(&form.fields());
        let request = super::with_trace(request, traceparent, &self.account.policy);
        post_form(request, |body| wire::classify(command.operation, body)).await
    }

    async fn pay_out(&self, command: &RefundCommand, traceparent: Option<&str>) -> ProviderOutcome {
        let form = match wire::payout_request_for(command, &self.account) {
            Ok(form) => form,
            Err(message) => {
                return ProviderOutcome::NotSent {
                    reason: message,
                    retry_after: None,
                }
            }
        };
        let request = self.endpoint.post(&self.http).form(&form.fields());
        let request = super::with_trace(request, traceparent, &self.account.policy);
        post_form(request, |body| wire::classify_payout(body, &form.amount)).await
    }

    /// The terminal (`Masof`).
    pub fn terminal(&self) -> &str {
        &self.account.masof
    }

    /// The operation's action name, for logs.
    pub fn action(operation: Operation) -> &'static str {
        match operation {
            Operation::Refund => wire::ACTION_REFUND,
            Operation::Cancel => wire::ACTION_CANCEL,
            Operation::Payout => wire::ACTION_PAYOUT,
        }
    }
}

/// Hyp Pay credentials and endpoint.
#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
pub struct HypPayAccount {
    /// Full action URL, default `https://pay.hyp.co.il/p/`.
    #[serde(default = "default_hyp_pay_url")]
    pub base_url: String,
    /// Terminal number (10 digits).
    pub masof: String,
    /// API password.
    pub pass_p: Secret,
    /// Credit password (`zPass`), needed for payouts only.
    #[serde(default)]
    pub z_pass: Secret,
    /// Payouts from this terminal.
    #[serde(default)]
    pub payouts: PayoutSettings,
    /// Limits, circuit breaker and trace propagation of this account.
    #[serde(flatten)]
    pub policy: super::gate::AccountPolicy,
}

/// Whether an account pays out, and its limits. A payout has no original
/// charge to bound it, so its bounds are the account's. Read leniently
/// (`crate::values::lenient`): from the environment they arrive as text.
#[derive(Debug, Clone, Default, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PayoutSettings {
    /// Off by default: a payout to an account without it is rejected
    /// (`payouts_disabled`).
    #[serde(default, deserialize_with = "crate::values::lenient::bool")]
    pub enabled: bool,
    /// The largest single payout, in minor units (unset: no such limit).
    #[serde(default, deserialize_with = "crate::values::lenient::optional_u64")]
    pub max_amount_minor: Option<u64>,
    /// The most paid out per UTC day and currency, in minor units,
    /// counting payouts in flight and in doubt (unset: no such limit).
    #[serde(default, deserialize_with = "crate::values::lenient::optional_u64")]
    pub daily_limit_minor: Option<u64>,
}

/// A payout the account's rules refuse before any call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PayoutRefused {
    /// The event's error kind, naming the rule.
    pub kind: &'static str,
    /// What is wrong.
    pub message: String,
}

fn default_hyp_pay_url() -> String {
    "https://pay.hyp.co.il/p/".to_string()
}

impl HypPayAccount {
    /// Checks the account's settings.
    pub(crate) fn validate(&self) -> Result<(), AccountError> {
        self.policy
            .check()
            .map_err(|(field, problem)| AccountError::new(field, problem))?;
        check_url("base_url", &self.base_url)?;
        if self.masof.len() != 10 || !self.masof.bytes().all(|b| b.is_ascii_digit()) {
            return Err(AccountError::new(
                "masof",
                "must be the 10-digit terminal number",
            ));
        }
        if self.pass_p.is_empty() {
            return Err(AccountError::new(
                "pass_p",
                "missing (set it in the environment or an uncommitted config file)",
            ));
        }
        if self.payouts.enabled && self.z_pass.is_empty() {
            return Err(AccountError::new(
                "z_pass",
                "missing: payouts.enabled needs the credit password (zPass)",
            ));
        }
        if self.payouts.max_amount_minor == Some(0) || self.payouts.daily_limit_minor == Some(0) {
            return Err(AccountError::new(
                "payouts",
                "a limit of 0 allows no payout: turn payouts.enabled off instead",
            ));
        }
        Ok(())
    }
}

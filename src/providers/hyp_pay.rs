//! Hyp Pay integration: `zikoyAPI` (refund) and `CancelTrans` (cancel) sent
//! as POST forms to the account's action URL. POST, not GET: a password in a
//! query string ends up in proxy and access logs. The pure translation lives
//! in [`wire`].

pub mod wire;

use super::{check_url, AccountError};
use super::{post_form, Endpoint, ProviderOutcome};
use crate::command::{Operation, RefundCommand};
use crate::secret::Secret;
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
        wire::request_for(command, &self.account).map(|_| ())
    }

    /// Sends the command once.
    pub async fn execute(
        &self,
        command: &RefundCommand,
        traceparent: Option<&str>,
    ) -> ProviderOutcome {
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

    /// The terminal (`Masof`).
    pub fn terminal(&self) -> &str {
        &self.account.masof
    }

    /// The operation's action name, for logs.
    pub fn action(operation: Operation) -> &'static str {
        match operation {
            Operation::Refund => wire::ACTION_REFUND,
            Operation::Cancel => wire::ACTION_CANCEL,
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
    /// Limits, circuit breaker and trace propagation of this account.
    #[serde(flatten)]
    pub policy: super::gate::AccountPolicy,
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
        Ok(())
    }
}

//! Paynet integration: `POST {api_root}/v1/transaction/reversed_request`
//! with `Authorization: Basic <secret_key>` (the raw key, as the notes say).
//! An accepted request is only `pending`: the final answer arrives at the
//! worker's callback URL, which carries the refund id and an unguessable
//! per-refund token (`/callbacks/paynet/{refund_id}/{token}`).

pub mod wire;

use super::{check_url, AccountError};
use super::{classify_send_error, Endpoint, ProviderOutcome};
use crate::contract::command::RefundCommand;
use crate::values::secret::Secret;
use serde::Deserialize;

/// A Paynet account.
#[derive(Debug, Clone)]
pub struct Paynet {
    account: PaynetAccount,
    /// `{base_url}/v1/transaction/reversed_request`.
    endpoint: Endpoint,
    http: reqwest::Client,
}

/// The callback URL of a refund.
pub fn callback_url(public_url: &str, refund_id: &str, token: &str) -> String {
    format!(
        "{}/callbacks/paynet/{refund_id}/{token}",
        public_url.trim_end_matches('/')
    )
}

impl Paynet {
    /// Builds the integration.
    pub fn new(account: PaynetAccount, http: reqwest::Client) -> Self {
        let endpoint = Endpoint::new(format!(
            "{}/v1/transaction/reversed_request",
            account.base_url.trim_end_matches('/')
        ));
        Paynet {
            account,
            endpoint,
            http,
        }
    }

    /// Checks the command before any call.
    pub fn check(&self, command: &RefundCommand) -> Result<(), String> {
        wire::request_for(command, "").map(|_| ())
    }

    /// Sends the command once; `succeed_url` is where the answer will come.
    pub async fn execute(
        &self,
        command: &RefundCommand,
        succeed_url: &str,
        traceparent: Option<&str>,
    ) -> ProviderOutcome {
        let body = match wire::request_for(command, succeed_url) {
            Ok(body) => body,
            Err(reason) => {
                return ProviderOutcome::NotSent {
                    reason,
                    retry_after: None,
                }
            }
        };
        let request = self
            .endpoint
            .post(&self.http)
            .header(
                reqwest::header::AUTHORIZATION,
                format!("Basic {}", self.account.secret_key.expose()),
            )
            .json(&body);
        let response = match super::with_trace(request, traceparent, &self.account.policy)
            .send()
            .await
        {
            Ok(r) => r,
            Err(e) => return classify_send_error(e),
        };
        let status = response.status().as_u16();
        match response.text().await {
            Ok(text) => wire::classify(status, &text),
            Err(e) => ProviderOutcome::Unknown {
                reason: format!("answer could not be read: {}", e.without_url()),
            },
        }
    }
}

/// Paynet credentials and endpoint.
#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
pub struct PaynetAccount {
    /// The API root, `https://api.paynet.com.tr`.
    #[serde(default = "default_paynet_url")]
    pub base_url: String,
    /// The secret key (sent as `Authorization: Basic <secret_key>`).
    pub secret_key: Secret,
    /// A refund still `pending` after this long is reported (a warning
    /// naming it, and the `refund_worker_pending_overdue` gauge).
    #[serde(
        default = "default_pending_alert",
        deserialize_with = "crate::values::lenient::u64"
    )]
    pub pending_alert_after_secs: u64,
    /// Limits, circuit breaker and trace propagation of this account.
    #[serde(flatten)]
    pub policy: super::gate::AccountPolicy,
}

fn default_pending_alert() -> u64 {
    86_400
}

fn default_paynet_url() -> String {
    "https://api.paynet.com.tr".to_string()
}

impl PaynetAccount {
    /// Checks the account's settings.
    pub(crate) fn validate(&self) -> Result<(), AccountError> {
        self.policy
            .check()
            .map_err(|(field, problem)| AccountError::new(field, problem))?;
        check_url("base_url", &self.base_url)?;
        if self.secret_key.is_empty() {
            return Err(AccountError::new(
                "secret_key",
                "missing (set it in the environment or an uncommitted config file)",
            ));
        }
        Ok(())
    }
}

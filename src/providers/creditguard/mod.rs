//! CreditGuard integration: `refundDeal` / `cancelDeal` posted to the
//! account's Relay URL as a form (`user`, `password`, `int_in`). With
//! `dedupe_requests` (the terminal has mayBeDuplicate enabled) every request
//! carries a stable `requestId`, so repeating a request whose answer was lost
//! returns the first answer instead of refunding again.

pub mod wire;

use super::{check_url, AccountError};
use super::{post_form, Endpoint, ProviderOutcome};
use crate::contract::command::RefundCommand;
use crate::values::secret::Secret;
use serde::Deserialize;

/// A CreditGuard terminal.
#[derive(Debug, Clone)]
pub struct CreditGuard {
    account: CreditGuardAccount,
    endpoint: Endpoint,
    http: reqwest::Client,
}

impl CreditGuard {
    /// Builds the integration.
    pub fn new(account: CreditGuardAccount, http: reqwest::Client) -> Self {
        let endpoint = Endpoint::new(account.base_url.clone());
        CreditGuard {
            account,
            endpoint,
            http,
        }
    }

    /// Whether a new request is sent for deduplication by the gateway
    /// (`mayBeDuplicate` with a `requestId`).
    pub fn dedupes(&self) -> bool {
        self.account.dedupe_requests
    }

    /// The terminal requests go to (the gateway deduplicates per terminal).
    pub fn terminal(&self) -> &str {
        &self.account.terminal_number
    }

    /// Checks lookups, installments and amounts before any call.
    pub fn check(&self, command: &RefundCommand) -> Result<(), String> {
        wire::request_for(command, &self.account.terminal_number, self.dedupes()).map(|_| ())
    }

    /// Sends the command once; `dedupe` as the attempt's record says (a
    /// repeat carries what the first request carried, whatever
    /// `dedupe_requests` says today).
    pub async fn execute(
        &self,
        command: &RefundCommand,
        dedupe: bool,
        traceparent: Option<&str>,
    ) -> ProviderOutcome {
        let xml = match wire::request_for(command, &self.account.terminal_number, dedupe)
            .and_then(|doc| wire::to_xml(&doc))
        {
            Ok(xml) => xml,
            Err(reason) => {
                return ProviderOutcome::NotSent {
                    reason,
                    retry_after: None,
                }
            }
        };
        let form = [
            ("user", self.account.user.as_str()),
            ("password", self.account.password.expose()),
            ("int_in", xml.as_str()),
        ];
        let request = self.endpoint.post(&self.http).form(&form);
        let request = super::with_trace(request, traceparent, &self.account.policy);
        post_form(request, |body| wire::classify(command.operation, body)).await
    }
}

/// CreditGuard credentials and endpoint.
#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
pub struct CreditGuardAccount {
    /// The full Relay URL, `https://<host>/xpo/Relay`.
    pub base_url: String,
    /// API user.
    pub user: String,
    /// API password.
    pub password: Secret,
    /// The merchant's terminal number.
    pub terminal_number: String,
    /// The terminal deduplicates requests (mayBeDuplicate + requestId,
    /// enabled by CreditGuard on request). Then a request whose answer was
    /// lost is repeated safely instead of ending in doubt.
    #[serde(default, deserialize_with = "crate::values::lenient::bool")]
    pub dedupe_requests: bool,
    /// Limits, circuit breaker and trace propagation of this account.
    #[serde(flatten)]
    pub policy: super::gate::AccountPolicy,
}

impl CreditGuardAccount {
    /// Checks the account's settings.
    pub(crate) fn validate(&self) -> Result<(), AccountError> {
        self.policy
            .check()
            .map_err(|(field, problem)| AccountError::new(field, problem))?;
        check_url("base_url", &self.base_url)?;
        if self.user.trim().is_empty() {
            return Err(AccountError::new("user", "missing"));
        }
        if self.password.is_empty() {
            return Err(AccountError::new(
                "password",
                "missing (set it in the environment or an uncommitted config file)",
            ));
        }
        if self.terminal_number.trim().is_empty()
            || !self
                .terminal_number
                .bytes()
                .all(|b| b.is_ascii_alphanumeric())
        {
            return Err(AccountError::new(
                "terminal_number",
                "must be the terminal number",
            ));
        }
        Ok(())
    }
}

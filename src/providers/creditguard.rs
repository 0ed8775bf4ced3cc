//! CreditGuard integration: `refundDeal` / `cancelDeal` posted to the
//! account's Relay URL as a form (`user`, `password`, `int_in`). With
//! `dedupe_requests` (the terminal has mayBeDuplicate enabled) every request
//! carries a stable `requestId`, so repeating a request whose answer was lost
//! returns the first answer instead of refunding again.

pub mod wire;

use super::{post_form, ProviderOutcome};
use crate::command::RefundCommand;
use crate::config::CreditGuardAccount;

/// A CreditGuard terminal.
#[derive(Debug, Clone)]
pub struct CreditGuard {
    account: CreditGuardAccount,
    http: reqwest::Client,
}

impl CreditGuard {
    /// Builds the integration.
    pub fn new(account: CreditGuardAccount, http: reqwest::Client) -> Self {
        CreditGuard { account, http }
    }

    /// Whether a repeated request is deduplicated by the gateway.
    pub fn dedupes(&self) -> bool {
        self.account.dedupe_requests
    }

    /// Checks lookups, installments and amounts before any call.
    pub fn check(&self, command: &RefundCommand) -> Result<(), String> {
        wire::request_for(command, &self.account.terminal_number, self.dedupes()).map(|_| ())
    }

    /// Sends the command once.
    pub async fn execute(&self, command: &RefundCommand) -> ProviderOutcome {
        let xml = match wire::request_for(command, &self.account.terminal_number, self.dedupes())
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
        let request = self.http.post(&self.account.base_url).form(&form);
        post_form(request, |body| wire::classify(command.operation, body)).await
    }
}

//! Provider integrations. Each provider is an integration module (URLs,
//! headers, HTTP) plus a pure `wire` module that translates between our types
//! and the provider's format. Every answer ends up as one [`ProviderOutcome`]
//! here, and the pipeline decides retries and `in_doubt` from that class and
//! [`Provider::repeats_are_safe`] alone, never from provider codes.

pub mod creditguard;
pub mod gate;
pub mod hyp_pay;
pub mod paynet;

use crate::contract::command::{Operation, RefundCommand};
use crate::store::{AttemptTrace, RefundRecord};
use std::collections::BTreeMap;
use std::time::Duration;

/// What a provider call amounted to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProviderOutcome {
    /// The provider executed it.
    Confirmed {
        /// Id of the new refund/cancel transaction.
        provider_txn: Option<String>,
        /// What was performed.
        performed: Operation,
        /// Provider status code.
        code: String,
        /// Provider message.
        message: Option<String>,
    },
    /// The provider accepted the request and will decide later (Paynet);
    /// the final answer arrives at the callback URL.
    Accepted {
        /// Provider status code.
        code: String,
        /// Provider message.
        message: String,
    },
    /// The provider gave a final "no"; nothing was executed.
    Declined {
        /// Provider status code.
        code: String,
        /// Provider message.
        message: String,
    },
    /// Nothing was executed and nothing will be until a person fixes the
    /// account (credentials, permissions, URL). Dead-lettered for a replay
    /// after the fix rather than reported as a customer-facing failure.
    Misconfigured {
        /// Provider status code or HTTP status.
        code: String,
        /// What the provider said.
        message: String,
    },
    /// The request surely did not reach the provider; repeating it is safe.
    NotSent {
        /// Why.
        reason: String,
        /// The provider's `Retry-After`, when it gave one.
        retry_after: Option<Duration>,
    },
    /// The request may have been executed.
    Unknown {
        /// Why we cannot tell.
        reason: String,
    },
}

impl ProviderOutcome {
    /// Short class name for logs and metrics.
    pub fn class(&self) -> &'static str {
        match self {
            ProviderOutcome::Confirmed { .. } => "confirmed",
            ProviderOutcome::Accepted { .. } => "accepted",
            ProviderOutcome::Declined { .. } => "declined",
            ProviderOutcome::Misconfigured { .. } => "misconfigured",
            ProviderOutcome::NotSent { .. } => "not_sent",
            ProviderOutcome::Unknown { .. } => "unknown",
        }
    }
}

/// One configured provider account, ready to execute commands.
/// One provider account, selected by a command's `provider` field
/// (`[providers.<name>]` in the configuration, with its `kind`).
#[derive(Debug, Clone, serde::Deserialize, schemars::JsonSchema)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ProviderAccount {
    /// Hyp Pay terminal.
    HypPay(hyp_pay::HypPayAccount),
    /// CreditGuard terminal.
    Creditguard(creditguard::CreditGuardAccount),
    /// Paynet account.
    Paynet(paynet::PaynetAccount),
}

impl ProviderAccount {
    /// The `kind` string of the account.
    pub fn kind(&self) -> &'static str {
        match self {
            ProviderAccount::HypPay(_) => "hyp_pay",
            ProviderAccount::Creditguard(_) => "creditguard",
            ProviderAccount::Paynet(_) => "paynet",
        }
    }

    /// The account's limits, breaker and tracing settings.
    pub fn policy(&self) -> &gate::AccountPolicy {
        match self {
            ProviderAccount::HypPay(a) => &a.policy,
            ProviderAccount::Creditguard(a) => &a.policy,
            ProviderAccount::Paynet(a) => &a.policy,
        }
    }

    /// Checks the account's settings; the configuration names the key.
    pub fn validate(&self) -> Result<(), AccountError> {
        match self {
            ProviderAccount::HypPay(a) => a.validate(),
            ProviderAccount::Creditguard(a) => a.validate(),
            ProviderAccount::Paynet(a) => a.validate(),
        }
    }
}

/// A provider account setting that cannot work.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccountError {
    /// The field of the account (`base_url`, `pass_p`, ...).
    pub field: &'static str,
    /// What is wrong with it.
    pub problem: String,
}

impl AccountError {
    pub(crate) fn new(field: &'static str, problem: impl Into<String>) -> Self {
        AccountError {
            field,
            problem: problem.into(),
        }
    }
}

/// An http(s) URL.
fn check_url(field: &'static str, url: &str) -> Result<(), AccountError> {
    match reqwest::Url::parse(url) {
        Ok(u) if u.scheme() == "http" || u.scheme() == "https" => Ok(()),
        Ok(_) => Err(AccountError::new(field, "must be an http(s) URL")),
        Err(e) => Err(AccountError::new(field, format!("not a URL: {e}"))),
    }
}

/// A provider's URL, parsed once when its integration is built rather than
/// by the HTTP client on every request (the parse was 2 % of the worker's
/// CPU per refund). A URL that does not parse (configuration validation
/// refuses those) is handed to the client as text, which fails the request
/// as it always did.
#[derive(Debug, Clone)]
pub(crate) struct Endpoint {
    parsed: Option<reqwest::Url>,
    text: String,
}

impl Endpoint {
    pub(crate) fn new(text: String) -> Self {
        Endpoint {
            parsed: reqwest::Url::parse(&text).ok(),
            text,
        }
    }

    /// A POST to this URL.
    pub(crate) fn post(&self, http: &reqwest::Client) -> reqwest::RequestBuilder {
        match &self.parsed {
            Some(url) => http.post(url.clone()),
            None => http.post(self.text.as_str()),
        }
    }
}

/// Timeouts of the provider HTTP client.
#[derive(Debug, Clone, Copy)]
pub struct HttpTimeouts {
    /// Whole request.
    pub request: Duration,
    /// Connecting.
    pub connect: Duration,
}

#[derive(Debug, Clone)]
pub enum Provider {
    /// Hyp Pay.
    HypPay(hyp_pay::HypPay),
    /// CreditGuard.
    CreditGuard(creditguard::CreditGuard),
    /// Paynet; `public_url` is the worker's base URL for callbacks.
    Paynet(paynet::Paynet, String),
}

impl Provider {
    /// Builds the integration for an account.
    pub fn new(account: &ProviderAccount, http: reqwest::Client, public_url: &str) -> Self {
        match account {
            ProviderAccount::HypPay(a) => Provider::HypPay(hyp_pay::HypPay::new(a.clone(), http)),
            ProviderAccount::Creditguard(a) => {
                Provider::CreditGuard(creditguard::CreditGuard::new(a.clone(), http))
            }
            ProviderAccount::Paynet(a) => {
                Provider::Paynet(paynet::Paynet::new(a.clone(), http), public_url.to_string())
            }
        }
    }

    /// Kind-specific checks of a command, before any call. The message names
    /// the offending field.
    pub fn check(&self, command: &RefundCommand) -> Result<(), String> {
        if command.operation == Operation::Payout && !matches!(self, Provider::HypPay(_)) {
            return Err(format!(
                "operation: payout is not supported by {} accounts (only hyp_pay has payouts)",
                self.kind()
            ));
        }
        match self {
            Provider::HypPay(p) => p.check(command),
            Provider::CreditGuard(p) => p.check(command),
            Provider::Paynet(p, _) => p.check(command),
        }
    }

    /// A payout's account rules (enabled, largest payout): its daily limit
    /// when it may be claimed. Only Hyp Pay pays out; [`Provider::check`]
    /// refused a payout to any other kind already.
    pub fn payout_rule(
        &self,
        command: &RefundCommand,
    ) -> Result<Option<u64>, hyp_pay::PayoutRefused> {
        match self {
            Provider::HypPay(p) => p.payout_rule(command),
            _ => Err(hyp_pay::PayoutRefused {
                kind: "invalid_command",
                message: format!("{} accounts have no payouts", self.kind()),
            }),
        }
    }

    /// The account's kind.
    pub fn kind(&self) -> &'static str {
        match self {
            Provider::HypPay(_) => "hyp_pay",
            Provider::CreditGuard(_) => "creditguard",
            Provider::Paynet(..) => "paynet",
        }
    }

    /// What attempt `number` of `refund_id` carries when sent to this
    /// account as it is configured today.
    pub fn trace(&self, refund_id: &str, number: u32) -> AttemptTrace {
        let (request_id, terminal) = match self {
            Provider::HypPay(p) => (None, Some(p.terminal().to_string())),
            Provider::CreditGuard(p) => (
                p.dedupes()
                    .then(|| creditguard::wire::request_id(refund_id)),
                Some(p.terminal().to_string()),
            ),
            Provider::Paynet(..) => (None, None),
        };
        AttemptTrace {
            number,
            kind: self.kind().to_string(),
            request_id,
            terminal,
            at: crate::contract::event::now_rfc3339(),
        }
    }

    /// Whether a request that carried `trace` and may have been executed
    /// can be sent again to this account safely: only when it carried a
    /// deduplication id, and this account is the same kind and terminal
    /// (CreditGuard with `mayBeDuplicate` returns the first answer to a
    /// repeat of the same `requestId`). Hyp Pay and Paynet have no
    /// idempotency key.
    pub fn repeat_is_safe(&self, trace: &AttemptTrace) -> bool {
        match self {
            Provider::HypPay(_) | Provider::Paynet(..) => false,
            Provider::CreditGuard(p) => {
                trace.kind == "creditguard"
                    && trace.request_id.is_some()
                    && trace.terminal.as_deref() == Some(p.terminal())
            }
        }
    }

    /// Sends the record's command once, as its attempt's record says, and
    /// classifies the answer.
    pub async fn execute(
        &self,
        record: &RefundRecord,
        traceparent: Option<&str>,
    ) -> ProviderOutcome {
        let command = &record.command;
        let dedupe = record
            .attempt
            .as_ref()
            .is_some_and(|a| a.request_id.is_some());
        match self {
            Provider::HypPay(p) => p.execute(command, traceparent).await,
            Provider::CreditGuard(p) => p.execute(command, dedupe, traceparent).await,
            Provider::Paynet(p, public_url) => {
                let url =
                    paynet::callback_url(public_url, &record.refund_id, &record.callback_token);
                p.execute(command, &url, traceparent).await
            }
        }
    }

    /// Whether the provider may perform `asked` as another operation: a
    /// CreditGuard `refundDeal` of a transaction not yet transmitted is
    /// performed as a cancel (`transactionType code="52"`). An operator who
    /// resolves such a refund as executed must say which happened.
    pub fn may_perform_otherwise(&self, asked: Operation) -> bool {
        matches!(self, Provider::CreditGuard(_)) && asked == Operation::Refund
    }
}

/// All configured accounts by name.
#[derive(Debug, Clone, Default)]
pub struct Providers {
    by_name: BTreeMap<String, Provider>,
    gates: BTreeMap<String, std::sync::Arc<gate::Gate>>,
}

impl Providers {
    /// Builds every account with one shared HTTP client.
    pub fn new(
        accounts: &BTreeMap<String, ProviderAccount>,
        timeouts: HttpTimeouts,
        public_url: &str,
    ) -> Result<Self, reqwest::Error> {
        let http = reqwest::Client::builder()
            .timeout(timeouts.request)
            .connect_timeout(timeouts.connect)
            .user_agent(concat!("refund-worker/", env!("CARGO_PKG_VERSION")))
            // A refund request is never sent anywhere but its account's
            // `base_url`: a 307/308 would re-send the POST to wherever the
            // answer points, and a 301/302/303 would turn it into a GET
            // whose answer was then classified as the refund's. None of the
            // providers' pages mentions a redirect of their API, so a 3xx
            // means a wrong `base_url`: the refund is parked as
            // misconfigured, naming the status.
            .redirect(reqwest::redirect::Policy::none())
            .build()?;
        let by_name = accounts
            .iter()
            .map(|(name, account)| {
                (
                    name.clone(),
                    Provider::new(account, http.clone(), public_url),
                )
            })
            .collect();
        let gates = accounts
            .iter()
            .map(|(name, account)| {
                (
                    name.clone(),
                    std::sync::Arc::new(gate::Gate::new(name, account.policy())),
                )
            })
            .collect();
        Ok(Providers { by_name, gates })
    }

    /// The account a command names.
    pub fn get(&self, name: &str) -> Option<&Provider> {
        self.by_name.get(name)
    }

    /// The gate (limits, breaker) of an account.
    pub fn gate(&self, name: &str) -> Option<&std::sync::Arc<gate::Gate>> {
        self.gates.get(name)
    }

    /// Every account's gate, for `/readyz` and metrics.
    pub fn gates(&self) -> impl Iterator<Item = (&String, &std::sync::Arc<gate::Gate>)> {
        self.gates.iter()
    }

    /// Account names, for error messages.
    pub fn names(&self) -> Vec<&str> {
        self.by_name.keys().map(String::as_str).collect()
    }

    /// `name` as a metric label: a configured account, or `unknown` (a
    /// command may name anything, and every label is a series kept for
    /// good).
    pub fn label<'n>(&self, name: &'n str) -> &'n str {
        if self.by_name.contains_key(name) {
            name
        } else {
            "unknown"
        }
    }
}

/// Sends a form request to a provider that answers HTTP 200 for everything
/// it processed (Hyp Pay, CreditGuard) and classifies the answer: transport
/// and non-200 statuses the shared way, the 200 body with `classify_body`.
/// Adds `traceparent` to a provider request when the account propagates
/// traces (off by default: providers may refuse headers they do not know).
pub(crate) fn with_trace(
    request: reqwest::RequestBuilder,
    traceparent: Option<&str>,
    policy: &gate::AccountPolicy,
) -> reqwest::RequestBuilder {
    match traceparent {
        Some(value) if policy.propagate_trace => request.header("traceparent", value),
        _ => request,
    }
}

pub(crate) async fn post_form(
    request: reqwest::RequestBuilder,
    classify_body: impl FnOnce(&str) -> ProviderOutcome,
) -> ProviderOutcome {
    let response = match request.send().await {
        Ok(r) => r,
        Err(e) => return classify_send_error(e),
    };
    let status = response.status();
    if status != reqwest::StatusCode::OK {
        return classify_http_status(status, response.headers().get("retry-after"));
    }
    match response.text().await {
        Ok(body) => classify_body(&body),
        Err(e) => ProviderOutcome::Unknown {
            reason: format!("answer could not be read: {}", e.without_url()),
        },
    }
}

/// Classifies a failed `send()`: a connection that was never made is
/// `NotSent`; anything later (timeout, reset mid-way) is `Unknown`.
pub(crate) fn classify_send_error(err: reqwest::Error) -> ProviderOutcome {
    let (connect, builder, timeout) = (err.is_connect(), err.is_builder(), err.is_timeout());
    // reqwest error texts carry the URL, which may hold a token: drop it.
    let text = err.without_url().to_string();
    if connect || builder {
        ProviderOutcome::NotSent {
            reason: format!("could not connect: {text}"),
            retry_after: None,
        }
    } else if timeout {
        ProviderOutcome::Unknown {
            reason: format!("no answer in time: {text}"),
        }
    } else {
        ProviderOutcome::Unknown {
            reason: format!("transport error after sending: {text}"),
        }
    }
}

/// Classifies a non-success HTTP status the same way for every provider:
/// 503/429 were refused before processing; other 5xx may have executed;
/// other 4xx were refused as malformed, which is our configuration's fault.
pub(crate) fn classify_http_status(
    status: reqwest::StatusCode,
    retry_after: Option<&reqwest::header::HeaderValue>,
) -> ProviderOutcome {
    let code = status.as_u16();
    if code == 503 || code == 429 {
        ProviderOutcome::NotSent {
            reason: format!("provider answered HTTP {code}"),
            retry_after: retry_after
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<u64>().ok())
                .map(Duration::from_secs),
        }
    } else if status.is_server_error() {
        ProviderOutcome::Unknown {
            reason: format!("provider answered HTTP {code}"),
        }
    } else {
        ProviderOutcome::Misconfigured {
            code: format!("HTTP {code}"),
            message: format!("provider refused the request with HTTP {code}; check base_url"),
        }
    }
}

//! Paynet's wire format, pure: the `reversed_request` JSON body, the
//! classification of its answers, and the `succeedUrl` callback.
//!
//! From `provider-docs/paynet-refund.md`: `xact_id` required; `amount` a
//! string of minor units ("1000" is 10.00 TL), absent or "0" refunds
//! everything; `code: 0` in the answer; the final answer is POSTed to
//! `succeedUrl` as `{xact_id, code: "0" approved | "1" disapproved, status,
//! message}`. From `provider-notes.md`: `code: 0` means accepted, not paid;
//! error answers are non-200 with `{type, message, code, result_code}`.
//!
//! `request.rs` builds what we send; `response.rs` classifies what comes
//! back; `tests.rs` checks both on the documented examples.

mod request;
mod response;
#[cfg(test)]
mod tests;

pub use request::*;
pub use response::*;

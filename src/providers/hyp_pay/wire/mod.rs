//! Hyp Pay's wire format, pure: building the form of a `zikoyAPI` or
//! `CancelTrans` request and classifying the URL-encoded answer.
//!
//! From the provider's pages (`provider-docs/hyp-pay-*.md`): answers are HTTP
//! 200 for almost everything; success is `CCode=0` and nothing else; an HTML
//! answer is a system error. From `provider-notes.md`: 999/009/599 are
//! communication errors with an unknown outcome; 901/902/903/996/997 are
//! configuration or credential errors.
//!
//! `request.rs` builds what we send; `response.rs` classifies what comes
//! back; `tests.rs` checks both on the documented examples.

mod payout;
mod request;
mod response;
#[cfg(test)]
mod tests;

pub use payout::*;
pub use request::*;
pub use response::*;

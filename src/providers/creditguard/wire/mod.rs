//! CreditGuard's wire format, pure: the `refundDeal` / `cancelDeal` XML of
//! the `int_in` form field, and the classification of the XML answer.
//!
//! From `provider-docs/creditguard-*.md`: lookup elements `tranId`, `cgUid`,
//! `orgUid` (inside `ashraitEmvData`), `user`, `authNumber`, `cardId` with
//! `cardExpiration`; `total` and the installment fields in currency
//! subunits; success is `result` `000` (and the command block's `status`
//! `000`); `transactionType code="52"` means refundDeal fell back to a
//! cancellation. From `provider-notes.md`: `mayBeDuplicate` + `requestId`
//! make a repeated request safe; `user` is a lookup element, never the
//! refund's own reference; `language` `Eng`.
//!
//! `request.rs` builds what we send; `response.rs` classifies what comes
//! back; `tests.rs` checks both on the documented examples.

mod request;
mod response;
#[cfg(test)]
mod tests;

pub use request::*;
pub use response::*;

//! The over-refund guard and the payouts' daily limit: per original charge
//! (or per account, currency and UTC day of payouts), what has been paid and
//! what is in flight. A command that carries `original_amount` reserves its
//! amount here before the provider call; the reservation is refused when the
//! sum of successful, in-flight and in-doubt refunds would exceed the
//! original. A declined refund releases its reservation; an in-doubt one
//! keeps it (it may have been paid).
//!
//! The key is the provider account plus the transaction reference as the
//! command gives it, so two commands that name one charge differently (say
//! CreditGuard `tran_id` and `cg_uid`) are not summed together.
//!
//! A payout has no original charge: its claim reserves in the ledger of its
//! account's payouts in its currency on the UTC day it was first claimed,
//! against `payouts.daily_limit_minor` as configured at that claim (the
//! limit of a day's ledger is today's setting, not the smallest ever seen,
//! so raising it takes effect at once). A payout in doubt keeps its
//! reservation there, as a refund in doubt does.
//!
//! This module is pure: the arithmetic of one charge's ledger. The store
//! sits on top of it and applies it inside the same sled transaction as the
//! refund's record (claim and reservation together, outcome and settlement
//! together), so concurrent refunds of one charge (different `refund_id`s,
//! not serialised by the per-refund lock) cannot both slip under the limit,
//! and a crash can never leave a record and its reservation disagreeing.
//! The arrows point one way: `store` → `ledger`.

use crate::contract::command::{Operation, RefundCommand};
use crate::contract::event::now_rfc3339;
use crate::store::record::RefundRecord;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Where a reserved refund stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reservation {
    /// Sent or about to be.
    InFlight,
    /// Confirmed by the provider.
    Succeeded,
    /// May have been paid.
    InDoubt,
}

/// One original charge's ledger.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct OriginalLedger {
    /// The smallest `original_amount` any command gave for this charge.
    pub original_amount: u64,
    /// Reserved amounts by `refund_id`.
    pub refunds: BTreeMap<String, (u64, Reservation)>,
    /// Last change (RFC 3339), for pruning.
    pub updated_at: String,
}

impl OriginalLedger {
    /// Sum of everything reserved.
    pub fn reserved(&self) -> u64 {
        self.refunds.values().map(|(amount, _)| amount).sum()
    }
}

/// The reservation was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OverRefund {
    /// The original amount.
    pub original_amount: u64,
    /// Already refunded or in flight.
    pub reserved: u64,
    /// Asked for.
    pub requested: u64,
}

/// What a claim reserves against: a ledger and its limit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limit {
    /// The ledger's key.
    pub key: String,
    /// The limit (the original amount, or the day's payout limit).
    pub cap: u64,
}

/// The ledger a record reserves in, if any: its original charge's (a
/// command that carries `original_amount`), or a payout's day.
pub fn record_key(record: &RefundRecord) -> Option<String> {
    let command = &record.command;
    if command.operation == Operation::Payout {
        let currency = command.amount.as_ref().map_or("", |a| a.currency.as_str());
        let day = record.created_at.get(..10).unwrap_or_default();
        // A leading newline: no account name starts with one, so no
        // original charge's key can look like a payout day's.
        return Some(format!(
            "\npayouts\n{}\n{currency}\n{day}",
            command.provider
        ));
    }
    command.original_amount.map(|_| ledger_key(command))
}

/// What the claim of `record` reserves against, if anything. A payout's
/// limit is [`RefundRecord::daily_limit`], set by the claim from today's
/// configuration (no limit counts against `u64::MAX`, so that a limit set
/// later in the day counts what was paid before it).
pub fn claim_limit(record: &RefundRecord) -> Option<Limit> {
    Some(Limit {
        key: record_key(record)?,
        cap: cap(record)?,
    })
}

/// A record's limit: its day's for a payout, its charge's otherwise.
fn cap(record: &RefundRecord) -> Option<u64> {
    match record.command.operation {
        Operation::Payout => Some(record.daily_limit.unwrap_or(u64::MAX)),
        _ => record.command.original_amount,
    }
}

/// Whether a ledger's day is over (`today`: `YYYY-MM-DD`, UTC). Only a
/// payout day's ledger has a day; every other ledger's is.
pub fn day_is_over(key: &str, today: &str) -> bool {
    match key.strip_prefix("\npayouts\n") {
        Some(rest) => rest.rsplit('\n').next().is_some_and(|day| day < today),
        None => true,
    }
}

/// The limit of a ledger that a contradicting answer re-creates.
pub fn restore_cap(record: &RefundRecord) -> u64 {
    cap(record).unwrap_or_default()
}

/// The ledger key of a command's original charge (see [`record_key`]).
pub fn ledger_key(command: &RefundCommand) -> String {
    // serde_json's Map is sorted by key: a canonical form of the reference.
    let reference = serde_json::to_string(&command.transaction).unwrap_or_default();
    format!("{}\n{reference}", command.provider)
}

/// How much a command would take from the original: its amount, or all of
/// it for a cancel or a full refund.
pub fn requested_amount(command: &RefundCommand, original_amount: u64) -> u64 {
    match (&command.amount, command.operation) {
        (Some(amount), Operation::Refund | Operation::Payout) => amount.minor,
        _ => original_amount,
    }
}

/// What a refund's record change does to its reservation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LedgerChange {
    /// Nothing.
    Keep,
    /// The reservation now stands for this.
    Mark(Reservation),
    /// The refund will not be paid (declined, abandoned): free its amount.
    Release,
    /// The provider says it paid a refund recorded as not paid (a
    /// contradicting callback): its amount is reserved again, as this,
    /// whether or not the reservation was released meanwhile.
    Restore(Reservation),
}

impl OriginalLedger {
    /// A ledger for a charge seen for the first time.
    pub fn new(original_amount: u64) -> Self {
        OriginalLedger {
            original_amount,
            ..Default::default()
        }
    }

    /// Reserves the command's amount. Idempotent per `refund_id`: a refund
    /// already in the ledger keeps its entry. `Err` means it would exceed
    /// the original.
    pub fn reserve(
        &mut self,
        command: &RefundCommand,
        original_amount: u64,
    ) -> Result<(), OverRefund> {
        if self.refunds.contains_key(&command.refund_id) {
            return Ok(());
        }
        let requested = requested_amount(command, original_amount);
        let original_amount = match command.operation {
            Operation::Payout => original_amount,
            _ => self.original_amount.min(original_amount),
        };
        let reserved = self.reserved();
        if reserved.saturating_add(requested) > original_amount {
            return Err(OverRefund {
                original_amount,
                reserved,
                requested,
            });
        }
        self.original_amount = original_amount;
        self.refunds.insert(
            command.refund_id.clone(),
            (requested, Reservation::InFlight),
        );
        self.updated_at = now_rfc3339();
        Ok(())
    }

    /// Applies a change to the entry of `command`'s refund; true if
    /// anything changed.
    pub fn apply(&mut self, command: &RefundCommand, change: LedgerChange) -> bool {
        let refund_id = command.refund_id.as_str();
        let changed = match change {
            LedgerChange::Keep => false,
            LedgerChange::Release => self.refunds.remove(refund_id).is_some(),
            LedgerChange::Mark(state) => match self.refunds.get_mut(refund_id) {
                Some(entry) if entry.1 != state => {
                    entry.1 = state;
                    true
                }
                _ => false,
            },
            LedgerChange::Restore(state) => {
                let amount = requested_amount(command, self.original_amount);
                self.refunds
                    .insert(command.refund_id.clone(), (amount, state))
                    != Some((amount, state))
            }
        };
        if changed {
            self.updated_at = now_rfc3339();
        }
        changed
    }

    /// Whether every reservation is a paid refund (nothing can change any
    /// more, so the ledger may be pruned with the refunds' tombstones).
    pub fn settled(&self) -> bool {
        self.refunds
            .values()
            .all(|(_, state)| *state == Reservation::Succeeded)
    }

    /// The stored form.
    pub fn encode(&self) -> Vec<u8> {
        // Plain data: serde_json cannot fail on it.
        serde_json::to_vec(self).unwrap_or_default()
    }
}

impl OriginalLedger {
    /// Reads the stored form.
    pub fn decode(bytes: &[u8]) -> Result<Self, serde_json::Error> {
        serde_json::from_slice(bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refund(id: &str, minor: u64) -> RefundCommand {
        RefundCommand::parse(
            format!(
                r#"{{"refund_id":"{id}","provider":"p","transaction":{{"id":"1"}},"amount":{{"minor":{minor},"currency":"ILS"}},"original_amount":10000}}"#
            )
            .as_bytes(),
        )
        .expect("command")
    }

    #[test]
    fn refuses_what_would_exceed_the_original_and_releases_declines() {
        let mut ledger = OriginalLedger::new(10000);
        assert_eq!(ledger.reserve(&refund("a", 6000), 10000), Ok(()));
        // Idempotent for the same refund.
        assert_eq!(ledger.reserve(&refund("a", 6000), 10000), Ok(()));
        let over = ledger.reserve(&refund("b", 5000), 10000).expect_err("over");
        assert_eq!((over.reserved, over.requested), (6000, 5000));
        assert_eq!(ledger.reserve(&refund("c", 4000), 10000), Ok(()));
        // "a" was declined: its 6000 are free again.
        assert!(ledger.apply(&refund("a", 6000), LedgerChange::Release));
        assert_eq!(ledger.reserve(&refund("b", 5000), 10000), Ok(()));
        let paid = LedgerChange::Mark(Reservation::Succeeded);
        assert!(ledger.apply(&refund("b", 5000), paid));
        assert!(!ledger.apply(&refund("b", 5000), paid));
        assert_eq!(ledger.reserved(), 9000);
        assert_eq!(ledger.refunds["b"].1, Reservation::Succeeded);
        assert!(!ledger.settled());
        assert!(ledger.apply(&refund("c", 4000), LedgerChange::Release));
        assert!(ledger.settled());
        // The provider paid "a" after all: its amount stands again, even
        // past the original (the guard refuses new refunds, never the
        // provider's word).
        let restore = LedgerChange::Restore(Reservation::Succeeded);
        assert!(ledger.apply(&refund("a", 6000), restore));
        assert!(!ledger.apply(&refund("a", 6000), restore));
        assert_eq!(ledger.reserved(), 11000);
    }

    #[test]
    fn a_payout_days_ledger_outlives_its_day_and_no_other_has_one() {
        let key = "\npayouts\nhyp_pay\nILS\n2026-12-03";
        assert!(!day_is_over(key, "2026-12-03"), "today's limit is held");
        assert!(day_is_over(key, "2026-12-04"));
        assert!(day_is_over("hyp_pay\n{\"id\":\"1\"}", "2026-12-03"));
        // An account named "payouts": its charges' ledgers are not days.
        assert!(day_is_over("payouts\n{\"id\":\"1\"}", "2026-12-03"));
    }
}

//! The over-refund guard: per original charge, what has been refunded and
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
//! Updates are compare-and-swap loops on one sled key, so concurrent
//! refunds of one charge (different `refund_id`s, not serialised by the
//! per-refund lock) cannot both slip under the limit. They become durable
//! with the next [`Store::sync`](super::Store::sync), which the pipeline
//! runs before the provider call.
//!
//! This module knows only its own tree; the store sits on top of it and
//! exposes it (the arrows point one way: `store` → `ledger`).

use super::StoreError;
use crate::command::RefundCommand;
use crate::event::now_rfc3339;
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

/// The ledger key of a command, if it carries `original_amount`.
pub fn ledger_key(command: &RefundCommand) -> String {
    // serde_json's Map is sorted by key: a canonical form of the reference.
    let reference = serde_json::to_string(&command.transaction).unwrap_or_default();
    format!("{}\n{reference}", command.provider)
}

/// How much a command would take from the original: its amount, or all of
/// it for a cancel or a full refund.
pub fn requested_amount(command: &RefundCommand, original_amount: u64) -> u64 {
    match (&command.amount, command.operation) {
        (Some(amount), crate::command::Operation::Refund) => amount.minor,
        _ => original_amount,
    }
}

/// The ledger tree: one [`OriginalLedger`] per original charge.
#[derive(Debug, Clone)]
pub struct Ledger {
    tree: sled::Tree,
}

impl Ledger {
    /// Wraps the store's `originals` tree.
    pub(super) fn new(tree: sled::Tree) -> Self {
        Ledger { tree }
    }

    /// The underlying tree (for pruning and transactions).
    pub(super) fn tree(&self) -> &sled::Tree {
        &self.tree
    }

    /// Reserves the command's amount against its original. Idempotent per
    /// `refund_id`. `Ok(Err(_))` means it would over-refund.
    pub fn reserve(
        &self,
        command: &RefundCommand,
        original_amount: u64,
    ) -> Result<Result<(), OverRefund>, StoreError> {
        let key = ledger_key(command);
        let requested = requested_amount(command, original_amount);
        loop {
            let current = self.tree.get(key.as_bytes())?;
            let mut ledger: OriginalLedger = match &current {
                Some(bytes) => decode(&key, bytes)?,
                None => OriginalLedger {
                    original_amount,
                    ..Default::default()
                },
            };
            if ledger.refunds.contains_key(&command.refund_id) {
                return Ok(Ok(()));
            }
            ledger.original_amount = ledger.original_amount.min(original_amount);
            let reserved = ledger.reserved();
            if reserved.saturating_add(requested) > ledger.original_amount {
                return Ok(Err(OverRefund {
                    original_amount: ledger.original_amount,
                    reserved,
                    requested,
                }));
            }
            ledger.refunds.insert(
                command.refund_id.clone(),
                (requested, Reservation::InFlight),
            );
            ledger.updated_at = now_rfc3339();
            let new = serde_json::to_vec(&ledger).unwrap_or_default();
            if self
                .tree
                .compare_and_swap(key.as_bytes(), current, Some(new))?
                .is_ok()
            {
                return Ok(Ok(()));
            }
        }
    }

    /// Records how a reserved refund ended: `None` releases it (declined).
    pub fn settle(
        &self,
        command: &RefundCommand,
        outcome: Option<Reservation>,
    ) -> Result<(), StoreError> {
        if command.original_amount.is_none() {
            return Ok(());
        }
        let key = ledger_key(command);
        loop {
            let Some(current) = self.tree.get(key.as_bytes())? else {
                return Ok(());
            };
            let mut ledger: OriginalLedger = decode(&key, &current)?;
            match outcome {
                None => {
                    ledger.refunds.remove(&command.refund_id);
                }
                Some(state) => {
                    if let Some(entry) = ledger.refunds.get_mut(&command.refund_id) {
                        entry.1 = state;
                    }
                }
            }
            ledger.updated_at = now_rfc3339();
            let new = serde_json::to_vec(&ledger).unwrap_or_default();
            if self
                .tree
                .compare_and_swap(key.as_bytes(), Some(current), Some(new))?
                .is_ok()
            {
                return Ok(());
            }
        }
    }

    /// The ledger of a command's original, if any.
    pub fn get(&self, command: &RefundCommand) -> Result<Option<OriginalLedger>, StoreError> {
        let key = ledger_key(command);
        match self.tree.get(key.as_bytes())? {
            Some(bytes) => decode(&key, &bytes).map(Some),
            None => Ok(None),
        }
    }
}

pub(super) fn decode(key: &str, bytes: &[u8]) -> Result<OriginalLedger, StoreError> {
    serde_json::from_slice(bytes).map_err(|source| StoreError::Corrupt {
        refund_id: format!("ledger {key}"),
        source,
    })
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

    #[tokio::test]
    async fn refuses_what_would_exceed_the_original_and_releases_declines() {
        let dir = tempfile::tempdir().expect("dir");
        let db = sled::Config::new().path(dir.path()).open().expect("open");
        let store = Ledger::new(db.open_tree("originals").expect("tree"));
        assert_eq!(
            store.reserve(&refund("a", 6000), 10000).expect("io"),
            Ok(())
        );
        // Idempotent for the same refund.
        assert_eq!(
            store.reserve(&refund("a", 6000), 10000).expect("io"),
            Ok(())
        );
        let over = store
            .reserve(&refund("b", 5000), 10000)
            .expect("io")
            .expect_err("over");
        assert_eq!((over.reserved, over.requested), (6000, 5000));
        assert_eq!(
            store.reserve(&refund("c", 4000), 10000).expect("io"),
            Ok(())
        );
        // "a" was declined: its 6000 are free again.
        store.settle(&refund("a", 6000), None).expect("settle");
        assert_eq!(
            store.reserve(&refund("b", 5000), 10000).expect("io"),
            Ok(())
        );
        store
            .settle(&refund("b", 5000), Some(Reservation::Succeeded))
            .expect("settle");
        let ledger = store.get(&refund("b", 5000)).expect("io").expect("ledger");
        assert_eq!(ledger.reserved(), 9000);
        assert_eq!(ledger.refunds["b"].1, Reservation::Succeeded);
    }
}

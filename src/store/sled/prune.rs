//! Retention. A finished record older than `store.retention` becomes a
//! compact [`Tombstone`]: the full record (command, history) goes, but any
//! later copy of the command is still recognised and answered with the
//! recorded outcome, never sent to a provider again. Tombstones older than
//! `store.tombstone_retention` are deleted, and so are ledgers whose every
//! reservation is a paid refund and that have not changed for as long.
//!
//! In-doubt, attempting, not-yet-sent and pending records are never pruned:
//! they are not decided. A record that cannot be read stops nothing: it is
//! counted, logged and skipped.

use super::{decode, decode_record, encode, SledStore};
use crate::store::ledger::OriginalLedger;
use crate::store::{RefundRecord, RefundState, StoreError, Tombstone};
use std::time::Duration;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

/// How long what is kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    /// Finished records, then tombstones.
    pub records: Duration,
    /// Tombstones and settled ledgers.
    pub tombstones: Duration,
}

/// What one pruning pass did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PruneReport {
    /// Finished records turned into tombstones.
    pub tombstoned: usize,
    /// Tombstones deleted after `store.tombstone_retention`.
    pub tombstones_expired: usize,
    /// Settled original-charge ledgers deleted.
    pub ledgers: usize,
    /// Keys whose value could not be read (skipped; see the log).
    pub unreadable: Vec<String>,
}

fn older_than(at: &str, cutoff: OffsetDateTime) -> bool {
    OffsetDateTime::parse(at, &Rfc3339).is_ok_and(|t| t < cutoff)
}

impl SledStore {
    /// One pruning pass as of `now`. Blocking (it walks the trees): call it
    /// from the blocking pool.
    pub fn prune(
        &self,
        now: OffsetDateTime,
        retention: Retention,
    ) -> Result<PruneReport, StoreError> {
        let mut report = PruneReport::default();
        self.tombstone_records(now - retention.records, &mut report)?;
        self.expire_tombstones(now - retention.tombstones, &mut report)?;
        self.prune_ledgers(now, now - retention.tombstones, &mut report)?;
        Ok(report)
    }

    /// Finished records older than `cutoff`, their events confirmed, become
    /// tombstones.
    fn tombstone_records(
        &self,
        cutoff: OffsetDateTime,
        report: &mut PruneReport,
    ) -> Result<(), StoreError> {
        let trees = self.trees()?;
        for item in trees.refunds.iter() {
            let (key, value) = item?;
            let refund_id = String::from_utf8_lossy(&key).to_string();
            let record: RefundRecord = match decode_record(&refund_id, &value) {
                Ok(record) => record,
                Err(_) => {
                    report.unreadable.push(refund_id);
                    continue;
                }
            };
            if !matches!(record.state, RefundState::Finished { .. })
                || !older_than(&record.updated_at, cutoff)
            {
                continue;
            }
            // An event not yet confirmed stays with its record until the
            // outbox sweep has published it.
            if trees.outbox.contains_key(&key)? {
                continue;
            }
            let Some(tombstone) = Tombstone::of(&record) else {
                continue;
            };
            // Tombstone first, then the record (only if unchanged since we
            // read it): a reader that looks up the record and then the
            // tombstone always finds one of them.
            trees.tombstones.insert(&key, encode(&tombstone))?;
            if trees
                .refunds
                .compare_and_swap(&key, Some(value), None as Option<&[u8]>)?
                .is_ok()
            {
                report.tombstoned += 1;
            }
        }
        Ok(())
    }

    /// Tombstones older than `cutoff` go.
    fn expire_tombstones(
        &self,
        cutoff: OffsetDateTime,
        report: &mut PruneReport,
    ) -> Result<(), StoreError> {
        let trees = self.trees()?;
        for item in trees.tombstones.iter() {
            let (key, value) = item?;
            let refund_id = String::from_utf8_lossy(&key).to_string();
            let tombstone: Tombstone = match decode(&refund_id, &value) {
                Ok(t) => t,
                Err(_) => {
                    report.unreadable.push(format!("tombstone {refund_id}"));
                    continue;
                }
            };
            if older_than(&tombstone.pruned_at, cutoff)
                && trees
                    .tombstones
                    .compare_and_swap(&key, Some(value), None as Option<&[u8]>)?
                    .is_ok()
            {
                report.tombstones_expired += 1;
            }
        }
        Ok(())
    }

    /// Ledgers whose every reservation was paid, unchanged since `cutoff`,
    /// go; a payout day's ledger only once its day is over (until then it
    /// is what holds the day's payouts under their limit).
    fn prune_ledgers(
        &self,
        now: OffsetDateTime,
        cutoff: OffsetDateTime,
        report: &mut PruneReport,
    ) -> Result<(), StoreError> {
        let trees = self.trees()?;
        let today = now.date().to_string();
        for item in trees.originals.iter() {
            let (key, value) = item?;
            let key_text = String::from_utf8_lossy(&key).to_string();
            let Ok(ledger) = OriginalLedger::decode(&value) else {
                report.unreadable.push(format!("ledger {key_text}"));
                continue;
            };
            if ledger.settled()
                && older_than(&ledger.updated_at, cutoff)
                && crate::store::ledger::day_is_over(&key_text, &today)
                && trees
                    .originals
                    .compare_and_swap(&key, Some(value), None as Option<&[u8]>)?
                    .is_ok()
            {
                report.ledgers += 1;
            }
        }
        Ok(())
    }
}

//! The durable record of every refund, in sled, and the group-commit syncer
//! that makes writes durable without one `fsync` per message.
//!
//! One record per `refund_id` holds everything the pipeline decides from: the
//! hash of the command, the lifecycle state and the recorded outcome. A
//! redelivery, a restart and a replay all read the same record, so they all
//! take the same path (see `worker/`).
//!
//! Durability: sled keeps writes in memory until `flush()`. Callers that need
//! a write on disk before they go on (before a provider call, before an event
//! is published) call [`Store::sync`], which hands the request to the
//! group-commit syncer (`syncer.rs`): one disk sync serves every message that
//! was written meanwhile.
//!
//! Module map: `record.rs` (the record and its states), `ledger.rs` (the
//! over-refund guard, its own tree), `syncer.rs` (group commit). The store
//! sits on top of both; neither imports it.

pub mod ledger;
mod record;
mod syncer;

pub use record::{HistoryEntry, RefundRecord, RefundState};
pub use syncer::SyncStats;

use crate::command::RefundCommand;
use ledger::{Ledger, OriginalLedger, OverRefund, Reservation};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use syncer::{run_syncer, SyncReply, SyncRequest};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;
use tokio::sync::{mpsc, oneshot};

/// Store failures. Any of them stops the processing of the delivery at hand
/// without an ack, so the message comes back later.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// sled reported an I/O or corruption error.
    #[error("store: {0}")]
    Sled(#[from] sled::Error),
    /// A record could not be decoded.
    #[error("store: record for {refund_id} is unreadable: {source}")]
    Corrupt {
        /// The key.
        refund_id: String,
        /// The decoding error.
        source: serde_json::Error,
    },
    /// The syncer task is gone (the runtime is shutting down).
    #[error("store: the syncer task has stopped")]
    SyncerGone,
}

/// What one pruning pass removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PruneReport {
    /// Finished refund records.
    pub records: usize,
    /// Settled original-charge ledgers.
    pub ledgers: usize,
}

/// Handle to the store; cheap to clone.
#[derive(Debug, Clone)]
pub struct Store {
    ledger: Ledger,
    refunds: sled::Tree,
    syncer: mpsc::UnboundedSender<SyncRequest>,
    stats: Arc<SyncStats>,
}

impl Store {
    /// Opens (or creates) the store at `path` and starts its syncer task,
    /// flushing as soon as a request arrives. Must be called inside a tokio
    /// runtime.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        Self::open_with(path, Duration::ZERO)
    }

    /// As [`Store::open`]; the syncer waits up to `linger` after the first
    /// request of a batch for more writers to join it (group commit with a
    /// commit delay): fewer disk syncs under load for a little latency.
    pub fn open_with(path: &Path, linger: Duration) -> Result<Self, StoreError> {
        let db = sled::Config::new()
            .path(path)
            // The background flush is a safety net only; durability points
            // are explicit `sync()` calls.
            .flush_every_ms(Some(1000))
            .open()?;
        let refunds = db.open_tree("refunds")?;
        let originals = db.open_tree("originals")?;
        let stats = Arc::new(SyncStats::default());
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(run_syncer(db.clone(), rx, stats.clone(), linger));
        Ok(Store {
            ledger: Ledger::new(originals),
            refunds,
            syncer: tx,
            stats,
        })
    }

    /// Reads a record.
    pub fn get(&self, refund_id: &str) -> Result<Option<RefundRecord>, StoreError> {
        match self.refunds.get(refund_id.as_bytes())? {
            None => Ok(None),
            Some(bytes) => decode(refund_id, &bytes).map(Some),
        }
    }

    /// Inserts `record` only if no record exists for its `refund_id`.
    /// Returns the existing record when there is one (the claim failed).
    pub fn claim(&self, record: &RefundRecord) -> Result<Option<RefundRecord>, StoreError> {
        let bytes = encode(record);
        match self.refunds.compare_and_swap(
            record.refund_id.as_bytes(),
            None as Option<&[u8]>,
            Some(bytes),
        )? {
            Ok(()) => Ok(None),
            Err(cas) => match cas.current {
                Some(existing) => decode(&record.refund_id, &existing).map(Some),
                None => Ok(None),
            },
        }
    }

    /// Writes a record (not yet durable: call [`Store::sync`]).
    pub fn put(&self, record: &RefundRecord) -> Result<(), StoreError> {
        self.refunds
            .insert(record.refund_id.as_bytes(), encode(record))?;
        Ok(())
    }

    /// Waits until every write made before this call is on disk. Many
    /// concurrent callers share one flush.
    pub async fn sync(&self) -> Result<(), StoreError> {
        self.ask_syncer(SyncRequest::Sync).await
    }

    /// Iterates over all records (for operators; not on the hot path).
    pub fn records(&self) -> impl Iterator<Item = Result<RefundRecord, StoreError>> + '_ {
        self.refunds.iter().map(|item| {
            let (key, value) = item?;
            decode(&String::from_utf8_lossy(&key), &value)
        })
    }

    /// Deletes finished records and settled ledgers last changed before
    /// `cutoff`. Records that are in doubt, attempting or not yet sent are
    /// kept whatever their age: deleting them could let a replay pay again.
    /// Blocking (it walks the trees): call it from the blocking pool.
    pub fn prune(&self, cutoff: OffsetDateTime) -> Result<PruneReport, StoreError> {
        let older = |at: &str| OffsetDateTime::parse(at, &Rfc3339).is_ok_and(|t| t < cutoff);
        let mut report = PruneReport::default();
        for item in self.refunds.iter() {
            let (key, value) = item?;
            let refund_id = String::from_utf8_lossy(&key).to_string();
            let record = decode(&refund_id, &value)?;
            if matches!(record.state, RefundState::Finished { .. }) && older(&record.updated_at) {
                // Only if unchanged since we read it.
                if self
                    .refunds
                    .compare_and_swap(&key, Some(value), None as Option<&[u8]>)?
                    .is_ok()
                {
                    report.records += 1;
                }
            }
        }
        let originals = self.ledger.tree();
        for item in originals.iter() {
            let (key, value) = item?;
            let Ok(ledger) = serde_json::from_slice::<OriginalLedger>(&value) else {
                continue;
            };
            let settled = ledger
                .refunds
                .values()
                .all(|(_, state)| *state == Reservation::Succeeded);
            if settled
                && older(&ledger.updated_at)
                && originals
                    .compare_and_swap(&key, Some(value), None as Option<&[u8]>)?
                    .is_ok()
            {
                report.ledgers += 1;
            }
        }
        Ok(report)
    }

    /// Counts of all records, in-doubt ones, and unfinished ones
    /// (attempting or not yet sent). Blocking: walks the tree.
    pub fn counts(&self) -> Result<(usize, usize, usize), StoreError> {
        let (mut all, mut in_doubt, mut unfinished) = (0, 0, 0);
        for record in self.records() {
            all += 1;
            match record?.state {
                RefundState::InDoubt { .. } => in_doubt += 1,
                RefundState::Attempting { .. } | RefundState::NotSent { .. } => unfinished += 1,
                RefundState::Pending { .. } => {}
                RefundState::Finished { .. } => {}
            }
        }
        Ok((all, in_doubt, unfinished))
    }

    /// Pending refunds whose wait exceeds `limit(provider)`. Blocking.
    pub fn pending_overdue(
        &self,
        limit: impl Fn(&str) -> Option<Duration>,
    ) -> Result<Vec<String>, StoreError> {
        let now = OffsetDateTime::now_utc();
        let mut overdue = Vec::new();
        for record in self.records() {
            let record = record?;
            if let RefundState::Pending { since, .. } = &record.state {
                let waited = OffsetDateTime::parse(since, &Rfc3339).map(|t| now - t);
                if let (Ok(waited), Some(limit)) = (waited, limit(&record.command.provider)) {
                    if waited.unsigned_abs() > limit {
                        overdue.push(record.refund_id.clone());
                    }
                }
            }
        }
        Ok(overdue)
    }

    /// Records stored.
    pub fn len(&self) -> usize {
        self.refunds.len()
    }

    /// Whether no record is stored.
    pub fn is_empty(&self) -> bool {
        self.refunds.is_empty()
    }

    /// Reserves the command's amount against its original (see
    /// [`Ledger::reserve`]). `Ok(Err(_))` means it would over-refund.
    pub fn reserve(
        &self,
        command: &RefundCommand,
        original_amount: u64,
    ) -> Result<Result<(), OverRefund>, StoreError> {
        self.ledger.reserve(command, original_amount)
    }

    /// Records how a reserved refund ended: `None` releases it.
    pub fn settle(
        &self,
        command: &RefundCommand,
        outcome: Option<Reservation>,
    ) -> Result<(), StoreError> {
        self.ledger.settle(command, outcome)
    }

    /// The ledger of a command's original charge, if any.
    pub fn ledger(&self, command: &RefundCommand) -> Result<Option<OriginalLedger>, StoreError> {
        self.ledger.get(command)
    }

    /// Syncer counters.
    pub fn stats(&self) -> &SyncStats {
        &self.stats
    }

    /// Flushes and stops the syncer (shutdown path). Once every handle is
    /// dropped, sled releases the directory lock, so the same process (a
    /// test, a supervisor) can open the store again.
    pub async fn close(&self) -> Result<(), StoreError> {
        self.ask_syncer(SyncRequest::Close).await
    }

    async fn ask_syncer(&self, request: fn(SyncReply) -> SyncRequest) -> Result<(), StoreError> {
        let (tx, rx) = oneshot::channel();
        self.syncer
            .send(request(tx))
            .map_err(|_| StoreError::SyncerGone)?;
        match rx.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(message)) => Err(StoreError::Sled(sled::Error::Io(std::io::Error::other(
                message,
            )))),
            Err(_) => Err(StoreError::SyncerGone),
        }
    }
}

fn encode(record: &RefundRecord) -> Vec<u8> {
    // Serialising plain data with serde_json cannot fail.
    serde_json::to_vec(record).unwrap_or_default()
}

fn decode(refund_id: &str, bytes: &[u8]) -> Result<RefundRecord, StoreError> {
    serde_json::from_slice(bytes).map_err(|source| StoreError::Corrupt {
        refund_id: refund_id.to_string(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::Ordering;

    fn command(id: &str) -> RefundCommand {
        RefundCommand::parse(
            format!(r#"{{"refund_id":"{id}","provider":"p","transaction":{{"id":"1"}}}}"#)
                .as_bytes(),
        )
        .expect("command")
    }

    #[tokio::test]
    async fn claim_is_first_writer_wins_and_survives_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let store = Store::open(dir.path()).expect("open");
            let record = RefundRecord::attempting(&command("r1"));
            assert!(store.claim(&record).expect("claim").is_none());
            let again = store.claim(&record).expect("claim").expect("existing");
            assert_eq!(again.state.name(), "attempting");
            store.close().await.expect("close");
        }
        let store = Store::open(dir.path()).expect("reopen");
        let record = store.get("r1").expect("get").expect("present");
        assert_eq!(record.attempts, 1);
        assert_eq!(store.records().count(), 1);
    }

    #[tokio::test]
    async fn pruning_removes_old_finished_records_only() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("open");
        let old = "2020-01-01T00:00:00Z".to_string();
        let event = |id: &str| {
            crate::event::OutcomeEvent::new(
                id,
                crate::event::Status::Succeeded,
                &Default::default(),
                1,
            )
        };
        let mut finished_old = RefundRecord::attempting(&command("old-done"));
        finished_old.state = RefundState::Finished {
            event: event("old-done"),
        };
        finished_old.updated_at = old.clone();
        let mut doubt_old = RefundRecord::attempting(&command("old-doubt"));
        doubt_old.state = RefundState::InDoubt {
            event: event("old-doubt"),
        };
        doubt_old.updated_at = old.clone();
        let mut attempting_old = RefundRecord::attempting(&command("old-attempting"));
        attempting_old.updated_at = old;
        let mut finished_new = RefundRecord::attempting(&command("new-done"));
        finished_new.state = RefundState::Finished {
            event: event("new-done"),
        };
        for r in [&finished_old, &doubt_old, &attempting_old, &finished_new] {
            store.put(r).expect("put");
        }
        let cutoff = OffsetDateTime::now_utc() - time::Duration::days(30);
        let report = store.prune(cutoff).expect("prune");
        assert_eq!(report.records, 1);
        assert!(store.get("old-done").expect("get").is_none());
        for kept in ["old-doubt", "old-attempting", "new-done"] {
            assert!(store.get(kept).expect("get").is_some(), "{kept} kept");
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn one_flush_serves_many_concurrent_syncs() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("open");
        let mut tasks = Vec::new();
        for i in 0..200 {
            let store = store.clone();
            tasks.push(tokio::spawn(async move {
                store
                    .put(&RefundRecord::attempting(&command(&format!("r{i}"))))
                    .expect("put");
                store.sync().await.expect("sync");
            }));
        }
        for t in tasks {
            t.await.expect("task");
        }
        let flushes = store.stats().flushes.load(Ordering::Relaxed);
        let requests = store.stats().requests.load(Ordering::Relaxed);
        assert_eq!(requests, 200);
        assert!(flushes < requests, "flushes {flushes} for {requests} syncs");
    }
}

//! The durable record of every refund: one store interface, two backends.
//!
//! * **sled** (`store.backend = "sled"`, the default): an embedded store in
//!   `store.path`, owned by one worker process. Writes stay in memory until
//!   [`Store::sync_refund`], which one group-committed disk sync serves for
//!   every writer waiting (`sled/syncer.rs`).
//! * **PostgreSQL** (`store.backend = "postgres"`): one database shared by
//!   any number of replicas, each a plain competing consumer of the same
//!   queues (`postgres/`). Every write is a committed transaction, so
//!   [`Store::sync_refund`] has nothing left to do; every later write of a
//!   refund is a compare-and-swap on the revision it was read at, so a
//!   replica acting on a stale read (fenced) changes nothing.
//!
//! One record per `refund_id` holds everything the pipeline decides from:
//! the hash of the command, the lifecycle state, what each attempt carried
//! and the recorded outcome. A redelivery, a restart, a replay and a copy on
//! another replica all read the same record, so they all take the same path
//! (see `worker/`). A record, its over-refund reservation and its outbox
//! mark change together, in one transaction.
//!
//! Module map: `record.rs` (the record, its states, the tombstone),
//! `ledger.rs` (the over-refund arithmetic, pure), `sled/` and `postgres/`
//! (the backends). The facade here only dispatches; neither backend imports
//! the other.

pub(crate) mod codec;
pub mod copy;
pub mod ledger;
pub mod postgres;
mod record;
pub(crate) mod report;
pub mod sled;

pub use codec::{DecodeError, RecordFormat};
pub use record::{AttemptTrace, HistoryEntry, RefundRecord, RefundState, Tombstone};
pub use sled::prune::{PruneReport, Retention};
pub use sled::syncer::SyncStats;
pub use sled::SledOptions;

use crate::contract::command::RefundCommand;
use crate::contract::report::ReportRow;
use ledger::{LedgerChange, OriginalLedger, OverRefund};
use std::path::Path;
use std::time::Duration;
use time::{Date, OffsetDateTime};

/// Store failures. Any of them stops the processing of the delivery at hand
/// without an ack, so the message comes back later.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// sled reported an I/O or corruption error.
    #[error("store: {0}")]
    Sled(#[from] ::sled::Error),
    /// A record could not be decoded.
    #[error("store: record for {refund_id} is unreadable: {source}")]
    Corrupt {
        /// The key.
        refund_id: String,
        /// The decoding error.
        source: DecodeError,
    },
    /// The store cannot be reached or written now (a database outage, the
    /// syncer gone at shutdown, a closed store); trying again later may work.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// The record changed since it was read (another replica, an operator,
    /// the lease sweeper): this write did not land. The caller reads the
    /// record again and decides from what it says now.
    #[error("store: refund {refund_id} changed since it was read; this write did not land")]
    Fenced {
        /// The refund.
        refund_id: String,
    },
}

/// What the store knows of a refund.
#[derive(Debug, Clone, PartialEq)]
pub enum Known {
    /// Its full record.
    Record(Box<RefundRecord>),
    /// Its tombstone: finished, record pruned.
    Tombstone(Box<Tombstone>),
}

/// The store's gauges and the overdue pending refunds (one walk).
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Census {
    /// Records kept.
    pub records: usize,
    /// Records in doubt.
    pub in_doubt: usize,
    /// Records attempting or not yet sent.
    pub unfinished: usize,
    /// Pending refunds that waited longer than their account allows.
    pub overdue: Vec<String>,
    /// Tombstones kept.
    pub tombstones: usize,
    /// Events recorded and not yet confirmed by the broker.
    pub unconfirmed: usize,
}

/// What [`Store::claim`] did.
#[derive(Debug, Clone, PartialEq)]
pub enum Claim {
    /// The record is written and the amount reserved (durable only after
    /// [`Store::sync_refund`]).
    Claimed,
    /// A record already exists (another copy got there first).
    Exists(Box<RefundRecord>),
    /// The reservation would exceed the original amount; nothing written.
    OverRefund(OverRefund),
}

/// An unconfirmed event, as the outbox holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxEntry {
    /// The refund.
    pub refund_id: String,
    /// The event the broker has not confirmed.
    pub event_id: String,
    /// When it was recorded (Unix seconds).
    pub since: u64,
}

/// A reservation an operator asked to release that stands for a paid
/// refund: it is never released.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PaidReservation {
    /// The amount reserved.
    pub amount: u64,
}

/// Seconds since the Unix epoch.
pub(crate) fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Handle to the store; cheap to clone.
#[derive(Debug, Clone)]
pub enum Store {
    /// The embedded store.
    Sled(sled::SledStore),
    /// The database shared by replicas.
    Postgres(postgres::PgStore),
}

impl Store {
    /// Opens (or creates) the sled store at `path` and starts its syncer.
    /// Must be called inside a tokio runtime.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        Self::open_sled(path, SledOptions::default())
    }

    /// As [`Store::open`], with options.
    pub fn open_sled(path: &Path, options: SledOptions) -> Result<Self, StoreError> {
        sled::SledStore::open(path, options).map(Store::Sled)
    }

    /// `sled` or `postgres`.
    pub fn backend(&self) -> &'static str {
        match self {
            Store::Sled(_) => "sled",
            Store::Postgres(_) => "postgres",
        }
    }

    /// Reads a record.
    pub async fn get(&self, refund_id: &str) -> Result<Option<RefundRecord>, StoreError> {
        match self {
            Store::Sled(s) => s.get(refund_id),
            Store::Postgres(p) => p.get(refund_id).await,
        }
    }

    /// The record, else the tombstone. The pruner writes a tombstone before
    /// it removes the record, so reading in this order never misses both.
    pub async fn lookup(&self, refund_id: &str) -> Result<Option<Known>, StoreError> {
        match self {
            Store::Sled(s) => s.lookup(refund_id),
            Store::Postgres(p) => p.lookup(refund_id).await,
        }
    }

    /// Claims a refund seen for the first time: inserts `record` and, when
    /// the command carries `original_amount`, reserves its amount in the
    /// ledger, both in one transaction. This process becomes the refund's
    /// owner (PostgreSQL: only while its lease is alive).
    pub async fn claim(&self, record: &mut RefundRecord) -> Result<Claim, StoreError> {
        match self {
            Store::Sled(s) => s.claim(record),
            Store::Postgres(p) => p.claim(record).await,
        }
    }

    /// Whether `record` (found `Attempting`) is being attempted right now by
    /// another live replica (PostgreSQL: its owner's lease is alive). An
    /// attempt of this process found under the refund's lock, or any
    /// attempt found by the single sled process, was cut off.
    pub async fn attempt_in_progress(&self, record: &RefundRecord) -> Result<bool, StoreError> {
        if !matches!(record.state, RefundState::Attempting { .. }) {
            return Ok(false);
        }
        match self {
            Store::Sled(_) => Ok(false),
            Store::Postgres(p) => p.attempt_in_progress(&record.refund_id).await,
        }
    }

    /// Refunds left `Attempting` by replicas whose lease has expired
    /// (PostgreSQL; the single sled process finds its own when their
    /// messages come back).
    pub async fn cut_off_attempts(&self, limit: usize) -> Result<Vec<String>, StoreError> {
        match self {
            Store::Sled(_) => Ok(Vec::new()),
            Store::Postgres(p) => p.cut_off_attempts(limit).await,
        }
    }

    /// Whether the store can be used now (PostgreSQL: the database answered
    /// the last renewal of this replica's lease).
    pub fn healthy(&self) -> bool {
        match self {
            Store::Sled(_) => true,
            Store::Postgres(p) => p.healthy(),
        }
    }

    /// Whether this process may call a provider for a refund it owns now
    /// (PostgreSQL: its lease surely holds, on its own clock).
    pub fn lease_holds(&self) -> bool {
        match self {
            Store::Sled(_) => true,
            Store::Postgres(p) => p.lease_holds(),
        }
    }

    /// Writes a new `Attempting` state as this process's attempt, before
    /// the request leaves (PostgreSQL: only while this replica's lease is
    /// alive, and only if nobody wrote the record since it was read).
    pub async fn take_attempt(&self, record: &mut RefundRecord) -> Result<(), StoreError> {
        match self {
            Store::Sled(s) => s.put(record),
            Store::Postgres(p) => p.take_attempt(record).await,
        }
    }

    /// Writes a state without an event (`NotSent`), leaving the ledger
    /// entry as it is. A state with an event goes through
    /// [`Store::commit`].
    pub async fn put(&self, record: &mut RefundRecord) -> Result<(), StoreError> {
        if record.state.event().is_some() {
            return self.commit(record, LedgerChange::Keep).await;
        }
        match self {
            Store::Sled(s) => s.put(record),
            Store::Postgres(p) => p.put(record).await,
        }
    }

    /// Rewrites a record whose state did not change (a history note): its
    /// ledger entry and outbox mark stay as they are.
    pub async fn annotate(&self, record: &mut RefundRecord) -> Result<(), StoreError> {
        match self {
            Store::Sled(s) => s.annotate(record),
            Store::Postgres(p) => p.put(record).await,
        }
    }

    /// Writes a record, applies `change` to its ledger entry and marks its
    /// event (if its state has one) as not yet confirmed by the broker, in
    /// one transaction.
    pub async fn commit(
        &self,
        record: &mut RefundRecord,
        change: LedgerChange,
    ) -> Result<(), StoreError> {
        match self {
            Store::Sled(s) => s.commit(record, change),
            Store::Postgres(p) => p.commit(record, change).await,
        }
    }

    /// Records a refund the store did not know in its final state (an
    /// operator abandoning a dead-lettered refund that was never claimed),
    /// with its outbox mark and without a reservation; `Claim::Exists` when
    /// a record appeared meanwhile.
    pub async fn insert_settled(&self, record: &mut RefundRecord) -> Result<Claim, StoreError> {
        match self {
            Store::Sled(s) => s.insert_settled(record),
            Store::Postgres(p) => p.insert_settled(record).await,
        }
    }

    /// Removes a refund's reservation from every ledger that holds one (an
    /// operator's release). Returns the amounts released; a reservation
    /// that stands for a paid refund is never released
    /// ([`PaidReservation`]).
    pub async fn release(
        &self,
        refund_id: &str,
    ) -> Result<Result<Vec<u64>, PaidReservation>, StoreError> {
        match self {
            Store::Sled(s) => s.release(refund_id),
            Store::Postgres(p) => p.release(refund_id).await,
        }
    }

    /// Makes every write of this refund made so far durable (sled: one disk
    /// sync shared by all writers waiting; PostgreSQL: already committed).
    pub async fn sync_refund(&self, refund_id: &str) -> Result<(), StoreError> {
        match self {
            Store::Sled(s) => s.sync(refund_id).await,
            // Committed when written.
            Store::Postgres(_) => Ok(()),
        }
    }

    /// The broker confirmed `event_id`: take the refund off the outbox,
    /// unless a newer event replaced it meanwhile. Not synced: if this is
    /// lost in a crash, the event is published once more (same id).
    pub async fn mark_published(&self, refund_id: &str, event_id: &str) -> Result<(), StoreError> {
        match self {
            Store::Sled(s) => s.mark_published(refund_id, event_id),
            Store::Postgres(p) => p.mark_published(refund_id, event_id).await,
        }
    }

    /// The refund's outbox mark, if its event is still unconfirmed.
    pub async fn outbox_mark(&self, refund_id: &str) -> Result<Option<OutboxEntry>, StoreError> {
        match self {
            Store::Sled(s) => s.outbox_mark(refund_id),
            Store::Postgres(p) => p.outbox_mark(refund_id).await,
        }
    }

    /// Events recorded at least `min_age` ago and not confirmed since,
    /// oldest first, at most `limit`. (PostgreSQL: each replica's sweep
    /// takes a batch no other replica is sweeping.)
    pub async fn unconfirmed(
        &self,
        min_age: Duration,
        limit: usize,
    ) -> Result<Vec<OutboxEntry>, StoreError> {
        match self {
            Store::Sled(s) => {
                s.clone()
                    .blocking(move |s| s.unconfirmed(min_age, limit))
                    .await
            }
            Store::Postgres(p) => p.unconfirmed(min_age, limit).await,
        }
    }

    /// The oldest unconfirmed event, whether or not a sweep holds it (a
    /// new session's check that events can be published).
    pub async fn oldest_unconfirmed(&self) -> Result<Option<OutboxEntry>, StoreError> {
        match self {
            Store::Sled(s) => s
                .clone()
                .blocking(|s| s.unconfirmed(Duration::ZERO, usize::MAX))
                .await
                .map(|all| all.into_iter().next()),
            Store::Postgres(p) => p.oldest_unconfirmed().await,
        }
    }

    /// Records whose lifecycle status (see `worker::record_status`) is
    /// `status` (any when `None`), at most `limit`.
    pub async fn list(
        &self,
        status: Option<String>,
        limit: usize,
    ) -> Result<Vec<RefundRecord>, StoreError> {
        match self {
            Store::Sled(s) => {
                s.clone()
                    .blocking(move |s| s.list(status.as_deref(), limit))
                    .await
            }
            Store::Postgres(p) => p.list(status, limit).await,
        }
    }

    /// The store's gauges and the pending refunds waiting longer than
    /// `limit(provider)`.
    pub async fn census(
        &self,
        limit: impl Fn(&str) -> Option<Duration> + Send + 'static,
    ) -> Result<Census, StoreError> {
        match self {
            Store::Sled(s) => s.clone().blocking(move |s| s.census(limit)).await,
            Store::Postgres(p) => p.census(limit).await,
        }
    }

    /// One pruning pass as of `now` (see `sled/prune.rs` for the rules).
    pub async fn prune(
        &self,
        now: OffsetDateTime,
        retention: Retention,
    ) -> Result<PruneReport, StoreError> {
        match self {
            Store::Sled(s) => s.clone().blocking(move |s| s.prune(now, retention)).await,
            Store::Postgres(p) => p.prune(now, retention).await,
        }
    }

    /// The reconciliation report for the days `from..=to`.
    pub async fn report(&self, from: Date, to: Date) -> Result<Vec<ReportRow>, StoreError> {
        match self {
            Store::Sled(s) => s.clone().blocking(move |s| s.report(from, to)).await,
            Store::Postgres(p) => p.report(from, to).await,
        }
    }

    /// The ledger of a command's original charge, if any.
    pub async fn ledger(
        &self,
        command: &RefundCommand,
    ) -> Result<Option<OriginalLedger>, StoreError> {
        match self {
            Store::Sled(s) => s.ledger(command),
            Store::Postgres(p) => p.ledger(command).await,
        }
    }

    /// The group-commit counters (sled only).
    pub fn sync_stats(&self) -> Option<&SyncStats> {
        match self {
            Store::Sled(s) => Some(s.stats()),
            Store::Postgres(_) => None,
        }
    }

    /// Makes everything durable and lets go of the store. Returns once the
    /// store can be opened again (sled: its directory lock is free); every
    /// use of this handle or its clones afterwards fails with
    /// [`StoreError::Unavailable`].
    pub async fn close(&self) -> Result<(), StoreError> {
        match self {
            Store::Sled(s) => s.close().await,
            Store::Postgres(p) => p.close().await,
        }
    }
}

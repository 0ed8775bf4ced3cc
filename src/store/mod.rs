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
//! was written meanwhile (at light load the caller flushes itself, which
//! saves two thread wake-ups).
//!
//! Trees: `refunds` (one record per refund), `tombstones` (what is left of
//! a finished refund after `store.retention`), `originals` (the over-refund
//! ledger, one entry per original charge) and `outbox` (refunds whose
//! latest event the broker has not confirmed yet). A record and its ledger
//! entry and outbox mark change in one sled transaction, so a crash never
//! leaves them disagreeing.
//!
//! Module map: `record.rs` (the record, its states, the tombstone),
//! `codec.rs` (how a record is laid out on disk), `ledger.rs` (the
//! over-refund arithmetic, pure), `prune.rs` (retention), `syncer.rs`
//! (group commit). The store sits on top of all of them; none imports it.

pub(crate) mod codec;
pub mod journal;
pub mod ledger;
mod outbox;
mod prune;
mod record;
mod syncer;

pub use codec::{DecodeError, RecordFormat};
use outbox::outbox_value;
pub use outbox::OutboxEntry;
pub use prune::{PruneReport, Retention};
pub use record::{HistoryEntry, RefundRecord, RefundState, Tombstone};
pub use syncer::SyncStats;

use crate::command::RefundCommand;
use journal::{Journal, LedgerOp, TreeId};
use ledger::{ledger_key, LedgerChange, OriginalLedger, OverRefund};
use sled::transaction::{ConflictableTransactionError, TransactionError, Transactional};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use syncer::{run_syncer, SyncReply, SyncRequest};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;
use tokio::sync::oneshot;

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
        source: DecodeError,
    },
    /// The syncer task is gone (the runtime is shutting down).
    #[error("store: the syncer task has stopped")]
    SyncerGone,
    /// Cluster mode: the state log did not take a write.
    #[error("store: {0}")]
    Log(String),
    /// Cluster mode: another replica took the refund's partition over; this
    /// replica must not act on the refund any more.
    #[error(
        "store: partition {partition} is owned by another replica now; leaving the refund to it"
    )]
    Fenced {
        /// The partition.
        partition: u32,
    },
}

impl From<TransactionError<StoreError>> for StoreError {
    fn from(e: TransactionError<StoreError>) -> Self {
        match e {
            TransactionError::Abort(e) => e,
            TransactionError::Storage(e) => StoreError::Sled(e),
        }
    }
}

/// What the store knows of a refund.
#[derive(Debug, Clone, PartialEq)]
pub enum Known {
    /// Its full record.
    Record(Box<RefundRecord>),
    /// Its tombstone: finished, record pruned.
    Tombstone(Box<Tombstone>),
}

/// What [`Store::census`] found.
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
}

/// What [`Store::claim`] did.
#[derive(Debug, Clone, PartialEq)]
pub enum Claim {
    /// The record is written and the amount reserved (not yet durable).
    Claimed,
    /// A record already exists (another copy got there first).
    Exists(Box<RefundRecord>),
    /// The reservation would exceed the original amount; nothing written.
    OverRefund(OverRefund),
}

/// sled's page cache unless configured (`store.cache_mib`).
const DEFAULT_CACHE: u64 = 32 << 20;

/// Handle to the store; cheap to clone.
#[derive(Debug, Clone)]
pub struct Store {
    refunds: sled::Tree,
    tombstones: sled::Tree,
    originals: sled::Tree,
    outbox: sled::Tree,
    /// Cluster mode's bookkeeping (the state log's position, markers).
    meta: sled::Tree,
    syncer: std::sync::mpsc::Sender<SyncRequest>,
    stats: Arc<SyncStats>,
    /// Cluster mode: writes go to the state log (see `journal.rs`).
    journal: Option<Arc<Journal>>,
    /// The form new records are written in (`codec.rs`). Always JSON in
    /// cluster mode: the state log carries records to replicas that may
    /// run an older version during a rolling upgrade.
    format: RecordFormat,
    /// For a flush made by the writer itself (see [`Store::flush_inline`]).
    db: sled::Db,
    /// `store.group_commit_linger_us`: a configured wait is always the
    /// syncer's.
    linger: Duration,
    /// Whether a lone writer may flush on its own thread: only when the
    /// runtime has another thread to run every other task meanwhile. On a
    /// one-thread runtime the flush would stop them all, and every sync
    /// would end up alone (measured: 2 syncs per refund, half the
    /// throughput); the syncer does every flush there.
    inline_flush: bool,
}

type Tx = sled::transaction::TransactionalTree;
type TxResult<T> = Result<T, ConflictableTransactionError<StoreError>>;

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
        Self::open_inner(path, linger, None, DEFAULT_CACHE)
    }

    /// As [`Store::open_with`], with sled's page cache limited to
    /// `cache_bytes`.
    pub fn open_sized(path: &Path, linger: Duration, cache_bytes: u64) -> Result<Self, StoreError> {
        Self::open_inner(path, linger, None, cache_bytes)
    }

    /// Cluster mode: as [`Store::open`], with writes going to the state log
    /// through `journal` and sled written only by the log's tailer.
    pub fn open_replicated(
        path: &Path,
        journal: Arc<Journal>,
        cache_bytes: u64,
    ) -> Result<Self, StoreError> {
        Self::open_inner(path, Duration::ZERO, Some(journal), cache_bytes)
    }

    fn open_inner(
        path: &Path,
        linger: Duration,
        journal: Option<Arc<Journal>>,
        cache_bytes: u64,
    ) -> Result<Self, StoreError> {
        let db = sled::Config::new()
            .path(path)
            // The background flush is a safety net only; durability points
            // are explicit `sync()` calls.
            .flush_every_ms(Some(1000))
            .cache_capacity(cache_bytes)
            .open()?;
        let stats = Arc::new(SyncStats::default());
        let (tx, rx) = std::sync::mpsc::channel();
        let store = Store {
            refunds: db.open_tree("refunds")?,
            tombstones: db.open_tree("tombstones")?,
            originals: db.open_tree("originals")?,
            outbox: db.open_tree("outbox")?,
            meta: db.open_tree("cluster")?,
            syncer: tx,
            stats: stats.clone(),
            format: if journal.is_some() {
                RecordFormat::Json
            } else {
                RecordFormat::Compact
            },
            journal,
            db: db.clone(),
            linger,
            inline_flush: tokio::runtime::Handle::try_current()
                .is_ok_and(|runtime| runtime.metrics().num_workers() > 1),
        };
        let syncer_stats = stats.clone();
        std::thread::Builder::new()
            .name("store-syncer".into())
            .spawn(move || run_syncer(db, rx, syncer_stats, linger))
            .map_err(|e| StoreError::Sled(sled::Error::Io(e)))?;
        Ok(store)
    }

    /// Writes new records in `format` (`store.record_format`). Cluster mode
    /// keeps JSON whatever is asked (see the `format` field).
    pub fn with_record_format(mut self, format: RecordFormat) -> Self {
        if self.journal.is_none() {
            self.format = format;
        }
        self
    }

    /// A record in this store's form.
    fn encode_record(&self, record: &RefundRecord) -> Vec<u8> {
        codec::encode(record, self.format)
    }

    /// Reads a record.
    pub fn get(&self, refund_id: &str) -> Result<Option<RefundRecord>, StoreError> {
        if let Some(pending) = self.overlay(TreeId::Refunds, refund_id.as_bytes()) {
            return pending
                .map(|bytes| decode_record(refund_id, &bytes))
                .transpose();
        }
        match self.refunds.get(refund_id.as_bytes())? {
            None => Ok(None),
            Some(bytes) => decode_record(refund_id, &bytes).map(Some),
        }
    }

    /// Reads a tombstone.
    pub fn tombstone(&self, refund_id: &str) -> Result<Option<Tombstone>, StoreError> {
        match self.tombstones.get(refund_id.as_bytes())? {
            None => Ok(None),
            Some(bytes) => decode(refund_id, &bytes).map(Some),
        }
    }

    /// The record, else the tombstone. The pruner writes a tombstone before
    /// it removes the record, so reading in this order never misses both.
    pub fn lookup(&self, refund_id: &str) -> Result<Option<Known>, StoreError> {
        if let Some(record) = self.get(refund_id)? {
            return Ok(Some(Known::Record(Box::new(record))));
        }
        Ok(self
            .tombstone(refund_id)?
            .map(|t| Known::Tombstone(Box::new(t))))
    }

    /// Claims a refund seen for the first time: inserts `record` and, when
    /// the command carries `original_amount`, reserves its amount in the
    /// ledger, both in one transaction. Not yet durable: call
    /// [`Store::sync`] before the provider call.
    pub fn claim(&self, record: &RefundRecord) -> Result<Claim, StoreError> {
        if let Some(journal) = &self.journal {
            return self.claim_replicated(journal, record);
        }
        let key = record.refund_id.as_bytes();
        let bytes = self.encode_record(record);
        let ledger = record
            .command
            .original_amount
            .map(|original| (ledger_key(&record.command), original));
        let Some(ledger) = ledger else {
            // No reservation: one compare-and-swap is the whole claim.
            return match self
                .refunds
                .compare_and_swap(key, None as Option<&[u8]>, Some(bytes))?
            {
                Ok(()) => Ok(Claim::Claimed),
                Err(cas) => match cas.current {
                    Some(existing) => Ok(Claim::Exists(Box::new(decode_record(
                        &record.refund_id,
                        &existing,
                    )?))),
                    None => Ok(Claim::Claimed),
                },
            };
        };
        let claim = (&self.refunds, &self.originals).transaction(|(refunds, originals)| {
            if let Some(existing) = refunds.get(key)? {
                let existing = decode_record(&record.refund_id, &existing).map_err(abort)?;
                return Ok(Claim::Exists(Box::new(existing)));
            }
            let (ledger_key, original) = &ledger;
            let mut entry = read_ledger(originals, ledger_key)?
                .unwrap_or_else(|| OriginalLedger::new(*original));
            if let Err(over) = entry.reserve(&record.command, *original) {
                return Ok(Claim::OverRefund(over));
            }
            originals.insert(ledger_key.as_bytes(), entry.encode())?;
            refunds.insert(key, bytes.as_slice())?;
            Ok(Claim::Claimed)
        })?;
        Ok(claim)
    }

    /// Writes a record, leaving its ledger entry as it is; not yet durable.
    /// The hot path's `Attempting` and `NotSent` writes take the short way:
    /// one insert. They never follow a state that published an event (the
    /// one such transition, an operator's "not executed", goes through
    /// [`Store::commit`], which clears the outbox mark).
    pub fn put(&self, record: &RefundRecord) -> Result<(), StoreError> {
        if record.state.event().is_some() {
            return self.commit(record, LedgerChange::Keep);
        }
        if self.journal.is_some() {
            return self.annotate(record);
        }
        self.refunds
            .insert(record.refund_id.as_bytes(), self.encode_record(record))?;
        Ok(())
    }

    /// Rewrites a record whose state did not change (a history note): its
    /// ledger entry and outbox mark stay as they are.
    pub fn annotate(&self, record: &RefundRecord) -> Result<(), StoreError> {
        if let Some(journal) = &self.journal {
            let id = &record.refund_id;
            let bytes = self.encode_record(record);
            journal.write(|w| w.put(id, TreeId::Refunds, id, Some(bytes), None));
            return Ok(());
        }
        self.refunds
            .insert(record.refund_id.as_bytes(), self.encode_record(record))?;
        Ok(())
    }

    /// Writes a record, applies `change` to its ledger entry and marks its
    /// event (if its state has one) as not yet confirmed by the broker, in
    /// one transaction; not yet durable.
    pub fn commit(&self, record: &RefundRecord, change: LedgerChange) -> Result<(), StoreError> {
        self.write_outcome(record, change, true)
    }

    /// As [`Store::commit`], without the outbox mark (an older mark of the
    /// refund goes): for the outcome of a command whose delivery stays
    /// unacked until the event's confirm. That delivery is the outbox: put
    /// back when the confirm fails, redelivered after a crash, it publishes
    /// the recorded event again. Saves two of a refund's four writes. Cluster
    /// mode marks anyway (the state log carries the mark to the replica that
    /// takes the partition over). Returns whether the outcome was marked, so
    /// that its publisher takes the mark off after the confirm.
    pub fn commit_delivered(
        &self,
        record: &RefundRecord,
        change: LedgerChange,
    ) -> Result<bool, StoreError> {
        let mark = self.journal.is_some();
        self.write_outcome(record, change, mark)?;
        Ok(mark)
    }

    fn write_outcome(
        &self,
        record: &RefundRecord,
        change: LedgerChange,
        mark: bool,
    ) -> Result<(), StoreError> {
        if let Some(journal) = &self.journal {
            return self.commit_replicated(journal, record, change);
        }
        let key = record.refund_id.as_bytes();
        let bytes = self.encode_record(record);
        let outbox = record
            .state
            .event()
            .filter(|_| mark)
            .map(|event| outbox_value(&event.event_id, unix_now()));
        let ledger = match (change, record.command.original_amount) {
            (LedgerChange::Keep, _) | (_, None) => None,
            (change, Some(_)) => Some((ledger_key(&record.command), change)),
        };
        let Some(ledger) = ledger else {
            // No ledger entry to keep in step: two plain writes, the outbox
            // mark first. sled recovers a prefix of its log, so a crash
            // can leave a mark without its record (the sweep drops it: the
            // record has no event), never a record without its mark.
            match &outbox {
                Some(value) => {
                    self.outbox.insert(key, value.as_bytes())?;
                }
                None => {
                    self.outbox.remove(key)?;
                }
            }
            self.refunds.insert(key, bytes)?;
            return Ok(());
        };
        (&self.refunds, &self.originals, &self.outbox).transaction(
            |(refunds, originals, unconfirmed)| {
                refunds.insert(key, bytes.as_slice())?;
                let (ledger_key, change) = &ledger;
                if let Some(mut entry) = read_ledger(originals, ledger_key)? {
                    if entry.apply(&record.refund_id, *change) {
                        originals.insert(ledger_key.as_bytes(), entry.encode())?;
                    }
                }
                match &outbox {
                    Some(value) => {
                        unconfirmed.insert(key, value.as_bytes())?;
                    }
                    None => {
                        unconfirmed.remove(key)?;
                    }
                }
                Ok(())
            },
        )?;
        Ok(())
    }

    /// Tombstones kept (walks the tree: not for the hot path).
    pub fn tombstone_count(&self) -> usize {
        self.tombstones.len()
    }

    /// Removes a refund's reservation from every ledger that holds one (an
    /// operator's release). Returns the amounts released. The caller checks
    /// that the refund cannot be paid any more.
    pub fn release(&self, refund_id: &str) -> Result<Vec<u64>, StoreError> {
        if let Some(journal) = &self.journal {
            return self.release_replicated(journal, refund_id);
        }
        let mut released = Vec::new();
        for item in self.originals.iter() {
            let (key, value) = item?;
            let Ok(mut ledger) = OriginalLedger::decode(&value) else {
                continue;
            };
            let Some((amount, _)) = ledger.refunds.get(refund_id).copied() else {
                continue;
            };
            ledger.apply(refund_id, LedgerChange::Release);
            if self
                .originals
                .compare_and_swap(&key, Some(value), Some(ledger.encode()))?
                .is_ok()
            {
                released.push(amount);
            }
        }
        Ok(released)
    }

    /// Waits until every write made before this call is on disk. Many
    /// concurrent callers share one flush.
    pub async fn sync(&self) -> Result<(), StoreError> {
        match &self.journal {
            Some(journal) => journal.sync(None).await,
            None => match self.flush_inline() {
                Some(done) => done,
                None => self.ask_syncer(SyncRequest::Sync).await,
            },
        }
    }

    /// As [`Store::sync`], before acting on `refund_id` (a provider call,
    /// an event). In cluster mode it also fails with
    /// [`StoreError::Fenced`] when this replica no longer owns the refund's
    /// partition.
    pub async fn sync_refund(&self, refund_id: &str) -> Result<(), StoreError> {
        match &self.journal {
            Some(journal) => journal.sync(Some(refund_id)).await,
            None => match self.flush_inline() {
                Some(done) => done,
                None => self.ask_syncer(SyncRequest::Sync).await,
            },
        }
    }

    /// The cluster journal, in cluster mode.
    pub fn journal(&self) -> Option<&Arc<Journal>> {
        self.journal.as_ref()
    }

    /// Cluster mode's bookkeeping tree.
    pub fn meta_tree(&self) -> Result<sled::Tree, StoreError> {
        Ok(self.meta.clone())
    }

    /// The local trees the state log's tailer writes (cluster mode).
    pub fn trees(&self) -> (&sled::Tree, &sled::Tree, &sled::Tree) {
        (&self.refunds, &self.originals, &self.outbox)
    }

    fn overlay(&self, tree: TreeId, key: &[u8]) -> Option<Option<Vec<u8>>> {
        self.journal.as_ref()?.overlay(tree, key)
    }

    fn claim_replicated(
        &self,
        journal: &Journal,
        record: &RefundRecord,
    ) -> Result<Claim, StoreError> {
        let id = &record.refund_id;
        journal.write(|w| {
            if let Some(existing) = w.read(TreeId::Refunds, &self.refunds, id.as_bytes())? {
                return Ok(Claim::Exists(Box::new(decode_record(id, &existing)?)));
            }
            if let Some(original) = record.command.original_amount {
                let key = ledger_key(&record.command);
                let mut entry = match w.read(TreeId::Originals, &self.originals, key.as_bytes())? {
                    Some(bytes) => {
                        OriginalLedger::decode(&bytes).map_err(|e| corrupt_ledger(&key, e))?
                    }
                    None => OriginalLedger::new(original),
                };
                if let Err(over) = entry.reserve(&record.command, original) {
                    return Ok(Claim::OverRefund(over));
                }
                let change = LedgerOp {
                    refund_id: id.clone(),
                    original_amount: entry.original_amount,
                    entry: entry.refunds.get(id).copied(),
                };
                w.put(
                    id,
                    TreeId::Originals,
                    &key,
                    Some(entry.encode()),
                    Some(change),
                );
            }
            let bytes = self.encode_record(record);
            w.put(id, TreeId::Refunds, id, Some(bytes), None);
            Ok(Claim::Claimed)
        })
    }

    fn commit_replicated(
        &self,
        journal: &Journal,
        record: &RefundRecord,
        change: LedgerChange,
    ) -> Result<(), StoreError> {
        let id = &record.refund_id;
        journal.write(|w| {
            if let (false, Some(_)) = (change == LedgerChange::Keep, record.command.original_amount)
            {
                let key = ledger_key(&record.command);
                if let Some(bytes) = w.read(TreeId::Originals, &self.originals, key.as_bytes())? {
                    let mut entry =
                        OriginalLedger::decode(&bytes).map_err(|e| corrupt_ledger(&key, e))?;
                    if entry.apply(id, change) {
                        let op = LedgerOp {
                            refund_id: id.clone(),
                            original_amount: entry.original_amount,
                            entry: entry.refunds.get(id).copied(),
                        };
                        w.put(id, TreeId::Originals, &key, Some(entry.encode()), Some(op));
                    }
                }
            }
            let mark = record
                .state
                .event()
                .map(|event| outbox_value(&event.event_id, unix_now()).into_bytes());
            w.put(id, TreeId::Outbox, id, mark, None);
            let bytes = self.encode_record(record);
            w.put(id, TreeId::Refunds, id, Some(bytes), None);
            Ok(())
        })
    }

    fn release_replicated(
        &self,
        journal: &Journal,
        refund_id: &str,
    ) -> Result<Vec<u64>, StoreError> {
        let mut released = Vec::new();
        for item in self.originals.iter() {
            let (key, _) = item?;
            let key = String::from_utf8_lossy(&key).to_string();
            journal.write(|w| -> Result<(), StoreError> {
                let Some(bytes) = w.read(TreeId::Originals, &self.originals, key.as_bytes())?
                else {
                    return Ok(());
                };
                let Ok(mut ledger) = OriginalLedger::decode(&bytes) else {
                    return Ok(());
                };
                let Some((amount, _)) = ledger.refunds.get(refund_id).copied() else {
                    return Ok(());
                };
                ledger.apply(refund_id, LedgerChange::Release);
                let op = LedgerOp {
                    refund_id: refund_id.to_string(),
                    original_amount: ledger.original_amount,
                    entry: None,
                };
                w.put(
                    refund_id,
                    TreeId::Originals,
                    &key,
                    Some(ledger.encode()),
                    Some(op),
                );
                released.push(amount);
                Ok(())
            })?;
        }
        Ok(released)
    }

    /// Iterates over all records (for operators; not on the hot path).
    pub fn records(&self) -> impl Iterator<Item = Result<RefundRecord, StoreError>> + '_ {
        self.refunds.iter().map(|item| {
            let (key, value) = item?;
            decode_record(&String::from_utf8_lossy(&key), &value)
        })
    }

    /// Iterates over all tombstones (for operators; not on the hot path).
    pub fn tombstones(&self) -> impl Iterator<Item = Result<(String, Tombstone), StoreError>> + '_ {
        self.tombstones.iter().map(|item| {
            let (key, value) = item?;
            let refund_id = String::from_utf8_lossy(&key).to_string();
            decode(&refund_id, &value).map(|t| (refund_id, t))
        })
    }

    /// The store's gauges and the overdue pending refunds, in one walk of
    /// the records that reads only their state (not the whole record: the
    /// walk runs every few seconds over every record kept). Blocking.
    pub fn census(&self, limit: impl Fn(&str) -> Option<Duration>) -> Result<Census, StoreError> {
        let now = OffsetDateTime::now_utc();
        let mut census = Census::default();
        for item in self.refunds.iter() {
            let (key, value) = item?;
            let peek = codec::glance(&value).map_err(|source| StoreError::Corrupt {
                refund_id: String::from_utf8_lossy(&key).to_string(),
                source,
            })?;
            census.records += 1;
            match peek.state.as_ref() {
                "in_doubt" => census.in_doubt += 1,
                "attempting" | "not_sent" => census.unfinished += 1,
                "pending" => {
                    let since = peek.since.as_deref().unwrap_or_default();
                    let waited = OffsetDateTime::parse(since, &Rfc3339).map(|t| now - t);
                    if let (Ok(waited), Some(limit)) = (waited, limit(&peek.provider)) {
                        if waited.unsigned_abs() > limit {
                            census
                                .overdue
                                .push(String::from_utf8_lossy(&key).to_string());
                        }
                    }
                }
                _ => {}
            }
        }
        Ok(census)
    }

    /// Pending refunds whose wait exceeds `limit(provider)` (the census's
    /// list). Blocking: walks the tree.
    pub fn pending_overdue(
        &self,
        limit: impl Fn(&str) -> Option<Duration>,
    ) -> Result<Vec<String>, StoreError> {
        Ok(self.census(limit)?.overdue)
    }

    /// Records stored.
    pub fn len(&self) -> usize {
        self.refunds.len()
    }

    /// Whether no record is stored.
    pub fn is_empty(&self) -> bool {
        self.refunds.is_empty()
    }

    /// The ledger of a command's original charge, if any.
    pub fn ledger(&self, command: &RefundCommand) -> Result<Option<OriginalLedger>, StoreError> {
        let key = ledger_key(command);
        if let Some(pending) = self.overlay(TreeId::Originals, key.as_bytes()) {
            return pending
                .map(|bytes| OriginalLedger::decode(&bytes).map_err(|e| corrupt_ledger(&key, e)))
                .transpose();
        }
        match self.originals.get(key.as_bytes())? {
            Some(bytes) => OriginalLedger::decode(&bytes)
                .map(Some)
                .map_err(|source| corrupt_ledger(&key, source)),
            None => Ok(None),
        }
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

    /// At light load (the syncer's last flush served fewer than four
    /// writers) and when no flush is under way, the writer flushes itself
    /// on its own thread: handing a lone request to the syncer and back
    /// costs two thread wake-ups, 0.5 ms of a refund's 52 at 50 ms provider
    /// latency. The flush blocks the runtime thread for about 0.3 ms; under
    /// load the syncer's batches take over, which cost far less per writer.
    /// Only on a runtime with more than one thread (`runtime.worker_threads`:
    /// up to prefetch 32 the runtime has one, and every flush is the
    /// syncer's).
    fn flush_inline(&self) -> Option<Result<(), StoreError>> {
        if !self.inline_flush || !self.linger.is_zero() || self.stats.busy() {
            return None;
        }
        let _flushing = self.stats.flushing.try_lock().ok()?;
        let result = self.db.flush().map(|_| ()).map_err(StoreError::Sled);
        self.stats.count_flush(1);
        Some(result)
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

fn encode<T: serde::Serialize>(value: &T) -> Vec<u8> {
    // Serialising plain data with serde_json cannot fail.
    serde_json::to_vec(value).unwrap_or_default()
}

fn decode<T: serde::de::DeserializeOwned>(refund_id: &str, bytes: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(bytes).map_err(|source| StoreError::Corrupt {
        refund_id: refund_id.to_string(),
        source: source.into(),
    })
}

/// A record in either of its forms (`codec.rs`).
fn decode_record(refund_id: &str, bytes: &[u8]) -> Result<RefundRecord, StoreError> {
    codec::decode(bytes).map_err(|source| StoreError::Corrupt {
        refund_id: refund_id.to_string(),
        source,
    })
}

fn corrupt_ledger(key: &str, source: serde_json::Error) -> StoreError {
    StoreError::Corrupt {
        refund_id: format!("ledger {key}"),
        source: source.into(),
    }
}

fn abort(e: StoreError) -> ConflictableTransactionError<StoreError> {
    ConflictableTransactionError::Abort(e)
}

fn read_ledger(originals: &Tx, key: &str) -> TxResult<Option<OriginalLedger>> {
    match originals.get(key.as_bytes())? {
        Some(bytes) => OriginalLedger::decode(&bytes)
            .map(Some)
            .map_err(|source| abort(corrupt_ledger(key, source))),
        None => Ok(None),
    }
}

pub(super) fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{OutcomeEvent, Status};
    use std::sync::atomic::Ordering;

    fn command(id: &str) -> RefundCommand {
        RefundCommand::parse(
            format!(r#"{{"refund_id":"{id}","provider":"p","transaction":{{"id":"1"}}}}"#)
                .as_bytes(),
        )
        .expect("command")
    }

    fn refund_of_original(id: &str, minor: u64) -> RefundCommand {
        RefundCommand::parse(
            format!(
                r#"{{"refund_id":"{id}","provider":"p","transaction":{{"id":"9"}},"amount":{{"minor":{minor},"currency":"ILS"}},"original_amount":10000}}"#
            )
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
            assert_eq!(store.claim(&record).expect("claim"), Claim::Claimed);
            match store.claim(&record).expect("claim") {
                Claim::Exists(again) => assert_eq!(again.state.name(), "attempting"),
                other => panic!("{other:?}"),
            }
            store.close().await.expect("close");
        }
        let store = Store::open(dir.path()).expect("reopen");
        let record = store.get("r1").expect("get").expect("present");
        assert_eq!(record.attempts, 1);
        assert_eq!(store.records().count(), 1);
    }

    #[tokio::test]
    async fn records_in_either_form_are_read_counted_and_rewritten() {
        let dir = tempfile::tempdir().expect("tempdir");
        let compact = Store::open(dir.path()).expect("open");
        let json = compact.clone().with_record_format(RecordFormat::Json);
        let first_byte = |id: &str| compact.refunds.get(id).expect("io").expect("present")[0];
        // As an older version (or `record_format = "json"`) wrote it.
        let old = RefundRecord::attempting(&command("old"));
        assert_eq!(json.claim(&old).expect("claim"), Claim::Claimed);
        let new = RefundRecord::attempting(&command("new"));
        assert_eq!(compact.claim(&new).expect("claim"), Claim::Claimed);
        assert_eq!(first_byte("old"), b'{');
        assert_eq!(first_byte("new"), 1);
        for store in [&compact, &json] {
            assert_eq!(store.get("old").expect("get"), Some(old.clone()));
            assert_eq!(store.get("new").expect("get"), Some(new.clone()));
            assert_eq!(store.records().count(), 2);
            assert_eq!(store.census(|_| None).expect("census").unfinished, 2);
            match store.claim(&old).expect("claim") {
                Claim::Exists(existing) => assert_eq!(*existing, old),
                other => panic!("{other:?}"),
            }
        }
        // Written again, a record takes the writer's form.
        compact.put(&old).expect("put");
        assert_eq!(first_byte("old"), 1);
        json.put(&new).expect("put");
        assert_eq!(first_byte("new"), b'{');
        // Cluster mode keeps JSON whatever is asked: replicas of an older
        // version may read the state log.
        let replicated = tempfile::tempdir().expect("tempdir");
        let replica = Store::open_replicated(
            replicated.path(),
            Journal::new(1, Duration::from_secs(1)),
            DEFAULT_CACHE,
        )
        .expect("open")
        .with_record_format(RecordFormat::Compact);
        assert_eq!(replica.format, RecordFormat::Json);
    }

    #[tokio::test]
    async fn claim_reserves_and_the_outcome_settles_in_the_same_write() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("open");
        let a = RefundRecord::attempting(&refund_of_original("a", 6000));
        assert_eq!(store.claim(&a).expect("claim"), Claim::Claimed);
        let b = RefundRecord::attempting(&refund_of_original("b", 5000));
        match store.claim(&b).expect("claim") {
            Claim::OverRefund(over) => assert_eq!(over.reserved, 6000),
            other => panic!("{other:?}"),
        }
        // Refused: no record was written for b.
        assert!(store.get("b").expect("get").is_none());
        // a is declined: the record and the release land together.
        let mut declined = a.clone();
        let event = OutcomeEvent::new("a", Status::Failed, &Default::default(), 1);
        declined.state = RefundState::Finished { event };
        store
            .commit(&declined, LedgerChange::Release)
            .expect("commit");
        let ledger = store
            .ledger(&declined.command)
            .expect("io")
            .expect("ledger");
        assert_eq!(ledger.reserved(), 0);
        assert_eq!(store.claim(&b).expect("claim"), Claim::Claimed);
        // Releasing by id (operator) finds b's reservation.
        assert_eq!(store.release("b").expect("release"), vec![5000]);
        assert!(store.release("b").expect("release").is_empty());
    }

    #[tokio::test]
    async fn the_outbox_holds_each_refund_s_latest_event_until_confirmed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("open");
        let mut record = RefundRecord::attempting(&command("r1"));
        assert_eq!(store.claim(&record).expect("claim"), Claim::Claimed);
        assert_eq!(store.unconfirmed_len(), 0);
        let pending = OutcomeEvent::new("r1", Status::Pending, &Default::default(), 1);
        record.state = RefundState::Pending {
            event: pending.clone(),
            since: crate::event::now_rfc3339(),
        };
        store.commit(&record, LedgerChange::Keep).expect("commit");
        let done = OutcomeEvent::new("r1", Status::Succeeded, &Default::default(), 1);
        record.state = RefundState::Finished {
            event: done.clone(),
        };
        store.commit(&record, LedgerChange::Keep).expect("commit");
        // A late confirm of the older event does not clear the newer one.
        store.mark_published("r1", &pending.event_id).expect("mark");
        let waiting = store.unconfirmed(Duration::ZERO).expect("outbox");
        assert_eq!(waiting.len(), 1);
        assert_eq!(waiting[0].event_id, done.event_id);
        assert!(store
            .unconfirmed(Duration::from_secs(3600))
            .expect("outbox")
            .is_empty());
        store.mark_published("r1", &done.event_id).expect("mark");
        assert_eq!(store.unconfirmed_len(), 0);
    }

    #[tokio::test]
    async fn the_census_reads_states_and_finds_overdue_pending_refunds() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("open");
        let event = |id: &str| OutcomeEvent::new(id, Status::Pending, &Default::default(), 1);
        let put = |id: &str, state: RefundState| {
            let mut record = RefundRecord::attempting(&command(id));
            record.state = state;
            store.put(&record).expect("put");
        };
        put("a", RefundState::Attempting { since: "x".into() });
        put("n", RefundState::NotSent { reason: "r".into() });
        put("d", RefundState::InDoubt { event: event("d") });
        put("f", RefundState::Finished { event: event("f") });
        put(
            "late",
            RefundState::Pending {
                event: event("late"),
                since: "2020-01-01T00:00:00Z".into(),
            },
        );
        put(
            "fresh",
            RefundState::Pending {
                event: event("fresh"),
                since: crate::event::now_rfc3339(),
            },
        );
        let census = store
            .census(|provider| (provider == "p").then_some(Duration::from_secs(3600)))
            .expect("census");
        assert_eq!(
            census,
            Census {
                records: 6,
                in_doubt: 1,
                unfinished: 2,
                overdue: vec!["late".to_string()],
            }
        );
        // `pending_overdue` answers with the census's list.
        let overdue = store
            .pending_overdue(|_| Some(Duration::from_secs(3600)))
            .expect("overdue");
        assert_eq!(overdue, census.overdue);
        // No limit for the account: never overdue.
        assert!(store.census(|_| None).expect("census").overdue.is_empty());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn one_flush_serves_many_concurrent_syncs() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("open");
        write_and_sync(&store, 200, false).await;
        let flushes = store.stats().flushes.load(Ordering::Relaxed);
        let requests = store.stats().requests.load(Ordering::Relaxed);
        assert_eq!(requests, 200);
        assert!(flushes < requests, "flushes {flushes} for {requests} syncs");
    }

    /// On a one-thread runtime no writer flushes on its own thread: that
    /// would stop every other task for the flush, so that each sync ended
    /// up alone. The syncer batches them instead.
    #[tokio::test(flavor = "current_thread")]
    async fn on_one_runtime_thread_the_syncer_does_the_flushes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("open");
        write_and_sync(&store, 50, true).await;
        let flushes = store.stats().flushes.load(Ordering::Relaxed);
        assert!(flushes < 25, "{flushes} flushes for 50 syncs");
    }

    /// `n` concurrent tasks, each writing a record and waiting for its sync
    /// (`sync_refund`, which may flush on the writer's thread, or `sync`).
    async fn write_and_sync(store: &Store, n: usize, per_refund: bool) {
        let mut tasks = Vec::new();
        for i in 0..n {
            let store = store.clone();
            tasks.push(tokio::spawn(async move {
                let id = format!("r{i}");
                store
                    .put(&RefundRecord::attempting(&command(&id)))
                    .expect("put");
                if per_refund {
                    store.sync_refund(&id).await.expect("sync");
                } else {
                    store.sync().await.expect("sync");
                }
            }));
        }
        for t in tasks {
            t.await.expect("task");
        }
    }
}

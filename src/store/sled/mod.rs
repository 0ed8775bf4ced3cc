//! The embedded backend: sled in `store.path`, owned by one worker process
//! (sled locks the directory), with a group-commit syncer that makes writes
//! durable without one `fsync` per message.
//!
//! Durability: sled keeps writes in memory until `flush()`. Callers that need
//! a write on disk before they go on (before a provider call, before an event
//! is published) call [`SledStore::sync`], which hands the request to the
//! syncer (`syncer.rs`): one disk sync serves every message written
//! meanwhile (at light load the caller flushes itself, which saves two
//! thread wake-ups).
//!
//! Trees: `refunds` (one record per refund, `codec.rs`), `tombstones` (what
//! is left of a finished refund after `store.retention`), `originals` (the
//! over-refund ledger, one entry per original charge) and `outbox` (refunds
//! whose latest event the broker has not confirmed yet). A record and its
//! ledger entry and outbox mark change in one sled transaction, so a crash
//! never leaves them disagreeing.
//!
//! One process writes at a time and the worker serialises each refund in
//! process (`worker/locks.rs`), so writes here need no compare-and-swap on
//! a record's revision.

mod outbox;
pub mod prune;
pub mod syncer;

use super::codec::{self, DecodeError, RecordFormat};
use super::ledger::{self, ledger_key, LedgerChange, Limit, OriginalLedger, Reservation};
use super::{Census, Claim, Known, PaidReservation, RefundRecord, StoreError, Tombstone};
use crate::contract::command::RefundCommand;
use crate::contract::report::ReportRow;
use ::sled::transaction::{ConflictableTransactionError, TransactionError, Transactional};
use outbox::outbox_value;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;
use syncer::{run_syncer, SyncReply, SyncRequest, SyncStats};
use time::format_description::well_known::Rfc3339;
use time::{Date, OffsetDateTime};
use tokio::sync::oneshot;

/// Everything a sled store holds (`store copy`).
#[derive(Debug, Default)]
pub struct Export {
    /// Every readable record.
    pub records: Vec<RefundRecord>,
    /// Every readable tombstone, by refund id.
    pub tombstones: Vec<(String, Tombstone)>,
    /// Every readable ledger, by key.
    pub ledgers: Vec<(String, OriginalLedger)>,
    /// Every outbox mark.
    pub outbox: Vec<super::OutboxEntry>,
    /// Entries that could not be read.
    pub unreadable: Vec<String>,
}

/// How the sled store is opened.
#[derive(Debug, Clone, Copy)]
pub struct SledOptions {
    /// `store.group_commit_linger_us`: how long the syncer waits after the
    /// first request of a batch for more writers (0: adaptive).
    pub linger: Duration,
    /// sled's page cache (`store.cache_mib`).
    pub cache_bytes: u64,
    /// The form new records are written in (`store.record_format`).
    pub format: RecordFormat,
}

impl Default for SledOptions {
    fn default() -> Self {
        SledOptions {
            linger: Duration::ZERO,
            cache_bytes: 32 << 20,
            format: RecordFormat::Compact,
        }
    }
}

/// Handle to the sled store; cheap to clone.
#[derive(Debug, Clone)]
pub struct SledStore {
    shared: Arc<Shared>,
}

/// What every handle shares.
#[derive(Debug)]
struct Shared {
    /// The open trees; `None` once closed, so that [`SledStore::close`] can
    /// let go of the database whatever handles are still around.
    open: RwLock<Option<Arc<Trees>>>,
    path: PathBuf,
    syncer: std::sync::mpsc::Sender<SyncRequest>,
    stats: Arc<SyncStats>,
    /// `store.group_commit_linger_us`: a configured wait is always the
    /// syncer's.
    linger: Duration,
    /// Whether a lone writer may flush on its own thread: only when the
    /// runtime has another thread to run every other task meanwhile. On a
    /// one-thread runtime the flush would stop them all, and every sync
    /// would end up alone (2 syncs per refund, half the throughput); the
    /// syncer does every flush there.
    inline_flush: bool,
    format: RecordFormat,
}

#[derive(Debug)]
struct Trees {
    db: ::sled::Db,
    refunds: ::sled::Tree,
    tombstones: ::sled::Tree,
    originals: ::sled::Tree,
    outbox: ::sled::Tree,
}

type Tx = ::sled::transaction::TransactionalTree;
type TxResult<T> = Result<T, ConflictableTransactionError<StoreError>>;

impl From<TransactionError<StoreError>> for StoreError {
    fn from(e: TransactionError<StoreError>) -> Self {
        match e {
            TransactionError::Abort(e) => e,
            TransactionError::Storage(e) => StoreError::Sled(e),
        }
    }
}

impl SledStore {
    /// Opens (or creates) the store at `path` and starts its syncer thread.
    /// Must be called inside a tokio runtime.
    pub fn open(path: &Path, options: SledOptions) -> Result<Self, StoreError> {
        let db = ::sled::Config::new()
            .path(path)
            // The background flush is a safety net only; durability points
            // are explicit `sync()` calls.
            .flush_every_ms(Some(1000))
            .cache_capacity(options.cache_bytes)
            .open()?;
        let trees = Trees {
            refunds: db.open_tree("refunds")?,
            tombstones: db.open_tree("tombstones")?,
            originals: db.open_tree("originals")?,
            outbox: db.open_tree("outbox")?,
            db: db.clone(),
        };
        let stats = Arc::new(SyncStats::default());
        let (tx, rx) = std::sync::mpsc::channel();
        let syncer_stats = stats.clone();
        let linger = options.linger;
        std::thread::Builder::new()
            .name("store-syncer".into())
            .spawn(move || run_syncer(db, rx, syncer_stats, linger))
            .map_err(|e| StoreError::Sled(::sled::Error::Io(e)))?;
        Ok(SledStore {
            shared: Arc::new(Shared {
                open: RwLock::new(Some(Arc::new(trees))),
                path: path.to_path_buf(),
                syncer: tx,
                stats,
                linger,
                inline_flush: tokio::runtime::Handle::try_current()
                    .is_ok_and(|runtime| runtime.metrics().num_workers() > 1),
                format: options.format,
            }),
        })
    }

    fn trees(&self) -> Result<Arc<Trees>, StoreError> {
        self.shared
            .open
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .ok_or_else(|| StoreError::Unavailable("the store is closed".into()))
    }

    /// Runs `work` on the blocking pool (walks over whole trees).
    pub(super) async fn blocking<T: Send + 'static>(
        self,
        work: impl FnOnce(&SledStore) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        tokio::task::spawn_blocking(move || work(&self))
            .await
            .map_err(|e| StoreError::Unavailable(format!("store task failed: {e}")))?
    }

    fn encode_record(&self, record: &RefundRecord) -> Vec<u8> {
        codec::encode(record, self.shared.format)
    }

    /// Reads a record.
    pub fn get(&self, refund_id: &str) -> Result<Option<RefundRecord>, StoreError> {
        match self.trees()?.refunds.get(refund_id.as_bytes())? {
            None => Ok(None),
            Some(bytes) => decode_record(refund_id, &bytes).map(Some),
        }
    }

    /// Reads a tombstone.
    pub fn tombstone(&self, refund_id: &str) -> Result<Option<Tombstone>, StoreError> {
        match self.trees()?.tombstones.get(refund_id.as_bytes())? {
            None => Ok(None),
            Some(bytes) => decode(refund_id, &bytes).map(Some),
        }
    }

    /// Writes the tombstone of a pruned refund as the pruner does (not yet
    /// durable): for the benchmark's size measurement of a store's
    /// tombstones (`refund-bench tombstones`).
    pub fn put_tombstone(&self, refund_id: &str, tombstone: &Tombstone) -> Result<(), StoreError> {
        self.trees()?
            .tombstones
            .insert(refund_id.as_bytes(), encode(tombstone))?;
        Ok(())
    }

    /// The record, else the tombstone (see [`super::Store::lookup`]).
    pub fn lookup(&self, refund_id: &str) -> Result<Option<Known>, StoreError> {
        if let Some(record) = self.get(refund_id)? {
            return Ok(Some(Known::Record(Box::new(record))));
        }
        Ok(self
            .tombstone(refund_id)?
            .map(|t| Known::Tombstone(Box::new(t))))
    }

    /// See [`super::Store::claim`]. Not yet durable.
    pub fn claim(&self, record: &RefundRecord) -> Result<Claim, StoreError> {
        let trees = self.trees()?;
        let key = record.refund_id.as_bytes();
        let bytes = self.encode_record(record);
        let Some(Limit {
            key: ledger_key,
            cap: original,
        }) = ledger::claim_limit(record)
        else {
            // No reservation: one compare-and-swap is the whole claim.
            return match trees
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
        let claim = (&trees.refunds, &trees.originals).transaction(|(refunds, originals)| {
            if let Some(existing) = refunds.get(key)? {
                let existing = decode_record(&record.refund_id, &existing).map_err(abort)?;
                return Ok(Claim::Exists(Box::new(existing)));
            }
            let mut entry = read_ledger(originals, &ledger_key)?
                .unwrap_or_else(|| OriginalLedger::new(original));
            if let Err(over) = entry.reserve(&record.command, original) {
                return Ok(Claim::OverRefund(over));
            }
            originals.insert(ledger_key.as_bytes(), entry.encode())?;
            refunds.insert(key, bytes.as_slice())?;
            Ok(Claim::Claimed)
        })?;
        Ok(claim)
    }

    /// See [`super::Store::insert_settled`].
    pub fn insert_settled(&self, record: &RefundRecord) -> Result<Claim, StoreError> {
        let trees = self.trees()?;
        let key = record.refund_id.as_bytes();
        let bytes = self.encode_record(record);
        let mark = record
            .state
            .event()
            .map(|event| outbox_value(&event.event_id, super::unix_now()));
        let claim = (&trees.refunds, &trees.outbox).transaction(|(refunds, unconfirmed)| {
            if let Some(existing) = refunds.get(key)? {
                let existing = decode_record(&record.refund_id, &existing).map_err(abort)?;
                return Ok(Claim::Exists(Box::new(existing)));
            }
            refunds.insert(key, bytes.as_slice())?;
            if let Some(value) = &mark {
                unconfirmed.insert(key, value.as_bytes())?;
            }
            Ok(Claim::Claimed)
        })?;
        Ok(claim)
    }

    /// Writes a record without an event, leaving its ledger entry and
    /// outbox mark as they are; not yet durable. The hot path's
    /// `Attempting` and `NotSent` writes take the short way: one insert.
    /// They never follow a state whose event is unconfirmed (the one such
    /// transition, an operator's "not executed", commits).
    pub fn put(&self, record: &RefundRecord) -> Result<(), StoreError> {
        self.trees()?
            .refunds
            .insert(record.refund_id.as_bytes(), self.encode_record(record))?;
        Ok(())
    }

    /// Rewrites a record whose state did not change (a history note).
    pub fn annotate(&self, record: &RefundRecord) -> Result<(), StoreError> {
        self.put(record)
    }

    /// Writes a record, applies `change` to its ledger entry and marks its
    /// event (if its state has one) as not yet confirmed, in one
    /// transaction; not yet durable.
    pub fn commit(&self, record: &RefundRecord, change: LedgerChange) -> Result<(), StoreError> {
        let trees = self.trees()?;
        let key = record.refund_id.as_bytes();
        let bytes = self.encode_record(record);
        let mark = record
            .state
            .event()
            .map(|event| outbox_value(&event.event_id, super::unix_now()));
        let ledger = match (change, ledger::record_key(record)) {
            (LedgerChange::Keep, _) | (_, None) => None,
            (change, Some(key)) => Some((key, change)),
        };
        let Some((ledger_key, change)) = ledger else {
            // No ledger entry to keep in step: two plain writes, the outbox
            // mark first. sled recovers a prefix of its log, so a crash
            // can leave a mark without its record (the sweep drops it: the
            // record has no event), never a record without its mark.
            match &mark {
                Some(value) => trees.outbox.insert(key, value.as_bytes())?,
                None => trees.outbox.remove(key)?,
            };
            trees.refunds.insert(key, bytes)?;
            return Ok(());
        };
        (&trees.refunds, &trees.originals, &trees.outbox).transaction(
            |(refunds, originals, unconfirmed)| {
                refunds.insert(key, bytes.as_slice())?;
                let mut entry = read_ledger(originals, &ledger_key)?;
                if entry.is_none() && matches!(change, LedgerChange::Restore(_)) {
                    entry = Some(OriginalLedger::new(ledger::restore_cap(record)));
                }
                if let Some(mut entry) = entry {
                    if entry.apply(&record.command, change) {
                        originals.insert(ledger_key.as_bytes(), entry.encode())?;
                    }
                }
                match &mark {
                    Some(value) => unconfirmed.insert(key, value.as_bytes())?,
                    None => unconfirmed.remove(key)?,
                };
                Ok(())
            },
        )?;
        Ok(())
    }

    /// See [`super::Store::release`].
    pub fn release(
        &self,
        refund_id: &str,
    ) -> Result<Result<Vec<u64>, PaidReservation>, StoreError> {
        let trees = self.trees()?;
        let mut held = Vec::new();
        for item in trees.originals.iter() {
            let (key, value) = item?;
            let Ok(ledger) = OriginalLedger::decode(&value) else {
                continue;
            };
            if let Some((amount, state)) = ledger.refunds.get(refund_id).copied() {
                if state == Reservation::Succeeded {
                    return Ok(Err(PaidReservation { amount }));
                }
                held.push((key, value, ledger));
            }
        }
        let mut released = Vec::new();
        for (key, value, mut ledger) in held {
            let Some((amount, _)) = ledger.refunds.remove(refund_id) else {
                continue;
            };
            ledger.updated_at = crate::contract::event::now_rfc3339();
            if trees
                .originals
                .compare_and_swap(&key, Some(value), Some(ledger.encode()))?
                .is_ok()
            {
                released.push(amount);
            }
        }
        Ok(Ok(released))
    }

    /// Waits until every write made before this call is on disk. Many
    /// concurrent callers share one flush.
    pub async fn sync(&self, _refund_id: &str) -> Result<(), StoreError> {
        match self.flush_inline() {
            Some(done) => done,
            None => self.ask_syncer(SyncRequest::Sync).await,
        }
    }

    /// Records whose status is `status` (any when `None`), at most
    /// `limit`. Blocking.
    pub fn list(
        &self,
        status: Option<&str>,
        limit: usize,
    ) -> Result<Vec<RefundRecord>, StoreError> {
        let mut out = Vec::new();
        for item in self.trees()?.refunds.iter() {
            let (key, value) = item?;
            let record = decode_record(&String::from_utf8_lossy(&key), &value)?;
            if status.is_none_or(|s| s == record.status()) {
                out.push(record);
                if out.len() >= limit {
                    break;
                }
            }
        }
        Ok(out)
    }

    /// The report over every record and tombstone. Blocking. Unreadable
    /// entries are left out (the pruning pass reports them).
    pub fn report(&self, from: Date, to: Date) -> Result<Vec<ReportRow>, StoreError> {
        let trees = self.trees()?;
        let records = trees
            .refunds
            .iter()
            .filter_map(|item| item.ok())
            .filter_map(|(key, value)| decode_record(&String::from_utf8_lossy(&key), &value).ok());
        let tombstones = trees.tombstones.iter().filter_map(|item| {
            let (key, value) = item.ok()?;
            let refund_id = String::from_utf8_lossy(&key).to_string();
            decode::<Tombstone>(&refund_id, &value)
                .ok()
                .map(|t| (refund_id, t))
        });
        Ok(crate::store::report::tally(records, tombstones, from, to))
    }

    /// The store's gauges and the overdue pending refunds, in one walk of
    /// the records that reads only their state (not the whole record: the
    /// walk runs every few seconds over every record kept). Blocking.
    pub fn census(&self, limit: impl Fn(&str) -> Option<Duration>) -> Result<Census, StoreError> {
        let trees = self.trees()?;
        let now = OffsetDateTime::now_utc();
        let mut census = Census {
            tombstones: trees.tombstones.len(),
            unconfirmed: trees.outbox.len(),
            ..Census::default()
        };
        for item in trees.refunds.iter() {
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

    /// The ledger of a command's original charge, if any.
    pub fn ledger(&self, command: &RefundCommand) -> Result<Option<OriginalLedger>, StoreError> {
        let key = ledger_key(command);
        match self.trees()?.originals.get(key.as_bytes())? {
            Some(bytes) => OriginalLedger::decode(&bytes)
                .map(Some)
                .map_err(|source| corrupt_ledger(&key, source)),
            None => Ok(None),
        }
    }

    /// Everything the store holds, for a copy into another backend.
    /// Blocking walks, on the blocking pool.
    pub async fn export_all(self) -> Result<Export, StoreError> {
        tokio::task::spawn_blocking(move || self.export())
            .await
            .map_err(|e| StoreError::Unavailable(format!("store task failed: {e}")))?
    }

    fn export(&self) -> Result<Export, StoreError> {
        let trees = self.trees()?;
        let mut export = Export::default();
        for item in trees.refunds.iter() {
            let (key, value) = item?;
            let id = String::from_utf8_lossy(&key).to_string();
            match decode_record(&id, &value) {
                Ok(record) => export.records.push(record),
                Err(_) => export.unreadable.push(id),
            }
        }
        for item in trees.tombstones.iter() {
            let (key, value) = item?;
            let id = String::from_utf8_lossy(&key).to_string();
            match decode::<Tombstone>(&id, &value) {
                Ok(t) => export.tombstones.push((id, t)),
                Err(_) => export.unreadable.push(format!("tombstone {id}")),
            }
        }
        for item in trees.originals.iter() {
            let (key, value) = item?;
            let key = String::from_utf8_lossy(&key).to_string();
            match OriginalLedger::decode(&value) {
                Ok(ledger) => export.ledgers.push((key, ledger)),
                Err(_) => export.unreadable.push(format!("ledger {key}")),
            }
        }
        for item in trees.outbox.iter() {
            let (key, value) = item?;
            if let Some(entry) = outbox::parse_outbox(&String::from_utf8_lossy(&key), &value) {
                export.outbox.push(entry);
            }
        }
        Ok(export)
    }

    /// Syncer counters.
    pub fn stats(&self) -> &SyncStats {
        &self.shared.stats
    }

    /// Flushes, stops the syncer, lets go of the database and waits until
    /// sled has released the directory's lock (its I/O threads may still
    /// hold the files for a moment after the last handle goes).
    pub async fn close(&self) -> Result<(), StoreError> {
        let flushed = self.ask_syncer(SyncRequest::Close).await;
        let trees = self
            .shared
            .open
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        let lock = self.shared.path.join("db");
        tokio::task::spawn_blocking(move || {
            if let Some(trees) = trees {
                // Operations under way hold the trees for microseconds.
                let mut trees = trees;
                loop {
                    match Arc::try_unwrap(trees) {
                        Ok(owned) => {
                            drop(owned);
                            break;
                        }
                        Err(shared) => {
                            trees = shared;
                            std::thread::sleep(Duration::from_millis(1));
                        }
                    }
                }
            }
            wait_for_unlock(&lock)
        })
        .await
        .map_err(|e| StoreError::Unavailable(format!("closing the store: {e}")))??;
        flushed
    }

    /// At light load (the syncer's last flush served fewer than four
    /// writers) and when no flush is under way, the writer flushes itself
    /// on its own thread: handing a lone request to the syncer and back
    /// costs two thread wake-ups, 0.5 ms of a refund's 52 at 50 ms provider
    /// latency. The flush blocks the runtime thread for about 0.3 ms; under
    /// load the syncer's batches take over, which cost far less per writer.
    fn flush_inline(&self) -> Option<Result<(), StoreError>> {
        let shared = &self.shared;
        if !shared.inline_flush || !shared.linger.is_zero() || shared.stats.busy() {
            return None;
        }
        let trees = match self.trees() {
            Ok(trees) => trees,
            Err(e) => return Some(Err(e)),
        };
        let _flushing = shared.stats.flushing.try_lock().ok()?;
        let result = trees.db.flush().map(|_| ()).map_err(StoreError::Sled);
        shared.stats.count_flush(1);
        Some(result)
    }

    async fn ask_syncer(&self, request: fn(SyncReply) -> SyncRequest) -> Result<(), StoreError> {
        let gone = || StoreError::Unavailable("the store's syncer has stopped".into());
        let (tx, rx) = oneshot::channel();
        self.shared.syncer.send(request(tx)).map_err(|_| gone())?;
        match rx.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(message)) => Err(StoreError::Sled(::sled::Error::Io(std::io::Error::other(
                message,
            )))),
            Err(_) => Err(gone()),
        }
    }
}

/// Waits (up to a minute) until the lock sled holds on `db` is free, then
/// lets it go again.
fn wait_for_unlock(db_file: &Path) -> Result<(), StoreError> {
    let Ok(file) = std::fs::OpenOptions::new().read(true).open(db_file) else {
        return Ok(());
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        match file.try_lock() {
            Ok(()) => {
                let _ = file.unlock();
                return Ok(());
            }
            Err(std::fs::TryLockError::WouldBlock) if std::time::Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => {
                return Err(StoreError::Unavailable(format!(
                    "the store's lock on {} was not released: {e}",
                    db_file.display()
                )))
            }
        }
    }
}

pub(super) fn encode<T: serde::Serialize>(value: &T) -> Vec<u8> {
    // Serialising plain data with serde_json cannot fail.
    serde_json::to_vec(value).unwrap_or_default()
}

pub(super) fn decode<T: serde::de::DeserializeOwned>(
    refund_id: &str,
    bytes: &[u8],
) -> Result<T, StoreError> {
    serde_json::from_slice(bytes).map_err(|source| StoreError::Corrupt {
        refund_id: refund_id.to_string(),
        source: source.into(),
    })
}

/// A record in either of its forms (`codec.rs`).
pub(super) fn decode_record(refund_id: &str, bytes: &[u8]) -> Result<RefundRecord, StoreError> {
    codec::decode(bytes).map_err(|source| StoreError::Corrupt {
        refund_id: refund_id.to_string(),
        source,
    })
}

fn corrupt_ledger(key: &str, source: serde_json::Error) -> StoreError {
    StoreError::Corrupt {
        refund_id: format!("ledger {key}"),
        source: DecodeError::from(source),
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

#[cfg(test)]
mod tests;

//! Cluster mode's store: the replicated log is the authority, sled is a
//! local copy of it.
//!
//! In single-node mode a write goes to sled and `sync()` flushes it. In
//! cluster mode (`src/cluster/`) every write becomes an [`Op`] appended to
//! the deployment's state log (a RabbitMQ stream), and counts as durable
//! once this replica has *read it back* from the log and found it valid:
//!
//! - **Only the log writes sled.** The tailer (`cluster/log.rs`) applies
//!   every valid op, this replica's and the others', in log order, so every
//!   replica's sled holds the whole deployment's state (that is what lets
//!   `refunds show` answer anywhere and a new owner start at once).
//! - **The overlay.** Until its op is read back, a write is visible to this
//!   replica through an in-memory overlay (reads look there first), so the
//!   pipeline reads its own writes as before. Reading an op back removes it
//!   from the overlay whether it was valid or not: a rejected write simply
//!   disappears and sled shows the truth.
//! - **Fencing by log order.** Each op carries the writer's ownership token
//!   for the refund's partition. A new owner appends a marker with a fresh
//!   token and reads the log up to it before it handles anything; an op is
//!   valid only when the latest marker before it in the log names its
//!   token. An owner that lost its partition learns it at its next sync and
//!   stops before the provider call or the event ([`StoreError::Fenced`]).
//!
//! Over-refund ledgers are keyed by the original charge, so two partitions
//! can write one ledger: ledger ops carry only the one refund's entry and
//! are merged, not overwritten.

use super::ledger::{OriginalLedger, Reservation};
use super::StoreError;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{watch, Notify};

/// The trees a log op can write.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TreeId {
    /// Records.
    Refunds,
    /// Over-refund ledgers.
    Originals,
    /// Unconfirmed event marks.
    Outbox,
}

/// One refund's entry in an over-refund ledger, as a mergeable change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LedgerOp {
    /// The refund whose reservation this is.
    pub refund_id: String,
    /// The original amount the writer saw.
    pub original_amount: u64,
    /// The reservation, or `None` when released.
    pub entry: Option<(u64, Reservation)>,
}

/// One write in the state log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Op {
    /// The partition of the refund written.
    pub p: u32,
    /// The writer's ownership token for `p` (empty when it owns none).
    pub token: String,
    /// The tree.
    pub tree: TreeId,
    /// The key (a refund id, or a ledger key).
    pub key: String,
    /// The new value (UTF-8: JSON or the outbox mark), `None` to remove.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
    /// For ledgers: the one entry this write changes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ledger: Option<LedgerOp>,
}

/// A replica's progress reading its own batches back.
#[derive(Debug, Clone, Default)]
pub struct Progress {
    /// The highest own batch read back.
    pub seen: u64,
    /// Own batches that will never be read back (publish failed).
    pub lost: BTreeSet<u64>,
}

/// An own write not yet read back: the batch it went out in, and the
/// value (`None`: removed).
type PendingWrite = (u64, Option<Vec<u8>>);

#[derive(Debug, Default)]
struct Pending {
    /// The batch the next writes join (batches start at 1).
    open: u64,
    /// Writes not yet handed to the appender.
    buffer: Vec<Op>,
    /// Own writes not yet read back: (tree, key) → (batch, value).
    overlay: HashMap<(TreeId, Vec<u8>), PendingWrite>,
}

/// The replicated store's shared state; one per process, cheap to share.
#[derive(Debug)]
pub struct Journal {
    partitions: u32,
    pending: Mutex<Pending>,
    /// My token per partition I own.
    owned: Mutex<HashMap<u32, String>>,
    /// The latest marker per partition, in log order (the tailer's view).
    markers: Mutex<HashMap<u32, String>>,
    /// The partitions this replica consumes (the assignment), for
    /// readiness.
    assigned: Mutex<Vec<u32>>,
    wake_appender: Notify,
    progress: watch::Sender<Progress>,
    read_back_timeout: Duration,
}

impl Journal {
    /// A journal for `partitions` partitions; a sync waits at most
    /// `read_back_timeout` for its batch to come back from the log.
    pub fn new(partitions: u32, read_back_timeout: Duration) -> Arc<Self> {
        Arc::new(Journal {
            partitions,
            pending: Mutex::new(Pending {
                open: 1,
                ..Default::default()
            }),
            owned: Mutex::default(),
            markers: Mutex::default(),
            assigned: Mutex::default(),
            wake_appender: Notify::new(),
            progress: watch::channel(Progress::default()).0,
            read_back_timeout,
        })
    }

    /// P.
    pub fn partitions(&self) -> u32 {
        self.partitions
    }

    /// The partition of a refund.
    pub fn partition_of(&self, refund_id: &str) -> u32 {
        partition_of(refund_id, self.partitions)
    }

    // ---- ownership (cluster/partitions.rs and cluster/log.rs) ----

    /// This replica now writes partition `p` with `token` (its marker was
    /// read back as the latest one).
    pub fn own(&self, p: u32, token: String) {
        lock(&self.owned).insert(p, token);
    }

    /// This replica gave `p` up (or lost its session).
    pub fn disown(&self, p: u32) {
        lock(&self.owned).remove(&p);
    }

    /// Gives every partition up (the broker session ended).
    pub fn disown_all(&self) {
        lock(&self.owned).clear();
    }

    /// My token for `p`, if I own it.
    pub fn token(&self, p: u32) -> Option<String> {
        lock(&self.owned).get(&p).cloned()
    }

    /// Whether I own `p` and the log agrees (no newer marker).
    pub fn holds(&self, p: u32) -> bool {
        let mine = lock(&self.owned).get(&p).cloned();
        mine.is_some() && lock(&self.markers).get(&p) == mine.as_ref()
    }

    /// Partitions I hold.
    pub fn held(&self) -> Vec<u32> {
        (0..self.partitions).filter(|p| self.holds(*p)).collect()
    }

    /// Records the partitions this replica consumes now.
    pub fn set_assigned(&self, partitions: Vec<u32>) {
        *lock(&self.assigned) = partitions;
    }

    /// The partitions this replica consumes (an active or a standby
    /// consumer on each).
    pub fn assigned(&self) -> Vec<u32> {
        lock(&self.assigned).clone()
    }

    /// The tailer read a marker.
    pub fn set_marker(&self, p: u32, token: String) {
        lock(&self.markers).insert(p, token);
    }

    /// The latest marker of `p`, as the tailer read it.
    pub fn marker(&self, p: u32) -> Option<String> {
        lock(&self.markers).get(&p).cloned()
    }

    /// The marker table (the tailer persists it with its offset).
    pub fn markers(&self) -> HashMap<u32, String> {
        lock(&self.markers).clone()
    }

    /// Restores the marker table at start.
    pub fn restore_markers(&self, markers: HashMap<u32, String>) {
        *lock(&self.markers) = markers;
    }

    /// Whether an op read from the log is valid: the latest marker of its
    /// partition names its token.
    pub fn valid(&self, op: &Op) -> bool {
        !op.token.is_empty() && lock(&self.markers).get(&op.p) == Some(&op.token)
    }

    // ---- writes (store/mod.rs) ----

    /// Runs `write` with the overlay locked, so a read-modify-write (a
    /// claim, a ledger reservation) is atomic among this process's writers.
    pub(super) fn write<T>(&self, write: impl FnOnce(&mut Writer<'_>) -> T) -> T {
        let mut pending = lock(&self.pending);
        let mut writer = Writer {
            journal: self,
            pending: &mut pending,
        };
        write(&mut writer)
    }

    /// An own write not yet read back, if any: `Some(None)` is a removal.
    pub(super) fn overlay(&self, tree: TreeId, key: &[u8]) -> Option<Option<Vec<u8>>> {
        lock(&self.pending)
            .overlay
            .get(&(tree, key.to_vec()))
            .map(|(_, value)| value.clone())
    }

    /// Waits until every write made before this call was read back from
    /// the log, then checks that this replica still owns `refund_id`'s
    /// partition.
    pub(super) async fn sync(&self, refund_id: Option<&str>) -> Result<(), StoreError> {
        let partition = refund_id.map(|id| self.partition_of(id));
        if let Some(p) = partition {
            if !self.holds(p) {
                return Err(StoreError::Fenced { partition: p });
            }
        }
        let target = {
            let pending = lock(&self.pending);
            if pending.buffer.is_empty() {
                pending.open - 1
            } else {
                pending.open
            }
        };
        if target > 0 {
            self.wake_appender.notify_one();
            let mut progress = self.progress.subscribe();
            let reached = async {
                progress
                    .wait_for(|p| p.seen >= target || p.lost.contains(&target))
                    .await
                    .map(|p| p.lost.contains(&target))
            };
            match tokio::time::timeout(self.read_back_timeout, reached).await {
                Err(_) => {
                    return Err(StoreError::Log(format!(
                        "the state log did not return batch {target} within {:?}",
                        self.read_back_timeout
                    )))
                }
                Ok(Err(_)) => return Err(StoreError::SyncerGone),
                Ok(Ok(true)) => {
                    return Err(StoreError::Log(format!(
                        "batch {target} was not accepted by the state log"
                    )))
                }
                Ok(Ok(false)) => {}
            }
        }
        if let Some(p) = partition {
            if !self.holds(p) {
                return Err(StoreError::Fenced { partition: p });
            }
        }
        Ok(())
    }

    // ---- the appender and the tailer (cluster/log.rs) ----

    /// The highest own batch read back so far.
    pub fn seen(&self) -> u64 {
        self.progress.borrow().seen
    }

    /// How long a sync waits for its batch to come back.
    pub fn read_back_timeout(&self) -> Duration {
        self.read_back_timeout
    }

    /// Waits until a writer asks for its batch to be appended.
    pub async fn wanted(&self) {
        self.wake_appender.notified().await
    }

    /// Takes the open batch (if it has ops) for the appender.
    pub fn take_batch(&self) -> Option<(u64, Vec<Op>)> {
        let mut pending = lock(&self.pending);
        if pending.buffer.is_empty() {
            return None;
        }
        let id = pending.open;
        pending.open += 1;
        Some((id, std::mem::take(&mut pending.buffer)))
    }

    /// Own batch `id` was read back: its writes leave the overlay.
    pub fn read_back(&self, id: u64) {
        lock(&self.pending)
            .overlay
            .retain(|_, (batch, _)| *batch > id);
        self.progress.send_modify(|p| {
            // Batches are read back in order: one skipped never comes.
            for skipped in p.seen + 1..id {
                p.lost.insert(skipped);
            }
            p.seen = p.seen.max(id);
            while p.lost.len() > 1024 {
                p.lost.pop_first();
            }
        });
    }

    /// Own batch `id` will not be read back (its publish failed): its
    /// writes leave the overlay and its waiters fail.
    pub fn lost(&self, id: u64) {
        lock(&self.pending)
            .overlay
            .retain(|_, (batch, _)| *batch != id);
        self.progress.send_modify(|p| {
            p.lost.insert(id);
        });
    }
}

/// Writes under the journal's lock (see [`Journal::write`]).
#[derive(Debug)]
pub(super) struct Writer<'j> {
    journal: &'j Journal,
    pending: &'j mut Pending,
}

impl Writer<'_> {
    /// The current value of a key: an own pending write, else sled.
    pub(super) fn read(
        &self,
        tree: TreeId,
        sled_tree: &sled::Tree,
        key: &[u8],
    ) -> Result<Option<Vec<u8>>, StoreError> {
        if let Some((_, value)) = self.pending.overlay.get(&(tree, key.to_vec())) {
            return Ok(value.clone());
        }
        Ok(sled_tree.get(key)?.map(|v| v.to_vec()))
    }

    /// Writes `value` (or removes the key) for `refund_id`'s partition.
    pub(super) fn put(
        &mut self,
        refund_id: &str,
        tree: TreeId,
        key: &str,
        value: Option<Vec<u8>>,
        ledger: Option<LedgerOp>,
    ) {
        let p = self.journal.partition_of(refund_id);
        let token = self.journal.token(p).unwrap_or_default();
        let batch = self.pending.open;
        self.pending
            .overlay
            .insert((tree, key.as_bytes().to_vec()), (batch, value.clone()));
        self.pending.buffer.push(Op {
            p,
            token,
            tree,
            key: key.to_string(),
            // Every stored value is UTF-8 (JSON or the outbox mark). A
            // ledger op carries only its refund's entry (merged on apply).
            value: match tree {
                TreeId::Originals => None,
                _ => value.map(|v| String::from_utf8_lossy(&v).into_owned()),
            },
            ledger,
        });
    }
}

/// Applies one valid op to the local trees (the tailer's half of a write).
pub fn apply(
    op: &Op,
    refunds: &sled::Tree,
    originals: &sled::Tree,
    outbox: &sled::Tree,
) -> Result<(), StoreError> {
    let tree = match op.tree {
        TreeId::Refunds => refunds,
        TreeId::Outbox => outbox,
        TreeId::Originals => {
            let Some(change) = &op.ledger else {
                return Ok(());
            };
            let mut ledger = match originals.get(op.key.as_bytes())? {
                Some(bytes) => OriginalLedger::decode(&bytes)
                    .unwrap_or_else(|_| OriginalLedger::new(change.original_amount)),
                None => OriginalLedger::new(change.original_amount),
            };
            ledger.original_amount = ledger.original_amount.min(change.original_amount);
            match change.entry {
                Some(entry) => ledger.refunds.insert(change.refund_id.clone(), entry),
                None => ledger.refunds.remove(&change.refund_id),
            };
            ledger.updated_at = crate::event::now_rfc3339();
            originals.insert(op.key.as_bytes(), ledger.encode())?;
            return Ok(());
        }
    };
    match &op.value {
        Some(value) => tree.insert(op.key.as_bytes(), value.as_bytes())?,
        None => tree.remove(op.key.as_bytes())?,
    };
    Ok(())
}

/// The partition of a refund: FNV-1a (64 bit) of its id, modulo P. Stable
/// across versions and platforms: every replica and every version computes
/// the same partition for the same id.
pub fn partition_of(refund_id: &str, partitions: u32) -> u32 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in refund_id.as_bytes() {
        hash ^= u64::from(*byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    (hash % u64::from(partitions.max(1))) as u32
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partitions_are_stable_and_spread() {
        // Pinned: a change here re-hashes every deployment.
        assert_eq!(partition_of("r-1", 16), partition_of("r-1", 16));
        assert_eq!(partition_of("", 16), (0xcbf2_9ce4_8422_2325u64 % 16) as u32);
        let mut counts = [0u32; 16];
        for i in 0..16_000 {
            counts[partition_of(&format!("refund-{i}"), 16) as usize] += 1;
        }
        assert!(counts.iter().all(|c| (800..1200).contains(c)), "{counts:?}");
    }

    #[tokio::test]
    async fn a_write_is_durable_when_read_back_and_fenced_when_the_marker_moved() {
        let journal = Journal::new(4, Duration::from_secs(2));
        let p = journal.partition_of("r1");
        journal.set_marker(p, "mine".into());
        journal.own(p, "mine".into());
        let tree = sled::Config::new()
            .temporary(true)
            .open()
            .expect("sled")
            .open_tree("t")
            .expect("tree");
        journal.write(|w| w.put("r1", TreeId::Refunds, "r1", Some(b"v1".to_vec()), None));
        assert_eq!(
            journal.overlay(TreeId::Refunds, b"r1"),
            Some(Some(b"v1".to_vec()))
        );
        let (id, ops) = journal.take_batch().expect("batch");
        assert_eq!(ops[0].token, "mine");
        assert!(journal.valid(&ops[0]));
        // The sync waits for the read-back.
        let waiting = {
            let journal = Arc::clone(&journal);
            tokio::spawn(async move { journal.sync(Some("r1")).await })
        };
        tokio::task::yield_now().await;
        apply(&ops[0], &tree, &tree, &tree).expect("apply");
        journal.read_back(id);
        waiting.await.expect("task").expect("synced");
        assert_eq!(journal.overlay(TreeId::Refunds, b"r1"), None);
        // Another replica's marker: the next write is rejected and the
        // sync says so.
        journal.set_marker(p, "theirs".into());
        journal.write(|w| w.put("r1", TreeId::Refunds, "r1", Some(b"v2".to_vec()), None));
        let (id, ops) = journal.take_batch().expect("batch");
        assert!(!journal.valid(&ops[0]));
        journal.read_back(id);
        assert!(matches!(
            journal.sync(Some("r1")).await,
            Err(StoreError::Fenced { .. })
        ));
        // The rejected write left the overlay: sled's truth shows.
        assert_eq!(journal.overlay(TreeId::Refunds, b"r1"), None);
        assert_eq!(tree.get(b"r1").expect("get").expect("v").as_ref(), b"v1");
    }

    #[tokio::test]
    async fn a_lost_batch_fails_its_waiters() {
        let journal = Journal::new(1, Duration::from_secs(2));
        journal.write(|w| w.put("r1", TreeId::Refunds, "r1", Some(b"v".to_vec()), None));
        let (first, _) = journal.take_batch().expect("batch");
        journal.write(|w| w.put("r2", TreeId::Refunds, "r2", Some(b"v".to_vec()), None));
        let (second, _) = journal.take_batch().expect("batch");
        // The second came back, the first never will.
        journal.read_back(second);
        assert!(journal.progress.borrow().lost.contains(&first));
        assert!(matches!(journal.sync(None).await, Ok(())));
        journal.lost(second + 1);
    }
}

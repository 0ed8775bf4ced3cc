//! Group commit: one syncer thread makes every write made before a request
//! durable with one `flush()` for all the requests waiting. Each caller is answered only by a flush that began after its
//! request arrived, hence after its write.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::oneshot;

/// Counters of the syncer, for metrics and the benchmark.
#[derive(Debug, Default)]
pub struct SyncStats {
    /// `flush()` calls made.
    pub flushes: AtomicU64,
    /// `sync()` requests answered.
    pub requests: AtomicU64,
}

pub(super) type SyncReply = oneshot::Sender<Result<(), String>>;

/// A request to the syncer task.
#[derive(Debug)]
pub(super) enum SyncRequest {
    /// Answer after a flush that began after this request arrived.
    Sync(SyncReply),
    /// Flush, answer, and stop (releasing the syncer's handle on the db).
    Close(SyncReply),
}

/// A flush that served at least this many writers means load.
const BUSY_BATCH: usize = 4;

/// How long a flush under load waits for more writers (when
/// `store.group_commit_linger_us` is 0).
const ADAPTIVE_LINGER: Duration = Duration::from_micros(200);

/// Adds a request's reply to the batch; true if it asks the syncer to stop.
fn add(batch: &mut Vec<SyncReply>, request: SyncRequest) -> bool {
    match request {
        SyncRequest::Sync(reply) => {
            batch.push(reply);
            false
        }
        SyncRequest::Close(reply) => {
            batch.push(reply);
            true
        }
    }
}

/// The group-commit loop, on a thread of its own: one flush for every
/// batch of waiting requests. A dedicated thread (rather than a task that
/// hands each flush to the blocking pool) saves two thread hand-offs per
/// flush: a writer's request wakes this thread, and its answer wakes the
/// writer.
pub(super) fn run_syncer(
    db: sled::Db,
    requests: std::sync::mpsc::Receiver<SyncRequest>,
    stats: Arc<SyncStats>,
    linger: Duration,
) {
    let mut batch = Vec::new();
    let mut closing = false;
    let mut last_batch = 0;
    while let Ok(first) = requests.recv() {
        closing |= add(&mut batch, first);
        while let Ok(more) = requests.try_recv() {
            closing |= add(&mut batch, more);
        }
        // Under load (the last flush served several writers), wait a
        // moment for more: each flush costs far more CPU than the wait.
        // A lone writer (light load, a slow provider) is never held up.
        let linger = if linger.is_zero() && last_batch >= BUSY_BATCH {
            ADAPTIVE_LINGER
        } else {
            linger
        };
        if !linger.is_zero() && !closing {
            let until = std::time::Instant::now() + linger;
            while let Some(left) = until.checked_duration_since(std::time::Instant::now()) {
                match requests.recv_timeout(left) {
                    Ok(more) => closing |= add(&mut batch, more),
                    Err(_) => break,
                }
            }
        }
        last_batch = batch.len();
        let result = db.flush().map(|_| ()).map_err(|e| e.to_string());
        stats.flushes.fetch_add(1, Ordering::Relaxed);
        stats
            .requests
            .fetch_add(batch.len() as u64, Ordering::Relaxed);
        crate::metrics::store_flush(batch.len());
        if closing {
            // Let go of the database before answering, so that whoever
            // asked can open the directory again right away (sled's lock
            // goes with the last handle).
            drop(db);
            for reply in batch.drain(..) {
                let _ = reply.send(result.clone());
            }
            return;
        }
        for reply in batch.drain(..) {
            let _ = reply.send(result.clone());
        }
    }
}

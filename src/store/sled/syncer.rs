//! Group commit: one syncer thread makes every write made before a request
//! durable with one `flush()` for all the requests waiting. Each caller is
//! answered only by a flush that began after its request arrived, hence
//! after its write. Under load the syncer lingers before each flush for more
//! writers; at light load a writer flushes on its own thread instead
//! (`Store::flush_inline`), and the two never flush at once (`flushing`).

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
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
    /// Writers the syncer's last flush served.
    last_batch: AtomicUsize,
    /// Held during every flush, the syncer's and a writer's own.
    pub(super) flushing: std::sync::Mutex<()>,
}

impl SyncStats {
    /// Whether the syncer's last flush served enough writers to mean load.
    pub(super) fn busy(&self) -> bool {
        self.last_batch.load(Ordering::Relaxed) >= BUSY_BATCH
    }

    /// Counts one flush serving `writers`.
    pub(super) fn count_flush(&self, writers: usize) {
        self.flushes.fetch_add(1, Ordering::Relaxed);
        self.requests.fetch_add(writers as u64, Ordering::Relaxed);
        crate::observability::metrics::store_flush(writers);
    }
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

/// Under load (when `store.group_commit_linger_us` is 0) a flush waits
/// this long for more writers when the last flush served `BUSY_BATCH`
/// writers, and longer by the square of (writers / `BUSY_BATCH`) when it
/// served more...
const BUSY_LINGER: Duration = Duration::from_micros(200);

/// ...up to this. A flush (the buffer's write and the disk sync, on the
/// syncer's thread with our patched sled) costs far more than the wait
/// costs a refund that is not waiting on a slow provider.
const MAX_ADAPTIVE_LINGER: Duration = Duration::from_millis(1);

/// The wait before the next flush: `configured` when set; otherwise none
/// after a flush that served few writers (light load, a slow provider: a
/// lone writer is never held up), and longer the more the last one served.
///
/// The wait grows with the square of the batch so that it climbs to its
/// bound when requests come fast (a longer wait gathers a bigger batch,
/// which lengthens the next wait), and falls back to none when they come
/// slowly (a slow provider: a wait then gathers few writers and only adds
/// to each refund's time). A wait that grew in proportion settled at
/// batches of about six at 0 ms and prefetch 64, flushing twice as often as
/// the bound does.
fn linger_after(last_batch: usize, configured: Duration) -> Duration {
    if !configured.is_zero() || last_batch < BUSY_BATCH {
        return configured;
    }
    // Capped so that the product stays small; from 9 writers on the
    // bound applies anyway.
    let batch = last_batch.min(64) as u32;
    (BUSY_LINGER * batch * batch / (BUSY_BATCH * BUSY_BATCH) as u32).min(MAX_ADAPTIVE_LINGER)
}

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
        let linger = linger_after(last_batch, linger);
        if !linger.is_zero() && !closing {
            // Sleep, then take whatever came: a writer that sends while
            // this thread sleeps (not blocked in `recv`) wakes nobody, so
            // the batch costs one wake-up, not one per writer.
            std::thread::sleep(linger);
            while let Ok(more) = requests.try_recv() {
                closing |= add(&mut batch, more);
            }
        }
        last_batch = batch.len();
        stats.last_batch.store(last_batch, Ordering::Relaxed);
        let result = {
            let _flushing = stats.flushing.lock().unwrap_or_else(|p| p.into_inner());
            db.flush().map(|_| ()).map_err(|e| e.to_string())
        };
        stats.count_flush(batch.len());
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_wait_grows_with_the_load_and_is_bounded() {
        let zero = Duration::ZERO;
        assert_eq!(linger_after(1, zero), zero);
        assert_eq!(linger_after(BUSY_BATCH - 1, zero), zero);
        assert_eq!(linger_after(4, zero), Duration::from_micros(200));
        assert_eq!(linger_after(6, zero), Duration::from_micros(450));
        assert_eq!(linger_after(8, zero), Duration::from_micros(800));
        assert_eq!(linger_after(9, zero), MAX_ADAPTIVE_LINGER);
        assert_eq!(linger_after(500, zero), MAX_ADAPTIVE_LINGER);
        // A configured linger is used as is.
        let set = Duration::from_micros(250);
        assert_eq!(linger_after(1, set), set);
        assert_eq!(linger_after(500, set), set);
    }
}

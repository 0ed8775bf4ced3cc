//! Group commit: one syncer task makes every write made before a request
//! durable with one `flush()` for all the requests waiting, on the blocking
//! pool. Each caller is answered only by a flush that began after its
//! request arrived, hence after its write.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};

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

/// The group-commit loop: one flush for every batch of waiting requests.
pub(super) async fn run_syncer(
    db: sled::Db,
    mut requests: mpsc::UnboundedReceiver<SyncRequest>,
    stats: Arc<SyncStats>,
    linger: Duration,
) {
    let mut batch = Vec::new();
    let mut closing = false;
    while let Some(first) = requests.recv().await {
        closing |= add(&mut batch, first);
        while let Ok(more) = requests.try_recv() {
            closing |= add(&mut batch, more);
        }
        if !linger.is_zero() && !closing {
            let until = tokio::time::Instant::now() + linger;
            while let Ok(Some(more)) = tokio::time::timeout_at(until, requests.recv()).await {
                closing |= add(&mut batch, more);
            }
        }
        let flushing = db.clone();
        let result = match tokio::task::spawn_blocking(move || flushing.flush()).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        stats.flushes.fetch_add(1, Ordering::Relaxed);
        stats
            .requests
            .fetch_add(batch.len() as u64, Ordering::Relaxed);
        crate::metrics::store_flush(batch.len());
        for reply in batch.drain(..) {
            let _ = reply.send(result.clone());
        }
        if closing {
            break;
        }
    }
}

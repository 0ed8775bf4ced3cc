//! The service's background work, each on its own task and off the
//! delivery path: retention (records become tombstones), the outbox sweep
//! (events recorded but not confirmed are published again) and the store
//! gauges (with the overdue-pending report).

use crate::config::Settings;
use crate::service::shutdown::Shutdown;
use crate::store::{Retention, Store};
use crate::worker::Worker;
use std::sync::Arc;
use std::time::Duration;
use tracing::{info, warn};

/// Runs a pruning pass every `every`, off the delivery path. A pass that
/// fails is logged and tried again later.
pub async fn prune_periodically(
    store: Store,
    retention: Retention,
    every: Duration,
    mut shutdown: Shutdown,
) {
    loop {
        tokio::select! {
            _ = shutdown.triggered() => return,
            _ = tokio::time::sleep(every) => {}
        }
        let now = time::OffsetDateTime::now_utc();
        match store.prune(now, retention).await {
            Ok(report) => {
                crate::observability::metrics::pruned(report.tombstoned);
                for key in &report.unreadable {
                    warn!(
                        key = key.as_str(),
                        "pruning skipped an unreadable entry; inspect it"
                    );
                }
                if report.tombstoned + report.tombstones_expired + report.ledgers > 0 {
                    info!(
                        tombstoned = report.tombstoned,
                        tombstones_expired = report.tombstones_expired,
                        ledgers = report.ledgers,
                        unreadable = report.unreadable.len(),
                        "pruned the store"
                    );
                }
            }
            Err(e) => warn!(error = %e, "pruning failed"),
        }
    }
}

/// Publishes unconfirmed events: everything soon after start (a previous
/// process may have stopped between an outcome and its confirm), then
/// every `every` what has waited at least that long.
pub async fn sweep_outbox_periodically(worker: Worker, every: Duration, mut shutdown: Shutdown) {
    let mut min_age = Duration::ZERO;
    let mut pause = Duration::from_secs(1);
    loop {
        tokio::select! {
            _ = shutdown.triggered() => return,
            _ = tokio::time::sleep(pause) => {}
        }
        pause = every;
        match worker.sweep_outbox(min_age).await {
            Ok(report) if report.failed == 0 => min_age = every,
            Ok(_) => {}
            Err(e) => warn!(error = %e, "outbox sweep failed"),
        }
    }
}

/// Settles refunds that replicas whose lease expired left attempting
/// (PostgreSQL), every `every`.
pub async fn settle_cut_off_periodically(worker: Worker, every: Duration, mut shutdown: Shutdown) {
    loop {
        tokio::select! {
            _ = shutdown.triggered() => return,
            _ = tokio::time::sleep(every) => {}
        }
        if let Err(e) = worker.settle_cut_off().await {
            warn!(error = %e, "looking for cut-off attempts failed");
        }
    }
}

/// Refreshes the store gauges and reports refunds
/// pending for longer than their account allows (each once, when it becomes
/// overdue). Every few seconds, or less often when the walk over every
/// record is long: it waits at least twenty times what the walk took, so the
/// census never takes more than 5 % of a core however many records are kept.
pub async fn refresh_store_metrics(store: Store, settings: Arc<Settings>, mut shutdown: Shutdown) {
    let mut reported = std::collections::HashSet::new();
    loop {
        let limits = settings.clone();
        let started = std::time::Instant::now();
        let scan = store.census(move |p| limits.pending_alert_after(p)).await;
        let took = started.elapsed();
        if scan.is_err() {
            crate::observability::metrics::store_census_failed();
        }
        if let Ok(census) = scan {
            crate::observability::metrics::store_extra(census.tombstones, census.unconfirmed);
            crate::observability::metrics::store_counts(
                census.records,
                census.in_doubt,
                census.unfinished,
            );
            crate::observability::metrics::pending_overdue(census.overdue.len());
            let new: Vec<&String> = census
                .overdue
                .iter()
                .filter(|id| !reported.contains(*id))
                .collect();
            if !new.is_empty() {
                warn!(refund_ids = ?new, "refunds pending longer than pending_alert_after_secs: check them with the provider");
            }
            reported = census.overdue.into_iter().collect();
        }
        tokio::select! {
            _ = shutdown.triggered() => return,
            _ = tokio::time::sleep(census_pause(took)) => {}
        }
    }
}

/// How often the dead-letter queue's depth is read.
pub const DEAD_LETTER_WATCH: Duration = Duration::from_secs(15);

/// Reads the dead-letter queue's depth (a passive declare on a channel of
/// its own, so that a refusal closes only that channel) every
/// [`DEAD_LETTER_WATCH`], for the `refund_worker_dead_letters_waiting`
/// gauge, until the channel closes; the session starts it again.
pub async fn watch_dead_letters(channel: lapin::Channel, queue: String) {
    let passive = lapin::options::QueueDeclareOptions {
        passive: true,
        ..Default::default()
    };
    loop {
        let declared = channel
            .queue_declare(
                queue.as_str().into(),
                passive,
                lapin::types::FieldTable::default(),
            )
            .await;
        match declared {
            Ok(q) => crate::observability::metrics::dead_letters_waiting(q.message_count()),
            Err(e) => {
                tracing::debug!(error = %e, "dead-letter queue depth unknown until the next session");
                crate::observability::metrics::dead_letters_unknown();
                return;
            }
        }
        tokio::time::sleep(DEAD_LETTER_WATCH).await;
    }
}

/// The pause after a census that took `took`.
fn census_pause(took: Duration) -> Duration {
    (took * 20).max(Duration::from_secs(5))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_long_census_waits_twenty_times_its_length() {
        assert_eq!(
            census_pause(Duration::from_millis(10)),
            Duration::from_secs(5)
        );
        assert_eq!(
            census_pause(Duration::from_secs(1)),
            Duration::from_secs(20)
        );
    }
}

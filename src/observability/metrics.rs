//! Prometheus metrics, through the `metrics` facade, set up in one place.
//! The recorder is process-global (installed once); `/metrics` renders it.
//! Every name the worker exports is written here, so the list in the README
//! and this file are the whole story.

use crate::contract::command::Operation;
use metrics::{counter, gauge, histogram, Counter, Gauge, Histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use std::collections::HashMap;
use std::sync::{OnceLock, RwLock};
use std::time::Duration;

static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// Whether our recorder is installed. The hot path's handles are kept only
/// then: a handle taken before would be a no-op, kept for good.
fn installed() -> bool {
    HANDLE.get().is_some_and(Option::is_some)
}

/// A metric without labels, registered once. Each `counter!` call builds
/// the metric's key and looks it up in the recorder's registry; with the
/// labelled ones below, that was 3 % of the CPU per refund.
fn once<T: Clone>(cell: &OnceLock<T>, register: impl FnOnce() -> T) -> T {
    if installed() {
        cell.get_or_init(register).clone()
    } else {
        register()
    }
}

/// A metric labelled by provider account and one fixed word (a status, an
/// outcome class), registered once per pair.
struct ByAccount<T> {
    handles: OnceLock<RwLock<HashMap<String, HashMap<&'static str, T>>>>,
}

impl<T: Clone> ByAccount<T> {
    const fn new() -> Self {
        ByAccount {
            handles: OnceLock::new(),
        }
    }

    fn get(&self, provider: &str, word: &'static str, register: impl FnOnce() -> T) -> T {
        if !installed() {
            return register();
        }
        let handles = self.handles.get_or_init(RwLock::default);
        let known = handles
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(provider)
            .and_then(|words| words.get(word))
            .cloned();
        if let Some(handle) = known {
            return handle;
        }
        let handle = register();
        handles
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .entry(provider.to_string())
            .or_default()
            .insert(word, handle.clone());
        handle
    }
}

/// Installs the recorder (first call) and returns the handle. `None` if
/// another recorder was installed first (then metrics are not exported).
pub fn install() -> Option<&'static PrometheusHandle> {
    HANDLE
        .get_or_init(|| {
            let buckets = [
                0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
            ];
            // Per-refund processing is measured in milliseconds.
            let fine = [
                0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.04, 0.05,
                0.051, 0.052, 0.053, 0.054, 0.055, 0.0575, 0.06, 0.07, 0.1, 0.15, 0.2, 0.3, 0.5,
                1.0, 2.5, 10.0,
            ];
            PrometheusBuilder::new()
                .set_buckets_for_metric(
                    Matcher::Full("refund_worker_processing_seconds".into()),
                    &fine,
                )
                .ok()?
                .set_buckets_for_metric(
                    Matcher::Full("refund_worker_provider_call_seconds".into()),
                    &fine,
                )
                .ok()?
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &buckets)
                .ok()?
                .install_recorder()
                .ok()
        })
        .as_ref()
}

/// The Prometheus text exposition.
pub fn render() -> String {
    match install() {
        Some(handle) => {
            handle.run_upkeep();
            handle.render()
        }
        None => String::new(),
    }
}

/// A command delivery arrived.
pub fn command_received() {
    static HANDLE: OnceLock<Counter> = OnceLock::new();
    once(&HANDLE, || {
        counter!("refund_worker_commands_received_total")
    })
    .increment(1);
}

/// Deliveries being processed now.
pub fn in_flight(delta: f64) {
    static HANDLE: OnceLock<Gauge> = OnceLock::new();
    once(&HANDLE, || gauge!("refund_worker_in_flight")).increment(delta);
}

/// An outcome event was decided. Payouts are counted again on their own
/// (`refund_worker_payouts_total`): they move money with no earlier charge.
pub fn outcome(provider: &str, operation: Option<Operation>, status: &'static str) {
    static HANDLES: ByAccount<Counter> = ByAccount::new();
    HANDLES
        .get(provider, status, || {
            counter!("refund_worker_outcomes_total", "provider" => provider.to_string(), "status" => status)
        })
        .increment(1);
    if operation == Some(Operation::Payout) {
        static PAYOUTS: ByAccount<Counter> = ByAccount::new();
        PAYOUTS
            .get(provider, status, || {
                counter!("refund_worker_payouts_total", "provider" => provider.to_string(), "status" => status)
            })
            .increment(1);
    }
}

/// A delivery that could not be finished (it goes back to the queue), by
/// why: `store` (the store failed), `publish` (an event or dead letter was
/// not confirmed), `events_down`, `lease_lost`, `fenced`, `busy`.
pub fn delivery_failed(kind: &'static str) {
    counter!("refund_worker_deliveries_failed_total", "reason" => kind).increment(1);
}

/// Readiness as `/readyz` answers it, and whether the store answers: set
/// when `/metrics` is scraped, so the gauges are never older than the
/// scrape.
pub fn readiness(ready: bool, store_healthy: bool) {
    gauge!("refund_worker_ready").set(f64::from(u8::from(ready)));
    gauge!("refund_worker_store_healthy").set(f64::from(u8::from(store_healthy)));
}

/// A store census that failed (the store did not answer).
pub fn store_census_failed() {
    counter!("refund_worker_store_errors_total", "operation" => "census").increment(1);
}

/// Messages waiting in the dead-letter queue (read every few seconds).
pub fn dead_letters_waiting(count: u32) {
    gauge!("refund_worker_dead_letters_waiting").set(f64::from(count));
}

/// The dead-letter queue's depth cannot be read (until the next session):
/// NaN, so that neither "waiting" nor "none waiting" is claimed.
pub fn dead_letters_unknown() {
    gauge!("refund_worker_dead_letters_waiting").set(f64::NAN);
}

/// One provider call and its outcome class.
pub fn provider_call(provider: &str, class: &'static str, took: Duration) {
    static HANDLES: ByAccount<Histogram> = ByAccount::new();
    HANDLES
        .get(provider, class, || {
            histogram!("refund_worker_provider_call_seconds", "provider" => provider.to_string(), "class" => class)
        })
        .record(took.as_secs_f64());
}

/// From the command's publish timestamp to its event.
pub fn end_to_end(took: Duration) {
    static HANDLE: OnceLock<Histogram> = OnceLock::new();
    once(&HANDLE, || histogram!("refund_worker_end_to_end_seconds")).record(took.as_secs_f64());
}

/// One delivery's processing, from its arrival in the pipeline to its ack
/// (the time it waited in the queue is not in it).
pub fn processing(took: Duration) {
    static HANDLE: OnceLock<Histogram> = OnceLock::new();
    once(&HANDLE, || histogram!("refund_worker_processing_seconds")).record(took.as_secs_f64());
}

/// A retry: `in_process` (backoff) or `delayed` (delay queue).
pub fn retry(kind: &'static str) {
    counter!("refund_worker_retries_total", "kind" => kind).increment(1);
}

/// A message went to the dead-letter queue.
pub fn dead_lettered(reason: &str) {
    counter!("refund_worker_dead_lettered_total", "reason" => reason.to_string()).increment(1);
}

/// Store figures, refreshed in the background.
pub fn store_counts(records: usize, in_doubt: usize, unfinished: usize) {
    gauge!("refund_worker_store_records").set(records as f64);
    gauge!("refund_worker_in_doubt").set(in_doubt as f64);
    gauge!("refund_worker_unfinished").set(unfinished as f64);
}

/// One group-commit flush and the sync requests it served.
pub fn store_flush(requests: usize) {
    static FLUSHES: OnceLock<Counter> = OnceLock::new();
    static REQUESTS: OnceLock<Counter> = OnceLock::new();
    once(&FLUSHES, || counter!("refund_worker_store_flushes_total")).increment(1);
    once(&REQUESTS, || {
        counter!("refund_worker_store_sync_requests_total")
    })
    .increment(requests as u64);
}

/// A provider callback contradicted a recorded final outcome.
pub fn contradiction(provider: &str) {
    counter!("refund_worker_callback_contradictions_total", "provider" => provider.to_string())
        .increment(1);
}

/// Pending refunds older than their account's alert threshold.
pub fn pending_overdue(count: usize) {
    gauge!("refund_worker_pending_overdue").set(count as f64);
}

/// Finished records turned into tombstones by a pruning pass.
pub fn pruned(tombstoned: usize) {
    counter!("refund_worker_store_pruned_total").increment(tombstoned as u64);
}

/// Tombstones and unconfirmed events, refreshed in the background.
pub fn store_extra(tombstones: usize, unconfirmed: usize) {
    gauge!("refund_worker_store_tombstones").set(tombstones as f64);
    gauge!("refund_worker_outbox_unconfirmed").set(unconfirmed as f64);
}

/// Events published again by the outbox sweep.
pub fn outbox_republished(count: usize) {
    counter!("refund_worker_outbox_republished_total").increment(count as u64);
}

/// A provider callback refused (`not_found`, `invalid`, `too_large`,
/// `timeout`).
pub fn callback_rejected(reason: &'static str) {
    counter!("refund_worker_callbacks_rejected_total", "reason" => reason).increment(1);
}

/// An operator API request refused (`unauthorized`, `off`).
pub fn operator_refused(reason: &'static str) {
    counter!("refund_worker_operator_refused_total", "reason" => reason).increment(1);
}

/// A provider account's circuit breaker changed state: `closed` (gauge 0),
/// `open` (1) or `half_open` (2).
pub fn breaker_state(provider: &str, state: &'static str) {
    let value = match state {
        "open" => 1.0,
        "half_open" => 2.0,
        _ => 0.0,
    };
    gauge!("refund_worker_breaker_state", "provider" => provider.to_string()).set(value);
    counter!("refund_worker_breaker_transitions_total", "provider" => provider.to_string(), "to" => state)
        .increment(1);
}

/// A provider asked us to slow down (Retry-After, 429).
pub fn provider_slowed(provider: &str) {
    counter!("refund_worker_provider_slowdowns_total", "provider" => provider.to_string())
        .increment(1);
}

/// Time a refund waited at its account's limits.
pub fn gate_wait(provider: &str, took: Duration) {
    static HANDLES: ByAccount<Histogram> = ByAccount::new();
    HANDLES
        .get(
            provider,
            "",
            || histogram!("refund_worker_limit_wait_seconds", "provider" => provider.to_string()),
        )
        .record(took.as_secs_f64());
}

/// A refund parked in a delay queue without calling its provider:
/// `breaker_open`, or `share` (its account already had its share of the
/// delivery slots waiting).
pub fn gate_parked(provider: &str, why: &'static str) {
    counter!("refund_worker_gate_parked_total", "provider" => provider.to_string(), "why" => why)
        .increment(1);
}

//! refund-worker: executes refund commands from RabbitMQ against payment
//! providers exactly once and publishes one outcome event per refund.
//!
//! The crate by role, in the order a refund meets them:
//!
//! * [`contract`]: what other teams rely on: the refund command, the
//!   outcome event, money in minor units, the reconciliation report's row.
//! * [`config`]: layered settings, validated at start (secrets, durations,
//!   the keys a layer may set).
//! * [`service`]: the running process: the app and its broker sessions,
//!   the background tasks, shutdown, and the HTTP listeners (health,
//!   metrics, the operator API and console, provider callbacks).
//! * [`worker`]: the pipeline, one file per stage, from a delivery to its
//!   event, and the operator decisions that change a refund.
//! * [`store`]: the durable record of every refund (sled on one node,
//!   PostgreSQL for replicas), with the over-refund and payout ledgers and
//!   the outbox.
//! * [`providers`] and [`broker`]: the integrations: each provider is an
//!   integration plus a pure `wire` module; the broker's connection,
//!   topology and confirmed publisher.
//! * [`ops`]: what operators run against a worker: the dead-letter queue
//!   (list, replay, edit, purge), the API client, queue migration.
//! * [`observability`]: logs and span export, W3C trace context, metrics.
//! * [`values`]: secrets, durations and lenient numbers, which every layer
//!   reads.
//!
//! Arrows point down this list and never back: `scripts/check-module-cycles`
//! fails CI on an import cycle.

#![forbid(unsafe_code)]
#![deny(unreachable_pub, clippy::await_holding_lock, clippy::unwrap_used)]
#![warn(missing_debug_implementations, rust_2018_idioms)]

pub mod broker;
pub mod config;
pub mod contract;
#[cfg(feature = "fuzzing")]
pub mod fuzzing;
pub mod observability;
pub mod ops;
pub mod providers;
pub mod service;
pub mod store;
pub mod values;
pub mod worker;

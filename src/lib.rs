//! refund-worker: executes refund commands from RabbitMQ against payment
//! providers exactly once and publishes one outcome event per refund.
//!
//! The pipeline lives in [`worker`]; the message contract in [`command`] and
//! [`event`]; the durable per-refund record in [`store`]; each provider is an
//! integration plus a pure `wire` module under [`providers`].

#![forbid(unsafe_code)]
#![deny(unreachable_pub, clippy::await_holding_lock, clippy::unwrap_used)]
#![warn(missing_debug_implementations, rust_2018_idioms)]

pub mod app;
pub mod background;
pub mod broker;
pub mod client;
pub mod command;
pub mod config;
pub mod dlq;
pub mod dlq_edit;
pub mod duration;
pub mod event;
#[cfg(feature = "fuzzing")]
pub mod fuzzing;
pub mod http;
pub mod lenient;
pub mod locks;
pub mod metrics;
pub mod money;
pub mod ops;
pub mod providers;
pub mod queue_migration;
pub mod report;
pub mod secret;
pub mod shutdown;
pub mod store;
pub mod telemetry;
pub mod trace;
pub mod worker;

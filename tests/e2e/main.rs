//! The end-to-end tests: one binary, so that they share one private
//! RabbitMQ node (and PostgreSQL server) and link the crate once. Each
//! module is one area; each test has its own vhost, store and sandbox.
//! Tests that restart the broker node (`broker_restart`), need a cluster
//! (`replicas`), a TLS node (`security`) or a process-global exporter
//! (`otlp`) are binaries of their own.

#[path = "../support/mod.rs"]
mod support;

mod console;
mod contract;
mod crash_recovery;
mod money_paths;
mod operations;
mod over_time;
mod payouts;
mod pipeline;
mod pressure;
mod providers;
mod store;

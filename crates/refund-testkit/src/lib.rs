//! The real parts refund-worker's tests, benchmark and local runs start on
//! this machine, each on its own port and data directory: a RabbitMQ node
//! ([`local_broker`]), a RabbitMQ cluster ([`local_cluster`]) and a
//! PostgreSQL server ([`local_postgres`]). A separate crate, so that the
//! product binary can never start `rabbitmq-server`.

#![forbid(unsafe_code)]
#![deny(unreachable_pub, clippy::await_holding_lock, clippy::unwrap_used)]
#![warn(missing_debug_implementations, rust_2018_idioms)]

pub mod local_broker;
pub mod local_cluster;
pub mod local_postgres;
pub mod tls;

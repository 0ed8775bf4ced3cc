//! `refund-worker store …` and `refund-worker queues …`: growing a single
//! node into replicas (docs/replicas.md, "From one node to replicas").

use clap::Subcommand;
use refund_worker::config::{PostgresSettings, Settings};
use refund_worker::store::postgres::PgStore;
use refund_worker::store::{copy, SledOptions, Store};
use refund_worker::values::secret::Secret;
use std::path::PathBuf;

#[derive(Subcommand)]
pub(crate) enum StoreCommand {
    /// Copy a stopped single node's store (store.path) into a PostgreSQL
    /// database: records, tombstones, over-refund ledgers and unconfirmed
    /// events. What the database already holds stays as it is.
    Copy {
        /// The database (postgres://user:password@host:port/database; or
        /// REFUND_WORKER_COPY_TO).
        #[arg(long, env = "REFUND_WORKER_COPY_TO", hide_env_values = true)]
        to: String,
        /// A TOML file layered over config/default.toml (for store.path).
        #[arg(long)]
        config: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
pub(crate) enum QueuesCommand {
    /// Replace the classic queues of a single node (commands, dead
    /// letters, delay queues) by the quorum queues replicas use, keeping
    /// every message. Run it with every worker stopped.
    ToQuorum {
        /// A TOML file layered over config/default.toml (for amqp.*).
        #[arg(long)]
        config: Option<PathBuf>,
    },
}

pub(crate) async fn store(command: StoreCommand) -> anyhow::Result<()> {
    let StoreCommand::Copy { to, config } = command;
    let settings = Settings::load(config.as_deref())?;
    let from = Store::open_sled(&settings.store.path, SledOptions::default())?;
    let Store::Sled(sled) = &from else {
        unreachable!("opened as sled");
    };
    let target = PostgresSettings {
        url: Some(Secret::new(to)),
        ..settings.store.postgres.clone()
    };
    let pg = PgStore::open(&target).await?;
    let report = copy::sled_to_postgres(sled, &pg).await?;
    pg.close().await?;
    from.close().await?;
    for key in &report.unreadable {
        eprintln!("not copied (unreadable in the sled store): {key}");
    }
    println!(
        "{}",
        serde_json::to_string_pretty(&report).unwrap_or_default()
    );
    if report.records_skipped > 0 {
        eprintln!(
            "{} record(s) were already in the database and were left as they were",
            report.records_skipped
        );
    }
    Ok(())
}

pub(crate) async fn queues(command: QueuesCommand) -> anyhow::Result<()> {
    let QueuesCommand::ToQuorum { config } = command;
    let settings = Settings::load(config.as_deref())?;
    let done = refund_worker::ops::queue_migration::to_quorum(&settings).await?;
    for (queue, moved) in &done.moved {
        println!("{queue}: now a quorum queue ({moved} message(s) moved)");
    }
    for queue in &done.already {
        println!("{queue}: already a quorum queue");
    }
    Ok(())
}

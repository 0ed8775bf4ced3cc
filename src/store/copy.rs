//! Growing from one node to replicas: a stopped single node's sled store
//! (records, tombstones, the over-refund ledger and the outbox) copied into
//! a PostgreSQL database, `refund-worker store copy --to postgres://…`.
//!
//! What is already in the database stays as it is (a second copy of the
//! same store changes nothing; a refund already there is counted as
//! skipped). A record found `Attempting` arrives owned by no live replica:
//! the replicas settle it from its record, as they would after a crash.

use super::postgres::PgStore;
use super::sled::SledStore;
use super::StoreError;
use serde::Serialize;

/// What a copy did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct CopyReport {
    /// Records copied.
    pub records: usize,
    /// Records the database already had (left as they were).
    pub records_skipped: usize,
    /// Tombstones copied.
    pub tombstones: usize,
    /// Over-refund ledgers copied.
    pub ledgers: usize,
    /// Outbox marks copied (events not yet confirmed).
    pub outbox: usize,
    /// Entries the sled store could not read (not copied; see the log).
    pub unreadable: Vec<String>,
}

/// Copies everything of `from` into `to`.
pub async fn sled_to_postgres(from: &SledStore, to: &PgStore) -> Result<CopyReport, StoreError> {
    let export = from.clone().export_all().await?;
    let mut report = CopyReport {
        unreadable: export.unreadable.clone(),
        ..Default::default()
    };
    to.import(&export, &mut report).await?;
    Ok(report)
}

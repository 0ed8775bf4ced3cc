//! The shared backend: a PostgreSQL database that any number of replicas
//! use at once, each a plain competing consumer of the same queues
//! (docs/replicas.md).
//!
//! A refund is decided by its row:
//!
//! * **Claim**: one statement (or, with an over-refund reservation, one
//!   transaction holding the original charge's ledger row) inserts the
//!   record if absent, owned by this replica, only while this replica's
//!   lease is alive; committed before the provider call.
//! * **Every later write** compares the revision the writer read: a record
//!   that changed since (another replica, an operator, the lease sweeper)
//!   is not overwritten ([`StoreError::Fenced`]); the writer reads it again
//!   and decides from what it says now. A new attempt also takes the
//!   record's ownership, only while this replica's lease is alive.
//! * **The outbox** is a table written in the same statement or
//!   transaction as the outcome; every replica sweeps it, each taking a
//!   batch no other replica is sweeping (`FOR UPDATE SKIP LOCKED`).
//!
//! Every write is committed when it returns: there is nothing to sync.
//! Module map: `setup.rs` (URL, TLS, pool, migrations), `lease.rs` (this
//! replica's lease), `queries.rs` (the rest of the store interface).

mod lease;
mod queries;
mod settings;
pub mod setup;

pub use settings::PostgresSettings;

use super::codec::{self, RecordFormat};
use super::ledger::{self, LedgerChange, Limit, OriginalLedger};
use super::{Claim, Known, RefundRecord, RefundState, StoreError, Tombstone};
use deadpool_postgres::{Object, Pool};
use serde_json::Value;
use setup::{SetupError, Target};
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::Notify;
use tokio_postgres::types::ToSql;

/// Handle to the PostgreSQL store; cheap to clone.
#[derive(Debug, Clone)]
pub struct PgStore {
    shared: Arc<PgShared>,
}

/// What every handle shares.
pub(super) struct PgShared {
    pool: Pool,
    target: Target,
    /// This process's name in `replicas` (host name and process id).
    name: String,
    /// This replica's current lease (`replicas.id`); 0 before the first.
    me: AtomicI64,
    lease: Duration,
    /// Until when the lease surely holds, on this replica's own clock.
    valid_until: Mutex<Option<Instant>>,
    /// The schema is up to date.
    migrated: AtomicBool,
    /// The last renewal reached the database.
    healthy: AtomicBool,
    stop: Notify,
    /// Broker confirmations whose outbox marks are to be taken off.
    confirmations: tokio::sync::mpsc::UnboundedSender<Confirmation>,
}

/// An event the broker confirmed, and who waits for its mark to go.
pub(super) struct Confirmation {
    refund_id: String,
    event_id: String,
    done: tokio::sync::oneshot::Sender<Result<(), String>>,
}

impl std::fmt::Debug for PgShared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgShared")
            .field("name", &self.name)
            .field("me", &self.me)
            .field("healthy", &self.healthy)
            .finish()
    }
}

impl PgStore {
    /// Connects (the pool), brings the schema up to date and registers
    /// this replica's lease. A database that does not answer yet is not an
    /// error: the store starts unhealthy and keeps trying in the
    /// background. Configuration errors (see `setup.rs`) are.
    pub async fn open(settings: &PostgresSettings) -> Result<Self, SetupError> {
        let target = Target::new(settings)?;
        let max = usize::try_from(settings.max_connections).unwrap_or(usize::MAX);
        let pool = target.pool(max)?;
        let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "refund-worker".into());
        let (confirmations, confirmed) = tokio::sync::mpsc::unbounded_channel();
        let shared = Arc::new(PgShared {
            pool,
            target,
            name: format!("{host}/{}", std::process::id()),
            me: AtomicI64::new(0),
            lease: settings.lease,
            valid_until: Mutex::new(None),
            migrated: AtomicBool::new(false),
            healthy: AtomicBool::new(false),
            stop: Notify::new(),
            confirmations,
        });
        match shared.prepare().await {
            Ok(()) => {}
            Err(SetupError::Unreachable(e)) => {
                tracing::warn!(error = %e, "the database is unreachable; not ready until it answers");
            }
            Err(config) => return Err(config),
        }
        tokio::spawn(shared.clone().keep_alive());
        tokio::spawn(take_off_confirmed(shared.pool.clone(), confirmed));
        Ok(PgStore { shared })
    }

    /// Whether the database answered the last renewal of the lease.
    pub fn healthy(&self) -> bool {
        self.shared.healthy.load(Ordering::SeqCst) && self.shared.migrated.load(Ordering::SeqCst)
    }

    /// Whether this replica's lease surely holds now: a provider may be
    /// called for a refund it owns.
    pub fn lease_holds(&self) -> bool {
        self.shared.lease_holds()
    }

    /// This replica's lease id.
    fn me(&self) -> i64 {
        self.shared.me.load(Ordering::SeqCst)
    }

    async fn client(&self) -> Result<Object, StoreError> {
        self.shared.client().await
    }

    /// Reads a record with its revision.
    pub async fn get(&self, refund_id: &str) -> Result<Option<RefundRecord>, StoreError> {
        let client = self.client().await?;
        let stmt = client
            .prepare_cached("SELECT record, revision FROM refunds WHERE refund_id = $1")
            .await
            .map_err(unavailable)?;
        let row = client
            .query_opt(&stmt, &[&refund_id])
            .await
            .map_err(unavailable)?;
        row.map(|row| record_of(refund_id, row.get::<_, &[u8]>(0), row.get(1)))
            .transpose()
    }

    /// The record, else the tombstone, in one round trip (every command
    /// starts with it).
    pub async fn lookup(&self, refund_id: &str) -> Result<Option<Known>, StoreError> {
        let client = self.client().await?;
        let stmt = client
            .prepare_cached(
                "SELECT r.record, r.revision, t.tombstone FROM (SELECT $1::text AS id) k \
                 LEFT JOIN refunds r ON r.refund_id = k.id \
                 LEFT JOIN tombstones t ON t.refund_id = k.id",
            )
            .await
            .map_err(unavailable)?;
        let row = client
            .query_one(&stmt, &[&refund_id])
            .await
            .map_err(unavailable)?;
        if let Some(record) = row.get::<_, Option<&[u8]>>(0) {
            let record = record_of(refund_id, record, row.get::<_, Option<i64>>(1).unwrap_or(0))?;
            return Ok(Some(Known::Record(Box::new(record))));
        }
        row.get::<_, Option<Value>>(2)
            .map(|t| {
                serde_json::from_value::<Tombstone>(t)
                    .map(|t| Known::Tombstone(Box::new(t)))
                    .map_err(|e| corrupt(refund_id, e))
            })
            .transpose()
    }

    /// See [`super::Store::claim`].
    pub async fn claim(&self, record: &mut RefundRecord) -> Result<Claim, StoreError> {
        if let Some(limit) = ledger::claim_limit(record) {
            return self.claim_reserving(record, limit).await;
        }
        let me = self.me();
        let row = {
            let client = self.client().await?;
            let c = Columns::of(record)?;
            let mut params = c.params();
            params.push(&me);
            let stmt = client.prepare_cached(CLAIM).await.map_err(unavailable)?;
            client
                .query_opt(&stmt, &params)
                .await
                .map_err(unavailable)?
        };
        match row {
            Some(_) => {
                record.revision = 1;
                Ok(Claim::Claimed)
            }
            None => self.not_claimed(&record.refund_id).await,
        }
    }

    /// A claim that inserted nothing: the record exists, or this replica's
    /// lease has expired.
    async fn not_claimed(&self, refund_id: &str) -> Result<Claim, StoreError> {
        match self.get(refund_id).await? {
            Some(existing) => Ok(Claim::Exists(Box::new(existing))),
            None => Err(StoreError::Unavailable(
                "this replica's lease has expired: it claims nothing until it holds a new one"
                    .into(),
            )),
        }
    }

    /// A claim with its over-refund reservation: the original charge's
    /// ledger row is locked, so that two refunds of one charge on two
    /// replicas are reserved one after the other.
    async fn claim_reserving(
        &self,
        record: &mut RefundRecord,
        limit: Limit,
    ) -> Result<Claim, StoreError> {
        let me = self.me();
        let Limit { key, cap: original } = limit;
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(unavailable)?;
        let fresh = serde_json::to_value(OriginalLedger::new(original)).unwrap_or(Value::Null);
        tx.execute(
            "INSERT INTO ledgers (key, ledger, updated_at) VALUES ($1, $2, now()) \
             ON CONFLICT (key) DO NOTHING",
            &[&key, &fresh],
        )
        .await
        .map_err(unavailable)?;
        let row = tx
            .query_one(
                "SELECT ledger FROM ledgers WHERE key = $1 FOR UPDATE",
                &[&key],
            )
            .await
            .map_err(unavailable)?;
        let mut ledger: OriginalLedger =
            serde_json::from_value(row.get(0)).map_err(|e| corrupt(&format!("ledger {key}"), e))?;
        if let Err(over) = ledger.reserve(&record.command, original) {
            return Ok(Claim::OverRefund(over));
        }
        let c = Columns::of(record)?;
        let mut params = c.params();
        params.push(&me);
        let inserted = tx.query_opt(CLAIM, &params).await.map_err(unavailable)?;
        if inserted.is_none() {
            drop(tx);
            return self.not_claimed(&record.refund_id).await;
        }
        let ledger = serde_json::to_value(&ledger).unwrap_or(Value::Null);
        tx.execute(
            "UPDATE ledgers SET ledger = $2, updated_at = now() WHERE key = $1",
            &[&key, &ledger],
        )
        .await
        .map_err(unavailable)?;
        tx.commit().await.map_err(unavailable)?;
        record.revision = 1;
        Ok(Claim::Claimed)
    }

    /// A new attempt: the record, as read, becomes this replica's
    /// `Attempting` while its lease is alive.
    pub async fn take_attempt(&self, record: &mut RefundRecord) -> Result<(), StoreError> {
        let me = self.me();
        let updated = {
            let client = self.client().await?;
            let c = Columns::of(record)?;
            let mut params = c.params();
            params.push(&record.revision);
            params.push(&me);
            let stmt = client.prepare_cached(TAKE).await.map_err(unavailable)?;
            client.execute(&stmt, &params).await.map_err(unavailable)?
        };
        self.landed(record, updated)
    }

    /// A record without an event, or a history note: compare-and-swap.
    pub async fn put(&self, record: &mut RefundRecord) -> Result<(), StoreError> {
        let updated = {
            let client = self.client().await?;
            let c = Columns::of(record)?;
            let mut params = c.params();
            params.push(&record.revision);
            let stmt = client.prepare_cached(UPDATE).await.map_err(unavailable)?;
            client.execute(&stmt, &params).await.map_err(unavailable)?
        };
        self.landed(record, updated)
    }

    fn landed(&self, record: &mut RefundRecord, updated: u64) -> Result<(), StoreError> {
        if updated != 1 {
            return Err(StoreError::Fenced {
                refund_id: record.refund_id.clone(),
            });
        }
        record.revision += 1;
        Ok(())
    }

    /// The record, its ledger change and its outbox mark together.
    pub async fn commit(
        &self,
        record: &mut RefundRecord,
        change: LedgerChange,
    ) -> Result<(), StoreError> {
        let ledger = match (change, ledger::record_key(record)) {
            (LedgerChange::Keep, _) | (_, None) => None,
            (change, Some(key)) => Some((key, change)),
        };
        if let Some((key, change)) = ledger {
            return self.commit_with_ledger(record, key, change).await;
        }
        let event_id = record.state.event().map(|e| e.event_id.clone());
        let updated: i64 = {
            let client = self.client().await?;
            let c = Columns::of(record)?;
            let mut params = c.params();
            params.push(&record.revision);
            let (sql, id);
            match &event_id {
                Some(event_id) => {
                    id = event_id.as_str();
                    params.push(&id);
                    sql = COMMIT_MARKED;
                }
                None => sql = COMMIT_UNMARKED,
            }
            let stmt = client.prepare_cached(sql).await.map_err(unavailable)?;
            client
                .query_one(&stmt, &params)
                .await
                .map_err(unavailable)?
                .get(0)
        };
        self.landed(record, u64::try_from(updated).unwrap_or(0))
    }

    async fn commit_with_ledger(
        &self,
        record: &mut RefundRecord,
        key: String,
        change: LedgerChange,
    ) -> Result<(), StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(unavailable)?;
        let updated = {
            let c = Columns::of(record)?;
            let mut params = c.params();
            params.push(&record.revision);
            tx.execute(UPDATE, &params).await.map_err(unavailable)?
        };
        if updated != 1 {
            return self.landed(record, updated);
        }
        let row = tx
            .query_opt(
                "SELECT ledger FROM ledgers WHERE key = $1 FOR UPDATE",
                &[&key],
            )
            .await
            .map_err(unavailable)?;
        let mut ledger = match row {
            Some(row) => Some(
                serde_json::from_value::<OriginalLedger>(row.get(0))
                    .map_err(|e| corrupt(&format!("ledger {key}"), e))?,
            ),
            None if matches!(change, LedgerChange::Restore(_)) => {
                Some(OriginalLedger::new(ledger::restore_cap(record)))
            }
            None => None,
        };
        if let Some(ledger) = ledger.as_mut() {
            if ledger.apply(&record.command, change) {
                let value = serde_json::to_value(&*ledger).unwrap_or(Value::Null);
                tx.execute(
                    "INSERT INTO ledgers (key, ledger, updated_at) VALUES ($1, $2, now()) \
                     ON CONFLICT (key) DO UPDATE SET ledger = excluded.ledger, updated_at = now()",
                    &[&key, &value],
                )
                .await
                .map_err(unavailable)?;
            }
        }
        match record.state.event() {
            Some(event) => tx
                .execute(MARK, &[&record.refund_id, &event.event_id])
                .await
                .map_err(unavailable)?,
            None => tx
                .execute(
                    "DELETE FROM outbox WHERE refund_id = $1",
                    &[&record.refund_id],
                )
                .await
                .map_err(unavailable)?,
        };
        tx.commit().await.map_err(unavailable)?;
        record.revision += 1;
        Ok(())
    }

    /// Stops the lease and lets it go (the others settle what this replica
    /// left attempting at once).
    pub async fn close(&self) -> Result<(), StoreError> {
        self.shared.stop.notify_waiters();
        self.shared.stop.notify_one();
        self.shared.release().await;
        Ok(())
    }
}

impl PgShared {
    async fn client(&self) -> Result<Object, StoreError> {
        self.pool
            .get()
            .await
            .map_err(|e| StoreError::Unavailable(format!("database: {e}")))
    }

    /// Migrates (once) and registers a lease (when there is none).
    async fn prepare(&self) -> Result<(), SetupError> {
        if !self.migrated.load(Ordering::SeqCst) {
            self.target.migrate().await?;
            self.migrated.store(true, Ordering::SeqCst);
        }
        if self.me.load(Ordering::SeqCst) == 0 {
            self.register()
                .await
                .map_err(|e| SetupError::Unreachable(e.to_string()))?;
        }
        Ok(())
    }
}

/// Takes the outbox marks of confirmed events off, every confirmation
/// waiting at the time in one statement: at full speed each refund has
/// one, and they come together.
async fn take_off_confirmed(
    pool: Pool,
    mut confirmed: tokio::sync::mpsc::UnboundedReceiver<Confirmation>,
) {
    while let Some(first) = confirmed.recv().await {
        let mut batch = vec![first];
        while let Ok(more) = confirmed.try_recv() {
            batch.push(more);
            if batch.len() >= 1000 {
                break;
            }
        }
        let ids: Vec<&str> = batch.iter().map(|c| c.refund_id.as_str()).collect();
        let events: Vec<&str> = batch.iter().map(|c| c.event_id.as_str()).collect();
        let result = async {
            let fail = |e: tokio_postgres::Error| format!("database: {e}");
            let mut client = pool.get().await.map_err(|e| format!("database: {e}"))?;
            let stmt = client
                .prepare_cached(
                    "DELETE FROM outbox o USING unnest($1::text[], $2::text[]) AS c(id, event) \
                     WHERE o.refund_id = c.id AND o.event_id = c.event",
                )
                .await
                .map_err(fail)?;
            // Not worth a disk sync: a mark lost in a crash means one more
            // publication of the same event.
            let tx = client.transaction().await.map_err(fail)?;
            tx.batch_execute("SET LOCAL synchronous_commit TO off")
                .await
                .map_err(fail)?;
            tx.execute(&stmt, &[&ids, &events]).await.map_err(fail)?;
            tx.commit().await.map_err(fail)
        }
        .await;
        for confirmation in batch {
            let _ = confirmation.done.send(result.clone());
        }
    }
}

/// A database error: the store cannot be used now.
fn unavailable(e: tokio_postgres::Error) -> StoreError {
    StoreError::Unavailable(format!("database: {e}"))
}

fn corrupt(what: &str, e: serde_json::Error) -> StoreError {
    StoreError::Corrupt {
        refund_id: what.to_string(),
        source: e.into(),
    }
}

fn record_of(refund_id: &str, bytes: &[u8], revision: i64) -> Result<RefundRecord, StoreError> {
    let mut record = codec::decode(bytes).map_err(|source| StoreError::Corrupt {
        refund_id: refund_id.to_string(),
        source,
    })?;
    record.revision = revision;
    Ok(record)
}

/// A record's columns, in the order of the statements' `$1`..`$9`.
struct Columns {
    refund_id: String,
    state: &'static str,
    status: &'static str,
    provider: String,
    record: Vec<u8>,
    pending_since: Option<String>,
    occurred_at: Option<String>,
    created_at: String,
    updated_at: String,
}

impl Columns {
    fn of(record: &RefundRecord) -> Result<Self, StoreError> {
        let value = codec::encode(record, RecordFormat::Compact);
        Ok(Columns {
            refund_id: record.refund_id.clone(),
            state: record.state.name(),
            status: record.status(),
            provider: record.command.provider.clone(),
            record: value,
            pending_since: match &record.state {
                RefundState::Pending { since, .. } => Some(since.clone()),
                _ => None,
            },
            occurred_at: record.state.event().map(|e| e.occurred_at.clone()),
            created_at: record.created_at.clone(),
            updated_at: record.updated_at.clone(),
        })
    }

    fn params(&self) -> Vec<&(dyn ToSql + Sync)> {
        vec![
            &self.refund_id,
            &self.state,
            &self.status,
            &self.provider,
            &self.record,
            &self.pending_since,
            &self.occurred_at,
            &self.created_at,
            &self.updated_at,
        ]
    }
}

/// Inserts a record owned by `$10`, only while that lease is alive.
const CLAIM: &str = "INSERT INTO refunds (refund_id, state, status, provider, record, \
     pending_since, occurred_at, created_at, updated_at, revision, owner) \
     SELECT $1, $2, $3, $4, $5, ($6::text)::timestamptz, ($7::text)::timestamptz, \
     ($8::text)::timestamptz, ($9::text)::timestamptz, 1, $10 \
     WHERE EXISTS (SELECT 1 FROM replicas WHERE id = $10 AND lease_until > now()) \
     ON CONFLICT (refund_id) DO NOTHING RETURNING revision";

/// The columns a write sets (`$2`..`$9`).
macro_rules! set_columns {
    () => {
        "state = $2, status = $3, provider = $4, record = $5, \
         pending_since = ($6::text)::timestamptz, occurred_at = ($7::text)::timestamptz, \
         created_at = ($8::text)::timestamptz, updated_at = ($9::text)::timestamptz, \
         revision = revision + 1"
    };
}

/// Compare-and-swap on the revision `$10`.
const UPDATE: &str = concat!(
    "UPDATE refunds SET ",
    set_columns!(),
    " WHERE refund_id = $1 AND revision = $10"
);

/// As [`UPDATE`], taking ownership for lease `$11` while it is alive.
const TAKE: &str = concat!(
    "UPDATE refunds SET ",
    set_columns!(),
    ", owner = $11 WHERE refund_id = $1 AND revision = $10 \
     AND EXISTS (SELECT 1 FROM replicas WHERE id = $11 AND lease_until > now())"
);

/// As [`UPDATE`], with the outbox mark of event `$11`; one row: how many
/// records were written.
const COMMIT_MARKED: &str = concat!(
    "WITH r AS (UPDATE refunds SET ",
    set_columns!(),
    " WHERE refund_id = $1 AND revision = $10 RETURNING refund_id), \
     o AS (INSERT INTO outbox (refund_id, event_id, since) SELECT refund_id, $11, now() FROM r \
     ON CONFLICT (refund_id) DO UPDATE SET event_id = excluded.event_id, \
     since = excluded.since, claimed_until = NULL RETURNING 1) \
     SELECT count(*) FROM r"
);

/// As [`UPDATE`], taking the refund's outbox mark off.
const COMMIT_UNMARKED: &str = concat!(
    "WITH r AS (UPDATE refunds SET ",
    set_columns!(),
    " WHERE refund_id = $1 AND revision = $10 RETURNING refund_id), \
     o AS (DELETE FROM outbox WHERE refund_id IN (SELECT refund_id FROM r) RETURNING 1) \
     SELECT count(*) FROM r"
);

/// The outbox mark of refund `$1`'s event `$2`.
const MARK: &str = "INSERT INTO outbox (refund_id, event_id, since) VALUES ($1, $2, now()) \
     ON CONFLICT (refund_id) DO UPDATE SET event_id = excluded.event_id, \
     since = excluded.since, claimed_until = NULL";

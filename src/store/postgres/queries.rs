//! The rest of the store interface on PostgreSQL: the outbox, operators'
//! reads and decisions, the census, pruning and the report.

use super::{corrupt, record_of, unavailable, Columns, PgStore, CLAIM, MARK};
use crate::contract::command::RefundCommand;
use crate::contract::report::ReportRow;
use crate::store::ledger::{ledger_key, OriginalLedger, Reservation};
use crate::store::{
    Census, Claim, OutboxEntry, PaidReservation, PruneReport, RefundRecord, Retention, StoreError,
    Tombstone,
};
use serde_json::Value;
use std::time::Duration;
use time::{Date, OffsetDateTime};

/// How long a replica's sweep holds the outbox marks it took.
const SWEEP_CLAIM_SECS: f64 = 30.0;

/// Records pruned per transaction.
const PRUNE_BATCH: i64 = 500;

impl PgStore {
    /// See [`crate::store::Store::mark_published`]. Confirmations that
    /// arrive together are taken off in one statement (`confirmations`).
    pub async fn mark_published(&self, refund_id: &str, event_id: &str) -> Result<(), StoreError> {
        let (done, answer) = tokio::sync::oneshot::channel();
        let confirmation = super::Confirmation {
            refund_id: refund_id.to_string(),
            event_id: event_id.to_string(),
            done,
        };
        self.shared
            .confirmations
            .send(confirmation)
            .map_err(|_| StoreError::Unavailable("the store is closed".into()))?;
        answer
            .await
            .map_err(|_| StoreError::Unavailable("the store is closed".into()))?
            .map_err(StoreError::Unavailable)
    }

    /// See [`crate::store::Store::outbox_mark`].
    pub async fn outbox_mark(&self, refund_id: &str) -> Result<Option<OutboxEntry>, StoreError> {
        let client = self.client().await?;
        let stmt = client
            .prepare_cached(
                "SELECT event_id, extract(epoch FROM since)::bigint FROM outbox WHERE refund_id = $1",
            )
            .await
            .map_err(unavailable)?;
        let row = client
            .query_opt(&stmt, &[&refund_id])
            .await
            .map_err(unavailable)?;
        Ok(row.map(|row| OutboxEntry {
            refund_id: refund_id.to_string(),
            event_id: row.get(0),
            since: u64::try_from(row.get::<_, i64>(1)).unwrap_or(0),
        }))
    }

    /// Takes a batch of marks at least `min_age` old that no other
    /// replica's sweep holds, and holds them for a while.
    pub async fn unconfirmed(
        &self,
        min_age: Duration,
        limit: usize,
    ) -> Result<Vec<OutboxEntry>, StoreError> {
        let client = self.client().await?;
        let age = min_age.as_secs_f64();
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows = client
            .query(
                "UPDATE outbox SET claimed_until = now() + make_interval(secs => $3) \
                 WHERE refund_id IN (SELECT refund_id FROM outbox \
                   WHERE since <= now() - make_interval(secs => $1) \
                   AND (claimed_until IS NULL OR claimed_until < now()) \
                   ORDER BY since LIMIT $2 FOR UPDATE SKIP LOCKED) \
                 RETURNING refund_id, event_id, extract(epoch FROM since)::bigint",
                &[&age, &limit, &SWEEP_CLAIM_SECS],
            )
            .await
            .map_err(unavailable)?;
        let mut entries: Vec<OutboxEntry> = rows
            .into_iter()
            .map(|row| OutboxEntry {
                refund_id: row.get(0),
                event_id: row.get(1),
                since: u64::try_from(row.get::<_, i64>(2)).unwrap_or(0),
            })
            .collect();
        entries.sort_by_key(|e| e.since);
        Ok(entries)
    }

    /// Writes what a sled store held (`store copy`): rows already there
    /// stay as they are.
    pub async fn import(
        &self,
        export: &crate::store::sled::Export,
        report: &mut crate::store::copy::CopyReport,
    ) -> Result<(), StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(unavailable)?;
        for record in &export.records {
            let c = Columns::of(record)?;
            let inserted = tx
                .execute(
                    "INSERT INTO refunds (refund_id, state, status, provider, record, \
                     pending_since, occurred_at, created_at, updated_at, revision, owner) \
                     VALUES ($1, $2, $3, $4, $5, ($6::text)::timestamptz, ($7::text)::timestamptz, \
                     ($8::text)::timestamptz, ($9::text)::timestamptz, 1, NULL) \
                     ON CONFLICT (refund_id) DO NOTHING",
                    &c.params(),
                )
                .await
                .map_err(unavailable)?;
            if inserted == 1 {
                report.records += 1;
            } else {
                report.records_skipped += 1;
            }
        }
        for (id, tombstone) in &export.tombstones {
            let value = serde_json::to_value(tombstone).unwrap_or(Value::Null);
            report.tombstones += usize::try_from(
                tx.execute(
                    "INSERT INTO tombstones (refund_id, tombstone, pruned_at, occurred_at) \
                     VALUES ($1, $2, ($3::text)::timestamptz, ($4::text)::timestamptz) \
                     ON CONFLICT (refund_id) DO NOTHING",
                    &[id, &value, &tombstone.pruned_at, &tombstone.occurred_at],
                )
                .await
                .map_err(unavailable)?,
            )
            .unwrap_or(0);
        }
        for (key, ledger) in &export.ledgers {
            let value = serde_json::to_value(ledger).unwrap_or(Value::Null);
            report.ledgers += usize::try_from(
                tx.execute(
                    "INSERT INTO ledgers (key, ledger, updated_at) VALUES ($1, $2, now()) \
                     ON CONFLICT (key) DO NOTHING",
                    &[key, &value],
                )
                .await
                .map_err(unavailable)?,
            )
            .unwrap_or(0);
        }
        for mark in &export.outbox {
            let since = i64::try_from(mark.since).unwrap_or(0);
            report.outbox += usize::try_from(
                tx.execute(
                    "INSERT INTO outbox (refund_id, event_id, since) \
                     VALUES ($1, $2, to_timestamp($3::bigint)) ON CONFLICT (refund_id) DO NOTHING",
                    &[&mark.refund_id, &mark.event_id, &since],
                )
                .await
                .map_err(unavailable)?,
            )
            .unwrap_or(0);
        }
        tx.commit().await.map_err(unavailable)
    }

    /// See [`crate::store::Store::oldest_unconfirmed`].
    pub async fn oldest_unconfirmed(&self) -> Result<Option<OutboxEntry>, StoreError> {
        let client = self.client().await?;
        let row = client
            .query_opt(
                "SELECT refund_id, event_id, extract(epoch FROM since)::bigint FROM outbox \
                 ORDER BY since LIMIT 1",
                &[],
            )
            .await
            .map_err(unavailable)?;
        Ok(row.map(|row| OutboxEntry {
            refund_id: row.get(0),
            event_id: row.get(1),
            since: u64::try_from(row.get::<_, i64>(2)).unwrap_or(0),
        }))
    }

    /// See [`crate::store::Store::insert_settled`].
    pub async fn insert_settled(&self, record: &mut RefundRecord) -> Result<Claim, StoreError> {
        let Some(event) = record.state.event() else {
            return Err(StoreError::Unavailable(
                "only a record with an event is inserted settled".into(),
            ));
        };
        let event_id = event.event_id.clone();
        let me = self.me();
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(unavailable)?;
        let c = Columns::of(record)?;
        let mut params = c.params();
        params.push(&me);
        // The claim's lease check: an operator's request on a replica whose
        // lease expired waits for the new one.
        let inserted = tx.query_opt(CLAIM, &params).await.map_err(unavailable)?;
        if inserted.is_none() {
            drop(tx);
            return self.not_claimed(&record.refund_id).await;
        }
        tx.execute(MARK, &[&record.refund_id, &event_id])
            .await
            .map_err(unavailable)?;
        tx.execute(
            "UPDATE refunds SET owner = NULL WHERE refund_id = $1",
            &[&record.refund_id],
        )
        .await
        .map_err(unavailable)?;
        tx.commit().await.map_err(unavailable)?;
        record.revision = 1;
        Ok(Claim::Claimed)
    }

    /// See [`crate::store::Store::release`].
    pub async fn release(
        &self,
        refund_id: &str,
    ) -> Result<Result<Vec<u64>, PaidReservation>, StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(unavailable)?;
        let rows = tx
            .query(
                "SELECT key, ledger FROM ledgers WHERE ledger->'refunds' ? $1 FOR UPDATE",
                &[&refund_id],
            )
            .await
            .map_err(unavailable)?;
        let mut held = Vec::new();
        for row in rows {
            let key: String = row.get(0);
            let ledger: OriginalLedger = serde_json::from_value(row.get(1))
                .map_err(|e| corrupt(&format!("ledger {key}"), e))?;
            if let Some((amount, Reservation::Succeeded)) = ledger.refunds.get(refund_id).copied() {
                return Ok(Err(PaidReservation { amount }));
            }
            held.push((key, ledger));
        }
        let mut released = Vec::new();
        for (key, mut ledger) in held {
            if let Some((amount, _)) = ledger.refunds.remove(refund_id) {
                ledger.updated_at = crate::contract::event::now_rfc3339();
                let value = serde_json::to_value(&ledger).unwrap_or(Value::Null);
                tx.execute(
                    "UPDATE ledgers SET ledger = $2, updated_at = now() WHERE key = $1",
                    &[&key, &value],
                )
                .await
                .map_err(unavailable)?;
                released.push(amount);
            }
        }
        tx.commit().await.map_err(unavailable)?;
        Ok(Ok(released))
    }

    /// Whether another live replica is attempting this refund now.
    pub async fn attempt_in_progress(&self, refund_id: &str) -> Result<bool, StoreError> {
        let me = self.me();
        let client = self.client().await?;
        let stmt = client
            .prepare_cached(
                "SELECT EXISTS (SELECT 1 FROM refunds r JOIN replicas p ON p.id = r.owner \
                 WHERE r.refund_id = $1 AND r.state = 'attempting' AND p.id <> $2 \
                 AND p.lease_until > now())",
            )
            .await
            .map_err(unavailable)?;
        let row = client
            .query_one(&stmt, &[&refund_id, &me])
            .await
            .map_err(unavailable)?;
        Ok(row.get(0))
    }

    /// Refunds left attempting by replicas whose lease has expired.
    pub async fn cut_off_attempts(&self, limit: usize) -> Result<Vec<String>, StoreError> {
        let client = self.client().await?;
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows = client
            .query(
                "SELECT refund_id FROM refunds r WHERE state = 'attempting' \
                 AND NOT EXISTS (SELECT 1 FROM replicas p WHERE p.id = r.owner \
                   AND p.lease_until > now()) \
                 ORDER BY updated_at LIMIT $1",
                &[&limit],
            )
            .await
            .map_err(unavailable)?;
        Ok(rows.into_iter().map(|row| row.get(0)).collect())
    }

    /// See [`crate::store::Store::list`].
    pub async fn list(
        &self,
        status: Option<String>,
        limit: usize,
    ) -> Result<Vec<RefundRecord>, StoreError> {
        let client = self.client().await?;
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows = client
            .query(
                "SELECT refund_id, record, revision FROM refunds \
                 WHERE ($1::text IS NULL OR status = $1) ORDER BY updated_at DESC LIMIT $2",
                &[&status, &limit],
            )
            .await
            .map_err(unavailable)?;
        rows.into_iter()
            .map(|row| record_of(row.get::<_, &str>(0), row.get::<_, &[u8]>(1), row.get(2)))
            .collect()
    }

    /// See [`crate::store::Store::census`].
    pub async fn census(
        &self,
        limit: impl Fn(&str) -> Option<Duration>,
    ) -> Result<Census, StoreError> {
        let client = self.client().await?;
        let mut census = Census::default();
        for row in client
            .query("SELECT state, count(*) FROM refunds GROUP BY state", &[])
            .await
            .map_err(unavailable)?
        {
            let count = usize::try_from(row.get::<_, i64>(1)).unwrap_or(0);
            census.records += count;
            match row.get::<_, &str>(0) {
                "in_doubt" => census.in_doubt += count,
                "attempting" | "not_sent" => census.unfinished += count,
                _ => {}
            }
        }
        for row in client
            .query(
                "SELECT refund_id, provider, extract(epoch FROM now() - pending_since)::float8 \
                 FROM refunds WHERE state = 'pending'",
                &[],
            )
            .await
            .map_err(unavailable)?
        {
            let waited = Duration::from_secs_f64(row.get::<_, f64>(2).max(0.0));
            if limit(row.get(1)).is_some_and(|limit| waited > limit) {
                census.overdue.push(row.get(0));
            }
        }
        let counts = client
            .query_one(
                "SELECT (SELECT count(*) FROM tombstones), (SELECT count(*) FROM outbox)",
                &[],
            )
            .await
            .map_err(unavailable)?;
        census.tombstones = usize::try_from(counts.get::<_, i64>(0)).unwrap_or(0);
        census.unconfirmed = usize::try_from(counts.get::<_, i64>(1)).unwrap_or(0);
        Ok(census)
    }

    /// One pruning pass (the rules of `sled/prune.rs`): finished records
    /// older than the retention whose event was confirmed become
    /// tombstones, tombstones and settled ledgers older than the tombstone
    /// retention go.
    pub async fn prune(
        &self,
        now: OffsetDateTime,
        retention: Retention,
    ) -> Result<PruneReport, StoreError> {
        let mut report = PruneReport::default();
        let record_cutoff = to_rfc3339(now - retention.records);
        let tombstone_cutoff = to_rfc3339(now - retention.tombstones);
        loop {
            let done = self.prune_batch(&record_cutoff, &mut report).await?;
            if done < PRUNE_BATCH {
                break;
            }
        }
        let client = self.client().await?;
        let expired = client
            .execute(
                "DELETE FROM tombstones WHERE pruned_at < ($1::text)::timestamptz",
                &[&tombstone_cutoff],
            )
            .await
            .map_err(unavailable)?;
        report.tombstones_expired = usize::try_from(expired).unwrap_or(0);
        let ledgers = client
            .execute(
                "DELETE FROM ledgers WHERE updated_at < ($1::text)::timestamptz \
                 AND NOT EXISTS (SELECT 1 FROM jsonb_each(ledger->'refunds') e \
                   WHERE e.value->>1 <> 'succeeded') \
                 AND (key NOT LIKE chr(10) || 'payouts' || chr(10) || '%' \
                   OR right(key, 10) < to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM-DD'))",
                &[&tombstone_cutoff],
            )
            .await
            .map_err(unavailable)?;
        report.ledgers = usize::try_from(ledgers).unwrap_or(0);
        Ok(report)
    }

    /// Tombstones up to [`PRUNE_BATCH`] finished records; returns how many
    /// it tombstoned (fewer than a batch: the pass is done; an unreadable
    /// record is left and reported).
    async fn prune_batch(&self, cutoff: &str, report: &mut PruneReport) -> Result<i64, StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(unavailable)?;
        let rows = tx
            .query(
                "SELECT refund_id, record, revision FROM refunds r \
                 WHERE occurred_at < ($1::text)::timestamptz AND state = 'finished' \
                 AND updated_at < ($1::text)::timestamptz \
                 AND NOT EXISTS (SELECT 1 FROM outbox o WHERE o.refund_id = r.refund_id) \
                 ORDER BY occurred_at LIMIT $2 FOR UPDATE SKIP LOCKED",
                &[&cutoff, &PRUNE_BATCH],
            )
            .await
            .map_err(unavailable)?;
        let mut done = 0;
        for row in rows {
            let refund_id: String = row.get(0);
            let Ok(record) = record_of(&refund_id, row.get::<_, &[u8]>(1), row.get(2)) else {
                report.unreadable.push(refund_id);
                continue;
            };
            let Some(tombstone) = Tombstone::of(&record) else {
                continue;
            };
            let value = serde_json::to_value(&tombstone).unwrap_or(Value::Null);
            tx.execute(
                "INSERT INTO tombstones (refund_id, tombstone, pruned_at, occurred_at) \
                 VALUES ($1, $2, now(), ($3::text)::timestamptz) ON CONFLICT (refund_id) DO NOTHING",
                &[&refund_id, &value, &tombstone.occurred_at],
            )
            .await
            .map_err(unavailable)?;
            tx.execute("DELETE FROM refunds WHERE refund_id = $1", &[&refund_id])
                .await
                .map_err(unavailable)?;
            done += 1;
        }
        tx.commit().await.map_err(unavailable)?;
        report.tombstoned += usize::try_from(done).unwrap_or(0);
        Ok(done)
    }

    /// See [`crate::store::Store::report`].
    pub async fn report(&self, from: Date, to: Date) -> Result<Vec<ReportRow>, StoreError> {
        let client = self.client().await?;
        let (start, end) = (
            format!("{from}T00:00:00Z"),
            format!("{}T00:00:00Z", to.next_day().unwrap_or(to)),
        );
        let records = client
            .query(
                "SELECT refund_id, record, revision FROM refunds \
                 WHERE occurred_at >= ($1::text)::timestamptz AND occurred_at < ($2::text)::timestamptz",
                &[&start, &end],
            )
            .await
            .map_err(unavailable)?
            .into_iter()
            .filter_map(|row| record_of(row.get::<_, &str>(0), row.get::<_, &[u8]>(1), row.get(2)).ok())
            .collect::<Vec<_>>();
        let tombstones = client
            .query(
                "SELECT refund_id, tombstone FROM tombstones \
                 WHERE occurred_at >= ($1::text)::timestamptz AND occurred_at < ($2::text)::timestamptz",
                &[&start, &end],
            )
            .await
            .map_err(unavailable)?
            .into_iter()
            .filter_map(|row| {
                let t: Tombstone = serde_json::from_value(row.get(1)).ok()?;
                Some((row.get::<_, String>(0), t))
            })
            .collect::<Vec<_>>();
        Ok(crate::store::report::tally(
            records.into_iter(),
            tombstones.into_iter(),
            from,
            to,
        ))
    }

    /// The ledger of a command's original charge, if any.
    pub async fn ledger(
        &self,
        command: &RefundCommand,
    ) -> Result<Option<OriginalLedger>, StoreError> {
        let key = ledger_key(command);
        let client = self.client().await?;
        let row = client
            .query_opt("SELECT ledger FROM ledgers WHERE key = $1", &[&key])
            .await
            .map_err(unavailable)?;
        row.map(|row| {
            serde_json::from_value(row.get(0)).map_err(|e| corrupt(&format!("ledger {key}"), e))
        })
        .transpose()
    }
}

fn to_rfc3339(at: OffsetDateTime) -> String {
    at.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

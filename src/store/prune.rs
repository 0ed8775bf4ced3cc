//! Retention. A finished record older than `store.retention` becomes a
//! compact [`Tombstone`]: the full record (command, history) goes, but any
//! later copy of the command is still recognised and answered with the
//! recorded outcome, never sent to a provider again. Tombstones older than
//! `store.tombstone_retention` are deleted, and so are ledgers whose every
//! reservation is a paid refund and that have not changed for as long.
//!
//! In-doubt, attempting, not-yet-sent and pending records are never pruned:
//! they are not decided. A record that cannot be read stops nothing: it is
//! counted, logged and skipped.

use super::record::Tombstone;
use super::{decode, decode_record, encode, RefundRecord, RefundState, Store, StoreError};
use crate::store::ledger::OriginalLedger;
use std::time::Duration;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

/// How long what is kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    /// Finished records, then tombstones.
    pub records: Duration,
    /// Tombstones and settled ledgers.
    pub tombstones: Duration,
}

/// What one pruning pass did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PruneReport {
    /// Finished records turned into tombstones.
    pub tombstoned: usize,
    /// Tombstones deleted after `store.tombstone_retention`.
    pub tombstones_expired: usize,
    /// Settled original-charge ledgers deleted.
    pub ledgers: usize,
    /// Keys whose value could not be read (skipped; see the log).
    pub unreadable: Vec<String>,
}

fn older_than(at: &str, cutoff: OffsetDateTime) -> bool {
    OffsetDateTime::parse(at, &Rfc3339).is_ok_and(|t| t < cutoff)
}

impl Store {
    /// One pruning pass as of `now`. Blocking (it walks the trees): call it
    /// from the blocking pool.
    pub fn prune(
        &self,
        now: OffsetDateTime,
        retention: Retention,
    ) -> Result<PruneReport, StoreError> {
        let record_cutoff = now - retention.records;
        let tombstone_cutoff = now - retention.tombstones;
        let mut report = PruneReport::default();
        for item in self.refunds.iter() {
            let (key, value) = item?;
            let refund_id = String::from_utf8_lossy(&key).to_string();
            let record: RefundRecord = match decode_record(&refund_id, &value) {
                Ok(record) => record,
                Err(_) => {
                    report.unreadable.push(refund_id);
                    continue;
                }
            };
            if !matches!(record.state, RefundState::Finished { .. })
                || !older_than(&record.updated_at, record_cutoff)
            {
                continue;
            }
            // An event not yet confirmed stays with its record until the
            // outbox sweep has published it.
            if self.outbox.contains_key(&key)? {
                continue;
            }
            let Some(tombstone) = Tombstone::of(&record) else {
                continue;
            };
            // Tombstone first, then the record (only if unchanged since we
            // read it): a reader that looks up the record and then the
            // tombstone always finds one of them.
            self.tombstones.insert(&key, encode(&tombstone))?;
            if self
                .refunds
                .compare_and_swap(&key, Some(value), None as Option<&[u8]>)?
                .is_ok()
            {
                report.tombstoned += 1;
            }
        }
        for item in self.tombstones.iter() {
            let (key, value) = item?;
            let refund_id = String::from_utf8_lossy(&key).to_string();
            let tombstone: Tombstone = match decode(&refund_id, &value) {
                Ok(t) => t,
                Err(_) => {
                    report.unreadable.push(format!("tombstone {refund_id}"));
                    continue;
                }
            };
            if older_than(&tombstone.pruned_at, tombstone_cutoff)
                && self
                    .tombstones
                    .compare_and_swap(&key, Some(value), None as Option<&[u8]>)?
                    .is_ok()
            {
                report.tombstones_expired += 1;
            }
        }
        for item in self.originals.iter() {
            let (key, value) = item?;
            let Ok(ledger) = OriginalLedger::decode(&value) else {
                report
                    .unreadable
                    .push(format!("ledger {}", String::from_utf8_lossy(&key)));
                continue;
            };
            if ledger.settled()
                && older_than(&ledger.updated_at, tombstone_cutoff)
                && self
                    .originals
                    .compare_and_swap(&key, Some(value), None as Option<&[u8]>)?
                    .is_ok()
            {
                report.ledgers += 1;
            }
        }
        Ok(report)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::command::RefundCommand;
    use crate::event::{OutcomeEvent, Status};
    use crate::store::Known;

    fn command(id: &str) -> RefundCommand {
        RefundCommand::parse(
            format!(r#"{{"refund_id":"{id}","provider":"p","transaction":{{"id":"1"}}}}"#)
                .as_bytes(),
        )
        .expect("command")
    }

    fn record(id: &str, state: &str, updated_at: &str) -> RefundRecord {
        let mut record = RefundRecord::attempting(&command(id));
        let event = OutcomeEvent::new(id, Status::Succeeded, &Default::default(), 1);
        record.state = match state {
            "finished" => RefundState::Finished { event },
            "in_doubt" => RefundState::InDoubt { event },
            _ => record.state,
        };
        record.updated_at = updated_at.to_string();
        record
    }

    const DAY: Duration = Duration::from_secs(86_400);

    #[tokio::test]
    async fn old_finished_records_become_tombstones_and_nothing_undecided_goes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("open");
        let old = "2020-01-01T00:00:00Z";
        for r in [
            record("old-done", "finished", old),
            record("old-doubt", "in_doubt", old),
            record("old-attempting", "attempting", old),
            record("new-done", "finished", &crate::event::now_rfc3339()),
        ] {
            store.put(&r).expect("put");
            if let Some(event) = r.state.event() {
                store
                    .mark_published(&r.refund_id, &event.event_id)
                    .expect("confirmed");
            }
        }
        // A finished record whose event was never confirmed stays whole
        // until the outbox has published it.
        store
            .put(&record("old-unconfirmed", "finished", old))
            .expect("put");
        store
            .refunds
            .insert("garbage", b"not json".to_vec())
            .expect("insert");
        let retention = Retention {
            records: 30 * DAY,
            tombstones: 400 * DAY,
        };
        let report = store
            .prune(OffsetDateTime::now_utc(), retention)
            .expect("prune");
        assert_eq!(report.tombstoned, 1);
        assert_eq!(report.unreadable, vec!["garbage".to_string()]);
        assert!(store.get("old-done").expect("get").is_none());
        match store.lookup("old-done").expect("lookup") {
            Some(Known::Tombstone(t)) => {
                assert_eq!(t.status, Status::Succeeded);
                assert_eq!(t.payload_hash, command("old-done").payload_hash());
                let event = t.event(&command("old-done"));
                assert_eq!(
                    event.event_id,
                    crate::event::event_id("old-done", Status::Succeeded)
                );
            }
            other => panic!("expected a tombstone, got {other:?}"),
        }
        for kept in ["old-doubt", "old-attempting", "new-done", "old-unconfirmed"] {
            assert!(store.get(kept).expect("get").is_some(), "{kept} kept");
        }
        // A tombstone is compact: well under the record it replaces.
        let size = store
            .tombstones
            .get("old-done")
            .expect("get")
            .expect("t")
            .len();
        assert!(size < 300, "tombstone of {size} bytes");

        // 500 days later the tombstone itself expires.
        let later = OffsetDateTime::now_utc() + 500 * DAY;
        let report = store.prune(later, retention).expect("prune");
        assert!(report.tombstones_expired >= 1);
        assert!(store.lookup("old-done").expect("lookup").is_none());
    }
}

/// The figures in the README ("Retention"): `cargo test --release --lib --
/// --ignored tombstones_of_a_million --nocapture` (set `TOMBSTONES_N` for
/// another count). Not a timed test: it prints sizes.
#[cfg(test)]
mod size {
    use super::*;
    use crate::command::Operation;
    use crate::event::Status;
    use sha2::Digest;

    fn dir_size(path: &std::path::Path) -> u64 {
        std::fs::read_dir(path)
            .map(|entries| {
                entries
                    .flatten()
                    .map(|e| match e.metadata() {
                        Ok(m) if m.is_dir() => dir_size(&e.path()),
                        Ok(m) => m.len(),
                        Err(_) => 0,
                    })
                    .sum()
            })
            .unwrap_or(0)
    }

    #[tokio::test]
    #[ignore = "writes a large store; run by hand for the README figures"]
    async fn tombstones_of_a_million() {
        let n: u64 = std::env::var("TOMBSTONES_N")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(1_000_000);
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("open");
        let mut encoded = 0;
        for i in 0..n {
            let refund_id = format!("rf-2026-{i:09}");
            let tombstone = Tombstone {
                payload_hash: crate::command::hex(&sha2::Sha256::digest(refund_id.as_bytes())),
                event_id: crate::event::event_id(&refund_id, Status::Succeeded),
                status: Status::Succeeded,
                performed: Some(Operation::Refund),
                provider_transaction_id: Some(format!("{}", 400_000_000 + i)),
                provider_code: Some("000".into()),
                provider_message: Some("Permitted transaction".into()),
                error_kind: None,
                attempts: 1,
                occurred_at: "2026-11-22T10:15:00Z".into(),
                pruned_at: "2026-12-22T10:15:00Z".into(),
                provider: "creditguard".into(),
                amount: Some(crate::money::Amount {
                    minor: 20_000,
                    currency: "ILS".into(),
                }),
            };
            let bytes = encode(&tombstone);
            encoded = bytes.len();
            store
                .tombstones
                .insert(refund_id.as_bytes(), bytes)
                .expect("insert");
        }
        store.sync().await.expect("sync");
        store.close().await.expect("close");
        drop(store);
        let size = dir_size(dir.path());
        println!(
            "{n} tombstones: {encoded} bytes encoded each (plus its key), store {:.1} MiB on disk, {:.0} bytes per refund",
            size as f64 / (1024.0 * 1024.0),
            size as f64 / n as f64
        );
    }
}

//! What only the sled backend has: the on-disk forms, the syncer, the
//! directory lock and pruning over trees. What every backend must do is in
//! the shared suite (`tests/store.rs`).

use super::*;
use crate::contract::event::{OutcomeEvent, Status};
use crate::store::{RefundState, Retention};
use std::sync::atomic::Ordering;

fn command(id: &str) -> RefundCommand {
    RefundCommand::parse(
        format!(r#"{{"refund_id":"{id}","provider":"p","transaction":{{"id":"1"}}}}"#).as_bytes(),
    )
    .expect("command")
}

fn open(dir: &Path) -> SledStore {
    SledStore::open(dir, SledOptions::default()).expect("open")
}

#[tokio::test]
async fn a_closed_store_opens_again_at_once_and_keeps_its_records() {
    let dir = tempfile::tempdir().expect("tempdir");
    for round in 0..20 {
        let store = open(dir.path());
        let id = format!("r{round}");
        let record = RefundRecord::attempting(&command(&id));
        assert_eq!(store.claim(&record).expect("claim"), Claim::Claimed);
        let again = store.clone();
        store.close().await.expect("close");
        // A handle still around after close fails instead of writing.
        assert!(matches!(again.get(&id), Err(StoreError::Unavailable(_))));
        let reopened = open(dir.path());
        assert_eq!(reopened.list(None, 100).expect("list").len(), round + 1);
        reopened.close().await.expect("close");
    }
}

#[tokio::test]
async fn records_in_either_form_are_read_counted_and_rewritten() {
    let dir = tempfile::tempdir().expect("tempdir");
    let compact = open(dir.path());
    let json = SledStore {
        shared: Arc::new(Shared {
            open: RwLock::new(compact.trees().ok()),
            path: dir.path().to_path_buf(),
            syncer: compact.shared.syncer.clone(),
            stats: compact.shared.stats.clone(),
            linger: Duration::ZERO,
            inline_flush: false,
            format: RecordFormat::Json,
        }),
    };
    let first_byte = |id: &str| {
        compact
            .trees()
            .expect("open")
            .refunds
            .get(id)
            .expect("io")
            .expect("present")[0]
    };
    // As an older version (or `record_format = "json"`) wrote it.
    let old = RefundRecord::attempting(&command("old"));
    assert_eq!(json.claim(&old).expect("claim"), Claim::Claimed);
    let new = RefundRecord::attempting(&command("new"));
    assert_eq!(compact.claim(&new).expect("claim"), Claim::Claimed);
    assert_eq!(first_byte("old"), b'{');
    assert_eq!(first_byte("new"), 1);
    for store in [&compact, &json] {
        assert_eq!(store.get("old").expect("get"), Some(old.clone()));
        assert_eq!(store.get("new").expect("get"), Some(new.clone()));
        assert_eq!(store.list(None, 10).expect("list").len(), 2);
        assert_eq!(store.census(|_| None).expect("census").unfinished, 2);
    }
    // Written again, a record takes the writer's form.
    compact.put(&old).expect("put");
    assert_eq!(first_byte("old"), 1);
    json.put(&new).expect("put");
    assert_eq!(first_byte("new"), b'{');
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_flush_serves_many_concurrent_syncs() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path());
    write_and_sync(&store, 200).await;
    let flushes = store.stats().flushes.load(Ordering::Relaxed);
    let requests = store.stats().requests.load(Ordering::Relaxed);
    assert_eq!(requests, 200);
    assert!(flushes < requests, "flushes {flushes} for {requests} syncs");
}

/// On a one-thread runtime no writer flushes on its own thread: that
/// would stop every other task for the flush, so that each sync ended up
/// alone. The syncer batches them instead.
#[tokio::test(flavor = "current_thread")]
async fn on_one_runtime_thread_the_syncer_does_the_flushes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path());
    write_and_sync(&store, 50).await;
    let flushes = store.stats().flushes.load(Ordering::Relaxed);
    assert!(flushes < 25, "{flushes} flushes for 50 syncs");
}

/// `n` concurrent tasks, each writing a record and waiting for its sync.
async fn write_and_sync(store: &SledStore, n: usize) {
    let mut tasks = Vec::new();
    for i in 0..n {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            let id = format!("r{i}");
            store
                .put(&RefundRecord::attempting(&command(&id)))
                .expect("put");
            store.sync(&id).await.expect("sync");
        }));
    }
    for t in tasks {
        t.await.expect("task");
    }
}

const DAY: Duration = Duration::from_secs(86_400);

fn aged(id: &str, state: &str, updated_at: &str) -> RefundRecord {
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

#[tokio::test]
async fn old_finished_records_become_tombstones_and_nothing_undecided_goes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path());
    let old = "2020-01-01T00:00:00Z";
    for r in [
        aged("old-done", "finished", old),
        aged("old-doubt", "in_doubt", old),
        aged("old-attempting", "attempting", old),
        aged(
            "new-done",
            "finished",
            &crate::contract::event::now_rfc3339(),
        ),
    ] {
        store.commit(&r, LedgerChange::Keep).expect("commit");
        if let Some(event) = r.state.event() {
            store
                .mark_published(&r.refund_id, &event.event_id)
                .expect("confirmed");
        }
    }
    // A finished record whose event was never confirmed stays whole until
    // the outbox has published it.
    store
        .commit(
            &aged("old-unconfirmed", "finished", old),
            LedgerChange::Keep,
        )
        .expect("commit");
    store
        .trees()
        .expect("open")
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
                crate::contract::event::event_id("old-done", Status::Succeeded)
            );
        }
        other => panic!("expected a tombstone, got {other:?}"),
    }
    for kept in ["old-doubt", "old-attempting", "new-done", "old-unconfirmed"] {
        assert!(store.get(kept).expect("get").is_some(), "{kept} kept");
    }
    // A tombstone is compact: well under the record it replaces.
    let size = store
        .trees()
        .expect("open")
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

//! The store interface's promises, run against both backends: the embedded
//! sled store and a PostgreSQL database (a private server this binary
//! starts). What only one backend has is tested next to it
//! (`src/store/sled/tests.rs`) or below, marked so.

use crate::support;

use refund_worker::config::PostgresSettings;
use refund_worker::contract::command::RefundCommand;
use refund_worker::contract::event::{OutcomeEvent, Status};
use refund_worker::store::ledger::{LedgerChange, Reservation};
use refund_worker::store::postgres::PgStore;
use refund_worker::store::{Claim, Known, RefundRecord, RefundState, Retention, Store, StoreError};
use refund_worker::values::secret::Secret;
use std::time::Duration;

/// A store of one backend, and what keeps it alive.
struct Opened {
    store: Store,
    _dir: Option<tempfile::TempDir>,
}

async fn sled() -> Opened {
    let dir = tempfile::tempdir().expect("tempdir");
    Opened {
        store: Store::open(dir.path()).expect("open"),
        _dir: Some(dir),
    }
}

async fn postgres() -> Opened {
    let url = tokio::task::spawn_blocking(support::postgres::database)
        .await
        .expect("database");
    let settings = PostgresSettings {
        url: Some(Secret::new(url)),
        ..Default::default()
    };
    let store = PgStore::open(&settings).await.expect("open");
    let store = Store::Postgres(store);
    assert!(store.healthy());
    Opened { store, _dir: None }
}

/// Runs `$case(store)` against each backend.
macro_rules! both {
    ($case:ident) => {
        mod $case {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sled() {
                let opened = super::sled().await;
                super::$case(&opened.store).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres() {
                let opened = super::postgres().await;
                super::$case(&opened.store).await;
            }
        }
    };
}

fn command(id: &str) -> RefundCommand {
    RefundCommand::parse(
        format!(r#"{{"refund_id":"{id}","provider":"p","transaction":{{"id":"1"}}}}"#).as_bytes(),
    )
    .expect("command")
}

fn of_original(id: &str, minor: u64) -> RefundCommand {
    RefundCommand::parse(
        format!(
            r#"{{"refund_id":"{id}","provider":"p","transaction":{{"id":"9"}},"amount":{{"minor":{minor},"currency":"ILS"}},"original_amount":1000}}"#
        )
        .as_bytes(),
    )
    .expect("command")
}

fn finished(record: &mut RefundRecord, status: Status) -> OutcomeEvent {
    let event = OutcomeEvent::new(&record.refund_id, status, &record.command.echo(), 1);
    record.transition(
        RefundState::Finished {
            event: event.clone(),
        },
        "outcome",
    );
    event
}

both!(the_first_claim_wins_and_a_second_finds_its_record);
async fn the_first_claim_wins_and_a_second_finds_its_record(store: &Store) {
    let mut first = RefundRecord::attempting(&command("r1"));
    assert_eq!(
        store.claim(&mut first).await.expect("claim"),
        Claim::Claimed
    );
    store.sync_refund("r1").await.expect("sync");
    let mut second = RefundRecord::attempting(&command("r1"));
    match store.claim(&mut second).await.expect("claim") {
        Claim::Exists(existing) => {
            assert_eq!(existing.state.name(), "attempting");
            assert_eq!(existing.callback_token, first.callback_token);
        }
        other => panic!("{other:?}"),
    }
    let got = store.get("r1").await.expect("get").expect("present");
    assert_eq!(got.payload_hash, first.payload_hash);
}

both!(concurrent_claims_on_one_charge_never_reserve_past_the_original);
async fn concurrent_claims_on_one_charge_never_reserve_past_the_original(store: &Store) {
    let mut tasks = Vec::new();
    for i in 0..20 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            let mut record = RefundRecord::attempting(&of_original(&format!("half-{i}"), 600));
            store.claim(&mut record).await.expect("claim")
        }));
    }
    let mut claimed = 0;
    for task in tasks {
        match task.await.expect("task") {
            Claim::Claimed => claimed += 1,
            Claim::OverRefund(over) => assert_eq!(over.reserved, 600),
            Claim::Exists(_) => panic!("distinct ids"),
        }
    }
    assert_eq!(claimed, 1, "exactly one 600 of 1000 reserved");
}

both!(an_outcome_settles_its_reservation_and_a_paid_one_is_never_released);
async fn an_outcome_settles_its_reservation_and_a_paid_one_is_never_released(store: &Store) {
    let mut a = RefundRecord::attempting(&of_original("a", 600));
    assert_eq!(store.claim(&mut a).await.expect("claim"), Claim::Claimed);
    let mut b = RefundRecord::attempting(&of_original("b", 500));
    assert!(matches!(
        store.claim(&mut b).await.expect("claim"),
        Claim::OverRefund(_)
    ));
    // a is declined: its reservation goes with the same write.
    finished(&mut a, Status::Failed);
    store
        .commit(&mut a, LedgerChange::Release)
        .await
        .expect("commit");
    let ledger = store.ledger(&a.command).await.expect("io").expect("ledger");
    assert_eq!(ledger.reserved(), 0);
    let mut b = RefundRecord::attempting(&of_original("b", 500));
    assert_eq!(store.claim(&mut b).await.expect("claim"), Claim::Claimed);
    finished(&mut b, Status::Succeeded);
    store
        .commit(&mut b, LedgerChange::Mark(Reservation::Succeeded))
        .await
        .expect("commit");
    // b was paid: its reservation stands whatever an operator asks.
    let paid = store.release("b").await.expect("release");
    assert!(paid.is_err(), "{paid:?}");
    assert_eq!(store.release("nobody").await.expect("release"), Ok(vec![]));
    // A contradicting approval puts a's amount back.
    store
        .commit(&mut a, LedgerChange::Restore(Reservation::Succeeded))
        .await
        .expect("commit");
    let ledger = store.ledger(&a.command).await.expect("io").expect("ledger");
    assert_eq!(ledger.reserved(), 1100);
}

both!(the_outbox_holds_each_refund_s_latest_event_until_confirmed);
async fn the_outbox_holds_each_refund_s_latest_event_until_confirmed(store: &Store) {
    let mut record = RefundRecord::attempting(&command("r1"));
    assert_eq!(
        store.claim(&mut record).await.expect("claim"),
        Claim::Claimed
    );
    assert!(store.outbox_mark("r1").await.expect("mark").is_none());
    let pending = OutcomeEvent::new("r1", Status::Pending, &Default::default(), 1);
    record.transition(
        RefundState::Pending {
            event: pending.clone(),
            since: refund_worker::contract::event::now_rfc3339(),
        },
        "pending",
    );
    store
        .commit(&mut record, LedgerChange::Keep)
        .await
        .expect("commit");
    let done = finished(&mut record, Status::Succeeded);
    store
        .commit(&mut record, LedgerChange::Keep)
        .await
        .expect("commit");
    // A late confirm of the older event does not clear the newer one.
    store
        .mark_published("r1", &pending.event_id)
        .await
        .expect("mark");
    let waiting = store.unconfirmed(Duration::ZERO, 10).await.expect("outbox");
    assert_eq!(waiting.len(), 1);
    assert_eq!(waiting[0].event_id, done.event_id);
    assert!(store
        .unconfirmed(Duration::from_secs(3600), 10)
        .await
        .expect("outbox")
        .is_empty());
    store
        .mark_published("r1", &done.event_id)
        .await
        .expect("mark");
    assert!(store.outbox_mark("r1").await.expect("mark").is_none());
    assert_eq!(store.census(|_| None).await.expect("census").unconfirmed, 0);
}

both!(a_settled_record_is_inserted_only_where_there_is_none);
async fn a_settled_record_is_inserted_only_where_there_is_none(store: &Store) {
    let mut first = RefundRecord::attempting(&command("r1"));
    finished(&mut first, Status::Failed);
    assert_eq!(
        store.insert_settled(&mut first).await.expect("insert"),
        Claim::Claimed
    );
    assert!(store.outbox_mark("r1").await.expect("mark").is_some());
    let mut again = RefundRecord::attempting(&command("r1"));
    finished(&mut again, Status::Failed);
    assert!(matches!(
        store.insert_settled(&mut again).await.expect("insert"),
        Claim::Exists(_)
    ));
}

both!(the_census_counts_states_and_finds_overdue_pending_refunds);
async fn the_census_counts_states_and_finds_overdue_pending_refunds(store: &Store) {
    let event = |id: &str| OutcomeEvent::new(id, Status::Pending, &Default::default(), 1);
    for (id, state) in [
        ("a", RefundState::Attempting { since: "x".into() }),
        ("n", RefundState::NotSent { reason: "r".into() }),
        ("d", RefundState::InDoubt { event: event("d") }),
        ("f", RefundState::Finished { event: event("f") }),
        (
            "late",
            RefundState::Pending {
                event: event("late"),
                since: "2020-01-01T00:00:00Z".into(),
            },
        ),
        (
            "fresh",
            RefundState::Pending {
                event: event("fresh"),
                since: refund_worker::contract::event::now_rfc3339(),
            },
        ),
    ] {
        let mut record = RefundRecord::attempting(&command(id));
        assert_eq!(
            store.claim(&mut record).await.expect("claim"),
            Claim::Claimed
        );
        record.state = state;
        store.put(&mut record).await.expect("put");
    }
    let census = store
        .census(|provider| (provider == "p").then_some(Duration::from_secs(3600)))
        .await
        .expect("census");
    assert_eq!(
        (census.records, census.in_doubt, census.unfinished),
        (6, 1, 2)
    );
    assert_eq!(census.overdue, vec!["late".to_string()]);
    let listed = store.list(Some("in_doubt".into()), 10).await.expect("list");
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].refund_id, "d");
}

both!(old_finished_records_become_tombstones_that_still_answer);
async fn old_finished_records_become_tombstones_that_still_answer(store: &Store) {
    let mut done = RefundRecord::attempting(&command("done"));
    assert_eq!(store.claim(&mut done).await.expect("claim"), Claim::Claimed);
    let event = finished(&mut done, Status::Succeeded);
    store
        .commit(&mut done, LedgerChange::Keep)
        .await
        .expect("commit");
    let mut doubt = RefundRecord::attempting(&command("doubt"));
    assert_eq!(
        store.claim(&mut doubt).await.expect("claim"),
        Claim::Claimed
    );
    let retention = Retention {
        records: Duration::from_secs(86_400),
        tombstones: Duration::from_secs(10 * 86_400),
    };
    let later = time::OffsetDateTime::now_utc() + Duration::from_secs(2 * 86_400);
    // Its event is not confirmed yet: the record stays whole.
    let report = store.prune(later, retention).await.expect("prune");
    assert_eq!(report.tombstoned, 0);
    store
        .mark_published("done", &event.event_id)
        .await
        .expect("mark");
    let report = store.prune(later, retention).await.expect("prune");
    assert_eq!(report.tombstoned, 1);
    match store.lookup("done").await.expect("lookup") {
        Some(Known::Tombstone(t)) => assert_eq!(t.event_id, event.event_id),
        other => panic!("{other:?}"),
    }
    assert!(
        store.get("doubt").await.expect("get").is_some(),
        "undecided stays"
    );
    let much_later = time::OffsetDateTime::now_utc() + Duration::from_secs(30 * 86_400);
    let report = store.prune(much_later, retention).await.expect("prune");
    assert_eq!(report.tombstones_expired, 1);
    assert!(store.lookup("done").await.expect("lookup").is_none());
}

/// PostgreSQL: a write that acts on a record read before someone else
/// wrote it does not land (replicas share the row).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_a_write_on_a_stale_read_does_not_land() {
    let opened = postgres().await;
    let store = &opened.store;
    let mut mine = RefundRecord::attempting(&command("r1"));
    assert_eq!(store.claim(&mut mine).await.expect("claim"), Claim::Claimed);
    let mut theirs = store.get("r1").await.expect("get").expect("present");
    let mut stale = theirs.clone();
    finished(&mut theirs, Status::Failed);
    store
        .commit(&mut theirs, LedgerChange::Keep)
        .await
        .expect("commit");
    finished(&mut stale, Status::Succeeded);
    match store.commit(&mut stale, LedgerChange::Keep).await {
        Err(StoreError::Fenced { refund_id }) => assert_eq!(refund_id, "r1"),
        other => panic!("{other:?}"),
    }
    let now = store.get("r1").await.expect("get").expect("present");
    assert_eq!(now.status(), "failed");
}

/// PostgreSQL: a database with a schema newer than this binary is refused,
/// naming the key, never the password.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_a_newer_schema_and_refused_credentials_stop_start_up() {
    let url = tokio::task::spawn_blocking(support::postgres::database)
        .await
        .expect("database");
    let settings = |url: &str| PostgresSettings {
        url: Some(Secret::new(url)),
        ..Default::default()
    };
    let opened = PgStore::open(&settings(&url)).await.expect("open");
    opened.close().await.expect("close");
    let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .expect("connect");
    tokio::spawn(connection);
    client
        .execute(
            "INSERT INTO refinery_schema_history (version, name, applied_on, checksum) \
             VALUES (999, 'from_the_future', '2030-01-01T00:00:00Z', '0')",
            &[],
        )
        .await
        .expect("insert");
    let err = PgStore::open(&settings(&url))
        .await
        .expect_err("newer schema")
        .to_string();
    assert!(
        err.contains("store.postgres.url") && err.contains("newer"),
        "{err}"
    );
    let missing = url.rsplit_once('/').expect("db").0.to_string() + "/no_such_database";
    let err = PgStore::open(&settings(&missing))
        .await
        .expect_err("missing database")
        .to_string();
    assert!(err.contains("does not exist"), "{err}");
    tokio::task::spawn_blocking(|| {
        support::postgres::shared()
            .psql("CREATE ROLE password_user LOGIN PASSWORD 'right-password'")
            .expect("role")
    })
    .await
    .expect("role");
    let port = support::postgres::shared().port;
    let wrong = format!("postgres://password_user:wrong-password-4711@127.0.0.1:{port}/postgres");
    let err = PgStore::open(&settings(&wrong))
        .await
        .map(|_| ())
        .expect_err("refused")
        .to_string();
    assert!(err.contains("refused the credentials"), "{err}");
    assert!(!err.contains("wrong-password-4711"), "{err}");
}

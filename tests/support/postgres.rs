//! The test binary's private PostgreSQL server (see
//! `refund_testkit::local_postgres`), started on first use and shared by the
//! binary's tests; each test gets a database of its own.

use refund_testkit::local_postgres::LocalPostgres;
use std::sync::OnceLock;

static SERVER: OnceLock<LocalPostgres> = OnceLock::new();

/// The server of this test binary, started on first use.
pub fn shared() -> &'static LocalPostgres {
    SERVER.get_or_init(|| LocalPostgres::start().expect("private PostgreSQL server"))
}

/// A fresh database; its URL.
pub fn database() -> String {
    shared().database().expect("database")
}

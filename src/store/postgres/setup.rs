//! Reaching the database: the URL (`store.postgres.url`), TLS, the pool, and
//! the schema. A URL that does not parse, refused credentials, a missing
//! database or a schema newer than this binary are configuration errors:
//! start-up stops naming `store.postgres.url` (never its password). A
//! database that does not answer is an outage: the worker waits for it.

use super::PostgresSettings;
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use std::sync::Arc;
use std::time::Duration;
use tokio_postgres::config::SslMode;
use tokio_postgres::error::SqlState;

mod embedded {
    refinery::embed_migrations!("src/store/postgres/migrations");
}

/// The advisory lock replicas take to migrate one at a time.
const MIGRATION_LOCK: i64 = 0x7265_6675_6e64_0001;

/// How long a connection attempt may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a task waits for a connection from the pool before giving up
/// (the delivery is put back, and tried again later).
const POOL_WAIT: Duration = Duration::from_secs(5);

/// Why the database cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    /// A configuration error: the key is `store.postgres.url` (or
    /// `store.postgres.tls_ca_path`); start-up stops.
    #[error("{0}")]
    Config(String),
    /// The database did not answer; try again later.
    #[error("the database is unreachable: {0}")]
    Unreachable(String),
}

/// The parsed URL and the TLS connector to reach it with.
#[derive(Clone)]
pub(super) struct Target {
    pub(super) config: tokio_postgres::Config,
    tls: Option<tokio_postgres_rustls::MakeRustlsConnect>,
}

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The config holds the password.
        f.debug_struct("Target")
            .field("hosts", &self.config.get_hosts().len())
            .field("tls", &self.tls.is_some())
            .finish()
    }
}

impl Target {
    /// Parses `store.postgres.url` and prepares TLS (`sslmode`, and the
    /// CA of `store.postgres.tls_ca_path` besides the public ones).
    pub(super) fn new(settings: &PostgresSettings) -> Result<Self, SetupError> {
        let url = settings
            .url
            .as_ref()
            .filter(|u| !u.is_empty())
            .ok_or_else(|| {
                SetupError::Config(
                    "store.postgres.url: missing (store.backend = \"postgres\" needs \
                 postgres://user:password@host:port/database)"
                        .into(),
                )
            })?;
        let mut config: tokio_postgres::Config = url.expose().parse().map_err(|_| {
            SetupError::Config(
                "store.postgres.url: not a PostgreSQL URL \
                 (postgres://user:password@host:port/database)"
                    .into(),
            )
        })?;
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(CONNECT_TIMEOUT);
        }
        config.application_name("refund-worker");
        let tls = match config.get_ssl_mode() {
            SslMode::Disable => None,
            _ => Some(tls_connector(settings)?),
        };
        Ok(Target { config, tls })
    }

    /// A pool of at most `max` connections.
    pub(super) fn pool(&self, max: usize) -> Result<Pool, SetupError> {
        let manager_config = ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        };
        let manager = match &self.tls {
            Some(tls) => Manager::from_config(self.config.clone(), tls.clone(), manager_config),
            None => {
                Manager::from_config(self.config.clone(), tokio_postgres::NoTls, manager_config)
            }
        };
        Pool::builder(manager)
            .max_size(max.max(1))
            .wait_timeout(Some(POOL_WAIT))
            .create_timeout(Some(CONNECT_TIMEOUT))
            .recycle_timeout(Some(CONNECT_TIMEOUT))
            .runtime(Runtime::Tokio1)
            .build()
            .map_err(|e| SetupError::Config(format!("store.postgres: {e}")))
    }

    /// A connection of its own (migrations), classified on failure.
    async fn connect(&self) -> Result<tokio_postgres::Client, SetupError> {
        let connected = match &self.tls {
            Some(tls) => self.config.connect(tls.clone()).await.map(|(c, conn)| {
                tokio::spawn(conn);
                c
            }),
            None => self
                .config
                .connect(tokio_postgres::NoTls)
                .await
                .map(|(c, conn)| {
                    tokio::spawn(conn);
                    c
                }),
        };
        connected.map_err(classify)
    }

    /// Brings the schema up to this binary's migrations, one replica at a
    /// time; refuses a database whose applied migrations this binary does
    /// not know (a newer version) or whose applied migrations differ.
    pub(super) async fn migrate(&self) -> Result<(), SetupError> {
        let mut client = self.connect().await?;
        client
            .execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK])
            .await
            .map_err(classify)?;
        let result = embedded::migrations::runner()
            .set_abort_missing(true)
            .set_abort_divergent(true)
            .run_async(&mut client)
            .await;
        let _ = client
            .execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK])
            .await;
        match result {
            Ok(_) => Ok(()),
            Err(e) => Err(match e.kind() {
                refinery::error::Kind::MissingVersion(m) => SetupError::Config(format!(
                    "store.postgres.url: the database's schema is newer than this binary \
                     (migration {} is applied and unknown here): run the newer version, or \
                     restore a database of this one",
                    m.version()
                )),
                refinery::error::Kind::DivergentVersion(applied, _) => SetupError::Config(format!(
                    "store.postgres.url: the database's migration {} differs from this \
                     binary's: it belongs to another build",
                    applied.version()
                )),
                refinery::error::Kind::Connection(..) => SetupError::Unreachable(e.to_string()),
                _ => SetupError::Config(format!("store.postgres.url: migrating: {e}")),
            }),
        }
    }
}

/// A failed connection: refused credentials or a missing database are
/// configuration errors; anything else may pass.
pub(super) fn classify(e: tokio_postgres::Error) -> SetupError {
    let config = |what: &str| {
        SetupError::Config(format!(
            "store.postgres.url: {what} ({})",
            e.as_db_error().map(|d| d.message()).unwrap_or_default()
        ))
    };
    match e.code() {
        Some(code)
            if *code == SqlState::INVALID_PASSWORD
                || *code == SqlState::INVALID_AUTHORIZATION_SPECIFICATION =>
        {
            config("the database refused the credentials")
        }
        Some(code) if *code == SqlState::INVALID_CATALOG_NAME => {
            config("the database does not exist")
        }
        _ => SetupError::Unreachable(e.to_string()),
    }
}

fn tls_connector(
    settings: &PostgresSettings,
) -> Result<tokio_postgres_rustls::MakeRustlsConnect, SetupError> {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(path) = &settings.tls_ca_path {
        use rustls::pki_types::pem::PemObject;
        let bad = |what: String| {
            SetupError::Config(format!(
                "store.postgres.tls_ca_path: {}: {what}",
                path.display()
            ))
        };
        let pem = std::fs::read(path).map_err(|e| bad(e.to_string()))?;
        for cert in rustls::pki_types::CertificateDer::pem_slice_iter(&pem) {
            let cert = cert.map_err(|e| bad(e.to_string()))?;
            roots.add(cert).map_err(|e| bad(e.to_string()))?;
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| SetupError::Config(format!("store.postgres: TLS: {e}")))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(tokio_postgres_rustls::MakeRustlsConnect::new(config))
}

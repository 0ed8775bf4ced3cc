//! `store.postgres.*`: the shared database of the replicas. The settings
//! live with the backend that reads them (the configuration re-exports
//! them), so the store never reaches back into `config`.

use crate::values::secret::Secret;
use serde::Deserialize;
use std::path::PathBuf;
use std::time::Duration;

/// `store.postgres.*`.
#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
pub struct PostgresSettings {
    /// `postgres://user:password@host:port/database` (secret: it holds a
    /// password; `REFUND_WORKER__STORE__POSTGRES__URL` or its `_FILE`).
    #[serde(default)]
    pub url: Option<Secret>,
    /// Connections in this replica's pool.
    #[serde(
        default = "default_max_connections",
        deserialize_with = "crate::values::lenient::u64"
    )]
    pub max_connections: u64,
    /// How long a replica that stopped renewing its lease (killed, frozen,
    /// cut off) still owns its refunds; after that another replica settles
    /// what it was attempting. Renewed every third of it.
    #[serde(
        default = "default_lease",
        deserialize_with = "crate::values::duration::required"
    )]
    pub lease: Duration,
    /// PEM file of the CA (or CAs) that signed the database's certificate,
    /// when it is not a public one (a managed service's own CA).
    #[serde(default)]
    pub tls_ca_path: Option<PathBuf>,
}

impl Default for PostgresSettings {
    fn default() -> Self {
        PostgresSettings {
            url: None,
            max_connections: default_max_connections(),
            lease: default_lease(),
            tls_ca_path: None,
        }
    }
}

fn default_max_connections() -> u64 {
    16
}

fn default_lease() -> Duration {
    Duration::from_secs(10)
}

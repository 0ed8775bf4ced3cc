//! Layered configuration: `config/default.toml` (compiled in, so the binary
//! runs from any directory), then an optional `--config FILE`, then
//! `REFUND_WORKER__SECTION__KEY` environment variables. Validation runs once
//! at start-up and names the offending key, so a bad deployment fails before
//! it touches a message.

pub use crate::observability::telemetry::LogFormat;
pub use crate::store::postgres::PostgresSettings;
pub use crate::values::duration::parse as parse_duration;

mod keys;
mod load;

pub use crate::providers::creditguard::CreditGuardAccount;
pub use crate::providers::hyp_pay::HypPayAccount;
pub use crate::providers::paynet::PaynetAccount;
pub use crate::providers::ProviderAccount;
use crate::store::Retention;
use crate::values::secret::Secret;
pub use load::env_var;
use load::Layers;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The defaults shipped in the repository.
pub const DEFAULT_TOML: &str = include_str!("../../config/default.toml");

/// Environment variable prefix (`REFUND_WORKER__AMQP__URL`).
pub const ENV_PREFIX: &str = "REFUND_WORKER";

/// A configuration problem, naming the key (and, once located, where its
/// value came from).
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The layers could not be read or deserialised.
    #[error("configuration: {0}")]
    Load(#[from] config::ConfigError),
    /// A value was read but is not acceptable.
    #[error("configuration key `{key}`: {problem}")]
    Invalid {
        /// Dotted key, e.g. `amqp.prefetch`.
        key: String,
        /// What is wrong with it.
        problem: String,
    },
    /// A `…_FILE` variable could not supply its value.
    #[error("configuration: {var}: {problem}")]
    SecretFile {
        /// The variable.
        var: String,
        /// What went wrong.
        problem: String,
    },
    /// A key no setting reads (a typo, a key of another version).
    #[error("unknown configuration key `{key}` (set by {origin}){hint}")]
    Unknown {
        /// Dotted key as set.
        key: String,
        /// Where it was set.
        origin: String,
        /// `: did you mean …?`, or what to do instead; may be empty.
        hint: String,
    },
    /// The configuration does not fit what it meets (the database, the
    /// broker's queues); the message names the key.
    #[error("configuration: {0}")]
    Deployment(String),
    /// An error with the layer its value came from.
    #[error("{error} (set by {origin})")]
    Located {
        /// The error.
        error: Box<ConfigError>,
        /// `environment variable REFUND_WORKER__…`, `file …`, or the defaults.
        origin: String,
    },
}

fn invalid(key: impl Into<String>, problem: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        problem: problem.into(),
    }
}

/// What the operator commands (`dlq`, `refunds`, `report`) read: the same
/// layers as the worker, so they find its broker and its API without being
/// told twice.
#[derive(Debug, Clone)]
pub struct ToolSettings {
    /// Broker.
    pub amqp: AmqpSettings,
    /// The worker's listener and operator token.
    pub http: HttpSettings,
    /// Retention (a replay must not outlive the tombstones).
    pub retention: Retention,
}

impl ToolSettings {
    /// The worker's operator API: `http.addr`, reached on loopback when it
    /// listens on every address.
    pub fn worker_url(&self) -> String {
        let addr = self
            .http
            .addr
            .replace("0.0.0.0:", "127.0.0.1:")
            .replace("[::]:", "[::1]:");
        format!("http://{addr}")
    }
}

/// All settings of one worker process.
#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
pub struct Settings {
    /// Broker connection and topology names.
    pub amqp: AmqpSettings,
    /// The embedded store.
    pub store: StoreSettings,
    /// The HTTP listener.
    pub http: HttpSettings,
    /// In-process retries of requests that were not sent.
    pub retry: RetrySettings,
    /// HTTP client settings for provider calls.
    pub provider_http: ProviderHttpSettings,
    /// Logging.
    pub log: LogSettings,
    /// Span export.
    #[serde(default)]
    pub telemetry: TelemetrySettings,
    /// Provider accounts by name.
    #[serde(default)]
    pub providers: BTreeMap<String, ProviderAccount>,
    /// The async runtime's threads.
    #[serde(default)]
    pub runtime: RuntimeSettings,
}

/// The async runtime that runs the pipeline, the HTTP listener and the
/// broker sessions. Blocking work has threads of its own either way: the
/// store's syncer (disk flushes) and tokio's blocking pool (pruning,
/// reports). The broker connections' I/O loops run on it.
#[derive(Debug, Clone, Default, Deserialize, schemars::JsonSchema)]
pub struct RuntimeSettings {
    /// Threads that run tasks; 0: one per CPU core. Unset: one thread up to
    /// [`ONE_THREAD_UP_TO_PREFETCH`] deliveries at once, one per core above
    /// (see [`Settings::runtime_threads`]).
    #[serde(default, deserialize_with = "crate::values::lenient::optional_u64")]
    pub worker_threads: Option<u64>,
}

/// Up to this `amqp.prefetch` an unset `runtime.worker_threads` means one
/// thread. A refund's CPU work is many small steps between waits; on a
/// second thread they cost more in wake-ups and hand-offs than the
/// parallelism gives back (README, Performance: at prefetch 16, 0.129
/// against 0.152 CPU ms per refund, the same throughput). From prefetch 64
/// one thread queues refunds now that the broker connections' I/O runs on
/// the runtime too (ninth round: 6 299–7 136 against 7 026–7 504 refunds a
/// second at 0 ms, the ratio to the relay 0.47–0.56 against 0.52–0.57),
/// and at 256 it did before (3 % fewer refunds a second at 0 ms, 9 % at
/// 50 ms, sixth round).
pub const ONE_THREAD_UP_TO_PREFETCH: u16 = 32;

/// More threads than this is a typo, not a machine.
const MAX_WORKER_THREADS: u64 = 1024;

/// Broker settings. Queue and exchange names are configuration, not
/// constants, so that a later partitioned deployment can run several
/// consumers with their own names.
#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
pub struct AmqpSettings {
    /// `amqp://user:pass@host:port/vhost`; secret because it holds a password.
    pub url: Secret,
    /// basic.qos prefetch: how many deliveries are processed at once.
    pub prefetch: u16,
    /// Topic exchange where order systems publish commands.
    pub commands_exchange: String,
    /// Queue the worker consumes.
    pub commands_queue: String,
    /// Topic exchange for outcome events.
    pub events_exchange: String,
    /// Exchange in front of the dead-letter queue.
    pub dead_letter_exchange: String,
    /// The dead-letter queue ops inspect and replay from.
    pub dead_letter_queue: String,
    /// Prefix of the delay queues (`<prefix>.30s`, ...).
    pub delay_queue_prefix: String,
    /// Larger bodies are dead-lettered (with a `rejected` event when their
    /// `refund_id` can be read).
    pub max_body_bytes: usize,
    /// How long to wait for a publisher confirm.
    pub confirm_timeout_ms: u64,
    /// The share of `prefetch` one provider account's refunds may hold
    /// while they wait at its limits (`max_in_flight`, `rate_per_sec`);
    /// more wait in a delay queue, so other accounts keep their slots.
    #[serde(
        default = "default_account_share",
        deserialize_with = "crate::values::lenient::f64"
    )]
    pub account_share: f64,
    /// PEM file of the CA (or CAs) that signed the broker's certificate,
    /// for `amqps://` URLs whose certificate is not signed by a public CA.
    #[serde(default)]
    pub tls_ca_path: Option<PathBuf>,
}

/// Where refunds are recorded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum StoreBackend {
    /// The embedded store in `store.path`: one worker process.
    #[default]
    Sled,
    /// A PostgreSQL database shared by any number of replicas.
    Postgres,
}

/// Checks `store.postgres.*` as far as it can be without the database.
fn validate_postgres(postgres: &PostgresSettings) -> Result<(), ConfigError> {
    let url = postgres
        .url
        .as_ref()
        .filter(|u| !u.is_empty())
        .ok_or_else(|| {
            invalid(
                "store.postgres.url",
                "missing: store.backend = \"postgres\" needs \
             postgres://user:password@host:port/database",
            )
        })?;
    if url.expose().parse::<tokio_postgres::Config>().is_err() {
        // Not the parser's words: they may quote the password.
        return Err(invalid(
            "store.postgres.url",
            "not a PostgreSQL URL (postgres://user:password@host:port/database)",
        ));
    }
    if !(1..=1000).contains(&postgres.max_connections) {
        return Err(invalid(
            "store.postgres.max_connections",
            format!(
                "must be between 1 and 1000, not {}",
                postgres.max_connections
            ),
        ));
    }
    if postgres.lease < Duration::from_secs(3) {
        return Err(invalid(
            "store.postgres.lease",
            "must be at least 3s (it is renewed every third of it)",
        ));
    }
    if let Some(path) = &postgres.tls_ca_path {
        if let Err(e) = std::fs::read(path) {
            return Err(invalid(
                "store.postgres.tls_ca_path",
                format!("cannot read {}: {e}", path.display()),
            ));
        }
    }
    Ok(())
}

/// Store settings.
#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
pub struct StoreSettings {
    /// `sled` (the default) or `postgres`.
    #[serde(default)]
    pub backend: StoreBackend,
    /// The PostgreSQL backend.
    #[serde(default)]
    pub postgres: PostgresSettings,
    /// The sled directory.
    pub path: PathBuf,
    /// Finished records older than this become tombstones (`30d`, `12h`,
    /// `10s`). Default 30 days.
    #[serde(default, deserialize_with = "crate::values::duration::optional")]
    pub retention: Option<Duration>,
    /// The older form of `retention`, in days; used when `retention` is
    /// not set.
    #[serde(default)]
    pub retention_days: Option<u32>,
    /// Tombstones (and settled over-refund ledgers) are kept this long after
    /// the record was pruned. Default 400 days.
    #[serde(default, deserialize_with = "crate::values::duration::optional")]
    pub tombstone_retention: Option<Duration>,
    /// How often the pruning pass runs (`1h`, `10s`). Default 1 hour.
    #[serde(default, deserialize_with = "crate::values::duration::optional")]
    pub prune_interval: Option<Duration>,
    /// The older form of `prune_interval`, in seconds.
    #[serde(default)]
    pub prune_interval_secs: Option<u64>,
    /// How often events the broker has not confirmed are published again
    /// (the outbox sweep). Default 10 seconds.
    #[serde(default, deserialize_with = "crate::values::duration::optional")]
    pub outbox_sweep_interval: Option<Duration>,
    /// Group commit: how long the syncer waits for more writers after the
    /// first one of a batch (microseconds; 0 flushes at once).
    pub group_commit_linger_us: u64,
    /// sled's page cache (MiB). sled's own default is 1 GiB, which a
    /// long-running worker fills with records it will rarely read again.
    #[serde(
        default = "default_cache_mib",
        deserialize_with = "crate::values::lenient::u64"
    )]
    pub cache_mib: u64,
    /// The form new records are written in: `compact` (the default) or
    /// `json`, which versions before the compact form can read (keep it
    /// while a rollback to one of them must stay possible). Records in
    /// either form are always read.
    #[serde(default)]
    pub record_format: crate::store::RecordFormat,
}

fn default_cache_mib() -> u64 {
    32
}

const DAY: Duration = Duration::from_secs(86_400);

impl StoreSettings {
    /// How long finished records and tombstones are kept.
    pub fn retention(&self) -> Retention {
        let records = self
            .retention
            .or(self.retention_days.map(|d| DAY.saturating_mul(d)))
            .unwrap_or(DAY * 30);
        Retention {
            records,
            tombstones: self.tombstone_retention.unwrap_or(DAY * 400),
        }
    }

    /// How often the pruning pass runs.
    pub fn prune_every(&self) -> Duration {
        self.prune_interval
            .or(self.prune_interval_secs.map(Duration::from_secs))
            .unwrap_or(Duration::from_secs(3600))
    }

    /// How often the outbox is swept.
    pub fn outbox_sweep_every(&self) -> Duration {
        self.outbox_sweep_interval
            .unwrap_or(Duration::from_secs(10))
    }
}

/// HTTP listener settings.
#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
pub struct HttpSettings {
    /// The private listener: health, readiness, metrics, operator API (and
    /// provider callbacks when `callback_addr` is not set).
    pub addr: String,
    /// The public listener for provider callbacks only. Unset: callbacks
    /// are served on `addr`.
    #[serde(default)]
    pub callback_addr: Option<String>,
    /// Base URL providers can reach the callback listener at; defaults to
    /// `http://<bound callback listener>`.
    #[serde(default)]
    pub public_url: Option<String>,
    /// Bearer token every `/refunds` request must carry. Unset: the
    /// operator API is off (403), never open.
    #[serde(default)]
    pub operator_token: Option<Secret>,
    /// Largest callback body accepted.
    #[serde(
        default = "default_callback_body",
        deserialize_with = "crate::values::lenient::u64"
    )]
    pub callback_max_body_bytes: u64,
    /// Longest a callback request may take (reading, store, publish).
    #[serde(
        default = "default_callback_timeout",
        deserialize_with = "crate::values::lenient::u64"
    )]
    pub callback_timeout_ms: u64,
}

fn default_account_share() -> f64 {
    0.5
}

fn default_callback_body() -> u64 {
    16 * 1024
}

fn default_callback_timeout() -> u64 {
    10_000
}

/// In-process retry policy for not-sent requests.
#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
pub struct RetrySettings {
    /// Attempts in all, the first included.
    pub max_attempts: u32,
    /// First backoff delay.
    pub initial_delay_ms: u64,
    /// Largest backoff delay.
    pub max_delay_ms: u64,
    /// Total time for all attempts of one refund.
    pub deadline_ms: u64,
    /// Delayed rounds after the in-process attempts, one delay queue each;
    /// then the message is dead-lettered. A TOML list, or a comma-separated
    /// string from the environment.
    #[serde(deserialize_with = "list_or_csv")]
    pub delayed_ms: Vec<u64>,
}

/// HTTP client settings for provider calls.
#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
pub struct ProviderHttpSettings {
    /// Whole-request timeout.
    pub timeout_ms: u64,
    /// Connect timeout.
    pub connect_timeout_ms: u64,
}

/// Log output.
#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
pub struct LogSettings {
    /// `auto`, `text` or `json`.
    pub format: LogFormat,
    /// `RUST_LOG`-style filter.
    pub filter: String,
}

/// Span export (OpenTelemetry).
#[derive(Debug, Clone, Default, Deserialize, schemars::JsonSchema)]
pub struct TelemetrySettings {
    /// Base URL of an OTLP/HTTP collector (`http://collector:4318`); the
    /// refund spans go to `<url>/v1/traces`. Unset: no export.
    #[serde(default)]
    pub otlp_endpoint: Option<String>,
    /// PEM file of the CA (or CAs) that signed an `https://` collector's
    /// certificate, when it is not a public one.
    #[serde(default)]
    pub otlp_tls_ca_path: Option<PathBuf>,
}

/// Accepts `[1, 2]` or `"1,2"`: lists cannot be typed in one environment
/// variable, and the config crate's list parsing would also turn terminal
/// numbers such as `0010131918` into integers.
fn list_or_csv<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<u64>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum ListOrCsv {
        List(Vec<u64>),
        Csv(String),
    }
    match ListOrCsv::deserialize(d)? {
        ListOrCsv::List(list) => Ok(list),
        ListOrCsv::Csv(text) => text
            .split(',')
            .map(str::trim)
            .filter(|part| !part.is_empty())
            .map(|part| part.parse::<u64>().map_err(serde::de::Error::custom))
            .collect(),
    }
}

impl Settings {
    /// The async runtime's worker threads: `None` for one per CPU core.
    /// `runtime.worker_threads` when set (0: one per core); unset, one
    /// thread when `amqp.prefetch` is at most [`ONE_THREAD_UP_TO_PREFETCH`].
    pub fn runtime_threads(&self) -> Option<usize> {
        match self.runtime.worker_threads {
            Some(0) => None,
            Some(threads) => usize::try_from(threads).ok(),
            None if self.amqp.prefetch <= ONE_THREAD_UP_TO_PREFETCH => Some(1),
            None => None,
        }
    }

    /// Reads the layers: defaults, `file` if given, environment.
    pub fn load(file: Option<&Path>) -> Result<Self, ConfigError> {
        Self::load_from(file, None)
    }

    /// Only the `amqp` and `http` sections, for operator tools that talk to
    /// the broker and the worker's API and need no provider account.
    pub fn load_tools(file: Option<&Path>) -> Result<ToolSettings, ConfigError> {
        let layers = Layers::new(file, None)?;
        let loaded = (|| {
            let config = layers.builder().build()?;
            layers.refuse_unknown(&config)?;
            let store: StoreSettings = config.get("store")?;
            Ok::<_, ConfigError>(ToolSettings {
                amqp: config.get("amqp")?,
                http: config.get("http")?,
                retention: store.retention(),
            })
        })();
        loaded.map_err(|e| layers.locate(e))
    }

    /// As [`Settings::load`], with the environment given as a map (tests).
    pub fn load_from(
        file: Option<&Path>,
        env: Option<std::collections::HashMap<String, String>>,
    ) -> Result<Self, ConfigError> {
        let layers = Layers::new(file, env)?;
        let loaded = (|| {
            let config = layers.builder().build()?;
            layers.refuse_unknown(&config)?;
            let settings: Settings = config.try_deserialize()?;
            settings.validate()?;
            Ok::<_, ConfigError>(settings)
        })();
        loaded.map_err(|e| layers.locate(e))
    }

    /// Checks values that deserialise fine but cannot work.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.validate_runtime()?;
        self.validate_amqp()?;
        self.validate_store()?;
        self.validate_http()?;
        self.validate_telemetry_and_retries()?;
        self.validate_providers()
    }

    /// `runtime.*`.
    fn validate_runtime(&self) -> Result<(), ConfigError> {
        if let Some(threads) = self.runtime.worker_threads {
            if threads > MAX_WORKER_THREADS {
                return Err(invalid(
                    "runtime.worker_threads",
                    format!(
                        "must be at most {MAX_WORKER_THREADS} (0: one per CPU core), not {threads}"
                    ),
                ));
            }
        }
        Ok(())
    }

    /// `amqp.*`.
    fn validate_amqp(&self) -> Result<(), ConfigError> {
        let urls: Vec<&str> = crate::values::secret::url_list(&self.amqp.url).collect();
        if urls.is_empty() {
            return Err(invalid("amqp.url", "missing"));
        }
        for url in urls {
            if !(url.starts_with("amqp://") || url.starts_with("amqps://")) {
                return Err(invalid(
                    "amqp.url",
                    "each URL (comma-separated, one per node) must start with amqp:// or amqps://",
                ));
            }
        }
        if self.amqp.prefetch == 0 {
            return Err(invalid("amqp.prefetch", "must be at least 1"));
        }
        for (key, name) in [
            ("amqp.commands_exchange", &self.amqp.commands_exchange),
            ("amqp.commands_queue", &self.amqp.commands_queue),
            ("amqp.events_exchange", &self.amqp.events_exchange),
            ("amqp.dead_letter_exchange", &self.amqp.dead_letter_exchange),
            ("amqp.dead_letter_queue", &self.amqp.dead_letter_queue),
            ("amqp.delay_queue_prefix", &self.amqp.delay_queue_prefix),
        ] {
            if name.trim().is_empty() {
                return Err(invalid(key, "must not be empty"));
            }
        }
        if let Some(path) = &self.amqp.tls_ca_path {
            if let Err(e) = std::fs::read_to_string(path) {
                return Err(invalid(
                    "amqp.tls_ca_path",
                    format!("cannot read {}: {e}", path.display()),
                ));
            }
        }
        if !(self.amqp.account_share > 0.0 && self.amqp.account_share <= 1.0) {
            return Err(invalid(
                "amqp.account_share",
                format!(
                    "must be above 0 and at most 1, not {}",
                    self.amqp.account_share
                ),
            ));
        }
        if self.amqp.max_body_bytes == 0 {
            return Err(invalid("amqp.max_body_bytes", "must be at least 1"));
        }
        if self.amqp.confirm_timeout_ms == 0 {
            return Err(invalid("amqp.confirm_timeout_ms", "must be at least 1"));
        }
        Ok(())
    }

    /// `store.*` (and `store.postgres.*` for that backend).
    fn validate_store(&self) -> Result<(), ConfigError> {
        if self.store.path.as_os_str().is_empty() {
            return Err(invalid("store.path", "must not be empty"));
        }
        if self.store.backend == StoreBackend::Postgres {
            validate_postgres(&self.store.postgres)?;
        }
        for (key, value) in [
            ("store.retention", self.store.retention),
            ("store.tombstone_retention", self.store.tombstone_retention),
            ("store.prune_interval", self.store.prune_interval),
            (
                "store.outbox_sweep_interval",
                self.store.outbox_sweep_interval,
            ),
        ] {
            if value.is_some_and(|d| d.is_zero()) {
                return Err(invalid(key, "must be longer than zero"));
            }
        }
        if self.store.retention_days == Some(0) {
            return Err(invalid("store.retention_days", "must be at least 1"));
        }
        if self.store.prune_interval_secs == Some(0) {
            return Err(invalid("store.prune_interval_secs", "must be at least 1"));
        }
        let retention = self.store.retention();
        if retention.tombstones < retention.records {
            return Err(invalid(
                "store.tombstone_retention",
                "must not be shorter than store.retention (a duplicate must never outlive both)",
            ));
        }
        Ok(())
    }

    /// `http.*`.
    fn validate_http(&self) -> Result<(), ConfigError> {
        self.http_addr()?;
        if let Some(addr) = &self.http.callback_addr {
            addr.parse::<SocketAddr>()
                .map_err(|e| invalid("http.callback_addr", format!("not a socket address: {e}")))?;
        }
        if self
            .operator_token()
            .is_some_and(|t| t.expose().trim().len() < 16)
        {
            return Err(invalid(
                "http.operator_token",
                "must be at least 16 characters (generate one: openssl rand -hex 32)",
            ));
        }
        if self.http.callback_max_body_bytes == 0 {
            return Err(invalid(
                "http.callback_max_body_bytes",
                "must be at least 1",
            ));
        }
        if self.http.callback_timeout_ms == 0 {
            return Err(invalid("http.callback_timeout_ms", "must be at least 1"));
        }
        if let Some(public) = &self.http.public_url {
            if !(public.starts_with("http://") || public.starts_with("https://")) {
                return Err(invalid("http.public_url", "must be an http(s) URL"));
            }
        }
        Ok(())
    }

    /// `telemetry.*`, `retry.*` and `provider_http.*`.
    fn validate_telemetry_and_retries(&self) -> Result<(), ConfigError> {
        if let Some(endpoint) = self.telemetry.otlp_endpoint.as_deref() {
            if !(endpoint.starts_with("http://") || endpoint.starts_with("https://")) {
                return Err(invalid(
                    "telemetry.otlp_endpoint",
                    "must be an http(s) URL (OTLP/HTTP)",
                ));
            }
        }
        if let Some(path) = &self.telemetry.otlp_tls_ca_path {
            if let Err(e) = std::fs::read(path) {
                return Err(invalid(
                    "telemetry.otlp_tls_ca_path",
                    format!("cannot read {}: {e}", path.display()),
                ));
            }
        }
        if self.retry.max_attempts == 0 {
            return Err(invalid("retry.max_attempts", "must be at least 1"));
        }
        if self.retry.initial_delay_ms > self.retry.max_delay_ms {
            return Err(invalid(
                "retry.initial_delay_ms",
                "must not exceed retry.max_delay_ms",
            ));
        }
        if self.retry.delayed_ms.contains(&0) {
            return Err(invalid("retry.delayed_ms", "delays must be at least 1 ms"));
        }
        if self.provider_http.timeout_ms == 0 {
            return Err(invalid("provider_http.timeout_ms", "must be at least 1"));
        }
        Ok(())
    }

    /// `providers.*`: at least one account, each valid for its kind.
    fn validate_providers(&self) -> Result<(), ConfigError> {
        if self.providers.is_empty() {
            return Err(invalid(
                "providers",
                "no provider account configured (add [providers.<name>] with a kind)",
            ));
        }
        for (name, account) in &self.providers {
            account
                .validate()
                .map_err(|e| invalid(format!("providers.{name}.{}", e.field), e.problem))?;
        }
        Ok(())
    }

    /// How long a refund of this account may stay `pending` before it is
    /// reported; `None` for kinds that are never pending.
    pub fn pending_alert_after(&self, provider: &str) -> Option<Duration> {
        match self.providers.get(provider)? {
            ProviderAccount::Paynet(a) => Some(Duration::from_secs(a.pending_alert_after_secs)),
            _ => None,
        }
    }

    /// The parsed listen address.
    pub fn http_addr(&self) -> Result<SocketAddr, ConfigError> {
        self.http
            .addr
            .parse()
            .map_err(|e| invalid("http.addr", format!("not a socket address: {e}")))
    }

    /// Base URL providers use to reach this worker.
    pub fn public_url(&self) -> String {
        match &self.http.public_url {
            Some(url) => url.trim_end_matches('/').to_string(),
            None => format!(
                "http://{}",
                self.http
                    .callback_addr
                    .as_deref()
                    .unwrap_or(&self.http.addr)
            ),
        }
    }

    /// The operator token, if one is configured (an empty value is none).
    pub fn operator_token(&self) -> Option<&Secret> {
        self.http.operator_token.as_ref().filter(|t| !t.is_empty())
    }

    /// Per-attempt confirm timeout.
    pub fn confirm_timeout(&self) -> Duration {
        Duration::from_millis(self.amqp.confirm_timeout_ms)
    }
}

#[cfg(test)]
mod tests;

//! Everything that talks AMQP: the topology the worker declares at start,
//! the confirmed publisher for events and dead letters, and the header names
//! of the dead-letter contract.

pub mod publisher;
pub mod topology;

use crate::config::AmqpSettings;
use crate::values::secret::Secret;
use lapin::{Connection, ConnectionProperties};

/// Why the message is dead-lettered (short kind).
pub const HEADER_ERROR_KIND: &str = "x-refund-error-kind";
/// Why the message is dead-lettered (human text).
pub const HEADER_ERROR: &str = "x-refund-error";
/// Provider attempts made for the refund so far.
pub const HEADER_ATTEMPTS: &str = "x-refund-attempts";
/// When the first failure happened (RFC 3339).
pub const HEADER_FIRST_FAILURE: &str = "x-refund-first-failure-at";
/// When the last failure happened (RFC 3339).
pub const HEADER_LAST_FAILURE: &str = "x-refund-last-failure-at";
/// The refund, when the message could be tied to one.
pub const HEADER_REFUND_ID: &str = "x-refund-id";
/// The provider account named by the command, when readable.
pub const HEADER_PROVIDER: &str = "x-refund-provider";
/// The exchange the command was first published to.
pub const HEADER_ORIGINAL_EXCHANGE: &str = "x-refund-original-exchange";
/// The routing key the command was first published with.
pub const HEADER_ORIGINAL_ROUTING_KEY: &str = "x-refund-original-routing-key";

/// Times this command waited in a delay queue because its provider account
/// had its share of the delivery slots waiting (integer).
pub const HEADER_THROTTLED: &str = "x-refund-throttled";

/// Delayed-retry rounds this command has been through (integer).
pub const HEADER_DELAYED_ROUNDS: &str = "x-refund-delayed-rounds";

/// The URLs of `amqp.url`: one, or several separated by commas (one per
/// node of a cluster), tried in the order given.
pub use crate::values::secret::url_list as urls;

/// Opens a connection named after this process (visible in the management
/// UI) to the first URL of `url` that answers.
pub async fn connect(url: &Secret, name: &str) -> Result<Connection, lapin::Error> {
    connect_first(url, name, None).await
}

/// As [`connect`], with the broker settings: for `amqps://` URLs the
/// certificate must be signed by a public CA or by one in
/// `amqp.tls_ca_path`.
pub async fn connect_with(amqp: &AmqpSettings, name: &str) -> Result<Connection, lapin::Error> {
    // Validated at start-up; read again so a rotated CA file is picked up
    // at the next reconnect.
    let pem = match &amqp.tls_ca_path {
        Some(path) => Some(std::fs::read_to_string(path).map_err(lapin::Error::from)?),
        None => None,
    };
    connect_first(&amqp.url, name, pem).await
}

/// Which of `amqp.url`'s nodes a connection tries first (see
/// [`prefer_next_node`]).
static FIRST_NODE: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// The next connection tries the next node in `amqp.url` first: called
/// when a session fails, so that a node that accepts connections but
/// cannot serve (a quorum queue's member down on it) is not tried first
/// every time.
pub fn prefer_next_node() {
    FIRST_NODE.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
}

async fn connect_first(
    url: &Secret,
    name: &str,
    ca_pem: Option<String>,
) -> Result<Connection, lapin::Error> {
    let mut last = None;
    let all: Vec<&str> = urls(url).collect();
    let first = FIRST_NODE.load(std::sync::atomic::Ordering::Relaxed) % all.len().max(1);
    for candidate in all.iter().cycle().skip(first).take(all.len()).copied() {
        let properties = ConnectionProperties::default().with_connection_name(name.into());
        let connected = match &ca_pem {
            None => Connection::connect(candidate, properties).await,
            Some(pem) => {
                let tls = lapin::tcp::OwnedTLSConfig {
                    identity: None,
                    cert_chain: Some(pem.clone()),
                };
                Connection::connect_with_config(
                    candidate,
                    properties,
                    tls,
                    lapin::runtime::default_runtime()?,
                )
                .await
            }
        };
        match connected {
            Ok(connection) => return Ok(connection),
            Err(e) => {
                tracing::debug!(url = %crate::values::secret::redact_url(candidate), error = %e, "broker node did not answer; trying the next");
                last = Some(e);
            }
        }
    }
    Err(last
        .unwrap_or_else(|| lapin::Error::from(std::io::Error::other("amqp.url names no broker"))))
}

/// Whether a connection error says the broker's TLS certificate is not
/// trusted (a configuration error, not an outage: start-up stops on it).
pub fn is_untrusted_certificate(error: &lapin::Error) -> bool {
    let text = format!("{error:?} {error}").to_ascii_lowercase();
    text.contains("certificate") || text.contains("unknownissuer")
}

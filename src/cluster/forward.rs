//! Requests that change a refund, sent to the replica that owns it.
//!
//! A Paynet callback, an operator's resolve/abandon/release/amend or a
//! console decision can reach any replica, but only the owner of the
//! refund's partition may write it. A replica that does not own it
//! forwards the HTTP request, as received, through the partition queue
//! (`<amqp.commands_queue>.p.<k>`, header `x-refund-control`) with RabbitMQ's
//! direct reply-to; whoever consumes the partition (its owner, by
//! construction) runs it through its own HTTP routes and sends the answer
//! back, and the caller gets the owner's status and body. If the owner
//! changes meanwhile, the message simply goes to the next one.
//!
//! Operator requests are authenticated where they arrive (the bearer
//! token) and the forwarded copy is signed with HMAC-SHA256 keyed by
//! `http.operator_token`, which every replica has: the token itself never
//! travels, and nobody who can merely publish to the broker can forge an
//! operator decision. Callbacks carry their own per-refund token and are
//! checked by the owner as usual.

use super::{partition_queue, ClusterError};
use crate::secret::constant_time_eq;
use futures_util::future::BoxFuture;
use futures_util::StreamExt;
use lapin::options::{BasicConsumeOptions, BasicPublishOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;
use tokio::sync::oneshot;

/// Marks a control message in a partition queue (its value: `http`).
pub const CONTROL_HEADER: &str = "x-refund-control";
/// The HMAC of a forwarded operator request (hex).
pub const MAC_HEADER: &str = "x-refund-control-mac";

/// An HTTP request as forwarded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ForwardedRequest {
    /// `POST`.
    pub method: String,
    /// Path and query.
    pub uri: String,
    /// The `Content-Type` header.
    pub content_type: Option<String>,
    /// The body.
    pub body: Vec<u8>,
}

/// The owner's answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ForwardedResponse {
    /// HTTP status.
    pub status: u16,
    /// The `Content-Type` header.
    pub content_type: Option<String>,
    /// The `Location` header (console redirects).
    #[serde(default)]
    pub location: Option<String>,
    /// The body.
    pub body: Vec<u8>,
}

/// Runs a forwarded request through this replica's routes; `true` when
/// its signature checked out (operator routes then skip the token check).
pub type ControlHandler =
    Arc<dyn Fn(ForwardedRequest, bool) -> BoxFuture<'static, ForwardedResponse> + Send + Sync>;

type Waiting = Arc<Mutex<HashMap<String, oneshot::Sender<ForwardedResponse>>>>;

/// Sends requests to owners and runs the ones sent to this replica.
pub struct Forwarder {
    queue_prefix: String,
    partitions: u32,
    timeout: Duration,
    key: Option<Vec<u8>>,
    channel: Mutex<Option<Channel>>,
    waiting: Waiting,
    handler: OnceLock<ControlHandler>,
    counter: std::sync::atomic::AtomicU64,
}

impl std::fmt::Debug for Forwarder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Forwarder")
            .field("queue_prefix", &self.queue_prefix)
            .finish_non_exhaustive()
    }
}

impl Forwarder {
    /// A forwarder for `partitions` partitions of `queue_prefix`; `key` is
    /// the operator token (HMAC key), when configured.
    pub fn new(queue_prefix: &str, partitions: u32, timeout: Duration, key: Option<&str>) -> Self {
        Forwarder {
            queue_prefix: queue_prefix.to_string(),
            partitions,
            timeout,
            key: key.map(|k| k.as_bytes().to_vec()),
            channel: Mutex::default(),
            waiting: Arc::default(),
            handler: OnceLock::new(),
            counter: Default::default(),
        }
    }

    /// Installs the HTTP side (once, when the listeners start).
    pub fn set_handler(&self, handler: ControlHandler) {
        let _ = self.handler.set(handler);
    }

    /// Attaches a broker session: a channel that receives direct replies.
    pub async fn attach(
        &self,
        channel: Channel,
        tasks: &mut tokio::task::JoinSet<Result<(), ClusterError>>,
    ) -> Result<(), ClusterError> {
        let mut replies = channel
            .basic_consume(
                "amq.rabbitmq.reply-to".into(),
                "replies".into(),
                BasicConsumeOptions {
                    no_ack: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await?;
        *lock(&self.channel) = Some(channel);
        let waiting = self.waiting.clone();
        tasks.spawn(async move {
            while let Some(delivery) = replies.next().await {
                let delivery = delivery?;
                let Some(id) = delivery.properties.correlation_id() else {
                    continue;
                };
                let waiter = lock(&waiting).remove(id.as_str());
                if let (Some(waiter), Ok(answer)) = (waiter, serde_json::from_slice(&delivery.data))
                {
                    let _ = waiter.send(answer);
                }
            }
            Err(ClusterError::Log("the reply consumer was cancelled".into()))
        });
        Ok(())
    }

    /// Sends `request` about `refund_id` to its owner and waits for the
    /// answer.
    pub async fn forward(
        &self,
        refund_id: &str,
        request: &ForwardedRequest,
    ) -> Result<ForwardedResponse, String> {
        let channel = lock(&self.channel)
            .clone()
            .ok_or("not connected to the broker")?;
        let body = serde_json::to_vec(request).unwrap_or_default();
        let n = self
            .counter
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let id = format!("{}-{n}", std::process::id());
        let mut headers = FieldTable::default();
        headers.insert(CONTROL_HEADER.into(), AMQPValue::LongString("http".into()));
        if let Some(key) = &self.key {
            headers.insert(
                MAC_HEADER.into(),
                AMQPValue::LongString(hmac_hex(key, &body).into()),
            );
        }
        let (tx, rx) = oneshot::channel();
        lock(&self.waiting).insert(id.clone(), tx);
        let p = crate::store::journal::partition_of(refund_id, self.partitions);
        let queue = partition_queue(&self.queue_prefix, p);
        let published = channel
            .basic_publish(
                "".into(),
                queue.as_str().into(),
                BasicPublishOptions::default(),
                &body,
                BasicProperties::default()
                    .with_headers(headers)
                    .with_reply_to("amq.rabbitmq.reply-to".into())
                    .with_correlation_id(id.as_str().into())
                    .with_content_type("application/json".into()),
            )
            .await;
        if let Err(e) = published {
            lock(&self.waiting).remove(&id);
            return Err(format!("forwarding to the owner of partition {p}: {e}"));
        }
        match tokio::time::timeout(self.timeout, rx).await {
            Ok(Ok(answer)) => Ok(answer),
            _ => {
                lock(&self.waiting).remove(&id);
                Err(format!(
                    "the owner of partition {p} did not answer within {:?}",
                    self.timeout
                ))
            }
        }
    }

    /// Runs a control message received from a partition queue and returns
    /// the answer to send back.
    pub async fn run(&self, body: &[u8], mac: Option<&str>) -> ForwardedResponse {
        let refused = |status: u16, message: &str| ForwardedResponse {
            status,
            content_type: Some("application/json".into()),
            location: None,
            body: serde_json::json!({ "error": message })
                .to_string()
                .into_bytes(),
        };
        let Ok(request) = serde_json::from_slice::<ForwardedRequest>(body) else {
            return refused(400, "unreadable forwarded request");
        };
        let signed = match (&self.key, mac) {
            (Some(key), Some(mac)) => {
                constant_time_eq(hmac_hex(key, body).as_bytes(), mac.as_bytes())
            }
            _ => false,
        };
        match self.handler.get() {
            Some(handler) => handler(request, signed).await,
            None => refused(503, "this replica's HTTP side is not running"),
        }
    }
}

/// HMAC-SHA256 (RFC 2104), hex.
pub fn hmac_hex(key: &[u8], message: &[u8]) -> String {
    const BLOCK: usize = 64;
    let mut k = if key.len() > BLOCK {
        Sha256::digest(key).to_vec()
    } else {
        key.to_vec()
    };
    k.resize(BLOCK, 0);
    let inner_key: Vec<u8> = k.iter().map(|b| b ^ 0x36).collect();
    let outer_key: Vec<u8> = k.iter().map(|b| b ^ 0x5c).collect();
    let inner = Sha256::new()
        .chain_update(&inner_key)
        .chain_update(message)
        .finalize();
    let outer = Sha256::new()
        .chain_update(&outer_key)
        .chain_update(inner)
        .finalize();
    crate::command::hex(&outer)
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::hmac_hex;

    #[test]
    fn hmac_matches_rfc_4231_case_2() {
        assert_eq!(
            hmac_hex(b"Jefe", b"what do ya want for nothing?"),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }
}

//! The state log: one RabbitMQ stream (`<amqp.commands_queue>.state`),
//! replicated on the cluster's nodes, that every replica appends its store
//! writes to and every replica reads back in full into its own sled.
//!
//! Three kinds of entries:
//! - `batch`: a group commit of one replica's writes (`store/journal.rs`);
//! - `marker`: "from here on, partition p is written with token t", appended
//!   by a replica that takes p over (fencing by log order);
//! - `hello`: appended at start; reading it back means the replica has read
//!   everything before it (it is caught up). Markers carry P: a replica
//!   that finds a marker with another P while catching up refuses to start.
//!
//! The tailer keeps its position (the last applied offset) and the marker
//! table in sled's `cluster` tree, so a restart reads on from there.

use super::ClusterError;
use crate::store::journal::{self, Journal, Op};
use crate::store::Store;
use futures_util::StreamExt;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Confirmation};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tracing::{debug, error};

/// One entry of the state log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "t", rename_all = "snake_case")]
pub enum Entry {
    /// A group of writes by one process (`w`, its instance id).
    Batch {
        /// Writer instance.
        w: String,
        /// The writer's batch number.
        b: u64,
        /// The writes.
        ops: Vec<Op>,
    },
    /// A partition changes hands.
    Marker {
        /// The partition.
        p: u32,
        /// The new owner's token.
        token: String,
        /// The new owner.
        replica: String,
        /// P as the new owner has it.
        partitions: u32,
    },
    /// A replica started.
    Hello {
        /// Its `cluster.replica_id`.
        replica: String,
        /// Its instance id (new at every start).
        instance: String,
        /// Its P.
        partitions: u32,
    },
}

const OFFSET_KEY: &[u8] = b"log.offset";
const MARKERS_KEY: &[u8] = b"log.markers";
const PARTITIONS_KEY: &[u8] = b"partitions";

/// What the tailer has read so far (for waiters on markers and hellos).
#[derive(Debug, Clone, Default)]
pub struct Tail {
    /// Entries read since start.
    pub read: u64,
    /// This instance's hello was read back (caught up).
    pub caught_up: bool,
    /// A refusal found in the log (another P).
    pub refused: Option<String>,
}

/// The log's handles for one broker session.
#[derive(Debug, Clone)]
pub struct StateLog {
    stream: String,
    channel: Channel,
    journal: Arc<Journal>,
    replica: String,
    instance: String,
    tail: watch::Receiver<Tail>,
    timeout: Duration,
}

impl StateLog {
    /// Appends one entry and waits for the broker's confirm (the stream's
    /// replicas have it).
    pub async fn append(&self, entry: &Entry) -> Result<(), ClusterError> {
        let body = serde_json::to_vec(entry).unwrap_or_default();
        let confirm = self
            .channel
            .basic_publish(
                "".into(),
                self.stream.as_str().into(),
                BasicPublishOptions::default(),
                &body,
                BasicProperties::default().with_delivery_mode(2),
            )
            .await?;
        match tokio::time::timeout(self.timeout, confirm).await {
            Err(_) => Err(ClusterError::Log("no confirm from the state log".into())),
            Ok(Err(e)) => Err(e.into()),
            Ok(Ok(Confirmation::Nack(_))) => {
                Err(ClusterError::Log("the state log refused an entry".into()))
            }
            Ok(Ok(_)) => Ok(()),
        }
    }

    /// Appends this instance's hello and waits until the tailer read it:
    /// from then on sled holds everything the log held before.
    pub async fn catch_up(&self, partitions: u32) -> Result<(), ClusterError> {
        self.append(&Entry::Hello {
            replica: self.replica.clone(),
            instance: self.instance.clone(),
            partitions,
        })
        .await?;
        let mut tail = self.tail.clone();
        let wait = tail.wait_for(|t| t.caught_up || t.refused.is_some());
        let tail = tokio::time::timeout(Duration::from_secs(600), wait)
            .await
            .map_err(|_| ClusterError::Log("catching up with the state log took too long".into()))?
            .map_err(|_| ClusterError::Log("the tailer stopped".into()))?
            .clone();
        match tail.refused {
            Some(reason) => Err(ClusterError::Refused(reason)),
            None => Ok(()),
        }
    }

    /// Takes partition `p` over: appends a marker with a fresh token and
    /// waits until the tailer read it as the latest marker of `p`. Then
    /// sled holds every valid write of `p` made before, and only this
    /// replica's writes of `p` are valid until the next marker.
    pub async fn acquire(&self, p: u32, partitions: u32, counter: u64) -> Result<(), ClusterError> {
        let token = format!("{}.{p}.{counter}", self.instance);
        self.append(&Entry::Marker {
            p,
            token: token.clone(),
            replica: self.replica.clone(),
            partitions,
        })
        .await?;
        let mut tail = self.tail.clone();
        let journal = self.journal.clone();
        let wait =
            tail.wait_for(|t| t.refused.is_some() || journal.marker(p).as_ref() == Some(&token));
        tokio::time::timeout(self.timeout, wait)
            .await
            .map_err(|_| {
                ClusterError::Log(format!("the marker of partition {p} did not come back"))
            })?
            .map_err(|_| ClusterError::Log("the tailer stopped".into()))?;
        if self.journal.marker(p).as_ref() == Some(&token) {
            self.journal.own(p, token);
        }
        Ok(())
    }
}

/// Starts the appender and the tailer on `connection`'s channels. They run
/// until the session's connection fails (their errors end the session).
pub async fn start(
    connection: &lapin::Connection,
    stream: &str,
    store: &Store,
    replica: &str,
    instance: &str,
    timeout: Duration,
    tasks: &mut tokio::task::JoinSet<Result<(), ClusterError>>,
) -> Result<StateLog, ClusterError> {
    let journal = store
        .journal()
        .cloned()
        .ok_or_else(|| ClusterError::Log("the store is not in cluster mode".into()))?;
    let channel = connection.create_channel().await?;
    channel
        .confirm_select(lapin::options::ConfirmSelectOptions::default())
        .await?;
    let (tail_tx, tail) = watch::channel(Tail::default());
    let log = StateLog {
        stream: stream.to_string(),
        channel,
        journal: journal.clone(),
        replica: replica.to_string(),
        instance: instance.to_string(),
        tail,
        timeout,
    };
    let tail_channel = connection.create_channel().await?;
    tasks.spawn(tailer(
        tail_channel,
        stream.to_string(),
        store.clone(),
        journal.clone(),
        instance.to_string(),
        tail_tx,
    ));
    tasks.spawn(appender(log.clone(), instance.to_string()));
    Ok(log)
}

/// Group commit into the log: every batch of writes that piled up while the
/// previous append waited for its confirm goes out as one entry.
///
/// It also watches the read-back: a batch the log confirmed but this
/// replica has not read back within the sync timeout means the tailer is
/// stuck (seen in about one cluster-test run of five, for 2–3.5 s after a
/// replica's first partitions; the broker-side cause was not found). The
/// session ends then, and the next one tries another
/// node first: otherwise every sync would time out, forever, while the
/// replica kept its partitions.
async fn appender(log: StateLog, instance: String) -> Result<(), ClusterError> {
    let journal = log.journal.clone();
    let mut confirmed: std::collections::VecDeque<(u64, tokio::time::Instant)> =
        std::collections::VecDeque::new();
    loop {
        // Writes that no sync asked for (history notes, outbox clears) go
        // out within a few milliseconds anyway.
        let _ = tokio::time::timeout(Duration::from_millis(20), journal.wanted()).await;
        let seen = journal.seen();
        while confirmed.front().is_some_and(|(b, _)| *b <= seen) {
            confirmed.pop_front();
        }
        if let Some((b, at)) = confirmed.front() {
            if at.elapsed() > journal.read_back_timeout() {
                return Err(ClusterError::Log(format!(
                    "batch {b} was confirmed {:?} ago and is still not read back: the state log's reader is stuck; reconnecting",
                    at.elapsed()
                )));
            }
        }
        while let Some((b, ops)) = journal.take_batch() {
            let entry = Entry::Batch {
                w: instance.clone(),
                b,
                ops,
            };
            if let Err(e) = log.append(&entry).await {
                journal.lost(b);
                return Err(e);
            }
            confirmed.push_back((b, tokio::time::Instant::now()));
        }
    }
}

/// Reads the log from where this replica stopped, applies every valid op
/// to sled, and tells the journal which of its own batches came back.
async fn tailer(
    channel: Channel,
    stream: String,
    store: Store,
    journal: Arc<Journal>,
    instance: String,
    tail: watch::Sender<Tail>,
) -> Result<(), ClusterError> {
    let meta = store.meta_tree()?;
    let mut applied: Option<u64> = meta
        .get(OFFSET_KEY)?
        .and_then(|v| std::str::from_utf8(&v).ok()?.parse().ok());
    if let Some(bytes) = meta.get(MARKERS_KEY)? {
        if let Ok(markers) = serde_json::from_slice::<HashMap<u32, String>>(&bytes) {
            journal.restore_markers(markers);
        }
    }
    if let Some(bytes) = meta.get(PARTITIONS_KEY)? {
        let before = String::from_utf8_lossy(&bytes).to_string();
        if before != journal.partitions().to_string() {
            let reason = format!(
                "this replica's store was built with cluster.partitions = {before}, not {}; P is fixed per deployment",
                journal.partitions()
            );
            tail.send_modify(|t| t.refused = Some(reason.clone()));
            return Err(ClusterError::Refused(reason));
        }
    } else {
        meta.insert(PARTITIONS_KEY, journal.partitions().to_string().as_bytes())?;
    }
    channel.basic_qos(2000, BasicQosOptions::default()).await?;
    let mut args = FieldTable::default();
    let from = match applied {
        Some(offset) => AMQPValue::LongLongInt(i64::try_from(offset + 1).unwrap_or(i64::MAX)),
        None => AMQPValue::LongString("first".into()),
    };
    args.insert("x-stream-offset".into(), from);
    let mut consumer = channel
        .basic_consume(
            stream.as_str().into(),
            "state-tailer".into(),
            BasicConsumeOptions::default(),
            args,
        )
        .await?;
    let (refunds, originals, outbox) = store.trees();
    let mut count: u64 = 0;
    while let Some(delivery) = consumer.next().await {
        let delivery = delivery?;
        let offset = stream_offset(&delivery);
        count += 1;
        if count.is_multiple_of(64) {
            let _ = delivery.acker.ack(BasicAckOptions { multiple: true }).await;
        }
        if let (Some(offset), Some(last)) = (offset, applied) {
            if offset <= last {
                continue;
            }
            if offset > last + 1 && count == 1 {
                // The entries this replica missed were removed by the
                // stream's retention: its sled cannot be trusted.
                let reason = format!(
                    "the state log starts at offset {offset} but this replica stopped at {last}: it was away longer than the log keeps entries; start it with an empty store.path"
                );
                tail.send_modify(|t| t.refused = Some(reason.clone()));
                return Err(ClusterError::Refused(reason));
            }
        }
        let entry: Entry = match serde_json::from_slice(&delivery.data) {
            Ok(entry) => entry,
            Err(e) => {
                error!(error = %e, ?offset, "unreadable state log entry skipped");
                continue;
            }
        };
        match entry {
            Entry::Batch { w, b, ops } => {
                for op in &ops {
                    if journal.valid(op) {
                        journal::apply(op, refunds, originals, outbox)?;
                    } else {
                        debug!(key = %op.key, p = op.p, "write of a former owner ignored (fenced)");
                    }
                }
                if w == instance {
                    journal.read_back(b);
                }
            }
            Entry::Marker {
                p,
                token,
                replica,
                partitions,
            } => {
                if partitions != journal.partitions() {
                    let reason = format!(
                        "replica {replica} of this deployment owns partitions with cluster.partitions = {partitions}, this one has {}; P is fixed per deployment (a different P would move refunds between owners)",
                        journal.partitions()
                    );
                    if !tail.borrow().caught_up {
                        tail.send_modify(|t| t.refused = Some(reason.clone()));
                        return Err(ClusterError::Refused(reason));
                    }
                    error!(%reason, "a replica with another P took a partition");
                }
                journal.set_marker(p, token);
                meta.insert(
                    MARKERS_KEY,
                    serde_json::to_vec(&journal.markers()).unwrap_or_default(),
                )?;
            }
            Entry::Hello {
                instance: theirs, ..
            } => {
                // Only this instance's own hello matters (caught up). Another
                // P is refused by the markers above and by the heartbeats: a
                // replica that was refused wrote a hello but no marker.
                if theirs == instance {
                    tail.send_modify(|t| t.caught_up = true);
                }
            }
        }
        if let Some(offset) = offset {
            applied = Some(offset);
            meta.insert(OFFSET_KEY, offset.to_string().as_bytes())?;
        }
        tail.send_modify(|t| t.read += 1);
    }
    Err(ClusterError::Log(
        "the state log consumer was cancelled".into(),
    ))
}

fn stream_offset(delivery: &lapin::message::Delivery) -> Option<u64> {
    let headers = delivery.properties.headers().as_ref()?;
    match headers.inner().get("x-stream-offset")? {
        AMQPValue::LongLongInt(n) => u64::try_from(*n).ok(),
        AMQPValue::LongInt(n) => u64::try_from(*n).ok(),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::journal::TreeId;

    #[test]
    fn entries_round_trip() {
        let entry = Entry::Batch {
            w: "i".into(),
            b: 3,
            ops: vec![Op {
                p: 1,
                token: "i.1.0".into(),
                tree: TreeId::Refunds,
                key: "r".into(),
                value: Some("{}".into()),
                ledger: None,
            }],
        };
        let bytes = serde_json::to_vec(&entry).expect("encode");
        assert_eq!(
            serde_json::from_slice::<Entry>(&bytes).expect("decode"),
            entry
        );
    }
}

//! Who is alive, and which partitions each replica should own.
//!
//! Every replica publishes a heartbeat (`replica_id`, instance id, P) every
//! `cluster.heartbeat_ms` to a fanout exchange, and reads everybody's
//! through its own exclusive queue (it holds no work: a heartbeat lost with
//! a node is followed by the next one). A replica not heard from for
//! `cluster.member_timeout_ms` is gone.
//!
//! The assignment is a pure function of the sorted live ids: partition p
//! goes to `live[p mod N]`, so with N replicas up none owns more than
//! ⌈P/N⌉ partitions, and every replica computes the same answer from the
//! same heartbeats. Views can differ for a moment (a heartbeat in
//! flight); single active consumer on the partition queues and the log's
//! markers keep that safe (`partitions.rs`).

use super::ClusterError;
use futures_util::StreamExt;
use lapin::options::BasicPublishOptions;
use lapin::{BasicProperties, Channel};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tracing::{error, info};

/// One heartbeat.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Heartbeat {
    /// `cluster.replica_id`.
    pub replica: String,
    /// New at every start of the process.
    pub instance: String,
    /// `cluster.partitions`.
    pub partitions: u32,
    /// The last one of a replica that is shutting down: the others take
    /// its partitions at once instead of after the member timeout.
    #[serde(default)]
    pub leaving: bool,
}

/// The live members as this replica sees them.
#[derive(Debug)]
pub struct Members {
    me: Heartbeat,
    timeout: Duration,
    seen: Mutex<BTreeMap<String, (String, Instant)>>,
    /// The last conflicting heartbeat's reason, and when it came.
    conflict: Mutex<Option<(String, Instant)>>,
}

impl Members {
    /// An empty view; `me` is always a member.
    pub fn new(me: Heartbeat, timeout: Duration) -> Arc<Self> {
        Arc::new(Members {
            me,
            timeout,
            seen: Mutex::default(),
            conflict: Mutex::default(),
        })
    }

    /// Records a heartbeat; a conflicting one (my id from another
    /// instance, another P) is remembered as the reason to refuse.
    pub fn heard(&self, beat: Heartbeat) {
        if beat.replica == self.me.replica && beat.instance != self.me.instance {
            *lock(&self.conflict) = Some((
                format!(
                    "another running replica already uses cluster.replica_id = {:?}; every replica needs its own",
                    beat.replica
                ),
                Instant::now(),
            ));
            return;
        }
        if beat.partitions != self.me.partitions {
            *lock(&self.conflict) = Some((
                format!(
                    "replica {:?} runs with cluster.partitions = {}, this one with {}; P is fixed per deployment",
                    beat.replica, beat.partitions, self.me.partitions
                ),
                Instant::now(),
            ));
            return;
        }
        if beat.replica != self.me.replica {
            let mut seen = lock(&self.seen);
            if beat.leaving {
                seen.remove(&beat.replica);
            } else {
                seen.insert(beat.replica, (beat.instance, Instant::now()));
            }
        }
    }

    /// A reason to refuse, if a heartbeat conflicted with this replica
    /// lately (within the member timeout: a refused newcomer is gone).
    pub fn conflict(&self) -> Option<String> {
        lock(&self.conflict)
            .as_ref()
            .filter(|(_, at)| at.elapsed() < self.timeout)
            .map(|(reason, _)| reason.clone())
    }

    /// Live replica ids, sorted, me included.
    pub fn live(&self) -> Vec<String> {
        let mut seen = lock(&self.seen);
        seen.retain(|_, (_, at)| at.elapsed() < self.timeout);
        let mut live: Vec<String> = seen.keys().cloned().collect();
        live.push(self.me.replica.clone());
        live.sort();
        live.dedup();
        live
    }

    /// The partitions this replica should own now.
    pub fn mine(&self) -> Vec<u32> {
        assignment(&self.live(), self.me.partitions, &self.me.replica)
    }
}

/// Partition p belongs to `live[p mod N]` (`live` sorted).
pub fn assignment(live: &[String], partitions: u32, me: &str) -> Vec<u32> {
    let Some(index) = live.iter().position(|id| id == me) else {
        return Vec::new();
    };
    (0..partitions)
        .filter(|p| *p as usize % live.len() == index)
        .collect()
}

/// Declares this replica's heartbeat queue on `exchange` and starts
/// publishing and reading heartbeats until the channel fails.
pub async fn start(
    channel: Channel,
    exchange: &str,
    members: Arc<Members>,
    every: Duration,
    tasks: &mut tokio::task::JoinSet<Result<(), ClusterError>>,
) -> Result<(), ClusterError> {
    let mut consumer = crate::client::temporary_consumer(&channel, exchange, "").await?;
    let reader = members.clone();
    tasks.spawn(async move {
        while let Some(delivery) = consumer.next().await {
            let delivery = delivery?;
            match serde_json::from_slice::<Heartbeat>(&delivery.data) {
                Ok(beat) => reader.heard(beat),
                Err(e) => error!(error = %e, "unreadable heartbeat ignored"),
            }
        }
        Err(ClusterError::Log(
            "the heartbeat consumer was cancelled".into(),
        ))
    });
    let body = serde_json::to_vec(&members.me).unwrap_or_default();
    let exchange = exchange.to_string();
    tasks.spawn(async move {
        let mut last = Vec::new();
        loop {
            channel
                .basic_publish(
                    exchange.as_str().into(),
                    "".into(),
                    BasicPublishOptions::default(),
                    &body,
                    BasicProperties::default(),
                )
                .await?;
            let live = members.live();
            if live != last {
                info!(?live, "cluster members");
                last = live;
            }
            tokio::time::sleep(every).await;
        }
    });
    Ok(())
}

/// Says goodbye (shutdown, after the partitions were given back).
pub async fn leave(channel: &Channel, exchange: &str, me: &Heartbeat) {
    let goodbye = Heartbeat {
        leaving: true,
        ..me.clone()
    };
    let body = serde_json::to_vec(&goodbye).unwrap_or_default();
    let _ = channel
        .basic_publish(
            exchange.into(),
            "".into(),
            BasicPublishOptions::default(),
            &body,
            BasicProperties::default(),
        )
        .await;
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(n: usize) -> Vec<String> {
        (1..=n).map(|i| format!("replica-{i}")).collect()
    }

    #[test]
    fn every_partition_has_exactly_one_owner_and_shares_are_even() {
        for n in 1..=5 {
            let live = ids(n);
            let mut owners = vec![0; 16];
            for me in &live {
                let mine = assignment(&live, 16, me);
                assert!(mine.len() <= 16usize.div_ceil(n), "{n}: {mine:?}");
                for p in mine {
                    owners[p as usize] += 1;
                }
            }
            assert!(owners.iter().all(|o| *o == 1), "{n}: {owners:?}");
        }
        assert!(assignment(&ids(2), 16, "stranger").is_empty());
    }

    #[test]
    fn conflicting_heartbeats_are_refusals() {
        let me = Heartbeat {
            replica: "a".into(),
            instance: "1".into(),
            partitions: 16,
            leaving: false,
        };
        let members = Members::new(me.clone(), Duration::from_secs(3));
        members.heard(Heartbeat {
            replica: "b".into(),
            instance: "2".into(),
            partitions: 16,
            leaving: false,
        });
        assert_eq!(members.live(), vec!["a".to_string(), "b".to_string()]);
        members.heard(Heartbeat {
            replica: "b".into(),
            instance: "2".into(),
            partitions: 16,
            leaving: true,
        });
        assert_eq!(members.live(), vec!["a".to_string()]);
        assert!(members.conflict().is_none());
        members.heard(Heartbeat {
            instance: "other".into(),
            ..me.clone()
        });
        assert!(members
            .conflict()
            .expect("dup")
            .contains("cluster.replica_id"));
        let members = Members::new(me, Duration::from_secs(3));
        members.heard(Heartbeat {
            replica: "b".into(),
            instance: "2".into(),
            partitions: 8,
            leaving: false,
        });
        assert!(members
            .conflict()
            .expect("p")
            .contains("cluster.partitions"));
    }
}

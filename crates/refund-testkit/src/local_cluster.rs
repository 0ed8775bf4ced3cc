//! A private 3-node (or N-node) RabbitMQ cluster on this machine, for tests
//! and the benchmark of more than one replica: every node is a
//! [`LocalBroker`] with its own ports, data and name, all sharing one
//! Erlang cookie; the 2nd and later nodes join the first. Forming takes
//! 25–30 s on a 2-core machine, so start one per test binary.
//! `scripts/local-cluster` starts one from the command line.

use crate::local_broker::{LocalBroker, NodeError};
use std::time::{Duration, Instant};

/// A running cluster.
#[derive(Debug)]
pub struct LocalCluster {
    /// The nodes, the first being the one the others joined.
    pub nodes: Vec<LocalBroker>,
}

impl LocalCluster {
    /// Starts `n` nodes and clusters them; returns when all run together.
    pub fn start(n: usize) -> Result<LocalCluster, NodeError> {
        let cookie = format!("REFUNDWORKERCLUSTER{}", std::process::id());
        let mut nodes = Vec::with_capacity(n);
        for _ in 0..n.max(1) {
            let node = LocalBroker::prepare(None, Some(&cookie))?;
            node.spawn_server()?;
            node.watchdog()?;
            nodes.push(node);
        }
        for node in &nodes {
            node.wait_ready()?;
        }
        let first = nodes[0].node.clone();
        for node in &nodes[1..] {
            for step in [
                vec!["stop_app"],
                vec!["join_cluster", first.as_str()],
                vec!["start_app"],
            ] {
                if !node.ctl(&step) {
                    return Err(NodeError::Failed(format!(
                        "{} {:?} failed; see {}",
                        node.node,
                        step,
                        node.dir.display()
                    )));
                }
            }
        }
        let cluster = LocalCluster { nodes };
        cluster.wait_running(n, Duration::from_secs(90))?;
        Ok(cluster)
    }

    /// Waits until `want` nodes report running in the cluster.
    pub fn wait_running(&self, want: usize, limit: Duration) -> Result<(), NodeError> {
        let deadline = Instant::now() + limit;
        loop {
            let running = self.running_nodes();
            if running >= want {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(NodeError::Failed(format!(
                    "only {running} of {want} nodes running after {limit:?}"
                )));
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    /// Nodes running in the cluster, as any live node sees it.
    pub fn running_nodes(&self) -> usize {
        for node in &self.nodes {
            if let Some(json) = node.ctl_output(&["cluster_status", "--formatter", "json"]) {
                if let Ok(status) = serde_json::from_str::<serde_json::Value>(&json) {
                    return status["running_nodes"]
                        .as_array()
                        .map(Vec::len)
                        .unwrap_or(0);
                }
            }
        }
        0
    }

    /// A vhost (created on the cluster) and its AMQP URLs, one per node,
    /// comma-separated as `amqp.url` takes them.
    pub fn vhost(&self) -> Result<String, NodeError> {
        let first = self.nodes[0].vhost()?;
        let vhost = first.rsplit('/').next().unwrap_or_default().to_string();
        Ok(self
            .nodes
            .iter()
            .map(|n| format!("amqp://guest:guest@127.0.0.1:{}/{vhost}", n.port))
            .collect::<Vec<_>>()
            .join(","))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions};
    use lapin::types::{AMQPValue, FieldTable};
    use lapin::{BasicProperties, Connection, ConnectionProperties};

    /// Forms a cluster, declares a quorum queue, kills the node a client
    /// is not connected to, and checks the queue keeps its messages and
    /// takes more. Slow (about a minute): run by hand with
    /// `cargo test --lib local_cluster -- --ignored`.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[ignore = "forms a 3-node cluster (about a minute)"]
    async fn a_quorum_queue_survives_a_node_killed() {
        let cluster = tokio::task::spawn_blocking(|| LocalCluster::start(3))
            .await
            .expect("task")
            .expect("cluster");
        assert_eq!(cluster.running_nodes(), 3);
        let urls = cluster.vhost().expect("vhost");
        let first = urls.split(',').next().expect("url").to_string();
        let connection = Connection::connect(&first, ConnectionProperties::default())
            .await
            .expect("connect");
        let channel = connection.create_channel().await.expect("channel");
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .expect("confirms");
        let mut args = FieldTable::default();
        args.insert(
            "x-queue-type".into(),
            AMQPValue::LongString("quorum".into()),
        );
        let declare = QueueDeclareOptions {
            durable: true,
            ..Default::default()
        };
        channel
            .queue_declare("q".into(), declare, args.clone())
            .await
            .expect("declare");
        let publish = |body: &'static [u8]| {
            let channel = channel.clone();
            async move {
                channel
                    .basic_publish(
                        "".into(),
                        "q".into(),
                        BasicPublishOptions::default(),
                        body,
                        BasicProperties::default().with_delivery_mode(2),
                    )
                    .await
                    .expect("publish")
                    .await
                    .expect("confirm")
            }
        };
        publish(b"before").await;
        cluster.nodes[2].kill().expect("kill");
        publish(b"during").await;
        let depth = channel
            .queue_declare(
                "q".into(),
                QueueDeclareOptions {
                    passive: true,
                    ..declare
                },
                args,
            )
            .await
            .expect("passive")
            .message_count();
        assert_eq!(depth, 2);
        tokio::task::spawn_blocking(move || {
            cluster.nodes[2].restart().expect("restart");
            cluster
                .wait_running(3, Duration::from_secs(60))
                .expect("back");
        })
        .await
        .expect("task");
    }
}

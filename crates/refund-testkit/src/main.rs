//! `local-cluster`: a private RabbitMQ cluster on this machine until a
//! signal (for trying several replicas); prints its `amqp.url`.

use refund_testkit::local_cluster::LocalCluster;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let nodes = std::env::args()
        .skip_while(|a| a != "--nodes")
        .nth(1)
        .map(|n| n.parse())
        .transpose()?
        .unwrap_or(3);
    eprintln!("starting a {nodes}-node RabbitMQ cluster (about 30 s)...");
    let cluster = tokio::task::spawn_blocking(move || LocalCluster::start(nodes)).await??;
    let urls = cluster.vhost()?;
    println!("REFUND_WORKER__AMQP__URL={urls}");
    for node in &cluster.nodes {
        eprintln!(
            "node {} on port {} (data in {})",
            node.node,
            node.port,
            node.dir.display()
        );
    }
    eprintln!("running; Ctrl-C stops the nodes");
    tokio::signal::ctrl_c().await?;
    Ok(())
}

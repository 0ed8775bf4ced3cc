//! The test binary's private RabbitMQ node (see `refund_testkit::local_broker`),
//! started on first use and shared by the binary's tests; each test gets
//! its own vhost so tests run in parallel without seeing each other's queues.

use refund_testkit::local_broker::{LocalBroker, TlsFiles};
use std::sync::OnceLock;

pub struct RabbitNode(LocalBroker);

static NODE: OnceLock<RabbitNode> = OnceLock::new();

impl RabbitNode {
    /// The node of this test binary, started on first use.
    pub fn shared() -> &'static RabbitNode {
        NODE.get_or_init(|| RabbitNode(LocalBroker::start().expect("private RabbitMQ node")))
    }

    /// The node of this test binary with an AMQPS listener too, using
    /// `tls` (the first caller's files win).
    pub fn shared_tls(tls: &TlsFiles) -> &'static RabbitNode {
        NODE.get_or_init(|| {
            RabbitNode(LocalBroker::start_with(Some(tls)).expect("private RabbitMQ node"))
        })
    }

    /// The AMQPS URL of a vhost's counterpart to `amqp_url`.
    pub fn tls_url(&self, amqp_url: &str) -> String {
        let tls_port = self.0.tls_port.expect("node started with TLS");
        amqp_url
            .replace("amqp://", "amqps://")
            .replace("127.0.0.1", "localhost")
            .replace(&format!(":{}/", self.0.port), &format!(":{tls_port}/"))
    }

    /// A fresh vhost; returns its AMQP URL.
    pub fn vhost(&self) -> String {
        self.0.vhost().expect("vhost")
    }

    /// Runs `rabbitmqctl` with `args` against the node; true when it
    /// succeeded.
    pub fn ctl(&self, args: &[&str]) -> bool {
        self.0.ctl(args)
    }

    /// Sets guest's permissions on the vhost of `amqp_url` (configure,
    /// write, read regular expressions).
    pub fn set_permissions(&self, amqp_url: &str, configure: &str, write: &str, read: &str) {
        let vhost = amqp_url.rsplit('/').next().expect("a vhost in the URL");
        assert!(
            self.0.ctl(&[
                "set_permissions",
                "-p",
                vhost,
                "guest",
                configure,
                write,
                read
            ]),
            "set_permissions"
        );
    }

    /// Stops the broker application (connections drop), keeping the node.
    pub fn stop_app(&self) {
        assert!(self.0.ctl(&["stop_app"]), "stop_app");
    }

    /// Starts the broker application again.
    pub fn start_app(&self) {
        assert!(self.0.ctl(&["start_app"]), "start_app");
    }
}

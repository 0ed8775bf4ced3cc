//! A private RabbitMQ node for one test binary: its own free port, data
//! directory and node name, started on first use and stopped when the test
//! process ends (a watchdog shell waits for our pid to disappear, so the node
//! goes away even when a test panics or the binary is killed). Each test gets
//! its own vhost, so tests run in parallel without seeing each other's queues.
//! A node we did not start (e.g. one on 5672) is never touched.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;

const SERVER: &str = "/usr/lib/rabbitmq/bin/rabbitmq-server";
const CTL: &str = "/usr/lib/rabbitmq/bin/rabbitmqctl";

pub struct RabbitNode {
    pub port: u16,
    pub node: String,
    pub dir: PathBuf,
    vhosts: AtomicU32,
}

static NODE: OnceLock<RabbitNode> = OnceLock::new();

impl RabbitNode {
    /// The node of this test binary, started on first use.
    pub fn shared() -> &'static RabbitNode {
        NODE.get_or_init(RabbitNode::start)
    }

    // The node outlives this function on purpose; the watchdog stops it.
    #[allow(clippy::zombie_processes)]
    fn start() -> RabbitNode {
        assert!(
            Path::new(SERVER).exists(),
            "{SERVER} not found: install Debian's rabbitmq-server package (.ci/run does)"
        );
        let port = free_port_pair();
        let node = format!("rwtest{}x{port}@localhost", std::process::id());
        let dir = std::env::temp_dir().join(format!(
            "refund-worker-rabbit-{}-{port}",
            std::process::id()
        ));
        std::fs::create_dir_all(dir.join("log")).expect("node dir");
        std::fs::write(dir.join("enabled_plugins"), "[].\n").expect("plugins file");
        let log = std::fs::File::create(dir.join("server.out")).expect("server log");
        let mut server = Command::new(SERVER);
        node_env(&mut server, &dir, &node);
        server
            .env("RABBITMQ_NODE_PORT", port.to_string())
            .env("RABBITMQ_MNESIA_BASE", dir.join("mnesia"))
            .env("RABBITMQ_LOG_BASE", dir.join("log"))
            .env("RABBITMQ_ENABLED_PLUGINS_FILE", dir.join("enabled_plugins"))
            .env("RABBITMQ_PID_FILE", dir.join("pid"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("starting rabbitmq-server");
        let this = RabbitNode {
            port,
            node,
            dir,
            vhosts: AtomicU32::new(0),
        };
        this.watchdog();
        this.wait();
        this
    }

    fn wait(&self) {
        let pid = self.dir.join("pid");
        let ok = self.ctl(&["wait", pid.to_str().expect("utf8"), "--timeout", "90"]);
        assert!(
            ok,
            "rabbitmq node {} did not start; see {}",
            self.node,
            self.dir.display()
        );
    }

    /// Stops the node when this test process is gone, whatever the reason.
    #[allow(clippy::zombie_processes)]
    fn watchdog(&self) {
        let script = format!(
            "while kill -0 {pid} 2>/dev/null; do sleep 1; done; \
             HOME='{home}' {CTL} -n '{node}' stop >/dev/null 2>&1; rm -rf '{home}'",
            pid = std::process::id(),
            home = self.dir.display(),
            node = self.node,
        );
        Command::new("setsid")
            .args(["sh", "-c", &script])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("watchdog");
    }

    /// Runs rabbitmqctl against this node.
    pub fn ctl(&self, args: &[&str]) -> bool {
        let mut cmd = Command::new(CTL);
        node_env(&mut cmd, &self.dir, &self.node);
        cmd.arg("-n").arg(&self.node).args(args);
        cmd.stdout(Stdio::null()).stderr(Stdio::null());
        cmd.status().map(|s| s.success()).unwrap_or(false)
    }

    /// A fresh vhost with full permissions for guest; returns its AMQP URL.
    pub fn vhost(&self) -> String {
        let n = self.vhosts.fetch_add(1, Ordering::SeqCst);
        let name = format!("t{n}");
        assert!(self.ctl(&["add_vhost", &name]), "add_vhost {name}");
        assert!(
            self.ctl(&["set_permissions", "-p", &name, "guest", ".*", ".*", ".*"]),
            "set_permissions {name}"
        );
        format!("amqp://guest:guest@127.0.0.1:{}/{name}", self.port)
    }

    /// Stops the broker application (connections drop), keeping the node.
    pub fn stop_app(&self) {
        assert!(self.ctl(&["stop_app"]), "stop_app");
    }

    /// Starts the broker application again.
    pub fn start_app(&self) {
        assert!(self.ctl(&["start_app"]), "start_app");
    }
}

fn node_env(cmd: &mut Command, dir: &Path, node: &str) {
    cmd.env("HOME", dir).env("RABBITMQ_NODENAME", node);
}

/// An AMQP port whose Erlang distribution port (+20000) is free too.
fn free_port_pair() -> u16 {
    for _ in 0..200 {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = l.local_addr().expect("addr").port();
        drop(l);
        if !(20000..=45000).contains(&port) {
            continue;
        }
        if TcpListener::bind(("127.0.0.1", port)).is_ok()
            && TcpListener::bind(("0.0.0.0", port + 20000)).is_ok()
        {
            return port;
        }
    }
    panic!("no free port pair found");
}

//! A private RabbitMQ node: its own free port, data directory and node name,
//! started from Debian's `rabbitmq-server` package without touching any
//! other node (e.g. one on 5672). Used by the integration tests and the
//! benchmark. A watchdog shell stops the node when the owning process is
//! gone, whatever the reason (panic, SIGKILL).

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

const SERVER: &str = "/usr/lib/rabbitmq/bin/rabbitmq-server";
const CTL: &str = "/usr/lib/rabbitmq/bin/rabbitmqctl";

/// Why the node could not be used.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// The package is not installed.
    #[error("{SERVER} not found: install Debian's rabbitmq-server package (scripts/ensure-rabbitmq does)")]
    NotInstalled,
    /// Something failed on the way.
    #[error("rabbitmq node: {0}")]
    Failed(String),
}

/// PEM files for a TLS listener.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// The CA that signed the certificate.
    pub ca: PathBuf,
    /// The server certificate.
    pub cert: PathBuf,
    /// Its private key.
    pub key: PathBuf,
}

/// A running private node.
#[derive(Debug)]
pub struct LocalBroker {
    /// AMQP port.
    pub port: u16,
    /// AMQPS port, when started with TLS.
    pub tls_port: Option<u16>,
    /// Erlang node name.
    pub node: String,
    /// Data, logs and the CLI's HOME.
    pub dir: PathBuf,
    vhosts: AtomicU32,
}

impl LocalBroker {
    /// Starts a node and waits until it accepts connections.
    pub fn start() -> Result<LocalBroker, NodeError> {
        Self::start_with(None)
    }

    /// As [`LocalBroker::start`], with an AMQPS listener too when `tls` is
    /// given (on another free port; see `tls_port`).
    pub fn start_with(tls: Option<&TlsFiles>) -> Result<LocalBroker, NodeError> {
        let broker = Self::prepare(tls, None)?;
        broker.spawn_server()?;
        broker.watchdog()?;
        broker.wait_ready()?;
        Ok(broker)
    }

    /// Lays out a node (ports, name, directories, configuration, cookie)
    /// without starting it.
    pub(crate) fn prepare(
        tls: Option<&TlsFiles>,
        cookie: Option<&str>,
    ) -> Result<LocalBroker, NodeError> {
        if !Path::new(SERVER).exists() {
            return Err(NodeError::NotInstalled);
        }
        let fail = |what: &str, e: std::io::Error| NodeError::Failed(format!("{what}: {e}"));
        let port = free_port_pair()?;
        let node = format!("rw{}x{port}@localhost", std::process::id());
        let dir = std::env::temp_dir().join(format!(
            "refund-worker-rabbit-{}-{port}",
            std::process::id()
        ));
        std::fs::create_dir_all(dir.join("log")).map_err(|e| fail("node dir", e))?;
        std::fs::write(dir.join("enabled_plugins"), "[].\n")
            .map_err(|e| fail("plugins file", e))?;
        if let Some(cookie) = cookie {
            // Nodes of one cluster share the Erlang cookie; the CLI reads it
            // from the same HOME.
            let path = dir.join(".erlang.cookie");
            std::fs::write(&path, cookie).map_err(|e| fail("cookie", e))?;
            #[cfg(unix)]
            {
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o400))
                    .map_err(|e| fail("cookie", e))?;
            }
        }
        let mut tls_port = None;
        let mut conf = String::new();
        if let Some(tls) = tls {
            let p = free_port_pair()?;
            tls_port = Some(p);
            conf = format!(
                "listeners.ssl.default = {p}\n\
                 ssl_options.cacertfile = {}\n\
                 ssl_options.certfile = {}\n\
                 ssl_options.keyfile = {}\n\
                 ssl_options.verify = verify_none\n\
                 ssl_options.fail_if_no_peer_cert = false\n",
                tls.ca.display(),
                tls.cert.display(),
                tls.key.display()
            );
        }
        std::fs::write(dir.join("rabbitmq.conf"), conf).map_err(|e| fail("config file", e))?;
        Ok(LocalBroker {
            port,
            tls_port,
            node,
            dir,
            vhosts: AtomicU32::new(0),
        })
    }

    /// Starts the server process in a session of its own (so a crash can be
    /// simulated by killing it), appending to `server.out`.
    #[allow(clippy::zombie_processes)] // the node outlives this call; the watchdog stops it
    pub(crate) fn spawn_server(&self) -> Result<(), NodeError> {
        let fail = |what: &str, e: std::io::Error| NodeError::Failed(format!("{what}: {e}"));
        let dir = &self.dir;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("server.out"))
            .map_err(|e| fail("server log", e))?;
        let log2 = log.try_clone().map_err(|e| fail("server log", e))?;
        Command::new("setsid")
            .arg(SERVER)
            .env("HOME", dir)
            .env("RABBITMQ_NODENAME", &self.node)
            .env("RABBITMQ_NODE_PORT", self.port.to_string())
            .env("RABBITMQ_MNESIA_BASE", dir.join("mnesia"))
            .env("RABBITMQ_LOG_BASE", dir.join("log"))
            .env("RABBITMQ_ENABLED_PLUGINS_FILE", dir.join("enabled_plugins"))
            .env("RABBITMQ_PID_FILE", dir.join("pid"))
            .env("RABBITMQ_CONFIG_FILE", dir.join("rabbitmq.conf"))
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .spawn()
            .map(|_| ())
            .map_err(|e| fail("starting rabbitmq-server", e))
    }

    /// Waits until the node runs (up to 90 s).
    pub(crate) fn wait_ready(&self) -> Result<(), NodeError> {
        let pid = self.dir.join("pid");
        if !self.ctl(&["wait", &pid.to_string_lossy(), "--timeout", "90"]) {
            return Err(NodeError::Failed(format!(
                "node {} did not start; see {}",
                self.node,
                self.dir.display()
            )));
        }
        Ok(())
    }

    /// Kills the node's Erlang VM with SIGKILL (a crash: no clean shutdown).
    pub fn kill(&self) -> Result<(), NodeError> {
        let pid = std::fs::read_to_string(self.dir.join("pid"))
            .map_err(|e| NodeError::Failed(format!("reading the pid file: {e}")))?;
        let status = Command::new("kill")
            .args(["-9", pid.trim()])
            .status()
            .map_err(|e| NodeError::Failed(format!("kill: {e}")))?;
        if !status.success() {
            return Err(NodeError::Failed(format!("kill -9 {}", pid.trim())));
        }
        // The pid file stays behind; `wait` after a restart must not see it.
        let _ = std::fs::remove_file(self.dir.join("pid"));
        Ok(())
    }

    /// Starts a killed or stopped node again with its data, and waits.
    pub fn restart(&self) -> Result<(), NodeError> {
        self.spawn_server()?;
        self.wait_ready()
    }

    /// Stops the node when this process is gone.
    #[allow(clippy::zombie_processes)] // detached on purpose
    pub(crate) fn watchdog(&self) -> Result<(), NodeError> {
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
            .map(|_| ())
            .map_err(|e| NodeError::Failed(format!("watchdog: {e}")))
    }

    /// Runs rabbitmqctl against this node; true on success.
    pub fn ctl(&self, args: &[&str]) -> bool {
        Command::new(CTL)
            .env("HOME", &self.dir)
            .env("RABBITMQ_NODENAME", &self.node)
            .arg("-n")
            .arg(&self.node)
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false)
    }

    /// Runs rabbitmqctl against this node; its standard output on success.
    pub fn ctl_output(&self, args: &[&str]) -> Option<String> {
        let output = Command::new(CTL)
            .env("HOME", &self.dir)
            .env("RABBITMQ_NODENAME", &self.node)
            .arg("-n")
            .arg(&self.node)
            .args(args)
            .stderr(Stdio::null())
            .output()
            .ok()?;
        output
            .status
            .success()
            .then(|| String::from_utf8_lossy(&output.stdout).into_owned())
    }

    /// A fresh vhost with full permissions for guest; returns its AMQP URL.
    pub fn vhost(&self) -> Result<String, NodeError> {
        let n = self.vhosts.fetch_add(1, Ordering::SeqCst);
        let name = format!("v{n}");
        if !self.ctl(&["add_vhost", &name])
            || !self.ctl(&["set_permissions", "-p", &name, "guest", ".*", ".*", ".*"])
        {
            return Err(NodeError::Failed(format!("creating vhost {name}")));
        }
        Ok(format!("amqp://guest:guest@127.0.0.1:{}/{name}", self.port))
    }

    /// Stops the node now.
    pub fn stop(&self) {
        self.ctl(&["stop"]);
    }
}

/// An AMQP port whose Erlang distribution port (+20000) is free too.
fn free_port_pair() -> Result<u16, NodeError> {
    for _ in 0..200 {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .map_err(|e| NodeError::Failed(format!("finding a port: {e}")))?;
        if !(20000..=45000).contains(&port) {
            continue;
        }
        if TcpListener::bind(("127.0.0.1", port)).is_ok()
            && TcpListener::bind(("0.0.0.0", port + 20000)).is_ok()
        {
            return Ok(port);
        }
    }
    Err(NodeError::Failed("no free port pair found".into()))
}

//! A private PostgreSQL server: its own free port and data directory,
//! started from Debian's `postgresql` package (`initdb`, `pg_ctl`) without
//! touching any other server. `initdb` and `pg_ctl` refuse to run as root,
//! so as root they run as the `postgres` user on a directory it owns. A
//! watchdog stops the server when the owning process is gone, whatever the
//! reason (panic, SIGKILL). Used by the integration tests and the
//! benchmark.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

/// Why the server could not be used.
#[derive(Debug, thiserror::Error)]
pub enum PostgresError {
    /// The package is not installed.
    #[error("PostgreSQL's initdb not found under /usr/lib/postgresql: install Debian's postgresql package (scripts/ensure-postgres does)")]
    NotInstalled,
    /// Something failed on the way.
    #[error("postgres server: {0}")]
    Failed(String),
}

/// A running private server (superuser `postgres`, trust authentication
/// on loopback).
#[derive(Debug)]
pub struct LocalPostgres {
    /// Its port on 127.0.0.1.
    pub port: u16,
    /// Data directory (and the socket's).
    pub dir: PathBuf,
    bin: PathBuf,
    databases: AtomicU32,
}

impl LocalPostgres {
    /// Creates a cluster in a new directory, starts it and waits until it
    /// accepts connections.
    pub fn start() -> Result<LocalPostgres, PostgresError> {
        let bin = bin_dir().ok_or(PostgresError::NotInstalled)?;
        let port = free_port()?;
        let dir = std::env::temp_dir().join(format!(
            "refund-worker-postgres-{}-{port}",
            std::process::id()
        ));
        std::fs::create_dir_all(&dir).map_err(|e| fail("data dir", e))?;
        let server = LocalPostgres {
            port,
            dir,
            bin,
            databases: AtomicU32::new(0),
        };
        server.give_to_postgres()?;
        server.run(
            "initdb",
            &[
                "-D",
                &server.data(),
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
                "--no-sync",
            ],
        )?;
        server.write_hba()?;
        server.start_again()?;
        server.watchdog()?;
        Ok(server)
    }

    /// The role whose password is checked (every other connects on trust),
    /// for tests of refused credentials.
    pub const PASSWORD_ROLE: &'static str = "password_user";

    /// Trust on loopback, except for [`Self::PASSWORD_ROLE`].
    fn write_hba(&self) -> Result<(), PostgresError> {
        let hba = format!(
            "local all all trust\n\
             host all {role} 127.0.0.1/32 scram-sha-256\n\
             host all all 127.0.0.1/32 trust\n\
             host all all ::1/128 trust\n",
            role = Self::PASSWORD_ROLE
        );
        let path = self.dir.join("data").join("pg_hba.conf");
        std::fs::write(&path, hba).map_err(|e| fail("pg_hba.conf", e))?;
        self.give_to_postgres()
    }

    /// The URL of the `postgres` database.
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// A fresh, empty database; returns its URL.
    pub fn database(&self) -> Result<String, PostgresError> {
        let n = self.databases.fetch_add(1, Ordering::SeqCst);
        let name = format!("t{n}");
        self.psql(&format!("CREATE DATABASE {name}"))?;
        Ok(format!(
            "postgres://postgres@127.0.0.1:{}/{name}",
            self.port
        ))
    }

    /// Runs one SQL statement as the superuser on `postgres`.
    pub fn psql(&self, sql: &str) -> Result<(), PostgresError> {
        let status = Command::new(self.bin.join("psql"))
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-U",
                "postgres",
            ])
            .args(["-d", "postgres", "-v", "ON_ERROR_STOP=1", "-q", "-c", sql])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map_err(|e| fail("psql", e))?;
        if !status.success() {
            return Err(PostgresError::Failed(format!("psql: {sql}")));
        }
        Ok(())
    }

    /// Stops the server at once, as a crash would (`-m immediate`: no
    /// checkpoint; the next start recovers from the WAL).
    pub fn crash(&self) -> Result<(), PostgresError> {
        self.run(
            "pg_ctl",
            &["-D", &self.data(), "-m", "immediate", "-w", "stop"],
        )
    }

    /// Starts the server (again) with its data, and waits.
    pub fn start_again(&self) -> Result<(), PostgresError> {
        let options = format!(
            "-c listen_addresses=127.0.0.1 -p {} -k {} -c fsync=on -c max_connections=200",
            self.port,
            self.data()
        );
        let log = format!("{}/server.log", self.data());
        self.run(
            "pg_ctl",
            &[
                "-D",
                &self.data(),
                "-o",
                &options,
                "-l",
                &log,
                "-w",
                "-t",
                "60",
                "start",
            ],
        )
    }

    /// Stops the server cleanly.
    pub fn stop(&self) {
        let _ = self.run("pg_ctl", &["-D", &self.data(), "-m", "fast", "-w", "stop"]);
    }

    fn data(&self) -> String {
        self.dir.join("data").display().to_string()
    }

    /// As root, the directory belongs to `postgres`, who runs the tools.
    fn give_to_postgres(&self) -> Result<(), PostgresError> {
        if !is_root() {
            return Ok(());
        }
        let status = Command::new("chown")
            .args(["-R", "postgres:postgres"])
            .arg(&self.dir)
            .status()
            .map_err(|e| fail("chown", e))?;
        if !status.success() {
            return Err(PostgresError::Failed("chown of the data directory".into()));
        }
        Ok(())
    }

    /// Runs one of PostgreSQL's programs (as `postgres` when root).
    fn run(&self, program: &str, args: &[&str]) -> Result<(), PostgresError> {
        let path = self.bin.join(program);
        let mut command = if is_root() {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(&path);
            c
        } else {
            Command::new(&path)
        };
        let output = command
            .args(args)
            .current_dir(&self.dir)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| fail(program, e))?;
        if !output.status.success() {
            return Err(PostgresError::Failed(format!(
                "{program} {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&output.stderr).trim()
            )));
        }
        Ok(())
    }

    /// Stops the server when this process is gone.
    #[allow(clippy::zombie_processes)] // detached on purpose
    fn watchdog(&self) -> Result<(), PostgresError> {
        let as_postgres = if is_root() {
            "runuser -u postgres -- "
        } else {
            ""
        };
        let script = format!(
            "while kill -0 {pid} 2>/dev/null; do sleep 1; done; \
             {as_postgres}'{pg_ctl}' -D '{data}' -m immediate stop >/dev/null 2>&1; rm -rf '{dir}'",
            pid = std::process::id(),
            pg_ctl = self.bin.join("pg_ctl").display(),
            data = self.data(),
            dir = self.dir.display(),
        );
        Command::new("setsid")
            .args(["sh", "-c", &script])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map(|_| ())
            .map_err(|e| fail("watchdog", e))
    }
}

fn fail(what: &str, e: std::io::Error) -> PostgresError {
    PostgresError::Failed(format!("{what}: {e}"))
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

/// The newest installed `/usr/lib/postgresql/<version>/bin`.
fn bin_dir() -> Option<PathBuf> {
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .flatten()
        .filter_map(|e| {
            let version = e.file_name().to_string_lossy().parse().ok()?;
            let bin = e.path().join("bin");
            Path::new(&bin.join("initdb"))
                .exists()
                .then_some((version, bin))
        })
        .collect();
    versions.sort();
    versions.pop().map(|(_, bin)| bin)
}

fn free_port() -> Result<u16, PostgresError> {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| fail("finding a port", e))
}

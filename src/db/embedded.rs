//! A private PostgreSQL cluster run from the locally installed server binaries.
//!
//! `gavel serve` with no `DATABASE_URL` uses one, and so does every integration test,
//! so this path is exercised on every test run. The cluster listens only on a Unix
//! socket in a private directory (no TCP port to collide with, and a little faster
//! than loopback TCP), trusts local connections, and is stopped — fast shutdown,
//! then waited for — when the [`Cluster`] is stopped or dropped.
//!
//! PostgreSQL refuses to run as root; when this process is root, the cluster runs as
//! the unprivileged `postgres` user, which owns its directories.

use std::fs;
use std::io::{self, Read, Seek, SeekFrom};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::{Gid, Pid, Uid, User};
use sqlx::postgres::PgConnectOptions;

/// The superuser the cluster is created with; local connections are trusted.
pub const SUPERUSER: &str = "gavel";
/// The user that runs the cluster when this process is root.
const UNPRIVILEGED_USER: &str = "postgres";
/// Where Debian and Ubuntu put versioned server binaries.
const DEBIAN_PG_ROOT: &str = "/usr/lib/postgresql";
/// How long to wait for the server to accept connections.
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a fast shutdown may take before the server is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);
/// The cluster's own server settings (`name = value` lines; `#` starts a comment),
/// which the load tests' clusters read too. [`Options::settings`] come after them,
/// and so win.
const SERVER_SETTINGS: &str = include_str!("embedded.conf");
/// initdb's options for the cluster (one a line; `#` starts a comment line), which
/// the load tests' clusters take too.
const INITDB_ARGS: &str = include_str!("initdb.args");

/// initdb's options shared by every private cluster.
fn initdb_args() -> impl Iterator<Item = &'static str> {
    INITDB_ARGS.lines().map(str::trim).filter(|line| !line.is_empty() && !line.starts_with('#'))
}

/// The `(name, value)` pairs of the cluster's own server settings.
pub fn server_settings() -> impl Iterator<Item = (&'static str, &'static str)> {
    SERVER_SETTINGS.lines().filter_map(|line| {
        let line = line.split('#').next().unwrap_or_default().trim();
        let (name, value) = line.split_once('=')?;
        Some((name.trim(), value.trim()))
    })
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "no PostgreSQL server binaries found (looked for initdb and postgres in {DEBIAN_PG_ROOT}/*/bin and on PATH); \
         install them with `apt-get install postgresql-15` (Debian's postgresql-15 package), \
         pass --pg-bin-dir, or set DATABASE_URL to use a running server"
    )]
    NotInstalled,
    #[error(
        "running as root, and PostgreSQL refuses to run as root: no `{UNPRIVILEGED_USER}` user exists to run the \
         embedded cluster; create one (the postgresql package does) or run gavel as an unprivileged user"
    )]
    NoUnprivilegedUser,
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },
    #[error("{what} failed: {detail}")]
    Command { what: &'static str, detail: String },
    #[error("the embedded PostgreSQL did not become ready within {0:?}; its log ends with:\n{1}")]
    NotReady(Duration, String),
}

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> Error {
    let what = what.into();
    move |source| Error::Io { what, source }
}

/// How to start a cluster.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Data directory to use (created and initialised if empty). `None`: a fresh
    /// temporary directory, removed when the cluster stops.
    pub data_dir: Option<PathBuf>,
    /// Directory with `initdb` and `postgres`. `None`: searched for.
    pub bin_dir: Option<PathBuf>,
    /// Extra `-c name=value` server settings, e.g. `max_connections`.
    pub settings: Vec<(String, String)>,
    /// Also listen on this TCP port of 127.0.0.1 (the socket is named after it
    /// too). `None`: the Unix socket alone, on the default port.
    pub port: Option<u16>,
}

/// A running cluster. Stopped (fast shutdown) on [`Cluster::stop`] or drop.
#[derive(Debug)]
pub struct Cluster {
    child: Option<Child>,
    bin_dir: PathBuf,
    run_as: Option<User>,
    port: Option<u16>,
    socket_dir: PathBuf,
    data_dir: PathBuf,
    log_path: PathBuf,
    /// The private directory holding the socket, log and (when ephemeral) data.
    run_dir: tempfile::TempDir,
}

impl Cluster {
    /// Initialises (if needed) and starts a cluster, and waits until it accepts
    /// connections. Blocking: call it before starting runtimes, or from
    /// `spawn_blocking`.
    ///
    /// The server process gets SIGINT (fast shutdown) if the thread that started it
    /// exits, so a crashed or killed gavel does not leave a server behind. Call this
    /// from a thread that lives as long as the cluster should (the main thread).
    pub fn start(options: &Options) -> Result<Cluster, Error> {
        let bin_dir = match &options.bin_dir {
            Some(dir) => dir.clone(),
            None => find_bin_dir().ok_or(Error::NotInstalled)?,
        };
        if !bin_dir.join("initdb").is_file() || !bin_dir.join("postgres").is_file() {
            return Err(Error::NotInstalled);
        }
        let run_as = unprivileged_user()?;

        let run_dir = tempfile::Builder::new()
            .prefix("gavel-pg-")
            .tempdir()
            .map_err(io_err("creating the embedded PostgreSQL run directory"))?;
        let data_dir = match &options.data_dir {
            Some(dir) => {
                fs::create_dir_all(dir).map_err(io_err(format!("creating {}", dir.display())))?;
                dir.clone()
            }
            None => run_dir.path().join("data"),
        };
        let socket_dir = run_dir.path().to_path_buf();
        let log_path = run_dir.path().join("postgres.log");
        fs::set_permissions(run_dir.path(), fs::Permissions::from_mode(0o700))
            .map_err(io_err("restricting the run directory"))?;
        if let Some(user) = &run_as {
            chown(run_dir.path(), user)?;
            if options.data_dir.is_some() {
                chown(&data_dir, user)?;
            }
        }

        if !data_dir.join("PG_VERSION").exists() {
            let mut initdb = Command::new(bin_dir.join("initdb"));
            initdb.arg("--pgdata").arg(&data_dir).args(["--username", SUPERUSER]).args(initdb_args());
            // A throw-away cluster need not survive a power cut during its creation.
            if options.data_dir.is_none() {
                initdb.arg("--no-sync");
            }
            run_quietly(initdb, &run_as, "initdb")?;
        }

        let log = fs::File::create(&log_path).map_err(io_err("creating the PostgreSQL log"))?;
        let log_err = log.try_clone().map_err(io_err("opening the PostgreSQL log"))?;
        let mut postgres = Command::new(bin_dir.join("postgres"));
        let listen = if options.port.is_some() { "127.0.0.1" } else { "" };
        postgres
            .arg("-D")
            .arg(&data_dir)
            .arg("-c")
            .arg(format!("listen_addresses={listen}"))
            .arg("-c")
            .arg(format!("unix_socket_directories={}", socket_dir.display()));
        if let Some(port) = options.port {
            postgres.arg("-c").arg(format!("port={port}"));
        }
        // The last of a name wins: the caller's settings after the cluster's own.
        for (name, value) in server_settings() {
            postgres.arg("-c").arg(format!("{name}={value}"));
        }
        for (name, value) in &options.settings {
            postgres.arg("-c").arg(format!("{name}={value}"));
        }
        postgres.stdin(Stdio::null()).stdout(log).stderr(log_err);
        // Its own process group: a terminal's Ctrl-C reaches gavel, which drains its
        // requests and only then stops the database.
        postgres.process_group(0);
        if let Some(user) = &run_as {
            postgres.uid(user.uid.as_raw()).gid(user.gid.as_raw());
        }
        // SAFETY: prctl is async-signal-safe and touches no memory of the parent.
        // std applies uid/gid before pre_exec hooks, so the death signal survives
        // the credential change.
        unsafe {
            postgres.pre_exec(|| nix::sys::prctl::set_pdeathsig(Signal::SIGINT).map_err(io::Error::from));
        }
        let child = postgres.spawn().map_err(io_err("starting postgres"))?;

        let mut cluster = Cluster {
            child: Some(child),
            bin_dir,
            run_as,
            port: options.port,
            socket_dir,
            data_dir,
            log_path,
            run_dir,
        };
        cluster.wait_ready()?;
        Ok(cluster)
    }

    fn wait_ready(&mut self) -> Result<(), Error> {
        let deadline = Instant::now() + START_TIMEOUT;
        let pid_file = self.data_dir.join("postmaster.pid");
        loop {
            // Line 8 of postmaster.pid is the postmaster's status: "ready" once it
            // accepts connections, "standby" once a hot standby does.
            if let Ok(text) = fs::read_to_string(&pid_file)
                && text.lines().nth(7).is_some_and(|s| matches!(s.trim(), "ready" | "standby"))
            {
                return Ok(());
            }
            let exited = match self.child.as_mut() {
                Some(child) => child.try_wait().map_err(io_err("waiting for postgres"))?.is_some(),
                None => true,
            };
            if exited || Instant::now() > deadline {
                self.child = None;
                return Err(Error::NotReady(START_TIMEOUT, self.log_tail()));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Connection options for `database` on this cluster.
    pub fn connect_options(&self, database: &str) -> PgConnectOptions {
        let options = PgConnectOptions::new().socket(&self.socket_dir).username(SUPERUSER).database(database);
        match self.port {
            Some(port) => options.port(port),
            None => options,
        }
    }

    /// A URL for `database`, for gavel (`--replica-url`) and for tools such as
    /// psql and pgbench.
    pub fn url(&self, database: &str) -> String {
        let port = self.port.map(|p| format!("&port={p}")).unwrap_or_default();
        format!("postgres:///{database}?host={}&user={SUPERUSER}{port}", self.socket_dir.display())
    }

    /// The TCP port it listens on, if it was asked to.
    pub fn port(&self) -> Option<u16> {
        self.port
    }

    /// Copies this running cluster into `dest` (which must not exist, in a
    /// directory the cluster's user may write) with `pg_basebackup -R`: a
    /// data directory that starts as a streaming standby of this cluster.
    pub fn base_backup(&self, dest: &Path) -> Result<(), Error> {
        let mut backup = Command::new(self.bin_dir.join("pg_basebackup"));
        backup.arg("--pgdata").arg(dest).arg("--host").arg(&self.socket_dir).args([
            "--username",
            SUPERUSER,
            "--write-recovery-conf",
            "--checkpoint",
            "fast",
            "--wal-method",
            "stream",
        ]);
        if let Some(port) = self.port {
            backup.arg("--port").arg(port.to_string());
        }
        run_quietly(backup, &self.run_as, "pg_basebackup")
    }

    /// Gives `dir` to the user the clusters run as (when this process is root),
    /// so that [`Cluster::base_backup`] may write there.
    pub fn hand_over(dir: &Path) -> Result<(), Error> {
        match unprivileged_user()? {
            Some(user) => chown(dir, &user),
            None => Ok(()),
        }
    }

    /// The postmaster's process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// Stops the server with a fast shutdown and waits for it to exit.
    pub fn stop(mut self) -> Result<(), Error> {
        self.shutdown()
    }

    fn shutdown(&mut self) -> Result<(), Error> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        let pid = Pid::from_raw(child.id() as i32);
        // SIGINT is PostgreSQL's fast shutdown: roll back open transactions, write a
        // checkpoint, exit.
        let _ = kill(pid, Signal::SIGINT);
        let deadline = Instant::now() + STOP_TIMEOUT;
        loop {
            match child.try_wait() {
                Ok(Some(_)) => return Ok(()),
                Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
                Ok(None) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(Error::Command {
                        what: "stopping postgres",
                        detail: format!("no exit within {STOP_TIMEOUT:?}; killed"),
                    });
                }
                Err(e) => return Err(io_err("waiting for postgres to stop")(e)),
            }
        }
    }

    fn log_tail(&self) -> String {
        let mut text = String::new();
        if let Ok(mut f) = fs::File::open(&self.log_path) {
            let len = f.metadata().map(|m| m.len()).unwrap_or(0);
            let _ = f.seek(SeekFrom::Start(len.saturating_sub(2000)));
            let _ = f.read_to_string(&mut text);
        }
        text
    }

    /// The directory holding the socket and log; removed when the cluster is dropped.
    pub fn run_dir(&self) -> &Path {
        self.run_dir.path()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if let Err(e) = self.shutdown() {
            tracing::warn!(error = %e, "embedded PostgreSQL did not stop cleanly");
        }
    }
}

/// The newest `/usr/lib/postgresql/<version>/bin`, else the directory of `postgres`
/// on PATH.
pub fn find_bin_dir() -> Option<PathBuf> {
    let mut versions: Vec<(u32, PathBuf)> = fs::read_dir(DEBIAN_PG_ROOT)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let version = e.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = e.path().join("bin");
            bin.join("postgres").is_file().then_some((version, bin))
        })
        .collect();
    versions.sort();
    if let Some((_, bin)) = versions.pop() {
        return Some(bin);
    }
    std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path).find(|dir| dir.join("postgres").is_file() && dir.join("initdb").is_file())
    })
}

fn unprivileged_user() -> Result<Option<User>, Error> {
    if !Uid::effective().is_root() {
        return Ok(None);
    }
    match User::from_name(UNPRIVILEGED_USER) {
        Ok(Some(user)) => Ok(Some(user)),
        _ => Err(Error::NoUnprivilegedUser),
    }
}

fn chown(path: &Path, user: &User) -> Result<(), Error> {
    nix::unistd::chown(path, Some(user.uid), Some(Gid::from_raw(user.gid.as_raw())))
        .map_err(|e| io_err(format!("giving {} to {}", path.display(), user.name))(e.into()))
}

fn run_quietly(mut command: Command, run_as: &Option<User>, what: &'static str) -> Result<(), Error> {
    if let Some(user) = run_as {
        command.uid(user.uid.as_raw()).gid(user.gid.as_raw());
    }
    // Run it from a directory the unprivileged user may enter.
    command.current_dir("/");
    let out = command.output().map_err(io_err(format!("running {what}")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(Error::Command { what, detail: format!("{}\n{}", out.status, String::from_utf8_lossy(&out.stderr).trim()) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bin_dir_without_postgres_is_reported_as_not_installed() {
        let empty = tempfile::tempdir().unwrap();
        let err = Cluster::start(&Options { bin_dir: Some(empty.path().into()), ..Options::default() }).unwrap_err();
        assert!(matches!(err, Error::NotInstalled));
        assert!(err.to_string().contains("postgresql-15"), "{err}");
    }

    #[test]
    fn every_line_of_the_server_settings_is_a_setting_or_a_comment() {
        let settings: Vec<_> = server_settings().collect();
        assert!(!settings.is_empty());
        assert!(settings.iter().all(|(name, value)| !name.is_empty() && !value.is_empty()), "{settings:?}");
        let written = SERVER_SETTINGS.lines().filter(|l| !l.trim().is_empty() && !l.trim().starts_with('#'));
        assert_eq!(written.count(), settings.len(), "a line that is neither a setting nor a comment");
    }

    #[test]
    fn initdbs_options_are_whole_options_one_a_line() {
        let args: Vec<_> = initdb_args().collect();
        assert!(args.contains(&"--encoding=UTF8"), "{args:?}");
        assert!(args.iter().all(|arg| arg.starts_with("--") && !arg.contains(char::is_whitespace)), "{args:?}");
    }
}

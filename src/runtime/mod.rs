//! The per-core engine: thread pinning, runtimes, listeners, start and shutdown;
//! and the `serve` and `migrate` commands that drive it.

mod admin;
mod core_thread;
pub use core_thread::LIFECYCLE_APPLICATION;
mod deadlines;
mod fast;
pub mod socket;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{Context, bail};
use tokio::sync::watch;

use crate::auth::Keys;
use crate::config::{self, Serve};
use crate::core::Health;
use crate::db::batch::Lanes;
use crate::db::target::Target;
use crate::db::{self, embedded};
use crate::storage;

/// How long start-up may take for all cores to serve.
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// Database name used on the embedded cluster.
pub const EMBEDDED_DATABASE: &str = "gavel";

/// A running server: one thread per core.
pub struct Server {
    local_addr: SocketAddr,
    admin_addr: Option<SocketAddr>,
    shutdown: watch::Sender<bool>,
    threads: Vec<JoinHandle<()>>,
    health: Arc<Health>,
    /// The temporary image store, removed when the server is dropped.
    _objects: Option<tempfile::TempDir>,
}

/// Where images go: `--object-store`, else `objects/` under `--data-dir`, else
/// a temporary directory that lives as long as the server (returned with it).
fn image_store(config: &Serve) -> anyhow::Result<(storage::Location, Option<tempfile::TempDir>)> {
    let options = config.object_store_options.clone();
    if let Some(url) = &config.object_store {
        return Ok((storage::Location { url: url.clone(), options }, None));
    }
    if config.database.database_url.is_some() {
        // The rows of an external database outlive this process, and other
        // instances share them; a local directory does neither.
        tracing::warn!(
            "no --object-store with DATABASE_URL: images are kept on this machine's disk, for this process \
             alone; set --object-store to a store every instance shares"
        );
    }
    let (dir, temporary) = match &config.database.data_dir {
        Some(data) => (std::path::absolute(data)?.join("objects"), None),
        None => {
            let temporary = tempfile::Builder::new().prefix("gavel-objects-").tempdir()?;
            (temporary.path().to_owned(), Some(temporary))
        }
    };
    let url = url::Url::from_directory_path(&dir)
        .map_err(|()| anyhow::anyhow!("{} cannot be a file:// URL", dir.display()))?;
    tracing::info!(%url, ephemeral = temporary.is_some(), "storing images on the local disk");
    Ok((storage::Location { url, options }, temporary))
}

impl Server {
    /// Starts every core and returns once all of them serve, or with the first
    /// core's error (after stopping the others).
    pub fn start(config: &Serve, database: impl Into<Target>, keys: Arc<Keys>) -> anyhow::Result<Server> {
        let database = database.into();
        let cores = config.core_count();
        let metrics = crate::metrics::install(config.metrics);
        let admin = match metrics {
            Some(_) => Some(
                std::net::TcpListener::bind(config.admin_addr)
                    .with_context(|| format!("cannot listen on the admin address {}", config.admin_addr))?,
            ),
            None => None,
        };
        let admin_addr = admin.as_ref().map(|l| l.local_addr()).transpose()?;
        let listeners =
            socket::bind_all(config.listen, cores).with_context(|| format!("cannot listen on {}", config.listen))?;
        let local_addr = listeners[0].local_addr()?;
        let pins = core_affinity::get_core_ids().unwrap_or_default();
        let health = Arc::new(Health::new(cores));
        let (shutdown, shutdown_rx) = watch::channel(false);
        let (started_tx, started_rx) = mpsc::sync_channel(cores);
        let bid_lanes = (config.bid_lanes > 0).then(|| Lanes::new(config.bid_lanes));
        let throttles = Arc::new(config.throttles());
        let (images, objects) = image_store(config)?;
        let replicas = config
            .database
            .replica_urls
            .iter()
            .map(|url| {
                db::replicas::parse_url(url)
                    .map_err(|e| anyhow::anyhow!("--replica-url {}: {e}", config::redact_url(url)))
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let config = Arc::new(config.clone());
        let mut threads = Vec::with_capacity(cores);
        for (index, listener) in listeners.into_iter().enumerate() {
            let start = core_thread::Start {
                index,
                pin: (!pins.is_empty()).then(|| pins[index % pins.len()]),
                listener,
                config: config.clone(),
                database: database.clone(),
                replicas: replicas.clone(),
                keys: keys.clone(),
                health: health.clone(),
                throttles: throttles.clone(),
                images: images.clone(),
                bid_lanes: bid_lanes.clone(),
                shutdown: shutdown_rx.clone(),
                started: started_tx.clone(),
            };
            let thread = std::thread::Builder::new()
                .name(format!("gavel-core-{index}"))
                .spawn(move || core_thread::run(start))
                .context("cannot spawn a core thread")?;
            threads.push(thread);
        }
        if let Some(listener) = admin {
            let shutdown = shutdown_rx.clone();
            let thread = std::thread::Builder::new()
                .name("gavel-admin".into())
                .spawn(move || admin::run(listener, shutdown))
                .context("cannot spawn the admin thread")?;
            threads.push(thread);
        }
        drop(started_tx);
        let server = Server { local_addr, admin_addr, shutdown, threads, health, _objects: objects };
        for _ in 0..cores {
            match started_rx.recv_timeout(START_TIMEOUT) {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => {
                    server.stop();
                    bail!(e);
                }
                Err(_) => {
                    server.stop();
                    bail!("the cores did not start within {START_TIMEOUT:?}");
                }
            }
        }
        Ok(server)
    }

    /// The address every core listens on (the real port when 0 was asked for).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The admin listener's address (serving /metrics), if metrics are on.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin_addr
    }

    pub fn health(&self) -> &Arc<Health> {
        &self.health
    }

    /// Turns `/ready` to 503 and tells every core to stop accepting; returns at once.
    pub fn begin_shutdown(&self) {
        self.health.start_draining();
        let _ = self.shutdown.send(true);
    }

    /// Shuts down and waits for every core: in-flight requests finish within the
    /// grace period, then pools close.
    pub fn stop(self) {
        self.begin_shutdown();
        for thread in self.threads {
            if thread.join().is_err() {
                tracing::error!("a core thread panicked");
            }
        }
    }
}

/// The database a command runs against: an external server (one host, or several
/// of which the primary is used) or an embedded cluster (stopped when this is
/// dropped).
pub struct Database {
    pub target: Target,
    pub cluster: Option<embedded::Cluster>,
}

impl Database {
    /// Connects to `DATABASE_URL`, or starts the embedded cluster. Blocking; call it
    /// on the main thread (the embedded server's lifetime is tied to the thread
    /// that starts it).
    pub fn open(config: &config::Database, max_connections: u32) -> anyhow::Result<Database> {
        if let Some(url) = &config.database_url {
            let target = Target::parse(url).context("DATABASE_URL is not a valid PostgreSQL URL")?;
            let hosts: Vec<String> = (0..target.hosts().len()).map(|i| target.describe(i)).collect();
            tracing::info!(
                hosts = ?hosts,
                attrs = ?target.attrs(),
                database = target.host(0).get_database().unwrap_or_default(),
                "using the PostgreSQL at DATABASE_URL"
            );
            return Ok(Database { target, cluster: None });
        }
        let cluster = embedded::Cluster::start(&embedded::Options {
            data_dir: config.data_dir.clone(),
            bin_dir: config.pg_bin_dir.clone(),
            settings: vec![("max_connections".into(), max_connections.to_string())],
            ..embedded::Options::default()
        })?;
        tracing::info!(
            data_dir = %cluster.data_dir().display(),
            ephemeral = config.data_dir.is_none(),
            "started the embedded PostgreSQL"
        );
        let target = cluster.connect_options(EMBEDDED_DATABASE).into();
        Ok(Database { target, cluster: Some(cluster) })
    }

    /// Stops the embedded cluster, if any.
    pub fn close(self) -> anyhow::Result<()> {
        if let Some(cluster) = self.cluster {
            cluster.stop()?;
            tracing::info!("stopped the embedded PostgreSQL");
        }
        Ok(())
    }
}

/// A small runtime for the main thread's own work (migrations, signals).
fn main_runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread().enable_all().build()?)
}

/// Prepares the database for use: creates the embedded database and migrates
/// the primary.
fn prepare(db: &Database, runtime: &tokio::runtime::Runtime) -> anyhow::Result<()> {
    runtime.block_on(async {
        let primary = match db.target.is_multi_host() {
            true => db.target.locate().await.context("cannot find the primary")?,
            false => 0,
        };
        let options = db.target.host(primary);
        if db.cluster.is_some() {
            db::ensure_database(options, EMBEDDED_DATABASE).await.context("cannot create the database")?;
        }
        db::migrate(options).await.context("migrations failed")
    })
}

/// `gavel serve`: runs until SIGTERM or SIGINT, then drains and exits.
pub fn serve(config: Serve) -> anyhow::Result<()> {
    let keys = match &config.secret.jwt_secret {
        Some(secret) => Keys::new(secret.as_bytes())?,
        None => {
            tracing::warn!(
                "no --jwt-secret / GAVEL_JWT_SECRET set: generated a random secret for this run; \
                 tokens from `gavel token` will not verify against it"
            );
            Keys::new(Keys::generate_secret().as_bytes())?
        }
    };
    tracing::info!(config = ?config.redacted(), "starting with this configuration");
    let cores = config.core_count();
    // Each core: its pool and its LISTEN connection; plus migrations, psql, headroom.
    let max_connections = cores as u32 * (config.db_conns_per_core + 1) + 20;
    let db = Database::open(&config.database, max_connections)?;
    let runtime = main_runtime()?;
    let result = (|| {
        prepare(&db, &runtime)?;
        let server = Server::start(&config, db.target.clone(), Arc::new(keys))?;
        tracing::info!(addr = %server.local_addr(), cores, "gavel serving");
        runtime.block_on(wait_for_signal())?;
        // Still serving, but not ready: load balancers stop sending here.
        server.health().start_draining();
        tracing::info!(delay = ?config.drain_delay, "shutting down: not ready, still serving");
        runtime.block_on(async {
            tokio::select! {
                _ = tokio::time::sleep(config.drain_delay) => {}
                _ = wait_for_signal() => tracing::info!("a second signal: not waiting out the drain delay"),
            }
        });
        tracing::info!(grace = ?config.shutdown_grace, "shutting down: no longer accepting; draining in-flight requests");
        server.stop();
        Ok(())
    })();
    let closed = db.close();
    result.and(closed)
}

/// `gavel migrate`.
pub fn migrate(config: &config::Database) -> anyhow::Result<()> {
    let db = Database::open(config, 20)?;
    let runtime = main_runtime()?;
    let result = prepare(&db, &runtime);
    let closed = db.close();
    result.and(closed)?;
    tracing::info!("migrations applied");
    Ok(())
}

async fn wait_for_signal() -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    Ok(())
}

//! gavel: a shared-nothing, thread-per-core HTTP API server for real-time bidding.
//!
//! Each core is a pinned OS thread running its own current-thread Tokio runtime,
//! with its own `SO_REUSEPORT` listener, its own small PostgreSQL pool, its own
//! read caches (kept coherent by LISTEN/NOTIFY) and its own write batchers (bids,
//! orders). No per-request work crosses cores. PostgreSQL is the one source of
//! truth: it alone accepts bids and reserves stock.
//!
//! # Layout
//!
//! Dependencies point downwards only: `runtime` → `http` → `core` → `cache` → `db`
//! → `domain`; `config`, `auth` and `metrics` are leaves anything may use.
//!
//! - [`runtime`]: the per-core engine (pinning, runtimes, listeners, shutdown), the
//!   admin listener (`/metrics`) and the `serve` / `migrate` commands.
//! - [`http`]: axum routers, one module per resource; problem+json errors;
//!   extractors; the OpenAPI document the routers' attributes generate.
//! - [`core`]: one core's state — pool, caches, batchers, limits.
//! - [`cache`]: per-core caches and the LISTEN/NOTIFY applier.
//! - [`db`]: queries per resource, the generic write batcher, the bid
//!   announcer, the one decoder of what the database announces (`db::notice`),
//!   the embedded PostgreSQL, migrations.
//! - [`domain`]: pure rules — money, auction lifecycle, bid checks, accounts, stock.
//! - [`config`]: the clap command line; [`auth`]: tokens, roles, password hashes;
//!   [`metrics`]: metric names and per-core handles.

pub mod auth;
pub mod cache;
pub mod config;
pub mod core;
pub mod db;
pub mod domain;
pub mod http;
pub mod metrics;
pub mod runtime;

use std::io::IsTerminal;

use config::{Cli, Command, LogFormat};

/// mimalloc: per-thread heaps suit a thread-per-core server, where each core
/// allocates and frees on its own thread.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Runs one command of the command line.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve(serve) => {
            init_logging(serve.log_format, serve.log_filter.as_deref());
            runtime::serve(*serve)
        }
        Command::Migrate(migrate) => {
            init_logging(LogFormat::Auto, None);
            runtime::migrate(&migrate.database)
        }
        Command::Token(token) => {
            let Some(secret) = token.secret.jwt_secret else {
                anyhow::bail!("set --jwt-secret or GAVEL_JWT_SECRET to the secret the server uses");
            };
            let keys = auth::Keys::new(secret.as_bytes())?;
            let (token, _) = keys.mint(token.sub, token.role, token.ttl);
            println!("{token}");
            Ok(())
        }
    }
}

/// Logs to standard error: JSON for machines, human-readable on a terminal. The
/// filter is `filter`, else `RUST_LOG`, else `info`.
pub fn init_logging(format: LogFormat, filter: Option<&str>) {
    use tracing_subscriber::EnvFilter;
    let filter = filter
        .and_then(|f| EnvFilter::try_new(f).ok())
        .or_else(|| EnvFilter::try_from_default_env().ok())
        .unwrap_or_else(|| EnvFilter::new("info"));
    let json = match format {
        LogFormat::Json => true,
        LogFormat::Pretty => false,
        LogFormat::Auto => !std::io::stderr().is_terminal(),
    };
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    let _ = if json { builder.json().try_init() } else { builder.try_init() };
}

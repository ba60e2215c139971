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
//! Dependencies point downwards only: `runtime` → `http` → `core` → `cache` →
//! `events` → `db` → `domain`; `config`, `auth`, `cpu`, `throttle`, `storage` and `metrics` are leaves anything may use.
//!
//! - [`runtime`]: the per-core engine (pinning, runtimes, listeners, shutdown), the
//!   admin listener (`/metrics`) and the `serve` / `migrate` commands.
//! - [`http`]: axum routers, one module per resource; problem+json errors;
//!   extractors; the OpenAPI document the routers' attributes generate.
//! - [`core`]: one core's state — pool, caches, batchers, limits.
//! - [`cache`]: per-core caches and the LISTEN/NOTIFY applier.
//! - [`events`]: per-core event streams (SSE), fed by the same notifications.
//! - [`db`]: queries per resource, the generic write batcher, the bid
//!   announcer, the one decoder of what the database announces (`db::notice`),
//!   the embedded PostgreSQL, migrations, finding the primary among several
//!   hosts (`db::target`) and the read replicas (`db::replicas`).
//! - [`domain`]: pure rules — money, auction lifecycle, bid checks, accounts, stock.
//! - [`config`]: the clap command line; [`auth`]: tokens, roles, password hashes;
//!   [`metrics`]: metric names and per-core handles;
//!   [`throttle`]: the rate limits, the one state the cores share on a request path;
//!   [`storage`]: the object store that holds item images.

pub mod auth;
pub mod cache;
pub mod config;
pub mod core;
pub mod db;
pub mod domain;
pub mod events;
pub mod http;
pub mod metrics;
pub mod runtime;
pub mod storage;
pub mod throttle;

use std::io::IsTerminal;

use config::{Cli, Command, LogFormat};

/// mimalloc: per-thread heaps suit a thread-per-core server, where each core
/// allocates and frees on its own thread.
///
/// Built with `no_thp` (no `madvise(MADV_HUGEPAGE)` on its arenas; see
/// [`without_huge_pages`] for why) and run with [`purge_at_once`].
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// `mi_option_purge_delay`'s place in mimalloc's `mi_option_t` (the same in
/// mimalloc 2 and 3); the bindings leave the constant out "for stability reasons".
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Makes mimalloc give freed pages back to the kernel at once instead of after
/// 1 s (mimalloc 3's default `purge_delay`). Password hashes free 7 MiB each, and
/// load bursts free connection buffers; returning them at once keeps them out of
/// the next burst's peak.
///
/// Measured on `gavel serve --cores 2` against a private PostgreSQL, `gavel-loadtest`
/// seed (16 bidders) then 3–4 s runs of auction-read, bid-storm and mixed at 64
/// connections, alternating the two settings (via `MIMALLOC_PURGE_DELAY`), five runs
/// each: peak RSS (VmHWM) 21.8–27.4 MiB (mean 24.1) with the default, 19.6–25.4
/// (mean 22.9) purging at once; RSS after the runs 14.2–17.2 MiB against 12.8–13.3.
/// The cost, from `perf stat -e syscalls:sys_enter_madvise -p PID` over a 4 s mixed
/// run at 17–22K requests/s: 12 `madvise` calls with the default, 521 with
/// `MIMALLOC_PURGE_DELAY=0`, 88 with this function (set after mimalloc's start, so
/// it governs what is freed from then on) — at most some 130 a second; requests/s
/// within the runs' noise (reads 72–89K either way). A `loadtest/compare
/// --duration 2s` run with both changes here and the 7 MiB password hashes: peak
/// RSS 21.2 MiB, against 60.3 before.
fn purge_at_once() {
    // SAFETY: `mi_option_set` is not thread-safe; `run` calls this first, before it
    // starts any thread.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, 0) };
}

/// Runs one command of the command line.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    without_huge_pages();
    purge_at_once();
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

/// Turns transparent huge pages off for this process. mimalloc asks for them
/// (`madvise(MADV_HUGEPAGE)` on its arenas), and a 2 MiB page is resident in full
/// once any byte of it is touched: an idle `gavel serve --cores 2` held 18 MiB of
/// huge pages, 26 MiB resident in all; without them it holds 10.4–10.8 MiB. Measured
/// with VmRSS and `AnonHugePages` (`/proc/PID/smaps_rollup`) once `/ready` answered,
/// THP `madvise` (Debian's default). This flag covers every later page fault, on
/// every thread, whatever the host's THP mode, but not what was touched before
/// `main`: alone it left 6 MiB of huge pages (17 MiB resident). mimalloc's `no_thp`
/// build stops its `madvise` from the start, which is all a `madvise` host needs;
/// the flag is for hosts in THP `always` mode. Together they do what
/// `MIMALLOC_ALLOW_THP=0` does, without asking operators for it.
fn without_huge_pages() {
    #[cfg(target_os = "linux")]
    if let Err(e) = nix::sys::prctl::set_thp_disable(true) {
        eprintln!("gavel: cannot turn transparent huge pages off ({e}); resident memory may be higher");
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

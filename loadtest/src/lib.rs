//! gavel-loadtest: the load generator gavel's figures are measured with.
//!
//! Thread-per-core like the server: one pinned thread per core, each with its own
//! current-thread runtime and its share of the keep-alive connections, and nothing
//! shared between threads while the clock runs. Closed loop finds the maximum
//! throughput; open loop (`--rate`) holds a fixed arrival rate and measures latency
//! from each request's scheduled send time, so stalls are not hidden (see
//! [`engine`]). Latencies go into HdrHistogram.
//!
//! ```text
//! gavel-loadtest seed --target URL [--auctions N] [--skus N] [--bidders N]
//! gavel-loadtest run SCENARIO --target URL [--duration 10s] [--connections C] [--rate R] [--json]
//!                   [--server-pid PID | --metrics-url URL]
//! gavel-loadtest watch --target URL [--streams 10000] [--auctions 100] [--bid-rate 2000] [--json]
//! ```
//!
//! Every run stops by itself after `--duration` or `--requests`, and sends only to
//! the target it is given. Each second of a run is one row of the report's `series`;
//! on a terminal, each is printed on stderr as it completes.
//!
//! # Layout
//! - [`http`]: the lean HTTP/1.1 client.
//! - [`engine`]: threads, connections, the closed and open loops.
//! - [`scenario`]: what each connection sends.
//! - [`series`]: the per-second series, progress lines and the server's memory.
//! - [`setup`]: accounts, tokens, seeding, finding the open auctions.
//! - [`stats`]: histograms, counts and the report.
//! - [`ticker`]: the open loop's precise per-thread timer.
//! - [`watch`]: the `watch` command: event streams held open while bids run.

pub mod engine;
pub mod http;
pub mod scenario;
pub mod series;
pub mod setup;
pub mod stats;
pub mod ticker;
pub mod watch;

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand};
use tokio::task::LocalSet;

use crate::http::Target;
use crate::scenario::{Churn, Lot, Mix, Scenario, Workload};
use crate::series::Rss;
use crate::stats::{Kind, Report, Shape};

#[derive(Debug, Parser)]
#[command(name = "gavel-loadtest", version, about = "Load generator for gavel")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create what the scenarios need: a seller, bidders, open auctions and stocked
    /// skus. Idempotent: run it as often as you like.
    Seed(SeedArgs),
    /// Drive one scenario against the target and report throughput and latency.
    Run(Box<RunArgs>),
    /// Hold event streams open while bids run; report delivery and what the
    /// streams cost.
    Watch(Box<watch::WatchArgs>),
}

#[derive(Debug, Args)]
pub struct SeedArgs {
    /// Base URL of the gavel to seed, e.g. http://127.0.0.1:8080.
    #[arg(long, env = "GAVEL_TARGET")]
    pub target: String,
    /// Open auctions the load-test seller should have.
    #[arg(long, default_value_t = 1000)]
    pub auctions: usize,
    /// Skus lt-1..lt-N to stock.
    #[arg(long, default_value_t = 1000)]
    pub skus: u32,
    /// Bidder accounts to register.
    #[arg(long, default_value_t = 16)]
    pub bidders: usize,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    pub scenario: Scenario,
    /// Base URL of the server to drive, e.g. http://127.0.0.1:8080. Nothing else is
    /// ever sent to. Repeat it (or list them comma-separated) for several
    /// instances of one gavel: the connections are spread over them, a refused
    /// connection moves to the next, and a request reset before its response is
    /// sent again there (counted as retried, not failed).
    #[arg(long, env = "GAVEL_TARGET", value_delimiter = ',', required = true)]
    pub target: Vec<String>,
    /// How long the run lasts.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub duration: Duration,
    /// Stop after this many requests, if that comes before the duration.
    #[arg(long)]
    pub requests: Option<u64>,
    /// Keep-alive connections, spread over the threads.
    #[arg(long, default_value_t = 64)]
    pub connections: usize,
    /// Threads, each pinned to a core with its own runtime. Unset: one per core.
    #[arg(long)]
    pub threads: Option<usize>,
    /// Open loop: requests per second in all, latency measured from each request's
    /// scheduled time. Unset: closed loop, as fast as responses come back.
    #[arg(long)]
    pub rate: Option<f64>,
    /// How long one request may take before it counts as a timeout.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
    /// Use at most this many of the open auctions (reads and bids).
    #[arg(long, default_value_t = 1000)]
    pub auctions: usize,
    /// Use these auction ids (`FIRST-LAST`) instead of listing the open ones: for
    /// targets that are not gavel, e.g. a reference server answering any path.
    #[arg(long, value_parser = parse_id_range)]
    pub auction_ids: Option<(i64, i64)>,
    /// Send every bid to one of the first N auctions: small N means contention on
    /// the same rows. 0: spread over all of them.
    #[arg(long, default_value_t = 0)]
    pub hot_auctions: usize,
    /// Skus lt-1..lt-N that reads and orders use (as seeded).
    #[arg(long, default_value_t = 1000)]
    pub skus: u32,
    /// Bidder accounts the connections bid and order as, in turn.
    #[arg(long, default_value_t = 16)]
    pub bidders: usize,
    /// Weights of the mixed scenario.
    #[arg(long, default_value = "auction-read=75,bid=15,inventory-read=7,order=3")]
    pub mix: Mix,
    /// Churn: how long before it opens an auction is created.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    pub churn_lead: Duration,
    /// Churn: how long an auction stays open. 5 s at --rate 40 keeps some 200 of
    /// them open at a time, and opens and closes 24,000 in 10 minutes.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub churn_lifetime: Duration,
    /// The server's token secret: with it, bidder tokens are minted here; without it,
    /// the bidders log in through the API.
    #[arg(long, env = "GAVEL_JWT_SECRET", hide_env_values = true)]
    pub secret: Option<String>,
    /// Do not pin threads to cores.
    #[arg(long)]
    pub no_pin: bool,
    /// Print the report as one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
    /// The server's process, on this machine: its resident memory (`VmRSS` of
    /// /proc/PID/status) goes into each second of the series. Exact and cheap;
    /// preferred over --metrics-url where the PID is known.
    #[arg(long, conflicts_with = "metrics_url")]
    pub server_pid: Option<u32>,
    /// A Prometheus endpoint of the server, e.g. gavel's admin
    /// http://127.0.0.1:9100/metrics: its `process_resident_memory_bytes` goes into
    /// each second of the series. For a server whose PID is not at hand.
    #[arg(long, value_parser = Rss::metrics)]
    pub metrics_url: Option<Rss>,
}

fn parse_id_range(s: &str) -> Result<(i64, i64), String> {
    let (a, b) = s.split_once('-').ok_or("expected FIRST-LAST")?;
    let (a, b) = (a.parse::<i64>().map_err(|e| e.to_string())?, b.parse::<i64>().map_err(|e| e.to_string())?);
    if a < 1 || b < a {
        return Err("expected 1 <= FIRST <= LAST".into());
    }
    Ok((a, b))
}

/// Runs one command line.
pub fn main(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Seed(args) => {
            let plan = setup::SeedPlan {
                target: Target::parse(&args.target)?,
                auctions: args.auctions,
                skus: args.skus,
                bidders: args.bidders,
            };
            let seeded = block_on_local(setup::seed(&plan))?;
            eprintln!(
                "seeded {}: seller {} has {} open auctions ({} created), {} skus stocked, {} bidders",
                plan.target.authority,
                seeded.seller_id,
                seeded.auctions_found + seeded.auctions_created,
                seeded.auctions_created,
                seeded.skus,
                seeded.bidders
            );
            Ok(())
        }
        Command::Watch(args) => {
            let report = watch::watch(&args)?;
            if args.json {
                println!("{}", serde_json::to_string(&report)?);
            } else {
                print!("{}", report.render());
            }
            Ok(())
        }
        Command::Run(args) => {
            let report = run(&args)?;
            if args.json {
                println!("{}", serde_json::to_string(&report)?);
            } else {
                print!("{}", report.render());
            }
            Ok(())
        }
    }
}

/// Prepares the workload `args` asks for, drives it and reports.
pub fn run(args: &RunArgs) -> anyhow::Result<Report> {
    let targets = args.target.iter().map(|t| Target::parse(t)).collect::<anyhow::Result<Vec<_>>>()?;
    let kinds = args.scenario.kinds(&args.mix);
    // What the requests refer to is the same on every instance: read from the first.
    let work = block_on_local(prepare(args, &targets[0], &kinds))?;
    let plan = engine::Plan {
        targets,
        connections: args.connections,
        threads: args.threads.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get())),
        duration: args.duration,
        requests: args.requests,
        rate: args.rate,
        timeout: args.timeout,
        pin: !args.no_pin,
        seed: rand::random(),
        rss: args.server_pid.map(Rss::Pid).or_else(|| args.metrics_url.clone()),
        progress: series::stderr_is_terminal(),
    };
    let outcome = engine::run(&plan, Arc::new(work))?;
    let shape = Shape {
        scenario: args.scenario.name().to_owned(),
        rate: args.rate,
        connections: args.connections,
        threads: outcome.threads,
    };
    let mut report = Report::new(shape, &outcome.recorder, outcome.elapsed);
    if let Some(kept) = outcome.schedule.filter(|k| k.behind) {
        eprintln!("gavel-loadtest: warning: {}", kept.warning());
    }
    report.schedule = outcome.schedule;
    report.rss_source = plan.rss.as_ref().map(Rss::name);
    report.series = outcome.series;
    Ok(report)
}

/// Finds what the scenario's requests refer to, before the clock starts.
async fn prepare(args: &RunArgs, target: &Target, kinds: &[(Kind, u32)]) -> anyhow::Result<Workload> {
    let uses = |k: Kind| kinds.iter().any(|(kind, _)| *kind == k);
    let mut api = setup::Api::new(target.clone());
    let bids = uses(Kind::Bid);

    let mut lots = Vec::new();
    if uses(Kind::AuctionRead) || bids {
        lots = match args.auction_ids {
            Some((first, last)) if bids => setup::lots(&mut api, &(first..=last).collect::<Vec<_>>()).await?,
            Some((first, last)) => (first..=last).map(|id| Lot { id, min_next_bid: 1 }).collect(),
            None => setup::open_auctions(&mut api, args.auctions).await?.into_iter().map(|a| a.lot).collect(),
        };
        if lots.is_empty() {
            bail!(
                "{} has no open auctions: run `gavel-loadtest seed --target {}` first",
                target.authority,
                args.target[0]
            );
        }
    }
    if uses(Kind::InventoryRead) || uses(Kind::Order) {
        anyhow::ensure!(args.skus > 0, "--skus must be at least 1");
        let first = format!("/api/inventory/{}", scenario::sku_name(1));
        let (status, _) = api.call("GET", &first, None, None).await?;
        if status != 200 {
            bail!(
                "{} has no sku {} (got {status}): run `gavel-loadtest seed` first",
                target.authority,
                scenario::sku_name(1)
            );
        }
    }
    let keys = args.secret.as_deref().map(setup::Minter::new);
    // Tokens outlive the run by an hour whatever the server's session lifetime.
    let ttl = args.duration + Duration::from_secs(3600);
    let mut tokens = Vec::new();
    if bids || uses(Kind::Order) {
        anyhow::ensure!(args.bidders > 0, "--bidders must be at least 1");
        tokens =
            setup::bidders(&mut api, args.bidders, keys.as_ref(), ttl).await?.into_iter().map(|a| a.token).collect();
    }
    let work = Workload::new(kinds.to_vec(), lots, args.hot_auctions, args.skus, tokens);
    if !uses(Kind::CreateAuction) {
        return Ok(work);
    }
    anyhow::ensure!(!args.churn_lifetime.is_zero(), "--churn-lifetime must be above zero");
    let seller = setup::account(&mut api, &setup::seller_email(), setup::Role::Seller, keys.as_ref(), ttl).await?;
    Ok(work.with_churn(Churn { seller: seller.token, lead: args.churn_lead, lifetime: args.churn_lifetime }))
}

/// Runs set-up work on a current-thread runtime inside a `LocalSet`.
fn block_on_local<T>(future: impl std::future::Future<Output = anyhow::Result<T>>) -> anyhow::Result<T> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().context("cannot start a runtime")?;
    LocalSet::new().block_on(&rt, future)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auction_id_ranges_are_first_to_last() {
        assert_eq!(parse_id_range("1-1000"), Ok((1, 1000)));
        assert_eq!(parse_id_range("7-7"), Ok((7, 7)));
        for bad in ["", "5", "5-", "-5", "0-10", "10-5", "a-b", "1-2-3"] {
            assert!(parse_id_range(bad).is_err(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn command_lines_refuse_what_a_run_cannot_do() {
        let parse = |args: &[&str]| Cli::try_parse_from([&["gavel-loadtest"], args].concat());
        assert!(parse(&["run", "auction-read", "--target", "http://127.0.0.1:1"]).is_ok());
        assert!(parse(&["run", "bids", "--target", "http://127.0.0.1:1"]).is_err(), "unknown scenario");
        assert!(parse(&["run", "auction-read", "--target", "t", "--duration", "soon"]).is_err());
        assert!(parse(&["run", "mixed", "--target", "t", "--mix", "bid"]).is_err());
        assert!(parse(&["run", "auction-read", "--target", "t", "--connections", "-1"]).is_err());
        let url = "http://127.0.0.1:9100/metrics";
        assert!(parse(&["run", "mixed", "--target", "t", "--server-pid", "42"]).is_ok());
        assert!(parse(&["run", "churn", "--target", "t", "--rate", "40", "--churn-lifetime", "5s"]).is_ok());
        assert!(parse(&["run", "churn", "--target", "t", "--churn-lead", "soon"]).is_err());
        assert!(parse(&["run", "mixed", "--target", "t", "--metrics-url", url]).is_ok());
        assert!(parse(&["run", "mixed", "--target", "t", "--metrics-url", "127.0.0.1:9100"]).is_err());
        assert!(parse(&["run", "mixed", "--target", "t", "--server-pid", "42", "--metrics-url", url]).is_err());
    }
}

//! `gavel-loadtest watch`: many event streams open while bids run.
//!
//! ```text
//! gavel-loadtest watch --target URL [--streams 10000] [--auctions 100] [--bid-rate 2000]
//!                      [--duration 20s] [--storm 5s] [--http2-streams N] [--metrics-url URL]
//!                      [--json]
//! ```
//!
//! In order, on the first `--auctions` open auctions:
//! 1. a closed-loop bid storm without streams (`--storm`, `--storm-connections`);
//! 2. `--streams` event streams opened, spread evenly over the auctions
//!    (`GET /api/auctions/{id}/events`), and the server's RSS per stream;
//! 3. open-loop bids at `--bid-rate` for `--duration`, while every stream is read:
//!    each event's delivery time is measured from its bid's *send* — decoded from
//!    the amount, which rises one unit per microsecond since the run's epoch (see
//!    `scenario::Workload`) — so it includes the bid's own batching and commit and
//!    is an upper bound of commit-to-arrival;
//! 4. the same bid storm again, with every stream still open;
//! 5. after the bids, each stream's last version against its auction's final one.
//!
//! Each stream has an HTTP/1.1 connection of its own, or with `--http2-streams N`
//! N streams share one HTTP/2 connection (prior knowledge), as behind a proxy
//! that multiplexes its clients' streams.
//!
//! With `--metrics-url` (gavel's admin `/metrics`) it also reports the server's
//! RSS, events coalesced, and gavel's own part of each event's delivery while the
//! bids ran: from the commit of its change to its frame's hand-off to the
//! connection, which gavel times from the commit itself
//! (`gavel_event_delivery_seconds`). Commit-to-arrival is that part plus the
//! write and the generator's read; the delivery from the bid's send bounds it
//! from above.

use std::collections::BTreeMap;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Args;
use hdrhistogram::Histogram;
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tokio::task::LocalSet;

use crate::http::{Target, parse_fields, write_request};
use crate::scenario::{Lot, Workload};
use crate::series::samples;
use crate::stats::{Latency, Report};
use crate::{Cli, Command, RunArgs, block_on_local, engine, setup};

#[derive(Debug, Args)]
pub struct WatchArgs {
    #[arg(long, env = "GAVEL_TARGET")]
    pub target: String,
    /// Event streams to hold open.
    #[arg(long, default_value_t = 10_000)]
    pub streams: usize,
    /// Open auctions watched and bid on (the first ones listed).
    #[arg(long, default_value_t = 100)]
    pub auctions: usize,
    /// Bids per second sent while the streams are measured (open loop).
    #[arg(long, default_value_t = 2000.0)]
    pub bid_rate: f64,
    /// How long the streams are measured.
    #[arg(long, default_value = "20s", value_parser = humantime::parse_duration)]
    pub duration: Duration,
    /// Each closed-loop bid storm, before the streams open and while they are open.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub storm: Duration,
    #[arg(long, default_value_t = 64)]
    pub storm_connections: usize,
    /// Connections of the open-loop bids.
    #[arg(long, default_value_t = 64)]
    pub bid_connections: usize,
    #[arg(long, default_value_t = 16)]
    pub bidders: usize,
    /// Event streams per HTTP/2 connection (prior knowledge); 0 gives each stream
    /// an HTTP/1.1 connection of its own.
    #[arg(long, default_value_t = 0)]
    pub http2_streams: usize,
    /// Threads reading streams, each pinned (like the load threads) to a core.
    #[arg(long)]
    pub threads: Option<usize>,
    #[arg(long, env = "GAVEL_JWT_SECRET", hide_env_values = true)]
    pub secret: Option<String>,
    /// gavel's admin `/metrics`, for its RSS, coalesced events and its own part
    /// of each event's delivery.
    #[arg(long)]
    pub metrics_url: Option<String>,
    #[arg(long)]
    pub json: bool,
}

/// What a watch run measured.
#[derive(Debug, Serialize)]
pub struct WatchReport {
    pub streams: usize,
    pub auctions: usize,
    pub streams_open_secs: f64,
    /// Server RSS before the streams opened and once they were all open and idle.
    pub rss_before_bytes: Option<f64>,
    pub rss_with_streams_bytes: Option<f64>,
    pub rss_per_stream_bytes: Option<f64>,
    pub storm_without_streams: Storm,
    pub storm_with_streams: Storm,
    /// Accepted bids/s with the streams open ÷ without.
    pub storm_ratio: f64,
    pub bids: Storm,
    /// Events received while the bids ran, per second.
    pub events_per_sec: f64,
    /// From a bid's send to each stream's receipt of its state, in microseconds.
    pub delivery_us: Delivery,
    /// Events the server replaced with newer ones for slow streams (`--metrics-url`).
    pub coalesced: Option<f64>,
    /// gavel's own part of the delivery, from each change's commit (`--metrics-url`).
    pub from_commit: Option<FromCommit>,
    /// Streams whose last event was their auction's final version.
    pub streams_with_final_state: usize,
    /// Streams that ended or failed before the run did.
    pub streams_lost: usize,
}

#[derive(Debug, Default, Serialize)]
pub struct Storm {
    pub requests_per_sec: f64,
    pub accepted_per_sec: f64,
    pub statuses: BTreeMap<String, u64>,
    /// From each bid's send (its due time, in the open-loop phase) to its answer.
    pub latency_us: Latency,
}

impl Storm {
    fn of(report: &Report) -> Storm {
        let accepted = report.statuses.get("201").copied().unwrap_or(0) as f64;
        Storm {
            requests_per_sec: report.requests_per_sec,
            accepted_per_sec: accepted / report.duration_secs.max(1e-9),
            statuses: report.statuses.clone(),
            latency_us: report.latency_us,
        }
    }
}

#[derive(Debug, Default, Serialize)]
pub struct Delivery {
    pub count: u64,
    pub p50: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
}

/// gavel's part of delivering events while the bids ran: from each change's
/// commit to its frame's hand-off to the connection, as gavel's
/// `gavel_event_delivery_seconds` histogram counted them (the difference of two
/// scrapes), so to the resolution of its buckets.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FromCommit {
    /// Events the histogram counted between the scrapes.
    pub events: f64,
    /// The share of them handed off within [`DELIVERY_TARGET_SECS`] of their commit.
    pub within_target: f64,
    /// The least bucket bound within which 99 % were handed off; `None` past the
    /// last finite one.
    pub p99_at_most_secs: Option<f64>,
}

impl FromCommit {
    /// What was counted between two readings of the same histogram's buckets
    /// ([`buckets`]); `None` if nothing was, or the readings do not match.
    fn between(before: &[(f64, f64)], after: &[(f64, f64)]) -> Option<FromCommit> {
        if before.len() != after.len() || before.iter().zip(after).any(|(b, a)| b.0 != a.0) {
            return None;
        }
        let counted: Vec<(f64, f64)> = before.iter().zip(after).map(|(b, a)| (a.0, a.1 - b.1)).collect();
        let events = counted.last().filter(|(le, _)| le.is_infinite())?.1;
        if events <= 0.0 {
            return None;
        }
        let within = |bound: f64| counted.iter().find(|(le, _)| *le == bound).map(|(_, n)| n / events);
        Some(FromCommit {
            events,
            within_target: within(DELIVERY_TARGET_SECS)?,
            p99_at_most_secs: counted.iter().find(|(le, n)| le.is_finite() && *n >= 0.99 * events).map(|(le, _)| *le),
        })
    }

    fn render(&self) -> String {
        let p99 = self.p99_at_most_secs.map_or("past the last bucket".to_owned(), |s| format!("within {} ms", s * 1e3));
        format!(
            "{:.2} % within {} ms, p99 {p99} ({:.0} events)",
            self.within_target * 100.0,
            DELIVERY_TARGET_SECS * 1e3,
            self.events
        )
    }
}

/// The delivery time the watch scenario is held to: 50 ms from the commit.
pub const DELIVERY_TARGET_SECS: f64 = 0.05;

/// gavel's histogram of delivery from the commit.
const DELIVERY_FAMILY: &str = "gavel_event_delivery_seconds";
/// gavel's count of events replaced by newer ones for slow streams.
const COALESCED: &str = "gavel_events_coalesced_total";
/// The server's resident memory.
const RSS: &str = "process_resident_memory_bytes";

/// The cumulative buckets of histogram `family` in Prometheus text, summed over
/// its label sets (gavel's cores): `(le, count)`, by bound.
fn buckets(text: &str, family: &str) -> Vec<(f64, f64)> {
    let mut sums: Vec<(f64, f64)> = Vec::new();
    for (labels, count) in samples(text, &format!("{family}_bucket")) {
        let Some(le) = labels.split(',').find_map(|l| l.strip_prefix("le=\"")?.strip_suffix('"')) else { continue };
        let le = if le == "+Inf" { f64::INFINITY } else { le.parse().unwrap_or(f64::NAN) };
        if le.is_nan() {
            continue;
        }
        match sums.iter_mut().find(|(b, _)| *b == le) {
            Some((_, sum)) => *sum += count,
            None => sums.push((le, count)),
        }
    }
    sums.sort_by(|a, b| a.0.total_cmp(&b.0));
    sums
}

/// What every stream-reading thread shares: when to record and when to stop.
struct Control {
    recording: AtomicBool,
    /// Turns true when the readers are to stop (a channel, so that an idle reader
    /// wakes for it without a timer per read).
    stop: tokio::sync::watch::Sender<bool>,
    opened: AtomicUsize,
    /// Why a stream could not be opened, for the first that could not.
    refused: std::sync::Mutex<Option<String>>,
    /// The workload's epoch: bid amounts rise one per microsecond from it.
    epoch: Instant,
}

/// One stream's part: which auction, the lot's base amount, the last version.
struct Watcher {
    auction: i64,
    base: i64,
    last_version: i64,
    lost: bool,
}

/// What one stream-reading thread measured.
struct ThreadResult {
    delivery: Histogram<u64>,
    events: u64,
    watchers: Vec<Watcher>,
}

pub fn watch(args: &WatchArgs) -> anyhow::Result<WatchReport> {
    anyhow::ensure!(args.streams > 0 && args.auctions > 0, "--streams and --auctions must be at least 1");
    let target = Target::parse(&args.target)?;
    let run_args = bid_run_args(args)?;
    let kinds = run_args.scenario.kinds(&run_args.mix);
    let work = Arc::new(block_on_local(crate::prepare(&run_args, &target, &kinds))?);
    let lots: Vec<Lot> = work.lots().to_vec();
    let threads = args.threads.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get())).max(1);

    eprintln!("watch: bid storm without streams ({:?})", args.storm);
    let without = Storm::of(&storm(&target, &work, args.storm_connections, args.storm, None, threads)?);

    let rss_before = scrape(args).and_then(|m| sum(&m, RSS));
    eprintln!("watch: opening {} streams on {} auctions", args.streams, lots.len());
    let control = Arc::new(Control {
        recording: AtomicBool::new(false),
        stop: tokio::sync::watch::Sender::new(false),
        opened: AtomicUsize::new(0),
        refused: std::sync::Mutex::new(None),
        epoch: work.epoch(),
    });
    let opening = Instant::now();
    let readers = spawn_readers(&target, &lots, args, threads, &control)?;
    while control.opened.load(Ordering::Acquire) < args.streams {
        if let Some(why) = control.refused.lock().map_err(|_| anyhow::anyhow!("a stream task panicked"))?.take() {
            bail!("a stream could not be opened: {why:#}");
        }
        if readers.iter().any(|h| h.is_finished()) {
            bail!("a stream reader stopped while opening streams");
        }
        anyhow::ensure!(opening.elapsed() < Duration::from_secs(120), "the streams did not open within 2 minutes");
        std::thread::sleep(Duration::from_millis(50));
    }
    let streams_open_secs = opening.elapsed().as_secs_f64();
    std::thread::sleep(Duration::from_secs(1));
    let rss_with = scrape(args).and_then(|m| sum(&m, RSS));

    eprintln!("watch: {} bids/s for {:?} with every stream read", args.bid_rate, args.duration);
    let before = scrape(args);
    control.recording.store(true, Ordering::Release);
    let bids = storm(&target, &work, args.bid_connections, args.duration, Some(args.bid_rate), threads)?;
    // Late events of the last bids still count.
    std::thread::sleep(Duration::from_millis(500));
    control.recording.store(false, Ordering::Release);
    let after = scrape(args);

    eprintln!("watch: bid storm with the streams open ({:?})", args.storm);
    let with = Storm::of(&storm(&target, &work, args.storm_connections, args.storm, None, threads)?);

    // Every change announced and delivered; then each auction's final version.
    std::thread::sleep(Duration::from_secs(2));
    let finals = block_on_local(final_versions(&target, &lots))?;
    control.stop.send_replace(true);
    let mut delivery = histogram();
    let mut events = 0;
    let mut with_final = 0;
    let mut lost = 0;
    for handle in readers {
        let result = handle.join().map_err(|_| anyhow::anyhow!("a stream reader panicked"))??;
        delivery.add(&result.delivery).context("merging histograms")?;
        events += result.events;
        for w in &result.watchers {
            lost += usize::from(w.lost);
            with_final += usize::from(finals.get(&w.auction) == Some(&w.last_version));
        }
    }
    let quantile = |q: f64| delivery.value_at_quantile(q) as f64;
    Ok(WatchReport {
        streams: args.streams,
        auctions: lots.len(),
        streams_open_secs,
        rss_before_bytes: rss_before,
        rss_with_streams_bytes: rss_with,
        rss_per_stream_bytes: rss_before.zip(rss_with).map(|(b, w)| (w - b) / args.streams as f64),
        storm_ratio: with.accepted_per_sec / without.accepted_per_sec.max(1e-9),
        storm_without_streams: without,
        storm_with_streams: with,
        events_per_sec: events as f64 / (bids.duration_secs + 0.5),
        bids: Storm::of(&bids),
        delivery_us: Delivery {
            count: delivery.len(),
            p50: quantile(0.5),
            p99: quantile(0.99),
            p999: quantile(0.999),
            max: delivery.max() as f64,
        },
        coalesced: before
            .as_deref()
            .zip(after.as_deref())
            .and_then(|(b, a)| Some(sum(a, COALESCED)? - sum(b, COALESCED)?)),
        from_commit: before
            .as_deref()
            .zip(after.as_deref())
            .and_then(|(b, a)| FromCommit::between(&buckets(b, DELIVERY_FAMILY), &buckets(a, DELIVERY_FAMILY))),
        streams_with_final_state: with_final,
        streams_lost: lost,
    })
}

impl WatchReport {
    pub fn render(&self) -> String {
        let mib = |b: Option<f64>| b.map_or("-".to_owned(), |b| format!("{:.1} MiB", b / 1048576.0));
        format!(
            "watch: {} streams on {} auctions (opened in {:.1} s)\n\
             server RSS: {} before, {} with the streams open, {} a stream\n\
             bid storm: {:.0} accepted/s without streams, {:.0} with ({:.2}x)\n\
             bids while read: {:.0} requests/s, {:.0} accepted/s, answered in p50 {:.0}, p99 {:.0} us\n\
             events: {:.0}/s received, {} coalesced by the server\n\
             delivery from the bid's send (us): p50 {:.0}, p99 {:.0}, p99.9 {:.0}, max {:.0} ({} events)\n\
             gavel's part, from the commit to the hand-off: {}\n\
             final state: {} of {} streams ({} lost)\n",
            self.streams,
            self.auctions,
            self.streams_open_secs,
            mib(self.rss_before_bytes),
            mib(self.rss_with_streams_bytes),
            self.rss_per_stream_bytes.map_or("-".to_owned(), |b| format!("{:.1} KiB", b / 1024.0)),
            self.storm_without_streams.accepted_per_sec,
            self.storm_with_streams.accepted_per_sec,
            self.storm_ratio,
            self.bids.requests_per_sec,
            self.bids.accepted_per_sec,
            self.bids.latency_us.p50,
            self.bids.latency_us.p99,
            self.events_per_sec,
            self.coalesced.map_or("-".to_owned(), |c| format!("{c:.0}")),
            self.delivery_us.p50,
            self.delivery_us.p99,
            self.delivery_us.p999,
            self.delivery_us.max,
            self.delivery_us.count,
            self.from_commit.as_ref().map_or(
                "- (needs --metrics-url, and gavel's histogram read before and after)".to_owned(),
                FromCommit::render
            ),
            self.streams_with_final_state,
            self.streams,
            self.streams_lost,
        )
    }
}

/// The bid-storm run the phases share (its auctions, bidders and amounts).
fn bid_run_args(args: &WatchArgs) -> anyhow::Result<RunArgs> {
    let auctions = args.auctions.to_string();
    let bidders = args.bidders.to_string();
    let mut argv = vec![
        "gavel-loadtest",
        "run",
        "bid-storm",
        "--target",
        &args.target,
        "--auctions",
        &auctions,
        "--bidders",
        &bidders,
    ];
    if let Some(secret) = &args.secret {
        argv.extend(["--secret", secret]);
    }
    match <Cli as clap::Parser>::try_parse_from(argv)?.command {
        Command::Run(run) => Ok(*run),
        _ => unreachable!("parsed a run"),
    }
}

fn storm(
    target: &Target,
    work: &Arc<Workload>,
    connections: usize,
    duration: Duration,
    rate: Option<f64>,
    threads: usize,
) -> anyhow::Result<Report> {
    let plan = engine::Plan {
        targets: vec![target.clone()],
        connections,
        threads,
        duration,
        requests: None,
        rate,
        timeout: Duration::from_secs(5),
        pin: true,
        seed: rand::random(),
        rss: None,
        progress: false,
    };
    let outcome = engine::run(&plan, Arc::clone(work))?;
    let shape = crate::stats::Shape { scenario: "bid-storm".into(), rate, connections, threads: outcome.threads };
    Ok(Report::new(shape, &outcome.recorder, outcome.elapsed))
}

/// gavel's metrics at `--metrics-url`, if given and readable.
fn scrape(args: &WatchArgs) -> Option<String> {
    crate::series::fetch_metrics(args.metrics_url.as_deref()?).ok()
}

/// The sum of series `name`'s samples (over gavel's cores), if it has any.
fn sum(text: &str, name: &str) -> Option<f64> {
    samples(text, name).map(|(_, value)| value).reduce(|a, b| a + b)
}

async fn final_versions(target: &Target, lots: &[Lot]) -> anyhow::Result<BTreeMap<i64, i64>> {
    let mut api = setup::Api::new(target.clone());
    let mut finals = BTreeMap::new();
    for lot in lots {
        let (status, body) = api.call("GET", &format!("/api/auctions/{}?consistent=true", lot.id), None, None).await?;
        anyhow::ensure!(status == 200, "GET auction {} answered {status}", lot.id);
        finals.insert(lot.id, body["version"].as_i64().context("an auction without a version")?);
    }
    Ok(finals)
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid histogram bounds")
}

type Reader = std::thread::JoinHandle<anyhow::Result<ThreadResult>>;

fn spawn_readers(
    target: &Target,
    lots: &[Lot],
    args: &WatchArgs,
    threads: usize,
    control: &Arc<Control>,
) -> anyhow::Result<Vec<Reader>> {
    let (streams, per_connection) = (args.streams, args.http2_streams);
    let cores = core_affinity::get_core_ids().unwrap_or_default();
    let mut handles = Vec::with_capacity(threads);
    for t in 0..threads {
        // Stream i watches lot i % lots: every auction gets the same share.
        let mine: Vec<Watcher> = (t..streams)
            .step_by(threads)
            .map(|i| {
                let lot = lots[i % lots.len()];
                Watcher { auction: lot.id, base: lot.min_next_bid, last_version: 0, lost: false }
            })
            .collect();
        let (target, control) = (target.clone(), Arc::clone(control));
        let core = cores.get(t % cores.len().max(1)).copied();
        let handle = std::thread::Builder::new().name(format!("watch-{t}")).spawn(move || {
            if let Some(core) = core {
                core_affinity::set_for_current(core);
            }
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            LocalSet::new().block_on(&rt, read_streams(target, mine, per_connection, control))
        })?;
        handles.push(handle);
    }
    Ok(handles)
}

/// Opens this thread's streams (a few hundred connecting at a time, so the
/// server's accept backlog keeps up) and reads each until told to stop. With
/// `per_connection` > 0, that many streams share each HTTP/2 connection, and one
/// task reads them all.
async fn read_streams(
    target: Target,
    watchers: Vec<Watcher>,
    per_connection: usize,
    control: Arc<Control>,
) -> anyhow::Result<ThreadResult> {
    const OPEN_AT_ONCE: usize = 256;
    let (target, opening) = (Rc::new(target), Rc::new(Semaphore::new(OPEN_AT_ONCE)));
    // One histogram for the thread's streams: one each (~140 KiB of counts apiece)
    // spread 10,000 streams' records over a gigabyte, and the record was the
    // reader's largest cost after h2 (`perf record`, 10,000 streams).
    let delivery = Rc::new(std::cell::RefCell::new(histogram()));
    let mut tasks = Vec::new();
    let mut watchers = watchers.into_iter().peekable();
    while watchers.peek().is_some() {
        let group: Vec<Watcher> = watchers.by_ref().take(per_connection.max(1)).collect();
        let (target, opening, control) = (Rc::clone(&target), Rc::clone(&opening), Arc::clone(&control));
        let delivery = Rc::clone(&delivery);
        tasks.push(tokio::task::spawn_local(async move {
            if per_connection > 0 {
                return read_connection(&target, group, &opening, &control, &delivery).await;
            }
            let mut watcher = group.into_iter().next().expect("a group of one");
            let permit = opening.acquire().await.expect("the semaphore is never closed");
            let (source, text) = open_stream(&target, watcher.auction).await.inspect_err(|e| refused(&control, e))?;
            drop(permit);
            control.opened.fetch_add(1, Ordering::AcqRel);
            let events = read_events(source, text, &mut watcher, &control, &delivery).await;
            watcher.lost = events.is_err();
            anyhow::Ok(vec![(watcher, events.unwrap_or(0))])
        }));
    }
    let mut result = ThreadResult { delivery: histogram(), events: 0, watchers: Vec::new() };
    for task in tasks {
        for (watcher, events) in task.await.context("a stream task failed")?? {
            result.events += events;
            result.watchers.push(watcher);
        }
    }
    result.delivery = delivery.replace(histogram());
    Ok(result)
}

/// Keeps the first reason a stream could not be opened.
fn refused(control: &Control, e: &anyhow::Error) {
    control.refused.lock().expect("never poisoned").get_or_insert_with(|| format!("{e:#}"));
}

/// Opens `watchers`' streams on one HTTP/2 connection and reads them all from
/// this one task until told to stop. A task per stream cost a wake and a poll of
/// the task per event on top of h2's own: with 10,000 streams, tokio's task
/// machinery and the per-read wait for the stop were a fifth of the reader's
/// time (`perf record`).
async fn read_connection(
    target: &Target,
    watchers: Vec<Watcher>,
    opening: &Semaphore,
    control: &Control,
    delivery: &std::cell::RefCell<Histogram<u64>>,
) -> anyhow::Result<Vec<(Watcher, u64)>> {
    use futures_util::StreamExt;
    use futures_util::stream::FuturesUnordered;

    let connection = H2Connection::default();
    let opened = futures_util::future::join_all(watchers.iter().map(|w| async {
        let _permit = opening.acquire().await.expect("the semaphore is never closed");
        connection.open(target, w.auction).await
    }))
    .await;
    let mut streams = Vec::with_capacity(watchers.len());
    let mut pending = FuturesUnordered::new();
    for (i, (mut watcher, opened)) in watchers.into_iter().zip(opened).enumerate() {
        let body = opened.inspect_err(|e| refused(control, e))?;
        control.opened.fetch_add(1, Ordering::AcqRel);
        let mut text = Vec::with_capacity(1024);
        pending.push(next_frame(i, body));
        let events = consume(&mut text, &mut watcher, control, delivery);
        streams.push((watcher, events, text));
    }
    let mut stop = control.stop.subscribe();
    if *stop.borrow_and_update() {
        return Ok(streams.into_iter().map(|(watcher, events, _)| (watcher, events)).collect());
    }
    let stopped = stop.changed();
    tokio::pin!(stopped);
    loop {
        tokio::select! {
            biased;
            _ = &mut stopped => break,
            next = pending.next() => {
                let Some((i, body, frame)) = next else { break };
                let (watcher, events, text) = &mut streams[i];
                match frame {
                    Some(Ok(frame)) => {
                        if let Ok(data) = frame.into_data() {
                            text.extend_from_slice(&data);
                            *events += consume(text, watcher, control, delivery);
                        }
                        pending.push(next_frame(i, body));
                    }
                    // Ended by the server, or failed.
                    _ => watcher.lost = true,
                }
            }
        }
    }
    Ok(streams.into_iter().map(|(watcher, events, _)| (watcher, events)).collect())
}

/// The next frame of stream `i`'s body, with the body back.
async fn next_frame(
    i: usize,
    mut body: hyper::body::Incoming,
) -> (usize, hyper::body::Incoming, Option<Result<hyper::body::Frame<bytes::Bytes>, hyper::Error>>) {
    use http_body_util::BodyExt;
    let frame = body.frame().await;
    (i, body, frame)
}

/// An HTTP/1.1 stream: its own connection, chunked.
struct Source {
    stream: TcpStream,
    chunks: Dechunk,
    buf: Vec<u8>,
}

impl Source {
    /// Waits for the stream's next bytes and appends them, undone of the chunked
    /// coding, to `text`.
    async fn read(&mut self, text: &mut Vec<u8>) -> anyhow::Result<()> {
        let n = self.stream.read(&mut self.buf).await?;
        anyhow::ensure!(n > 0, "the server ended a stream");
        self.chunks.feed(&self.buf[..n], text)
    }
}

/// Runs an HTTP/2 connection's driver as a task of this thread.
#[derive(Clone, Copy)]
struct LocalExec;

impl<F: std::future::Future + 'static> hyper::rt::Executor<F> for LocalExec {
    fn execute(&self, future: F) {
        tokio::task::spawn_local(future);
    }
}

type H2Sender = hyper::client::conn::http2::SendRequest<http_body_util::Empty<bytes::Bytes>>;

/// One HTTP/2 connection that several streams share, connected by the first of
/// them to need it.
#[derive(Default)]
struct H2Connection {
    sender: tokio::sync::OnceCell<H2Sender>,
}

impl H2Connection {
    async fn open(&self, target: &Target, auction: i64) -> anyhow::Result<hyper::body::Incoming> {
        let sender = self
            .sender
            .get_or_try_init(|| async {
                let stream = TcpStream::connect(target.addr).await.context("cannot connect for HTTP/2")?;
                stream.set_nodelay(true)?;
                let (sender, connection) = hyper::client::conn::http2::Builder::new(LocalExec)
                    .handshake(hyper_util::rt::TokioIo::new(stream))
                    .await
                    .context("HTTP/2 handshake")?;
                tokio::task::spawn_local(connection);
                anyhow::Ok(sender)
            })
            .await?;
        let request = hyper::Request::get(format!("http://{}/api/auctions/{auction}/events", target.authority))
            .body(http_body_util::Empty::new())?;
        let response = sender.clone().send_request(request).await.context("an HTTP/2 stream request")?;
        if response.status() != 200 {
            use http_body_util::BodyExt;
            let status = response.status();
            // A refusal is a short problem document; read it for the reason.
            let body = tokio::time::timeout(Duration::from_secs(1), response.into_body().collect()).await;
            let text = match body {
                Ok(Ok(body)) => String::from_utf8_lossy(&body.to_bytes()[..]).chars().take(300).collect(),
                _ => String::new(),
            };
            bail!("a stream was refused with {status}: {text}");
        }
        Ok(response.into_body())
    }
}

/// Connects and asks for `auction`'s events over HTTP/1.1; returns the stream and
/// the event text that came with the head.
async fn open_stream(target: &Target, auction: i64) -> anyhow::Result<(Source, Vec<u8>)> {
    let mut stream = TcpStream::connect(target.addr).await.context("cannot connect a stream")?;
    stream.set_nodelay(true)?;
    let mut request = Vec::with_capacity(128);
    write_request(&mut request, &target.authority, "GET", &format!("/api/auctions/{auction}/events"), None, None);
    stream.write_all(&request).await?;
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    loop {
        let n = stream.read(&mut chunk).await?;
        anyhow::ensure!(n > 0, "the server closed a stream before answering");
        buf.extend_from_slice(&chunk[..n]);
        if let Some(head) = parse_fields(&buf)? {
            anyhow::ensure!(
                head.status == 200,
                "a stream was refused with {}: {}",
                head.status,
                String::from_utf8_lossy(&buf[head.len..buf.len().min(head.len + 300)])
            );
            anyhow::ensure!(head.chunked, "a stream not chunked");
            let (mut chunks, mut text) = (Dechunk::default(), Vec::with_capacity(1024));
            chunks.feed(&buf[head.len..], &mut text)?;
            return Ok((Source { stream, chunks, buf: vec![0u8; 4096] }, text));
        }
        anyhow::ensure!(buf.len() < 16 * 1024, "a stream's head is too long");
    }
}

/// Reads one HTTP/1.1 stream until told to stop; returns the events it received
/// while recording.
async fn read_events(
    mut source: Source,
    mut text: Vec<u8>,
    watcher: &mut Watcher,
    control: &Control,
    delivery: &std::cell::RefCell<Histogram<u64>>,
) -> anyhow::Result<u64> {
    let mut events = 0;
    let mut stop = control.stop.subscribe();
    // Told before it began: what came with the stream's head still counts.
    let stopped_already = *stop.borrow_and_update();
    // One wait for the stop for the stream's whole life, not one per read.
    let stopped = stop.changed();
    tokio::pin!(stopped);
    loop {
        events += consume(&mut text, watcher, control, delivery);
        if stopped_already {
            return Ok(events);
        }
        tokio::select! {
            biased;
            _ = &mut stopped => return Ok(events),
            read = source.read(&mut text) => read?,
        }
    }
}

/// Takes the whole events out of `text`: the watcher's newest version, and each
/// one's delivery time while recording. Returns how many it recorded.
fn consume(
    text: &mut Vec<u8>,
    watcher: &mut Watcher,
    control: &Control,
    delivery: &std::cell::RefCell<Histogram<u64>>,
) -> u64 {
    let mut events = 0;
    let mut start = 0;
    while let Some(end) = memchr::memmem::find(&text[start..], b"\n\n").map(|at| start + at) {
        let frame = &text[start..end];
        if let Some(version) = field(frame, b"\nid: ").or_else(|| frame.strip_prefix(b"id: ").and_then(number)) {
            watcher.last_version = watcher.last_version.max(version);
            if control.recording.load(Ordering::Relaxed) {
                events += 1;
                if let Some(amount) = field(frame, b"\"high_bid\":") {
                    let sent_us = amount - watcher.base;
                    let now_us = control.epoch.elapsed().as_micros() as i64;
                    if sent_us >= 0 && now_us >= sent_us {
                        delivery.borrow_mut().saturating_record((now_us - sent_us) as u64);
                    }
                }
            }
        }
        start = end + 2;
    }
    text.drain(..start);
    events
}

/// The integer after `key` in `frame`, if any.
fn field(frame: &[u8], key: &[u8]) -> Option<i64> {
    let at = memchr::memmem::find(frame, key)?;
    number(&frame[at + key.len()..])
}

fn number(bytes: &[u8]) -> Option<i64> {
    let digits = bytes.iter().take_while(|b| b.is_ascii_digit()).count();
    std::str::from_utf8(&bytes[..digits]).ok()?.parse().ok()
}

/// Undoes HTTP/1.1 chunked transfer coding as bytes arrive.
#[derive(Default)]
struct Dechunk {
    /// Bytes of the current chunk still to come; `None` while reading a size line.
    left: Option<usize>,
    /// A size line (or a chunk's trailing CRLF) read so far.
    line: Vec<u8>,
    /// A chunk's trailing CRLF still to skip.
    crlf: usize,
}

impl Dechunk {
    fn feed(&mut self, mut input: &[u8], out: &mut Vec<u8>) -> anyhow::Result<()> {
        while !input.is_empty() {
            if self.crlf > 0 {
                let skip = self.crlf.min(input.len());
                self.crlf -= skip;
                input = &input[skip..];
                continue;
            }
            match self.left {
                Some(n) => {
                    let take = n.min(input.len());
                    out.extend_from_slice(&input[..take]);
                    input = &input[take..];
                    if take == n {
                        self.left = None;
                        self.crlf = 2;
                    } else {
                        self.left = Some(n - take);
                    }
                }
                None => {
                    let Some(nl) = input.iter().position(|b| *b == b'\n') else {
                        self.line.extend_from_slice(input);
                        return Ok(());
                    };
                    self.line.extend_from_slice(&input[..=nl]);
                    input = &input[nl + 1..];
                    let size = match httparse::parse_chunk_size(&self.line) {
                        Ok(httparse::Status::Complete((_, size))) => size,
                        _ => bail!("a bad chunk size line {:?}", String::from_utf8_lossy(&self.line)),
                    };
                    self.line.clear();
                    anyhow::ensure!(size > 0, "the stream ended");
                    self.left = Some(usize::try_from(size)?);
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_are_undone_whatever_the_reads_split() {
        let wire = b"1b\r\nevent: auction\nid: 7\ndata: \r\n4\r\n{}\n\n\r\n";
        for split in 1..wire.len() {
            let mut d = Dechunk::default();
            let mut out = Vec::new();
            d.feed(&wire[..split], &mut out).unwrap();
            d.feed(&wire[split..], &mut out).unwrap();
            assert_eq!(out, b"event: auction\nid: 7\ndata: {}\n\n", "split at {split}");
        }
        assert!(Dechunk::default().feed(b"0\r\n\r\n", &mut Vec::new()).is_err(), "the last chunk ends it");
    }

    #[test]
    fn gavels_part_is_counted_between_two_scrapes_over_every_core() {
        // Each core's cumulative counts within 25 ms, 50 ms, 100 ms and in all.
        let scrape = |counts: [u64; 4]| {
            let mut text = String::from("# TYPE gavel_event_delivery_seconds histogram\n");
            for core in ["0", "1"] {
                for (le, n) in ["0.025", "0.05", "0.1", "+Inf"].into_iter().zip(counts) {
                    // A label whose name ends in `le` before it, to be told apart.
                    text +=
                        &format!("gavel_event_delivery_seconds_bucket{{core=\"{core}\",role=\"w\",le=\"{le}\"}} {n}\n");
                }
                text += &format!("gavel_event_delivery_seconds_count{{core=\"{core}\"}} {}\n", counts[3]);
            }
            text += "gavel_events_sent_total{kind=\"auction\"} 7\n";
            // Bad lines: a bound that is no number, a value that is none.
            text += "gavel_event_delivery_seconds_bucket{core=\"0\",le=\"soon\"} 5\n";
            text += "gavel_event_delivery_seconds_bucket{core=\"0\",le=\"0.05\"} many\n";
            buckets(&text, DELIVERY_FAMILY)
        };
        let before = scrape([100, 110, 120, 120]);
        assert_eq!(before, [(0.025, 200.0), (0.05, 220.0), (0.1, 240.0), (f64::INFINITY, 240.0)]);
        // Between the scrapes, on each core: 1000 events, 985 within 25 ms, 995 within 50.
        let part = FromCommit::between(&before, &scrape([1085, 1105, 1120, 1120])).unwrap();
        assert_eq!(part.events, 2000.0);
        assert_eq!(part.within_target, 0.995);
        assert_eq!(part.p99_at_most_secs, Some(0.05), "98.5 % within 25 ms, 99.5 % within 50");
        let late = FromCommit::between(&before, &scrape([1085, 1095, 1105, 1120])).unwrap();
        assert_eq!(late.within_target, 0.985);
        assert_eq!(late.p99_at_most_secs, None, "1.5 % past the last finite bound");
        assert_eq!(FromCommit::between(&before, &before), None, "nothing counted");
        assert_eq!(FromCommit::between(&before, &before[1..]), None, "buckets that do not match");
    }

    #[test]
    fn versions_and_amounts_are_read_from_frames() {
        let frame = b"event: auction\nid: 42\ndata: {\"id\":3,\"high_bid\":1500,\"version\":42}";
        assert_eq!(field(frame, b"\nid: "), Some(42));
        assert_eq!(field(frame, b"\"high_bid\":"), Some(1500));
        assert_eq!(field(b"data: {\"high_bid\":null}", b"\"high_bid\":"), None);
    }

    #[test]
    fn whole_events_are_consumed_and_a_partial_one_waits_for_the_rest() {
        let control = Control {
            recording: AtomicBool::new(true),
            stop: tokio::sync::watch::Sender::new(false),
            opened: AtomicUsize::new(0),
            refused: std::sync::Mutex::new(None),
            // Far enough back that every amount below was sent before now.
            epoch: Instant::now() - Duration::from_secs(10),
        };
        let delivery = std::cell::RefCell::new(histogram());
        let mut watcher = Watcher { auction: 3, base: 1000, last_version: 0, lost: false };
        let mut text =
            b": heartbeat\n\nevent: auction\nid: 7\ndata: {\"high_bid\":1500}\n\nid: 8\ndata: {\"high".to_vec();
        assert_eq!(consume(&mut text, &mut watcher, &control, &delivery), 1, "one whole event, one comment");
        assert_eq!(watcher.last_version, 7);
        assert_eq!(text, b"id: 8\ndata: {\"high", "the partial event is kept");
        text.extend_from_slice(b"_bid\":1600}\n\n");
        assert_eq!(consume(&mut text, &mut watcher, &control, &delivery), 1);
        assert_eq!(watcher.last_version, 8);
        assert!(text.is_empty());
        assert_eq!(delivery.borrow().len(), 2, "each timed from its amount");
    }
}

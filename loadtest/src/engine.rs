//! The engine: pinned threads, each with its own current-thread runtime and its share
//! of the connections, driving them closed loop or open loop.
//!
//! **Closed loop** (no `--rate`): each connection sends its next request as soon as
//! the last response is in; latency runs from the send. This finds the maximum
//! throughput, and — like every closed-loop tool — under-reports stalls, because a
//! stalled connection simply stops sending.
//!
//! **Open loop** (`--rate R`, the wrk2 method): requests are due at fixed times,
//! `R` per second in all. A free connection claims the next due time; if it is
//! already past (every connection was busy, e.g. the server stalled), the request is
//! sent at once and its latency runs from the time it was *due*, so the stall is
//! counted in every request it delayed — coordinated omission cannot hide it. If the
//! due time is ahead, the connection sleeps until then and latency runs from the
//! actual send: tokio's timer fires up to a millisecond late, and that lateness is the
//! generator's, not the server's. An open-loop run that could not keep to its
//! schedule says so ([`Schedule`]): its latencies are then those of a lower rate.
//!
//! Each thread counts every response and error in the second it completed in, and
//! sends each second to the thread that started the run once it is over; that
//! thread makes the per-second series of [`crate::series`]. Responses that come
//! after the run's duration count in its last second, as they count in its totals.

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::sync::{Arc, Barrier, OnceLock, mpsc};
use std::time::{Duration, Instant};

use anyhow::Context;
use serde::Serialize;
use tokio::task::LocalSet;

use crate::http::{Conn, Fault, Target};
use crate::scenario::{Generator, Workload};
use crate::series::{self, Part, Reporter, Rss, Second};
use crate::stats::{Kind, Recorder};
use crate::ticker::Ticker;

/// How hard and how long to drive the targets.
#[derive(Debug, Clone)]
pub struct Plan {
    /// One or more servers of one service (instances behind no balancer):
    /// connection `i` starts on target `i mod n`, and moves to the next target
    /// when its own refuses it or resets it. A request whose connection was
    /// reset before its response is sent again on the next target, and counted
    /// as retried, not failed. Nonempty.
    pub targets: Vec<Target>,
    pub connections: usize,
    pub threads: usize,
    /// Every run stops after this long…
    pub duration: Duration,
    /// …or after this many requests, whichever comes first.
    pub requests: Option<u64>,
    /// Requests per second in all (open loop); `None`: closed loop.
    pub rate: Option<f64>,
    /// How long one exchange may take before it counts as a timeout.
    pub timeout: Duration,
    /// Pin thread `i` to core `i`.
    pub pin: bool,
    /// Seed of the connections' random numbers.
    pub seed: u64,
    /// Where to read the server's resident memory for the series, if anywhere.
    pub rss: Option<Rss>,
    /// Print each second of the series on stderr as it completes.
    pub progress: bool,
}

/// What a run measured, and over how long.
#[derive(Debug)]
pub struct Outcome {
    pub recorder: Recorder,
    pub elapsed: Duration,
    /// Threads actually used: never more than connections.
    pub threads: usize,
    /// One row per second of the run's duration.
    pub series: Vec<Second>,
    /// Open loop only: how well the run kept to its schedule.
    pub schedule: Option<Schedule>,
}

/// A request sent more than this long after it was due counts as late: the timer
/// wakes within tens of microseconds on an idle machine.
pub const LATE: Duration = Duration::from_millis(1);

/// Share of the scheduled requests that may be sent after the run's end, or late,
/// before an open-loop run counts as behind its rate.
pub const BEHIND_TOLERANCE: f64 = 0.01;

/// How well an open-loop run kept to its schedule.
#[derive(Debug, Default, Clone, Copy, PartialEq, Serialize)]
pub struct Schedule {
    /// Requests due within the run's duration.
    pub scheduled: u64,
    /// Of them, sent before the duration was over.
    pub sent_in_time: u64,
    /// Sent more than [`LATE`] after they were due: every connection was busy
    /// (the server was slow) or the generator's thread woke late (it was starved).
    pub late: u64,
    /// The longest any request was sent after it was due, in microseconds.
    pub max_lag_us: f64,
    /// More than [`BEHIND_TOLERANCE`] of the scheduled requests were sent after the
    /// run's end or late: the rate was not held, and the latencies are those of
    /// whatever rate was.
    pub behind: bool,
}

impl Schedule {
    fn add(&mut self, other: &Schedule) {
        self.scheduled += other.scheduled;
        self.sent_in_time += other.sent_in_time;
        self.late += other.late;
        self.max_lag_us = self.max_lag_us.max(other.max_lag_us);
        self.behind = self.fell_behind();
    }

    fn fell_behind(&self) -> bool {
        let tolerance = (self.scheduled as f64 * BEHIND_TOLERANCE).ceil() as u64;
        self.scheduled.saturating_sub(self.sent_in_time) > tolerance || self.late > tolerance
    }

    /// The warning a run that fell behind prints.
    pub fn warning(&self) -> String {
        format!(
            "the run fell behind its rate: {} of {} scheduled requests sent within the run, {} sent more than {} ms late (up to {:.1} ms); add connections, or lower the rate",
            self.sent_in_time,
            self.scheduled,
            self.late,
            LATE.as_millis(),
            self.max_lag_us / 1000.0
        )
    }
}

/// Runs `plan`, drawing requests from `work`; returns when every thread is done.
pub fn run(plan: &Plan, work: Arc<Workload>) -> anyhow::Result<Outcome> {
    anyhow::ensure!(plan.connections > 0, "at least one connection is needed");
    anyhow::ensure!(plan.rate.is_none_or(|r| r > 0.0 && r.is_finite()), "the rate must be above zero");
    let threads = plan.threads.clamp(1, plan.connections);
    let cores = if plan.pin { core_affinity::get_core_ids().unwrap_or_default() } else { Vec::new() };
    let barrier = Arc::new(Barrier::new(threads));
    let (tx, rx) = mpsc::channel();
    let start = Arc::new(OnceLock::new());
    let mut handles = Vec::with_capacity(threads);
    let mut first_conn = 0;
    for t in 0..threads {
        let conns = share(plan.connections as u64, threads, t) as usize;
        let share_of_plan = ThreadPlan {
            index: t,
            first_conn,
            conns,
            budget: plan.requests.map(|n| share(n, threads, t)),
            // Rate in proportion to connections, so each connection is equally loaded.
            rate: plan.rate.map(|r| r * conns as f64 / plan.connections as f64),
            // Spreads the threads' schedules so their sends interleave.
            phase: t as f64 / threads as f64,
        };
        first_conn += conns;
        let plan = plan.clone();
        let work = Arc::clone(&work);
        let barrier = Arc::clone(&barrier);
        let start = Arc::clone(&start);
        let core = if cores.is_empty() { None } else { Some(cores[t % cores.len()]) };
        let reporter = Reporter::new(t, tx.clone());
        let handle = std::thread::Builder::new()
            .name(format!("loadtest-{t}"))
            .spawn(move || {
                if let Some(core) = core {
                    core_affinity::set_for_current(core);
                }
                let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
                let part = drive_thread(plan, share_of_plan, work, barrier, start, reporter);
                LocalSet::new().block_on(&rt, part)
            })
            .context("cannot start a load thread")?;
        handles.push(handle);
    }
    // The series ends when every thread has dropped its sender: this one goes first.
    drop(tx);
    let series = series::gather(&rx, threads, plan.rss.as_ref(), plan.progress);
    let mut recorder = Recorder::default();
    let mut elapsed = Duration::ZERO;
    let mut schedule = plan.rate.map(|_| Schedule::default());
    let mut failure = None;
    for handle in handles {
        match handle.join() {
            Ok(Ok(done)) => {
                recorder.merge(done.recorder);
                elapsed = elapsed.max(done.elapsed);
                if let (Some(all), Some(part)) = (schedule.as_mut(), done.schedule) {
                    all.add(&part);
                }
            }
            Ok(Err(e)) => failure = Some(e),
            Err(_) => failure = Some(anyhow::anyhow!("a load thread panicked")),
        }
    }
    match failure {
        Some(e) => Err(e),
        None => Ok(Outcome { recorder, elapsed, threads, series, schedule }),
    }
}

/// What one thread measured.
struct ThreadDone {
    recorder: Recorder,
    elapsed: Duration,
    schedule: Option<Schedule>,
}

/// Thread `t`'s part of `total` split over `threads`, the remainder to the first.
fn share(total: u64, threads: usize, t: usize) -> u64 {
    let threads = threads as u64;
    total / threads + u64::from((t as u64) < total % threads)
}

struct ThreadPlan {
    index: usize,
    first_conn: usize,
    conns: usize,
    budget: Option<u64>,
    rate: Option<f64>,
    /// Offset of this thread's schedule, as a fraction of its interval.
    phase: f64,
}

/// What a thread's connections share. Single-threaded, so `Cell`s and no locks.
struct Shared {
    targets: Vec<Target>,
    timeout: Duration,
    deadline: Instant,
    budget: Option<Cell<u64>>,
    /// Open loop only: the schedule and the timer that waits for it.
    pacer: Option<(Pacer, Rc<Ticker>)>,
    recorder: RefCell<Recorder>,
    /// The series: the second being counted (from 1) and its measurements so far.
    second: RefCell<(u64, Part)>,
    start: Instant,
    /// The run's last second: `deadline` rounded up.
    last_second: u64,
    reporter: Reporter,
    /// When the last response came in: see [`measured`].
    last_response: Cell<Option<Instant>>,
}

impl Shared {
    /// Takes one request from the budget; false once it is spent.
    fn take(&self) -> bool {
        match &self.budget {
            None => true,
            Some(left) if left.get() > 0 => {
                left.set(left.get() - 1);
                true
            }
            Some(_) => false,
        }
    }

    fn record(&self, kind: Kind, status: u16, latency: Duration, at: Instant) {
        self.recorder.borrow_mut().record(kind, status, latency);
        self.part_at(at).1.record(status, latency);
    }

    fn fault(&self, fault: &Fault) {
        self.recorder.borrow_mut().fault(fault);
        self.part_at(Instant::now()).1.errors += 1;
    }

    fn refused(&self) {
        self.recorder.borrow_mut().errors.connect += 1;
        self.part_at(Instant::now()).1.errors += 1;
    }

    /// A request whose connection was reset goes to another target.
    fn retried(&self) {
        self.recorder.borrow_mut().errors.retried += 1;
    }

    /// A connection to the target at `at`, or else to the next one that takes
    /// it (`at` then names it); `None` when every target refuses.
    async fn connect(&self, at: &mut usize) -> Option<Conn> {
        for _ in 0..self.targets.len() {
            if let Ok(conn) = Conn::connect(self.targets[*at].addr).await {
                return Some(conn);
            }
            *at = (*at + 1) % self.targets.len();
        }
        None
    }

    /// The second `at` falls in (from 1), the run's last for anything after it.
    fn second_of(&self, at: Instant) -> u64 {
        (at.saturating_duration_since(self.start).as_secs() + 1).min(self.last_second)
    }

    /// The series' part for the second `at` falls in, once every earlier second is
    /// sent. Times only move forward on one thread, so no second is sent twice.
    fn part_at(&self, at: Instant) -> std::cell::RefMut<'_, (u64, Part)> {
        self.send_seconds_before(self.second_of(at));
        self.second.borrow_mut()
    }

    /// Sends each second before `second` not sent yet, empty ones too: they tell the
    /// gatherer this thread is past them.
    fn send_seconds_before(&self, second: u64) {
        let mut current = self.second.borrow_mut();
        while current.0 < second {
            let part = std::mem::take(&mut current.1);
            self.reporter.send(current.0, part);
            current.0 += 1;
        }
    }
}

/// The open-loop schedule of one thread: request `k` is due at `start + (k + phase) ×
/// interval`, and no request is due at or after `end`. It also keeps count of how
/// well the sends kept to it.
struct Pacer {
    start: Instant,
    interval_ns: f64,
    phase: f64,
    next: Cell<u64>,
    end: Instant,
    kept: Cell<Schedule>,
}

impl Pacer {
    fn new(start: Instant, rate: f64, phase: f64, end: Instant) -> Pacer {
        Pacer { start, interval_ns: 1e9 / rate, phase, next: Cell::new(0), end, kept: Cell::default() }
    }

    fn claim(&self) -> Option<Instant> {
        let k = self.next.get();
        let due = self.start + Duration::from_nanos(((k as f64 + self.phase) * self.interval_ns) as u64);
        if due >= self.end {
            return None;
        }
        self.next.set(k + 1);
        Some(due)
    }

    /// Counts the request due at `due` as sent at `at`.
    fn sent(&self, due: Instant, at: Instant) {
        let mut kept = self.kept.get();
        let lag = at.saturating_duration_since(due);
        kept.scheduled += 1;
        kept.sent_in_time += u64::from(at < self.end);
        kept.late += u64::from(lag > LATE);
        kept.max_lag_us = kept.max_lag_us.max(lag.as_secs_f64() * 1e6);
        self.kept.set(kept);
    }
}

async fn drive_thread(
    plan: Plan,
    part: ThreadPlan,
    work: Arc<Workload>,
    barrier: Arc<Barrier>,
    start: Arc<OnceLock<Instant>>,
    reporter: Reporter,
) -> anyhow::Result<ThreadDone> {
    // Connect before the clock starts: a run measures requests, not handshakes.
    let mut conns = Vec::with_capacity(part.conns);
    let mut refused = None;
    for i in 0..part.conns {
        let at = (part.first_conn + i) % plan.targets.len();
        match Conn::connect(plan.targets[at].addr).await {
            Ok(conn) => conns.push((conn, at)),
            Err(e) => {
                refused = Some(e);
                break;
            }
        }
    }
    // Every thread reaches the barrier, failed or not, so none waits for ever.
    barrier.wait();
    if let Some(e) = refused {
        let addrs: Vec<String> = plan.targets.iter().map(|t| t.addr.to_string()).collect();
        return Err(e).with_context(|| format!("cannot connect to {}", addrs.join(", ")));
    }
    let start = *start.get_or_init(Instant::now);
    let pacer = match part.rate {
        Some(rate) => {
            let ticker = Ticker::new().context("cannot create the open loop's timer")?;
            Some((Pacer::new(start, rate, part.phase, start + plan.duration), ticker))
        }
        None => None,
    };
    let driver = pacer.as_ref().map(|(_, ticker)| tokio::task::spawn_local(Rc::clone(ticker).drive()));
    let shared = Rc::new(Shared {
        targets: plan.targets.clone(),
        timeout: plan.timeout,
        deadline: start + plan.duration,
        budget: part.budget.map(Cell::new),
        pacer,
        recorder: RefCell::new(Recorder::default()),
        second: RefCell::new((1, Part::default())),
        start,
        last_second: plan.duration.as_secs_f64().ceil().max(1.0) as u64,
        reporter,
        last_response: Cell::new(None),
    });
    let seconds = tokio::task::spawn_local(report_seconds(Rc::clone(&shared)));
    let mut tasks = Vec::with_capacity(conns.len());
    for (i, (conn, at)) in conns.into_iter().enumerate() {
        let generator = work.generator(part.first_conn + i, plan.seed ^ part.index as u64);
        tasks.push(tokio::task::spawn_local(drive_connection(Rc::clone(&shared), conn, at, generator)));
    }
    for task in tasks {
        task.await.context("a connection task panicked")?;
    }
    if let Some(driver) = driver {
        driver.abort();
    }
    seconds.abort();
    // The second the thread ended in: the last one, or the one a request budget
    // ran out in.
    shared.send_seconds_before(shared.second_of(Instant::now()) + 1);
    let elapsed = measured(start.elapsed(), plan.duration, shared.last_response.get().map(|t| t - start));
    let recorder = shared.recorder.take();
    let schedule = shared.pacer.as_ref().map(|(pacer, _)| pacer.kept.get());
    Ok(ThreadDone { recorder, elapsed, schedule })
}

/// Sends each second as it ends, also when nothing came in it (a stalled server);
/// runs until aborted. The last second is sent when the thread ends.
async fn report_seconds(shared: Rc<Shared>) {
    for second in 1u64.. {
        tokio::time::sleep_until((shared.start + Duration::from_secs(second)).into()).await;
        shared.send_seconds_before(shared.second_of(Instant::now()));
    }
}

/// The length a thread's rate is computed over. A run that ended within its
/// duration (its request budget spent) lasted what it lasted. One that ran over was
/// waiting for requests in flight at the end: their responses count, but not the
/// wait for those that never came (they end as timeouts), which would dilute the
/// rate by up to the request timeout.
fn measured(elapsed: Duration, duration: Duration, last_response: Option<Duration>) -> Duration {
    if elapsed <= duration { elapsed } else { last_response.unwrap_or(duration).clamp(duration, elapsed) }
}

/// One connection's loop: claim, (wait,) send, receive, record, until the run ends.
/// `at` is the target it is connected to.
async fn drive_connection(shared: Rc<Shared>, conn: Conn, mut at: usize, mut generator: Generator) {
    let mut conn = Some(conn);
    let mut request = Vec::with_capacity(512);
    let several = shared.targets.len() > 1;
    loop {
        if !shared.take() {
            break;
        }
        // When latency starts: the due time if the request is late, else the send.
        let mut late_since = None;
        let mut due = None;
        if let Some((pacer, ticker)) = &shared.pacer {
            let Some(at) = pacer.claim() else { break };
            if at > Instant::now() {
                ticker.sleep_until(at).await;
            } else {
                late_since = Some(at);
            }
            due = Some((pacer, at));
        } else if Instant::now() >= shared.deadline {
            break;
        }
        request.clear();
        let kind = generator.next(&shared.targets[0].authority, &mut request);
        let sent = Instant::now();
        if let Some((pacer, at)) = due {
            pacer.sent(at, sent);
        }
        // A request is sent at most twice: again on the next target when its
        // connection was reset before the response, and there is another.
        for attempt in 0..2 {
            if conn.is_none() {
                match shared.connect(&mut at).await {
                    Some(c) => conn = Some(c),
                    None => {
                        shared.refused();
                        // Not a busy loop against targets that are down.
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        break;
                    }
                }
            }
            let Some(c) = conn.as_mut() else { break };
            match c.exchange(&request, shared.timeout).await {
                Ok(response) => {
                    let done = Instant::now();
                    shared.last_response.set(Some(done));
                    let latency = done - late_since.unwrap_or(sent);
                    shared.record(kind, response.status, latency, done);
                    if c.closing() {
                        conn = None;
                    }
                    break;
                }
                // Reset before any byte of the response: the server read
                // nothing of it, or answered nothing; another target may.
                Err(Fault::Reset(_)) if several && attempt == 0 => {
                    shared.retried();
                    conn = None;
                    at = (at + 1) % shared.targets.len();
                }
                Err(fault) => {
                    shared.fault(&fault);
                    conn = None;
                    break;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::net::TcpListener;

    use super::*;
    use crate::scenario::Lot;
    use crate::stats::Kind;

    /// A keep-alive HTTP stub that answers every request at once, except request
    /// number `stall_at` (from 1), which it holds for `stall` first.
    fn stalling_stub(stall_at: usize, stall: Duration) -> Target {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        std::thread::spawn(move || {
            let mut seen = 0;
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { return };
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                loop {
                    let n = match stream.read(&mut chunk) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => n,
                    };
                    buf.extend_from_slice(&chunk[..n]);
                    while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        buf.drain(..end + 4);
                        seen += 1;
                        if seen == stall_at {
                            std::thread::sleep(stall);
                        }
                        let _ = stream.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok");
                    }
                }
            }
        });
        Target { addr, authority: addr.to_string() }
    }

    fn plan(target: Target, rate: Option<f64>, requests: Option<u64>) -> Plan {
        Plan {
            targets: vec![target],
            connections: 1,
            threads: 1,
            duration: Duration::from_secs(1),
            requests,
            rate,
            timeout: Duration::from_secs(5),
            pin: false,
            seed: 1,
            rss: None,
            progress: false,
        }
    }

    fn reads() -> Arc<Workload> {
        Arc::new(Workload::new(vec![(Kind::AuctionRead, 1)], vec![Lot { id: 1, min_next_bid: 1 }], 0, 1, Vec::new()))
    }

    /// Requests whose latency was at least `floor`.
    fn at_least(outcome: &Outcome, floor: Duration) -> u64 {
        let h = outcome.recorder.latency_ns(Kind::AuctionRead).unwrap();
        h.count_between(floor.as_nanos() as u64, h.max())
    }

    #[test]
    fn open_loop_latency_includes_the_stall_for_every_request_it_delayed() {
        // 1000 requests/s on one connection; request 100 (due at ~100 ms) is held
        // 300 ms, so the ~300 requests due meanwhile wait behind it. Measured from
        // their scheduled times, ~200 of them took 100 ms or more.
        let stall = Duration::from_millis(300);
        let outcome = run(&plan(stalling_stub(100, stall), Some(1000.0), None), reads()).unwrap();
        let h = outcome.recorder.latency_ns(Kind::AuctionRead).unwrap();
        assert!(h.max() >= stall.as_nanos() as u64, "max {} ns hides the stall", h.max());
        let delayed = at_least(&outcome, Duration::from_millis(100));
        assert!(delayed >= 150, "only {delayed} requests include the stall");
        // The rate was held: the delayed requests were sent late, not dropped.
        assert!((900..=1000).contains(&h.len()), "{} requests at 1000/s for 1 s", h.len());
        assert_eq!(outcome.recorder.errors.total(), 0);
    }

    #[test]
    fn closed_loop_latency_counts_the_stall_once() {
        // The contrast that shows why open loop matters: a closed loop simply stops
        // sending while stalled, so the stall appears in one request only.
        let outcome = run(&plan(stalling_stub(100, Duration::from_millis(300)), None, Some(500)), reads()).unwrap();
        let h = outcome.recorder.latency_ns(Kind::AuctionRead).unwrap();
        assert_eq!(h.len(), 500, "the request budget bounds the run");
        assert!(h.max() >= 300_000_000);
        assert!(at_least(&outcome, Duration::from_millis(100)) <= 3);
    }

    #[test]
    fn a_request_stuck_past_the_end_does_not_stretch_the_run() {
        // Request 50 is held 3 s and times out after 500 ms; the stub, busy holding
        // it, answers nothing else, so the reconnected connection times out too.
        let mut p = plan(stalling_stub(50, Duration::from_secs(3)), None, None);
        p.timeout = Duration::from_millis(500);
        let outcome = run(&p, reads()).unwrap();
        assert!(outcome.recorder.errors.timeout >= 1);
        assert_eq!(outcome.elapsed, p.duration, "the rate is over the run's duration, not the timeouts' tail");
        assert_eq!(measured(Duration::from_millis(300), p.duration, None), Duration::from_millis(300));
        let late = measured(Duration::from_secs(3), p.duration, Some(Duration::from_millis(1200)));
        assert_eq!(late, Duration::from_millis(1200), "responses after the end still count");
    }

    #[test]
    fn plans_without_connections_or_with_a_rate_of_nothing_are_refused() {
        let target = Target { addr: "127.0.0.1:9".parse().unwrap(), authority: "127.0.0.1:9".into() };
        let mut none = plan(target.clone(), None, None);
        none.connections = 0;
        assert!(run(&none, reads()).is_err());
        for rate in [0.0, -5.0, f64::NAN, f64::INFINITY] {
            let err = run(&plan(target.clone(), Some(rate), None), reads()).unwrap_err();
            assert!(err.to_string().contains("rate"), "{rate}: {err}");
        }
    }

    #[test]
    fn an_unreachable_target_fails_the_run_before_it_starts() {
        let addr = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
        let err = run(&plan(Target { addr, authority: addr.to_string() }, None, None), reads()).unwrap_err();
        assert!(format!("{err:#}").contains("cannot connect"), "{err:#}");
    }

    #[test]
    fn shares_add_up_to_the_total() {
        for (total, threads) in [(10u64, 3usize), (1, 2), (64, 2), (0, 4)] {
            let parts: Vec<u64> = (0..threads).map(|t| share(total, threads, t)).collect();
            assert_eq!(parts.iter().sum::<u64>(), total, "{parts:?}");
            assert!(parts.iter().max().unwrap() - parts.iter().min().unwrap() <= 1, "{parts:?}");
        }
    }

    #[test]
    fn the_pacer_keeps_a_fixed_schedule_and_stops_at_the_end() {
        let start = Instant::now();
        let pacer = Pacer::new(start, 1000.0, 0.5, start + Duration::from_millis(3));
        let due: Vec<Duration> = std::iter::from_fn(|| pacer.claim()).map(|t| t - start).collect();
        assert_eq!(due, [500_000, 1_500_000, 2_500_000].map(Duration::from_nanos));
    }

    #[test]
    fn sends_after_the_end_or_late_beyond_the_tolerance_mean_the_run_fell_behind() {
        let start = Instant::now();
        let end = start + Duration::from_secs(1);
        let pacer = Pacer::new(start, 1000.0, 0.0, end);
        // 1000 due; the first 995 go out 100 µs after their time, 5 go out 2 ms late.
        for k in 0..1000 {
            let due = pacer.claim().unwrap();
            let lag = if k < 995 { Duration::from_micros(100) } else { Duration::from_millis(2) };
            pacer.sent(due, due + lag);
        }
        assert_eq!(pacer.claim(), None);
        let mut kept = Schedule::default();
        kept.add(&pacer.kept.get());
        assert_eq!((kept.scheduled, kept.late), (1000, 5));
        // The last ones, due just before the end, went out after it.
        assert_eq!(kept.sent_in_time, 998);
        assert!((kept.max_lag_us - 2000.0).abs() < 1.0, "{}", kept.max_lag_us);
        assert!(!kept.behind, "5 late and 2 after the end of 1000 is within 1 %");

        let slow = Schedule { scheduled: 1000, sent_in_time: 900, late: 0, max_lag_us: 0.0, behind: false };
        let mut all = Schedule::default();
        all.add(&slow);
        assert!(all.behind, "100 of 1000 sent after the end");
        let late = Schedule { scheduled: 1000, sent_in_time: 1000, late: 11, max_lag_us: 5000.0, behind: false };
        let mut all = Schedule::default();
        all.add(&late);
        assert!(all.behind, "11 of 1000 late");
        assert!(all.warning().contains("11 sent more than 1 ms late (up to 5.0 ms)"), "{}", all.warning());
    }

    #[test]
    fn open_loop_runs_report_their_schedule_and_a_series_of_seconds() {
        let mut p = plan(stalling_stub(0, Duration::ZERO), Some(1000.0), None);
        p.duration = Duration::from_millis(2500);
        let outcome = run(&p, reads()).unwrap();
        let kept = outcome.schedule.unwrap();
        // Whether it fell behind depends on the machine's load: not asserted here.
        assert!((2400..=2500).contains(&kept.scheduled), "{kept:?}");
        assert!(kept.sent_in_time + 50 >= kept.scheduled, "{kept:?}");
        // Two whole seconds and a half one.
        let seconds: Vec<u64> = outcome.series.iter().map(|s| s.second).collect();
        assert_eq!(seconds, [1, 2, 3]);
        let total: u64 = outcome.series.iter().map(|s| s.requests).sum();
        assert_eq!(
            total,
            outcome.recorder.latency_ns(Kind::AuctionRead).unwrap().len(),
            "every response is in a second"
        );
        for s in &outcome.series[..2] {
            assert!((800..=1200).contains(&s.requests), "{s:?}");
            assert_eq!((s.errors, s.rss_bytes), (0, None));
            assert!(s.p99_us.is_some());
        }
    }
}

//! What a run measured: latencies in HdrHistogram, status counts and faults, per kind
//! of request; and the report made of them, for people and for scripts.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;

use crate::engine::Schedule;
use crate::http::Fault;
use crate::series::Second;

/// The kinds of request the scenarios send.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    AuctionRead,
    Bid,
    InventoryRead,
    Order,
    CreateAuction,
}

impl Kind {
    pub const ALL: [Kind; 5] = [Kind::AuctionRead, Kind::Bid, Kind::InventoryRead, Kind::Order, Kind::CreateAuction];

    pub fn name(self) -> &'static str {
        match self {
            Kind::AuctionRead => "auction-read",
            Kind::Bid => "bid",
            Kind::InventoryRead => "inventory-read",
            Kind::Order => "order",
            Kind::CreateAuction => "create-auction",
        }
    }
}

/// Latencies from 1 µs to 60 s at 3 significant digits (0.1 % error): ~400 KB a
/// histogram, so one per kind per thread, not per connection.
pub(crate) fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1_000, 60_000_000_000, 3).expect("constant bounds are valid")
}

#[derive(Debug, Clone)]
struct KindStats {
    latency_ns: Histogram<u64>,
    /// (status, count), in order of first appearance: a run sees a handful.
    statuses: Vec<(u16, u64)>,
}

/// Exchanges that produced no response, by cause.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Errors {
    pub connect: u64,
    pub io: u64,
    pub timeout: u64,
    pub protocol: u64,
    /// Requests whose connection was reset before their response, sent again
    /// on another target (not failures: see `engine::Plan::targets`).
    pub retried: u64,
}

impl Errors {
    /// The requests that failed; the retried ones are not among them.
    pub fn total(&self) -> u64 {
        self.connect + self.io + self.timeout + self.protocol
    }
}

/// One thread's measurements; merged into one at the end of a run.
#[derive(Debug, Default, Clone)]
pub struct Recorder {
    kinds: [Option<KindStats>; Kind::ALL.len()],
    pub errors: Errors,
}

impl Recorder {
    pub fn record(&mut self, kind: Kind, status: u16, latency: Duration) {
        let stats = self.kinds[kind as usize]
            .get_or_insert_with(|| KindStats { latency_ns: histogram(), statuses: Vec::new() });
        stats.latency_ns.saturating_record(u64::try_from(latency.as_nanos()).unwrap_or(u64::MAX));
        add_status(&mut stats.statuses, status, 1);
    }

    pub fn fault(&mut self, fault: &Fault) {
        match fault {
            Fault::Io(_) | Fault::Reset(_) => self.errors.io += 1,
            Fault::Timeout => self.errors.timeout += 1,
            Fault::Protocol(_) => self.errors.protocol += 1,
        }
    }

    pub fn merge(&mut self, other: Recorder) {
        for (mine, theirs) in self.kinds.iter_mut().zip(other.kinds) {
            let Some(theirs) = theirs else { continue };
            match mine {
                None => *mine = Some(theirs),
                Some(mine) => {
                    mine.latency_ns.add(&theirs.latency_ns).expect("histograms share their bounds");
                    for (status, n) in theirs.statuses {
                        add_status(&mut mine.statuses, status, n);
                    }
                }
            }
        }
        self.errors.connect += other.errors.connect;
        self.errors.io += other.errors.io;
        self.errors.timeout += other.errors.timeout;
        self.errors.protocol += other.errors.protocol;
        self.errors.retried += other.errors.retried;
    }

    /// Responses of `kind` with `status`.
    #[cfg(test)]
    fn count(&self, kind: Kind, status: u16) -> u64 {
        self.kinds[kind as usize]
            .as_ref()
            .and_then(|k| k.statuses.iter().find(|(s, _)| *s == status))
            .map_or(0, |(_, n)| *n)
    }

    /// The latency histogram (nanoseconds) of every response of `kind`, if any.
    pub fn latency_ns(&self, kind: Kind) -> Option<&Histogram<u64>> {
        self.kinds[kind as usize].as_ref().map(|k| &k.latency_ns)
    }
}

fn add_status(statuses: &mut Vec<(u16, u64)>, status: u16, n: u64) {
    match statuses.iter_mut().find(|(s, _)| *s == status) {
        Some((_, m)) => *m += n,
        None => statuses.push((status, n)),
    }
}

/// Latency summary in microseconds.
#[derive(Debug, Default, Clone, Copy, PartialEq, Serialize)]
pub struct Latency {
    pub mean: f64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p99_9: f64,
    pub max: f64,
}

impl Latency {
    fn of(h: &Histogram<u64>) -> Latency {
        let us = |ns: u64| (ns as f64 / 100.0).round() / 10.0;
        Latency {
            mean: (h.mean() / 100.0).round() / 10.0,
            p50: us(h.value_at_quantile(0.50)),
            p90: us(h.value_at_quantile(0.90)),
            p99: us(h.value_at_quantile(0.99)),
            p99_9: us(h.value_at_quantile(0.999)),
            max: us(h.max()),
        }
    }
}

/// The figures for one kind of request.
#[derive(Debug, Clone, Serialize)]
pub struct KindReport {
    pub requests: u64,
    pub requests_per_sec: f64,
    pub latency_us: Latency,
    pub statuses: BTreeMap<String, u64>,
}

/// What `run` prints: `--json` writes exactly this.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub scenario: String,
    /// `closed` (each connection sends as soon as its last response is in) or `open`
    /// (requests at `target_rate`, latency from their scheduled send time).
    pub mode: &'static str,
    pub target_rate: Option<f64>,
    pub connections: usize,
    pub threads: usize,
    pub duration_secs: f64,
    /// Responses received, whatever their status.
    pub requests: u64,
    pub requests_per_sec: f64,
    pub latency_us: Latency,
    pub statuses: BTreeMap<String, u64>,
    pub errors: Errors,
    pub by_kind: BTreeMap<&'static str, KindReport>,
    /// Open loop only: how well the run kept to its schedule; `behind` when it did
    /// not, and its latencies are then those of a lower rate.
    pub schedule: Option<Schedule>,
    /// Where `series[].rss_bytes` was read: `proc-status` (`--server-pid`),
    /// `metrics` (`--metrics-url`), or null (neither given).
    pub rss_source: Option<&'static str>,
    /// One row per whole second of the run (the last part-second is in the totals
    /// only).
    pub series: Vec<Second>,
}

/// The run's shape, for the report's header fields.
#[derive(Debug, Clone)]
pub struct Shape {
    pub scenario: String,
    pub rate: Option<f64>,
    pub connections: usize,
    pub threads: usize,
}

impl Report {
    pub fn new(shape: Shape, recorder: &Recorder, elapsed: Duration) -> Report {
        let secs = elapsed.as_secs_f64().max(1e-9);
        let per_sec = |n: u64| (n as f64 / secs * 10.0).round() / 10.0;
        let mut all = histogram();
        let mut statuses = BTreeMap::new();
        let mut by_kind = BTreeMap::new();
        for kind in Kind::ALL {
            let Some(stats) = &recorder.kinds[kind as usize] else { continue };
            all.add(&stats.latency_ns).expect("histograms share their bounds");
            let mut kind_statuses = BTreeMap::new();
            for &(status, n) in &stats.statuses {
                *kind_statuses.entry(status.to_string()).or_insert(0) += n;
                *statuses.entry(status.to_string()).or_insert(0) += n;
            }
            let requests = stats.latency_ns.len();
            by_kind.insert(
                kind.name(),
                KindReport {
                    requests,
                    requests_per_sec: per_sec(requests),
                    latency_us: Latency::of(&stats.latency_ns),
                    statuses: kind_statuses,
                },
            );
        }
        Report {
            scenario: shape.scenario,
            mode: if shape.rate.is_some() { "open" } else { "closed" },
            target_rate: shape.rate,
            connections: shape.connections,
            threads: shape.threads,
            duration_secs: (secs * 1000.0).round() / 1000.0,
            requests: all.len(),
            requests_per_sec: per_sec(all.len()),
            latency_us: Latency::of(&all),
            statuses,
            errors: recorder.errors,
            by_kind,
            schedule: None,
            rss_source: None,
            series: Vec::new(),
        }
    }

    /// The human-readable form.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let mode = match self.target_rate {
            Some(rate) => format!("open loop at {} req/s", thousands(rate.round() as u64)),
            None => "closed loop".to_owned(),
        };
        let _ = writeln!(
            out,
            "{}: {mode}, {} connections on {} threads, {:.2} s",
            self.scenario, self.connections, self.threads, self.duration_secs
        );
        let _ = writeln!(out, "  requests   {} ({}/s)", thousands(self.requests), thousands_f(self.requests_per_sec));
        let _ = writeln!(out, "  latency    {}", latency_line(&self.latency_us));
        let _ = writeln!(out, "  statuses   {}", statuses_line(&self.statuses));
        let e = &self.errors;
        if e.total() == 0 {
            let _ = writeln!(out, "  errors     none");
        } else {
            let _ = writeln!(
                out,
                "  errors     connect {}, i/o {}, timeout {}, protocol {}",
                e.connect, e.io, e.timeout, e.protocol
            );
        }
        if e.retried > 0 {
            let _ = writeln!(out, "  retried    {} (reset before their response; sent again elsewhere)", e.retried);
        }
        if let Some(kept) = &self.schedule {
            let _ = writeln!(
                out,
                "  schedule   {} due, {} sent within the run, {} late, max lag {:.3} ms{}",
                thousands(kept.scheduled),
                thousands(kept.sent_in_time),
                thousands(kept.late),
                kept.max_lag_us / 1000.0,
                if kept.behind { "  BEHIND ITS RATE" } else { "" }
            );
        }
        let rss: Vec<u64> = self.series.iter().filter_map(|s| s.rss_bytes).collect();
        if let (Some(first), Some(last), Some(max)) = (rss.first(), rss.last(), rss.iter().max()) {
            let mib = |b: &u64| *b as f64 / f64::from(1 << 20);
            let _ =
                writeln!(out, "  server rss first {:.1}, last {:.1}, max {:.1} MiB", mib(first), mib(last), mib(max));
        }
        if self.by_kind.len() > 1 {
            for (name, k) in &self.by_kind {
                let _ = writeln!(out, "  {name}");
                let _ = writeln!(out, "    requests {} ({}/s)", thousands(k.requests), thousands_f(k.requests_per_sec));
                let _ = writeln!(out, "    latency  {}", latency_line(&k.latency_us));
                let _ = writeln!(out, "    statuses {}", statuses_line(&k.statuses));
            }
        }
        out
    }
}

fn latency_line(l: &Latency) -> String {
    let ms = |us: f64| format!("{:.3}", us / 1000.0);
    format!(
        "mean {}  p50 {}  p90 {}  p99 {}  p99.9 {}  max {} ms",
        ms(l.mean),
        ms(l.p50),
        ms(l.p90),
        ms(l.p99),
        ms(l.p99_9),
        ms(l.max)
    )
}

fn statuses_line(statuses: &BTreeMap<String, u64>) -> String {
    if statuses.is_empty() {
        return "none".to_owned();
    }
    statuses.iter().map(|(s, n)| format!("{s}: {}", thousands(*n))).collect::<Vec<_>>().join(", ")
}

pub(crate) fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn thousands_f(x: f64) -> String {
    format!("{}.{}", thousands(x.trunc() as u64), ((x.fract() * 10.0).round() as u64).min(9))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merged_recorders_add_up_per_kind_and_status() {
        let mut a = Recorder::default();
        a.record(Kind::Bid, 201, Duration::from_micros(100));
        a.record(Kind::Bid, 409, Duration::from_micros(300));
        let mut b = Recorder::default();
        b.record(Kind::Bid, 201, Duration::from_micros(200));
        b.record(Kind::AuctionRead, 200, Duration::from_millis(5));
        b.fault(&Fault::Timeout);
        a.merge(b);
        assert_eq!(a.count(Kind::Bid, 201), 2);
        assert_eq!(a.count(Kind::Bid, 409), 1);
        assert_eq!(a.count(Kind::AuctionRead, 200), 1);
        assert_eq!(a.errors.timeout, 1);

        let shape = Shape { scenario: "mixed".into(), rate: None, connections: 2, threads: 1 };
        let report = Report::new(shape, &a, Duration::from_secs(2));
        assert_eq!(report.requests, 4);
        assert_eq!(report.requests_per_sec, 2.0);
        assert_eq!(report.statuses["201"], 2);
        assert_eq!(report.by_kind["bid"].requests, 3);
        let max = report.latency_us.max;
        assert!((4990.0..=5010.0).contains(&max), "max {max} µs");
        let json = serde_json::to_value(&report).unwrap();
        assert_eq!(json["mode"], "closed");
        assert_eq!(json["latency_us"]["p99_9"].as_f64().unwrap(), max);
        assert!(report.render().contains("errors     connect 0, i/o 0, timeout 1, protocol 0"));
    }

    #[test]
    fn big_numbers_get_separators() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(68_432), "68,432");
        assert_eq!(thousands(1_234_567), "1,234,567");
        assert_eq!(thousands_f(68_432.14), "68,432.1");
    }
}

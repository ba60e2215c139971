//! The per-second series: one row per second of a run, so that a long run is not
//! silent and its report shows how the server held up over time, not just on
//! average.
//!
//! Each load thread sends what it measured in each second (responses, errors, a
//! latency histogram) to the thread that started the run, which waits for every
//! thread's part of a second, adds them up, reads the server's resident memory
//! and, on a terminal, prints the row. Messages, not shared counters: the load
//! threads share nothing while the clock runs.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::{self, Read as _, Write as _};
use std::net::TcpStream;
use std::sync::mpsc::{Receiver, Sender};
use std::time::Duration;

use anyhow::{Context as _, bail};
use hdrhistogram::Histogram;
use serde::Serialize;

use crate::http::Target;
use crate::stats::{histogram, thousands};

/// What one thread measured in one second.
#[derive(Debug, Clone)]
pub struct Part {
    /// Responses received, whatever their status.
    pub requests: u64,
    /// Exchanges that got no response (as the report's `errors`).
    pub errors: u64,
    /// Responses with a 5xx status.
    pub server_errors: u64,
    pub latency_ns: Histogram<u64>,
}

impl Default for Part {
    fn default() -> Part {
        Part { requests: 0, errors: 0, server_errors: 0, latency_ns: histogram() }
    }
}

impl Part {
    pub fn record(&mut self, status: u16, latency: Duration) {
        self.requests += 1;
        self.server_errors += u64::from(status >= 500);
        self.latency_ns.saturating_record(u64::try_from(latency.as_nanos()).unwrap_or(u64::MAX));
    }

    fn add(&mut self, other: &Part) {
        self.requests += other.requests;
        self.errors += other.errors;
        self.server_errors += other.server_errors;
        self.latency_ns.add(&other.latency_ns).expect("histograms share their bounds");
    }
}

/// From a load thread to the gatherer.
#[derive(Debug)]
pub enum Message {
    /// Thread `thread`'s measurements of second `second` (from 1: the second that
    /// ended `second` seconds after the start). Each thread sends its seconds in order.
    Second { thread: usize, second: u64, part: Part },
    /// Thread `thread` sends nothing more.
    Done { thread: usize },
}

/// Tells the gatherer that its thread is done when dropped, also when the thread
/// fails or panics, so that the gatherer never waits for a second that will not come.
pub struct Reporter {
    thread: usize,
    tx: Sender<Message>,
}

impl Reporter {
    pub fn new(thread: usize, tx: Sender<Message>) -> Reporter {
        Reporter { thread, tx }
    }

    pub fn send(&self, second: u64, part: Part) {
        // The gatherer outlives the load threads; if it is gone, nobody is listening.
        let _ = self.tx.send(Message::Second { thread: self.thread, second, part });
    }
}

impl Drop for Reporter {
    fn drop(&mut self) {
        let _ = self.tx.send(Message::Done { thread: self.thread });
    }
}

/// One second of the run, every thread's part added up.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Second {
    /// From 1: the second that ended this many seconds after the start.
    pub second: u64,
    pub requests: u64,
    pub errors: u64,
    pub server_errors: u64,
    /// p99 of that second's responses; `null` when there were none.
    pub p99_us: Option<f64>,
    /// The server's resident memory when the second was complete, if readable.
    pub rss_bytes: Option<u64>,
}

/// Adds up the threads' parts of each second, and hands out each second once every
/// thread still running has sent its part.
#[derive(Debug)]
pub struct Gatherer {
    /// Per thread: the last second it sent, and whether it is done.
    sent: Vec<u64>,
    done: Vec<bool>,
    pending: BTreeMap<u64, Part>,
}

impl Gatherer {
    pub fn new(threads: usize) -> Gatherer {
        Gatherer { sent: vec![0; threads], done: vec![false; threads], pending: BTreeMap::new() }
    }

    /// Takes one message; returns the seconds it completed, in order.
    pub fn take(&mut self, message: Message) -> Vec<Second> {
        match message {
            Message::Second { thread, second, part } => {
                self.sent[thread] = self.sent[thread].max(second);
                self.pending.entry(second).or_default().add(&part);
            }
            Message::Done { thread } => self.done[thread] = true,
        }
        let complete = |second: u64| (0..self.sent.len()).all(|t| self.done[t] || self.sent[t] >= second);
        let mut out = Vec::new();
        while let Some(entry) = self.pending.first_entry() {
            if !complete(*entry.key()) {
                break;
            }
            let (second, part) = entry.remove_entry();
            out.push(row(second, &part));
        }
        out
    }

    /// The seconds still waiting for a thread that will not send them.
    pub fn finish(self) -> Vec<Second> {
        self.pending.iter().map(|(second, part)| row(*second, part)).collect()
    }
}

fn row(second: u64, part: &Part) -> Second {
    let p99 =
        (!part.latency_ns.is_empty()).then(|| (part.latency_ns.value_at_quantile(0.99) as f64 / 100.0).round() / 10.0);
    Second {
        second,
        requests: part.requests,
        errors: part.errors,
        server_errors: part.server_errors,
        p99_us: p99,
        rss_bytes: None,
    }
}

/// Where the server's resident memory is read.
#[derive(Debug, Clone)]
pub enum Rss {
    /// `VmRSS` of `/proc/PID/status`: exact and cheap, for a server on this machine.
    Pid(u32),
    /// `process_resident_memory_bytes` of a Prometheus endpoint (gavel's admin
    /// `/metrics`): for a server elsewhere, or whose PID is not at hand.
    Metrics { target: Target, path: String },
}

impl Rss {
    /// Parses `http://host:port/path` for [`Rss::Metrics`].
    pub fn metrics(url: &str) -> anyhow::Result<Rss> {
        let rest = url.strip_prefix("http://").with_context(|| format!("not an http:// URL: {url:?}"))?;
        let (authority, path) = match rest.find('/') {
            Some(at) => rest.split_at(at),
            None => (rest, "/metrics"),
        };
        Ok(Rss::Metrics { target: Target::parse(&format!("http://{authority}"))?, path: path.to_owned() })
    }

    /// The name the report gives this source.
    pub fn name(&self) -> &'static str {
        match self {
            Rss::Pid(_) => "proc-status",
            Rss::Metrics { .. } => "metrics",
        }
    }

    /// The server's resident memory now, in bytes.
    pub fn read(&self) -> anyhow::Result<u64> {
        match self {
            Rss::Pid(pid) => {
                let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
                    .with_context(|| format!("cannot read /proc/{pid}/status"))?;
                vm_rss(&status).context("no VmRSS in /proc/PID/status")
            }
            Rss::Metrics { target, path } => {
                let text = get(target, path).with_context(|| format!("GET {path} from {}", target.authority))?;
                resident_bytes(&text).context("no process_resident_memory_bytes in the metrics")
            }
        }
    }
}

/// The text of a Prometheus endpoint (`http://host:port/path`).
pub fn fetch_metrics(url: &str) -> anyhow::Result<String> {
    match Rss::metrics(url)? {
        Rss::Metrics { target, path } => get(&target, &path),
        Rss::Pid(_) => unreachable!("parsed as a metrics URL"),
    }
}

/// `VmRSS:   12345 kB` of a `/proc/PID/status`, in bytes.
fn vm_rss(status: &str) -> Option<u64> {
    let line = status.lines().find_map(|l| l.strip_prefix("VmRSS:"))?;
    let kb = line.trim().strip_suffix("kB")?.trim().parse::<u64>().ok()?;
    Some(kb * 1024)
}

/// `process_resident_memory_bytes` from a Prometheus text exposition.
fn resident_bytes(text: &str) -> Option<u64> {
    samples(text, "process_resident_memory_bytes").next().map(|(_, value)| value as u64)
}

/// The samples of series `name` in a Prometheus text exposition: each one's
/// labels (inside the braces; empty without) and value. A timestamp after the
/// value is ignored, and so is a line whose value does not parse.
pub fn samples<'a>(text: &'a str, name: &'a str) -> impl Iterator<Item = (&'a str, f64)> + 'a {
    text.lines().filter_map(move |line| {
        let rest = line.strip_prefix(name)?;
        let (labels, rest) = match rest.strip_prefix('{') {
            Some(inner) => inner.rsplit_once('}')?,
            None if rest.starts_with(' ') => ("", rest),
            None => return None,
        };
        Some((labels, rest.split_whitespace().next()?.parse().ok()?))
    })
}

/// A blocking `GET` with `connection: close`, once a second off the load threads:
/// the simplest client that does, with a short timeout so a stuck server cannot
/// hold up the series.
fn get(target: &Target, path: &str) -> anyhow::Result<String> {
    let timeout = Duration::from_millis(500);
    let mut stream = TcpStream::connect_timeout(&target.addr, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    write!(stream, "GET {path} HTTP/1.1\r\nhost: {}\r\nconnection: close\r\n\r\n", target.authority)?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response)?;
    let text = String::from_utf8_lossy(&response);
    let Some((head, body)) = text.split_once("\r\n\r\n") else { bail!("no whole response") };
    if !head.starts_with("HTTP/1.1 200") {
        bail!("{}", head.lines().next().unwrap_or("no status line"));
    }
    Ok(body.to_owned())
}

/// Gathers the series until every load thread is done. Reads the server's memory as
/// each second completes, and with `progress`, prints each second on stderr.
pub fn gather(rx: &Receiver<Message>, threads: usize, rss: Option<&Rss>, progress: bool) -> Vec<Second> {
    let mut gatherer = Gatherer::new(threads);
    let mut series = Vec::new();
    let mut rss_failed = false;
    let mut complete = |mut second: Second, series: &mut Vec<Second>| {
        if let Some(source) = rss {
            match source.read() {
                Ok(bytes) => second.rss_bytes = Some(bytes),
                Err(e) if !rss_failed => {
                    // Once: a server that exited says so on every later second too.
                    rss_failed = true;
                    eprintln!("gavel-loadtest: cannot read the server's memory: {e:#}");
                }
                Err(_) => {}
            }
        }
        if progress {
            eprintln!("{}", progress_line(&second));
        }
        series.push(second);
    };
    // Ends when every load thread has dropped its sender.
    while let Ok(message) = rx.recv() {
        for second in gatherer.take(message) {
            complete(second, &mut series);
        }
    }
    for second in gatherer.finish() {
        complete(second, &mut series);
    }
    series
}

/// `   12 s  41,234 req/s  errors 0  5xx 0  p99 0.812 ms  rss 34.2 MiB`
pub fn progress_line(s: &Second) -> String {
    let mut line = format!("{:>5} s  {:>9} req/s  errors {}", s.second, thousands(s.requests), thousands(s.errors));
    if s.server_errors > 0 {
        let _ = write!(line, "  5xx {}", thousands(s.server_errors));
    }
    match s.p99_us {
        Some(us) => {
            let _ = write!(line, "  p99 {:.3} ms", us / 1000.0);
        }
        None => line.push_str("  p99 -"),
    }
    if let Some(bytes) = s.rss_bytes {
        let _ = write!(line, "  rss {:.1} MiB", bytes as f64 / f64::from(1 << 20));
    }
    line
}

/// Whether stderr is a terminal someone watches.
pub fn stderr_is_terminal() -> bool {
    io::IsTerminal::is_terminal(&io::stderr())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn part(requests: u64, errors: u64, latency_us: u64) -> Part {
        let mut p = Part { errors, ..Part::default() };
        for _ in 0..requests {
            p.record(200, Duration::from_micros(latency_us));
        }
        p
    }

    fn second(thread: usize, second: u64, p: Part) -> Message {
        Message::Second { thread, second, part: p }
    }

    #[test]
    fn a_second_is_out_once_every_running_thread_sent_it() {
        let mut g = Gatherer::new(2);
        assert!(g.take(second(0, 1, part(10, 0, 100))).is_empty(), "thread 1 has not sent second 1");
        assert!(g.take(second(0, 2, part(5, 1, 100))).is_empty());
        let out = g.take(second(1, 1, part(30, 2, 900)));
        assert_eq!(out.len(), 1);
        assert_eq!((out[0].second, out[0].requests, out[0].errors), (1, 40, 2));
        // 30 of 40 responses took 900 µs: that second's p99 is theirs.
        let p99 = out[0].p99_us.unwrap();
        assert!((895.0..=905.0).contains(&p99), "{p99}");
        // A thread that is done no longer holds the seconds back.
        let out = g.take(Message::Done { thread: 1 });
        assert_eq!(out.iter().map(|s| (s.second, s.requests)).collect::<Vec<_>>(), [(2, 5)]);
        assert!(g.finish().is_empty());
    }

    #[test]
    fn seconds_nobody_completed_come_out_at_the_end_and_empty_ones_have_no_p99() {
        let mut g = Gatherer::new(2);
        assert!(g.take(second(0, 1, part(0, 3, 0))).is_empty());
        let left = g.finish();
        assert_eq!(left.len(), 1);
        assert_eq!((left[0].requests, left[0].errors, left[0].p99_us), (0, 3, None));
    }

    #[test]
    fn server_errors_are_counted_apart() {
        let mut p = Part::default();
        p.record(201, Duration::from_micros(50));
        p.record(503, Duration::from_micros(50));
        p.record(409, Duration::from_micros(50));
        assert_eq!((p.requests, p.server_errors), (3, 1));
    }

    #[test]
    fn memory_is_read_from_proc_status_and_from_prometheus_text() {
        let status = "Name:\tgavel\nVmHWM:\t   40000 kB\nVmRSS:\t   34816 kB\nThreads:\t5\n";
        assert_eq!(vm_rss(status), Some(34816 * 1024));
        assert_eq!(vm_rss("Name:\tx\n"), None);
        let text = "# TYPE process_resident_memory_bytes gauge\n\
                    process_resident_memory_bytes_max 1\n\
                    process_resident_memory_bytes 35651584\n";
        assert_eq!(resident_bytes(text), Some(35_651_584));
        assert_eq!(resident_bytes("process_resident_memory_bytes{job=\"g\"} 1.5e6\n"), Some(1_500_000));
        assert_eq!(resident_bytes("http_requests_total 5\n"), None);
        assert_eq!(resident_bytes("process_resident_memory_bytes_total 5\n"), None, "another series");
        assert_eq!(resident_bytes("process_resident_memory_bytes 2048 1700000000000\n"), Some(2048), "a timestamp");
        // Our own process is a server whose memory we can read.
        assert!(Rss::Pid(std::process::id()).read().unwrap() > 0);
    }

    #[test]
    fn metrics_urls_name_a_host_and_a_path() {
        let Rss::Metrics { target, path } = Rss::metrics("http://127.0.0.1:9100/metrics").unwrap() else {
            panic!("not a metrics source")
        };
        assert_eq!((target.authority.as_str(), path.as_str()), ("127.0.0.1:9100", "/metrics"));
        let Rss::Metrics { path, .. } = Rss::metrics("http://127.0.0.1:9100").unwrap() else { panic!() };
        assert_eq!(path, "/metrics");
        assert!(Rss::metrics("127.0.0.1:9100/metrics").is_err());
    }

    #[test]
    fn the_progress_line_says_rate_errors_p99_and_memory() {
        let s = Second {
            second: 12,
            requests: 41_234,
            errors: 0,
            server_errors: 0,
            p99_us: Some(812.0),
            rss_bytes: Some(35_861_709),
        };
        assert_eq!(progress_line(&s), "   12 s     41,234 req/s  errors 0  p99 0.812 ms  rss 34.2 MiB");
        let idle = Second { p99_us: None, rss_bytes: None, server_errors: 2, ..s };
        assert!(progress_line(&idle).ends_with("errors 0  5xx 2  p99 -"), "{}", progress_line(&idle));
    }
}

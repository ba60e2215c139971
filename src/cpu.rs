//! How idle one CPU has been, from the kernel's per-CPU counters (`/proc/stat`),
//! for work that should only use the time others leave (event delivery).
//!
//! The counters are in clock ticks (100 a second on Linux), so a window of a
//! tenth of a second holds about ten of them per CPU: coarse, but all that
//! counts everything the CPU ran — this process, PostgreSQL, anything else.

use std::fs::File;
use std::io::{Read, Seek};

/// Reads one CPU's idle share since the previous reading.
pub struct IdleMeter {
    file: File,
    /// `cpuN ` as `/proc/stat` starts the CPU's line.
    label: String,
    buf: String,
    last: Option<Ticks>,
}

/// A CPU's counters: idle (idle and waiting on I/O) and all.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Ticks {
    idle: u64,
    total: u64,
}

impl IdleMeter {
    /// A meter of CPU `cpu`; `None` where `/proc/stat` cannot be read.
    pub fn new(cpu: usize) -> Option<IdleMeter> {
        let file = File::open("/proc/stat").ok()?;
        let mut meter = IdleMeter { file, label: format!("cpu{cpu} "), buf: String::with_capacity(4096), last: None };
        meter.last = Some(meter.read()?);
        Some(meter)
    }

    /// The share of the time since the previous call that the CPU was idle, 0 to
    /// 1; `None` when no tick has passed (or the counters cannot be read).
    pub fn idle_since_last(&mut self) -> Option<f64> {
        let now = self.read()?;
        let last = self.last.replace(now)?;
        let total = now.total.checked_sub(last.total).filter(|&t| t > 0)?;
        let idle = now.idle.saturating_sub(last.idle).min(total);
        Some(idle as f64 / total as f64)
    }

    fn read(&mut self) -> Option<Ticks> {
        self.buf.clear();
        self.file.rewind().ok()?;
        self.file.read_to_string(&mut self.buf).ok()?;
        parse(&self.buf, &self.label)
    }
}

/// The counters of the line that starts with `label` (`cpuN `): user, nice,
/// system, idle, iowait, irq, softirq, steal (guest time is within user).
fn parse(stat: &str, label: &str) -> Option<Ticks> {
    let line = stat.lines().find(|l| l.starts_with(label))?;
    let fields: Vec<u64> =
        line[label.len()..].split_ascii_whitespace().take(8).map(|f| f.parse().ok()).collect::<Option<_>>()?;
    let [user, nice, system, idle, iowait, irq, softirq, steal] = fields[..] else { return None };
    Some(Ticks { idle: idle + iowait, total: user + nice + system + idle + iowait + irq + softirq + steal })
}

#[cfg(test)]
mod tests {
    use super::*;

    const STAT: &str = "cpu  900 0 300 5000 10 0 20 0 0 0\n\
                        cpu0 400 0 100 2600 5 0 10 0 0 0\n\
                        cpu1 500 0 200 2400 5 0 10 0 0 0\n\
                        intr 12345\n";

    #[test]
    fn a_cpus_own_line_is_read_and_not_its_prefixes() {
        assert_eq!(parse(STAT, "cpu1 "), Some(Ticks { idle: 2405, total: 3115 }));
        assert_eq!(parse(STAT, "cpu0 "), Some(Ticks { idle: 2605, total: 3115 }));
        assert_eq!(parse(STAT, "cpu2 "), None);
        assert_eq!(parse("cpu0 1 2\n", "cpu0 "), None, "a short line is unreadable");
    }

    #[test]
    fn this_machines_cpu0_is_readable() {
        let mut meter = IdleMeter::new(0).expect("Linux has /proc/stat");
        // Five of the kernel's 10 ms ticks, at least one of them counted.
        std::thread::sleep(std::time::Duration::from_millis(50));
        let idle = meter.idle_since_last().expect("a tick has passed");
        assert!((0.0..=1.0).contains(&idle), "{idle}");
    }
}

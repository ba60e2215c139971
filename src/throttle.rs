//! Rate limits: failed log-ins per account and per client address, and bids
//! per bidder.
//!
//! Where the state lives, and why:
//!
//! - **One table per process, shared by every core.** A limit kept per core
//!   would give a guesser a factor of the core count: each new connection may
//!   land on another core. So these are the only request-path state cores
//!   share, and none of it is on the cached-read path, nor on the bid path
//!   unless `--bids-per-second-per-bidder` is set.
//! - **Failed log-ins: a hand-written sliding window behind a mutex.** Only
//!   failures count, and a guess over the limit must be refused before its
//!   password is checked. governor's GCRA charges every check and can neither
//!   look without charging nor give a cell back, so it could not do both. A
//!   log-in already costs an Argon2id hash (15–25 ms of a blocking thread), so
//!   one uncontended lock per log-in costs nothing measurable. The window is
//!   exact: at most N failures in any span of `--login-failure-window`.
//! - **Bids per bidder: governor's keyed GCRA limiter.** Every bid counts, which
//!   is governor's model exactly; its map is sharded and lock-free to check,
//!   so a bid costs one compare-and-swap on a shared cache line when the limit
//!   is on. Off by default.
//!
//! Each gavel instance keeps its own: behind a load balancer spreading log-ins
//! over several instances, a guesser gains the instance count (at most).

use std::collections::{HashMap, VecDeque};
use std::hash::Hash;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::metrics::{self, RateLimit};

/// Most keys (accounts, addresses) each log-in table tracks. A log-in takes an
/// Argon2id hash, so the whole server checks some hundreds a second, and a
/// five-minute window sees fewer failures than this; past it, the key whose
/// newest failure is oldest is forgotten first.
const MAX_KEYS: usize = 100_000;

/// The log-in limits, per `--login-failure-window`. Zero turns one off.
#[derive(Debug, Clone, Copy)]
pub struct LogInLimits {
    pub per_account: u32,
    pub per_address: u32,
    pub window: Duration,
}

/// Why an attempt was refused, and when to try again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refused {
    pub limit: RateLimit,
    pub retry_after: Duration,
}

/// The failures of one key within the window, oldest first.
#[derive(Debug, Default)]
struct Failures(VecDeque<Instant>);

impl Failures {
    fn forget_before(&mut self, horizon: Option<Instant>) {
        while self.0.front().is_some_and(|at| horizon.is_none_or(|h| *at <= h)) {
            self.0.pop_front();
        }
    }
}

/// One sliding window per key, for one limit.
#[derive(Debug)]
struct Windows<K> {
    limit: u32,
    failures: HashMap<K, Failures>,
}

impl<K: Hash + Eq + Clone> Windows<K> {
    fn new(limit: u32) -> Self {
        Windows { limit, failures: HashMap::new() }
    }

    /// How long until `key` may fail again, if it has used its limit.
    fn wait(&mut self, key: &K, now: Instant, window: Duration) -> Option<Duration> {
        if self.limit == 0 {
            return None;
        }
        let failures = self.failures.get_mut(key)?;
        failures.forget_before(now.checked_sub(window));
        let oldest = *failures.0.front()?;
        (failures.0.len() >= self.limit as usize).then(|| (oldest + window).saturating_duration_since(now))
    }

    fn count(&mut self, key: &K, at: Instant, window: Duration) {
        if self.limit == 0 {
            return;
        }
        if !self.failures.contains_key(key) && self.failures.len() >= MAX_KEYS {
            self.make_room(at, window);
        }
        self.failures.entry(key.clone()).or_default().0.push_back(at);
    }

    fn uncount(&mut self, key: &K, at: Instant) {
        if let Some(failures) = self.failures.get_mut(key)
            && let Some(i) = failures.0.iter().rposition(|t| *t == at)
        {
            failures.0.remove(i);
            if failures.0.is_empty() {
                self.failures.remove(key);
            }
        }
    }

    /// Forgets failures older than `horizon`, and the keys left with none.
    fn prune(&mut self, horizon: Option<Instant>) {
        self.failures.retain(|_, f| {
            f.forget_before(horizon);
            !f.0.is_empty()
        });
    }

    #[cold]
    fn make_room(&mut self, now: Instant, window: Duration) {
        self.prune(now.checked_sub(window));
        if self.failures.len() >= MAX_KEYS {
            let stalest = self.failures.iter().min_by_key(|(_, f)| f.0.back().copied()).map(|(k, _)| k.clone());
            if let Some(key) = stalest {
                self.failures.remove(&key);
            }
        }
    }
}

#[derive(Debug)]
struct Tables {
    accounts: Windows<String>,
    addresses: Windows<IpAddr>,
}

/// Failed log-ins, per account and per client address, for the whole process.
#[derive(Debug)]
pub struct LogInThrottle {
    window: Duration,
    tables: Mutex<Tables>,
}

impl LogInThrottle {
    pub fn new(limits: LogInLimits) -> Self {
        LogInThrottle {
            window: limits.window,
            tables: Mutex::new(Tables {
                accounts: Windows::new(limits.per_account),
                addresses: Windows::new(limits.per_address),
            }),
        }
    }

    /// Begins a log-in attempt on `account` (an e-mail address; its case does
    /// not matter) from `address`: refused while either has used its limit of
    /// failures; else the attempt counts as a failure from now, until
    /// [`Attempt::succeeded`] takes it back.
    pub fn attempt(self: &Arc<Self>, account: &str, address: Option<IpAddr>) -> Result<Attempt, Refused> {
        // No address is longer (an account's is checked on registration): a
        // longer one names no account, and must not make a long key.
        let account: String = account.trim().chars().take(254).flat_map(char::to_lowercase).collect();
        let now = Instant::now();
        let mut tables = self.tables.lock().unwrap_or_else(|e| e.into_inner());
        let refused = |limit, retry_after| {
            metrics::rate_limited(limit);
            Err(Refused { limit, retry_after })
        };
        if let Some(wait) = tables.accounts.wait(&account, now, self.window) {
            return refused(RateLimit::LogInAccount, wait);
        }
        if let Some(address) = address
            && let Some(wait) = tables.addresses.wait(&address, now, self.window)
        {
            return refused(RateLimit::LogInAddress, wait);
        }
        tables.accounts.count(&account, now, self.window);
        if let Some(address) = address {
            tables.addresses.count(&address, now, self.window);
        }
        Ok(Attempt { throttle: self.clone(), account, address, at: now, succeeded: false })
    }

    /// Forgets the keys with no failure left in the window.
    pub fn sweep(&self) {
        let horizon = Instant::now().checked_sub(self.window);
        let mut tables = self.tables.lock().unwrap_or_else(|e| e.into_inner());
        tables.accounts.prune(horizon);
        tables.addresses.prune(horizon);
    }
}

/// A log-in attempt under way: a failure unless it [`succeeded`](Attempt::succeeded).
/// Dropped by an error, or by a client that went away, it stays a failure.
#[derive(Debug)]
pub struct Attempt {
    throttle: Arc<LogInThrottle>,
    account: String,
    address: Option<IpAddr>,
    at: Instant,
    succeeded: bool,
}

impl Attempt {
    /// The password was right: the attempt does not count.
    pub fn succeeded(mut self) {
        self.succeeded = true;
        let mut tables = self.throttle.tables.lock().unwrap_or_else(|e| e.into_inner());
        tables.accounts.uncount(&self.account, self.at);
        if let Some(address) = self.address {
            tables.addresses.uncount(&address, self.at);
        }
    }
}

/// Bids per bidder, for the whole process.
pub struct BidThrottle {
    limiter: governor::DefaultKeyedRateLimiter<i64>,
}

impl std::fmt::Debug for BidThrottle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BidThrottle(..)")
    }
}

impl BidThrottle {
    /// `per_second` bids a second per bidder, in bursts of as many.
    pub fn new(per_second: NonZeroU32) -> Self {
        BidThrottle { limiter: governor::RateLimiter::keyed(governor::Quota::per_second(per_second)) }
    }

    /// Counts a bid of `bidder`'s, or says when the next may come.
    pub fn check(&self, bidder: i64) -> Result<(), Refused> {
        use governor::clock::{Clock, DefaultClock};
        self.limiter.check_key(&bidder).map_err(|not_until| {
            metrics::rate_limited(RateLimit::Bids);
            Refused { limit: RateLimit::Bids, retry_after: not_until.wait_time_from(DefaultClock::default().now()) }
        })
    }

    /// Forgets bidders who have not bid for longer than it takes to refill.
    pub fn sweep(&self) {
        self.limiter.retain_recent();
        self.limiter.shrink_to_fit();
    }
}

/// Every rate limit of the process, shared by its cores.
#[derive(Debug)]
pub struct Throttles {
    pub log_in: Arc<LogInThrottle>,
    pub bids: Option<BidThrottle>,
}

impl Throttles {
    /// Forgets what no limit needs any more; every minute or so.
    pub fn sweep(&self) {
        self.log_in.sweep();
        if let Some(bids) = &self.bids {
            bids.sweep();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn throttle(per_account: u32, per_address: u32, window_ms: u64) -> Arc<LogInThrottle> {
        Arc::new(LogInThrottle::new(LogInLimits { per_account, per_address, window: Duration::from_millis(window_ms) }))
    }

    const HOME: Option<IpAddr> = Some(IpAddr::V4(std::net::Ipv4Addr::LOCALHOST));

    #[test]
    fn an_account_is_refused_after_its_limit_of_failures_whatever_the_case() {
        let t = throttle(3, 100, 60_000);
        for email in ["a@x.test", "A@x.test", " a@X.TEST"] {
            drop(t.attempt(email, HOME).expect("under the limit"));
        }
        let refused = t.attempt("a@x.test", HOME).unwrap_err();
        assert_eq!(refused.limit, RateLimit::LogInAccount);
        assert!(refused.retry_after > Duration::from_secs(59) && refused.retry_after <= Duration::from_secs(60));
        assert!(t.attempt("b@x.test", HOME).is_ok(), "another account is not limited");
    }

    #[test]
    fn successes_do_not_count() {
        let t = throttle(2, 2, 60_000);
        for _ in 0..10 {
            t.attempt("a@x.test", HOME).unwrap().succeeded();
        }
        drop(t.attempt("a@x.test", HOME).unwrap());
        drop(t.attempt("a@x.test", HOME).unwrap());
        assert!(t.attempt("a@x.test", HOME).is_err());
    }

    #[test]
    fn an_address_is_refused_after_its_limit_across_accounts() {
        let t = throttle(100, 3, 60_000);
        for i in 0..3 {
            drop(t.attempt(&format!("{i}@x.test"), HOME).unwrap());
        }
        assert_eq!(t.attempt("new@x.test", HOME).unwrap_err().limit, RateLimit::LogInAddress);
        let elsewhere = Some(IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 1)));
        assert!(t.attempt("new@x.test", elsewhere).is_ok());
    }

    #[test]
    fn failures_leave_the_window_as_it_slides() {
        let t = throttle(2, 100, 50);
        drop(t.attempt("a@x.test", HOME).unwrap());
        drop(t.attempt("a@x.test", HOME).unwrap());
        assert!(t.attempt("a@x.test", HOME).is_err());
        std::thread::sleep(Duration::from_millis(60));
        assert!(t.attempt("a@x.test", HOME).is_ok());
    }

    #[test]
    fn a_sweep_forgets_keys_whose_failures_left_the_window() {
        let t = throttle(5, 5, 20);
        drop(t.attempt("a@x.test", HOME).unwrap());
        t.sweep();
        assert_eq!(t.tables.lock().unwrap().accounts.failures.len(), 1);
        std::thread::sleep(Duration::from_millis(30));
        t.sweep();
        let tables = t.tables.lock().unwrap();
        assert!(tables.accounts.failures.is_empty() && tables.addresses.failures.is_empty());
    }

    #[test]
    fn a_zero_limit_is_off() {
        let t = throttle(0, 0, 60_000);
        for _ in 0..50 {
            drop(t.attempt("a@x.test", HOME).unwrap());
        }
    }

    #[test]
    fn a_full_table_forgets_its_stalest_key() {
        let mut w = Windows::new(1);
        let (start, window) = (Instant::now(), Duration::from_secs(60));
        for key in 0..MAX_KEYS as u64 {
            w.count(&key, start + Duration::from_nanos(key), window);
        }
        w.count(&u64::MAX, start + Duration::from_secs(1), window);
        assert_eq!(w.failures.len(), MAX_KEYS);
        assert!(!w.failures.contains_key(&0), "the stalest key left");
        assert!(w.wait(&u64::MAX, start + Duration::from_secs(1), window).is_some());
    }

    #[test]
    fn bids_over_the_rate_are_refused_per_bidder() {
        let t = BidThrottle::new(NonZeroU32::new(2).unwrap());
        assert!(t.check(1).is_ok());
        assert!(t.check(1).is_ok());
        let refused = t.check(1).unwrap_err();
        assert_eq!(refused.limit, RateLimit::Bids);
        assert!(refused.retry_after <= Duration::from_millis(500));
        assert!(t.check(2).is_ok(), "another bidder has its own");
    }
}

//! Read replicas: streaming standbys (`--replica-url`) that take the reads which
//! may be a little behind the primary.
//!
//! Those are bid history, the auction and inventory lists, and a cache miss of an
//! auction that has closed (its bidding is final; its images may still change,
//! and a replica's copy of them may be as old as the lag allows). Everything else
//! stays on the primary: writes, the caches (a replica's answer is never cached)
//! and their reloads, `?consistent=true` reads, and a caller's own bids.
//!
//! **Lag**, measured by position rather than by clock: every quarter of
//! `--replica-max-lag` each core samples the primary's WAL position, then asks
//! each replica how far it has replayed. A replica that has replayed what the
//! primary had at some moment is at most that old; one past `--replica-max-lag`
//! gets no reads until it catches up. Unlike the age of the last replayed
//! transaction (`pg_last_xact_replay_timestamp()`), this reads 0 on a caught-up
//! replica of an idle primary, grows on a replica whose stream was cut silently,
//! and needs no clocks in step.
//!
//! **Faults**: a replica that fails a read, or takes longer than [`READ_WAIT`],
//! is skipped until it next answers a measurement, and the primary answers the
//! read: a replica's trouble costs latency, never an error.

use std::collections::VecDeque;
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use metrics::{Counter, Gauge};
use sqlx::PgPool;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use tokio::sync::watch;

use super::target::{HOST_CONNECT_TIMEOUT, describe};
use super::{DbError, Primary};
use crate::metrics::{ReadSource, ReplicaMetrics};

/// Shortest and longest time between two lag measurements of a replica.
const PROBE_BOUNDS: (Duration, Duration) = (Duration::from_millis(50), Duration::from_secs(1));
/// How long a read on a replica may take before the primary is asked instead.
pub const READ_WAIT: Duration = Duration::from_secs(1);

/// The application name of core `core`'s connections to its replicas.
pub fn application_name(core: usize) -> String {
    format!("gavel-core-{core}-replica")
}

/// A `--replica-url`: one server, `postgres://` or `postgresql://`. The error
/// never quotes the URL (it may hold a password).
pub fn parse_url(url: &str) -> Result<PgConnectOptions, String> {
    if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
        return Err("not a postgres:// URL".into());
    }
    let options = PgConnectOptions::from_str(url).map_err(|e| e.to_string())?;
    if options.get_host().contains(',') {
        return Err("one host per URL (repeat the flag for more replicas)".into());
    }
    Ok(options)
}

/// How one core reaches its replicas.
#[derive(Debug, Clone)]
pub struct ReplicaLimits {
    /// A replica whose replay lags more than this gets no reads.
    pub max_lag: Duration,
    /// Connections to each replica, per core.
    pub conns: u32,
    /// How long a read waits for one of them.
    pub acquire_timeout: Duration,
}

/// One core's replicas.
pub struct Replicas {
    list: Vec<Arc<Replica>>,
    next: AtomicUsize,
    max_lag: Duration,
    routed: [Counter; 2],
}

struct Replica {
    /// `host:port`, as logs and the `replica` label name it.
    name: String,
    pool: PgPool,
    usable: AtomicBool,
    lag_gauge: Gauge,
    usable_gauge: Gauge,
}

impl std::fmt::Debug for Replicas {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<&str> = self.list.iter().map(|r| r.name.as_str()).collect();
        f.debug_struct("Replicas").field("replicas", &names).field("max_lag", &self.max_lag).finish()
    }
}

impl Replica {
    /// Marks the replica in use or not; `why` says why not, for the log.
    fn set_usable(&self, usable: bool, why: impl FnOnce() -> String) {
        let was = self.usable.swap(usable, Ordering::Relaxed);
        self.usable_gauge.set(if usable { 1.0 } else { 0.0 });
        match (was, usable) {
            (false, true) => tracing::info!(replica = %self.name, "read replica in use"),
            (true, false) => tracing::warn!(replica = %self.name, why = %why(), "read replica skipped"),
            _ => {}
        }
    }
}

/// Where the primary's WAL was, by time: the yardstick of a replica's lag.
#[derive(Debug, Default)]
struct Positions(VecDeque<(Instant, i64)>);

impl Positions {
    /// The primary was at `lsn` at `at`; positions older than `keep` go.
    fn record(&mut self, at: Instant, lsn: i64, keep: Duration) {
        match self.0.back_mut() {
            // Still there: a replica at it is as fresh as `at`.
            Some(newest) if newest.1 == lsn => newest.0 = at,
            _ => self.0.push_back((at, lsn)),
        }
        while self.0.front().is_some_and(|(t, _)| at.saturating_duration_since(*t) > keep) {
            self.0.pop_front();
        }
    }

    /// How far behind, at `now`, a replica is that has replayed up to
    /// `replayed`: nothing if it has the newest position, else at most the age of
    /// the newest position it has. `None`: it has none of those kept.
    fn lag(&self, replayed: i64, now: Instant) -> Option<Duration> {
        let newest = self.0.back()?;
        if replayed >= newest.1 {
            return Some(Duration::ZERO);
        }
        self.0.iter().rev().find(|(_, lsn)| *lsn <= replayed).map(|(t, _)| now.saturating_duration_since(*t))
    }
}

impl Replicas {
    /// Core `core`'s pools on `urls`, connecting lazily. Call it inside the
    /// core's runtime, as [`super::core_pool`].
    pub fn open(core: usize, urls: &[PgConnectOptions], limits: &ReplicaLimits) -> Self {
        let list = urls
            .iter()
            .map(|options| {
                let name = describe(options);
                let (lag_gauge, usable_gauge) = ReplicaMetrics::replica(core, &name);
                usable_gauge.set(0.0);
                let pool = PgPoolOptions::new()
                    .max_connections(limits.conns.max(1))
                    .min_connections(0)
                    .acquire_timeout(limits.acquire_timeout)
                    .test_before_acquire(false)
                    .connect_lazy_with(options.clone().application_name(&application_name(core)));
                Arc::new(Replica { name, pool, usable: AtomicBool::new(false), lag_gauge, usable_gauge })
            })
            .collect();
        // Without replicas, no series: every read is the primary's anyway.
        let routed = match urls.is_empty() {
            true => [Counter::noop(), Counter::noop()],
            false => ReplicaMetrics::new(core).routed,
        };
        Replicas { list, next: AtomicUsize::new(0), max_lag: limits.max_lag, routed }
    }

    /// No replicas: every read goes to the primary.
    pub fn none() -> Self {
        Replicas {
            list: Vec::new(),
            next: AtomicUsize::new(0),
            max_lag: Duration::ZERO,
            routed: [Counter::noop(), Counter::noop()],
        }
    }

    /// A usable replica, in turn; `None` when there is none.
    fn pick(&self) -> Option<&Replica> {
        let n = self.list.len();
        if n == 0 {
            return None;
        }
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        (0..n).map(|i| &*self.list[(start + i) % n]).find(|r| r.usable.load(Ordering::Relaxed))
    }

    /// Runs `read` on a usable replica and keeps its answer if `settled` accepts
    /// it; otherwise (no replica, a failed or slow read, an answer the replica
    /// may not have caught up on) runs it on `primary`. Says which answered.
    ///
    /// `read` gets its pool by value (a handle: one reference count), which
    /// keeps the handler's future `Send` where a borrowing closure would not be.
    pub async fn read<T, F>(
        &self,
        primary: &Primary,
        read: impl Fn(PgPool) -> F,
        settled: impl Fn(&T) -> bool,
    ) -> Result<(T, ReadSource), DbError>
    where
        F: Future<Output = Result<T, DbError>>,
    {
        if let Some(replica) = self.pick() {
            match tokio::time::timeout(READ_WAIT, read(replica.pool.clone())).await {
                Ok(Ok(answer)) if settled(&answer) => {
                    self.routed[ReadSource::Replica as usize].increment(1);
                    return Ok((answer, ReadSource::Replica));
                }
                Ok(Ok(_)) => {}
                // Its connections are all busy with reads: this one goes to the
                // primary, and the replica stays in use.
                Ok(Err(DbError::Unavailable(sqlx::Error::PoolTimedOut))) => {}
                Ok(Err(e)) => replica.set_usable(false, || format!("it failed a read ({e}); the primary answered")),
                Err(_) => replica.set_usable(false, || format!("a read took longer than {READ_WAIT:?}")),
            }
        }
        if !self.list.is_empty() {
            self.routed[ReadSource::Primary as usize].increment(1);
        }
        read(primary.pool()).await.map(|answer| (answer, ReadSource::Primary))
    }

    /// Measures every replica's lag against `primary` now and then, until
    /// `shutdown`.
    pub async fn watch(&self, primary: Primary, mut shutdown: watch::Receiver<bool>) {
        if self.list.is_empty() {
            return;
        }
        let every = (self.max_lag / 4).clamp(PROBE_BOUNDS.0, PROBE_BOUNDS.1);
        let keep = self.max_lag + 2 * every;
        let mut positions = Positions::default();
        let mut interval = tokio::time::interval(every);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.changed() => break,
                _ = interval.tick() => {}
            }
            let pool = primary.pool();
            tokio::select! {
                _ = shutdown.changed() => break,
                _ = self.measure(&pool, &mut positions, keep) => {}
            }
        }
        for replica in &self.list {
            replica.pool.close().await;
        }
    }

    /// The primary's position first, then every replica's, all at once: a replica
    /// that has the position just read is caught up.
    async fn measure(&self, primary: &PgPool, positions: &mut Positions, keep: Duration) {
        // Without a new position (the primary busy or away), the kept ones age,
        // and replicas with them.
        if let Ok(Ok(lsn)) = tokio::time::timeout(HOST_CONNECT_TIMEOUT, wal_position(primary)).await {
            positions.record(Instant::now(), lsn, keep);
        }
        let mut probes = tokio::task::JoinSet::new();
        for (index, replica) in self.list.iter().enumerate() {
            let replica = replica.clone();
            probes.spawn(
                async move { (index, tokio::time::timeout(HOST_CONNECT_TIMEOUT, replayed(&replica.pool)).await) },
            );
        }
        let max = self.max_lag;
        while let Some(Ok((index, answer))) = probes.join_next().await {
            let replica = &self.list[index];
            match answer {
                Ok(Ok(Some(replayed))) => match positions.lag(replayed, Instant::now()) {
                    Some(lag) => {
                        replica.lag_gauge.set(lag.as_secs_f64());
                        replica.set_usable(lag <= max, || format!("it lags {lag:?}, more than {max:?}"));
                    }
                    None => {
                        replica.lag_gauge.set(keep.as_secs_f64());
                        replica.set_usable(false, || format!("it lags more than {keep:?}, or the primary is away"));
                    }
                },
                Ok(Ok(None)) => replica.set_usable(false, || "it is not a standby (not in recovery)".into()),
                // Busy with reads: it answers, so it keeps its state.
                Ok(Err(sqlx::Error::PoolTimedOut)) => {}
                Ok(Err(e)) => replica.set_usable(false, || format!("its position cannot be read: {e}")),
                Err(_) => replica.set_usable(false, || format!("it did not answer within {HOST_CONNECT_TIMEOUT:?}")),
            }
        }
    }
}

/// The primary's current WAL position, in bytes.
async fn wal_position(primary: &PgPool) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar!(r#"select (pg_current_wal_lsn() - '0/0'::pg_lsn)::int8 as "lsn!""#).fetch_one(primary).await
}

/// How far a standby has replayed the WAL, in bytes; `None` if it is not in
/// recovery (no standby, or one promoted since).
async fn replayed(replica: &PgPool) -> Result<Option<i64>, sqlx::Error> {
    sqlx::query_scalar!(r#"select (pg_last_wal_replay_lsn() - '0/0'::pg_lsn)::int8 as "lsn""#).fetch_one(replica).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn three() -> Replicas {
        let limits =
            ReplicaLimits { max_lag: Duration::from_secs(1), conns: 1, acquire_timeout: Duration::from_secs(1) };
        let urls: Vec<PgConnectOptions> = (1..=3).map(|i| PgConnectOptions::new().host(&format!("r{i}"))).collect();
        Replicas::open(0, &urls, &limits)
    }

    #[tokio::test]
    async fn reads_take_the_usable_replicas_in_turn() {
        let replicas = three();
        assert!(replicas.pick().is_none(), "none is usable before it is measured");
        for r in &replicas.list {
            r.set_usable(true, String::new);
        }
        replicas.list[1].set_usable(false, String::new);
        let picked: Vec<&str> = (0..4).map(|_| replicas.pick().unwrap().name.as_str()).collect();
        assert!(picked.iter().all(|&n| n != "r2:5432"), "{picked:?}");
        assert!(picked.contains(&"r1:5432") && picked.contains(&"r3:5432"), "{picked:?}");
        for r in &replicas.list {
            r.set_usable(false, String::new);
        }
        assert!(replicas.pick().is_none());
    }

    #[test]
    fn lag_is_the_age_of_the_newest_primary_position_a_replica_has() {
        let start = Instant::now();
        let at = |ms: u64| start + Duration::from_millis(ms);
        let keep = Duration::from_secs(2);
        let mut positions = Positions::default();
        assert_eq!(positions.lag(100, at(0)), None, "nothing to measure against yet");
        positions.record(at(0), 100, keep);
        positions.record(at(250), 200, keep);
        positions.record(at(500), 200, keep);
        assert_eq!(positions.0.len(), 2, "an idle primary adds no position, only freshness");
        assert_eq!(positions.lag(200, at(600)), Some(Duration::ZERO), "caught up");
        assert_eq!(positions.lag(250, at(600)), Some(Duration::ZERO), "ahead of the sample");
        assert_eq!(positions.lag(150, at(600)), Some(Duration::from_millis(600)), "has what the primary had at 0");
        assert_eq!(positions.lag(50, at(600)), None, "older than anything kept");
        positions.record(at(2400), 300, keep);
        assert_eq!(positions.lag(150, at(2400)), None, "positions older than `keep` are gone");
        assert_eq!(positions.lag(200, at(2400)), Some(Duration::from_millis(1900)));
    }

    #[test]
    fn replica_urls_name_one_postgres_server_and_errors_do_not_quote_them() {
        assert_eq!(parse_url("postgres://u:pw@r1:6432/gavel").unwrap().get_port(), 6432);
        for bad in ["mysql://u:secret@r1/gavel", "postgres://u:secret@r1:port/gavel", "postgres://u:secret@r1,r2/gavel"]
        {
            let e = parse_url(bad).unwrap_err();
            assert!(!e.contains("secret"), "{bad}: {e}");
        }
    }
}

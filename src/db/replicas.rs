//! Read replicas: streaming standbys (`--replica-url`) that take the reads which
//! may be a little behind the primary.
//!
//! Those are bid history, the auction and inventory lists, and a cache miss of an
//! auction that has closed: a closed auction's bidding is final, so a standby's
//! copy of it is the primary's. Everything else stays on the primary: writes,
//! the caches and their reloads (they must start from what the notifications
//! follow), `?consistent=true` reads, and a caller's own bids.
//!
//! Each core measures each replica's replay lag every quarter of
//! `--replica-max-lag` and sends reads only to those within it, in turn. A
//! replica that fails a read is skipped until it next answers; the read goes to
//! the primary, so a replica's trouble costs latency, never an error.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use metrics::{Counter, Gauge};
use sqlx::PgPool;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use tokio::sync::watch;

use super::DbError;
use super::target::{HOST_CONNECT_TIMEOUT, describe};
use crate::metrics::{ReadSource, ReplicaMetrics};

/// Shortest and longest time between two lag measurements of a replica.
const PROBE_BOUNDS: (Duration, Duration) = (Duration::from_millis(50), Duration::from_secs(1));

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
    list: Vec<Replica>,
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
                    .connect_lazy_with(options.clone().application_name(&format!("gavel-core-{core}-replica")));
                Replica { name, pool, usable: AtomicBool::new(false), lag_gauge, usable_gauge }
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
        (0..n).map(|i| &self.list[(start + i) % n]).find(|r| r.usable.load(Ordering::Relaxed))
    }

    /// Runs `read` on a usable replica and keeps its answer if `settled` accepts
    /// it; otherwise (no replica, a failed read, an answer the replica may not
    /// have caught up on) runs it on `primary`.
    ///
    /// `read` gets its pool by value (a handle: one reference count), which
    /// keeps the handler's future `Send` where a borrowing closure would not be.
    pub async fn read<T, F>(
        &self,
        primary: &PgPool,
        read: impl Fn(PgPool) -> F,
        settled: impl Fn(&T) -> bool,
    ) -> Result<T, DbError>
    where
        F: Future<Output = Result<T, DbError>>,
    {
        if let Some(replica) = self.pick() {
            match read(replica.pool.clone()).await {
                Ok(answer) if settled(&answer) => {
                    self.routed[ReadSource::Replica as usize].increment(1);
                    return Ok(answer);
                }
                Ok(_) => {}
                Err(e) => replica.set_usable(false, || format!("it failed a read ({e}); the primary answered")),
            }
        }
        if !self.list.is_empty() {
            self.routed[ReadSource::Primary as usize].increment(1);
        }
        read(primary.clone()).await
    }

    /// Measures every replica's lag now and then, until `shutdown`.
    pub async fn watch(&self, mut shutdown: watch::Receiver<bool>) {
        if self.list.is_empty() {
            return;
        }
        let every = (self.max_lag / 4).clamp(PROBE_BOUNDS.0, PROBE_BOUNDS.1);
        let mut interval = tokio::time::interval(every);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.changed() => break,
                _ = interval.tick() => {
                    for replica in &self.list {
                        self.probe(replica).await;
                    }
                }
            }
        }
        for replica in &self.list {
            replica.pool.close().await;
        }
    }

    async fn probe(&self, replica: &Replica) {
        let max = self.max_lag.as_secs_f64();
        match tokio::time::timeout(HOST_CONNECT_TIMEOUT, replay_lag(&replica.pool)).await {
            Ok(Ok(Some(lag))) => {
                replica.lag_gauge.set(lag);
                replica.set_usable(lag <= max, || format!("its replay lags {lag:.3} s, more than {max} s"));
            }
            // Nothing replayed yet, while WAL waits: how far behind is unknown.
            Ok(Ok(None)) => replica.set_usable(false, || "it has replayed nothing yet".into()),
            Ok(Err(e)) => replica.set_usable(false, || format!("its lag cannot be measured: {e}")),
            Err(_) => replica.set_usable(false, || format!("it did not answer within {HOST_CONNECT_TIMEOUT:?}")),
        }
    }
}

/// How far `replica` is behind, in seconds: 0 while it has replayed all the WAL
/// it has received over a live stream (or is no standby at all), else the age of
/// the last transaction it replayed. A standby whose stream is down reports the
/// age of its last replay, so one cut off from its primary ages out of use.
async fn replay_lag(replica: &PgPool) -> Result<Option<f64>, sqlx::Error> {
    sqlx::query_scalar!(
        r#"select case
                 when not pg_is_in_recovery() then 0
                 when exists (select from pg_stat_wal_receiver)
                      and pg_last_wal_receive_lsn() = pg_last_wal_replay_lsn() then 0
                 else extract(epoch from clock_timestamp() - pg_last_xact_replay_timestamp())
               end::float8 as lag_seconds"#
    )
    .fetch_one(replica)
    .await
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
}

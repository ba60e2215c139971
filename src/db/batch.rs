//! Per-core write batching.
//!
//! Each core runs one [`Batcher`] per kind of write (bids, orders). Writes that
//! arrive while the core's batches of that kind are in the database queue up and
//! go together as one statement — one round trip, one transaction, one commit —
//! and each write gets its own outcome back, in arrival order. A batch of one
//! behaves exactly the same; batching only changes how many round trips and
//! commits the writes share (see `bids.rs` for the measured effect).
//!
//! Up to `in_flight` batches of a core are in the database at once, each on its
//! own connection, so writes need not wait for a slow commit they did not join.
//! A batch overlaps another only once `overlap_at` writes wait or the newest batch
//! in flight is older than `overlap_after`: a batch has a fixed cost in the
//! database, and many tiny overlapping batches spend the CPU it needs (the
//! figures are with the flags in `config.rs`). Writes on the same row in two
//! batches are ordered by the database's row lock, as they would be from two
//! cores.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use sqlx::PgPool;
use tokio::sync::{Notify, Semaphore, mpsc, oneshot};
use tokio::time::Instant;

use super::DbError;

/// A kind of write that can be sent to the database in batches.
pub trait BatchWrite: Send + Sync + 'static {
    type Request: Send + Sync + 'static;
    type Outcome: Send + 'static;

    /// Writes `requests` in one statement; returns one outcome per request, in
    /// order. Must have no effect when it fails: the batcher may run it again.
    fn write(
        &self,
        pool: &PgPool,
        requests: &[&Self::Request],
    ) -> impl Future<Output = Result<Vec<Self::Outcome>, DbError>> + Send;

    /// Called with a committed batch's outcomes before they are answered, to hand
    /// off what follows a commit (bids are announced). Must not wait.
    fn committed(&self, outcomes: &[Self::Outcome]) {
        let _ = outcomes;
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    /// The core's queue is full: shed the request with 503.
    #[error("the write queue is full")]
    QueueFull,
    /// The batcher has stopped (the core is shutting down).
    #[error("the batcher has stopped")]
    Stopped,
    /// The batch this write was in failed; every write of the batch shares the cause.
    #[error(transparent)]
    Db(Arc<DbError>),
}

struct Pending<W: BatchWrite> {
    request: W::Request,
    reply: oneshot::Sender<Result<W::Outcome, Arc<DbError>>>,
}

/// Sends one core's writes of one kind to the database in batches. Cheap to clone.
pub struct Batcher<W: BatchWrite> {
    tx: mpsc::Sender<Pending<W>>,
}

impl<W: BatchWrite> Clone for Batcher<W> {
    fn clone(&self) -> Self {
        Batcher { tx: self.tx.clone() }
    }
}

impl<W: BatchWrite> std::fmt::Debug for Batcher<W> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Batcher").field("queued", &(self.tx.max_capacity() - self.tx.capacity())).finish()
    }
}

/// What a batch looked like when it was sent (for metrics).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchStart {
    /// Writes in the batch.
    pub size: usize,
    /// The core's batches of this kind in the database, this one included.
    pub in_flight: usize,
}

/// What a batcher reports as each batch is sent.
pub type BatchObserver = Box<dyn Fn(BatchStart) + Send + 'static>;

/// How a batcher sizes its batches.
#[derive(Debug, Clone, Copy)]
pub struct BatchLimits {
    /// Writes that may wait; past it, new ones are shed.
    pub queue_depth: usize,
    /// Most writes in one batch.
    pub max_batch: usize,
    /// Most batches in the database at once.
    pub in_flight: usize,
    /// Writes that must be waiting before a batch is sent while another is still
    /// in the database (1: as soon as there is room)...
    pub overlap_at: usize,
    /// ...or how long the newest batch in the database must have taken.
    pub overlap_after: Duration,
}

impl BatchLimits {
    /// One batch in the database at a time.
    pub fn one_at_a_time(queue_depth: usize, max_batch: usize) -> Self {
        BatchLimits { queue_depth, max_batch, in_flight: 1, overlap_at: 1, overlap_after: Duration::ZERO }
    }
}

impl<W: BatchWrite> Batcher<W> {
    /// Starts the batcher task on the current runtime (the core's own).
    pub fn spawn(pool: PgPool, writer: W, limits: BatchLimits, observe: BatchObserver) -> Self {
        let (tx, rx) = mpsc::channel(limits.queue_depth.max(1));
        tokio::spawn(run::<W>(pool, Arc::new(writer), rx, limits, observe));
        Batcher { tx }
    }

    /// Queues a write and waits for its outcome. Never waits for queue space: a
    /// full queue is overload, answered at once.
    pub async fn submit(&self, request: W::Request) -> Result<W::Outcome, SubmitError> {
        let (reply, rx) = oneshot::channel();
        self.tx.try_send(Pending { request, reply }).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => SubmitError::QueueFull,
            mpsc::error::TrySendError::Closed(_) => SubmitError::Stopped,
        })?;
        match rx.await {
            Ok(result) => result.map_err(SubmitError::Db),
            Err(_) => Err(SubmitError::Stopped),
        }
    }
}

async fn run<W: BatchWrite>(
    pool: PgPool,
    writer: Arc<W>,
    mut rx: mpsc::Receiver<Pending<W>>,
    limits: BatchLimits,
    observe: BatchObserver,
) {
    let in_flight = limits.in_flight.max(1);
    let max_batch = limits.max_batch.max(1);
    let slots = Arc::new(Semaphore::new(in_flight));
    // Told each time a batch leaves the database.
    let finished = Arc::new(Notify::new());
    let outage = Arc::new(Outage::default());
    let mut batch: Vec<Pending<W>> = Vec::new();
    let mut closed = false;
    let mut last_sent = Instant::now();
    loop {
        if batch.is_empty() && (closed || rx.recv_many(&mut batch, max_batch).await == 0) {
            return;
        }
        while batch.len() < max_batch {
            match rx.try_recv() {
                Ok(pending) => batch.push(pending),
                Err(_) => break,
            }
        }
        // Send now if the database has none of this core's batches. Overlap one in
        // flight only once enough writes wait to make a batch worth its fixed cost,
        // or once the newest batch in flight has taken longer than a batch should
        // (or the queue is closing). Otherwise wait for a batch to finish, for more
        // writes or for that time, whichever comes first.
        let busy = in_flight - slots.available_permits();
        let overdue = last_sent + limits.overlap_after;
        let worth_it = batch.len() >= limits.overlap_at.max(1) || closed || Instant::now() >= overdue;
        if busy > 0 && !(busy < in_flight && worth_it) {
            let room = max_batch - batch.len();
            tokio::select! {
                _ = finished.notified() => {}
                n = rx.recv_many(&mut batch, room), if room > 0 && !closed => {
                    closed = n == 0;
                }
                _ = tokio::time::sleep_until(overdue), if busy < in_flight => {}
            }
            continue;
        }
        let Ok(slot) = slots.clone().try_acquire_owned() else { continue };
        last_sent = Instant::now();
        observe(BatchStart { size: batch.len(), in_flight: busy + 1 });
        // The batch goes to its own task; the next one grows as writes arrive.
        let batch = std::mem::take(&mut batch);
        let (pool, writer, outage, finished) = (pool.clone(), writer.clone(), outage.clone(), finished.clone());
        tokio::spawn(async move {
            let requests: Vec<&W::Request> = batch.iter().map(|p| &p.request).collect();
            let result = retry_transient(|| writer.write(&pool, &requests)).await;
            drop(requests);
            // The batch's connection is back in the pool: the next batch may go.
            drop(slot);
            finished.notify_one();
            match result {
                Ok(results) => {
                    outage.ended();
                    writer.committed(&results);
                    for (pending, result) in batch.into_iter().zip(results) {
                        // The caller may have gone (client gone, timeout): the write stands.
                        let _ = pending.reply.send(Ok(result));
                    }
                }
                Err(e) => {
                    outage.report(&e, batch.len());
                    let e = Arc::new(e);
                    for pending in batch {
                        let _ = pending.reply.send(Err(e.clone()));
                    }
                }
            }
        });
    }
}

/// Logs a database outage once, not once per batch: while the database is away
/// every batch fails, and a line each would flood the log. Each failed request
/// still gets the real cause.
#[derive(Default)]
struct Outage {
    /// Set from the first failed batch for want of the database until the next
    /// batch that succeeds. This core's alone.
    ongoing: AtomicBool,
}

impl Outage {
    #[cold]
    fn report(&self, e: &DbError, writes: usize) {
        match e {
            DbError::Unavailable(cause) => {
                if !self.ongoing.swap(true, Ordering::Relaxed) {
                    tracing::warn!(error = %cause, writes, "batched writes fail: the database is unavailable");
                } else {
                    tracing::debug!(error = %cause, writes, "batched write failed: the database is still unavailable");
                }
            }
            DbError::UnknownAccount | DbError::Other(_) => {
                tracing::error!(error = %e, writes, "batched write failed");
            }
        }
    }

    fn ended(&self) {
        if self.ongoing.load(Ordering::Relaxed) && self.ongoing.swap(false, Ordering::Relaxed) {
            tracing::info!("batched writes succeed again: the database is back");
        }
    }
}

/// How often a batch aborted by a deadlock or serialisation failure is retried.
/// The batch functions take their locks in a fixed order, so this is a safety net.
const TRANSIENT_RETRIES: usize = 3;

/// Runs `attempt` again when the database aborted it as a whole (deadlock,
/// serialisation failure): such a transaction had no effect.
async fn retry_transient<T, F, Fut>(mut attempt: F) -> Result<T, DbError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, DbError>>,
{
    let mut tries = 0;
    loop {
        match attempt().await {
            Err(DbError::Other(sqlx::Error::Database(e)))
                if tries < TRANSIENT_RETRIES && matches!(e.code().as_deref(), Some("40P01" | "40001")) =>
            {
                tries += 1;
                tracing::warn!(error = %e, tries, "batched write aborted by the database; retrying");
            }
            other => return other,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

    use super::*;

    /// Answers each write with itself after `took` (or fails the batch), on a pool
    /// that never connects.
    struct Slow {
        took: Duration,
        fail: bool,
    }

    impl BatchWrite for Slow {
        type Request = u32;
        type Outcome = u32;

        async fn write(&self, _: &PgPool, requests: &[&u32]) -> Result<Vec<u32>, DbError> {
            tokio::time::sleep(self.took).await;
            if self.fail {
                return Err(DbError::Unavailable(sqlx::Error::PoolTimedOut));
            }
            Ok(requests.iter().map(|r| **r).collect())
        }
    }

    type Seen = Arc<Mutex<Vec<BatchStart>>>;

    fn start(limits: BatchLimits, writer: Slow) -> (Batcher<Slow>, Seen) {
        let pool = PgPoolOptions::new().connect_lazy_with(PgConnectOptions::new());
        let seen = Seen::default();
        let log = seen.clone();
        (Batcher::spawn(pool, writer, limits, Box::new(move |b| log.lock().unwrap().push(b))), seen)
    }

    fn submit(batcher: &Batcher<Slow>, n: u32) -> tokio::task::JoinHandle<Result<u32, SubmitError>> {
        let batcher = batcher.clone();
        tokio::spawn(async move { batcher.submit(n).await })
    }

    /// Lets every task run until it waits (time stands still meanwhile).
    async fn settle() {
        for _ in 0..20 {
            tokio::task::yield_now().await;
        }
    }

    fn started(size: usize, in_flight: usize) -> BatchStart {
        BatchStart { size, in_flight }
    }

    /// While a batch is in the database, a few waiting writes wait for it, and
    /// `overlap_at` of them go beside it at once.
    #[tokio::test(start_paused = true)]
    async fn a_second_batch_overlaps_only_once_enough_writes_wait() {
        let limits = BatchLimits {
            queue_depth: 64,
            max_batch: 64,
            in_flight: 2,
            overlap_at: 4,
            overlap_after: Duration::from_secs(3600),
        };
        let (batcher, seen) = start(limits, Slow { took: Duration::from_millis(10), fail: false });
        let mut writes = vec![submit(&batcher, 1)];
        settle().await;
        writes.extend((2..5).map(|n| submit(&batcher, n)));
        settle().await;
        assert_eq!(*seen.lock().unwrap(), [started(1, 1)], "three waiting writes do not overlap");
        writes.push(submit(&batcher, 5));
        settle().await;
        assert_eq!(*seen.lock().unwrap(), [started(1, 1), started(4, 2)], "the fourth makes a batch worth it");
        for (write, n) in writes.into_iter().zip(1..) {
            assert_eq!(write.await.unwrap().unwrap(), n, "each write gets its own outcome");
        }
    }

    /// A batch that has been in the database longer than `overlap_after` lets the
    /// writes behind it go, however few.
    #[tokio::test(start_paused = true)]
    async fn a_slow_batch_lets_the_writes_behind_it_overlap() {
        let limits = BatchLimits {
            queue_depth: 64,
            max_batch: 64,
            in_flight: 2,
            overlap_at: 100,
            overlap_after: Duration::from_millis(5),
        };
        let (batcher, seen) = start(limits, Slow { took: Duration::from_millis(50), fail: false });
        let first = submit(&batcher, 1);
        settle().await;
        let second = submit(&batcher, 2);
        settle().await;
        assert_eq!(*seen.lock().unwrap(), [started(1, 1)]);
        tokio::time::sleep(Duration::from_millis(6)).await;
        settle().await;
        assert_eq!(*seen.lock().unwrap(), [started(1, 1), started(1, 2)]);
        assert_eq!((first.await.unwrap().unwrap(), second.await.unwrap().unwrap()), (1, 2));
    }

    /// One batch at a time: the next waits for the one in the database, whatever
    /// queues meanwhile.
    #[tokio::test(start_paused = true)]
    async fn one_at_a_time_never_overlaps() {
        let (batcher, seen) =
            start(BatchLimits::one_at_a_time(64, 64), Slow { took: Duration::from_millis(10), fail: false });
        let writes: Vec<_> = (1..=20).map(|n| submit(&batcher, n)).collect();
        for write in writes {
            write.await.unwrap().unwrap();
        }
        assert!(seen.lock().unwrap().iter().all(|b| b.in_flight == 1), "{:?}", seen.lock().unwrap());
    }

    /// A failed batch answers every write in it with the batch's own cause.
    #[tokio::test(start_paused = true)]
    async fn a_failed_batch_gives_each_write_the_real_cause() {
        let (batcher, _) =
            start(BatchLimits::one_at_a_time(64, 64), Slow { took: Duration::from_millis(1), fail: true });
        let writes: Vec<_> = (1..=3).map(|n| submit(&batcher, n)).collect();
        for write in writes {
            match write.await.unwrap() {
                Err(SubmitError::Db(e)) => {
                    assert!(matches!(&*e, DbError::Unavailable(sqlx::Error::PoolTimedOut)), "{e}")
                }
                other => panic!("expected the batch's error, got {other:?}"),
            }
        }
    }

    /// A full queue is answered at once, not waited for.
    #[tokio::test(start_paused = true)]
    async fn a_full_queue_is_refused_at_once() {
        let limits = BatchLimits::one_at_a_time(2, 1);
        let (batcher, _) = start(limits, Slow { took: Duration::from_secs(1), fail: false });
        let _first = submit(&batcher, 1);
        settle().await;
        // One waits in the batcher for the next batch, two fill the queue.
        let mut queued = Vec::new();
        for n in 2..=4 {
            queued.push(submit(&batcher, n));
            settle().await;
        }
        let r = batcher.submit(5).await;
        assert!(matches!(r, Err(SubmitError::QueueFull)), "{r:?}");
    }
}

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
//!
//! A kind of write may also share [`Lanes`] across the cores of the process: a
//! batch then waits for a lane before it is sent, and keeps growing while it
//! waits, and the writer gives its lane back once its statement has answered,
//! before its commit. With one lane, the process's batches of that kind run in the
//! database one after another, each as large as the wait made it, while the last
//! one's commit waits for the disk. That is the one thing cores share on the bid
//! path, taken once per batch, never per request; `config.rs` has the figures.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::task::Poll;
use std::time::Duration;

use sqlx::PgPool;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, mpsc, oneshot};
use tokio::time::Instant;

use super::{DbError, Primary};

/// A kind of write that can be sent to the database in batches.
pub trait BatchWrite: Send + Sync + 'static {
    type Request: Send + Sync + 'static;
    type Outcome: Send + 'static;
    /// What a batch of a kind with [`Lanes`] writes on, opened while the batch
    /// waits for its lane so that opening it costs the lane nothing (bids: a
    /// transaction already begun).
    type Opened: Send + 'static;

    /// Opens what the next batch will write on; called as a batch starts to wait
    /// for a lane. The batch's `write` finds it in its [`Lane`].
    fn open(&self, pool: &PgPool) -> impl Future<Output = Result<Self::Opened, DbError>> + Send + 'static;

    /// Writes `requests` in one statement; returns one outcome per request, in
    /// order. Must have no effect when it fails: the batcher may run it again.
    /// `lane` is the batch's turn in the database when the kind has [`Lanes`], with
    /// what [`open`](Self::open) opened for it: give the turn back
    /// ([`Lane::release`]) once nothing more needs it (at the latest it goes back
    /// when the write returns).
    fn write(
        &self,
        pool: &PgPool,
        requests: &[&Self::Request],
        lane: Lane<Self::Opened>,
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
    /// When it was submitted.
    queued: Instant,
    request: W::Request,
    reply: oneshot::Sender<Result<W::Outcome, Arc<DbError>>>,
}

/// Sends one core's writes of one kind to the database in batches. Cheap to clone.
pub struct Batcher<W: BatchWrite> {
    tx: mpsc::Sender<Pending<W>>,
    /// Writes submitted and not yet answered (or given up by their caller).
    outstanding: Arc<AtomicUsize>,
}

impl<W: BatchWrite> Clone for Batcher<W> {
    fn clone(&self) -> Self {
        Batcher { tx: self.tx.clone(), outstanding: self.outstanding.clone() }
    }
}

impl<W: BatchWrite> std::fmt::Debug for Batcher<W> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Batcher").field("queued", &(self.tx.max_capacity() - self.tx.capacity())).finish()
    }
}

/// Turns in the database that the batchers of one kind of write share across the
/// process's cores: at most this many of their batches run in the database at
/// once. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Lanes(Arc<Semaphore>);

impl Lanes {
    /// `count` lanes; at least one.
    pub fn new(count: usize) -> Self {
        Lanes(Arc::new(Semaphore::new(count.max(1))))
    }
}

/// What a kind's [`BatchWrite::open`] is still opening, or has opened.
type Opening<T> = Pin<Box<dyn Future<Output = Result<T, DbError>> + Send>>;

/// A batch's turn in the database, when its kind has [`Lanes`], and what was
/// opened for it meanwhile (only with a turn); the turn goes back on
/// [`release`](Lane::release) or drop.
pub struct Lane<T> {
    turn: Option<OwnedSemaphorePermit>,
    opened: Option<Opening<T>>,
}

impl<T> Default for Lane<T> {
    fn default() -> Self {
        Lane { turn: None, opened: None }
    }
}

impl<T> Lane<T> {
    /// What [`BatchWrite::open`] opened for this batch (waiting for it if it is
    /// not open yet); `None` without a turn, or the second time. A batch with a
    /// turn that does not need its commit inside the turn ends its statement,
    /// releases, then commits.
    pub async fn opened(&mut self) -> Option<Result<T, DbError>> {
        Some(self.opened.take()?.await)
    }

    /// Gives the turn back: the next batch of any core may go.
    pub fn release(&mut self) {
        self.turn = None;
    }
}

/// What a batch looked like when it was sent (for metrics).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchStart {
    /// Writes in the batch.
    pub size: usize,
    /// The core's batches of this kind in the database, this one included.
    pub in_flight: usize,
    /// How long its oldest write waited before the batch was sent: for the
    /// core's batches in the database and for more writes ([`queue`]), then for
    /// a lane ([`lane`]).
    ///
    /// [`queue`]: BatchWaits::queue
    /// [`lane`]: BatchWaits::lane
    pub waits: BatchWaits,
}

/// Where a batch's oldest write waited before the batch was sent; the two add up
/// to that write's wait until then. What the write itself waits for once it has
/// its lane (bids: the rest of their BEGIN) is the kind's to measure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct BatchWaits {
    /// From its submission until the batch took a slot: while the core's earlier
    /// batches were in the database, or the batch waited to be worth sending.
    pub queue: Duration,
    /// From then until the batch had a lane (zero for a kind without lanes).
    pub lane: Duration,
}

/// What a batcher reports as each batch is sent.
pub type BatchObserver = Box<dyn Fn(BatchStart) + Send + 'static>;

/// How a batcher sizes its batches.
#[derive(Debug, Clone)]
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
    /// Turns in the database shared with other cores' batchers of this kind; none:
    /// this core's `in_flight` is the only limit.
    pub lanes: Option<Lanes>,
    /// Longest a batch's write may take. Past it the batch fails as the database
    /// being unavailable, and gives back its lane and its slot: a statement sent
    /// to a server that stopped answering (its machine lost, or frozen) would
    /// otherwise hold them until TCP gives up, and every later batch with them,
    /// even once the core has moved to a new primary. Its requests have been
    /// answered 503 by their own timeout by then.
    pub write_timeout: Duration,
}

/// [`BatchLimits::write_timeout`] where no configuration sets it.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

impl BatchLimits {
    /// One batch in the database at a time.
    pub fn one_at_a_time(queue_depth: usize, max_batch: usize) -> Self {
        BatchLimits {
            queue_depth,
            max_batch,
            in_flight: 1,
            overlap_at: 1,
            overlap_after: Duration::ZERO,
            lanes: None,
            write_timeout: WRITE_TIMEOUT,
        }
    }
}

impl<W: BatchWrite> Batcher<W> {
    /// Starts the batcher task on the current runtime (the core's own).
    pub fn spawn(primary: Primary, writer: W, limits: BatchLimits, observe: BatchObserver) -> Self {
        let (tx, rx) = mpsc::channel(limits.queue_depth.max(1));
        tokio::spawn(run::<W>(primary, Arc::new(writer), rx, limits, observe));
        Batcher { tx, outstanding: Arc::default() }
    }

    /// A reading of how many writes are submitted and not yet answered: how many
    /// callers wait on this core's batches (queued, or in the database).
    pub fn outstanding(&self) -> impl Fn() -> usize + Send + 'static {
        let outstanding = self.outstanding.clone();
        move || outstanding.load(Ordering::Relaxed)
    }

    /// Queues a write and waits for its outcome. Never waits for queue space: a
    /// full queue is overload, answered at once.
    pub async fn submit(&self, request: W::Request) -> Result<W::Outcome, SubmitError> {
        let (reply, rx) = oneshot::channel();
        let _counted = Outstanding::count(&self.outstanding);
        self.tx.try_send(Pending { queued: Instant::now(), request, reply }).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => SubmitError::QueueFull,
            mpsc::error::TrySendError::Closed(_) => SubmitError::Stopped,
        })?;
        match rx.await {
            Ok(result) => result.map_err(SubmitError::Db),
            Err(_) => Err(SubmitError::Stopped),
        }
    }
}

/// One write counted as outstanding until dropped: however its submission ends,
/// its caller gone included.
struct Outstanding<'a>(&'a AtomicUsize);

impl<'a> Outstanding<'a> {
    fn count(counter: &'a AtomicUsize) -> Self {
        counter.fetch_add(1, Ordering::Relaxed);
        Outstanding(counter)
    }
}

impl Drop for Outstanding<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

async fn run<W: BatchWrite>(
    primary: Primary,
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
        let formed = Instant::now();
        // Wait for a lane, if the kind has them, while what the batch writes on is
        // opened; the batch grows meanwhile.
        let lane = match &limits.lanes {
            None => Lane::default(),
            Some(Lanes(lanes)) => {
                let opening_pool = primary.pool();
                let mut opening: Opening<W::Opened> = Box::pin(writer.open(&opening_pool));
                let mut opened = None;
                let turn = loop {
                    let room = max_batch - batch.len();
                    tokio::select! {
                        biased;
                        // Never closed; should it be, the batch goes without.
                        turn = lanes.clone().acquire_owned() => break turn.ok(),
                        result = &mut opening, if opened.is_none() => opened = Some(result),
                        n = rx.recv_many(&mut batch, room), if room > 0 && !closed => {
                            closed = n == 0;
                        }
                    }
                };
                // Still opening: the batch's own task waits for the rest.
                let opened: Opening<W::Opened> = match opened {
                    // The pool was replaced meanwhile (a failover: it may be stuck
                    // on a server that stopped answering, and the lane with it):
                    // open again on the new one.
                    _ if opening_pool.is_closed() => Box::pin(writer.open(&primary.pool())),
                    Some(result) => Box::pin(std::future::ready(result)),
                    None => opening,
                };
                Lane { opened: turn.is_some().then_some(opened), turn }
            }
        };
        last_sent = Instant::now();
        // The batch holds its writes in arrival order: the first waited longest.
        let oldest = batch.first().map_or(formed, |p| p.queued);
        let waits = BatchWaits { queue: formed.duration_since(oldest), lane: last_sent.duration_since(formed) };
        observe(BatchStart { size: batch.len(), in_flight: busy + 1, waits });
        // The batch goes to its own task; the next one grows as writes arrive.
        let batch = std::mem::take(&mut batch);
        let (pool, writer, outage, finished) = (primary.pool(), writer.clone(), outage.clone(), finished.clone());
        let write_timeout = limits.write_timeout;
        let mut task = Box::pin(async move {
            let requests: Vec<&W::Request> = batch.iter().map(|p| &p.request).collect();
            // A retry runs without the lane: the first attempt gave it back.
            let mut lane = Some(lane);
            let write = retry_transient(|| writer.write(&pool, &requests, lane.take().unwrap_or_default()));
            let result = tokio::time::timeout(write_timeout, write).await.unwrap_or_else(|_| {
                Err(DbError::Unavailable(sqlx::Error::Io(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("the batch's write took longer than {write_timeout:?}"),
                ))))
            });
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
        // The first step here, so that the batch is on its way to the database
        // before the tasks already queued on this core run; its own task does the
        // rest.
        if std::future::poll_fn(|cx| Poll::Ready(task.as_mut().poll(cx))).await.is_pending() {
            tokio::spawn(task);
        }
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
    use std::sync::atomic::AtomicUsize;

    use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

    use super::*;

    /// Answers each write with itself after `took` (or fails the batch), on a pool
    /// that never connects; counts what it opened and how many of its writes ran
    /// at once.
    #[derive(Default)]
    struct Slow {
        took: Duration,
        fail: bool,
        counts: Arc<Counts>,
    }

    #[derive(Default)]
    struct Counts {
        opened: AtomicUsize,
        writing: AtomicUsize,
        most_writing: AtomicUsize,
    }

    impl Slow {
        fn taking(took: Duration) -> Self {
            Slow { took, ..Slow::default() }
        }
    }

    impl BatchWrite for Slow {
        type Request = u32;
        type Outcome = u32;
        type Opened = ();

        fn open(&self, _: &PgPool) -> impl Future<Output = Result<(), DbError>> + Send + 'static {
            let counts = self.counts.clone();
            async move {
                counts.opened.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
        }

        async fn write(&self, _: &PgPool, requests: &[&u32], mut lane: Lane<()>) -> Result<Vec<u32>, DbError> {
            if let Some(opened) = lane.opened().await {
                opened?;
            }
            let now = self.counts.writing.fetch_add(1, Ordering::Relaxed) + 1;
            self.counts.most_writing.fetch_max(now, Ordering::Relaxed);
            tokio::time::sleep(self.took).await;
            self.counts.writing.fetch_sub(1, Ordering::Relaxed);
            if self.fail {
                return Err(DbError::Unavailable(sqlx::Error::PoolTimedOut));
            }
            Ok(requests.iter().map(|r| **r).collect())
        }
    }

    type Seen = Arc<Mutex<Vec<BatchStart>>>;

    fn start<W: BatchWrite>(limits: BatchLimits, writer: W) -> (Batcher<W>, Seen) {
        let pool = PgPoolOptions::new().connect_lazy_with(PgConnectOptions::new());
        let seen = Seen::default();
        let log = seen.clone();
        (Batcher::spawn(Primary::new(pool), writer, limits, Box::new(move |b| log.lock().unwrap().push(b))), seen)
    }

    fn submit<W: BatchWrite>(
        batcher: &Batcher<W>,
        request: W::Request,
    ) -> tokio::task::JoinHandle<Result<W::Outcome, SubmitError>> {
        let batcher = batcher.clone();
        tokio::spawn(async move { batcher.submit(request).await })
    }

    /// Lets every task run until it waits (time stands still meanwhile).
    async fn settle() {
        for _ in 0..20 {
            tokio::task::yield_now().await;
        }
    }

    /// A batch as the tests below expect it: its size and the batches in flight.
    fn started(size: usize, in_flight: usize) -> (usize, usize) {
        (size, in_flight)
    }

    /// The batches seen so far, as [`started`] describes them.
    fn shapes(seen: &Seen) -> Vec<(usize, usize)> {
        seen.lock().unwrap().iter().map(|b| (b.size, b.in_flight)).collect()
    }

    /// The batches seen so far: each one's size and where its oldest write waited.
    fn waits(seen: &Seen) -> Vec<(usize, BatchWaits)> {
        seen.lock().unwrap().iter().map(|b| (b.size, b.waits)).collect()
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
            lanes: None,
            write_timeout: WRITE_TIMEOUT,
        };
        let (batcher, seen) = start(limits, Slow::taking(Duration::from_millis(10)));
        let mut writes = vec![submit(&batcher, 1)];
        settle().await;
        writes.extend((2..5).map(|n| submit(&batcher, n)));
        settle().await;
        assert_eq!(shapes(&seen), [started(1, 1)], "three waiting writes do not overlap");
        writes.push(submit(&batcher, 5));
        settle().await;
        assert_eq!(shapes(&seen), [started(1, 1), started(4, 2)], "the fourth makes a batch worth it");
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
            lanes: None,
            write_timeout: WRITE_TIMEOUT,
        };
        let (batcher, seen) = start(limits, Slow::taking(Duration::from_millis(50)));
        let first = submit(&batcher, 1);
        settle().await;
        let second = submit(&batcher, 2);
        settle().await;
        assert_eq!(shapes(&seen), [started(1, 1)]);
        tokio::time::sleep(Duration::from_millis(6)).await;
        settle().await;
        assert_eq!(shapes(&seen), [started(1, 1), started(1, 2)]);
        assert_eq!((first.await.unwrap().unwrap(), second.await.unwrap().unwrap()), (1, 2));
    }

    /// One batch at a time: the next waits for the one in the database, whatever
    /// queues meanwhile.
    #[tokio::test(start_paused = true)]
    async fn one_at_a_time_never_overlaps() {
        let (batcher, seen) = start(BatchLimits::one_at_a_time(64, 64), Slow::taking(Duration::from_millis(10)));
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
            start(BatchLimits::one_at_a_time(64, 64), Slow { fail: true, ..Slow::taking(Duration::from_millis(1)) });
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

    /// Every write counts as outstanding from its submission until it is answered,
    /// or its caller gives up.
    #[tokio::test(start_paused = true)]
    async fn outstanding_writes_are_counted_until_answered_or_abandoned() {
        let (batcher, _) = start(BatchLimits::one_at_a_time(8, 1), Slow::taking(Duration::from_millis(100)));
        let outstanding = batcher.outstanding();
        let first = submit(&batcher, 1);
        let abandoned = submit(&batcher, 2);
        settle().await;
        assert_eq!(outstanding(), 2);
        abandoned.abort();
        settle().await;
        assert_eq!(outstanding(), 1, "a caller gone is not waiting any more");
        assert_eq!(first.await.unwrap().unwrap(), 1);
        assert_eq!(outstanding(), 0);
    }

    /// A full queue is answered at once, not waited for.
    #[tokio::test(start_paused = true)]
    async fn a_full_queue_is_refused_at_once() {
        let limits = BatchLimits::one_at_a_time(2, 1);
        let (batcher, _) = start(limits, Slow::taking(Duration::from_secs(1)));
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

    /// A write that never answers (a server that stopped answering) fails after
    /// `write_timeout`, and gives back its slot: the next batch goes.
    #[tokio::test(start_paused = true)]
    async fn a_write_that_never_answers_fails_and_frees_its_slot() {
        let limits = BatchLimits { write_timeout: Duration::from_secs(10), ..BatchLimits::one_at_a_time(64, 64) };
        let (batcher, seen) = start(limits, Slow::taking(Duration::from_secs(24 * 3600)));
        let started_at = Instant::now();
        let first = submit(&batcher, 1);
        settle().await;
        let second = submit(&batcher, 2);
        for write in [first, second] {
            let r = write.await.unwrap();
            assert!(matches!(r, Err(SubmitError::Db(ref e)) if matches!(**e, DbError::Unavailable(_))), "{r:?}");
        }
        assert_eq!(shapes(&seen), [started(1, 1), started(1, 1)], "one at a time, the second after the first gave up");
        assert_eq!(started_at.elapsed(), Duration::from_secs(20), "each gave up after 10 s");
    }

    fn with_lanes(lanes: &Lanes) -> BatchLimits {
        BatchLimits {
            queue_depth: 64,
            max_batch: 64,
            in_flight: 2,
            overlap_at: 1,
            overlap_after: Duration::ZERO,
            lanes: Some(lanes.clone()),
            write_timeout: WRITE_TIMEOUT,
        }
    }

    /// Two cores' batchers sharing one lane never write at the same time, however
    /// many batches each may have in flight; every write still gets its outcome.
    #[tokio::test(start_paused = true)]
    async fn batchers_sharing_one_lane_write_one_at_a_time() {
        let lanes = Lanes::new(1);
        let counts = Arc::new(Counts::default());
        let writer = || Slow { counts: counts.clone(), ..Slow::taking(Duration::from_millis(3)) };
        let (a, _) = start(with_lanes(&lanes), writer());
        let (b, _) = start(with_lanes(&lanes), writer());
        let mut writes = Vec::new();
        for n in 0..40 {
            writes.push((n, submit(if n % 2 == 0 { &a } else { &b }, n)));
            if n % 5 == 0 {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
        for (n, write) in writes {
            assert_eq!(write.await.unwrap().unwrap(), n);
        }
        assert_eq!(counts.most_writing.load(Ordering::Relaxed), 1, "one lane, one write at a time");
        assert!(counts.opened.load(Ordering::Relaxed) > 0, "batches opened while they waited");
    }

    /// A batch waiting for a lane keeps taking the writes that arrive meanwhile,
    /// and goes as one once the lane is free.
    #[tokio::test(start_paused = true)]
    async fn a_batch_grows_while_it_waits_for_its_lane() {
        let lanes = Lanes::new(1);
        let held = lanes.0.clone().acquire_owned().await.unwrap();
        let writer = Slow::taking(Duration::from_millis(1));
        let counts = writer.counts.clone();
        let (batcher, seen) = start(with_lanes(&lanes), writer);
        let writes: Vec<_> = (1..=5).map(|n| submit(&batcher, n)).collect();
        settle().await;
        assert!(seen.lock().unwrap().is_empty(), "nothing goes while another core holds the lane");
        assert_eq!(counts.opened.load(Ordering::Relaxed), 1, "what it writes on opened while it waited");
        drop(held);
        settle().await;
        assert_eq!(shapes(&seen), [started(5, 1)]);
        for (write, n) in writes.into_iter().zip(1..) {
            assert_eq!(write.await.unwrap().unwrap(), n);
        }
    }

    /// Each batch reports where its oldest write waited: behind the core's batch
    /// in the database, then for the lane; a later write of the batch waited less.
    #[tokio::test(start_paused = true)]
    async fn a_batch_reports_where_its_oldest_write_waited() {
        let (batcher, seen) = start(BatchLimits::one_at_a_time(64, 64), Slow::taking(Duration::from_millis(10)));
        let first = submit(&batcher, 1);
        settle().await;
        tokio::time::sleep(Duration::from_millis(2)).await;
        let second = submit(&batcher, 2);
        tokio::time::sleep(Duration::from_millis(3)).await;
        let third = submit(&batcher, 3);
        for (write, n) in [first, second, third].into_iter().zip(1..) {
            assert_eq!(write.await.unwrap().unwrap(), n);
        }
        assert_eq!(
            waits(&seen),
            [(1, BatchWaits::default()), (2, BatchWaits { queue: Duration::from_millis(8), lane: Duration::ZERO })],
            "the second batch's oldest write waited the 8 ms left of the first batch, its newest 5"
        );

        let lanes = Lanes::new(1);
        let held = lanes.0.clone().acquire_owned().await.unwrap();
        let (batcher, seen) = start(with_lanes(&lanes), Slow::taking(Duration::from_millis(1)));
        let oldest = submit(&batcher, 4);
        settle().await;
        tokio::time::sleep(Duration::from_millis(3)).await;
        let newest = submit(&batcher, 5);
        tokio::time::sleep(Duration::from_millis(4)).await;
        drop(held);
        assert_eq!((oldest.await.unwrap().unwrap(), newest.await.unwrap().unwrap()), (4, 5));
        assert_eq!(
            waits(&seen),
            [(2, BatchWaits { queue: Duration::ZERO, lane: Duration::from_millis(7) })],
            "one batch, grown while it waited 7 ms for another core's lane"
        );
    }

    /// Fails each write with `error()` while `failing` counts down above zero, then
    /// answers each write with itself; each write takes 1 ms, and every batch it
    /// was asked to write is kept in `tried`.
    struct Flaky {
        error: Box<dyn Fn() -> DbError + Send + Sync>,
        failing: Arc<AtomicUsize>,
        tried: Arc<Mutex<Vec<Vec<u32>>>>,
    }

    impl Flaky {
        fn failing(times: usize, error: impl Fn() -> DbError + Send + Sync + 'static) -> Self {
            Flaky { error: Box::new(error), failing: Arc::new(AtomicUsize::new(times)), tried: Arc::default() }
        }
    }

    impl BatchWrite for Flaky {
        type Request = u32;
        /// The request, and which try (from 1) wrote it.
        type Outcome = (u32, usize);
        type Opened = ();

        fn open(&self, _: &PgPool) -> impl Future<Output = Result<(), DbError>> + Send + 'static {
            std::future::ready(Ok(()))
        }

        async fn write(&self, _: &PgPool, requests: &[&u32], _: Lane<()>) -> Result<Vec<(u32, usize)>, DbError> {
            let try_number = {
                let mut tried = self.tried.lock().unwrap();
                tried.push(requests.iter().map(|r| **r).collect());
                tried.len()
            };
            tokio::time::sleep(Duration::from_millis(1)).await;
            match self.failing.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1)) {
                Ok(_) => Err((self.error)()),
                Err(_) => Ok(requests.iter().map(|r| (**r, try_number)).collect()),
            }
        }
    }

    /// A database error with SQLSTATE `.0`, as a server would send it.
    #[derive(Debug)]
    struct Sqlstate(&'static str);

    impl std::fmt::Display for Sqlstate {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "SQLSTATE {}", self.0)
        }
    }

    impl std::error::Error for Sqlstate {}

    impl sqlx::error::DatabaseError for Sqlstate {
        fn message(&self) -> &str {
            self.0
        }

        fn code(&self) -> Option<std::borrow::Cow<'_, str>> {
            Some(self.0.into())
        }

        fn as_error(&self) -> &(dyn std::error::Error + Send + Sync + 'static) {
            self
        }

        fn as_error_mut(&mut self) -> &mut (dyn std::error::Error + Send + Sync + 'static) {
            self
        }

        fn into_error(self: Box<Self>) -> Box<dyn std::error::Error + Send + Sync + 'static> {
            self
        }

        fn kind(&self) -> sqlx::error::ErrorKind {
            sqlx::error::ErrorKind::Other
        }
    }

    /// What a write failing with SQLSTATE `code` returns.
    fn sqlstate(code: &'static str) -> DbError {
        DbError::from(sqlx::Error::Database(Box::new(Sqlstate(code))))
    }

    /// The SQLSTATE a write's answer failed with, if any.
    fn failed_with<T: std::fmt::Debug>(answer: Result<T, SubmitError>) -> Option<String> {
        match answer {
            Err(SubmitError::Db(e)) => match &*e {
                DbError::Other(sqlx::Error::Database(db)) => db.code().map(String::from),
                _ => panic!("expected a database error, got {e:?}"),
            },
            other => panic!("expected the batch's error, got {other:?}"),
        }
    }

    /// A batch the database aborted as a whole (a deadlock, a serialisation
    /// failure) is written again, and its writes get the try that committed.
    #[tokio::test(start_paused = true)]
    async fn a_batch_aborted_by_a_deadlock_or_serialisation_failure_is_retried() {
        for code in ["40P01", "40001"] {
            let writer = Flaky::failing(2, move || sqlstate(code));
            let tried = writer.tried.clone();
            let (batcher, seen) = start(BatchLimits::one_at_a_time(64, 64), writer);
            let writes: Vec<_> = (1..=3).map(|n| submit(&batcher, n)).collect();
            for (write, n) in writes.into_iter().zip(1..) {
                assert_eq!(write.await.unwrap().unwrap(), (n, 3), "{code}: written by the third try");
            }
            assert_eq!(shapes(&seen), [started(3, 1)], "{code}: one batch");
            assert_eq!(*tried.lock().unwrap(), [[1, 2, 3]; 3], "{code}: twice aborted, then committed");
        }
    }

    /// A batch that fails any other way is not written again: its writes get the
    /// failure, though a second try would have succeeded.
    #[tokio::test(start_paused = true)]
    async fn a_batch_that_fails_otherwise_is_not_retried() {
        let writer = Flaky::failing(1, || sqlstate("23505"));
        let tried = writer.tried.clone();
        let (batcher, _) = start(BatchLimits::one_at_a_time(64, 64), writer);
        let writes: Vec<_> = (1..=2).map(|n| submit(&batcher, n)).collect();
        for write in writes {
            assert_eq!(failed_with(write.await.unwrap()).as_deref(), Some("23505"));
        }
        assert_eq!(*tried.lock().unwrap(), [[1, 2]], "one try");
    }

    /// A batch that deadlocks every time is retried three times, then its writes
    /// get the deadlock.
    #[tokio::test(start_paused = true)]
    async fn a_batch_that_keeps_deadlocking_fails_with_the_deadlock_after_three_retries() {
        let writer = Flaky::failing(usize::MAX, || sqlstate("40P01"));
        let tried = writer.tried.clone();
        let (batcher, _) = start(BatchLimits::one_at_a_time(64, 64), writer);
        assert_eq!(failed_with(submit(&batcher, 1).await.unwrap()).as_deref(), Some("40P01"));
        assert_eq!(*tried.lock().unwrap(), [[1]; 4], "the first try and three retries");
    }

    /// The log lines of the crate's code on this thread, each its level and message.
    #[derive(Clone, Default)]
    struct Logged(Arc<Mutex<Vec<(tracing::Level, String)>>>);

    impl Logged {
        /// The lines logged since the last call.
        fn take(&self) -> Vec<(tracing::Level, String)> {
            std::mem::take(&mut *self.0.lock().unwrap())
        }
    }

    impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Logged {
        fn on_event(&self, event: &tracing::Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
            struct Message(String);
            impl tracing::field::Visit for Message {
                fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
                    if field.name() == "message" {
                        self.0 = format!("{value:?}");
                    }
                }
            }
            if event.metadata().target().starts_with("gavel::") {
                let mut message = Message(String::new());
                event.record(&mut message);
                self.0.lock().unwrap().push((*event.metadata().level(), message.0));
            }
        }
    }

    /// While the database is unavailable every batch fails, and each of its writes
    /// gets the real cause; the outage is one warning, the later batches of it
    /// debug lines. The first batch that succeeds again says so, once, and the next
    /// outage warns again.
    #[tokio::test(start_paused = true)]
    async fn an_outage_is_logged_once_and_each_write_keeps_the_real_cause() {
        use tracing::Level;
        use tracing_subscriber::layer::SubscriberExt;

        let logged = Logged::default();
        let _logging = tracing::subscriber::set_default(tracing_subscriber::registry().with(logged.clone()));
        let refused = || {
            let refused = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "connection refused");
            DbError::from(sqlx::Error::Io(refused))
        };
        let writer = Flaky::failing(usize::MAX, refused);
        let (failing, tried) = (writer.failing.clone(), writer.tried.clone());
        let (batcher, _) = start(BatchLimits::one_at_a_time(64, 1), writer);

        let writes: Vec<_> = (1..=5).map(|n| submit(&batcher, n)).collect();
        for write in writes {
            let r = write.await.unwrap();
            let Err(SubmitError::Db(e)) = &r else { panic!("expected the batch's error, got {r:?}") };
            let DbError::Unavailable(sqlx::Error::Io(cause)) = &**e else {
                panic!("expected the real cause, got {e:?}")
            };
            assert_eq!(cause.kind(), std::io::ErrorKind::ConnectionRefused, "{e}");
        }
        assert_eq!(tried.lock().unwrap().len(), 5, "five batches of one, none retried");
        let unavailable = (Level::WARN, "batched writes fail: the database is unavailable".to_owned());
        let still = (Level::DEBUG, "batched write failed: the database is still unavailable".to_owned());
        let back = (Level::INFO, "batched writes succeed again: the database is back".to_owned());
        assert_eq!(logged.take(), [unavailable.clone(), still.clone(), still.clone(), still.clone(), still]);

        failing.store(0, Ordering::Relaxed);
        for n in 6..=7 {
            assert_eq!(batcher.submit(n).await.unwrap().0, n);
        }
        assert_eq!(logged.take(), [back], "once, not once per batch");

        failing.store(1, Ordering::Relaxed);
        assert!(batcher.submit(8).await.is_err());
        assert_eq!(logged.take(), [unavailable], "a new outage warns again");
    }
}

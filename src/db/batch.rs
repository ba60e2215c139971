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
use std::time::{Duration, Instant};

use sqlx::PgPool;
use tokio::sync::{Notify, Semaphore, mpsc, oneshot};

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
    let mut batch: Vec<Pending<W>> = Vec::with_capacity(max_batch);
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
                _ = tokio::time::sleep_until(overdue.into()), if busy < in_flight => {}
            }
            continue;
        }
        last_sent = Instant::now();
        let Ok(slot) = slots.clone().try_acquire_owned() else { continue };
        observe(BatchStart { size: batch.len(), in_flight: busy + 1 });
        let batch = std::mem::replace(&mut batch, Vec::with_capacity(max_batch));
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

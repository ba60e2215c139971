//! Per-core write batching.
//!
//! Each core runs one [`Batcher`] per kind of write (bids, orders). Writes that
//! arrive while the core's previous batch of that kind is in the database queue up
//! and go together as one statement — one round trip, one transaction, one commit —
//! and each write gets its own outcome back, in arrival order. A batch of one
//! behaves exactly the same; batching only changes how many round trips and
//! commits the writes share (see `bids.rs` for the measured effect).

use std::future::Future;

use sqlx::PgPool;
use tokio::sync::{mpsc, oneshot};

use super::DbError;

/// A kind of write that can be sent to the database in batches.
pub trait BatchWrite: Send + 'static {
    type Request: Send + Sync + 'static;
    type Outcome: Send + 'static;

    /// Writes `requests` in one statement; returns one outcome per request, in
    /// order.
    fn write(
        pool: &PgPool,
        requests: &[&Self::Request],
    ) -> impl Future<Output = Result<Vec<Self::Outcome>, DbError>> + Send;
}

#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    /// The core's queue is full: shed the request with 503.
    #[error("the bid queue is full")]
    QueueFull,
    /// The batcher has stopped (the core is shutting down).
    #[error("the bid batcher has stopped")]
    Stopped,
    #[error(transparent)]
    Db(#[from] DbError),
}

struct Pending<W: BatchWrite> {
    request: W::Request,
    reply: oneshot::Sender<Result<W::Outcome, DbError>>,
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

/// What a batcher reports after each batch (for metrics).
pub type BatchObserver = Box<dyn Fn(usize) + Send + 'static>;

impl<W: BatchWrite> Batcher<W> {
    /// Starts the batcher task on the current runtime (the core's own).
    pub fn spawn(pool: PgPool, queue_depth: usize, max_batch: usize, observe: BatchObserver) -> Self {
        let (tx, rx) = mpsc::channel(queue_depth.max(1));
        tokio::spawn(run::<W>(pool, rx, max_batch.max(1), observe));
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
            Ok(result) => Ok(result?),
            Err(_) => Err(SubmitError::Stopped),
        }
    }
}

async fn run<W: BatchWrite>(
    pool: PgPool,
    mut rx: mpsc::Receiver<Pending<W>>,
    max_batch: usize,
    observe: BatchObserver,
) {
    let mut batch: Vec<Pending<W>> = Vec::with_capacity(max_batch);
    loop {
        // Wait for the first write, then take whatever else queued up meanwhile.
        if rx.recv_many(&mut batch, max_batch).await == 0 {
            return;
        }
        observe(batch.len());
        let requests: Vec<&W::Request> = batch.iter().map(|p| &p.request).collect();
        match W::write(&pool, &requests).await {
            Ok(results) => {
                for (pending, result) in batch.drain(..).zip(results) {
                    // The caller may have gone (client gone, timeout): the write stands.
                    let _ = pending.reply.send(Ok(result));
                }
            }
            Err(e) => {
                tracing::error!(error = %e, writes = batch.len(), "batched write failed");
                for pending in batch.drain(..) {
                    let _ = pending.reply.send(Err(match &e {
                        DbError::Unavailable(_) => DbError::Unavailable(sqlx::Error::PoolTimedOut),
                        DbError::UnknownAccount => DbError::UnknownAccount,
                        DbError::Other(_) => DbError::Other(sqlx::Error::Protocol("batched write failed".into())),
                    }));
                }
            }
        }
        batch.clear();
    }
}

/// How often a batch aborted by a deadlock or serialisation failure is retried.
/// The batch functions take their locks in a fixed order, so this is a safety net.
const TRANSIENT_RETRIES: usize = 3;

/// Runs `attempt` again when the database aborted it as a whole (deadlock,
/// serialisation failure): such a transaction had no effect.
pub async fn retry_transient<T, F, Fut>(mut attempt: F) -> Result<T, DbError>
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

//! Bids: the per-core write batcher and the bid history.
//!
//! Each core runs one [`Batcher`]. Bids that arrive while the core's previous batch
//! is in the database queue up and go together as one call of `place_bids` — one
//! statement, one transaction, one commit — and each bid gets its own outcome back,
//! in arrival order. A batch of one behaves exactly the same; batching only changes
//! how many round trips and commits the bids share.

use chrono::{DateTime, Utc};
use sqlx::PgPool;
use tokio::sync::{mpsc, oneshot};

use super::DbError;
use crate::domain::bid::{NewBid, Outcome};

/// One bid waiting for the database.
#[derive(Debug, Clone)]
pub struct BidRequest {
    pub bid: NewBid,
    pub idempotency_key: Option<String>,
}

/// The database's answer to one bid.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BidResult {
    pub outcome: Outcome,
    pub bid_id: Option<i64>,
    pub amount: i64,
    pub min_next_bid: Option<i64>,
    pub ends_at: Option<DateTime<Utc>>,
    /// The auction's new state (the cache notification format), when accepted now.
    pub auction_json: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    /// The core's queue is full: shed the bid with 503.
    #[error("the bid queue is full")]
    QueueFull,
    /// The batcher has stopped (the core is shutting down).
    #[error("the bid batcher has stopped")]
    Stopped,
    #[error(transparent)]
    Db(#[from] DbError),
}

struct Pending {
    request: BidRequest,
    reply: oneshot::Sender<Result<BidResult, DbError>>,
}

/// Sends one core's bids to the database in batches. Cheap to clone.
#[derive(Clone)]
pub struct Batcher {
    tx: mpsc::Sender<Pending>,
}

impl std::fmt::Debug for Batcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Batcher").field("queued", &(self.tx.max_capacity() - self.tx.capacity())).finish()
    }
}

/// What a batcher reports after each batch (for metrics).
pub type BatchObserver = Box<dyn Fn(usize) + Send + 'static>;

impl Batcher {
    /// Starts the batcher task on the current runtime (the core's own).
    pub fn spawn(pool: PgPool, queue_depth: usize, max_batch: usize, observe: BatchObserver) -> Batcher {
        let (tx, rx) = mpsc::channel(queue_depth.max(1));
        tokio::spawn(run(pool, rx, max_batch.max(1), observe));
        Batcher { tx }
    }

    /// Queues a bid and waits for its outcome. Never waits for queue space: a full
    /// queue is overload, answered at once.
    pub async fn submit(&self, request: BidRequest) -> Result<BidResult, SubmitError> {
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

async fn run(pool: PgPool, mut rx: mpsc::Receiver<Pending>, max_batch: usize, observe: BatchObserver) {
    let mut batch: Vec<Pending> = Vec::with_capacity(max_batch);
    loop {
        // Wait for the first bid, then take whatever else queued up meanwhile.
        if rx.recv_many(&mut batch, max_batch).await == 0 {
            return;
        }
        observe(batch.len());
        let requests: Vec<&BidRequest> = batch.iter().map(|p| &p.request).collect();
        match place(&pool, &requests).await {
            Ok(results) => {
                for (pending, result) in batch.drain(..).zip(results) {
                    // The caller may have gone (client gone, timeout): the bid stands.
                    let _ = pending.reply.send(Ok(result));
                }
            }
            Err(e) => {
                tracing::error!(error = %e, bids = batch.len(), "bid batch failed");
                for pending in batch.drain(..) {
                    let _ = pending.reply.send(Err(match &e {
                        DbError::Unavailable(_) => DbError::Unavailable(sqlx::Error::PoolTimedOut),
                        DbError::UnknownAccount => DbError::UnknownAccount,
                        DbError::Other(_) => DbError::Other(sqlx::Error::Protocol("bid batch failed".into())),
                    }));
                }
            }
        }
        batch.clear();
    }
}

#[derive(sqlx::FromRow)]
struct OutcomeRow {
    ord: i32,
    outcome: String,
    bid_id: Option<i64>,
    amount: Option<i64>,
    min_next_bid: Option<i64>,
    ends_at: Option<DateTime<Utc>>,
    auction: Option<String>,
}

/// How often a batch aborted by a deadlock or serialisation failure is retried.
/// `place_bids` takes its locks in a fixed order, so this is a safety net.
const TRANSIENT_RETRIES: usize = 3;

/// Places `requests` in one statement; returns their outcomes in the same order.
/// A batch the database aborted as a whole (deadlock, serialisation failure) had
/// no effect, so it is sent again.
pub async fn place(pool: &PgPool, requests: &[&BidRequest]) -> Result<Vec<BidResult>, DbError> {
    let mut attempt = 0;
    loop {
        match place_once(pool, requests).await {
            Err(DbError::Other(sqlx::Error::Database(e)))
                if attempt < TRANSIENT_RETRIES && matches!(e.code().as_deref(), Some("40P01" | "40001")) =>
            {
                attempt += 1;
                tracing::warn!(error = %e, attempt, "bid batch aborted by the database; retrying");
            }
            other => return other,
        }
    }
}

async fn place_once(pool: &PgPool, requests: &[&BidRequest]) -> Result<Vec<BidResult>, DbError> {
    let n = requests.len();
    let mut auctions = Vec::with_capacity(n);
    let mut bidders = Vec::with_capacity(n);
    let mut amounts = Vec::with_capacity(n);
    let mut keys: Vec<Option<&str>> = Vec::with_capacity(n);
    let mut fingerprints: Vec<Option<String>> = Vec::with_capacity(n);
    for r in requests {
        auctions.push(r.bid.auction_id);
        bidders.push(r.bid.bidder_id);
        amounts.push(r.bid.amount.get());
        keys.push(r.idempotency_key.as_deref());
        fingerprints.push(r.idempotency_key.as_ref().map(|_| r.bid.fingerprint()));
    }
    let rows: Vec<OutcomeRow> = sqlx::query_as(
        "select ord, outcome, bid_id, amount, min_next_bid, ends_at, auction from place_bids($1, $2, $3, $4, $5)",
    )
    .bind(&auctions)
    .bind(&bidders)
    .bind(&amounts)
    .bind(&keys)
    .bind(&fingerprints)
    .fetch_all(pool)
    .await?;
    if rows.len() != n {
        return Err(DbError::Other(sqlx::Error::Protocol(format!(
            "place_bids returned {} outcomes for {n} bids",
            rows.len()
        ))));
    }
    // Rows come back in the order the function visited the bids; put each at its
    // bid's position.
    let mut results: Vec<Option<BidResult>> = vec![None; n];
    for row in rows {
        let i = (row.ord as usize).wrapping_sub(1);
        let outcome = Outcome::parse(&row.outcome).filter(|_| i < n && results[i].is_none()).ok_or_else(|| {
            DbError::Other(sqlx::Error::Protocol(format!("unexpected bid outcome {} at {}", row.outcome, row.ord)))
        })?;
        results[i] = Some(BidResult {
            outcome,
            bid_id: row.bid_id,
            amount: row.amount.unwrap_or(requests[i].bid.amount.get()),
            min_next_bid: row.min_next_bid,
            ends_at: row.ends_at,
            auction_json: row.auction,
        });
    }
    Ok(results.into_iter().flatten().collect())
}

/// One accepted bid, as the history lists it.
#[derive(Debug, Clone, sqlx::FromRow, serde::Serialize)]
pub struct BidRecord {
    pub id: i64,
    pub auction_id: i64,
    pub bidder_id: i64,
    pub amount: i64,
    pub created_at: DateTime<Utc>,
}

/// One page of an auction's bids, newest first, older than `before` when given.
/// `None` when the auction does not exist.
pub async fn history(
    pool: &PgPool,
    auction_id: i64,
    before: Option<i64>,
    limit: i64,
) -> Result<Option<Vec<BidRecord>>, DbError> {
    let rows: Vec<BidRecord> = sqlx::query_as(
        r#"
        select id, auction_id, bidder_id, amount, created_at
          from bids
         where auction_id = $1 and id < coalesce($2, 9223372036854775807)
         order by id desc
         limit $3
        "#,
    )
    .bind(auction_id)
    .bind(before)
    .bind(limit)
    .fetch_all(pool)
    .await?;
    if rows.is_empty() {
        let exists: bool = sqlx::query_scalar("select exists (select 1 from auctions where id = $1)")
            .bind(auction_id)
            .fetch_one(pool)
            .await?;
        if !exists {
            return Ok(None);
        }
    }
    Ok(Some(rows))
}

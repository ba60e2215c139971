//! Bids: the batched write (`place_bids`), its announcement, and the bid history.
//!
//! Bids that arrive on a core while its batches are in the database go together
//! as one call of `place_bids` (see [`super::batch`]), and each bid gets its own
//! outcome back. `place_bids` (its newest version is in
//! migrations/20261203000001; proxy bids came in 20261130000004) does per
//! batch what a single-bid statement does per bid: one lock of the batch's
//! auctions, one write of the auctions and the bids, one commit, decided bid by
//! bid under the row locks. A proxy's answers to a bid are decided there too. A batch is sent
//! sorted by auction, the order the function visits it in, and within one by
//! rising maximum (see [`place`]). With a bid lane (`--bid-lanes`), the batch's
//! statement runs in its own transaction so that the lane goes back before the
//! commit.
//!
//! What it cost, `pgbench -M prepared -c 1` on an idle machine, one call per
//! transaction, `synchronous_commit` off to leave the disk out: the first
//! `place_bids` took 0.57 ms for one bid, 0.98 ms for 16 and 2.38 ms for 64;
//! the second 0.27, 0.73 and 1.87 ms; the later ones' figures are in their
//! migrations.
//! The plain single-bid statement takes 0.17 ms a bid. In `loadtest/compare`,
//! see the README's Performance section.

use std::future::Future;
use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::PgPool;

use tokio::sync::mpsc;

use super::batch::{BatchWrite, Lane};
use super::{CACHE_CHANNEL, DbError, Primary, notice, protocol};
use crate::domain::auction::{BidState, Outbid};
use crate::domain::bid::NewBid;
use crate::metrics::{self, BidWait, Query};

/// One bid waiting for the database.
#[derive(Debug, Clone)]
pub struct BidRequest {
    pub bid: NewBid,
    pub idempotency_key: Option<String>,
}

impl super::Keyed for BidRequest {
    fn idempotency_key(&self) -> Option<(i64, &str)> {
        self.idempotency_key.as_deref().map(|key| (self.bid.bidder_id, key))
    }
}

/// The database's verdict on one bid.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Placed {
    /// The bid leads the auction (now, or when it was first placed, for a replay
    /// of an Idempotency-Key). For a leader raising its own maximum, `bid_id` and
    /// `amount` are those of its leading bid, and `state` is `None`: nothing
    /// anyone else sees changed.
    Accepted {
        bid_id: i64,
        amount: i64,
        min_next_bid: i64,
        ends_at: DateTime<Utc>,
        /// The auction right after this bid; `None` for a replay, which changed
        /// nothing now.
        state: Option<BidState>,
        /// The bidder whose lead this bid took, if another led; `None` for a replay.
        outbid: Option<i64>,
    },
    /// Recorded, then outbid at once by the leader's proxy (its maximum was not
    /// beaten): the auction's price is now `high_bid`.
    Overtaken {
        bid_id: i64,
        /// Who placed it: the bidder to tell it was outbid.
        bidder: i64,
        amount: i64,
        high_bid: i64,
        min_next_bid: i64,
        ends_at: DateTime<Utc>,
        /// The auction right after this bid and the proxy's answer; `None` for a
        /// replay.
        state: Option<BidState>,
    },
    /// Below the minimum next bid, which the database says.
    TooLow {
        min_next_bid: i64,
    },
    /// Not open by the database's clock, or closed.
    Closed,
    NotFound,
    /// The idempotency key was used before with another request.
    KeyMismatch,
    /// The idempotency key's first request is still being processed.
    KeyInUse,
    /// The token names an account that does not exist.
    UnknownAccount,
}

/// Bids, as a batched write: one `place_bids` call per batch, announced after
/// its commit by the core's [`Announcer`].
pub struct Bids {
    announcer: Announcer,
}

impl Bids {
    pub fn new(announcer: Announcer) -> Self {
        Bids { announcer }
    }
}

impl BatchWrite for Bids {
    type Request = BidRequest;
    type Outcome = Placed;
    /// A transaction already begun: beginning costs a round trip, which the lane
    /// need not wait for.
    type Opened = sqlx::Transaction<'static, sqlx::Postgres>;

    fn open(&self, pool: &PgPool) -> impl Future<Output = Result<Self::Opened, DbError>> + Send + 'static {
        let pool = pool.clone();
        async move { Ok(pool.begin().await?) }
    }

    /// Holding a lane, the batch runs in a transaction of its own, begun while it
    /// waited for the lane: the statement, then the lane goes back, then the
    /// commit. So the next batch (of any core) runs while this one's commit waits
    /// for the disk; where the two share an auction, the row lock held until this
    /// commit orders them. The 201s go out only after the commit. Without a lane,
    /// one statement in its own implicit transaction saves the round trips.
    async fn write(
        &self,
        pool: &PgPool,
        requests: &[&BidRequest],
        mut lane: Lane<Self::Opened>,
    ) -> Result<Vec<Placed>, DbError> {
        let turn = std::time::Instant::now();
        let Some(opened) = lane.opened().await else {
            return place(pool, requests).await;
        };
        metrics::bid_wait(BidWait::Begin, turn.elapsed());
        let mut tx = opened?;
        let placed = place(&mut *tx, requests).await;
        lane.release();
        let placed = placed?;
        {
            let _timer = metrics::time_query(Query::CommitBids);
            tx.commit().await?;
        }
        Ok(placed)
    }

    fn committed(&self, outcomes: &[Placed]) {
        let mut states = Vec::new();
        let mut outbid = Vec::new();
        for placed in outcomes {
            match placed {
                Placed::Accepted { state: Some(state), outbid: displaced, .. } => {
                    states.push(*state);
                    outbid.extend(displaced.map(|bidder| Outbid { auction_id: state.auction_id, bidder }));
                }
                Placed::Overtaken { state: Some(state), bidder, .. } => {
                    states.push(*state);
                    outbid.push(Outbid { auction_id: state.auction_id, bidder: *bidder });
                }
                _ => {}
            }
        }
        self.announcer.announce(states, outbid, Utc::now().timestamp_micros());
    }
}

/// Announces what committed bid batches changed, on the cache channel, for the
/// other cores and instances (the core that placed a bid updates its own cache
/// from the bid's answer).
///
/// Not in the batch's transaction: PostgreSQL serialises the commits of notifying
/// transactions (a cluster-wide lock, held until the commit's WAL flush is done),
/// so batches that notify commit one at a time, while batches that do not share
/// their WAL flushes. Measured with `pgbench -M prepared -c 6 -T 5` calling
/// `place_bids` with 16 random bids: 1330 batches/s notifying inside, 1719 with
/// the notification sent after (the same as without any, 1686); the gap grows as
/// the disk's flushes slow down (at 166 synchronous writes/s, every notifying
/// transaction, batch or single bid, managed about 400/s).
///
/// One task per core sends one notification transaction at a time; the states of
/// batches that commit meanwhile go together into the next, newest per auction
/// only. So announcing holds at most one connection of the core's pool, and
/// takes fewer transactions than there are batches under load.
///
/// That transaction does not wait for the disk (`synchronous_commit` off): a
/// notification does not outlive a crash anyway, since every listener reconnects
/// and reloads after one. The price: if gavel dies between a batch's commit and
/// its announcement, the other cores and instances learn of that batch's
/// auctions at their next change. A cache can only under-estimate a minimum, so
/// no bid is decided wrongly meanwhile, and `?consistent=true` is always current.
#[derive(Debug, Clone)]
pub struct Announcer {
    /// One message per committed batch that changed something.
    tx: mpsc::UnboundedSender<Committed>,
}

impl Announcer {
    /// Starts the core's announcer task on the current runtime.
    pub fn spawn(primary: Primary) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(announce_loop(primary, rx));
        Announcer { tx }
    }

    /// Queues a batch's states, and whom it outbid, for the next announcement;
    /// `committed_us` is when its commit was confirmed. Never waits.
    pub fn announce(&self, states: Vec<BidState>, outbid: Vec<Outbid>, committed_us: i64) {
        if !states.is_empty() {
            // Closed only when the core stops, and then nobody is left to tell.
            let _ = self.tx.send(Committed { states, outbid, committed_us });
        }
    }
}

/// A committed batch's changes, waiting for their announcement.
#[derive(Debug)]
struct Committed {
    states: Vec<BidState>,
    outbid: Vec<Outbid>,
    committed_us: i64,
}

/// Most batches drained into one announcement.
const ANNOUNCE_ROUND: usize = 256;
/// Longest an announcement may take: one sent to a server that stopped
/// answering is given up, so those behind it go to the next primary.
const ANNOUNCE_WAIT: Duration = Duration::from_secs(5);

async fn announce_loop(primary: Primary, mut rx: mpsc::UnboundedReceiver<Committed>) {
    let mut batches = Vec::with_capacity(16);
    let mut states = Vec::new();
    let mut outbid = Vec::new();
    while rx.recv_many(&mut batches, ANNOUNCE_ROUND).await > 0 {
        // Stamped with the oldest commit it carries, so that the listeners' lag
        // and the streams' delivery time are counted from the commit, waits for
        // the announcement included.
        let mut at_us = i64::MAX;
        for batch in batches.drain(..) {
            states.extend(batch.states);
            outbid.extend(batch.outbid);
            at_us = at_us.min(batch.committed_us);
        }
        let payloads = notice::encode_bids(&states, &outbid, at_us);
        states.clear();
        outbid.clear();
        let sent = tokio::time::timeout(ANNOUNCE_WAIT, send_notifications(&primary.pool(), &payloads)).await;
        if sent.is_err() {
            tracing::warn!(wait = ?ANNOUNCE_WAIT, "announcing bids timed out; other caches catch up at the auctions' next change");
        }
    }
}

/// Sends payloads on the cache channel in one transaction that does not wait
/// for the disk.
async fn send_notifications(pool: &PgPool, payloads: &[String]) {
    // Once more on a failure: a broken connection is dropped from the pool, and
    // the retry takes another.
    for attempt in 1..=2 {
        let _timer = metrics::time_query(Query::AnnounceBids);
        match sqlx::query!(
            "select set_config('synchronous_commit', 'off', true), pg_notify($1, p) from unnest($2::text[]) as p",
            CACHE_CHANNEL,
            payloads
        )
        // One row of two voids a payload, and few payloads a round.
        .fetch_all(pool)
        .await
        {
            Ok(_) => return,
            Err(e) if attempt == 1 => tracing::debug!(error = %e, "announcing bids failed; retrying"),
            Err(e) => {
                tracing::warn!(error = %e, "announcing bids failed; other caches catch up at the auctions' next change")
            }
        }
    }
}

/// One row of `place_bids`' answer (see its migration for the columns' meaning).
struct OutcomeRow {
    ord: i32,
    outcome: String,
    bid_id: Option<i64>,
    amount: Option<i64>,
    min_next_bid: Option<i64>,
    ends_at: Option<DateTime<Utc>>,
    version: Option<i64>,
    bid_count: Option<i64>,
    closed: Option<bool>,
    outbid: Option<i64>,
    high_bid: Option<i64>,
    high_bidder: Option<i64>,
}

impl OutcomeRow {
    /// The one decoder of `place_bids`' rows: every field an outcome needs must be
    /// there, or the answer is a protocol error (never a 201 with a made-up id).
    fn decode(self, request: &BidRequest) -> Result<Placed, DbError> {
        let missing = || protocol(format!("bid outcome {} without its details", self.outcome));
        // What the auction became, when the bid changed it (never for a replay).
        let state = |high_bid: i64, min_next_bid: i64, ends_at: DateTime<Utc>| -> Result<_, DbError> {
            Ok(match (self.version, self.bid_count) {
                (Some(version), Some(bid_count)) => Some(BidState {
                    auction_id: request.bid.auction_id,
                    version,
                    high_bid,
                    high_bidder: self.high_bidder.ok_or_else(missing)?,
                    bid_count,
                    ends_at,
                    closed: self.closed.unwrap_or(false),
                    min_next_bid,
                }),
                _ => None,
            })
        };
        Ok(match self.outcome.as_str() {
            "accepted" => {
                let amount = self.amount.ok_or_else(missing)?;
                let ends_at = self.ends_at.ok_or_else(missing)?;
                let min_next_bid = self.min_next_bid.ok_or_else(missing)?;
                let state = state(amount, min_next_bid, ends_at)?;
                Placed::Accepted {
                    bid_id: self.bid_id.ok_or_else(missing)?,
                    amount,
                    min_next_bid,
                    ends_at,
                    outbid: state.and(self.outbid),
                    state,
                }
            }
            "outbid" => {
                let high_bid = self.high_bid.ok_or_else(missing)?;
                let ends_at = self.ends_at.ok_or_else(missing)?;
                let min_next_bid = self.min_next_bid.ok_or_else(missing)?;
                Placed::Overtaken {
                    bid_id: self.bid_id.ok_or_else(missing)?,
                    bidder: request.bid.bidder_id,
                    amount: self.amount.ok_or_else(missing)?,
                    high_bid,
                    min_next_bid,
                    ends_at,
                    state: state(high_bid, min_next_bid, ends_at)?,
                }
            }
            "too_low" => Placed::TooLow { min_next_bid: self.min_next_bid.ok_or_else(missing)? },
            "closed" => Placed::Closed,
            "not_found" => Placed::NotFound,
            "key_mismatch" => Placed::KeyMismatch,
            "key_in_use" => Placed::KeyInUse,
            "unknown_account" => Placed::UnknownAccount,
            other => return Err(protocol(format!("unexpected bid outcome {other}"))),
        })
    }
}

/// Places `requests` in one statement; returns their outcomes in the same order.
pub async fn place<'c>(db: impl sqlx::PgExecutor<'c>, requests: &[&BidRequest]) -> Result<Vec<Placed>, DbError> {
    let _timer = metrics::time_query(Query::PlaceBids);
    // A key repeated in the batch is not sent (answered 409 below): sent, it
    // might come first in the order below and take the key from the request
    // that came before it.
    let mut order = super::first_of_each_key(requests);
    // Sent sorted by auction, the order place_bids visits them in (it then has
    // nothing to sort), and within one auction by rising maximum (a plain bid's
    // is its amount), arrival order kept among equal ones (a stable sort), so
    // that of equal maximums the earlier still wins. A batch's bids were all
    // waiting at once, so any order of them is one they could have arrived in;
    // rising amounts refuse none that a higher bid of the same batch made too
    // low. Side by side against arrival order (`loadtest/ab --load
    // '--hot-auctions 10'`, 10 and 20 rounds, 2026-12-03): refused bids 0.95x
    // (fewer in 21 rounds of 30, sign test p = 0.04), accepted bids/s 0.99x and
    // p99 0.98x (p = 1 and 0.82). Most refusals there are not in a batch but
    // between batches: one that commits after another's bids on the same
    // auction.
    order.sort_by_key(|&i| {
        let bid = &requests[i].bid;
        (bid.auction_id, bid.max_amount.unwrap_or(bid.amount).get())
    });
    let n = order.len();
    let mut auctions = Vec::with_capacity(n);
    let mut bidders = Vec::with_capacity(n);
    let mut amounts = Vec::with_capacity(n);
    let mut maxes = Vec::with_capacity(n);
    let mut keys: Vec<Option<&str>> = Vec::with_capacity(n);
    let mut fingerprints: Vec<Option<String>> = Vec::with_capacity(n);
    for r in order.iter().map(|&i| requests[i]) {
        auctions.push(r.bid.auction_id);
        bidders.push(r.bid.bidder_id);
        amounts.push(r.bid.amount.get());
        maxes.push(r.bid.max_amount.map(|m| m.get()));
        keys.push(r.idempotency_key.as_deref());
        fingerprints.push(r.idempotency_key.as_ref().map(|_| r.bid.fingerprint()));
    }
    // `place_bids` declares its outcome's columns without nullability, so every
    // column comes back as an Option but these two, which it always fills.
    // The keys and fingerprints are arrays with null elements, which the
    // macro's type check cannot express (`as _`).
    let rows = sqlx::query_as!(
        OutcomeRow,
        r#"select ord as "ord!", outcome as "outcome!", bid_id, amount, min_next_bid, ends_at, version, bid_count,
                  closed, outbid, high_bid, high_bidder
             from place_bids($1, $2, $3, $4, $5, $6)"#,
        &auctions,
        &bidders,
        &amounts,
        &maxes as _,
        &keys as _,
        &fingerprints as _,
    )
    .fetch_all(db)
    .await?;
    if rows.len() != n {
        return Err(protocol(format!("place_bids returned {} outcomes for {n} bids", rows.len())));
    }
    // Each row names its bid's position in what was sent; put it at the bid's
    // position in the batch.
    let mut results: Vec<Option<Placed>> = vec![None; requests.len()];
    for row in rows {
        let sent = (row.ord as usize).wrapping_sub(1);
        let Some(&i) = order.get(sent).filter(|&&i| results[i].is_none()) else {
            return Err(protocol(format!("place_bids answered for position {} twice or out of range", row.ord)));
        };
        results[i] = Some(row.decode(requests[i])?);
    }
    Ok(results.into_iter().map(|placed| placed.unwrap_or(Placed::KeyInUse)).collect())
}

/// One recorded bid, as the history lists it: never with its maximum.
#[derive(Debug, Clone, serde::Serialize, utoipa::ToSchema)]
#[schema(as = Bid)]
pub struct BidRecord {
    pub id: i64,
    pub auction_id: i64,
    pub bidder_id: i64,
    pub amount: i64,
    /// Placed by the proxy for a bidder's maximum, not by the bidder.
    pub proxy: bool,
    pub created_at: DateTime<Utc>,
}

/// One of the caller's own bids, with the maximum it was placed with.
#[derive(Debug, Clone, serde::Serialize, utoipa::ToSchema)]
#[schema(as = MyBid)]
pub struct OwnBid {
    pub id: i64,
    pub auction_id: i64,
    pub amount: i64,
    /// The maximum up to which the proxy bids for this bid (raised in place while
    /// the bid leads); null for a bid without one.
    pub max_amount: Option<i64>,
    /// Placed by the proxy for the maximum, not by the bidder.
    pub proxy: bool,
    pub created_at: DateTime<Utc>,
}

/// One page of `bidder`'s bids on every auction, newest first, older than
/// `before` when given.
pub async fn of_bidder(pool: &PgPool, bidder: i64, before: Option<i64>, limit: i64) -> Result<Vec<OwnBid>, DbError> {
    let _timer = metrics::time_query(Query::OwnBids);
    Ok(sqlx::query_as!(
        OwnBid,
        r#"
        select id, auction_id, amount, max_amount, proxy, created_at
          from bids
         where bidder_id = $1 and id < coalesce($2, 9223372036854775807)
         order by id desc
         limit $3
        "#,
        bidder,
        before,
        limit
    )
    .fetch_all(pool)
    .await?)
}

/// One page of an auction's bids, newest first, older than `before` when given.
/// `None` when the auction does not exist.
pub async fn history(
    pool: &PgPool,
    auction_id: i64,
    before: Option<i64>,
    limit: i64,
) -> Result<Option<Vec<BidRecord>>, DbError> {
    let _timer = metrics::time_query(Query::BidHistory);
    let rows = sqlx::query_as!(
        BidRecord,
        r#"
        select id, auction_id, bidder_id, amount, proxy, created_at
          from bids
         where auction_id = $1 and id < coalesce($2, 9223372036854775807)
         order by id desc
         limit $3
        "#,
        auction_id,
        before,
        limit
    )
    .fetch_all(pool)
    .await?;
    if rows.is_empty() {
        let exists =
            sqlx::query_scalar!(r#"select exists (select 1 from auctions where id = $1) as "exists!""#, auction_id)
                .fetch_one(pool)
                .await?;
        if !exists {
            return Ok(None);
        }
    }
    Ok(Some(rows))
}

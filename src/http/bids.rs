//! Placing bids.

use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::error::{Error, PROBLEM_JSON, Problem, RateLimitProblems, Result, ServerProblems};
use super::extract::{
    Bidder, Caller, CallerProblems, IdempotencyKey, Json, JsonProblems, Params, QueryProblems, RoleProblems,
};
use super::pagination::{NewestFirst, Page, page_limit};
use super::respond;
use crate::core::Core;
use crate::db;
use crate::db::bids::{BidRequest, OwnBid, Placed};
use crate::domain::bid::{LocalVerdict, NewBid, check_locally};
use crate::metrics::{self, BidOutcome};

pub(crate) fn router() -> OpenApiRouter<Arc<Core>> {
    OpenApiRouter::default().routes(routes!(place_bid)).routes(routes!(my_bids))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct PlaceBid {
    auction_id: i64,
    amount: i64,
    /// A proxy bid: up to this much (at least `amount`), the database bids for
    /// you whenever someone else bids. Never shown to anyone else.
    max_amount: Option<i64>,
}

/// A recorded bid: it leads the auction (`is_winning`), or a proxy bid's
/// maximum outbid it at once.
#[derive(Serialize, ToSchema)]
struct PlacedBid {
    bid_id: i64,
    auction_id: i64,
    /// The amount recorded for this bid: above the amount asked when the proxy
    /// had to raise it to beat another maximum; for a leader raising its own
    /// maximum, its leading bid's amount.
    amount: i64,
    /// The maximum this bid was placed with, if any.
    max_amount: Option<i64>,
    is_winning: bool,
    /// The auction's visible price after this bid.
    high_bid: i64,
    min_next_bid: i64,
    ends_at: DateTime<Utc>,
}

/// Places a bid.
///
/// The bidder is the token's subject, never the body. A bid below this core's
/// cached minimum is rejected here; everything else goes to the database, which
/// alone accepts.
///
/// With `max_amount`, the bid is a proxy bid: whenever someone else bids, the
/// database bids for you at the least amount that beats them, up to your
/// maximum. The visible price is the second-highest maximum plus the
/// increment, capped at the leader's maximum; equal maximums go to the earlier
/// bid. A bid that does not beat the leader's maximum is recorded and outbid at
/// once: 201 with `is_winning: false` and the new `high_bid`. While you lead, a
/// bid with `max_amount` raises only your maximum, not the price; one without
/// raises the price to its amount.
///
/// With `--bids-per-second-per-bidder`, a bidder's bids past that rate get 429.
#[utoipa::path(
    post, path = "/api/bids", tag = "bids",
    params(IdempotencyKey),
    request_body = PlaceBid,
    security(("bearer" = []), ("cookie" = [])),
    responses(
        (status = 201, description = "Recorded: the bid leads, or (`is_winning` false) another bidder's maximum \
         outbid it at once", body = PlacedBid),
        JsonProblems, RoleProblems, ServerProblems, RateLimitProblems,
        (status = 404, description = "No such auction", body = Problem, content_type = PROBLEM_JSON),
        (status = 409, description = "Below the minimum next bid (`min_next_bid` says it), the auction is not open, \
         or this Idempotency-Key's first request is still in progress", body = Problem, content_type = PROBLEM_JSON),
        (status = 422, description = "The body has the wrong shape, invalid field values (listed in `errors`), \
         an invalid Idempotency-Key, or one used before with a different request",
         body = Problem, content_type = PROBLEM_JSON),
    )
)]
async fn place_bid(
    State(core): State<Arc<Core>>,
    Bidder(bidder): Bidder,
    IdempotencyKey(key): IdempotencyKey,
    Json(body): Json<PlaceBid>,
) -> Result<Response> {
    let bid =
        NewBid::parse(body.auction_id, body.amount, body.max_amount, bidder.account_id).map_err(Error::Validation)?;
    if let Some(throttle) = &core.throttles.bids {
        throttle.check(bidder.account_id).map_err(Error::RateLimited)?;
    }
    let max_amount = bid.max_amount.map(|m| m.get());
    // A keyed request always reaches the database, so its first outcome is stored.
    if key.is_none() {
        match core.caches.with_any_auction(bid.auction_id, |a| check_locally(a, bid.amount)) {
            Some(LocalVerdict::TooLow { min_next_bid }) => {
                metrics::bid(BidOutcome::TooLowLocal);
                return Err(Error::BidTooLow { min_next_bid });
            }
            Some(LocalVerdict::Closed) => {
                metrics::bid(BidOutcome::ClosedLocal);
                return Err(Error::AuctionClosed);
            }
            Some(LocalVerdict::AskDatabase) | None => {}
        }
    }
    let placed = match core.bids.submit(BidRequest { bid, idempotency_key: key }).await {
        Ok(placed) => placed,
        Err(e) => {
            metrics::bid(BidOutcome::Shed);
            return Err(e.into());
        }
    };
    let (counted, answer) = match placed {
        Placed::Accepted { bid_id, amount, min_next_bid, ends_at, state, .. } => {
            if let Some(state) = state {
                core.caches.apply_bid(&state);
            }
            let placed = PlacedBid {
                bid_id,
                auction_id: bid.auction_id,
                amount,
                max_amount,
                is_winning: true,
                high_bid: amount,
                min_next_bid,
                ends_at,
            };
            (BidOutcome::Accepted, Ok(respond::json(StatusCode::CREATED, &placed)))
        }
        Placed::Overtaken { bid_id, amount, high_bid, min_next_bid, ends_at, state, .. } => {
            if let Some(state) = state {
                core.caches.apply_bid(&state);
            }
            let placed = PlacedBid {
                bid_id,
                auction_id: bid.auction_id,
                amount,
                max_amount,
                is_winning: false,
                high_bid,
                min_next_bid,
                ends_at,
            };
            (BidOutcome::Outbid, Ok(respond::json(StatusCode::CREATED, &placed)))
        }
        Placed::TooLow { min_next_bid } => (BidOutcome::TooLowDb, Err(Error::BidTooLow { min_next_bid })),
        Placed::Closed => (BidOutcome::Closed, Err(Error::AuctionClosed)),
        Placed::NotFound => (BidOutcome::NotFound, Err(Error::NotFound("no such auction"))),
        Placed::KeyMismatch => (BidOutcome::KeyMismatch, Err(Error::IdempotencyKeyReused)),
        Placed::KeyInUse => (BidOutcome::KeyInUse, Err(Error::IdempotencyKeyInUse)),
        Placed::UnknownAccount => {
            (BidOutcome::UnknownAccount, Err(Error::Unauthorized("the token's account does not exist")))
        }
    };
    metrics::bid(counted);
    answer
}

/// The caller's own bids on every auction, newest first, each with the maximum
/// it was placed with.
///
/// `after` is the `next_after` of the previous page (bids older than it).
#[utoipa::path(
    get, path = "/api/me/bids", tag = "bids",
    params(NewestFirst),
    security(("bearer" = []), ("cookie" = [])),
    responses(
        (status = 200, description = "One page of the caller's bids, newest first", body = Page<OwnBid, i64>),
        CallerProblems, QueryProblems, ServerProblems,
    )
)]
async fn my_bids(
    State(core): State<Arc<Core>>,
    Caller(caller): Caller,
    Params(q): Params<NewestFirst>,
) -> Result<Response> {
    let limit = page_limit(q.limit)?;
    let bids = db::bids::of_bidder(&core.pool(), caller.account_id, q.after, limit).await?;
    Ok(respond::json(StatusCode::OK, &Page::newest_first(bids, limit, |b| b.id)))
}

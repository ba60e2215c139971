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

use super::error::{Error, PROBLEM_JSON, Problem, Result, ServerProblems};
use super::extract::{Bidder, IdempotencyKey, Json, JsonProblems, RoleProblems};
use super::respond;
use crate::core::Core;
use crate::db::bids::{BidRequest, Placed};
use crate::domain::bid::{LocalVerdict, NewBid, check_locally};
use crate::metrics::{self, BidOutcome};

pub(crate) fn router() -> OpenApiRouter<Arc<Core>> {
    OpenApiRouter::default().routes(routes!(place_bid))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct PlaceBid {
    auction_id: i64,
    amount: i64,
}

/// An accepted bid: it leads the auction.
#[derive(Serialize, ToSchema)]
struct PlacedBid {
    bid_id: i64,
    auction_id: i64,
    amount: i64,
    is_winning: bool,
    min_next_bid: i64,
    ends_at: DateTime<Utc>,
}

/// Places a bid.
///
/// The bidder is the token's subject, never the body. A bid below this core's
/// cached minimum is rejected here; everything else goes to the database, which
/// alone accepts.
#[utoipa::path(
    post, path = "/api/bids", tag = "bids",
    params(IdempotencyKey),
    request_body = PlaceBid,
    security(("bearer" = []), ("cookie" = [])),
    responses(
        (status = 201, description = "Accepted: the bid leads", body = PlacedBid),
        JsonProblems, RoleProblems, ServerProblems,
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
    let bid = NewBid::parse(body.auction_id, body.amount, bidder.account_id).map_err(Error::Validation)?;
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
            let placed =
                PlacedBid { bid_id, auction_id: bid.auction_id, amount, is_winning: true, min_next_bid, ends_at };
            (BidOutcome::Accepted, Ok(respond::json(StatusCode::CREATED, &placed)))
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

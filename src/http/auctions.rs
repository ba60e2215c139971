//! Auctions: create, read (from the core's cache), list, and bid history.

use sqlx::PgPool;
use std::sync::Arc;
use std::time::SystemTime;

use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::Response;
use bytes::Bytes;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::error::{Error, PROBLEM_JSON, Problem, Result, ServerProblems};
use super::extract::{Id, IfNoneMatch, Json, JsonProblems, Params, QueryProblems, ReadQuery, RoleProblems, Seller};
use super::pagination::{NewestFirst, Page, page_limit};
use super::respond;
use crate::cache::View;
use crate::core::Core;
use crate::db;
use crate::db::bids::BidRecord;
use crate::domain::auction::{Auction, Draft, NewAuction, Status};
use crate::metrics::ReadSource;

pub(crate) fn router() -> OpenApiRouter<Arc<Core>> {
    OpenApiRouter::default()
        .routes(routes!(list_auctions, create_auction))
        .routes(routes!(get_auction))
        .routes(routes!(list_bids))
}

/// An auction as clients see it.
#[derive(Serialize, ToSchema)]
#[schema(as = Auction)]
pub struct AuctionView<'a> {
    id: i64,
    seller_id: i64,
    title: &'a str,
    status: Status,
    reserve: i64,
    min_increment: i64,
    extend_secs: i32,
    high_bid: Option<i64>,
    high_bidder: Option<i64>,
    bid_count: i64,
    min_next_bid: i64,
    reserve_met: bool,
    winner_id: Option<i64>,
    /// The buy-now price while it is on offer (a bid of at least this much wins at
    /// once); null when the auction has none, or no longer: once a bid has met
    /// the reserve, or the auction has closed.
    buy_now: Option<i64>,
    /// The names of its images, each at `/api/auctions/{id}/images/{name}`.
    images: &'a [String],
    starts_at: DateTime<Utc>,
    ends_at: DateTime<Utc>,
    version: i64,
}

impl<'a> AuctionView<'a> {
    pub fn of(a: &'a Auction, now: DateTime<Utc>) -> Self {
        AuctionView {
            id: a.id,
            seller_id: a.seller_id,
            title: &a.title,
            status: a.status_at(now),
            reserve: a.reserve,
            min_increment: a.min_increment,
            extend_secs: a.extend_secs,
            high_bid: a.high_bid,
            high_bidder: a.high_bidder,
            bid_count: a.bid_count,
            min_next_bid: a.min_next_bid(),
            reserve_met: a.reserve_met(),
            winner_id: a.winner_id,
            buy_now: a.buy_now_offered(now),
            images: &a.images,
            starts_at: a.starts_at,
            ends_at: a.ends_at,
            version: a.version,
        }
    }
}

fn auction_response(status: StatusCode, a: &Auction, now: DateTime<Utc>) -> Response {
    respond::with_etag(respond::json(status, &AuctionView::of(a, now)), a.version)
}

/// The auction's JSON as a read answers it (also the data of its events).
pub fn auction_json(a: &Auction, now: DateTime<Utc>) -> Vec<u8> {
    respond::to_vec(&AuctionView::of(a, now))
}

/// An auction's read response, as the cache keeps it: right until the auction
/// changes or its shown status turns.
fn auction_view(a: &Auction, now: DateTime<Utc>) -> View {
    respond::view(&AuctionView::of(a, now), a.version, a.status_turns_at(now))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct CreateAuction {
    title: String,
    reserve: i64,
    min_increment: i64,
    starts_at: DateTime<Utc>,
    ends_at: DateTime<Utc>,
    extend_secs: Option<i64>,
    /// A buy-now price, at least the reserve: until a bid meets the reserve, a bid
    /// of at least this much closes the auction at once and wins at this price.
    buy_now: Option<i64>,
}

/// Creates an auction whose seller is the caller.
#[utoipa::path(
    post, path = "/api/auctions", tag = "auctions",
    request_body = CreateAuction,
    security(("bearer" = []), ("cookie" = [])),
    responses(
        (status = 201, description = "Created", body = AuctionView, headers(
            ("Location" = String, description = "The new auction's URL"),
            ("ETag" = String, description = "The auction's version"),
        )),
        JsonProblems, RoleProblems, ServerProblems,
        (status = 422, description = "The body has the wrong shape, or invalid field values (listed in `errors`)",
         body = Problem, content_type = PROBLEM_JSON),
    )
)]
async fn create_auction(
    State(core): State<Arc<Core>>,
    Seller(seller): Seller,
    Json(body): Json<CreateAuction>,
) -> Result<Response> {
    let now = Utc::now();
    let draft = Draft {
        title: &body.title,
        reserve: body.reserve,
        min_increment: body.min_increment,
        starts_at: body.starts_at,
        ends_at: body.ends_at,
        extend_secs: body.extend_secs,
        buy_now: body.buy_now,
    };
    let new = NewAuction::parse(&draft, now).map_err(Error::Validation)?;
    let auction = db::auctions::insert(&core.pool(), seller.account_id, &new).await?;
    let mut response = auction_response(StatusCode::CREATED, &auction, now);
    if let Ok(location) = HeaderValue::try_from(format!("/api/auctions/{}", auction.id)) {
        response.headers_mut().insert(header::LOCATION, location);
    }
    core.caches.apply_auction(auction);
    Ok(response)
}

/// `GET /api/auctions/{id}` when the core's live cache holds the auction (also
/// answered before routing, by [`super::hot`]).
pub(crate) fn cached_read<B: From<Bytes> + Default>(
    core: &Core,
    id: i64,
    now: SystemTime,
    tags: Option<&HeaderValue>,
) -> Option<axum::http::Response<B>> {
    cached_view(core, id, now).map(|view| respond::cached(view, tags))
}

/// The cached auction's rendered read, if the core's live cache holds it.
pub(crate) fn cached_view(core: &Core, id: i64, now: SystemTime) -> Option<View> {
    core.caches.auction_view(id, now, auction_view)
}

/// An auction.
///
/// From the core's cache while it is live; from the database with
/// `?consistent=true`, on a miss, or while the cache is recovering.
#[utoipa::path(
    get, path = "/api/auctions/{id}", tag = "auctions",
    params(Id, ReadQuery, IfNoneMatch),
    responses(
        (status = 200, description = "The auction", body = AuctionView, headers(
            ("ETag" = String, description = "The auction's version"),
            ("Cache-Control" = String, description = "no-cache: keep the body if you like, but revalidate it with If-None-Match before each use, because a price can change any millisecond; revalidating costs a 304 with no body"),
        )),
        (status = 304, description = "The auction is still the version `If-None-Match` names", headers(
            ("ETag" = String, description = "The auction's version"),
            ("Cache-Control" = String, description = "no-cache: keep the body if you like, but revalidate it with If-None-Match before each use, because a price can change any millisecond; revalidating costs a 304 with no body"),
        )),
        QueryProblems, ServerProblems,
        (status = 404, description = "No such auction", body = Problem, content_type = PROBLEM_JSON),
    )
)]
async fn get_auction(
    State(core): State<Arc<Core>>,
    Id(id): Id,
    Params(q): Params<ReadQuery>,
    IfNoneMatch(tags): IfNoneMatch,
) -> Result<Response> {
    let now = SystemTime::now();
    if !q.consistent
        && let Some(response) = cached_read(&core, id, now, tags.as_ref())
    {
        return Ok(response);
    }
    let (found, source) = match q.consistent {
        true => (db::auctions::get(&core.pool(), id).await?, ReadSource::Primary),
        // A closed auction's bidding is final: a replica's copy of it will do.
        // Anything else, or nothing yet, is the primary's to answer.
        false => {
            let read = |db: PgPool| async move { db::auctions::get(&db, id).await };
            core.replicas.read(&core.primary, read, |found| found.as_ref().is_some_and(|a| a.closed)).await?
        }
    };
    let auction = found.ok_or(Error::NotFound("no such auction"))?;
    let view = auction_view(&auction, now.into());
    // The caches hold what the primary says, never a replica's copy.
    if source == ReadSource::Primary {
        core.caches.apply_auction(auction);
    }
    Ok(respond::cached(view, tags.as_ref()))
}

#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
struct ListQuery {
    /// Only auctions in this state.
    status: Option<Status>,
    /// The `next_after` of the previous page: auctions with a greater id.
    after: Option<i64>,
    /// Page size, 1 to 100; 20 when not given.
    limit: Option<i64>,
}

/// Auctions by ascending id; keyset pagination with `after`.
#[utoipa::path(
    get, path = "/api/auctions", tag = "auctions",
    params(ListQuery),
    responses(
        (status = 200, description = "One page of auctions", body = Page<AuctionView, i64>),
        QueryProblems, ServerProblems,
    )
)]
async fn list_auctions(State(core): State<Arc<Core>>, Params(q): Params<ListQuery>) -> Result<Response> {
    let limit = page_limit(q.limit)?;
    let after = q.after.unwrap_or(0);
    let status = q.status;
    let read = |db: PgPool| async move { db::auctions::list(&db, status, after, limit).await };
    let (auctions, _) = core.replicas.read(&core.primary, read, |_| true).await?;
    let now = Utc::now();
    let next_after = (auctions.len() as i64 == limit).then(|| auctions.last().map(|a| a.id)).flatten();
    let items: Vec<AuctionView<'_>> = auctions.iter().map(|a| AuctionView::of(a, now)).collect();
    Ok(respond::json(StatusCode::OK, &Page { items, next_after }))
}

/// An auction's recorded bids, newest first.
///
/// `after` is the `next_after` of the previous page (bids older than it).
/// `proxy` marks the bids the proxy placed for a bidder's maximum; maximums
/// themselves are never shown here.
#[utoipa::path(
    get, path = "/api/auctions/{id}/bids", tag = "auctions",
    params(Id, NewestFirst),
    responses(
        (status = 200, description = "One page of bids, newest first", body = Page<BidRecord, i64>),
        QueryProblems, ServerProblems,
        (status = 404, description = "No such auction", body = Problem, content_type = PROBLEM_JSON),
    )
)]
async fn list_bids(State(core): State<Arc<Core>>, Id(id): Id, Params(q): Params<NewestFirst>) -> Result<Response> {
    let limit = page_limit(q.limit)?;
    // An auction a replica does not know yet may be new: the primary decides.
    let after = q.after;
    let read = |db: PgPool| async move { db::bids::history(&db, id, after, limit).await };
    let (bids, _) = core.replicas.read(&core.primary, read, Option::is_some).await?;
    let bids = bids.ok_or(Error::NotFound("no such auction"))?;
    Ok(respond::json(StatusCode::OK, &Page::newest_first(bids, limit, |b| b.id)))
}

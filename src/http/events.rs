//! Event streams of auctions (`text/event-stream`), served by the core's
//! [`Hub`](crate::events::Hub) from its notifications: see [`crate::events`] for
//! the frames and what a slow watcher costs.

use std::sync::Arc;

use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::Response;
use chrono::Utc;
use serde::Deserialize;
use utoipa::IntoParams;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::body::Handoff;
use super::error::{Error, PROBLEM_JSON, Problem, Result, ServerProblems};
use super::extract::{Caller, CallerProblems, Id, Params, QueryProblems};
use crate::core::Core;
use crate::db;
use crate::events::{Connection, EventStream, Refused};

/// Auctions one stream may watch.
pub const MAX_STREAM_AUCTIONS: usize = 100;

/// How many times a stream's first read is made when changes keep arriving
/// during it; past that the stream is refused as overloaded (503).
const MAX_FIRST_READS: usize = 3;

pub(crate) fn router() -> OpenApiRouter<Arc<Core>> {
    OpenApiRouter::default().routes(routes!(auction_events)).routes(routes!(events)).routes(routes!(my_events))
}

/// One auction's changes, as they happen.
///
/// Server-Sent Events. The first event is the auction's current state (`event:
/// auction`, `id:` its version, `data:` the same JSON as `GET
/// /api/auctions/{id}`); every later state follows, oldest first, and a reader
/// too slow for them gets only the newest. When the auction closes, `event:
/// closed` carries its final state and winner, and the stream ends. With
/// `Last-Event-ID` naming the current version nothing is sent until the next
/// change; an older one gets the current state (states are complete). A comment
/// line (`: heartbeat`) comes every `--stream-heartbeat`; on shutdown the stream
/// ends with a `retry:` hint.
#[utoipa::path(
    get, path = "/api/auctions/{id}/events", tag = "auctions",
    params(Id, ("Last-Event-ID" = Option<i64>, Header, description = "The version last received; the current state is sent only if it is newer")),
    responses(
        (status = 200, description = "The auction's events", content_type = "text/event-stream", body = String),
        ServerProblems,
        (status = 404, description = "No such auction", body = Problem, content_type = PROBLEM_JSON),
    )
)]
async fn auction_events(
    State(core): State<Arc<Core>>,
    connection: Connection,
    Id(id): Id,
    headers: HeaderMap,
) -> Result<Response> {
    open(&core, &[id], last_event_id(&headers), connection).await.map(stream_response)
}

/// The version a reconnecting client says it has (`Last-Event-ID`). Anything but
/// an integer is as if none were sent: the client gets the current state.
fn last_event_id(headers: &HeaderMap) -> Option<i64> {
    headers.get("last-event-id")?.to_str().ok()?.trim().parse().ok()
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct Watch {
    /// Up to 100 auction ids, comma-separated.
    auctions: Option<String>,
}

/// Several auctions' changes in one stream.
///
/// Server-Sent Events, as `GET /api/auctions/{id}/events` sends them for each of
/// up to 100 auctions (`?auctions=ID,ID,…`): first each one's current state, then
/// their changes, each auction's oldest first. Each auction's `closed` event is
/// its last; the stream ends when every one has closed. `Last-Event-ID` is not
/// used: a reconnected stream starts with every current state.
#[utoipa::path(
    get, path = "/api/events", tag = "auctions",
    params(Watch),
    responses(
        (status = 200, description = "The auctions' events", content_type = "text/event-stream", body = String),
        QueryProblems, ServerProblems,
        (status = 404, description = "One of the auctions does not exist", body = Problem, content_type = PROBLEM_JSON),
    )
)]
async fn events(
    State(core): State<Arc<Core>>,
    connection: Connection,
    Params(watch): Params<Watch>,
) -> Result<Response> {
    let ids = parse_ids(watch.auctions.as_deref().unwrap_or(""))?;
    open(&core, &ids, None, connection).await.map(stream_response)
}

/// The events that concern the caller alone.
///
/// Server-Sent Events for the token's account, and nobody else's: `event:
/// outbid` the moment a bid takes the caller's lead, with `data: {auction_id,
/// high_bid, min_next_bid, ends_at}` of the auction as that bid left it; `event:
/// won` or `event: lost` with `data: {auction_id, high_bid}` when an auction the
/// caller bid on closes (at its end, or by a buy-now); `event: order` with
/// `data: {order_id, status}` when one of the caller's orders is placed
/// (`reserved`), cancelled or fulfilled. `id:` is the auction's version (for
/// `order`, the order's change time in microseconds); a caller too slow to read
/// gets only the newest per auction and per order. Also a `: heartbeat` comment every
/// `--stream-heartbeat`, and on shutdown a `retry:` hint before the end. The
/// stream does not end by itself.
#[utoipa::path(
    get, path = "/api/me/events", tag = "accounts",
    security(("bearer" = []), ("cookie" = [])),
    responses(
        (status = 200, description = "The caller's events", content_type = "text/event-stream", body = String),
        CallerProblems, ServerProblems,
    )
)]
async fn my_events(State(core): State<Arc<Core>>, Caller(caller): Caller) -> Result<Response> {
    let slot = reserve(&core)?;
    Ok(stream_response(core.events.subscribe_account(slot, caller.account_id, caller.session)))
}

fn reserve(core: &Core) -> Result<crate::events::Slot> {
    core.events.reserve().map_err(|refused| match refused {
        Refused::Full => Error::Overloaded,
        Refused::Draining => Error::NotReady("the server is shutting down"),
    })
}

/// The ids of `?auctions=`: 1 to [`MAX_STREAM_AUCTIONS`] positive integers, each
/// once.
fn parse_ids(list: &str) -> Result<Vec<i64>> {
    let invalid =
        || Error::InvalidQuery(format!("auctions must be 1 to {MAX_STREAM_AUCTIONS} comma-separated auction ids"));
    let mut ids = Vec::new();
    for part in list.split(',') {
        let id = part.trim().parse::<i64>().ok().filter(|id| *id > 0).ok_or_else(invalid)?;
        if !ids.contains(&id) {
            // Stops at the first id too many, whatever the length of the list.
            if ids.len() == MAX_STREAM_AUCTIONS {
                return Err(invalid());
            }
            ids.push(id);
        }
    }
    Ok(ids)
}

/// Opens a stream of `ids`, reading the states the hub does not hold from the
/// cache, or else from the database.
async fn open(core: &Core, ids: &[i64], last: Option<i64>, connection: Connection) -> Result<EventStream> {
    let slot = reserve(core)?;
    let now = Utc::now();
    let (opening, mut wanted) = core.events.opening(ids, now);
    for _ in 0..MAX_FIRST_READS {
        if wanted.is_empty() {
            break;
        }
        let mut read = Vec::with_capacity(wanted.len());
        let mut missed = Vec::new();
        for id in wanted {
            match core.caches.auction(id) {
                // This core's listener may not have heard a close that another
                // core's watchers have had already: the database says. A watcher
                // who comes after the close then starts from it, on any core.
                Some(cached) if !cached.close_unheard(now) => read.push(cached),
                _ => missed.push(id),
            }
        }
        // One read per auction and core: what another stream is reading, wait for.
        let (reading, theirs) = core.events.claim(missed);
        if !reading.ids().is_empty() {
            read.extend(db::auctions::get_many(&core.pool(), reading.ids()).await?);
        }
        wanted = reading.install(read);
        for waiting in theirs {
            let id = waiting.id;
            if !waiting.settled().await {
                wanted.push(id);
            }
        }
    }
    if !wanted.is_empty() {
        // Changes kept overtaking the reads, or the reads kept failing: the
        // auction may well exist, so not a 404.
        return Err(Error::Overloaded);
    }
    core.events.subscribe(slot, opening, last, connection).map_err(|_| Error::NotFound("no such auction"))
}

/// The stream goes out as the response's body: handed over past the router's
/// layers, so that it is polled without a box around it (see [`super::body`]).
fn stream_response(stream: EventStream) -> Response {
    let mut response = Handoff::response(stream);
    *response.status_mut() = StatusCode::OK;
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    // nginx and others buffer responses unless told not to.
    headers.insert("x-accel-buffering", HeaderValue::from_static("no"));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auction_lists_are_positive_ids_at_most_a_hundred() {
        assert_eq!(parse_ids("3,1, 2,3").unwrap(), [3, 1, 2]);
        let hundred = (1..=100).map(|i| i.to_string()).collect::<Vec<_>>().join(",");
        assert_eq!(parse_ids(&hundred).unwrap().len(), 100);
        let too_many = (1..=101).map(|i| i.to_string()).collect::<Vec<_>>().join(",");
        for bad in ["", "1,,2", "0", "-4", "x", "1;2", &too_many] {
            assert!(parse_ids(bad).is_err(), "{bad:?}");
        }
        let repeated = [hundred.as_str(); 50].join(",");
        assert_eq!(parse_ids(&repeated).unwrap().len(), 100, "repeats count once");
    }

    #[test]
    fn a_last_event_id_that_is_no_version_is_ignored() {
        let with = |value: &str| {
            let mut headers = HeaderMap::new();
            headers.insert("last-event-id", HeaderValue::from_str(value).unwrap());
            last_event_id(&headers)
        };
        assert_eq!(with("42"), Some(42));
        assert_eq!(with(" 7 "), Some(7));
        for bad in ["", "abc", "4.2", "99999999999999999999", "1,2"] {
            assert_eq!(with(bad), None, "{bad:?}");
        }
        assert_eq!(last_event_id(&HeaderMap::new()), None);
    }
}

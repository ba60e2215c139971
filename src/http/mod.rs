//! The public HTTP API: one router per resource, merged here, and the OpenAPI
//! document the same `#[utoipa::path]` attributes generate (see [`openapi`]).

pub mod activity;
pub mod body;
pub mod error;
pub mod extract;
pub mod hot;
pub mod openapi;
pub mod pagination;
pub mod per_request;
pub mod request_id;
pub mod respond;

mod accounts;
mod auctions;
mod bids;
mod events;
mod health;
mod images;
mod inventory;
mod orders;

use std::sync::Arc;

use axum::Router;
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;

use crate::core::Core;
pub use auctions::{AuctionView, auction_json};
pub use error::Error;

/// The whole public API for one core, as it is served: the hot reads straight
/// from the cache (see [`hot`]), everything else through [`router`].
pub fn app(core: Arc<Core>) -> hot::App {
    hot::App::new(core.clone(), router(core))
}

/// Every route of the public API for one core.
pub fn router(core: Arc<Core>) -> Router {
    let (api, document) = documented().split_for_parts();
    let router = api
        .merge(openapi::router(&document))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(compression());
    // Inside the per-request layer, so that preflights get a request id and are
    // counted like any request.
    let router = match cors(&core.web) {
        Some(cors) => router.layer(cors),
        None => router,
    };
    router.layer(per_request::PerRequestLayer { timeout: core.limits.request_timeout }).with_state(core)
}

/// Bodies below this many bytes go out as they are. Compressing a cached
/// auction (about 330 bytes) would save little more than its headers' worth,
/// and those bodies are the ones read 130K times a second, where one more µs
/// per read is about 10 % (and the hot path never compresses); lists, bid
/// history and the OpenAPI document are several KiB to hundreds.
pub const COMPRESS_FROM: u16 = 1024;

/// gzip, br or zstd, as `Accept-Encoding` asks, for bodies of [`COMPRESS_FROM`]
/// bytes and more, at each one's fastest level; never for event streams (each
/// event must go out whole, now), nor for images.
///
/// Measured with `h2load --h1 -c 16 -t 2 -D 3` on `GET /api/auctions?limit=N`
/// (2026-11-30, one run each): 10 auctions, 3.3 KB, went out as 0.45–0.55 KB;
/// 100 auctions, 32.7 KB, as 2.0–3.2 KB, at 0.76–1.27× the requests a second
/// of no compression on loopback, where bytes cost nothing (the lists are bound
/// by their query; the spread is noise). At the default levels, br answered
/// 0.27–0.39× as many, hence the fastest levels.
fn compression() -> tower_http::compression::CompressionLayer<impl tower_http::compression::Predicate> {
    use tower_http::compression::predicate::{NotForContentType, Predicate, SizeAbove};
    let predicate = SizeAbove::new(COMPRESS_FROM - 1)
        .and(NotForContentType::const_new("text/event-stream"))
        .and(NotForContentType::IMAGES)
        .and(NotForContentType::GRPC);
    tower_http::compression::CompressionLayer::new()
        .quality(tower_http::CompressionLevel::Fastest)
        .compress_when(predicate)
}

/// How long a browser may keep a preflight's answer.
const PREFLIGHT_MAX_AGE: std::time::Duration = std::time::Duration::from_secs(600);

/// Cross-origin access for `--cors-origin`s, with credentials; `None` for none.
/// Requests with an `Origin` skip the hot path (see [`hot`]) and come here.
fn cors(web: &crate::core::Web) -> Option<tower_http::cors::CorsLayer> {
    use axum::http::{HeaderName, Method, header};
    if web.cors_origins.is_empty() {
        return None;
    }
    Some(
        tower_http::cors::CorsLayer::new()
            .allow_origin(web.cors_origins.clone())
            .allow_credentials(true)
            .allow_methods([Method::GET, Method::POST, Method::PUT, Method::DELETE])
            .allow_headers([
                header::AUTHORIZATION,
                header::CONTENT_TYPE,
                header::IF_NONE_MATCH,
                HeaderName::from_static("idempotency-key"),
                HeaderName::from_static("last-event-id"),
                request_id::HEADER,
            ])
            .expose_headers([header::ETAG, header::RETRY_AFTER, header::LOCATION, request_id::HEADER])
            .max_age(PREFLIGHT_MAX_AGE),
    )
}

/// The OpenAPI document [`router`] serves, built without a server.
pub fn document() -> utoipa::openapi::OpenApi {
    documented().into_openapi()
}

/// Every route, each added to the router and to the document by one attribute.
fn documented() -> OpenApiRouter<Arc<Core>> {
    OpenApiRouter::with_openapi(openapi::ApiDoc::openapi())
        .merge(health::router())
        .merge(auctions::router())
        .merge(images::router())
        .merge(bids::router())
        .merge(events::router())
        .merge(accounts::router())
        .merge(inventory::router())
        .merge(orders::router())
}

async fn not_found() -> Error {
    Error::NotFound("no such route")
}

async fn method_not_allowed() -> Error {
    Error::MethodNotAllowed
}

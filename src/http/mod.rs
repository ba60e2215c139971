//! The public HTTP API: one router per resource, merged here, and the OpenAPI
//! document the same `#[utoipa::path]` attributes generate (see [`openapi`]).

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
    api.merge(openapi::router(&document))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(per_request::PerRequestLayer { timeout: core.limits.request_timeout })
        .with_state(core)
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

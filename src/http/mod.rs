//! The public HTTP API: one router per resource, merged here.

pub mod error;
pub mod extract;
pub mod request_id;
pub mod respond;

mod accounts;
mod auctions;
mod bids;
mod health;
mod inventory;
mod orders;

use std::sync::Arc;

use axum::Router;
use axum::middleware::from_fn_with_state;

use crate::core::Core;
pub use error::Error;

/// The whole public API for one core.
pub fn router(core: Arc<Core>) -> Router {
    Router::new()
        .merge(health::router())
        .merge(auctions::router())
        .merge(bids::router())
        .merge(accounts::router())
        .merge(inventory::router())
        .merge(orders::router())
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(from_fn_with_state(core.clone(), request_id::middleware))
        .with_state(core)
}

async fn not_found() -> Error {
    Error::NotFound("no such route")
}

async fn method_not_allowed() -> Error {
    Error::MethodNotAllowed
}

//! Orders: all-or-nothing stock reservations, read, cancel, fulfil.

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::Response;
use axum::routing::{get, post};
use serde::Deserialize;

use super::error::{Error, Result};
use super::extract::{Bidder, Caller, Id, IdempotencyKey, Json, Seller};
use super::respond;
use crate::core::Core;
use crate::db::{self, orders::Action, orders::Finished, orders::Placed};
use crate::domain::stock::{NewOrder, OrderStatus};

pub(crate) fn router() -> Router<Arc<Core>> {
    Router::new()
        .route("/api/orders", post(create_order))
        .route("/api/orders/{id}", get(get_order))
        .route("/api/orders/{id}/cancel", post(cancel_order))
        .route("/api/orders/{id}/fulfil", post(fulfil_order))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateOrder {
    lines: Vec<LineRequest>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LineRequest {
    sku: String,
    quantity: i64,
}

/// Reads an order back for its response; it exists, having just been written.
async fn order_response(core: &Core, id: i64, status: StatusCode) -> Result<Response> {
    let order = db::orders::get(&core.pool, id).await?.ok_or(Error::NotFound("no such order"))?;
    Ok(respond::json(status, &order))
}

/// The body the first request with an idempotency key got: the order as it was
/// when placed (reserved, unchanged since), whatever happened to it since.
async fn original_order_response(core: &Core, id: i64) -> Result<Response> {
    let mut order = db::orders::get(&core.pool, id).await?.ok_or(Error::NotFound("no such order"))?;
    order.status = OrderStatus::Reserved;
    order.updated_at = order.created_at;
    Ok(respond::json(StatusCode::CREATED, &order))
}

/// Reserves stock for every line, or for none. Honours `Idempotency-Key`.
async fn create_order(
    State(core): State<Arc<Core>>,
    Bidder(buyer): Bidder,
    IdempotencyKey(key): IdempotencyKey,
    Json(body): Json<CreateOrder>,
) -> Result<Response> {
    let order = NewOrder::parse(body.lines.iter().map(|l| (l.sku.as_str(), l.quantity))).map_err(Error::Validation)?;
    match db::orders::place(&core.pool, buyer.account_id, &order, key.as_deref()).await? {
        Placed::Reserved { id, replayed } => {
            let mut response = match replayed {
                false => order_response(&core, id, StatusCode::CREATED).await?,
                true => original_order_response(&core, id).await?,
            };
            if let Ok(location) = HeaderValue::try_from(format!("/api/orders/{id}")) {
                response.headers_mut().insert(header::LOCATION, location);
            }
            Ok(response)
        }
        Placed::InsufficientStock { sku, available } => Err(Error::InsufficientStock { sku, available }),
        Placed::UnknownSku(sku) => Err(Error::UnknownSku(sku)),
        Placed::UnknownAccount => Err(Error::Unauthorized("the token's account does not exist")),
        Placed::KeyMismatch => Err(Error::IdempotencyKeyReused),
        Placed::KeyInUse => Err(Error::IdempotencyKeyInUse),
    }
}

/// Only the buyer sees an order; to anyone else it does not exist.
async fn get_order(State(core): State<Arc<Core>>, Caller(caller): Caller, Id(id): Id) -> Result<Response> {
    match db::orders::get(&core.pool, id).await? {
        Some(order) if order.buyer_id == caller.account_id => Ok(respond::json(StatusCode::OK, &order)),
        _ => Err(Error::NotFound("no such order")),
    }
}

async fn finish(core: &Core, id: i64, actor: i64, action: Action) -> Result<Response> {
    match db::orders::finish(&core.pool, id, actor, action).await? {
        Finished::Done => order_response(core, id, StatusCode::OK).await,
        Finished::NotFound => Err(Error::NotFound("no such order")),
        Finished::Forbidden => Err(Error::Forbidden("only a seller of every line may fulfil an order")),
        Finished::AlreadyIs(status) => Err(Error::OrderState(match status {
            OrderStatus::Reserved => "reserved",
            OrderStatus::Cancelled => "cancelled",
            OrderStatus::Fulfilled => "fulfilled",
        })),
    }
}

/// The buyer cancels: reserved stock returns to available.
async fn cancel_order(State(core): State<Arc<Core>>, Bidder(buyer): Bidder, Id(id): Id) -> Result<Response> {
    finish(&core, id, buyer.account_id, Action::Cancel).await
}

/// The seller of every line fulfils: the stock leaves `reserved`.
async fn fulfil_order(State(core): State<Arc<Core>>, Seller(seller): Seller, Id(id): Id) -> Result<Response> {
    finish(&core, id, seller.account_id, Action::Fulfil).await
}

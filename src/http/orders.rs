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
use crate::db::{self, orders::Action, orders::Finished, orders::OrderRequest, orders::Placed};
use crate::domain::stock::{NewOrder, OrderStatus};
use crate::metrics::{self, OrderOutcome};

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

/// Reserves stock for every line, or for none. Honours `Idempotency-Key`.
async fn create_order(
    State(core): State<Arc<Core>>,
    Bidder(buyer): Bidder,
    IdempotencyKey(key): IdempotencyKey,
    Json(body): Json<CreateOrder>,
) -> Result<Response> {
    let order = NewOrder::parse(body.lines.iter().map(|l| (l.sku.as_str(), l.quantity))).map_err(Error::Validation)?;
    let request = OrderRequest { buyer: buyer.account_id, order, idempotency_key: key };
    let placed = match core.orders.submit(request).await {
        Ok(placed) => placed,
        Err(e) => {
            metrics::order(OrderOutcome::Shed);
            return Err(e.into());
        }
    };
    metrics::order(match &placed {
        Placed::Reserved { .. } => OrderOutcome::Reserved,
        Placed::InsufficientStock { .. } => OrderOutcome::InsufficientStock,
        Placed::UnknownSku(_) => OrderOutcome::UnknownSku,
        Placed::UnknownAccount => OrderOutcome::UnknownAccount,
        Placed::KeyMismatch => OrderOutcome::KeyMismatch,
        Placed::KeyInUse => OrderOutcome::KeyInUse,
    });
    match placed {
        Placed::Reserved { id, body } => {
            let mut response = respond::raw_json(StatusCode::CREATED, body);
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
        Some((buyer, body)) if buyer == caller.account_id => Ok(respond::raw_json(StatusCode::OK, body)),
        _ => Err(Error::NotFound("no such order")),
    }
}

async fn finish(core: &Core, id: i64, actor: i64, action: Action) -> Result<Response> {
    match db::orders::finish(&core.pool, id, actor, action).await? {
        Finished::Done => {
            let (_, body) = db::orders::get(&core.pool, id).await?.ok_or(Error::NotFound("no such order"))?;
            Ok(respond::raw_json(StatusCode::OK, body))
        }
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

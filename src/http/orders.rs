//! Orders: all-or-nothing stock reservations, read, cancel, fulfil.

use std::sync::Arc;

use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::Response;
use chrono::{DateTime, Utc};
use serde::Deserialize;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::error::{Error, PROBLEM_JSON, Problem, Result, ServerProblems};
use super::extract::{Bidder, Caller, CallerProblems, Id, IdempotencyKey, Json, JsonProblems, RoleProblems, Seller};
use super::respond;
use crate::core::Core;
use crate::db::{self, orders::Action, orders::Finished, orders::OrderRequest, orders::Placed};
use crate::domain::stock::{NewOrder, OrderStatus};
use crate::metrics::{self, OrderOutcome};

pub(crate) fn router() -> OpenApiRouter<Arc<Core>> {
    OpenApiRouter::default()
        .routes(routes!(create_order))
        .routes(routes!(get_order))
        .routes(routes!(cancel_order))
        .routes(routes!(fulfil_order))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct CreateOrder {
    lines: Vec<LineRequest>,
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(as = OrderLineRequest)]
struct LineRequest {
    sku: String,
    quantity: i64,
}

/// An order: reserved, then cancelled by its buyer or fulfilled by its sellers.
// Every order route answers with the body `order_json` builds in the database, so
// nothing here builds one: this type only documents it (a test compares the two).
#[derive(ToSchema)]
#[expect(dead_code, reason = "documents a body built in SQL; never constructed")]
struct Order {
    id: i64,
    buyer_id: i64,
    status: OrderStatus,
    /// By sku.
    lines: Vec<OrderLine>,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
}

#[derive(ToSchema)]
#[expect(dead_code, reason = "documents a body built in SQL; never constructed")]
struct OrderLine {
    sku: String,
    quantity: i64,
    seller_id: i64,
}

/// Reserves stock for every line, or for none. Honours `Idempotency-Key`.
#[utoipa::path(
    post, path = "/api/orders", tag = "orders",
    params(IdempotencyKey),
    request_body = CreateOrder,
    security(("bearer" = []), ("cookie" = [])),
    responses(
        (status = 201, description = "Reserved", body = Order, headers(
            ("Location" = String, description = "The new order's URL"),
        )),
        JsonProblems, RoleProblems, ServerProblems,
        (status = 409, description = "A line is short of stock (`sku` and `available` say which and how many), \
         or this Idempotency-Key's first request is still in progress", body = Problem, content_type = PROBLEM_JSON),
        (status = 422, description = "The body has the wrong shape, invalid field values (listed in `errors`), \
         a line names no existing sku (`sku`), an invalid Idempotency-Key, or one used before with a different \
         request", body = Problem, content_type = PROBLEM_JSON),
    )
)]
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
#[utoipa::path(
    get, path = "/api/orders/{id}", tag = "orders",
    params(Id),
    security(("bearer" = []), ("cookie" = [])),
    responses(
        (status = 200, description = "The order", body = Order),
        CallerProblems, ServerProblems,
        (status = 404, description = "No such order, or not the caller's", body = Problem, content_type = PROBLEM_JSON),
    )
)]
async fn get_order(State(core): State<Arc<Core>>, Caller(caller): Caller, Id(id): Id) -> Result<Response> {
    match db::orders::get(&core.pool(), id).await? {
        Some((buyer, body)) if buyer == caller.account_id => Ok(respond::raw_json(StatusCode::OK, body)),
        _ => Err(Error::NotFound("no such order")),
    }
}

async fn finish(core: &Core, id: i64, actor: i64, action: Action) -> Result<Response> {
    match db::orders::finish(&core.pool(), id, actor, action).await? {
        Finished::Done => {
            let (_, body) = db::orders::get(&core.pool(), id).await?.ok_or(Error::NotFound("no such order"))?;
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
#[utoipa::path(
    post, path = "/api/orders/{id}/cancel", tag = "orders",
    params(Id),
    security(("bearer" = []), ("cookie" = [])),
    responses(
        (status = 200, description = "Cancelled", body = Order),
        RoleProblems, ServerProblems,
        (status = 404, description = "No such order, or not the caller's", body = Problem, content_type = PROBLEM_JSON),
        (status = 409, description = "The order is no longer reserved", body = Problem, content_type = PROBLEM_JSON),
    )
)]
async fn cancel_order(State(core): State<Arc<Core>>, Bidder(buyer): Bidder, Id(id): Id) -> Result<Response> {
    finish(&core, id, buyer.account_id, Action::Cancel).await
}

/// The seller of every line fulfils: the stock leaves `reserved`.
#[utoipa::path(
    post, path = "/api/orders/{id}/fulfil", tag = "orders",
    params(Id),
    security(("bearer" = []), ("cookie" = [])),
    responses(
        (status = 200, description = "Fulfilled", body = Order),
        RoleProblems, ServerProblems,
        (status = 403, description = "The caller is not a seller, or not the seller of every line", body = Problem,
         content_type = PROBLEM_JSON),
        (status = 404, description = "No such order, or none of its lines is the caller's", body = Problem,
         content_type = PROBLEM_JSON),
        (status = 409, description = "The order is no longer reserved", body = Problem, content_type = PROBLEM_JSON),
    )
)]
async fn fulfil_order(State(core): State<Arc<Core>>, Seller(seller): Seller, Id(id): Id) -> Result<Response> {
    finish(&core, id, seller.account_id, Action::Fulfil).await
}

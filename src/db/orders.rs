//! Order queries.
//!
//! Orders are batched like bids (see [`super::batch`]): orders that arrive on a
//! core while its previous batch is in the database go together as one call of
//! `place_orders`, sharing one commit. Measured side by side in one run (2 cores
//! shared by server, PostgreSQL and wrk; `wrk -t2 -c64 -d10s -s
//! loadtest/wrk/order.lua`, one-line orders over 1000 skus): `--max-order-batch 1`
//! placed 995 orders/s (mean latency 64 ms), batches of up to 64 placed 3314/s
//! (19 ms): 3.3×. The commit is the cost, and a batch shares it.
//!
//! Every body an order route returns is built by `order_json` in the database, so
//! creating, reading, cancelling and fulfilling answer with the same shape.

use std::future::Future;

use sqlx::PgPool;

use super::batch::{BatchWrite, Lane};
use super::{DbError, protocol};
use crate::domain::stock::{NewOrder, OrderStatus};
use crate::metrics::{self, Query};

/// One order waiting for the database.
#[derive(Debug, Clone)]
pub struct OrderRequest {
    pub buyer: i64,
    pub order: NewOrder,
    pub idempotency_key: Option<String>,
}

impl super::Keyed for OrderRequest {
    fn idempotency_key(&self) -> Option<(i64, &str)> {
        self.idempotency_key.as_deref().map(|key| (self.buyer, key))
    }
}

/// The outcome of placing an order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Placed {
    /// Reserved; the body is the order (as first placed, for a retry).
    Reserved {
        id: i64,
        body: String,
    },
    InsufficientStock {
        sku: String,
        available: i64,
    },
    UnknownSku(String),
    UnknownAccount,
    KeyMismatch,
    KeyInUse,
}

/// Orders, as a batched write: one `place_orders` call per batch.
pub struct Orders;

impl BatchWrite for Orders {
    type Request = OrderRequest;
    type Outcome = Placed;
    /// Orders have no lanes: nothing is opened ahead.
    type Opened = ();

    fn open(&self, _: &PgPool) -> impl Future<Output = Result<(), DbError>> + Send + 'static {
        std::future::ready(Ok(()))
    }

    async fn write(&self, pool: &PgPool, requests: &[&OrderRequest], _lane: Lane<()>) -> Result<Vec<Placed>, DbError> {
        place(pool, requests).await
    }
}

struct OutcomeRow {
    ord: i32,
    outcome: String,
    order_id: Option<i64>,
    failed_sku: Option<String>,
    available: Option<i64>,
    body: Option<String>,
}

/// Places `requests` in one statement; returns their outcomes in the same order.
pub async fn place(pool: &PgPool, requests: &[&OrderRequest]) -> Result<Vec<Placed>, DbError> {
    let _timer = metrics::time_query(Query::PlaceOrders);
    // A key repeated in the batch is not sent (answered 409 below):
    // `place_orders` claims a batch's keys before it places any order.
    let sent = super::first_of_each_key(requests);
    let mut buyers = Vec::with_capacity(sent.len());
    let mut keys: Vec<Option<&str>> = Vec::with_capacity(sent.len());
    let mut fingerprints: Vec<Option<String>> = Vec::with_capacity(sent.len());
    let (mut line_orders, mut skus, mut quantities) = (Vec::new(), Vec::new(), Vec::new());
    for (position, r) in sent.iter().map(|&i| requests[i]).enumerate() {
        buyers.push(r.buyer);
        keys.push(r.idempotency_key.as_deref());
        fingerprints.push(r.idempotency_key.as_ref().map(|_| r.order.fingerprint()));
        for (sku, quantity) in r.order.skus.iter().zip(&r.order.quantities) {
            line_orders.push(position as i32 + 1);
            skus.push(sku.as_str());
            quantities.push(*quantity);
        }
    }
    // As `place_bids`' (see `super::bids::place`): two columns always filled,
    // and arrays with null elements.
    let rows = sqlx::query_as!(
        OutcomeRow,
        r#"select ord as "ord!", outcome as "outcome!", order_id, failed_sku, available, body
             from place_orders($1, $2, $3, $4, $5, $6)"#,
        &buyers,
        &keys as _,
        &fingerprints as _,
        &line_orders,
        &skus as _,
        &quantities,
    )
    .fetch_all(pool)
    .await?;
    if rows.len() != sent.len() {
        return Err(protocol(format!("place_orders returned {} outcomes for {} orders", rows.len(), sent.len())));
    }
    let mut results: Vec<Option<Placed>> = vec![None; requests.len()];
    for (position, row) in rows.into_iter().enumerate() {
        if row.ord as usize != position + 1 {
            return Err(protocol(format!("place_orders answered out of order at {}", row.ord)));
        }
        let missing = || protocol(format!("order outcome {} without its details", row.outcome));
        results[sent[position]] = Some(match row.outcome.as_str() {
            "reserved" => {
                Placed::Reserved { id: row.order_id.ok_or_else(missing)?, body: row.body.clone().ok_or_else(missing)? }
            }
            "insufficient_stock" => Placed::InsufficientStock {
                sku: row.failed_sku.clone().ok_or_else(missing)?,
                available: row.available.ok_or_else(missing)?,
            },
            "unknown_sku" => Placed::UnknownSku(row.failed_sku.clone().ok_or_else(missing)?),
            "unknown_account" => Placed::UnknownAccount,
            "key_mismatch" => Placed::KeyMismatch,
            "key_in_use" => Placed::KeyInUse,
            other => return Err(protocol(format!("unexpected order outcome {other}"))),
        });
    }
    Ok(results.into_iter().map(|placed| placed.unwrap_or(Placed::KeyInUse)).collect())
}

/// An order's buyer and its body, as `order_json` builds it.
pub async fn get(pool: &PgPool, id: i64) -> Result<Option<(i64, String)>, DbError> {
    let _timer = metrics::time_query(Query::OrderRead);
    let row = sqlx::query!(r#"select buyer_id, order_json(id, false) as "order!" from orders where id = $1"#, id)
        .fetch_optional(pool)
        .await?;
    Ok(row.map(|r| (r.buyer_id, r.order)))
}

/// What an order can be asked to do.
#[derive(Debug, Clone, Copy)]
pub enum Action {
    /// By its buyer: stock returns to available.
    Cancel,
    /// By the seller of every line: stock leaves reserved.
    Fulfil,
}

/// The outcome of cancelling or fulfilling.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finished {
    Done,
    /// No such order, or not one the actor may see.
    NotFound,
    /// A seller of only some of its lines.
    Forbidden,
    /// Not reserved any more: it is in this state.
    AlreadyIs(OrderStatus),
}

pub async fn finish(pool: &PgPool, id: i64, actor: i64, action: Action) -> Result<Finished, DbError> {
    let _timer = metrics::time_query(Query::FinishOrder);
    let name = match action {
        Action::Cancel => "cancel",
        Action::Fulfil => "fulfil",
    };
    let outcome = sqlx::query_scalar!(r#"select finish_order($1, $2, $3) as "outcome!""#, id, actor, name)
        .fetch_one(pool)
        .await?;
    Ok(match outcome.as_str() {
        "done" => Finished::Done,
        "not_found" => Finished::NotFound,
        "forbidden" => Finished::Forbidden,
        other => Finished::AlreadyIs(
            OrderStatus::parse(other)
                .ok_or_else(|| DbError::Other(sqlx::Error::Protocol(format!("unexpected order outcome {other}"))))?,
        ),
    })
}

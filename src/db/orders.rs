//! Order queries. Each write is one call of a PL/pgSQL function: one round trip,
//! one transaction.
//!
//! Orders are not batched the way bids are. A bid batch shares one commit among
//! many cheap single-row updates; an order already locks several rows and holds
//! them while checking all of them, so merging orders into one transaction would
//! make unrelated orders wait on each other's locks and turn one order's conflict
//! into a longer hold for the rest. Measured with the wrk scripts in
//! `loadtest/wrk/` (see the README's Performance notes), a single order is one
//! round trip already.

use chrono::{DateTime, Utc};
use sqlx::PgPool;

use super::DbError;
use crate::domain::stock::{NewOrder, OrderStatus};

/// The outcome of placing an order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Placed {
    /// Reserved now (`replayed` false), or by the first request with this key.
    Reserved {
        id: i64,
        replayed: bool,
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

pub async fn place(pool: &PgPool, buyer: i64, order: &NewOrder, key: Option<&str>) -> Result<Placed, DbError> {
    type Row = (String, Option<i64>, Option<String>, Option<i64>, bool);
    let (outcome, order_id, failed_sku, available, replayed): Row = sqlx::query_as(
        "select outcome, order_id, failed_sku, available, replayed from place_order($1, $2, $3, $4, $5)",
    )
    .bind(buyer)
    .bind(&order.skus)
    .bind(&order.quantities)
    .bind(key)
    .bind(key.map(|_| order.fingerprint()))
    .fetch_one(pool)
    .await?;
    let unexpected = || DbError::Other(sqlx::Error::Protocol(format!("unexpected order outcome {outcome}")));
    Ok(match outcome.as_str() {
        "reserved" => Placed::Reserved { id: order_id.ok_or_else(unexpected)?, replayed },
        "insufficient_stock" => Placed::InsufficientStock {
            sku: failed_sku.ok_or_else(unexpected)?,
            available: available.unwrap_or_default(),
        },
        "unknown_sku" => Placed::UnknownSku(failed_sku.ok_or_else(unexpected)?),
        "unknown_account" => Placed::UnknownAccount,
        "key_mismatch" => Placed::KeyMismatch,
        "key_in_use" => Placed::KeyInUse,
        _ => return Err(unexpected()),
    })
}

/// An order with its lines.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Order {
    pub id: i64,
    pub buyer_id: i64,
    pub status: OrderStatus,
    pub lines: Vec<Line>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

#[derive(Debug, Clone, serde::Serialize, sqlx::FromRow)]
pub struct Line {
    pub sku: String,
    pub quantity: i64,
    pub seller_id: i64,
}

pub async fn get(pool: &PgPool, id: i64) -> Result<Option<Order>, DbError> {
    type Head = (i64, i64, String, DateTime<Utc>, DateTime<Utc>);
    let head: Option<Head> =
        sqlx::query_as("select id, buyer_id, status, created_at, updated_at from orders where id = $1")
            .bind(id)
            .fetch_optional(pool)
            .await?;
    let Some((id, buyer_id, status, created_at, updated_at)) = head else { return Ok(None) };
    let lines: Vec<Line> =
        sqlx::query_as("select sku, quantity, seller_id from order_lines where order_id = $1 order by sku")
            .bind(id)
            .fetch_all(pool)
            .await?;
    let status = OrderStatus::parse(&status)
        .ok_or_else(|| DbError::Other(sqlx::Error::Protocol(format!("unknown order status {status}"))))?;
    Ok(Some(Order { id, buyer_id, status, lines, created_at, updated_at }))
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
    let name = match action {
        Action::Cancel => "cancel",
        Action::Fulfil => "fulfil",
    };
    let outcome: String =
        sqlx::query_scalar("select finish_order($1, $2, $3)").bind(id).bind(actor).bind(name).fetch_one(pool).await?;
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

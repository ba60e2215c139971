//! Inventory: create or restock (the owner seller), read (from the core's cache),
//! list.

use std::sync::Arc;

use axum::Router;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::Response;
use axum::routing::get;
use serde::{Deserialize, Serialize};

use super::auctions::{Page, ReadQuery, page_limit};
use super::error::{Error, Result};
use super::extract::{Json, Params, Seller};
use super::respond;
use crate::core::Core;
use crate::db::{self, inventory::Item, inventory::Restocked};
use crate::domain::FieldError;
use crate::domain::stock::{Restock, valid_sku};

pub(crate) fn router() -> Router<Arc<Core>> {
    Router::new()
        .route("/api/inventory", get(list_inventory))
        .route("/api/inventory/{sku}", get(get_item).put(put_item))
}

#[derive(Serialize)]
struct ItemView<'a> {
    sku: &'a str,
    seller_id: i64,
    title: &'a str,
    available: i64,
    reserved: i64,
    version: i64,
}

impl<'a> From<&'a Item> for ItemView<'a> {
    fn from(i: &'a Item) -> Self {
        ItemView {
            sku: &i.sku,
            seller_id: i.seller_id,
            title: &i.title,
            available: i.available,
            reserved: i.reserved,
            version: i.version,
        }
    }
}

fn item_response(status: StatusCode, item: &Item) -> Response {
    respond::with_etag(respond::json(status, &ItemView::from(item)), item.version)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PutItem {
    title: String,
    available: i64,
}

/// 201 when created, 200 when restocked; 403 if another seller owns the sku.
async fn put_item(
    State(core): State<Arc<Core>>,
    Seller(seller): Seller,
    Path(sku): Path<String>,
    Json(body): Json<PutItem>,
) -> Result<Response> {
    let restock = Restock::parse(&sku, &body.title, body.available).map_err(Error::Validation)?;
    let (status, item) = match db::inventory::restock(&core.pool, seller.account_id, &restock).await? {
        Restocked::Created(item) => (StatusCode::CREATED, item),
        Restocked::Updated(item) => (StatusCode::OK, item),
        Restocked::NotOwner => return Err(Error::Forbidden("this sku belongs to another seller")),
    };
    let response = item_response(status, &item);
    core.caches.apply_item(item);
    Ok(response)
}

/// From the core's cache while it is live; from the database with
/// `?consistent=true`, on a miss, or while the cache is recovering.
async fn get_item(
    State(core): State<Arc<Core>>,
    Path(sku): Path<String>,
    Params(q): Params<ReadQuery>,
) -> Result<Response> {
    if !q.consistent
        && let Some(response) = core.caches.with_live_item(&sku, |i| item_response(StatusCode::OK, i))
    {
        return Ok(response);
    }
    if !valid_sku(&sku) {
        return Err(Error::NotFound("no such sku"));
    }
    let item = db::inventory::get(&core.pool, &sku).await?.ok_or(Error::NotFound("no such sku"))?;
    let response = item_response(StatusCode::OK, &item);
    core.caches.apply_item(item);
    Ok(response)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ListQuery {
    seller: Option<i64>,
    after: Option<String>,
    limit: Option<i64>,
}

/// Stock by ascending sku, optionally of one seller; keyset pagination with `after`.
async fn list_inventory(State(core): State<Arc<Core>>, Params(q): Params<ListQuery>) -> Result<Response> {
    let limit = page_limit(q.limit)?;
    let after = q.after.unwrap_or_default();
    if !after.is_empty() && !valid_sku(&after) {
        return Err(Error::Validation(vec![FieldError::new("after", "must be a sku")]));
    }
    let items = db::inventory::list(&core.pool, q.seller, &after, limit).await?;
    let next_after = (items.len() as i64 == limit).then(|| items.last().map(|i| i.sku.clone())).flatten();
    let items: Vec<ItemView<'_>> = items.iter().map(ItemView::from).collect();
    Ok(respond::json(StatusCode::OK, &Page { items, next_after }))
}

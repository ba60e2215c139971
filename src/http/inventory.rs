//! Inventory: create or restock (the owner seller), read (from the core's cache),
//! list.

use sqlx::PgPool;
use std::sync::Arc;
use std::time::SystemTime;

use axum::extract::State;
use axum::http::{HeaderValue, StatusCode};
use axum::response::Response;
use bytes::Bytes;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::error::{Error, PROBLEM_JSON, Problem, Result, ServerProblems};
use super::extract::{
    IfNoneMatch, Json, JsonProblems, Params, QueryProblems, ReadQuery, RoleProblems, Seller, SkuPath,
};
use super::pagination::{Page, page_limit};
use super::respond;
use crate::cache::View;
use crate::core::Core;
use crate::db::{self, inventory::Item, inventory::Restocked};
use crate::domain::FieldError;
use crate::domain::stock::{Restock, valid_sku};

pub(crate) fn router() -> OpenApiRouter<Arc<Core>> {
    OpenApiRouter::default().routes(routes!(list_inventory)).routes(routes!(get_item, put_item))
}

/// A sku's stock.
#[derive(Serialize, ToSchema)]
#[schema(as = Item)]
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

/// A sku's read response, as the cache keeps it: right until the stock changes.
fn item_view(item: &Item, _: DateTime<Utc>) -> View {
    respond::view(&ItemView::from(item), item.version, DateTime::<Utc>::MAX_UTC)
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct PutItem {
    title: String,
    available: i64,
}

/// Creates or restocks a sku.
///
/// 201 when created, 200 when restocked; 403 if another seller owns the sku.
#[utoipa::path(
    put, path = "/api/inventory/{sku}", tag = "inventory",
    params(("sku" = String, Path, description = "The sku")),
    request_body = PutItem,
    security(("bearer" = []), ("cookie" = [])),
    responses(
        (status = 200, description = "Restocked", body = ItemView, headers(
            ("ETag" = String, description = "The item's version"),
        )),
        (status = 201, description = "Created", body = ItemView, headers(
            ("ETag" = String, description = "The item's version"),
        )),
        JsonProblems, RoleProblems, ServerProblems,
        (status = 403, description = "The caller is not a seller, or another seller owns the sku", body = Problem,
         content_type = PROBLEM_JSON),
        (status = 422, description = "The body has the wrong shape, or invalid values (listed in `errors`)",
         body = Problem, content_type = PROBLEM_JSON),
    )
)]
async fn put_item(
    State(core): State<Arc<Core>>,
    Seller(seller): Seller,
    SkuPath(sku): SkuPath,
    Json(body): Json<PutItem>,
) -> Result<Response> {
    let restock = Restock::parse(&sku, &body.title, body.available).map_err(Error::Validation)?;
    let (status, item) = match db::inventory::restock(&core.pool(), seller.account_id, &restock).await? {
        Restocked::Created(item) => (StatusCode::CREATED, item),
        Restocked::Updated(item) => (StatusCode::OK, item),
        Restocked::NotOwner => return Err(Error::Forbidden("this sku belongs to another seller")),
    };
    let response = item_response(status, &item);
    core.caches.apply_item(item);
    Ok(response)
}

/// `GET /api/inventory/{sku}` when the core's live cache holds the sku (also
/// answered before routing, by [`super::hot`]).
pub(crate) fn cached_read<B: From<Bytes> + Default>(
    core: &Core,
    sku: &str,
    now: SystemTime,
    tags: Option<&HeaderValue>,
) -> Option<axum::http::Response<B>> {
    cached_view(core, sku, now).map(|view| respond::cached(view, tags))
}

/// The cached sku's rendered read, if the core's live cache holds it.
pub(crate) fn cached_view(core: &Core, sku: &str, now: SystemTime) -> Option<View> {
    core.caches.item_view(sku, now, item_view)
}

/// A sku's stock.
///
/// From the core's cache while it is live; from the database with
/// `?consistent=true`, on a miss, or while the cache is recovering.
#[utoipa::path(
    get, path = "/api/inventory/{sku}", tag = "inventory",
    params(("sku" = String, Path, description = "The sku"), ReadQuery, IfNoneMatch),
    responses(
        (status = 200, description = "The item", body = ItemView, headers(
            ("ETag" = String, description = "The item's version"),
            ("Cache-Control" = String, description = "no-cache: keep the body if you like, but revalidate it with If-None-Match before each use, because a price can change any millisecond; revalidating costs a 304 with no body"),
        )),
        (status = 304, description = "The item is still the version `If-None-Match` names", headers(
            ("ETag" = String, description = "The item's version"),
            ("Cache-Control" = String, description = "no-cache: keep the body if you like, but revalidate it with If-None-Match before each use, because a price can change any millisecond; revalidating costs a 304 with no body"),
        )),
        QueryProblems, ServerProblems,
        (status = 404, description = "No such sku", body = Problem, content_type = PROBLEM_JSON),
        (status = 422, description = "Invalid query parameters, or a sku in the path that is not UTF-8",
            body = Problem, content_type = PROBLEM_JSON),
    )
)]
async fn get_item(
    State(core): State<Arc<Core>>,
    SkuPath(sku): SkuPath,
    Params(q): Params<ReadQuery>,
    IfNoneMatch(tags): IfNoneMatch,
) -> Result<Response> {
    let now = SystemTime::now();
    if !q.consistent
        && let Some(response) = cached_read(&core, &sku, now, tags.as_ref())
    {
        return Ok(response);
    }
    if !valid_sku(&sku) {
        return Err(Error::NotFound("no such sku"));
    }
    let item = db::inventory::get(&core.pool(), &sku).await?.ok_or(Error::NotFound("no such sku"))?;
    let view = item_view(&item, now.into());
    core.caches.apply_item(item);
    Ok(respond::cached(view, tags.as_ref()))
}

#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
struct ListQuery {
    /// Only this seller's stock.
    seller: Option<i64>,
    /// The `next_after` of the previous page: skus after it.
    after: Option<String>,
    /// Page size, 1 to 100; 20 when not given.
    limit: Option<i64>,
}

/// Stock by ascending sku, optionally of one seller; keyset pagination with `after`.
#[utoipa::path(
    get, path = "/api/inventory", tag = "inventory",
    params(ListQuery),
    responses(
        (status = 200, description = "One page of items", body = Page<ItemView, String>),
        QueryProblems, ServerProblems,
    )
)]
async fn list_inventory(State(core): State<Arc<Core>>, Params(q): Params<ListQuery>) -> Result<Response> {
    let limit = page_limit(q.limit)?;
    let after = q.after.unwrap_or_default();
    if !after.is_empty() && !valid_sku(&after) {
        return Err(Error::Validation(vec![FieldError::new("after", "must be a sku")]));
    }
    let (seller, after) = (q.seller, after.as_str());
    let read = |db: PgPool| async move { db::inventory::list(&db, seller, after, limit).await };
    let (items, _) = core.replicas.read(&core.primary, read, |_| true).await?;
    let next_after = (items.len() as i64 == limit).then(|| items.last().map(|i| i.sku.clone())).flatten();
    let items: Vec<ItemView<'_>> = items.iter().map(ItemView::from).collect();
    Ok(respond::json(StatusCode::OK, &Page { items, next_after }))
}

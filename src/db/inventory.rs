//! Inventory queries.

use sqlx::PgPool;

use super::DbError;
use crate::domain::stock::Restock;
use crate::metrics::{self, Query};

/// One sku's stock, as a query returns it and as `inventory_json` announces it.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow, serde::Deserialize)]
pub struct Item {
    pub sku: String,
    pub seller_id: i64,
    pub title: String,
    pub available: i64,
    pub reserved: i64,
    pub version: i64,
}

/// What a restock did.
#[derive(Debug)]
pub enum Restocked {
    Created(Item),
    Updated(Item),
    /// The sku belongs to another seller; nothing changed.
    NotOwner,
}

/// Creates the sku for `seller`, or sets its title and available stock if it is
/// already theirs. One statement: the conflict clause's condition is the owner check.
pub async fn restock(pool: &PgPool, seller: i64, r: &Restock) -> Result<Restocked, DbError> {
    let _timer = metrics::time_query(Query::InventoryWrite);
    #[derive(sqlx::FromRow)]
    struct Row {
        #[sqlx(flatten)]
        item: Item,
        created: bool,
    }
    let row: Option<Row> = sqlx::query_as(
        r#"
        insert into inventory (sku, seller_id, title, available) values ($1, $2, $3, $4)
        on conflict (sku) do update
           set title = excluded.title,
               available = excluded.available,
               version = inventory.version + 1,
               updated_at = now()
         where inventory.seller_id = excluded.seller_id
        returning sku, seller_id, title, available, reserved, version, (xmax = 0) as created
        "#,
    )
    .bind(&r.sku)
    .bind(seller)
    .bind(&r.title)
    .bind(r.available)
    .fetch_optional(pool)
    .await?;
    Ok(match row {
        Some(Row { item, created: true }) => Restocked::Created(item),
        Some(Row { item, created: false }) => Restocked::Updated(item),
        None => Restocked::NotOwner,
    })
}

pub async fn get(pool: &PgPool, sku: &str) -> Result<Option<Item>, DbError> {
    let _timer = metrics::time_query(Query::InventoryRead);
    Ok(sqlx::query_as("select sku, seller_id, title, available, reserved, version from inventory where sku = $1")
        .bind(sku)
        .fetch_optional(pool)
        .await?)
}

/// The current state of each of `skus` that exists (for a cache reload).
pub async fn get_many(pool: &PgPool, skus: &[String]) -> Result<Vec<Item>, DbError> {
    let _timer = metrics::time_query(Query::InventoryRead);
    Ok(sqlx::query_as("select sku, seller_id, title, available, reserved, version from inventory where sku = any($1)")
        .bind(skus)
        .fetch_all(pool)
        .await?)
}

/// One page by ascending sku after `after`, optionally of one seller.
pub async fn list(pool: &PgPool, seller: Option<i64>, after: &str, limit: i64) -> Result<Vec<Item>, DbError> {
    let _timer = metrics::time_query(Query::InventoryList);
    Ok(sqlx::query_as(
        r#"
        select sku, seller_id, title, available, reserved, version
          from inventory
         where sku > $1 and ($2::bigint is null or seller_id = $2)
         order by sku
         limit $3
        "#,
    )
    .bind(after)
    .bind(seller)
    .bind(limit)
    .fetch_all(pool)
    .await?)
}

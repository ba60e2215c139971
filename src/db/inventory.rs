//! Inventory queries.

use sqlx::PgPool;

use super::DbError;
use crate::domain::stock::Restock;
use crate::metrics::{self, Query};

/// One sku's stock, as a query returns it and as `inventory_json` announces it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
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
    let row = sqlx::query!(
        r#"
        insert into inventory (sku, seller_id, title, available) values ($1, $2, $3, $4)
        on conflict (sku) do update
           set title = excluded.title,
               available = excluded.available,
               version = inventory.version + 1,
               updated_at = now()
         where inventory.seller_id = excluded.seller_id
        returning sku, seller_id, title, available, reserved, version, (xmax = 0) as "created!"
        "#,
        &r.sku,
        seller,
        &r.title,
        r.available,
    )
    .fetch_optional(pool)
    .await?;
    Ok(match row {
        Some(row) => {
            let created = row.created;
            let item = Item {
                sku: row.sku,
                seller_id: row.seller_id,
                title: row.title,
                available: row.available,
                reserved: row.reserved,
                version: row.version,
            };
            if created { Restocked::Created(item) } else { Restocked::Updated(item) }
        }
        None => Restocked::NotOwner,
    })
}

pub async fn get(pool: &PgPool, sku: &str) -> Result<Option<Item>, DbError> {
    let _timer = metrics::time_query(Query::InventoryRead);
    Ok(sqlx::query_as!(
        Item,
        "select sku, seller_id, title, available, reserved, version from inventory where sku = $1",
        sku
    )
    .fetch_optional(pool)
    .await?)
}

/// The current state of each of `skus` that exists (for a cache reload).
pub async fn get_many(pool: &PgPool, skus: &[String]) -> Result<Vec<Item>, DbError> {
    let _timer = metrics::time_query(Query::InventoryRead);
    Ok(sqlx::query_as!(
        Item,
        "select sku, seller_id, title, available, reserved, version from inventory where sku = any($1)",
        skus
    )
    .fetch_all(pool)
    .await?)
}

/// One page by ascending sku after `after`, optionally of one seller.
pub async fn list(pool: &PgPool, seller: Option<i64>, after: &str, limit: i64) -> Result<Vec<Item>, DbError> {
    let _timer = metrics::time_query(Query::InventoryList);
    Ok(sqlx::query_as!(
        Item,
        r#"
        select sku, seller_id, title, available, reserved, version
          from inventory
         where sku > $1 and ($2::bigint is null or seller_id = $2)
         order by sku
         limit $3
        "#,
        after,
        seller,
        limit
    )
    .fetch_all(pool)
    .await?)
}

//! Item image rows: which stored object each image name of an auction stands
//! for. Each change also rewrites the auction's `images` list and bumps its
//! version, in one transaction, so that every cache learns of it as of any
//! other change to the auction.

use sqlx::PgPool;

use super::DbError;
use crate::domain::image::MAX_IMAGES_PER_AUCTION;
use crate::metrics::{self, Query};

/// What the owner check before an upload found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// The auction is the seller's, and may take the image.
    Granted,
    NoAuction,
    NotOwner,
    /// The auction has [`MAX_IMAGES_PER_AUCTION`] others.
    Full,
}

/// Whether `seller` may store image `name` on `auction`: checked before the
/// upload, and again (under the auction's row lock) by [`put`].
pub async fn access(pool: &PgPool, auction: i64, seller: i64, name: &str) -> Result<Access, DbError> {
    let _timer = metrics::time_query(Query::AuctionRead);
    let row =
        sqlx::query!("select seller_id, images from auctions where id = $1", auction).fetch_optional(pool).await?;
    Ok(match row {
        None => Access::NoAuction,
        Some(r) => judge(r.seller_id, &r.images, seller, name),
    })
}

fn judge(owner: i64, images: &[String], seller: i64, name: &str) -> Access {
    if owner != seller {
        Access::NotOwner
    } else if !images.iter().any(|n| n == name) && images.len() as i64 >= MAX_IMAGES_PER_AUCTION {
        Access::Full
    } else {
        Access::Granted
    }
}

/// A stored image's row.
#[derive(Debug, Clone)]
pub struct Image {
    pub content_type: String,
    pub size: i64,
    pub object_key: String,
}

/// What [`put`] did.
#[derive(Debug)]
pub enum Put {
    /// Recorded; `replaced` is the object the name stood for before, if any.
    Stored {
        replaced: Option<String>,
    },
    Refused(Access),
}

/// Records that image `name` of `auction` is now the object at `image.object_key`.
pub async fn put(pool: &PgPool, auction: i64, seller: i64, name: &str, image: &Image) -> Result<Put, DbError> {
    let _timer = metrics::time_query(Query::AuctionWrite);
    let mut tx = pool.begin().await?;
    let Some((owner, images)) = lock(&mut tx, auction).await? else {
        return Ok(Put::Refused(Access::NoAuction));
    };
    let access = judge(owner, &images, seller, name);
    if access != Access::Granted {
        return Ok(Put::Refused(access));
    }
    let replaced =
        sqlx::query_scalar!("select object_key from auction_images where auction_id = $1 and name = $2", auction, name)
            .fetch_optional(&mut *tx)
            .await?;
    sqlx::query!(
        r#"
        insert into auction_images (auction_id, name, content_type, size, object_key) values ($1, $2, $3, $4, $5)
        on conflict (auction_id, name) do update
           set content_type = excluded.content_type, size = excluded.size,
               object_key = excluded.object_key, created_at = now()
        "#,
        auction,
        name,
        image.content_type,
        image.size,
        image.object_key
    )
    .execute(&mut *tx)
    .await?;
    relist(&mut tx, auction).await?;
    tx.commit().await?;
    Ok(Put::Stored { replaced })
}

/// Locks the auction's row for the rest of the transaction; its seller and
/// image names, if it exists.
async fn lock(tx: &mut sqlx::PgConnection, auction: i64) -> Result<Option<(i64, Vec<String>)>, sqlx::Error> {
    let row = sqlx::query!("select seller_id, images from auctions where id = $1 for update", auction)
        .fetch_optional(tx)
        .await?;
    Ok(row.map(|r| (r.seller_id, r.images)))
}

/// The auction's `images` from its rows, and a new version.
async fn relist(tx: &mut sqlx::PgConnection, auction: i64) -> Result<(), sqlx::Error> {
    sqlx::query!(
        r#"
        update auctions
           set images = (select coalesce(array_agg(name order by name), '{}') from auction_images where auction_id = $1),
               version = version + 1
         where id = $1
        "#,
        auction
    )
    .execute(tx)
    .await?;
    Ok(())
}

/// Image `name` of `auction`, if it exists.
pub async fn get(pool: &PgPool, auction: i64, name: &str) -> Result<Option<Image>, DbError> {
    let _timer = metrics::time_query(Query::AuctionRead);
    Ok(sqlx::query_as!(
        Image,
        "select content_type, size, object_key from auction_images where auction_id = $1 and name = $2",
        auction,
        name
    )
    .fetch_optional(pool)
    .await?)
}

/// What [`delete`] did.
#[derive(Debug)]
pub enum Deleted {
    /// The row is gone; the object at this key is to be deleted.
    Gone(String),
    NoImage,
    Refused(Access),
}

/// Deletes image `name` of `seller`'s `auction`.
pub async fn delete(pool: &PgPool, auction: i64, seller: i64, name: &str) -> Result<Deleted, DbError> {
    let _timer = metrics::time_query(Query::AuctionWrite);
    let mut tx = pool.begin().await?;
    let Some((owner, _)) = lock(&mut tx, auction).await? else {
        return Ok(Deleted::Refused(Access::NoAuction));
    };
    if owner != seller {
        return Ok(Deleted::Refused(Access::NotOwner));
    }
    let Some(key) = sqlx::query_scalar!(
        "delete from auction_images where auction_id = $1 and name = $2 returning object_key",
        auction,
        name
    )
    .fetch_optional(&mut *tx)
    .await?
    else {
        return Ok(Deleted::NoImage);
    };
    relist(&mut tx, auction).await?;
    tx.commit().await?;
    Ok(Deleted::Gone(key))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_owner_may_add_up_to_the_limit_and_always_replace() {
        let full: Vec<String> = (0..MAX_IMAGES_PER_AUCTION).map(|i| format!("{i}.jpg")).collect();
        assert_eq!(judge(1, &[], 1, "a.jpg"), Access::Granted);
        assert_eq!(judge(1, &[], 2, "a.jpg"), Access::NotOwner);
        assert_eq!(judge(1, &full, 1, "new.jpg"), Access::Full);
        assert_eq!(judge(1, &full, 1, "3.jpg"), Access::Granted, "a replacement adds none");
    }
}

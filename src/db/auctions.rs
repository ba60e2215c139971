//! Auction queries.

use chrono::{DateTime, Utc};
use sqlx::PgPool;

use super::DbError;
use crate::domain::auction::{Auction, NewAuction, Status};
use crate::metrics::{self, Query};

/// An auction row, as a query returns it and as `auction_json` announces it (with
/// timestamps as epoch microseconds there): one decoder for both.
#[derive(serde::Deserialize)]
pub(crate) struct Row {
    id: i64,
    seller_id: i64,
    title: String,
    reserve: i64,
    min_increment: i64,
    extend_secs: i32,
    high_bid: Option<i64>,
    high_bidder: Option<i64>,
    bid_count: i64,
    #[serde(rename = "starts_at_us", deserialize_with = "super::notice::de_micros")]
    starts_at: DateTime<Utc>,
    #[serde(rename = "ends_at_us", deserialize_with = "super::notice::de_micros")]
    ends_at: DateTime<Utc>,
    status: String,
    winner_id: Option<i64>,
    buy_now: Option<i64>,
    // Absent from what gavel announced before images.
    #[serde(default)]
    images: Vec<String>,
    version: i64,
}

impl From<Row> for Auction {
    fn from(r: Row) -> Auction {
        Auction {
            id: r.id,
            seller_id: r.seller_id,
            title: r.title,
            reserve: r.reserve,
            min_increment: r.min_increment,
            extend_secs: r.extend_secs,
            high_bid: r.high_bid,
            high_bidder: r.high_bidder,
            bid_count: r.bid_count,
            starts_at: r.starts_at,
            ends_at: r.ends_at,
            closed: r.status == "closed",
            winner_id: r.winner_id,
            buy_now: r.buy_now,
            images: r.images,
            version: r.version,
        }
    }
}

/// `select <every column> from auctions <rest>` as a checked query of [`Row`]s,
/// with the arguments that follow.
macro_rules! select_auctions {
    ($rest:literal $(, $arg:expr)*) => {
        sqlx::query_as!(
            Row,
            "select id, seller_id, title, reserve, min_increment, extend_secs, high_bid, high_bidder, \
             bid_count, starts_at, ends_at, status, winner_id, buy_now, images, version from auctions " + $rest
            $(, $arg)*
        )
    };
}

pub async fn insert(pool: &PgPool, seller_id: i64, new: &NewAuction) -> Result<Auction, DbError> {
    let _timer = metrics::time_query(Query::AuctionWrite);
    let row = sqlx::query_as!(
        Row,
        r#"
        insert into auctions (seller_id, title, reserve, min_increment, extend_secs, starts_at, ends_at, status, buy_now)
        values ($1, $2, $3, $4, $5, $6, $7, case when $6 <= now() then 'open' else 'scheduled' end, $8)
        returning id, seller_id, title, reserve, min_increment, extend_secs, high_bid, high_bidder,
                  bid_count, starts_at, ends_at, status, winner_id, buy_now, images, version
        "#,
        seller_id,
        &new.title,
        new.reserve.get(),
        new.min_increment.get(),
        new.extend_secs,
        new.starts_at,
        new.ends_at,
        new.buy_now.map(|b| b.get()),
    )
    .fetch_one(pool)
    .await?;
    Ok(row.into())
}

pub async fn get(pool: &PgPool, id: i64) -> Result<Option<Auction>, DbError> {
    let _timer = metrics::time_query(Query::AuctionRead);
    let row = select_auctions!("where id = $1", id).fetch_optional(pool).await?;
    Ok(row.map(Into::into))
}

/// The current state of each of `ids` that exists (for a cache reload).
pub async fn get_many(pool: &PgPool, ids: &[i64]) -> Result<Vec<Auction>, DbError> {
    let _timer = metrics::time_query(Query::AuctionRead);
    let rows = select_auctions!("where id = any($1)", ids).fetch_all(pool).await?;
    Ok(rows.into_iter().map(Into::into).collect())
}

/// One page of auctions by ascending id, after `after`, optionally of one status
/// (as the clock decides it, like a single read does).
pub async fn list(pool: &PgPool, status: Option<Status>, after: i64, limit: i64) -> Result<Vec<Auction>, DbError> {
    let _timer = metrics::time_query(Query::AuctionList);
    let rows = select_auctions!(
        r#"
         where id > $1
           and case $2::text
                 when 'scheduled' then status <> 'closed' and now() < starts_at
                 when 'open' then status <> 'closed' and starts_at <= now() and now() < ends_at
                 when 'closed' then status = 'closed' or ends_at <= now()
                 else true
               end
         order by id
         limit $3
        "#,
        after,
        status.map(Status::as_str),
        limit
    )
    .fetch_all(pool)
    .await?;
    Ok(rows.into_iter().map(Into::into).collect())
}

/// Opens and closes the auctions whose time has come; returns how many changed.
pub async fn advance(db: impl sqlx::PgExecutor<'_>) -> Result<i32, DbError> {
    let _timer = metrics::time_query(Query::Lifecycle);
    Ok(sqlx::query_scalar!(r#"select advance_auctions() as "changed!""#).fetch_one(db).await?)
}

/// The advisory lock whose holder runs the auction lifecycle: one instance of
/// all those sharing a database ("gavel" in ASCII, then 1).
pub const LIFECYCLE_LOCK: i64 = 0x6761_7665_6c00_0001;

/// Whether this connection now holds [`LIFECYCLE_LOCK`] (it keeps it until it
/// closes: a session lock).
pub async fn try_lead(conn: &mut sqlx::PgConnection) -> Result<bool, DbError> {
    let _timer = metrics::time_query(Query::Lifecycle);
    Ok(sqlx::query_scalar!(r#"select pg_try_advisory_lock($1) as "held!""#, LIFECYCLE_LOCK).fetch_one(conn).await?)
}

//! Time drives auctions: anti-sniping, closing, winners.

use std::time::Duration;

use chrono::{DateTime, Utc};
use reqwest::StatusCode;
use serde_json::Value;

use crate::helpers::{eventually, spawn_app};

fn time(v: &Value) -> DateTime<Utc> {
    v.as_str().unwrap().parse().unwrap()
}

/// A bid in the last `extend_secs` pushes the end out by `extend_secs`.
#[tokio::test]
async fn a_late_bid_extends_the_auction() {
    let app = spawn_app().await;
    let a = app.open_auction(100, 10, 5.0, 30).await;
    let id = a["id"].as_i64().unwrap();
    let original_end = time(&a["ends_at"]);

    let placed: Value = app.place_bid(&app.bidder(2), id, 100).await.json().await.unwrap();
    assert_eq!(time(&placed["ends_at"]), original_end + chrono::Duration::seconds(30));
    let read = app.auction(id, true).await;
    assert_eq!(time(&read["ends_at"]), original_end + chrono::Duration::seconds(30));
}

/// An early bid leaves the end alone.
#[tokio::test]
async fn an_early_bid_does_not_extend_the_auction() {
    let app = spawn_app().await;
    let a = app.open_auction(100, 10, 120.0, 30).await;
    let placed: Value = app.place_bid(&app.bidder(2), a["id"].as_i64().unwrap(), 100).await.json().await.unwrap();
    assert_eq!(time(&placed["ends_at"]), time(&a["ends_at"]));
}

/// When the auction closes, the high bidder wins (the high bid meets the reserve).
#[tokio::test]
async fn the_winner_is_recorded_at_close() {
    let app = spawn_app().await;
    let id = app.open_auction(100, 10, 1.0, 0).await["id"].as_i64().unwrap();
    assert_eq!(app.place_bid(&app.bidder(2), id, 100).await.status(), StatusCode::CREATED);
    assert_eq!(app.place_bid(&app.bidder(3), id, 110).await.status(), StatusCode::CREATED);

    let closed = eventually(Duration::from_secs(5), "the auction closes with a winner", || async {
        let a = app.auction(id, true).await;
        (a["status"] == "closed" && !a["winner_id"].is_null()).then_some(a)
    })
    .await;
    assert_eq!(closed["winner_id"], 3);
    assert_eq!(closed["high_bid"], 110);
    assert_eq!(closed["reserve_met"], true);
    // The cached read agrees once the close has been announced.
    eventually(Duration::from_secs(2), "the cache shows the winner", || async {
        (app.auction(id, false).await["winner_id"] == 3).then_some(())
    })
    .await;
}

/// No bid reaching the reserve: the auction closes without a winner.
#[tokio::test]
async fn an_auction_whose_reserve_is_not_met_closes_without_a_winner() {
    let app = spawn_app().await;
    let id = app.open_auction(5000, 10, 1.0, 0).await["id"].as_i64().unwrap();
    // Below the reserve: refused, so the reserve is never met.
    assert_eq!(app.place_bid(&app.bidder(2), id, 4999).await.status(), StatusCode::CONFLICT);
    let closed = eventually(Duration::from_secs(5), "the auction is recorded closed", || async {
        let stored: String =
            sqlx::query_scalar("select status from auctions where id = $1").bind(id).fetch_one(&app.db).await.unwrap();
        (stored == "closed").then_some(app.auction(id, true).await)
    })
    .await;
    assert_eq!(closed["status"], "closed");
    assert_eq!(closed["winner_id"], Value::Null);
    assert_eq!(closed["reserve_met"], false);
    assert_eq!(closed["bid_count"], 0);
}

/// A scheduled auction reads as open once its start passes, before and after the
/// lifecycle tick records it.
#[tokio::test]
async fn a_scheduled_auction_opens_at_its_start() {
    let app = spawn_app().await;
    let response = app
        .create_auction(&serde_json::json!({
            "title": "soon", "reserve": 100, "min_increment": 10,
            "starts_at": crate::helpers::at(0.6), "ends_at": crate::helpers::at(60.0)
        }))
        .await;
    let a: Value = response.json().await.unwrap();
    assert_eq!(a["status"], "scheduled");
    let id = a["id"].as_i64().unwrap();
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(app.auction(id, false).await["status"], "open");
    assert_eq!(app.place_bid(&app.bidder(2), id, 100).await.status(), StatusCode::CREATED);
    let stored: String = eventually(Duration::from_secs(3), "the open is recorded", || async {
        let s: String =
            sqlx::query_scalar("select status from auctions where id = $1").bind(id).fetch_one(&app.db).await.unwrap();
        (s == "open").then_some(s)
    })
    .await;
    assert_eq!(stored, "open");
}

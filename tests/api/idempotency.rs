//! `Idempotency-Key` on `POST /api/bids`.

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::helpers::{TestApp, assert_problem, spawn_app};

async fn keyed_bid(app: &TestApp, bidder: &str, key: &str, auction_id: i64, amount: i64) -> reqwest::Response {
    app.client
        .post(app.url("/api/bids"))
        .bearer_auth(bidder)
        .header("idempotency-key", key)
        .json(&json!({"auction_id": auction_id, "amount": amount}))
        .send()
        .await
        .unwrap()
}

/// A retry returns the original status and body, and places nothing new.
#[tokio::test]
async fn a_retried_bid_returns_the_original_response() {
    let app = spawn_app().await;
    let id = app.open_auction(100, 10, 60.0, 0).await["id"].as_i64().unwrap();
    let bidder = app.bidder(2);
    let first = keyed_bid(&app, &bidder, "retry-1", id, 100).await;
    assert_eq!(first.status(), StatusCode::CREATED);
    let first: Value = first.json().await.unwrap();
    // Someone outbids meanwhile; the retry still answers what the first attempt did.
    assert_eq!(app.place_bid(&app.bidder(3), id, 200).await.status(), StatusCode::CREATED);
    let retry = keyed_bid(&app, &bidder, "retry-1", id, 100).await;
    assert_eq!(retry.status(), StatusCode::CREATED);
    assert_eq!(retry.json::<Value>().await.unwrap(), first);
    assert_eq!(app.all_bids(id).await.len(), 2, "the retry placed no bid");
}

/// A rejection is an outcome too: replayed as the same 409.
#[tokio::test]
async fn a_retried_rejection_is_replayed() {
    let app = spawn_app().await;
    let id = app.open_auction(100, 10, 60.0, 0).await["id"].as_i64().unwrap();
    let bidder = app.bidder(2);
    let first = keyed_bid(&app, &bidder, "low", id, 50).await;
    let first = assert_problem(first, StatusCode::CONFLICT, "/problems/bid-too-low").await;
    assert_eq!(app.place_bid(&app.bidder(3), id, 300).await.status(), StatusCode::CREATED);
    let retry =
        assert_problem(keyed_bid(&app, &bidder, "low", id, 50).await, StatusCode::CONFLICT, "/problems/bid-too-low")
            .await;
    assert_eq!(retry["min_next_bid"], first["min_next_bid"], "the original outcome, not a fresh one");
}

#[tokio::test]
async fn the_same_key_with_another_body_is_422() {
    let app = spawn_app().await;
    let id = app.open_auction(100, 10, 60.0, 0).await["id"].as_i64().unwrap();
    let bidder = app.bidder(2);
    assert_eq!(keyed_bid(&app, &bidder, "k", id, 100).await.status(), StatusCode::CREATED);
    let reused = keyed_bid(&app, &bidder, "k", id, 150).await;
    assert_problem(reused, StatusCode::UNPROCESSABLE_ENTITY, "/problems/idempotency-key-reused").await;
    assert_eq!(app.all_bids(id).await.len(), 1);
}

/// Keys belong to the bidder: another bidder's identical key is another request.
#[tokio::test]
async fn keys_are_scoped_to_the_bidder() {
    let app = spawn_app().await;
    let id = app.open_auction(100, 10, 60.0, 0).await["id"].as_i64().unwrap();
    assert_eq!(keyed_bid(&app, &app.bidder(2), "shared", id, 100).await.status(), StatusCode::CREATED);
    assert_eq!(keyed_bid(&app, &app.bidder(3), "shared", id, 110).await.status(), StatusCode::CREATED);
    assert_eq!(app.all_bids(id).await.len(), 2);
}

/// While the first request with a key is still running, a retry is 409.
#[tokio::test]
async fn a_retry_while_the_first_is_running_is_409() {
    let app = spawn_app().await;
    let id = app.open_auction(100, 10, 60.0, 0).await["id"].as_i64().unwrap();
    // Hold the key's lock the way a running first attempt does.
    let mut holder = app.db.acquire().await.unwrap();
    sqlx::query("select pg_advisory_lock(hashtextextended('2/bid/busy', 0))").execute(&mut *holder).await.unwrap();
    let busy = keyed_bid(&app, &app.bidder(2), "busy", id, 100).await;
    assert_problem(busy, StatusCode::CONFLICT, "/problems/idempotency-key-in-use").await;
    sqlx::query("select pg_advisory_unlock_all()").execute(&mut *holder).await.unwrap();
    assert_eq!(keyed_bid(&app, &app.bidder(2), "busy", id, 100).await.status(), StatusCode::CREATED);
}

#[tokio::test]
async fn unusable_keys_are_422() {
    let app = spawn_app().await;
    let id = app.open_auction(100, 10, 60.0, 0).await["id"].as_i64().unwrap();
    let too_long = "k".repeat(256);
    for key in [too_long.as_str(), "has space"] {
        let response = keyed_bid(&app, &app.bidder(2), key, id, 100).await;
        assert_problem(response, StatusCode::UNPROCESSABLE_ENTITY, "/problems/invalid-idempotency-key").await;
    }
    let longest = "k".repeat(255);
    assert_eq!(keyed_bid(&app, &app.bidder(2), &longest, id, 100).await.status(), StatusCode::CREATED);
}

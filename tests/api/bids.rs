//! Placing bids and reading them back.

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::helpers::{amounts, assert_problem, at, spawn_app};

/// A first bid must reach the reserve; later ones the high bid plus the increment.
#[tokio::test]
async fn bid_below_minimum_is_rejected_with_409_and_the_minimum() {
    let app = spawn_app().await;
    let a = app.open_auction(1000, 50, 60.0, 0).await;
    let id = a["id"].as_i64().unwrap();
    let bidder = app.bidder(7);

    let body =
        assert_problem(app.place_bid(&bidder, id, 999).await, StatusCode::CONFLICT, "/problems/bid-too-low").await;
    assert_eq!(body["min_next_bid"], 1000);

    let accepted = app.place_bid(&bidder, id, 1000).await;
    assert_eq!(accepted.status(), StatusCode::CREATED);
    let accepted: Value = accepted.json().await.unwrap();
    assert_eq!(accepted["amount"], 1000);
    assert_eq!(accepted["is_winning"], true);
    assert_eq!(accepted["min_next_bid"], 1050);

    let body =
        assert_problem(app.place_bid(&bidder, id, 1049).await, StatusCode::CONFLICT, "/problems/bid-too-low").await;
    assert_eq!(body["min_next_bid"], 1050);
    assert_eq!(app.place_bid(&bidder, id, 1050).await.status(), StatusCode::CREATED);
}

/// A stale cache never accepts: a bid above the cached minimum but below the real
/// one is refused by the database, with the real minimum.
#[tokio::test]
async fn database_rejects_a_bid_a_stale_cache_would_allow() {
    let app = spawn_app().await;
    let id = app.open_auction(100, 10, 60.0, 0).await["id"].as_i64().unwrap();
    // Raise the high bid with triggers off, so no notification tells the caches.
    app.silently("update auctions set high_bid = 500, high_bidder = 9, version = version + 1 where id = $1", id).await;
    let body =
        assert_problem(app.place_bid(&app.bidder(2), id, 200).await, StatusCode::CONFLICT, "/problems/bid-too-low")
            .await;
    assert_eq!(body["min_next_bid"], 510);
}

#[tokio::test]
async fn bid_before_the_start_is_rejected_as_closed() {
    let app = spawn_app().await;
    let response = app
        .create_auction(&json!({
            "title": "later", "reserve": 100, "min_increment": 10, "starts_at": at(3600.0), "ends_at": at(7200.0)
        }))
        .await;
    assert_eq!(response.status(), StatusCode::CREATED);
    let a: Value = response.json().await.unwrap();
    assert_eq!(a["status"], "scheduled");
    let id = a["id"].as_i64().unwrap();
    assert_problem(app.place_bid(&app.bidder(2), id, 100).await, StatusCode::CONFLICT, "/problems/auction-closed")
        .await;
}

#[tokio::test]
async fn bid_after_the_end_is_rejected_as_closed() {
    let app = spawn_app().await;
    let id = app.open_auction(100, 10, 0.5, 0).await["id"].as_i64().unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(700)).await;
    assert_problem(app.place_bid(&app.bidder(2), id, 100).await, StatusCode::CONFLICT, "/problems/auction-closed")
        .await;
}

#[tokio::test]
async fn bid_on_a_missing_auction_is_404() {
    let app = spawn_app().await;
    assert_problem(app.place_bid(&app.bidder(2), 424242, 100).await, StatusCode::NOT_FOUND, "/problems/not-found")
        .await;
}

/// The bidder is the token's subject: the body cannot name one.
#[tokio::test]
async fn bidder_comes_from_the_token_never_the_body() {
    let app = spawn_app().await;
    let id = app.open_auction(100, 10, 60.0, 0).await["id"].as_i64().unwrap();
    let forged =
        app.post_json("/api/bids", &app.bidder(5), &json!({"auction_id": id, "amount": 100, "bidder_id": 6})).await;
    assert_problem(forged, StatusCode::UNPROCESSABLE_ENTITY, "/problems/invalid-body").await;

    assert_eq!(app.place_bid(&app.bidder(5), id, 100).await.status(), StatusCode::CREATED);
    let a = app.auction(id, true).await;
    assert_eq!(a["high_bidder"], 5);
    assert_eq!(app.all_bids(id).await[0]["bidder_id"], 5);
}

/// History lists newest first and pages with `after`.
#[tokio::test]
async fn bid_history_is_newest_first_and_paginates() {
    let app = spawn_app().await;
    let id = app.open_auction(100, 1, 60.0, 0).await["id"].as_i64().unwrap();
    for amount in 100..105 {
        assert_eq!(app.place_bid(&app.bidder(3), id, amount).await.status(), StatusCode::CREATED);
    }
    let page: Value = app.get(&format!("/api/auctions/{id}/bids?limit=2")).await.json().await.unwrap();
    assert_eq!(amounts(&page), [104, 103]);
    let after = page["next_after"].as_i64().unwrap();
    let page: Value = app.get(&format!("/api/auctions/{id}/bids?limit=2&after={after}")).await.json().await.unwrap();
    assert_eq!(amounts(&page), [102, 101]);
    let all: Vec<i64> = app.all_bids(id).await.iter().map(|b| b["amount"].as_i64().unwrap()).collect();
    assert_eq!(all, [100, 101, 102, 103, 104]);
    let missing = app.get("/api/auctions/999999/bids").await;
    assert_problem(missing, StatusCode::NOT_FOUND, "/problems/not-found").await;
}

/// Reads carry the version, also as an ETag, and reflect an accepted bid.
#[tokio::test]
async fn auction_reads_carry_version_and_etag() {
    let app = spawn_app().await;
    let a = app.open_auction(100, 10, 60.0, 0).await;
    let id = a["id"].as_i64().unwrap();
    assert_eq!(a["high_bid"], Value::Null);
    assert_eq!(a["min_next_bid"], 100);
    assert_eq!(a["reserve_met"], false);

    assert_eq!(app.place_bid(&app.bidder(3), id, 150).await.status(), StatusCode::CREATED);
    let response = app.get(&format!("/api/auctions/{id}?consistent=true")).await;
    let etag = response.headers()["etag"].to_str().unwrap().to_owned();
    let body: Value = response.json().await.unwrap();
    assert_eq!(etag, format!("\"{}\"", body["version"]));
    assert!(body["version"].as_i64().unwrap() > a["version"].as_i64().unwrap());
    assert_eq!(body["high_bid"], 150);
    assert_eq!(body["high_bidder"], 3);
    assert_eq!(body["bid_count"], 1);
    assert_eq!(body["min_next_bid"], 160);
    assert_eq!(body["reserve_met"], true);
}

/// Listing filters by status and pages by id.
#[tokio::test]
async fn auctions_list_filters_by_status_and_paginates() {
    let app = spawn_app().await;
    for _ in 0..3 {
        app.open_auction(100, 10, 60.0, 0).await;
    }
    let later = app
        .create_auction(
            &json!({"title": "later", "reserve": 1, "min_increment": 1, "starts_at": at(600.0), "ends_at": at(700.0)}),
        )
        .await;
    let later_id = later.json::<Value>().await.unwrap()["id"].as_i64().unwrap();

    let open: Value = app.get("/api/auctions?status=open&limit=2").await.json().await.unwrap();
    assert_eq!(open["items"].as_array().unwrap().len(), 2);
    let after = open["next_after"].as_i64().unwrap();
    let rest: Value = app.get(&format!("/api/auctions?status=open&limit=2&after={after}")).await.json().await.unwrap();
    assert_eq!(rest["items"].as_array().unwrap().len(), 1);
    assert_eq!(rest["next_after"], Value::Null);

    let scheduled: Value = app.get("/api/auctions?status=scheduled").await.json().await.unwrap();
    let ids: Vec<i64> = scheduled["items"].as_array().unwrap().iter().map(|a| a["id"].as_i64().unwrap()).collect();
    assert_eq!(ids, [later_id]);
    let all: Value = app.get("/api/auctions").await.json().await.unwrap();
    assert_eq!(all["items"].as_array().unwrap().len(), 4);
}

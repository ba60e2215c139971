//! Buy-now: a bid of at least the buy-now price, while it is on offer, closes the
//! auction at once and wins at that price; once a bid meets the reserve, it is
//! gone.

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::helpers::*;

/// An open auction with a buy-now price, ending in a minute.
async fn auction_with_buy_now(app: &TestApp, reserve: i64, buy_now: i64) -> i64 {
    let body = json!({
        "title": "lot", "reserve": reserve, "min_increment": 10,
        "starts_at": at(-1.0), "ends_at": at(60.0), "buy_now": buy_now,
    });
    let response = app.create_auction(&body).await;
    assert_eq!(response.status(), StatusCode::CREATED);
    let created: Value = response.json().await.unwrap();
    assert_eq!(created["buy_now"], buy_now, "on offer from the start");
    created["id"].as_i64().unwrap()
}

#[tokio::test]
async fn a_buy_now_below_the_reserve_is_refused() {
    let app = spawn_app().await;
    let body = json!({
        "title": "lot", "reserve": 1000, "min_increment": 10,
        "starts_at": at(-1.0), "ends_at": at(60.0), "buy_now": 999,
    });
    let problem =
        assert_problem(app.create_auction(&body).await, StatusCode::UNPROCESSABLE_ENTITY, "/problems/validation").await;
    assert_eq!(invalid_fields(&problem), ["buy_now"]);
    let plain = app.open_auction(100, 10, 60.0, 0).await;
    assert_eq!(plain["buy_now"], Value::Null, "no buy-now unless asked for");
}

#[tokio::test]
async fn a_bid_at_the_buy_now_price_closes_the_auction_and_wins_at_that_price() {
    let app = spawn_app().await;
    let id = auction_with_buy_now(&app, 1000, 5000).await;
    let placed = app.place_bid(&app.bidder(3), id, 7000).await;
    assert_eq!(placed.status(), StatusCode::CREATED);
    let placed: Value = placed.json().await.unwrap();
    assert_eq!((placed["amount"].as_i64(), placed["is_winning"].as_bool()), (Some(5000), Some(true)));

    let stored = app.auction(id, true).await;
    assert_eq!(stored["status"], "closed");
    assert_eq!(stored["winner_id"], 3);
    assert_eq!(stored["high_bid"], 5000);
    assert_eq!(stored["buy_now"], Value::Null, "no longer on offer");
    // The other core learns of it from the bid's announcement, a moment later.
    let reads = eventually(Duration::from_secs(5), "every core's cache has the close", || async {
        let reads = app.read_on_every_core(&format!("/api/auctions/{id}"), "/api/auctions/{id}").await;
        reads.iter().all(|r| r["status"] == "closed").then_some(reads)
    })
    .await;
    for cached in reads {
        assert_eq!((cached["status"].as_str(), cached["winner_id"].as_i64()), (Some("closed"), Some(3)), "{cached}");
    }
    assert_problem(app.place_bid(&app.bidder(4), id, 9000).await, StatusCode::CONFLICT, "/problems/auction-closed")
        .await;
    let bids = app.all_bids(id).await;
    assert_eq!(bids.len(), 1);
    assert_eq!(bids[0]["amount"], 5000, "recorded at the buy-now price");
}

#[tokio::test]
async fn buy_now_is_gone_once_a_bid_meets_the_reserve() {
    let app = spawn_app().await;
    let id = auction_with_buy_now(&app, 1000, 5000).await;
    assert_eq!(app.place_bid(&app.bidder(2), id, 1000).await.status(), StatusCode::CREATED);
    assert_eq!(app.auction(id, true).await["buy_now"], Value::Null);
    eventually(Duration::from_secs(5), "every core's cache drops the offer", || async {
        let reads = app.read_on_every_core(&format!("/api/auctions/{id}"), "/api/auctions/{id}").await;
        reads.iter().all(|r| r["buy_now"].is_null()).then_some(())
    })
    .await;
    // A bid above the old buy-now price is now an ordinary bid.
    let placed: Value = app.place_bid(&app.bidder(3), id, 6000).await.json().await.unwrap();
    assert_eq!(placed["amount"], 6000);
    let stored = app.auction(id, true).await;
    assert_eq!((stored["status"].as_str(), stored["high_bid"].as_i64()), (Some("open"), Some(6000)));
}

#[tokio::test]
async fn of_racing_buy_now_bids_exactly_one_wins() {
    let app = spawn_app().await;
    let id = auction_with_buy_now(&app, 1000, 5000).await;
    let bidders: Vec<String> = (2..10).map(|b| app.bidder(b)).collect();
    let bids = bidders.iter().map(|b| app.place_bid(b, id, 5000));
    let statuses: Vec<StatusCode> = futures::future::join_all(bids).await.iter().map(|r| r.status()).collect();
    assert_eq!(statuses.iter().filter(|s| **s == StatusCode::CREATED).count(), 1, "{statuses:?}");
    assert!(statuses.iter().all(|s| *s == StatusCode::CREATED || *s == StatusCode::CONFLICT), "{statuses:?}");
    assert_eq!(app.all_bids(id).await.len(), 1);
    assert_eq!(app.auction(id, true).await["status"], "closed");
}

/// A buy-now's closed state is announced whole by the batch's own transaction:
/// the core's announcement of the batch comes after the commit and is lost if
/// gavel dies first, and a closed auction has no next change to catch up on.
#[tokio::test]
async fn a_buy_now_close_is_announced_by_its_own_transaction() {
    let app = spawn_app().await;
    let id = auction_with_buy_now(&app, 1000, 5000).await;
    let mut listener = sqlx::postgres::PgListener::connect_with(&app.db).await.unwrap();
    listener.listen(gavel::db::CACHE_CHANNEL).await.unwrap();

    // Placed as a batch, with no announcement after it: as if gavel died there.
    let request = gavel::db::bids::BidRequest {
        bid: gavel::domain::bid::NewBid::parse(id, 5000, None, 3).unwrap(),
        idempotency_key: None,
    };
    let placed = gavel::db::bids::place(&app.db, &[&request]).await.unwrap();
    assert!(matches!(placed[0], gavel::db::bids::Placed::Accepted { .. }), "{placed:?}");

    let mut closed = None;
    while let Ok(received) = tokio::time::timeout(Duration::from_secs(2), listener.recv()).await {
        if let gavel::db::notice::Notice::Auction(a) =
            gavel::db::notice::parse(received.unwrap().payload()).unwrap().notice
            && a.id == id
        {
            closed = Some(a);
        }
    }
    let closed = closed.expect("the closed auction was announced");
    assert!(closed.closed, "{closed:?}");
    assert_eq!((closed.winner_id, closed.high_bid, closed.version), (Some(3), Some(5000), 2));
}

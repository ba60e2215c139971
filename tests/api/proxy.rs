//! Proxy bids: a bid's `max_amount`, up to which the database bids for its
//! bidder whenever someone else bids, and every rule that comes with it.

use std::time::Duration;

use chrono::{DateTime, Utc};
use reqwest::StatusCode;
use serde_json::Value;

use crate::helpers::*;

/// A 201's body, asserting the status.
async fn placed(response: reqwest::Response) -> Value {
    let status = response.status();
    let body: Value = response.json().await.unwrap();
    assert_eq!(status, StatusCode::CREATED, "{body}");
    body
}

/// (bidder, amount, proxy) of each recorded bid, oldest first.
async fn history(app: &TestApp, id: i64) -> Vec<(i64, i64, bool)> {
    app.all_bids(id)
        .await
        .iter()
        .map(|b| (b["bidder_id"].as_i64().unwrap(), b["amount"].as_i64().unwrap(), b["proxy"].as_bool().unwrap()))
        .collect()
}

/// (high_bid, high_bidder) as the database has them.
async fn price(app: &TestApp, id: i64) -> (i64, i64) {
    let a = app.auction(id, true).await;
    (a["high_bid"].as_i64().unwrap(), a["high_bidder"].as_i64().unwrap())
}

#[tokio::test]
async fn a_proxy_bid_leads_at_its_amount_and_its_maximum_is_shown_to_its_owner_alone() {
    let app = spawn_app().await;
    let id = app.open_auction(1000, 10, 60.0, 0).await["id"].as_i64().unwrap();
    let (owner, other) = (app.bidder(2), app.bidder(3));
    let bid = placed(app.place_proxy_bid(&owner, id, 1000, 98_765).await).await;
    assert_eq!(
        (bid["amount"].as_i64(), bid["high_bid"].as_i64(), bid["max_amount"].as_i64(), bid["is_winning"].as_bool()),
        (Some(1000), Some(1000), Some(98_765), Some(true))
    );
    let auction = app.auction(id, true).await;
    assert_eq!(auction["high_bid"], 1000, "the price is the amount, not the maximum");
    assert_eq!(auction["reserve_met"], true, "a leader's maximum at the reserve puts the price at it");
    // Nobody else sees the maximum: not the auction (cached or not), not the history.
    let public = [
        app.get(&format!("/api/auctions/{id}")).await.text().await.unwrap(),
        app.get(&format!("/api/auctions/{id}?consistent=true")).await.text().await.unwrap(),
        app.get(&format!("/api/auctions/{id}/bids")).await.text().await.unwrap(),
        app.get("/api/auctions?status=open").await.text().await.unwrap(),
    ];
    for body in &public {
        assert!(!body.contains("98765"), "a maximum leaked: {body}");
    }
    let mine = app.my_bids(&owner).await;
    assert_eq!(mine.len(), 1);
    assert_eq!((mine[0]["auction_id"].as_i64(), mine[0]["max_amount"].as_i64()), (Some(id), Some(98_765)));
    assert!(app.my_bids(&other).await.is_empty(), "nor another bidder's own list");
    let anonymous = app.get("/api/me/bids").await;
    assert_problem(anonymous, StatusCode::UNAUTHORIZED, "/problems/unauthorized").await;
}

#[tokio::test]
async fn a_bid_below_the_leaders_maximum_is_recorded_then_outbid_by_the_proxy() {
    let app = spawn_app().await;
    let id = app.open_auction(100, 10, 60.0, 0).await["id"].as_i64().unwrap();
    placed(app.place_proxy_bid(&app.bidder(2), id, 100, 500).await).await;
    let lost = placed(app.place_bid(&app.bidder(3), id, 200).await).await;
    assert_eq!(lost["is_winning"], false);
    assert_eq!((lost["amount"].as_i64(), lost["high_bid"].as_i64()), (Some(200), Some(210)));
    assert_eq!(lost["min_next_bid"], 220);
    assert_eq!(price(&app, id).await, (210, 2));
    assert_eq!(history(&app, id).await, [(2, 100, false), (3, 200, false), (2, 210, true)]);
    let auction = app.auction(id, true).await;
    assert_eq!(auction["bid_count"], 3, "every recorded bid counts");
    eventually(Duration::from_secs(5), "every core's cache has the proxy's answer", || async {
        let reads = app.read_on_every_core(&format!("/api/auctions/{id}"), "/api/auctions/{id}").await;
        reads.iter().all(|r| r["high_bid"] == 210 && r["high_bidder"] == 2).then_some(())
    })
    .await;
    // The bid lost; the bidder's own list still has it.
    let mine = app.my_bids(&app.bidder(3)).await;
    assert_eq!((mine[0]["amount"].as_i64(), mine[0]["max_amount"].as_i64()), (Some(200), None));
}

#[tokio::test]
async fn the_price_is_the_second_maximum_plus_the_increment_capped_at_the_leaders() {
    let app = spawn_app().await;
    let id = app.open_auction(100, 10, 60.0, 0).await["id"].as_i64().unwrap();
    placed(app.place_proxy_bid(&app.bidder(2), id, 100, 500).await).await;
    // 300 is below 500: the leader's proxy answers at 300 + 10.
    let lost = placed(app.place_proxy_bid(&app.bidder(3), id, 150, 300).await).await;
    assert_eq!((lost["is_winning"].as_bool(), lost["high_bid"].as_i64()), (Some(false), Some(310)));
    // 505 beats 500 by less than the increment: the price is capped at 505.
    let won = placed(app.place_proxy_bid(&app.bidder(4), id, 320, 505).await).await;
    assert_eq!((won["is_winning"].as_bool(), won["amount"].as_i64()), (Some(true), Some(505)));
    assert_eq!(price(&app, id).await, (505, 4));
    // 900 beats 505 by more: the price is 505 + 10, though 700 was asked.
    let won = placed(app.place_proxy_bid(&app.bidder(5), id, 515, 900).await).await;
    assert_eq!((won["amount"].as_i64(), won["high_bid"].as_i64()), (Some(515), Some(515)));
    // An amount above what beating the maximum needs is the price asked.
    let won = placed(app.place_proxy_bid(&app.bidder(6), id, 950, 2000).await).await;
    assert_eq!(won["amount"], 950);
    assert_eq!(
        history(&app, id).await,
        [(2, 100, false), (3, 150, false), (2, 310, true), (4, 505, true), (5, 515, false), (6, 950, false),]
    );
}

#[tokio::test]
async fn equal_maximums_go_to_the_earlier_bid() {
    let app = spawn_app().await;
    let id = app.open_auction(100, 10, 60.0, 0).await["id"].as_i64().unwrap();
    placed(app.place_proxy_bid(&app.bidder(2), id, 100, 500).await).await;
    let tie = placed(app.place_proxy_bid(&app.bidder(3), id, 150, 500).await).await;
    assert_eq!((tie["is_winning"].as_bool(), tie["high_bid"].as_i64()), (Some(false), Some(500)));
    assert_eq!(price(&app, id).await, (500, 2));

    // A plain bid at exactly the leader's maximum: the earlier keeps the lead at
    // that amount, and nothing is recorded twice at one amount.
    let other = app.open_auction(100, 10, 60.0, 0).await["id"].as_i64().unwrap();
    placed(app.place_proxy_bid(&app.bidder(2), other, 100, 300).await).await;
    let tie = placed(app.place_bid(&app.bidder(3), other, 300).await).await;
    assert_eq!((tie["is_winning"].as_bool(), tie["high_bid"].as_i64()), (Some(false), Some(300)));
    assert_eq!(price(&app, other).await, (300, 2));
    assert_eq!(history(&app, other).await, [(2, 100, false), (3, 300, false)]);
    // Above it, the challenger leads.
    placed(app.place_bid(&app.bidder(3), other, 310).await).await;
    assert_eq!(price(&app, other).await, (310, 3));
}

#[tokio::test]
async fn raising_your_own_maximum_while_leading_leaves_the_price_and_the_clock() {
    let app = spawn_app().await;
    let id = app.open_auction(100, 10, 60.0, 30).await["id"].as_i64().unwrap();
    let leader = app.bidder(2);
    let first = placed(app.place_proxy_bid(&leader, id, 100, 200).await).await;
    // Now inside the anti-sniping window, where any change of price would extend.
    app.silently("update auctions set ends_at = now() + interval '10 seconds' where id = $1", id).await;
    let before = app.auction(id, true).await;
    let raised = placed(app.place_proxy_bid(&leader, id, 110, 400).await).await;
    assert_eq!(raised["is_winning"], true);
    assert_eq!((raised["bid_id"].as_i64(), raised["amount"].as_i64()), (first["bid_id"].as_i64(), Some(100)));
    let after = app.auction(id, true).await;
    for field in ["high_bid", "version", "ends_at", "bid_count"] {
        assert_eq!(after[field], before[field], "{field} changed by a raise of the maximum");
    }
    let mine = app.my_bids(&leader).await;
    assert_eq!(mine.len(), 1, "no new bid recorded");
    assert_eq!(mine[0]["max_amount"], 400);
    // The raised maximum is what defends the lead.
    let lost = placed(app.place_bid(&app.bidder(3), id, 300).await).await;
    assert_eq!((lost["is_winning"].as_bool(), lost["high_bid"].as_i64()), (Some(false), Some(310)));
    // A lower maximum does not lower it.
    placed(app.place_proxy_bid(&leader, id, 320, 350).await).await;
    let lost = placed(app.place_bid(&app.bidder(4), id, 380).await).await;
    assert_eq!((lost["is_winning"].as_bool(), lost["high_bid"].as_i64()), (Some(false), Some(390)));
    // Without a maximum, the leader raises its own price, as before proxy bids.
    let own = placed(app.place_bid(&leader, id, 400).await).await;
    assert_eq!((own["amount"].as_i64(), own["is_winning"].as_bool()), (Some(400), Some(true)));
    assert_eq!(price(&app, id).await, (400, 2));
}

#[tokio::test]
async fn anti_sniping_follows_the_visible_price_including_the_proxys_answers() {
    let app = spawn_app().await;
    let id = app.open_auction(100, 10, 60.0, 30).await["id"].as_i64().unwrap();
    let ends = |a: &Value| a["ends_at"].as_str().unwrap().parse::<DateTime<Utc>>().unwrap();
    placed(app.place_proxy_bid(&app.bidder(2), id, 100, 500).await).await;
    // Now inside the anti-sniping window.
    app.silently("update auctions set ends_at = now() + interval '10 seconds' where id = $1", id).await;
    let before = ends(&app.auction(id, true).await);
    // Outbid at once by the proxy: the price still moved, so the end moves.
    let lost = placed(app.place_bid(&app.bidder(3), id, 120).await).await;
    assert_eq!(lost["is_winning"], false);
    let answered = ends(&app.auction(id, true).await);
    assert_eq!(answered - before, chrono::Duration::seconds(30));
    assert_eq!(lost["ends_at"].as_str().unwrap().parse::<DateTime<Utc>>().unwrap(), answered, "the answer says so");
}

#[tokio::test]
async fn a_proxy_bid_replays_under_its_idempotency_key() {
    let app = spawn_app().await;
    let id = app.open_auction(100, 10, 60.0, 0).await["id"].as_i64().unwrap();
    placed(app.place_proxy_bid(&app.bidder(2), id, 100, 500).await).await;
    let send = |amount: i64, max: i64| {
        let body = serde_json::json!({"auction_id": id, "amount": amount, "max_amount": max});
        app.client
            .post(app.url("/api/bids"))
            .bearer_auth(app.bidder(3))
            .header("idempotency-key", "k-1")
            .json(&body)
            .send()
    };
    let first = placed(send(150, 200).await.unwrap()).await;
    assert_eq!((first["is_winning"].as_bool(), first["high_bid"].as_i64()), (Some(false), Some(210)));
    let again = placed(send(150, 200).await.unwrap()).await;
    assert_eq!(again, first, "the same answer, not a second bid");
    assert_eq!(history(&app, id).await.len(), 3);
    let changed = send(150, 250).await.unwrap();
    assert_problem(changed, StatusCode::UNPROCESSABLE_ENTITY, "/problems/idempotency-key-reused").await;
}

#[tokio::test]
async fn a_maximum_below_the_amount_is_refused() {
    let app = spawn_app().await;
    let id = app.open_auction(100, 10, 60.0, 0).await["id"].as_i64().unwrap();
    let problem = assert_problem(
        app.place_proxy_bid(&app.bidder(2), id, 300, 200).await,
        StatusCode::UNPROCESSABLE_ENTITY,
        "/problems/validation",
    )
    .await;
    assert_eq!(invalid_fields(&problem), ["max_amount"]);
    assert!(history(&app, id).await.is_empty());
}

/// Many bidders, each with its own maximum, bidding at once on one auction, each
/// going on until it leads or its maximum is spent: the highest maximum wins, at
/// no more than the second maximum plus the increment, and what is recorded is
/// strictly increasing.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_proxy_bidders_keep_the_invariants() {
    let app = spawn_app().await;
    let (reserve, increment) = (100, 7);
    let id = app.open_auction(reserve, increment, 60.0, 0).await["id"].as_i64().unwrap();
    let maxes: Vec<(i64, i64)> = (0..12).map(|k| (10 + k, 400 + 53 * ((k * 5) % 12))).collect();
    let mut tasks = Vec::new();
    for &(bidder, max) in &maxes {
        let (url, token) = (app.url("/api/bids"), app.bidder(bidder));
        tasks.push(tokio::spawn(async move {
            // Its own connection, so the kernel spreads the bidders over cores.
            let client = reqwest::Client::new();
            let mut amount = reserve;
            let mut ids = Vec::new();
            while amount <= max {
                let body = serde_json::json!({"auction_id": id, "amount": amount, "max_amount": max});
                let response = client.post(&url).bearer_auth(&token).json(&body).send().await.unwrap();
                let status = response.status();
                let body: Value = response.json().await.unwrap();
                match status {
                    // Leading, or outbid at once: either way the maximum now works alone.
                    StatusCode::CREATED => {
                        ids.push(body["bid_id"].as_i64().unwrap());
                        break;
                    }
                    StatusCode::CONFLICT => amount = body["min_next_bid"].as_i64().unwrap(),
                    other => panic!("{other}: {body}"),
                }
            }
            ids
        }));
    }
    let mut answered = Vec::new();
    for task in tasks {
        answered.extend(task.await.unwrap());
    }
    let mut sorted: Vec<i64> = maxes.iter().map(|&(_, m)| m).collect();
    sorted.sort_unstable();
    let (top, second) = (sorted[sorted.len() - 1], sorted[sorted.len() - 2]);
    let winner = maxes.iter().find(|&&(_, m)| m == top).unwrap().0;
    let (high_bid, high_bidder) = price(&app, id).await;
    assert_eq!(high_bidder, winner, "the highest maximum leads");
    assert!(high_bid <= (second + increment).min(top), "{high_bid} above what beating {second} needs");
    assert!(high_bid > second - increment, "{high_bid}: the second maximum was not spent");
    let recorded = app.all_bids(id).await;
    let amounts: Vec<i64> = recorded.iter().map(|b| b["amount"].as_i64().unwrap()).collect();
    assert!(amounts.windows(2).all(|w| w[0] < w[1]), "not strictly increasing: {amounts:?}");
    assert_eq!(app.auction(id, true).await["bid_count"], recorded.len());
    let ids: Vec<i64> = recorded.iter().map(|b| b["id"].as_i64().unwrap()).collect();
    assert!(answered.iter().all(|a| ids.contains(a)), "every 201 names a recorded bid");
}

//! Many bidders at once, on separate connections, on a multi-core server.

use std::collections::HashMap;

use reqwest::StatusCode;
use serde_json::Value;

use crate::helpers::spawn_app;

const CLIENTS: i64 = 12;
const BIDS_PER_CLIENT: usize = 40;
const AUCTIONS: usize = 3;

/// Every 201 is in the history, accepted amounts strictly increase in id order,
/// the final high bid is the largest accepted amount, and nothing is a 5xx.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_bidders_keep_every_auction_consistent() {
    let app = spawn_app().await;
    let mut ids = Vec::new();
    for _ in 0..AUCTIONS {
        ids.push(app.open_auction(100, 5, 120.0, 0).await["id"].as_i64().unwrap());
    }
    let mut tasks = Vec::new();
    for client_no in 0..CLIENTS {
        let url = app.url("/api/bids");
        let token = app.bidder(100 + client_no);
        let ids = ids.clone();
        tasks.push(tokio::spawn(async move {
            // One client each: its own connection, so the kernel spreads them over cores.
            let client = reqwest::Client::new();
            let mut guess: HashMap<i64, i64> = ids.iter().map(|&id| (id, 100)).collect();
            let mut accepted = Vec::new();
            let mut statuses = Vec::new();
            for i in 0..BIDS_PER_CLIENT {
                let id = ids[(i + client_no as usize) % ids.len()];
                let amount = guess[&id] + (client_no % 3);
                let response = client
                    .post(&url)
                    .bearer_auth(&token)
                    .json(&serde_json::json!({"auction_id": id, "amount": amount}))
                    .send()
                    .await
                    .expect("request");
                let status = response.status();
                statuses.push(status);
                let body: Value = response.json().await.expect("a JSON body");
                match status {
                    StatusCode::CREATED => {
                        accepted.push((id, body["bid_id"].as_i64().unwrap(), body["amount"].as_i64().unwrap()));
                        guess.insert(id, body["min_next_bid"].as_i64().unwrap());
                    }
                    StatusCode::CONFLICT => {
                        assert_eq!(body["type"], "/problems/bid-too-low", "{body}");
                        guess.insert(id, body["min_next_bid"].as_i64().unwrap());
                    }
                    other => panic!("unexpected {other}: {body}"),
                }
            }
            (accepted, statuses)
        }));
    }
    let mut accepted = Vec::new();
    for task in tasks {
        let (mine, statuses) = task.await.unwrap();
        assert!(statuses.iter().all(|s| !s.is_server_error()));
        accepted.extend(mine);
    }
    assert!(accepted.len() >= AUCTIONS, "some bids were accepted");

    for &id in &ids {
        let history = app.all_bids(id).await;
        let mut mine: Vec<(i64, i64)> =
            accepted.iter().filter(|(a, _, _)| *a == id).map(|&(_, bid, amount)| (bid, amount)).collect();
        mine.sort();
        let history: Vec<(i64, i64)> =
            history.iter().map(|b| (b["id"].as_i64().unwrap(), b["amount"].as_i64().unwrap())).collect();
        assert_eq!(history, mine, "auction {id}: the history is exactly the acknowledged bids");
        assert!(history.windows(2).all(|w| w[1].1 > w[0].1), "auction {id}: amounts strictly increase: {history:?}");
        let auction = app.auction(id, true).await;
        assert_eq!(auction["high_bid"].as_i64(), history.last().map(|b| b.1));
        assert_eq!(auction["bid_count"].as_u64(), Some(history.len() as u64));
    }
}

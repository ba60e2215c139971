//! Several gavel instances on one PostgreSQL: each sees the others' writes in
//! its caches, an Idempotency-Key holds across them, and exactly one runs the
//! auction lifecycle, another taking over when it stops.

use std::time::{Duration, Instant};

use eventsource_stream::Eventsource;
use futures::StreamExt;
use gavel::runtime::Server;
use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::helpers::{TestApp, eventually, fresh_connection_client, spawn_app_with, start_server};

/// Another instance on `app`'s database, with the same flags.
fn second(app: &TestApp, flags: &[&str]) -> Server {
    start_server(app.options.clone(), flags)
}

/// `path` read on new connections to `addr` until `check` holds for every core's
/// answer in one pass of at least 16 reads.
async fn seen_at(addr: std::net::SocketAddr, path: &str, check: impl Fn(&Value) -> bool) {
    let client = fresh_connection_client();
    eventually(Duration::from_secs(2), "the other instance shows the write", || async {
        for _ in 0..16 {
            let body: Value = client.get(format!("http://{addr}{path}")).send().await.ok()?.json().await.ok()?;
            if !check(&body) {
                return None;
            }
        }
        Some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_through_one_instance_is_in_the_others_caches() {
    let app = spawn_app_with(&[]).await;
    let other = second(&app, &[]);
    let id = app.open_auction(100, 10, 60.0, 0).await["id"].as_i64().unwrap();
    seen_at(other.local_addr(), &format!("/api/auctions/{id}"), |a| a["version"].is_i64()).await;
    // An event stream on the other instance, too.
    let events = reqwest::get(format!("http://{}/api/auctions/{id}/events", other.local_addr())).await.unwrap();
    assert_eq!(events.status(), StatusCode::OK);
    let mut events = events.bytes_stream().eventsource();
    let first = tokio::time::timeout(Duration::from_secs(5), events.next()).await.unwrap().unwrap().unwrap();
    assert_eq!(first.event, "auction");
    let started = Instant::now();
    assert_eq!(app.place_bid(&app.bidder(2), id, 150).await.status(), StatusCode::CREATED);
    seen_at(other.local_addr(), &format!("/api/auctions/{id}"), |a| a["high_bid"] == 150).await;
    let auction_lag = started.elapsed();
    let next = tokio::time::timeout(Duration::from_secs(5), events.next()).await.unwrap().unwrap().unwrap();
    let next: Value = serde_json::from_str(&next.data).unwrap();
    assert_eq!(next["high_bid"], 150, "the other instance's stream carries the bid");
    app.stock(1, "shared-1", 5).await;
    seen_at(other.local_addr(), "/api/inventory/shared-1", |i| i["available"] == 5).await;
    // And the other way.
    let bid = reqwest::Client::new()
        .post(format!("http://{}/api/bids", other.local_addr()))
        .bearer_auth(app.bidder(3))
        .json(&json!({"auction_id": id, "amount": 170}))
        .send()
        .await
        .unwrap();
    assert_eq!(bid.status(), StatusCode::CREATED);
    seen_at(app.addr, &format!("/api/auctions/{id}"), |a| a["high_bid"] == 170).await;
    eprintln!("a bid on one instance was in the other's caches after {auction_lag:?}");
    other.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idempotency_key_retried_on_the_other_instance_gets_the_first_outcome() {
    let app = spawn_app_with(&[]).await;
    let other = second(&app, &[]);
    let id = app.open_auction(100, 10, 60.0, 0).await["id"].as_i64().unwrap();
    let keyed = |addr: std::net::SocketAddr| {
        reqwest::Client::new()
            .post(format!("http://{addr}/api/bids"))
            .bearer_auth(app.bidder(2))
            .header("idempotency-key", "across-instances")
            .json(&json!({"auction_id": id, "amount": 100}))
            .send()
    };
    let first = keyed(app.addr).await.unwrap();
    assert_eq!(first.status(), StatusCode::CREATED);
    let first: Value = first.json().await.unwrap();
    assert_eq!(app.place_bid(&app.bidder(3), id, 200).await.status(), StatusCode::CREATED);
    let retry = keyed(other.local_addr()).await.unwrap();
    assert_eq!(retry.status(), StatusCode::CREATED);
    assert_eq!(retry.json::<Value>().await.unwrap(), first, "the first outcome, not a new bid");
    assert_eq!(app.all_bids(id).await.len(), 2);
    other.stop();
}

/// The lifecycle's connections, and how many of them hold the lifecycle's lock.
async fn lifecycle_sessions(app: &TestApp) -> (i64, i64) {
    let key = gavel::db::auctions::LIFECYCLE_LOCK;
    sqlx::query_as(
        "select (select count(*) from pg_stat_activity where application_name = $1), \
                (select count(*) from pg_locks where locktype = 'advisory' and granted \
                    and classid = ($2 >> 32)::oid and objid = ($2 & 4294967295)::oid and objsubid = 1)",
    )
    .bind(gavel::runtime::LIFECYCLE_APPLICATION)
    .bind(key)
    .fetch_one(&app.db)
    .await
    .unwrap()
}

/// Of two instances, one holds the lock and runs the lifecycle; when it stops,
/// the other takes over within two ticks and closes auctions in its stead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_instance_runs_the_lifecycle_and_another_takes_over() {
    const TICK: Duration = Duration::from_millis(200);
    let tick = ["--lifecycle-tick", "200ms"];
    let mut app = spawn_app_with(&tick).await;
    // The first instance alone: it leads.
    eventually(Duration::from_secs(5), "the first instance leads", || async {
        (lifecycle_sessions(&app).await == (1, 1)).then_some(())
    })
    .await;
    let other = second(&app, &tick);
    eventually(Duration::from_secs(5), "the second instance waits for the lock", || async {
        (lifecycle_sessions(&app).await == (2, 1)).then_some(())
    })
    .await;
    tokio::time::sleep(TICK * 3).await;
    assert_eq!(lifecycle_sessions(&app).await, (2, 1), "one leader, however many ticks pass");

    let id = app.open_auction(100, 10, 1.5, 0).await["id"].as_i64().unwrap();
    assert_eq!(app.place_bid(&app.bidder(2), id, 100).await.status(), StatusCode::CREATED);
    let addr = app.addr;
    tokio::task::block_in_place(|| app.stop_server());
    let stopped = Instant::now();
    let takeover = eventually(Duration::from_secs(5), "the other instance leads", || async {
        (lifecycle_sessions(&app).await == (1, 1)).then(|| stopped.elapsed())
    })
    .await;
    eprintln!("the other instance took over the lifecycle after {takeover:?} (tick {TICK:?})");
    // Two ticks, and room for a loaded machine's scheduling and the polling here.
    assert!(takeover <= TICK * 2 + Duration::from_millis(400), "took {takeover:?}");
    // It runs the lifecycle: the auction closes, with its winner, in the database.
    eventually(Duration::from_secs(5), "the auction is closed by the remaining instance", || async {
        let row: (String, Option<i64>) = sqlx::query_as("select status, winner_id from auctions where id = $1")
            .bind(id)
            .fetch_one(&app.db)
            .await
            .unwrap();
        (row == ("closed".to_owned(), Some(2))).then_some(())
    })
    .await;
    assert!(reqwest::get(format!("http://{addr}/health")).await.is_err(), "the first instance is gone");
    tokio::task::block_in_place(|| other.stop());
}

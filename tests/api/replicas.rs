//! Read replicas: a real streaming standby, made with `pg_basebackup -R` from the
//! test's primary, takes the reads that may lag; one that lags past
//! `--replica-max-lag`, or stops, is skipped; caches and writes stay on the
//! primary.

use std::net::SocketAddr;
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::Value;

use crate::helpers::{
    Standby, TestApp, app_on, eventually, free_port, per_core_at, prepare_database, start_cluster, start_server,
};

/// A gavel on a fresh primary, reading from a standby of it (over its socket)
/// with `flags` added. The standby listens on TCP too.
async fn replicated(flags: &[&str]) -> (TestApp, Standby) {
    let primary = start_cluster();
    let options = prepare_database(&primary).await;
    let standby = Standby::of(&primary, Some(free_port())).await;
    let url = standby.cluster.url("gavel");
    let mut all = vec!["--replica-url", url.as_str()];
    all.extend_from_slice(flags);
    let server = start_server(options.clone(), &all);
    let app = app_on(primary, options, server).await;
    (app, standby)
}

/// `gavel_replica_usable` of every core of the instance at `admin`, for the
/// replica reached at `through` (`127.0.0.1:` for TCP, `/` for the socket).
///
/// Two instances in one test process share one metrics registry: the two
/// instances of a test reach the standby by different ways, so that each has
/// series of its own.
async fn usable(admin: SocketAddr, through: &str) -> [f64; 2] {
    per_core_at(admin, "gavel_replica_usable", &[&format!("replica=\"{through}")]).await
}

async fn wait_usable(admin: SocketAddr, through: &str, expected: f64, what: &str) {
    eventually(Duration::from_secs(10), what, || async {
        (usable(admin, through).await == [expected; 2]).then_some(())
    })
    .await;
}

/// Reads that may go to a replica, answered by `to` (replica or primary), on all
/// cores. (Shared by the instances of one test process: a test reads through one
/// at a time.)
async fn routed(admin: SocketAddr, to: &str) -> f64 {
    per_core_at(admin, "gavel_routed_reads_total", &[&format!("to=\"{to}\"")]).await.iter().sum()
}

/// How the strict instance reaches the standby.
const TCP: &str = "127.0.0.1:";

async fn json(client: &reqwest::Client, addr: SocketAddr, path: &str) -> Value {
    let response = client.get(format!("http://{addr}{path}")).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK, "{path}");
    response.json().await.unwrap()
}

fn amounts(page: &Value) -> Vec<i64> {
    page["items"].as_array().unwrap().iter().map(|b| b["amount"].as_i64().unwrap()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_that_may_lag_go_to_a_replica_until_it_lags_too_far() {
    // `app` tolerates any lag; `strict`, on the same primary and standby, 300 ms.
    let (app, standby) = replicated(&["--replica-max-lag", "1h"]).await;
    let url = format!("postgres://gavel@127.0.0.1:{}/gavel", standby.cluster.port().unwrap());
    let strict = start_server(app.options.clone(), &["--replica-url", &url, "--replica-max-lag", "300ms"]);
    let strict_admin = strict.admin_addr().unwrap();
    let client = reqwest::Client::new();

    let id = app.open_auction(100, 10, 60.0, 0).await["id"].as_i64().unwrap();
    assert_eq!(app.place_bid(&app.bidder(2), id, 150).await.status(), StatusCode::CREATED);
    standby.caught_up(&app.db).await;
    wait_usable(app.admin_addr, "/", 1.0, "both cores use the replica").await;
    wait_usable(strict_admin, TCP, 1.0, "both strict cores use the replica").await;

    let history = format!("/api/auctions/{id}/bids");
    let before = routed(app.admin_addr, "replica").await;
    assert_eq!(amounts(&json(&client, app.addr, &history).await), [150]);
    assert_eq!(routed(app.admin_addr, "replica").await, before + 1.0, "the history came from the replica");

    // The standby stops replaying; the primary moves on.
    sqlx::query("select pg_wal_replay_pause()").execute(&standby.db).await.unwrap();
    assert_eq!(app.place_bid(&app.bidder(3), id, 170).await.status(), StatusCode::CREATED);

    // Past 300 ms of lag the strict instance skips the replica, and reads the
    // primary: the newest bid is there.
    wait_usable(strict_admin, TCP, 0.0, "the strict instance skips the lagging replica").await;
    let primary_reads = routed(strict_admin, "primary").await;
    assert_eq!(amounts(&json(&client, strict.local_addr(), &history).await), [170, 150]);
    assert_eq!(routed(strict_admin, "primary").await, primary_reads + 1.0);

    // The tolerant instance still reads the replica, which shows the history and
    // the list as they were; its cache, fed by the primary, has the new bid, and
    // so does `?consistent=true`.
    assert_eq!(usable(app.admin_addr, "/").await, [1.0; 2]);
    assert_eq!(amounts(&json(&client, app.addr, &history).await), [150], "a lagging replica answered");
    let list = json(&client, app.addr, "/api/auctions?limit=100").await;
    let listed = list["items"].as_array().unwrap().iter().find(|a| a["id"] == id).cloned().unwrap();
    assert_eq!(listed["high_bid"], 150, "the list came from the replica too");
    assert_eq!(json(&client, app.addr, &format!("/api/auctions/{id}")).await["high_bid"], 170);
    assert_eq!(json(&client, app.addr, &format!("/api/auctions/{id}?consistent=true")).await["high_bid"], 170);
    eventually(Duration::from_secs(5), "the tolerant instance measures the lag too", || async {
        let lag = per_core_at(app.admin_addr, "gavel_replica_lag_seconds", &["replica=\"/"]).await;
        lag.iter().all(|&l| l > 0.3).then_some(())
    })
    .await;
    assert_eq!(usable(app.admin_addr, "/").await, [1.0; 2], "within an hour of lag, still in use");

    // Replaying again, the replica catches up and the strict instance uses it.
    sqlx::query("select pg_wal_replay_resume()").execute(&standby.db).await.unwrap();
    standby.caught_up(&app.db).await;
    wait_usable(strict_admin, TCP, 1.0, "the strict instance uses the replica again").await;
    let replica_reads = routed(strict_admin, "replica").await;
    assert_eq!(amounts(&json(&client, strict.local_addr(), &history).await), [170, 150]);
    assert_eq!(routed(strict_admin, "replica").await, replica_reads + 1.0);
    strict.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_closed_auctions_are_read_from_a_replica_and_a_stopped_one_costs_no_errors() {
    let (app, standby) = replicated(&["--cache-closed-grace", "0s"]).await;
    let client = reqwest::Client::new();
    let closing = app.open_auction(100, 10, 0.5, 0).await["id"].as_i64().unwrap();
    assert_eq!(app.place_bid(&app.bidder(2), closing, 150).await.status(), StatusCode::CREATED);
    eventually(Duration::from_secs(10), "the lifecycle closes the auction", || async {
        let closed: bool = sqlx::query_scalar("select status = 'closed' from auctions where id = $1")
            .bind(closing)
            .fetch_one(&app.db)
            .await
            .ok()?;
        closed.then_some(())
    })
    .await;
    standby.caught_up(&app.db).await;
    wait_usable(app.admin_addr, "/", 1.0, "both cores use the replica").await;
    // Evicted at once (no grace), a closed auction is read from the replica.
    let path = format!("/api/auctions/{closing}");
    eventually(Duration::from_secs(10), "a closed auction's read goes to the replica", || async {
        let before = routed(app.admin_addr, "replica").await;
        let auction = json(&client, app.addr, &path).await;
        assert_eq!((auction["status"].as_str(), auction["high_bid"].as_i64()), (Some("closed"), Some(150)));
        (routed(app.admin_addr, "replica").await > before).then_some(())
    })
    .await;

    // A consistent read is the primary's, whatever the replica holds.
    let open = app.open_auction(100, 10, 60.0, 0).await["id"].as_i64().unwrap();
    let before = (routed(app.admin_addr, "replica").await, routed(app.admin_addr, "primary").await);
    let auction = json(&client, app.addr, &format!("/api/auctions/{open}?consistent=true")).await;
    assert_eq!(auction["status"], "open");
    assert_eq!(
        (routed(app.admin_addr, "replica").await, routed(app.admin_addr, "primary").await),
        before,
        "a consistent read is not routed at all"
    );

    // The standby goes away: reads that would go there still answer, from the
    // primary, and the replica is skipped.
    drop(standby);
    for _ in 0..4 {
        let history = json(&client, app.addr, &format!("/api/auctions/{closing}/bids")).await;
        assert_eq!(amounts(&history), [150]);
        json(&client, app.addr, "/api/auctions").await;
        json(&client, app.addr, "/api/inventory").await;
    }
    wait_usable(app.admin_addr, "/", 0.0, "the stopped replica is skipped").await;
    assert_eq!(json(&client, app.addr, &path).await["high_bid"], 150);
}

//! Per-core caches stay coherent: through NOTIFY, and after losing the listener.

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::Value;

use crate::helpers::{TestApp, eventually, fresh_connection_client, spawn_app};

/// The route template of a single auction, as the request metrics label it.
const AUCTION_ROUTE: &str = "/api/auctions/{id}";

/// Reads `id` over `n` new connections (spread over the cores by the kernel) and
/// returns the versions seen.
async fn versions_on_fresh_connections(app: &TestApp, id: i64, n: usize) -> Vec<i64> {
    let client = fresh_connection_client();
    let mut versions = Vec::with_capacity(n);
    for _ in 0..n {
        let response = client.get(app.url(&format!("/api/auctions/{id}"))).send().await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        let body: Value = response.json().await.unwrap();
        versions.push(body["version"].as_i64().unwrap());
    }
    versions
}

/// After a bid on one connection, reads on fresh connections (other cores) show
/// the new version within a bounded time.
#[tokio::test]
async fn every_core_sees_a_new_version_promptly() {
    let app = spawn_app().await;
    let id = app.open_auction(100, 10, 60.0, 0).await["id"].as_i64().unwrap();
    // Warm every core's cache with the first version.
    assert!(versions_on_fresh_connections(&app, id, 8).await.iter().all(|&v| v == 1));

    let placed = app.place_bid(&app.bidder(2), id, 100).await;
    assert_eq!(placed.status(), StatusCode::CREATED);
    let expected = app.auction(id, true).await["version"].as_i64().unwrap();
    assert!(expected > 1);
    eventually(Duration::from_secs(2), "all cores serve the new version", || async {
        versions_on_fresh_connections(&app, id, 8).await.iter().all(|&v| v == expected).then_some(())
    })
    .await;
}

/// Killing every core's LISTEN connection: reads stay correct meanwhile (served
/// from the database), the listeners come back, and changes flow again.
#[tokio::test]
async fn caches_recover_after_the_listener_connection_is_killed() {
    let app = spawn_app().await;
    let id = app.open_auction(100, 10, 60.0, 0).await["id"].as_i64().unwrap();
    versions_on_fresh_connections(&app, id, 8).await;
    app.wait_for_listeners().await;

    assert_eq!(app.kill_listeners().await, 2);

    // A change made while the listeners may be down, with nothing announcing it
    // to a core that was not listening: it must not be missed.
    assert_eq!(app.place_bid(&app.bidder(2), id, 100).await.status(), StatusCode::CREATED);
    let expected = app.auction(id, true).await["version"].as_i64().unwrap();
    eventually(Duration::from_secs(5), "reads show the change on every core", || async {
        versions_on_fresh_connections(&app, id, 8).await.iter().all(|&v| v == expected).then_some(())
    })
    .await;
    app.wait_for_listeners().await;

    // And notifications flow again after the reconnect.
    assert_eq!(app.place_bid(&app.bidder(3), id, 110).await.status(), StatusCode::CREATED);
    let expected = app.auction(id, true).await["version"].as_i64().unwrap();
    eventually(Duration::from_secs(2), "new changes reach every core", || async {
        versions_on_fresh_connections(&app, id, 8).await.iter().all(|&v| v == expected).then_some(())
    })
    .await;
}

/// A core that lost its listener reloads what it holds when it is back, before it
/// serves from its cache again. The change is made with triggers silenced (no
/// notification) before the listeners go, and nothing is read while they are
/// down, so only the reload can bring it into the caches.
#[tokio::test]
async fn a_reconnected_core_reloads_what_it_missed() {
    let app = spawn_app().await;
    let id = app.open_auction(100, 10, 60.0, 0).await["id"].as_i64().unwrap();
    let path = format!("/api/auctions/{id}");
    app.read_on_every_core(&path, AUCTION_ROUTE).await;
    app.wait_for_listeners().await;
    app.silently("update auctions set title = 'renamed', version = version + 1 where id = $1", id).await;
    let stale = app.read_on_every_core(&path, AUCTION_ROUTE).await;
    assert!(stale.iter().all(|a| a["title"] == "lot"), "no notification, so every core serves its cached copy");

    app.reconnect_listeners().await;
    let reloaded = app.read_on_every_core(&path, AUCTION_ROUTE).await;
    assert!(reloaded.iter().all(|a| a["title"] == "renamed"), "every core reloaded: {reloaded:?}");
}

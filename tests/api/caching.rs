//! What the per-core caches promise a client and an SRE: conditional reads (304),
//! bounded caches that let closed auctions go and read them from the database
//! after, and a request gauge that survives clients who leave mid-request.

use std::time::Duration;

use reqwest::StatusCode;
use reqwest::header::{CACHE_CONTROL, ETAG, IF_NONE_MATCH};
use serde_json::json;

use crate::helpers::{TestApp, eventually, spawn_app, spawn_app_with, sum};

async fn get_with(app: &TestApp, path: &str, if_none_match: &str) -> reqwest::Response {
    app.client.get(app.url(path)).header(IF_NONE_MATCH, if_none_match).send().await.unwrap()
}

#[tokio::test]
async fn a_current_etag_gets_304_and_a_changed_auction_200() {
    let app = spawn_app().await;
    let id = app.open_auction(100, 10, 60.0, 0).await["id"].as_i64().unwrap();
    let path = format!("/api/auctions/{id}");
    let first = app.get(&path).await;
    assert_eq!(first.status(), StatusCode::OK);
    assert_eq!(first.headers()[CACHE_CONTROL], "no-cache");
    let etag = first.headers()[ETAG].to_str().unwrap().to_owned();

    for tags in [etag.clone(), format!("W/{etag}"), format!("\"0\", {etag}"), "*".to_owned()] {
        let again = get_with(&app, &path, &tags).await;
        assert_eq!(again.status(), StatusCode::NOT_MODIFIED, "If-None-Match: {tags}");
        assert_eq!(again.headers()[ETAG], etag.as_str());
        assert_eq!(again.headers()[CACHE_CONTROL], "no-cache");
        assert!(again.headers().contains_key("x-request-id"));
        assert!(again.bytes().await.unwrap().is_empty(), "a 304 has no body");
    }
    // The same from the database.
    let consistent = get_with(&app, &format!("{path}?consistent=true"), &etag).await;
    assert_eq!(consistent.status(), StatusCode::NOT_MODIFIED);

    assert_eq!(app.place_bid(&app.bidder(2), id, 100).await.status(), StatusCode::CREATED);
    let changed = eventually(Duration::from_secs(5), "the bid reaches the cache", || async {
        let r = get_with(&app, &path, &etag).await;
        (r.status() == StatusCode::OK).then_some(r)
    })
    .await;
    assert_ne!(changed.headers()[ETAG], etag.as_str());
    let body: serde_json::Value = changed.json().await.unwrap();
    assert_eq!(body["high_bid"], 100);
    assert_eq!(get_with(&app, &path, "\"123456\"").await.status(), StatusCode::OK, "another tag is not a match");
}

#[tokio::test]
async fn stock_reads_are_conditional_too() {
    let app = spawn_app().await;
    let put = app.put_inventory(&app.seller(), "cond-1", "pears", 4).await;
    assert_eq!(put.status(), StatusCode::CREATED);
    let etag = put.headers()[ETAG].to_str().unwrap().to_owned();
    let read = get_with(&app, "/api/inventory/cond-1", &etag).await;
    assert_eq!(read.status(), StatusCode::NOT_MODIFIED);
    assert_eq!(read.headers()[CACHE_CONTROL], "no-cache");
    assert_eq!(get_with(&app, "/api/inventory/cond-1", "\"999\"").await.status(), StatusCode::OK);
}

/// The auction's title as a read sees it now.
async fn title(app: &TestApp, id: i64) -> String {
    app.auction(id, false).await["title"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn a_closed_auction_leaves_the_caches_after_its_grace_and_is_read_from_the_database() {
    let app = spawn_app_with(&["--cache-closed-grace", "1s"]).await;
    app.wait_for_listeners().await;
    let id = app.open_auction(100, 10, 1.0, 0).await["id"].as_i64().unwrap();
    // Cached on both cores: a core whose listener has not heard of the new
    // auction yet would read it from the database.
    app.read_on_every_core(&format!("/api/auctions/{id}"), "/api/auctions/{id}").await;
    let original = title(&app, id).await;
    // A change no notification announces: while the auction is cached, reads do
    // not see it.
    app.silently("update auctions set title = 'renamed quietly' where id = $1", id).await;
    assert_eq!(title(&app, id).await, original, "served from the cache");

    let text = eventually(Duration::from_secs(20), "both cores evicted the closed auction", || async {
        let text = app.scrape().await;
        (sum(&text, "gavel_cache_evictions_total", &["cache=\"auctions\"", "reason=\"closed\""]) >= 2.0).then_some(text)
    })
    .await;
    assert_eq!(sum(&text, "gavel_cache_entries", &["cache=\"auctions\""]), 0.0, "{text}");
    assert_eq!(title(&app, id).await, "renamed quietly", "read from the database once evicted");
    // Read again, it is not cached again: another quiet change shows at once.
    app.silently("update auctions set title = 'renamed twice' where id = $1", id).await;
    assert_eq!(title(&app, id).await, "renamed twice");
}

#[tokio::test]
async fn each_cache_holds_at_most_its_capacity() {
    // A short grace makes the sweep, which publishes the counts, run every second.
    let app = spawn_app_with(&["--cache-capacity", "2", "--cache-closed-grace", "10s"]).await;
    app.wait_for_listeners().await;
    let mut ids = Vec::new();
    for _ in 0..4 {
        ids.push(app.open_auction(100, 10, 60.0, 0).await["id"].as_i64().unwrap());
    }
    let skus = ["cap-1", "cap-2", "cap-3", "cap-4"];
    for sku in skus {
        assert_eq!(app.put_inventory(&app.seller(), sku, "plums", 3).await.status(), StatusCode::CREATED);
    }
    for id in &ids {
        app.auction(*id, false).await;
    }
    for sku in skus {
        assert_eq!(app.get(&format!("/api/inventory/{sku}")).await.status(), StatusCode::OK);
    }
    // Each core hears of all four of each, so each evicts at least two of each.
    let text = eventually(Duration::from_secs(20), "the sweep published the counts", || async {
        let text = app.scrape().await;
        let evicted = |cache: &str| {
            sum(&text, "gavel_cache_evictions_total", &[&format!("cache=\"{cache}\""), "reason=\"capacity\""])
        };
        (evicted("auctions") >= 4.0 && evicted("inventory") >= 4.0).then_some(text)
    })
    .await;
    for cache in ["auctions", "inventory"] {
        for core in ["0", "1"] {
            let entries =
                sum(&text, "gavel_cache_entries", &[&format!("cache=\"{cache}\""), &format!("core=\"{core}\"")]);
            assert!(entries <= 2.0, "core {core} holds {entries} entries in {cache}");
        }
    }
    // Every auction and sku still reads, cached or not.
    for id in &ids {
        assert_eq!(app.auction(*id, false).await["id"], *id);
    }
    for sku in skus {
        assert_eq!(app.get(&format!("/api/inventory/{sku}")).await.status(), StatusCode::OK);
    }
}

/// Clients that give up while their bid waits on a locked row leave the
/// in-flight gauge as they go, and are counted as 499.
#[tokio::test]
async fn requests_abandoned_by_their_clients_leave_the_in_flight_gauge() {
    let app = spawn_app().await;
    let id = app.open_auction(100, 10, 60.0, 0).await["id"].as_i64().unwrap();
    let mut lock = app.db.begin().await.unwrap();
    sqlx::query("select 1 from auctions where id = $1 for update").bind(id).execute(&mut *lock).await.unwrap();

    let impatient = reqwest::Client::builder().timeout(Duration::from_millis(300)).build().unwrap();
    let mut tasks = Vec::new();
    for n in 0..5 {
        let (client, url, token) = (impatient.clone(), app.url("/api/bids"), app.bidder(10 + n));
        tasks.push(tokio::spawn(async move {
            client.post(url).bearer_auth(token).json(&json!({"auction_id": id, "amount": 100 + n})).send().await
        }));
    }
    for task in tasks {
        assert!(task.await.unwrap().is_err(), "the client gave up");
    }
    lock.rollback().await.unwrap();

    let text = eventually(Duration::from_secs(5), "no request is counted in flight", || async {
        let text = app.scrape().await;
        (sum(&text, "http_requests_in_flight", &[]) == 0.0).then_some(text)
    })
    .await;
    assert_eq!(sum(&text, "http_requests_total", &["route=\"/api/bids\"", "status=\"499\""]), 5.0, "{text}");
}

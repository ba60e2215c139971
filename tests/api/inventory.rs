//! Stocking skus, reading and listing them, and keeping every core's copy current.

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::Value;

use crate::helpers::{TestApp, assert_problem, eventually, fresh_connection_client, invalid_fields, spawn_app};
use crate::shop::{etag, skus};

/// Reads `sku` over `n` new connections (spread over the cores by the kernel) and
/// returns `(version, available, reserved)` as each saw it.
async fn levels_on_fresh_connections(app: &TestApp, sku: &str, n: usize) -> Vec<(i64, i64, i64)> {
    let client = fresh_connection_client();
    let mut seen = Vec::with_capacity(n);
    for _ in 0..n {
        let response = client.get(app.url(&format!("/api/inventory/{sku}"))).send().await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        let body: Value = response.json().await.unwrap();
        seen.push((
            body["version"].as_i64().unwrap(),
            body["available"].as_i64().unwrap(),
            body["reserved"].as_i64().unwrap(),
        ));
    }
    seen
}

/// The database's `(version, available, reserved)` of `sku`.
async fn truth(app: &TestApp, sku: &str) -> (i64, i64, i64) {
    let item = app.item(sku, true).await;
    (item["version"].as_i64().unwrap(), item["available"].as_i64().unwrap(), item["reserved"].as_i64().unwrap())
}

/// Every sku of a listing, following `next_after`.
async fn all_skus(app: &TestApp, query: &str) -> Vec<String> {
    let mut all = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let path = match &after {
            Some(a) => format!("/api/inventory?{query}&limit=2&after={a}"),
            None => format!("/api/inventory?{query}&limit=2"),
        };
        let response = app.get(&path).await;
        assert_eq!(response.status(), StatusCode::OK, "GET {path}");
        let page: Value = response.json().await.unwrap();
        all.extend(skus(&page));
        match page["next_after"].as_str() {
            Some(a) => after = Some(a.to_owned()),
            None => break,
        }
        assert!(all.len() < 1000, "pagination ends");
    }
    all
}

/// A new sku is 201, a restock of it 200; both answer the item with its version
/// as the ETag, and reads agree.
#[tokio::test]
async fn a_seller_creates_then_restocks_a_sku() {
    let app = spawn_app().await;
    let created = app.put_inventory(&app.seller(), "widget-1", "Widget", 10).await;
    assert_eq!(created.status(), StatusCode::CREATED);
    let tag = etag(&created);
    let item: Value = created.json().await.unwrap();
    assert_eq!(item["sku"], "widget-1");
    assert_eq!(item["seller_id"], 1);
    assert_eq!(item["title"], "Widget");
    assert_eq!(item["available"], 10);
    assert_eq!(item["reserved"], 0);
    let first = item["version"].as_i64().unwrap();
    assert_eq!(tag, format!("\"{first}\""));

    let restocked = app.put_inventory(&app.seller(), "widget-1", "Widget", 25).await;
    assert_eq!(restocked.status(), StatusCode::OK);
    let tag = etag(&restocked);
    let item: Value = restocked.json().await.unwrap();
    assert_eq!(item["sku"], "widget-1");
    assert_eq!(item["seller_id"], 1);
    assert_eq!(item["available"], 25, "a restock sets available to the given value");
    assert_eq!(item["reserved"], 0);
    let second = item["version"].as_i64().unwrap();
    assert!(second > first, "a restock bumps the version");
    assert_eq!(tag, format!("\"{second}\""));

    // Down is a restock too: `available` is set, not added to.
    let lowered: Value = app.put_inventory(&app.seller(), "widget-1", "Widget", 3).await.json().await.unwrap();
    assert_eq!(lowered["available"], 3);
    let third = lowered["version"].as_i64().unwrap();
    assert!(third > second);

    for path in ["/api/inventory/widget-1?consistent=true", "/api/inventory/widget-1"] {
        let read = app.get(path).await;
        assert_eq!(read.status(), StatusCode::OK);
        let tag = etag(&read);
        let body: Value = read.json().await.unwrap();
        assert_eq!(body, lowered, "{path}");
        assert_eq!(tag, format!("\"{third}\""), "{path}");
    }
}

/// Only sellers stock, and only their own skus: another seller's sku is refused
/// and left exactly as it was.
#[tokio::test]
async fn only_a_seller_may_stock_and_only_its_own_skus() {
    let app = spawn_app().await;
    let forbidden = app.put_inventory(&app.bidder(5), "gadget", "Gadget", 5).await;
    assert_problem(forbidden, StatusCode::FORBIDDEN, "/problems/forbidden").await;
    let anonymous = app
        .client
        .put(app.url("/api/inventory/gadget"))
        .json(&serde_json::json!({"title": "Gadget", "available": 5}))
        .send()
        .await
        .unwrap();
    assert_problem(anonymous, StatusCode::UNAUTHORIZED, "/problems/unauthorized").await;
    assert_problem(
        app.get("/api/inventory/gadget?consistent=true").await,
        StatusCode::NOT_FOUND,
        "/problems/not-found",
    )
    .await;

    let mine = app.stock(1, "gadget", 5).await;
    let theirs = app.put_inventory(&app.seller_as(2), "gadget", "Hijacked", 500).await;
    assert_problem(theirs, StatusCode::FORBIDDEN, "/problems/forbidden").await;
    let after = app.item("gadget", true).await;
    assert_eq!(after, mine, "the stock is unchanged");
    assert_eq!(after["seller_id"], 1);
    assert_eq!(after["available"], 5);

    // Seller 2 can still stock a sku of its own.
    let own = app.put_inventory(&app.seller_as(2), "gadget-2", "Gadget two", 7).await;
    assert_eq!(own.status(), StatusCode::CREATED);
    assert_eq!(own.json::<Value>().await.unwrap()["seller_id"], 2);
}

/// A sku is 1-64 of `A-Z a-z 0-9 . _ -`; available cannot be negative; a title cannot be empty.
#[tokio::test]
async fn invalid_skus_stock_levels_and_titles_are_422() {
    let app = spawn_app().await;
    let seller = app.seller();
    let too_long = "s".repeat(65);
    for sku in ["bad%20sku%21", too_long.as_str(), "caf%C3%A9", "semi%3Bcolon"] {
        let response = app.put_inventory(&seller, sku, "Thing", 1).await;
        let problem = assert_problem(response, StatusCode::UNPROCESSABLE_ENTITY, "/problems/validation").await;
        assert_eq!(invalid_fields(&problem), ["sku"], "sku {sku:?}");
    }
    let response = app.put_inventory(&seller, "fine", "Thing", -1).await;
    let problem = assert_problem(response, StatusCode::UNPROCESSABLE_ENTITY, "/problems/validation").await;
    assert_eq!(invalid_fields(&problem), ["available"]);
    let response = app.put_inventory(&seller, "fine", "", 1).await;
    let problem = assert_problem(response, StatusCode::UNPROCESSABLE_ENTITY, "/problems/validation").await;
    assert_eq!(invalid_fields(&problem), ["title"]);
    let response = app.put_inventory(&seller, "fine", "", -1).await;
    let problem = assert_problem(response, StatusCode::UNPROCESSABLE_ENTITY, "/problems/validation").await;
    let mut fields = invalid_fields(&problem);
    fields.sort();
    assert_eq!(fields, ["available", "title"]);
    assert_problem(app.get("/api/inventory/fine?consistent=true").await, StatusCode::NOT_FOUND, "/problems/not-found")
        .await;

    // The edges of what is allowed.
    let longest = "L".repeat(64);
    for sku in [longest.as_str(), "A-z_0.9", "x"] {
        let response = app.put_inventory(&seller, sku, "Thing", 0).await;
        assert_eq!(response.status(), StatusCode::CREATED, "sku {sku:?}");
        assert_eq!(response.json::<Value>().await.unwrap()["sku"], sku);
    }
}

/// A path sku that is not even UTF-8 is a 422 problem naming the field, on reads
/// and writes alike — never a plain-text 400.
#[tokio::test]
async fn an_undecodable_sku_in_the_path_is_a_422_problem() {
    let app = spawn_app().await;
    let read = app.get("/api/inventory/%FF%FE").await;
    let body = assert_problem(read, StatusCode::UNPROCESSABLE_ENTITY, "/problems/validation").await;
    assert_eq!(body["errors"][0]["field"], "sku");
    let write = app.put_inventory(&app.seller(), "%FF%FE", "t", 1).await;
    let body = assert_problem(write, StatusCode::UNPROCESSABLE_ENTITY, "/problems/validation").await;
    assert_eq!(body["errors"][0]["field"], "sku");
}

#[tokio::test]
async fn an_unknown_sku_is_404() {
    let app = spawn_app().await;
    app.stock(1, "known", 1).await;
    assert_problem(app.get("/api/inventory/unknown").await, StatusCode::NOT_FOUND, "/problems/not-found").await;
    assert_problem(
        app.get("/api/inventory/unknown?consistent=true").await,
        StatusCode::NOT_FOUND,
        "/problems/not-found",
    )
    .await;
    assert_eq!(app.item("known", false).await["available"], 1);
}

/// The list is ordered by sku, filters by seller, and pages with `after`.
#[tokio::test]
async fn inventory_list_filters_by_seller_and_pages_by_sku() {
    let app = spawn_app().await;
    // Out of order on purpose; lowercase and equal length, so any collation agrees on the order.
    for sku in ["sku03", "sku01", "sku05", "sku02", "sku04"] {
        app.stock(1, sku, 1).await;
    }
    for sku in ["sku06", "sku00"] {
        app.stock(2, sku, 1).await;
    }

    let page: Value = app.get("/api/inventory?seller=1&limit=2").await.json().await.unwrap();
    assert_eq!(skus(&page), ["sku01", "sku02"]);
    assert_eq!(page["next_after"], "sku02");
    let page: Value = app.get("/api/inventory?seller=1&limit=2&after=sku02").await.json().await.unwrap();
    assert_eq!(skus(&page), ["sku03", "sku04"]);
    let page: Value = app.get("/api/inventory?seller=1&limit=2&after=sku04").await.json().await.unwrap();
    assert_eq!(skus(&page), ["sku05"]);
    assert_eq!(page["next_after"], Value::Null);
    assert!(page["items"][0]["seller_id"] == 1 && page["items"][0]["available"] == 1, "{page}");

    assert_eq!(all_skus(&app, "seller=1").await, ["sku01", "sku02", "sku03", "sku04", "sku05"]);
    assert_eq!(all_skus(&app, "seller=2").await, ["sku00", "sku06"]);
    assert_eq!(all_skus(&app, "seller=3").await, Vec::<String>::new());
    let everything: Value = app.get("/api/inventory").await.json().await.unwrap();
    assert_eq!(skus(&everything), ["sku00", "sku01", "sku02", "sku03", "sku04", "sku05", "sku06"]);
    assert_eq!(everything["next_after"], Value::Null);
    let items = everything["items"].as_array().unwrap();
    assert_eq!(items[0]["seller_id"], 2);
    assert_eq!(items[1]["seller_id"], 1);
}

/// Without `limit` a page holds 20; 100 is the largest allowed.
#[tokio::test]
async fn inventory_list_pages_by_20_by_default() {
    let app = spawn_app().await;
    let all: Vec<String> = (0..21).map(|i| format!("item{i:02}")).collect();
    for sku in &all {
        app.stock(1, sku, 2).await;
    }
    let page: Value = app.get("/api/inventory?seller=1").await.json().await.unwrap();
    assert_eq!(skus(&page), all[..20]);
    assert_eq!(page["next_after"], "item19");
    let rest: Value = app.get("/api/inventory?seller=1&after=item19").await.json().await.unwrap();
    assert_eq!(skus(&rest), ["item20"]);
    assert_eq!(rest["next_after"], Value::Null);
    let big = app.get("/api/inventory?limit=100").await;
    assert_eq!(big.status(), StatusCode::OK);
    assert_eq!(skus(&big.json::<Value>().await.unwrap()), all);
}

#[tokio::test]
async fn bad_inventory_queries_are_422() {
    let app = spawn_app().await;
    app.stock(1, "q", 1).await;
    for path in ["/api/inventory?limit=0", "/api/inventory?limit=101", "/api/inventory?limit=ten"] {
        assert_problem(app.get(path).await, StatusCode::UNPROCESSABLE_ENTITY, "/problems/invalid-query").await;
    }
    assert_problem(
        app.get("/api/inventory/q?consistent=maybe").await,
        StatusCode::UNPROCESSABLE_ENTITY,
        "/problems/invalid-query",
    )
    .await;
}

/// After a reservation on one connection, reads on fresh connections (other
/// cores) show the new version and levels within a bounded time.
#[tokio::test]
async fn every_core_sees_a_reservation_promptly() {
    let app = spawn_app().await;
    let first = app.stock(1, "coherent", 10).await["version"].as_i64().unwrap();
    // Warm every core's cache with the first version.
    let warm = levels_on_fresh_connections(&app, "coherent", 8).await;
    assert!(warm.iter().all(|&l| l == (first, 10, 0)), "{warm:?}");

    app.order(&app.bidder(2), &[("coherent", 3)]).await;
    let expected = truth(&app, "coherent").await;
    assert!(expected.0 > first);
    assert_eq!((expected.1, expected.2), (7, 3));
    eventually(Duration::from_secs(2), "all cores serve the reservation", || async {
        levels_on_fresh_connections(&app, "coherent", 8).await.iter().all(|&l| l == expected).then_some(())
    })
    .await;

    // A restock travels the same way.
    app.stock(1, "coherent", 50).await;
    let expected = truth(&app, "coherent").await;
    assert_eq!((expected.1, expected.2), (50, 3));
    eventually(Duration::from_secs(2), "all cores serve the restock", || async {
        levels_on_fresh_connections(&app, "coherent", 8).await.iter().all(|&l| l == expected).then_some(())
    })
    .await;
}

/// Killing every core's LISTEN connection: reads stay correct meanwhile, the
/// listeners come back, and changes flow again.
#[tokio::test]
async fn inventory_caches_recover_after_the_listener_connection_is_killed() {
    let app = spawn_app().await;
    app.stock(1, "resilient", 10).await;
    levels_on_fresh_connections(&app, "resilient", 8).await;
    app.wait_for_listeners().await;

    assert_eq!(app.kill_listeners().await, 2);

    // A change made while the listeners may be down must not be missed.
    app.order(&app.bidder(2), &[("resilient", 4)]).await;
    let expected = truth(&app, "resilient").await;
    assert_eq!((expected.1, expected.2), (6, 4));
    eventually(Duration::from_secs(5), "reads show the change on every core", || async {
        levels_on_fresh_connections(&app, "resilient", 8).await.iter().all(|&l| l == expected).then_some(())
    })
    .await;
    app.wait_for_listeners().await;

    // And notifications flow again after the reconnect.
    app.order(&app.bidder(3), &[("resilient", 1)]).await;
    let expected = truth(&app, "resilient").await;
    assert_eq!((expected.1, expected.2), (5, 5));
    eventually(Duration::from_secs(2), "new changes reach every core", || async {
        levels_on_fresh_connections(&app, "resilient", 8).await.iter().all(|&l| l == expected).then_some(())
    })
    .await;
}

/// A core that lost its listener reloads the stock it holds when it is back,
/// before it serves from its cache again. The change is made with triggers
/// silenced (no notification) before the listeners go, and nothing is read while
/// they are down, so only the reload can bring it into the caches.
#[tokio::test]
async fn a_reconnected_core_reloads_inventory_it_missed() {
    const ROUTE: &str = "/api/inventory/{sku}";
    let app = spawn_app().await;
    app.stock(1, "quiet", 10).await;
    app.read_on_every_core("/api/inventory/quiet", ROUTE).await;
    app.wait_for_listeners().await;

    let mut conn = app.db.acquire().await.unwrap();
    sqlx::query("set session_replication_role = replica").execute(&mut *conn).await.unwrap();
    sqlx::query("update inventory set title = 'renamed', available = 9, version = version + 1 where sku = $1")
        .bind("quiet")
        .execute(&mut *conn)
        .await
        .unwrap();
    sqlx::query("reset session_replication_role").execute(&mut *conn).await.unwrap();
    drop(conn);
    let stale = app.read_on_every_core("/api/inventory/quiet", ROUTE).await;
    assert!(stale.iter().all(|i| i["available"] == 10), "no notification, so every core serves its cached copy");

    app.reconnect_listeners().await;
    let reloaded = app.read_on_every_core("/api/inventory/quiet", ROUTE).await;
    assert!(
        reloaded.iter().all(|i| i["title"] == "renamed" && i["available"] == 9),
        "every core reloaded: {reloaded:?}"
    );
}

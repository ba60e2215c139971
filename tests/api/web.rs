//! What browsers and HTTP clients negotiate: cross-origin access (CORS) and
//! compressed bodies.

use reqwest::StatusCode;
use reqwest::header::{self, HeaderMap};
use serde_json::Value;

use crate::helpers::*;

const SHOP: &str = "https://shop.example";

fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

#[tokio::test]
async fn a_listed_origin_gets_preflights_answered_and_cached() {
    let app = spawn_app_with(&["--cors-origin", SHOP]).await;
    let preflight = app
        .client
        .request(reqwest::Method::OPTIONS, app.url("/api/bids"))
        .header("origin", SHOP)
        .header("access-control-request-method", "POST")
        .header("access-control-request-headers", "authorization, content-type, idempotency-key")
        .send()
        .await
        .unwrap();
    assert_eq!(preflight.status(), StatusCode::OK);
    let h = preflight.headers();
    assert_eq!(header(h, "access-control-allow-origin"), Some(SHOP));
    assert_eq!(header(h, "access-control-allow-credentials"), Some("true"));
    assert_eq!(header(h, "access-control-max-age"), Some("600"));
    assert!(header(h, "access-control-allow-methods").unwrap().contains("POST"));
    assert!(header(h, "access-control-allow-headers").unwrap().contains("idempotency-key"));
    assert!(h.contains_key("x-request-id"), "a preflight is a request like any other");
}

#[tokio::test]
async fn a_cross_origin_read_carries_the_cors_headers_even_from_the_cache() {
    let app = spawn_app_with(&["--cors-origin", SHOP, "--cors-origin", "http://localhost:3000"]).await;
    let id = app.open_auction(100, 10, 60.0, 0).await["id"].as_i64().unwrap();
    let read = app.client.get(app.url(&format!("/api/auctions/{id}"))).header("origin", SHOP).send().await.unwrap();
    assert_eq!(read.status(), StatusCode::OK);
    let h = read.headers().clone();
    assert_eq!(header(&h, "access-control-allow-origin"), Some(SHOP));
    assert_eq!(header(&h, "access-control-allow-credentials"), Some("true"));
    assert!(header(&h, "access-control-expose-headers").unwrap().contains("etag"));
    assert!(h.contains_key(header::ETAG));
    assert_eq!(read.json::<Value>().await.unwrap()["id"], id);
    // An origin not listed gets no permission.
    let other = app.client.get(app.url(&format!("/api/auctions/{id}"))).header("origin", "https://evil.example");
    let other = other.send().await.unwrap();
    assert_eq!(other.status(), StatusCode::OK, "the server answers; the browser withholds it");
    assert!(!other.headers().contains_key("access-control-allow-origin"));
}

/// With CORS on, its layer adds headers to every answer, `Vary: Origin` among
/// them, whether the request names an origin or not: a read the cache answers
/// carries them as a read from the database does.
#[tokio::test]
async fn with_cors_on_a_cached_read_carries_what_a_first_read_does() {
    let app = spawn_app_with(&["--cors-origin", SHOP]).await;
    let id = app.open_auction(100, 10, 60.0, 0).await["id"].as_i64().unwrap();
    let path = format!("/api/auctions/{id}");
    let vary = |h: &HeaderMap| header(h, "vary").map(str::to_owned);
    let first = app.get(&format!("{path}?consistent=true")).await;
    let cached = app.get(&path).await;
    assert_eq!(cached.status(), StatusCode::OK);
    assert!(vary(first.headers()).is_some_and(|v| v.contains("origin")), "{:?}", first.headers());
    assert_eq!(vary(cached.headers()), vary(first.headers()));
    for name in ["access-control-allow-credentials", "access-control-expose-headers"] {
        assert_eq!(header(cached.headers(), name), header(first.headers(), name), "{name}");
    }
}

#[tokio::test]
async fn without_listed_origins_there_is_no_cross_origin_access() {
    let app = spawn_app().await;
    let preflight = app
        .client
        .request(reqwest::Method::OPTIONS, app.url("/api/bids"))
        .header("origin", SHOP)
        .header("access-control-request-method", "POST")
        .send()
        .await
        .unwrap();
    assert!(!preflight.headers().contains_key("access-control-allow-origin"));
    assert_eq!(preflight.status(), StatusCode::METHOD_NOT_ALLOWED);
    let read = app.client.get(app.url("/health")).header("origin", SHOP).send().await.unwrap();
    assert!(!read.headers().contains_key("access-control-allow-origin"));
}

/// GETs `path` asking for `encoding`; returns the encoding answered and the
/// body's length on the wire.
async fn fetch_encoded(app: &TestApp, path: &str, encoding: &str) -> (Option<String>, usize) {
    let response = app.client.get(app.url(path)).header("accept-encoding", encoding).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK, "{path}");
    let used = header(response.headers(), "content-encoding").map(str::to_owned);
    (used, response.bytes().await.unwrap().len())
}

#[tokio::test]
async fn large_bodies_are_compressed_as_asked_and_small_ones_are_not() {
    let app = spawn_app().await;
    let mut last = 0;
    for _ in 0..30 {
        last = app.open_auction(100, 10, 60.0, 0).await["id"].as_i64().unwrap();
    }
    let (plain, plain_len) = fetch_encoded(&app, "/api/auctions?limit=100", "identity").await;
    assert_eq!(plain, None);
    assert!(plain_len > 1024, "a list of 30 auctions is above the line: {plain_len}");
    for encoding in ["gzip", "br", "zstd"] {
        let (used, len) = fetch_encoded(&app, "/api/auctions?limit=100", encoding).await;
        assert_eq!(used.as_deref(), Some(encoding));
        assert!(len * 3 < plain_len, "{encoding}: {len} of {plain_len} bytes");
        let (used, _) = fetch_encoded(&app, "/api/openapi.json", encoding).await;
        assert_eq!(used.as_deref(), Some(encoding), "the API document too");
    }
    // One auction, from the cache or the database, is below the line.
    for path in [format!("/api/auctions/{last}"), format!("/api/auctions/{last}?consistent=true")] {
        assert_eq!(fetch_encoded(&app, &path, "gzip").await.0, None, "{path}");
    }
    // An event stream is never compressed: each event must go out whole at once.
    let stream = fresh_connection_client()
        .get(app.url(&format!("/api/auctions/{last}/events")))
        .header("accept-encoding", "gzip")
        .send()
        .await
        .unwrap();
    assert_eq!(stream.status(), StatusCode::OK);
    assert!(!stream.headers().contains_key("content-encoding"));
}

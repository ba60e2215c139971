//! Rate limits: failed log-ins per account and per client address, for the
//! whole server; bids per bidder when asked for.

use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::json;

use crate::helpers::{TestApp, assert_problem, fresh_connection_client, spawn_app, spawn_app_with};

const PASSWORD: &str = "correct horse battery";
const SESSIONS_ROUTE: &str = "route=\"/api/sessions\"";

/// A 429 problem whose Retry-After is whole seconds within `1..=max`.
async fn assert_limited(response: reqwest::Response, max: u64) {
    let retry_after: u64 = response.headers()["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=max).contains(&retry_after), "Retry-After {retry_after}");
    assert_problem(response, StatusCode::TOO_MANY_REQUESTS, "/problems/rate-limited").await;
}

impl TestApp {
    async fn log_in_from(&self, client: &reqwest::Client, email: &str, password: &str) -> reqwest::Response {
        client
            .post(self.url("/api/sessions"))
            .json(&json!({"email": email, "password": password}))
            .send()
            .await
            .unwrap()
    }
}

/// An account's failures count for the whole server: spread over both cores,
/// they reach the limit together, and then every core refuses, right password
/// or not.
#[tokio::test]
async fn failed_log_ins_are_limited_per_account_across_cores() {
    // 20 failures on new connections all land on one core once in 2^19 runs.
    let app = spawn_app_with(&["--login-failures-per-account", "20"]).await;
    app.signed_up("target@example.org", PASSWORD, "bidder").await;
    let client = fresh_connection_client();
    for _ in 0..20 {
        let wrong = app.log_in_from(&client, "target@example.org", "a wrong guess").await;
        assert_eq!(wrong.status(), StatusCode::UNAUTHORIZED);
    }
    let failed = app.per_core(gavel::metrics::HTTP_REQUESTS_TOTAL, &[SESSIONS_ROUTE, "status=\"401\""]).await;
    assert!(failed[0] > 0.0 && failed[1] > 0.0, "the failures reached both cores: {failed:?}");

    let limited = || async { app.per_core(gavel::metrics::RATE_LIMITED_TOTAL, &["limit=\"login_account\""]).await };
    for _ in 0..100 {
        let right = app.log_in_from(&client, "TARGET@example.org", PASSWORD).await;
        assert_limited(right, 300).await;
        let counted = limited().await;
        if counted[0] > 0.0 && counted[1] > 0.0 {
            // Another account is not affected.
            app.signed_up("bystander@example.org", PASSWORD, "bidder").await;
            return;
        }
    }
    panic!("100 new connections did not reach both cores");
}

/// An address's failures count whatever accounts they try.
#[tokio::test]
async fn failed_log_ins_are_limited_per_client_address() {
    let app = spawn_app_with(&["--login-failures-per-account", "0", "--login-failures-per-address", "3"]).await;
    app.signed_up("real@example.org", PASSWORD, "bidder").await;
    for i in 0..3 {
        let wrong = app.login(&format!("guess{i}@example.org"), PASSWORD).await;
        assert_eq!(wrong.status(), StatusCode::UNAUTHORIZED);
    }
    assert_limited(app.login("real@example.org", PASSWORD).await, 300).await;
    let counted = app.per_core(gavel::metrics::RATE_LIMITED_TOTAL, &["limit=\"login_address\""]).await;
    assert_eq!(counted[0] + counted[1], 1.0);
}

/// Behind a proxy, the address the proxy names is the client's: the last one
/// in the header.
#[tokio::test]
async fn the_named_client_address_is_limited_not_the_proxys() {
    let app = spawn_app_with(&[
        "--client-address-header",
        "x-forwarded-for",
        "--login-failures-per-address",
        "2",
        "--login-failures-per-account",
        "0",
    ])
    .await;
    let from = |address: &str, email: &str| {
        app.client
            .post(app.url("/api/sessions"))
            .header("x-forwarded-for", address)
            .json(&json!({"email": email, "password": "a wrong guess"}))
            .send()
    };
    for _ in 0..2 {
        assert_eq!(from("10.9.9.9, 203.0.113.1", "a@example.org").await.unwrap().status(), StatusCode::UNAUTHORIZED);
    }
    assert_limited(from("203.0.113.1", "b@example.org").await.unwrap(), 300).await;
    assert_eq!(from("203.0.113.2", "b@example.org").await.unwrap().status(), StatusCode::UNAUTHORIZED);
    assert_eq!(from("203.0.113.1, 203.0.113.3", "b@example.org").await.unwrap().status(), StatusCode::UNAUTHORIZED);
}

/// Only failures count: any number of successful log-ins leave the limit alone.
#[tokio::test]
async fn successful_log_ins_do_not_count() {
    let app = spawn_app_with(&["--login-failures-per-account", "2", "--login-failures-per-address", "2"]).await;
    app.signed_up("often@example.org", PASSWORD, "bidder").await;
    for _ in 0..5 {
        assert_eq!(app.login("often@example.org", PASSWORD).await.status(), StatusCode::OK);
    }
    assert_eq!(app.login("often@example.org", "a wrong guess").await.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(app.login("often@example.org", PASSWORD).await.status(), StatusCode::OK);
    assert_eq!(app.login("often@example.org", "a wrong guess").await.status(), StatusCode::UNAUTHORIZED);
    assert_limited(app.login("often@example.org", PASSWORD).await, 300).await;
}

/// With a bid rate per bidder, a bidder past it gets 429 on any core, and
/// another bidder does not.
#[tokio::test]
async fn bids_past_the_rate_are_429_per_bidder() {
    let app = spawn_app_with(&["--bids-per-second-per-bidder", "2"]).await;
    let auction = app.open_auction(100, 1, 30.0, 0).await["id"].as_i64().unwrap();
    let (bidder, other) = (app.bidder(5), app.bidder(6));
    let client = fresh_connection_client();
    let started = Instant::now();
    let mut statuses = Vec::new();
    for amount in 0..6 {
        let response = client
            .post(app.url("/api/bids"))
            .bearer_auth(&bidder)
            .json(&json!({"auction_id": auction, "amount": 200 + amount}))
            .send()
            .await
            .unwrap();
        statuses.push(response.status());
        if response.status() == StatusCode::TOO_MANY_REQUESTS {
            assert_limited(response, 1).await;
        }
    }
    // Two at once, then one every 500 ms: six bids within 1.5 s are too many.
    assert!(started.elapsed() < Duration::from_millis(1500), "too slow to tell: {:?}", started.elapsed());
    assert_eq!(statuses[..2], [StatusCode::CREATED, StatusCode::CREATED]);
    assert!(statuses.contains(&StatusCode::TOO_MANY_REQUESTS), "{statuses:?}");
    assert_eq!(app.place_bid(&other, auction, 300).await.status(), StatusCode::CREATED);
}

/// Bids are not limited unless asked.
#[tokio::test]
async fn bids_are_not_limited_by_default() {
    let app = spawn_app().await;
    let auction = app.open_auction(100, 1, 30.0, 0).await["id"].as_i64().unwrap();
    let bidder = app.bidder(5);
    for amount in 0..20 {
        assert_eq!(app.place_bid(&bidder, auction, 200 + amount).await.status(), StatusCode::CREATED);
    }
}

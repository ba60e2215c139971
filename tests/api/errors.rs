//! Every bad input gets the right problem, never a 500 or a hang.

use std::time::Duration;

use gavel::auth::Role;
use reqwest::StatusCode;
use serde_json::json;

use crate::helpers::{assert_problem, at, expired_token, invalid_fields, spawn_app};

#[tokio::test]
async fn malformed_json_is_400() {
    let app = spawn_app().await;
    let truncated = "{\"auction_id\": 1, \"amount\": ";
    let response = app.post_raw("/api/bids", &app.bidder(2), Some("application/json"), truncated.into()).await;
    assert_problem(response, StatusCode::BAD_REQUEST, "/problems/malformed-json").await;
}

#[tokio::test]
async fn json_of_the_wrong_shape_or_types_is_422() {
    let app = spawn_app().await;
    let bidder = app.bidder(2);
    for body in [
        json!({"auction_id": "one", "amount": 100}),
        json!({"auction_id": 1}),
        json!({"auction_id": 1, "amount": 10.5}),
        json!([1, 100]),
        json!("bid"),
    ] {
        let response = app.post_json("/api/bids", &bidder, &body).await;
        assert_problem(response, StatusCode::UNPROCESSABLE_ENTITY, "/problems/invalid-body").await;
    }
}

#[tokio::test]
async fn invalid_values_are_422_listing_each_field() {
    let app = spawn_app().await;
    let response = app.post_json("/api/bids", &app.bidder(2), &json!({"auction_id": 0, "amount": -5})).await;
    let body = assert_problem(response, StatusCode::UNPROCESSABLE_ENTITY, "/problems/validation").await;
    assert_eq!(invalid_fields(&body), ["auction_id", "amount"]);

    let response = app
        .create_auction(&json!({
            "title": "", "reserve": 0, "min_increment": 5, "starts_at": at(10.0), "ends_at": at(5.0), "extend_secs": -1
        }))
        .await;
    let body = assert_problem(response, StatusCode::UNPROCESSABLE_ENTITY, "/problems/validation").await;
    assert_eq!(invalid_fields(&body), ["title", "reserve", "ends_at", "extend_secs"]);

    let response = app
        .create_auction(&json!({
            "title": "x", "reserve": 1, "min_increment": 1, "starts_at": "yesterday", "ends_at": at(5.0)
        }))
        .await;
    assert_problem(response, StatusCode::UNPROCESSABLE_ENTITY, "/problems/invalid-body").await;
}

#[tokio::test]
async fn a_body_not_declared_json_is_415() {
    let app = spawn_app().await;
    let body = r#"{"auction_id": 1, "amount": 100}"#;
    let wrong = app.post_raw("/api/bids", &app.bidder(2), Some("text/plain"), body.into()).await;
    assert_problem(wrong, StatusCode::UNSUPPORTED_MEDIA_TYPE, "/problems/unsupported-media-type").await;
    let missing = app.post_raw("/api/bids", &app.bidder(2), None, body.into()).await;
    assert_problem(missing, StatusCode::UNSUPPORTED_MEDIA_TYPE, "/problems/unsupported-media-type").await;
}

#[tokio::test]
async fn a_body_over_the_limit_is_413() {
    let app = spawn_app().await;
    let huge = format!(r#"{{"auction_id": 1, "amount": 100, "pad": "{}"}}"#, "x".repeat(70 * 1024));
    let declared = app.post_raw("/api/bids", &app.bidder(2), Some("application/json"), huge.clone().into()).await;
    assert_problem(declared, StatusCode::PAYLOAD_TOO_LARGE, "/problems/payload-too-large").await;

    // Chunked, so no Content-Length announces the size: the limit still holds.
    let stream = futures::stream::iter(
        huge.into_bytes().chunks(8192).map(|c| Ok::<_, std::io::Error>(c.to_vec())).collect::<Vec<_>>(),
    );
    let chunked =
        app.post_raw("/api/bids", &app.bidder(2), Some("application/json"), reqwest::Body::wrap_stream(stream)).await;
    assert_problem(chunked, StatusCode::PAYLOAD_TOO_LARGE, "/problems/payload-too-large").await;
}

#[tokio::test]
async fn unknown_routes_are_404_and_wrong_methods_405() {
    let app = spawn_app().await;
    assert_problem(app.get("/api/nothing-here").await, StatusCode::NOT_FOUND, "/problems/not-found").await;
    assert_problem(app.get("/api/auctions/not-a-number").await, StatusCode::NOT_FOUND, "/problems/not-found").await;
    assert_problem(app.get("/api/auctions/987654").await, StatusCode::NOT_FOUND, "/problems/not-found").await;
    let delete = app.client.delete(app.url("/api/bids")).send().await.unwrap();
    assert_problem(delete, StatusCode::METHOD_NOT_ALLOWED, "/problems/method-not-allowed").await;
    let put = app.client.put(app.url("/api/auctions/1")).send().await.unwrap();
    assert_problem(put, StatusCode::METHOD_NOT_ALLOWED, "/problems/method-not-allowed").await;
}

#[tokio::test]
async fn missing_or_invalid_tokens_are_401() {
    let app = spawn_app().await;
    let body = json!({"auction_id": 1, "amount": 100});
    let none = app.client.post(app.url("/api/bids")).json(&body).send().await.unwrap();
    assert!(none.headers().contains_key("www-authenticate"));
    assert_problem(none, StatusCode::UNAUTHORIZED, "/problems/unauthorized").await;

    let garbage = app.post_json("/api/bids", "not-a-jwt", &body).await;
    assert_problem(garbage, StatusCode::UNAUTHORIZED, "/problems/unauthorized").await;

    let other_secret = gavel::auth::Keys::new(b"another-secret-another-secret-another!!").unwrap();
    let foreign = other_secret.mint(2, Role::Bidder, Duration::from_secs(60)).0;
    assert_problem(
        app.post_json("/api/bids", &foreign, &body).await,
        StatusCode::UNAUTHORIZED,
        "/problems/unauthorized",
    )
    .await;

    let basic = app.client.post(app.url("/api/bids")).basic_auth("a", Some("b")).json(&body).send().await.unwrap();
    assert_problem(basic, StatusCode::UNAUTHORIZED, "/problems/unauthorized").await;

    let expired = expired_token(2, "bidder");
    let response = app.post_json("/api/bids", &expired, &body).await;
    let problem = assert_problem(response, StatusCode::UNAUTHORIZED, "/problems/unauthorized").await;
    assert!(problem["detail"].as_str().unwrap().contains("expired"));
}

/// Log-in bodies get the same 400/415/422 treatment as every other body.
#[tokio::test]
async fn bad_log_in_bodies_are_rejected_before_any_lookup() {
    let app = spawn_app().await;
    let malformed = app.post_raw("/api/sessions", "", Some("application/json"), "{\"email\":".into()).await;
    assert_problem(malformed, StatusCode::BAD_REQUEST, "/problems/malformed-json").await;
    let missing = app.post_raw("/api/sessions", "", Some("application/json"), "{\"email\":\"a@b.io\"}".into()).await;
    assert_problem(missing, StatusCode::UNPROCESSABLE_ENTITY, "/problems/invalid-body").await;
    let form = app.post_raw("/api/sessions", "", Some("application/x-www-form-urlencoded"), "email=a".into()).await;
    assert_problem(form, StatusCode::UNSUPPORTED_MEDIA_TYPE, "/problems/unsupported-media-type").await;
}

#[tokio::test]
async fn the_wrong_role_is_403() {
    let app = spawn_app().await;
    let id = app.open_auction(100, 10, 60.0, 0).await["id"].as_i64().unwrap();
    let seller_bids = app.place_bid(&app.seller(), id, 100).await;
    assert_problem(seller_bids, StatusCode::FORBIDDEN, "/problems/forbidden").await;
    let bidder_sells = app
        .post_json(
            "/api/auctions",
            &app.bidder(2),
            &json!({"title": "x", "reserve": 1, "min_increment": 1, "starts_at": at(0.0), "ends_at": at(60.0)}),
        )
        .await;
    assert_problem(bidder_sells, StatusCode::FORBIDDEN, "/problems/forbidden").await;
    let admin = app.place_bid(&app.token(3, Role::Admin), id, 100).await;
    assert_problem(admin, StatusCode::FORBIDDEN, "/problems/forbidden").await;
}

#[tokio::test]
async fn bad_query_parameters_are_422() {
    let app = spawn_app().await;
    let id = app.open_auction(100, 10, 60.0, 0).await["id"].as_i64().unwrap();
    let history_zero = format!("/api/auctions/{id}/bids?limit=0");
    let history_cursor = format!("/api/auctions/{id}/bids?after=newest");
    for path in [
        "/api/auctions?limit=0",
        "/api/auctions?limit=101",
        "/api/auctions?limit=ten",
        "/api/auctions?status=sold",
        "/api/auctions?after=-",
        history_zero.as_str(),
        history_cursor.as_str(),
    ] {
        assert_problem(app.get(path).await, StatusCode::UNPROCESSABLE_ENTITY, "/problems/invalid-query").await;
    }
    assert_problem(
        app.get("/api/auctions/1?consistent=maybe").await,
        StatusCode::UNPROCESSABLE_ENTITY,
        "/problems/invalid-query",
    )
    .await;
}

/// The client's request id is echoed on success and error alike; without one the
/// server makes one up.
#[tokio::test]
async fn every_response_carries_a_request_id() {
    let app = spawn_app().await;
    let ok = app.client.get(app.url("/health")).header("x-request-id", "trace-abc-1").send().await.unwrap();
    assert_eq!(ok.headers()["x-request-id"], "trace-abc-1");
    let err = app.client.get(app.url("/nope")).header("x-request-id", "trace-abc-2").send().await.unwrap();
    assert_eq!(err.headers()["x-request-id"], "trace-abc-2");
    let body = assert_problem(err, StatusCode::NOT_FOUND, "/problems/not-found").await;
    assert_eq!(body["request_id"], "trace-abc-2");
    let made_up = app.get("/health").await;
    assert!(!made_up.headers()["x-request-id"].is_empty());
}

//! Registration, login, and sessions by header or cookie.

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::helpers::{TestApp, assert_problem, at, expired_token, invalid_fields, spawn_app};

const PASSWORD: &str = "correct horse battery";

/// Field names of a validation problem, sorted (the contract names them, not their order).
fn sorted_fields(problem: &Value) -> Vec<String> {
    let mut fields = invalid_fields(problem);
    fields.sort();
    fields
}

/// The token with one character of its signature changed.
fn tampered(token: &str) -> String {
    let (rest, signature) = token.rsplit_once('.').unwrap();
    let mut signature: Vec<char> = signature.chars().collect();
    // Mid-signature, so the change is in real bits, never in the last character's padding bits.
    let i = signature.len() / 2;
    signature[i] = if signature[i] == 'A' { 'B' } else { 'A' };
    format!("{rest}.{}", signature.into_iter().collect::<String>())
}

/// The `gavel_session` Set-Cookie header of a response.
fn session_cookie(response: &reqwest::Response) -> String {
    response
        .headers()
        .get_all("set-cookie")
        .iter()
        .map(|v| v.to_str().unwrap().to_owned())
        .find(|v| v.starts_with("gavel_session="))
        .expect("a gavel_session cookie")
}

/// A bid with a session cookie (and no Authorization header).
async fn bid_with_cookie(app: &TestApp, cookie: &str, auction_id: i64, amount: i64) -> reqwest::Response {
    app.client
        .post(app.url("/api/bids"))
        .header("cookie", cookie)
        .json(&json!({"auction_id": auction_id, "amount": amount}))
        .send()
        .await
        .unwrap()
}

/// Stocking a sku with a session cookie.
async fn put_with_cookie(app: &TestApp, cookie: &str, sku: &str, available: i64) -> reqwest::Response {
    app.client
        .put(app.url(&format!("/api/inventory/{sku}")))
        .header("cookie", cookie)
        .json(&json!({"title": "by cookie", "available": available}))
        .send()
        .await
        .unwrap()
}

/// A new account comes back with its id, e-mail, role and creation time, and
/// nothing that betrays the password.
#[tokio::test]
async fn registering_returns_the_account_without_the_password() {
    let app = spawn_app().await;
    let response = app.register("reg-seller@example.org", PASSWORD, "seller").await;
    assert_eq!(response.status(), StatusCode::CREATED);
    let text = response.text().await.unwrap();
    let body: Value = serde_json::from_str(&text).unwrap();
    assert!(body["id"].as_i64().unwrap() > 0, "{body}");
    assert_eq!(body["email"], "reg-seller@example.org");
    assert_eq!(body["role"], "seller");
    assert!(body["created_at"].is_string(), "{body}");
    let keys: Vec<&String> = body.as_object().unwrap().keys().collect();
    assert!(keys.iter().all(|k| !k.contains("password") && !k.contains("hash")), "{body}");
    assert!(!text.contains(PASSWORD), "the password is not echoed: {text}");
    assert!(!text.contains("$argon2"), "no hash is echoed: {text}");

    let other = app.register("reg-bidder@example.org", PASSWORD, "bidder").await;
    assert_eq!(other.status(), StatusCode::CREATED);
    let other: Value = other.json().await.unwrap();
    assert_eq!(other["role"], "bidder");
    assert_ne!(other["id"], body["id"], "a new account has a new id");
}

/// Every invalid field is listed at once; each rule also holds on its own, at its bounds.
#[tokio::test]
async fn invalid_registrations_are_422_listing_each_field() {
    let app = spawn_app().await;
    let all_bad = app.register("not-an-email", "short", "admin").await;
    let problem = assert_problem(all_bad, StatusCode::UNPROCESSABLE_ENTITY, "/problems/validation").await;
    assert_eq!(sorted_fields(&problem), ["email", "password", "role"]);
    let all_bad = app.register("", "", "boss").await;
    let problem = assert_problem(all_bad, StatusCode::UNPROCESSABLE_ENTITY, "/problems/validation").await;
    assert_eq!(sorted_fields(&problem), ["email", "password", "role"]);

    for email in ["not-an-email", "a@", ""] {
        let response = app.register(email, PASSWORD, "bidder").await;
        let problem = assert_problem(response, StatusCode::UNPROCESSABLE_ENTITY, "/problems/validation").await;
        assert_eq!(invalid_fields(&problem), ["email"], "email {email:?}");
    }
    let too_long = "p".repeat(1025);
    for password in ["1234567", too_long.as_str()] {
        let response = app.register("pw@example.org", password, "bidder").await;
        let problem = assert_problem(response, StatusCode::UNPROCESSABLE_ENTITY, "/problems/validation").await;
        assert_eq!(invalid_fields(&problem), ["password"], "password of {} chars", password.len());
    }
    for role in ["admin", "boss"] {
        let response = app.register("role@example.org", PASSWORD, role).await;
        let problem = assert_problem(response, StatusCode::UNPROCESSABLE_ENTITY, "/problems/validation").await;
        assert_eq!(invalid_fields(&problem), ["role"], "role {role:?}");
    }

    // The bounds themselves are fine, and none of the refusals above created an account.
    assert_eq!(app.register("pw@example.org", "12345678", "bidder").await.status(), StatusCode::CREATED);
    assert_eq!(app.register("role@example.org", &"p".repeat(1024), "seller").await.status(), StatusCode::CREATED);
}

#[tokio::test]
async fn registrations_of_the_wrong_shape_are_invalid_body() {
    let app = spawn_app().await;
    for body in [
        json!({"email": "shape@example.org", "password": PASSWORD}),
        json!({"password": PASSWORD, "role": "bidder"}),
        json!({"email": 5, "password": PASSWORD, "role": "bidder"}),
        json!({"email": "shape@example.org", "password": 12345678, "role": "bidder"}),
        json!({"email": "shape@example.org", "password": PASSWORD, "role": null}),
        json!(["shape@example.org", PASSWORD, "bidder"]),
    ] {
        let response = app.post_anon("/api/accounts", &body).await;
        assert_problem(response, StatusCode::UNPROCESSABLE_ENTITY, "/problems/invalid-body").await;
    }
}

/// E-mail addresses are unique whatever their case.
#[tokio::test]
async fn an_email_is_taken_whatever_its_case() {
    let app = spawn_app().await;
    assert_eq!(app.register("A@x.io", PASSWORD, "bidder").await.status(), StatusCode::CREATED);
    let again = app.register("a@X.io", "another password", "seller").await;
    assert_problem(again, StatusCode::CONFLICT, "/problems/email-taken").await;
    let same = app.register("A@x.io", PASSWORD, "bidder").await;
    assert_problem(same, StatusCode::CONFLICT, "/problems/email-taken").await;
    // The first account still logs in with its own password.
    assert_eq!(app.login("A@x.io", PASSWORD).await.status(), StatusCode::OK);
    assert_problem(
        app.login("A@x.io", "another password").await,
        StatusCode::UNAUTHORIZED,
        "/problems/invalid-credentials",
    )
    .await;
}

/// A login answers with a token for the account and sets it as a strict,
/// script-proof session cookie.
#[tokio::test]
async fn login_returns_a_token_and_a_strict_session_cookie() {
    let app = spawn_app().await;
    let registered = app.register("login@example.org", PASSWORD, "bidder").await;
    let id = registered.json::<Value>().await.unwrap()["id"].as_i64().unwrap();

    let response = app.login("login@example.org", PASSWORD).await;
    assert_eq!(response.status(), StatusCode::OK);
    let cookie = session_cookie(&response);
    let body: Value = response.json().await.unwrap();
    let token = body["token"].as_str().unwrap();
    assert!(!token.is_empty());
    assert_eq!(body["account_id"], id);
    assert_eq!(body["role"], "bidder");
    let expires_at = &body["expires_at"];
    let now = chrono::Utc::now();
    let expiry = match expires_at {
        Value::String(s) => chrono::DateTime::parse_from_rfc3339(s).expect("expires_at is RFC 3339").timestamp(),
        Value::Number(n) => n.as_i64().expect("expires_at is whole seconds"),
        other => panic!("expires_at: {other}"),
    };
    assert!(expiry > now.timestamp(), "the session expires in the future: {expires_at}");

    let mut parts = cookie.split(';').map(str::trim);
    assert_eq!(parts.next().unwrap(), format!("gavel_session={token}"), "the cookie carries the token");
    let attributes: Vec<String> = parts.map(str::to_ascii_lowercase).collect();
    for wanted in ["httponly", "secure", "samesite=strict", "path=/"] {
        assert!(attributes.iter().any(|a| a == wanted), "cookie attribute {wanted} in {cookie}");
    }
}

/// A wrong password and an unknown e-mail are refused alike, so a caller cannot
/// learn which addresses have accounts.
#[tokio::test]
async fn wrong_password_and_unknown_email_are_the_same_401() {
    let app = spawn_app().await;
    assert_eq!(app.register("known@example.org", PASSWORD, "seller").await.status(), StatusCode::CREATED);
    let wrong = app.login("known@example.org", "not the password").await;
    let wrong = assert_problem(wrong, StatusCode::UNAUTHORIZED, "/problems/invalid-credentials").await;
    let unknown = app.login("nobody@example.org", PASSWORD).await;
    let unknown = assert_problem(unknown, StatusCode::UNAUTHORIZED, "/problems/invalid-credentials").await;
    assert_eq!(wrong["detail"], unknown["detail"]);
    assert_eq!(wrong["title"], unknown["title"]);
}

/// Registration, login, and real use: the seller's token opens an auction, the
/// bidder's places a bid, and each acts as its own account with its own role.
#[tokio::test]
async fn registered_accounts_can_sell_and_bid_after_logging_in() {
    let app = spawn_app().await;
    let (seller_id, seller) = app.signed_up("e2e-seller@example.org", PASSWORD, "seller").await;
    let (bidder_id, bidder) = app.signed_up("e2e-bidder@example.org", PASSWORD, "bidder").await;

    let lot = json!({
        "title": "lot", "reserve": 100, "min_increment": 10, "starts_at": at(-1.0), "ends_at": at(60.0),
    });
    let created = app.post_json("/api/auctions", &seller, &lot).await;
    assert_eq!(created.status(), StatusCode::CREATED);
    let auction: Value = created.json().await.unwrap();
    assert_eq!(auction["seller_id"], seller_id);
    let id = auction["id"].as_i64().unwrap();

    assert_eq!(app.place_bid(&bidder, id, 100).await.status(), StatusCode::CREATED);
    let auction = app.auction(id, true).await;
    assert_eq!(auction["high_bidder"], bidder_id);
    assert_eq!(auction["high_bid"], 100);

    // The roles from the login hold: neither can do the other's part.
    assert_problem(app.place_bid(&seller, id, 200).await, StatusCode::FORBIDDEN, "/problems/forbidden").await;
    assert_problem(app.post_json("/api/auctions", &bidder, &lot).await, StatusCode::FORBIDDEN, "/problems/forbidden")
        .await;
}

/// The session cookie authenticates exactly as the bearer header does.
#[tokio::test]
async fn the_session_cookie_authenticates_like_the_bearer_header() {
    let app = spawn_app().await;
    let (bidder_id, bidder) = app.signed_up("cookie-bidder@example.org", PASSWORD, "bidder").await;
    let (seller_id, seller) = app.signed_up("cookie-seller@example.org", PASSWORD, "seller").await;
    let id = app.open_auction(100, 10, 60.0, 0).await["id"].as_i64().unwrap();

    let placed = bid_with_cookie(&app, &format!("gavel_session={bidder}"), id, 100).await;
    assert_eq!(placed.status(), StatusCode::CREATED);
    assert_eq!(app.auction(id, true).await["high_bidder"], bidder_id);
    // Among other cookies, as a browser sends it.
    let placed = bid_with_cookie(&app, &format!("theme=dark; gavel_session={bidder}; lang=en"), id, 110).await;
    assert_eq!(placed.status(), StatusCode::CREATED);

    let stocked = put_with_cookie(&app, &format!("gavel_session={seller}"), "cookie-sku", 4).await;
    assert_eq!(stocked.status(), StatusCode::CREATED);
    let item: Value = stocked.json().await.unwrap();
    assert_eq!(item["seller_id"], seller_id);
    assert_eq!(item["available"], 4);

    // The cookie's role counts as the header's would.
    let wrong_role = put_with_cookie(&app, &format!("gavel_session={bidder}"), "cookie-sku-2", 4).await;
    assert_problem(wrong_role, StatusCode::FORBIDDEN, "/problems/forbidden").await;
    let wrong_role = bid_with_cookie(&app, &format!("gavel_session={seller}"), id, 200).await;
    assert_problem(wrong_role, StatusCode::FORBIDDEN, "/problems/forbidden").await;
    // Some other cookie is no session.
    let no_session = bid_with_cookie(&app, &format!("other={bidder}"), id, 200).await;
    assert_problem(no_session, StatusCode::UNAUTHORIZED, "/problems/unauthorized").await;
}

/// A token with a changed signature, or one past its expiry, is refused whether
/// it comes as a header or as the cookie.
#[tokio::test]
async fn tampered_or_expired_tokens_are_401_by_header_and_by_cookie() {
    let app = spawn_app().await;
    let (_, bidder) = app.signed_up("tamper-bidder@example.org", PASSWORD, "bidder").await;
    let (_, seller) = app.signed_up("tamper-seller@example.org", PASSWORD, "seller").await;
    let id = app.open_auction(100, 10, 60.0, 0).await["id"].as_i64().unwrap();

    let bad_bidders = [("tampered", tampered(&bidder)), ("expired", expired_token(2, "bidder"))];
    for (what, token) in &bad_bidders {
        let by_header = app.place_bid(token, id, 100).await;
        assert_problem(by_header, StatusCode::UNAUTHORIZED, "/problems/unauthorized").await;
        let by_cookie = bid_with_cookie(&app, &format!("gavel_session={token}"), id, 100).await;
        let problem = assert_problem(by_cookie, StatusCode::UNAUTHORIZED, "/problems/unauthorized").await;
        if *what == "expired" {
            assert!(problem["detail"].as_str().unwrap().contains("expired"), "{problem}");
        }
    }
    let bad_sellers = [tampered(&seller), expired_token(1, "seller")];
    for token in &bad_sellers {
        let by_header = app.put_inventory(token, "never-stocked", "x", 1).await;
        assert_problem(by_header, StatusCode::UNAUTHORIZED, "/problems/unauthorized").await;
        let by_cookie = put_with_cookie(&app, &format!("gavel_session={token}"), "never-stocked", 1).await;
        assert_problem(by_cookie, StatusCode::UNAUTHORIZED, "/problems/unauthorized").await;
    }
    // Nothing got through.
    assert_eq!(app.auction(id, true).await["bid_count"], 0);
    assert_problem(
        app.get("/api/inventory/never-stocked?consistent=true").await,
        StatusCode::NOT_FOUND,
        "/problems/not-found",
    )
    .await;
    // And the untouched tokens still work.
    assert_eq!(app.place_bid(&bidder, id, 100).await.status(), StatusCode::CREATED);
}

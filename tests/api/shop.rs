//! Typed helpers for accounts, sessions, inventory and orders.

use gavel::auth::Role;
use reqwest::{Response, StatusCode};
use serde_json::{Value, json};

use crate::helpers::TestApp;

impl TestApp {
    /// A seller token for `account` (`seller()` is account 1).
    pub fn seller_as(&self, account: i64) -> String {
        self.token(account, Role::Seller)
    }

    /// A POST without credentials.
    pub async fn post_anon(&self, path: &str, body: &Value) -> Response {
        self.client.post(self.url(path)).json(body).send().await.expect("request")
    }

    pub async fn register(&self, email: &str, password: &str, role: &str) -> Response {
        self.post_anon("/api/accounts", &json!({"email": email, "password": password, "role": role})).await
    }

    pub async fn login(&self, email: &str, password: &str) -> Response {
        self.post_anon("/api/sessions", &json!({"email": email, "password": password})).await
    }

    /// Registers an account and logs in; returns its id and the session token.
    pub async fn signed_up(&self, email: &str, password: &str, role: &str) -> (i64, String) {
        let registered = self.register(email, password, role).await;
        assert_eq!(registered.status(), StatusCode::CREATED, "register {email}");
        let id = registered.json::<Value>().await.unwrap()["id"].as_i64().unwrap();
        let session = self.login(email, password).await;
        assert_eq!(session.status(), StatusCode::OK, "login {email}");
        let session: Value = session.json().await.unwrap();
        assert_eq!(session["account_id"], id);
        (id, session["token"].as_str().unwrap().to_owned())
    }

    /// `PUT /api/inventory/{sku}`; `sku` goes into the path as given (encode it yourself).
    pub async fn put_inventory(&self, token: &str, sku: &str, title: &str, available: i64) -> Response {
        self.client
            .put(self.url(&format!("/api/inventory/{sku}")))
            .bearer_auth(token)
            .json(&json!({"title": title, "available": available}))
            .send()
            .await
            .expect("request")
    }

    /// Stocks `sku` as seller `seller` (creating or restocking it); returns the item.
    pub async fn stock(&self, seller: i64, sku: &str, available: i64) -> Value {
        let response = self.put_inventory(&self.seller_as(seller), sku, &format!("item {sku}"), available).await;
        let status = response.status();
        let body: Value = response.json().await.unwrap();
        assert!(status == StatusCode::CREATED || status == StatusCode::OK, "stocking {sku}: {status} {body}");
        body
    }

    /// One inventory item (asserting 200); `consistent` reads the database.
    pub async fn item(&self, sku: &str, consistent: bool) -> Value {
        let path =
            if consistent { format!("/api/inventory/{sku}?consistent=true") } else { format!("/api/inventory/{sku}") };
        let response = self.get(&path).await;
        assert_eq!(response.status(), StatusCode::OK, "GET {path}");
        response.json().await.unwrap()
    }

    /// `(available, reserved)` of `sku`, read from the database.
    pub async fn levels(&self, sku: &str) -> (i64, i64) {
        let item = self.item(sku, true).await;
        (item["available"].as_i64().unwrap(), item["reserved"].as_i64().unwrap())
    }

    /// `POST /api/orders` with `lines` of `(sku, quantity)` and an optional `Idempotency-Key`.
    pub async fn place_order(&self, token: &str, lines: &[(&str, i64)], key: Option<&str>) -> Response {
        let mut request = self.client.post(self.url("/api/orders")).bearer_auth(token).json(&order_body(lines));
        if let Some(key) = key {
            request = request.header("idempotency-key", key);
        }
        request.send().await.expect("request")
    }

    /// Places an order that must succeed; returns it.
    pub async fn order(&self, token: &str, lines: &[(&str, i64)]) -> Value {
        let response = self.place_order(token, lines, None).await;
        let status = response.status();
        let body: Value = response.json().await.unwrap();
        assert_eq!(status, StatusCode::CREATED, "order {lines:?}: {body}");
        body
    }

    /// `GET /api/orders/{id}`, without credentials if `token` is `None`.
    pub async fn get_order(&self, token: Option<&str>, id: i64) -> Response {
        let mut request = self.client.get(self.url(&format!("/api/orders/{id}")));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        request.send().await.expect("request")
    }

    /// The current status of an order, as its buyer reads it.
    pub async fn order_status(&self, buyer: &str, id: i64) -> String {
        let response = self.get_order(Some(buyer), id).await;
        assert_eq!(response.status(), StatusCode::OK);
        response.json::<Value>().await.unwrap()["status"].as_str().unwrap().to_owned()
    }

    pub async fn cancel(&self, token: &str, id: i64) -> Response {
        self.client.post(self.url(&format!("/api/orders/{id}/cancel"))).bearer_auth(token).send().await.unwrap()
    }

    pub async fn fulfil(&self, token: &str, id: i64) -> Response {
        self.client.post(self.url(&format!("/api/orders/{id}/fulfil"))).bearer_auth(token).send().await.unwrap()
    }
}

/// The body of an order request.
pub fn order_body(lines: &[(&str, i64)]) -> Value {
    json!({"lines": lines.iter().map(|(sku, quantity)| json!({"sku": sku, "quantity": quantity})).collect::<Vec<_>>()})
}

/// `(sku, quantity, seller_id)` of every line of an order, sorted by sku.
pub fn lines_of(order: &Value) -> Vec<(String, i64, i64)> {
    let mut lines: Vec<(String, i64, i64)> = order["lines"]
        .as_array()
        .unwrap_or_else(|| panic!("an order has lines: {order}"))
        .iter()
        .map(|l| {
            (l["sku"].as_str().unwrap().to_owned(), l["quantity"].as_i64().unwrap(), l["seller_id"].as_i64().unwrap())
        })
        .collect();
    lines.sort();
    lines
}

/// The lines `lines_of` should report for an order of `lines`, all sold by `seller`.
pub fn expected_lines(lines: &[(&str, i64)], seller: i64) -> Vec<(String, i64, i64)> {
    let mut expected: Vec<(String, i64, i64)> = lines.iter().map(|&(s, q)| (s.to_owned(), q, seller)).collect();
    expected.sort();
    expected
}

/// The `sku` of each item of an inventory page.
pub fn skus(page: &Value) -> Vec<String> {
    page["items"].as_array().unwrap().iter().map(|i| i["sku"].as_str().unwrap().to_owned()).collect()
}

/// The ETag of a response, which must be present.
pub fn etag(response: &Response) -> String {
    response.headers().get("etag").expect("an ETag").to_str().unwrap().to_owned()
}

//! The OpenAPI document: served, valid, and listing exactly the routes the router
//! serves.

use std::collections::BTreeSet;

use oas3::Spec;
use oas3::spec::{ObjectOrReference, Schema};
use reqwest::{Method, StatusCode, Version};
use serde_json::Value;

use crate::helpers::{TestApp, spawn_app};

/// Every (method, path template) the API serves, read from the routers.
const ROUTES: &[(&str, &str)] = &[
    ("GET", "/health"),
    ("GET", "/ready"),
    ("GET", "/api/auctions"),
    ("POST", "/api/auctions"),
    ("GET", "/api/auctions/{id}"),
    ("GET", "/api/auctions/{id}/bids"),
    ("GET", "/api/auctions/{id}/events"),
    ("GET", "/api/auctions/{id}/images/{name}"),
    ("PUT", "/api/auctions/{id}/images/{name}"),
    ("DELETE", "/api/auctions/{id}/images/{name}"),
    ("GET", "/api/events"),
    ("GET", "/api/me/events"),
    ("GET", "/api/me/bids"),
    ("POST", "/api/bids"),
    ("POST", "/api/accounts"),
    ("PUT", "/api/accounts/me/password"),
    ("POST", "/api/sessions"),
    ("DELETE", "/api/sessions/current"),
    ("GET", "/api/inventory"),
    ("GET", "/api/inventory/{sku}"),
    ("PUT", "/api/inventory/{sku}"),
    ("POST", "/api/orders"),
    ("GET", "/api/orders/{id}"),
    ("POST", "/api/orders/{id}/cancel"),
    ("POST", "/api/orders/{id}/fulfil"),
    ("GET", "/api/openapi.json"),
];

/// Every method a router can tell apart.
const METHODS: &[&str] = &["GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE"];

const PROBLEM: &str = "#/components/schemas/Problem";

async fn fetch(app: &TestApp) -> Value {
    let response = app.get("/api/openapi.json").await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["content-type"], "application/json");
    response.json().await.expect("the document is JSON")
}

/// Parses the document with a parser of its own. utoipa writes OpenAPI 3.1, whose
/// nullable types (`"type": ["integer", "null"]`) a 3.0 parser such as `openapiv3`
/// rejects, so the parser is `oas3`, which reads 3.1.
fn parse(document: Value) -> Spec {
    let spec: Spec = serde_json::from_value(document).expect("the document is an OpenAPI 3.1 document");
    spec.validate_version().expect("a supported OpenAPI version");
    spec
}

/// The (method, path template) pairs a document lists.
fn operations(document: &Spec) -> BTreeSet<(String, String)> {
    document.operations().map(|(path, method, _)| (method.to_string(), path)).collect()
}

/// A concrete path for a template: `{id}` is 1, `{sku}` is `sku-1`, `{name}` is `a.png`.
fn concrete(template: &str) -> String {
    template.replace("{id}", "1").replace("{sku}", "sku-1").replace("{name}", "a.png")
}

/// The document is served to anyone, as JSON, and says which OpenAPI it is.
#[tokio::test]
async fn the_document_is_served_as_json() {
    let app = spawn_app().await;
    let document = fetch(&app).await;
    let version = document["openapi"].as_str().expect("an openapi version");
    assert!(version.starts_with("3."), "{version}");
    assert_eq!(document["info"]["title"], "gavel");
    assert_eq!(document["info"]["version"], env!("CARGO_PKG_VERSION"));
}

/// The document parses as OpenAPI 3.1; every operation has a success response and
/// every error response is a problem; every security scheme used is defined.
#[tokio::test]
async fn the_document_is_valid_and_every_error_is_a_problem() {
    let app = spawn_app().await;
    let document = parse(fetch(&app).await);
    let components = document.components.as_ref().expect("components");
    assert!(components.schemas.contains_key("Problem"));
    let mut schemes_used = BTreeSet::new();
    for (path, method, operation) in document.operations() {
        let at = format!("{method} {path}");
        let responses = operation.responses.as_ref().expect("responses");
        let code = |status: &String| status.parse::<u16>().unwrap_or_else(|_| panic!("{at}: status {status}"));
        assert!(responses.keys().any(|s| (200..300).contains(&code(s))), "{at}: no 2xx response");
        for (status, response) in responses.iter().filter(|(s, _)| code(s) >= 400) {
            let ObjectOrReference::Object(response) = response else { panic!("{at} {status}: not inline") };
            let media: Vec<_> = response.content.keys().collect();
            assert_eq!(media, ["application/problem+json"], "{at} {status}");
            let schema = response.content["application/problem+json"].schema.as_ref();
            let is_problem =
                |s: &ObjectOrReference<_>| matches!(s, ObjectOrReference::Ref { ref_path, .. } if ref_path == PROBLEM);
            assert!(matches!(schema, Some(Schema::Object(s)) if is_problem(s)), "{at} {status}: {schema:?}");
        }
        for requirement in &operation.security {
            schemes_used.extend(requirement.0.keys().cloned());
        }
    }
    let defined: BTreeSet<String> = components.security_schemes.keys().cloned().collect();
    assert_eq!(schemes_used, defined, "every scheme defined is used, and every scheme used is defined");
    assert_eq!(defined, BTreeSet::from(["bearer".to_owned(), "cookie".to_owned()]));
}

/// The document lists exactly the routes the router serves: each listed route is
/// served (not the fallback's 404 or a 405), every other method on a listed path
/// is 405, and the list is exactly the routes read from the routers. Over
/// HTTP/1.1 and over HTTP/2 alike.
// Two threads: the HTTP/2 client holds its connection to the end (see http2.rs).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_route_served_is_documented_and_vice_versa() {
    let app = spawn_app().await;
    let documented = operations(&parse(fetch(&app).await));
    let expected: BTreeSet<(String, String)> =
        ROUTES.iter().map(|(method, path)| (method.to_string(), path.to_string())).collect();
    assert_eq!(documented, expected);

    let http2 = reqwest::Client::builder().http2_prior_knowledge().build().unwrap();
    let paths: BTreeSet<&String> = documented.iter().map(|(_, path)| path).collect();
    for (client, version) in [(&app.client, Version::HTTP_11), (&http2, Version::HTTP_2)] {
        for template in &paths {
            let has = |method: &str| documented.contains(&(method.to_owned(), (*template).clone()));
            for &method in METHODS {
                let url = app.url(&concrete(template));
                let response =
                    client.request(Method::from_bytes(method.as_bytes()).unwrap(), url).send().await.unwrap();
                let status = response.status();
                let at = format!("{method} {template} over {version:?}: {status}");
                assert_eq!(response.version(), version, "{at}");
                // axum answers HEAD wherever it answers GET, as GET without the body.
                if has(method) || (method == "HEAD" && has("GET")) {
                    assert_ne!(status, StatusCode::METHOD_NOT_ALLOWED, "{at}");
                    if status == StatusCode::NOT_FOUND && method != "HEAD" {
                        let problem: Value = response.json().await.unwrap();
                        assert_ne!(problem["detail"], "no such route", "{at}");
                    }
                } else {
                    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED, "{at}: an undocumented method is served");
                }
            }
        }
    }
}

/// An order's body is built in SQL, not from the type that documents it: the two
/// name the same fields.
#[tokio::test]
async fn the_order_schema_names_the_fields_an_order_has() {
    let app = spawn_app().await;
    let document = fetch(&app).await;
    let properties = |schema: &str| -> BTreeSet<String> {
        document["components"]["schemas"][schema]["properties"].as_object().unwrap().keys().cloned().collect()
    };
    let keys = |value: &Value| -> BTreeSet<String> { value.as_object().unwrap().keys().cloned().collect() };
    app.stock(1, "apple", 5).await;
    let order = app.order(&app.bidder(10), &[("apple", 2)]).await;
    assert_eq!(keys(&order), properties("Order"));
    assert_eq!(keys(&order["lines"][0]), properties("OrderLine"));
}

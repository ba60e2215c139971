//! The OpenAPI document of the API, served at [`PATH`].
//!
//! Each resource module registers its routes through `utoipa_axum::routes!`, which
//! adds a handler to the router and its `#[utoipa::path]` attribute to the document
//! in one step, so neither can gain a route the other lacks. What each attribute
//! says (bodies, parameters, statuses) is still written by hand beside the handler.
//! The document's own route is the one exception: its handler needs the finished
//! document, so `ApiDoc` lists it and `router` adds it, both at [`PATH`].
//!
//! Every error is an `application/problem+json` body of the `Problem` schema. The
//! problems an extractor answers are listed once, beside it, as an
//! `IntoResponses` group (`JsonProblems`, `RoleProblems`, …); a route names the
//! groups it uses, then its own problems. A later entry for the same status
//! replaces an earlier one, so a route's own line names every cause.

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use axum::routing::get;
use bytes::Bytes;
use utoipa::openapi::security::{ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use super::error::Problem;
use super::extract::SESSION_COOKIE;
use super::respond;
use crate::core::Core;

/// Where the document is served.
pub const PATH: &str = "/api/openapi.json";

/// The security scheme of a Bearer token in the `Authorization` header. A route that
/// needs a caller names it, and [`COOKIE`], in its `security(...)`: either will do.
pub const BEARER: &str = "bearer";
/// The security scheme of the session cookie a log-in sets.
pub const COOKIE: &str = "cookie";

/// What the resource routers do not say: the document's info, its own route, the
/// shared schemas and the security schemes.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "gavel",
        version = env!("CARGO_PKG_VERSION"),
        description = "Real-time auctions and bids, with accounts, inventory and orders. \
            Every error is an RFC 9457 problem (application/problem+json).",
    ),
    paths(get_openapi),
    components(schemas(Problem)),
    modifiers(&SecuritySchemes),
)]
pub(super) struct ApiDoc;

struct SecuritySchemes;

impl Modify for SecuritySchemes {
    fn modify(&self, document: &mut utoipa::openapi::OpenApi) {
        let components = document.components.get_or_insert_with(Default::default);
        let bearer = HttpBuilder::new()
            .scheme(HttpAuthScheme::Bearer)
            .bearer_format("JWT")
            .description(Some("A token from POST /api/sessions (or `gavel token`)"))
            .build();
        components.add_security_scheme(BEARER, SecurityScheme::Http(bearer));
        let cookie = ApiKeyValue::with_description(SESSION_COOKIE, "The session cookie POST /api/sessions sets");
        components.add_security_scheme(COOKIE, SecurityScheme::ApiKey(ApiKey::Cookie(cookie)));
    }
}

/// The document, serialised once when a core builds its router.
#[derive(Clone)]
struct Document(Bytes);

/// This document.
#[utoipa::path(
    get, path = PATH, tag = "meta",
    responses((status = 200, description = "The OpenAPI document of this API", body = Object)),
)]
async fn get_openapi(State(Document(bytes)): State<Document>) -> Response {
    respond::raw_json(StatusCode::OK, bytes)
}

/// The route serving `document`. The document lists this route too, so it can only
/// be added once the rest of the document exists.
pub(super) fn router(document: &utoipa::openapi::OpenApi) -> Router<Arc<Core>> {
    // Serialising plain data into memory cannot fail: the document has no maps with
    // non-string keys. A unit test serialises it as well.
    let bytes = serde_json::to_vec(document).expect("the OpenAPI document serialises");
    Router::new().route(PATH, get(get_openapi).with_state(Document(Bytes::from(bytes))))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Built without a server, the document has every path the API serves.
    #[test]
    fn the_document_has_every_path() {
        let document = crate::http::document();
        let paths: Vec<&str> = document.paths.paths.keys().map(String::as_str).collect();
        let mut expected = vec![
            "/health",
            "/ready",
            "/api/auctions",
            "/api/auctions/{id}",
            "/api/auctions/{id}/bids",
            "/api/auctions/{id}/events",
            "/api/auctions/{id}/images/{name}",
            "/api/events",
            "/api/me/events",
            "/api/me/bids",
            "/api/bids",
            "/api/accounts",
            "/api/accounts/me/password",
            "/api/sessions",
            "/api/sessions/current",
            "/api/inventory",
            "/api/inventory/{sku}",
            "/api/orders",
            "/api/orders/{id}",
            "/api/orders/{id}/cancel",
            "/api/orders/{id}/fulfil",
            PATH,
        ];
        expected.sort_unstable();
        assert_eq!(paths, expected);
        assert!(serde_json::to_vec(&document).is_ok(), "the router serialises it");
    }
}

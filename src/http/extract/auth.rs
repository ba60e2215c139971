//! The caller: a Bearer token or the session cookie, and the role a route needs.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{StatusCode, header};
use utoipa::IntoResponses;
use utoipa::openapi::{RefOr, Response};

use crate::auth::{LEEWAY_SECS, Principal, Role, TokenError};
use crate::core::Core;
use crate::db;
use crate::http::error::{Error, problem_responses};

/// The name of the session cookie a log-in sets.
pub const SESSION_COOKIE: &str = "gavel_session";

/// The authenticated caller, any role: 401 without a valid Bearer token or
/// session cookie. The header wins when both are sent.
pub struct Caller(pub Principal);

impl FromRequestParts<Arc<Core>> for Caller {
    type Rejection = Error;

    async fn from_request_parts(parts: &mut Parts, core: &Arc<Core>) -> Result<Self, Error> {
        let token = match parts.headers.get(header::AUTHORIZATION) {
            Some(value) => {
                let value =
                    value.to_str().map_err(|_| Error::Unauthorized("the Authorization header is not readable"))?;
                match value.split_once(' ') {
                    Some((scheme, token)) if scheme.eq_ignore_ascii_case("bearer") => token.trim(),
                    _ => return Err(Error::Unauthorized("the Authorization header must be `Bearer <token>`")),
                }
            }
            None => session_cookie(&parts.headers)
                .ok_or(Error::Unauthorized("this route needs a Bearer token or a session cookie"))?,
        };
        let principal = core.tokens.verify(&core.keys, token).map_err(|e| match e {
            TokenError::Expired => Error::Unauthorized("the token has expired"),
            TokenError::Invalid => Error::Unauthorized("the token is not valid"),
        })?;
        // A core remembers an ended session for --session-ttl (src/cache/sessions.rs):
        // a token made to live longer (`gavel token --ttl`, or before the flag was
        // lowered) would be taken again once a log-out or a password change that
        // ended it was forgotten.
        if principal.session.expires.saturating_sub(principal.issued) > core.limits.session_ttl.as_secs() + LEEWAY_SECS
        {
            return Err(Error::Unauthorized("the token lives longer than this server's sessions (--session-ttl)"));
        }
        let ended = match core.caches.session_ended(principal.account_id, &principal.session) {
            Some(ended) => ended,
            // The core's cache is recovering: only the database knows.
            None => db::accounts::session_ended(&core.pool(), principal.account_id, &principal.session).await?,
        };
        if ended {
            return Err(Error::Unauthorized("the session has ended: log in again"));
        }
        Ok(Caller(principal))
    }
}

/// What [`Caller`] answers, for the API document.
pub struct CallerProblems;

impl IntoResponses for CallerProblems {
    fn responses() -> BTreeMap<String, RefOr<Response>> {
        problem_responses(&[(StatusCode::UNAUTHORIZED, UNAUTHENTICATED)])
    }
}

const UNAUTHENTICATED: &str = "No Bearer token or session cookie, or one that does not verify";

/// The session cookie's value, if the request carries one.
fn session_cookie(headers: &header::HeaderMap) -> Option<&str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == SESSION_COOKIE)
        .map(|(_, value)| value.trim())
}

/// A caller with the bidder role: 401 without a token, 403 with another role.
pub struct Bidder(pub Principal);
/// A caller with the seller role: 401 without a token, 403 with another role.
pub struct Seller(pub Principal);

macro_rules! role_extractor {
    ($name:ident, $role:expr, $message:literal) => {
        impl FromRequestParts<Arc<Core>> for $name {
            type Rejection = Error;

            async fn from_request_parts(parts: &mut Parts, core: &Arc<Core>) -> Result<Self, Error> {
                let Caller(principal) = Caller::from_request_parts(parts, core).await?;
                if principal.role == $role { Ok($name(principal)) } else { Err(Error::Forbidden($message)) }
            }
        }
    };
}

role_extractor!(Bidder, Role::Bidder, "only bidders may do this");
role_extractor!(Seller, Role::Seller, "only sellers may do this");

/// What [`Bidder`] and [`Seller`] answer, for the API document.
pub struct RoleProblems;

impl IntoResponses for RoleProblems {
    fn responses() -> BTreeMap<String, RefOr<Response>> {
        problem_responses(&[
            (StatusCode::UNAUTHORIZED, UNAUTHENTICATED),
            (StatusCode::FORBIDDEN, "The caller does not have the role this route needs"),
        ])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use header::HeaderValue;

    #[test]
    fn the_session_cookie_is_found_among_others() {
        let mut headers = header::HeaderMap::new();
        headers.append(header::COOKIE, HeaderValue::from_static("a=1; gavel_session=tok.en.x ; b=2"));
        assert_eq!(session_cookie(&headers), Some("tok.en.x"));
        let mut other = header::HeaderMap::new();
        other.append(header::COOKIE, HeaderValue::from_static("gavel_sessionx=1"));
        assert_eq!(session_cookie(&other), None);
    }
}

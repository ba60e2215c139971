//! Errors as `application/problem+json` (RFC 9457).
//!
//! Every error a client can see is one [`Error`] variant; each variant's doc names
//! its status. Database and internal errors are logged with the request id, and the
//! client gets a generic body — never the error's text.

use std::collections::BTreeMap;

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::openapi::{self, ContentBuilder, Ref, RefOr, ResponseBuilder};
use utoipa::{IntoResponses, ToSchema};

use super::request_id;
use super::respond;
use crate::db::batch::SubmitError;
use crate::db::{self, DbError};
use crate::domain::FieldError;
use crate::domain::image::MAX_IMAGES_PER_AUCTION;
use crate::metrics::RateLimit;
use crate::throttle::Refused;

/// The media type of every error body.
pub const PROBLEM_JSON: &str = "application/problem+json";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// 400: the body is not JSON at all.
    #[error("the request body is not valid JSON")]
    MalformedJson,
    /// 422: well-formed JSON of the wrong shape or types.
    #[error("the request body does not have the expected shape: {0}")]
    InvalidBody(String),
    /// 422: the right shape, but invalid values; lists each field.
    #[error("some fields are invalid")]
    Validation(Vec<FieldError>),
    /// 422: a query string parameter is missing, of the wrong type or out of range.
    #[error("invalid query: {0}")]
    InvalidQuery(String),
    /// 422: the Idempotency-Key header is empty, too long or not visible ASCII.
    #[error("the Idempotency-Key header must be 1 to 255 visible ASCII characters")]
    InvalidIdempotencyKey,
    /// 415: the body is not declared as application/json.
    #[error("the request body must be application/json")]
    UnsupportedMediaType,
    /// 413: the body is larger than the limit.
    #[error("the request body is larger than {0} bytes")]
    PayloadTooLarge(usize),
    /// 404: no such route or resource.
    #[error("{0}")]
    NotFound(&'static str),
    /// 405: the route exists, the method does not.
    #[error("this method is not allowed on this route")]
    MethodNotAllowed,
    /// 401: no credentials, or credentials that do not verify.
    #[error("{0}")]
    Unauthorized(&'static str),
    /// 403: authenticated, but not allowed.
    #[error("{0}")]
    Forbidden(&'static str),
    /// 409 `/problems/bid-too-low`: carries the minimum that would be accepted.
    #[error("the bid is below the minimum next bid of {min_next_bid}")]
    BidTooLow { min_next_bid: i64 },
    /// 409 `/problems/email-taken`: an account with this e-mail exists.
    #[error("an account with this e-mail address exists")]
    EmailTaken,
    /// 401 `/problems/invalid-credentials`: wrong e-mail or password (never which).
    #[error("the e-mail address or password is wrong")]
    InvalidCredentials,
    /// 409 `/problems/insufficient-stock`: names the sku and what it has.
    #[error("not enough stock of {sku}: {available} available")]
    InsufficientStock { sku: String, available: i64 },
    /// 422 `/problems/unknown-sku`: an order line names no existing sku.
    #[error("no such sku: {0}")]
    UnknownSku(String),
    /// 409 `/problems/order-state`: the order is no longer reserved.
    #[error("the order is {0} and cannot change")]
    OrderState(&'static str),
    /// 409 `/problems/auction-closed`: not open yet, or already closed.
    #[error("the auction is not open for bids")]
    AuctionClosed,
    /// 422: the Idempotency-Key was used before with a different request.
    #[error("this Idempotency-Key was used with a different request")]
    IdempotencyKeyReused,
    /// 409: the Idempotency-Key's first request is still being processed.
    #[error("a request with this Idempotency-Key is still in progress")]
    IdempotencyKeyInUse,
    /// 415 `/problems/unsupported-image`: an upload that is not a JPEG, PNG or
    /// WebP image, by its declared type or by its bytes.
    #[error("{0}")]
    UnsupportedImage(&'static str),
    /// 409 `/problems/too-many-images`: the auction has as many as it may.
    #[error("an auction has at most {MAX_IMAGES_PER_AUCTION} images; delete one first")]
    TooManyImages,
    /// 503 `/problems/storage-unavailable` with Retry-After: the object store
    /// failed (logged); the client learns nothing more.
    #[error("the image store failed: {0}")]
    Storage(String),
    /// 429 `/problems/rate-limited` with Retry-After: a rate limit was hit.
    #[error("too many {}; retry after {} s", what_was_limited(.0.limit), retry_after_secs(.0.retry_after))]
    RateLimited(Refused),
    /// 503 `/problems/overloaded` with Retry-After: a queue is full, the stream cap
    /// is reached, or the database is busy (no connection was free in time, or a
    /// statement or batch ran past its bound: `db::is_busy`).
    #[error("the server is overloaded; retry shortly")]
    Overloaded,
    /// 503 `/problems/database-unavailable` with Retry-After: the database is down
    /// or unreachable (a connection could not be made, or broke; see
    /// `db::is_busy` for what counts as busy instead). Told apart from
    /// [`Error::Overloaded`] so that a client or an operator sees an outage for
    /// what it is; the cause stays in gavel's logs and metrics.
    #[error("the database is unavailable; retry shortly")]
    DatabaseUnavailable,
    /// 503 with Retry-After: the request took longer than the request timeout.
    #[error("the request took too long")]
    Timeout,
    /// 503: not every core serves yet, the database does not answer, or draining.
    #[error("{0}")]
    NotReady(&'static str),
    /// 500: logged; the client learns nothing more.
    #[error("internal error: {0}")]
    Internal(String),
}

/// An RFC 9457 problem: the body of every error. The optional members appear only
/// with the problems that carry them.
#[derive(Serialize, ToSchema)]
pub(crate) struct Problem<'a> {
    /// Names the kind of problem, e.g. `/problems/bid-too-low`.
    #[serde(rename = "type")]
    kind: &'static str,
    /// A short summary of the kind of problem.
    title: &'static str,
    /// The HTTP status code.
    status: u16,
    /// What went wrong with this request.
    detail: String,
    /// The request's `x-request-id`: quote it when reporting a problem.
    request_id: &'a str,
    /// `/problems/bid-too-low`: the smallest bid that would be accepted.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    min_next_bid: Option<i64>,
    /// `/problems/validation`: each invalid field and why.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    errors: Option<&'a [FieldError]>,
    /// `/problems/insufficient-stock` and `/problems/unknown-sku`: the sku at fault.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    sku: Option<&'a str>,
    /// `/problems/insufficient-stock`: how many of the sku are available.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    available: Option<i64>,
}

/// Problem responses for the API document, each status with its description, for
/// the `IntoResponses` impls that sit beside the code answering them.
pub(crate) fn problem_responses(list: &[(StatusCode, &str)]) -> BTreeMap<String, RefOr<openapi::Response>> {
    list.iter()
        .map(|(status, description)| {
            let body = ContentBuilder::new().schema(Some(Ref::from_schema_name(Problem::name()))).build();
            let response = ResponseBuilder::new().description(*description).content(PROBLEM_JSON, body).build();
            (status.as_str().to_owned(), response.into())
        })
        .collect()
}

/// What any route that reaches the database, a queue or the request timeout may
/// answer: 500 ([`Error::Internal`]) and 503 ([`Error::Overloaded`],
/// [`Error::DatabaseUnavailable`], [`Error::Timeout`]).
pub(crate) struct ServerProblems;

impl IntoResponses for ServerProblems {
    fn responses() -> BTreeMap<String, RefOr<openapi::Response>> {
        problem_responses(&[
            (StatusCode::INTERNAL_SERVER_ERROR, "An internal error; quote the request_id when reporting it"),
            (
                StatusCode::SERVICE_UNAVAILABLE,
                "Overloaded, the database does not answer, or the request took too long: retry after Retry-After",
            ),
        ])
    }
}

impl Error {
    fn parts(&self) -> (StatusCode, &'static str, &'static str) {
        use StatusCode as S;
        match self {
            Error::MalformedJson => (S::BAD_REQUEST, "/problems/malformed-json", "Malformed JSON"),
            Error::InvalidBody(_) => (S::UNPROCESSABLE_ENTITY, "/problems/invalid-body", "Invalid request body"),
            Error::Validation(_) => (S::UNPROCESSABLE_ENTITY, "/problems/validation", "Invalid field values"),
            Error::InvalidQuery(_) => (S::UNPROCESSABLE_ENTITY, "/problems/invalid-query", "Invalid query parameters"),
            Error::InvalidIdempotencyKey => {
                (S::UNPROCESSABLE_ENTITY, "/problems/invalid-idempotency-key", "Invalid Idempotency-Key")
            }
            Error::UnsupportedMediaType => {
                (S::UNSUPPORTED_MEDIA_TYPE, "/problems/unsupported-media-type", "Unsupported media type")
            }
            Error::PayloadTooLarge(_) => (S::PAYLOAD_TOO_LARGE, "/problems/payload-too-large", "Payload too large"),
            Error::NotFound(_) => (S::NOT_FOUND, "/problems/not-found", "Not found"),
            Error::MethodNotAllowed => (S::METHOD_NOT_ALLOWED, "/problems/method-not-allowed", "Method not allowed"),
            Error::Unauthorized(_) => (S::UNAUTHORIZED, "/problems/unauthorized", "Unauthorized"),
            Error::Forbidden(_) => (S::FORBIDDEN, "/problems/forbidden", "Forbidden"),
            Error::BidTooLow { .. } => (S::CONFLICT, "/problems/bid-too-low", "Bid too low"),
            Error::AuctionClosed => (S::CONFLICT, "/problems/auction-closed", "Auction not open"),
            Error::EmailTaken => (S::CONFLICT, "/problems/email-taken", "E-mail address taken"),
            Error::InvalidCredentials => (S::UNAUTHORIZED, "/problems/invalid-credentials", "Invalid credentials"),
            Error::InsufficientStock { .. } => (S::CONFLICT, "/problems/insufficient-stock", "Insufficient stock"),
            Error::UnknownSku(_) => (S::UNPROCESSABLE_ENTITY, "/problems/unknown-sku", "Unknown sku"),
            Error::OrderState(_) => (S::CONFLICT, "/problems/order-state", "Order state conflict"),
            Error::IdempotencyKeyReused => {
                (S::UNPROCESSABLE_ENTITY, "/problems/idempotency-key-reused", "Idempotency-Key reused")
            }
            Error::IdempotencyKeyInUse => (S::CONFLICT, "/problems/idempotency-key-in-use", "Idempotency-Key in use"),
            Error::RateLimited(_) => (S::TOO_MANY_REQUESTS, "/problems/rate-limited", "Rate limited"),
            Error::UnsupportedImage(_) => {
                (S::UNSUPPORTED_MEDIA_TYPE, "/problems/unsupported-image", "Unsupported image")
            }
            Error::TooManyImages => (S::CONFLICT, "/problems/too-many-images", "Too many images"),
            Error::Storage(_) => (S::SERVICE_UNAVAILABLE, "/problems/storage-unavailable", "Image store unavailable"),
            Error::Overloaded => (S::SERVICE_UNAVAILABLE, "/problems/overloaded", "Overloaded"),
            Error::DatabaseUnavailable => {
                (S::SERVICE_UNAVAILABLE, "/problems/database-unavailable", "Database unavailable")
            }
            Error::Timeout => (S::SERVICE_UNAVAILABLE, "/problems/timeout", "Request timed out"),
            Error::NotReady(_) => (S::SERVICE_UNAVAILABLE, "/problems/not-ready", "Not ready"),
            Error::Internal(_) => (S::INTERNAL_SERVER_ERROR, "/problems/internal", "Internal error"),
        }
    }
}

impl IntoResponse for Error {
    #[cold]
    fn into_response(self) -> Response {
        let (status, kind, title) = self.parts();
        let rid = request_id::current();
        let detail = match &self {
            Error::Internal(cause) => {
                tracing::error!(request_id = %rid, error = %cause, "internal error");
                "an internal error occurred; quote the request_id when reporting it".to_owned()
            }
            Error::Storage(cause) => {
                tracing::warn!(request_id = %rid, error = %cause, "image store failed");
                "the image store failed; retry shortly".to_owned()
            }
            other => other.to_string(),
        };
        let problem = Problem {
            kind,
            title,
            status: status.as_u16(),
            detail,
            request_id: &rid,
            min_next_bid: match self {
                Error::BidTooLow { min_next_bid } => Some(min_next_bid),
                _ => None,
            },
            errors: match &self {
                Error::Validation(errors) => Some(errors),
                _ => None,
            },
            sku: match &self {
                Error::InsufficientStock { sku, .. } | Error::UnknownSku(sku) => Some(sku),
                _ => None,
            },
            available: match &self {
                Error::InsufficientStock { available, .. } => Some(*available),
                _ => None,
            },
        };
        let mut response = respond::json_with(status, &problem, PROBLEM_JSON);
        let headers = response.headers_mut();
        match self {
            Error::Overloaded
            | Error::DatabaseUnavailable
            | Error::Timeout
            | Error::NotReady(_)
            | Error::Storage(_) => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            }
            Error::RateLimited(refused) => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from(retry_after_secs(refused.retry_after)));
            }
            Error::Unauthorized(_) | Error::InvalidCredentials => {
                headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer realm=\"gavel\""));
            }
            _ => {}
        }
        response
    }
}

impl From<DbError> for Error {
    #[cold]
    fn from(e: DbError) -> Self {
        Error::from(&e)
    }
}

impl From<&DbError> for Error {
    #[cold]
    fn from(e: &DbError) -> Self {
        match e {
            DbError::Unavailable(cause) => {
                // Per request, so debug: during an outage a WARN each would flood the
                // logs. Sheds show in http_requests_total{status="503"}, and the
                // listener and /ready report the outage itself.
                tracing::debug!(error = %cause, "shedding a request: database unavailable or busy");
                match db::is_busy(cause) {
                    true => Error::Overloaded,
                    false => Error::DatabaseUnavailable,
                }
            }
            DbError::UnknownAccount => Error::Unauthorized("the token's account does not exist"),
            DbError::Other(cause) => Error::Internal(cause.to_string()),
        }
    }
}

impl From<SubmitError> for Error {
    #[cold]
    fn from(e: SubmitError) -> Self {
        match e {
            SubmitError::QueueFull | SubmitError::Stopped => Error::Overloaded,
            SubmitError::Db(db) => Error::from(&*db),
        }
    }
}

/// Whole seconds to wait, as Retry-After says them: rounded up, and at least 1.
fn retry_after_secs(wait: std::time::Duration) -> u64 {
    wait.as_secs() + u64::from(wait.subsec_nanos() > 0).max(u64::from(wait.is_zero()))
}

/// What a rate limit limits, for a 429's detail.
fn what_was_limited(limit: RateLimit) -> &'static str {
    match limit {
        RateLimit::LogInAccount => "failed log-ins for this account",
        RateLimit::LogInAddress => "failed log-ins from this address",
        RateLimit::Bids => "bids from this bidder",
    }
}

/// What a rate-limited route may answer, for the API document.
pub(crate) struct RateLimitProblems;

impl IntoResponses for RateLimitProblems {
    fn responses() -> BTreeMap<String, RefOr<openapi::Response>> {
        problem_responses(&[(StatusCode::TOO_MANY_REQUESTS, "A rate limit was hit: retry after Retry-After seconds")])
    }
}

impl From<object_store::Error> for Error {
    #[cold]
    fn from(e: object_store::Error) -> Self {
        Error::Storage(e.to_string())
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn retry_after_rounds_up_to_whole_seconds_of_at_least_one() {
        assert_eq!(retry_after_secs(Duration::ZERO), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(1)), 1);
        assert_eq!(retry_after_secs(Duration::from_secs(1)), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(1001)), 2);
        assert_eq!(retry_after_secs(Duration::from_secs(300)), 300);
    }

    #[test]
    fn a_busy_database_sheds_as_overloaded_and_a_down_one_as_unavailable() {
        let kind = |cause: sqlx::Error| Error::from(&DbError::Unavailable(cause)).parts().1;
        let io = |kind: std::io::ErrorKind| sqlx::Error::Io(std::io::Error::new(kind, "test"));
        assert_eq!(kind(sqlx::Error::PoolTimedOut), "/problems/overloaded", "no connection free in time");
        assert_eq!(kind(io(std::io::ErrorKind::TimedOut)), "/problems/overloaded", "a batch past its bound");
        assert_eq!(kind(io(std::io::ErrorKind::ConnectionRefused)), "/problems/database-unavailable");
        assert_eq!(kind(io(std::io::ErrorKind::UnexpectedEof)), "/problems/database-unavailable");
        assert_eq!(kind(sqlx::Error::PoolClosed), "/problems/database-unavailable");
    }
}

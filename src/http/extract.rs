//! Extractors that turn every bad input into the right problem.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::{FromRequest, FromRequestParts, Path, Query, Request};
use axum::http::request::Parts;
use axum::http::{StatusCode, header};
use serde::de::DeserializeOwned;
use utoipa::openapi::path::{Parameter, ParameterBuilder, ParameterIn};
use utoipa::openapi::schema::{KnownFormat, ObjectBuilder, SchemaFormat, Type};
use utoipa::openapi::{RefOr, Required, Response};
use utoipa::{IntoParams, IntoResponses};

use super::error::{Error, problem_responses};
use crate::auth::{Principal, Role, TokenError};
use crate::core::Core;

/// Longest accepted `Idempotency-Key`.
pub const MAX_IDEMPOTENCY_KEY: usize = 255;

thread_local! {
    /// This core's parse buffers: simd-json parses in place, so the body is copied
    /// into a reused buffer rather than a fresh allocation per request.
    static PARSE: RefCell<(Vec<u8>, simd_json::Buffers)> =
        RefCell::new((Vec::with_capacity(4096), simd_json::Buffers::new(4096)));
}

/// A JSON body, parsed by [`parse`]: 415 unless declared JSON, 413 over the body
/// limit, 400 if not JSON, 422 if JSON of the wrong shape.
pub struct Json<T>(pub T);

impl<T: DeserializeOwned> FromRequest<Arc<Core>> for Json<T> {
    type Rejection = Error;

    async fn from_request(request: Request, core: &Arc<Core>) -> Result<Self, Error> {
        if !is_json(request.headers().get(header::CONTENT_TYPE)) {
            return Err(Error::UnsupportedMediaType);
        }
        let limit = core.limits.body_limit;
        let declared = request
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|len| len > LINGER_LIMIT as u64) {
            // Too large even to read away: answer now; the connection closes.
            return Err(Error::PayloadTooLarge(limit));
        }
        let bytes = read_body(request.into_body(), limit).await?;
        parse(&bytes).map(Json)
    }
}

/// What [`Json`] answers, for the API document. A route whose own checks also
/// answer 422 lists its own 422 after this, naming every cause.
pub struct JsonProblems;

impl IntoResponses for JsonProblems {
    fn responses() -> BTreeMap<String, RefOr<Response>> {
        problem_responses(&[
            (StatusCode::BAD_REQUEST, "The body is not JSON"),
            (StatusCode::PAYLOAD_TOO_LARGE, "The body is larger than the limit"),
            (StatusCode::UNSUPPORTED_MEDIA_TYPE, "The body is not declared as application/json"),
            (StatusCode::UNPROCESSABLE_ENTITY, "The body is JSON of the wrong shape or types"),
        ])
    }
}

/// How much of a rejected body is still read (and dropped) before answering 413.
/// A client still sending its body when the server answers and closes gets a
/// broken pipe instead of the 413; reading the rest first, up to this bound,
/// lets it read the answer (nginx's lingering close does the same).
const LINGER_LIMIT: usize = 1024 * 1024;

/// Reads a body of at most `limit` bytes; one chunk (the usual case for small
/// bodies) is returned without copying.
async fn read_body(mut body: axum::body::Body, limit: usize) -> Result<bytes::Bytes, Error> {
    use http_body_util::BodyExt;
    let mut chunks: Vec<bytes::Bytes> = Vec::new();
    let mut seen = 0usize;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|_| Error::InvalidBody("the request body could not be read".into()))?;
        let Ok(data) = frame.into_data() else { continue };
        seen += data.len();
        if seen > limit {
            if seen > LINGER_LIMIT {
                break;
            }
            chunks.clear();
            continue;
        }
        chunks.push(data);
    }
    if seen > limit {
        return Err(Error::PayloadTooLarge(limit));
    }
    Ok(match chunks.len() {
        1 => chunks.pop().unwrap_or_default(),
        _ => chunks.concat().into(),
    })
}

/// Bodies at least this long are parsed with simd-json, shorter ones with
/// serde_json. simd-json's fixed costs (copying the body into the reused buffer, the
/// structural-index pass) outweigh the whole parse of a small body: on the 32-byte
/// bid it is 1.4–1.6× slower than serde_json (110 ns against 69 ns); from the
/// 104-byte order to a 407-byte one they tie; at 1.3 KB simd-json is ~9 % ahead
/// (`benches/hot_paths.rs`, `json_parse`).
pub const SIMD_JSON_MIN_BYTES: usize = 512;

/// Parses a JSON object, telling malformed JSON (400) from wrong shape (422), with
/// the parser that is faster for a body of its size (see [`SIMD_JSON_MIN_BYTES`]).
/// Every request body of the API is an object; serde would otherwise accept a
/// struct written as an array.
pub fn parse<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, Error> {
    if bytes.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return Err(not_an_object(bytes));
    }
    if bytes.len() < SIMD_JSON_MIN_BYTES { parse_with_serde_json(bytes) } else { parse_with_simd_json(bytes) }
}

/// serde_json straight from the body's bytes.
pub fn parse_with_serde_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, Error> {
    serde_json::from_slice(bytes).map_err(serde_json_error)
}

/// simd-json on a copy of the body in this core's reused buffers.
pub fn parse_with_simd_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, Error> {
    let parsed = PARSE.with_borrow_mut(|(buf, buffers)| {
        buf.clear();
        buf.extend_from_slice(bytes);
        simd_json::serde::from_slice_with_buffers::<T>(buf, buffers)
    });
    parsed.map_err(|e| classify(bytes, e))
}

#[cold]
fn serde_json_error(error: serde_json::Error) -> Error {
    match error.classify() {
        serde_json::error::Category::Data => Error::InvalidBody(error.to_string()),
        _ => Error::MalformedJson,
    }
}

#[cold]
fn classify(bytes: &[u8], error: simd_json::Error) -> Error {
    // simd-json does not say whether a failure was syntax or shape; serde_json can,
    // on this cold path only.
    shape_or_syntax(bytes, || error.to_string())
}

#[cold]
fn not_an_object(bytes: &[u8]) -> Error {
    shape_or_syntax(bytes, || "the body must be a JSON object".into())
}

/// 422 with `shape`'s message if `bytes` are well-formed JSON, else 400.
fn shape_or_syntax(bytes: &[u8], shape: impl FnOnce() -> String) -> Error {
    match serde_json::from_slice::<serde::de::IgnoredAny>(bytes) {
        Ok(_) => Error::InvalidBody(shape()),
        Err(_) => Error::MalformedJson,
    }
}

fn is_json(value: Option<&header::HeaderValue>) -> bool {
    let Some(value) = value.and_then(|v| v.to_str().ok()) else {
        return false;
    };
    let essence = value.split(';').next().unwrap_or("").trim();
    essence.eq_ignore_ascii_case("application/json")
        || (essence.len() > 5
            && essence[..essence.len() - 5].to_ascii_lowercase().starts_with("application/")
            && essence[essence.len() - 5..].eq_ignore_ascii_case("+json"))
}

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
        core.keys.verify(token).map(Caller).map_err(|e| match e {
            TokenError::Expired => Error::Unauthorized("the token has expired"),
            TokenError::Invalid => Error::Unauthorized("the token is not valid"),
        })
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

/// The `Idempotency-Key` header, if sent: 422 if empty, over 255 characters or not
/// visible ASCII.
pub struct IdempotencyKey(pub Option<String>);

impl<S: Send + Sync> FromRequestParts<S> for IdempotencyKey {
    type Rejection = Error;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Error> {
        let Some(value) = parts.headers.get("idempotency-key") else {
            return Ok(IdempotencyKey(None));
        };
        let bytes = value.as_bytes();
        if bytes.is_empty() || bytes.len() > MAX_IDEMPOTENCY_KEY || !bytes.iter().all(|b| b.is_ascii_graphic()) {
            return Err(Error::InvalidIdempotencyKey);
        }
        Ok(IdempotencyKey(Some(String::from_utf8_lossy(bytes).into_owned())))
    }
}

impl IntoParams for IdempotencyKey {
    fn into_params(_: impl Fn() -> Option<ParameterIn>) -> Vec<Parameter> {
        let key =
            ObjectBuilder::new().schema_type(Type::String).min_length(Some(1)).max_length(Some(MAX_IDEMPOTENCY_KEY));
        let description = "Makes a retry safe: a repeat with the same key and request answers as the first did";
        vec![
            ParameterBuilder::new()
                .name("Idempotency-Key")
                .parameter_in(ParameterIn::Header)
                .required(Required::False)
                .description(Some(description))
                .schema(Some(key))
                .build(),
        ]
    }
}

/// The `If-None-Match` header, if sent: a read whose ETag it names is answered
/// 304 (see [`super::respond::cached`]).
pub struct IfNoneMatch(pub Option<header::HeaderValue>);

impl<S: Send + Sync> FromRequestParts<S> for IfNoneMatch {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        Ok(IfNoneMatch(parts.headers.get(header::IF_NONE_MATCH).cloned()))
    }
}

impl IntoParams for IfNoneMatch {
    fn into_params(_: impl Fn() -> Option<ParameterIn>) -> Vec<Parameter> {
        let description = "ETags the client holds: when one is the current version's, the answer is 304 with no body";
        vec![
            ParameterBuilder::new()
                .name("If-None-Match")
                .parameter_in(ParameterIn::Header)
                .required(Required::False)
                .description(Some(description))
                .schema(Some(ObjectBuilder::new().schema_type(Type::String)))
                .build(),
        ]
    }
}

/// A sku from the path. One that cannot even be decoded (not UTF-8) is a 422
/// naming the field, like any other invalid sku — never axum's plain-text 400.
pub struct SkuPath(pub String);

impl<S: Send + Sync> FromRequestParts<S> for SkuPath {
    type Rejection = Error;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Error> {
        Path::<String>::from_request_parts(parts, state).await.map(|Path(sku)| SkuPath(sku)).map_err(|_| {
            Error::Validation(vec![crate::domain::FieldError::new(
                "sku",
                "must be 1 to 64 characters of A-Z, a-z, 0-9, '.', '_' or '-'",
            )])
        })
    }
}

/// A numeric id from the path; anything else is 404 (no resource has that id).
pub struct Id(pub i64);

impl<S: Send + Sync> FromRequestParts<S> for Id {
    type Rejection = Error;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Error> {
        match Path::<i64>::from_request_parts(parts, state).await {
            Ok(Path(id)) if id > 0 => Ok(Id(id)),
            _ => Err(Error::NotFound("no resource has this id")),
        }
    }
}

impl IntoParams for Id {
    fn into_params(_: impl Fn() -> Option<ParameterIn>) -> Vec<Parameter> {
        let id = ObjectBuilder::new()
            .schema_type(Type::Integer)
            .format(Some(SchemaFormat::KnownFormat(KnownFormat::Int64)))
            .minimum(Some(1));
        vec![
            ParameterBuilder::new()
                .name("id")
                .parameter_in(ParameterIn::Path)
                .required(Required::True)
                .description(Some("The resource's id; anything but a positive integer is 404"))
                .schema(Some(id))
                .build(),
        ]
    }
}

/// Query parameters: 422 with the reason when they do not parse.
pub struct Params<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequestParts<S> for Params<T> {
    type Rejection = Error;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Error> {
        Query::<T>::from_request_parts(parts, state)
            .await
            .map(|Query(q)| Params(q))
            .map_err(|e| Error::InvalidQuery(e.body_text()))
    }
}

/// What [`Params`] answers, for the API document.
pub struct QueryProblems;

impl IntoResponses for QueryProblems {
    fn responses() -> BTreeMap<String, RefOr<Response>> {
        problem_responses(&[(
            StatusCode::UNPROCESSABLE_ENTITY,
            "A query parameter is unknown, of the wrong type or out of range",
        )])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use header::HeaderValue;

    #[derive(serde::Deserialize, Debug)]
    #[serde(deny_unknown_fields)]
    struct Bid {
        amount: i64,
    }

    #[test]
    fn the_session_cookie_is_found_among_others() {
        let mut headers = header::HeaderMap::new();
        headers.append(header::COOKIE, HeaderValue::from_static("a=1; gavel_session=tok.en.x ; b=2"));
        assert_eq!(session_cookie(&headers), Some("tok.en.x"));
        let mut other = header::HeaderMap::new();
        other.append(header::COOKIE, HeaderValue::from_static("gavel_sessionx=1"));
        assert_eq!(session_cookie(&other), None);
    }

    #[test]
    fn json_content_types() {
        let ok = |s: &'static str| is_json(Some(&HeaderValue::from_static(s)));
        assert!(ok("application/json"));
        assert!(ok("Application/JSON; charset=utf-8"));
        assert!(ok("application/problem+json"));
        assert!(!ok("text/plain"));
        assert!(!ok("application/jsonx"));
        assert!(!ok("+json"));
        assert!(!is_json(None));
    }

    #[test]
    fn syntax_errors_are_400_and_shape_errors_422() {
        assert!(matches!(parse::<Bid>(b"{\"amount\": 5"), Err(Error::MalformedJson)));
        assert!(matches!(parse::<Bid>(b""), Err(Error::MalformedJson)));
        assert!(matches!(parse::<Bid>(b"{\"amount\": \"5\"}"), Err(Error::InvalidBody(_))));
        assert!(matches!(parse::<Bid>(b"[1]"), Err(Error::InvalidBody(_))));
        assert!(matches!(parse::<Bid>(b"{\"amount\": 5, \"extra\": 1}"), Err(Error::InvalidBody(_))));
        assert!(matches!(parse::<Bid>(b" {\"amount\": 5}"), Ok(Bid { amount: 5 })));
        assert!(matches!(parse::<Bid>(b"5"), Err(Error::InvalidBody(_))));
    }

    #[test]
    fn both_parsers_classify_alike_so_the_size_choice_is_invisible() {
        type Parser = fn(&[u8]) -> Result<Bid, Error>;
        let parsers: [(&str, Parser); 2] =
            [("serde_json", parse_with_serde_json::<Bid>), ("simd-json", parse_with_simd_json::<Bid>)];
        for (name, parser) in parsers {
            let check = |body: &[u8], want: &str| {
                let got = match parser(body) {
                    Ok(_) => "ok",
                    Err(Error::MalformedJson) => "400",
                    Err(Error::InvalidBody(_)) => "422",
                    Err(_) => "other",
                };
                assert_eq!(got, want, "{name} on {:?}", String::from_utf8_lossy(body));
            };
            check(b"{\"amount\": 5}", "ok");
            check(b"{\"amount\": 5", "400");
            check(b"{\"amount\": 5} x", "400");
            check(b"{\"amount\": \"5\"}", "422");
            check(b"{}", "422");
            check(b"{\"amount\": 5, \"extra\": 1}", "422");
        }
        // A body past the threshold takes the simd-json path and parses the same.
        let mut large = b"{\"amount\": 7".to_vec();
        large.resize(SIMD_JSON_MIN_BYTES + 10, b' ');
        large.push(b'}');
        assert!(matches!(parse::<Bid>(&large), Ok(Bid { amount: 7 })));
        large.pop();
        assert!(matches!(parse::<Bid>(&large), Err(Error::MalformedJson)));
    }
}

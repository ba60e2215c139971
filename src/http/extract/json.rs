//! The JSON body: 415 unless declared JSON, 413 over the body limit, 400 if not
//! JSON, 422 if JSON of the wrong shape.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::{FromRequest, Request};
use axum::http::{StatusCode, header};
use serde::de::DeserializeOwned;
use utoipa::IntoResponses;
use utoipa::openapi::{RefOr, Response};

use crate::core::Core;
use crate::http::error::{Error, problem_responses};

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

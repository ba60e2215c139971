//! Response bodies and the headers every kind of answer carries.
//!
//! Bodies are serialised with `serde_json::to_vec` into a buffer of their own.
//! gavel used to write them into one large per-core `BytesMut` and split each off;
//! its own benchmark never showed that to pay (`cargo bench --bench hot_paths --
//! serialise`, 2026-11-29: an auction as a `serde_json::Value` 713 ns against
//! 477 ns for `to_vec`; as the handler's struct 1.23 µs against 1.96 µs, both
//! with wide intervals on a busy machine), and a body kept for long — a cached
//! read's, rendered once per version — would have pinned a whole 64 KiB chunk.
//! Cached reads no longer serialise per request at all (see [`cached`]).

use axum::body::Body;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::Response;
use bytes::Bytes;
use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::cache::View;

pub const APPLICATION_JSON: &str = "application/json";

/// `Cache-Control` of the reads served from a core's cache (auctions and stock):
/// a client or proxy may keep the body but must revalidate it before each use,
/// since a price or a stock level can change any millisecond. Revalidating costs
/// little: `If-None-Match` with the current ETag gets a 304 from the cache.
pub const CACHED_READ: HeaderValue = HeaderValue::from_static("no-cache");

/// Serialises `value` as JSON.
pub fn to_vec<T: Serialize + ?Sized>(value: &T) -> Vec<u8> {
    // Serialising plain data into memory cannot fail: our types have no maps with
    // non-string keys and no fallible Serialize impls.
    serde_json::to_vec(value).unwrap_or_else(|_| b"null".to_vec())
}

/// Serialises `value` as JSON, for a body sent once.
pub fn to_bytes<T: Serialize + ?Sized>(value: &T) -> Bytes {
    Bytes::from(to_vec(value))
}

/// A JSON response with the given status and content type.
pub fn json_with<T: Serialize + ?Sized>(status: StatusCode, value: &T, content_type: &'static str) -> Response {
    let mut response = Response::new(Body::from(to_bytes(value)));
    *response.status_mut() = status;
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

/// A response whose JSON body was built elsewhere (by the database, or once at
/// start-up).
pub fn raw_json(status: StatusCode, body: impl Into<Body>) -> Response {
    let mut response = Response::new(body.into());
    *response.status_mut() = status;
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(APPLICATION_JSON));
    response
}

/// An `application/json` response.
pub fn json<T: Serialize + ?Sized>(status: StatusCode, value: &T) -> Response {
    json_with(status, value, APPLICATION_JSON)
}

/// The strong `ETag` of a version: the number, quoted.
pub fn etag(version: i64) -> HeaderValue {
    HeaderValue::try_from(format!("\"{version}\"")).unwrap_or_else(|_| HeaderValue::from_static("\"0\""))
}

/// Adds the strong `ETag` of `version`.
pub fn with_etag(mut response: Response, version: i64) -> Response {
    response.headers_mut().insert(header::ETAG, etag(version));
    response
}

/// A row's read response, rendered once: its JSON, its version's ETag, and until
/// when it is right (`DateTime::MAX_UTC` when only a change of the row can make
/// it wrong).
pub fn view<T: Serialize + ?Sized>(value: &T, version: i64, fresh_until: DateTime<Utc>) -> View {
    // Kept as long as the row is cached: trimmed to its length, since the
    // serialiser's buffer grows by doubling (a 300-byte auction sat in 512).
    View { body: to_vec(value).into_boxed_slice().into(), etag: etag(version), fresh_until: fresh_until.into() }
}

/// The answer to a read of `view`: 304 with no body when `If-None-Match` names
/// its ETag, else 200 with the body. Either way with the ETag and
/// [`CACHED_READ`].
pub fn cached<B: From<Bytes> + Default>(view: View, if_none_match: Option<&HeaderValue>) -> axum::http::Response<B> {
    let (status, body) = match if_none_match {
        Some(tags) if names(tags, &view.etag) => (StatusCode::NOT_MODIFIED, B::default()),
        _ => (StatusCode::OK, B::from(view.body)),
    };
    let mut response = axum::http::Response::new(body);
    *response.status_mut() = status;
    let headers = response.headers_mut();
    if status == StatusCode::OK {
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(APPLICATION_JSON));
    }
    headers.insert(header::ETAG, view.etag);
    headers.insert(header::CACHE_CONTROL, CACHED_READ);
    response
}

/// The request's `If-None-Match`, its lines made one list if it came in several,
/// as RFC 9110 §5.3 combines a field's lines.
pub fn if_none_match(headers: &HeaderMap) -> Option<HeaderValue> {
    let mut lines = headers.get_all(header::IF_NONE_MATCH).iter();
    let first = lines.next()?;
    let Some(second) = lines.next() else { return Some(first.clone()) };
    let mut list = first.as_bytes().to_vec();
    for line in std::iter::once(second).chain(lines) {
        list.extend_from_slice(b", ");
        list.extend_from_slice(line.as_bytes());
    }
    HeaderValue::from_bytes(&list).ok()
}

/// Whether an `If-None-Match` value names `etag`: `*`, or a list of entity tags
/// compared weakly (a `W/` prefix is ignored), as RFC 9110 §13.1.2 asks.
pub(crate) fn names(if_none_match: &HeaderValue, etag: &HeaderValue) -> bool {
    names_raw(if_none_match.as_bytes(), etag)
}

/// [`names`], for a header value as it came off the wire.
pub(crate) fn names_raw(tags: &[u8], etag: &HeaderValue) -> bool {
    if tags.trim_ascii() == b"*" {
        return true;
    }
    tags.split(|b| *b == b',').map(|t| t.trim_ascii()).any(|t| t.strip_prefix(b"W/").unwrap_or(t) == etag.as_bytes())
}

/// Appends the whole HTTP/1.1 answer to a read of `view` to `out`: what
/// [`cached`] answers, with the request id `id` writes and the `Date` and
/// `Content-Length` hyper would add, so a client cannot tell which wrote it.
pub(crate) fn write_cached(
    out: &mut Vec<u8>,
    view: &View,
    not_modified: bool,
    now: std::time::SystemTime,
    id: impl FnOnce(&mut Vec<u8>),
) {
    out.extend_from_slice(if not_modified { b"HTTP/1.1 304 Not Modified\r\n" } else { b"HTTP/1.1 200 OK\r\n" });
    if !not_modified {
        line(out, header::CONTENT_TYPE.as_str(), APPLICATION_JSON.as_bytes());
    }
    line(out, header::ETAG.as_str(), view.etag.as_bytes());
    line(out, header::CACHE_CONTROL.as_str(), CACHED_READ.as_bytes());
    out.extend_from_slice(super::request_id::HEADER.as_str().as_bytes());
    out.extend_from_slice(b": ");
    id(out);
    out.extend_from_slice(b"\r\n");
    if !not_modified {
        line(out, header::CONTENT_LENGTH.as_str(), itoa::Buffer::new().format(view.body.len()).as_bytes());
    }
    date_line(out, now);
    out.extend_from_slice(b"\r\n");
    if !not_modified {
        out.extend_from_slice(&view.body);
    }
}

thread_local! {
    /// The `Date` header's value for the second it was made in: made once a
    /// second per core, as hyper does.
    static DATE: std::cell::Cell<(u64, [u8; 29])> = const { std::cell::Cell::new((0, [b' '; 29])) };
}

/// Appends the `Date` header of `now`, formatted once a second per core.
pub(crate) fn date_line(out: &mut Vec<u8>, now: std::time::SystemTime) {
    DATE.with(|date| {
        let (secs, mut text) = date.get();
        let now_secs = now.duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
        if now_secs != secs {
            text.copy_from_slice(httpdate::fmt_http_date(now).as_bytes());
            date.set((now_secs, text));
        }
        line(out, header::DATE.as_str(), &text);
    });
}

/// Appends one HTTP/1.1 header line.
pub(crate) fn line(out: &mut Vec<u8>, name: &str, value: &[u8]) {
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_raw_answer_frames_its_body_and_a_304_has_none() {
        let view =
            View { body: Bytes::from_static(b"{\"id\":1}"), etag: etag(3), fresh_until: std::time::SystemTime::now() };
        let mut out = Vec::new();
        write_cached(&mut out, &view, false, std::time::SystemTime::now(), |o| o.extend_from_slice(b"r-1"));
        let text = String::from_utf8(out).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert_eq!(body, "{\"id\":1}");
        assert!(head.starts_with("HTTP/1.1 200 OK\r\ncontent-type: application/json\r\netag: \"3\"\r\n"), "{head}");
        assert!(head.contains("\r\ncontent-length: 8\r\n") && head.contains("\r\nx-request-id: r-1\r\n"), "{head}");
        let mut out = Vec::new();
        write_cached(&mut out, &view, true, std::time::SystemTime::now(), |o| o.extend_from_slice(b"r-2"));
        let text = String::from_utf8(out).unwrap();
        assert!(text.starts_with("HTTP/1.1 304 Not Modified\r\n") && text.ends_with("GMT\r\n\r\n"), "{text}");
        assert!(!text.contains("content-length") && !text.contains("content-type"), "{text}");
    }

    #[test]
    fn etag_is_a_quoted_version() {
        let r = with_etag(json(StatusCode::OK, &1), 42);
        assert_eq!(r.headers()[header::ETAG], "\"42\"");
    }

    #[test]
    fn if_none_match_is_compared_weakly_over_a_list() {
        let etag = etag(7);
        let yes = ["\"7\"", "W/\"7\"", "\"3\", \"7\"", " * ", "\"1\",W/\"7\""];
        let no = ["\"8\"", "7", "\"77\"", "W/\"70\"", ""];
        for v in yes {
            assert!(names(&HeaderValue::from_static(v), &etag), "{v:?} names \"7\"");
        }
        for v in no {
            assert!(!names(&HeaderValue::from_static(v), &etag), "{v:?} does not name \"7\"");
        }
    }

    #[test]
    fn a_matching_tag_gets_304_without_a_body() {
        let v = view(&serde_json::json!({"a": 1}), 3, DateTime::<Utc>::MAX_UTC);
        let hit: Response = cached(v.clone(), Some(&HeaderValue::from_static("\"3\"")));
        assert_eq!(hit.status(), StatusCode::NOT_MODIFIED);
        assert_eq!(hit.headers()[header::ETAG], "\"3\"");
        assert_eq!(hit.headers()[header::CACHE_CONTROL], "no-cache");
        assert!(hit.headers().get(header::CONTENT_TYPE).is_none());
        let miss: Response = cached(v, Some(&HeaderValue::from_static("\"2\"")));
        assert_eq!(miss.status(), StatusCode::OK);
        assert_eq!(miss.headers()[header::CONTENT_TYPE], APPLICATION_JSON);
    }
}

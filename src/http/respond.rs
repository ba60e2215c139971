//! Response bodies serialised into a per-core buffer and sent as `Bytes`.
//!
//! Each core keeps one large `BytesMut`; a response is written at its end and split
//! off, frozen, as the body. Many responses share one allocation, which is reused
//! once they are all sent. No lock: the buffer is thread-local and a core is a thread.

use std::cell::RefCell;

use axum::body::Body;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::Response;
use bytes::{BufMut, Bytes, BytesMut};
use serde::Serialize;

/// Size of each core's shared response buffer.
const CHUNK: usize = 64 * 1024;
/// Below this much room, start a new chunk rather than risk growing mid-write.
const LOW_WATER: usize = 4 * 1024;

pub const APPLICATION_JSON: &str = "application/json";

thread_local! {
    static BUFFER: RefCell<BytesMut> = RefCell::new(BytesMut::with_capacity(CHUNK));
}

/// Serialises `value` as JSON into the core's buffer.
pub fn to_bytes<T: Serialize + ?Sized>(value: &T) -> Bytes {
    BUFFER.with_borrow_mut(|buf| {
        if buf.capacity() - buf.len() < LOW_WATER {
            buf.reserve(CHUNK);
        }
        // Serialising plain data into memory cannot fail: our types have no maps
        // with non-string keys and no fallible Serialize impls.
        if serde_json::to_writer((&mut *buf).writer(), value).is_err() {
            buf.clear();
            buf.extend_from_slice(b"null");
        }
        buf.split().freeze()
    })
}

/// A JSON response with the given status and content type.
pub fn json_with<T: Serialize + ?Sized>(status: StatusCode, value: &T, content_type: &'static str) -> Response {
    let body = to_bytes(value);
    let mut response = Response::new(Body::from(body));
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

/// Adds a strong `ETag` made of a version number.
pub fn with_etag(mut response: Response, version: i64) -> Response {
    if let Ok(v) = HeaderValue::try_from(format!("\"{version}\"")) {
        response.headers_mut().insert(header::ETAG, v);
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn consecutive_bodies_do_not_overlap() {
        let a = to_bytes(&serde_json::json!({"a": 1}));
        let b = to_bytes(&[1, 2, 3]);
        assert_eq!(&a[..], br#"{"a":1}"#);
        assert_eq!(&b[..], b"[1,2,3]");
    }

    #[test]
    fn bodies_larger_than_a_chunk_are_whole() {
        let big = "x".repeat(CHUNK * 2);
        let bytes = to_bytes(&big);
        assert_eq!(bytes.len(), big.len() + 2);
    }

    #[test]
    fn etag_is_a_quoted_version() {
        let r = with_etag(json(StatusCode::OK, &1), 42);
        assert_eq!(r.headers()[header::ETAG], "\"42\"");
    }
}

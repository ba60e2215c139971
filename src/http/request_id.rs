//! Request ids: taken from `x-request-id` when the client sends a sane one, else
//! made up per core; echoed on every response and quoted in every problem body.
//!
//! The id lives in a task-local for the request's duration, so error rendering deep
//! in an extractor can quote it without threading it through every signature.

use std::cell::Cell;
use std::sync::Arc;

use axum::extract::{MatchedPath, Request, State};
use axum::http::HeaderValue;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::error::Error;
use crate::core::Core;
use crate::metrics;

pub const HEADER: &str = "x-request-id";
/// Longest client-supplied id echoed back; longer ones are replaced.
const MAX_LEN: usize = 128;

tokio::task_local! {
    static CURRENT: HeaderValue;
}

thread_local! {
    /// This core's prefix and counter: ids are unique per process without any
    /// value shared between cores.
    static NEXT: Cell<(u32, u64)> = const { Cell::new((0, 0)) };
}

/// Gives this thread (a core) its id prefix. Called once when a core starts.
pub fn init_core(core: usize) {
    use rand::Rng;
    let boot: u32 = rand::thread_rng().r#gen::<u32>() & 0x00ff_ffff;
    NEXT.with(|n| n.set((boot << 8 | (core as u32 & 0xff), 0)));
}

fn generate() -> HeaderValue {
    let (prefix, n) = NEXT.with(|c| {
        let (prefix, n) = c.get();
        c.set((prefix, n.wrapping_add(1)));
        (prefix, n)
    });
    // Hex digits only, so the value is always a valid header.
    HeaderValue::try_from(format!("{prefix:08x}-{n:x}")).unwrap_or_else(|_| HeaderValue::from_static("unknown"))
}

fn acceptable(value: &HeaderValue) -> bool {
    let bytes = value.as_bytes();
    !bytes.is_empty() && bytes.len() <= MAX_LEN && bytes.iter().all(|b| b.is_ascii_graphic())
}

/// The current request's id ("" outside a request).
pub fn current() -> String {
    CURRENT.try_with(|v| v.to_str().unwrap_or_default().to_owned()).unwrap_or_default()
}

/// Sets the request id, bounds the request's time, echoes the id, and records
/// the request's metrics.
pub async fn middleware(State(core): State<Arc<Core>>, request: Request, next: Next) -> Response {
    let started = std::time::Instant::now();
    let method = metrics::method_label(request.method());
    // The matched route template (fixed by the router), never the raw path.
    let route = request.extensions().get::<MatchedPath>().cloned();
    metrics::request_started();
    let id = match request.headers().get(HEADER) {
        Some(v) if acceptable(v) => v.clone(),
        _ => generate(),
    };
    let timeout = core.limits.request_timeout;
    let mut response = CURRENT
        .scope(id.clone(), async move {
            match tokio::time::timeout(timeout, next.run(request)).await {
                Ok(response) => response,
                Err(_) => Error::Timeout.into_response(),
            }
        })
        .await;
    response.headers_mut().insert(HEADER, id);
    let route = route.as_ref().map_or("unmatched", |r| r.as_str());
    metrics::request_finished(route, method, response.status().as_u16(), started.elapsed());
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_ids_are_unique_and_valid() {
        init_core(3);
        let a = generate();
        let b = generate();
        assert_ne!(a, b);
        assert!(acceptable(&a));
        // `<8 hex digits: boot and core>-<hex counter>`, counting from 0 on this core.
        let (prefix, counter) = a.to_str().unwrap().split_once('-').unwrap();
        assert_eq!(prefix.len(), 8);
        assert!(prefix.ends_with("03"), "the core number is in the prefix: {prefix}");
        assert_eq!(counter, "0");
        assert_eq!(b.to_str().unwrap(), format!("{prefix}-1"));
    }

    #[test]
    fn unreasonable_client_ids_are_not_echoed() {
        assert!(acceptable(&HeaderValue::from_static("abc-123")));
        assert!(!acceptable(&HeaderValue::from_static("")));
        assert!(!acceptable(&HeaderValue::from_static("has space")));
        assert!(!acceptable(&HeaderValue::try_from("x".repeat(MAX_LEN + 1)).unwrap()));
    }
}

//! Request ids: taken from `x-request-id` when the client sends a sane one, else
//! made up per core; echoed on every response and quoted in every problem body.
//!
//! The id lives in a task-local for the request's duration (see [`scope`]), so
//! error rendering deep in an extractor can quote it without threading it through
//! every signature.

use std::cell::Cell;
use std::future::Future;

use axum::http::{HeaderMap, HeaderName, HeaderValue};
use tokio::task::futures::TaskLocalFuture;

/// The header, as a name built at compile time: a `&str` name is parsed and
/// checked on every lookup and insert (callgrind, 10,000 cached reads: 530
/// instructions a read for the insert, 325 for the lookup).
pub const HEADER: HeaderName = HeaderName::from_static("x-request-id");
/// Longest client-supplied id echoed back; longer ones are replaced.
const MAX_LEN: usize = 128;

tokio::task_local! {
    static CURRENT: HeaderValue;
}

thread_local! {
    /// This core's id prefix (`<8 hex digits: boot and core>-`) and counter: ids
    /// are unique per process without any value shared between cores.
    static NEXT: Cell<([u8; PREFIX], u64)> = const { Cell::new((*b"00000000-", 0)) };
}

/// Length of an id's prefix, its dash included.
const PREFIX: usize = 9;

/// Gives this thread (a core) its id prefix. Called once when a core starts.
pub fn init_core(core: usize) {
    use rand::Rng;
    let boot: u32 = rand::thread_rng().r#gen::<u32>() & 0x00ff_ffff;
    let mut prefix = *b"00000000-";
    hex(u64::from(boot << 8 | (core as u32 & 0xff)), 8, &mut prefix);
    NEXT.with(|n| n.set((prefix, 0)));
}

/// Writes `n` in lower-case hex, without leading zeros unless `width` asks for
/// them, at the start of `out`; returns how many bytes it wrote.
fn hex(n: u64, width: usize, out: &mut [u8]) -> usize {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let len = (64 - n.leading_zeros() as usize).div_ceil(4).max(width).max(1);
    for (i, o) in out[..len].iter_mut().rev().enumerate() {
        *o = DIGITS[(n.checked_shr(4 * i as u32).unwrap_or(0) & 0xf) as usize];
    }
    len
}

/// `<8 hex digits: boot and core>-<hex counter>`. Written by hand: `format!`
/// was among the read path's visible costs (perf, `loadtest/compare` reads).
fn generate() -> HeaderValue {
    let mut buf = [0u8; MADE_LEN];
    let len = generate_into(&mut buf);
    // Hex digits and a dash only, so the value is always a valid header.
    HeaderValue::from_bytes(&buf[..len]).unwrap_or_else(|_| HeaderValue::from_static("unknown"))
}

/// Longest id this core makes.
const MADE_LEN: usize = PREFIX + 16;

/// Writes a new id at the start of `buf`; returns its length.
fn generate_into(buf: &mut [u8; MADE_LEN]) -> usize {
    let (prefix, n) = NEXT.with(|c| {
        let (prefix, n) = c.get();
        c.set((prefix, n.wrapping_add(1)));
        (prefix, n)
    });
    buf[..PREFIX].copy_from_slice(&prefix);
    PREFIX + hex(n, 1, &mut buf[PREFIX..])
}

fn acceptable(value: &HeaderValue) -> bool {
    sane(value.as_bytes())
}

/// Whether a client's id may be echoed: visible ASCII, 1 to [`MAX_LEN`] bytes
/// (so it can never end or split a header line).
fn sane(bytes: &[u8]) -> bool {
    !bytes.is_empty() && bytes.len() <= MAX_LEN && bytes.iter().all(|b| b.is_ascii_graphic())
}

/// The request's id: the client's, when it sent a sane one, else a new one.
pub fn of(headers: &HeaderMap) -> HeaderValue {
    match headers.get(&HEADER) {
        Some(v) if acceptable(v) => v.clone(),
        _ => generate(),
    }
}

/// Appends the request's id to `out`, for a request whose `x-request-id`
/// (if any) is `sent`: the same choice as [`of`], without making a header value.
pub fn write_raw(sent: Option<&[u8]>, out: &mut Vec<u8>) {
    match sent {
        Some(id) if sane(id) => out.extend_from_slice(id),
        _ => {
            let mut buf = [0u8; MADE_LEN];
            let len = generate_into(&mut buf);
            out.extend_from_slice(&buf[..len]);
        }
    }
}

/// Runs `f` with `id` as the current request's id.
pub fn scope<F: Future>(id: HeaderValue, f: F) -> TaskLocalFuture<HeaderValue, F> {
    CURRENT.scope(id, f)
}

/// Runs `f` with `id` as the current request's id, outside any future.
pub fn sync_scope<R>(id: HeaderValue, f: impl FnOnce() -> R) -> R {
    CURRENT.sync_scope(id, f)
}

/// The current request's id ("" outside a request).
pub fn current() -> String {
    CURRENT.try_with(|v| v.to_str().unwrap_or_default().to_owned()).unwrap_or_default()
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
    fn hex_matches_the_formatter() {
        for (n, width) in [(0u64, 1), (0, 8), (0xabc, 8), (0x1234_5678, 8), (u64::MAX, 1), (255, 1)] {
            let mut buf = [0u8; 16];
            let len = hex(n, width, &mut buf);
            assert_eq!(std::str::from_utf8(&buf[..len]).unwrap(), format!("{n:0width$x}"));
        }
    }

    #[test]
    fn a_raw_id_is_the_clients_when_sane_else_a_new_one() {
        init_core(4);
        let mut out = Vec::new();
        write_raw(Some(b"client-9"), &mut out);
        assert_eq!(out, b"client-9");
        for sent in [None, Some(&b"has space"[..]), Some(&b""[..])] {
            out.clear();
            write_raw(sent, &mut out);
            let made = std::str::from_utf8(&out).unwrap();
            let (prefix, _) = made.split_once('-').unwrap();
            assert!(prefix.len() == 8 && prefix.ends_with("04"), "{made}");
        }
    }

    #[test]
    fn unreasonable_client_ids_are_not_echoed() {
        assert!(acceptable(&HeaderValue::from_static("abc-123")));
        assert!(!acceptable(&HeaderValue::from_static("")));
        assert!(!acceptable(&HeaderValue::from_static("has space")));
        assert!(!acceptable(&HeaderValue::try_from("x".repeat(MAX_LEN + 1)).unwrap()));
    }

    #[test]
    fn a_sane_client_id_is_kept() {
        let mut headers = HeaderMap::new();
        headers.insert(&HEADER, HeaderValue::from_static("client-7"));
        assert_eq!(of(&headers), "client-7");
        headers.insert(&HEADER, HeaderValue::from_static("has space"));
        assert_ne!(of(&headers), "has space");
    }
}

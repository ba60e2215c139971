//! HTTP/1.1 connections read by gavel itself while they only ask hot reads.
//!
//! A new HTTP/1.1 connection starts here, not in hyper: its requests are
//! parsed with `httparse` and, while each is a plain GET of a cached auction or
//! sku, answered from the core's cache with bytes written straight into one
//! buffer (`http::hot::App::answer_raw`): no header maps, no request or
//! response values, no service futures. A hot read the cache cannot answer (a
//! row not cached yet, a cache not live) is answered by the router here too,
//! its response written out whole, so a connection stays off hyper through
//! the misses after a restart. The first request that is anything else —
//! another route, a body, `Connection: close`, a malformed or oversized head —
//! and everything read after it go to hyper, which serves the connection from
//! then on exactly as it serves one that never came here. Pipelined reads are
//! answered in one write.
//!
//! What it keeps of hyper's: the header-read timeout (the head of each request
//! must arrive within `--header-read-timeout` of the previous answer, by the
//! core's deadline sweep, so an idle or trickling client is closed), graceful
//! shutdown (an idle connection closes at once; a request under way is
//! answered by hyper, with `Connection: close`), the same answer byte for
//! byte, and the same metrics.
//!
//! Why: a cached read through hyper cost about 11,500 instructions, of which
//! hyper's request and response machinery was most; gavel-bare, hyper with
//! nothing beside, 6,800 (callgrind, README "Where the time goes").

use std::time::Duration;

use axum::http::{HeaderValue, Response, header};
use bytes::{Buf, BytesMut};
use http_body_util::{BodyExt, Limited};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;

use super::deadlines::ConnTimer;
use super::socket::Prefixed;
use crate::http::body::AppBody;
use crate::http::hot::{App, Raw};
use crate::http::respond;

/// The most headers a request answered here may have; more go to hyper.
const MAX_HEADERS: usize = 32;
/// The longest head read here; a longer one goes to hyper, which applies its
/// own limit to it.
const MAX_HEAD: usize = 8 * 1024;
/// What the read buffer grows by.
const READ_CHUNK: usize = 4 * 1024;
/// The largest routed answer written out whole here (an auction or a sku is
/// well under 1 KiB; a larger one ends the connection).
const MAX_ROUTED_BODY: usize = 1024 * 1024;

/// How a connection left this reader.
pub enum Ended {
    /// It is closed (by the client, an error, a timeout or shutdown).
    Closed,
    /// For hyper, with what was read but not answered in front.
    Handoff(Prefixed),
}

/// Serves `stream` while its requests are hot reads; see the module's text.
pub async fn serve(
    app: &App,
    mut stream: TcpStream,
    timer: &ConnTimer,
    within: Duration,
    shutdown: &watch::Receiver<bool>,
) -> Ended {
    let mut read = BytesMut::with_capacity(READ_CHUNK);
    let mut out = Vec::with_capacity(READ_CHUNK);
    // The deadline of the head being awaited, armed when the wait starts.
    let mut due = None;
    // One wait for shutdown, kept across the waits for requests: made anew for
    // each, it joined and left the channel's list of waiters (two lock round
    // trips) per request.
    let mut signal = shutdown.clone();
    let mut stopping = std::pin::pin!(signal.wait_for(|stop| *stop));
    loop {
        // Shutting down: an idle connection closes; a request under way goes
        // to hyper, which answers it with `Connection: close`.
        if *shutdown.borrow() {
            return match read.is_empty() {
                true => Ended::Closed,
                false => Ended::Handoff(Prefixed::new(read.freeze(), stream)),
            };
        }
        let (hyper, again) = match answer_all(app, &mut read, &mut out) {
            Next::Read => (false, false),
            Next::Hyper => (true, false),
            Next::Route(request) => {
                let Some(response) = route(app, *request, &mut stream, &mut read).await else {
                    return Ended::Closed;
                };
                if !write_whole(response, &mut out).await {
                    return Ended::Closed;
                }
                (false, true)
            }
        };
        if !out.is_empty() {
            due = None;
            if stream.write_all(&out).await.is_err() {
                return Ended::Closed;
            }
            out.clear();
        }
        if hyper {
            return Ended::Handoff(Prefixed::new(read.freeze(), stream));
        }
        if again {
            continue;
        }
        read.reserve(READ_CHUNK);
        let idle = read.is_empty();
        let deadline = due.get_or_insert_with(|| timer.due_in(within));
        // Through tokio's `poll_read`, not `try_read_buf` and `readable`: a read
        // that leaves room in the buffer tells tokio the socket is drained, so
        // the next read waits for readiness without asking the kernel first.
        // With `try_read_buf` every request cost one more `recvfrom`, failing
        // with `EAGAIN`, than through hyper (`strace -c -f` on the server during
        // `gavel-loadtest run auction-read --rate 10000 --duration 3s`: 45,782
        // `recvfrom` calls, 15,627 of them `EAGAIN`, for 30,000 reads;
        // gavel-bare 30,064, none failing).
        let got = tokio::select! {
            biased;
            got = stream.read_buf(&mut read) => got,
            () = deadline => return Ended::Closed,
            // Shutting down, or no sender left (no one is served): an idle
            // connection closes.
            _ = &mut stopping, if idle => return Ended::Closed,
        };
        match got {
            Ok(0) | Err(_) => return Ended::Closed,
            Ok(_) => {}
        }
    }
}

/// The router's answer to `request`, or `None` if the client closed the
/// connection meanwhile: then the call is dropped, its database read with it,
/// and counted as hyper counts a request it drops for that (499). What the
/// client sends meanwhile is kept in `read` for after the answer, up to
/// [`MAX_HEAD`] more; past that the answer is awaited without watching.
async fn route(
    app: &App,
    request: axum::http::Request<axum::body::Body>,
    stream: &mut TcpStream,
    read: &mut BytesMut,
) -> Option<Response<AppBody>> {
    let mut call = std::pin::pin!(hyper::service::Service::call(app, request));
    let most = read.len() + MAX_HEAD;
    while read.len() < most {
        read.reserve(READ_CHUNK);
        tokio::select! {
            biased;
            Ok(response) = &mut call => return Some(response),
            got = stream.read_buf(read) => match got {
                Ok(0) | Err(_) => return None,
                Ok(_) => {}
            },
        }
    }
    let Ok(response) = call.await;
    Some(response)
}

/// What comes after the answers [`answer_all`] wrote.
enum Next {
    /// More bytes.
    Read,
    /// A hot read for the router, already taken off the buffer.
    Route(Box<axum::http::Request<axum::body::Body>>),
    /// hyper, from the request at the front of the buffer.
    Hyper,
}

/// Answers the complete requests at the front of `read` into `out`, consuming
/// them, up to the first it cannot answer itself.
fn answer_all(app: &App, read: &mut BytesMut, out: &mut Vec<u8>) -> Next {
    while !read.is_empty() {
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut request = httparse::Request::new(&mut headers);
        let len = match request.parse(read) {
            Ok(httparse::Status::Complete(len)) => len,
            Ok(httparse::Status::Partial) if read.len() < MAX_HEAD => return Next::Read,
            Ok(httparse::Status::Partial) | Err(_) => return Next::Hyper,
        };
        match app.answer_raw(&request, out) {
            Raw::Answered => read.advance(len),
            Raw::Routed(routed) => {
                read.advance(len);
                return Next::Route(routed);
            }
            Raw::Other => return Next::Hyper,
        }
    }
    Next::Read
}

/// Appends `response` to `out` as HTTP/1.1 with its whole body, as hyper
/// writes it: the status line, its headers in order, then `content-length`
/// and `date` unless it has them. False if its body failed or was too large.
async fn write_whole(response: Response<AppBody>, out: &mut Vec<u8>) -> bool {
    let (mut parts, body) = response.into_parts();
    let Ok(body) = Limited::new(body, MAX_ROUTED_BODY).collect().await else { return false };
    let body = body.to_bytes();
    let status = parts.status;
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    // Whole, so never chunked.
    parts.headers.remove(header::TRANSFER_ENCODING);
    let bodiless = status.is_informational() || status == 204 || status == 304;
    if !bodiless && !parts.headers.contains_key(header::CONTENT_LENGTH) {
        parts.headers.insert(header::CONTENT_LENGTH, HeaderValue::from(body.len()));
    }
    for (name, value) in &parts.headers {
        respond::line(out, name.as_str(), value.as_bytes());
    }
    if !parts.headers.contains_key(header::DATE) {
        respond::date_line(out, std::time::SystemTime::now());
    }
    out.extend_from_slice(b"\r\n");
    if !bodiless {
        out.extend_from_slice(&body);
    }
    true
}

//! The two reads gavel serves most, answered before routing.
//!
//! A plain `GET /api/auctions/{id}` or `GET /api/inventory/{sku}` whose row the
//! core's live cache holds is answered here with exactly what its route's handler
//! answers on a cache hit (the same function builds it), with the request id,
//! the route's metrics and nothing else. Anything else — a query string, a miss,
//! another method, a path that needs decoding — goes to the router untouched.
//! [`App::answer_raw`] answers the same reads as bytes, for an HTTP/1.1
//! connection gavel reads before hyper does (`runtime::fast`).
//!
//! Why: with the rendered views, what was left of a cached read's own cost was
//! mostly axum's routing and extraction (perf, `loadtest/compare` reads: router
//! call, matchit, the route's boxed clone, URL params, extensions). Side by side
//! with the bare hyper server, 6 s closed-loop runs, alternating twice
//! (`gavel-loadtest run auction-read --connections 64`): through the router
//! gavel answered 105.0K/105.0K requests/s against bare's 120.6K/121.3K (0.87×);
//! see the README's table for the same runs since.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Instant, SystemTime};

use axum::Router;
use axum::body::{Body, HttpBody};
use axum::extract::{ConnectInfo, Request};
use axum::http::Method;
use axum::response::Response;
use axum::routing::future::RouteFuture;
use bytes::Bytes;
use pin_project_lite::pin_project;
use tower::Service;

use super::activity::{Activity, OpenStream};
use super::body::{AppBody, Handoff};
use super::per_request::Outgoing;
use super::{auctions, inventory, request_id, respond};
use crate::cache::View;
use crate::core::Core;
use crate::domain::stock::valid_sku;
use crate::metrics::{InFlight, Route};

/// Route templates, as the router names them (and the metrics label them).
const AUCTION: &str = "/api/auctions/{id}";
const ITEM: &str = "/api/inventory/{sku}";

/// A hot read this module can answer, if the cache holds its row.
#[derive(Debug, PartialEq, Eq)]
enum Hot<'a> {
    Auction(i64),
    Item(&'a str),
}

/// Which hot read a request is, if it is one in its plainest form.
fn classify<B>(request: &Request<B>) -> Option<Hot<'_>> {
    if request.method() != Method::GET || request.uri().query().is_some() {
        return None;
    }
    classify_path(request.uri().path())
}

/// Which hot read a GET of `path` (no query) is.
fn classify_path(path: &str) -> Option<Hot<'_>> {
    if let Some(id) = path.strip_prefix("/api/auctions/") {
        // Digits only: a sign, a space or an encoded byte goes to the router.
        if !id.is_empty() && id.len() <= 18 && id.bytes().all(|b| b.is_ascii_digit()) {
            return id.parse().ok().filter(|id| *id > 0).map(Hot::Auction);
        }
        return None;
    }
    // A valid sku has nothing to decode (no '%').
    path.strip_prefix("/api/inventory/").filter(|sku| valid_sku(sku)).map(Hot::Item)
}

/// What [`App::answer_raw`] made of a request.
pub enum Raw {
    /// Its answer is written.
    Answered,
    /// A hot read the cache could not answer (a miss, a cache not live): for
    /// the router, which reads the database (through the app as hyper calls it).
    Routed(Box<Request<Body>>),
    /// Anything else: for hyper.
    Other,
}

/// A hot read for the router, as hyper would have made it of the same head.
fn routed(path: &str, headers: &[httparse::Header<'_>]) -> Raw {
    let mut request = Request::get(path);
    for h in headers {
        request = request.header(h.name, h.value);
    }
    request.body(Body::empty()).map_or(Raw::Other, |r| Raw::Routed(Box::new(r)))
}

/// Whether a header leaves a GET in the form [`App::answer_raw`] answers: no
/// body, no connection management (a `close`, an upgrade), no expectation.
fn plain_header(name: &[u8], value: &[u8]) -> bool {
    let is = |n: &str| name.eq_ignore_ascii_case(n.as_bytes());
    if is("content-length") {
        return value.trim_ascii() == b"0";
    }
    if is("connection") {
        return value.trim_ascii().eq_ignore_ascii_case(b"keep-alive");
    }
    !(is("transfer-encoding") || is("upgrade") || is("expect"))
}

/// The whole public API of one core: the hot reads, then the router.
#[derive(Clone)]
pub struct App {
    core: Arc<Core>,
    router: Router,
    /// The connection's peer, for the routes that need the client's address
    /// (as axum's `ConnectInfo`); set per connection.
    peer: Option<SocketAddr>,
    /// An HTTP/2 connection's open streams, counted for its idle timeout.
    activity: Option<Arc<Activity>>,
}

impl App {
    pub fn new(core: Arc<Core>, router: Router) -> Self {
        App { core, router, peer: None, activity: None }
    }

    /// This app, for a connection from `peer`.
    pub fn for_peer(&self, peer: SocketAddr) -> Self {
        App { peer: Some(peer), ..self.clone() }
    }

    /// This app, counting its streams in `activity` (an HTTP/2 connection's).
    pub fn counting(&self, activity: Arc<Activity>) -> Self {
        App { activity: Some(activity), ..self.clone() }
    }

    /// The cache's answer to `request`, if it is a hot read of a cached row.
    fn answer<B>(&self, request: &Request<B>) -> Option<Response<AppBody>> {
        // With CORS on, the layer adds headers to every answer (`Vary` among
        // them, Origin or not): the router's read answers from the cache too.
        if !self.core.web.cors_origins.is_empty() {
            return None;
        }
        let hot = classify(request)?;
        let started = Instant::now();
        let (route, view) = self.view(hot, SystemTime::now())?;
        let mut response = respond::cached(view, respond::if_none_match(request.headers()).as_ref());
        let in_flight = InFlight::start(Route::Template(route), "GET", started);
        Outgoing { id: request_id::of(request.headers()), in_flight }.finish(&mut response);
        Some(response)
    }

    /// Answers `request`, as parsed off an HTTP/1.1 connection, into `out` if it
    /// is a hot read of a cached row that nothing in its headers takes out of
    /// the plainest form. The answer is byte for byte what hyper writes for
    /// [`App::answer`]'s response, and it counts in the same metrics. A hot
    /// read the cache cannot answer comes back as a request for the router; a
    /// request of any other kind goes to hyper unread, with everything after
    /// it: see `runtime::fast`.
    pub fn answer_raw(&self, request: &httparse::Request<'_, '_>, out: &mut Vec<u8>) -> Raw {
        if request.method != Some("GET") || request.version != Some(1) || !self.core.web.cors_origins.is_empty() {
            return Raw::Other;
        }
        let Some((path, hot)) = request.path.and_then(|p| Some((p, classify_path(p)?))) else { return Raw::Other };
        let (mut tags, mut id) = (None, None);
        // `If-None-Match` in several lines, one list (RFC 9110 §5.3): rare, so
        // looked through again only then.
        let mut tag_lines = 0;
        for h in request.headers.iter() {
            let name = h.name.as_bytes();
            if name.eq_ignore_ascii_case(b"if-none-match") {
                tags.get_or_insert(h.value);
                tag_lines += 1;
            } else if name.eq_ignore_ascii_case(request_id::HEADER.as_str().as_bytes()) {
                id.get_or_insert(h.value);
            } else if !plain_header(name, h.value) {
                return Raw::Other;
            }
        }
        let started = Instant::now();
        let now = SystemTime::now();
        let Some((route, view)) = self.view(hot, now) else { return routed(path, request.headers) };
        let in_flight = InFlight::start(Route::Template(route), "GET", started);
        let not_modified = match tag_lines {
            0 | 1 => tags.is_some_and(|t| respond::names_raw(t, &view.etag)),
            _ => request
                .headers
                .iter()
                .any(|h| h.name.eq_ignore_ascii_case("if-none-match") && respond::names_raw(h.value, &view.etag)),
        };
        respond::write_cached(out, &view, not_modified, now, |out| request_id::write_raw(id, out));
        in_flight.answered(if not_modified { 304 } else { 200 });
        Raw::Answered
    }

    /// The cached view `hot` reads, and its route's label, if the cache holds it.
    fn view(&self, hot: Hot<'_>, now: SystemTime) -> Option<(&'static str, View)> {
        match hot {
            Hot::Auction(id) => Some((AUCTION, auctions::cached_view(&self.core, id, now)?)),
            Hot::Item(sku) => Some((ITEM, inventory::cached_view(&self.core, sku, now)?)),
        }
    }
}

impl<B> Service<Request<B>> for App
where
    B: HttpBody<Data = Bytes> + Send + 'static,
    B::Error: Into<axum::BoxError>,
{
    type Response = Response<AppBody>;
    type Error = Infallible;
    type Future = Answer;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<B>) -> Answer {
        self.serve(request)
    }
}

/// How each core's connections call gavel: hyper's service trait takes `&self`,
/// so a request costs no clone of the app (tower's `&mut self` does, through
/// hyper-util's adapter: two reference counts up and down and a oneshot per
/// request); only a request the router takes clones the router, as axum's own
/// `serve` does.
impl<B> hyper::service::Service<Request<B>> for App
where
    B: HttpBody<Data = Bytes> + Send + 'static,
    B::Error: Into<axum::BoxError>,
{
    type Response = Response<AppBody>;
    type Error = Infallible;
    type Future = Answer;

    fn call(&self, request: Request<B>) -> Answer {
        self.serve(request)
    }
}

impl App {
    fn serve<B>(&self, request: Request<B>) -> Answer
    where
        B: HttpBody<Data = Bytes> + Send + 'static,
        B::Error: Into<axum::BoxError>,
    {
        let open = self.activity.as_ref().map(|a| a.open());
        let way = match self.answer(&request) {
            Some(response) => Way::Hot { response: Some(response) },
            None => {
                let mut request = request.map(Body::new);
                // Only here, off the hot path: an extension is an allocation.
                if let Some(peer) = self.peer {
                    request.extensions_mut().insert(ConnectInfo(peer));
                }
                Way::Routed { inner: self.router.clone().call(request) }
            }
        };
        Answer { way, open }
    }
}

pin_project! {
    /// The answer to one request: a hot read's, or the router's.
    pub struct Answer {
        #[pin]
        way: Way,
        // On an HTTP/2 connection: the stream, open until its body ends.
        open: Option<OpenStream>,
    }
}

pin_project! {
    #[project = WayProj]
    enum Way {
        Hot { response: Option<Response<AppBody>> },
        Routed { #[pin] inner: RouteFuture<Infallible> },
    }
}

impl Future for Answer {
    type Output = Result<Response<AppBody>, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let response = match this.way.project() {
            WayProj::Hot { response } => response.take().unwrap_or_default(),
            WayProj::Routed { inner } => {
                let mut response = std::task::ready!(inner.poll(cx))?;
                let handoff = response.extensions_mut().remove::<Handoff>();
                response.map(|body| AppBody::routed(body, handoff))
            }
        };
        // The stream stays open as long as its body: the guard goes with it.
        let open = this.open.take();
        Poll::Ready(Ok(response.map(|body| body.counted(open))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn get(uri: &str) -> Request<()> {
        Request::get(uri).body(()).unwrap()
    }

    #[test]
    fn only_plain_hot_reads_skip_the_router() {
        assert_eq!(classify(&get("/api/auctions/42")), Some(Hot::Auction(42)));
        assert_eq!(classify(&get("/api/inventory/A-1.b_2")), Some(Hot::Item("A-1.b_2")));
        for uri in [
            "/api/auctions/42?consistent=true",
            "/api/auctions/0",
            "/api/auctions/-1",
            "/api/auctions/+1",
            "/api/auctions/99999999999999999999",
            "/api/auctions/4x",
            "/api/auctions/",
            "/api/auctions/42/bids",
            "/api/auctions",
            "/api/inventory/a%20b",
            "/api/inventory/",
            "/api/inventory/a/b",
            "/api/orders/1",
        ] {
            assert_eq!(classify(&get(uri)), None, "{uri}");
        }
        let head = Request::head("/api/auctions/42").body(()).unwrap();
        assert_eq!(classify(&head), None, "HEAD goes to the router");
    }

    #[test]
    fn only_plain_heads_stay_off_hyper() {
        for (name, value) in [("content-length", "0"), ("Connection", "Keep-Alive"), ("accept", "*/*"), ("origin", "x")]
        {
            assert!(plain_header(name.as_bytes(), value.as_bytes()), "{name}: {value}");
        }
        for (name, value) in [
            ("content-length", "2"),
            ("connection", "close"),
            ("connection", "upgrade"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "h2c"),
            ("expect", "100-continue"),
        ] {
            assert!(!plain_header(name.as_bytes(), value.as_bytes()), "{name}: {value}");
        }
    }

    /// The labels the hot reads record are the router's own route templates, so a
    /// cached read and a routed one count under one label.
    #[test]
    fn hot_read_labels_are_router_paths() {
        let document = crate::http::document();
        for template in [AUCTION, ITEM] {
            assert!(document.paths.paths.contains_key(template), "{template} is not a route");
        }
    }
}

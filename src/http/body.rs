//! The body of every response a core sends, held inline by hyper.
//!
//! axum's `Body` is a boxed trait object, and each layer that changes a body
//! boxes it once more. An event stream's body went out as three boxes around
//! the stream (the route's, the compression layer's and the HTTP/2 stream
//! count's), and hyper polls a stream's body once per event: with 10,000
//! streams every box was a cache miss, and polling those bodies took 15 % of
//! gavel's CPU in the `watch` scenario (`perf record`, 2026-12-01). A hot
//! read's body was a box too, allocated and freed per read.
//!
//! So the hot reads' bytes and the event streams are held as they are, and
//! only what the router answers otherwise stays boxed. An event stream's
//! handler hands its stream over in the response's extensions ([`Handoff`]),
//! past the layers, to [`super::hot`].

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use axum::body::Body;
use axum::response::Response;
use bytes::Bytes;
use http_body::{Frame, SizeHint};

use super::activity::OpenStream;
use crate::events::EventStream;

/// A response body: a whole one in memory, an event stream, or the router's.
pub struct AppBody {
    kind: Kind,
    /// On an HTTP/2 connection: the stream, counted open until its body ends.
    _open: Option<OpenStream>,
}

enum Kind {
    /// Sent in one frame; `None` once sent, or for no body at all.
    Whole(Option<Bytes>),
    Events(EventStream),
    Routed(Body),
}

impl AppBody {
    /// The router's answer, or the event stream its handler handed over.
    pub fn routed(body: Body, handoff: Option<Handoff>) -> Self {
        let kind = match handoff.and_then(|h| h.take()) {
            Some(stream) => Kind::Events(stream),
            None => Kind::Routed(body),
        };
        AppBody { kind, _open: None }
    }

    /// This body, keeping `open` until it ends.
    pub fn counted(self, open: Option<OpenStream>) -> Self {
        AppBody { _open: open, ..self }
    }
}

impl From<Bytes> for AppBody {
    fn from(bytes: Bytes) -> Self {
        AppBody { kind: Kind::Whole(Some(bytes).filter(|b| !b.is_empty())), _open: None }
    }
}

impl Default for AppBody {
    fn default() -> Self {
        AppBody { kind: Kind::Whole(None), _open: None }
    }
}

impl http_body::Body for AppBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        match &mut self.kind {
            Kind::Whole(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            Kind::Events(stream) => Pin::new(stream).poll_frame(cx).map_err(|never| match never {}),
            Kind::Routed(body) => Pin::new(body).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Whole(bytes) => bytes.is_none(),
            Kind::Events(stream) => stream.is_end_stream(),
            Kind::Routed(body) => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Whole(bytes) => SizeHint::with_exact(bytes.as_ref().map_or(0, |b| b.len() as u64)),
            Kind::Events(stream) => stream.size_hint(),
            Kind::Routed(body) => body.size_hint(),
        }
    }
}

/// An event stream on its way from its handler to [`AppBody`], in the
/// response's extensions (which hold only what can be cloned, hence the slot).
/// Dropped untaken, it drops the stream, which leaves the hub.
#[derive(Clone)]
pub struct Handoff(Arc<Mutex<Option<EventStream>>>);

impl Handoff {
    /// A 200 response whose body is `stream`, handed over.
    pub fn response(stream: EventStream) -> Response {
        let mut response = Response::new(Body::new(Placeholder));
        response.extensions_mut().insert(Handoff(Arc::new(Mutex::new(Some(stream)))));
        response
    }

    fn take(self) -> Option<EventStream> {
        self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take()
    }
}

/// What the router's layers see of a handed-over stream: a body of unknown
/// length, as the stream's own (an empty body's exact length would have them
/// set `Content-Length: 0`).
struct Placeholder;

impl http_body::Body for Placeholder {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        Poll::Ready(None)
    }
}

#[cfg(test)]
mod tests {
    use http_body::Body as _;
    use http_body_util::BodyExt;

    use super::*;
    use crate::events::{Hub, StreamLimits};

    /// A hub with one personal stream open, and that stream's response.
    fn handed_over() -> (Arc<Hub>, Response) {
        let hub = Arc::new(Hub::new(StreamLimits::default(), |_, _| Vec::new(), crate::metrics::StreamMetrics::new(0)));
        let session = crate::auth::Session { id: uuid::Uuid::new_v4(), epoch: 0, expires: u64::MAX };
        let response = Handoff::response(hub.subscribe_account(hub.reserve().unwrap(), 1, session));
        (hub, response)
    }

    #[tokio::test]
    async fn a_whole_body_is_one_frame_of_its_exact_size() {
        let body = AppBody::from(Bytes::from_static(b"{\"id\":1}"));
        assert_eq!(body.size_hint().exact(), Some(8));
        assert!(!body.is_end_stream());
        assert_eq!(body.collect().await.unwrap().to_bytes(), "{\"id\":1}");
        let empty = AppBody::from(Bytes::new());
        assert!(empty.is_end_stream(), "an empty body ends at once");
        assert_eq!(empty.size_hint().exact(), Some(0));
        assert!(AppBody::default().is_end_stream());
    }

    /// The stream reaches the body past the layers, and they never see a length.
    #[test]
    fn a_handed_over_stream_is_the_body_and_its_placeholder_has_no_length() {
        let (hub, mut response) = handed_over();
        assert_eq!(response.body().size_hint().exact(), None);
        let handoff = response.extensions_mut().remove::<Handoff>();
        let (_, placeholder) = response.into_parts();
        let body = AppBody::routed(placeholder, handoff);
        assert!(matches!(body.kind, Kind::Events(_)), "the stream itself is the body");
        assert_eq!(hub.open_streams(), 1);
        drop(body);
        assert_eq!(hub.open_streams(), 0, "dropping the body leaves the hub");
    }

    /// A response that never reaches the connection's service (an error on
    /// the way, the client gone) still lets its stream go.
    #[test]
    fn a_stream_never_taken_leaves_the_hub_with_its_response() {
        let (hub, response) = handed_over();
        let copy = response.extensions().get::<Handoff>().cloned();
        assert_eq!(hub.open_streams(), 1);
        drop(response);
        assert_eq!(hub.open_streams(), 1, "a copy of the handoff still holds it");
        drop(copy);
        assert_eq!(hub.open_streams(), 0, "the last handoff dropped, the stream is gone");
    }

    #[tokio::test]
    async fn without_a_handoff_the_routers_body_goes_out() {
        let body = AppBody::routed(Body::from("routed"), None);
        assert_eq!(body.collect().await.unwrap().to_bytes(), "routed");
    }
}

//! What every request gets, as one tower layer around the router's routes: its
//! id (set for its duration, echoed on its response), its time bound, and its
//! metrics, which stay right when the client goes away mid-request.
//!
//! Hand-written rather than `axum::middleware::from_fn`, and the time bound is
//! armed only when the route actually waits: a cached read answers on its first
//! poll and never touches the timer. Both were visible costs of the read path
//! (perf during `loadtest/compare` reads: `from_fn`'s boxed future and
//! `Sleep::new_timeout` on every request).

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use axum::extract::{MatchedPath, Request};
use axum::http::HeaderValue;
use axum::response::{IntoResponse, Response};
use pin_project_lite::pin_project;
use tokio::task::futures::TaskLocalFuture;
use tokio::time::Sleep;
use tower::{Layer, Service};

use super::error::Error;
use super::request_id;
use crate::metrics::{self, InFlight, Route};

/// Wraps each route in [`PerRequest`].
#[derive(Debug, Clone, Copy)]
pub struct PerRequestLayer {
    /// Longest a request may take, body read included; past it the client gets
    /// the timeout problem (503).
    pub timeout: Duration,
}

impl<S> Layer<S> for PerRequestLayer {
    type Service = PerRequest<S>;

    fn layer(&self, inner: S) -> PerRequest<S> {
        PerRequest { inner, timeout: self.timeout }
    }
}

/// A route with its id, time bound and metrics.
#[derive(Debug, Clone)]
pub struct PerRequest<S> {
    inner: S,
    timeout: Duration,
}

impl<S> Service<Request> for PerRequest<S>
where
    S: Service<Request, Response = Response, Error = Infallible>,
{
    type Response = Response;
    type Error = Infallible;
    type Future = Answer<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request) -> Self::Future {
        let started = Instant::now();
        // The matched route template (fixed by the router), never the raw path.
        let route = request.extensions().get::<MatchedPath>().cloned().map_or(Route::Unmatched, Route::Matched);
        let in_flight = InFlight::start(route, metrics::method_label(request.method()), started);
        let id = request_id::of(request.headers());
        Answer {
            inner: request_id::scope(id.clone(), self.inner.call(request)),
            deadline: None,
            limit: self.timeout,
            started,
            outgoing: Some(Outgoing { id, in_flight }),
        }
    }
}

pin_project! {
    /// The answer to one request.
    pub struct Answer<F> {
        #[pin]
        inner: TaskLocalFuture<HeaderValue, F>,
        // Boxed, and made only once the route has had to wait.
        deadline: Option<Pin<Box<Sleep>>>,
        limit: Duration,
        started: Instant,
        // Dropped unanswered when hyper drops this future.
        outgoing: Option<Outgoing>,
    }
}

/// What every answer gets on its way out, routed or not (see `super::hot`).
pub(super) struct Outgoing {
    /// The request's id, echoed.
    pub id: HeaderValue,
    /// Counted in flight until [`Outgoing::finish`], or until dropped unanswered.
    pub in_flight: InFlight,
}

impl Outgoing {
    /// Echoes the request id and records the request's metrics.
    pub fn finish<B>(self, response: &mut axum::http::Response<B>) {
        response.headers_mut().insert(request_id::HEADER, self.id);
        self.in_flight.answered(response.status().as_u16());
    }
}

impl<F> Future for Answer<F>
where
    F: Future<Output = Result<Response, Infallible>>,
{
    type Output = Result<Response, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let mut response = match this.inner.poll(cx) {
            Poll::Ready(Ok(response)) => response,
            Poll::Ready(Err(never)) => match never {},
            Poll::Pending => {
                let (started, limit) = (*this.started, *this.limit);
                let deadline =
                    this.deadline.get_or_insert_with(|| Box::pin(tokio::time::sleep_until((started + limit).into())));
                ready!(deadline.as_mut().poll(cx));
                // The route's future is dropped with this one.
                let id = this.outgoing.as_ref().map_or_else(|| HeaderValue::from_static("unknown"), |o| o.id.clone());
                request_id::sync_scope(id, || Error::Timeout.into_response())
            }
        };
        if let Some(outgoing) = this.outgoing.take() {
            outgoing.finish(&mut response);
        }
        Poll::Ready(Ok(response))
    }
}

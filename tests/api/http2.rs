//! HTTP/2 with prior knowledge on the same port as HTTP/1.1: reads, bids and
//! event streams multiplexed over one connection, and its limits.

use std::time::Duration;

use futures::StreamExt;
use reqwest::{StatusCode, Version};
use serde_json::{Value, json};

use crate::helpers::*;

// The tests whose client holds an HTTP/2 connection at the end run on two threads:
// a graceful shutdown of HTTP/2 waits for the client to answer a ping, and the
// server stops while the test's own thread is blocked dropping it.

/// A client that speaks HTTP/2 from its first byte, over one connection.
fn h2_client() -> reqwest::Client {
    reqwest::Client::builder().http2_prior_knowledge().build().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_http2_connection_carries_reads_bids_and_event_streams() {
    let app = spawn_app().await;
    let id = app.open_auction(100, 10, 60.0, 0).await["id"].as_i64().unwrap();
    let client = h2_client();
    let read = client.get(app.url(&format!("/api/auctions/{id}"))).send().await.unwrap();
    assert_eq!(read.version(), Version::HTTP_2);
    assert_eq!(read.status(), StatusCode::OK);
    assert!(read.headers().contains_key("x-request-id"));
    let events = client.get(app.url(&format!("/api/auctions/{id}/events"))).send().await.unwrap();
    assert_eq!((events.version(), events.status()), (Version::HTTP_2, StatusCode::OK));
    assert_eq!(events.headers()["content-type"], "text/event-stream");
    let mut events = events.bytes_stream();
    let first = tokio::time::timeout(Duration::from_secs(5), events.next()).await.unwrap().unwrap().unwrap();
    assert!(first.starts_with(b"event: auction\n"), "{first:?}");
    // A bid on the same connection, while the stream stays open on it.
    let bid = client
        .post(app.url("/api/bids"))
        .bearer_auth(app.bidder(2))
        .json(&json!({"auction_id": id, "amount": 150}))
        .send()
        .await
        .unwrap();
    assert_eq!(bid.status(), StatusCode::CREATED);
    let next = tokio::time::timeout(Duration::from_secs(5), events.next()).await.unwrap().unwrap().unwrap();
    let text = String::from_utf8_lossy(&next);
    assert!(text.contains("\"high_bid\":150"), "{text}");
    // A bad request is the same problem over HTTP/2.
    let missing = client.get(app.url("/api/auctions/999999")).send().await.unwrap();
    assert_problem(missing, StatusCode::NOT_FOUND, "/problems/not-found").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_connection_is_held_to_its_concurrent_stream_limit() {
    let app = spawn_app_with(&["--http2-max-streams", "2"]).await;
    let id = app.open_auction(100, 10, 60.0, 0).await["id"].as_i64().unwrap();
    let client = h2_client();
    let path = app.url(&format!("/api/auctions/{id}/events"));
    let first = client.get(&path).send().await.unwrap();
    let second = client.get(&path).send().await.unwrap();
    assert_eq!((first.status(), second.status()), (StatusCode::OK, StatusCode::OK));
    // Both streams stay open: a third request waits for one of them to end.
    let third = client.get(app.url(&format!("/api/auctions/{id}"))).send();
    tokio::pin!(third);
    assert!(tokio::time::timeout(Duration::from_millis(500), &mut third).await.is_err(), "a third stream ran");
    drop(first);
    let third = tokio::time::timeout(Duration::from_secs(5), third).await.expect("runs once a stream ends").unwrap();
    assert_eq!(third.status(), StatusCode::OK);
    drop(second);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_header_list_over_the_limit_is_refused() {
    let app = spawn_app_with(&["--http2-max-header-list", "4096"]).await;
    let client = h2_client();
    let small = client.get(app.url("/health")).header("x-pad", "a".repeat(1000)).send().await.unwrap();
    assert_eq!(small.status(), StatusCode::OK);
    match client.get(app.url("/health")).header("x-pad", "a".repeat(8000)).send().await {
        Ok(response) => assert_eq!(response.status(), StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE),
        Err(e) => assert!(e.is_request(), "refused as a request: {e}"),
    }
}

#[tokio::test]
async fn with_http2_off_the_port_speaks_http1_alone() {
    let app = spawn_app_with(&["--http2", "false"]).await;
    assert!(h2_client().get(app.url("/health")).send().await.is_err(), "the HTTP/2 preface is not understood");
    let plain = app.get("/health").await;
    assert_eq!((plain.version(), plain.status()), (Version::HTTP_11, StatusCode::OK));
    let body: Value = plain.json().await.unwrap();
    assert!(body.is_object());
}

/// Telling HTTP/2 from HTTP/1.1 waits for a connection's first bytes no longer
/// than the header-read timeout: a client that sends part of the preface and
/// then nothing is closed like a silent HTTP/1.1 client.
#[tokio::test]
async fn a_half_sent_preface_is_closed_after_the_header_read_timeout() {
    use std::io::{Read, Write};
    let app = spawn_app_with(&["--header-read-timeout", "300ms"]).await;
    let addr = app.addr;
    tokio::task::spawn_blocking(move || {
        let mut stream = std::net::TcpStream::connect(addr).unwrap();
        stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        stream.write_all(b"PRI * HTTP/2.0\r\n").unwrap();
        let started = std::time::Instant::now();
        let mut buf = [0u8; 64];
        assert_eq!(stream.read(&mut buf).unwrap_or(0), 0, "closed without an answer");
        assert!(started.elapsed() < Duration::from_secs(4), "closed by the server, not by our timeout");
    })
    .await
    .unwrap();
}

/// An HTTP/2 connection with no stream open for the header-read timeout is
/// closed, as an idle HTTP/1.1 connection is; one carrying an event stream is
/// not, however long the stream lasts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_http2_connection_is_closed_but_not_one_with_a_stream() {
    use http_body_util::{BodyExt, Empty};
    use hyper_util::rt::{TokioExecutor, TokioIo};

    let app = spawn_app_with(&["--header-read-timeout", "300ms"]).await;
    let id = app.open_auction(100, 10, 60.0, 0).await["id"].as_i64().unwrap();
    let connect = || async {
        let tcp = tokio::net::TcpStream::connect(app.addr).await.unwrap();
        let (sender, connection) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp)).await.unwrap();
        (sender, tokio::spawn(connection))
    };
    let get = |path: String| {
        hyper::Request::get(format!("http://{}{path}", app.addr)).body(Empty::<bytes::Bytes>::new()).unwrap()
    };

    let (mut sender, connection) = connect().await;
    let read = sender.send_request(get(format!("/api/auctions/{id}"))).await.unwrap();
    assert_eq!(read.status(), StatusCode::OK);
    read.into_body().collect().await.unwrap();
    let started = std::time::Instant::now();
    tokio::time::timeout(Duration::from_secs(5), connection).await.expect("closed when idle").unwrap().unwrap();
    assert!(started.elapsed() >= Duration::from_millis(250), "not before the timeout: {:?}", started.elapsed());

    let (mut sender, connection) = connect().await;
    let events = sender.send_request(get(format!("/api/auctions/{id}/events"))).await.unwrap();
    assert_eq!(events.status(), StatusCode::OK);
    let mut body = events.into_body();
    let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
    assert!(first.starts_with(b"event: auction\n"), "{first:?}");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(!connection.is_finished(), "a connection with a stream open stays");
    drop(body);
    tokio::time::timeout(Duration::from_secs(5), connection).await.expect("closed once idle").unwrap().unwrap();
}

//! Event streams (`text/event-stream`): what a watcher receives, in what order,
//! and what slow watchers, the stream cap and shutdown do.

use std::io::Write as _;
use std::net::TcpStream;
use std::pin::Pin;
use std::time::Duration;

use eventsource_stream::{Event, Eventsource};
use futures::{Stream, StreamExt};
use reqwest::StatusCode;
use serde_json::Value;

use crate::helpers::*;

type Events = Pin<Box<dyn Stream<Item = Result<Event, eventsource_stream::EventStreamError<reqwest::Error>>> + Send>>;

/// Opens an event stream on its own connection, asserting it was accepted.
async fn watch(app: &TestApp, path: &str, last_event_id: Option<i64>) -> Events {
    let mut request = fresh_connection_client().get(app.url(path));
    if let Some(id) = last_event_id {
        request = request.header("last-event-id", id.to_string());
    }
    let response = request.send().await.expect("stream request");
    assert_eq!(response.status(), StatusCode::OK, "{path}");
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    assert_eq!(response.headers()["cache-control"], "no-cache");
    Box::pin(response.bytes_stream().eventsource())
}

/// The next event, failing after `within`.
async fn next(events: &mut Events, within: Duration) -> Event {
    match tokio::time::timeout(within, events.next()).await {
        Ok(Some(Ok(event))) => event,
        Ok(other) => panic!("the stream ended or failed: {other:?}"),
        Err(_) => panic!("no event within {within:?}"),
    }
}

/// Whether an event arrives within `within`.
async fn quiet(events: &mut Events, within: Duration) -> bool {
    tokio::time::timeout(within, events.next()).await.is_err()
}

fn data(event: &Event) -> Value {
    serde_json::from_str(&event.data).expect("event data is JSON")
}

const SOON: Duration = Duration::from_secs(5);

#[tokio::test]
async fn a_stream_starts_with_the_read_state_and_follows_every_bid_in_version_order() {
    let app = spawn_app().await;
    let id = app.open_auction(100, 10, 60.0, 0).await["id"].as_i64().unwrap();
    let mut events = watch(&app, &format!("/api/auctions/{id}/events"), None).await;
    let first = next(&mut events, SOON).await;
    assert_eq!(first.event, "auction");
    assert_eq!(data(&first), app.auction(id, false).await, "the first event is what a read answers");
    assert_eq!(first.id, data(&first)["version"].to_string());
    let mut last_version = data(&first)["version"].as_i64().unwrap();
    for (i, amount) in [100, 120, 150, 170, 200].into_iter().enumerate() {
        let bidder = app.bidder(2 + (i as i64 % 2));
        assert_eq!(app.place_bid(&bidder, id, amount).await.status(), StatusCode::CREATED);
        let event = next(&mut events, SOON).await;
        let state = data(&event);
        assert_eq!(event.event, "auction");
        assert_eq!(state["high_bid"], amount, "each accepted bid's state, in order");
        let version = state["version"].as_i64().unwrap();
        assert!(version > last_version, "versions only rise");
        assert_eq!(event.id, version.to_string());
        last_version = version;
    }
}

#[tokio::test]
async fn last_event_id_resumes_without_repeating_the_current_state() {
    let app = spawn_app().await;
    let id = app.open_auction(100, 10, 60.0, 0).await["id"].as_i64().unwrap();
    assert_eq!(app.place_bid(&app.bidder(2), id, 100).await.status(), StatusCode::CREATED);
    let current = app.auction(id, true).await["version"].as_i64().unwrap();
    let path = format!("/api/auctions/{id}/events");

    let mut resumed = watch(&app, &path, Some(current)).await;
    assert!(quiet(&mut resumed, Duration::from_millis(400)).await, "nothing new since the version it names");
    let mut behind = watch(&app, &path, Some(current - 1)).await;
    assert_eq!(next(&mut behind, SOON).await.id, current.to_string(), "an older version gets the current state");

    assert_eq!(app.place_bid(&app.bidder(3), id, 110).await.status(), StatusCode::CREATED);
    let event = next(&mut resumed, SOON).await;
    assert_eq!(data(&event)["high_bid"], 110);
    assert_eq!(event.id, (current + 1).to_string());
}

#[tokio::test]
async fn a_closing_auction_sends_its_final_state_and_winner_then_ends_the_stream() {
    let app = spawn_app().await;
    let id = app.open_auction(100, 10, 1.5, 0).await["id"].as_i64().unwrap();
    let mut events = watch(&app, &format!("/api/auctions/{id}/events"), None).await;
    assert_eq!(next(&mut events, SOON).await.event, "auction");
    assert_eq!(app.place_bid(&app.bidder(4), id, 150).await.status(), StatusCode::CREATED);
    assert_eq!(data(&next(&mut events, SOON).await)["high_bid"], 150);
    let closed = next(&mut events, SOON).await;
    assert_eq!(closed.event, "closed", "{closed:?}");
    let state = data(&closed);
    assert_eq!(state["status"], "closed");
    assert_eq!(state["winner_id"], 4);
    assert_eq!(state["high_bid"], 150);
    match tokio::time::timeout(SOON, events.next()).await {
        Ok(None) => {}
        other => panic!("the stream should end after the closed event: {other:?}"),
    }
    // Watching a closed auction gets its final state and ends at once.
    // On whichever core it lands, even one whose listener has not heard the close.
    let mut late = watch(&app, &format!("/api/auctions/{id}/events"), None).await;
    let first = next(&mut late, SOON).await;
    assert_eq!(first.event, "closed", "{first:?}");
    assert!(matches!(tokio::time::timeout(SOON, late.next()).await, Ok(None)));
}

#[tokio::test]
async fn one_stream_carries_several_auctions_and_bad_lists_are_refused() {
    let app = spawn_app().await;
    let a = app.open_auction(100, 10, 60.0, 0).await["id"].as_i64().unwrap();
    let b = app.open_auction(100, 10, 60.0, 0).await["id"].as_i64().unwrap();
    let mut events = watch(&app, &format!("/api/events?auctions={a},{b}"), None).await;
    let mut first: Vec<i64> = Vec::new();
    for _ in 0..2 {
        first.push(data(&next(&mut events, SOON).await)["id"].as_i64().unwrap());
    }
    first.sort();
    assert_eq!(first, [a, b], "each auction's current state first");
    assert_eq!(app.place_bid(&app.bidder(2), b, 130).await.status(), StatusCode::CREATED);
    let event = data(&next(&mut events, SOON).await);
    assert_eq!((event["id"].as_i64(), event["high_bid"].as_i64()), (Some(b), Some(130)));

    for bad in ["/api/events", "/api/events?auctions=", "/api/events?auctions=1,x", "/api/events?auctions=0"] {
        assert_problem(app.get(bad).await, StatusCode::UNPROCESSABLE_ENTITY, "/problems/invalid-query").await;
    }
    let too_many = (1..=101).map(|i| i.to_string()).collect::<Vec<_>>().join(",");
    let response = app.get(&format!("/api/events?auctions={too_many}")).await;
    assert_problem(response, StatusCode::UNPROCESSABLE_ENTITY, "/problems/invalid-query").await;
    assert_problem(
        app.get(&format!("/api/events?auctions={a},999999")).await,
        StatusCode::NOT_FOUND,
        "/problems/not-found",
    )
    .await;
    assert_problem(app.get("/api/auctions/999999/events").await, StatusCode::NOT_FOUND, "/problems/not-found").await;
}

/// A watcher that never reads holds only the newest state (its events coalesce),
/// and a live watcher of the same auction gets every change as it happens.
#[tokio::test]
async fn a_stalled_watcher_does_not_slow_a_live_one() {
    // Small kernel buffers on both ends and no reads: the server's writes to the
    // stalled watcher soon block.
    let app = spawn_app_with(&["--send-buffer", "4096"]).await;
    let id = app.open_auction(100, 1, 120.0, 0).await["id"].as_i64().unwrap();
    let stalled = {
        let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        socket.set_recv_buffer_size(1024).unwrap();
        socket.connect(&app.addr.into()).unwrap();
        let mut stream: TcpStream = socket.into();
        write!(stream, "GET /api/auctions/{id}/events HTTP/1.1\r\nhost: gavel\r\n\r\n").unwrap();
        stream
    };
    let mut live = watch(&app, &format!("/api/auctions/{id}/events"), None).await;
    next(&mut live, SOON).await;
    let bidders = [app.bidder(2), app.bidder(3)];
    for i in 0..400 {
        let amount = 100 + i;
        let placed = app.place_bid(&bidders[i as usize % 2], id, amount).await;
        assert_eq!(placed.status(), StatusCode::CREATED);
        let event = next(&mut live, Duration::from_secs(2)).await;
        assert_eq!(data(&event)["high_bid"], amount, "the live watcher is never held back");
    }
    let coalesced = app.per_core("gavel_events_coalesced_total", &[]).await;
    assert!(coalesced.iter().sum::<f64>() > 0.0, "the stalled watcher's events coalesced: {coalesced:?}");
    drop(stalled);
}

#[tokio::test]
async fn streams_beyond_the_cap_get_503_with_retry_after() {
    let app = spawn_app_with(&["--max-streams-per-core", "1"]).await;
    let id = app.open_auction(100, 10, 60.0, 0).await["id"].as_i64().unwrap();
    let path = app.url(&format!("/api/auctions/{id}/events"));
    let mut open = Vec::new();
    let mut refused = 0;
    for _ in 0..3 {
        let response = fresh_connection_client().get(&path).send().await.unwrap();
        match response.status() {
            StatusCode::OK => open.push(response),
            StatusCode::SERVICE_UNAVAILABLE => {
                assert!(response.headers().contains_key("retry-after"));
                refused += 1;
            }
            other => panic!("unexpected {other}"),
        }
    }
    assert!(open.len() <= 2, "one stream per core at most");
    assert!(refused >= 1);
    // A closed stream frees its slot.
    drop(open);
    eventually(SOON, "a slot is free again", || async {
        let response = fresh_connection_client().get(&path).send().await.unwrap();
        (response.status() == StatusCode::OK).then_some(())
    })
    .await;
}

#[tokio::test]
async fn shutdown_ends_open_streams_with_a_retry_hint() {
    let app = spawn_app().await;
    let id = app.open_auction(100, 10, 60.0, 0).await["id"].as_i64().unwrap();
    let response = fresh_connection_client().get(app.url(&format!("/api/auctions/{id}/events"))).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let mut body = response.bytes_stream();
    let mut text = String::new();
    while !text.contains("\n\n") {
        let chunk = tokio::time::timeout(SOON, body.next()).await.expect("the first state").unwrap().unwrap();
        text.push_str(std::str::from_utf8(&chunk).unwrap());
    }
    app.drain();
    // A retry field alone dispatches no event (it sets the client's reconnection
    // delay), so the raw bytes are read.
    let rest = tokio::time::timeout(SOON, async {
        let mut rest = String::new();
        while let Some(chunk) = body.next().await {
            rest.push_str(std::str::from_utf8(&chunk.expect("a clean end")).unwrap());
        }
        rest
    })
    .await
    .expect("the stream ends soon after the drain begins");
    assert!(rest.ends_with("retry: 1000\n\n"), "ends with a retry hint: {rest:?}");
}

/// An event stream's raw text, read block by block (a block ends with a blank
/// line), comments and `retry:` fields included, which an SSE parser keeps to
/// itself.
struct RawStream {
    body: Pin<Box<dyn Stream<Item = reqwest::Result<bytes::Bytes>> + Send>>,
    text: String,
}

/// What a [`RawStream`] read next.
#[derive(Debug, PartialEq)]
enum Read {
    /// A block, its blank line included.
    Block(String),
    /// A clean end of the stream, after a whole block.
    End,
    /// No whole block within the time given.
    Nothing,
}

impl RawStream {
    /// Opens `url` on a new HTTP/1.1 connection, asserting it is an event stream.
    async fn open(url: &str) -> RawStream {
        let client = reqwest::Client::builder().http1_only().pool_max_idle_per_host(0).build().unwrap();
        let response = client.get(url).send().await.expect("stream request");
        assert_eq!((response.version(), response.status()), (reqwest::Version::HTTP_11, StatusCode::OK));
        assert_eq!(response.headers()["content-type"], "text/event-stream");
        RawStream { body: Box::pin(response.bytes_stream()), text: String::new() }
    }

    /// The next block, waiting `within` at most; panics if the connection breaks
    /// or the stream ends mid-block.
    async fn read(&mut self, within: Duration) -> Read {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            if let Some(end) = self.text.find("\n\n") {
                return Read::Block(self.text.drain(..end + 2).collect());
            }
            match tokio::time::timeout_at(deadline, self.body.next()).await {
                Ok(Some(chunk)) => self.text.push_str(std::str::from_utf8(&chunk.expect("a clean stream")).unwrap()),
                Ok(None) => {
                    assert!(self.text.is_empty(), "the stream ended mid-block: {:?}", self.text);
                    return Read::End;
                }
                Err(_) => return Read::Nothing,
            }
        }
    }

    /// The next block, which must come within `within`.
    async fn block(&mut self, within: Duration) -> String {
        match self.read(within).await {
            Read::Block(block) => block,
            other => panic!("no block within {within:?}: {other:?}"),
        }
    }
}

const HEARTBEAT: &str = ": heartbeat\n\n";

/// The HTTP/1.1 counterpart of the HTTP/2 test in `http2.rs`: an idle
/// keep-alive connection is closed after the header-read timeout, but one
/// carrying an event stream is not; the stream gets its heartbeats meanwhile
/// and still carries events.
#[tokio::test]
async fn an_http1_stream_outlives_the_header_read_timeout_with_heartbeats() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let app = spawn_app_with(&["--header-read-timeout", "300ms", "--stream-heartbeat", "200ms"]).await;
    let id = app.open_auction(100, 10, 60.0, 0).await["id"].as_i64().unwrap();

    // The timer is live: a keep-alive connection idle after a request is closed.
    let mut idle = tokio::net::TcpStream::connect(app.addr).await.unwrap();
    idle.write_all(format!("GET /api/auctions/{id} HTTP/1.1\r\nhost: gavel\r\n\r\n").as_bytes()).await.unwrap();
    let mut response = Vec::new();
    let closed = tokio::time::timeout(SOON, idle.read_to_end(&mut response)).await;
    assert!(matches!(closed, Ok(Ok(_))), "an idle connection is closed: {closed:?}");
    assert!(response.starts_with(b"HTTP/1.1 200"), "{}", String::from_utf8_lossy(&response));

    let mut stream = RawStream::open(&app.url(&format!("/api/auctions/{id}/events"))).await;
    let first = stream.block(SOON).await;
    assert!(first.starts_with("event: auction\n"), "{first:?}");

    // Five times the header-read timeout, with no request on the connection.
    let wait = Duration::from_millis(1500);
    let started = tokio::time::Instant::now();
    let mut heartbeats = 0;
    while let Some(left) = wait.checked_sub(started.elapsed()) {
        match stream.read(left).await {
            Read::Block(block) => {
                assert_eq!(block, HEARTBEAT, "only heartbeats while nothing happens");
                heartbeats += 1;
            }
            Read::Nothing => break,
            Read::End => panic!("the stream ended after {:?} of the wait", started.elapsed()),
        }
    }
    // One every 200 ms would be 7; a loaded machine may delay and merge some.
    assert!(heartbeats >= 2, "{heartbeats} heartbeats in {wait:?}");

    assert_eq!(app.place_bid(&app.bidder(2), id, 150).await.status(), StatusCode::CREATED);
    let event = loop {
        match stream.block(SOON).await {
            heartbeat if heartbeat == HEARTBEAT => continue,
            block => break block,
        }
    };
    assert!(event.starts_with("event: auction\n") && event.contains("\"high_bid\":150"), "{event:?}");
}

/// SIGTERM to the real binary: a watcher's stream stays open for --drain-delay
/// (as the server keeps serving), then ends cleanly with the configured
/// `retry:` hint, and the process exits 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_ends_open_streams_with_a_retry_hint_after_the_drain_delay() {
    let drain_delay = Duration::from_millis(300);
    let (mut child, addr, _) =
        spawn_binary(&["--drain-delay", "300ms", "--stream-retry", "2500ms", "--stream-heartbeat", "1h"]).await;
    let base = format!("http://{addr}");
    let client = reqwest::Client::new();
    // The binary's own database starts empty: the seller registers (id 1).
    let seller = client
        .post(format!("{base}/api/accounts"))
        .json(&serde_json::json!({"email": "seller@example.com", "password": "long enough", "role": "seller"}))
        .send()
        .await
        .unwrap();
    assert_eq!(seller.status(), StatusCode::CREATED);
    let seller_id = seller.json::<Value>().await.unwrap()["id"].as_i64().unwrap();
    let keys = gavel::auth::Keys::new(SECRET.as_bytes()).unwrap();
    let token = keys.mint(seller_id, gavel::auth::Role::Seller, Duration::from_secs(60)).0;
    let body = serde_json::json!({"title": "lot", "reserve": 100, "min_increment": 10,
        "starts_at": at(-1.0), "ends_at": at(60.0)});
    let created = client.post(format!("{base}/api/auctions")).bearer_auth(&token).json(&body).send().await.unwrap();
    assert_eq!(created.status(), StatusCode::CREATED);
    let id = created.json::<Value>().await.unwrap()["id"].as_i64().unwrap();

    let mut stream = RawStream::open(&format!("{base}/api/auctions/{id}/events")).await;
    let first = stream.block(SOON).await;
    assert!(first.starts_with("event: auction\n"), "{first:?}");

    let signalled = tokio::time::Instant::now();
    sigterm(&child.0);
    let hint = stream.block(SOON).await;
    let hinted = signalled.elapsed();
    assert_eq!(hint, "retry: 2500\n\n", "the configured --stream-retry, as the last block");
    assert!(hinted >= drain_delay, "kept open for the drain delay: the hint came after {hinted:?}");
    assert_eq!(stream.read(SOON).await, Read::End, "then the stream ends cleanly");
    let ended = signalled.elapsed();
    assert!(ended < drain_delay + Duration::from_secs(2), "ended {ended:?} after the signal");

    let exit = tokio::task::spawn_blocking(move || child.exited_within(Duration::from_secs(20))).await.unwrap();
    let exit = exit.expect("gavel exits after SIGTERM");
    assert_eq!(exit.code(), Some(0), "exit status {exit:?}");
}

#[tokio::test]
async fn streams_are_counted_per_core() {
    let app = spawn_app().await;
    let id = app.open_auction(100, 10, 60.0, 0).await["id"].as_i64().unwrap();
    let mut events = watch(&app, &format!("/api/auctions/{id}/events"), None).await;
    next(&mut events, SOON).await;
    assert_eq!(app.place_bid(&app.bidder(2), id, 100).await.status(), StatusCode::CREATED);
    next(&mut events, SOON).await;
    let open = app.per_core("gavel_event_streams_open", &[]).await;
    assert_eq!(open.iter().sum::<f64>(), 1.0);
    let sent = app.per_core("gavel_events_sent_total", &["kind=\"auction\""]).await;
    assert_eq!(sent.iter().sum::<f64>(), 2.0, "the first state and one change");
    let delivered = app.per_core("gavel_event_delivery_seconds_count", &[]).await;
    assert_eq!(delivered.iter().sum::<f64>(), 1.0, "a change's delivery is timed; the first state is no change");
    drop(events);
    eventually(SOON, "the stream is no longer counted", || async {
        let open = app.per_core("gavel_event_streams_open", &[]).await;
        (open.iter().sum::<f64>() == 0.0).then_some(())
    })
    .await;
}

#[tokio::test]
async fn a_buy_now_sends_the_closed_event_with_its_winner() {
    let app = spawn_app().await;
    let body = serde_json::json!({
        "title": "lot", "reserve": 100, "min_increment": 10,
        "starts_at": at(-1.0), "ends_at": at(60.0), "buy_now": 900,
    });
    let id = app.create_auction(&body).await.json::<Value>().await.unwrap()["id"].as_i64().unwrap();
    let mut events = watch(&app, &format!("/api/auctions/{id}/events"), None).await;
    assert_eq!(data(&next(&mut events, SOON).await)["buy_now"], 900);
    assert_eq!(app.place_bid(&app.bidder(5), id, 900).await.status(), StatusCode::CREATED);
    let closed = next(&mut events, SOON).await;
    assert_eq!(closed.event, "closed");
    let state = data(&closed);
    assert_eq!((state["winner_id"].as_i64(), state["high_bid"].as_i64()), (Some(5), Some(900)));
    assert_eq!(state["buy_now"], Value::Null);
    assert!(matches!(tokio::time::timeout(SOON, events.next()).await, Ok(None)), "then the stream ends");
}

/// Opens the caller's own stream with `token`.
async fn watch_mine(app: &TestApp, token: &str) -> Events {
    let response = fresh_connection_client().get(app.url("/api/me/events")).bearer_auth(token).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    Box::pin(response.bytes_stream().eventsource())
}

#[tokio::test]
async fn an_outbid_bidder_is_told_at_once_and_nobody_else_is() {
    let app = spawn_app().await;
    let id = app.open_auction(100, 10, 60.0, 0).await["id"].as_i64().unwrap();
    let (leader, challenger, bystander) = (app.bidder(2), app.bidder(3), app.bidder(4));
    let mut leaders = watch_mine(&app, &leader).await;
    let mut challengers = watch_mine(&app, &challenger).await;
    let mut bystanders = watch_mine(&app, &bystander).await;
    assert_eq!(app.place_bid(&leader, id, 100).await.status(), StatusCode::CREATED);
    assert!(quiet(&mut leaders, Duration::from_millis(300)).await, "leading is not being outbid");
    assert_eq!(app.place_bid(&challenger, id, 150).await.status(), StatusCode::CREATED);
    let told = next(&mut leaders, SOON).await;
    assert_eq!(told.event, "outbid");
    let told = data(&told);
    assert_eq!(told["auction_id"], id);
    assert_eq!(told["high_bid"], 150);
    assert_eq!(told["min_next_bid"], 160);
    assert!(told["ends_at"].is_string());
    assert!(quiet(&mut challengers, Duration::from_millis(300)).await, "the new leader is not told");
    assert!(quiet(&mut bystanders, Duration::from_millis(10)).await, "nor is anyone else");
    let anonymous = app.get("/api/me/events").await;
    assert_problem(anonymous, StatusCode::UNAUTHORIZED, "/problems/unauthorized").await;
}

#[tokio::test]
async fn when_an_auction_closes_its_winner_is_told_won_and_the_others_lost() {
    let app = spawn_app().await;
    let id = app.open_auction(100, 10, 1.5, 0).await["id"].as_i64().unwrap();
    let (loser, winner, bystander) = (app.bidder(2), app.bidder(3), app.bidder(4));
    let mut losers = watch_mine(&app, &loser).await;
    let mut winners = watch_mine(&app, &winner).await;
    let mut bystanders = watch_mine(&app, &bystander).await;
    assert_eq!(app.place_bid(&loser, id, 100).await.status(), StatusCode::CREATED);
    assert_eq!(app.place_bid(&winner, id, 150).await.status(), StatusCode::CREATED);
    assert_eq!(next(&mut losers, SOON).await.event, "outbid");
    let lost = next(&mut losers, SOON).await;
    assert_eq!(lost.event, "lost");
    assert_eq!((data(&lost)["auction_id"].as_i64(), data(&lost)["high_bid"].as_i64()), (Some(id), Some(150)));
    let won = next(&mut winners, SOON).await;
    assert_eq!(won.event, "won");
    assert_eq!(data(&won)["auction_id"], id);
    assert!(quiet(&mut bystanders, Duration::from_millis(200)).await, "who never bid is told nothing");
}

#[tokio::test]
async fn a_bid_the_proxy_outbids_at_once_tells_its_own_bidder_and_not_the_leader() {
    let app = spawn_app().await;
    let id = app.open_auction(100, 10, 60.0, 0).await["id"].as_i64().unwrap();
    let (leader, challenger) = (app.bidder(2), app.bidder(3));
    let mut leaders = watch_mine(&app, &leader).await;
    let mut challengers = watch_mine(&app, &challenger).await;
    assert_eq!(app.place_proxy_bid(&leader, id, 100, 500).await.status(), StatusCode::CREATED);
    assert_eq!(app.place_bid(&challenger, id, 200).await.status(), StatusCode::CREATED);
    let told = next(&mut challengers, SOON).await;
    assert_eq!(told.event, "outbid");
    let told = data(&told);
    assert_eq!((told["high_bid"].as_i64(), told["min_next_bid"].as_i64()), (Some(210), Some(220)));
    assert!(quiet(&mut leaders, Duration::from_millis(300)).await, "the proxy kept the lead: nothing to tell");
    // Beating the maximum outbids its owner as any bid would.
    assert_eq!(app.place_proxy_bid(&challenger, id, 220, 900).await.status(), StatusCode::CREATED);
    let told = next(&mut leaders, SOON).await;
    assert_eq!((told.event.as_str(), data(&told)["high_bid"].as_i64()), ("outbid", Some(510)));
}

#[tokio::test]
async fn a_buy_now_tells_its_buyer_won() {
    let app = spawn_app().await;
    let body = serde_json::json!({
        "title": "lot", "reserve": 100, "min_increment": 10,
        "starts_at": at(-1.0), "ends_at": at(60.0), "buy_now": 900,
    });
    let id = app.create_auction(&body).await.json::<Value>().await.unwrap()["id"].as_i64().unwrap();
    let buyer = app.bidder(5);
    let mut mine = watch_mine(&app, &buyer).await;
    assert_eq!(app.place_bid(&buyer, id, 900).await.status(), StatusCode::CREATED);
    let won = next(&mut mine, SOON).await;
    assert_eq!(won.event, "won");
    assert_eq!((data(&won)["auction_id"].as_i64(), data(&won)["high_bid"].as_i64()), (Some(id), Some(900)));
}

#[tokio::test]
async fn a_buyer_is_told_every_change_of_their_orders_and_nobody_else_is() {
    let app = spawn_app().await;
    app.stock(1, "apple", 10).await;
    let (buyer, other) = (app.bidder(10), app.bidder(11));
    let mut buyers = watch_mine(&app, &buyer).await;
    let mut others = watch_mine(&app, &other).await;
    let status = |event: &eventsource_stream::Event| {
        assert_eq!(event.event, "order");
        let data = data(event);
        (data["order_id"].as_i64().unwrap(), data["status"].as_str().unwrap().to_owned())
    };
    let first = app.order(&buyer, &[("apple", 3)]).await["id"].as_i64().unwrap();
    assert_eq!(status(&next(&mut buyers, SOON).await), (first, "reserved".to_owned()));
    assert_eq!(app.cancel(&buyer, first).await.status(), StatusCode::OK);
    assert_eq!(status(&next(&mut buyers, SOON).await), (first, "cancelled".to_owned()));
    let second = app.order(&buyer, &[("apple", 2)]).await["id"].as_i64().unwrap();
    assert_eq!(status(&next(&mut buyers, SOON).await), (second, "reserved".to_owned()));
    // Moved by the seller: the buyer is told all the same.
    assert_eq!(app.fulfil(&app.seller(), second).await.status(), StatusCode::OK);
    assert_eq!(status(&next(&mut buyers, SOON).await), (second, "fulfilled".to_owned()));
    // A refused move changes nothing, and tells nothing.
    assert_eq!(app.cancel(&buyer, second).await.status(), StatusCode::CONFLICT);
    assert!(quiet(&mut buyers, Duration::from_millis(300)).await);
    assert!(quiet(&mut others, Duration::from_millis(10)).await, "another account's stream carries none of it");
}

/// A change a core never heard of (made with triggers off, while its listener is
/// down) reaches the streams on it when the listener is back and reloads.
#[tokio::test]
async fn a_stream_gets_the_change_its_core_missed_once_the_listener_reloads() {
    let app = spawn_app().await;
    let id = app.open_auction(100, 10, 60.0, 0).await["id"].as_i64().unwrap();
    let mut events = watch(&app, &format!("/api/auctions/{id}/events"), None).await;
    let first = data(&next(&mut events, SOON).await)["version"].as_i64().unwrap();
    app.wait_for_listeners().await;
    app.silently("update auctions set title = 'renamed', version = version + 1 where id = $1", id).await;
    assert!(quiet(&mut events, Duration::from_millis(300)).await, "nothing announced it");
    app.reconnect_listeners().await;
    let event = data(&next(&mut events, SOON).await);
    assert_eq!((event["title"].as_str(), event["version"].as_i64()), (Some("renamed"), Some(first + 1)));
}

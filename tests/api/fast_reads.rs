//! Hot reads answered off the socket before hyper (`runtime::fast`): the same
//! answer hyper gives, pipelined requests in order across the hand-over to
//! hyper, heads that arrive in pieces, and the requests it must leave to hyper.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use reqwest::StatusCode;

use crate::helpers::{TestApp, eventually, spawn_app, spawn_app_with, sum};

/// One answer read off `stream`: its head (status line and headers, without
/// the blank line) and its body, framed by `content-length`.
fn read_answer(stream: &mut TcpStream, pending: &mut Vec<u8>) -> (String, Vec<u8>) {
    let mut buf = [0u8; 4096];
    let end = loop {
        if let Some(at) = pending.windows(4).position(|w| w == b"\r\n\r\n") {
            break at;
        }
        let n = stream.read(&mut buf).expect("an answer");
        assert!(n > 0, "closed before a whole head: {:?}", String::from_utf8_lossy(pending));
        pending.extend_from_slice(&buf[..n]);
    };
    let head = String::from_utf8(pending[..end].to_vec()).unwrap();
    let length = header(&head, "content-length").map_or(0, |v| v.parse().unwrap());
    pending.drain(..end + 4);
    while pending.len() < length {
        let n = stream.read(&mut buf).expect("a body");
        assert!(n > 0, "closed before the whole body");
        pending.extend_from_slice(&buf[..n]);
    }
    let body = pending.drain(..length).collect();
    (head, body)
}

/// A header's value in `head`, by its lower-case name.
fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().skip(1).find_map(|l| {
        let (n, v) = l.split_once(':')?;
        n.eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

fn connect(addr: SocketAddr) -> TcpStream {
    let stream = TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    stream
}

fn get(path: &str, id: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nhost: gavel\r\nx-request-id: {id}\r\n\r\n")
}

/// An open auction and a stocked sku, both read once so the caches hold them.
async fn cached_rows(app: &TestApp) -> (String, String) {
    let id = app.open_auction(100, 10, 600.0, 0).await["id"].as_i64().unwrap();
    let put = app.put_inventory(&app.seller(), "FAST-1", "fast", 5).await;
    assert!(put.status().is_success(), "{}", put.status());
    let (auction, item) = (format!("/api/auctions/{id}"), "/api/inventory/FAST-1".to_owned());
    for path in [&auction, &item] {
        assert_eq!(app.get(path).await.status(), StatusCode::OK);
    }
    (auction, item)
}

/// The head without its `date` line, which differs from second to second.
fn dateless(head: &str) -> Vec<&str> {
    head.lines().filter(|l| !l.to_ascii_lowercase().starts_with("date:")).collect()
}

/// A hot read as the first request of a connection is answered by gavel's own
/// reader; after another request the connection is hyper's. Both answers are
/// the same, header for header in the same order, and both carry a date.
#[tokio::test]
async fn a_read_answered_before_hyper_is_the_answer_hyper_gives() {
    let app = spawn_app().await;
    let (auction, item) = cached_rows(&app).await;
    let addr = app.addr;
    tokio::task::spawn_blocking(move || {
        for path in [&auction, &item] {
            let mut fast = connect(addr);
            let mut pending = Vec::new();
            fast.write_all(get(path, "same-id").as_bytes()).unwrap();
            let (fast_head, fast_body) = read_answer(&mut fast, &mut pending);

            let mut slow = connect(addr);
            let mut pending = Vec::new();
            slow.write_all(get("/health", "first").as_bytes()).unwrap();
            let (health, _) = read_answer(&mut slow, &mut pending);
            assert!(health.starts_with("HTTP/1.1 200"), "{health}");
            slow.write_all(get(path, "same-id").as_bytes()).unwrap();
            let (hyper_head, hyper_body) = read_answer(&mut slow, &mut pending);

            assert!(fast_head.starts_with("HTTP/1.1 200 OK"), "{fast_head}");
            assert_eq!(dateless(&fast_head), dateless(&hyper_head));
            assert_eq!(fast_body, hyper_body);
            assert!(header(&fast_head, "date").is_some_and(|d| d.ends_with(" GMT")), "{fast_head}");
            assert_eq!(header(&fast_head, "x-request-id"), Some("same-id"));
        }
    })
    .await
    .unwrap();
}

/// Requests sent together are answered in order, across the hand-over: the
/// reads before `/health` by gavel's reader, `/health` and what follows by
/// hyper; a 304, a made-up request id and a miss among them.
#[tokio::test]
async fn pipelined_requests_are_answered_in_order_across_the_hand_over() {
    let app = spawn_app().await;
    let (auction, item) = cached_rows(&app).await;
    let etag = app.get(&auction).await.headers()["etag"].to_str().unwrap().to_owned();
    let addr = app.addr;
    tokio::task::spawn_blocking(move || {
        let mut stream = connect(addr);
        let conditional =
            format!("GET {auction} HTTP/1.1\r\nhost: gavel\r\nif-none-match: {etag}\r\nx-request-id: r2\r\n\r\n");
        let anonymous = format!("GET {item} HTTP/1.1\r\nhost: gavel\r\n\r\n");
        let all = [
            get(&auction, "r1"),
            conditional,
            anonymous,
            get("/api/auctions/999999", "r4"),
            get("/health", "r5"),
            get(&item, "r6"),
        ]
        .concat();
        stream.write_all(all.as_bytes()).unwrap();
        let mut pending = Vec::new();
        let mut answers = Vec::new();
        for _ in 0..6 {
            answers.push(read_answer(&mut stream, &mut pending));
        }
        let status = |i: usize| answers[i].0.lines().next().unwrap().to_owned();
        let id = |i: usize| header(&answers[i].0, "x-request-id").unwrap().to_owned();
        assert_eq!(status(0), "HTTP/1.1 200 OK");
        assert_eq!(id(0), "r1");
        assert_eq!(status(1), "HTTP/1.1 304 Not Modified");
        assert!(answers[1].1.is_empty() && header(&answers[1].0, "content-type").is_none());
        assert_eq!((header(&answers[1].0, "etag"), id(1).as_str()), (Some(etag.as_str()), "r2"));
        assert_eq!(status(2), "HTTP/1.1 200 OK");
        assert!(!id(2).is_empty() && id(2) != "r2", "a made-up id: {}", id(2));
        assert!(String::from_utf8_lossy(&answers[2].1).contains("FAST-1"));
        assert_eq!((status(3).as_str(), id(3).as_str()), ("HTTP/1.1 404 Not Found", "r4"));
        assert_eq!((status(4).as_str(), id(4).as_str()), ("HTTP/1.1 200 OK", "r5"));
        assert_eq!((status(5).as_str(), id(5).as_str()), ("HTTP/1.1 200 OK", "r6"));
        assert_eq!(answers[5].1, answers[2].1, "hyper's read of the sku is the same body");
    })
    .await
    .unwrap();
}

/// A head that arrives in pieces is answered once it is whole, and the next
/// one on the connection too.
#[tokio::test]
async fn a_head_in_pieces_is_answered_once_whole() {
    let app = spawn_app().await;
    let (auction, _) = cached_rows(&app).await;
    let addr = app.addr;
    tokio::task::spawn_blocking(move || {
        let mut stream = connect(addr);
        let request = get(&auction, "pieces");
        let mut pending = Vec::new();
        for _ in 0..2 {
            for piece in request.as_bytes().chunks(7) {
                stream.write_all(piece).unwrap();
                std::thread::sleep(Duration::from_millis(5));
            }
            let (head, body) = read_answer(&mut stream, &mut pending);
            assert!(head.starts_with("HTTP/1.1 200 OK"), "{head}");
            assert!(String::from_utf8_lossy(&body).contains("\"id\""));
        }
    })
    .await
    .unwrap();
}

/// Reads in a form the reader does not answer go to hyper and are answered as
/// before: `Connection: close` (answered, then closed), a body, HTTP/1.0 and a
/// HEAD.
#[tokio::test]
async fn reads_in_other_forms_are_left_to_hyper() {
    let app = spawn_app().await;
    let (auction, _) = cached_rows(&app).await;
    let addr = app.addr;
    tokio::task::spawn_blocking(move || {
        let mut stream = connect(addr);
        stream
            .write_all(format!("GET {auction} HTTP/1.1\r\nhost: gavel\r\nconnection: close\r\n\r\n").as_bytes())
            .unwrap();
        let mut all = Vec::new();
        stream.read_to_end(&mut all).unwrap();
        let text = String::from_utf8_lossy(&all);
        assert!(text.starts_with("HTTP/1.1 200 OK") && text.contains("connection: close"), "{text}");

        let mut stream = connect(addr);
        let mut pending = Vec::new();
        stream
            .write_all(format!("GET {auction} HTTP/1.1\r\nhost: gavel\r\ncontent-length: 2\r\n\r\n{{}}").as_bytes())
            .unwrap();
        let (head, body) = read_answer(&mut stream, &mut pending);
        assert!(head.starts_with("HTTP/1.1 200 OK"), "{head}");
        assert!(String::from_utf8_lossy(&body).contains("\"id\""));
        stream.write_all(format!("HEAD {auction} HTTP/1.1\r\nhost: gavel\r\n\r\n").as_bytes()).unwrap();
        let mut buf = [0u8; 2048];
        let n = stream.read(&mut buf).unwrap();
        let head = String::from_utf8_lossy(&buf[..n]);
        assert!(head.starts_with("HTTP/1.1 200 OK") && head.ends_with("\r\n\r\n"), "a head, no body: {head}");

        let mut old = connect(addr);
        old.write_all(format!("GET {auction} HTTP/1.0\r\n\r\n").as_bytes()).unwrap();
        let mut all = Vec::new();
        old.read_to_end(&mut all).unwrap();
        assert!(String::from_utf8_lossy(&all).starts_with("HTTP/1.0 200 OK"));
    })
    .await
    .unwrap();
}

/// Every core's count of HTTP/1.1 connections handed to hyper.
async fn handoffs(app: &TestApp) -> f64 {
    sum(&app.scrape().await, "gavel_http1_handoffs_total", &[])
}

/// Cached reads on a connection stay with gavel's reader; the first other
/// request hands the connection to hyper, once, whatever follows.
#[tokio::test]
async fn only_the_first_other_request_hands_a_connection_to_hyper() {
    let app = spawn_app().await;
    let (auction, item) = cached_rows(&app).await;
    let before = handoffs(&app).await;
    let addr = app.addr;
    let read = |paths: Vec<String>| {
        tokio::task::spawn_blocking(move || {
            let mut stream = connect(addr);
            let mut pending = Vec::new();
            for path in paths {
                stream.write_all(get(&path, "h").as_bytes()).unwrap();
                assert!(read_answer(&mut stream, &mut pending).0.starts_with("HTTP/1.1 "));
            }
        })
    };
    read(vec![auction.clone(), item.clone(), auction.clone()]).await.unwrap();
    assert_eq!(handoffs(&app).await, before, "cached reads alone are never handed over");
    read(vec![auction.clone(), "/health".into(), auction.clone(), "/health".into()]).await.unwrap();
    eventually(Duration::from_secs(5), "one connection handed over", || async {
        (handoffs(&app).await == before + 1.0).then_some(())
    })
    .await;
}

/// A hot read the cache cannot answer — a row it evicted, one that does not
/// exist — is answered by the router without handing the connection over, so
/// a connection stays off hyper through the misses after a restart.
#[tokio::test]
async fn misses_are_answered_without_handing_the_connection_over() {
    let app = spawn_app_with(&["--cache-capacity", "1"]).await;
    let first = app.open_auction(100, 10, 600.0, 0).await["id"].as_i64().unwrap();
    let second = app.open_auction(200, 10, 600.0, 0).await["id"].as_i64().unwrap();
    let before = handoffs(&app).await;
    let addr = app.addr;
    tokio::task::spawn_blocking(move || {
        let mut stream = connect(addr);
        let mut pending = Vec::new();
        // With room for one auction per core, each read evicts the other.
        for (n, id) in [first, second, first, second, 999_999].into_iter().enumerate() {
            let rid = format!("miss-{n}");
            stream.write_all(get(&format!("/api/auctions/{id}"), &rid).as_bytes()).unwrap();
            let (head, body) = read_answer(&mut stream, &mut pending);
            assert_eq!(header(&head, "x-request-id"), Some(rid.as_str()), "{head}");
            let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
            if id == 999_999 {
                assert!(head.starts_with("HTTP/1.1 404 Not Found"), "{head}");
                assert_eq!(header(&head, "content-type"), Some("application/problem+json"));
            } else {
                assert!(head.starts_with("HTTP/1.1 200 OK"), "{head}");
                assert_eq!(body["id"], id);
                assert!(header(&head, "date").is_some() && header(&head, "etag").is_some(), "{head}");
            }
        }
    })
    .await
    .unwrap();
    assert_eq!(handoffs(&app).await, before, "misses are not handed over");
}

/// Heads the reader cannot take — malformed, with more headers than it
/// parses, larger than it reads — go to hyper, which answers each as it
/// answers any connection: 400, then the read (hyper allows more headers and
/// a larger head) twice.
#[tokio::test]
async fn heads_the_reader_cannot_take_go_to_hyper() {
    let app = spawn_app().await;
    let (auction, _) = cached_rows(&app).await;
    let before = handoffs(&app).await;
    let addr = app.addr;
    let many: String = (0..40).map(|n| format!("x-h{n}: {n}\r\n")).collect();
    let large = format!("x-big: {}\r\n", "a".repeat(20 * 1024));
    let heads = [
        (format!("GET {auction} HTTP/1.1\r\nno colon here\r\n\r\n"), "HTTP/1.1 400"),
        (format!("GET {auction} HTTP/1.1\r\nhost: gavel\r\n{many}\r\n"), "HTTP/1.1 200"),
        (format!("GET {auction} HTTP/1.1\r\nhost: gavel\r\n{large}\r\n"), "HTTP/1.1 200"),
    ];
    tokio::task::spawn_blocking(move || {
        for (head, status) in heads {
            let mut stream = connect(addr);
            let _ = stream.write_all(head.as_bytes());
            let mut buf = [0u8; 256];
            let n = stream.read(&mut buf).unwrap();
            let answer = String::from_utf8_lossy(&buf[..n]);
            assert!(answer.starts_with(status), "{status}: {answer}");
        }
    })
    .await
    .unwrap();
    eventually(Duration::from_secs(5), "each went to hyper", || async {
        (handoffs(&app).await == before + 3.0).then_some(())
    })
    .await;
}

/// Reads answered before hyper count in the route's metrics like any other,
/// and leave nothing in flight.
#[tokio::test]
async fn reads_answered_before_hyper_are_counted() {
    let app = spawn_app().await;
    let (auction, _) = cached_rows(&app).await;
    let count = |text: &str| sum(text, "http_requests_total", &["route=\"/api/auctions/{id}\"", "status=\"200\""]);
    let before = count(&app.scrape().await);
    let addr = app.addr;
    let path = auction.clone();
    tokio::task::spawn_blocking(move || {
        let mut stream = connect(addr);
        stream.write_all([get(&path, "m1"), get(&path, "m2"), get(&path, "m3")].concat().as_bytes()).unwrap();
        let mut pending = Vec::new();
        for _ in 0..3 {
            assert!(read_answer(&mut stream, &mut pending).0.starts_with("HTTP/1.1 200"));
        }
    })
    .await
    .unwrap();
    eventually(Duration::from_secs(5), "three more reads counted, none in flight", || async {
        let text = app.scrape().await;
        (count(&text) == before + 3.0 && sum(&text, "http_requests_in_flight", &[]) == 0.0).then_some(())
    })
    .await;
}

/// A connection left idle after a read answered before hyper is closed after
/// the header-read timeout, as hyper closes its own.
#[tokio::test]
async fn an_idle_connection_after_a_fast_read_is_closed() {
    let app = spawn_app_with(&["--header-read-timeout", "300ms"]).await;
    let (auction, _) = cached_rows(&app).await;
    let addr = app.addr;
    tokio::task::spawn_blocking(move || {
        let mut stream = connect(addr);
        let mut pending = Vec::new();
        stream.write_all(get(&auction, "idle").as_bytes()).unwrap();
        assert!(read_answer(&mut stream, &mut pending).0.starts_with("HTTP/1.1 200"));
        let started = std::time::Instant::now();
        let mut buf = [0u8; 64];
        assert_eq!(stream.read(&mut buf).expect("closed, not timed out"), 0);
        assert!(started.elapsed() < Duration::from_secs(4), "closed by the server");
    })
    .await
    .unwrap();
}

/// A connection left idle after a read answered before hyper is closed as soon
/// as the server drains, long before its header-read timeout.
#[tokio::test]
async fn an_idle_connection_after_a_fast_read_is_closed_by_the_drain() {
    let app = spawn_app_with(&["--header-read-timeout", "30s"]).await;
    let (auction, _) = cached_rows(&app).await;
    let mut stream = connect(app.addr);
    let mut pending = Vec::new();
    stream.write_all(get(&auction, "drained").as_bytes()).unwrap();
    assert!(read_answer(&mut stream, &mut pending).0.starts_with("HTTP/1.1 200"));
    app.drain();
    let mut buf = [0u8; 64];
    // `connect` gives up reading after 5 s: an error here is a connection the
    // drain left open.
    assert_eq!(stream.read(&mut buf).expect("closed by the drain"), 0);
}

/// `If-None-Match` in several lines is one list (RFC 9110 §5.3): a 304 when any
/// line names the current version, from gavel's reader, through hyper, and on
/// a read the cache does not hold.
#[tokio::test]
async fn if_none_match_in_several_lines_is_one_list() {
    let app = spawn_app().await;
    let (auction, _) = cached_rows(&app).await;
    let etag = app.get(&auction).await.headers()["etag"].to_str().unwrap().to_owned();
    let addr = app.addr;
    let conditional = move |path: &str| {
        format!(
            "GET {path} HTTP/1.1\r\nhost: gavel\r\nif-none-match: \"999\"\r\nif-none-match: \"998\", {etag}\r\n\r\n"
        )
    };
    let none_current = |path: &str| {
        format!("GET {path} HTTP/1.1\r\nhost: gavel\r\nif-none-match: \"999\"\r\nif-none-match: \"998\"\r\n\r\n")
    };
    let consistent = format!("{auction}?consistent=true");
    tokio::task::spawn_blocking(move || {
        let mut fast = connect(addr);
        let mut pending = Vec::new();
        fast.write_all(conditional(&auction).as_bytes()).unwrap();
        let (head, body) = read_answer(&mut fast, &mut pending);
        assert!(head.starts_with("HTTP/1.1 304"), "gavel's reader: {head}");
        assert!(body.is_empty());
        fast.write_all(none_current(&auction).as_bytes()).unwrap();
        let (head, body) = read_answer(&mut fast, &mut pending);
        assert!(head.starts_with("HTTP/1.1 200"), "no line names the version: {head}");
        assert!(!body.is_empty());

        let mut slow = connect(addr);
        let mut pending = Vec::new();
        slow.write_all(get("/health", "first").as_bytes()).unwrap();
        read_answer(&mut slow, &mut pending);
        for path in [&auction, &consistent] {
            slow.write_all(conditional(path).as_bytes()).unwrap();
            let (head, _) = read_answer(&mut slow, &mut pending);
            assert!(head.starts_with("HTTP/1.1 304"), "hyper, {path}: {head}");
            slow.write_all(none_current(path).as_bytes()).unwrap();
            let (head, _) = read_answer(&mut slow, &mut pending);
            assert!(head.starts_with("HTTP/1.1 200"), "hyper, {path}, no line names the version: {head}");
        }
    })
    .await
    .unwrap();
}

/// A miss whose client closes the connection while the database is read is
/// given up, as hyper gives up a request whose client left: counted 499, out
/// of the in-flight gauge. Bytes a client pipelines behind a miss are still
/// answered after it.
#[tokio::test]
async fn a_miss_whose_client_left_is_given_up_and_counted_499() {
    let app = spawn_app_with(&["--cache-capacity", "1"]).await;
    let first = app.open_auction(100, 10, 600.0, 0).await["id"].as_i64().unwrap();
    let second = app.open_auction(200, 10, 600.0, 0).await["id"].as_i64().unwrap();
    let route = ["route=\"/api/auctions/{id}\"", "status=\"499\""];
    let before = sum(&app.scrape().await, "http_requests_total", &route);
    // Every read of the auctions waits for this lock.
    let mut lock = app.db.begin().await.unwrap();
    sqlx::query("lock table auctions in access exclusive mode").execute(&mut *lock).await.unwrap();
    let addr = app.addr;
    let waiting = tokio::task::spawn_blocking(move || {
        let mut left = connect(addr);
        left.write_all(get(&format!("/api/auctions/{first}"), "gone").as_bytes()).unwrap();
        let mut stays = connect(addr);
        // A miss, then (while it waits) a cached read.
        let both = [get(&format!("/api/auctions/{first}"), "s1"), get(&format!("/api/auctions/{second}"), "s2")];
        stays.write_all(both[0].as_bytes()).unwrap();
        std::thread::sleep(Duration::from_millis(300));
        stays.write_all(both[1].as_bytes()).unwrap();
        drop(left);
        stays
    })
    .await
    .unwrap();
    eventually(Duration::from_secs(5), "the miss whose client left is counted 499", || async {
        (sum(&app.scrape().await, "http_requests_total", &route) == before + 1.0).then_some(())
    })
    .await;
    lock.rollback().await.unwrap();
    tokio::task::spawn_blocking(move || {
        let mut stays = waiting;
        let mut pending = Vec::new();
        for (rid, id) in [("s1", first), ("s2", second)] {
            let (head, body) = read_answer(&mut stays, &mut pending);
            assert!(head.starts_with("HTTP/1.1 200 OK"), "{head}");
            assert_eq!(header(&head, "x-request-id"), Some(rid));
            assert_eq!(serde_json::from_slice::<serde_json::Value>(&body).unwrap()["id"], id);
        }
    })
    .await
    .unwrap();
    let text = eventually(Duration::from_secs(5), "nothing in flight", || async {
        let text = app.scrape().await;
        (sum(&text, "http_requests_in_flight", &[]) == 0.0).then_some(text)
    })
    .await;
    assert_eq!(sum(&text, "http_requests_total", &route), before + 1.0, "{text}");
}

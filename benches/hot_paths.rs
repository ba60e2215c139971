//! Micro-benchmarks of the request hot path, one criterion group per piece:
//! `json_parse`, `serialise`, `cache`, `problem` and `router` (a whole request
//! in-process through `tower::ServiceExt::oneshot`). Run with `cargo bench`.
//!
//! # Measured
//!
//! `cargo bench --bench hot_paths` (bench profile: fat LTO, one codegen unit; 30
//! samples of 3 s) on the shared 2-core development machine under load average
//! 1.2 to 2, 2026-11-22; the middle of criterion's interval. Expect ±10 % between
//! runs on that machine.
//!
//! `json_parse`, second measurement (after choosing per size), `cargo bench --bench
//! hot_paths -- json_parse`, same machine while another build ran:
//!
//! | body (bytes)               | simd-json, reused buffer | serde_json | chosen by size |
//! |----------------------------|--------------------------|------------|----------------|
//! | bid (32)                   | 110 ns                   | 69 ns      | 70 ns          |
//! | order with 3 lines (104)   | 353 ns                   | 357 ns     | 337 ns         |
//! | order with 12 lines (407)  | 977 ns                   | 1007 ns    | 946 ns         |
//! | order with 40 lines (1331) | 2.99 µs                  | 3.26 µs    | 3.45 µs ¹      |
//!
//! simd-json loses on the API's small bodies. On the 32-byte bid it is 1.4 to 1.6
//! times slower than serde_json (first run: 116–122 ns against 77–87 ns; this run
//! 110 against 69): its fixed costs (copying the body into the buffer, the
//! structural-index pass) outweigh the whole parse of so small a body. From the
//! 3-line order to the 12-line one they tie within the noise; at 1.3 KB simd-json
//! is ~9 % ahead. So `extract::parse` chooses per payload by size: serde_json below
//! `SIMD_JSON_MIN_BYTES` (512), which covers every bid and every usual order, and
//! simd-json above. The reused buffer is worth keeping for the simd-json path (1.3
//! to 2 times faster than a fresh `Vec` per body, first run).
//!
//! ¹ The same code path as the simd-json column; the gap is the shared machine's
//! noise (the interval is 3.2–3.7 µs).
//!
//! The other groups, first run:
//!
//! - `serialise`, the 337-byte `GET /api/auctions/{id}` body: as a
//!   `serde_json::Value`, `respond::to_bytes` 619 ns against `serde_json::to_vec`
//!   448 ns; as the handlers' own `AuctionView` (chrono timestamps formatted on each
//!   call), 913 ns against 825 ns. `to_bytes` loses here: the per-core
//!   `BytesMut` saves the allocation, but (presumably) writing through
//!   `BufMut::writer` costs more than `Vec`'s two regrowths for a body this small.
//! - `cache` with 10 000 auctions: the lookup of a read, before reads kept
//!   rendered views (`with_live_auction`, since gone), 15.4 ns; `apply_payload`
//!   of a newer version 1.02 µs, of a stale one 850 ns (a stale apply is a parse
//!   and a lookup, so the parse of the notification is nearly all of both).
//!   Since whole-auction notices are decoded by the same struct as the auction
//!   queries (`db::auctions::Row`, flattened under the notice's tag): 1.37 µs and
//!   1.25 µs (2026-11-29) — paid only when an auction is created, opens or
//!   closes. A bid batch's notice for 32 auctions, `apply_bids_32`: 8.1 µs, 0.25
//!   µs per auction, where a whole-auction notice per bid cost 1.37 µs.
//! - `problem`: `BidTooLow` rendered as problem+json 458 ns; `Validation` with
//!   two fields 556 ns.
//! - `router`, a whole request with its middleware: `GET /api/auctions/{id}`
//!   from the live cache 3.43 µs (2.80 µs in a second run); `POST /api/bids`
//!   rejected on the core as too low (token verified, body parsed, 409 rendered)
//!   4.23 µs (4.11 µs).

use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{HeaderValue, Request, StatusCode, header};
use axum::response::IntoResponse;
use chrono::{DateTime, Utc};
use criterion::{BatchSize, BenchmarkId, Criterion, criterion_group, criterion_main};
use http_body_util::BodyExt;
use serde::Deserialize;
use serde::de::DeserializeOwned;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use tower::ServiceExt;

use gavel::auth::{Keys, Role};
use gavel::cache::{Applied, Caches, View};
use gavel::core::{Core, HASHES_PER_CORE, Health, Limits};
use gavel::db::batch::{BatchLimits, Batcher};
use gavel::db::bids::{Announcer, Bids};
use gavel::db::notice;
use gavel::db::orders::Orders;
use gavel::domain::FieldError;
use gavel::domain::auction::BidState;
use gavel::http::Error;

/// The body of `POST /api/bids`, as clients send it.
const BID: &[u8] = br#"{"auction_id":123,"amount":4500}"#;
/// The body of `POST /api/orders` with three lines.
const ORDER: &[u8] =
    br#"{"lines":[{"sku":"APPLE-1","quantity":2},{"sku":"PEAR-22","quantity":1},{"sku":"FIG-303","quantity":5}]}"#;

// Copies of the handlers' request types (they are private to their modules).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(dead_code, reason = "only parsed, never read")]
struct PlaceBid {
    auction_id: i64,
    amount: i64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(dead_code, reason = "only parsed, never read")]
struct CreateOrder {
    lines: Vec<LineRequest>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(dead_code, reason = "only parsed, never read")]
struct LineRequest {
    sku: String,
    quantity: i64,
}

fn json_parse(c: &mut Criterion) {
    let mut group = c.benchmark_group("json_parse");
    bench_parse::<PlaceBid>(&mut group, "bid", BID);
    bench_parse::<CreateOrder>(&mut group, "order_3_lines", ORDER);
    // Larger orders than clients usually send, to find where simd-json starts to win.
    for lines in [12, 40] {
        let body = order_with(lines);
        bench_parse::<CreateOrder>(&mut group, &format!("order_{lines}_lines"), body.leak());
    }
    group.finish();
}

/// An order body of `lines` lines, like the real ones.
fn order_with(lines: usize) -> Vec<u8> {
    let lines: Vec<String> =
        (0..lines).map(|i| format!(r#"{{"sku":"SKU-{i:05}","quantity":{}}}"#, i % 9 + 1)).collect();
    format!(r#"{{"lines":[{}]}}"#, lines.join(",")).into_bytes()
}

/// The two parsers, and the per-size choice the server makes, on one payload.
fn bench_parse<T: DeserializeOwned>(
    group: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    name: &str,
    body: &'static [u8],
) {
    use gavel::http::extract::{parse, parse_with_serde_json, parse_with_simd_json};
    assert!(parse_with_simd_json::<T>(body).is_ok(), "the {name} body must parse");
    assert!(parse_with_serde_json::<T>(body).is_ok(), "the {name} body must parse");
    let name = format!("{name}_{}B", body.len());
    group.throughput(criterion::Throughput::Bytes(body.len() as u64));
    group.bench_with_input(BenchmarkId::new("simd_json_reused_buffer", &name), body, |b, body| {
        b.iter(|| parse_with_simd_json::<T>(black_box(body)))
    });
    group.bench_with_input(BenchmarkId::new("serde_json", &name), body, |b, body| {
        b.iter(|| parse_with_serde_json::<T>(black_box(body)))
    });
    group.bench_with_input(BenchmarkId::new("chosen_by_size", &name), body, |b, body| {
        b.iter(|| parse::<T>(black_box(body)))
    });
}

fn serialise(c: &mut Criterion) {
    let starts_at = DateTime::from_timestamp(1_700_000_000, 0).unwrap_or_default();
    let ends_at = DateTime::from_timestamp(1_700_604_800, 0).unwrap_or_default();
    // The handler's own view type, so the bench serialises exactly what it does.
    let auction = gavel::domain::auction::Auction {
        id: 123,
        seller_id: 42,
        title: "Victorian brass telescope with original case".into(),
        reserve: 10_000,
        min_increment: 250,
        extend_secs: 120,
        high_bid: Some(12_500),
        high_bidder: Some(77),
        bid_count: 14,
        starts_at,
        ends_at,
        closed: false,
        winner_id: None,
        buy_now: None,
        images: Vec::new(),
        version: 15,
    };
    let view = gavel::http::AuctionView::of(&auction, starts_at);
    let value = serde_json::to_value(&view).unwrap_or_default();
    let len = gavel::http::respond::to_bytes(&value).len();
    assert!(len > 250, "the auction view is {len} bytes");

    let mut group = c.benchmark_group("serialise");
    group.throughput(criterion::Throughput::Bytes(len as u64));
    group.bench_function(BenchmarkId::new("respond_to_bytes", "json_value"), |b| {
        b.iter(|| gavel::http::respond::to_bytes(black_box(&value)))
    });
    group.bench_function(BenchmarkId::new("serde_json_to_vec", "json_value"), |b| {
        b.iter(|| serde_json::to_vec(black_box(&value)))
    });
    group.bench_function(BenchmarkId::new("respond_to_bytes", "struct"), |b| {
        b.iter(|| gavel::http::respond::to_bytes(black_box(&view)))
    });
    group.bench_function(BenchmarkId::new("serde_json_to_vec", "struct"), |b| {
        b.iter(|| serde_json::to_vec(black_box(&view)))
    });
    group.finish();
}

/// An `auction_json` notification payload.
fn auction_payload(id: i64, version: i64, high_bid: Option<i64>, ends_at_us: i64) -> String {
    serde_json::json!({
        "kind": "auction", "at_us": 1, "id": id, "seller_id": 1, "title": "Victorian brass telescope",
        "reserve": 1000, "min_increment": 10, "extend_secs": 0, "high_bid": high_bid,
        "high_bidder": high_bid.map(|_| 3), "bid_count": i64::from(high_bid.is_some()),
        "starts_at_us": 1_700_000_000_000_000i64, "ends_at_us": ends_at_us,
        "status": "open", "winner_id": null, "version": version
    })
    .to_string()
}

/// A `bids` notification payload, as a core announces one batch: the final state
/// of each of `ids`.
fn bids_payload(ids: std::ops::Range<i64>, version: i64) -> String {
    let ends_at = DateTime::from_timestamp_micros(ENDS_AT_US).expect("in range");
    let states: Vec<BidState> = ids
        .map(|auction_id| BidState {
            auction_id,
            version,
            high_bid: 1000 + version,
            high_bidder: 7,
            bid_count: version - 1,
            ends_at,
            closed: false,
            min_next_bid: 1001 + version,
        })
        .collect();
    let mut payloads = notice::encode_bids(&states, &[], 1);
    assert_eq!(payloads.len(), 1, "one payload for a batch this size");
    payloads.remove(0)
}

/// Decodes a payload as the listener does and applies it; the last update's result.
fn apply(caches: &Caches, payload: &str) -> Applied {
    let mut last = Applied::Stale;
    caches.apply_notice(notice::parse(payload).expect("a valid payload").notice, |_, applied| last = applied);
    last
}

/// Far in the future, so the auction stays open.
const ENDS_AT_US: i64 = 4_000_000_000_000_000;
const AUCTIONS: i64 = 10_000;

fn cache(c: &mut Criterion) {
    let caches = Caches::default();
    caches.set_live(true);
    for id in 1..=AUCTIONS {
        assert_eq!(apply(&caches, &auction_payload(id, 2, Some(1000), ENDS_AT_US)), Applied::Newer);
    }
    let id = AUCTIONS / 2;
    // A read's lookup once its view is rendered (the render runs on the first only).
    let render = |a: &gavel::domain::auction::Auction, _| View {
        body: a.title.clone().into(),
        etag: HeaderValue::from_static("\"2\""),
        fresh_until: DateTime::<Utc>::MAX_UTC.into(),
    };
    let now = std::time::SystemTime::now();
    assert!(caches.auction_view(id, now, render).is_some());

    let mut group = c.benchmark_group("cache");
    group.bench_function("auction_view_hit", |b| b.iter(|| caches.auction_view(black_box(id), now, render)));

    let mut version = 2;
    let mut next = || {
        version += 1;
        auction_payload(id, version, Some(1000 + version), ENDS_AT_US)
    };
    assert_eq!(apply(&caches, &next()), Applied::Newer);
    group.bench_function("apply_payload_newer", |b| {
        b.iter_batched(&mut next, |payload| apply(&caches, black_box(&payload)), BatchSize::SmallInput)
    });

    let stale = auction_payload(id, 1, None, ENDS_AT_US);
    assert_eq!(apply(&caches, &stale), Applied::Stale);
    group.bench_function("apply_payload_stale", |b| b.iter(|| apply(&caches, black_box(&stale))));

    // One batch's notification for 32 auctions (what a bid batch of 32 on distinct
    // auctions sends), against 32 whole-auction notifications before.
    let mut version = 1_000;
    let mut next_bids = || {
        version += 1;
        bids_payload(1..33, version)
    };
    assert_eq!(apply(&caches, &next_bids()), Applied::Newer);
    group.bench_function("apply_bids_32", |b| {
        b.iter_batched(&mut next_bids, |payload| apply(&caches, black_box(&payload)), BatchSize::SmallInput)
    });
    group.finish();
}

fn problem(c: &mut Criterion) {
    let mut group = c.benchmark_group("problem");
    assert_eq!(Error::BidTooLow { min_next_bid: 1050 }.into_response().status(), StatusCode::CONFLICT);
    group.bench_function("bid_too_low", |b| {
        b.iter(|| Error::BidTooLow { min_next_bid: black_box(1050) }.into_response())
    });
    let validation = || {
        Error::Validation(vec![
            FieldError::new("auction_id", "must be a positive id"),
            FieldError::new("amount", "must be a positive amount of minor units, at most 10^12"),
        ])
    };
    assert_eq!(validation().into_response().status(), StatusCode::UNPROCESSABLE_ENTITY);
    group.bench_function("validation_2_fields", |b| b.iter(|| black_box(validation()).into_response()));
    group.finish();
}

/// One core's state, built inside `rt`, whose cache holds auction 1 and is live.
/// The pool never connects: every request benchmarked is answered without it.
fn core(rt: &tokio::runtime::Runtime, keys: Arc<Keys>) -> Arc<Core> {
    rt.block_on(async {
        let pool = PgPoolOptions::new().connect_lazy_with(PgConnectOptions::new());
        let limits = BatchLimits::one_at_a_time(16, 16);
        let caches = Arc::new(Caches::default());
        assert_eq!(apply(&caches, &auction_payload(1, 2, Some(1000), ENDS_AT_US)), Applied::Newer);
        caches.set_live(true);
        let primary = gavel::db::Primary::new(pool);
        Arc::new(Core {
            id: 0,
            bids: Batcher::spawn(
                primary.clone(),
                Bids::new(Announcer::spawn(primary.clone())),
                limits.clone(),
                Box::new(|_| {}),
            ),
            orders: Batcher::spawn(primary.clone(), Orders, limits, Box::new(|_| {})),
            primary,
            replicas: Arc::new(gavel::db::replicas::Replicas::none()),
            caches,
            events: Arc::new(gavel::events::Hub::new(
                gavel::events::StreamLimits::default(),
                gavel::http::auction_json,
                gavel::metrics::StreamMetrics::new(0),
            )),
            keys,
            tokens: gavel::auth::VerifiedTokens::default(),
            limits: Limits {
                body_limit: 64 * 1024,
                request_timeout: Duration::from_secs(5),
                session_ttl: Duration::from_secs(3600),
            },
            web: Default::default(),
            health: Arc::new(Health::new(1)),
            throttles: Arc::new(gavel::config::Serve::from_flags(Vec::<&str>::new()).unwrap().throttles()),
            images: gavel::core::Images::new(
                gavel::storage::Store::open(&gavel::storage::Location {
                    url: url::Url::from_directory_path(std::env::temp_dir()).unwrap(),
                    options: Vec::new(),
                })
                .unwrap(),
                1024,
            ),
            hashing: tokio::sync::Semaphore::new(HASHES_PER_CORE),
        })
    })
}

fn router(c: &mut Criterion) {
    gavel::http::request_id::init_core(0);
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => panic!("cannot build a runtime: {e}"),
    };
    let keys = match Keys::new(&[7u8; 32]) {
        Ok(keys) => Arc::new(keys),
        Err(_) => panic!("a 32-byte secret is long enough"),
    };
    let (token, _) = keys.mint(3, Role::Bidder, Duration::from_secs(3600));
    let bearer = format!("Bearer {token}");
    let app = gavel::http::app(core(&rt, keys));

    let get = || Request::get("/api/auctions/1").body(Body::empty()).unwrap_or_default();
    // Below the cached minimum of 1010: rejected on the core, never reaching the database.
    let bid = || {
        Request::post("/api/bids")
            .header(header::CONTENT_TYPE, "application/json")
            .header(header::AUTHORIZATION, bearer.as_str())
            .body(Body::from(&br#"{"auction_id":1,"amount":500}"#[..]))
            .unwrap_or_default()
    };
    // Checked once, so that neither benchmark can quietly measure a 404 or a 500.
    let answer = |request: Request<Body>| {
        rt.block_on(async {
            let response = app.clone().oneshot(request).await.unwrap_or_else(|e| match e {});
            let status = response.status();
            let body = response.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
            (status, String::from_utf8_lossy(&body).into_owned())
        })
    };
    let (status, body) = answer(get());
    assert_eq!(status, StatusCode::OK, "GET /api/auctions/1 must be served from the cache: {body}");
    assert!(body.contains(r#""id":1,"#), "not auction 1: {body}");
    let (status, body) = answer(bid());
    assert_eq!(status, StatusCode::CONFLICT, "the low bid must be rejected on the core: {body}");
    assert!(body.contains("/problems/bid-too-low"), "not rejected as too low: {body}");

    let mut group = c.benchmark_group("router");
    group.bench_function("get_auction_cached", |b| b.iter(|| rt.block_on(app.clone().oneshot(get()))));
    group.bench_function("post_bid_too_low_local", |b| b.iter(|| rt.block_on(app.clone().oneshot(bid()))));
    group.finish();
}

criterion_group! {
    name = hot_paths;
    config = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .sample_size(30);
    targets = json_parse, serialise, cache, problem, router
}
criterion_main!(hot_paths);

//! The batched bid path: what one `place_bids` call decides for each of its bids,
//! several batches in flight on one auction, what a batch announces, and what a
//! crash of PostgreSQL does to acknowledged bids.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use gavel::db::batch::{BatchLimits, BatchStart, BatchWrite, Batcher, Lanes};
use gavel::db::bids::{self, Announcer, BidRequest, Bids, Placed};
use gavel::domain::bid::NewBid;
use reqwest::StatusCode;
use serde_json::Value;
use sqlx::postgres::{PgListener, PgPoolOptions};

use crate::helpers::{TestApp, eventually, spawn_app, spawn_app_with};

fn request(auction_id: i64, bidder: i64, amount: i64, key: Option<&str>) -> BidRequest {
    BidRequest {
        bid: NewBid::parse(auction_id, amount, None, bidder).unwrap(),
        idempotency_key: key.map(str::to_owned),
    }
}

fn proxy_request(auction_id: i64, bidder: i64, amount: i64, max_amount: i64) -> BidRequest {
    BidRequest { bid: NewBid::parse(auction_id, amount, Some(max_amount), bidder).unwrap(), idempotency_key: None }
}

/// Places `requests` as one batch, as the batcher would.
async fn place(app: &TestApp, requests: &[BidRequest]) -> Vec<Placed> {
    let refs: Vec<&BidRequest> = requests.iter().collect();
    bids::place(&app.db, &refs).await.expect("the batch succeeds")
}

async fn bid_rows(app: &TestApp, auction_id: i64) -> Vec<(i64, i64, i64)> {
    sqlx::query_as("select id, bidder_id, amount from bids where auction_id = $1 order by id")
        .bind(auction_id)
        .fetch_all(&app.db)
        .await
        .unwrap()
}

fn accepted_amount(p: &Placed) -> i64 {
    match p {
        Placed::Accepted { amount, .. } => *amount,
        other => panic!("expected an accepted bid, got {other:?}"),
    }
}

/// One batch mixing good and bad bids: each gets its own outcome, in the order
/// of the batch, and no bad one fails the others.
#[tokio::test]
async fn one_batch_of_good_and_bad_bids_gives_each_its_own_outcome() {
    let app = spawn_app().await;
    let a = app.open_auction(100, 10, 60.0, 0).await["id"].as_i64().unwrap();
    let b = app.open_auction(500, 5, 60.0, 0).await["id"].as_i64().unwrap();
    let ended = app.open_auction(100, 10, 60.0, 0).await["id"].as_i64().unwrap();
    sqlx::query(
        "update auctions set starts_at = now() - interval '2 min', ends_at = now() - interval '1 min' where id = $1",
    )
    .bind(ended)
    .execute(&app.db)
    .await
    .unwrap();

    let outcomes = place(
        &app,
        &[
            request(b, 3, 500, None),        // accepted: the reserve
            request(a, 2, 100, None),        // accepted: the reserve
            request(999_999, 2, 100, None),  // no such auction
            request(a, 4, 105, None),        // below 100 + 10
            request(a, 999_999, 1000, None), // no such account
            request(ended, 2, 1000, None),   // too late
            request(a, 5, 110, Some("k-1")), // accepted, keyed
            request(a, 5, 110, Some("k-1")), // the same key again: the first is still running
            request(b, 6, 504, None),        // below 500 + 5
            request(a, 6, 500, None),        // accepted: beats the keyed one
        ],
    )
    .await;

    assert_eq!(accepted_amount(&outcomes[0]), 500);
    assert_eq!(accepted_amount(&outcomes[1]), 100);
    assert_eq!(outcomes[2], Placed::NotFound);
    assert_eq!(outcomes[3], Placed::TooLow { min_next_bid: 110 });
    assert_eq!(outcomes[4], Placed::UnknownAccount);
    assert_eq!(outcomes[5], Placed::Closed);
    let Placed::Accepted { state: Some(keyed_state), .. } = outcomes[6] else { panic!("keyed bid: {:?}", outcomes[6]) };
    assert_eq!(outcomes[7], Placed::KeyInUse);
    assert_eq!(outcomes[8], Placed::TooLow { min_next_bid: 505 });
    let Placed::Accepted { state: Some(last), min_next_bid, .. } = outcomes[9] else { panic!("{:?}", outcomes[9]) };
    assert_eq!(min_next_bid, 510);

    // The states each accepted bid reports follow one another.
    assert_eq!((keyed_state.version, keyed_state.bid_count, keyed_state.high_bidder), (3, 2, 5));
    assert_eq!((last.version, last.bid_count, last.high_bid, last.high_bidder), (4, 3, 500, 6));

    // The table holds exactly the accepted bids, in acceptance order.
    let rows: Vec<(i64, i64)> =
        bid_rows(&app, a).await.into_iter().map(|(_, bidder, amount)| (bidder, amount)).collect();
    assert_eq!(rows, [(2, 100), (5, 110), (6, 500)]);
    assert_eq!(bid_rows(&app, b).await.len(), 1);
    assert!(bid_rows(&app, ended).await.is_empty());
    let read = app.auction(a, true).await;
    assert_eq!(
        (read["high_bid"].as_i64(), read["bid_count"].as_i64(), read["version"].as_i64()),
        (Some(500), Some(3), Some(4))
    );
}

/// A batch's bids were all waiting at once, so gavel decides each auction's in
/// rising amounts: a bid is never refused for a higher one of its own batch
/// that happened to arrive first. Equal amounts keep their arrival order.
#[tokio::test]
async fn a_batch_decides_one_auctions_bids_in_rising_amounts() {
    let app = spawn_app().await;
    let a = app.open_auction(100, 10, 60.0, 0).await["id"].as_i64().unwrap();

    let outcomes = place(
        &app,
        &[
            request(a, 2, 300, None), // accepted last: it leads
            request(a, 3, 200, None), // accepted second
            request(a, 4, 150, None), // accepted first
            request(a, 5, 200, None), // below 200 + 10: the earlier 200 went first
        ],
    )
    .await;

    assert_eq!(outcomes.iter().take(3).map(accepted_amount).collect::<Vec<_>>(), [300, 200, 150]);
    assert_eq!(outcomes[3], Placed::TooLow { min_next_bid: 210 });
    let Placed::Accepted { state: Some(last), .. } = outcomes[0] else { panic!("{:?}", outcomes[0]) };
    assert_eq!((last.high_bid, last.high_bidder, last.bid_count), (300, 2, 3));
    let rows: Vec<(i64, i64)> =
        bid_rows(&app, a).await.into_iter().map(|(_, bidder, amount)| (bidder, amount)).collect();
    assert_eq!(rows, [(4, 150), (3, 200), (2, 300)]);
}

/// Equal maximums go to the earlier bid, in a batch too, whatever their
/// amounts: a batch orders one auction's bids by maximum, not by amount.
#[tokio::test]
async fn of_equal_maximums_in_one_batch_the_earlier_leads() {
    let app = spawn_app().await;
    let a = app.open_auction(100, 10, 60.0, 0).await["id"].as_i64().unwrap();

    let outcomes = place(&app, &[proxy_request(a, 2, 300, 1000), proxy_request(a, 3, 200, 1000)]).await;

    let Placed::Accepted { state: Some(state), .. } = outcomes[0] else { panic!("the earlier leads: {outcomes:?}") };
    assert_eq!((state.high_bid, state.high_bidder), (300, 2));
    assert_eq!(outcomes[1], Placed::TooLow { min_next_bid: 310 });
}

/// A bidder's key used twice in one batch: the first to arrive runs, and the
/// other is answered as a retry made while the first still runs (409), whatever
/// its body and wherever the batch's order would put it.
#[tokio::test]
async fn a_key_used_twice_in_one_batch_goes_to_the_first_to_arrive() {
    let app = spawn_app().await;
    let low = app.open_auction(100, 10, 60.0, 0).await["id"].as_i64().unwrap();
    let high = app.open_auction(100, 10, 60.0, 0).await["id"].as_i64().unwrap();

    let outcomes = place(
        &app,
        &[
            request(high, 2, 300, Some("k")),
            request(high, 2, 200, Some("k")), // lower: sorted before the first
            request(low, 2, 100, Some("k")),  // on an auction sorted first
            request(high, 3, 150, Some("k")), // another bidder's key: accepted, then outbid
        ],
    )
    .await;

    assert_eq!(accepted_amount(&outcomes[0]), 300);
    assert_eq!(outcomes[1..3], [Placed::KeyInUse, Placed::KeyInUse]);
    assert_eq!(accepted_amount(&outcomes[3]), 150);
    assert!(bid_rows(&app, low).await.is_empty());
    let again = place(&app, &[request(high, 2, 300, Some("k")), request(low, 2, 100, Some("k"))]).await;
    assert!(matches!(again[0], Placed::Accepted { amount: 300, state: None, .. }), "a replay: {again:?}");
    assert_eq!(again[1], Placed::KeyInUse);
}

/// place_bids judges a bid by the time its statement starts: with a bid lane, a
/// batch's transaction begins before the batch is complete, and a bid that came
/// after its auction's end must not pass as in time because its transaction
/// began before it, nor push the end out.
#[tokio::test]
async fn a_bid_after_the_end_is_refused_in_a_transaction_begun_before_it() {
    let app = spawn_app_with(&["--lifecycle-tick", "1h"]).await;
    let plain = app.open_auction(100, 10, 1.0, 0).await["id"].as_i64().unwrap();
    let sniped = app.open_auction(100, 10, 1.0, 30).await["id"].as_i64().unwrap();
    let ends_at = |id: i64| {
        sqlx::query_scalar::<_, chrono::DateTime<chrono::Utc>>("select ends_at from auctions where id = $1")
            .bind(id)
            .fetch_one(&app.db)
    };
    let (plain_end, sniped_end) = (ends_at(plain).await.unwrap(), ends_at(sniped).await.unwrap());

    let mut tx = app.db.begin().await.unwrap();
    sqlx::query("select 1").execute(&mut *tx).await.unwrap();
    eventually(Duration::from_secs(10), "both auctions ended by the database's clock", || async {
        sqlx::query_scalar::<_, bool>("select clock_timestamp() > greatest($1, $2)")
            .bind(plain_end)
            .bind(sniped_end)
            .fetch_one(&app.db)
            .await
            .unwrap()
            .then_some(())
    })
    .await;
    let refs = [request(plain, 2, 100, None), request(sniped, 2, 100, None)];
    let outcomes = bids::place(&mut *tx, &refs.iter().collect::<Vec<_>>()).await.unwrap();
    tx.commit().await.unwrap();

    assert_eq!(outcomes, [Placed::Closed, Placed::Closed]);
    assert!(bid_rows(&app, plain).await.is_empty() && bid_rows(&app, sniped).await.is_empty());
    assert_eq!(ends_at(sniped).await.unwrap(), sniped_end, "the end was not pushed out");
}

/// gavel sends a batch sorted by auction; sent in any other order, place_bids
/// sorts it itself and still decides each auction's bids in the order sent.
#[tokio::test]
async fn place_bids_decides_an_unsorted_batch_in_the_order_sent() {
    let app = spawn_app().await;
    let a = app.open_auction(100, 10, 60.0, 0).await["id"].as_i64().unwrap();
    let b = app.open_auction(500, 5, 60.0, 0).await["id"].as_i64().unwrap();
    let rows: Vec<(i32, String)> =
        sqlx::query_as("select ord, outcome from place_bids($1, $2, $3, $4, $5, $6) order by ord")
            .bind([b, a, b, a, a])
            .bind([2i64, 3, 4, 5, 6])
            .bind([500i64, 100, 504, 105, 110])
            .bind([None::<i64>, None, None, None, None])
            .bind([None::<String>, None, None, None, None])
            .bind([None::<String>, None, None, None, None])
            .fetch_all(&app.db)
            .await
            .unwrap();
    let outcomes: Vec<&str> = rows.iter().map(|(_, o)| o.as_str()).collect();
    assert_eq!(outcomes, ["accepted", "accepted", "too_low", "too_low", "accepted"]);
    let amounts: Vec<(i64, i64)> =
        bid_rows(&app, a).await.into_iter().map(|(_, bidder, amount)| (bidder, amount)).collect();
    assert_eq!(amounts, [(3, 100), (6, 110)]);
}

/// Bids have no foreign keys (place_bids checks what they refer to); what they
/// refer to never goes away instead: deleting, truncating or renumbering accounts
/// and auctions is refused.
#[tokio::test]
async fn accounts_and_auctions_bids_refer_to_are_never_removed() {
    let app = spawn_app().await;
    let id = app.open_auction(100, 10, 60.0, 0).await["id"].as_i64().unwrap();
    assert_eq!(app.place_bid(&app.bidder(2), id, 100).await.status(), StatusCode::CREATED);
    for sql in [
        format!("delete from auctions where id = {id}"),
        "delete from accounts where id = 2".to_owned(),
        "truncate auctions, bids, auction_images".to_owned(),
        "truncate accounts cascade".to_owned(),
        format!("update auctions set id = default where id = {id}"),
        "update accounts set id = default where id = 2".to_owned(),
    ] {
        let err = sqlx::query(&sql).execute(&app.db).await.expect_err(&sql);
        let code = err.as_database_error().and_then(|e| e.code()).map(|c| c.into_owned());
        assert_eq!(code.as_deref(), Some("23001"), "{sql}: {err}");
    }
    assert_eq!(bid_rows(&app, id).await.len(), 1, "the bid and what it names are all still there");
}

/// Only an accepted bid pushes the end out: a late bid that is too low does not.
#[tokio::test]
async fn a_late_bid_that_is_rejected_does_not_extend_the_auction() {
    let app = spawn_app().await;
    let id = app.open_auction(100, 10, 5.0, 30).await["id"].as_i64().unwrap();
    let end = |o: &Placed| match o {
        Placed::Accepted { ends_at, .. } => *ends_at,
        other => panic!("{other:?}"),
    };
    let original: chrono::DateTime<chrono::Utc> =
        sqlx::query_scalar("select ends_at from auctions where id = $1").bind(id).fetch_one(&app.db).await.unwrap();

    let outcomes = place(&app, &[request(id, 2, 90, None), request(id, 3, 100, None), request(id, 4, 105, None)]).await;
    assert_eq!(outcomes[0], Placed::TooLow { min_next_bid: 100 });
    assert_eq!(end(&outcomes[1]), original + chrono::Duration::seconds(30), "the accepted late bid extends");
    assert_eq!(outcomes[2], Placed::TooLow { min_next_bid: 110 });
    let now_ends: chrono::DateTime<chrono::Utc> =
        sqlx::query_scalar("select ends_at from auctions where id = $1").bind(id).fetch_one(&app.db).await.unwrap();
    assert_eq!(now_ends, original + chrono::Duration::seconds(30), "the rejected ones did not");
}

/// Bids on one auction spread over several batches in the database at once:
/// the row lock orders them, every acknowledged bid is in the table, and accepted
/// amounts rise strictly in bid id order.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bids_on_one_auction_over_several_batches_in_flight_stay_ordered() {
    several_batches_on_one_auction(1, None).await;
}

/// The same from two cores' batchers sharing one lane: a batch gives the lane
/// back before its commit, so the next one runs while it commits and waits for
/// its row lock; the order still holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bids_on_one_auction_from_two_cores_sharing_a_lane_stay_ordered() {
    several_batches_on_one_auction(2, Some(Lanes::new(1))).await;
}

async fn several_batches_on_one_auction(cores: usize, lanes: Option<Lanes>) {
    let app = spawn_app().await;
    let id = app.open_auction(100, 1, 120.0, 0).await["id"].as_i64().unwrap();
    let most_in_flight = Arc::new(AtomicUsize::new(0));
    let mut batchers = Vec::new();
    for _ in 0..cores {
        let pool = PgPoolOptions::new().max_connections(4).connect_with(app.options.clone()).await.unwrap();
        let seen = most_in_flight.clone();
        let primary = gavel::db::Primary::new(pool);
        batchers.push(Batcher::spawn(
            primary.clone(),
            Bids::new(Announcer::spawn(primary)),
            BatchLimits {
                queue_depth: 1024,
                max_batch: 8,
                in_flight: 3,
                overlap_at: 1,
                overlap_after: Duration::ZERO,
                lanes: lanes.clone(),
                write_timeout: gavel::db::batch::WRITE_TIMEOUT,
            },
            Box::new(move |b: BatchStart| {
                seen.fetch_max(b.in_flight, Ordering::Relaxed);
            }),
        ));
    }

    // 400 bids from 40 tasks spread over the batchers; amounts interleave, so many
    // are too low by the time the database sees them.
    let mut tasks = Vec::new();
    for t in 0..40i64 {
        let batcher = batchers[t as usize % cores].clone();
        tasks.push(tokio::spawn(async move {
            let mut outcomes = Vec::new();
            for i in 0..10i64 {
                let amount = 100 + i * 40 + t;
                outcomes.push(batcher.submit(request(id, 2 + t, amount, None)).await.expect("no batch fails"));
            }
            outcomes
        }));
    }
    let mut accepted = Vec::new();
    for task in tasks {
        for outcome in task.await.unwrap() {
            match outcome {
                Placed::Accepted { bid_id, amount, state: Some(state), .. } => {
                    accepted.push((bid_id, amount, state.version))
                }
                Placed::TooLow { .. } => {}
                other => panic!("unexpected {other:?}"),
            }
        }
    }
    assert!(most_in_flight.load(Ordering::Relaxed) > 1, "batches overlapped in the database");
    accepted.sort();
    let rows: Vec<(i64, i64)> = bid_rows(&app, id).await.into_iter().map(|(bid, _, amount)| (bid, amount)).collect();
    let acknowledged: Vec<(i64, i64)> = accepted.iter().map(|&(bid, amount, _)| (bid, amount)).collect();
    assert_eq!(rows, acknowledged, "the table is exactly the acknowledged bids");
    assert!(rows.windows(2).all(|w| w[1].1 > w[0].1), "amounts rise with bid ids: {rows:?}");
    let versions: HashSet<i64> = accepted.iter().map(|a| a.2).collect();
    assert_eq!(versions.len(), accepted.len(), "each acceptance is its own version");
    let read = app.auction(id, true).await;
    assert_eq!(read["high_bid"].as_i64(), rows.last().map(|r| r.1));
    assert_eq!(read["bid_count"].as_i64(), Some(rows.len() as i64));
}

/// A batch announces itself once, after its commit, with each changed auction's
/// last state only; a batch that changed nothing announces nothing.
#[tokio::test]
async fn a_batch_announces_the_last_state_of_each_auction_once() {
    let app = spawn_app().await;
    let a = app.open_auction(100, 10, 60.0, 0).await["id"].as_i64().unwrap();
    let b = app.open_auction(100, 10, 60.0, 0).await["id"].as_i64().unwrap();
    let mut listener = PgListener::connect_with(&app.db).await.unwrap();
    listener.listen(gavel::db::CACHE_CHANNEL).await.unwrap();

    let outcomes = place(
        &app,
        &[request(a, 2, 100, None), request(b, 3, 100, None), request(a, 4, 200, None), request(a, 5, 150, None)],
    )
    .await;
    let bids = Bids::new(Announcer::spawn(gavel::db::Primary::new(app.db.clone())));
    bids.committed(&outcomes);
    let rejected = place(&app, &[request(a, 2, 100, None)]).await;
    bids.committed(&rejected);

    let mut payloads = Vec::new();
    // Whatever else was sent arrives within the half second after the first.
    let first = tokio::time::timeout(Duration::from_secs(5), listener.recv()).await.expect("notified").unwrap();
    payloads.push(first.payload().to_owned());
    while let Ok(more) = tokio::time::timeout(Duration::from_millis(500), listener.recv()).await {
        payloads.push(more.unwrap().payload().to_owned());
    }
    assert_eq!(payloads.len(), 1, "one notification for the batch, none for the rejected one: {payloads:?}");
    let gavel::db::notice::Notice::Bids(states, _) = gavel::db::notice::parse(&payloads[0]).unwrap().notice else {
        panic!("not a bids notice: {}", payloads[0])
    };
    let summary: Vec<(i64, i64, i64, i64)> =
        states.iter().map(|s| (s.auction_id, s.version, s.high_bid, s.high_bidder)).collect();
    // Three bids accepted on `a` (decided in rising amount: 100, 150, 200), one
    // state announced: the last.
    assert_eq!(summary, [(a, 4, 200, 4), (b, 2, 100, 3)]);
}

/// PostgreSQL crashes (a backend killed, so the postmaster restarts every process
/// and replays its WAL) while bids stream in: every bid acknowledged with 201 is
/// in the table afterwards, the server answers with 503 rather than 500 while the
/// database is away, and it accepts bids again once it is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn acknowledged_bids_survive_a_postgres_crash() {
    let app = spawn_app().await;
    let mut ids = Vec::new();
    for _ in 0..4 {
        ids.push(app.open_auction(100, 1, 300.0, 0).await["id"].as_i64().unwrap());
    }
    let started = Instant::now();
    let load_for = Duration::from_secs(6);
    let mut tasks = Vec::new();
    for c in 0..8i64 {
        let (url, token, ids) = (app.url("/api/bids"), app.bidder(10 + c), ids.clone());
        tasks.push(tokio::spawn(async move {
            let client = reqwest::Client::builder().timeout(Duration::from_secs(10)).build().unwrap();
            let mut acknowledged = Vec::new();
            let mut statuses = Vec::new();
            let mut i = 0i64;
            while started.elapsed() < load_for {
                i += 1;
                let id = ids[(i as usize + c as usize) % ids.len()];
                // Rising with time, so nearly every bid leads.
                let amount = 100 + started.elapsed().as_micros() as i64 * 8 + c;
                let sent = client
                    .post(&url)
                    .bearer_auth(&token)
                    .json(&serde_json::json!({"auction_id": id, "amount": amount}));
                let Ok(response) = sent.send().await else {
                    statuses.push(0);
                    continue;
                };
                let status = response.status();
                statuses.push(status.as_u16());
                if status == StatusCode::CREATED {
                    let body: Value = response.json().await.unwrap();
                    acknowledged.push((body["bid_id"].as_i64().unwrap(), id, body["amount"].as_i64().unwrap()));
                }
            }
            (acknowledged, statuses)
        }));
    }

    // Let bids flow, then crash the database under them.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let backend: i32 = sqlx::query_scalar(
        "select pid from pg_stat_activity where application_name like 'gavel-core-%' \
         and application_name not like '%-listen' order by pid limit 1",
    )
    .fetch_one(&app.db)
    .await
    .unwrap();
    let accepted_before: i64 = sqlx::query_scalar("select count(*) from bids").fetch_one(&app.db).await.unwrap();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(backend), nix::sys::signal::Signal::SIGKILL).unwrap();
    let crashed_at = started.elapsed();

    let mut acknowledged = Vec::new();
    let mut statuses = Vec::new();
    for task in tasks {
        let (a, s) = task.await.unwrap();
        acknowledged.extend(a);
        statuses.extend(s);
    }
    assert!(accepted_before > 0, "bids were accepted before the crash");
    assert!(statuses.iter().all(|s| [201, 409, 503].contains(s)), "only 201, 409 and 503: {:?}", {
        let mut odd: Vec<_> = statuses.iter().filter(|s| ![201, 409, 503].contains(*s)).collect();
        odd.dedup();
        odd
    });

    // Every acknowledged bid is in the table, as acknowledged.
    let rows: HashSet<(i64, i64, i64)> = eventually(Duration::from_secs(30), "the database is back", || async {
        sqlx::query_as::<_, (i64, i64, i64)>("select id, auction_id, amount from bids").fetch_all(&app.db).await.ok()
    })
    .await
    .into_iter()
    .collect();
    let lost: Vec<_> = acknowledged.iter().filter(|b| !rows.contains(b)).collect();
    assert!(lost.is_empty(), "{} of {} acknowledged bids lost: {lost:?}", lost.len(), acknowledged.len());

    // And the server takes bids again after the crash.
    eventually(Duration::from_secs(30), "a bid is accepted after the crash", || async {
        let amount = 100 + started.elapsed().as_micros() as i64 * 8 + 99;
        let response = app.place_bid(&app.bidder(50), ids[0], amount).await;
        (response.status() == StatusCode::CREATED).then_some(())
    })
    .await;
    assert!(crashed_at < load_for, "the crash happened under load");
}

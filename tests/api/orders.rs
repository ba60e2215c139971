//! Orders: all-or-nothing reservations, their lifecycle, who may see and move
//! them, and no overselling under concurrency.

use std::collections::HashMap;
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::Value;

use crate::helpers::{TestApp, assert_problem, eventually, fresh_connection_client, spawn_app};
use crate::shop::{expected_lines, lines_of, order_body};

/// An order reserves every line: each moves its quantity from `available` to `reserved`.
#[tokio::test]
async fn an_order_reserves_stock_for_every_line() {
    let app = spawn_app().await;
    app.stock(1, "apple", 10).await;
    app.stock(2, "pear", 5).await;
    let before = app.item("apple", true).await["version"].as_i64().unwrap();

    let response = app.place_order(&app.bidder(10), &[("apple", 3), ("pear", 2)], None).await;
    assert_eq!(response.status(), StatusCode::CREATED);
    let order: Value = response.json().await.unwrap();
    assert!(order["id"].as_i64().unwrap() > 0);
    assert_eq!(order["buyer_id"], 10);
    assert_eq!(order["status"], "reserved");
    assert!(order["created_at"].is_string(), "{order}");
    assert_eq!(lines_of(&order), [("apple".to_owned(), 3, 1), ("pear".to_owned(), 2, 2)]);

    assert_eq!(app.levels("apple").await, (7, 3));
    assert_eq!(app.levels("pear").await, (3, 2));
    assert!(app.item("apple", true).await["version"].as_i64().unwrap() > before);

    let read = app.get_order(Some(&app.bidder(10)), order["id"].as_i64().unwrap()).await;
    assert_eq!(read.status(), StatusCode::OK);
    assert_eq!(read.json::<Value>().await.unwrap(), order);
}

/// A line short of stock refuses the whole order, names the sku and what it has,
/// and changes nothing, for the lines before and after it alike.
#[tokio::test]
async fn an_order_short_of_stock_is_409_and_reserves_nothing() {
    let app = spawn_app().await;
    let apple = app.stock(1, "apple", 10).await;
    let pear = app.stock(1, "pear", 1).await;
    let bidder = app.bidder(10);

    // The second line cannot be met.
    let short = app.place_order(&bidder, &[("apple", 2), ("pear", 2)], None).await;
    let problem = assert_problem(short, StatusCode::CONFLICT, "/problems/insufficient-stock").await;
    assert_eq!(problem["sku"], "pear");
    assert_eq!(problem["available"], 1);
    assert_eq!(app.item("apple", true).await, apple, "apple untouched");
    assert_eq!(app.item("pear", true).await, pear, "pear untouched");

    // The first line cannot be met.
    let short = app.place_order(&bidder, &[("pear", 5), ("apple", 1)], None).await;
    let problem = assert_problem(short, StatusCode::CONFLICT, "/problems/insufficient-stock").await;
    assert_eq!(problem["sku"], "pear");
    assert_eq!(problem["available"], 1);
    assert_eq!(app.item("apple", true).await, apple);
    assert_eq!(app.item("pear", true).await, pear);

    // Exactly what is there can be had.
    app.order(&bidder, &[("apple", 10), ("pear", 1)]).await;
    assert_eq!(app.levels("apple").await, (0, 10));
    assert_eq!(app.levels("pear").await, (0, 1));
    let problem = assert_problem(
        app.place_order(&bidder, &[("apple", 1)], None).await,
        StatusCode::CONFLICT,
        "/problems/insufficient-stock",
    )
    .await;
    assert_eq!(problem["sku"], "apple");
    assert_eq!(problem["available"], 0);
}

#[tokio::test]
async fn an_unknown_sku_is_422_naming_it() {
    let app = spawn_app().await;
    let apple = app.stock(1, "apple", 10).await;
    let response = app.place_order(&app.bidder(10), &[("apple", 1), ("ghost", 1)], None).await;
    let problem = assert_problem(response, StatusCode::UNPROCESSABLE_ENTITY, "/problems/unknown-sku").await;
    assert_eq!(problem["sku"], "ghost");
    assert_eq!(app.item("apple", true).await, apple);
}

/// No lines, a quantity that is not positive, or a sku twice: refused before anything is touched.
#[tokio::test]
async fn invalid_order_lines_are_422() {
    let app = spawn_app().await;
    let apple = app.stock(1, "apple", 10).await;
    let bidder = app.bidder(10);
    for lines in [&[][..], &[("apple", 0)][..], &[("apple", -2)][..], &[("apple", 1), ("apple", 2)][..]] {
        let response = app.place_order(&bidder, lines, None).await;
        assert_problem(response, StatusCode::UNPROCESSABLE_ENTITY, "/problems/validation").await;
    }
    assert_eq!(app.item("apple", true).await, apple);
}

/// Sellers neither order nor bid; an order needs a token.
#[tokio::test]
async fn only_bidders_place_orders_and_sellers_cannot_bid() {
    let app = spawn_app().await;
    let apple = app.stock(1, "apple", 10).await;
    let by_seller = app.place_order(&app.seller_as(2), &[("apple", 1)], None).await;
    assert_problem(by_seller, StatusCode::FORBIDDEN, "/problems/forbidden").await;
    let by_own_seller = app.place_order(&app.seller(), &[("apple", 1)], None).await;
    assert_problem(by_own_seller, StatusCode::FORBIDDEN, "/problems/forbidden").await;
    let anonymous = app.post_anon("/api/orders", &order_body(&[("apple", 1)])).await;
    assert_problem(anonymous, StatusCode::UNAUTHORIZED, "/problems/unauthorized").await;
    assert_eq!(app.item("apple", true).await, apple);

    let id = app.open_auction(100, 10, 60.0, 0).await["id"].as_i64().unwrap();
    assert_problem(app.place_bid(&app.seller_as(2), id, 100).await, StatusCode::FORBIDDEN, "/problems/forbidden").await;
    assert_eq!(app.auction(id, true).await["bid_count"], 0);
}

/// A retry with the same key and body answers the original and reserves nothing
/// more; the same key with another body is refused.
#[tokio::test]
async fn a_retried_order_returns_the_original_and_reserves_nothing_more() {
    let app = spawn_app().await;
    app.stock(1, "apple", 10).await;
    let bidder = app.bidder(10);
    let first = app.place_order(&bidder, &[("apple", 2)], Some("order-1")).await;
    assert_eq!(first.status(), StatusCode::CREATED);
    let first: Value = first.json().await.unwrap();
    // Someone else orders meanwhile; the retry still answers what the first attempt did.
    app.order(&app.bidder(11), &[("apple", 1)]).await;

    let retry = app.place_order(&bidder, &[("apple", 2)], Some("order-1")).await;
    assert_eq!(retry.status(), StatusCode::CREATED);
    assert_eq!(retry.json::<Value>().await.unwrap(), first);
    assert_eq!(app.levels("apple").await, (7, 3), "the retry reserved nothing");

    let reused = app.place_order(&bidder, &[("apple", 3)], Some("order-1")).await;
    assert_problem(reused, StatusCode::UNPROCESSABLE_ENTITY, "/problems/idempotency-key-reused").await;
    assert_eq!(app.levels("apple").await, (7, 3));

    // A new key is a new order; another buyer's identical key is another request.
    let second: Value = app.place_order(&bidder, &[("apple", 2)], Some("order-2")).await.json().await.unwrap();
    assert_ne!(second["id"], first["id"]);
    let theirs = app.place_order(&app.bidder(12), &[("apple", 2)], Some("order-1")).await;
    assert_eq!(theirs.status(), StatusCode::CREATED);
    let theirs: Value = theirs.json().await.unwrap();
    assert_eq!(theirs["buyer_id"], 12);
    assert_ne!(theirs["id"], first["id"]);
    assert_eq!(app.levels("apple").await, (3, 7));
}

/// A retry answers what the first attempt answered, even after the order has
/// since changed (here: cancelled); it does not reserve again.
#[tokio::test]
async fn a_retry_after_a_cancel_still_returns_the_original_order() {
    let app = spawn_app().await;
    app.stock(1, "apple", 10).await;
    let bidder = app.bidder(10);
    let first: Value = app.place_order(&bidder, &[("apple", 2)], Some("k")).await.json().await.unwrap();
    assert_eq!(first["status"], "reserved");
    let id = first["id"].as_i64().unwrap();
    assert_eq!(app.cancel(&bidder, id).await.status(), StatusCode::OK);

    let retry = app.place_order(&bidder, &[("apple", 2)], Some("k")).await;
    assert_eq!(retry.status(), StatusCode::CREATED);
    assert_eq!(retry.json::<Value>().await.unwrap(), first);
    assert_eq!(app.levels("apple").await, (10, 0), "the retry reserved nothing");
}

/// Only the buyer sees an order; to anyone else it does not exist.
#[tokio::test]
async fn an_order_is_visible_only_to_its_buyer() {
    let app = spawn_app().await;
    app.stock(1, "apple", 10).await;
    let order = app.order(&app.bidder(10), &[("apple", 2)]).await;
    let id = order["id"].as_i64().unwrap();

    let mine = app.get_order(Some(&app.bidder(10)), id).await;
    assert_eq!(mine.status(), StatusCode::OK);
    let mine: Value = mine.json().await.unwrap();
    assert_eq!(mine["status"], "reserved");
    assert_eq!(mine["buyer_id"], 10);
    assert_eq!(lines_of(&mine), [("apple".to_owned(), 2, 1)]);

    for (who, token) in
        [("another bidder", app.bidder(11)), ("its seller", app.seller()), ("a seller", app.seller_as(2))]
    {
        let response = app.get_order(Some(&token), id).await;
        let problem = assert_problem(response, StatusCode::NOT_FOUND, "/problems/not-found").await;
        let missing =
            assert_problem(app.get_order(Some(&token), id + 1000).await, StatusCode::NOT_FOUND, "/problems/not-found")
                .await;
        assert_eq!(problem["detail"], missing["detail"], "{who}: existence does not leak");
    }
    assert_problem(app.get_order(None, id).await, StatusCode::UNAUTHORIZED, "/problems/unauthorized").await;
}

/// Cancelling returns the stock; only once, only by the buyer.
#[tokio::test]
async fn cancelling_returns_the_stock_to_available() {
    let app = spawn_app().await;
    app.stock(1, "apple", 10).await;
    app.stock(2, "pear", 4).await;
    let buyer = app.bidder(10);
    let order = app.order(&buyer, &[("apple", 3), ("pear", 4)]).await;
    let id = order["id"].as_i64().unwrap();

    let theirs = app.cancel(&app.bidder(11), id).await;
    assert_problem(theirs, StatusCode::NOT_FOUND, "/problems/not-found").await;
    assert_eq!(app.order_status(&buyer, id).await, "reserved");
    assert_eq!(app.levels("apple").await, (7, 3));

    let cancelled = app.cancel(&buyer, id).await;
    assert_eq!(cancelled.status(), StatusCode::OK);
    let cancelled: Value = cancelled.json().await.unwrap();
    assert_eq!(cancelled["id"], id);
    assert_eq!(cancelled["status"], "cancelled");
    assert_eq!(lines_of(&cancelled), lines_of(&order));
    assert_eq!(app.levels("apple").await, (10, 0));
    assert_eq!(app.levels("pear").await, (4, 0));
    assert_eq!(app.order_status(&buyer, id).await, "cancelled");

    let again = app.cancel(&buyer, id).await;
    assert_problem(again, StatusCode::CONFLICT, "/problems/order-state").await;
    assert_eq!(app.levels("apple").await, (10, 0), "a second cancel returns nothing twice");
    assert_eq!(app.levels("pear").await, (4, 0));
    assert_problem(app.cancel(&buyer, id + 1000).await, StatusCode::NOT_FOUND, "/problems/not-found").await;
}

/// Fulfilling lets the stock leave: reserved drops, available stays.
#[tokio::test]
async fn fulfilling_takes_the_stock_out_of_reserved() {
    let app = spawn_app().await;
    app.stock(1, "apple", 10).await;
    app.stock(1, "pear", 5).await;
    let buyer = app.bidder(10);
    let id = app.order(&buyer, &[("apple", 3), ("pear", 2)]).await["id"].as_i64().unwrap();
    let other = app.order(&app.bidder(11), &[("apple", 1)]).await["id"].as_i64().unwrap();
    assert_eq!(app.levels("apple").await, (6, 4));

    let fulfilled = app.fulfil(&app.seller(), id).await;
    assert_eq!(fulfilled.status(), StatusCode::OK);
    let fulfilled: Value = fulfilled.json().await.unwrap();
    assert_eq!(fulfilled["id"], id);
    assert_eq!(fulfilled["status"], "fulfilled");
    assert_eq!(app.levels("apple").await, (6, 1), "only this order's 3 left reserved");
    assert_eq!(app.levels("pear").await, (3, 0));
    assert_eq!(app.order_status(&buyer, id).await, "fulfilled");
    assert_eq!(app.order_status(&app.bidder(11), other).await, "reserved");

    assert_problem(app.fulfil(&app.seller(), id).await, StatusCode::CONFLICT, "/problems/order-state").await;
    assert_problem(app.cancel(&buyer, id).await, StatusCode::CONFLICT, "/problems/order-state").await;
    assert_eq!(app.levels("apple").await, (6, 1));
    assert_eq!(app.levels("pear").await, (3, 0));
}

/// Only a seller of every line may fulfil: a seller of some lines is refused,
/// one of none does not see the order, a bidder is refused.
#[tokio::test]
async fn only_a_seller_of_every_line_may_fulfil() {
    let app = spawn_app().await;
    app.stock(1, "apple", 10).await;
    app.stock(2, "pear", 5).await;
    let buyer = app.bidder(10);
    let mixed = app.order(&buyer, &[("apple", 2), ("pear", 1)]).await["id"].as_i64().unwrap();

    assert_problem(app.fulfil(&app.seller(), mixed).await, StatusCode::FORBIDDEN, "/problems/forbidden").await;
    assert_problem(app.fulfil(&app.seller_as(2), mixed).await, StatusCode::FORBIDDEN, "/problems/forbidden").await;
    assert_problem(app.fulfil(&app.seller_as(3), mixed).await, StatusCode::NOT_FOUND, "/problems/not-found").await;
    assert_problem(app.fulfil(&buyer, mixed).await, StatusCode::FORBIDDEN, "/problems/forbidden").await;
    assert_problem(app.fulfil(&app.bidder(11), mixed).await, StatusCode::FORBIDDEN, "/problems/forbidden").await;
    assert_eq!(app.order_status(&buyer, mixed).await, "reserved");
    assert_eq!(app.levels("apple").await, (8, 2));
    assert_eq!(app.levels("pear").await, (4, 1));

    // A seller's own single-seller order is theirs to fulfil.
    let apples = app.order(&buyer, &[("apple", 4)]).await["id"].as_i64().unwrap();
    assert_problem(app.fulfil(&app.seller_as(2), apples).await, StatusCode::NOT_FOUND, "/problems/not-found").await;
    assert_eq!(app.fulfil(&app.seller(), apples).await.status(), StatusCode::OK);
    assert_eq!(app.levels("apple").await, (4, 2));
    assert_eq!(app.levels("pear").await, (4, 1));
}

#[tokio::test]
async fn a_cancelled_order_cannot_be_fulfilled() {
    let app = spawn_app().await;
    app.stock(1, "apple", 10).await;
    let buyer = app.bidder(10);
    let id = app.order(&buyer, &[("apple", 4)]).await["id"].as_i64().unwrap();
    assert_eq!(app.cancel(&buyer, id).await.status(), StatusCode::OK);
    assert_problem(app.fulfil(&app.seller(), id).await, StatusCode::CONFLICT, "/problems/order-state").await;
    assert_eq!(app.levels("apple").await, (10, 0));
    assert_eq!(app.order_status(&buyer, id).await, "cancelled");
}

/// A tiny deterministic generator, so a failure can be replayed.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % n as u64) as usize
    }
}

const SCARCE: [(&str, i64); 5] =
    [("scarce-a", 12), ("scarce-b", 10), ("scarce-c", 10), ("scarce-d", 8), ("scarce-e", 6)];
const BUYERS: i64 = 16;
const ORDERS_PER_BUYER: usize = 6;
const MORE_ORDERS_PER_BUYER: usize = 3;

/// 1-3 distinct scarce skus in a random order (so lock order matters), 1-3 of each.
fn random_lines(rng: &mut Rng) -> Vec<(&'static str, i64)> {
    let mut pool: Vec<&'static str> = SCARCE.iter().map(|&(sku, _)| sku).collect();
    let count = 1 + rng.below(3);
    (0..count)
        .map(|_| {
            let sku = pool.remove(rng.below(pool.len()));
            (sku, 1 + rng.below(3) as i64)
        })
        .collect()
}

/// A placed order: its id, its buyer, its lines.
#[derive(Clone, Debug)]
struct Placed {
    id: i64,
    buyer: i64,
    lines: Vec<(&'static str, i64)>,
}

/// Places `lines` and checks the answer: a reserved order with exactly these lines,
/// or a 409 naming one of its skus with less than asked for. Anything else fails.
async fn try_order(
    client: &reqwest::Client,
    url: &str,
    token: &str,
    buyer: i64,
    lines: Vec<(&'static str, i64)>,
) -> Option<Placed> {
    let response = client.post(url).bearer_auth(token).json(&order_body(&lines)).send().await.expect("request");
    let status = response.status();
    let body: Value = response.json().await.expect("a JSON body");
    match status {
        StatusCode::CREATED => {
            assert_eq!(body["status"], "reserved", "{body}");
            assert_eq!(body["buyer_id"], buyer, "{body}");
            assert_eq!(lines_of(&body), expected_lines(&lines, 1), "{body}");
            Some(Placed { id: body["id"].as_i64().unwrap(), buyer, lines })
        }
        StatusCode::CONFLICT => {
            assert_eq!(body["type"], "/problems/insufficient-stock", "{body}");
            let sku = body["sku"].as_str().unwrap();
            let wanted = lines.iter().find(|(s, _)| *s == sku).unwrap_or_else(|| panic!("{sku} is a line: {body}")).1;
            let available = body["available"].as_i64().unwrap();
            assert!((0..wanted).contains(&available), "{sku} had {available}, fewer than the {wanted} asked: {body}");
            None
        }
        other => panic!("unexpected {other} for {lines:?}: {body}"),
    }
}

/// The quantity of each sku summed over `orders`.
fn sums<'a>(orders: impl IntoIterator<Item = &'a Placed>) -> HashMap<&'static str, i64> {
    let mut sums: HashMap<&'static str, i64> = SCARCE.iter().map(|&(sku, _)| (sku, 0)).collect();
    for order in orders {
        for &(sku, quantity) in &order.lines {
            *sums.get_mut(sku).unwrap() += quantity;
        }
    }
    sums
}

/// Every order reads back with the status expected of it, as its buyer sees it.
async fn assert_statuses(app: &TestApp, orders: &[Placed], status: &str) {
    for order in orders {
        let response = app.get_order(Some(&app.bidder(order.buyer)), order.id).await;
        assert_eq!(response.status(), StatusCode::OK);
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["status"], status, "order {}: {body}", order.id);
        assert_eq!(lines_of(&body), expected_lines(&order.lines, 1), "order {}", order.id);
    }
}

/// Many buyers on their own connections race for a few scarce skus, then orders
/// are fulfilled and cancelled while more are placed: no sku is ever oversold,
/// every 201 is exactly what is reserved, and every refusal changed nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_buyers_never_oversell() {
    let app = spawn_app().await;
    for (sku, stock) in SCARCE {
        app.stock(1, sku, stock).await;
    }
    let url = app.url("/api/orders");

    // Phase one: everyone orders at once.
    let mut tasks = Vec::new();
    for n in 0..BUYERS {
        let buyer = 100 + n;
        let token = app.bidder(buyer);
        let url = url.clone();
        tasks.push(tokio::spawn(async move {
            // One client each: its own connection, so the kernel spreads them over cores.
            let client = reqwest::Client::new();
            let mut rng = Rng::new(buyer as u64);
            let mut placed = Vec::new();
            let mut refused = 0;
            for _ in 0..ORDERS_PER_BUYER {
                match try_order(&client, &url, &token, buyer, random_lines(&mut rng)).await {
                    Some(p) => placed.push(p),
                    None => refused += 1,
                }
            }
            (placed, refused)
        }));
    }
    let mut placed: Vec<Placed> = Vec::new();
    let mut refused = 0;
    for task in tasks {
        let (mine, no) = task.await.unwrap();
        placed.extend(mine);
        refused += no;
    }
    assert!(!placed.is_empty(), "some orders were placed");
    assert!(refused > 0, "demand outstrips supply, so some orders were refused");

    let reserved = sums(&placed);
    for (sku, stock) in SCARCE {
        let (available, held) = app.levels(sku).await;
        assert_eq!(held, reserved[sku], "{sku}: reserved is exactly what the 201s hold");
        assert_eq!(available + held, stock, "{sku}: nothing lost or made up");
        assert!(available >= 0, "{sku}: never oversold");
    }
    assert_statuses(&app, &placed, "reserved").await;

    // Phase two: the seller fulfils a third, buyers cancel another third and order
    // more, all at once.
    placed.sort_by_key(|p| p.id);
    let to_fulfil: Vec<Placed> = placed.iter().step_by(3).cloned().collect();
    let to_cancel: Vec<Placed> = placed.iter().skip(1).step_by(3).cloned().collect();
    let kept: Vec<Placed> = placed.iter().skip(2).step_by(3).cloned().collect();

    let mut tasks = Vec::new();
    {
        let seller = app.seller();
        let base = app.url("/api/orders");
        let ids: Vec<i64> = to_fulfil.iter().map(|p| p.id).collect();
        tasks.push(tokio::spawn(async move {
            let client = reqwest::Client::new();
            for id in ids {
                let response = client.post(format!("{base}/{id}/fulfil")).bearer_auth(&seller).send().await.unwrap();
                let status = response.status();
                let body: Value = response.json().await.unwrap();
                assert_eq!(status, StatusCode::OK, "fulfil {id}: {body}");
                assert_eq!(body["status"], "fulfilled", "{body}");
            }
            Vec::new()
        }));
    }
    for n in 0..BUYERS {
        let buyer = 100 + n;
        let token = app.bidder(buyer);
        let url = url.clone();
        let mine: Vec<i64> = to_cancel.iter().filter(|p| p.buyer == buyer).map(|p| p.id).collect();
        tasks.push(tokio::spawn(async move {
            let client = reqwest::Client::new();
            for id in mine {
                let response = client.post(format!("{url}/{id}/cancel")).bearer_auth(&token).send().await.unwrap();
                let status = response.status();
                let body: Value = response.json().await.unwrap();
                assert_eq!(status, StatusCode::OK, "cancel {id}: {body}");
                assert_eq!(body["status"], "cancelled", "{body}");
            }
            let mut rng = Rng::new(1000 + buyer as u64);
            let mut more = Vec::new();
            for _ in 0..MORE_ORDERS_PER_BUYER {
                more.extend(try_order(&client, &url, &token, buyer, random_lines(&mut rng)).await);
            }
            more
        }));
    }
    let mut more: Vec<Placed> = Vec::new();
    for task in tasks {
        more.extend(task.await.unwrap());
    }

    let fulfilled = sums(&to_fulfil);
    let reserved = sums(kept.iter().chain(&more));
    let mut expected = Vec::new();
    for (sku, stock) in SCARCE {
        let (available, held) = app.levels(sku).await;
        assert_eq!(held, reserved[sku], "{sku}: reserved is what the open orders hold");
        assert_eq!(available + held, stock - fulfilled[sku], "{sku}: only fulfilled stock has left");
        assert!(available >= 0, "{sku}: never oversold");
        expected.push((sku, available, held));
    }
    assert_statuses(&app, &to_fulfil, "fulfilled").await;
    assert_statuses(&app, &to_cancel, "cancelled").await;
    assert_statuses(&app, &kept, "reserved").await;
    assert_statuses(&app, &more, "reserved").await;

    // And every core's copy catches up with the database.
    eventually(Duration::from_secs(3), "every core serves the final levels", || async {
        let client = fresh_connection_client();
        for &(sku, available, held) in &expected {
            for _ in 0..4 {
                let body: Value =
                    client.get(app.url(&format!("/api/inventory/{sku}"))).send().await.unwrap().json().await.unwrap();
                if body["available"] != available || body["reserved"] != held {
                    return None;
                }
            }
        }
        Some(())
    })
    .await;
}

/// A buyer cancelling while the seller fulfils the same order: exactly one wins,
/// the other is told the order moved on, and the stock follows the winner.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn racing_cancel_and_fulfil_let_exactly_one_win() {
    let app = spawn_app().await;
    const ORDERS: i64 = 12;
    app.stock(1, "contested", 100).await;
    let mut ids = Vec::new();
    for n in 0..ORDERS {
        ids.push((200 + n, app.order(&app.bidder(200 + n), &[("contested", 2)]).await["id"].as_i64().unwrap()));
    }
    assert_eq!(app.levels("contested").await, (100 - 2 * ORDERS, 2 * ORDERS));

    let base = app.url("/api/orders");
    let mut tasks = Vec::new();
    for &(buyer, id) in &ids {
        let buyer_token = app.bidder(buyer);
        let seller_token = app.seller();
        let base = base.clone();
        tasks.push(tokio::spawn(async move {
            let (buyer_client, seller_client) = (reqwest::Client::new(), reqwest::Client::new());
            let (cancel, fulfil) = tokio::join!(
                buyer_client.post(format!("{base}/{id}/cancel")).bearer_auth(&buyer_token).send(),
                seller_client.post(format!("{base}/{id}/fulfil")).bearer_auth(&seller_token).send(),
            );
            let (cancel, fulfil) = (cancel.unwrap(), fulfil.unwrap());
            let fulfilled = match (cancel.status(), fulfil.status()) {
                (StatusCode::OK, _) => {
                    assert_problem(fulfil, StatusCode::CONFLICT, "/problems/order-state").await;
                    assert_eq!(cancel.json::<Value>().await.unwrap()["status"], "cancelled");
                    false
                }
                (_, StatusCode::OK) => {
                    assert_problem(cancel, StatusCode::CONFLICT, "/problems/order-state").await;
                    assert_eq!(fulfil.json::<Value>().await.unwrap()["status"], "fulfilled");
                    true
                }
                (c, f) => panic!("order {id}: neither won (cancel {c}, fulfil {f})"),
            };
            (buyer, id, fulfilled)
        }));
    }
    let mut fulfilled = 0;
    for task in tasks {
        let (buyer, id, won) = task.await.unwrap();
        let status = app.order_status(&app.bidder(buyer), id).await;
        assert_eq!(status, if won { "fulfilled" } else { "cancelled" }, "order {id}");
        fulfilled += i64::from(won);
    }
    assert_eq!(app.levels("contested").await, (100 - 2 * fulfilled, 0));
}

fn order_request(buyer: i64, lines: &[(&str, i64)], key: Option<&str>) -> gavel::db::orders::OrderRequest {
    gavel::db::orders::OrderRequest {
        buyer,
        order: gavel::domain::stock::NewOrder::parse(lines.iter().copied()).unwrap(),
        idempotency_key: key.map(str::to_owned),
    }
}

/// Places `requests` as one batch, as the order batcher would.
async fn place_batch(
    db: &sqlx::PgPool,
    requests: &[gavel::db::orders::OrderRequest],
) -> Vec<gavel::db::orders::Placed> {
    let refs: Vec<_> = requests.iter().collect();
    gavel::db::orders::place(db, &refs).await.expect("the batch succeeds")
}

/// Starts `requests` as one batch and returns once it waits, holding the stock
/// rows it locked, on account `held`'s row: locked by the transaction returned,
/// and named by the batch's first new order.
async fn batch_waiting_on(
    app: &TestApp,
    held: i64,
    requests: Vec<gavel::db::orders::OrderRequest>,
) -> (sqlx::Transaction<'static, sqlx::Postgres>, tokio::task::JoinHandle<Vec<gavel::db::orders::Placed>>) {
    let mut hold = app.db.begin().await.unwrap();
    sqlx::query("select 1 from accounts where id = $1 for update").bind(held).execute(&mut *hold).await.unwrap();
    let db = app.db.clone();
    let batch = tokio::spawn(async move { place_batch(&db, &requests).await });
    eventually(Duration::from_secs(10), "the batch waiting on a lock", || async {
        let waiting: bool = sqlx::query_scalar(
            "select exists (select 1 from pg_stat_activity where query like '%place_orders%' and wait_event_type = 'Lock')",
        )
        .fetch_one(&app.db)
        .await
        .unwrap();
        waiting.then_some(())
    })
    .await;
    (hold, batch)
}

/// A buyer's key used twice in one batch: the first order runs, the other is
/// answered as a retry made while the first runs (409).
#[tokio::test]
async fn a_key_used_twice_in_one_batch_goes_to_the_first_order() {
    use gavel::db::orders::Placed;
    let app = spawn_app().await;
    app.stock(1, "apple", 10).await;
    let placed = place_batch(
        &app.db,
        &[
            order_request(20, &[("apple", 1)], Some("k")),
            order_request(20, &[("apple", 2)], Some("k")),
            order_request(21, &[("apple", 3)], Some("k")),
        ],
    )
    .await;
    assert!(matches!(placed[0], Placed::Reserved { .. }), "{placed:?}");
    assert_eq!(placed[1], Placed::KeyInUse);
    assert!(matches!(placed[2], Placed::Reserved { .. }), "another buyer's key: {placed:?}");
    assert_eq!(app.levels("apple").await, (6, 4));
}

/// A keyed order retried while the first is still in the database (its batch
/// holding the stock's rows) is answered 409 at once, not after the first.
#[tokio::test]
async fn a_keyed_retry_while_the_first_is_in_the_database_is_answered_at_once() {
    use gavel::db::orders::Placed;
    let app = spawn_app().await;
    app.stock(1, "apple", 10).await;
    let (hold, first) = batch_waiting_on(&app, 20, vec![order_request(20, &[("apple", 1)], Some("k"))]).await;
    let retry = order_request(20, &[("apple", 1)], Some("k"));
    let answered = tokio::time::timeout(Duration::from_secs(5), gavel::db::orders::place(&app.db, &[&retry]))
        .await
        .expect("answered while the first still waits")
        .unwrap();
    assert_eq!(answered, [Placed::KeyInUse]);
    hold.commit().await.unwrap();
    assert!(matches!(first.await.unwrap()[0], Placed::Reserved { .. }));
    assert_eq!(app.levels("apple").await, (9, 1));
}

/// A batch uses the stock rows it locked when it began: a sku created by its
/// seller while the batch runs is unknown to it, as it was when the batch
/// began (before, the batch used the row unlocked, and a batch on another
/// core could take its stock first and fail the whole batch's write).
#[tokio::test]
async fn a_sku_created_while_a_batch_runs_is_unknown_to_it() {
    use gavel::db::orders::Placed;
    let app = spawn_app().await;
    app.stock(1, "apple", 10).await;
    let requests = vec![order_request(20, &[("apple", 1)], None), order_request(21, &[("fresh", 5)], None)];
    let (hold, batch) = batch_waiting_on(&app, 20, requests).await;
    app.stock(1, "fresh", 10).await;
    hold.commit().await.unwrap();
    let placed = batch.await.unwrap();
    assert!(matches!(placed[0], Placed::Reserved { .. }), "{placed:?}");
    assert_eq!(placed[1], Placed::UnknownSku("fresh".into()));
    assert_eq!(app.levels("fresh").await, (10, 0));
    let later = app.place_order(&app.bidder(21), &[("fresh", 5)], None).await;
    assert_eq!(later.status(), StatusCode::CREATED, "the next batch has it");
}

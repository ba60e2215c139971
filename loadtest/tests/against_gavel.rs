//! The load generator against a real gavel on port 0 with its own PostgreSQL: seeding
//! is idempotent, every scenario sends what it should, and what it counts is what
//! the server did.

use std::net::SocketAddr;
use std::sync::Arc;

use gavel::auth::Keys;
use gavel::config::Serve;
use gavel::db::embedded::{Cluster, Options};
use gavel::runtime::Server;
use gavel_loadtest::setup::{Api, SeedPlan, Seeded};
use gavel_loadtest::stats::Report;
use gavel_loadtest::{Cli, Command, http::Target};
use sqlx::postgres::PgConnectOptions;

const SECRET: &str = "loadtest-tests-secret-of-at-least-32-bytes";

/// A running gavel and its cluster, stopped on drop.
struct Gavel {
    addr: SocketAddr,
    server: Option<Server>,
    cluster: Option<Cluster>,
    db: PgConnectOptions,
}

impl Drop for Gavel {
    fn drop(&mut self) {
        if let Some(server) = self.server.take() {
            server.stop();
        }
        if let Some(cluster) = self.cluster.take() {
            let _ = cluster.stop();
        }
    }
}

fn local<T>(future: impl Future<Output = T>) -> T {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    tokio::task::LocalSet::new().block_on(&rt, future)
}

fn start_gavel() -> Gavel {
    let cluster = Cluster::start(&Options {
        settings: vec![("fsync".into(), "off".into()), ("max_connections".into(), "100".into())],
        ..Options::default()
    })
    .expect("start a private PostgreSQL (is postgresql-15 installed?)");
    let options = cluster.connect_options("gavel");
    local(async {
        gavel::db::ensure_database(&options, "gavel").await.expect("create database");
        gavel::db::migrate(&options).await.expect("migrate");
    });
    let config = Serve::from_flags(["--listen", "127.0.0.1:0", "--admin-addr", "127.0.0.1:0", "--cores", "2"])
        .expect("flags parse");
    let server =
        Server::start(&config, options.clone(), Arc::new(Keys::new(SECRET.as_bytes()).unwrap())).expect("starts");
    Gavel { addr: server.local_addr(), server: Some(server), cluster: Some(cluster), db: options }
}

impl Gavel {
    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn seed(&self, auctions: usize) -> Seeded {
        let plan = SeedPlan { target: Target::parse(&self.url()).unwrap(), auctions, skus: 20, bidders: 4 };
        local(gavel_loadtest::setup::seed(&plan)).expect("seeding succeeds")
    }

    /// `gavel-loadtest run SCENARIO --target … <extra>`, bounded by a request count.
    fn run(&self, scenario: &str, extra: &[&str]) -> anyhow::Result<Report> {
        let url = self.url();
        let mut argv = vec!["gavel-loadtest", "run", scenario, "--target", &url];
        argv.extend_from_slice(&["--connections", "8", "--skus", "20", "--bidders", "4", "--no-pin"]);
        if !extra.contains(&"--duration") {
            argv.extend_from_slice(&["--duration", "30s"]);
        }
        argv.extend_from_slice(extra);
        let Command::Run(args) = <Cli as clap::Parser>::parse_from(argv).command else { unreachable!() };
        gavel_loadtest::run(&args)
    }

    /// Sum of `bid_count` over the open auctions, through the API.
    fn bids_recorded(&self) -> i64 {
        local(async {
            let mut api = Api::new(Target::parse(&self.url()).unwrap());
            let (status, page) = api.call("GET", "/api/auctions?status=open&limit=100", None, None).await.unwrap();
            assert_eq!(status, 200);
            page["items"].as_array().unwrap().iter().map(|a| a["bid_count"].as_i64().unwrap()).sum()
        })
    }
}

fn only(report: &Report, status: &str) -> bool {
    report.statuses.keys().all(|s| s == status) && report.errors.total() == 0
}

#[test]
fn seeding_twice_creates_nothing_the_second_time() {
    let gavel = start_gavel();
    let first = gavel.seed(30);
    assert_eq!((first.auctions_found, first.auctions_created), (0, 30));
    let again = gavel.seed(30);
    assert_eq!((again.auctions_found, again.auctions_created), (30, 0));
    assert_eq!(again.seller_id, first.seller_id);
    let more = gavel.seed(40);
    assert_eq!((more.auctions_found, more.auctions_created), (30, 10));
}

#[test]
fn every_scenario_sends_valid_requests_and_counts_what_the_server_did() {
    let gavel = start_gavel();
    gavel.seed(50);

    let reads = gavel.run("auction-read", &["--requests", "300"]).unwrap();
    assert_eq!(reads.requests, 300, "the request budget bounds the run");
    assert!(only(&reads, "200"), "{:?} {:?}", reads.statuses, reads.errors);

    // Bidders log in through the API (no secret); amounts rise, so bids are accepted.
    let bids = gavel.run("bid-storm", &["--requests", "400"]).unwrap();
    let accepted = bids.statuses.get("201").copied().unwrap_or(0);
    assert!(accepted >= 300, "{:?}", bids.statuses);
    assert!(bids.statuses.keys().all(|s| s == "201" || s == "409"), "{:?}", bids.statuses);
    assert_eq!(gavel.bids_recorded(), accepted as i64, "every 201 is a bid in the database, and no more");

    // Tokens minted with the server's secret work like logged-in ones…
    let minted = gavel.run("bid-storm", &["--requests", "100", "--hot-auctions", "1", "--secret", SECRET]).unwrap();
    assert!(minted.statuses.get("201").copied().unwrap_or(0) > 0, "{:?}", minted.statuses);
    // …and tokens minted with another secret are refused, which the report shows.
    let forged = gavel.run("bid-storm", &["--requests", "50", "--secret", &"x".repeat(40)]).unwrap();
    assert!(only(&forged, "401"), "{:?}", forged.statuses);

    let stock = gavel.run("inventory-read", &["--requests", "200"]).unwrap();
    assert!(only(&stock, "200"), "{:?}", stock.statuses);

    let orders = gavel.run("orders", &["--requests", "200"]).unwrap();
    assert!(only(&orders, "201"), "{:?}", orders.statuses);

    // The soak's churn: auctions created by the seeded seller, each a 201.
    let churn = gavel.run("churn", &["--requests", "30", "--secret", SECRET]).unwrap();
    assert!(only(&churn, "201"), "{:?} {:?}", churn.statuses, churn.errors);

    let mixed = gavel.run("mixed", &["--requests", "1000"]).unwrap();
    assert_eq!(mixed.requests, 1000);
    assert_eq!(mixed.by_kind.keys().copied().collect::<Vec<_>>(), ["auction-read", "bid", "inventory-read", "order"]);
    assert_eq!(mixed.errors.total(), 0);
}

/// With `--auction-ids` the generator asks gavel for each auction's minimum
/// bid; that must come from the database. A bid written past gavel, as the
/// comparison's pgbench writes them, is announced to no cache, and bids rising
/// from the cached minimum would all be refused.
#[test]
fn bids_on_given_auctions_start_from_the_databases_minimum() {
    let gavel = start_gavel();
    gavel.seed(5);
    let (first, last): (i64, i64) = local(async {
        let mut db = sqlx::ConnectOptions::connect(&gavel.db).await.unwrap();
        let range = sqlx::query_as("select min(id), max(id) from auctions").fetch_one(&mut db).await.unwrap();
        // What the naive statement writes: a new price, leader and bid count,
        // which the auctions' trigger leaves to the bid's writer to announce.
        let price = 1_000_000_000_i64;
        sqlx::query(
            "update auctions set high_bid = $1, high_max = $1, bid_count = bid_count + 1, version = version + 1,
                    high_bidder = (select min(id) from accounts where role = 'bidder')",
        )
        .bind(price)
        .execute(&mut db)
        .await
        .unwrap();
        range
    });
    let ids = format!("{first}-{last}");
    let cached = local(async {
        let mut api = Api::new(Target::parse(&gavel.url()).unwrap());
        api.call("GET", &format!("/api/auctions/{first}"), None, None).await.unwrap().1
    });
    assert!(cached["min_next_bid"].as_i64().unwrap() < 1_000_000_000, "the cache did not see the write: {cached}");

    let bids = gavel.run("bid-storm", &["--requests", "200", "--auction-ids", &ids]).unwrap();
    let accepted = bids.statuses.get("201").copied().unwrap_or(0);
    assert!(accepted >= 150, "bids from a stale minimum: {:?}", bids.statuses);
}

#[test]
fn open_loop_runs_hold_their_rate_and_stop_by_themselves() {
    let gavel = start_gavel();
    gavel.seed(10);
    let started = std::time::Instant::now();
    let report = gavel.run("auction-read", &["--rate", "500", "--duration", "1s"]).unwrap();
    assert!(started.elapsed() < std::time::Duration::from_secs(10));
    assert_eq!(report.mode, "open");
    assert!((450..=500).contains(&report.requests), "{} requests at 500/s for 1 s", report.requests);
}

#[test]
fn a_run_against_an_unseeded_server_says_to_seed_first() {
    let gavel = start_gavel();
    let err = gavel.run("auction-read", &["--requests", "10"]).unwrap_err();
    assert!(format!("{err:#}").contains("gavel-loadtest seed"), "{err:#}");
    let err = gavel.run("inventory-read", &["--requests", "10"]).unwrap_err();
    assert!(format!("{err:#}").contains("gavel-loadtest seed"), "{err:#}");
}

/// `watch` opens its streams, delivers every auction's changes to them, and ends
/// with each stream on its auction's final state: each stream on a connection of
/// its own, and several to an HTTP/2 connection; gavel's part of the delivery,
/// from the commit, is read from its metrics.
#[test]
fn watch_holds_streams_that_follow_the_bids_to_the_final_state() {
    let gavel = start_gavel();
    gavel.seed(6);
    let url = gavel.url();
    let admin = gavel.server.as_ref().and_then(|s| s.admin_addr()).expect("an admin listener");
    let metrics = format!("http://{admin}/metrics");
    for per_connection in ["0", "8"] {
        let argv = [
            "gavel-loadtest",
            "watch",
            "--target",
            &url,
            "--streams",
            "30",
            "--auctions",
            "3",
            "--bid-rate",
            "200",
            "--duration",
            "1s",
            "--storm",
            "1s",
            "--storm-connections",
            "4",
            "--bid-connections",
            "4",
            "--bidders",
            "4",
            "--threads",
            "2",
            "--http2-streams",
            per_connection,
            "--secret",
            SECRET,
            "--metrics-url",
            &metrics,
        ];
        let Command::Watch(args) = <Cli as clap::Parser>::parse_from(argv).command else { unreachable!() };
        let report = gavel_loadtest::watch::watch(&args).expect("the watch run succeeds");
        assert_eq!((report.streams, report.auctions), (30, 3));
        assert!(report.bids.accepted_per_sec > 0.0 && report.storm_without_streams.accepted_per_sec > 0.0);
        assert!(report.delivery_us.count > 0, "bids reached the streams ({per_connection}): {report:?}");
        let from_commit = report.from_commit.as_ref().expect("gavel's part, read from its metrics");
        assert!(from_commit.events > 0.0 && (0.0..=1.0).contains(&from_commit.within_target), "{from_commit:?}");
        assert_eq!(report.streams_lost, 0, "{per_connection}");
        assert_eq!(report.streams_with_final_state, 30, "every stream ends on its auction's final state");
    }
}

/// A rolling restart under a closed-loop bid load spread over two instances of
/// one gavel: the one restarted turns not ready, then stops; every request its
/// connections lose is sent again to the other, none fails, and every bid
/// acknowledged is in the database.
#[test]
fn a_rolling_restart_under_bids_fails_no_request_and_loses_no_bid() {
    let mut first = start_gavel();
    first.seed(50);
    let options = first.cluster.as_ref().unwrap().connect_options("gavel");
    let config = Serve::from_flags(["--listen", "127.0.0.1:0", "--admin-addr", "127.0.0.1:0", "--cores", "2"])
        .expect("flags parse");
    let second = Server::start(&config, options, Arc::new(Keys::new(SECRET.as_bytes()).unwrap())).expect("starts");
    let second_url = format!("http://{}", second.local_addr());

    let leaving = first.server.take().unwrap();
    let restart = std::thread::spawn(move || {
        std::thread::sleep(std::time::Duration::from_secs(1));
        // As on SIGTERM: not ready for the drain delay, then stop accepting and drain.
        leaving.health().start_draining();
        std::thread::sleep(std::time::Duration::from_millis(300));
        leaving.stop();
    });
    let bids = first.run("bid-storm", &["--target", &second_url, "--duration", "3s"]).unwrap();
    restart.join().unwrap();

    let accepted = bids.statuses.get("201").copied().unwrap_or(0);
    assert!(accepted > 100, "the load ran: {:?}", bids.statuses);
    // The stopped instance's connections moved to the other: one that could not
    // would count a refused connection every 10 ms.
    assert_eq!(bids.errors.total(), 0, "no request failed: {:?}", bids.errors);
    assert!(bids.series.last().is_some_and(|s| s.requests > 0), "bids went on after the restart");
    assert!(bids.statuses.keys().all(|s| !s.starts_with('5')), "{:?}", bids.statuses);
    let recorded = local(async {
        let mut api = Api::new(Target::parse(&second_url).unwrap());
        let (status, page) = api.call("GET", "/api/auctions?status=open&limit=100", None, None).await.unwrap();
        assert_eq!(status, 200);
        page["items"].as_array().unwrap().iter().map(|a| a["bid_count"].as_i64().unwrap()).sum::<i64>()
    });
    // Only requests the server answered nothing to were sent again: none twice.
    assert_eq!(recorded as u64, accepted, "every bid acknowledged is recorded, once");
    eprintln!("rolling restart: {accepted} bids acknowledged, {recorded} recorded, {} retried", bids.errors.retried);
    second.stop();
}

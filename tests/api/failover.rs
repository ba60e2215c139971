//! Failover: gavel given a primary and its synchronous standby in one multi-host
//! URL (`target_session_attrs=read-write`). The primary crashes mid-load, the
//! standby is promoted, and gavel follows it: bids are accepted again within
//! seconds, caches and LISTEN connections come back, and no acknowledged bid is
//! lost.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use gavel::db::embedded::Cluster;
use gavel::db::target::Target;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use reqwest::StatusCode;
use serde_json::{Value, json};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

use crate::helpers::{
    Standby, TestApp, app_on, eventually, free_port, fresh_connection_client, prepare_database, start_cluster_on,
    start_server,
};

/// A primary and a streaming standby of it, each listening on TCP too.
struct Pair {
    primary: Cluster,
    options: PgConnectOptions,
    standby: Standby,
    /// The primary's port, then the standby's.
    first: u16,
    second: u16,
}

impl Pair {
    /// Call it on the test's thread, as `start_cluster`.
    async fn start() -> Pair {
        let primary = start_cluster_on(Some(free_port()));
        let options = prepare_database(&primary).await;
        // Each port is taken as soon as it is chosen, so no other test takes it first.
        let standby = Standby::of(&primary, Some(free_port())).await;
        let (first, second) = (primary.port().unwrap(), standby.cluster.port().unwrap());
        Pair { primary, options, standby, first, second }
    }
}

/// The bid of `accepted` on auction `id` is on the promoted `standby`, and so
/// are eight more, each on a fresh connection (so on either core): no core
/// writes to the old primary.
async fn bids_land_on(app: &TestApp, standby: &Standby, id: i64, accepted: i64) {
    // The first accepted bid may have reached one core while the other had not
    // moved yet.
    eventually(Duration::from_secs(15), "every core has moved", || async {
        (app.per_core("gavel_db_primary_moves_total", &[]).await == [1.0; 2]).then_some(())
    })
    .await;
    let on_promoted = |newer: bool| async move {
        let sql = "select count(*) from bids where auction_id = $1 and (amount = $2 or ($3 and amount > $2))";
        let count: i64 =
            sqlx::query_scalar(sql).bind(id).bind(accepted).bind(newer).fetch_one(&standby.db).await.unwrap();
        count
    };
    assert_eq!(on_promoted(false).await, 1, "the bid went to the promoted server");
    let client = fresh_connection_client();
    for step in 1..=8 {
        let bid = client
            .post(app.url("/api/bids"))
            .bearer_auth(app.bidder(4))
            .json(&json!({"auction_id": id, "amount": accepted + step * 10}))
            .send()
            .await
            .unwrap();
        assert_eq!(bid.status(), StatusCode::CREATED, "bid {step}");
    }
    assert_eq!(on_promoted(true).await, 9, "every later bid is on the promoted server");
}

/// An acknowledged bid: its id, auction and amount, and when its 201 came.
type Acked = (i64, i64, i64, Instant);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bids_survive_a_failover_to_a_promoted_synchronous_standby() {
    let Pair { primary, options, standby, first, second } = Pair::start().await;
    // From here on, a commit returns once the standby has it. The standby's own
    // configuration was copied before this, so once promoted it waits for no one.
    let admin = PgPoolOptions::new().max_connections(1).connect_with(options.clone()).await.unwrap();
    sqlx::query("alter system set synchronous_standby_names = '*'").execute(&admin).await.unwrap();
    sqlx::query("select pg_reload_conf()").execute(&admin).await.unwrap();
    eventually(Duration::from_secs(10), "the standby replicates synchronously", || async {
        let state: String =
            sqlx::query_scalar("select sync_state from pg_stat_replication").fetch_one(&admin).await.ok()?;
        (state == "sync").then_some(())
    })
    .await;
    admin.close().await;

    let url = format!("postgres://gavel@127.0.0.1:{first},127.0.0.1:{second}/gavel?target_session_attrs=read-write");
    let server = start_server(Target::parse(&url).unwrap(), &[]);
    let app = app_on(primary, options, server).await;
    let mut auctions = Vec::new();
    for _ in 0..8 {
        auctions.push(app.open_auction(100, 10, 300.0, 0).await["id"].as_i64().unwrap());
    }

    // One closed loop per auction, each bidding ever higher on its own auction.
    let stop = Arc::new(AtomicBool::new(false));
    let acked: Arc<Mutex<Vec<Acked>>> = Arc::default();
    let statuses: Arc<Mutex<BTreeMap<u16, usize>>> = Arc::default();
    let mut loops = Vec::new();
    for (i, &auction) in auctions.iter().enumerate() {
        let (stop, acked, statuses) = (stop.clone(), acked.clone(), statuses.clone());
        let url = app.url("/api/bids");
        let token = app.bidder(i as i64 + 2);
        loops.push(tokio::spawn(async move {
            let client = reqwest::Client::builder().timeout(Duration::from_secs(10)).build().unwrap();
            let mut amount = 100;
            while !stop.load(Ordering::Relaxed) {
                amount += 10;
                let sent =
                    client.post(&url).bearer_auth(&token).json(&json!({"auction_id": auction, "amount": amount}));
                let status = match sent.send().await {
                    Ok(response) => {
                        let status = response.status();
                        if status == StatusCode::CREATED {
                            let body: Value = response.json().await.unwrap();
                            let bid = body["bid_id"].as_i64().unwrap();
                            acked.lock().unwrap().push((bid, auction, amount, Instant::now()));
                        } else {
                            // Shed while the database is away: back off a little.
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                        status.as_u16()
                    }
                    Err(_) => 0,
                };
                *statuses.lock().unwrap().entry(status).or_default() += 1;
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = acked.lock().unwrap().len();
    assert!(before > 0, "bids are accepted before the failover");

    // The primary crashes (an immediate shutdown: no checkpoint, connections cut).
    let crashed = Instant::now();
    let postmaster = app.cluster_pid().expect("the primary runs");
    kill(Pid::from_raw(postmaster as i32), Signal::SIGQUIT).unwrap();
    // Long enough for the cores' retries to back off to their longest wait (2 s),
    // as they would while a failover manager makes up its mind.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let promoted: bool = sqlx::query_scalar("select pg_promote()").fetch_one(&standby.db).await.unwrap();
    assert!(promoted, "the standby is promoted");
    let promoted = Instant::now();
    let resumed = eventually(Duration::from_secs(15), "bids are accepted on the promoted standby", || async {
        acked.lock().unwrap().iter().map(|a| a.3).find(|&at| at > promoted)
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::Relaxed);
    for task in loops {
        task.await.unwrap();
    }

    let acked = acked.lock().unwrap().clone();
    let statuses = statuses.lock().unwrap().clone();
    let after_promotion = resumed - promoted;
    eprintln!(
        "failover: bids accepted again {after_promotion:?} after the promotion ({:?} after the crash); \
         {} bids acknowledged ({before} before the crash); statuses {statuses:?}",
        resumed - crashed,
        acked.len()
    );
    assert!(after_promotion < Duration::from_secs(10), "gavel found the new primary in {after_promotion:?}");
    // While the database was away, bids were shed (503), never answered wrongly.
    assert!(statuses.keys().all(|s| [201, 503].contains(s)), "{statuses:?}");

    // Every acknowledged bid is on the new primary, as acknowledged.
    let recorded: Vec<(i64, i64, i64)> =
        sqlx::query_as("select id, auction_id, amount from bids where auction_id = any($1)")
            .bind(&auctions)
            .fetch_all(&standby.db)
            .await
            .unwrap();
    let recorded: BTreeMap<i64, (i64, i64)> = recorded.into_iter().map(|(id, a, amount)| (id, (a, amount))).collect();
    let lost: Vec<&Acked> =
        acked.iter().filter(|(id, a, amount, _)| recorded.get(id) != Some(&(*a, *amount))).collect();
    assert!(lost.is_empty(), "{} of {} acknowledged bids lost: {lost:?}", lost.len(), acked.len());

    // Caches and LISTEN connections are back, on the new primary.
    eventually(Duration::from_secs(10), "every core listens on the new primary", || async {
        let listening: i64 = sqlx::query_scalar(
            "select count(*) from pg_stat_activity where application_name like 'gavel-core-%-listen'",
        )
        .fetch_one(&standby.db)
        .await
        .ok()?;
        (listening == 2 && app.per_core("gavel_cache_live", &[]).await == [1.0; 2]).then_some(())
    })
    .await;
    assert_eq!(app.per_core("gavel_db_primary_moves_total", &[]).await, [1.0; 2], "each core moved once");
    let last = acked.iter().filter(|a| a.1 == auctions[0]).map(|a| a.2).max().unwrap();
    let bid = app.place_bid(&app.bidder(40), auctions[0], last + 100).await;
    assert_eq!(bid.status(), StatusCode::CREATED);
    let path = format!("/api/auctions/{}", auctions[0]);
    eventually(Duration::from_secs(5), "the cache shows a bid on the new primary", || async {
        let auction: Value = app.get(&path).await.json().await.ok()?;
        (auction["high_bid"] == last + 100).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_host_that_accepts_writes_is_used_wherever_it_is_listed() {
    let Pair { primary, options, standby, first, second } = Pair::start().await;

    // Only the standby: nothing accepts writes, and gavel says so rather than start.
    let only_standby = format!("postgres://gavel@127.0.0.1:{second}/gavel?target_session_attrs=read-write");
    let config =
        gavel::config::Serve::from_flags(["--listen", "127.0.0.1:0", "--admin-addr", "127.0.0.1:0", "--cores", "2"])
            .unwrap();
    let keys = std::sync::Arc::new(gavel::auth::Keys::new(crate::helpers::SECRET.as_bytes()).unwrap());
    // One host alone is not looked for: its pool checks each connection instead.
    let refused = gavel::runtime::Server::start(&config, Target::parse(&only_standby).unwrap(), keys.clone());
    assert!(refused.is_err(), "a standby alone is not a primary");
    let both_standby =
        format!("postgres://gavel@127.0.0.1:{second},127.0.0.1:{second}/gavel?target_session_attrs=primary");
    let refused = gavel::runtime::Server::start(&config, Target::parse(&both_standby).unwrap(), keys);
    let message = format!("{:#}", refused.err().expect("no host is a primary"));
    assert!(message.contains("cannot find the primary"), "{message}");

    // The standby listed first: gavel passes over it to the primary.
    let url = format!("postgres://gavel@127.0.0.1:{second},127.0.0.1:{first}/gavel?target_session_attrs=read-write");
    let server = start_server(Target::parse(&url).unwrap(), &[]);
    let app = app_on(primary, options, server).await;
    let id = app.open_auction(100, 10, 60.0, 0).await["id"].as_i64().unwrap();
    assert_eq!(app.place_bid(&app.bidder(2), id, 150).await.status(), StatusCode::CREATED);
    let on_primary: i64 = sqlx::query_scalar(
        "select count(*) from pg_stat_activity where application_name like 'gavel-core-%' and backend_type = 'client backend'",
    )
    .fetch_one(&app.db)
    .await
    .unwrap();
    let on_standby: i64 =
        sqlx::query_scalar("select count(*) from pg_stat_activity where application_name like 'gavel-core-%'")
            .fetch_one(&standby.db)
            .await
            .unwrap();
    assert!(on_primary >= 4, "the cores' pools and listeners are on the primary: {on_primary}");
    assert_eq!(on_standby, 0, "nothing of gavel's stays on the standby");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_primary_that_turns_read_only_without_a_restart_is_left_for_the_writable_host() {
    let Pair { primary, options, standby, first, second } = Pair::start().await;
    let url = format!("postgres://gavel@127.0.0.1:{first},127.0.0.1:{second}/gavel?target_session_attrs=read-write");
    let server = start_server(Target::parse(&url).unwrap(), &[]);
    let app = app_on(primary, options, server).await;
    let id = app.open_auction(100, 10, 300.0, 0).await["id"].as_i64().unwrap();
    assert_eq!(app.place_bid(&app.bidder(2), id, 110).await.status(), StatusCode::CREATED);
    standby.caught_up(&app.db).await;

    // A switchover by hand: the old primary refuses writes from now on (its
    // sessions too, on reload), but nothing breaks gavel's connections to it.
    sqlx::query("alter system set default_transaction_read_only = on").execute(&app.db).await.unwrap();
    sqlx::query("select pg_reload_conf()").execute(&app.db).await.unwrap();
    let promoted: bool = sqlx::query_scalar("select pg_promote()").fetch_one(&standby.db).await.unwrap();
    assert!(promoted);

    // Each core's check of its LISTEN connection notices within seconds; the
    // pool leaves the old server's connections behind.
    let mut amount = 110;
    let accepted = eventually(Duration::from_secs(15), "bids are accepted on the writable host", || {
        amount += 10;
        let bid = amount;
        let app = &app;
        async move { (app.place_bid(&app.bidder(3), id, bid).await.status() == StatusCode::CREATED).then_some(bid) }
    })
    .await;
    bids_land_on(&app, &standby, id, accepted).await;
}

/// Stops every process of a cluster until dropped: its postmaster and the
/// postmaster's children (each backend leads a process group of its own, so
/// the postmaster's group alone would not do).
struct Frozen(Vec<Pid>);

impl Frozen {
    fn cluster(postmaster: u32) -> Frozen {
        // The postmaster first, so that it starts no process meanwhile; a
        // child that has exited since (an autovacuum worker) is passed over.
        let mut frozen = Frozen(Vec::new());
        let leader = Pid::from_raw(postmaster as i32);
        kill(leader, Signal::SIGSTOP).unwrap();
        frozen.0.push(leader);
        let children = std::fs::read_dir("/proc").unwrap().flatten().filter_map(|entry| {
            let pid: i32 = entry.file_name().to_str()?.parse().ok()?;
            let stat = std::fs::read_to_string(entry.path().join("stat")).ok()?;
            // pid (comm) state ppid …: the fields after the last ')'.
            let ppid: u32 = stat.rsplit_once(')')?.1.split_whitespace().nth(1)?.parse().ok()?;
            (ppid == postmaster).then_some(Pid::from_raw(pid))
        });
        for child in children {
            if kill(child, Signal::SIGSTOP).is_ok() {
                frozen.0.push(child);
            }
        }
        frozen
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        for &pid in &self.0 {
            let _ = kill(pid, Signal::SIGCONT);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bids_resume_on_the_promoted_standby_when_the_primary_stops_answering() {
    let Pair { primary, options, standby, first, second } = Pair::start().await;
    let url = format!("postgres://gavel@127.0.0.1:{first},127.0.0.1:{second}/gavel?target_session_attrs=read-write");
    // A short request timeout, and so a short bound on a batch's write (twice it).
    let server = start_server(Target::parse(&url).unwrap(), &["--request-timeout", "1s"]);
    let app = app_on(primary, options, server).await;
    let id = app.open_auction(100, 10, 300.0, 0).await["id"].as_i64().unwrap();
    assert_eq!(app.place_bid(&app.bidder(2), id, 110).await.status(), StatusCode::CREATED);
    standby.caught_up(&app.db).await;

    // The primary stops answering without closing a connection (a lost machine,
    // as far as its clients can tell), with bids in flight; its standby is
    // promoted.
    let mut amount = 110;
    let client = reqwest::Client::builder().timeout(Duration::from_secs(5)).build().unwrap();
    let in_flight: Vec<_> = (0..8)
        .map(|i| {
            amount += 10;
            let bid = client
                .post(app.url("/api/bids"))
                .bearer_auth(app.bidder(3 + i))
                .json(&json!({"auction_id": id, "amount": amount}));
            tokio::spawn(async move { bid.send().await.map(|r| r.status()) })
        })
        .collect();
    let frozen = Frozen::cluster(app.cluster_pid().expect("the primary runs"));
    let stopped = Instant::now();
    let promoted: bool = sqlx::query_scalar("select pg_promote()").fetch_one(&standby.db).await.unwrap();
    assert!(promoted);

    // Each core notices within seconds (its LISTEN check), moves to a new pool on
    // the promoted server, and the batches stuck on the old one give their lane
    // up: bids are accepted again.
    let accepted = eventually(Duration::from_secs(30), "bids are accepted on the promoted standby", || {
        amount += 10;
        let bid = amount;
        let (app, client) = (&app, &client);
        async move {
            let sent = client
                .post(app.url("/api/bids"))
                .bearer_auth(app.bidder(20))
                .json(&json!({"auction_id": id, "amount": bid}));
            (sent.send().await.ok()?.status() == StatusCode::CREATED).then_some(bid)
        }
    })
    .await;
    let resumed = stopped.elapsed();
    eprintln!("failover from a primary that stopped answering: bids accepted again {resumed:?} after it stopped");
    for bid in in_flight {
        // Answered, one way or the other (409: a higher one of them came first).
        let status = bid.await.unwrap().expect("an answer, not a dropped connection");
        assert!([201, 409, 503].contains(&status.as_u16()), "{status}");
    }
    bids_land_on(&app, &standby, id, accepted).await;
    drop(frozen);
}

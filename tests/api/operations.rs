//! Health, readiness, timeouts, shutdown and the embedded database.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::Value;

use crate::helpers::{assert_problem, sigterm, spawn_app, spawn_app_with, spawn_binary};

#[tokio::test]
async fn health_and_ready_answer_200_when_serving() {
    let app = spawn_app().await;
    assert_eq!(app.get("/health").await.status(), StatusCode::OK);
    let ready = app.get("/ready").await;
    assert_eq!(ready.status(), StatusCode::OK);
    assert_eq!(ready.json::<Value>().await.unwrap()["status"], "ready");
}

/// `/ready` turns 503 when the database stops answering, and back when it returns.
#[tokio::test]
async fn ready_is_503_while_the_database_is_unreachable() {
    let app = spawn_app_with(&["--db-acquire-timeout", "100ms"]).await;
    assert_eq!(app.get("/ready").await.status(), StatusCode::OK);
    // Refuse new connections to the database and kill the server's existing ones
    // (from another database: a session cannot lock out its own).
    use sqlx::Connection;
    let mut admin = sqlx::PgConnection::connect_with(&app.options.clone().database("postgres")).await.unwrap();
    sqlx::query("alter database gavel allow_connections false").execute(&mut admin).await.unwrap();
    sqlx::query("select pg_terminate_backend(pid) from pg_stat_activity where application_name like 'gavel-core-%'")
        .execute(&mut admin)
        .await
        .unwrap();
    let client = crate::helpers::fresh_connection_client();
    let mut saw_503 = false;
    for _ in 0..20 {
        let response = client.get(app.url("/ready")).send().await.unwrap();
        if response.status() == StatusCode::SERVICE_UNAVAILABLE {
            assert!(response.headers().contains_key("retry-after"));
            assert_problem(response, StatusCode::SERVICE_UNAVAILABLE, "/problems/not-ready").await;
            saw_503 = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(saw_503, "ready never reported the database as gone");
    // Reads that need the database are shed with 503, not hung and not 500.
    let read = client.get(app.url("/api/auctions/1?consistent=true")).send().await.unwrap();
    assert!(read.headers().contains_key("retry-after"));
    assert_problem(read, StatusCode::SERVICE_UNAVAILABLE, "/problems/database-unavailable").await;
    sqlx::query("alter database gavel allow_connections true").execute(&mut admin).await.unwrap();
    crate::helpers::eventually(Duration::from_secs(5), "ready again", || async {
        (client.get(app.url("/ready")).send().await.unwrap().status() == StatusCode::OK).then_some(())
    })
    .await;
}

/// A client that connects and sends nothing is disconnected after the header read
/// timeout; so is a keep-alive connection left idle after a request.
#[tokio::test]
async fn silent_and_idle_connections_are_closed() {
    let app = spawn_app_with(&["--header-read-timeout", "300ms"]).await;
    let addr = app.addr;
    tokio::task::spawn_blocking(move || {
        let mut silent = TcpStream::connect(addr).unwrap();
        silent.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let started = Instant::now();
        let mut buf = [0u8; 256];
        let n = silent.read(&mut buf).unwrap_or(0);
        assert!(n == 0 || String::from_utf8_lossy(&buf[..n]).contains("408"), "closed, not answered");
        assert!(started.elapsed() < Duration::from_secs(4), "closed by the server, not by our timeout");

        let mut idle = TcpStream::connect(addr).unwrap();
        idle.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        idle.write_all(b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n").unwrap();
        let mut response = Vec::new();
        let mut buf = [0u8; 1024];
        let started = Instant::now();
        loop {
            match idle.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => response.extend_from_slice(&buf[..n]),
                Err(e) => panic!("idle connection was not closed: {e}"),
            }
        }
        assert!(String::from_utf8_lossy(&response).starts_with("HTTP/1.1 200"));
        assert!(started.elapsed() < Duration::from_secs(4));
    })
    .await
    .unwrap();
}

/// A slowloris client trickling its headers is cut off too.
#[tokio::test]
async fn trickled_headers_are_cut_off() {
    let app = spawn_app_with(&["--header-read-timeout", "300ms"]).await;
    let addr = app.addr;
    tokio::task::spawn_blocking(move || {
        let mut slow = TcpStream::connect(addr).unwrap();
        slow.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let started = Instant::now();
        for byte in b"GET /health HTTP/1.1\r\nx-slow: 1".iter() {
            if slow.write_all(&[*byte]).is_err() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
            if started.elapsed() > Duration::from_secs(3) {
                break;
            }
        }
        let mut buf = [0u8; 256];
        let n = slow.read(&mut buf).unwrap_or(0);
        assert!(n == 0 || !String::from_utf8_lossy(&buf[..n]).contains("200 OK"));
        assert!(started.elapsed() < Duration::from_secs(4), "the server cut the connection");
    })
    .await
    .unwrap();
}

/// While draining, `/ready` is 503 (so load balancers stop sending) while
/// `/health` stays 200. Asked on connections that began their request before the
/// drain: the drain closes the listener (a new connection would see nothing) and
/// every connection with no request under way, but one whose request has begun to
/// arrive is answered.
#[tokio::test]
async fn ready_is_503_while_draining() {
    let app = spawn_app().await;
    assert_eq!(app.get("/ready").await.status(), StatusCode::OK, "ready before the drain");
    let begin = |path: &str| {
        let mut stream = TcpStream::connect(app.addr).unwrap();
        stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        stream.write_all(format!("GET {path} HTTP/1.1\r\n").as_bytes()).unwrap();
        stream
    };
    let (mut ready, mut health) = (begin("/ready"), begin("/health"));
    app.wait_until_taken_in().await;
    app.drain();
    let finish = |stream: &mut TcpStream| {
        stream.write_all(b"host: gavel\r\n\r\n").unwrap();
        // Keep-alive is off while draining: the server closes after answering.
        let mut response = String::new();
        stream.read_to_string(&mut response).unwrap();
        response
    };
    let ready = finish(&mut ready);
    assert!(ready.starts_with("HTTP/1.1 503"), "{ready}");
    assert!(ready.contains("/problems/not-ready"), "{ready}");
    let health = finish(&mut health);
    assert!(health.starts_with("HTTP/1.1 200"), "{health}");
}

/// On SIGTERM, for --drain-delay, gavel answers /ready with 503 and keeps
/// serving, new connections included; then it stops accepting and exits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_turns_ready_off_and_keeps_serving_for_the_drain_delay() {
    let (mut child, addr, _) = spawn_binary(&["--drain-delay", "2s"]).await;
    let base = format!("http://{addr}");
    let fresh = crate::helpers::fresh_connection_client();
    assert_eq!(fresh.get(format!("{base}/ready")).send().await.unwrap().status(), StatusCode::OK);
    sigterm(&child.0);
    let signalled = Instant::now();
    crate::helpers::eventually(Duration::from_secs(1), "/ready turns 503", || async {
        let ready = fresh.get(format!("{base}/ready")).send().await.ok()?;
        (ready.status() == StatusCode::SERVICE_UNAVAILABLE).then_some(())
    })
    .await;
    // Still serving, on new connections, until the delay is over.
    while signalled.elapsed() < Duration::from_millis(1500) {
        let health = fresh.get(format!("{base}/health")).send().await.expect("served during the drain delay");
        assert_eq!(health.status(), StatusCode::OK);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let exit = tokio::task::spawn_blocking(move || child.0.wait().unwrap()).await.unwrap();
    assert!(signalled.elapsed() >= Duration::from_secs(2), "exited before the delay: {:?}", signalled.elapsed());
    assert_eq!(exit.code(), Some(0));
    assert!(fresh.get(format!("{base}/health")).send().await.is_err(), "no longer accepting");
}

/// The real binary, on its embedded PostgreSQL: SIGTERM under load lets in-flight
/// requests finish, exits 0 and leaves no PostgreSQL behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_under_load_drains_and_exits_cleanly() {
    let (mut child, addr, data_dir) = spawn_binary(&["--drain-delay", "0s"]).await;
    let postmaster_pid: i32 =
        std::fs::read_to_string(format!("{data_dir}/postmaster.pid")).unwrap().lines().next().unwrap().parse().unwrap();

    let base = format!("http://{addr}");
    let keys = gavel::auth::Keys::new(crate::helpers::SECRET.as_bytes()).unwrap();
    let client = reqwest::Client::new();
    // Real accounts, registered through the API (ids 1..=9 on this fresh database).
    for n in 0..9 {
        let role = if n == 0 { "seller" } else { "bidder" };
        let registered = client
            .post(format!("{base}/api/accounts"))
            .json(
                &serde_json::json!({"email": format!("user{n}@example.com"), "password": "long enough", "role": role}),
            )
            .send()
            .await
            .unwrap();
        assert_eq!(registered.status(), StatusCode::CREATED);
    }
    let seller = keys.mint(1, gavel::auth::Role::Seller, Duration::from_secs(60)).0;
    let auction: Value = client
        .post(format!("{base}/api/auctions"))
        .bearer_auth(&seller)
        .json(&serde_json::json!({"title": "t", "reserve": 1, "min_increment": 1,
            "starts_at": crate::helpers::at(-1.0), "ends_at": crate::helpers::at(60.0)}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id = auction["id"].as_i64().unwrap();

    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut load = Vec::new();
    for n in 0..8i64 {
        let (base, stop) = (base.clone(), stop.clone());
        let bidder = keys.mint(2 + n, gavel::auth::Role::Bidder, Duration::from_secs(60)).0;
        load.push(tokio::spawn(async move {
            let client = reqwest::Client::new();
            let (mut complete, mut server_errors) = (0u32, 0u32);
            let mut amount = 1 + n;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let sent = if amount % 2 == 0 {
                    client.get(format!("{base}/api/auctions/{id}")).send().await
                } else {
                    client
                        .post(format!("{base}/api/bids"))
                        .bearer_auth(&bidder)
                        .json(&serde_json::json!({"auction_id": id, "amount": amount * 100}))
                        .send()
                        .await
                };
                amount += 1;
                match sent {
                    // A response that started must arrive whole.
                    Ok(response) => {
                        let status = response.status();
                        response.bytes().await.expect("a started response completes");
                        complete += 1;
                        if status.is_server_error() {
                            server_errors += 1;
                        }
                    }
                    // Refused or closed before a response: the server has stopped
                    // accepting; that is the drain working.
                    Err(_) => break,
                }
            }
            (complete, server_errors)
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    sigterm(&child.0);
    let exit = tokio::task::spawn_blocking(move || child.exited_within(Duration::from_secs(20))).await.unwrap();
    let exit = exit.expect("gavel exits after SIGTERM");
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut total = 0;
    for task in load {
        let (complete, server_errors) = task.await.expect("no started response was cut short");
        assert_eq!(server_errors, 0);
        total += complete;
    }
    assert!(total > 0, "the load ran");
    assert_eq!(exit.code(), Some(0), "exit status {exit:?}");
    let postgres_alive = nix::sys::signal::kill(nix::unistd::Pid::from_raw(postmaster_pid), None).is_ok();
    assert!(!postgres_alive, "the embedded PostgreSQL was left running");
    assert!(!std::path::Path::new(&data_dir).exists(), "the ephemeral data directory was left behind");
}

/// Without PostgreSQL binaries, `gavel serve` says which package to install.
#[test]
fn a_missing_postgresql_is_reported_with_the_package_to_install() {
    let empty = tempfile::tempdir().unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_gavel"))
        .args(["serve", "--listen", "127.0.0.1:0", "--pg-bin-dir"])
        .arg(empty.path())
        .env_remove("DATABASE_URL")
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("postgresql-15"), "{stderr}");
}

/// `gavel token` mints tokens the server accepts; without a secret it refuses.
#[tokio::test]
async fn gavel_token_mints_a_token_the_server_accepts() {
    let app = spawn_app().await;
    let output = Command::new(env!("CARGO_BIN_EXE_gavel"))
        .args(["token", "--sub", "1", "--role", "seller"])
        .env("GAVEL_JWT_SECRET", crate::helpers::SECRET)
        .output()
        .unwrap();
    assert!(output.status.success());
    let token = String::from_utf8(output.stdout).unwrap().trim().to_owned();
    let response = app
        .post_json(
            "/api/auctions",
            &token,
            &serde_json::json!({"title": "t", "reserve": 1, "min_increment": 1,
                "starts_at": crate::helpers::at(0.0), "ends_at": crate::helpers::at(60.0)}),
        )
        .await;
    assert_eq!(response.status(), StatusCode::CREATED);

    let refused = Command::new(env!("CARGO_BIN_EXE_gavel"))
        .args(["token", "--sub", "1", "--role", "seller"])
        .env_remove("GAVEL_JWT_SECRET")
        .output()
        .unwrap();
    assert!(!refused.status.success());
}

/// The embedded cluster runs with its own server settings (`src/db/embedded.conf`),
/// and a caller's settings come after them, so a caller may override one.
#[tokio::test]
async fn the_embedded_cluster_runs_with_its_settings_and_the_callers_win() {
    use gavel::db::embedded::{Cluster, Options, server_settings};
    use sqlx::Connection;
    // A switch of the cluster's, turned the other way by the caller.
    let (overridden, value) = server_settings()
        .find(|(_, value)| matches!(*value, "on" | "off"))
        .expect("the cluster has a switch of its own");
    let flipped = if value == "off" { "on" } else { "off" };
    let settings = vec![("fsync".to_string(), "off".to_string()), (overridden.to_string(), flipped.to_string())];
    let cluster = Cluster::start(&Options { settings, ..Options::default() }).expect("start a private PostgreSQL");
    let mut db = sqlx::PgConnection::connect_with(&cluster.connect_options("postgres")).await.unwrap();
    let show = async |db: &mut sqlx::PgConnection, name: &str| -> String {
        sqlx::query_scalar("select current_setting($1)").bind(name).fetch_one(db).await.unwrap()
    };
    for (name, value) in server_settings().filter(|(name, _)| *name != overridden) {
        assert_eq!(show(&mut db, name).await, value, "{name}");
    }
    assert_eq!(show(&mut db, overridden).await, flipped, "the caller's {overridden} wins");
    assert_eq!(show(&mut db, "fsync").await, "off");
    drop(db);
    cluster.stop().unwrap();

    let cluster = Cluster::start(&Options::default()).expect("start a private PostgreSQL");
    let mut db = sqlx::PgConnection::connect_with(&cluster.connect_options("postgres")).await.unwrap();
    for (name, value) in server_settings() {
        assert_eq!(show(&mut db, name).await, value, "{name}");
    }
    drop(db);
    cluster.stop().unwrap();
}

/// With the database's server gone, requests that need it are told the
/// database is unavailable, not that it is busy: once the pool's broken
/// connections are used up, sqlx reports a refused connect only as its wait
/// for a connection running out. And the server still stops within its grace.
#[tokio::test]
async fn with_the_database_server_gone_requests_are_told_it_is_unavailable_and_shutdown_is_bounded() {
    let mut app = spawn_app_with(&["--db-acquire-timeout", "100ms", "--shutdown-grace", "2s"]).await;
    let id = app.open_auction(100, 10, 60.0, 0).await["id"].as_i64().unwrap();
    assert_eq!(app.place_bid(&app.bidder(2), id, 100).await.status(), StatusCode::CREATED);
    let postmaster = app.cluster_pid().expect("the cluster runs");
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(postmaster as i32), nix::sys::signal::Signal::SIGKILL).unwrap();
    let client = crate::helpers::fresh_connection_client();
    crate::helpers::eventually(Duration::from_secs(10), "not ready without the database", || async {
        (client.get(app.url("/ready")).send().await.unwrap().status() == StatusCode::SERVICE_UNAVAILABLE).then_some(())
    })
    .await;
    let mut kinds = Vec::new();
    for n in 0..12 {
        let bid = client
            .post(app.url("/api/bids"))
            .bearer_auth(app.bidder(3))
            .json(&serde_json::json!({"auction_id": id, "amount": 200 + n * 10}))
            .send()
            .await
            .unwrap();
        kinds.push((bid.status(), bid.json::<Value>().await.unwrap()["type"].as_str().unwrap_or_default().to_owned()));
    }
    let read = client.get(app.url(&format!("/api/auctions/{id}?consistent=true"))).send().await.unwrap();
    kinds.push((read.status(), read.json::<Value>().await.unwrap()["type"].as_str().unwrap_or_default().to_owned()));
    assert!(
        kinds.iter().all(
            |(status, kind)| *status == StatusCode::SERVICE_UNAVAILABLE && kind == "/problems/database-unavailable"
        ),
        "{kinds:?}"
    );

    let stopping = Instant::now();
    tokio::task::spawn_blocking(move || app.stop_server()).await.unwrap();
    assert!(stopping.elapsed() < Duration::from_secs(10), "stopped in {:?}", stopping.elapsed());
}

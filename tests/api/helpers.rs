//! `spawn_app()` and typed helpers for talking to it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{SecondsFormat, Utc};
use gavel::auth::{Keys, Role};
use gavel::config::Serve;
use gavel::db::embedded::{Cluster, Options};
use gavel::db::target::Target;
use gavel::runtime::Server;
use reqwest::{Response, StatusCode};
use serde_json::{Value, json};
use sqlx::PgPool;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

pub const SECRET: &str = "integration-tests-secret-0123456789abcdef";

/// A running server, its database and a client; everything stops on drop.
pub struct TestApp {
    pub addr: SocketAddr,
    /// The admin listener (GET /metrics).
    pub admin_addr: SocketAddr,
    pub client: reqwest::Client,
    /// A pool on the same database, for inspecting and breaking things.
    pub db: PgPool,
    pub keys: Keys,
    /// How to reach the test database (for connections of a test's own).
    pub options: PgConnectOptions,
    server: Option<Server>,
    cluster: Option<Cluster>,
}

impl Drop for TestApp {
    fn drop(&mut self) {
        if let Some(server) = self.server.take() {
            server.stop();
        }
        if let Some(cluster) = self.cluster.take() {
            let _ = cluster.stop();
        }
    }
}

/// A two-core server with test-friendly timings.
pub async fn spawn_app() -> TestApp {
    spawn_app_with(&[]).await
}

/// Like [`spawn_app`], with extra `gavel serve` flags.
pub async fn spawn_app_with(flags: &[&str]) -> TestApp {
    // Started on this thread, which lives as long as the test: the cluster is told
    // to stop if the thread that started it ends.
    let cluster = start_cluster();
    let options = prepare_database(&cluster).await;
    let server = start_server(options.clone(), flags);
    app_on(cluster, options, server).await
}

/// Creates, migrates and seeds the test database on `cluster`; its options.
pub async fn prepare_database(cluster: &Cluster) -> PgConnectOptions {
    let options = cluster.connect_options("gavel");
    gavel::db::ensure_database(&options, "gavel").await.expect("create database");
    gavel::db::migrate(&options).await.expect("migrate");
    seed_accounts(&options).await;
    options
}

/// A [`TestApp`] of `server`, whose database is `options` on `cluster`.
pub async fn app_on(cluster: Cluster, options: PgConnectOptions, server: Server) -> TestApp {
    let keys = Keys::new(SECRET.as_bytes()).unwrap();
    let db = PgPoolOptions::new().max_connections(4).connect_with(options.clone()).await.expect("test pool");
    TestApp {
        addr: server.local_addr(),
        admin_addr: server.admin_addr().expect("metrics are on by default"),
        client: reqwest::Client::new(),
        db,
        keys,
        options,
        server: Some(server),
        cluster: Some(cluster),
    }
}

/// A two-core gavel on `database` (one server, or a multi-host target), with
/// test-friendly timings and extra `flags`: another instance, when the database
/// has one already.
pub fn start_server(database: impl Into<Target>, flags: &[&str]) -> Server {
    let mut args = vec!["--listen", "127.0.0.1:0", "--admin-addr", "127.0.0.1:0", "--cores", "2"];
    if !flags.contains(&"--lifecycle-tick") {
        args.extend_from_slice(&["--lifecycle-tick", "50ms"]);
    }
    // Without --steer-by-cpu: a test's new connections must spread over both cores
    // by the kernel's hash, whichever CPU the test's thread runs on.
    args.extend_from_slice(&["--steer-by-cpu", "false"]);
    args.extend_from_slice(flags);
    let config = Serve::from_flags(args).expect("test flags parse");
    Server::start(&config, database, Arc::new(Keys::new(SECRET.as_bytes()).unwrap())).expect("server starts")
}

/// The real binary, serving on its embedded PostgreSQL with `extra` flags: the
/// process, its address and its data directory. Its standard error is read
/// (and thrown away) to the end.
pub async fn spawn_binary(extra: &[&str]) -> (Spawned, String, String) {
    let mut args = vec!["serve", "--listen", "127.0.0.1:0", "--admin-addr", "127.0.0.1:0", "--cores", "2"];
    args.extend_from_slice(&["--log-format", "json"]);
    args.extend_from_slice(extra);
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_gavel"))
        .args(&args)
        .env("GAVEL_JWT_SECRET", SECRET)
        .env_remove("DATABASE_URL")
        .env_remove("GAVEL_DATA_DIR")
        .env("RUST_LOG", "info")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn gavel");
    let stderr = child.stderr.take().unwrap();
    let (addr, data_dir, lines) = tokio::task::spawn_blocking(move || {
        use std::io::BufRead;
        let mut lines = std::io::BufReader::new(stderr).lines();
        let (mut addr, mut data_dir) = (None, None);
        for line in lines.by_ref() {
            let line = line.unwrap();
            let Ok(v) = serde_json::from_str::<Value>(&line) else {
                continue;
            };
            if let Some(d) = v["fields"]["data_dir"].as_str() {
                data_dir = Some(d.to_owned());
            }
            if let Some(a) = v["fields"]["addr"].as_str() {
                addr = Some(a.to_owned());
                break;
            }
        }
        (addr.expect("gavel logged its address"), data_dir.expect("gavel logged its data dir"), lines)
    })
    .await
    .unwrap();
    // Keep draining stderr so the child never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines {});
    (Spawned(child), addr, data_dir)
}

pub fn sigterm(child: &std::process::Child) {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), nix::sys::signal::Signal::SIGTERM).unwrap();
}

/// A spawned gavel that is stopped when dropped, so that a failing test leaves no
/// server behind: SIGTERM first, which also stops its embedded PostgreSQL (its
/// own process group, which a SIGKILL to gavel would leave running), then SIGKILL
/// after 20 s.
pub struct Spawned(pub std::process::Child);

impl Spawned {
    /// Waits up to `limit` for the process to exit; its status, if it did.
    pub fn exited_within(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.0.try_wait().unwrap() {
                return Some(status);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            sigterm(&self.0);
            if self.exited_within(Duration::from_secs(20)).is_none() {
                let _ = self.0.kill();
                let _ = self.0.wait();
            }
        }
    }
}

/// How many accounts every test database starts with (ids 1..=ACCOUNTS), so tokens
/// minted for those ids name real accounts. The role in a token is what counts.
pub const ACCOUNTS: i64 = 300;

async fn seed_accounts(options: &PgConnectOptions) {
    use sqlx::Connection;
    let mut conn = sqlx::PgConnection::connect_with(options).await.expect("connect");
    sqlx::query(
        "insert into accounts (email, password_hash, role) \
         select 'user' || g || '@test.invalid', 'not-a-hash', 'bidder' from generate_series(1, $1) g order by g",
    )
    .bind(ACCOUNTS)
    .execute(&mut conn)
    .await
    .expect("seed accounts");
}

pub fn start_cluster() -> Cluster {
    start_cluster_on(None)
}

/// A private cluster that also listens on TCP `port` of 127.0.0.1, if given.
pub fn start_cluster_on(port: Option<u16>) -> Cluster {
    Cluster::start(&Options { settings: test_settings(), port, ..Options::default() })
        .expect("start a private PostgreSQL (is postgresql-15 installed?)")
}

fn test_settings() -> Vec<(String, String)> {
    vec![
        // Durability across power cuts is not under test here; speed is welcome.
        // (A crashed server process loses nothing: its writes are in the kernel.)
        ("fsync".into(), "off".into()),
        ("max_connections".into(), "100".into()),
    ]
}

/// A free TCP port of 127.0.0.1, for a cluster to listen on.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A hot standby of a primary, streaming from it, and a pool on its database.
pub struct Standby {
    pub db: PgPool,
    pub cluster: Cluster,
    /// Holds the standby's data directory; removed after the cluster stops.
    _dir: tempfile::TempDir,
}

impl Standby {
    /// Copies `primary` with `pg_basebackup -R` and starts the copy as its
    /// streaming standby, on TCP `port` too if given. Call it on the test's
    /// thread, as [`start_cluster`].
    pub async fn of(primary: &Cluster, port: Option<u16>) -> Standby {
        let dir = tempfile::tempdir().unwrap();
        Cluster::hand_over(dir.path()).expect("hand the standby's directory over");
        let data = dir.path().join("data");
        primary.base_backup(&data).expect("pg_basebackup -R");
        let cluster =
            Cluster::start(&Options { data_dir: Some(data), settings: test_settings(), port, ..Options::default() })
                .expect("start the standby");
        let options = cluster.connect_options("gavel");
        let db = PgPoolOptions::new().max_connections(2).connect_with(options).await.expect("standby pool");
        Standby { db, cluster, _dir: dir }
    }

    /// Waits until the standby has replayed everything the primary (`primary`)
    /// has written so far.
    pub async fn caught_up(&self, primary: &PgPool) {
        let lsn: String =
            sqlx::query_scalar("select pg_current_wal_lsn()::text").fetch_one(primary).await.expect("primary's LSN");
        eventually(Duration::from_secs(10), "the standby replays the primary's writes", || async {
            let behind: bool = sqlx::query_scalar("select pg_last_wal_replay_lsn() < $1::pg_lsn")
                .bind(&lsn)
                .fetch_one(&self.db)
                .await
                .ok()?;
            (!behind).then_some(())
        })
        .await;
    }
}

/// A client that opens a new connection for every request, so requests spread
/// over the cores as the kernel hashes new connections.
/// The sum of a metric's samples (an exposition's lines) whose line contains
/// every one of `labels`.
pub fn sum(text: &str, name: &str, labels: &[&str]) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")) && labels.iter().all(|x| l.contains(x)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

pub fn fresh_connection_client() -> reqwest::Client {
    reqwest::Client::builder().pool_max_idle_per_host(0).build().unwrap()
}

/// RFC 3339 for a time `secs` seconds from now (negative: in the past).
pub fn at(secs: f64) -> String {
    (Utc::now() + chrono::Duration::milliseconds((secs * 1000.0) as i64)).to_rfc3339_opts(SecondsFormat::Millis, true)
}

impl TestApp {
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// The admin listener's `/metrics`, as text.
    pub async fn scrape(&self) -> String {
        let response = self.client.get(format!("http://{}/metrics", self.admin_addr)).send().await.expect("scrape");
        assert_eq!(response.status(), StatusCode::OK);
        response.text().await.unwrap()
    }

    /// Stops the server (its database stays up); returns once it has stopped.
    pub fn stop_server(&mut self) {
        if let Some(server) = self.server.take() {
            server.stop();
        }
    }

    /// The postmaster of the test's cluster, while it runs.
    pub fn cluster_pid(&self) -> Option<u32> {
        self.cluster.as_ref().and_then(Cluster::pid)
    }

    /// Begins the server's shutdown (readiness turns 503, listeners close).
    pub fn drain(&self) {
        if let Some(server) = &self.server {
            server.begin_shutdown();
        }
    }

    /// Waits until the cores have taken in everything sent to them so far: every
    /// connection accepted, every byte read. Linux's `/proc/net/tcp` shows a
    /// listener's accept queue, and an open connection's unread bytes, as its
    /// `rx_queue`; this waits until it is 0 on every socket of the server's port.
    pub async fn wait_until_taken_in(&self) {
        let port = format!(":{:04X}", self.addr.port());
        eventually(Duration::from_secs(5), "the cores take in what was sent", || async {
            let table = std::fs::read_to_string("/proc/net/tcp").expect("/proc/net/tcp");
            let waiting = table.lines().skip(1).any(|line| {
                // local address, remote address, state, tx_queue:rx_queue
                let fields: Vec<&str> = line.split_whitespace().collect();
                fields[1].ends_with(&port) && !fields[4].ends_with(":00000000")
            });
            (!waiting).then_some(())
        })
        .await;
    }

    pub fn token(&self, account: i64, role: Role) -> String {
        self.keys.mint(account, role, Duration::from_secs(3600)).0
    }

    pub fn seller(&self) -> String {
        self.token(1, Role::Seller)
    }

    pub fn bidder(&self, account: i64) -> String {
        self.token(account, Role::Bidder)
    }

    pub async fn post_json(&self, path: &str, token: &str, body: &Value) -> Response {
        self.client.post(self.url(path)).bearer_auth(token).json(body).send().await.expect("request")
    }

    /// A POST with a body as given: any content type (or none), any bytes.
    pub async fn post_raw(&self, path: &str, token: &str, content_type: Option<&str>, body: reqwest::Body) -> Response {
        let mut request = self.client.post(self.url(path)).bearer_auth(token).body(body);
        if let Some(content_type) = content_type {
            request = request.header("content-type", content_type);
        }
        request.send().await.expect("request")
    }

    pub async fn get(&self, path: &str) -> Response {
        self.client.get(self.url(path)).send().await.expect("request")
    }

    pub async fn create_auction(&self, body: &Value) -> Response {
        self.post_json("/api/auctions", &self.seller(), body).await
    }

    /// An auction that is open now and ends in `ends_in` seconds.
    pub async fn open_auction(&self, reserve: i64, min_increment: i64, ends_in: f64, extend_secs: i64) -> Value {
        let body = json!({
            "title": "lot", "reserve": reserve, "min_increment": min_increment,
            "starts_at": at(-1.0), "ends_at": at(ends_in), "extend_secs": extend_secs,
        });
        let response = self.create_auction(&body).await;
        assert_eq!(response.status(), StatusCode::CREATED);
        response.json().await.unwrap()
    }

    pub async fn place_bid(&self, bidder: &str, auction_id: i64, amount: i64) -> Response {
        self.post_json("/api/bids", bidder, &json!({"auction_id": auction_id, "amount": amount})).await
    }

    /// A proxy bid: `amount` now, and up to `max_amount` whenever someone else bids.
    pub async fn place_proxy_bid(&self, bidder: &str, auction_id: i64, amount: i64, max_amount: i64) -> Response {
        let body = json!({"auction_id": auction_id, "amount": amount, "max_amount": max_amount});
        self.post_json("/api/bids", bidder, &body).await
    }

    /// The caller's own bids (`GET /api/me/bids`), newest first: the first page.
    pub async fn my_bids(&self, bidder: &str) -> Vec<Value> {
        let response = self.client.get(self.url("/api/me/bids?limit=100")).bearer_auth(bidder).send().await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        let page: Value = response.json().await.unwrap();
        page["items"].as_array().unwrap().clone()
    }

    pub async fn auction(&self, id: i64, consistent: bool) -> Value {
        let path =
            if consistent { format!("/api/auctions/{id}?consistent=true") } else { format!("/api/auctions/{id}") };
        let response = self.get(&path).await;
        assert_eq!(response.status(), StatusCode::OK);
        response.json().await.unwrap()
    }

    /// How many cores' LISTEN connections are up.
    pub async fn listener_count(&self) -> i64 {
        sqlx::query_scalar("select count(*) from pg_stat_activity where application_name like 'gavel-core-%-listen'")
            .fetch_one(&self.db)
            .await
            .unwrap()
    }

    /// Waits until every core (two) has its LISTEN connection.
    pub async fn wait_for_listeners(&self) {
        eventually(Duration::from_secs(5), "both listeners are connected", || async {
            (self.listener_count().await == 2).then_some(())
        })
        .await;
    }

    /// Terminates every core's LISTEN connection; returns how many were killed.
    pub async fn kill_listeners(&self) -> i64 {
        sqlx::query_scalar(
            "select count(*) from (select pg_terminate_backend(pid) from pg_stat_activity \
             where application_name like 'gavel-core-%-listen') t",
        )
        .fetch_one(&self.db)
        .await
        .unwrap()
    }

    /// Kills every core's LISTEN connection and waits until each core has
    /// reconnected and reloaded its caches: its reconnect counter goes up only
    /// after the reload. Reads nothing from the public port meanwhile.
    pub async fn reconnect_listeners(&self) {
        let before = self.per_core(gavel::metrics::CACHE_LISTENER_RECONNECTS_TOTAL, &[]).await;
        assert_eq!(self.kill_listeners().await, 2);
        eventually(Duration::from_secs(5), "every core reconnected and reloaded", || async {
            let now = self.per_core(gavel::metrics::CACHE_LISTENER_RECONNECTS_TOTAL, &[]).await;
            (now[0] > before[0] && now[1] > before[1]).then_some(())
        })
        .await;
    }

    /// The samples of `family` summed per core (`[core 0, core 1]`), over the
    /// sample lines that contain every one of `having` (e.g. `status="200"`).
    pub async fn per_core(&self, family: &str, having: &[&str]) -> [f64; 2] {
        per_core_at(self.admin_addr, family, having).await
    }

    /// GETs `path` (of route template `route`) on new connections until every core
    /// has answered it with 200 at least once; returns the bodies read.
    pub async fn read_on_every_core(&self, path: &str, route: &str) -> Vec<Value> {
        let route = format!("route=\"{route}\"");
        let having = [route.as_str(), "status=\"200\""];
        let before = self.per_core(gavel::metrics::HTTP_REQUESTS_TOTAL, &having).await;
        let client = fresh_connection_client();
        let mut bodies = Vec::new();
        for _ in 0..100 {
            let response = client.get(self.url(path)).send().await.expect("request");
            assert_eq!(response.status(), StatusCode::OK, "GET {path}");
            bodies.push(response.json().await.unwrap());
            let now = self.per_core(gavel::metrics::HTTP_REQUESTS_TOTAL, &having).await;
            if now[0] > before[0] && now[1] > before[1] {
                return bodies;
            }
        }
        panic!("100 new connections to {path} did not reach both cores");
    }

    /// Runs `sql` (with `$1` = `id`) with triggers off, so no notification tells
    /// the caches about it.
    pub async fn silently(&self, sql: &str, id: i64) {
        let mut conn = self.db.acquire().await.unwrap();
        sqlx::query("set session_replication_role = replica").execute(&mut *conn).await.unwrap();
        sqlx::query(sql).bind(id).execute(&mut *conn).await.unwrap();
        sqlx::query("reset session_replication_role").execute(&mut *conn).await.unwrap();
    }

    /// Every accepted bid of an auction, oldest first, following pagination.
    pub async fn all_bids(&self, auction_id: i64) -> Vec<Value> {
        let mut all = Vec::new();
        let mut after: Option<i64> = None;
        loop {
            let path = match after {
                Some(a) => format!("/api/auctions/{auction_id}/bids?limit=100&after={a}"),
                None => format!("/api/auctions/{auction_id}/bids?limit=100"),
            };
            let page: Value = self.get(&path).await.json().await.unwrap();
            all.extend(page["items"].as_array().unwrap().iter().cloned());
            match page["next_after"].as_i64() {
                Some(a) => after = Some(a),
                None => break,
            }
        }
        all.reverse();
        all
    }
}

/// The samples of `family` whose labels include all of `having`, summed per core,
/// from the `/metrics` of the admin listener at `admin`.
pub async fn per_core_at(admin: SocketAddr, family: &str, having: &[&str]) -> [f64; 2] {
    let response = reqwest::get(format!("http://{admin}/metrics")).await.expect("scrape");
    assert_eq!(response.status(), StatusCode::OK);
    let text = response.text().await.unwrap();
    let mut sums = [0.0; 2];
    let prefix = format!("{family}{{");
    for line in text.lines().filter(|l| l.starts_with(&prefix)) {
        if !having.iter().all(|h| line.contains(h)) {
            continue;
        }
        let value: f64 = line.rsplit(' ').next().and_then(|v| v.parse().ok()).expect("a sample's value");
        if line.contains("core=\"0\"") {
            sums[0] += value;
        } else if line.contains("core=\"1\"") {
            sums[1] += value;
        }
    }
    sums
}

/// A token signed with the right secret whose expiry has passed.
pub fn expired_token(account: i64, role: &str) -> String {
    let now = Utc::now().timestamp();
    let claims = json!({
        "sub": account.to_string(), "role": role, "iat": now - 120, "exp": now - 60, "iss": "gavel",
        "jti": "00000000-0000-4000-8000-000000000001", "sep": 0,
    });
    jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

/// The `amount` of each item of a page.
pub fn amounts(page: &Value) -> Vec<i64> {
    page["items"].as_array().unwrap().iter().map(|b| b["amount"].as_i64().unwrap()).collect()
}

/// The `field` of each entry of a validation problem's `errors`.
pub fn invalid_fields(problem: &Value) -> Vec<String> {
    problem["errors"].as_array().unwrap().iter().map(|e| e["field"].as_str().unwrap().to_owned()).collect()
}

/// Asserts a problem+json response and returns its body.
pub async fn assert_problem(response: Response, status: StatusCode, kind: &str) -> Value {
    assert_eq!(response.status(), status, "status");
    let content_type = response.headers()["content-type"].to_str().unwrap().to_owned();
    assert_eq!(content_type, "application/problem+json");
    let request_id = response.headers()["x-request-id"].to_str().unwrap().to_owned();
    let body: Value = response.json().await.expect("problem body is JSON");
    assert_eq!(body["type"], kind, "{body}");
    assert_eq!(body["status"], status.as_u16(), "{body}");
    assert!(body["title"].is_string() && body["detail"].is_string(), "{body}");
    assert_eq!(body["request_id"], request_id, "problem quotes the response's request id");
    body
}

/// Polls `check` until it returns `Some`, failing after `timeout`.
pub async fn eventually<T, F, Fut>(timeout: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

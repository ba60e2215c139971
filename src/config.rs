//! Command-line and environment configuration.
//!
//! Every flag also reads a `GAVEL_*` environment variable (and `DATABASE_URL`), so the
//! same binary is configured by flags on a laptop and by the environment under systemd.
//! Each default is chosen for one machine running gavel, its PostgreSQL and a load
//! generator side by side; each doc comment says why.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// gavel: a thread-per-core HTTP API server for real-time bidding on PostgreSQL.
#[derive(Debug, Parser)]
#[command(name = "gavel", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the HTTP API server (starts a private PostgreSQL when DATABASE_URL is unset).
    Serve(Box<Serve>),
    /// Apply the database migrations and exit.
    Migrate(Migrate),
    /// Print a signed JWT, for load tests and scripts.
    Token(Token),
}

/// Where the database is: an external server, or a private embedded cluster.
#[derive(Debug, Clone, Args)]
pub struct Database {
    /// PostgreSQL URL. Unset means: start a private cluster from the locally installed
    /// PostgreSQL server binaries, so `gavel serve` needs no set-up. For failover,
    /// list the primary and its standbys in libpq's form
    /// (`postgres://u@db1:5432,db2:5432/gavel?target_session_attrs=read-write`):
    /// gavel uses whichever accepts writes, and follows a promotion.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,

    /// A streaming standby of the primary to send reads to that may lag a
    /// little: bid history, the auction and inventory lists, and cache misses of
    /// closed auctions. Repeat the flag, or list them space-separated in
    /// GAVEL_REPLICA_URLS. Caches, `?consistent=true` reads and every write stay
    /// on the primary.
    #[arg(long = "replica-url", env = "GAVEL_REPLICA_URLS", value_delimiter = ' ', hide_env_values = true)]
    pub replica_urls: Vec<String>,

    /// A replica whose replay lags the primary by more than this gets no reads
    /// until it catches up; each core measures every quarter of it (between
    /// 50 ms and 1 s).
    #[arg(long, env = "GAVEL_REPLICA_MAX_LAG", default_value = "1s", value_parser = humantime::parse_duration)]
    pub replica_max_lag: Duration,

    /// Connections each core opens to each replica, when it first reads there.
    #[arg(long, env = "GAVEL_REPLICA_CONNS_PER_CORE", default_value_t = 2)]
    pub replica_conns_per_core: u32,

    /// Data directory of the embedded cluster. Unset means a fresh temporary directory,
    /// removed at exit: the one-command start leaves nothing behind. Set it to keep data.
    #[arg(long, env = "GAVEL_DATA_DIR")]
    pub data_dir: Option<PathBuf>,

    /// Directory holding the PostgreSQL server binaries (initdb, postgres) for the
    /// embedded cluster. Unset means the newest of /usr/lib/postgresql/*/bin, then PATH.
    #[arg(long, env = "GAVEL_PG_BIN_DIR")]
    pub pg_bin_dir: Option<PathBuf>,
}

/// The token signing secret, shared by `serve` and `token` so minted tokens verify.
#[derive(Debug, Clone, Args)]
pub struct Secret {
    /// HS256 secret for session tokens (at least 32 bytes). Unset: `serve` generates a
    /// random one for the run and says so; `token` refuses, since its tokens would not
    /// verify anywhere.
    #[arg(long, env = "GAVEL_JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<String>,
}

#[derive(Debug, Clone, Args)]
pub struct Serve {
    /// Public address. Loopback by default, so a first start exposes nothing; use
    /// 0.0.0.0:8080 to serve the network. Port 0 picks a free port (all cores share it).
    #[arg(long, env = "GAVEL_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,

    /// Admin address serving GET /metrics (Prometheus text format). Loopback by
    /// default and never the public port: metrics are for the operator's scraper.
    #[arg(long, env = "GAVEL_ADMIN_ADDR", default_value = "127.0.0.1:9100")]
    pub admin_addr: SocketAddr,

    /// Record metrics. Off, every recording call is a no-op and the admin
    /// listener is not started (for measuring what metrics cost).
    #[arg(long, env = "GAVEL_METRICS", default_value_t = true, action = clap::ArgAction::Set)]
    pub metrics: bool,

    /// Number of cores, each a pinned thread with its own runtime, listener and pool.
    /// Unset: every core this process may run on.
    #[arg(long, env = "GAVEL_CORES")]
    pub cores: Option<usize>,

    /// Tie each core's listener to the CPU the core is pinned to (`SO_INCOMING_CPU`),
    /// so a connection goes to the core on the CPU that receives its packets. On
    /// by default: with few connections the kernel's hash alone split them unevenly
    /// (8 connections: up to 121 % more requests on one core; see
    /// `runtime/socket.rs`). Turn it off when a NIC with fewer queues than gavel has
    /// cores interrupts gavel's own CPUs: every connection would go to those cores
    /// (tuning/README.md says how to lay interrupts out instead).
    #[arg(long, env = "GAVEL_STEER_BY_CPU", default_value_t = true, action = clap::ArgAction::Set)]
    pub steer_by_cpu: bool,

    /// PostgreSQL connections per core. Small on purpose: up to
    /// --bid-batches-in-flight carry bid batches, one announces them, the rest carry
    /// reads and orders; more mostly adds lock contention in the database. Total =
    /// cores × this, plus one LISTEN connection per core.
    #[arg(long, env = "GAVEL_DB_CONNS_PER_CORE", default_value_t = 4)]
    pub db_conns_per_core: u32,

    /// How long a request may wait for a database connection before it is shed with
    /// 503 and Retry-After. Short: a bidder is better told to retry than kept waiting.
    #[arg(long, env = "GAVEL_DB_ACQUIRE_TIMEOUT", default_value = "250ms", value_parser = humantime::parse_duration)]
    pub db_acquire_timeout: Duration,

    /// Time allowed to receive a request's headers; it also bounds how long a
    /// keep-alive connection may sit idle (hyper starts it when a connection goes
    /// idle; an HTTP/2 connection closes after this long with no stream open),
    /// so a silent client cannot hold a connection slot.
    #[arg(long, env = "GAVEL_HEADER_READ_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub header_read_timeout: Duration,

    /// Upper bound on handling one request, body read included; past it the client
    /// gets 503. Healthy cached reads take well under a millisecond and bids tens of
    /// milliseconds under load, so seconds here only ever catch something stuck.
    #[arg(long, env = "GAVEL_REQUEST_TIMEOUT", default_value = "5s", value_parser = humantime::parse_duration)]
    pub request_timeout: Duration,

    /// Largest accepted request body, in bytes. Bids are ~50 bytes and orders a few
    /// hundred; 64 KiB leaves room for large orders and nothing for abuse.
    #[arg(long, env = "GAVEL_BODY_LIMIT", default_value_t = 64 * 1024)]
    pub body_limit: usize,

    /// Open connections per core; past it the core stops accepting (connections wait
    /// in the kernel backlog) until one closes.
    #[arg(long, env = "GAVEL_MAX_CONNECTIONS_PER_CORE", default_value_t = 10_000)]
    pub max_connections_per_core: usize,

    /// Serve HTTP/2 over cleartext (prior knowledge: a client that starts with the
    /// HTTP/2 preface) on the same port as HTTP/1.1, for clients and harnesses that
    /// multiplex many requests or event streams over one connection. Off, the port
    /// speaks HTTP/1.1 alone.
    #[arg(long, env = "GAVEL_HTTP2", default_value_t = true, action = clap::ArgAction::Set)]
    pub http2: bool,

    /// Concurrent streams per HTTP/2 connection (requests and event streams); a
    /// client past it waits for one to end. Event streams count against
    /// --max-streams-per-core as well, whatever connection carries them.
    #[arg(long, env = "GAVEL_HTTP2_MAX_STREAMS", default_value_t = 1000)]
    pub http2_max_streams: u32,

    /// Largest header list of an HTTP/2 request, in bytes (decoded, as HTTP/2
    /// counts it); past it the stream is refused. HTTP/1.1 heads are bounded by
    /// hyper's read buffer the same way.
    #[arg(long, env = "GAVEL_HTTP2_MAX_HEADER_LIST", default_value_t = 16 * 1024)]
    pub http2_max_header_list: u32,

    /// Kernel send buffer of each accepted connection, in bytes (`SO_SNDBUF`); unset,
    /// the kernel sizes it (Linux grows it to 4 MiB). What a client too slow to read
    /// leaves queued in the kernel — for an event stream, states that newer ones
    /// have superseded — is bounded by it; past it, gavel keeps only each auction's
    /// newest state for that stream.
    #[arg(long, env = "GAVEL_SEND_BUFFER")]
    pub send_buffer: Option<usize>,

    /// Event streams (`text/event-stream`) a core keeps open at once; past it a new
    /// one gets 503 with Retry-After. Each holds a connection too.
    #[arg(long, env = "GAVEL_MAX_STREAMS_PER_CORE", default_value_t = 10_000)]
    pub max_streams_per_core: usize,

    /// How often an event stream gets a comment line, so that proxies and load
    /// balancers do not close it as idle.
    #[arg(long, env = "GAVEL_STREAM_HEARTBEAT", default_value = "15s", value_parser = humantime::parse_duration)]
    pub stream_heartbeat: Duration,

    /// Events a core hands its event streams per second at most (0: no limit).
    /// Past it, an auction's changes wait for the next 10 ms tick and only the
    /// newest is sent, so the fan-out to many watchers cannot take the CPU that
    /// bids need. An event costs a write to its HTTP/1.1 connection; on HTTP/2
    /// the events of a connection's streams share writes. 250,000, more than a
    /// core delivers (5–6 µs of its CPU an event on HTTP/2): what holds events
    /// back for the bids is --stream-yield-to-load, down to 1/64 of this. With
    /// it following the bids' backlog, 10,000 HTTP/2 streams at 2,000 bids/s
    /// (2026-11-30, three alternating runs each) got delivery p99 45–54 ms at
    /// 250,000 against 45–77 ms at 100,000, the bid storm 0.89–1.06× of without
    /// streams at both. 100,000 before that, and 20,000 while every event was a
    /// write of its own (p99 230 ms).
    #[arg(long, env = "GAVEL_STREAM_EVENTS_PER_SEC", default_value_t = 250_000)]
    pub stream_events_per_sec: usize,

    /// Give way to bids: while a core's bids back up (16 waiting on its batches on
    /// average over a tenth of a second), its events budget is cut to a quarter,
    /// down to 1/64 of --stream-events-per-sec, and it grows back by half every
    /// tenth of a second in which fewer than 8 waited. Watchers then coalesce instead of
    /// slowing the bids. Off, the budget is fixed. (It followed the CPU's idle
    /// time before, which on a shared machine cut events no bid was waiting for;
    /// the figures are beside `Share` in src/events.rs.)
    #[arg(long, env = "GAVEL_STREAM_YIELD_TO_LOAD", default_value_t = true, action = clap::ArgAction::Set)]
    pub stream_yield_to_load: bool,

    /// The reconnection delay event streams are told (`retry:`) when the server
    /// shuts down, so their clients come back, to another instance, soon after.
    #[arg(long, env = "GAVEL_STREAM_RETRY", default_value = "1s", value_parser = humantime::parse_duration)]
    pub stream_retry: Duration,

    /// Most entries of each per-core cache (auctions; inventory). Past it, the entry
    /// read least recently leaves, and its next read goes to the database. An
    /// auction with its rendered response takes under 1 KiB: reading 21,000 of
    /// them on each of 2 cores added 30–34 MiB of RSS (gavel-loadtest seed, then
    /// auction-read over all of them).
    #[arg(long, env = "GAVEL_CACHE_CAPACITY", default_value_t = 50_000)]
    pub cache_capacity: usize,

    /// How long a closed auction stays in the caches after its end; its reads then
    /// go to the database. Closed auctions are read most just after they close.
    #[arg(long, env = "GAVEL_CACHE_CLOSED_GRACE", default_value = "5m", value_parser = humantime::parse_duration)]
    pub cache_closed_grace: Duration,

    /// How long in-flight requests may take to finish once gavel stops accepting.
    #[arg(long, env = "GAVEL_SHUTDOWN_GRACE", default_value = "10s", value_parser = humantime::parse_duration)]
    pub shutdown_grace: Duration,

    /// On SIGTERM/SIGINT, how long gavel keeps serving, with GET /ready at 503,
    /// before it stops accepting: the time a load balancer needs to see it not
    /// ready and send no more. Then it drains within --shutdown-grace. A second
    /// signal cuts the delay short.
    #[arg(long, env = "GAVEL_DRAIN_DELAY", default_value = "5s", value_parser = humantime::parse_duration)]
    pub drain_delay: Duration,

    /// Bids a core may hold waiting for its database write; past it new bids get 503.
    /// Bounded so overload is shed, not queued for ever.
    #[arg(long, env = "GAVEL_BID_QUEUE_DEPTH", default_value_t = 4096)]
    pub bid_queue_depth: usize,

    /// Most bids sent to the database in one statement. Batches share one commit:
    /// on 2 cores, batching gave 4.3× the accepted bids of batches of one; the cap
    /// bounds how long one batch holds its row locks.
    #[arg(long, env = "GAVEL_MAX_BID_BATCH", default_value_t = 256)]
    pub max_bid_batch: usize,

    /// Bid batches the whole process may have running in the database at once,
    /// shared by every core's batcher (0: no such limit, each core sends on its
    /// own). A batch waits for a lane and grows meanwhile; it gives the lane back
    /// once its statement has answered, before its commit, so the next batch runs
    /// while the last one's commit waits for the disk, and batches on the same
    /// auctions no longer queue on each other's row locks mid-statement. Bid storm
    /// (`gavel-loadtest run bid-storm`, 64 connections, 2 cores, two alternating
    /// rounds): over 1000 auctions 16.8K and 19.9K bids/s with one lane, 17.0K and
    /// 18.7K without; on 10 hot auctions 18.3K and 17.4K accepted/s with one lane,
    /// 14.7K and 15.2K without; p99 0.5-2 ms lower with it; two lanes were below
    /// one (16.5K and 15.4K against 19.1K and 18.3K). Side by side on one new
    /// cluster (`loadtest/ab --b '--bid-lanes 0'`, ten 3 s rounds, 2026-12-03):
    /// without a lane, over 1000 auctions 0.98x the bids/s (more in 5 rounds of
    /// 10) and 1.17x the p99 (lower in 2, sign test p = 0.11); on 10 hot ones
    /// 0.81x and 1.73x (more in 1 round of 10, lower in none: p = 0.02, 0.002).
    #[arg(long, env = "GAVEL_BID_LANES", default_value_t = 1)]
    pub bid_lanes: usize,

    /// Bid batches a core may have in the database at once, each on its own pool
    /// connection, a lane or not. More than one, so the database works on the next
    /// batch while the last one commits; fewer than the pool, so the announcer,
    /// cache misses, orders and history reads still find a connection (capped at
    /// the pool less one).
    //
    // One measured against two (gavel-loadtest run bid-storm, 64 connections,
    // 5 s, four rounds alternating, 2026-12-02, AMD EPYC): over 1000 auctions
    // 12.3-18.1K bids/s against 11.9-14.6K; on 10 hot auctions 9.7-16.7K
    // accepted/s against 13.4-14.8K; open loop at 9,000/s p99 17.7-34.3 ms
    // against 15.1-61.6: within this machine's noise. Side by side on
    // 2026-12-03 (`loadtest/ab`, ten 3 s rounds each, new clusters), one gave
    // the bids a shorter tail: p99 open loop 0.78x at 7,000/s (lower in 9
    // rounds of 10), 0.75x at 7,000/s again (7 of 10), 0.78x at 5,000/s (8 of
    // 10), 24 rounds of 30 (sign test p = 0.001); and the same accepted bids:
    // 0.98x at 64 connections (more in 5 of 10), 1.00x at 256 (4 of 10), 1.05x
    // on 10 hot auctions (7 of 10). But on those hot auctions twice as many bids
    // were refused (409: 14 % of the answers against 6-7 %), and the two
    // comparison runs with one as the default (`loadtest/compare` on 3dbbe06)
    // gave 0.81x and 0.96x the reference there, below the target of 1.0 that
    // 32 of the 36 runs before met, and 1.24x and 1.43x at 256 connections,
    // below the 1.45-2.57 of those runs (their bid p99, 9.7 and 7.2 ms, was
    // among the lowest). Why the refusals: with one in flight a core's batch
    // gathers bids for a whole round trip, so the two cores' batches span more
    // of the same time, and on a hot auction the one that commits second holds
    // bids below the other's newest (the generator's amounts rise with the
    // time they are sent). Sorting each auction's bids in a batch by amount
    // does not reach those: again side by side with it (2026-12-03, 10 hot
    // auctions), one in flight had 12.3 % refused against 6.2 % and 0.92x the
    // accepted bids/s (more in 2 rounds of 10, p = 0.11). Two stay.
    #[arg(long, env = "GAVEL_BID_BATCHES_IN_FLIGHT", default_value_t = 2)]
    pub bid_batches_in_flight: usize,

    /// Bids that must be waiting before a core sends a batch while another of its
    /// batches is still in the database. A batch has a fixed cost in the database
    /// (about 0.3 ms of its CPU); overlapping tiny batches spends the CPU the
    /// database needs when it is the bottleneck, overlapping big ones hides its
    /// commit latency when the disk is. 1: overlap as soon as a bid waits.
    /// At 4 instead, side by side at 7,000 bids/s open loop
    /// (`loadtest/ab`, ten rounds, 2026-12-03, on a machine then too busy for
    /// that rate): p99 0.65x, lower in 7 rounds of 10, noise (p = 0.34).
    #[arg(long, env = "GAVEL_BID_OVERLAP_AT", default_value_t = 16)]
    pub bid_overlap_at: usize,

    /// ...or once the newest of its batches has been in the database this long,
    /// so that a slow commit does not hold the bids behind it. Longer than a batch
    /// usually takes, so that it only catches the slow ones. Bid storm at 6000/s,
    /// open loop, alternating: p99 33.0 and 11.4 ms without, 25.0 and 10.0 ms with
    /// 2ms; closed loop within the noise (11.4/10.9K bids/s without, 11.0/10.6K).
    /// 1ms made batches smaller without a better tail. 6ms instead, side by side
    /// at 7,000 bids/s open loop (`loadtest/ab`, ten rounds, 2026-12-03): p99
    /// 0.69x, lower in 7 rounds of 10 (p = 0.34): less overlap, a shorter tail,
    /// as with one batch in flight (see --bid-batches-in-flight). Again, with
    /// the batch sorted by amount: 1.09x the accepted bids/s at 256 connections
    /// (more in 6 rounds of 10), 0.94x on 10 hot auctions (4 of 10), p99 0.98x at
    /// 6,500 bids/s open loop (lower in 12 of 20, p = 0.50; the generator behind
    /// its rate in most rounds): noise all, so 2ms stays.
    #[arg(long, env = "GAVEL_BID_OVERLAP_AFTER", default_value = "2ms", value_parser = humantime::parse_duration)]
    pub bid_overlap_after: Duration,

    /// Orders a core may hold waiting for their database write; past it new orders
    /// get 503.
    #[arg(long, env = "GAVEL_ORDER_QUEUE_DEPTH", default_value_t = 1024)]
    pub order_queue_depth: usize,

    /// Most orders sent to the database in one statement. Smaller than for bids:
    /// an order locks several rows, and a batch holds every lock until it commits.
    #[arg(long, env = "GAVEL_MAX_ORDER_BATCH", default_value_t = 64)]
    pub max_order_batch: usize,

    /// How often core 0 opens and closes auctions whose time has come. Reads derive
    /// the status from the clock anyway; this bounds how late a winner is recorded.
    #[arg(long, env = "GAVEL_LIFECYCLE_TICK", default_value = "200ms", value_parser = humantime::parse_duration)]
    pub lifecycle_tick: Duration,

    /// An origin (`https://shop.example` — scheme, host, port if any) whose
    /// browser pages may call the API, with credentials, so the session cookie
    /// works from that front end. Repeat the flag, or list them comma-separated
    /// in GAVEL_CORS_ORIGINS. Preflights are answered and may be cached for 10
    /// minutes. Default: none, and then no cross-origin access at all.
    #[arg(long = "cors-origin", env = "GAVEL_CORS_ORIGINS", value_delimiter = ',', value_parser = parse_origin)]
    pub cors_origins: Vec<axum::http::HeaderValue>,

    /// Lifetime of the token and cookie a log-in returns, and the longest a token
    /// may live: one made to live longer (`gavel token --ttl`) is refused.
    #[arg(long, env = "GAVEL_SESSION_TTL", default_value = "24h", value_parser = humantime::parse_duration)]
    pub session_ttl: Duration,

    /// Failed log-ins allowed per account (by e-mail address) within
    /// --login-failure-window. Past it, that account's log-ins get 429 with
    /// Retry-After, right password or not, until its oldest failure leaves the
    /// window. Counted for the whole server, whatever core a log-in reaches;
    /// successful log-ins do not count. 0: no limit.
    #[arg(long, env = "GAVEL_LOGIN_FAILURES_PER_ACCOUNT", default_value_t = 10)]
    pub login_failures_per_account: u32,

    /// Failed log-ins allowed per client address within --login-failure-window,
    /// whatever accounts they try; as --login-failures-per-account otherwise.
    /// 0: no limit.
    #[arg(long, env = "GAVEL_LOGIN_FAILURES_PER_ADDRESS", default_value_t = 100)]
    pub login_failures_per_address: u32,

    /// The sliding window the log-in limits count failures in.
    #[arg(long, env = "GAVEL_LOGIN_FAILURE_WINDOW", default_value = "5m", value_parser = humantime::parse_duration)]
    pub login_failure_window: Duration,

    /// Bids one bidder may place per second, in bursts of as many, counted for
    /// the whole server; past it, 429 with Retry-After. Unset: no limit (the
    /// default: a bidder's bids are what gavel is for).
    #[arg(long, env = "GAVEL_BIDS_PER_SECOND_PER_BIDDER")]
    pub bids_per_second_per_bidder: Option<std::num::NonZeroU32>,

    /// Where item images are stored: `file://DIR`, `s3://BUCKET[/PREFIX]`,
    /// `gs://BUCKET` or `az://CONTAINER`. Cloud credentials come from the
    /// environment, as each cloud's client reads them (AWS_*, GOOGLE_*,
    /// AZURE_*). Unset: `objects/` under --data-dir, or else a temporary
    /// directory removed at exit (as the embedded PostgreSQL's data).
    #[arg(long, env = "GAVEL_OBJECT_STORE")]
    pub object_store: Option<url::Url>,

    /// A configuration key of the object store's client, as `KEY=VALUE`
    /// (object_store's names, e.g. `aws_endpoint=http://127.0.0.1:9000` and
    /// `aws_allow_http=true` for an S3-compatible server on this machine).
    /// Repeat the flag, or list them comma-separated in GAVEL_OBJECT_STORE_OPTIONS.
    #[arg(long = "object-store-option", env = "GAVEL_OBJECT_STORE_OPTIONS", value_delimiter = ',', value_parser = parse_key_value)]
    pub object_store_options: Vec<(String, String)>,

    /// Largest image an upload may store, in bytes.
    #[arg(long, env = "GAVEL_IMAGE_MAX_BYTES", default_value_t = 5 * 1024 * 1024)]
    pub image_max_bytes: u64,

    /// The request header that names the client's address (e.g.
    /// `X-Forwarded-For` or `X-Real-IP`), for the per-address log-in limit
    /// behind a reverse proxy: the last address in it counts, the one the
    /// proxy saw. Unset: the connection's peer address. Set it only behind a
    /// proxy that sets the header, or clients choose their own address.
    #[arg(long, env = "GAVEL_CLIENT_ADDRESS_HEADER")]
    pub client_address_header: Option<axum::http::HeaderName>,

    /// Log filter (tracing's EnvFilter syntax, e.g. `info,gavel=debug`). Unset:
    /// `RUST_LOG`, else `info` — which logs no line per request on the hot path.
    #[arg(long = "log", env = "GAVEL_LOG")]
    pub log_filter: Option<String>,

    /// Log format: JSON for machines, human-readable for terminals; auto picks by
    /// whether standard error is a terminal.
    #[arg(long, env = "GAVEL_LOG_FORMAT", value_enum, default_value_t = LogFormat::Auto)]
    pub log_format: LogFormat,

    #[command(flatten)]
    pub database: Database,

    #[command(flatten)]
    pub secret: Secret,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Auto,
    Json,
    Pretty,
}

#[derive(Debug, Clone, Args)]
pub struct Migrate {
    #[command(flatten)]
    pub database: Database,
}

#[derive(Debug, Clone, Args)]
pub struct Token {
    /// Account id the token speaks for (its `sub` claim).
    #[arg(long)]
    pub sub: i64,

    /// Role the token carries.
    #[arg(long, value_enum)]
    pub role: crate::auth::Role,

    /// Lifetime of the token. A day suits load tests and scripts. At most the
    /// server's --session-ttl: it refuses a token made to live longer, since it
    /// remembers an ended session only that long.
    #[arg(long, default_value = "24h", value_parser = humantime::parse_duration)]
    pub ttl: Duration,

    #[command(flatten)]
    pub secret: Secret,
}

/// An origin as browsers send it: `http` or `https`, `://`, a host and maybe a
/// port, nothing after. `*` is refused: with credentials, browsers accept only
/// named origins.
fn parse_origin(s: &str) -> Result<axum::http::HeaderValue, String> {
    let invalid = || format!("{s:?} is not an origin like https://shop.example or http://localhost:3000");
    let rest = s.strip_prefix("https://").or_else(|| s.strip_prefix("http://")).ok_or_else(invalid)?;
    let valid = !rest.is_empty()
        && rest.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b':' | b'[' | b']'));
    if !valid {
        return Err(invalid());
    }
    axum::http::HeaderValue::from_str(s).map_err(|_| invalid())
}

/// `KEY=VALUE`, split at the first `=`.
fn parse_key_value(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((key, value)) if !key.trim().is_empty() => Ok((key.trim().to_owned(), value.to_owned())),
        _ => Err(format!("{s:?} is not KEY=VALUE")),
    }
}

impl Serve {
    /// The rate limits these flags ask for.
    pub fn throttles(&self) -> crate::throttle::Throttles {
        use crate::throttle::{BidThrottle, LogInLimits, LogInThrottle, Throttles};
        let limits = LogInLimits {
            per_account: self.login_failures_per_account,
            per_address: self.login_failures_per_address,
            window: self.login_failure_window,
        };
        Throttles {
            log_in: std::sync::Arc::new(LogInThrottle::new(limits)),
            bids: self.bids_per_second_per_bidder.map(BidThrottle::new),
        }
    }

    /// This configuration with its secrets replaced, fit for a log line.
    pub fn redacted(&self) -> Serve {
        let mut shown = self.clone();
        if shown.secret.jwt_secret.is_some() {
            shown.secret.jwt_secret = Some("<redacted>".into());
        }
        shown.database.database_url = shown.database.database_url.as_deref().map(redact_url);
        shown.database.replica_urls = shown.database.replica_urls.iter().map(|u| redact_url(u)).collect();
        shown
    }

    /// Builds the serve configuration from flags alone (the environment still
    /// applies); tests use it to get exactly the defaults `gavel serve` has.
    pub fn from_flags<I, T>(args: I) -> Result<Self, clap::Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        #[derive(Parser)]
        struct Only {
            #[command(flatten)]
            serve: Serve,
        }
        let argv = std::iter::once(std::ffi::OsString::from("gavel")).chain(args.into_iter().map(Into::into));
        Only::try_parse_from(argv).map(|o| o.serve)
    }

    /// Cores to run: the flag, or every core this process may run on.
    pub fn core_count(&self) -> usize {
        self.cores.filter(|&n| n > 0).unwrap_or_else(|| {
            core_affinity::get_core_ids()
                .map(|ids| ids.len())
                .filter(|&n| n > 0)
                .or_else(|| std::thread::available_parallelism().ok().map(|n| n.get()))
                .unwrap_or(1)
        })
    }
}

/// A database URL without its password.
pub fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let userinfo = &url[scheme + 3..at];
            match userinfo.split_once(':') {
                Some((user, _)) => format!("{}{user}:<redacted>{}", &url[..scheme + 3], &url[at..]),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn cors_origins_are_named_origins() {
        let s = Serve::from_flags(["--cors-origin", "https://shop.example", "--cors-origin", "http://localhost:3000"])
            .unwrap();
        assert_eq!(s.cors_origins, ["https://shop.example", "http://localhost:3000"]);
        assert!(Serve::from_flags([] as [&str; 0]).unwrap().cors_origins.is_empty(), "none by default");
        for bad in ["*", "shop.example", "https://shop.example/", "https://", "ftp://x", "https://a b"] {
            assert!(Serve::from_flags(["--cors-origin", bad]).is_err(), "{bad}");
        }
    }

    #[test]
    fn serve_defaults_parse() {
        let s = Serve::from_flags(["--listen", "127.0.0.1:0", "--cores", "2"]).unwrap();
        assert_eq!(s.core_count(), 2);
        assert_eq!(s.body_limit, 64 * 1024);
        assert_eq!(s.db_acquire_timeout, Duration::from_millis(250));
    }

    #[test]
    fn redaction_hides_secrets_and_passwords_only() {
        let s = Serve::from_flags([
            "--jwt-secret",
            "super-secret-super-secret-super-secret",
            "--database-url",
            "postgres://app:hunter2@db.internal:5432/gavel",
            "--replica-url",
            "postgres://app:hunter3@replica.internal/gavel",
        ])
        .unwrap();
        let shown = format!("{:?}", s.redacted());
        assert!(!shown.contains("super-secret") && !shown.contains("hunter2") && !shown.contains("hunter3"), "{shown}");
        assert!(shown.contains("postgres://app:<redacted>@db.internal:5432/gavel"), "{shown}");
        assert_eq!(redact_url("postgres:///gavel?host=/tmp"), "postgres:///gavel?host=/tmp");
    }

    #[test]
    fn replicas_repeat_and_lag_defaults_to_a_second() {
        let s =
            Serve::from_flags(["--replica-url", "postgres://r1/gavel", "--replica-url", "postgres://r2:6432/gavel"])
                .unwrap();
        assert_eq!(s.database.replica_urls, ["postgres://r1/gavel", "postgres://r2:6432/gavel"]);
        assert_eq!(s.database.replica_max_lag, Duration::from_secs(1));
    }

    #[test]
    fn durations_reject_garbage() {
        assert!(Serve::from_flags(["--request-timeout", "soon"]).is_err());
    }
}

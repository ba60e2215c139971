//! Metric names and per-core handles.
//!
//! A leaf: anything may record here. Every name is a constant in this file, every
//! label comes from a fixed set, and every per-core family carries a `core` label.
//!
//! Recording on the hot path touches only handles this core created (each core is a
//! thread, so they live in a thread-local): no key is built or hashed per request
//! once a core has seen a route, and no value is shared with another core — every
//! handle's atomics are this core's own series. Without an installed recorder
//! (`--metrics false`, or a thread that is not a core) every call is a no-op.

use std::cell::RefCell;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use metrics::{Counter, Gauge, Histogram, Unit};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

pub const HTTP_REQUESTS_TOTAL: &str = "http_requests_total";
pub const HTTP_REQUEST_DURATION_SECONDS: &str = "http_request_duration_seconds";
pub const HTTP_REQUESTS_IN_FLIGHT: &str = "http_requests_in_flight";
pub const BIDS_TOTAL: &str = "gavel_bids_total";
pub const BID_BATCH_SIZE: &str = "gavel_bid_batch_size";
pub const BID_BATCHES_IN_FLIGHT: &str = "gavel_bid_batches_in_flight";
pub const BID_BATCH_WAIT_SECONDS: &str = "gavel_bid_batch_wait_seconds";
pub const ORDERS_TOTAL: &str = "gavel_orders_total";
pub const ORDER_BATCH_SIZE: &str = "gavel_order_batch_size";
pub const DB_QUERY_DURATION_SECONDS: &str = "gavel_db_query_duration_seconds";
pub const DB_POOL_CONNECTIONS: &str = "gavel_db_pool_connections";
pub const CACHE_NOTIFICATIONS_TOTAL: &str = "gavel_cache_notifications_total";
pub const CACHE_NOTIFY_LAG_SECONDS: &str = "gavel_cache_notify_lag_seconds";
pub const CACHE_LISTENER_RECONNECTS_TOTAL: &str = "gavel_cache_listener_reconnects_total";
pub const CACHE_LIVE: &str = "gavel_cache_live";
pub const CACHE_ENTRIES: &str = "gavel_cache_entries";
pub const CACHE_EVICTIONS_TOTAL: &str = "gavel_cache_evictions_total";
pub const BUILD_INFO: &str = "gavel_build_info";
pub const EVENT_STREAMS_OPEN: &str = "gavel_event_streams_open";
pub const EVENTS_SENT_TOTAL: &str = "gavel_events_sent_total";
pub const EVENTS_COALESCED_TOTAL: &str = "gavel_events_coalesced_total";
pub const EVENT_DELIVERY_SECONDS: &str = "gavel_event_delivery_seconds";
pub const EVENT_BUDGET_SHARE: &str = "gavel_event_budget_share";
pub const RATE_LIMITED_TOTAL: &str = "gavel_rate_limited_total";
pub const HTTP1_HANDOFFS_TOTAL: &str = "gavel_http1_handoffs_total";
pub const LIFECYCLE_LEADER: &str = "gavel_lifecycle_leader";
pub const REPLICA_LAG_SECONDS: &str = "gavel_replica_lag_seconds";
pub const REPLICA_USABLE: &str = "gavel_replica_usable";
pub const ROUTED_READS_TOTAL: &str = "gavel_routed_reads_total";
pub const DB_PRIMARY_MOVES_TOTAL: &str = "gavel_db_primary_moves_total";

/// Latency buckets, in seconds: from 50 µs (a cached read) to 10 s (a request
/// timeout's order of magnitude).
pub const LATENCY_BUCKETS: &[f64] =
    &[0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];
/// Batch size buckets: powers of two up to the largest batch allowed by default.
pub const BATCH_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0];
/// Batches-in-flight buckets: one each, up to more than a core's pool holds.
pub const IN_FLIGHT_BUCKETS: &[f64] = &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0];

/// How a bid ended, as `gavel_bids_total{outcome}` counts it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BidOutcome {
    Accepted,
    /// Recorded, then outbid at once by the leader's proxy.
    Outbid,
    TooLowLocal,
    TooLowDb,
    ClosedLocal,
    Closed,
    NotFound,
    KeyMismatch,
    KeyInUse,
    UnknownAccount,
    Shed,
}

impl BidOutcome {
    const ALL: [BidOutcome; 11] = [
        BidOutcome::Accepted,
        BidOutcome::Outbid,
        BidOutcome::TooLowLocal,
        BidOutcome::TooLowDb,
        BidOutcome::ClosedLocal,
        BidOutcome::Closed,
        BidOutcome::NotFound,
        BidOutcome::KeyMismatch,
        BidOutcome::KeyInUse,
        BidOutcome::UnknownAccount,
        BidOutcome::Shed,
    ];

    fn label(self) -> &'static str {
        match self {
            BidOutcome::Accepted => "accepted",
            BidOutcome::Outbid => "outbid",
            BidOutcome::TooLowLocal => "too_low_local",
            BidOutcome::TooLowDb => "too_low_db",
            BidOutcome::ClosedLocal => "closed_local",
            BidOutcome::Closed => "closed",
            BidOutcome::NotFound => "not_found",
            BidOutcome::KeyMismatch => "key_mismatch",
            BidOutcome::KeyInUse => "key_in_use",
            BidOutcome::UnknownAccount => "unknown_account",
            BidOutcome::Shed => "shed",
        }
    }
}

/// How an order ended, as `gavel_orders_total{outcome}` counts it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OrderOutcome {
    Reserved,
    InsufficientStock,
    UnknownSku,
    KeyMismatch,
    KeyInUse,
    UnknownAccount,
    Shed,
}

impl OrderOutcome {
    const ALL: [OrderOutcome; 7] = [
        OrderOutcome::Reserved,
        OrderOutcome::InsufficientStock,
        OrderOutcome::UnknownSku,
        OrderOutcome::KeyMismatch,
        OrderOutcome::KeyInUse,
        OrderOutcome::UnknownAccount,
        OrderOutcome::Shed,
    ];

    fn label(self) -> &'static str {
        match self {
            OrderOutcome::Reserved => "reserved",
            OrderOutcome::InsufficientStock => "insufficient_stock",
            OrderOutcome::UnknownSku => "unknown_sku",
            OrderOutcome::KeyMismatch => "key_mismatch",
            OrderOutcome::KeyInUse => "key_in_use",
            OrderOutcome::UnknownAccount => "unknown_account",
            OrderOutcome::Shed => "shed",
        }
    }
}

/// The rate limits `gavel_rate_limited_total{limit}` counts refusals of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RateLimit {
    /// Failed log-ins of one account.
    LogInAccount,
    /// Failed log-ins from one client address.
    LogInAddress,
    /// Bids of one bidder.
    Bids,
}

impl RateLimit {
    const ALL: [RateLimit; 3] = [RateLimit::LogInAccount, RateLimit::LogInAddress, RateLimit::Bids];

    pub fn label(self) -> &'static str {
        match self {
            RateLimit::LogInAccount => "login_account",
            RateLimit::LogInAddress => "login_address",
            RateLimit::Bids => "bids",
        }
    }
}

/// The queries `gavel_db_query_duration_seconds{query}` times.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Query {
    PlaceBids,
    CommitBids,
    AnnounceBids,
    PlaceOrders,
    FinishOrder,
    AuctionRead,
    AuctionList,
    AuctionWrite,
    BidHistory,
    OwnBids,
    InventoryRead,
    InventoryList,
    InventoryWrite,
    OrderRead,
    Account,
    Lifecycle,
}

impl Query {
    const ALL: [Query; 16] = [
        Query::PlaceBids,
        Query::CommitBids,
        Query::AnnounceBids,
        Query::PlaceOrders,
        Query::FinishOrder,
        Query::AuctionRead,
        Query::AuctionList,
        Query::AuctionWrite,
        Query::BidHistory,
        Query::OwnBids,
        Query::InventoryRead,
        Query::InventoryList,
        Query::InventoryWrite,
        Query::OrderRead,
        Query::Account,
        Query::Lifecycle,
    ];

    fn label(self) -> &'static str {
        match self {
            Query::PlaceBids => "place_bids",
            Query::CommitBids => "commit_bids",
            Query::AnnounceBids => "announce_bids",
            Query::PlaceOrders => "place_orders",
            Query::FinishOrder => "finish_order",
            Query::AuctionRead => "auction_read",
            Query::AuctionList => "auction_list",
            Query::AuctionWrite => "auction_write",
            Query::BidHistory => "bid_history",
            Query::OwnBids => "own_bids",
            Query::InventoryRead => "inventory_read",
            Query::InventoryList => "inventory_list",
            Query::InventoryWrite => "inventory_write",
            Query::OrderRead => "order_read",
            Query::Account => "account",
            Query::Lifecycle => "lifecycle",
        }
    }
}

/// Where a bid batch's oldest bid waits before the batch's statement goes to the
/// database (`gavel_bid_batch_wait_seconds{stage}`); then come the `place_bids`
/// and `commit_bids` round trips.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BidWait {
    /// From the bid's arrival until its batch took a slot: behind the core's
    /// batches in the database, or for more bids to make a batch worth sending.
    Queue,
    /// For a bid lane.
    Lane,
    /// For the batch's transaction to be begun, once it had its lane (it is
    /// begun while the batch waits for the lane: usually nothing is left).
    Begin,
}

impl BidWait {
    const ALL: [BidWait; 3] = [BidWait::Queue, BidWait::Lane, BidWait::Begin];

    fn label(self) -> &'static str {
        match self {
            BidWait::Queue => "queue",
            BidWait::Lane => "lane",
            BidWait::Begin => "begin",
        }
    }
}

static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// Installs the process-wide Prometheus recorder (once; later calls return the
/// first result). `None` when disabled or when another recorder is installed.
pub fn install(enabled: bool) -> Option<&'static PrometheusHandle> {
    HANDLE
        .get_or_init(|| {
            if !enabled {
                return None;
            }
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS)
                .and_then(|b| b.set_buckets_for_metric(Matcher::Suffix("_batch_size".into()), BATCH_BUCKETS))
                .and_then(|b| b.set_buckets_for_metric(Matcher::Full(BID_BATCHES_IN_FLIGHT.into()), IN_FLIGHT_BUCKETS))
                .ok()?;
            let handle = builder.install_recorder().ok()?;
            describe();
            Some(handle)
        })
        .as_ref()
}

/// The installed recorder's handle, if any.
pub fn handle() -> Option<&'static PrometheusHandle> {
    HANDLE.get().and_then(Option::as_ref)
}

fn process_collector() -> &'static metrics_process::Collector {
    static COLLECTOR: OnceLock<metrics_process::Collector> = OnceLock::new();
    COLLECTOR.get_or_init(metrics_process::Collector::default)
}

fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram};
    describe_counter!(HTTP_REQUESTS_TOTAL, "HTTP requests answered, by route template and status");
    describe_histogram!(HTTP_REQUEST_DURATION_SECONDS, Unit::Seconds, "Time to answer an HTTP request");
    describe_gauge!(HTTP_REQUESTS_IN_FLIGHT, "HTTP requests being handled now");
    describe_counter!(BIDS_TOTAL, "Bids by outcome (too_low_local and closed_local never reached the database)");
    describe_histogram!(BID_BATCH_SIZE, "Bids sent to the database in one statement");
    describe_histogram!(
        BID_BATCHES_IN_FLIGHT,
        "The core's bid batches in the database when a batch is sent, that batch included"
    );
    describe_histogram!(
        BID_BATCH_WAIT_SECONDS,
        Unit::Seconds,
        "How long a bid batch's oldest bid waited before the batch's statement went to the database, by stage (queue: behind the core's batches in the database, or for more bids; lane: for a bid lane; begin: for its transaction's BEGIN, once it had the lane)"
    );
    describe_counter!(ORDERS_TOTAL, "Orders by outcome");
    describe_histogram!(ORDER_BATCH_SIZE, "Orders sent to the database in one statement");
    describe_histogram!(DB_QUERY_DURATION_SECONDS, Unit::Seconds, "Time of a database round trip, by query");
    describe_gauge!(DB_POOL_CONNECTIONS, "Connections of the core's pool, by state (idle, in_use, max)");
    describe_counter!(
        CACHE_NOTIFICATIONS_TOTAL,
        "Cache updates received by notification (a bids notification carries one per auction), by kind and whether they were newer"
    );
    describe_histogram!(
        CACHE_NOTIFY_LAG_SECONDS,
        Unit::Seconds,
        "From a change's commit (a notification's at_us, see db::notice) to a core applying it"
    );
    describe_counter!(CACHE_LISTENER_RECONNECTS_TOTAL, "Times a core's LISTEN connection came (back) up");
    describe_gauge!(CACHE_LIVE, "1 while the core serves reads from its cache, 0 while it recovers");
    describe_gauge!(
        CACHE_ENTRIES,
        "Entries of a core's cache, by cache (auctions, inventory; sessions: the ended sessions it remembers until their tokens expire)"
    );
    describe_counter!(
        CACHE_EVICTIONS_TOTAL,
        "Entries that left a core's cache, by cache and reason (closed: a closed auction's grace ran out; capacity: the cache was full)"
    );
    describe_gauge!(EVENT_STREAMS_OPEN, "Event streams (text/event-stream) open on a core");
    describe_counter!(EVENTS_SENT_TOTAL, "Events written to event streams, by kind (heartbeat: a comment line)");
    describe_counter!(
        EVENTS_COALESCED_TOTAL,
        "Events that replaced an unread one of the same auction in a slow stream's mailbox"
    );
    describe_histogram!(
        EVENT_DELIVERY_SECONDS,
        Unit::Seconds,
        "From a change's commit (a notification's at_us, see db::notice) to its event being handed to the connection, which writes it to the socket next"
    );
    describe_gauge!(
        EVENT_BUDGET_SHARE,
        "The part of --stream-events-per-sec a core may hand out, as of its last delivery: below 1 while bids back up on it"
    );
    describe_counter!(RATE_LIMITED_TOTAL, "Requests refused with 429, by the limit they hit");
    describe_counter!(
        HTTP1_HANDOFFS_TOTAL,
        "HTTP/1.1 connections handed to hyper at their first request other than a cached read"
    );
    describe_gauge!(
        LIFECYCLE_LEADER,
        "1 while this instance runs the auction lifecycle (of all instances sharing its database, one does)"
    );
    describe_gauge!(
        REPLICA_LAG_SECONDS,
        "A read replica's replay lag as a core last measured it (0 while it has replayed all it received)"
    );
    describe_gauge!(
        REPLICA_USABLE,
        "1 while a core sends reads to this replica (answering, lag within --replica-max-lag)"
    );
    describe_counter!(
        ROUTED_READS_TOTAL,
        "Reads that may go to a replica (history, lists, misses of closed auctions), by what answered them"
    );
    describe_counter!(
        DB_PRIMARY_MOVES_TOTAL,
        "Times a core moved its pool and LISTEN connection to another of DATABASE_URL's hosts (a failover)"
    );
    describe_gauge!(BUILD_INFO, "Always 1; the labels say which build runs");
    metrics::gauge!(BUILD_INFO, "version" => env!("CARGO_PKG_VERSION")).set(1.0);
    process_collector().describe();
}

/// The metrics in Prometheus text format, with process metrics read now.
pub fn render() -> Option<String> {
    let handle = handle()?;
    process_collector().collect();
    Some(handle.render())
}

/// Drains histogram samples into their buckets, so memory stays flat when nobody
/// scrapes. Call every few seconds.
pub fn run_upkeep() {
    if let Some(handle) = handle() {
        handle.run_upkeep();
    }
}

/// One route's (and method's) handles on one core.
struct RouteMetrics {
    route: Box<str>,
    method: &'static str,
    duration: Histogram,
    /// Few statuses per route: a short list beats a map.
    statuses: Vec<(u16, Counter)>,
}

/// One core's handles.
struct CoreMetrics {
    core: String,
    in_flight: Gauge,
    routes: Vec<RouteMetrics>,
    bids: Vec<Counter>,
    orders: Vec<Counter>,
    rate_limited: Vec<Counter>,
    handoffs: Counter,
    queries: Vec<Histogram>,
    bid_batch: Histogram,
    bid_in_flight: Histogram,
    /// By [`BidWait`].
    bid_waits: [Histogram; 3],
    order_batch: Histogram,
}

thread_local! {
    static CORE: RefCell<Option<CoreMetrics>> = const { RefCell::new(None) };
}

/// Creates this thread's (this core's) handles. Called once when a core starts.
pub fn init_core(core: usize) {
    let label = core.to_string();
    let per_core = |name: &'static str, key: &'static str, value: &'static str| metrics::counter!(name, "core" => label.clone(), key => value);
    let metrics = CoreMetrics {
        in_flight: metrics::gauge!(HTTP_REQUESTS_IN_FLIGHT, "core" => label.clone()),
        routes: Vec::new(),
        bids: BidOutcome::ALL.iter().map(|o| per_core(BIDS_TOTAL, "outcome", o.label())).collect(),
        orders: OrderOutcome::ALL.iter().map(|o| per_core(ORDERS_TOTAL, "outcome", o.label())).collect(),
        rate_limited: RateLimit::ALL.iter().map(|l| per_core(RATE_LIMITED_TOTAL, "limit", l.label())).collect(),
        handoffs: metrics::counter!(HTTP1_HANDOFFS_TOTAL, "core" => label.clone()),
        queries: Query::ALL
            .iter()
            .map(|q| metrics::histogram!(DB_QUERY_DURATION_SECONDS, "core" => label.clone(), "query" => q.label()))
            .collect(),
        bid_batch: metrics::histogram!(BID_BATCH_SIZE, "core" => label.clone()),
        bid_in_flight: metrics::histogram!(BID_BATCHES_IN_FLIGHT, "core" => label.clone()),
        bid_waits: BidWait::ALL
            .map(|w| metrics::histogram!(BID_BATCH_WAIT_SECONDS, "core" => label.clone(), "stage" => w.label())),
        order_batch: metrics::histogram!(ORDER_BATCH_SIZE, "core" => label.clone()),
        core: label,
    };
    CORE.with_borrow_mut(|c| *c = Some(metrics));
}

fn with_core(f: impl FnOnce(&mut CoreMetrics)) {
    CORE.with_borrow_mut(|c| {
        if let Some(core) = c {
            f(core)
        }
    });
}

/// The label of an HTTP method: the common ones by name, the rest as "other".
pub fn method_label(method: &axum::http::Method) -> &'static str {
    match *method {
        axum::http::Method::GET => "GET",
        axum::http::Method::POST => "POST",
        axum::http::Method::PUT => "PUT",
        axum::http::Method::DELETE => "DELETE",
        axum::http::Method::HEAD => "HEAD",
        _ => "other",
    }
}

/// The status recorded for a request whose client went away before its answer
/// (nginx's "client closed request").
pub const CLIENT_CLOSED: u16 = 499;

/// A request in flight on this core: counted in `http_requests_in_flight` from
/// [`InFlight::start`] until dropped, so a request whose future hyper drops (its
/// client went away) leaves the gauge too, counted with status 499.
pub struct InFlight {
    route: Route,
    method: &'static str,
    started: Instant,
    answered: bool,
}

/// A request's route label: always a route template (the set is fixed by the
/// router, so the label is bounded), or "unmatched".
pub enum Route {
    /// As the router matched it.
    Matched(axum::extract::MatchedPath),
    /// Known before routing (the hot reads, `http::hot`).
    Template(&'static str),
    Unmatched,
}

impl Route {
    fn as_str(&self) -> &str {
        match self {
            Route::Matched(m) => m.as_str(),
            Route::Template(t) => t,
            Route::Unmatched => "unmatched",
        }
    }
}

impl InFlight {
    pub fn start(route: Route, method: &'static str, started: Instant) -> Self {
        with_core(|c| c.in_flight.increment(1.0));
        InFlight { route, method, started, answered: false }
    }

    /// The request was answered with `status`.
    pub fn answered(mut self, status: u16) {
        self.answered = true;
        self.record(status);
    }

    fn record(&self, status: u16) {
        let route = self.route.as_str();
        let (method, elapsed) = (self.method, self.started.elapsed());
        with_core(|c| {
            let index = match c.routes.iter().position(|r| r.method == method && &*r.route == route) {
                Some(i) => i,
                None => new_route(c, route, method),
            };
            let entry = &mut c.routes[index];
            entry.duration.record(elapsed.as_secs_f64());
            match entry.statuses.iter().find(|(s, _)| *s == status) {
                Some((_, counter)) => counter.increment(1),
                None => {
                    let counter = metrics::counter!(HTTP_REQUESTS_TOTAL,
                        "core" => c.core.clone(), "method" => method, "route" => entry.route.to_string(),
                        "status" => status.to_string());
                    counter.increment(1);
                    entry.statuses.push((status, counter));
                }
            }
        });
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if !self.answered {
            self.record(CLIENT_CLOSED);
        }
        with_core(|c| c.in_flight.decrement(1.0));
    }
}

/// Creates the handles of a route this core sees for the first time.
#[cold]
fn new_route(c: &mut CoreMetrics, route: &str, method: &'static str) -> usize {
    c.routes.push(RouteMetrics {
        route: route.into(),
        method,
        duration: metrics::histogram!(HTTP_REQUEST_DURATION_SECONDS,
            "core" => c.core.clone(), "method" => method, "route" => route.to_owned()),
        statuses: Vec::new(),
    });
    c.routes.len() - 1
}

pub fn bid(outcome: BidOutcome) {
    with_core(|c| c.bids[outcome as usize].increment(1));
}

/// An HTTP/1.1 connection went from gavel's own reader to hyper.
pub fn handed_to_hyper() {
    with_core(|c| c.handoffs.increment(1));
}

/// A request was refused by `limit`.
pub fn rate_limited(limit: RateLimit) {
    with_core(|c| c.rate_limited[limit as usize].increment(1));
}

pub fn order(outcome: OrderOutcome) {
    with_core(|c| c.orders[outcome as usize].increment(1));
}

/// A bid batch was sent: its size, and the core's bid batches in the database
/// with it (itself included).
pub fn bid_batch(size: usize, in_flight: usize) {
    with_core(|c| {
        c.bid_batch.record(size as f64);
        c.bid_in_flight.record(in_flight as f64);
    });
}

/// A bid batch waited `wait` at `stage` before its statement went.
pub fn bid_wait(stage: BidWait, wait: Duration) {
    with_core(|c| c.bid_waits[stage as usize].record(wait.as_secs_f64()));
}

pub fn order_batch(size: usize) {
    with_core(|c| c.order_batch.record(size as f64));
}

/// Times a database round trip; records when dropped.
pub struct QueryTimer {
    query: Query,
    started: Instant,
}

impl Drop for QueryTimer {
    fn drop(&mut self) {
        let elapsed = self.started.elapsed().as_secs_f64();
        let query = self.query;
        with_core(|c| c.queries[query as usize].record(elapsed));
    }
}

/// Starts timing `query` on this core.
pub fn time_query(query: Query) -> QueryTimer {
    QueryTimer { query, started: Instant::now() }
}

/// What answered a read that may go to a replica (`gavel_routed_reads_total{to}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadSource {
    Replica,
    Primary,
}

/// One core's handles for its read replicas.
pub struct ReplicaMetrics {
    /// By [`ReadSource`].
    pub routed: [Counter; 2],
}

impl ReplicaMetrics {
    pub fn new(core: usize) -> Self {
        let core = core.to_string();
        ReplicaMetrics {
            routed: ["replica", "primary"]
                .map(|to| metrics::counter!(ROUTED_READS_TOTAL, "core" => core.clone(), "to" => to)),
        }
    }

    /// Lag and usability gauges of replica `name` on core `core`.
    pub fn replica(core: usize, name: &str) -> (Gauge, Gauge) {
        let labels = [("core", core.to_string()), ("replica", name.to_owned())];
        (metrics::gauge!(REPLICA_LAG_SECONDS, &labels), metrics::gauge!(REPLICA_USABLE, &labels))
    }
}

/// The two caches of a core (`crate::cache`), as metric labels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Which {
    Auctions,
    Inventory,
}

impl Which {
    pub const ALL: [Which; 2] = [Which::Auctions, Which::Inventory];

    pub fn label(self) -> &'static str {
        match self {
            Which::Auctions => "auctions",
            Which::Inventory => "inventory",
        }
    }
}

/// Why an entry left a cache (a metric label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Evicted {
    /// A closed auction's grace ran out.
    Closed,
    /// The cache was full and the entry was the least recently read.
    Capacity,
}

impl Evicted {
    pub const ALL: [Evicted; 2] = [Evicted::Closed, Evicted::Capacity];

    pub fn label(self) -> &'static str {
        match self {
            Evicted::Closed => "closed",
            Evicted::Capacity => "capacity",
        }
    }
}

/// Handles for the per-core values sampled off the hot path (pool, cache).
pub struct CoreGauges {
    pub pool_idle: Gauge,
    pub pool_in_use: Gauge,
    pub pool_max: Gauge,
    pub cache_live: Gauge,
    pub reconnects: Counter,
    /// Moves to another of the database's hosts (failovers followed).
    pub primary_moves: Counter,
    pub lag: Histogram,
    /// `[kind][newer]`: auction/inventory/bid (the `cache::Kind` order) × stale/applied.
    pub notifications: [[Counter; 2]; 3],
    /// By `cache::Which`.
    cache_entries: [Gauge; 2],
    /// The ended sessions the core remembers (`cache="sessions"`).
    session_entries: Gauge,
    /// By `cache::Which`, then `cache::Evicted`.
    cache_evictions: [[Counter; 2]; 2],
}

impl CoreGauges {
    pub fn new(core: usize) -> Self {
        let core = core.to_string();
        let pool = |state: &'static str| metrics::gauge!(DB_POOL_CONNECTIONS, "core" => core.clone(), "state" => state);
        let notice = |kind: &'static str, result: &'static str| metrics::counter!(CACHE_NOTIFICATIONS_TOTAL, "core" => core.clone(), "kind" => kind, "result" => result);
        CoreGauges {
            pool_idle: pool("idle"),
            pool_in_use: pool("in_use"),
            pool_max: pool("max"),
            cache_live: metrics::gauge!(CACHE_LIVE, "core" => core.clone()),
            reconnects: metrics::counter!(CACHE_LISTENER_RECONNECTS_TOTAL, "core" => core.clone()),
            primary_moves: metrics::counter!(DB_PRIMARY_MOVES_TOTAL, "core" => core.clone()),
            lag: metrics::histogram!(CACHE_NOTIFY_LAG_SECONDS, "core" => core.clone()),
            notifications: [
                [notice("auction", "stale"), notice("auction", "applied")],
                [notice("inventory", "stale"), notice("inventory", "applied")],
                [notice("bid", "stale"), notice("bid", "applied")],
            ],
            cache_entries: Which::ALL.map(|w| metrics::gauge!(CACHE_ENTRIES, "core" => core.clone(), "cache" => w.label())),
            session_entries: metrics::gauge!(CACHE_ENTRIES, "core" => core.clone(), "cache" => "sessions"),
            cache_evictions: Which::ALL.map(|w| {
                Evicted::ALL.map(|r| {
                    metrics::counter!(CACHE_EVICTIONS_TOTAL, "core" => core.clone(), "cache" => w.label(), "reason" => r.label())
                })
            }),
        }
    }

    /// Publishes what a cache sweep counted: entries by [`Which`], evictions by
    /// [`Which`] then [`Evicted`], and the ended sessions remembered.
    pub fn census(&self, entries: [usize; 2], evicted: [[u64; 2]; 2], sessions: usize) {
        for w in Which::ALL {
            self.cache_entries[w as usize].set(entries[w as usize] as f64);
            for r in Evicted::ALL {
                self.cache_evictions[w as usize][r as usize].absolute(evicted[w as usize][r as usize]);
            }
        }
        self.session_entries.set(sessions as f64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_sets_are_complete_and_distinct() {
        let bids: std::collections::HashSet<_> = BidOutcome::ALL.iter().map(|o| o.label()).collect();
        assert_eq!(bids.len(), BidOutcome::ALL.len());
        assert!(BidOutcome::ALL.iter().enumerate().all(|(i, o)| *o as usize == i));
        assert!(OrderOutcome::ALL.iter().enumerate().all(|(i, o)| *o as usize == i));
        assert!(Query::ALL.iter().enumerate().all(|(i, q)| *q as usize == i));
    }

    #[test]
    fn unusual_methods_share_one_label() {
        assert_eq!(method_label(&axum::http::Method::GET), "GET");
        assert_eq!(method_label(&axum::http::Method::from_bytes(b"BREW").unwrap()), "other");
    }

    #[test]
    fn recording_without_a_core_is_a_no_op() {
        InFlight::start(Route::Unmatched, "GET", Instant::now()).answered(200);
        drop(InFlight::start(Route::Template("/x"), "GET", Instant::now()));
        bid(BidOutcome::Accepted);
        drop(time_query(Query::PlaceBids));
    }
}

/// The kinds of what event streams send (`crate::events`), as metric labels and
/// as the SSE `event:` names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    /// A new state of a watched auction.
    Auction,
    /// A watched auction's final state.
    Closed,
    /// A comment line that keeps an idle stream open.
    Heartbeat,
    /// A bidder's lead was taken (personal streams only).
    Outbid,
    /// An auction the bidder bid on closed, and the bidder won it (personal).
    Won,
    /// An auction the bidder bid on closed, and someone else won it (personal).
    Lost,
    /// One of the account's orders was placed, cancelled or fulfilled (personal).
    Order,
}

impl EventKind {
    pub const ALL: [EventKind; 7] = [
        EventKind::Auction,
        EventKind::Closed,
        EventKind::Heartbeat,
        EventKind::Outbid,
        EventKind::Won,
        EventKind::Lost,
        EventKind::Order,
    ];

    pub fn label(self) -> &'static str {
        match self {
            EventKind::Auction => "auction",
            EventKind::Closed => "closed",
            EventKind::Heartbeat => "heartbeat",
            EventKind::Outbid => "outbid",
            EventKind::Won => "won",
            EventKind::Lost => "lost",
            EventKind::Order => "order",
        }
    }
}

/// One core's event-stream handles.
pub struct StreamMetrics {
    pub open: Gauge,
    sent: [Counter; EventKind::ALL.len()],
    pub coalesced: Counter,
    pub delivery: Histogram,
    pub budget_share: Gauge,
}

impl StreamMetrics {
    pub fn new(core: usize) -> Self {
        let core = core.to_string();
        StreamMetrics {
            open: metrics::gauge!(EVENT_STREAMS_OPEN, "core" => core.clone()),
            sent: EventKind::ALL
                .map(|k| metrics::counter!(EVENTS_SENT_TOTAL, "core" => core.clone(), "kind" => k.label())),
            coalesced: metrics::counter!(EVENTS_COALESCED_TOTAL, "core" => core.clone()),
            delivery: metrics::histogram!(EVENT_DELIVERY_SECONDS, "core" => core.clone()),
            budget_share: metrics::gauge!(EVENT_BUDGET_SHARE, "core" => core),
        }
    }

    pub fn sent(&self, kind: EventKind) {
        self.sent[kind as usize].increment(1);
    }
}

//! One core: a pinned thread running a current-thread runtime that owns a listener,
//! a pool, caches, a bid batcher and the connections it accepts.

use std::sync::Arc;
use std::sync::mpsc::SyncSender;
use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use sqlx::postgres::PgConnectOptions;
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};

use crate::auth::{Keys, VerifiedTokens};
use crate::cache::{self, CacheLimits, Caches};
use crate::config::Serve;
use crate::core::{Core, Health, Images, Limits, Web};
use crate::db;
use crate::db::Primary;
use crate::db::batch::{BatchLimits, BatchStart, Batcher, Lanes};
use crate::db::bids::{Announcer, Bids};
use crate::db::orders::Orders;
use crate::db::replicas::{ReplicaLimits, Replicas};
use crate::db::target::Target;
use crate::events::{Hub, StreamLimits};
use crate::http;
use crate::http::activity::Activity;
use crate::metrics::{self, BidWait, CoreGauges, StreamMetrics};
use crate::storage;
use crate::throttle::Throttles;

use super::deadlines::{ConnTimer, Deadlines};
use super::fast::Ended;

/// How long a core waits for its first database connection before giving up.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

/// Everything a core thread is handed when it starts.
pub(super) struct Start {
    pub index: usize,
    pub pin: Option<core_affinity::CoreId>,
    pub listener: std::net::TcpListener,
    pub config: Arc<Serve>,
    /// Where the primary is.
    pub database: Target,
    /// The read replicas (`--replica-url`).
    pub replicas: Vec<PgConnectOptions>,
    pub keys: Arc<Keys>,
    pub health: Arc<Health>,
    pub throttles: Arc<Throttles>,
    /// Where item images are stored; each core opens its own client.
    pub images: storage::Location,
    /// The process's bid lanes, shared by every core's bid batcher.
    pub bid_lanes: Option<Lanes>,
    pub shutdown: watch::Receiver<bool>,
    pub started: SyncSender<Result<usize, String>>,
}

/// How long a batch's write may take: twice the requests' own bound, so that
/// by then every request of the batch has had its answer.
fn write_timeout(config: &Serve) -> Duration {
    config.request_timeout * 2
}

/// The body of thread `gavel-core-N`.
pub(super) fn run(start: Start) {
    if let Some(id) = start.pin {
        if !core_affinity::set_for_current(id) {
            tracing::warn!(core = start.index, cpu = id.id, "could not pin the core thread");
        } else {
            #[cfg(target_os = "linux")]
            if start.config.steer_by_cpu
                && let Err(e) = super::socket::steer_to_cpu(&start.listener, id.id)
            {
                tracing::warn!(core = start.index, cpu = id.id, error = %e, "could not steer connections to the core's CPU");
            }
        }
    }
    http::request_id::init_core(start.index);
    metrics::init_core(start.index);
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            let _ = start.started.send(Err(format!("core {}: cannot build its runtime: {e}", start.index)));
            return;
        }
    };
    runtime.block_on(core_main(start));
}

async fn core_main(start: Start) {
    let Start {
        index,
        pin,
        listener,
        config,
        database,
        replicas,
        keys,
        health,
        throttles,
        images,
        bid_lanes,
        shutdown,
        started,
    } = start;
    // With several hosts, this core finds the primary itself, as it will again
    // after any failover (see `cache::listener`).
    let host = match database.is_multi_host() {
        false => 0,
        true => match tokio::time::timeout(CONNECT_TIMEOUT, database.locate()).await {
            Ok(Ok(host)) => host,
            Ok(Err(e)) => {
                let _ = started.send(Err(format!("core {index}: cannot find the primary: {e}")));
                return;
            }
            Err(_) => {
                let _ = started.send(Err(format!("core {index}: cannot find the primary: timed out")));
                return;
            }
        },
    };
    // The pool is created here, inside this core's runtime: its connections belong
    // to the runtime that opened them.
    let pool = db::core_pool(&database, host, index, config.db_conns_per_core, config.db_acquire_timeout);
    let connected = tokio::time::timeout(CONNECT_TIMEOUT, pool.acquire()).await;
    if let Err(e) = connected.map_err(|_| "timed out".to_string()).and_then(|r| r.map_err(|e| e.to_string())) {
        let _ = started.send(Err(format!("core {index}: cannot reach the database: {e}")));
        return;
    }
    let store = match storage::Store::open(&images) {
        Ok(store) => store,
        Err(e) => {
            let _ = started.send(Err(format!("core {index}: cannot open the image store {}: {e}", images.url)));
            return;
        }
    };
    let listener = match TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            let _ = started.send(Err(format!("core {index}: cannot register its listener: {e}")));
            return;
        }
    };

    let caches = Arc::new(Caches::new(CacheLimits {
        capacity: config.cache_capacity,
        closed_grace: config.cache_closed_grace,
        session_ttl: config.session_ttl,
    }));
    // Everything on the primary takes the pool from here, as a failover replaces it.
    let primary = Primary::new(pool);
    let bids = Batcher::spawn(
        primary.clone(),
        Bids::new(Announcer::spawn(primary.clone())),
        BatchLimits {
            queue_depth: config.bid_queue_depth,
            max_batch: config.max_bid_batch,
            // Each batch in flight holds a connection; the announcer needs one too.
            in_flight: config.bid_batches_in_flight.min((config.db_conns_per_core as usize).saturating_sub(1).max(1)),
            overlap_at: config.bid_overlap_at,
            overlap_after: config.bid_overlap_after,
            lanes: bid_lanes,
            write_timeout: write_timeout(&config),
        },
        Box::new(|b: BatchStart| {
            metrics::bid_batch(b.size, b.in_flight);
            metrics::bid_wait(BidWait::Queue, b.waits.queue);
            metrics::bid_wait(BidWait::Lane, b.waits.lane);
        }),
    );
    // One order batch at a time: an order locks several stock rows, and orders are
    // not where gavel's volume is.
    let orders = Batcher::spawn(
        primary.clone(),
        Orders,
        BatchLimits {
            write_timeout: write_timeout(&config),
            ..BatchLimits::one_at_a_time(config.order_queue_depth, config.max_order_batch)
        },
        Box::new(|b: BatchStart| metrics::order_batch(b.size)),
    );
    let events = Arc::new(Hub::new(
        StreamLimits {
            max_streams: config.max_streams_per_core,
            heartbeat: config.stream_heartbeat,
            retry: config.stream_retry,
            events_per_sec: config.stream_events_per_sec,
            yield_to_bids: config.stream_yield_to_load,
        },
        http::auction_json,
        StreamMetrics::new(index),
    ));
    let replicas = Arc::new(Replicas::open(
        index,
        &replicas,
        &ReplicaLimits {
            max_lag: config.database.replica_max_lag,
            conns: config.database.replica_conns_per_core,
            acquire_timeout: config.db_acquire_timeout,
        },
    ));
    let core = Arc::new(Core {
        id: index,
        primary: primary.clone(),
        replicas: replicas.clone(),
        caches: caches.clone(),
        events: events.clone(),
        bids,
        orders,
        keys,
        tokens: VerifiedTokens::default(),
        limits: Limits {
            body_limit: config.body_limit,
            request_timeout: config.request_timeout,
            session_ttl: config.session_ttl,
        },
        web: Web {
            cors_origins: config.cors_origins.clone(),
            client_address_header: config.client_address_header.clone(),
        },
        health: health.clone(),
        throttles: throttles.clone(),
        images: Images::new(store, config.image_max_bytes),
        hashing: tokio::sync::Semaphore::new(crate::core::HASHES_PER_CORE),
    });
    let gauges = Arc::new(CoreGauges::new(index));
    let lifecycle_task = (index == 0)
        .then(|| tokio::spawn(lifecycle(primary.clone(), throttles, config.lifecycle_tick, shutdown.clone())));
    let replicas_task = tokio::spawn({
        let shutdown = shutdown.clone();
        let primary = primary.clone();
        async move { replicas.watch(primary, shutdown).await }
    });
    let sweep_task = tokio::spawn(cache::sweep(caches.clone(), gauges.clone(), shutdown.clone()));
    let listen_task = tokio::spawn(cache::listener::run(
        index,
        caches,
        events.clone(),
        database,
        host,
        primary.clone(),
        gauges.clone(),
        shutdown.clone(),
    ));
    // Heartbeats, and on shutdown the end of every stream (before the drain of
    // connections waits for them).
    let events_task = tokio::spawn(events.clone().run(shutdown.clone()));
    let delivery_task = tokio::spawn(events.clone().deliver_changes(core.bids.outstanding(), shutdown.clone()));
    let pool_task = tokio::spawn(sample_pool(primary.clone(), config.db_conns_per_core, gauges, shutdown.clone()));

    tracing::info!(core = index, cpu = pin.map(|p| p.id), "core serving");
    health.core_serving();
    let _ = started.send(Ok(index));
    serve(listener, http::app(core), &config, shutdown).await;

    let _ = listen_task.await;
    let _ = sweep_task.await;
    let _ = events_task.await;
    let _ = delivery_task.await;
    let _ = pool_task.await;
    let _ = replicas_task.await;
    if let Some(task) = lifecycle_task {
        let _ = task.await;
    }
    // Bounded: while the database refuses connections, sqlx's upkeep of the
    // pool's minimum keeps trying (for up to 5 minutes) and `close` waits for it.
    if tokio::time::timeout(config.shutdown_grace, primary.pool().close()).await.is_err() {
        tracing::warn!(core = index, "the database pool did not close within the shutdown grace; leaving it");
    }
    tracing::debug!(core = index, "core stopped");
}

/// HTTP/2 as a core speaks it: its streams run as tasks of the core's own
/// runtime, like its connections; keep-alive pings find dead peers; each of its
/// requests has `--request-timeout` like any other.
fn http2_builder(config: &Serve) -> hyper::server::conn::http2::Builder<TokioExecutor> {
    let mut http = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    http.timer(TokioTimer::new())
        .max_concurrent_streams(config.http2_max_streams)
        .max_header_list_size(config.http2_max_header_list)
        .keep_alive_interval(HTTP2_PING_EVERY)
        .keep_alive_timeout(config.header_read_timeout);
    http
}

/// How often an HTTP/2 connection is pinged; a peer that does not answer within
/// `--header-read-timeout` is gone.
const HTTP2_PING_EVERY: Duration = Duration::from_secs(20);

/// What a connection speaks, from its first bytes (peeked, not read): HTTP/2
/// when they are its connection preface, else HTTP/1.1. `None` when it closes,
/// or sends nothing within `within` (as hyper's header-read timeout would close
/// an HTTP/1.1 connection).
async fn speaks_http2(stream: &tokio::net::TcpStream, within: Duration) -> Option<bool> {
    const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    let peek = async {
        let mut first = [0u8; PREFACE.len()];
        loop {
            let n = stream.peek(&mut first).await.ok()?;
            if n == 0 {
                return None;
            }
            if !PREFACE.starts_with(&first[..n]) {
                return Some(false);
            }
            if n == PREFACE.len() {
                return Some(true);
            }
            // A prefix of the preface so far (a request starting with `P`
            // usually differs at its second byte): wait for the rest.
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    };
    tokio::time::timeout(within, peek).await.ok().flatten()
}

/// Accepts connections until shutdown, then lets in-flight requests finish within
/// the grace period.
async fn serve(listener: TcpListener, app: http::hot::App, config: &Serve, mut shutdown: watch::Receiver<bool>) {
    let mut http = hyper::server::conn::http1::Builder::new();
    http.header_read_timeout(config.header_read_timeout).keep_alive(true);
    let http2 = config.http2.then(|| http2_builder(config));
    let deadlines = Deadlines::default();
    let sweep = tokio::spawn(deadlines.clone().sweep());
    let graceful = GracefulShutdown::new();
    // A connection holds a slot until it closes; with none free the core stops
    // accepting, and new connections wait in the kernel's backlog.
    let slots = Arc::new(Semaphore::new(config.max_connections_per_core));
    while !*shutdown.borrow() {
        let permit = tokio::select! {
            biased;
            _ = shutdown.changed() => break,
            permit = slots.clone().acquire_owned() => match permit {
                Ok(p) => p,
                Err(_) => break,
            },
        };
        let (stream, peer) = tokio::select! {
            biased;
            _ = shutdown.changed() => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    accept_failed(e).await;
                    continue;
                }
            },
        };
        if let Err(e) = stream.set_nodelay(true) {
            tracing::debug!(error = %e, "cannot set TCP_NODELAY");
        }
        if let Some(bytes) = config.send_buffer
            && let Err(e) = socket2::SockRef::from(&stream).set_send_buffer_size(bytes)
        {
            tracing::debug!(error = %e, "cannot set SO_SNDBUF");
        }
        let app = app.for_peer(peer);
        let (http, timer) = (http.clone(), deadlines.timer());
        let (within, watcher, closing) = (config.header_read_timeout, graceful.watcher(), shutdown.clone());
        let Some(http2) = &http2 else {
            spawn_connection(serve_http1(stream, app, http, timer, watcher, within, closing), permit);
            continue;
        };
        // Told apart on the connection's own task, so that accepting goes on.
        let http2 = http2.clone();
        tokio::spawn(async move {
            match speaks_http2(&stream, within).await {
                Some(true) => {
                    let activity = Arc::new(Activity::default());
                    let io = TokioIo::new(super::socket::Unvectored(stream));
                    let connection = http2.serve_connection(io, app.counting(activity.clone()));
                    spawn_connection(serve_http2(connection, activity, within, closing), permit)
                }
                Some(false) => {
                    spawn_connection(serve_http1(stream, app, http, timer, watcher, within, closing), permit)
                }
                None => drop(permit),
            }
        });
    }
    // Stop accepting at once; then give open connections the grace period:
    // HTTP/1.1's are told by `graceful`, HTTP/2's by `shutdown` (see
    // `serve_http2`), and each holds its slot until it closes.
    drop(listener);
    let all_closed = async {
        graceful.shutdown().await;
        let _ = slots.acquire_many(config.max_connections_per_core.min(u32::MAX as usize) as u32).await;
    };
    tokio::select! {
        _ = all_closed => {}
        _ = tokio::time::sleep(config.shutdown_grace) => {
            tracing::warn!("shutdown grace period over; closing the remaining connections");
        }
    }
    sweep.abort();
}

/// Serves an HTTP/1.1 connection: its hot reads by `fast`, then, from its
/// first other request, by hyper (which shuts it down gracefully with the
/// others).
async fn serve_http1(
    stream: tokio::net::TcpStream,
    app: http::hot::App,
    mut http: hyper::server::conn::http1::Builder,
    timer: ConnTimer,
    watcher: Watcher,
    within: Duration,
    shutdown: watch::Receiver<bool>,
) -> hyper::Result<()> {
    let ended = super::fast::serve(&app, stream, &timer, within, &shutdown).await;
    if let Ended::Handoff(_) = ended {
        metrics::handed_to_hyper();
    }
    match ended {
        Ended::Closed => Ok(()),
        // hyper told to shut down before it has read anything would close the
        // connection unanswered: it answers the request under way and closes.
        Ended::Handoff(io) if *shutdown.borrow() => {
            http.keep_alive(false).timer(timer).serve_connection(TokioIo::new(io), app).await
        }
        Ended::Handoff(io) => watcher.watch(http.timer(timer).serve_connection(TokioIo::new(io), app)).await,
    }
}

/// Serves an HTTP/2 connection until it ends, and ends it gracefully (GOAWAY,
/// then its open streams finish) at shutdown, or once no stream has been open
/// for `idle` (`--header-read-timeout`, which bounds an idle HTTP/1.1
/// connection alike). hyper-util's `GracefulShutdown` cannot be told to close
/// a connection for idleness, so this does both.
async fn serve_http2(
    connection: Http2Connection,
    activity: Arc<Activity>,
    idle: Duration,
    mut shutdown: watch::Receiver<bool>,
) -> hyper::Result<()> {
    let mut connection = std::pin::pin!(connection);
    let idle = activity.idle_for(idle);
    let stop = shutdown.wait_for(|stop| *stop);
    tokio::pin!(idle, stop);
    tokio::select! {
        ended = connection.as_mut() => return ended,
        _ = &mut idle => {}
        _ = &mut stop => {}
    }
    connection.as_mut().graceful_shutdown();
    connection.await
}

/// An HTTP/2 connection as a core serves it.
type Http2Connection =
    hyper::server::conn::http2::Connection<TokioIo<super::socket::Unvectored>, http::hot::App, TokioExecutor>;

/// Runs a connection to its end on a task of its own; its slot frees then.
fn spawn_connection<E: std::fmt::Display>(
    connection: impl std::future::Future<Output = Result<(), E>> + Send + 'static,
    permit: tokio::sync::OwnedSemaphorePermit,
) {
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %e, "connection ended with an error");
        }
        drop(permit);
    });
}

#[cold]
async fn accept_failed(e: std::io::Error) {
    // Out of file descriptors (EMFILE/ENFILE) and the like: back off briefly instead
    // of spinning; the connection stays in the backlog.
    tracing::warn!(error = %e, "accept failed");
    tokio::time::sleep(Duration::from_millis(20)).await;
}

/// How often a core samples its pool's connection counts.
const POOL_SAMPLE_EVERY: Duration = Duration::from_secs(1);

/// Publishes the core's pool usage, off the hot path.
async fn sample_pool(primary: Primary, max: u32, gauges: Arc<CoreGauges>, mut shutdown: watch::Receiver<bool>) {
    gauges.pool_max.set(f64::from(max));
    let mut interval = tokio::time::interval(POOL_SAMPLE_EVERY);
    loop {
        tokio::select! {
            _ = shutdown.changed() => return,
            _ = interval.tick() => {
                let pool = primary.pool();
                let (size, idle) = (pool.size(), pool.num_idle() as u32);
                gauges.pool_idle.set(f64::from(idle));
                gauges.pool_in_use.set(f64::from(size.saturating_sub(idle)));
            }
        }
    }
}

/// How often the lifecycle's leader deletes the revocations of expired tokens,
/// and core 0 sweeps the rate limits' tables.
const PURGE_EVERY: Duration = Duration::from_secs(60);

/// Longest the lifecycle waits to connect or for one statement; past it the
/// connection, and with it any leadership, is given up.
const LIFECYCLE_WAIT: Duration = Duration::from_secs(5);

/// The application name of the lifecycle's connection (tests look for it).
pub const LIFECYCLE_APPLICATION: &str = "gavel-lifecycle";

/// Core 0's lifecycle duty: opens and closes auctions as their times come and
/// purges revocations no token needs any more, while this instance leads; and
/// sweeps the rate limits' tables.
///
/// Of all the instances sharing a database, the one whose lifecycle connection
/// holds the advisory lock [`db::auctions::LIFECYCLE_LOCK`] leads, and does
/// its work on that very connection. The others try for the lock every tick.
/// The lock is a session's: when the leader's connection closes (the instance
/// stopped, died, or lost its network), PostgreSQL releases it, and another
/// instance takes over at its next tick.
///
/// It connects where core 0's pool does, so it follows that core to a new
/// primary after a failover.
async fn lifecycle(primary: Primary, throttles: Arc<Throttles>, tick: Duration, mut shutdown: watch::Receiver<bool>) {
    use sqlx::Connection;
    let mut interval = tokio::time::interval(tick);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    // Not at once: a start has nothing to purge that a minute later has not.
    let mut purge = tokio::time::interval_at(tokio::time::Instant::now() + PURGE_EVERY, PURGE_EVERY);
    purge.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let leader = ::metrics::gauge!(metrics::LIFECYCLE_LEADER);
    // The connection, and whether it holds the lock.
    let mut held: Option<(sqlx::PgConnection, bool)> = None;
    loop {
        tokio::select! {
            _ = shutdown.changed() => break,
            _ = interval.tick() => {
                if held.is_none() {
                    let options =
                        primary.pool().connect_options().as_ref().clone().application_name(LIFECYCLE_APPLICATION);
                    match tokio::time::timeout(LIFECYCLE_WAIT, sqlx::PgConnection::connect_with(&options)).await {
                        Ok(Ok(conn)) => held = Some((conn, false)),
                        Ok(Err(e)) => tracing::debug!(error = %e, "the lifecycle cannot connect; retrying next tick"),
                        Err(_) => tracing::debug!("the lifecycle's connecting timed out; retrying next tick"),
                    }
                }
                let Some((conn, leading)) = held.as_mut() else { continue };
                let work = async {
                    match *leading {
                        true => db::auctions::advance(&mut *conn).await.map(drop),
                        false => db::auctions::try_lead(conn).await.map(|won| {
                            if won {
                                tracing::info!("this instance now runs the auction lifecycle");
                                *leading = true;
                                leader.set(1.0);
                            }
                        }),
                    }
                };
                // A connection that hangs (a half-open one) is dropped like a
                // broken one, and shutdown never waits on it for longer.
                let result = tokio::time::timeout(LIFECYCLE_WAIT, work).await.unwrap_or_else(|_| {
                    Err(db::DbError::Unavailable(sqlx::Error::Protocol("the lifecycle's statement timed out".into())))
                });
                if let Err(e) = result {
                    // With its connection, a leader has lost the lock: start over.
                    tracing::warn!(error = %e, "auction lifecycle tick failed");
                    held = None;
                    leader.set(0.0);
                }
            }
            _ = purge.tick() => {
                throttles.sweep();
                let Some((conn, true)) = held.as_mut() else { continue };
                match tokio::time::timeout(LIFECYCLE_WAIT, db::accounts::purge_revoked(&mut *conn)).await {
                    Ok(Ok(0)) => {}
                    Ok(Ok(n)) => tracing::debug!(purged = n, "purged the revocations of expired tokens"),
                    Ok(Err(e)) => tracing::warn!(error = %e, "purging expired revocations failed"),
                    Err(_) => {
                        tracing::warn!("purging expired revocations timed out; reconnecting");
                        held = None;
                        leader.set(0.0);
                    }
                }
            }
        }
    }
    leader.set(0.0);
    if let Some((conn, _)) = held {
        // Closing the session releases the lock for the next instance now.
        let _ = conn.close().await;
    }
}

//! One core's LISTEN connection: applies notifications to that core's caches, and
//! after any loss reconnects, reloads and only then serves from the cache again.

use std::sync::Arc;
use std::time::Duration;

use sqlx::PgPool;
use sqlx::postgres::{PgListener, PgPoolOptions};
use tokio::sync::watch;

use super::Caches;
use crate::db::target::{self, SessionAttrs, Target};
use crate::db::{self, CACHE_CHANNEL, Primary, notice};
use crate::events::Hub;
use crate::metrics::CoreGauges;

/// Longest wait between reconnection attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(2);
/// How often the LISTEN connection is asked whether its server still answers
/// (and still has the session attributes asked for), and how long an answer
/// may take. A server whose machine is lost sends no reset: without asking, a
/// connection waiting for notifications would wait for ever. A server that
/// turns read-only without a restart is noticed the same way.
const LIVENESS: (Duration, Duration) = (Duration::from_secs(1), Duration::from_secs(3));

/// The application name of core `core`'s LISTEN connection (tests look for it).
pub fn application_name(core: usize) -> String {
    format!("gavel-core-{core}-listen")
}

/// Runs until `shutdown` turns true. `primary` holds the core's pool, used for
/// reloads; it is on host `host` of `target`.
///
/// With several hosts, every (re)connection first finds the primary: after a
/// failover, the core replaces its pool with one on the promoted server, points
/// its LISTEN connection there, then reloads as after any loss.
#[allow(clippy::too_many_arguments)]
pub async fn run(
    core: usize,
    caches: Arc<Caches>,
    events: Arc<Hub>,
    target: Target,
    mut host: usize,
    primary: Primary,
    gauges: std::sync::Arc<CoreGauges>,
    mut shutdown: watch::Receiver<bool>,
) {
    // A pool of one, owned by this task: the listener's connection never competes
    // with queries for the core's pool.
    let listen_pool = PgPoolOptions::new()
        .max_connections(1)
        .acquire_timeout(Duration::from_secs(5))
        .connect_lazy_with(target.host(host).clone().application_name(&application_name(core)));
    let mut backoff = Duration::from_millis(20);
    while !*shutdown.borrow() {
        tokio::select! {
            _ = shutdown.changed() => break,
            result = async {
                if follow_primary(core, &target, &mut host, &listen_pool, &primary).await? {
                    gauges.primary_moves.increment(1);
                }
                listen_once(&caches, &events, target.attrs(), &listen_pool, &primary.pool(), &gauges).await
            } => {
                caches.set_live(false);
                db::set_listening(false);
                gauges.cache_live.set(0.0);
                match result {
                    Ok(()) => {
                        tracing::warn!(core, "cache listener connection lost; serving reads from the database until it is back");
                        backoff = Duration::from_millis(20);
                    }
                    Err(e) => tracing::warn!(core, error = %e, "cache listener cannot connect; retrying"),
                }
            }
        }
        tokio::select! {
            _ = shutdown.changed() => break,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
    caches.set_live(false);
    listen_pool.close().await;
}

/// Finds the primary among `target`'s hosts (when there are several) and, if it
/// moved, points the LISTEN pool at it and replaces the core's pool with one
/// there. Says whether it moved.
async fn follow_primary(
    core: usize,
    target: &Target,
    host: &mut usize,
    listen_pool: &PgPool,
    primary: &Primary,
) -> Result<bool, sqlx::Error> {
    if !target.is_multi_host() {
        return Ok(false);
    }
    let found = target.locate().await?;
    if found != *host {
        tracing::warn!(core, from = %target.describe(*host), to = %target.describe(found), "the primary moved; following it");
        *host = found;
        let options = target.host(found);
        primary.move_to(options.clone().application_name(&db::core_application_name(core)));
        listen_pool.set_connect_options(options.clone().application_name(&application_name(core)));
        return Ok(true);
    }
    Ok(false)
}

/// Connects, subscribes, reloads, goes live, and applies notifications until the
/// connection is lost (`Ok`) or cannot be set up (`Err`).
async fn listen_once(
    caches: &Caches,
    events: &Hub,
    attrs: SessionAttrs,
    listen_pool: &PgPool,
    pool: &PgPool,
    gauges: &CoreGauges,
) -> Result<(), sqlx::Error> {
    let mut listener = PgListener::connect_with(listen_pool).await?;
    listener.eager_reconnect(false);
    listener.listen(CACHE_CHANNEL).await?;
    // Subscribed first, then reloaded: a change committed after the reload's read
    // arrives as a notification, one before it is in what the reload read, and the
    // version rule sorts out any overlap.
    reload(caches, events, pool).await?;
    caches.set_live(true);
    db::set_listening(true);
    gauges.cache_live.set(1.0);
    gauges.reconnects.increment(1);
    let mut liveness = tokio::time::interval_at(tokio::time::Instant::now() + LIVENESS.0, LIVENESS.0);
    liveness.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        // `try_recv` may be dropped while it waits: it keeps a message only once
        // it has all of it (sqlx reads into its own buffer until then).
        let received = tokio::select! {
            received = listener.try_recv() => received,
            _ = liveness.tick() => {
                match tokio::time::timeout(LIVENESS.1, target::fits(attrs, &mut listener)).await {
                    Ok(Ok(true)) => continue,
                    Ok(Ok(false)) => tracing::warn!("the database no longer accepts writes; looking for the primary"),
                    Ok(Err(e)) => tracing::warn!(error = %e, "the cache listener's check failed"),
                    Err(_) => tracing::warn!(wait = ?LIVENESS.1, "the database did not answer the cache listener's check"),
                }
                return Ok(());
            }
        };
        match received {
            Ok(Some(notification)) => match notice::parse(notification.payload()) {
                Ok(n) => {
                    let lag_us = chrono::Utc::now().timestamp_micros() - n.at_us;
                    gauges.lag.record(lag_us.max(0) as f64 / 1e6);
                    events.apply(&n.notice, n.at_us);
                    caches.apply_notice(n.notice, |kind, applied| {
                        gauges.notifications[kind as usize][(applied == super::Applied::Newer) as usize].increment(1);
                    });
                }
                Err(e) => tracing::warn!(error = %e, "ignoring cache notification"),
            },
            Ok(None) => return Ok(()),
            Err(e) => {
                tracing::debug!(error = %e, "cache listener error");
                return Ok(());
            }
        }
    }
}

/// Refreshes everything cached, every watched auction and the sessions that
/// ended early, from the database.
async fn reload(caches: &Caches, events: &Hub, pool: &PgPool) -> Result<(), sqlx::Error> {
    let unwrap = |e: db::DbError| match e {
        db::DbError::Unavailable(e) | db::DbError::Other(e) => e,
        db::DbError::UnknownAccount => sqlx::Error::Protocol("a reload read named a missing account".into()),
    };
    let (ids, skus) = caches.keys();
    if !ids.is_empty() {
        for auction in db::auctions::get_many(pool, &ids).await.map_err(unwrap)? {
            caches.apply_auction(auction);
        }
    }
    let watched = events.watched();
    if !watched.is_empty() {
        let auctions = db::auctions::get_many(pool, &watched).await.map_err(unwrap)?;
        events.reloaded(auctions, chrono::Utc::now().timestamp_micros());
    }
    if !skus.is_empty() {
        for item in db::inventory::get_many(pool, &skus).await.map_err(unwrap)? {
            caches.apply_item(item);
        }
    }
    for end in db::accounts::ended_sessions(pool, caches.session_ttl()).await.map_err(unwrap)? {
        // A stream of a session that ended while this core was not listening
        // ends now.
        events.end_session(&end);
        caches.end_session(end);
    }
    Ok(())
}

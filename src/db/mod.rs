//! Queries per resource, write batching, the embedded PostgreSQL, migrations,
//! the primary among several hosts and the read replicas.

pub mod accounts;
pub mod auctions;
pub mod batch;
pub mod bids;
pub mod embedded;
pub mod images;
pub mod inventory;
pub mod notice;
pub mod orders;
pub mod replicas;
pub mod target;

use std::sync::{Arc, RwLock};
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};

use self::target::{SessionAttrs, Target};

/// The channel every cache notification travels on (one mechanism for every kind).
pub const CACHE_CHANNEL: &str = "gavel_cache";

/// The migrations in `migrations/`, embedded at compile time.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!();

/// A database failure, as the HTTP layer needs to tell them apart.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    /// No connection could be had in time, or the pool is closing: shed with 503.
    #[error("database busy: {0}")]
    Unavailable(#[source] sqlx::Error),
    /// A write named an account that does not exist (a token for a missing
    /// account): the client gets 401.
    #[error("the account does not exist")]
    UnknownAccount,
    /// Anything else: logged, and the client gets a generic 500.
    #[error("database error: {0}")]
    Other(#[source] sqlx::Error),
}

impl From<sqlx::Error> for DbError {
    fn from(e: sqlx::Error) -> Self {
        if is_unavailable(&e) {
            DbError::Unavailable(e)
        } else if names_missing_account(&e) {
            DbError::UnknownAccount
        } else {
            DbError::Other(e)
        }
    }
}

/// A batched write that may carry its account's `Idempotency-Key`.
pub(crate) trait Keyed {
    /// The account and the key, if the request was sent with one.
    fn idempotency_key(&self) -> Option<(i64, &str)>;
}

/// The positions of `requests` to send to the database: all but those whose
/// account's key an earlier request of the batch carries. That first request is
/// still running, so a later one is answered as any retry made meanwhile is
/// (409, DESIGN.md) and not sent: its statement claims keys within one session,
/// where a second claim of the same key succeeds too, and the batch's order
/// might put the later first.
pub(crate) fn first_of_each_key<R: Keyed>(requests: &[&R]) -> Vec<usize> {
    let mut keys_seen: Vec<(i64, &str)> = Vec::new();
    let mut sent = Vec::with_capacity(requests.len());
    for (i, r) in requests.iter().enumerate() {
        if let Some(key) = r.idempotency_key() {
            if keys_seen.contains(&key) {
                continue;
            }
            keys_seen.push(key);
        }
        sent.push(i);
    }
    sent
}

/// A database answer that breaks the contract of the statement that gave it.
#[cold]
pub(crate) fn protocol(message: String) -> DbError {
    DbError::Other(sqlx::Error::Protocol(message))
}

/// Whether a write failed on a foreign key to `accounts` (the constraints are
/// named `<table>_<seller|bidder|buyer>_id_fkey` on purpose).
fn names_missing_account(e: &sqlx::Error) -> bool {
    let sqlx::Error::Database(db) = e else { return false };
    db.code().as_deref() == Some("23503")
        && db.constraint().is_some_and(|c| {
            c.ends_with("_seller_id_fkey") || c.ends_with("_bidder_id_fkey") || c.ends_with("_buyer_id_fkey")
        })
}

/// Whether an error means the database cannot serve now (retry later), rather
/// than that the request itself failed: it is busy ([`is_busy`]) or down
/// ([`is_down`]).
fn is_unavailable(e: &sqlx::Error) -> bool {
    is_busy(e) || is_down(e)
}

thread_local! {
    /// Whether this thread's core hears from the database: its LISTEN connection
    /// is up. `true` on threads without one.
    static LISTENING: std::cell::Cell<bool> = const { std::cell::Cell::new(true) };
}

/// Records whether the calling core's LISTEN connection is up (the cache
/// listener, on the core's thread). A pool that runs out of time waiting for a
/// connection is busy while it is, and the database down while it is not: sqlx
/// tries a refused connect (a server gone, or starting up) again until the
/// acquire timeout, and then reports only the timeout.
pub fn set_listening(up: bool) {
    LISTENING.set(up);
}

/// The database is busy: every connection of the pool taken past the acquire
/// timeout (while the core's LISTEN connection is up: [`set_listening`]),
/// insufficient resources (53: too many connections, out of memory or
/// disk), a statement cancelled at its timeout (57014), or a batch past its
/// time bound. A client is told the server is overloaded.
pub fn is_busy(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::PoolTimedOut => LISTENING.get(),
        sqlx::Error::Io(io) => io.kind() == std::io::ErrorKind::TimedOut,
        sqlx::Error::Database(db) => db.code().is_some_and(|code| code.starts_with("53") || code == "57014"),
        _ => false,
    }
}

/// The database is down or unreachable (what [`is_busy`] does not claim first):
/// a client is told it is unavailable.
fn is_down(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::PoolClosed | sqlx::Error::PoolTimedOut | sqlx::Error::Io(_) => true,
        sqlx::Error::Database(db) => db.code().is_some_and(|code| {
            // 08: connection exception; 57: operator intervention (shutdown;
            // 57014, a cancelled statement, is busy); 55000: the database is not
            // accepting connections; 25006: a write on a server that has become
            // read-only (a failover is under way).
            code.starts_with("08") || code.starts_with("57") || code == "55000" || code == "25006"
        }),
        _ => false,
    }
}

/// The application name of core `core`'s pool connections.
pub fn core_application_name(core: usize) -> String {
    format!("gavel-core-{core}")
}

/// Builds one core's pool on host `host` of `target`. It must be called inside the
/// runtime that will use it: a pool's connections belong to the runtime that
/// opened them. With `target_session_attrs`, each new connection is checked, so
/// a pool never writes through a server that has turned into a standby.
pub fn core_pool(target: &Target, host: usize, core: usize, size: u32, acquire_timeout: Duration) -> PgPool {
    let attrs = target.attrs();
    let mut pool = PgPoolOptions::new()
        .max_connections(size.max(1))
        .min_connections(size.max(1))
        .acquire_timeout(acquire_timeout)
        // The pool is this core's alone; checking a connection before each use
        // costs a round trip on the hot path, and a broken one fails its query anyway.
        .test_before_acquire(false);
    if attrs != SessionAttrs::Any {
        pool = pool.after_connect(move |conn, _| {
            Box::pin(async move {
                match target::fits(attrs, conn).await? {
                    true => Ok(()),
                    false => Err(sqlx::Error::Io(std::io::Error::new(
                        std::io::ErrorKind::NotConnected,
                        "the server does not accept writes (a standby, after a failover?)",
                    ))),
                }
            })
        });
    }
    pool.connect_lazy_with(target.host(host).clone().application_name(&core_application_name(core)))
}

/// A core's pool on the primary, which a failover replaces whole (see
/// `cache::listener`).
///
/// Whole, because a query sent to a server that stopped answering (its machine
/// lost, or frozen) holds its connection until TCP gives up, and sqlx, taking
/// the connection back, tests it with a round trip that waits as long. Such
/// connections stay with the old pool; the new one starts with all its room.
/// Everything that uses the pool takes it from here for each piece of work.
#[derive(Debug, Clone)]
pub struct Primary(Arc<RwLock<PgPool>>);

impl Primary {
    pub fn new(pool: PgPool) -> Self {
        Primary(Arc::new(RwLock::new(pool)))
    }

    /// The pool now (a handle: one reference count).
    pub fn pool(&self) -> PgPool {
        self.0.read().unwrap_or_else(|poisoned| poisoned.into_inner()).clone()
    }

    /// Replaces the pool with one of the same settings on `options`. The old one
    /// is closed at once (`is_closed`, which a bid batch waiting for its lane
    /// checks): work holding it finishes or fails there, and its connections
    /// close as they come back. Call it inside the core's runtime.
    pub fn move_to(&self, options: PgConnectOptions) {
        let old = {
            let mut pool = self.0.write().unwrap_or_else(|poisoned| poisoned.into_inner());
            let new = pool.options().clone().connect_lazy_with(options);
            std::mem::replace(&mut *pool, new)
        };
        // `close` marks the pool closed when called; its future only waits for
        // the connections to come back, which a stuck one never does.
        drop(old.close());
        tokio::spawn(async move { old.close().await });
    }
}

/// Applies every pending migration.
pub async fn migrate(options: &PgConnectOptions) -> Result<(), sqlx::migrate::MigrateError> {
    let pool = PgPoolOptions::new()
        .max_connections(1)
        .acquire_timeout(Duration::from_secs(30))
        .connect_with(options.clone().application_name("gavel-migrate"))
        .await?;
    let result = MIGRATOR.run(&pool).await;
    pool.close().await;
    result
}

/// Creates `database` on the server `options` points at, unless it exists.
pub async fn ensure_database(options: &PgConnectOptions, database: &str) -> Result<(), sqlx::Error> {
    use sqlx::Connection;
    let mut conn = sqlx::PgConnection::connect_with(&options.clone().database("postgres")).await?;
    let exists =
        sqlx::query_scalar!(r#"select exists (select 1 from pg_database where datname = $1) as "exists!""#, database)
            .fetch_one(&mut conn)
            .await?;
    if !exists {
        // Not a checked query: a database's name is an identifier, which no
        // statement takes as a parameter.
        let quoted = format!("\"{}\"", database.replace('"', "\"\""));
        sqlx::query(&format!("create database {quoted}")).execute(&mut conn).await?;
    }
    conn.close().await
}

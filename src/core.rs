//! One core's state: its pool, caches, bid batcher and limits.
//!
//! A [`Core`] is built inside its core's runtime and reached by that core's handlers
//! through its own `Arc`; no other core ever touches it. The only things shared
//! between cores are read-only after start (`Keys`) or off the hot path ([`Health`],
//! [`Throttles`]).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use sqlx::PgPool;

use crate::auth::{Keys, VerifiedTokens};
use crate::cache::Caches;
use crate::db::Primary;
use crate::db::batch::Batcher;
use crate::db::bids::Bids;
use crate::db::orders::Orders;
use crate::db::replicas::Replicas;
use crate::events::Hub;
use crate::storage::Store;
use crate::throttle::Throttles;

/// Limits the HTTP layer enforces per request.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub body_limit: usize,
    pub request_timeout: Duration,
    pub session_ttl: Duration,
}

/// What the HTTP layer lets browsers and clients negotiate.
#[derive(Debug, Clone, Default)]
pub struct Web {
    /// Origins allowed to call the API from a browser, with credentials; empty:
    /// no cross-origin access.
    pub cors_origins: Vec<axum::http::HeaderValue>,
    /// The header a reverse proxy names the client's address in; `None`: the
    /// connection's peer address is the client's.
    pub client_address_header: Option<axum::http::HeaderName>,
}

/// Password hashes a core may compute at once. Each Argon2id hash holds
/// [`crate::auth::HASH_MEMORY_KIB`] (7 MiB) and 15–25 ms of a blocking thread's CPU; hashes
/// beyond one per core only queue for the same CPU, so more would add 7 MiB each
/// and no log-ins per second. One per core: two cores hashing add 14 MiB to the
/// 13–17 MiB gavel holds under load, and a burst of log-ins queues (within the
/// request timeout). Measured with VmHWM during `gavel-loadtest seed --bidders 16`
/// and the bid-storm's log-ins: peak RSS 20.7–23.8 MiB with 2 cores.
pub const HASHES_PER_CORE: usize = 1;

/// Image uploads a core takes at once. An upload to a cloud store buffers up to
/// one 5 MiB part (see [`crate::storage`]); two at once bound that at 10 MiB a
/// core, and more would only share the same link and CPU. Uploads past it wait
/// (within the request timeout).
pub const IMAGE_UPLOADS_PER_CORE: usize = 2;

/// A core's item images: its client of the store, and their limits.
#[derive(Debug)]
pub struct Images {
    pub store: Store,
    /// Largest image an upload may store, in bytes.
    pub max_bytes: u64,
    /// Bounds the core's uploads in progress (see [`IMAGE_UPLOADS_PER_CORE`]).
    pub uploads: tokio::sync::Semaphore,
}

impl Images {
    pub fn new(store: Store, max_bytes: u64) -> Self {
        Images { store, max_bytes, uploads: tokio::sync::Semaphore::new(IMAGE_UPLOADS_PER_CORE) }
    }
}

/// Process-wide readiness, read by `GET /ready` and written at start and shutdown.
/// Shared by all cores, but never touched on the hot path.
#[derive(Debug)]
pub struct Health {
    cores: usize,
    serving: AtomicUsize,
    draining: AtomicBool,
}

impl Health {
    pub fn new(cores: usize) -> Self {
        Health { cores, serving: AtomicUsize::new(0), draining: AtomicBool::new(false) }
    }

    pub fn core_serving(&self) {
        self.serving.fetch_add(1, Ordering::Release);
    }

    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::Release);
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    /// Every core serves and no drain has begun.
    pub fn all_serving(&self) -> bool {
        !self.is_draining() && self.serving.load(Ordering::Acquire) >= self.cores
    }
}

/// One core's state.
#[derive(Debug)]
pub struct Core {
    pub id: usize,
    /// The pool on the primary (replaced whole after a failover).
    pub primary: Primary,
    /// Read replicas, for the reads that may lag a little.
    pub replicas: Arc<Replicas>,
    pub caches: Arc<Caches>,
    /// The core's event streams.
    pub events: Arc<Hub>,
    pub bids: Batcher<Bids>,
    pub orders: Batcher<Orders>,
    pub keys: Arc<Keys>,
    /// The tokens this core has verified (see [`VerifiedTokens`]).
    pub tokens: VerifiedTokens,
    pub limits: Limits,
    pub web: Web,
    pub health: Arc<Health>,
    /// The process's rate limits, shared with the other cores.
    pub throttles: Arc<Throttles>,
    pub images: Images,
    /// Bounds this core's concurrent password hashing (see [`HASHES_PER_CORE`]).
    pub hashing: tokio::sync::Semaphore,
}

impl Core {
    /// The pool on the primary now.
    pub fn pool(&self) -> PgPool {
        self.primary.pool()
    }
}

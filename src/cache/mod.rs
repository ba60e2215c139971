//! Per-core read caches, kept coherent by LISTEN/NOTIFY (see [`listener`]).
//!
//! Each core owns one [`Caches`]; nothing in it is shared with another core. The
//! lock is a plain `std::sync::Mutex` because only the owning core's thread takes it
//! (handlers and the listener task all run on that core's current-thread runtime),
//! so it is never contended; it exists because axum state must be `Sync`. It is
//! never held across an `.await`.
//!
//! Every entry carries the row's `version`; an update is applied only if it is newer
//! than what is held, so notifications may arrive late, twice or out of order.
//! While the core's LISTEN connection is down the cache is not *live*, and reads must
//! go to the database instead (never silently stale data).

pub mod listener;
pub mod sessions;

use std::borrow::Borrow;
use std::hash::Hash;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use axum::http::HeaderValue;
use bytes::Bytes;
use chrono::{DateTime, Utc};
use hashlink::LruCache;

use self::sessions::EndedSessions;
use crate::auth::{LEEWAY_SECS, Session};
use crate::db::inventory::Item;
use crate::db::notice::{Notice, SessionEnd};
use crate::domain::auction::{Auction, BidState};
pub use crate::metrics::{Evicted, Which};

/// The kinds of update the caches apply (a label of the notification metric).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A whole auction.
    Auction,
    /// A whole stock row.
    Inventory,
    /// What an accepted bid changed in an auction.
    Bid,
}

/// What applying an update did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// The update was newer and replaced (or created) the entry.
    Newer,
    /// The cache already held this version or a newer one, or (for a bid state,
    /// which cannot create an entry) does not hold the auction at all, or (for a
    /// whole auction) the auction closed longer ago than the cache keeps one.
    Stale,
}

/// How much each cache of a core may hold.
#[derive(Debug, Clone, Copy)]
pub struct CacheLimits {
    /// Most entries of each cache (auctions, inventory). Past it, the entry read
    /// least recently leaves.
    pub capacity: usize,
    /// How long a closed auction stays after its end. A read of it after that
    /// goes to the database.
    pub closed_grace: Duration,
    /// The lifetime of a session's token: how long an account's raised session
    /// epoch must be remembered (see [`sessions`]).
    pub session_ttl: Duration,
}

impl Default for CacheLimits {
    fn default() -> Self {
        CacheLimits {
            capacity: 50_000,
            closed_grace: Duration::from_secs(300),
            session_ttl: Duration::from_secs(24 * 3600),
        }
    }
}

/// A cached row's response, rendered once and served until the row changes or,
/// for an auction whose shown status turns with the clock, until `fresh_until`.
///
/// `fresh_until` is a `SystemTime`, not a chrono time: a read only compares it
/// with the clock, and `chrono::Utc::now` spends some 170 instructions turning
/// the clock into a calendar date (callgrind, 10,000 cached reads); the date is
/// made only when the view is rendered again.
#[derive(Debug, Clone)]
pub struct View {
    pub body: Bytes,
    pub etag: HeaderValue,
    pub fresh_until: SystemTime,
}

/// A cached row and its rendered response, if one was asked for since it last
/// changed.
struct Entry<V> {
    value: V,
    view: Option<View>,
}

/// A cached row: anything with a version.
trait Versioned {
    fn version(&self) -> i64;
}

impl Versioned for Auction {
    fn version(&self) -> i64 {
        self.version
    }
}

impl Versioned for Item {
    fn version(&self) -> i64 {
        self.version
    }
}

/// The one rule of every cache: an update is taken only if its version is newer
/// than the one held.
fn is_newer(held: i64, update: i64) -> bool {
    update > held
}

/// Whether a closed auction has stayed its grace (its end is its closing time:
/// once `ends_at` has passed no bid can move it), or will have by the next
/// sweep: so a sweep every [`sweep_period`] never keeps one past its grace, and
/// a read from the database does not bring back one a sweep just evicted.
fn outstayed(a: &Auction, now: DateTime<Utc>, limits: &CacheLimits) -> bool {
    let early = sweep_period(limits.closed_grace);
    let keep = chrono::Duration::from_std(limits.closed_grace.saturating_sub(early)).unwrap_or(chrono::Duration::MAX);
    a.ends_at.checked_add_signed(keep).is_some_and(|leave| now >= leave)
}

/// One bounded cache: entries by key, least recently read first out.
struct Map<K: Hash + Eq, V> {
    entries: LruCache<K, Entry<V>>,
    evicted: [u64; 2],
}

impl<K: Hash + Eq, V: Versioned> Map<K, V> {
    fn new() -> Self {
        Map { entries: LruCache::new_unbounded(), evicted: [0; 2] }
    }

    /// Stores `value` unless a newer or equal version is held; makes room first.
    fn apply(&mut self, key: K, value: V, capacity: usize) -> Applied {
        if let Some(held) = self.entries.peek_mut(&key) {
            if !is_newer(held.value.version(), value.version()) {
                return Applied::Stale;
            }
            *held = Entry { value, view: None };
            return Applied::Newer;
        }
        while self.entries.len() >= capacity.max(1) && self.entries.remove_lru().is_some() {
            self.evicted[Evicted::Capacity as usize] += 1;
        }
        self.entries.insert(key, Entry { value, view: None });
        Applied::Newer
    }

    /// The entry's view, rendered now if there is none or it went stale.
    fn view<Q>(&mut self, key: &Q, now: SystemTime, render: impl FnOnce(&V, DateTime<Utc>) -> View) -> Option<View>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let entry = self.entries.get_mut(key)?;
        match &entry.view {
            Some(view) if now < view.fresh_until => Some(view.clone()),
            _ => {
                let view = render(&entry.value, now.into());
                entry.view = Some(view.clone());
                Some(view)
            }
        }
    }
}

/// How many auctions' announced versions a core remembers while it does not hold
/// them ([`Inner::unheld`]): a read in flight when its auction's bid was announced
/// needs the version only until it lands, some milliseconds; 4,096 is the last
/// 0.2 s at 20,000 bids a second on as many auctions.
const UNHELD_MEMORY: usize = 4096;

struct Inner {
    live: bool,
    limits: CacheLimits,
    auctions: Map<i64, Auction>,
    /// The newest version announced by a bid state of an auction this cache did
    /// not hold (which cannot create an entry). A read from the database that
    /// began before that bid and lands after its announcement is older, and is
    /// not kept: cached, it would be served as current until the auction's next
    /// change.
    unheld: LruCache<i64, i64>,
    inventory: Map<String, Item>,
    sessions: EndedSessions,
}

/// What a sweep found, for the metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Census {
    /// Entries now, in [`Which`] order.
    pub entries: [usize; 2],
    /// Ended sessions remembered now (revoked ones and accounts' raised epochs):
    /// bounded by time, not capacity — each is forgotten once no token it ends
    /// can still be accepted, and evicting one sooner would let its token in.
    pub sessions: usize,
    /// Evictions since the cache was made, by [`Which`] then [`Evicted`].
    pub evicted: [[u64; 2]; 2],
}

/// One core's caches.
pub struct Caches {
    inner: Mutex<Inner>,
}

impl std::fmt::Debug for Caches {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let inner = self.lock();
        f.debug_struct("Caches")
            .field("live", &inner.live)
            .field("auctions", &inner.auctions.entries.len())
            .field("inventory", &inner.inventory.entries.len())
            .finish()
    }
}

impl Default for Caches {
    fn default() -> Self {
        Caches::new(CacheLimits::default())
    }
}

impl Caches {
    pub fn new(limits: CacheLimits) -> Self {
        Caches {
            inner: Mutex::new(Inner {
                live: false,
                limits,
                auctions: Map::new(),
                unheld: LruCache::new(UNHELD_MEMORY),
                inventory: Map::new(),
                sessions: EndedSessions::default(),
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock cannot leave an entry half-written (entries
        // are replaced whole), so a poisoned lock is still a consistent cache.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Live while the LISTEN connection is up and the cache was reloaded after it
    /// last came up: only then may reads be served from the cache.
    pub fn set_live(&self, live: bool) {
        self.lock().live = live;
    }

    /// The cached auction's response, if the cache is live and holds it; `render`
    /// builds it when the auction changed (or its shown status turned) since the
    /// last read.
    pub fn auction_view(
        &self,
        id: i64,
        now: SystemTime,
        render: impl FnOnce(&Auction, DateTime<Utc>) -> View,
    ) -> Option<View> {
        let mut inner = self.lock();
        if !inner.live {
            return None;
        }
        inner.auctions.view(&id, now, render)
    }

    /// The cached auction, if the cache is live and holds it.
    pub fn auction(&self, id: i64) -> Option<Auction> {
        let inner = self.lock();
        if !inner.live {
            return None;
        }
        inner.auctions.entries.peek(&id).map(|e| e.value.clone())
    }

    /// Runs `f` on the cached auction even while the cache is not live. Only for
    /// decisions a stale entry cannot get wrong (a bid below the cached minimum).
    pub fn with_any_auction<R>(&self, id: i64, f: impl FnOnce(&Auction) -> R) -> Option<R> {
        self.lock().auctions.entries.peek(&id).map(|e| f(&e.value))
    }

    /// Stores `auction` unless a newer or equal version is held or was announced
    /// while it was not held, or it closed longer ago than the cache keeps closed
    /// auctions.
    pub fn apply_auction(&self, auction: Auction) -> Applied {
        let inner = &mut *self.lock();
        if outstayed(&auction, Utc::now(), &inner.limits) {
            return Applied::Stale;
        }
        let id = auction.id;
        if inner.unheld.peek(&id).is_some_and(|announced| is_newer(auction.version, *announced)) {
            return Applied::Stale;
        }
        let applied = inner.auctions.apply(id, auction, inner.limits.capacity);
        inner.unheld.remove(&id);
        applied
    }

    /// Applies what a bid changed to the cached auction, if it is held and older.
    /// An auction that is not held stays so: its first read loads it whole (and
    /// a read older than this state is not kept).
    pub fn apply_bid(&self, state: &BidState) -> Applied {
        let inner = &mut *self.lock();
        match inner.auctions.entries.peek_mut(&state.auction_id) {
            Some(held) if is_newer(held.value.version, state.version) => {
                held.value.apply_bid(state);
                held.view = None;
                Applied::Newer
            }
            Some(_) => Applied::Stale,
            None => {
                let announced = inner.unheld.get(&state.auction_id).map_or(state.version, |v| state.version.max(*v));
                inner.unheld.insert(state.auction_id, announced);
                Applied::Stale
            }
        }
    }

    /// The cached stock's response, if the cache is live and holds the sku.
    pub fn item_view(
        &self,
        sku: &str,
        now: SystemTime,
        render: impl FnOnce(&Item, DateTime<Utc>) -> View,
    ) -> Option<View> {
        let mut inner = self.lock();
        if !inner.live {
            return None;
        }
        inner.inventory.view(sku, now, render)
    }

    /// Stores `item` unless a newer or equal version is held.
    pub fn apply_item(&self, item: Item) -> Applied {
        let inner = &mut *self.lock();
        inner.inventory.apply(item.sku.clone(), item, inner.limits.capacity)
    }

    /// Applies a notice; calls `counted` with the kind and result of each update
    /// it carried (a bids notice carries one per auction).
    pub fn apply_notice(&self, notice: Notice, mut counted: impl FnMut(Kind, Applied)) {
        match notice {
            Notice::Auction(a) => counted(Kind::Auction, self.apply_auction(a)),
            Notice::Inventory(i) => counted(Kind::Inventory, self.apply_item(i)),
            Notice::Bids(states, _) => {
                for state in &states {
                    counted(Kind::Bid, self.apply_bid(state));
                }
            }
            Notice::SessionEnd(end) => self.end_session(end),
            // For event streams only: the auction's closed state comes on its own.
            Notice::Ended(_) | Notice::Order(_) => {}
        }
    }

    /// The lifetime of a session's token.
    pub fn session_ttl(&self) -> Duration {
        self.lock().limits.session_ttl
    }

    /// Whether `account`'s `session` ended before its token expires; `None`
    /// while the cache is not live, when only the database knows.
    pub fn session_ended(&self, account: i64, session: &Session) -> Option<bool> {
        let inner = self.lock();
        inner.live.then(|| inner.sessions.has_ended(account, session))
    }

    /// Remembers a session, or all older sessions of an account, as ended.
    pub fn end_session(&self, end: SessionEnd) {
        let inner = &mut *self.lock();
        match end {
            // Remembered as long as the token is accepted: to its expiry, and the leeway.
            SessionEnd::One { session_id, expires_us } => {
                inner.sessions.revoke(session_id, expires_us / 1_000_000 + 1 + LEEWAY_SECS as i64)
            }
            SessionEnd::AllBefore { account_id, epoch, ended_us } => {
                let until = ended_us / 1_000_000 + 1 + (inner.limits.session_ttl.as_secs() + LEEWAY_SECS) as i64;
                inner.sessions.end_all(account_id, epoch, until)
            }
        }
    }

    /// Evicts the closed auctions that will have stayed their grace by the next
    /// sweep, forgets ended sessions whose tokens have expired, and counts what
    /// is left.
    pub fn sweep(&self, now: DateTime<Utc>) -> Census {
        let inner = &mut *self.lock();
        inner.sessions.sweep(now.timestamp());
        let limits = inner.limits;
        let gone: Vec<i64> = inner
            .auctions
            .entries
            .iter()
            .filter(|(_, e)| outstayed(&e.value, now, &limits))
            .map(|(id, _)| *id)
            .collect();
        for id in &gone {
            inner.auctions.entries.remove(id);
        }
        inner.auctions.evicted[Evicted::Closed as usize] += gone.len() as u64;
        Census {
            entries: [inner.auctions.entries.len(), inner.inventory.entries.len()],
            sessions: inner.sessions.len(),
            evicted: [inner.auctions.evicted, inner.inventory.evicted],
        }
    }

    /// The keys of everything cached, for a reload.
    pub fn keys(&self) -> (Vec<i64>, Vec<String>) {
        let inner = self.lock();
        (
            inner.auctions.entries.iter().map(|(k, _)| *k).collect(),
            inner.inventory.entries.iter().map(|(k, _)| k.clone()).collect(),
        )
    }

    pub fn len(&self) -> usize {
        let inner = self.lock();
        inner.auctions.entries.len() + inner.inventory.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// How often a core sweeps its caches for the grace `closed_grace`: a tenth of
/// it, so a closed auction leaves within its grace, but at most every 5 s (the
/// entry and eviction metrics are published then too) and at least every 100 ms.
pub fn sweep_period(closed_grace: Duration) -> Duration {
    (closed_grace / 10).clamp(Duration::from_millis(100), Duration::from_secs(5))
}

/// Sweeps the core's caches every [`sweep_period`] until shutdown, publishing
/// what each sweep counted.
pub async fn sweep(
    caches: std::sync::Arc<Caches>,
    gauges: std::sync::Arc<crate::metrics::CoreGauges>,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    let period = sweep_period(caches.lock().limits.closed_grace);
    let mut interval = tokio::time::interval(period);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.changed() => return,
            _ = interval.tick() => {
                let census = caches.sweep(Utc::now());
                gauges.census(census.entries, census.evicted, census.sessions);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use chrono::{TimeZone, Utc};

    use super::*;

    fn auction(version: i64, high_bid: Option<i64>) -> Auction {
        Auction { high_bid, high_bidder: high_bid.map(|_| 3), ..Auction::sample(7, version) }
    }

    fn bid(version: i64, high_bid: i64) -> BidState {
        BidState {
            auction_id: 7,
            version,
            high_bid,
            high_bidder: 4,
            bid_count: version - 1,
            ends_at: Utc.timestamp_opt(4_000_000_030, 0).unwrap(),
            closed: false,
            min_next_bid: high_bid + 10,
        }
    }

    #[test]
    fn only_newer_versions_are_applied() {
        let c = Caches::default();
        assert_eq!(c.apply_auction(auction(2, Some(150))), Applied::Newer);
        assert_eq!(c.apply_auction(auction(1, None)), Applied::Stale);
        assert_eq!(c.apply_auction(auction(2, Some(150))), Applied::Stale);
        assert_eq!(c.with_any_auction(7, |a| a.high_bid), Some(Some(150)));
        assert_eq!(c.apply_auction(auction(3, Some(170))), Applied::Newer);
        assert_eq!(c.with_any_auction(7, |a| (a.version, a.high_bid)), Some((3, Some(170))));
    }

    #[test]
    fn bid_states_update_held_auctions_and_never_go_back() {
        let c = Caches::default();
        assert_eq!(c.apply_bid(&bid(2, 150)), Applied::Stale, "an auction not held stays so");
        assert_eq!(c.with_any_auction(7, |a| a.id), None);
        assert_eq!(c.apply_auction(auction(2, Some(150))), Applied::Newer);
        assert_eq!(c.apply_bid(&bid(3, 170)), Applied::Newer);
        assert_eq!(c.apply_bid(&bid(2, 150)), Applied::Stale, "an older state is dropped");
        assert_eq!(c.apply_auction(auction(2, Some(150))), Applied::Stale);
        assert_eq!(
            c.with_any_auction(7, |a| (a.version, a.high_bid, a.high_bidder, a.bid_count, a.ends_at.timestamp())),
            Some((3, Some(170), Some(4), 2, 4_000_000_030))
        );
    }

    /// A read from the database that began before a bid and lands after the
    /// bid's announcement (which found the auction not held) is older than what
    /// was announced: it is not kept, and the next read goes to the database.
    #[test]
    fn a_read_older_than_a_bid_announced_while_not_held_is_not_kept() {
        let c = Caches::default();
        c.set_live(true);
        assert_eq!(c.apply_bid(&bid(3, 170)), Applied::Stale);
        assert_eq!(c.apply_bid(&bid(2, 150)), Applied::Stale);
        assert_eq!(c.apply_auction(auction(1, None)), Applied::Stale, "read before both bids");
        assert_eq!(c.apply_auction(auction(2, Some(150))), Applied::Stale, "read between them");
        assert!(c.auction(7).is_none(), "the next read goes to the database");
        assert_eq!(c.apply_auction(auction(3, Some(170))), Applied::Newer);
        assert_eq!(c.apply_bid(&bid(4, 180)), Applied::Newer);
        assert_eq!(c.auction(7).map(|a| a.version), Some(4));
    }

    #[test]
    fn a_bids_notice_counts_each_state() {
        let c = Caches::default();
        c.apply_auction(auction(1, None));
        let mut seen = Vec::new();
        c.apply_notice(Notice::Bids(vec![bid(2, 150), BidState { auction_id: 8, ..bid(2, 150) }], vec![]), |k, a| {
            seen.push((k, a))
        });
        assert_eq!(seen, [(Kind::Bid, Applied::Newer), (Kind::Bid, Applied::Stale)]);
    }

    /// A view of `body` that stays fresh.
    fn plain(body: String) -> View {
        View {
            body: Bytes::from(body),
            etag: HeaderValue::from_static("\"1\""),
            fresh_until: DateTime::<Utc>::MAX_UTC.into(),
        }
    }

    #[test]
    fn reads_need_a_live_cache() {
        let c = Caches::default();
        c.apply_auction(auction(1, None));
        let render = |a: &Auction, _| plain(a.id.to_string());
        assert!(c.auction_view(7, SystemTime::now(), render).is_none());
        c.set_live(true);
        assert_eq!(c.auction_view(7, SystemTime::now(), render).unwrap().body, "7");
    }

    #[test]
    fn inventory_versions_follow_the_same_rule() {
        let c = Caches::default();
        c.set_live(true);
        let item = |version: i64, available: i64| Item {
            sku: "A-1".into(),
            seller_id: 1,
            title: "apples".into(),
            available,
            reserved: 0,
            version,
        };
        assert_eq!(c.apply_item(item(2, 5)), Applied::Newer);
        assert_eq!(c.apply_item(item(1, 9)), Applied::Stale);
        assert_eq!(c.item_view("A-1", SystemTime::now(), |i, _| plain(i.available.to_string())).unwrap().body, "5");
    }

    fn ending(id: i64, ends_at: DateTime<Utc>) -> Auction {
        Auction { id, ends_at, ..auction(1, None) }
    }

    fn limits(capacity: usize, grace_secs: u64) -> CacheLimits {
        CacheLimits { capacity, closed_grace: Duration::from_secs(grace_secs), ..CacheLimits::default() }
    }

    #[test]
    fn closed_auctions_leave_when_their_grace_runs_out() {
        let c = Caches::new(limits(100, 300));
        let now = Utc::now();
        // With a grace of 300 s, the sweep runs every 5 s.
        assert_eq!(sweep_period(Duration::from_secs(300)), Duration::from_secs(5));
        c.apply_auction(ending(1, now - chrono::Duration::seconds(280)));
        c.apply_auction(ending(2, now - chrono::Duration::seconds(10)));
        c.apply_auction(ending(3, now + chrono::Duration::seconds(3600)));
        assert_eq!(c.len(), 3);
        let census = c.sweep(now);
        assert_eq!(census.entries, [3, 0], "all within their grace");
        // Auction 1 has 1 s of grace left at the next sweep: it goes now.
        let census = c.sweep(now + chrono::Duration::seconds(16));
        assert_eq!(census.entries, [2, 0]);
        assert_eq!(census.evicted[Which::Auctions as usize], [1, 0]);
        assert_eq!(c.with_any_auction(1, |a| a.id), None);
        let later = now + chrono::Duration::seconds(286);
        let census = c.sweep(later);
        assert_eq!(census.entries, [1, 0], "auction 2's grace is over too");
        assert_eq!(c.with_any_auction(3, |a| a.id), Some(3));
    }

    #[test]
    fn an_auction_past_its_grace_is_not_cached_again() {
        let c = Caches::new(limits(100, 60));
        // Within the sweep period (6 s) of its grace's end: a sweep would evict it.
        let old = ending(1, Utc::now() - chrono::Duration::seconds(55));
        assert_eq!(c.apply_auction(old), Applied::Stale);
        assert!(c.is_empty());
    }

    #[test]
    fn a_full_cache_drops_the_entry_read_least_recently() {
        let c = Caches::new(limits(2, 300));
        c.set_live(true);
        let far = Utc::now() + chrono::Duration::days(1);
        let render = |a: &Auction, _| plain(a.id.to_string());
        c.apply_auction(ending(1, far));
        c.apply_auction(ending(2, far));
        assert!(c.auction_view(1, SystemTime::now(), render).is_some(), "1 is now the most recently read");
        c.apply_auction(ending(3, far));
        assert_eq!(c.len(), 2);
        assert_eq!(c.with_any_auction(2, |a| a.id), None, "2 was read least recently");
        assert_eq!(c.sweep(Utc::now()).evicted[Which::Auctions as usize], [0, 1]);
        for sku in ["A", "B", "C"] {
            c.apply_item(Item {
                sku: sku.into(),
                seller_id: 1,
                title: "t".into(),
                available: 1,
                reserved: 0,
                version: 1,
            });
        }
        let census = c.sweep(Utc::now());
        assert_eq!(census.entries, [2, 2]);
        assert_eq!(census.evicted[Which::Inventory as usize], [0, 1]);
    }

    #[test]
    fn a_view_is_rendered_once_per_version_and_status() {
        let c = Caches::new(limits(10, 300));
        c.set_live(true);
        let now = Utc::now();
        let starts = now + chrono::Duration::seconds(10);
        c.apply_auction(Auction { starts_at: starts, ..ending(1, now + chrono::Duration::seconds(60)) });
        let renders = std::cell::Cell::new(0);
        let render = |a: &Auction, at: DateTime<Utc>| {
            renders.set(renders.get() + 1);
            View {
                body: Bytes::from(format!("{:?}", a.status_at(at))),
                etag: HeaderValue::from_static("\"1\""),
                fresh_until: a.status_turns_at(at).into(),
            }
        };
        let (now, starts) = (SystemTime::from(now), SystemTime::from(starts));
        assert_eq!(c.auction_view(1, now, render).unwrap().body, "Scheduled");
        assert_eq!(c.auction_view(1, now, render).unwrap().body, "Scheduled");
        assert_eq!(renders.get(), 1, "the second read reused the view");
        assert_eq!(c.auction_view(1, starts, render).unwrap().body, "Open", "the status turned with the clock");
        assert_eq!(renders.get(), 2);
        c.apply_bid(&BidState { auction_id: 1, ..bid(2, 150) });
        c.auction_view(1, starts, render);
        assert_eq!(renders.get(), 3, "a bid invalidates the view");
        c.set_live(false);
        assert!(c.auction_view(1, starts, render).is_none(), "never from a cache that is not live");
    }
}

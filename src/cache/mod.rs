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

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};

use crate::db::inventory::Item;
use crate::db::notice::Notice;
use crate::domain::auction::{Auction, BidState};

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
    /// which cannot create an entry) does not hold the auction at all.
    Stale,
}

#[derive(Default)]
struct Inner {
    live: bool,
    auctions: HashMap<i64, Auction>,
    inventory: HashMap<String, Item>,
}

/// A cached row: anything with a key and a version.
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

/// Stores `value` unless a newer or equal version is held.
fn apply<K: std::hash::Hash + Eq, V: Versioned>(map: &mut HashMap<K, V>, key: K, value: V) -> Applied {
    match map.get(&key) {
        Some(held) if !is_newer(held.version(), value.version()) => Applied::Stale,
        _ => {
            map.insert(key, value);
            Applied::Newer
        }
    }
}

/// One core's caches.
#[derive(Default)]
pub struct Caches {
    inner: Mutex<Inner>,
}

impl std::fmt::Debug for Caches {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let inner = self.lock();
        f.debug_struct("Caches")
            .field("live", &inner.live)
            .field("auctions", &inner.auctions.len())
            .field("inventory", &inner.inventory.len())
            .finish()
    }
}

impl Caches {
    pub fn new() -> Self {
        Caches::default()
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock cannot leave an entry half-written (entries
        // are replaced whole), so a poisoned lock is still a consistent cache.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// True while the LISTEN connection is up and the cache was reloaded after it
    /// last came up: only then may reads be served from the cache.
    pub fn is_live(&self) -> bool {
        self.lock().live
    }

    pub fn set_live(&self, live: bool) {
        self.lock().live = live;
    }

    /// Runs `f` on the cached auction, if the cache is live and holds it.
    pub fn with_live_auction<R>(&self, id: i64, f: impl FnOnce(&Auction) -> R) -> Option<R> {
        let inner = self.lock();
        if !inner.live {
            return None;
        }
        inner.auctions.get(&id).map(f)
    }

    /// Runs `f` on the cached auction even while the cache is not live. Only for
    /// decisions a stale entry cannot get wrong (a bid below the cached minimum).
    pub fn with_any_auction<R>(&self, id: i64, f: impl FnOnce(&Auction) -> R) -> Option<R> {
        self.lock().auctions.get(&id).map(f)
    }

    /// Stores `auction` unless a newer or equal version is held.
    pub fn apply_auction(&self, auction: Auction) -> Applied {
        apply(&mut self.lock().auctions, auction.id, auction)
    }

    /// Applies what a bid changed to the cached auction, if it is held and older.
    /// An auction that is not held stays so: its first read loads it whole.
    pub fn apply_bid(&self, state: &BidState) -> Applied {
        match self.lock().auctions.get_mut(&state.auction_id) {
            Some(held) if is_newer(held.version, state.version) => {
                held.apply_bid(state);
                Applied::Newer
            }
            _ => Applied::Stale,
        }
    }

    /// Runs `f` on the cached stock of `sku`, if the cache is live and holds it.
    pub fn with_live_item<R>(&self, sku: &str, f: impl FnOnce(&Item) -> R) -> Option<R> {
        let inner = self.lock();
        if !inner.live {
            return None;
        }
        inner.inventory.get(sku).map(f)
    }

    /// Stores `item` unless a newer or equal version is held.
    pub fn apply_item(&self, item: Item) -> Applied {
        apply(&mut self.lock().inventory, item.sku.clone(), item)
    }

    /// Applies a notice; calls `counted` with the kind and result of each update
    /// it carried (a bids notice carries one per auction).
    pub fn apply_notice(&self, notice: Notice, mut counted: impl FnMut(Kind, Applied)) {
        match notice {
            Notice::Auction(a) => counted(Kind::Auction, self.apply_auction(a)),
            Notice::Inventory(i) => counted(Kind::Inventory, self.apply_item(i)),
            Notice::Bids(states) => {
                for state in &states {
                    counted(Kind::Bid, self.apply_bid(state));
                }
            }
        }
    }

    /// The keys of everything cached, for a reload.
    pub fn keys(&self) -> (Vec<i64>, Vec<String>) {
        let inner = self.lock();
        (inner.auctions.keys().copied().collect(), inner.inventory.keys().cloned().collect())
    }

    pub fn len(&self) -> usize {
        let inner = self.lock();
        inner.auctions.len() + inner.inventory.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use chrono::{TimeZone, Utc};

    use super::*;

    fn auction(version: i64, high_bid: Option<i64>) -> Auction {
        Auction {
            id: 7,
            seller_id: 1,
            title: "lamp".into(),
            reserve: 100,
            min_increment: 10,
            extend_secs: 0,
            high_bid,
            high_bidder: high_bid.map(|_| 3),
            bid_count: 0,
            starts_at: Utc.timestamp_opt(1_700_000_000, 0).unwrap(),
            ends_at: Utc.timestamp_opt(1_700_000_100, 0).unwrap(),
            closed: false,
            winner_id: None,
            version,
        }
    }

    fn bid(version: i64, high_bid: i64) -> BidState {
        BidState {
            auction_id: 7,
            version,
            high_bid,
            high_bidder: 4,
            bid_count: version - 1,
            ends_at: Utc.timestamp_opt(1_700_000_130, 0).unwrap(),
        }
    }

    #[test]
    fn only_newer_versions_are_applied() {
        let c = Caches::new();
        assert_eq!(c.apply_auction(auction(2, Some(150))), Applied::Newer);
        assert_eq!(c.apply_auction(auction(1, None)), Applied::Stale);
        assert_eq!(c.apply_auction(auction(2, Some(150))), Applied::Stale);
        assert_eq!(c.with_any_auction(7, |a| a.high_bid), Some(Some(150)));
        assert_eq!(c.apply_auction(auction(3, Some(170))), Applied::Newer);
        assert_eq!(c.with_any_auction(7, |a| (a.version, a.high_bid)), Some((3, Some(170))));
    }

    #[test]
    fn bid_states_update_held_auctions_and_never_go_back() {
        let c = Caches::new();
        assert_eq!(c.apply_bid(&bid(2, 150)), Applied::Stale, "an auction not held stays so");
        assert_eq!(c.with_any_auction(7, |a| a.id), None);
        c.apply_auction(auction(1, None));
        assert_eq!(c.apply_bid(&bid(3, 170)), Applied::Newer);
        assert_eq!(c.apply_bid(&bid(2, 150)), Applied::Stale, "an older state is dropped");
        assert_eq!(c.apply_auction(auction(2, Some(150))), Applied::Stale);
        assert_eq!(
            c.with_any_auction(7, |a| (a.version, a.high_bid, a.high_bidder, a.bid_count, a.ends_at.timestamp())),
            Some((3, Some(170), Some(4), 2, 1_700_000_130))
        );
    }

    #[test]
    fn a_bids_notice_counts_each_state() {
        let c = Caches::new();
        c.apply_auction(auction(1, None));
        let mut seen = Vec::new();
        c.apply_notice(Notice::Bids(vec![bid(2, 150), BidState { auction_id: 8, ..bid(2, 150) }]), |k, a| {
            seen.push((k, a))
        });
        assert_eq!(seen, [(Kind::Bid, Applied::Newer), (Kind::Bid, Applied::Stale)]);
    }

    #[test]
    fn reads_need_a_live_cache() {
        let c = Caches::new();
        c.apply_auction(auction(1, None));
        assert_eq!(c.with_live_auction(7, |a| a.id), None);
        c.set_live(true);
        assert_eq!(c.with_live_auction(7, |a| a.id), Some(7));
    }

    #[test]
    fn inventory_versions_follow_the_same_rule() {
        let c = Caches::new();
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
        assert_eq!(c.with_live_item("A-1", |i| i.available), Some(5));
    }
}

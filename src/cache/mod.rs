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

use chrono::DateTime;
use serde::Deserialize;

use crate::db::inventory::Item;
use crate::domain::auction::Auction;

/// The kinds of row the caches hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Auction,
    Inventory,
}

/// What applying an update did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// The update was newer and replaced (or created) the entry.
    Newer,
    /// The cache already held this version or a newer one.
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

/// The one rule of every cache: store `value` unless a newer or equal version is held.
fn apply<K: std::hash::Hash + Eq, V: Versioned>(map: &mut HashMap<K, V>, key: K, value: V) -> Applied {
    match map.get(&key) {
        Some(held) if held.version() >= value.version() => Applied::Stale,
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

    /// Applies one notification payload (the `auction_json` or `inventory_json`
    /// format); says what kind of row it was and whether it was newer.
    pub fn apply_payload(&self, payload: &str) -> Result<(Kind, Applied), NoticeError> {
        Ok(match parse_notice(payload)? {
            Notice::Auction(a) => (Kind::Auction, self.apply_auction(a)),
            Notice::Inventory(i) => (Kind::Inventory, self.apply_item(i)),
        })
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

/// A notification that could not be understood.
#[derive(Debug, thiserror::Error)]
#[error("unreadable cache notification: {0}")]
pub struct NoticeError(String);

/// A change announced by the database.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Notice {
    Auction(Auction),
    Inventory(Item),
}

#[derive(Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
enum RawNotice {
    Auction(RawAuction),
    Inventory(RawItem),
}

#[derive(Deserialize)]
struct RawItem {
    sku: String,
    seller_id: i64,
    title: String,
    available: i64,
    reserved: i64,
    version: i64,
}

#[derive(Deserialize)]
struct RawAuction {
    id: i64,
    seller_id: i64,
    title: String,
    reserve: i64,
    min_increment: i64,
    extend_secs: i32,
    high_bid: Option<i64>,
    high_bidder: Option<i64>,
    bid_count: i64,
    starts_at_us: i64,
    ends_at_us: i64,
    status: String,
    winner_id: Option<i64>,
    version: i64,
}

/// Parses a payload of the `auction_json` format (also what `place_bids` returns).
pub fn parse_notice(payload: &str) -> Result<Notice, NoticeError> {
    let raw: RawNotice = serde_json::from_str(payload).map_err(|e| NoticeError(e.to_string()))?;
    match raw {
        RawNotice::Auction(r) => {
            let starts_at = DateTime::from_timestamp_micros(r.starts_at_us)
                .ok_or_else(|| NoticeError("starts_at out of range".into()))?;
            let ends_at = DateTime::from_timestamp_micros(r.ends_at_us)
                .ok_or_else(|| NoticeError("ends_at out of range".into()))?;
            Ok(Notice::Auction(Auction {
                id: r.id,
                seller_id: r.seller_id,
                title: r.title,
                reserve: r.reserve,
                min_increment: r.min_increment,
                extend_secs: r.extend_secs,
                high_bid: r.high_bid,
                high_bidder: r.high_bidder,
                bid_count: r.bid_count,
                starts_at,
                ends_at,
                closed: r.status == "closed",
                winner_id: r.winner_id,
                version: r.version,
            }))
        }
        RawNotice::Inventory(r) => Ok(Notice::Inventory(Item {
            sku: r.sku,
            seller_id: r.seller_id,
            title: r.title,
            available: r.available,
            reserved: r.reserved,
            version: r.version,
        })),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn payload(version: i64, high_bid: Option<i64>) -> String {
        serde_json::json!({
            "kind": "auction", "at_us": 1, "id": 7, "seller_id": 1, "title": "lamp", "reserve": 100,
            "min_increment": 10, "extend_secs": 0, "high_bid": high_bid, "high_bidder": high_bid.map(|_| 3),
            "bid_count": 0, "starts_at_us": 1_700_000_000_000_000i64, "ends_at_us": 1_700_000_100_000_000i64,
            "status": "open", "winner_id": null, "version": version
        })
        .to_string()
    }

    #[test]
    fn only_newer_versions_are_applied() {
        let c = Caches::new();
        assert_eq!(c.apply_payload(&payload(2, Some(150))).unwrap(), (Kind::Auction, Applied::Newer));
        assert_eq!(c.apply_payload(&payload(1, None)).unwrap(), (Kind::Auction, Applied::Stale));
        assert_eq!(c.apply_payload(&payload(2, Some(150))).unwrap(), (Kind::Auction, Applied::Stale));
        assert_eq!(c.with_any_auction(7, |a| a.high_bid), Some(Some(150)));
        assert_eq!(c.apply_payload(&payload(3, Some(170))).unwrap(), (Kind::Auction, Applied::Newer));
        assert_eq!(c.with_any_auction(7, |a| (a.version, a.high_bid)), Some((3, Some(170))));
    }

    #[test]
    fn reads_need_a_live_cache() {
        let c = Caches::new();
        c.apply_payload(&payload(1, None)).unwrap();
        assert_eq!(c.with_live_auction(7, |a| a.id), None);
        c.set_live(true);
        assert_eq!(c.with_live_auction(7, |a| a.id), Some(7));
    }

    #[test]
    fn garbage_payloads_are_errors_not_panics() {
        let c = Caches::new();
        assert!(c.apply_payload("not json").is_err());
        assert!(c.apply_payload(r#"{"kind":"spaceship"}"#).is_err());
        assert!(c.apply_payload(r#"{"kind":"auction","id":1}"#).is_err());
        assert!(c.is_empty());
    }

    #[test]
    fn inventory_versions_follow_the_same_rule() {
        let c = Caches::new();
        c.set_live(true);
        let item = |version: i64, available: i64| {
            serde_json::json!({"kind": "inventory", "at_us": 1, "sku": "A-1", "seller_id": 1, "title": "apples",
                "available": available, "reserved": 0, "version": version})
            .to_string()
        };
        assert_eq!(c.apply_payload(&item(2, 5)).unwrap(), (Kind::Inventory, Applied::Newer));
        assert_eq!(c.apply_payload(&item(1, 9)).unwrap(), (Kind::Inventory, Applied::Stale));
        assert_eq!(c.with_live_item("A-1", |i| i.available), Some(5));
    }

    #[test]
    fn timestamps_travel_as_microseconds() {
        let Ok(Notice::Auction(a)) = parse_notice(&payload(1, None)) else { panic!("not an auction") };
        assert_eq!(a.starts_at.timestamp(), 1_700_000_000);
        assert_eq!((a.ends_at - a.starts_at).num_seconds(), 100);
    }
}

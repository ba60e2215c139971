//! What the database announces on [`CACHE_CHANNEL`](super::CACHE_CHANNEL): the one
//! decoder of its payloads, yielding domain types.
//!
//! Every payload is a JSON object with a `kind` and `at_us` (epoch
//! microseconds): when the change it carries was made — the database's clock as
//! the trigger or function builds the payload, just before the commit; for
//! `bids`, gavel's clock when the oldest batch it carries had its commit
//! confirmed. The listeners' lag and the event streams' delivery time count from
//! it. Nothing orders or decides by it (versions do that):
//!
//! - `auction`: a whole auction (`auction_json`), sent by the row trigger when an
//!   auction is created and on every change that is not a bid (opening, closing).
//! - `bids`: `states: [[id, version, high_bid, high_bidder, bid_count, ends_at_us,
//!   closed, min_next_bid, outbid…], …]` (`closed` 1 when the bid bought the
//!   auction, which it then won; `outbid…` the bidders whose lead the batch's bids
//!   took, for their event streams; states of six or seven fields, as gavel sent
//!   before buy-now and before outbid events, decode with neither), sent by the
//!   bid batcher once per batch, right after its commit
//!   ([`encode_bids`]), with the final state of each auction the batch changed:
//!   only what a bid changes, since the rest of an auction never changes once it
//!   is open, and only the last state, since a cache keeps only the newest version
//!   anyway. About 60 bytes an auction instead of about 330 for a whole one per
//!   bid.
//! - `inventory`: a whole stock row (`inventory_json`).
//! - `ended`: an auction `advance_auctions` closed (or a buy-now, `place_bids`),
//!   with its winner and the bidders who bid on it (up to 500 a notification),
//!   for their event streams.
//! - `order`: an order placed, cancelled or fulfilled (`orders_notify`), for its
//!   buyer's event streams.
//! - `revoked`: a session logged out, with its token's expiry
//!   (`revoked_sessions_notify`).
//! - `sessions_ended`: an account's session epoch rose (a password change), so
//!   its tokens of older epochs no longer count (`sessions_ended_notify`).

use chrono::{DateTime, Utc};
use serde::Deserialize;

use super::auctions;
use super::inventory::Item;
use crate::domain::auction::{Auction, BidState, Outbid};
use crate::domain::stock::OrderStatus;

/// A change announced by the database.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Notice {
    Auction(Auction),
    Inventory(Item),
    /// The newest state of each auction a batch changed, and the bidders whose
    /// lead its bids took.
    Bids(Vec<BidState>, Vec<Outbid>),
    /// An auction closed: its winner and (some of) the bidders who bid on it.
    Ended(Ended),
    /// An order's status changed (or it was placed).
    Order(OrderChange),
    /// Sessions ended before their tokens expire.
    SessionEnd(SessionEnd),
}

/// Sessions that ended early, as the caches remember them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionEnd {
    /// One session logged out; its token expires at `expires_us` (epoch µs).
    One { session_id: uuid::Uuid, expires_us: i64 },
    /// Every session of `account_id` from before `epoch`, which began at `ended_us`.
    AllBefore { account_id: i64, epoch: i32, ended_us: i64 },
}

/// An order's new status, for its buyer's event streams.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct OrderChange {
    pub order_id: i64,
    pub buyer_id: i64,
    pub status: OrderStatus,
    /// The order's `updated_at`, epoch microseconds: newer for every change.
    pub updated_us: i64,
}

/// An auction that closed, for the event streams of those who bid on it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Ended {
    pub auction_id: i64,
    pub winner_id: Option<i64>,
    pub high_bid: Option<i64>,
    /// The auction's version once closed.
    pub version: i64,
    /// Bidders who bid on it: all of them, over one or more notifications.
    pub bidders: Vec<i64>,
}

/// A decoded notification.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notification {
    pub notice: Notice,
    /// When it was built, in epoch microseconds: by the database's clock for the
    /// trigger's notices, by the announcing core's for `bids`.
    pub at_us: i64,
}

/// A notification that could not be understood.
#[derive(Debug, thiserror::Error)]
#[error("unreadable cache notification: {0}")]
pub struct NoticeError(String);

#[derive(Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
enum Raw {
    Auction {
        at_us: i64,
        #[serde(flatten)]
        row: auctions::Row,
    },
    Inventory {
        at_us: i64,
        #[serde(flatten)]
        item: Item,
    },
    Bids(RawBids),
    Ended {
        at_us: i64,
        #[serde(flatten)]
        ended: Ended,
    },
    Order {
        at_us: i64,
        #[serde(flatten)]
        order: OrderChange,
    },
    Revoked {
        at_us: i64,
        session_id: uuid::Uuid,
        expires_us: i64,
    },
    #[serde(rename = "sessions_ended")]
    SessionsEnded {
        at_us: i64,
        account_id: i64,
        epoch: i32,
        ended_us: i64,
    },
}

/// How every `bids` payload starts, as [`encode_bids`] writes it.
const BIDS_HEAD: &str = r#"{"kind":"bids","#;

/// A `bids` payload. One that starts as [`encode_bids`] writes it is read
/// without the tagged enum, which serde reads through a buffer of every value
/// in it. Bid announcements are most
/// of what the listeners decode in a bid storm (3 % of gavel's CPU, perf,
/// `gavel-loadtest run bid-storm`, 2026-12-01); decoding and applying one of 32
/// states took 12.5 µs through the enum and 5.6 µs this way (`cargo bench
/// --bench hot_paths -- cache/apply_bids_32`).
#[derive(Deserialize)]
struct RawBids {
    at_us: i64,
    states: Vec<Vec<i64>>,
}

/// Decodes one payload.
pub fn parse(payload: &str) -> Result<Notification, NoticeError> {
    let raw = match payload.starts_with(BIDS_HEAD) {
        true => serde_json::from_str(payload).map(Raw::Bids),
        false => serde_json::from_str(payload),
    };
    Ok(match raw.map_err(|e| NoticeError(e.to_string()))? {
        Raw::Auction { at_us, row } => Notification { notice: Notice::Auction(row.into()), at_us },
        Raw::Inventory { at_us, item } => Notification { notice: Notice::Inventory(item), at_us },
        Raw::Ended { at_us, ended } => Notification { notice: Notice::Ended(ended), at_us },
        Raw::Order { at_us, order } => Notification { notice: Notice::Order(order), at_us },
        Raw::Revoked { at_us, session_id, expires_us } => {
            Notification { notice: Notice::SessionEnd(SessionEnd::One { session_id, expires_us }), at_us }
        }
        Raw::SessionsEnded { at_us, account_id, epoch, ended_us } => {
            Notification { notice: Notice::SessionEnd(SessionEnd::AllBefore { account_id, epoch, ended_us }), at_us }
        }
        Raw::Bids(RawBids { at_us, states: raw }) => {
            let mut states = Vec::with_capacity(raw.len());
            let mut outbid = Vec::new();
            for s in raw {
                let [auction_id, version, high_bid, high_bidder, bid_count, ends_at_us, ref rest @ ..] = s[..] else {
                    return Err(NoticeError(format!("a bid state of {} fields", s.len())));
                };
                // Six fields before buy-now, seven before outbid bidders.
                let (closed, min_next_bid, outbid_bidders) = match rest {
                    [] => (false, high_bid, &[][..]),
                    [closed] => (*closed == 1, high_bid, &[][..]),
                    [closed, min_next_bid, bidders @ ..] => (*closed == 1, *min_next_bid, bidders),
                };
                let ends_at = micros(ends_at_us)?;
                states.push(BidState {
                    auction_id,
                    version,
                    high_bid,
                    high_bidder,
                    bid_count,
                    ends_at,
                    closed,
                    min_next_bid,
                });
                outbid.extend(outbid_bidders.iter().map(|&bidder| Outbid { auction_id, bidder }));
            }
            Notification { notice: Notice::Bids(states, outbid), at_us }
        }
    })
}

/// PostgreSQL refuses payloads of 8000 bytes or more.
const MAX_PAYLOAD: usize = 7990;

/// The `bids` payloads that announce `states` and who they outbid: the newest
/// state of each auction only, with every bidder whose lead a bid on it took
/// except the one leading now, split into as few payloads as fit PostgreSQL's
/// limit.
pub fn encode_bids(states: &[BidState], outbid: &[Outbid], at_us: i64) -> Vec<String> {
    use std::fmt::Write;
    let mut newest: Vec<&BidState> = states.iter().collect();
    newest.sort_unstable_by_key(|s| (s.auction_id, std::cmp::Reverse(s.version)));
    newest.dedup_by_key(|s| s.auction_id);
    let mut outbid: Vec<Outbid> = outbid.to_vec();
    outbid.sort_unstable_by_key(|o| (o.auction_id, o.bidder));
    outbid.dedup();
    let head = format!(r#"{BIDS_HEAD}"at_us":{at_us},"states":["#);
    let mut payloads = Vec::new();
    let mut payload = String::new();
    let mut state = String::new();
    for s in newest {
        state.clear();
        let _ = write!(
            state,
            "[{},{},{},{},{},{},{},{}",
            s.auction_id,
            s.version,
            s.high_bid,
            s.high_bidder,
            s.bid_count,
            s.ends_at.timestamp_micros(),
            u8::from(s.closed),
            s.min_next_bid
        );
        let from = outbid.partition_point(|o| o.auction_id < s.auction_id);
        for o in outbid[from..].iter().take_while(|o| o.auction_id == s.auction_id) {
            if o.bidder != s.high_bidder {
                let _ = write!(state, ",{}", o.bidder);
            }
        }
        state.push(']');
        if !payload.is_empty() && payload.len() + 1 + state.len() + 2 > MAX_PAYLOAD {
            payload.push_str("]}");
            payloads.push(std::mem::take(&mut payload));
        }
        if payload.is_empty() {
            payload.push_str(&head);
        } else {
            payload.push(',');
        }
        payload.push_str(&state);
    }
    if !payload.is_empty() {
        payload.push_str("]}");
        payloads.push(payload);
    }
    payloads
}

fn micros(us: i64) -> Result<DateTime<Utc>, NoticeError> {
    DateTime::from_timestamp_micros(us).ok_or_else(|| NoticeError(format!("timestamp {us} out of range")))
}

/// Deserializes epoch microseconds (how timestamps travel in notifications:
/// cheaper to parse than text, and free of time zone settings).
pub(crate) fn de_micros<'de, D: serde::Deserializer<'de>>(d: D) -> Result<DateTime<Utc>, D::Error> {
    let us = i64::deserialize(d)?;
    micros(us).map_err(serde::de::Error::custom)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A payload as `auction_json` builds it.
    fn auction_payload(version: i64, high_bid: Option<i64>) -> String {
        serde_json::json!({
            "kind": "auction", "at_us": 5, "id": 7, "seller_id": 1, "title": "lamp", "reserve": 100,
            "min_increment": 10, "extend_secs": 0, "high_bid": high_bid, "high_bidder": high_bid.map(|_| 3),
            "bid_count": 0, "starts_at_us": 1_700_000_000_000_000i64, "ends_at_us": 1_700_000_100_000_000i64,
            "status": "open", "winner_id": null, "version": version
        })
        .to_string()
    }

    #[test]
    fn an_auction_decodes_whole_with_microsecond_timestamps() {
        let n = parse(&auction_payload(3, Some(150))).unwrap();
        assert_eq!(n.at_us, 5);
        let Notice::Auction(a) = n.notice else { panic!("not an auction") };
        assert_eq!((a.id, a.version, a.high_bid, a.high_bidder), (7, 3, Some(150), Some(3)));
        assert_eq!(a.starts_at.timestamp(), 1_700_000_000);
        assert_eq!((a.ends_at - a.starts_at).num_seconds(), 100);
        assert!(!a.closed);
    }

    #[test]
    fn ended_sessions_decode_as_the_trigger_writes_them() {
        let id = "5f0b3d1e-8c1a-4f4e-9d7a-2b1c0e9f8a7b";
        let revoked = format!(
            r#"{{"kind":"revoked","at_us":4,"session_id":"{id}","account_id":7,"expires_us":1800000000000000}}"#
        );
        let one = SessionEnd::One { session_id: id.parse().unwrap(), expires_us: 1_800_000_000_000_000 };
        assert_eq!(parse(&revoked).unwrap().notice, Notice::SessionEnd(one));
        let ended = r#"{"kind":"sessions_ended","at_us":4,"account_id":7,"epoch":2,"ended_us":99}"#;
        let all = SessionEnd::AllBefore { account_id: 7, epoch: 2, ended_us: 99 };
        assert_eq!(parse(ended).unwrap().notice, Notice::SessionEnd(all));
        assert!(parse(&revoked.replace(id, "not-a-uuid")).is_err());
    }

    #[test]
    fn an_order_change_decodes_with_its_buyer_and_status() {
        let payload = r#"{"kind":"order","at_us":4,"order_id":12,"buyer_id":7,"status":"fulfilled","updated_us":99}"#;
        let n = parse(payload).unwrap();
        let expected = OrderChange { order_id: 12, buyer_id: 7, status: OrderStatus::Fulfilled, updated_us: 99 };
        assert_eq!((n.at_us, n.notice), (4, Notice::Order(expected)));
        assert!(parse(&payload.replace("fulfilled", "lost")).is_err(), "an unknown status is unreadable");
    }

    #[test]
    fn bids_decode_to_one_state_per_auction() {
        let payload = r#"{"kind":"bids","at_us":9,"states":[[1001,2,200,3,1,1795963909737370],[1002,3,160,6,2,1796050269737370]]}"#;
        let n = parse(payload).unwrap();
        assert_eq!(n.at_us, 9);
        let Notice::Bids(states, _) = n.notice else { panic!("not bids") };
        assert_eq!(states.len(), 2);
        assert_eq!(
            (states[1].auction_id, states[1].version, states[1].high_bid, states[1].high_bidder, states[1].bid_count),
            (1002, 3, 160, 6, 2)
        );
        assert_eq!(states[1].ends_at.timestamp_micros(), 1_796_050_269_737_370);
        assert!(!states[0].closed && !states[1].closed, "six fields: no buy-now");
        // Written otherwise than `encode_bids` writes it, it goes the tagged
        // enum's way, to the same notification.
        let reordered = r#"{ "at_us": 9, "states": [[1001,2,200,3,1,1795963909737370],[1002,3,160,6,2,1796050269737370]], "kind": "bids" }"#;
        assert!(!reordered.starts_with(BIDS_HEAD));
        assert_eq!(parse(reordered).unwrap(), parse(payload).unwrap());
    }

    #[test]
    fn encoded_bids_take_the_direct_way() {
        for payload in encode_bids(&[state(5, 2), state(6, 3)], &[], 1) {
            assert!(payload.starts_with(BIDS_HEAD), "{payload}");
        }
    }

    #[test]
    fn a_bought_auction_is_announced_closed_and_read_back_so() {
        let bought = BidState { closed: true, ..state(5, 2) };
        let payloads = encode_bids(&[bought, state(6, 3)], &[], 1);
        let Notice::Bids(states, _) = parse(&payloads[0]).unwrap().notice else { panic!("not bids") };
        assert_eq!(states, [bought, state(6, 3)]);
    }

    fn state(auction_id: i64, version: i64) -> BidState {
        BidState {
            auction_id,
            version,
            high_bid: 100 * version,
            high_bidder: 3,
            bid_count: version - 1,
            ends_at: DateTime::from_timestamp_micros(1_796_050_269_737_370).unwrap(),
            closed: false,
            min_next_bid: 100 * version + 10,
        }
    }

    #[test]
    fn a_batch_is_announced_with_the_newest_state_of_each_auction() {
        let payloads = encode_bids(&[state(5, 2), state(4, 7), state(5, 4), state(5, 3)], &[], 11);
        assert_eq!(payloads.len(), 1);
        let n = parse(&payloads[0]).unwrap();
        assert_eq!(n.at_us, 11);
        assert_eq!(n.notice, Notice::Bids(vec![state(4, 7), state(5, 4)], vec![]));
    }

    #[test]
    fn a_large_batch_is_split_under_the_payload_limit() {
        let states: Vec<BidState> = (1..=512).map(|id| state(1_000_000_000 + id, 1_000_000)).collect();
        let payloads = encode_bids(&states, &[], 1);
        assert!(payloads.len() > 1);
        let mut decoded = Vec::new();
        for p in &payloads {
            assert!(p.len() < 8000, "{} bytes", p.len());
            let Notice::Bids(states, _) = parse(p).unwrap().notice else { panic!("not bids") };
            decoded.extend(states);
        }
        assert_eq!(decoded, states);
        assert!(encode_bids(&[], &[], 1).is_empty());
    }

    #[test]
    fn inventory_decodes_whole() {
        let payload = r#"{"kind":"inventory","at_us":1,"sku":"A-1","seller_id":1,"title":"apples","available":5,"reserved":2,"version":4}"#;
        let Notice::Inventory(item) = parse(payload).unwrap().notice else { panic!("not inventory") };
        assert_eq!((item.sku.as_str(), item.available, item.reserved, item.version), ("A-1", 5, 2, 4));
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        for payload in [
            "not json",
            r#"{"kind":"spaceship","at_us":1}"#,
            r#"{"kind":"auction","at_us":1,"id":1}"#,
            r#"{"kind":"bids","at_us":1,"states":[[1,2,3]]}"#,
            r#"{"kind":"bids","at_us":1,"states":[[1,2,3,4,5,9223372036854775807]]}"#,
            r#"{"kind":"bids","at_us":1,"states":[[1,2,3,4,5]]}"#,
        ] {
            assert!(parse(payload).is_err(), "{payload}");
        }
    }

    #[test]
    fn outbid_bidders_travel_with_their_auctions_state_but_never_the_leader() {
        let outbid = [
            Outbid { auction_id: 5, bidder: 8 },
            Outbid { auction_id: 5, bidder: 3 },
            Outbid { auction_id: 5, bidder: 8 },
            Outbid { auction_id: 6, bidder: 4 },
        ];
        // Auction 5's newest leader is bidder 3 (state()), who took the lead back.
        let payloads = encode_bids(&[state(5, 2), state(6, 3)], &outbid, 1);
        let Notice::Bids(states, told) = parse(&payloads[0]).unwrap().notice else { panic!("not bids") };
        assert_eq!(states, [state(5, 2), state(6, 3)]);
        assert_eq!(told, [Outbid { auction_id: 5, bidder: 8 }, Outbid { auction_id: 6, bidder: 4 }]);
    }

    #[test]
    fn long_outbid_lists_still_fit_the_payload_limit() {
        let states: Vec<BidState> = (1..=300).map(|id| state(id, 2)).collect();
        let outbid: Vec<Outbid> =
            (1..=300).flat_map(|id| (10..30).map(move |b| Outbid { auction_id: id, bidder: b })).collect();
        let payloads = encode_bids(&states, &outbid, 1);
        assert!(payloads.len() > 1);
        let mut told = 0;
        for p in &payloads {
            assert!(p.len() < 8000, "{} bytes", p.len());
            let Notice::Bids(_, o) = parse(p).unwrap().notice else { panic!("not bids") };
            told += o.len();
        }
        assert_eq!(told, outbid.len());
    }

    #[test]
    fn an_ended_auction_names_its_winner_and_bidders() {
        let payload =
            r#"{"kind":"ended","at_us":3,"auction_id":7,"winner_id":4,"high_bid":150,"version":9,"bidders":[2,4]}"#;
        let ended = Ended { auction_id: 7, winner_id: Some(4), high_bid: Some(150), version: 9, bidders: vec![2, 4] };
        assert_eq!(parse(payload).unwrap().notice, Notice::Ended(ended));
    }
}

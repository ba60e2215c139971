//! The auction lifecycle: scheduled → open at `starts_at` → closed at `ends_at`
//! (pushed out by anti-sniping), and what a bidder must offer next.

use chrono::{DateTime, Duration, Utc};
use serde::Serialize;

use super::FieldError;
use super::money::Amount;

/// Longest anti-sniping extension, in seconds: an hour per late bid is already
/// far more than any real auction uses.
pub const MAX_EXTEND_SECS: i32 = 3600;
/// Longest title, in characters.
pub const MAX_TITLE_CHARS: usize = 200;

/// Where an auction stands: scheduled until `starts_at`, open, closed from `ends_at`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
#[schema(as = AuctionStatus)]
pub enum Status {
    Scheduled,
    Open,
    Closed,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Scheduled => "scheduled",
            Status::Open => "open",
            Status::Closed => "closed",
        }
    }
}

/// An auction's full state as the database last reported it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Auction {
    pub id: i64,
    pub seller_id: i64,
    pub title: String,
    pub reserve: i64,
    pub min_increment: i64,
    pub extend_secs: i32,
    pub high_bid: Option<i64>,
    pub high_bidder: Option<i64>,
    pub bid_count: i64,
    pub starts_at: DateTime<Utc>,
    pub ends_at: DateTime<Utc>,
    /// Set once the database has closed the auction (the lifecycle tick); final.
    pub closed: bool,
    pub winner_id: Option<i64>,
    /// The buy-now price the auction was created with, if any (on offer only
    /// while no bid has reached the reserve: [`Auction::buy_now_offered`]).
    pub buy_now: Option<i64>,
    /// The names of its images, in name order.
    pub images: Vec<String>,
    /// Increases by one with every change to the row.
    pub version: i64,
}

impl Auction {
    /// The status at `now`. Time decides, so a read is right even before the
    /// lifecycle tick has recorded the change.
    pub fn status_at(&self, now: DateTime<Utc>) -> Status {
        if self.closed || now >= self.ends_at {
            Status::Closed
        } else if now >= self.starts_at {
            Status::Open
        } else {
            Status::Scheduled
        }
    }

    /// Whether this state is past its end but not recorded closed: the close may
    /// be committed already and only not heard yet, so a copy held in memory is
    /// no final state to start a watcher from.
    pub fn close_unheard(&self, now: DateTime<Utc>) -> bool {
        !self.closed && now >= self.ends_at
    }

    /// When [`Auction::status_at`] will next differ from what it is at `now`
    /// without the auction changing; `DateTime::MAX_UTC` once closed.
    pub fn status_turns_at(&self, now: DateTime<Utc>) -> DateTime<Utc> {
        match self.status_at(now) {
            Status::Scheduled => self.starts_at,
            Status::Open => self.ends_at,
            Status::Closed => DateTime::<Utc>::MAX_UTC,
        }
    }

    /// The least a bid must offer: the reserve before the first bid, else the high
    /// bid plus the increment.
    pub fn min_next_bid(&self) -> i64 {
        min_next_bid(self.reserve, self.min_increment, self.high_bid)
    }

    pub fn reserve_met(&self) -> bool {
        self.high_bid.is_some_and(|h| h >= self.reserve)
    }

    /// The buy-now price while it is on offer: set, the auction not closed, and no
    /// bid at the reserve yet. A bid of at least this much wins at once.
    pub fn buy_now_offered(&self, now: DateTime<Utc>) -> Option<i64> {
        self.buy_now.filter(|_| !self.reserve_met() && self.status_at(now) != Status::Closed)
    }
}

/// What an accepted bid changes in an auction, and nothing else: the rest of an
/// auction (title, reserve, increment, window start, seller) never changes after
/// it is created, and a bid is only ever accepted while the auction is open. The
/// database announces these once per batch for every auction the batch changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BidState {
    pub auction_id: i64,
    /// The auction's version after the bid.
    pub version: i64,
    pub high_bid: i64,
    pub high_bidder: i64,
    pub bid_count: i64,
    /// Pushed out by anti-sniping, or unchanged (or now, for a buy-now).
    pub ends_at: DateTime<Utc>,
    /// The bid met the buy-now price: the auction closed, and its bidder won.
    pub closed: bool,
    /// The smallest bid the auction takes next.
    pub min_next_bid: i64,
}

/// A bidder whose lead an accepted bid took.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outbid {
    pub auction_id: i64,
    pub bidder: i64,
}

impl Auction {
    /// An open auction for tests: a lamp, reserve 100, increment 10, no bids,
    /// opened in 2023 and ending in 2096.
    #[cfg(test)]
    pub fn sample(id: i64, version: i64) -> Auction {
        use chrono::TimeZone;
        Auction {
            id,
            seller_id: 1,
            title: "lamp".into(),
            reserve: 100,
            min_increment: 10,
            extend_secs: 0,
            high_bid: None,
            high_bidder: None,
            bid_count: 0,
            starts_at: Utc.timestamp_opt(1_700_000_000, 0).unwrap(),
            ends_at: Utc.timestamp_opt(4_000_000_000, 0).unwrap(),
            closed: false,
            winner_id: None,
            buy_now: None,
            images: Vec::new(),
            version,
        }
    }

    /// Applies what an accepted bid changed. The caller checks versions.
    pub fn apply_bid(&mut self, state: &BidState) {
        debug_assert_eq!(self.id, state.auction_id);
        self.version = state.version;
        self.high_bid = Some(state.high_bid);
        self.high_bidder = Some(state.high_bidder);
        self.bid_count = state.bid_count;
        self.ends_at = state.ends_at;
        if state.closed {
            self.closed = true;
            self.winner_id = Some(state.high_bidder);
        }
    }
}

/// See [`Auction::min_next_bid`]; also used for rows that are not a whole auction.
pub fn min_next_bid(reserve: i64, min_increment: i64, high_bid: Option<i64>) -> i64 {
    match high_bid {
        Some(h) => h + min_increment,
        None => reserve,
    }
}

/// The end of an auction after a bid placed at `now`: a bid in the last
/// `extend_secs` seconds pushes the end out by `extend_secs` (anti-sniping).
/// The database applies the same rule in `place_bids`; this is its specification.
pub fn extended_end(ends_at: DateTime<Utc>, extend_secs: i32, now: DateTime<Utc>) -> DateTime<Utc> {
    let window = Duration::seconds(i64::from(extend_secs));
    if extend_secs > 0 && ends_at - now <= window { ends_at + window } else { ends_at }
}

/// A validated request to create an auction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewAuction {
    pub title: String,
    pub reserve: Amount,
    pub min_increment: Amount,
    pub starts_at: DateTime<Utc>,
    pub ends_at: DateTime<Utc>,
    pub extend_secs: i32,
    pub buy_now: Option<Amount>,
}

/// An auction as a seller asks for it, before any check.
#[derive(Debug, Clone, Copy)]
pub struct Draft<'a> {
    pub title: &'a str,
    pub reserve: i64,
    pub min_increment: i64,
    pub starts_at: DateTime<Utc>,
    pub ends_at: DateTime<Utc>,
    pub extend_secs: Option<i64>,
    pub buy_now: Option<i64>,
}

impl NewAuction {
    /// Checks every field and reports all that are wrong at once.
    pub fn parse(draft: &Draft<'_>, now: DateTime<Utc>) -> Result<NewAuction, Vec<FieldError>> {
        let Draft { title, reserve, min_increment, starts_at, ends_at, extend_secs, buy_now } = *draft;
        let mut errors = Vec::new();
        let title = title.trim();
        if title.is_empty() {
            errors.push(FieldError::new("title", "must not be blank"));
        } else if title.chars().count() > MAX_TITLE_CHARS {
            errors.push(FieldError::new("title", "must be at most 200 characters"));
        }
        let reserve_amount = Amount::parse(reserve);
        if reserve_amount.is_none() {
            errors.push(FieldError::new("reserve", "must be a positive amount of minor units, at most 10^12"));
        }
        let increment = Amount::parse(min_increment);
        if increment.is_none() {
            errors.push(FieldError::new("min_increment", "must be a positive amount of minor units, at most 10^12"));
        }
        if ends_at <= starts_at {
            errors.push(FieldError::new("ends_at", "must be after starts_at"));
        } else if ends_at <= now {
            errors.push(FieldError::new("ends_at", "must be in the future"));
        }
        let extend = extend_secs.unwrap_or(0);
        if !(0..=i64::from(MAX_EXTEND_SECS)).contains(&extend) {
            errors.push(FieldError::new("extend_secs", "must be between 0 and 3600"));
        }
        let buy_now = match buy_now.map(|b| (b, Amount::parse(b))) {
            None => None,
            Some((_, None)) => {
                errors.push(FieldError::new("buy_now", "must be a positive amount of minor units, at most 10^12"));
                None
            }
            Some((b, Some(_))) if b < reserve => {
                errors.push(FieldError::new("buy_now", "must be at least the reserve"));
                None
            }
            Some((_, amount)) => amount,
        };
        match (reserve_amount, increment) {
            (Some(reserve), Some(min_increment)) if errors.is_empty() => Ok(NewAuction {
                title: title.to_owned(),
                reserve,
                min_increment,
                starts_at,
                ends_at,
                extend_secs: extend as i32,
                buy_now,
            }),
            _ => Err(errors),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn t(secs: i64) -> DateTime<Utc> {
        Utc.timestamp_opt(1_800_000_000 + secs, 0).unwrap()
    }

    fn auction() -> Auction {
        Auction {
            id: 1,
            seller_id: 2,
            title: "lamp".into(),
            reserve: 1000,
            min_increment: 50,
            extend_secs: 30,
            high_bid: None,
            high_bidder: None,
            bid_count: 0,
            starts_at: t(0),
            ends_at: t(100),
            closed: false,
            winner_id: None,
            buy_now: None,
            images: Vec::new(),
            version: 1,
        }
    }

    fn draft(title: &str, reserve: i64, min_increment: i64, starts_at: i64, ends_at: i64) -> Draft<'_> {
        Draft {
            title,
            reserve,
            min_increment,
            starts_at: t(starts_at),
            ends_at: t(ends_at),
            extend_secs: None,
            buy_now: None,
        }
    }

    #[test]
    fn status_follows_the_clock() {
        let a = auction();
        assert_eq!(a.status_at(t(-1)), Status::Scheduled);
        assert_eq!(a.status_at(t(0)), Status::Open);
        assert_eq!(a.status_at(t(99)), Status::Open);
        assert_eq!(a.status_at(t(100)), Status::Closed);
    }

    #[test]
    fn a_closed_auction_stays_closed() {
        let a = Auction { closed: true, ..auction() };
        assert_eq!(a.status_at(t(50)), Status::Closed);
    }

    #[test]
    fn min_next_bid_is_reserve_then_high_bid_plus_increment() {
        let mut a = auction();
        assert_eq!(a.min_next_bid(), 1000);
        assert!(!a.reserve_met());
        a.high_bid = Some(1200);
        assert_eq!(a.min_next_bid(), 1250);
        assert!(a.reserve_met());
    }

    #[test]
    fn a_bid_state_changes_only_what_a_bid_changes() {
        let mut a = auction();
        a.apply_bid(&BidState {
            auction_id: 1,
            version: 7,
            high_bid: 1500,
            high_bidder: 9,
            bid_count: 3,
            ends_at: t(130),
            closed: false,
            min_next_bid: 1550,
        });
        assert_eq!((a.version, a.high_bid, a.high_bidder, a.bid_count, a.ends_at), (7, Some(1500), Some(9), 3, t(130)));
        assert_eq!((a.title.as_str(), a.reserve, a.min_increment, a.closed), ("lamp", 1000, 50, false));
        assert_eq!(a.min_next_bid(), 1550);
    }

    #[test]
    fn late_bids_extend_the_end_early_ones_do_not() {
        assert_eq!(extended_end(t(100), 30, t(50)), t(100));
        assert_eq!(extended_end(t(100), 30, t(70)), t(130));
        assert_eq!(extended_end(t(100), 30, t(99)), t(130));
        assert_eq!(extended_end(t(100), 0, t(99)), t(100));
    }

    #[test]
    fn new_auction_reports_every_bad_field() {
        let errors =
            NewAuction::parse(&Draft { extend_secs: Some(99_999), ..draft("  ", 0, -1, 10, 5) }, t(0)).unwrap_err();
        let fields: Vec<_> = errors.iter().map(|e| e.field).collect();
        assert_eq!(fields, ["title", "reserve", "min_increment", "ends_at", "extend_secs"]);
    }

    #[test]
    fn new_auction_must_end_in_the_future() {
        let errors = NewAuction::parse(&draft("x", 1, 1, -20, -10), t(0)).unwrap_err();
        assert_eq!(errors, vec![FieldError::new("ends_at", "must be in the future")]);
    }

    #[test]
    fn valid_new_auction_is_trimmed_and_defaults_extension_to_zero() {
        let a = NewAuction::parse(&draft(" lamp ", 100, 10, 0, 60), t(0)).unwrap();
        assert_eq!(a.title, "lamp");
        assert_eq!(a.extend_secs, 0);
        assert_eq!(a.reserve.get(), 100);
    }

    #[test]
    fn overlong_title_is_rejected() {
        let long = "x".repeat(MAX_TITLE_CHARS + 1);
        assert!(NewAuction::parse(&draft(&long, 1, 1, 0, 60), t(0)).is_err());
    }

    #[test]
    fn buy_now_is_at_least_the_reserve_and_offered_until_a_bid_meets_the_reserve() {
        let below = NewAuction::parse(&Draft { buy_now: Some(99), ..draft("lamp", 100, 10, 0, 60) }, t(0));
        assert_eq!(below.unwrap_err().iter().map(|e| e.field).collect::<Vec<_>>(), ["buy_now"]);
        for unpriced in [0, -5, 2_000_000_000_000] {
            let bad = NewAuction::parse(&Draft { buy_now: Some(unpriced), ..draft("lamp", 100, 10, 0, 60) }, t(0));
            assert_eq!(bad.unwrap_err().iter().map(|e| e.field).collect::<Vec<_>>(), ["buy_now"], "{unpriced}");
        }
        let ok = NewAuction::parse(&Draft { buy_now: Some(100), ..draft("lamp", 100, 10, 0, 60) }, t(0)).unwrap();
        assert_eq!(ok.buy_now.map(Amount::get), Some(100));

        let mut a = Auction { buy_now: Some(5000), ..auction() };
        assert_eq!(a.buy_now_offered(t(10)), Some(5000));
        a.high_bid = Some(999);
        assert_eq!(a.buy_now_offered(t(10)), Some(5000), "below the reserve it is still on offer");
        a.high_bid = Some(1000);
        assert_eq!(a.buy_now_offered(t(10)), None, "gone once a bid meets the reserve");
        assert_eq!(Auction { buy_now: Some(5000), ..auction() }.buy_now_offered(t(100)), None, "not after the end");
    }

    #[test]
    fn a_buy_now_bid_state_closes_the_auction_for_its_bidder() {
        let mut a = Auction { buy_now: Some(5000), ..auction() };
        a.apply_bid(&BidState {
            auction_id: 1,
            version: 2,
            high_bid: 5000,
            high_bidder: 9,
            bid_count: 1,
            ends_at: t(20),
            closed: true,
            min_next_bid: 5050,
        });
        assert!(a.closed);
        assert_eq!(a.winner_id, Some(9));
        assert_eq!(a.status_at(t(10)), Status::Closed);
    }
}

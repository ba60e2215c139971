//! Bid checks a core may make on its own.

use super::FieldError;
use super::auction::Auction;
use super::money::Amount;

/// A validated bid: the bidder comes from the token, never from the body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NewBid {
    pub auction_id: i64,
    pub bidder_id: i64,
    pub amount: Amount,
    /// How far the database may bid for this bidder when someone else bids (a
    /// proxy bid); at least `amount`.
    pub max_amount: Option<Amount>,
}

impl NewBid {
    pub fn parse(
        auction_id: i64,
        amount: i64,
        max_amount: Option<i64>,
        bidder_id: i64,
    ) -> Result<NewBid, Vec<FieldError>> {
        const AMOUNT: &str = "must be a positive amount of minor units, at most 10^12";
        let mut errors = Vec::new();
        if auction_id <= 0 {
            errors.push(FieldError::new("auction_id", "must be a positive id"));
        }
        let amount = Amount::parse(amount);
        if amount.is_none() {
            errors.push(FieldError::new("amount", AMOUNT));
        }
        let max = max_amount.map(Amount::parse);
        match (max, amount) {
            (Some(None), _) => errors.push(FieldError::new("max_amount", AMOUNT)),
            (Some(Some(max)), Some(amount)) if max < amount => {
                errors.push(FieldError::new("max_amount", "must be at least amount"))
            }
            _ => {}
        }
        match amount {
            Some(amount) if errors.is_empty() => {
                Ok(NewBid { auction_id, bidder_id, amount, max_amount: max.flatten() })
            }
            _ => Err(errors),
        }
    }

    /// The canonical form of the request, compared when an idempotency key is
    /// reused. A bid without a maximum keeps the form it had before proxy bids.
    pub fn fingerprint(&self) -> String {
        match self.max_amount {
            None => format!("bid:{}:{}", self.auction_id, self.amount.get()),
            Some(max) => format!("bid:{}:{}:{}", self.auction_id, self.amount.get(), max.get()),
        }
    }
}

/// What a core may conclude about a bid from its cache alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LocalVerdict {
    /// Below the cached minimum: the minimum only rises, so a stale cache can only
    /// under-estimate it and this rejection is always right.
    TooLow { min_next_bid: i64 },
    /// The database has recorded the close; a closed auction never reopens.
    Closed,
    /// Only the database can decide.
    AskDatabase,
}

/// Checks a bid against a cached auction. Never accepts: the database decides that.
pub fn check_locally(cached: &Auction, amount: Amount) -> LocalVerdict {
    if cached.closed {
        LocalVerdict::Closed
    } else if amount.get() < cached.min_next_bid() {
        LocalVerdict::TooLow { min_next_bid: cached.min_next_bid() }
    } else {
        LocalVerdict::AskDatabase
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::{TimeZone, Utc};

    fn cached(high_bid: Option<i64>, closed: bool) -> Auction {
        Auction {
            id: 1,
            seller_id: 2,
            title: "t".into(),
            reserve: 500,
            min_increment: 25,
            extend_secs: 0,
            high_bid,
            high_bidder: high_bid.map(|_| 3),
            bid_count: high_bid.map_or(0, |_| 1),
            starts_at: Utc.timestamp_opt(0, 0).unwrap(),
            ends_at: Utc.timestamp_opt(4_000_000_000, 0).unwrap(),
            closed,
            winner_id: None,
            buy_now: None,
            images: Vec::new(),
            version: 1,
        }
    }

    fn amount(v: i64) -> Amount {
        Amount::parse(v).unwrap()
    }

    #[test]
    fn below_the_reserve_is_rejected_locally() {
        assert_eq!(check_locally(&cached(None, false), amount(499)), LocalVerdict::TooLow { min_next_bid: 500 });
        assert_eq!(check_locally(&cached(None, false), amount(500)), LocalVerdict::AskDatabase);
    }

    #[test]
    fn below_high_bid_plus_increment_is_rejected_locally() {
        assert_eq!(check_locally(&cached(Some(600), false), amount(624)), LocalVerdict::TooLow { min_next_bid: 625 });
        assert_eq!(check_locally(&cached(Some(600), false), amount(625)), LocalVerdict::AskDatabase);
    }

    #[test]
    fn a_recorded_close_is_final() {
        assert_eq!(check_locally(&cached(Some(600), true), amount(10_000)), LocalVerdict::Closed);
    }

    #[test]
    fn bid_fields_are_validated() {
        let errors = NewBid::parse(0, 0, None, 1).unwrap_err();
        assert_eq!(errors.len(), 2);
        assert!(NewBid::parse(1, 10, None, 1).is_ok());
    }

    #[test]
    fn a_maximum_is_an_amount_at_least_the_bid() {
        let fields =
            |r: Result<NewBid, Vec<FieldError>>| r.unwrap_err().into_iter().map(|e| e.field).collect::<Vec<_>>();
        assert_eq!(fields(NewBid::parse(1, 10, Some(9), 1)), ["max_amount"]);
        assert_eq!(fields(NewBid::parse(1, 10, Some(0), 1)), ["max_amount"]);
        assert_eq!(fields(NewBid::parse(1, 0, Some(5), 1)), ["amount"]);
        let bid = NewBid::parse(1, 10, Some(10), 1).unwrap();
        assert_eq!(bid.max_amount.map(Amount::get), Some(10));
    }

    #[test]
    fn fingerprint_distinguishes_bodies() {
        let a = NewBid::parse(1, 10, None, 1).unwrap();
        let b = NewBid::parse(1, 11, None, 1).unwrap();
        assert_ne!(a.fingerprint(), b.fingerprint());
        assert_ne!(a.fingerprint(), NewBid::parse(1, 10, Some(20), 1).unwrap().fingerprint());
        assert_eq!(a.fingerprint(), NewBid::parse(1, 10, None, 9).unwrap().fingerprint());
    }
}

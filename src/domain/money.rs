//! Money: an integer count of minor units (cents). Never floating point.

/// Largest amount accepted anywhere: 10^12 minor units (ten billion in major units).
/// Far above any real bid, and far enough below `i64::MAX` that `high_bid +
/// min_increment` can never overflow.
pub const MAX_AMOUNT: i64 = 1_000_000_000_000;

/// A strictly positive amount of minor units, at most [`MAX_AMOUNT`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Amount(i64);

impl Amount {
    pub fn parse(value: i64) -> Option<Amount> {
        (1..=MAX_AMOUNT).contains(&value).then_some(Amount(value))
    }

    pub fn get(self) -> i64 {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn amounts_must_be_positive_and_bounded() {
        assert_eq!(Amount::parse(0), None);
        assert_eq!(Amount::parse(-5), None);
        assert_eq!(Amount::parse(MAX_AMOUNT + 1), None);
        assert_eq!(Amount::parse(1).map(Amount::get), Some(1));
        assert_eq!(Amount::parse(MAX_AMOUNT).map(Amount::get), Some(MAX_AMOUNT));
    }
}

//! Inventory and orders: skus, restocks and order lines.

use std::collections::HashSet;

use super::FieldError;

/// Longest sku.
pub const MAX_SKU_CHARS: usize = 64;
/// Most stock one sku may hold: far above any real shelf, far below overflow.
pub const MAX_STOCK: i64 = 1_000_000_000;
/// Most lines in one order.
pub const MAX_ORDER_LINES: usize = 100;
/// Most units of one line.
pub const MAX_LINE_QUANTITY: i64 = 1_000_000;

/// Whether `sku` is 1–64 characters of `A–Z a–z 0–9 . _ -` (as the database checks).
pub fn valid_sku(sku: &str) -> bool {
    (1..=MAX_SKU_CHARS).contains(&sku.len())
        && sku.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// A validated create-or-restock of one sku.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Restock {
    pub sku: String,
    pub title: String,
    pub available: i64,
}

impl Restock {
    pub fn parse(sku: &str, title: &str, available: i64) -> Result<Restock, Vec<FieldError>> {
        let mut errors = Vec::new();
        if !valid_sku(sku) {
            errors.push(FieldError::new("sku", "must be 1 to 64 characters of A-Z, a-z, 0-9, '.', '_' or '-'"));
        }
        let title = title.trim();
        if title.is_empty() || title.chars().count() > 200 {
            errors.push(FieldError::new("title", "must be 1 to 200 characters"));
        }
        if !(0..=MAX_STOCK).contains(&available) {
            errors.push(FieldError::new("available", "must be between 0 and 10^9"));
        }
        if errors.is_empty() {
            Ok(Restock { sku: sku.to_owned(), title: title.to_owned(), available })
        } else {
            Err(errors)
        }
    }
}

/// A validated order: at least one line, each sku once, positive quantities.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewOrder {
    pub skus: Vec<String>,
    pub quantities: Vec<i64>,
}

impl NewOrder {
    pub fn parse<'a>(lines: impl IntoIterator<Item = (&'a str, i64)>) -> Result<NewOrder, Vec<FieldError>> {
        let mut errors = Vec::new();
        let mut seen = HashSet::new();
        let (mut skus, mut quantities) = (Vec::new(), Vec::new());
        for (sku, quantity) in lines {
            if !valid_sku(sku) {
                push_once(&mut errors, FieldError::new("lines.sku", "must be a valid sku"));
            } else if !seen.insert(sku) {
                push_once(&mut errors, FieldError::new("lines.sku", "each sku may appear in one line only"));
            }
            if !(1..=MAX_LINE_QUANTITY).contains(&quantity) {
                push_once(&mut errors, FieldError::new("lines.quantity", "must be between 1 and 10^6"));
            }
            skus.push(sku.to_owned());
            quantities.push(quantity);
        }
        if skus.is_empty() {
            errors.push(FieldError::new("lines", "must hold at least one line"));
        } else if skus.len() > MAX_ORDER_LINES {
            errors.push(FieldError::new("lines", "must hold at most 100 lines"));
        }
        if errors.is_empty() { Ok(NewOrder { skus, quantities }) } else { Err(errors) }
    }

    /// The canonical form of the order, compared when an idempotency key is reused.
    pub fn fingerprint(&self) -> String {
        let mut lines: Vec<String> = self.skus.iter().zip(&self.quantities).map(|(s, q)| format!("{s}={q}")).collect();
        lines.sort();
        format!("order:{}", lines.join(","))
    }
}

fn push_once(errors: &mut Vec<FieldError>, error: FieldError) {
    if !errors.contains(&error) {
        errors.push(error);
    }
}

/// Where an order stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum OrderStatus {
    Reserved,
    Cancelled,
    Fulfilled,
}

impl OrderStatus {
    pub fn parse(s: &str) -> Option<OrderStatus> {
        match s {
            "reserved" => Some(OrderStatus::Reserved),
            "cancelled" => Some(OrderStatus::Cancelled),
            "fulfilled" => Some(OrderStatus::Fulfilled),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn skus_are_short_and_plain() {
        assert!(valid_sku("APPLE-1.kg_x"));
        assert!(!valid_sku(""));
        assert!(!valid_sku("bad sku"));
        assert!(!valid_sku(&"x".repeat(65)));
        assert!(valid_sku(&"x".repeat(64)));
    }

    #[test]
    fn restock_reports_each_bad_field() {
        let errors = Restock::parse("bad sku", " ", -1).unwrap_err();
        let fields: Vec<_> = errors.iter().map(|e| e.field).collect();
        assert_eq!(fields, ["sku", "title", "available"]);
        assert_eq!(Restock::parse("A1", " Apples ", 0).unwrap().title, "Apples");
    }

    #[test]
    fn orders_need_lines_unique_skus_and_positive_quantities() {
        assert!(NewOrder::parse([]).is_err());
        assert!(NewOrder::parse([("A", 0)]).is_err());
        assert!(NewOrder::parse([("A", 1), ("A", 2)]).is_err());
        let o = NewOrder::parse([("B", 2), ("A", 1)]).unwrap();
        assert_eq!(o.skus, ["B", "A"]);
    }

    #[test]
    fn fingerprint_ignores_line_order() {
        let a = NewOrder::parse([("B", 2), ("A", 1)]).unwrap();
        let b = NewOrder::parse([("A", 1), ("B", 2)]).unwrap();
        let c = NewOrder::parse([("A", 1), ("B", 3)]).unwrap();
        assert_eq!(a.fingerprint(), b.fingerprint());
        assert_ne!(a.fingerprint(), c.fingerprint());
    }
}

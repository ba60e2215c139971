//! Pure rules: money, the auction lifecycle, bid checks. No I/O, no clocks read here:
//! callers pass the time in, so every rule is a plain function with unit tests.

pub mod account;
pub mod auction;
pub mod bid;
pub mod image;
pub mod money;
pub mod stock;

/// One invalid field of a request, reported back to the client in a 422 problem.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, utoipa::ToSchema)]
pub struct FieldError {
    pub field: &'static str,
    pub message: &'static str,
}

impl FieldError {
    pub const fn new(field: &'static str, message: &'static str) -> Self {
        FieldError { field, message }
    }
}

//! Keyset pagination, as every list of the API does it: a page of items and the
//! key to pass as `after` for the next one.

use serde::Serialize;
use utoipa::openapi::schema::{ObjectBuilder, OneOfBuilder, Schema, Type};
use utoipa::{PartialSchema, ToSchema};

use super::error::{Error, Result};

/// Largest page a list returns.
pub const MAX_PAGE: i64 = 100;
/// Page size when `limit` is not given.
pub const DEFAULT_PAGE: i64 = 20;

/// One page of a keyset-paginated list.
#[derive(Serialize, ToSchema)]
pub struct Page<T, A> {
    pub items: Vec<T>,
    /// Pass as `after` to get the next page; null on the last page.
    // utoipa drops the null from an `Option` of a type parameter, so say it here.
    #[schema(schema_with = nullable::<A>)]
    pub next_after: Option<A>,
}

/// `A`'s schema, or null.
fn nullable<A: PartialSchema>() -> Schema {
    OneOfBuilder::new().item(A::schema()).item(ObjectBuilder::new().schema_type(Type::Null)).into()
}

/// The page size a list asks for: `limit`, or the default; 422 out of range.
pub fn page_limit(limit: Option<i64>) -> Result<i64> {
    match limit {
        None => Ok(DEFAULT_PAGE),
        Some(n) if (1..=MAX_PAGE).contains(&n) => Ok(n),
        Some(_) => Err(Error::InvalidQuery(format!("limit must be between 1 and {MAX_PAGE}"))),
    }
}

//! Keyset pagination, as every list of the API does it: a page of items and the
//! key to pass as `after` for the next one.

use serde::{Deserialize, Serialize};
use utoipa::openapi::schema::{ObjectBuilder, OneOfBuilder, Schema, Type};
use utoipa::{IntoParams, PartialSchema, ToSchema};

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

impl<T> Page<T, i64> {
    /// A page of rows listed newest first by id: a full page names its last id
    /// as the next page's `after`.
    pub fn newest_first(items: Vec<T>, limit: i64, id: impl Fn(&T) -> i64) -> Self {
        let next_after = (items.len() as i64 == limit).then(|| items.last().map(id)).flatten();
        Page { items, next_after }
    }
}

/// The query of a list newest first by id.
#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct NewestFirst {
    /// The `next_after` of the previous page: rows older than it.
    pub after: Option<i64>,
    /// Page size, 1 to 100; 20 when not given.
    pub limit: Option<i64>,
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

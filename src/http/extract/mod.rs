//! Extractors that turn every bad input into the right problem: the JSON body
//! ([`json`]), the caller ([`auth`]) and their address ([`client`]), and the
//! path, query and header parameters ([`params`]).

mod auth;
mod client;
mod json;
mod params;

pub use auth::{Bidder, Caller, CallerProblems, RoleProblems, SESSION_COOKIE, Seller};
pub use client::ClientAddr;
pub use json::{Json, JsonProblems, SIMD_JSON_MIN_BYTES, parse, parse_with_serde_json, parse_with_simd_json};
pub use params::{Id, IdempotencyKey, IfNoneMatch, MAX_IDEMPOTENCY_KEY, Params, QueryProblems, ReadQuery, SkuPath};

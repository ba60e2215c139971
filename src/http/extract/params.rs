//! Path, query and header parameters.

use std::collections::BTreeMap;

use axum::extract::{FromRequestParts, Path, Query};
use axum::http::request::Parts;
use axum::http::{StatusCode, header};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use utoipa::openapi::path::{Parameter, ParameterBuilder, ParameterIn};
use utoipa::openapi::schema::{KnownFormat, ObjectBuilder, SchemaFormat, Type};
use utoipa::openapi::{RefOr, Required, Response};
use utoipa::{IntoParams, IntoResponses};

use crate::http::error::{Error, problem_responses};

/// Longest accepted `Idempotency-Key`.
pub const MAX_IDEMPOTENCY_KEY: usize = 255;

/// `?consistent=true`: read the database, not the core's cache.
#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ReadQuery {
    /// Read the database rather than this core's cache, which may lag it briefly.
    #[serde(default)]
    pub consistent: bool,
}

/// The `Idempotency-Key` header, if sent: 422 if empty, over 255 characters or not
/// visible ASCII.
pub struct IdempotencyKey(pub Option<String>);

impl<S: Send + Sync> FromRequestParts<S> for IdempotencyKey {
    type Rejection = Error;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Error> {
        let Some(value) = parts.headers.get("idempotency-key") else {
            return Ok(IdempotencyKey(None));
        };
        let bytes = value.as_bytes();
        if bytes.is_empty() || bytes.len() > MAX_IDEMPOTENCY_KEY || !bytes.iter().all(|b| b.is_ascii_graphic()) {
            return Err(Error::InvalidIdempotencyKey);
        }
        Ok(IdempotencyKey(Some(String::from_utf8_lossy(bytes).into_owned())))
    }
}

impl IntoParams for IdempotencyKey {
    fn into_params(_: impl Fn() -> Option<ParameterIn>) -> Vec<Parameter> {
        let key =
            ObjectBuilder::new().schema_type(Type::String).min_length(Some(1)).max_length(Some(MAX_IDEMPOTENCY_KEY));
        let description = "Makes a retry safe: a repeat with the same key and request answers as the first did";
        vec![
            ParameterBuilder::new()
                .name("Idempotency-Key")
                .parameter_in(ParameterIn::Header)
                .required(Required::False)
                .description(Some(description))
                .schema(Some(key))
                .build(),
        ]
    }
}

/// The `If-None-Match` header, if sent: a read whose ETag it names is answered
/// 304 (see [`super::respond::cached`]).
pub struct IfNoneMatch(pub Option<header::HeaderValue>);

impl<S: Send + Sync> FromRequestParts<S> for IfNoneMatch {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        Ok(IfNoneMatch(crate::http::respond::if_none_match(&parts.headers)))
    }
}

impl IntoParams for IfNoneMatch {
    fn into_params(_: impl Fn() -> Option<ParameterIn>) -> Vec<Parameter> {
        let description = "ETags the client holds: when one is the current version's, the answer is 304 with no body";
        vec![
            ParameterBuilder::new()
                .name("If-None-Match")
                .parameter_in(ParameterIn::Header)
                .required(Required::False)
                .description(Some(description))
                .schema(Some(ObjectBuilder::new().schema_type(Type::String)))
                .build(),
        ]
    }
}

/// A sku from the path. One that cannot even be decoded (not UTF-8) is a 422
/// naming the field, like any other invalid sku — never axum's plain-text 400.
pub struct SkuPath(pub String);

impl<S: Send + Sync> FromRequestParts<S> for SkuPath {
    type Rejection = Error;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Error> {
        Path::<String>::from_request_parts(parts, state).await.map(|Path(sku)| SkuPath(sku)).map_err(|_| {
            Error::Validation(vec![crate::domain::FieldError::new(
                "sku",
                "must be 1 to 64 characters of A-Z, a-z, 0-9, '.', '_' or '-'",
            )])
        })
    }
}

/// A numeric id from the path; anything else is 404 (no resource has that id).
pub struct Id(pub i64);

impl<S: Send + Sync> FromRequestParts<S> for Id {
    type Rejection = Error;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Error> {
        match Path::<i64>::from_request_parts(parts, state).await {
            Ok(Path(id)) if id > 0 => Ok(Id(id)),
            _ => Err(Error::NotFound("no resource has this id")),
        }
    }
}

impl IntoParams for Id {
    fn into_params(_: impl Fn() -> Option<ParameterIn>) -> Vec<Parameter> {
        let id = ObjectBuilder::new()
            .schema_type(Type::Integer)
            .format(Some(SchemaFormat::KnownFormat(KnownFormat::Int64)))
            .minimum(Some(1));
        vec![
            ParameterBuilder::new()
                .name("id")
                .parameter_in(ParameterIn::Path)
                .required(Required::True)
                .description(Some("The resource's id; anything but a positive integer is 404"))
                .schema(Some(id))
                .build(),
        ]
    }
}

/// Query parameters: 422 with the reason when they do not parse.
pub struct Params<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequestParts<S> for Params<T> {
    type Rejection = Error;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Error> {
        Query::<T>::from_request_parts(parts, state)
            .await
            .map(|Query(q)| Params(q))
            .map_err(|e| Error::InvalidQuery(e.body_text()))
    }
}

/// What [`Params`] answers, for the API document.
pub struct QueryProblems;

impl IntoResponses for QueryProblems {
    fn responses() -> BTreeMap<String, RefOr<Response>> {
        problem_responses(&[(
            StatusCode::UNPROCESSABLE_ENTITY,
            "A query parameter is unknown, of the wrong type or out of range",
        )])
    }
}

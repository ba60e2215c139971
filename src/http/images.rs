//! Item images: the seller uploads and deletes them, anyone reads them.
//!
//! The bytes go to the object store (`crate::storage`) as they arrive, under a
//! key of their own per upload; only once the store has them all does a row
//! name them (`db::images`), so a failed upload leaves neither an object nor a
//! row. The auction's representation lists its images by name.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use http_body_util::BodyExt;
use serde::Serialize;
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::error::{Error, PROBLEM_JSON, Problem, Result, ServerProblems};
use super::extract::{IfNoneMatch, RoleProblems, Seller};
use super::respond;
use crate::core::Core;
use crate::db::{self, images::Access, images::Deleted, images::Image, images::Put};
use crate::domain::FieldError;
use crate::domain::image::{ImageType, valid_name};
use crate::storage::Upload;

pub(crate) fn router() -> OpenApiRouter<Arc<Core>> {
    OpenApiRouter::default().routes(routes!(get_image, put_image, delete_image))
}

/// An image's place: its auction and its name.
#[derive(IntoParams)]
#[into_params(parameter_in = Path)]
struct ImagePath {
    /// The auction's id; anything but a positive integer is 404.
    id: i64,
    /// The image's name: 1 to 100 of A-Z, a-z, 0-9, `.`, `_` or `-`, starting
    /// with a letter or digit.
    name: String,
}

/// An id that is no positive integer reads as 0, which names no auction:
/// handlers answer 404, never axum's plain-text 400.
impl<S: Send + Sync> axum::extract::FromRequestParts<S> for ImagePath {
    type Rejection = Error;

    async fn from_request_parts(parts: &mut axum::http::request::Parts, state: &S) -> Result<Self> {
        let Path((id, name)) = Path::<(String, String)>::from_request_parts(parts, state)
            .await
            .map_err(|_| Error::NotFound("no image of this name"))?;
        Ok(ImagePath { id: id.parse().ok().filter(|id| *id > 0).unwrap_or(0), name })
    }
}

impl ImagePath {
    /// The path, if it can name an image at all.
    fn valid(&self) -> bool {
        self.id > 0 && valid_name(&self.name)
    }
}

/// A stored image, as its upload answers it.
#[derive(Serialize, ToSchema)]
struct StoredImage<'a> {
    auction_id: i64,
    name: &'a str,
    content_type: &'static str,
    size: u64,
}

/// The bytes of an image, as a body.
#[derive(ToSchema)]
#[schema(value_type = String, format = Binary)]
struct ImageBytes(#[allow(dead_code)] Vec<u8>);

/// Uploads an image of the seller's auction, or replaces the one of that name.
///
/// The body is the image's bytes, declared by `Content-Type` and checked by
/// their first bytes: JPEG, PNG or WebP, at most `--image-max-bytes` (5 MiB).
/// An auction has at most 10 images. The bytes go to the store as they arrive;
/// a failed upload leaves nothing behind, and a replaced image keeps being
/// served until its replacement is stored whole.
#[utoipa::path(
    put, path = "/api/auctions/{id}/images/{name}", tag = "auctions",
    params(ImagePath),
    request_body(content(
        (ImageBytes = "image/jpeg"), (ImageBytes = "image/png"), (ImageBytes = "image/webp")
    )),
    security(("bearer" = []), ("cookie" = [])),
    responses(
        (status = 201, description = "Stored", body = StoredImage),
        (status = 200, description = "Replaced the image of this name", body = StoredImage),
        RoleProblems, ServerProblems,
        (status = 403, description = "Not a seller, or another seller's auction", body = Problem,
         content_type = PROBLEM_JSON),
        (status = 404, description = "No such auction", body = Problem, content_type = PROBLEM_JSON),
        (status = 409, description = "The auction has 10 images already", body = Problem, content_type = PROBLEM_JSON),
        (status = 413, description = "Larger than --image-max-bytes", body = Problem, content_type = PROBLEM_JSON),
        (status = 415, description = "Not a JPEG, PNG or WebP image, by Content-Type or by its bytes", body = Problem,
         content_type = PROBLEM_JSON),
        (status = 422, description = "An invalid image name", body = Problem, content_type = PROBLEM_JSON),
    )
)]
async fn put_image(
    State(core): State<Arc<Core>>,
    Seller(seller): Seller,
    path: ImagePath,
    headers: HeaderMap,
    body: Body,
) -> Result<Response> {
    if path.id <= 0 {
        return Err(Error::NotFound("no auction has this id"));
    }
    if !valid_name(&path.name) {
        let rule = "must be 1 to 100 of A-Z, a-z, 0-9, '.', '_' or '-', starting with a letter or digit";
        return Err(Error::Validation(vec![FieldError::new("name", rule)]));
    }
    let declared = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(ImageType::declared)
        .ok_or(Error::UnsupportedImage("the body must be image/jpeg, image/png or image/webp"))?;
    let max = core.images.max_bytes;
    let too_large = || Error::PayloadTooLarge(max.try_into().unwrap_or(usize::MAX));
    let length = headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if length.is_some_and(|l| l > max) {
        return Err(too_large());
    }
    refuse(db::images::access(&core.pool(), path.id, seller.account_id, &path.name).await?)?;

    let _turn = core.images.uploads.acquire().await.map_err(|_| Error::Overloaded)?;
    let key = object_store::path::Path::from_iter([
        "auctions".to_owned(),
        path.id.to_string(),
        path.name.clone(),
        uuid::Uuid::new_v4().to_string(),
    ]);
    let mut upload = core.images.store.upload(&key, declared.content_type()).await?;
    let size = stream_into(&mut upload, body, declared, max).await?;
    // The bytes are all here. What is left runs to its end on a task of its
    // own, even if this request is dropped now (the client gone, the request
    // timeout): completing the object, recording it, deleting what it replaced
    // or what no row will name.
    let image =
        Image { content_type: declared.content_type().to_owned(), size: size as i64, object_key: key.to_string() };
    let (core2, name, seller) = (core.clone(), path.name.clone(), seller.account_id);
    let settled = tokio::spawn(async move { settle(&core2, upload, path.id, seller, &name, &image, key).await });
    let status = settled.await.map_err(|e| Error::Internal(format!("an image upload's task failed: {e}")))??;
    let stored = StoredImage { auction_id: path.id, name: &path.name, content_type: declared.content_type(), size };
    let mut response = respond::json(status, &stored);
    let location = format!("/api/auctions/{}/images/{}", path.id, path.name);
    if let Ok(location) = HeaderValue::try_from(location) {
        response.headers_mut().insert(header::LOCATION, location);
    }
    Ok(response)
}

/// Completes an upload of image `name` to `key` and records it: the status to
/// answer, or the problem. Whatever fails, no object is left that no row names.
async fn settle(
    core: &Core,
    upload: Upload,
    auction: i64,
    seller: i64,
    name: &str,
    image: &Image,
    key: object_store::path::Path,
) -> Result<StatusCode> {
    upload.finish().await?;
    let store = &core.images.store;
    match db::images::put(&core.pool(), auction, seller, name, image).await {
        Ok(Put::Stored { replaced: None }) => Ok(StatusCode::CREATED),
        Ok(Put::Stored { replaced: Some(old) }) => {
            store.discard(&object_store::path::Path::from(old)).await;
            Ok(StatusCode::OK)
        }
        Ok(Put::Refused(access)) => {
            store.discard(&key).await;
            Err(refuse(access).expect_err("a refusal"))
        }
        Err(e) => {
            store.discard(&key).await;
            Err(e.into())
        }
    }
}

/// The answer to an access check: nothing when granted.
fn refuse(access: Access) -> Result<()> {
    match access {
        Access::Granted => Ok(()),
        Access::NoAuction => Err(Error::NotFound("no auction has this id")),
        Access::NotOwner => Err(Error::Forbidden("another seller's auction")),
        Access::Full => Err(Error::TooManyImages),
    }
}

/// Sends `body` to `upload` as it arrives: its first bytes must be an image of
/// the `declared` type, and all of it at most `max` bytes. Returns its size.
async fn stream_into(upload: &mut Upload, mut body: Body, declared: ImageType, max: u64) -> Result<u64> {
    // Held back until there are enough to tell the format.
    let mut head = Vec::with_capacity(ImageType::SNIFF_LEN);
    let mut size = 0u64;
    let mut sniffed = false;
    let checked = |head: &[u8]| match ImageType::sniff(head) {
        Some(found) if found == declared => Ok(()),
        _ => Err(Error::UnsupportedImage("the bytes are not an image of the declared Content-Type")),
    };
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| Error::InvalidBody(format!("the body could not be read: {e}")))?;
        let Ok(bytes) = frame.into_data() else { continue };
        size += bytes.len() as u64;
        if size > max {
            return Err(Error::PayloadTooLarge(max.try_into().unwrap_or(usize::MAX)));
        }
        if sniffed {
            upload.write(bytes).await?;
            continue;
        }
        head.extend_from_slice(&bytes);
        if head.len() >= ImageType::SNIFF_LEN {
            checked(&head)?;
            sniffed = true;
            upload.write(std::mem::take(&mut head).into()).await?;
        }
    }
    if !sniffed {
        checked(&head)?;
        upload.write(head.into()).await?;
    }
    Ok(size)
}

/// Reads an image: streamed from the store, or, where the store signs URLs (the
/// clouds'), a redirect to one valid for 5 minutes.
#[utoipa::path(
    get, path = "/api/auctions/{id}/images/{name}", tag = "auctions",
    params(ImagePath, IfNoneMatch),
    responses(
        (status = 200, description = "The image", content(
            (ImageBytes = "image/jpeg"), (ImageBytes = "image/png"), (ImageBytes = "image/webp")
        ), headers(("ETag" = String, description = "Changes when the image is replaced"))),
        (status = 304, description = "If-None-Match names the current image"),
        (status = 307, description = "The store's signed URL of the image", headers(
            ("Location" = String, description = "A URL that reads the image for 5 minutes"),
        )),
        ServerProblems,
        (status = 404, description = "No such auction or image", body = Problem, content_type = PROBLEM_JSON),
    )
)]
async fn get_image(State(core): State<Arc<Core>>, path: ImagePath, IfNoneMatch(tags): IfNoneMatch) -> Result<Response> {
    const NO_IMAGE: Error = Error::NotFound("no image of this name");
    if !path.valid() {
        return Err(NO_IMAGE);
    }
    let image = db::images::get(&core.pool(), path.id, &path.name).await?.ok_or(NO_IMAGE)?;
    let key = object_store::path::Path::from(image.object_key.as_str());
    // Each upload has a key of its own, ending in its id.
    let etag = HeaderValue::try_from(format!("\"{}\"", key.filename().unwrap_or_default()))
        .map_err(|e| Error::Internal(e.to_string()))?;
    if tags.as_ref().is_some_and(|t| respond::names(t, &etag)) {
        return Ok((StatusCode::NOT_MODIFIED, [(header::ETAG, etag)]).into_response());
    }
    if let Some(url) = core.images.store.signed_url(&key).await {
        let location = HeaderValue::try_from(url.as_str()).map_err(|e| Error::Internal(e.to_string()))?;
        return Ok((StatusCode::TEMPORARY_REDIRECT, [(header::LOCATION, location)]).into_response());
    }
    let object = core.images.store.read(&key).await.map_err(|e| match e {
        // Replaced or deleted since the row was read.
        object_store::Error::NotFound { .. } => NO_IMAGE,
        other => other.into(),
    })?;
    let content_type = HeaderValue::try_from(image.content_type).map_err(|e| Error::Internal(e.to_string()))?;
    let headers = [
        (header::CONTENT_TYPE, content_type),
        (header::CONTENT_LENGTH, HeaderValue::from(image.size)),
        (header::ETAG, etag),
        (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
    ];
    Ok((headers, Body::from_stream(object.into_stream())).into_response())
}

/// Deletes an image of the seller's auction.
#[utoipa::path(
    delete, path = "/api/auctions/{id}/images/{name}", tag = "auctions",
    params(ImagePath),
    security(("bearer" = []), ("cookie" = [])),
    responses(
        (status = 204, description = "Deleted"),
        RoleProblems, ServerProblems,
        (status = 403, description = "Not a seller, or another seller's auction", body = Problem,
         content_type = PROBLEM_JSON),
        (status = 404, description = "No such auction or image", body = Problem, content_type = PROBLEM_JSON),
    )
)]
async fn delete_image(State(core): State<Arc<Core>>, Seller(seller): Seller, path: ImagePath) -> Result<Response> {
    if !path.valid() {
        return Err(Error::NotFound("no image of this name"));
    }
    match db::images::delete(&core.pool(), path.id, seller.account_id, &path.name).await? {
        Deleted::Gone(key) => {
            core.images.store.discard(&object_store::path::Path::from(key)).await;
            Ok(StatusCode::NO_CONTENT.into_response())
        }
        Deleted::NoImage => Err(Error::NotFound("no image of this name")),
        Deleted::Refused(access) => refuse(access).map(|()| StatusCode::NO_CONTENT.into_response()),
    }
}

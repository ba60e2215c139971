//! Liveness and readiness.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::error::{Error, PROBLEM_JSON, Problem, Result};
use super::respond;
use crate::core::Core;

/// How long `/ready` waits for the database to answer.
const DB_CHECK_TIMEOUT: Duration = Duration::from_secs(1);

pub(crate) fn router() -> OpenApiRouter<Arc<Core>> {
    OpenApiRouter::default().routes(routes!(get_health)).routes(routes!(get_ready))
}

#[derive(serde::Serialize, utoipa::ToSchema)]
#[schema(as = Health)]
struct Status {
    status: &'static str,
}

/// 200 while the process runs.
#[utoipa::path(
    get, path = "/health", tag = "health",
    responses((status = 200, description = "The process runs", body = Status)),
)]
async fn get_health() -> Response {
    respond::json(StatusCode::OK, &Status { status: "ok" })
}

/// Readiness.
///
/// 200 when every core serves and the database answers; 503 while starting or
/// draining.
#[utoipa::path(
    get, path = "/ready", tag = "health",
    responses(
        (status = 200, description = "Every core serves and the database answers", body = Status),
        (status = 503, description = "Starting, draining, or the database does not answer", body = Problem,
         content_type = PROBLEM_JSON),
    )
)]
async fn get_ready(State(core): State<Arc<Core>>) -> Result<Response> {
    if core.health.is_draining() {
        return Err(Error::NotReady("the server is shutting down"));
    }
    if !core.health.all_serving() {
        return Err(Error::NotReady("not every core serves yet"));
    }
    let pool = core.pool();
    let ping = sqlx::query_scalar!("select 1 as one").fetch_one(&pool);
    match tokio::time::timeout(DB_CHECK_TIMEOUT, ping).await {
        Ok(Ok(_)) => Ok(respond::json(StatusCode::OK, &Status { status: "ready" })),
        _ => Err(Error::NotReady("the database does not answer")),
    }
}

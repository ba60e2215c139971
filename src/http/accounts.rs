//! Accounts and sessions (log-in).

use std::sync::Arc;

use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::Response;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::error::{Error, PROBLEM_JSON, Problem, Result, ServerProblems};
use super::extract::{Json, JsonProblems, SESSION_COOKIE};
use super::respond;
use crate::auth::{self, Role};
use crate::core::Core;
use crate::db::{self, accounts::CreateError};
use crate::domain::account::NewAccount;

pub(crate) fn router() -> OpenApiRouter<Arc<Core>> {
    OpenApiRouter::default().routes(routes!(create_account)).routes(routes!(create_session))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct Register {
    email: String,
    password: String,
    /// `bidder` or `seller`.
    role: String,
}

#[derive(Serialize, ToSchema)]
#[schema(as = Account)]
struct AccountView {
    id: i64,
    email: String,
    role: String,
    created_at: DateTime<Utc>,
}

/// Runs `work` (password hashing) on a blocking thread, at most
/// [`crate::core::HASHES_PER_CORE`] at a time per core, so it never stalls the
/// core's other requests.
async fn off_core<T: Send + 'static>(core: &Core, work: impl FnOnce() -> T + Send + 'static) -> Result<T> {
    let _permit = core.hashing.acquire().await.map_err(|_| Error::Overloaded)?;
    tokio::task::spawn_blocking(work).await.map_err(|e| Error::Internal(format!("password hashing failed: {e}")))
}

/// Registers an account; anyone may.
#[utoipa::path(
    post, path = "/api/accounts", tag = "accounts",
    request_body = Register,
    responses(
        (status = 201, description = "Registered", body = AccountView),
        JsonProblems, ServerProblems,
        (status = 409, description = "An account with this e-mail address exists", body = Problem,
         content_type = PROBLEM_JSON),
        (status = 422, description = "The body has the wrong shape, or invalid field values (listed in `errors`)",
         body = Problem, content_type = PROBLEM_JSON),
    )
)]
async fn create_account(State(core): State<Arc<Core>>, Json(body): Json<Register>) -> Result<Response> {
    let new = NewAccount::parse(&body.email, &body.password, &body.role).map_err(Error::Validation)?;
    let password = new.password.clone();
    let hash = off_core(&core, move || auth::hash_password(&password)).await?;
    let account = db::accounts::insert(&core.pool, &new.email, &hash, new.role).await.map_err(|e| match e {
        CreateError::EmailTaken => Error::EmailTaken,
        CreateError::Db(db) => db.into(),
    })?;
    let view = AccountView { id: account.id, email: account.email, role: account.role, created_at: account.created_at };
    Ok(respond::json(StatusCode::CREATED, &view))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct LogIn {
    email: String,
    password: String,
}

/// A session: its token goes in `Authorization: Bearer`, or rides in the cookie.
#[derive(Serialize, ToSchema)]
struct Session {
    token: String,
    expires_at: DateTime<Utc>,
    account_id: i64,
    role: Role,
}

/// Logs in.
///
/// Wrong password and unknown e-mail get the same answer, after the same work.
#[utoipa::path(
    post, path = "/api/sessions", tag = "accounts",
    request_body = LogIn,
    responses(
        (status = 200, description = "Logged in", body = Session, headers(
            ("Set-Cookie" = String, description = "The session cookie, `gavel_session`, holding the same token"),
        )),
        JsonProblems, ServerProblems,
        (status = 401, description = "The e-mail address or password is wrong", body = Problem,
         content_type = PROBLEM_JSON),
    )
)]
async fn create_session(State(core): State<Arc<Core>>, Json(body): Json<LogIn>) -> Result<Response> {
    let found = db::accounts::credentials(&core.pool, &body.email).await?;
    let stored = found.as_ref().map(|c| c.password_hash.clone());
    let password = body.password;
    let verified = off_core(&core, move || auth::verify_password(&password, stored.as_deref())).await?;
    let account = match found {
        Some(account) if verified => account,
        _ => return Err(Error::InvalidCredentials),
    };
    let role = Role::parse(&account.role).ok_or_else(|| Error::Internal(format!("unknown role {}", account.role)))?;
    let ttl = core.limits.session_ttl;
    let (token, exp) = core.keys.mint(account.id, role, ttl);
    let expires_at = DateTime::from_timestamp(exp as i64, 0).unwrap_or_else(Utc::now);
    let cookie =
        format!("{SESSION_COOKIE}={token}; Path=/; Max-Age={}; HttpOnly; Secure; SameSite=Strict", ttl.as_secs());
    let mut response = respond::json(StatusCode::OK, &Session { token, expires_at, account_id: account.id, role });
    let cookie = HeaderValue::try_from(cookie).map_err(|e| Error::Internal(e.to_string()))?;
    response.headers_mut().insert(header::SET_COOKIE, cookie);
    response.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok(response)
}

//! Accounts and sessions (log-in).

use std::sync::Arc;

use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::error::{Error, PROBLEM_JSON, Problem, RateLimitProblems, Result, ServerProblems};
use super::extract::{Caller, CallerProblems, ClientAddr, Json, JsonProblems, SESSION_COOKIE};
use super::respond;
use crate::auth::{self, Grant, Role};
use crate::core::Core;
use crate::db::notice::SessionEnd;
use crate::db::{self, accounts::CreateError};
use crate::domain::account::{NewAccount, check_password};
use crate::throttle::Attempt;

pub(crate) fn router() -> OpenApiRouter<Arc<Core>> {
    OpenApiRouter::default()
        .routes(routes!(create_account))
        .routes(routes!(create_session))
        .routes(routes!(end_session))
        .routes(routes!(change_password))
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

/// Runs `work`, a password check, off the core like [`off_core`], as an attempt
/// to log in to `account` from `address`: refused past the failed log-in
/// limits, and counted as a failure unless the caller says it succeeded. The
/// attempt is claimed once the core's turn to hash has come, so one that waits
/// for it (and perhaps times out) is never charged.
async fn checked<T: Send + 'static>(
    core: &Core,
    account: &str,
    address: Option<std::net::IpAddr>,
    work: impl FnOnce() -> T + Send + 'static,
) -> Result<(Attempt, T)> {
    let _permit = core.hashing.acquire().await.map_err(|_| Error::Overloaded)?;
    let attempt = core.throttles.log_in.attempt(account, address).map_err(Error::RateLimited)?;
    let done = tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| Error::Internal(format!("password hashing failed: {e}")))?;
    Ok((attempt, done))
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
    let account = db::accounts::insert(&core.pool(), &new.email, &hash, new.role).await.map_err(|e| match e {
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
/// Failed log-ins are limited per account and per client address, for the
/// whole server (`--login-failures-per-account`, `--login-failures-per-address`,
/// `--login-failure-window`): past a limit, 429, right password or not.
#[utoipa::path(
    post, path = "/api/sessions", tag = "accounts",
    request_body = LogIn,
    responses(
        (status = 200, description = "Logged in", body = Session, headers(
            ("Set-Cookie" = String, description = "The session cookie, `gavel_session`, holding the same token"),
        )),
        JsonProblems, ServerProblems, RateLimitProblems,
        (status = 401, description = "The e-mail address or password is wrong", body = Problem,
         content_type = PROBLEM_JSON),
    )
)]
async fn create_session(
    State(core): State<Arc<Core>>,
    ClientAddr(address): ClientAddr,
    Json(body): Json<LogIn>,
) -> Result<Response> {
    // Read first, so that a database outage charges nobody a failure.
    let found = db::accounts::credentials(&core.pool(), &body.email).await?;
    let stored = found.as_ref().map(|c| c.password_hash.clone());
    let password = body.password;
    let (attempt, verified) =
        checked(&core, &body.email, address, move || auth::verify_password(&password, stored.as_deref())).await?;
    let account = match found {
        Some(account) if verified => account,
        // The attempt, dropped, stays a failure.
        _ => return Err(Error::InvalidCredentials),
    };
    attempt.succeeded();
    let role = Role::parse(&account.role).ok_or_else(|| Error::Internal(format!("unknown role {}", account.role)))?;
    let ttl = core.limits.session_ttl;
    let minted = core.keys.open(Grant { account_id: account.id, role, epoch: account.session_epoch }, ttl);
    let expires_at = DateTime::from_timestamp(minted.session.expires as i64, 0).unwrap_or_else(Utc::now);
    let cookie = format!(
        "{SESSION_COOKIE}={}; Path=/; Max-Age={}; HttpOnly; Secure; SameSite=Strict",
        minted.token,
        ttl.as_secs()
    );
    let session = Session { token: minted.token, expires_at, account_id: account.id, role };
    let mut response = respond::json(StatusCode::OK, &session);
    let cookie = HeaderValue::try_from(cookie).map_err(|e| Error::Internal(e.to_string()))?;
    response.headers_mut().insert(header::SET_COOKIE, cookie);
    response.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok(response)
}

/// What ends a session in the browser: the cookie, emptied and expired.
const CLEARED_COOKIE: &str = "gavel_session=; Path=/; Max-Age=0; HttpOnly; Secure; SameSite=Strict";

/// Ends sessions on this core at once, without waiting for the database's
/// notification (which the other cores and instances act on).
fn end_here(core: &Core, end: SessionEnd) {
    core.caches.end_session(end);
    core.events.end_session(&end);
}

/// An answer that ends the session on the client's side too.
fn session_ended() -> Response {
    let mut response = StatusCode::NO_CONTENT.into_response();
    response.headers_mut().insert(header::SET_COOKIE, HeaderValue::from_static(CLEARED_COOKIE));
    response.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

/// Logs out: the caller's token and cookie stop working on every core of every
/// instance (within a second: each learns it from the database's
/// notification), and the cookie is cleared. The account's other sessions go on.
#[utoipa::path(
    delete, path = "/api/sessions/current", tag = "accounts",
    security(("bearer" = []), ("cookie" = [])),
    responses(
        (status = 204, description = "Logged out", headers(
            ("Set-Cookie" = String, description = "The session cookie, cleared"),
        )),
        CallerProblems, ServerProblems,
    )
)]
async fn end_session(State(core): State<Arc<Core>>, Caller(caller): Caller) -> Result<Response> {
    db::accounts::revoke_session(&core.pool(), caller.account_id, &caller.session).await?;
    end_here(
        &core,
        SessionEnd::One { session_id: caller.session.id, expires_us: caller.session.expires as i64 * 1_000_000 },
    );
    Ok(session_ended())
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct PasswordChange {
    old_password: String,
    new_password: String,
}

/// Changes the caller's password, and ends every session of the account (this
/// one included) on every core of every instance, within a second. Log in
/// again with the new password. A wrong `old_password` counts as a failed
/// log-in of the account and of the client's address.
#[utoipa::path(
    put, path = "/api/accounts/me/password", tag = "accounts",
    security(("bearer" = []), ("cookie" = [])),
    request_body = PasswordChange,
    responses(
        (status = 204, description = "Changed; every session of the account has ended", headers(
            ("Set-Cookie" = String, description = "The session cookie, cleared"),
        )),
        CallerProblems, JsonProblems, ServerProblems, RateLimitProblems,
        (status = 403, description = "`old_password` is wrong", body = Problem, content_type = PROBLEM_JSON),
        (status = 422, description = "The body has the wrong shape, or the new password is invalid",
         body = Problem, content_type = PROBLEM_JSON),
    )
)]
async fn change_password(
    State(core): State<Arc<Core>>,
    Caller(caller): Caller,
    ClientAddr(address): ClientAddr,
    Json(body): Json<PasswordChange>,
) -> Result<Response> {
    if let Some(invalid) = check_password("new_password", &body.new_password) {
        return Err(Error::Validation(vec![invalid]));
    }
    let account = db::accounts::credentials_of(&core.pool(), caller.account_id)
        .await?
        .ok_or(Error::Unauthorized("the token's account does not exist"))?;
    let (old, stored) = (body.old_password, account.password_hash);
    let new = body.new_password;
    let (attempt, new_hash) = checked(&core, &account.email, address, move || {
        auth::verify_password(&old, Some(&stored)).then(|| auth::hash_password(&new))
    })
    .await?;
    let new_hash = new_hash.ok_or(Error::Forbidden("the old password is wrong"))?;
    attempt.succeeded();
    let epoch = db::accounts::change_password(&core.pool(), account.id, &new_hash)
        .await?
        .ok_or(Error::Unauthorized("the token's account does not exist"))?;
    end_here(&core, SessionEnd::AllBefore { account_id: account.id, epoch, ended_us: Utc::now().timestamp_micros() });
    Ok(session_ended())
}

//! Account queries.

use chrono::{DateTime, Utc};
use sqlx::PgPool;

use super::DbError;
use super::notice::SessionEnd;
use crate::auth::{Role, Session};
use crate::metrics::{self, Query};

/// An account as stored, without its password hash.
#[derive(Debug, Clone)]
pub struct Account {
    pub id: i64,
    pub email: String,
    pub role: String,
    pub created_at: DateTime<Utc>,
}

/// Why an account could not be created.
#[derive(Debug, thiserror::Error)]
pub enum CreateError {
    #[error("an account with this e-mail exists")]
    EmailTaken,
    #[error(transparent)]
    Db(#[from] DbError),
}

pub async fn insert(pool: &PgPool, email: &str, password_hash: &str, role: Role) -> Result<Account, CreateError> {
    let _timer = metrics::time_query(Query::Account);
    sqlx::query_as!(
        Account,
        r#"
        insert into accounts (email, password_hash, role) values ($1, $2, $3)
        returning id, email, role, created_at
        "#,
        email,
        password_hash,
        role.as_str()
    )
    .fetch_one(pool)
    .await
    .map_err(|e| match &e {
        sqlx::Error::Database(db) if db.constraint() == Some("accounts_email_key") => CreateError::EmailTaken,
        _ => CreateError::Db(e.into()),
    })
}

/// What logging in needs: the id, the hash to verify against, the role, and
/// the session epoch a new token is issued in.
#[derive(Debug, Clone)]
pub struct Credentials {
    pub id: i64,
    pub email: String,
    pub password_hash: String,
    pub role: String,
    pub session_epoch: i32,
}

/// The credentials of the account with this e-mail address (in any case).
pub async fn credentials(pool: &PgPool, email: &str) -> Result<Option<Credentials>, DbError> {
    let _timer = metrics::time_query(Query::Account);
    Ok(sqlx::query_as!(
        Credentials,
        "select id, email, password_hash, role, session_epoch from accounts where lower(email) = lower($1)",
        email.trim()
    )
    .fetch_optional(pool)
    .await?)
}

/// The credentials of account `id`.
pub async fn credentials_of(pool: &PgPool, id: i64) -> Result<Option<Credentials>, DbError> {
    let _timer = metrics::time_query(Query::Account);
    Ok(sqlx::query_as!(
        Credentials,
        "select id, email, password_hash, role, session_epoch from accounts where id = $1",
        id
    )
    .fetch_optional(pool)
    .await?)
}

/// Replaces account `id`'s password hash and ends every session it has: its
/// session epoch rises, which `sessions_ended_notify` announces. The new
/// epoch; `None` without such an account.
pub async fn change_password(pool: &PgPool, id: i64, new_hash: &str) -> Result<Option<i32>, DbError> {
    let _timer = metrics::time_query(Query::Account);
    Ok(sqlx::query_scalar!(
        r#"
        update accounts
           set password_hash = $2, session_epoch = session_epoch + 1, sessions_ended_at = now()
         where id = $1
        returning session_epoch
        "#,
        id,
        new_hash
    )
    .fetch_optional(pool)
    .await?)
}

/// Ends one session of `account` (a log-out) until its token's expiry, which
/// `revoked_sessions_notify` announces. Ending it twice is harmless.
pub async fn revoke_session(pool: &PgPool, account: i64, session: &Session) -> Result<(), DbError> {
    let _timer = metrics::time_query(Query::Account);
    sqlx::query!(
        "insert into revoked_sessions (session_id, account_id, expires_at) \
         values ($1, $2, to_timestamp($3)) on conflict (session_id) do nothing",
        session.id,
        account,
        session.expires as f64
    )
    .execute(pool)
    .await?;
    Ok(())
}

/// Whether `account`'s `session` has ended, asked of the database: for a core
/// whose cache of ended sessions is not live.
pub async fn session_ended(pool: &PgPool, account: i64, session: &Session) -> Result<bool, DbError> {
    let _timer = metrics::time_query(Query::Account);
    Ok(sqlx::query_scalar!(
        r#"select exists (select 1 from revoked_sessions where session_id = $1)
               or coalesce((select session_epoch > $3 from accounts where id = $2), false) as "ended!""#,
        session.id,
        account,
        session.epoch
    )
    .fetch_one(pool)
    .await?)
}

/// Every session that ended early and whose token may not have expired yet, for
/// a core's cache: the revoked ones, and the accounts whose epoch rose within
/// `ttl` (a token's lifetime).
pub async fn ended_sessions(pool: &PgPool, ttl: std::time::Duration) -> Result<Vec<SessionEnd>, DbError> {
    let _timer = metrics::time_query(Query::Account);
    let revoked = sqlx::query!(
        r#"select session_id, (extract(epoch from expires_at) * 1000000)::bigint as "expires_us!"
             from revoked_sessions where expires_at >= now() - interval '1 minute'"#
    )
    .fetch_all(pool)
    .await?;
    let raised = sqlx::query!(
        r#"select id, session_epoch, (extract(epoch from sessions_ended_at) * 1000000)::bigint as "ended_us!"
             from accounts where sessions_ended_at >= now() - make_interval(secs => $1)"#,
        ttl.as_secs_f64()
    )
    .fetch_all(pool)
    .await?;
    let revoked = revoked.into_iter().map(|r| SessionEnd::One { session_id: r.session_id, expires_us: r.expires_us });
    let raised = raised.into_iter().map(|r| SessionEnd::AllBefore {
        account_id: r.id,
        epoch: r.session_epoch,
        ended_us: r.ended_us,
    });
    Ok(revoked.chain(raised).collect())
}

/// Deletes the revocations of tokens that have expired anyway (for longer than
/// any is accepted past its expiry); how many.
pub async fn purge_revoked(db: impl sqlx::PgExecutor<'_>) -> Result<u64, DbError> {
    let _timer = metrics::time_query(Query::Lifecycle);
    // A minute past expiry: longer than any token is accepted (`auth::LEEWAY_SECS`).
    Ok(sqlx::query!("delete from revoked_sessions where expires_at < now() - interval '1 minute'")
        .execute(db)
        .await?
        .rows_affected())
}

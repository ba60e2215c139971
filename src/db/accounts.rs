//! Account queries.

use chrono::{DateTime, Utc};
use sqlx::PgPool;

use super::DbError;
use crate::auth::Role;
use crate::metrics::{self, Query};

/// An account as stored, without its password hash.
#[derive(Debug, Clone, sqlx::FromRow)]
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
    sqlx::query_as(
        r#"
        insert into accounts (email, password_hash, role) values ($1, $2, $3)
        returning id, email, role, created_at
        "#,
    )
    .bind(email)
    .bind(password_hash)
    .bind(role.as_str())
    .fetch_one(pool)
    .await
    .map_err(|e| match &e {
        sqlx::Error::Database(db) if db.constraint() == Some("accounts_email_key") => CreateError::EmailTaken,
        _ => CreateError::Db(e.into()),
    })
}

/// What logging in needs: the id, the hash to verify against, and the role.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Credentials {
    pub id: i64,
    pub password_hash: String,
    pub role: String,
}

pub async fn credentials(pool: &PgPool, email: &str) -> Result<Option<Credentials>, DbError> {
    let _timer = metrics::time_query(Query::Account);
    Ok(sqlx::query_as("select id, password_hash, role from accounts where lower(email) = lower($1)")
        .bind(email.trim())
        .fetch_optional(pool)
        .await?)
}

//! Session tokens: HS256 JWTs with the algorithm pinned and expiry enforced.
//!
//! A leaf module: it knows nothing of HTTP or the database. `Keys` is built once at
//! start and shared read-only by every core (nothing here is written after start, so
//! sharing it costs no cross-core traffic).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Issuer written into and required of every token.
pub const ISSUER: &str = "gavel";

/// Seconds past its `exp` a token is still accepted (clock skew between the
/// instances that mint and check it). Whatever remembers a revoked token must
/// remember it this much longer.
pub const LEEWAY_SECS: u64 = 5;

/// Shortest accepted secret: HS256 is only as strong as its key (RFC 7518 §3.2).
pub const MIN_SECRET_LEN: usize = 32;

/// What an account may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Bidder,
    Seller,
    Admin,
}

impl Role {
    pub fn parse(s: &str) -> Option<Role> {
        match s {
            "bidder" => Some(Role::Bidder),
            "seller" => Some(Role::Seller),
            "admin" => Some(Role::Admin),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Bidder => "bidder",
            Role::Seller => "seller",
            Role::Admin => "admin",
        }
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct Claims {
    /// The account id, as a string as RFC 7519 wants.
    sub: String,
    role: Role,
    iat: u64,
    exp: u64,
    iss: String,
    /// The session's id: what a log-out revokes.
    jti: Uuid,
    /// The account's session epoch when the token was issued: a password change
    /// raises it, and ends every session of an older one.
    sep: i32,
}

/// The verified caller of a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Principal {
    pub account_id: i64,
    pub role: Role,
    /// The session the token belongs to.
    pub session: Session,
    /// When the token was issued (its `iat`, seconds since the epoch).
    pub issued: u64,
}

/// A session as its token names it: what decides whether it was ended early.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Session {
    pub id: Uuid,
    /// The account's session epoch the token was issued in.
    pub epoch: i32,
    /// When the token expires, in seconds since the epoch.
    pub expires: u64,
}

/// What a new token grants.
#[derive(Debug, Clone, Copy)]
pub struct Grant {
    pub account_id: i64,
    pub role: Role,
    /// The account's current session epoch.
    pub epoch: i32,
}

/// A newly signed token and the session it opens.
#[derive(Debug, Clone)]
pub struct Minted {
    pub token: String,
    pub session: Session,
}

/// Why a token was refused. Callers map every variant to 401.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TokenError {
    #[error("the token has expired")]
    Expired,
    #[error("the token is not valid")]
    Invalid,
}

#[derive(Debug, thiserror::Error)]
#[error("the token secret must be at least {MIN_SECRET_LEN} bytes")]
pub struct WeakSecret;

/// Argon2id's memory cost for new hashes, in KiB: 7 MiB. OWASP's equal-strength
/// sets (m=47104 t=1, m=19456 t=2, m=12288 t=3, m=9216 t=4, m=7168 t=5; p=1) trade
/// memory for passes; a small server has memory to spare least, so gavel takes the
/// set with the least. Each hash in progress holds this much (see
/// `core::HASHES_PER_CORE`); the `argon2` crate's default set held 19 MiB, and two
/// at once (one per core, bidders logging in) were 38 of the 56–61 MiB peak RSS of
/// a `loadtest/compare` run.
///
/// Time per hash, measured side by side (release build, this crate's `argon2`, ten
/// hashes each, two rounds, a 2-core machine shared with other builds): m=19456 t=2
/// 27.2/22.8 ms, m=7168 t=5 15.5/19.6 ms — the same order, so log-ins cost no more.
pub const HASH_MEMORY_KIB: u32 = 7168;
/// Argon2id passes for new hashes: 5, OWASP's partner of [`HASH_MEMORY_KIB`].
pub const HASH_PASSES: u32 = 5;

/// The hasher of new passwords: Argon2id, [`HASH_MEMORY_KIB`], [`HASH_PASSES`], one lane.
fn hasher() -> argon2::Argon2<'static> {
    let params = argon2::Params::new(HASH_MEMORY_KIB, HASH_PASSES, 1, None)
        .expect("OWASP's Argon2id parameters are within the algorithm's bounds");
    argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params)
}

/// Hashes a password with Argon2id at [`HASH_MEMORY_KIB`] and [`HASH_PASSES`]; the
/// PHC string it returns names them. Slow on purpose: call it off the core's thread.
pub fn hash_password(password: &str) -> String {
    use argon2::password_hash::{PasswordHasher, SaltString, rand_core::OsRng};
    let salt = SaltString::generate(&mut OsRng);
    hasher()
        .hash_password(password.as_bytes(), &salt)
        .expect("argon2 with fixed, valid parameters accepts any password")
        .to_string()
}

/// Checks a password against a stored hash, with the algorithm, version and
/// parameters that hash names (a PHC string carries them), so hashes made with
/// other parameters — the `argon2` crate's defaults, before [`HASH_MEMORY_KIB`] —
/// still verify. Without a stored hash (an unknown e-mail) it checks against a
/// fixed dummy, so both cases take the same time and a caller cannot tell them apart.
pub fn verify_password(password: &str, stored: Option<&str>) -> bool {
    use argon2::password_hash::{PasswordHash, PasswordVerifier};
    static DUMMY: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    let dummy = DUMMY.get_or_init(|| hash_password("gavel-dummy-password"));
    let Ok(parsed) = PasswordHash::new(stored.unwrap_or(dummy)) else { return false };
    // `verify_password` rebuilds the hasher from `parsed`'s own parameters; the
    // hasher it is called on only lends its (absent) secret.
    let matches = hasher().verify_password(password.as_bytes(), &parsed).is_ok();
    matches && stored.is_some()
}

/// Seconds since the epoch, as tokens count time.
fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_secs()
}

/// Signing and verification keys for one secret.
pub struct Keys {
    encoding: EncodingKey,
    decoding: DecodingKey,
    validation: Validation,
}

impl std::fmt::Debug for Keys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Keys(..)")
    }
}

impl Keys {
    pub fn new(secret: &[u8]) -> Result<Self, WeakSecret> {
        if secret.len() < MIN_SECRET_LEN {
            return Err(WeakSecret);
        }
        // Pinning the algorithm list to HS256 is what defeats `alg: none` and
        // algorithm-confusion tokens; `exp` is required and checked with no leeway
        // beyond a few seconds of clock skew.
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = LEEWAY_SECS;
        validation.set_issuer(&[ISSUER]);
        validation.set_required_spec_claims(&["exp", "iat", "iss", "sub", "jti"]);
        Ok(Keys { encoding: EncodingKey::from_secret(secret), decoding: DecodingKey::from_secret(secret), validation })
    }

    /// A random secret, for a server started without one.
    pub fn generate_secret() -> String {
        use rand::Rng;
        let bytes: [u8; 32] = rand::thread_rng().r#gen();
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Signs a token for `account_id` in session epoch 0 (an account whose
    /// password never changed), valid for `ttl`; returns it and its expiry
    /// (seconds since the epoch). For scripts and tests; a log-in uses [`Keys::open`].
    pub fn mint(&self, account_id: i64, role: Role, ttl: Duration) -> (String, u64) {
        let minted = self.open(Grant { account_id, role, epoch: 0 }, ttl);
        (minted.token, minted.session.expires)
    }

    /// Opens a new session: signs a token with a fresh session id, valid for `ttl`.
    pub fn open(&self, grant: Grant, ttl: Duration) -> Minted {
        let now = unix_now();
        let session = Session { id: Uuid::new_v4(), epoch: grant.epoch, expires: now + ttl.as_secs().max(1) };
        let claims = Claims {
            sub: grant.account_id.to_string(),
            role: grant.role,
            iat: now,
            exp: session.expires,
            iss: ISSUER.to_owned(),
            jti: session.id,
            sep: session.epoch,
        };
        let token = jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.encoding)
            .expect("HS256 signing of plain claims cannot fail");
        Minted { token, session }
    }

    pub fn verify(&self, token: &str) -> Result<Principal, TokenError> {
        let data =
            jsonwebtoken::decode::<Claims>(token, &self.decoding, &self.validation).map_err(|e| match e.kind() {
                jsonwebtoken::errors::ErrorKind::ExpiredSignature => TokenError::Expired,
                _ => TokenError::Invalid,
            })?;
        let account_id = data.claims.sub.parse::<i64>().map_err(|_| TokenError::Invalid)?;
        if account_id <= 0 {
            return Err(TokenError::Invalid);
        }
        let session = Session { id: data.claims.jti, epoch: data.claims.sep, expires: data.claims.exp };
        Ok(Principal { account_id, role: data.claims.role, session, issued: data.claims.iat })
    }
}

/// Tokens one core has verified, with what they said: a bidder sends the same
/// token with each of its bids, and checking its signature and decoding its
/// claims every time was 7 % of gavel's CPU in a bid storm (perf, `gavel-loadtest
/// run bid-storm`, 64 connections, 2026-12-01). A hit skips only that work: the
/// expiry is checked on every use with the same leeway, and whether the session
/// has ended is the caller's to check, as it is after [`Keys::verify`].
///
/// Found by a keyed hash of the whole token, then compared byte for byte in
/// constant time, so that a lookup tells nothing about how much of a stored
/// token a guess shares. Bounded: the least recently used goes first.
pub struct VerifiedTokens {
    inner: std::sync::Mutex<hashlink::LruCache<u64, Verified>>,
    hasher: std::hash::RandomState,
}

impl std::fmt::Debug for VerifiedTokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VerifiedTokens").finish_non_exhaustive()
    }
}

impl Default for VerifiedTokens {
    fn default() -> Self {
        VerifiedTokens::new(VerifiedTokens::CAPACITY)
    }
}

/// One verified token and its principal.
struct Verified {
    token: Box<[u8]>,
    principal: Principal,
}

impl VerifiedTokens {
    /// Tokens kept per core; each takes about its length plus 100 bytes.
    pub const CAPACITY: usize = 1024;

    pub fn new(capacity: usize) -> Self {
        VerifiedTokens {
            // Full, an insert drops the least recently used.
            inner: std::sync::Mutex::new(hashlink::LruCache::new(capacity.max(1))),
            hasher: std::hash::RandomState::new(),
        }
    }

    /// [`Keys::verify`], answered from this cache when `token` verified here
    /// before and has not expired since.
    pub fn verify(&self, keys: &Keys, token: &str) -> Result<Principal, TokenError> {
        self.verify_at(keys, token, unix_now())
    }

    /// [`verify`](Self::verify) at `now`, in seconds since the epoch (a hit's
    /// expiry is checked against it).
    fn verify_at(&self, keys: &Keys, token: &str, now: u64) -> Result<Principal, TokenError> {
        use std::hash::BuildHasher;
        use subtle::ConstantTimeEq;
        let key = self.hasher.hash_one(token.as_bytes());
        {
            let mut inner = self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            if let Some(hit) = inner.get(&key)
                && bool::from(hit.token.ct_eq(token.as_bytes()))
            {
                // The rule `Keys::verify` applies: expired once `exp` plus the
                // leeway has passed.
                if now <= hit.principal.session.expires.saturating_add(LEEWAY_SECS) {
                    return Ok(hit.principal);
                }
                inner.remove(&key);
                return Err(TokenError::Expired);
            }
        }
        let principal = keys.verify(token)?;
        let mut inner = self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        inner.insert(key, Verified { token: token.as_bytes().into(), principal });
        Ok(principal)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys() -> Keys {
        Keys::new(&[7u8; 32]).unwrap()
    }

    /// Valid claims for account 1, issued at `now`.
    fn claims(now: u64) -> Claims {
        Claims {
            sub: "1".into(),
            role: Role::Bidder,
            iat: now,
            exp: now + 60,
            iss: ISSUER.into(),
            jti: Uuid::new_v4(),
            sep: 0,
        }
    }

    /// A token from before sessions could end (no `jti`) names no session that
    /// could be revoked, so it is refused.
    #[test]
    fn a_token_without_a_session_id_is_refused() {
        #[derive(Serialize)]
        struct Old {
            sub: String,
            role: Role,
            iat: u64,
            exp: u64,
            iss: String,
        }
        let k = keys();
        let now = unix_now();
        let old = Old { sub: "1".into(), role: Role::Bidder, iat: now, exp: now + 60, iss: ISSUER.into() };
        let token = jsonwebtoken::encode(&Header::new(Algorithm::HS256), &old, &k.encoding).unwrap();
        assert_eq!(k.verify(&token), Err(TokenError::Invalid));
    }

    #[test]
    fn minted_token_verifies_with_its_claims() {
        let k = keys();
        let minted = k.open(Grant { account_id: 42, role: Role::Bidder, epoch: 3 }, Duration::from_secs(60));
        let session = minted.session;
        let principal = k.verify(&minted.token).unwrap();
        assert_eq!(principal, Principal { account_id: 42, role: Role::Bidder, session, issued: principal.issued });
        assert_eq!(principal.session.expires - principal.issued, 60);
        assert_eq!(session.epoch, 3);
        let again = k.open(Grant { account_id: 42, role: Role::Bidder, epoch: 3 }, Duration::from_secs(60));
        assert_ne!(again.session.id, session.id, "every log-in opens a session of its own");
    }

    #[test]
    fn short_secret_is_refused() {
        assert!(Keys::new(b"short").is_err());
    }

    #[test]
    fn token_signed_with_another_secret_is_invalid() {
        let other = Keys::new(&[8u8; 32]).unwrap();
        let (token, _) = other.mint(1, Role::Seller, Duration::from_secs(60));
        assert_eq!(keys().verify(&token), Err(TokenError::Invalid));
    }

    #[test]
    fn expired_token_is_refused() {
        let k = keys();
        let now = unix_now();
        let claims = Claims { iat: now - 100, exp: now - 60, ..claims(now) };
        let token = jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &k.encoding).unwrap();
        assert_eq!(k.verify(&token), Err(TokenError::Expired));
    }

    #[test]
    fn unsigned_and_tampered_tokens_are_refused() {
        let k = keys();
        let (token, _) = k.mint(1, Role::Bidder, Duration::from_secs(60));
        // alg=none with the same claims
        let mut parts: Vec<&str> = token.split('.').collect();
        let none_header = "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0";
        parts[0] = none_header;
        assert_eq!(k.verify(&format!("{}.{}.", parts[0], parts[1])), Err(TokenError::Invalid));
        // flip the role in the payload but keep the signature
        let (seller, _) = k.mint(1, Role::Seller, Duration::from_secs(60));
        let seller_payload = seller.split('.').nth(1).unwrap();
        let forged =
            format!("{}.{}.{}", token.split('.').next().unwrap(), seller_payload, token.split('.').nth(2).unwrap());
        assert_eq!(k.verify(&forged), Err(TokenError::Invalid));
        assert_eq!(k.verify("not a token"), Err(TokenError::Invalid));
    }

    #[test]
    fn passwords_verify_only_against_their_own_hash() {
        let hash = hash_password("correct horse");
        assert!(hash.starts_with("$argon2id$"));
        assert!(verify_password("correct horse", Some(&hash)));
        assert!(!verify_password("wrong horse", Some(&hash)));
        assert!(!verify_password("correct horse", None));
        assert!(!verify_password("correct horse", Some("not a hash")));
    }

    /// A hash made before gavel chose its parameters (the `argon2` crate's
    /// defaults: Argon2id, 19 MiB, two passes) still verifies; new hashes name
    /// the new parameters.
    #[test]
    fn old_hashes_verify_and_new_ones_carry_the_new_parameters() {
        use argon2::password_hash::{PasswordHasher, SaltString, rand_core::OsRng};
        let old_defaults = argon2::Params::new(19456, 2, 1, None).unwrap();
        let old = argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, old_defaults)
            .hash_password(b"correct horse", &SaltString::generate(&mut OsRng))
            .unwrap()
            .to_string();
        assert!(old.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"), "{old}");
        assert!(verify_password("correct horse", Some(&old)));
        assert!(!verify_password("wrong horse", Some(&old)));

        let new = hash_password("correct horse");
        assert!(new.starts_with("$argon2id$v=19$m=7168,t=5,p=1$"), "{new}");
        assert!(verify_password("correct horse", Some(&new)));
    }

    #[test]
    fn wrong_issuer_is_refused() {
        let k = keys();
        let now = unix_now();
        let claims = Claims { iss: "someone-else".into(), ..claims(now) };
        let token = jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &k.encoding).unwrap();
        assert_eq!(k.verify(&token), Err(TokenError::Invalid));
    }
    #[test]
    fn a_verified_token_is_answered_from_the_cache_until_it_expires() {
        let k = keys();
        let cache = VerifiedTokens::new(8);
        let minted = k.open(Grant { account_id: 7, role: Role::Bidder, epoch: 1 }, Duration::from_secs(60));
        let now = unix_now();
        let first = cache.verify_at(&k, &minted.token, now).unwrap();
        assert_eq!(first, k.verify(&minted.token).unwrap());
        // Another secret cannot verify it: only the cache can answer now.
        let other = Keys::new(&[9u8; 32]).unwrap();
        assert_eq!(cache.verify_at(&other, &minted.token, now + 1), Ok(first));
        let last = minted.session.expires + LEEWAY_SECS;
        assert_eq!(cache.verify_at(&other, &minted.token, last), Ok(first), "still within the leeway");
        assert_eq!(cache.verify_at(&k, &minted.token, last + 1), Err(TokenError::Expired));
        assert_eq!(cache.inner.lock().unwrap().len(), 0, "an expired token leaves the cache");
    }

    #[test]
    fn a_token_that_differs_from_a_cached_one_is_verified_in_full() {
        let k = keys();
        let cache = VerifiedTokens::new(8);
        let (token, _) = k.mint(1, Role::Bidder, Duration::from_secs(60));
        assert!(cache.verify(&k, &token).is_ok());
        // The signature's first character, which is all signal, no padding bits.
        let mut forged = token.clone().into_bytes();
        let at = token.rfind('.').unwrap() + 1;
        forged[at] = if forged[at] == b'A' { b'B' } else { b'A' };
        let forged = String::from_utf8(forged).unwrap();
        assert_eq!(cache.verify(&k, &forged), Err(TokenError::Invalid));
        assert_eq!(cache.verify(&k, &format!("{token}x")), Err(TokenError::Invalid));
        assert_eq!(cache.verify(&k, "not a token"), Err(TokenError::Invalid));
        assert_eq!(cache.inner.lock().unwrap().len(), 1, "only verified tokens are kept");
        // A forged token whose hash matched a cached one's is still compared
        // byte for byte: file the real token under the forgery's hash.
        let principal = cache.verify(&k, &token).unwrap();
        let key = std::hash::BuildHasher::hash_one(&cache.hasher, forged.as_bytes());
        cache.inner.lock().unwrap().insert(key, Verified { token: token.as_bytes().into(), principal });
        assert_eq!(cache.verify(&k, &forged), Err(TokenError::Invalid));
    }

    #[test]
    fn the_token_cache_keeps_the_most_recently_used() {
        let k = keys();
        let cache = VerifiedTokens::new(2);
        let tokens: Vec<String> = (1..=3).map(|id| k.mint(id, Role::Bidder, Duration::from_secs(60)).0).collect();
        assert!(cache.verify(&k, &tokens[0]).is_ok());
        assert!(cache.verify(&k, &tokens[1]).is_ok());
        // Used again, so the first is no longer the least recently used.
        assert!(cache.verify(&k, &tokens[0]).is_ok());
        assert!(cache.verify(&k, &tokens[2]).is_ok());
        let other = Keys::new(&[9u8; 32]).unwrap();
        assert_eq!(cache.inner.lock().unwrap().len(), 2);
        assert!(cache.verify(&other, &tokens[2]).is_ok(), "the newest is kept");
        assert!(cache.verify(&other, &tokens[0]).is_ok(), "the one used since is kept");
        assert_eq!(cache.verify(&other, &tokens[1]), Err(TokenError::Invalid), "the least recently used went");
    }
}

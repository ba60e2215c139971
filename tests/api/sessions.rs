//! Sessions that end before their tokens expire: log-out, and a password change
//! that ends every session of its account, on every core.

use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::helpers::{TestApp, assert_problem, fresh_connection_client, spawn_app, spawn_app_with};

const PASSWORD: &str = "correct horse battery";
const NEW_PASSWORD: &str = "staple battery horse";
/// A route any bidder's session may read.
const MINE: &str = "/api/me/bids";
const MINE_ROUTE: &str = "route=\"/api/me/bids\"";

/// How soon every core must refuse an ended session.
const WITHIN: Duration = Duration::from_secs(1);

impl TestApp {
    /// Logs in; returns the session token.
    async fn session(&self, email: &str, password: &str) -> String {
        let response = self.login(email, password).await;
        assert_eq!(response.status(), StatusCode::OK, "log-in of {email}");
        response.json::<Value>().await.unwrap()["token"].as_str().unwrap().to_owned()
    }

    async fn log_out(&self, token: &str) -> reqwest::Response {
        self.client.delete(self.url("/api/sessions/current")).bearer_auth(token).send().await.unwrap()
    }

    async fn change_password(&self, token: &str, old: &str, new: &str) -> reqwest::Response {
        self.client
            .put(self.url("/api/accounts/me/password"))
            .bearer_auth(token)
            .json(&json!({"old_password": old, "new_password": new}))
            .send()
            .await
            .unwrap()
    }

    /// Reads [`MINE`] with `token` on new connections until every core has
    /// answered `status`. Before `grace` has passed, a core may still answer 200.
    async fn on_every_core(&self, token: &str, status: StatusCode, grace: Duration) {
        let status_label = format!("status=\"{}\"", status.as_u16());
        let having = [MINE_ROUTE, status_label.as_str()];
        let before = self.per_core(gavel::metrics::HTTP_REQUESTS_TOTAL, &having).await;
        let (client, started) = (fresh_connection_client(), Instant::now());
        for _ in 0..100 {
            let got = client.get(self.url(MINE)).bearer_auth(token).send().await.unwrap().status();
            if got != status {
                assert!(
                    got == StatusCode::OK && started.elapsed() < grace,
                    "{got} instead of {status} after {:?}",
                    started.elapsed()
                );
            }
            let now = self.per_core(gavel::metrics::HTTP_REQUESTS_TOTAL, &having).await;
            if now[0] > before[0] && now[1] > before[1] {
                return;
            }
        }
        panic!("100 new connections did not reach both cores");
    }

    async fn refused_everywhere(&self, token: &str) {
        self.on_every_core(token, StatusCode::UNAUTHORIZED, WITHIN).await;
    }

    async fn accepted_everywhere(&self, token: &str) {
        self.on_every_core(token, StatusCode::OK, Duration::ZERO).await;
    }
}

/// The Set-Cookie that clears the session cookie.
fn clears_the_cookie(response: &reqwest::Response) {
    let cookie = response.headers()["set-cookie"].to_str().unwrap();
    assert!(cookie.starts_with("gavel_session=;"), "{cookie}");
    assert!(cookie.to_ascii_lowercase().contains("max-age=0"), "{cookie}");
}

/// A log-out ends that session on every core within a second and clears the
/// cookie; the account's other session goes on.
#[tokio::test]
async fn logging_out_ends_that_session_alone_on_every_core() {
    let app = spawn_app().await;
    let (_, first) = app.signed_up("out@example.org", PASSWORD, "bidder").await;
    let second = app.session("out@example.org", PASSWORD).await;
    app.accepted_everywhere(&first).await;

    let response = app.log_out(&first).await;
    assert_eq!(response.status(), StatusCode::NO_CONTENT);
    clears_the_cookie(&response);
    app.refused_everywhere(&first).await;
    app.accepted_everywhere(&second).await;

    let again = app.log_out(&first).await;
    let problem = assert_problem(again, StatusCode::UNAUTHORIZED, "/problems/unauthorized").await;
    assert!(problem["detail"].as_str().unwrap().contains("ended"), "{problem}");
}

/// Every core counts the ended sessions it remembers: a log-out is one, an
/// account's password change another.
#[tokio::test]
async fn every_core_counts_the_ended_sessions_it_remembers() {
    // A short grace makes the sweep, which publishes the counts, run often.
    let app = spawn_app_with(&["--cache-closed-grace", "1s"]).await;
    let entries = || app.per_core("gavel_cache_entries", &["cache=\"sessions\""]);
    // The series exist, on both cores, before anything ended (a missing one
    // would read as 0 too).
    let text = app.scrape().await;
    for core in ["0", "1"] {
        let core = format!("core=\"{core}\"");
        let found = text
            .lines()
            .any(|l| l.starts_with("gavel_cache_entries{") && l.contains("cache=\"sessions\"") && l.contains(&core));
        assert!(found, "no sessions entries for {core} in {text}");
    }
    let (_, token) = app.signed_up("counted@example.org", PASSWORD, "bidder").await;
    assert_eq!(app.log_out(&token).await.status(), StatusCode::NO_CONTENT);
    crate::helpers::eventually(Duration::from_secs(5), "both cores count the log-out", || async {
        (entries().await == [1.0, 1.0]).then_some(())
    })
    .await;
    let other = app.session("counted@example.org", PASSWORD).await;
    assert_eq!(app.change_password(&other, PASSWORD, NEW_PASSWORD).await.status(), StatusCode::NO_CONTENT);
    crate::helpers::eventually(Duration::from_secs(5), "both cores count the password change", || async {
        (entries().await == [2.0, 2.0]).then_some(())
    })
    .await;
}

/// The session cookie logs out like the header, and stops working.
#[tokio::test]
async fn logging_out_by_cookie_ends_the_cookie() {
    let app = spawn_app().await;
    app.signed_up("cookie@example.org", PASSWORD, "bidder").await;
    let cookie = format!("gavel_session={}", app.session("cookie@example.org", PASSWORD).await);
    let mine = || app.client.get(app.url(MINE)).header("cookie", &cookie).send();
    assert_eq!(mine().await.unwrap().status(), StatusCode::OK);

    let response = app.client.delete(app.url("/api/sessions/current")).header("cookie", &cookie).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::NO_CONTENT);
    clears_the_cookie(&response);
    assert_eq!(mine().await.unwrap().status(), StatusCode::UNAUTHORIZED, "on the core that logged out, at once");
}

/// A password change ends every session of that account on every core within
/// a second, and no one else's; the old password stops working, the new works.
#[tokio::test]
async fn a_password_change_ends_every_session_of_its_account_only() {
    let app = spawn_app().await;
    let (_, first) = app.signed_up("change@example.org", PASSWORD, "bidder").await;
    let second = app.session("change@example.org", PASSWORD).await;
    let (_, other) = app.signed_up("bystander@example.org", PASSWORD, "bidder").await;

    let response = app.change_password(&first, PASSWORD, NEW_PASSWORD).await;
    assert_eq!(response.status(), StatusCode::NO_CONTENT);
    clears_the_cookie(&response);
    app.refused_everywhere(&first).await;
    app.refused_everywhere(&second).await;
    app.accepted_everywhere(&other).await;

    let old = app.login("change@example.org", PASSWORD).await;
    assert_problem(old, StatusCode::UNAUTHORIZED, "/problems/invalid-credentials").await;
    let fresh = app.session("change@example.org", NEW_PASSWORD).await;
    app.accepted_everywhere(&fresh).await;
}

/// A wrong old password changes nothing, is 403, and counts as a failed log-in.
#[tokio::test]
async fn a_wrong_old_password_changes_nothing_and_counts_as_a_failed_log_in() {
    let app = spawn_app_with(&["--login-failures-per-account", "2"]).await;
    let (_, token) = app.signed_up("guess@example.org", PASSWORD, "bidder").await;
    for _ in 0..2 {
        let wrong = app.change_password(&token, "not the password", NEW_PASSWORD).await;
        assert_problem(wrong, StatusCode::FORBIDDEN, "/problems/forbidden").await;
    }
    let limited = app.change_password(&token, PASSWORD, NEW_PASSWORD).await;
    assert_problem(limited, StatusCode::TOO_MANY_REQUESTS, "/problems/rate-limited").await;
    app.accepted_everywhere(&token).await;
    let hash: String = sqlx::query_scalar("select password_hash from accounts where email = 'guess@example.org'")
        .fetch_one(&app.db)
        .await
        .unwrap();
    assert!(gavel::auth::verify_password(PASSWORD, Some(&hash)), "the password is unchanged");
}

/// A new password is checked like a registration's; the route needs a session.
#[tokio::test]
async fn an_invalid_new_password_is_422_and_no_session_is_401() {
    let app = spawn_app().await;
    let (_, token) = app.signed_up("short@example.org", PASSWORD, "bidder").await;
    let short = app.change_password(&token, PASSWORD, "short").await;
    let problem = assert_problem(short, StatusCode::UNPROCESSABLE_ENTITY, "/problems/validation").await;
    assert_eq!(problem["errors"][0]["field"], "new_password");
    app.accepted_everywhere(&token).await;

    let anonymous = app
        .client
        .put(app.url("/api/accounts/me/password"))
        .json(&json!({"old_password": PASSWORD, "new_password": NEW_PASSWORD}))
        .send()
        .await
        .unwrap();
    assert_problem(anonymous, StatusCode::UNAUTHORIZED, "/problems/unauthorized").await;
    let logged_out = app.client.delete(app.url("/api/sessions/current")).send().await.unwrap();
    assert_problem(logged_out, StatusCode::UNAUTHORIZED, "/problems/unauthorized").await;
}

/// A revocation the caches missed (written with triggers off) is read back when
/// a core's LISTEN connection comes back, like any other change.
#[tokio::test]
async fn a_core_that_lost_its_listener_reloads_the_ended_sessions() {
    let app = spawn_app().await;
    let (id, token) = app.signed_up("reload@example.org", PASSWORD, "bidder").await;
    let session = app.keys.verify(&token).unwrap().session;
    let stream = app.client.get(app.url("/api/me/events")).bearer_auth(&token).send().await.unwrap();
    assert_eq!(stream.status(), StatusCode::OK);
    let mut stream = stream.bytes_stream();
    let mut conn = app.db.acquire().await.unwrap();
    sqlx::query("set session_replication_role = replica").execute(&mut *conn).await.unwrap();
    sqlx::query(
        "insert into revoked_sessions (session_id, account_id, expires_at) values ($1, $2, now() + interval '1 hour')",
    )
    .bind(session.id)
    .bind(id)
    .execute(&mut *conn)
    .await
    .unwrap();
    drop(conn);
    app.accepted_everywhere(&token).await;
    app.reconnect_listeners().await;
    app.on_every_core(&token, StatusCode::UNAUTHORIZED, Duration::ZERO).await;
    // Its open event stream ends too.
    let drained = async {
        use futures::StreamExt;
        while stream.next().await.is_some() {}
    };
    tokio::time::timeout(WITHIN, drained).await.expect("the stream of a session ended while unheard ends");
}

/// Revocations of tokens that have expired anyway (for longer than any token
/// is accepted past its expiry) are purged; the others stay.
#[tokio::test]
async fn expired_revocations_are_purged() {
    let app = spawn_app().await;
    sqlx::query(
        "insert into revoked_sessions (session_id, account_id, expires_at) values \
         ('00000000-0000-4000-8000-00000000000a', 1, now() - interval '2 minutes'), \
         ('00000000-0000-4000-8000-00000000000c', 1, now() - interval '1 second'), \
         ('00000000-0000-4000-8000-00000000000b', 1, now() + interval '1 hour')",
    )
    .execute(&app.db)
    .await
    .unwrap();
    assert_eq!(gavel::db::accounts::purge_revoked(&app.db).await.unwrap(), 1);
    let left: Vec<String> = sqlx::query_scalar("select session_id::text from revoked_sessions order by 1")
        .fetch_all(&app.db)
        .await
        .unwrap();
    assert_eq!(left, ["00000000-0000-4000-8000-00000000000b", "00000000-0000-4000-8000-00000000000c"]);
}

/// A session's event streams end with it, on every core, and the account's
/// other session's stream goes on.
#[tokio::test]
async fn a_sessions_event_streams_end_with_it() {
    use futures::StreamExt;

    let app = spawn_app().await;
    let (_, first) = app.signed_up("streams@example.org", PASSWORD, "bidder").await;
    let second = app.session("streams@example.org", PASSWORD).await;
    let client = fresh_connection_client();
    let open = |token: String| {
        let client = client.clone();
        let url = app.url("/api/me/events");
        async move {
            let response = client.get(url).bearer_auth(token).send().await.unwrap();
            assert_eq!(response.status(), StatusCode::OK);
            response.bytes_stream()
        }
    };
    // Streams on new connections until both cores have some.
    let mut ended = Vec::new();
    loop {
        ended.push(open(first.clone()).await);
        let open_streams = app.per_core(gavel::metrics::EVENT_STREAMS_OPEN, &[]).await;
        assert_eq!(open_streams[0] + open_streams[1], ended.len() as f64);
        if open_streams[0] > 0.0 && open_streams[1] > 0.0 {
            break;
        }
        assert!(ended.len() < 64, "64 new connections did not reach both cores");
    }
    let mut going_on = open(second.clone()).await;

    assert_eq!(app.log_out(&first).await.status(), StatusCode::NO_CONTENT);
    for stream in &mut ended {
        let drained = async { while stream.next().await.is_some() {} };
        tokio::time::timeout(WITHIN, drained).await.expect("the logged-out session's stream ended");
    }
    let still = tokio::time::timeout(Duration::from_millis(300), going_on.next()).await;
    assert!(still.is_err(), "the other session's stream neither ended nor sent: {still:?}");
}

/// A core remembers an ended session for --session-ttl, so a token made to live
/// longer than that (`gavel token --ttl`, or minted before the flag was
/// lowered) could come back after a password change that ended it had been
/// forgotten: it is refused outright.
#[tokio::test]
async fn a_token_made_to_live_longer_than_a_session_is_refused() {
    let app = spawn_app_with(&["--session-ttl", "1h"]).await;
    let within = app.keys.mint(2, gavel::auth::Role::Bidder, Duration::from_secs(3600)).0;
    let beyond = app.keys.mint(2, gavel::auth::Role::Bidder, Duration::from_secs(2 * 3600)).0;
    let me = |token: String| {
        let request = app.client.get(app.url("/api/me/bids")).bearer_auth(token);
        async move { request.send().await.unwrap() }
    };
    assert_eq!(me(within).await.status(), StatusCode::OK);
    let refused = me(beyond).await;
    let problem = assert_problem(refused, StatusCode::UNAUTHORIZED, "/problems/unauthorized").await;
    assert!(problem["detail"].as_str().unwrap().contains("--session-ttl"), "{problem}");
}

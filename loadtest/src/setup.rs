//! Everything before the clock starts: the accounts and their tokens, seeding the
//! auctions and stock the scenarios need, and finding the open auctions to use.
//!
//! Seeding goes through the public API, so it works against any gavel, and is
//! idempotent: accounts that exist are logged in, auctions are created only up to
//! the number asked for, and stocking a sku that exists restocks it.

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::time::{Duration, SystemTime};

use anyhow::{Context, bail};
use serde_json::{Value, json};

use crate::http::{Conn, Fault, Target, write_request};

/// The roles the generator acts as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Bidder,
    Seller,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Bidder => "bidder",
            Role::Seller => "seller",
        }
    }
}

/// Mints tokens as gavel does (HS256 with the issuer and claims its `auth` module
/// checks), given the server's secret.
pub struct Minter(jsonwebtoken::EncodingKey);

impl Minter {
    pub fn new(secret: &str) -> Minter {
        Minter(jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()))
    }

    pub fn mint(&self, account_id: i64, role: Role, ttl: Duration) -> anyhow::Result<String> {
        #[derive(serde::Serialize)]
        struct Claims<'a> {
            sub: String,
            role: &'a str,
            iat: u64,
            exp: u64,
            iss: &'a str,
            /// A session of its own, as a log-in opens.
            jti: String,
            /// The session epoch of an account whose password never changed.
            sep: i32,
        }
        let now = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH)?.as_secs();
        let claims = Claims {
            sub: account_id.to_string(),
            role: role.as_str(),
            iat: now,
            exp: now + ttl.as_secs(),
            iss: "gavel",
            jti: uuid::Uuid::new_v4().to_string(),
            sep: 0,
        };
        Ok(jsonwebtoken::encode(&jsonwebtoken::Header::default(), &claims, &self.0)?)
    }
}
use crate::scenario::{Lot, sku_name};

/// Password of every account the generator registers.
const PASSWORD: &str = "loadtest-password";
/// Stock of each seeded sku: enough that orders never run a sku out.
const STOCK: i64 = 1_000_000_000;
/// How long seeded auctions stay open.
const AUCTION_LIFETIME: Duration = Duration::from_secs(30 * 24 * 3600);
/// Connections used to seed: enough to keep both of gavel's batchers busy.
const SEED_CONNECTIONS: usize = 16;
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

pub fn seller_email() -> String {
    "loadtest-seller@example.com".to_owned()
}

pub fn bidder_email(i: usize) -> String {
    format!("loadtest-bidder-{i}@example.com")
}

/// A request/response helper over one keep-alive connection, for set-up calls.
pub struct Api {
    target: Target,
    conn: Option<Conn>,
    buf: Vec<u8>,
}

impl Api {
    pub fn new(target: Target) -> Api {
        Api { target, conn: None, buf: Vec::new() }
    }

    /// Sends one request; returns the status and the body as JSON (`null` when the
    /// body is empty or not JSON). A connection the server closed while idle is
    /// reopened once.
    pub async fn call(
        &mut self,
        method: &str,
        path: &str,
        bearer: Option<&str>,
        body: Option<&Value>,
    ) -> anyhow::Result<(u16, Value)> {
        let body = body.map(|b| b.to_string());
        self.buf.clear();
        write_request(&mut self.buf, &self.target.authority, method, path, bearer, body.as_deref().map(str::as_bytes));
        for attempt in 0..2 {
            if self.conn.is_none() {
                let conn = Conn::connect(self.target.addr)
                    .await
                    .with_context(|| format!("cannot connect to {}", self.target.addr))?;
                self.conn = Some(conn);
            }
            let Some(conn) = self.conn.as_mut() else { continue };
            match conn.exchange(&self.buf, CALL_TIMEOUT).await {
                Ok(response) => {
                    let status = response.status;
                    let value = serde_json::from_slice(response.body).unwrap_or(Value::Null);
                    if conn.closing() {
                        self.conn = None;
                    }
                    return Ok((status, value));
                }
                Err(Fault::Io(_) | Fault::Reset(_)) if attempt == 0 => self.conn = None,
                Err(fault) => return Err(fault).with_context(|| format!("{method} {path}")),
            }
        }
        bail!("{method} {path}: the connection failed twice")
    }
}

/// An account and a token to act as it.
#[derive(Debug, Clone)]
pub struct Account {
    pub id: i64,
    pub token: String,
}

/// Logs in as `email`, registering it first if it does not exist. With `keys`, the
/// token used is minted here with the server's secret (valid for `ttl`), so a run
/// never depends on the server's session lifetime.
pub async fn account(
    api: &mut Api,
    email: &str,
    role: Role,
    keys: Option<&Minter>,
    ttl: Duration,
) -> anyhow::Result<Account> {
    let credentials = json!({ "email": email, "password": PASSWORD });
    let (mut status, mut session) = api.call("POST", "/api/sessions", None, Some(&credentials)).await?;
    if status == 401 {
        let registration = json!({ "email": email, "password": PASSWORD, "role": role.as_str() });
        let (s, body) = api.call("POST", "/api/accounts", None, Some(&registration)).await?;
        if s != 201 && s != 409 {
            bail!("registering {email} got {s}: {body}");
        }
        (status, session) = api.call("POST", "/api/sessions", None, Some(&credentials)).await?;
    }
    if status != 200 {
        bail!("logging in as {email} got {status}: {session}");
    }
    let id = session["account_id"].as_i64().context("the session has no account_id")?;
    if session["role"].as_str() != Some(role.as_str()) {
        bail!("{email} exists with role {}, not {}", session["role"], role.as_str());
    }
    let token = match keys {
        Some(keys) => keys.mint(id, role, ttl)?,
        None => session["token"].as_str().context("the session has no token")?.to_owned(),
    };
    Ok(Account { id, token })
}

/// The bidders `0..n`.
pub async fn bidders(api: &mut Api, n: usize, keys: Option<&Minter>, ttl: Duration) -> anyhow::Result<Vec<Account>> {
    let mut accounts = Vec::with_capacity(n);
    for i in 0..n {
        accounts.push(account(api, &bidder_email(i), Role::Bidder, keys, ttl).await?);
    }
    Ok(accounts)
}

/// An open auction as the list shows it.
#[derive(Debug, Clone, Copy)]
pub struct OpenAuction {
    pub lot: Lot,
    pub seller_id: i64,
}

/// Up to `max` open auctions, oldest first.
pub async fn open_auctions(api: &mut Api, max: usize) -> anyhow::Result<Vec<OpenAuction>> {
    let mut found = Vec::new();
    let mut after: Option<i64> = None;
    while found.len() < max {
        let path = match after {
            Some(a) => format!("/api/auctions?status=open&limit=100&after={a}"),
            None => "/api/auctions?status=open&limit=100".to_owned(),
        };
        let (status, page) = api.call("GET", &path, None, None).await?;
        if status != 200 {
            bail!("GET {path} got {status}: {page}");
        }
        let items = page["items"].as_array().with_context(|| format!("GET {path}: no items in {page}"))?;
        for item in items.iter().take(max - found.len()) {
            found.push(OpenAuction { lot: lot_of(item)?, seller_id: item["seller_id"].as_i64().unwrap_or(0) });
        }
        match page["next_after"].as_i64() {
            Some(next) => after = Some(next),
            None => break,
        }
    }
    Ok(found)
}

fn lot_of(auction: &Value) -> anyhow::Result<Lot> {
    let id = auction["id"].as_i64().with_context(|| format!("an auction without an id: {auction}"))?;
    let min_next_bid = auction["min_next_bid"].as_i64().with_context(|| format!("auction {id} has no min_next_bid"))?;
    Ok(Lot { id, min_next_bid })
}

/// The given auctions, with the minimum bid each takes now: read from the
/// database, not a cache. A bid written by anyone but gavel (the comparison's
/// pgbench) is announced to no cache, and bids rising from a stale minimum
/// would be refused until their amounts caught up.
pub async fn lots(api: &mut Api, ids: &[i64]) -> anyhow::Result<Vec<Lot>> {
    let mut lots = Vec::with_capacity(ids.len());
    for id in ids {
        let path = format!("/api/auctions/{id}?consistent=true");
        let (status, auction) = api.call("GET", &path, None, None).await?;
        if status != 200 {
            bail!("GET {path} got {status}: {auction}");
        }
        lots.push(Lot { id: *id, min_next_bid: lot_of(&auction)?.min_next_bid });
    }
    Ok(lots)
}

/// What to seed.
#[derive(Debug, Clone)]
pub struct SeedPlan {
    pub target: Target,
    /// Open auctions the seller should have.
    pub auctions: usize,
    pub skus: u32,
    pub bidders: usize,
}

/// What seeding found and did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Seeded {
    pub seller_id: i64,
    pub auctions_found: usize,
    pub auctions_created: usize,
    pub skus: u32,
    pub bidders: usize,
}

/// Seeds `plan`; runs inside a [`tokio::task::LocalSet`].
pub async fn seed(plan: &SeedPlan) -> anyhow::Result<Seeded> {
    let mut api = Api::new(plan.target.clone());
    let ttl = Duration::from_secs(3600);
    let seller = account(&mut api, &seller_email(), Role::Seller, None, ttl).await?;
    bidders(&mut api, plan.bidders, None, ttl).await?;

    let mine = open_auctions(&mut api, usize::MAX).await?.into_iter().filter(|a| a.seller_id == seller.id).count();
    let missing = plan.auctions.saturating_sub(mine);
    let now = SystemTime::now();
    let auction = json!({
        "title": "loadtest lot",
        "reserve": 100,
        "min_increment": 1,
        "starts_at": humantime::format_rfc3339_seconds(now - Duration::from_secs(60)).to_string(),
        "ends_at": humantime::format_rfc3339_seconds(now + AUCTION_LIFETIME).to_string(),
    })
    .to_string();
    let authority = plan.target.authority.clone();
    let token = seller.token.clone();
    fan_out(&plan.target, missing, move |_, out| {
        write_request(out, &authority, "POST", "/api/auctions", Some(&token), Some(auction.as_bytes()));
    })
    .await
    .context("creating auctions")?;

    let stock = json!({ "title": "loadtest stock", "available": STOCK }).to_string();
    let authority = plan.target.authority.clone();
    let token = seller.token.clone();
    fan_out(&plan.target, plan.skus as usize, move |i, out| {
        let path = format!("/api/inventory/{}", sku_name(i as u32 + 1));
        write_request(out, &authority, "PUT", &path, Some(&token), Some(stock.as_bytes()));
    })
    .await
    .context("stocking skus")?;

    Ok(Seeded {
        seller_id: seller.id,
        auctions_found: mine,
        auctions_created: missing,
        skus: plan.skus,
        bidders: plan.bidders,
    })
}

/// How often seeding sends a request again that the server shed (503).
const SHED_RETRIES: u32 = 8;

/// Sends requests `0..count` (made by `make`) over a few connections at once; fails
/// with the first response that is not a 2xx (after [`SHED_RETRIES`] for a 503).
async fn fan_out(target: &Target, count: usize, make: impl Fn(usize, &mut Vec<u8>) + 'static) -> anyhow::Result<()> {
    let next = Rc::new(Cell::new(0usize));
    let failure: Rc<RefCell<Option<anyhow::Error>>> = Rc::default();
    let make = Rc::new(make);
    let mut tasks = Vec::new();
    for _ in 0..SEED_CONNECTIONS.min(count) {
        let (next, failure, make, target) = (Rc::clone(&next), Rc::clone(&failure), Rc::clone(&make), target.clone());
        tasks.push(tokio::task::spawn_local(async move {
            let mut conn = match Conn::connect(target.addr).await {
                Ok(c) => c,
                Err(e) => {
                    *failure.borrow_mut() = Some(anyhow::Error::new(e).context("cannot connect"));
                    return;
                }
            };
            let mut buf = Vec::new();
            while failure.borrow().is_none() {
                let i = next.get();
                if i >= count {
                    break;
                }
                next.set(i + 1);
                buf.clear();
                make(i, &mut buf);
                let mut attempt = 0;
                let outcome = loop {
                    match conn.exchange(&buf, CALL_TIMEOUT).await {
                        Ok(r) if (200..300).contains(&r.status) => break Ok(()),
                        // A server shedding load (503) did not do the request: wait and
                        // send it again, a few times, before giving up.
                        Ok(r) if r.status == 503 && attempt < SHED_RETRIES => {}
                        Ok(r) => break Err(anyhow::anyhow!("got {}: {}", r.status, String::from_utf8_lossy(r.body))),
                        Err(fault) => break Err(anyhow::Error::new(fault)),
                    }
                    attempt += 1;
                    tokio::time::sleep(Duration::from_millis(20 << attempt.min(5))).await;
                };
                if let Err(e) = outcome {
                    *failure.borrow_mut() = Some(e);
                    break;
                }
                if conn.closing() {
                    match Conn::connect(target.addr).await {
                        Ok(c) => conn = c,
                        Err(e) => {
                            *failure.borrow_mut() = Some(e.into());
                            break;
                        }
                    }
                }
            }
        }));
    }
    for task in tasks {
        task.await.context("a seeding task panicked")?;
    }
    match failure.take() {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

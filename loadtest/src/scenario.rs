//! The scenarios: what each connection sends next.
//!
//! A [`Workload`] holds what a run found or was given before the clock started (the
//! open auctions and their prices, the bidders' tokens, the sku count); each
//! connection makes its own [`Generator`] from it, with its own random numbers, so
//! nothing is shared between connections while the run is timed.

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use crate::http::write_request;
use crate::stats::Kind;

/// The scenarios `run` offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Scenario {
    /// `GET /api/auctions/{id}`, random ids over the open auctions.
    AuctionRead,
    /// `POST /api/bids` with amounts that rise with time, so most are accepted.
    BidStorm,
    /// `GET /api/inventory/{sku}`, random skus over the seeded ones.
    InventoryRead,
    /// `POST /api/orders` of one to three lines of quantity 1 over the seeded skus.
    Orders,
    /// A weighted blend of the four (`--mix`).
    Mixed,
    /// `POST /api/auctions` as the seeded seller: auctions that open `--churn-lead`
    /// after they are created and close `--churn-lifetime` later, so that a run at
    /// `--rate R` keeps R auctions a second opening and closing (the soak's churn).
    Churn,
}

impl Scenario {
    pub fn name(self) -> &'static str {
        match self {
            Scenario::AuctionRead => "auction-read",
            Scenario::BidStorm => "bid-storm",
            Scenario::InventoryRead => "inventory-read",
            Scenario::Orders => "orders",
            Scenario::Mixed => "mixed",
            Scenario::Churn => "churn",
        }
    }

    /// The kinds of request the scenario sends, with their weights.
    pub fn kinds(self, mix: &Mix) -> Vec<(Kind, u32)> {
        match self {
            Scenario::AuctionRead => vec![(Kind::AuctionRead, 1)],
            Scenario::BidStorm => vec![(Kind::Bid, 1)],
            Scenario::InventoryRead => vec![(Kind::InventoryRead, 1)],
            Scenario::Orders => vec![(Kind::Order, 1)],
            Scenario::Mixed => mix.0.iter().copied().filter(|(_, w)| *w > 0).collect(),
            Scenario::Churn => vec![(Kind::CreateAuction, 1)],
        }
    }
}

/// Weights of the mixed scenario, `auction-read=75,bid=15,inventory-read=7,order=3`
/// by default: a real-time bidding workload is mostly bidders polling the auctions
/// they follow, a bid for every few reads, and a little shopping.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mix(pub Vec<(Kind, u32)>);

impl Default for Mix {
    fn default() -> Self {
        Mix(vec![(Kind::AuctionRead, 75), (Kind::Bid, 15), (Kind::InventoryRead, 7), (Kind::Order, 3)])
    }
}

impl std::str::FromStr for Mix {
    type Err = String;

    fn from_str(s: &str) -> Result<Mix, String> {
        let mut weights = Vec::new();
        for part in s.split(',') {
            let (name, weight) = part.split_once('=').ok_or_else(|| format!("{part:?} is not kind=weight"))?;
            let kind = Kind::ALL.into_iter().find(|k| k.name() == name.trim()).ok_or_else(|| {
                format!("unknown kind {name:?}: auction-read, bid, inventory-read, order or create-auction")
            })?;
            let weight = weight.trim().parse::<u32>().map_err(|_| format!("{weight:?} is not a whole weight"))?;
            weights.push((kind, weight));
        }
        if weights.iter().all(|(_, w)| *w == 0) {
            return Err("at least one weight must be above zero".into());
        }
        Ok(Mix(weights))
    }
}

/// An open auction a bid may target, with the lowest bid it took when the run began.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lot {
    pub id: i64,
    pub min_next_bid: i64,
}

/// The auctions the churn creates: as whom, and when they open and close.
#[derive(Debug, Clone)]
pub struct Churn {
    /// The seller's bearer token.
    pub seller: String,
    /// From creation to opening: ahead of the clock, as sellers schedule auctions.
    pub lead: Duration,
    /// From opening to closing.
    pub lifetime: Duration,
}

/// Everything the connections draw requests from.
#[derive(Debug)]
pub struct Workload {
    /// Cumulative weights over the kinds this run sends.
    kinds: Vec<(Kind, u32)>,
    /// Auctions read, and (the first `hot` of them) bid on.
    lots: Vec<Lot>,
    hot: usize,
    skus: u32,
    /// Bearer tokens of the bidders; connection `i` bids as bidder `i % len`.
    bidders: Vec<String>,
    /// Bid amounts rise by one per microsecond since this instant, from each lot's
    /// minimum: later bids beat earlier ones, whichever connection sends them.
    epoch: Instant,
    churn: Option<Churn>,
}

impl Workload {
    /// `hot`: how many of the lots bids go to (0: all of them).
    pub fn new(kinds: Vec<(Kind, u32)>, lots: Vec<Lot>, hot: usize, skus: u32, bidders: Vec<String>) -> Workload {
        let mut total = 0;
        let kinds = kinds
            .into_iter()
            .map(|(k, w)| {
                total += w;
                (k, total)
            })
            .collect();
        let hot = if hot == 0 { lots.len() } else { hot.min(lots.len()) };
        Workload { kinds, lots, hot, skus, bidders, epoch: Instant::now(), churn: None }
    }

    /// The auctions read and bid on.
    pub fn lots(&self) -> &[Lot] {
        &self.lots
    }

    /// The instant bid amounts rise from, one per microsecond.
    pub fn epoch(&self) -> Instant {
        self.epoch
    }

    /// Adds what `create-auction` requests need.
    pub fn with_churn(self, churn: Churn) -> Workload {
        Workload { churn: Some(churn), ..self }
    }

    /// The generator for connection `index`.
    pub fn generator(self: &Arc<Self>, index: usize, seed: u64) -> Generator {
        let token = if self.bidders.is_empty() { None } else { Some(index % self.bidders.len()) };
        Generator {
            work: Arc::clone(self),
            rng: SmallRng::seed_from_u64(seed ^ (index as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)),
            token,
            path: String::with_capacity(64),
            body: String::with_capacity(128),
        }
    }
}

/// One connection's source of requests.
#[derive(Debug)]
pub struct Generator {
    work: Arc<Workload>,
    rng: SmallRng,
    token: Option<usize>,
    path: String,
    body: String,
}

impl Generator {
    /// Appends the next request to `out` and says what kind it is.
    pub fn next(&mut self, authority: &str, out: &mut Vec<u8>) -> Kind {
        let kind = self.pick();
        self.path.clear();
        self.body.clear();
        let bearer = self.token.map(|i| self.work.bidders[i].as_str());
        match kind {
            Kind::AuctionRead => {
                let lot = self.work.lots[self.rng.gen_range(0..self.work.lots.len())];
                let _ = write!(self.path, "/api/auctions/{}", lot.id);
                write_request(out, authority, "GET", &self.path, None, None);
            }
            Kind::InventoryRead => {
                let _ = write!(self.path, "/api/inventory/{SKU_PREFIX}{}", self.rng.gen_range(1..=self.work.skus));
                write_request(out, authority, "GET", &self.path, None, None);
            }
            Kind::Bid => {
                let lot = self.work.lots[self.rng.gen_range(0..self.work.hot)];
                let rise = i64::try_from(self.work.epoch.elapsed().as_micros()).unwrap_or(i64::MAX / 2);
                let _ = write!(self.body, r#"{{"auction_id":{},"amount":{}}}"#, lot.id, lot.min_next_bid + rise);
                write_request(out, authority, "POST", "/api/bids", bearer, Some(self.body.as_bytes()));
            }
            Kind::Order => {
                let lines = self.rng.gen_range(1..=3u32.min(self.work.skus));
                let first = self.rng.gen_range(1..=self.work.skus);
                self.body.push_str(r#"{"lines":["#);
                for i in 0..lines {
                    // Consecutive skus from a random start: distinct within the order.
                    let sku = (first - 1 + i) % self.work.skus + 1;
                    let comma = if i > 0 { "," } else { "" };
                    let _ = write!(self.body, r#"{comma}{{"sku":"{SKU_PREFIX}{sku}","quantity":1}}"#);
                }
                self.body.push_str("]}");
                write_request(out, authority, "POST", "/api/orders", bearer, Some(self.body.as_bytes()));
            }
            Kind::CreateAuction => {
                let churn = self.work.churn.as_ref().expect("churn workloads carry a churn");
                let opens = SystemTime::now() + churn.lead;
                let _ = write!(
                    self.body,
                    r#"{{"title":"churn lot","reserve":100,"min_increment":1,"starts_at":"{}","ends_at":"{}"}}"#,
                    humantime::format_rfc3339_millis(opens),
                    humantime::format_rfc3339_millis(opens + churn.lifetime)
                );
                let seller = Some(churn.seller.as_str());
                write_request(out, authority, "POST", "/api/auctions", seller, Some(self.body.as_bytes()));
            }
        }
        kind
    }

    fn pick(&mut self) -> Kind {
        let kinds = &self.work.kinds;
        if kinds.len() == 1 {
            return kinds[0].0;
        }
        let total = kinds.last().map_or(1, |(_, t)| *t);
        let roll = self.rng.gen_range(0..total);
        kinds.iter().find(|(_, upto)| roll < *upto).map_or(kinds[0].0, |(k, _)| *k)
    }
}

/// Seeded skus are named `lt-1`, `lt-2`, …
pub const SKU_PREFIX: &str = "lt-";

/// The name of the `n`th seeded sku (from 1).
pub fn sku_name(n: u32) -> String {
    format!("{SKU_PREFIX}{n}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn workload(scenario: Scenario, hot: usize) -> Arc<Workload> {
        let lots = (1..=10).map(|id| Lot { id, min_next_bid: 100 * id }).collect();
        Arc::new(Workload::new(scenario.kinds(&Mix::default()), lots, hot, 50, vec!["t0".into(), "t1".into()]))
    }

    fn text(g: &mut Generator) -> (Kind, String) {
        let mut out = Vec::new();
        let kind = g.next("h", &mut out);
        (kind, String::from_utf8(out).unwrap())
    }

    #[test]
    fn bids_go_to_the_hot_lots_with_rising_amounts_above_their_minimum() {
        let work = workload(Scenario::BidStorm, 2);
        let mut g = work.generator(1, 7);
        let mut last = [0i64; 3];
        for _ in 0..200 {
            let (kind, req) = text(&mut g);
            assert_eq!(kind, Kind::Bid);
            assert!(req.contains("authorization: Bearer t1\r\n"), "{req}");
            let body: serde_json::Value = serde_json::from_str(req.split("\r\n\r\n").nth(1).unwrap()).unwrap();
            let id = body["auction_id"].as_i64().unwrap();
            let amount = body["amount"].as_i64().unwrap();
            assert!(id == 1 || id == 2, "bid on cold lot {id}");
            assert!(amount >= 100 * id && amount >= last[id as usize], "amount {amount} fell");
            last[id as usize] = amount;
        }
    }

    #[test]
    fn orders_name_distinct_seeded_skus() {
        let work = workload(Scenario::Orders, 0);
        let mut g = work.generator(0, 1);
        for _ in 0..200 {
            let (_, req) = text(&mut g);
            let body: serde_json::Value = serde_json::from_str(req.split("\r\n\r\n").nth(1).unwrap()).unwrap();
            let skus: Vec<&str> =
                body["lines"].as_array().unwrap().iter().map(|l| l["sku"].as_str().unwrap()).collect();
            assert!((1..=3).contains(&skus.len()));
            let mut unique = skus.clone();
            unique.sort();
            unique.dedup();
            assert_eq!(unique.len(), skus.len(), "{skus:?}");
            for sku in skus {
                let n: u32 = sku.strip_prefix("lt-").unwrap().parse().unwrap();
                assert!((1..=50).contains(&n));
            }
        }
    }

    #[test]
    fn the_mix_follows_its_weights() {
        let work = workload(Scenario::Mixed, 0);
        let mut g = work.generator(0, 3);
        let mut counts = [0u32; 4];
        for _ in 0..10_000 {
            counts[text(&mut g).0 as usize] += 1;
        }
        // 75/15/7/3 of 10 000, within a generous margin.
        assert!((7_200..7_800).contains(&counts[0]), "{counts:?}");
        assert!((1_300..1_700).contains(&counts[1]), "{counts:?}");
        assert!((550..850).contains(&counts[2]), "{counts:?}");
        assert!((200..400).contains(&counts[3]), "{counts:?}");
    }

    #[test]
    fn churned_auctions_open_after_the_lead_and_close_after_the_lifetime() {
        let churn = Churn { seller: "s".into(), lead: Duration::from_secs(1), lifetime: Duration::from_secs(5) };
        let kinds = Scenario::Churn.kinds(&Mix::default());
        let work = Arc::new(Workload::new(kinds, Vec::new(), 0, 1, Vec::new()).with_churn(churn));
        let before = SystemTime::now();
        let (kind, req) = text(&mut work.generator(0, 1));
        assert_eq!(kind, Kind::CreateAuction);
        assert!(req.starts_with("POST /api/auctions HTTP/1.1\r\n") && req.contains("Bearer s\r\n"), "{req}");
        let body: serde_json::Value = serde_json::from_str(req.split("\r\n\r\n").nth(1).unwrap()).unwrap();
        let at = |field: &str| humantime::parse_rfc3339(body[field].as_str().unwrap()).unwrap();
        let lead = at("starts_at").duration_since(before).unwrap();
        assert!((Duration::from_millis(990)..Duration::from_millis(1100)).contains(&lead), "{lead:?}");
        assert_eq!(at("ends_at").duration_since(at("starts_at")).unwrap(), Duration::from_secs(5));
    }

    #[test]
    fn mixes_parse_and_refuse_nonsense() {
        assert_eq!("bid=1,order=0".parse::<Mix>().unwrap(), Mix(vec![(Kind::Bid, 1), (Kind::Order, 0)]));
        assert!("bid".parse::<Mix>().is_err());
        assert!("bids=1".parse::<Mix>().is_err());
        assert!("bid=x".parse::<Mix>().is_err());
        assert!("bid=0".parse::<Mix>().is_err());
    }
}

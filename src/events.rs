//! Live event streams (Server-Sent Events), served from one core's notifications.
//!
//! Each core owns one [`Hub`]. A stream subscribes to auctions; the hub keeps,
//! per watched auction, its newest state (a *topic*), fed by the same
//! notifications as the core's cache ([`Hub::apply`], called by the cache
//! listener). A change is rendered once per version into an SSE frame, shared by
//! every watcher, and left in each watcher's [`Mailbox`]: at most one pending
//! frame per auction, so a watcher that reads slowly or not at all holds at most
//! the newest state of each auction it watches (older ones are *coalesced* away,
//! and counted) and delays nobody. A stream holds no database connection; opening
//! one reads the auction from the cache, or from the database like a cache miss.
//!
//! The frames:
//!
//! ```text
//! event: auction            every state of a watched auction, oldest first
//! id: <version>
//! data: <the auction's JSON, as GET /api/auctions/{id} answers it>
//!
//! event: closed             its final state, winner included; the last event of
//! id: <version>             that auction (a single-auction stream then ends)
//! data: <the auction's JSON>
//!
//! event: outbid             personal streams (`GET /api/me/events`): a bid took
//! id: <version>             the account's lead on an auction
//! data: {auction_id, high_bid, min_next_bid, ends_at}
//!
//! event: won | lost         personal streams: an auction the account bid on closed
//! id: <version>
//! data: {auction_id, high_bid}
//!
//! event: order              personal streams: one of the account's orders was
//! id: <updated_at, µs>      placed (reserved), cancelled or fulfilled
//! data: {order_id, status}
//!
//! : heartbeat               every --stream-heartbeat, so proxies keep it open
//!
//! retry: <ms>               on shutdown, before the stream ends
//! ```

use std::collections::{HashMap, VecDeque};
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use http_body::{Body, Frame, SizeHint};
use smallvec::SmallVec;

use crate::auth::Session;
use crate::db::notice::{Ended, Notice, OrderChange, SessionEnd};
use crate::domain::auction::{Auction, BidState, Outbid};
use crate::domain::stock::OrderStatus;
use crate::metrics::{EventKind, StreamMetrics};

/// How often the delivery budget (`--stream-events-per-sec`) is refilled.
pub const DELIVERY_TICK: Duration = Duration::from_millis(10);

/// A delivery pass that hands out at least this many events makes the next pass
/// wait until [`DELIVERY_PACE`] after its own start; a smaller one lets the next
/// go as soon as there is a change.
const PACED_PASS: usize = 32;

/// How often a core hands out events while its streams are many: each pass gives
/// every watcher the newest state of each auction that changed since the last
/// (as far as the budget goes), and a connection's streams then share one
/// write. With a pass per change (one topic's watchers at a time), an HTTP/2
/// connection carrying 100 streams of 100 auctions wrote each event alone:
/// 10,000 streams over 100 auctions, 2,000 bids/s, `--stream-events-per-sec 0`,
/// 2026-11-30 (`gavel-loadtest watch
/// --http2-streams 100`, the README's table): 121K events/s received, 60K
/// writes/s; paced every 5 ms, 161–165K events/s, delivery p99 61–68 ms against
/// 106 ms, gavel's CPU per event 5.3–6.3 µs against 8.0. Every 2 ms and every
/// 10 ms measured the same within the runs' spread (168K and 159K events/s, p99
/// 57 and 58 ms); every 20 ms coalesced more (143K/s, p99 69 ms).
const DELIVERY_PACE: Duration = Duration::from_millis(5);

/// Streams a delivery pass wakes before it lets the core's other tasks run:
/// tokio runs a core's tasks first come, first served, so a bid's request, its
/// batch and its database round trips, woken while a pass wakes thousands of
/// streams, each waited behind all of them. The pass wakes its streams a
/// connection at a time, so that a connection's streams still share its write,
/// and yields once at least this many are woken. 10,000 HTTP/2 streams over 100
/// auctions at 2,000 bids/s (`gavel-loadtest watch --http2-streams 100`, five
/// runs each, alternating, 2026-12-01, on a busy machine), against waking a
/// whole pass at once: the bids answered in p50 7.5–9.8 ms against 10.7–12.0
/// (p99 21–30 against 32–38); 137–158K events a second received against
/// 112–142K and delivery p99 from the bid's send 72–91 ms against 83–115,
/// ranges that overlap. A slice of 16 was no better (p50 7.4–8.8 ms, 101–139K
/// events a second).
const WAKE_SLICE: usize = 64;

/// How a core renders an auction as JSON (the body of `GET /api/auctions/{id}`).
pub type Render = fn(&Auction, DateTime<Utc>) -> Vec<u8>;

/// The limits of a core's streams.
#[derive(Debug, Clone, Copy)]
pub struct StreamLimits {
    /// Streams a core keeps open at once; past it a new one gets 503.
    pub max_streams: usize,
    /// How often an idle stream gets a comment line.
    pub heartbeat: Duration,
    /// The reconnection delay a stream suggests when the server shuts down.
    pub retry: Duration,
    /// Events a core hands its streams per second at most (0: no limit). Past it,
    /// changes wait for the next tick and coalesce, so that the fan-out cannot
    /// take the CPU that bids need.
    pub events_per_sec: usize,
    /// Whether the budget follows the core's bid backlog ([`Share`]); off, it
    /// stays `events_per_sec`.
    pub yield_to_bids: bool,
}

impl Default for StreamLimits {
    fn default() -> Self {
        StreamLimits {
            max_streams: 10_000,
            heartbeat: Duration::from_secs(15),
            retry: Duration::from_secs(1),
            events_per_sec: 0,
            yield_to_bids: false,
        }
    }
}

/// Why a stream was not opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// The core has `max_streams` open.
    Full,
    /// The server is shutting down.
    Draining,
}

/// One rendered event, shared by every watcher of its auction.
#[derive(Debug, Clone)]
struct Event {
    kind: EventKind,
    version: i64,
    frame: Bytes,
    /// When the change was announced (epoch µs), for the delivery lag; 0 for a
    /// stream's first state, which is no change.
    at_us: i64,
}

/// An auction someone on this core watches, and who.
#[derive(Default)]
struct Topic {
    /// Its newest state; `None` until its first load has been installed.
    state: Option<Auction>,
    /// The newest version announced while it had no state: a load older than this
    /// missed a change and must be read again.
    missed: i64,
    /// The newest state, rendered; cleared when the state changes.
    event: Option<Event>,
    /// When its newest change was announced (epoch µs).
    changed_at_us: i64,
    /// Its newest change waits in the hub's queue for delivery.
    queued: bool,
    /// Streams being opened on it ([`Opening`]): while any is, the topic stays,
    /// closed or unwatched.
    opening: usize,
    /// The notifications were interrupted while it had no state: a load begun
    /// before may have missed a change nobody announced, and is read again.
    interrupted: bool,
    watchers: Vec<(u64, Arc<Mailbox>)>,
}

impl Topic {
    /// The event of the current state, rendered now if it was not yet (timing
    /// nothing: a delivery sets the change's time on its copy).
    fn event(&mut self, render: Render) -> Option<Event> {
        let state = self.state.as_ref()?;
        if self.event.is_none() {
            let kind = if state.closed { EventKind::Closed } else { EventKind::Auction };
            self.event = Some(Event::new(kind, state.version, &render(state, Utc::now()), 0));
        }
        self.event.clone()
    }
}

impl Event {
    /// The one place an SSE frame is written: `event:` its kind, `id:` the
    /// auction's version, `data:` one line of JSON.
    fn new(kind: EventKind, version: i64, data: &[u8], at_us: i64) -> Event {
        let version_text = version.to_string();
        let mut out = Vec::with_capacity(data.len() + version_text.len() + 32);
        for part in
            [b"event: ", kind.label().as_bytes(), b"\nid: ", version_text.as_bytes(), b"\ndata: ", data, b"\n\n"]
        {
            out.extend_from_slice(part);
        }
        Event { kind, version, frame: Bytes::from(out), at_us }
    }
}

/// The data of an `outbid` event: the auction as the bid that took the lead
/// left it.
#[derive(serde::Serialize)]
struct OutbidData {
    auction_id: i64,
    high_bid: i64,
    min_next_bid: i64,
    ends_at: DateTime<Utc>,
}

/// The data of a `won` or `lost` event.
#[derive(serde::Serialize)]
struct EndedData {
    auction_id: i64,
    high_bid: Option<i64>,
}

/// The data of an `order` event.
#[derive(serde::Serialize)]
struct OrderData {
    order_id: i64,
    status: OrderStatus,
}

/// Serialising plain data into memory cannot fail.
fn json(value: &impl serde::Serialize) -> Vec<u8> {
    serde_json::to_vec(value).unwrap_or_else(|_| b"null".to_vec())
}

struct Inner {
    topics: HashMap<i64, Topic>,
    /// The personal streams of each account with one open on this core.
    accounts: HashMap<i64, Vec<Personal>>,
    /// Topics whose newest change is not yet with their watchers, oldest first.
    queue: VecDeque<i64>,
    /// Every open stream, for heartbeats and the drain.
    streams: HashMap<u64, Arc<Mailbox>>,
    /// The auctions a stream being opened is reading from the database, each with
    /// what the other streams opening on it wait for: `true` once the read
    /// settled the auction, closed if the read ended without doing so.
    reading: HashMap<i64, tokio::sync::watch::Receiver<bool>>,
    /// Slots taken by streams being opened or open.
    reserved: usize,
    next: u64,
    draining: bool,
}

impl Inner {
    fn new_id(&mut self) -> u64 {
        self.next += 1;
        self.next
    }
}

/// One core's streams and the auctions they watch.
pub struct Hub {
    limits: StreamLimits,
    render: Render,
    metrics: StreamMetrics,
    /// Wakes the delivery task when a change is queued.
    wake: tokio::sync::Notify,
    inner: Mutex<Inner>,
}

impl std::fmt::Debug for Hub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let inner = self.lock();
        f.debug_struct("Hub").field("streams", &inner.streams.len()).field("topics", &inner.topics.len()).finish()
    }
}

impl Hub {
    pub fn new(limits: StreamLimits, render: Render, metrics: StreamMetrics) -> Self {
        Hub {
            limits,
            render,
            metrics,
            wake: tokio::sync::Notify::new(),
            inner: Mutex::new(Inner {
                topics: HashMap::new(),
                accounts: HashMap::new(),
                queue: VecDeque::new(),
                streams: HashMap::new(),
                reading: HashMap::new(),
                reserved: 0,
                next: 0,
                draining: false,
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // Only this core's thread takes the lock, and nothing panics while holding
        // it half-way through a change.
        self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Takes a stream slot, or says why not.
    pub fn reserve(self: &Arc<Self>) -> Result<Slot, Refused> {
        let mut inner = self.lock();
        if inner.draining {
            return Err(Refused::Draining);
        }
        if inner.reserved >= self.limits.max_streams {
            return Err(Refused::Full);
        }
        inner.reserved += 1;
        Ok(Slot { hub: Some(self.clone()) })
    }

    /// Begins opening a stream of `ids`: returns the [`Opening`] to subscribe
    /// with, and those of the ids whose state this hub does not hold yet, or holds
    /// open past its end at `now` (its close may not have been heard here yet):
    /// the caller reads them. Each has a topic from now on, kept until the
    /// `Opening` is used or dropped, so a change announced while the caller reads
    /// it is noticed.
    pub fn opening(self: &Arc<Self>, ids: &[i64], now: DateTime<Utc>) -> (Opening, Vec<i64>) {
        let mut inner = self.lock();
        let mut unknown = Vec::new();
        for id in ids {
            let topic = inner.topics.entry(*id).or_default();
            topic.opening += 1;
            if topic.state.as_ref().is_none_or(|s| s.close_unheard(now)) {
                unknown.push(*id);
            }
        }
        (Opening { hub: self.clone(), ids: ids.to_vec() }, unknown)
    }

    /// Of the `ids` a stream being opened has to read ([`Hub::opening`], then a
    /// cache miss): those it reads itself, claimed until the [`Reading`] drops,
    /// and, for those another stream of this core is reading already, that read
    /// to wait for instead ([`Waiting`]). A crowd of watchers opening on one
    /// auction whose state this core does not hold (after a restart, every
    /// auction) costs one read: before, each read it, and 10,000 HTTP/1.1 streams
    /// opening 512 at a time on 100 cold auctions were shed as overloaded once the
    /// core's pool was busy past `--db-acquire-timeout` (`gavel-loadtest watch
    /// --streams 10000`, 2026-11-30: 82 and 163 of them in two runs; none since).
    pub fn claim(self: &Arc<Self>, ids: Vec<i64>) -> (Reading, Vec<Waiting>) {
        let mut inner = self.lock();
        let (mut mine, mut settle, mut theirs) = (Vec::new(), Vec::new(), Vec::new());
        for id in ids {
            match inner.reading.get(&id) {
                Some(read) => theirs.push(Waiting { id, read: read.clone() }),
                None => {
                    let (tx, rx) = tokio::sync::watch::channel(false);
                    inner.reading.insert(id, rx);
                    mine.push(id);
                    settle.push(tx);
                }
            }
        }
        (Reading { hub: self.clone(), ids: mine, settle }, theirs)
    }

    /// Installs states read by the caller of [`Hub::opening`]. Returns the ids
    /// whose read missed a change announced meanwhile: read them again.
    pub fn install(&self, auctions: Vec<Auction>) -> Vec<i64> {
        let mut inner = self.lock();
        let mut again = Vec::new();
        let now_us = Utc::now().timestamp_micros();
        for a in auctions {
            let Some(topic) = inner.topics.get_mut(&a.id) else { continue };
            let interrupted = std::mem::take(&mut topic.interrupted);
            if interrupted || a.version < topic.missed {
                again.push(a.id);
                continue;
            }
            // Newer than a held state (a close this core had not heard): a change
            // for the stream's fellow watchers too.
            self.update(&mut inner, a.id, now_us, |topic| match &topic.state {
                Some(held) if a.version <= held.version => false,
                _ => {
                    topic.state = Some(a);
                    true
                }
            });
        }
        again
    }

    /// Opens a stream of `ids`, whose states the hub holds (ids it does not hold
    /// are returned: they do not exist). With `last_version` (a single auction's
    /// `Last-Event-ID`), the current state is not sent again if it is that version.
    pub fn subscribe(
        self: &Arc<Self>,
        slot: Slot,
        mut opening: Opening,
        last_version: Option<i64>,
        connection: Connection,
    ) -> Result<EventStream, Vec<i64>> {
        let ids = std::mem::take(&mut opening.ids);
        drop(opening);
        let ids = &ids[..];
        let mut inner = self.lock();
        for id in ids {
            if let Some(topic) = inner.topics.get_mut(id) {
                topic.opening -= 1;
            }
        }
        let missing: Vec<i64> =
            ids.iter().copied().filter(|id| inner.topics.get(id).is_none_or(|t| t.state.is_none())).collect();
        if !missing.is_empty() {
            for id in ids {
                forget_if_idle(&mut inner.topics, *id);
            }
            return Err(missing);
        }
        let mailbox = Arc::new(Mailbox { connection, ..Mailbox::default() });
        let id = inner.new_id();
        let mut watching = Vec::with_capacity(ids.len());
        {
            let mut pending = mailbox.lock();
            if let Some(version) = last_version {
                pending.sent.extend(ids.iter().map(|id| (Subject::Auction(*id), version)));
            }
            for auction in ids {
                let Some(topic) = inner.topics.get_mut(auction) else { continue };
                let event = topic.event(self.render);
                let closed = event.as_ref().is_some_and(|e| e.kind == EventKind::Closed);
                // The core may not have seen the version the client names yet: then
                // nothing is sent until a newer one.
                let subject = Subject::Auction(*auction);
                if let Some(event) = event
                    && (event.version > pending.sent_version(subject) || closed)
                {
                    pending.sent_now(subject, event.version);
                    pending.events.push((subject, event));
                }
                if closed {
                    forget_if_idle(&mut inner.topics, *auction);
                } else {
                    topic.watchers.push((id, mailbox.clone()));
                    watching.push(*auction);
                    pending.open += 1;
                }
            }
        }
        Ok(self.register(&mut inner, id, slot, mailbox, watching, None))
    }

    /// Counts stream `id` as open, with the slot it was reserved with.
    fn register(
        self: &Arc<Self>,
        inner: &mut Inner,
        id: u64,
        mut slot: Slot,
        mailbox: Arc<Mailbox>,
        watching: Vec<i64>,
        account: Option<i64>,
    ) -> EventStream {
        if inner.draining {
            // Opened after the drain began (it waited for a read meanwhile): ends
            // at once like the others.
            mailbox.lock().draining = true;
        }
        inner.streams.insert(id, mailbox.clone());
        slot.hub = None;
        self.metrics.open.increment(1.0);
        EventStream { hub: self.clone(), id, watching, account, mailbox, retry_sent: false }
    }

    /// Applies a notification to the watched auctions, and tells their watchers.
    pub fn apply(&self, notice: &Notice, at_us: i64) {
        let mut inner = self.lock();
        if !inner.accounts.is_empty() {
            match notice {
                Notice::Bids(states, outbid) => self.tell_outbid(&inner, states, outbid, at_us),
                Notice::Ended(ended) => self.tell_ended(&inner, ended, at_us),
                Notice::Order(order) => self.tell_order(&inner, order, at_us),
                Notice::SessionEnd(end) => {
                    drop(inner);
                    return self.end_session(end);
                }
                _ => {}
            }
        }
        if inner.topics.is_empty() {
            return;
        }
        match notice {
            Notice::Auction(a) => self.update(&mut inner, a.id, at_us, |topic| match &topic.state {
                Some(held) if a.version <= held.version => false,
                _ => {
                    topic.state = Some(a.clone());
                    true
                }
            }),
            Notice::Bids(states, _) => {
                for s in states {
                    self.update(&mut inner, s.auction_id, at_us, |topic| match &mut topic.state {
                        Some(held) if s.version > held.version => {
                            held.apply_bid(s);
                            true
                        }
                        Some(_) => false,
                        None => {
                            topic.missed = topic.missed.max(s.version);
                            false
                        }
                    });
                }
            }
            Notice::Inventory(_) | Notice::Ended(_) | Notice::Order(_) | Notice::SessionEnd(_) => {}
        }
    }

    /// Runs `change` on the topic of `auction`, if watched; if it changed the
    /// state, renders it and leaves it with every watcher.
    fn update(&self, inner: &mut Inner, auction: i64, at_us: i64, change: impl FnOnce(&mut Topic) -> bool) {
        let Some(topic) = inner.topics.get_mut(&auction) else { return };
        let had_state = topic.state.is_some();
        if !change(topic) || !had_state {
            // A first state arriving by notification is installed like a load's:
            // nobody watches a topic without a state yet.
            return;
        }
        topic.event = None;
        topic.changed_at_us = at_us;
        if topic.queued {
            // The change before this one never reached these watchers.
            self.metrics.coalesced.increment(topic.watchers.len() as u64);
        } else {
            topic.queued = true;
            inner.queue.push_back(auction);
            self.wake.notify_one();
        }
    }

    /// Hands the newest state of queued topics to their watchers, topic by topic,
    /// until about `budget` events have gone out; returns how many did. The
    /// streams to wake are added to `to_wake`.
    fn deliver(&self, budget: usize, to_wake: &mut ToWake) -> usize {
        let mut inner = self.lock();
        let mut delivered = 0;
        while delivered < budget {
            let Some(auction) = inner.queue.pop_front() else { break };
            let Some(topic) = inner.topics.get_mut(&auction) else { continue };
            topic.queued = false;
            // The rendering may be shared with a stream that joined meanwhile (which
            // times nothing); these watchers time the change.
            let Some(mut event) = topic.event(self.render) else { continue };
            event.at_us = topic.changed_at_us;
            let closed = event.kind == EventKind::Closed;
            for (_, mailbox) in &topic.watchers {
                let left = mailbox.leave(Subject::Auction(auction), event.clone(), closed);
                if left.coalesced {
                    self.metrics.coalesced.increment(1);
                }
                if let Some(waker) = left.waker {
                    to_wake.wakers.push((mailbox.connection, waker));
                }
            }
            delivered += topic.watchers.len();
            if closed {
                // Its last event is with every watcher; nothing will change it again.
                // A stream being opened on it still gets it.
                topic.watchers.clear();
                forget_if_idle(&mut inner.topics, auction);
            }
        }
        delivered
    }

    /// Delivers queued changes as they come, at most `events_per_sec` a second
    /// (refilled every [`DELIVERY_TICK`]; less while bids back up, see
    /// [`Share`]), in passes at most every [`DELIVERY_PACE`] while they are
    /// large, until `shutdown`.
    pub async fn deliver_changes(
        self: Arc<Self>,
        backlog: impl Fn() -> usize + Send + 'static,
        mut shutdown: tokio::sync::watch::Receiver<bool>,
    ) {
        let rate = self.limits.events_per_sec;
        let full_tick =
            if rate == 0 { usize::MAX } else { (rate as f64 * DELIVERY_TICK.as_secs_f64()).ceil() as usize };
        let mut share =
            (self.limits.yield_to_bids && rate != 0).then(|| Share::new(backlog, tokio::time::Instant::now()));
        self.metrics.budget_share.set(1.0);
        let mut per_tick = full_tick;
        // May go below zero: a topic goes out to all its watchers at once, and what
        // that overdraws is repaid by the next ticks, so the rate holds whatever
        // the topics' sizes.
        let mut tokens = i64::try_from(per_tick).unwrap_or(i64::MAX);
        let mut refilled = tokio::time::Instant::now();
        let mut to_wake = ToWake::default();
        loop {
            tokio::select! {
                _ = shutdown.changed() => return,
                _ = self.wake.notified() => {}
            }
            loop {
                if rate != 0 {
                    let ticks = (refilled.elapsed().as_secs_f64() / DELIVERY_TICK.as_secs_f64()).floor();
                    if ticks >= 1.0 {
                        if let Some(share) = &mut share {
                            per_tick = share.of(full_tick, tokio::time::Instant::now());
                            self.metrics.budget_share.set(share.factor);
                        }
                        let refill = (per_tick as f64 * ticks).min(i64::MAX as f64) as i64;
                        tokens = tokens.saturating_add(refill).min(per_tick as i64);
                        refilled = tokio::time::Instant::now();
                    }
                    if tokens <= 0 {
                        tokio::time::sleep_until(refilled + DELIVERY_TICK).await;
                        continue;
                    }
                }
                let started = tokio::time::Instant::now();
                let delivered = self.deliver(tokens as usize, &mut to_wake);
                if delivered == 0 {
                    break;
                }
                to_wake.wake().await;
                tokens = tokens.saturating_sub(delivered as i64);
                if delivered >= PACED_PASS {
                    // The changes of the next few milliseconds go out together.
                    tokio::time::sleep_until(started + DELIVERY_PACE).await;
                } else {
                    // Requests of this core run between passes.
                    tokio::task::yield_now().await;
                }
            }
        }
    }

    /// Leaves an `outbid` event with the streams of each outbid bidder on this
    /// core (newest per auction), built from the auction's state in the notice.
    fn tell_outbid(&self, inner: &Inner, states: &[BidState], outbid: &[Outbid], at_us: i64) {
        for o in outbid {
            let Some(streams) = inner.accounts.get(&o.bidder) else { continue };
            let Some(state) = states.iter().find(|s| s.auction_id == o.auction_id) else { continue };
            let data = OutbidData {
                auction_id: state.auction_id,
                high_bid: state.high_bid,
                min_next_bid: state.min_next_bid,
                ends_at: state.ends_at,
            };
            let event = Event::new(EventKind::Outbid, state.version, &json(&data), at_us);
            self.tell(streams, Subject::Auction(o.auction_id), &event);
        }
    }

    /// Leaves `event` with each of one account's `streams`, counting what it
    /// coalesces.
    fn tell(&self, streams: &[Personal], subject: Subject, event: &Event) {
        for Personal { mailbox, .. } in streams {
            let left = mailbox.leave(subject, event.clone(), false);
            if left.coalesced {
                self.metrics.coalesced.increment(1);
            }
            if let Some(waker) = left.waker {
                waker.wake();
            }
        }
    }

    /// Leaves a `won` event with the winner's streams on this core and a `lost`
    /// event with every other bidder's.
    fn tell_ended(&self, inner: &Inner, ended: &Ended, at_us: i64) {
        for bidder in &ended.bidders {
            let Some(streams) = inner.accounts.get(bidder) else { continue };
            let kind = if ended.winner_id == Some(*bidder) { EventKind::Won } else { EventKind::Lost };
            let data = EndedData { auction_id: ended.auction_id, high_bid: ended.high_bid };
            let event = Event::new(kind, ended.version, &json(&data), at_us);
            self.tell(streams, Subject::Auction(ended.auction_id), &event);
        }
    }

    /// Leaves an `order` event with the buyer's streams on this core.
    fn tell_order(&self, inner: &Inner, order: &OrderChange, at_us: i64) {
        let Some(streams) = inner.accounts.get(&order.buyer_id) else { return };
        let data = OrderData { order_id: order.order_id, status: order.status };
        let event = Event::new(EventKind::Order, order.updated_us, &json(&data), at_us);
        self.tell(streams, Subject::Order(order.order_id), &event);
    }

    /// Opens a stream of the events that concern `account` alone, for as long
    /// as its `session` lasts.
    pub fn subscribe_account(self: &Arc<Self>, slot: Slot, account: i64, session: Session) -> EventStream {
        let mut inner = self.lock();
        let mailbox = Arc::new(Mailbox::default());
        // Never ends by itself: only its session's end, a drain, or the client
        // closes it.
        mailbox.lock().open = 1;
        let id = inner.new_id();
        inner.accounts.entry(account).or_default().push(Personal { id, session, mailbox: mailbox.clone() });
        self.register(&mut inner, id, slot, mailbox, Vec::new(), Some(account))
    }

    /// Ends the personal streams of the sessions that `end` ended, at once:
    /// what they had not sent yet is not sent.
    pub fn end_session(&self, end: &SessionEnd) {
        let inner = self.lock();
        let ended = |account: i64, p: &Personal| match *end {
            SessionEnd::One { session_id, .. } => p.session.id == session_id,
            SessionEnd::AllBefore { account_id, epoch, .. } => account == account_id && p.session.epoch < epoch,
        };
        for (account, streams) in &inner.accounts {
            for p in streams.iter().filter(|p| ended(*account, p)) {
                p.mailbox.poke(|m| {
                    m.events.clear();
                    m.open = 0;
                });
            }
        }
    }

    /// Ids of the auctions watched, for a reload after the notifications were
    /// interrupted. The loads of streams being opened meanwhile, which may have
    /// missed a change nobody announced, will be read again.
    pub fn watched(&self) -> Vec<i64> {
        let mut inner = self.lock();
        let mut ids = Vec::new();
        for (id, topic) in &mut inner.topics {
            match topic.state {
                Some(_) => ids.push(*id),
                None => topic.interrupted = true,
            }
        }
        ids
    }

    /// Applies states read after the notifications were interrupted, like
    /// notifications of whole auctions.
    pub fn reloaded(&self, auctions: Vec<Auction>, at_us: i64) {
        for a in auctions {
            self.apply(&Notice::Auction(a), at_us);
        }
    }

    /// Asks every open stream for a heartbeat.
    pub fn heartbeat(&self) {
        for mailbox in self.lock().streams.values() {
            mailbox.poke(|m| m.heartbeat = true);
        }
    }

    /// Refuses new streams and ends the open ones, each with a `retry:` hint.
    pub fn drain(&self) {
        let mut inner = self.lock();
        inner.draining = true;
        for mailbox in inner.streams.values() {
            mailbox.poke(|m| m.draining = true);
        }
    }

    /// Streams open now.
    pub fn open_streams(&self) -> usize {
        self.lock().streams.len()
    }

    /// Runs the heartbeat until `shutdown`, then drains.
    pub async fn run(self: Arc<Self>, mut shutdown: tokio::sync::watch::Receiver<bool>) {
        let mut interval = tokio::time::interval(self.limits.heartbeat);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        interval.tick().await;
        loop {
            tokio::select! {
                _ = shutdown.changed() => break,
                _ = interval.tick() => self.heartbeat(),
            }
        }
        self.drain();
    }

    fn close(&self, id: u64, watching: &[i64], account: Option<i64>) {
        let mut inner = self.lock();
        inner.streams.remove(&id);
        if let Some(account) = account
            && let Some(streams) = inner.accounts.get_mut(&account)
        {
            streams.retain(|p| p.id != id);
            if streams.is_empty() {
                inner.accounts.remove(&account);
            }
        }
        inner.reserved = inner.reserved.saturating_sub(1);
        for auction in watching {
            if let Some(topic) = inner.topics.get_mut(auction) {
                topic.watchers.retain(|(w, _)| *w != id);
                forget_if_idle(&mut inner.topics, *auction);
            }
        }
        self.metrics.open.decrement(1.0);
    }
}

/// Drops a topic nobody watches or is opening a stream on any more: its state
/// would only age.
fn forget_if_idle(topics: &mut HashMap<i64, Topic>, auction: i64) {
    if topics.get(&auction).is_some_and(|t| t.watchers.is_empty() && t.opening == 0) {
        topics.remove(&auction);
    }
}

/// A stream being opened on some auctions ([`Hub::opening`]), until it is
/// subscribed ([`Hub::subscribe`]) or given up (dropped: the client left, a read
/// failed). Meanwhile the hub keeps their topics: a change to them is noted, and
/// neither a close delivered to other watchers nor their leaving forgets them.
pub struct Opening {
    hub: Arc<Hub>,
    ids: Vec<i64>,
}

impl Drop for Opening {
    fn drop(&mut self) {
        if self.ids.is_empty() {
            return;
        }
        let mut inner = self.hub.lock();
        for id in &self.ids {
            if let Some(topic) = inner.topics.get_mut(id) {
                topic.opening -= 1;
                forget_if_idle(&mut inner.topics, *id);
            }
        }
    }
}

/// A stream slot taken by [`Hub::reserve`]; given back when dropped unless a
/// stream was opened with it.
pub struct Slot {
    hub: Option<Arc<Hub>>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Some(hub) = self.hub.take() {
            let mut inner = hub.lock();
            inner.reserved = inner.reserved.saturating_sub(1);
        }
    }
}

/// What waits for one stream's next read.
#[derive(Default)]
pub struct Mailbox {
    inner: Mutex<Pending>,
    /// The stream's connection, for [`ToWake`].
    connection: Connection,
}

/// Which connection a stream came on, as far as a delivery pass needs to tell
/// connections apart: a hash of the peer's address (0 when unknown).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Connection(u64);

impl Connection {
    pub fn of(peer: Option<std::net::SocketAddr>) -> Connection {
        use std::hash::BuildHasher;
        Connection(
            peer.map_or(0, |peer| std::hash::BuildHasherDefault::<std::hash::DefaultHasher>::default().hash_one(peer)),
        )
    }
}

/// The streams a delivery pass left events with, to wake once the pass has let
/// go of the hub. A stream's waker is taken when an event is left with it, so
/// whatever is not woken yet is woken on drop: no stream is left asleep.
#[derive(Default)]
struct ToWake {
    wakers: Vec<(Connection, Waker)>,
    /// Passes woken so far: each orders the connections differently, so that
    /// none is always the last.
    passes: u64,
}

impl ToWake {
    /// Most streams of one connection woken without letting other tasks run.
    const CONNECTION_SLICE: usize = 4 * WAKE_SLICE;

    /// Wakes them a connection at a time, letting the core's other tasks run
    /// after each [`WAKE_SLICE`] or so, and within a connection of more than
    /// [`Self::CONNECTION_SLICE`] streams after each of those.
    async fn wake(&mut self) {
        self.passes = self.passes.wrapping_add(1);
        let order = self.passes.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        self.wakers.sort_unstable_by_key(|(connection, _)| connection.0 ^ order);
        let mut woken = 0;
        let mut last = None;
        while let Some((connection, waker)) = self.wakers.pop() {
            if woken >= WAKE_SLICE && (last != Some(connection) || woken >= Self::CONNECTION_SLICE) {
                tokio::task::yield_now().await;
                woken = 0;
            }
            last = Some(connection);
            waker.wake();
            woken += 1;
        }
    }
}

impl Drop for ToWake {
    fn drop(&mut self) {
        for (_, waker) in self.wakers.drain(..) {
            waker.wake();
        }
    }
}

/// The part of the events budget a core may use, following its bids: cut to a
/// quarter after a window in which they backed up ([`Share::BACKLOG`] waiting on
/// average), grown by half after one in which fewer than half that many waited,
/// between 1/64 and all. In a bid storm the watchers coalesce and the bids keep
/// their speed; otherwise events go out at the full rate.
///
/// The bids' backlog is the signal, not the CPU's idle time. The share used to
/// halve whenever the pinned CPU was idle under 5 % of a window (`/proc/stat`);
/// on a machine PostgreSQL and other processes share, that held in most windows
/// at 2,000 bids/s, and events were cut that no bid was waiting for. 10,000
/// HTTP/2 streams over 100 auctions, 2,000 bids/s (`gavel-loadtest watch
/// --http2-streams 100`, the defaults, three alternating runs each, 2026-11-30):
/// following the CPU, delivery p99 66–77 ms at 134–143K events/s and the bid
/// storm with the streams open at 0.78–0.89 of its speed without them;
/// following the bids, p99 30–38 ms at 174–176K/s and the storm at 0.90–1.00
/// (in two earlier rounds on a noisier machine, 37–64 ms, storm 0.78–1.06; with
/// no limit at all, p99 40–53 ms and the storm at 0.25–0.28). Cut to a quarter
/// each window, the share reaches its floor within 0.3 s of a storm's start. At
/// 2,000 bids/s a core's backlog averaged 2–15 a window; in the storm, 24–32.
///
/// The backlog counts the bids in the database too, so it is about the core's
/// bid rate times their answer time: 16 is 16 ms at 1,000 bids/s a core, 4 ms
/// at 4,000. Where events cost more than HTTP/2's, on 10,000 HTTP/1.1
/// connections of a stream each, it stays under the threshold while the writes
/// take the CPU: p99 182–196 ms at 53–56K events/s, against 148–149 ms at
/// 62–64K/s following the CPU (two runs each).
struct Share {
    /// Bids waiting on the core's batches.
    backlog: Box<dyn Fn() -> usize + Send>,
    /// Their sum and count of samples this window.
    waiting: (usize, usize),
    factor: f64,
    /// When the current window began.
    measured: tokio::time::Instant,
}

impl Share {
    const WINDOW: Duration = Duration::from_millis(100);
    const FLOOR: f64 = 1.0 / 64.0;
    const BACKLOG: f64 = 16.0;

    fn new(backlog: impl Fn() -> usize + Send + 'static, now: tokio::time::Instant) -> Share {
        Share { backlog: Box::new(backlog), waiting: (0, 0), factor: 1.0, measured: now }
    }

    /// This tick's budget out of `full`, after a new window if one has passed.
    fn of(&mut self, full: usize, now: tokio::time::Instant) -> usize {
        // Sampled only while there are changes to deliver: after a gap of whole
        // windows, what was sampled before it is stale, and no event took
        // anything from the bids meanwhile, so each window of it counts as one
        // without a backlog.
        let gap = (now.saturating_duration_since(self.measured).as_secs_f64() / Self::WINDOW.as_secs_f64()) as i32;
        if gap >= 2 {
            self.factor = (self.factor * 1.5f64.powi(gap.min(16))).min(1.0);
            self.waiting = (0, 0);
            self.measured = now;
        }
        self.waiting = (self.waiting.0 + (self.backlog)(), self.waiting.1 + 1);
        if now.saturating_duration_since(self.measured) >= Self::WINDOW {
            self.measured = now;
            let waiting = self.waiting.0 as f64 / self.waiting.1.max(1) as f64;
            self.waiting = (0, 0);
            self.factor = Self::next(self.factor, waiting);
        }
        ((full as f64 * self.factor).ceil() as usize).max(1)
    }

    fn next(factor: f64, waiting: f64) -> f64 {
        if waiting >= Self::BACKLOG {
            (factor / 4.0).max(Self::FLOOR)
        } else if waiting < Self::BACKLOG / 2.0 {
            (factor * 1.5).min(1.0)
        } else {
            factor
        }
    }
}

/// The reads of auctions' first states a stream being opened has claimed
/// ([`Hub::claim`]); the streams waiting for them are told when it drops.
pub struct Reading {
    hub: Arc<Hub>,
    ids: Vec<i64>,
    /// Beside `ids`: each one's word to its waiters, closed when this drops.
    settle: Vec<tokio::sync::watch::Sender<bool>>,
}

impl Reading {
    pub fn ids(&self) -> &[i64] {
        &self.ids
    }

    /// Installs what the stream read, the cache's states and the database's
    /// for the claimed ids ([`Hub::install`]), and tells the waiting streams
    /// which ids it settled: held now, or (not returned) not an auction. Returns
    /// the ids to read again.
    pub fn install(self, read: Vec<Auction>) -> Vec<i64> {
        let again = self.hub.install(read);
        for (id, settle) in self.ids.iter().zip(&self.settle) {
            if !again.contains(id) {
                settle.send_replace(true);
            }
        }
        again
    }
}

impl Drop for Reading {
    fn drop(&mut self) {
        // Out of the map before its senders close, so that no stream claims a read
        // that has ended.
        let mut inner = self.hub.lock();
        for id in &self.ids {
            inner.reading.remove(id);
        }
    }
}

/// Another stream's read of an auction this stream waits for.
pub struct Waiting {
    pub id: i64,
    read: tokio::sync::watch::Receiver<bool>,
}

impl Waiting {
    /// Waits for the read to end: whether it settled the auction (its state is
    /// held now, or the database has no such auction); if not, read it.
    pub async fn settled(mut self) -> bool {
        self.read.wait_for(|settled| *settled).await.is_ok()
    }
}

/// A personal stream: the events of one account, for one of its sessions.
struct Personal {
    id: u64,
    session: Session,
    mailbox: Arc<Mailbox>,
}

/// What leaving an event with a mailbox did.
struct Left {
    /// It replaced an unread one.
    coalesced: bool,
    /// The stream waits for it: wake this.
    waker: Option<Waker>,
}

/// What a mailbox keeps at most one pending event of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Subject {
    Auction(i64),
    Order(i64),
}

/// Held inline, not on a heap buffer of their own: a stream watching one
/// auction (the most usual) then reaches its event through the mailbox alone.
/// With 10,000 streams each extra buffer was one more cache miss per event.
#[derive(Default)]
struct Pending {
    /// At most one event per subject, oldest change first.
    events: SmallVec<[(Subject, Event); 1]>,
    /// Watched auctions whose `closed` event has not been left here yet.
    open: usize,
    /// The newest version left here per subject (with `Last-Event-ID`, the one
    /// the client has): none older or equal is left again.
    sent: SmallVec<[(Subject, i64); 1]>,
    heartbeat: bool,
    draining: bool,
    waker: Option<Waker>,
}

impl Pending {
    fn sent_version(&self, subject: Subject) -> i64 {
        self.sent.iter().find(|(s, _)| *s == subject).map_or(0, |(_, v)| *v)
    }

    fn sent_now(&mut self, subject: Subject, version: i64) {
        match self.sent.iter_mut().find(|(s, _)| *s == subject) {
            Some((_, v)) => *v = version.max(*v),
            None => self.sent.push((subject, version)),
        }
    }
}

impl Mailbox {
    fn lock(&self) -> MutexGuard<'_, Pending> {
        self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Leaves `event` of `subject`, replacing one still unread: whether it did (a
    /// coalesced event), and the stream's waker, to wake.
    fn leave(&self, subject: Subject, event: Event, closed: bool) -> Left {
        let mut pending = self.lock();
        if event.version <= pending.sent_version(subject) && !closed {
            return Left { coalesced: false, waker: None };
        }
        pending.sent_now(subject, event.version);
        if closed {
            pending.open = pending.open.saturating_sub(1);
        }
        let coalesced = match pending.events.iter_mut().find(|(s, _)| *s == subject) {
            Some((_, unread)) => {
                *unread = event;
                true
            }
            None => {
                pending.events.push((subject, event));
                false
            }
        };
        Left { coalesced, waker: pending.waker.take() }
    }

    fn poke(&self, set: impl FnOnce(&mut Pending)) {
        let mut pending = self.lock();
        set(&mut pending);
        if let Some(waker) = pending.waker.take() {
            waker.wake();
        }
    }
}

/// The body of an event stream: its mailbox's frames as they come.
pub struct EventStream {
    hub: Arc<Hub>,
    id: u64,
    watching: Vec<i64>,
    /// The account of a personal stream.
    account: Option<i64>,
    mailbox: Arc<Mailbox>,
    retry_sent: bool,
}

const HEARTBEAT: &[u8] = b": heartbeat\n\n";

impl Body for EventStream {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        let mut pending = this.mailbox.lock();
        if !pending.events.is_empty() {
            // Few: one per subject, and a stream watches at most a hundred.
            let (_, event) = pending.events.remove(0);
            drop(pending);
            this.hub.metrics.sent(event.kind);
            if event.at_us > 0 {
                let lag_us = Utc::now().timestamp_micros() - event.at_us;
                this.hub.metrics.delivery.record(lag_us.max(0) as f64 / 1e6);
            }
            return Poll::Ready(Some(Ok(Frame::data(event.frame))));
        }
        if pending.draining {
            if this.retry_sent {
                return Poll::Ready(None);
            }
            this.retry_sent = true;
            let retry = format!("retry: {}\n\n", this.hub.limits.retry.as_millis());
            return Poll::Ready(Some(Ok(Frame::data(Bytes::from(retry)))));
        }
        if pending.open == 0 {
            return Poll::Ready(None);
        }
        if pending.heartbeat {
            pending.heartbeat = false;
            drop(pending);
            this.hub.metrics.sent(EventKind::Heartbeat);
            return Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(HEARTBEAT)))));
        }
        match &pending.waker {
            Some(w) if w.will_wake(cx.waker()) => {}
            _ => pending.waker = Some(cx.waker().clone()),
        }
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        false
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}

impl Drop for EventStream {
    fn drop(&mut self) {
        self.hub.close(self.id, &self.watching, self.account);
    }
}

#[cfg(test)]
mod tests {
    use chrono::TimeZone;

    use super::*;

    /// A new session of `epoch`.
    fn session(epoch: i32) -> Session {
        Session { id: uuid::Uuid::new_v4(), epoch, expires: u64::MAX }
    }

    /// Whether the stream has ended (rather than waiting for more).
    fn has_ended(stream: &mut EventStream) -> bool {
        let mut cx = Context::from_waker(Waker::noop());
        matches!(Pin::new(&mut *stream).poll_frame(&mut cx), Poll::Ready(None))
    }

    #[test]
    fn a_personal_stream_ends_with_its_session_and_no_other() {
        let hub = hub(10);
        let (gone, kept) = (session(0), session(0));
        let mut logged_out = hub.subscribe_account(hub.reserve().unwrap(), 41, gone);
        let mut same_account = hub.subscribe_account(hub.reserve().unwrap(), 41, kept);
        let mut older_epoch = hub.subscribe_account(hub.reserve().unwrap(), 42, session(0));
        let mut newer_epoch = hub.subscribe_account(hub.reserve().unwrap(), 42, session(1));
        hub.apply(&Notice::SessionEnd(SessionEnd::One { session_id: gone.id, expires_us: 0 }), 0);
        hub.end_session(&SessionEnd::AllBefore { account_id: 42, epoch: 1, ended_us: 0 });
        assert!(has_ended(&mut logged_out), "the logged-out session's stream ends");
        assert!(has_ended(&mut older_epoch), "a session older than the new epoch ends");
        assert!(!has_ended(&mut same_account), "the account's other session goes on");
        assert!(!has_ended(&mut newer_epoch), "a session of the new epoch goes on");
    }

    #[test]
    fn the_budget_shrinks_while_bids_back_up_and_grows_back_when_they_do_not() {
        let mut factor = 1.0;
        assert_eq!(Share::next(factor, Share::BACKLOG), 0.25, "a quarter a window of backlog");
        for _ in 0..10 {
            factor = Share::next(factor, Share::BACKLOG * 2.0);
        }
        assert_eq!(factor, Share::FLOOR, "never below the floor");
        assert_eq!(Share::next(factor, Share::BACKLOG / 2.0), factor, "held while some bids wait");
        assert_eq!(Share::next(0.5, Share::BACKLOG / 2.0), 0.5, "held at half that many");
        assert_eq!(Share::next(0.5, Share::BACKLOG - 0.1), 0.5, "held just under the threshold");
        for _ in 0..20 {
            factor = Share::next(factor, 1.0);
        }
        assert_eq!(factor, 1.0, "never above all of it");
        assert_eq!(Share::next(0.5, 0.0), 0.75, "grows by half");
    }

    /// The share is decided once a window, from the backlog's average over it,
    /// and a quiet gap (nothing to deliver, so no samples) grows it back.
    #[test]
    fn the_share_follows_each_windows_average_backlog_and_grows_back_over_a_gap() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let waiting = Arc::new(AtomicUsize::new(20));
        let sampled = waiting.clone();
        let t0 = tokio::time::Instant::now();
        let mut share = Share::new(move || sampled.load(Ordering::Relaxed), t0);
        let tick = Duration::from_millis(10);
        assert_eq!(share.of(1000, t0 + tick), 1000, "nothing is decided within a window");
        assert_eq!(share.of(1000, t0 + Share::WINDOW), 250, "a window of 20 waiting on average");
        waiting.store(4, Ordering::Relaxed);
        assert_eq!(share.of(1000, t0 + Share::WINDOW + tick), 250);
        waiting.store(20, Ordering::Relaxed);
        assert_eq!(share.of(1000, t0 + Share::WINDOW * 2), 250, "(4 + 20) / 2 = 12 waiting: held");
        assert_eq!(share.of(1000, t0 + Share::WINDOW * 3), 63, "cut again");
        assert_eq!(share.of(10, t0 + Share::WINDOW * 3 + tick), 1, "never below one event a tick");
        waiting.store(0, Ordering::Relaxed);
        assert_eq!(share.of(1000, t0 + Share::WINDOW * 4), 63, "(20 + 0) / 2 = 10 waiting: held");
        assert_eq!(share.of(1000, t0 + Share::WINDOW * 5), 94, "grows by half");
        waiting.store(100, Ordering::Relaxed);
        assert_eq!(share.of(1000, t0 + Share::WINDOW * 13), 1000, "eight quiet windows: all of it again");
        assert_eq!(share.of(1000, t0 + Share::WINDOW * 14), 250, "the gap's stale samples are gone");
    }
    use crate::domain::auction::BidState;

    fn render(a: &Auction, _: DateTime<Utc>) -> Vec<u8> {
        format!("{{\"id\":{},\"v\":{},\"high\":{:?}}}", a.id, a.version, a.high_bid).into_bytes()
    }

    fn hub(max_streams: usize) -> Arc<Hub> {
        let limits = StreamLimits { max_streams, ..StreamLimits::default() };
        Arc::new(Hub::new(limits, render, StreamMetrics::new(0)))
    }

    fn auction(id: i64, version: i64) -> Auction {
        Auction::sample(id, version)
    }

    fn bid(id: i64, version: i64, high_bid: i64) -> Notice {
        Notice::Bids(
            vec![BidState {
                auction_id: id,
                version,
                high_bid,
                high_bidder: 9,
                bid_count: version - 1,
                ends_at: Utc.timestamp_opt(4_000_000_000, 0).unwrap(),
                closed: false,
                min_next_bid: high_bid + 10,
            }],
            vec![],
        )
    }

    /// Applies a notice and delivers it at once.
    fn change(hub: &Hub, notice: &Notice) {
        hub.apply(notice, 1);
        hub.deliver(usize::MAX, &mut ToWake::default());
    }

    fn open(hub: &Arc<Hub>, ids: &[i64], last: Option<i64>) -> EventStream {
        let (opening, unknown) = hub.opening(ids, Utc::now());
        assert!(hub.install(unknown.iter().map(|id| auction(*id, 1)).collect()).is_empty());
        hub.subscribe(hub.reserve().unwrap(), opening, last, Connection::default())
            .unwrap_or_else(|m| panic!("unknown {m:?}"))
    }

    /// The frames the stream has ready now, as text.
    fn ready(stream: &mut EventStream) -> Vec<String> {
        let waker = Waker::noop();
        let mut cx = Context::from_waker(waker);
        let mut out = Vec::new();
        while let Poll::Ready(Some(Ok(frame))) = Pin::new(&mut *stream).poll_frame(&mut cx) {
            out.push(String::from_utf8(frame.into_data().unwrap().to_vec()).unwrap());
        }
        out
    }

    #[test]
    fn a_stream_starts_with_the_current_state_then_follows_in_version_order() {
        let hub = hub(10);
        let mut s = open(&hub, &[7], None);
        assert_eq!(ready(&mut s), ["event: auction\nid: 1\ndata: {\"id\":7,\"v\":1,\"high\":None}\n\n"]);
        change(&hub, &bid(7, 2, 150));
        assert_eq!(ready(&mut s), ["event: auction\nid: 2\ndata: {\"id\":7,\"v\":2,\"high\":Some(150)}\n\n"]);
        change(&hub, &bid(7, 2, 150));
        change(&hub, &bid(7, 1, 100));
        assert!(ready(&mut s).is_empty(), "old and repeated versions are not sent");
    }

    #[test]
    fn a_slow_watcher_holds_only_the_newest_state_per_auction() {
        let hub = hub(10);
        let mut slow = open(&hub, &[7, 8], None);
        let mut live = open(&hub, &[7], None);
        ready(&mut live);
        for v in 2..=50 {
            change(&hub, &bid(7, v, 100 + v));
            assert_eq!(ready(&mut live).len(), 1, "a live watcher gets every version");
        }
        change(&hub, &bid(8, 2, 300));
        let frames = ready(&mut slow);
        assert_eq!(frames.len(), 2, "one per auction: {frames:?}");
        assert!(frames[0].contains("id: 50"), "the newest state of 7 first: {frames:?}");
        assert!(frames[1].contains("\"id\":8") && frames[1].contains("id: 2"));
    }

    #[test]
    fn last_event_id_of_the_current_version_sends_nothing_until_a_change() {
        let hub = hub(10);
        let mut first = open(&hub, &[7], None);
        ready(&mut first);
        change(&hub, &bid(7, 2, 150));
        let mut current = open(&hub, &[7], Some(2));
        assert!(ready(&mut current).is_empty());
        let mut older = open(&hub, &[7], Some(1));
        assert_eq!(ready(&mut older).len(), 1, "an older version gets the current state");
        change(&hub, &bid(7, 3, 160));
        assert_eq!(ready(&mut current).len(), 1);
    }

    #[test]
    fn a_closed_auction_ends_its_stream_after_the_closed_event() {
        let hub = hub(10);
        let mut s = open(&hub, &[7], None);
        ready(&mut s);
        let mut closed = auction(7, 5);
        closed.closed = true;
        closed.winner_id = Some(9);
        change(&hub, &Notice::Auction(closed));
        let frames = ready(&mut s);
        assert_eq!(frames.len(), 1);
        assert!(frames[0].starts_with("event: closed\nid: 5\n"));
        let waker = Waker::noop();
        assert!(matches!(Pin::new(&mut s).poll_frame(&mut Context::from_waker(waker)), Poll::Ready(None)));
        assert!(hub.watched().is_empty(), "nothing watches a closed auction");
    }

    #[test]
    fn a_change_announced_during_the_first_read_makes_it_read_again() {
        let hub = hub(10);
        let (_opening, unknown) = hub.opening(&[7], Utc::now());
        assert_eq!(unknown, [7]);
        change(&hub, &bid(7, 3, 150));
        assert_eq!(hub.install(vec![auction(7, 2)]), [7], "the read missed version 3");
        assert!(hub.install(vec![auction(7, 3)]).is_empty());
    }

    #[test]
    fn a_held_state_open_past_its_end_is_read_again_and_a_closed_one_is_not() {
        let hub = hub(10);
        let unknown = |now| hub.opening(&[7, 8], now).1;
        let (_opening, first) = hub.opening(&[7, 8], Utc::now());
        assert_eq!(first, [7, 8]);
        let mut closed = auction(8, 2);
        closed.closed = true;
        assert!(hub.install(vec![auction(7, 1), closed]).is_empty());
        assert!(unknown(Utc::now()).is_empty(), "both held, before their end");
        let after_the_end = auction(7, 1).ends_at;
        assert_eq!(unknown(after_the_end), [7], "its close may not have been heard yet");
        let mut heard = auction(7, 2);
        heard.closed = true;
        assert!(hub.install(vec![heard]).is_empty());
        assert!(unknown(after_the_end).is_empty());
    }

    #[test]
    fn unknown_auctions_are_refused_and_forgotten() {
        let hub = hub(10);
        let (opening, unknown) = hub.opening(&[7, 8], Utc::now());
        assert_eq!(unknown, [7, 8]);
        hub.install(vec![auction(7, 1)]);
        let refused = hub.subscribe(hub.reserve().unwrap(), opening, None, Connection::default());
        assert_eq!(refused.err(), Some(vec![8]));
        assert!(hub.watched().is_empty());
        assert_eq!(hub.lock().reserved, 0, "the slot was given back");
    }

    fn closed(id: i64, version: i64) -> Auction {
        let mut a = auction(id, version);
        a.closed = true;
        a
    }

    /// A stream opening on an auction held open past its end reads it again; when
    /// that read finds it closed, the close goes to the auction's watchers too,
    /// whose own notice of it, coming later, is then no news.
    #[test]
    fn a_close_read_by_a_stream_being_opened_reaches_the_other_watchers() {
        let hub = hub(10);
        let mut watcher = open(&hub, &[7], None);
        ready(&mut watcher);
        let (opening, unknown) = hub.opening(&[7], auction(7, 1).ends_at);
        assert_eq!(unknown, [7], "held open past its end: read again");
        assert!(hub.install(vec![closed(7, 2)]).is_empty());
        let mut newcomer = hub.subscribe(hub.reserve().unwrap(), opening, None, Connection::default()).unwrap();
        assert!(ready(&mut newcomer)[0].starts_with("event: closed\nid: 2\n"));
        assert!(has_ended(&mut newcomer));
        hub.deliver(usize::MAX, &mut ToWake::default());
        let frames = ready(&mut watcher);
        assert_eq!(frames.len(), 1, "{frames:?}");
        assert!(frames[0].starts_with("event: closed\nid: 2\n"), "{frames:?}");
        assert!(has_ended(&mut watcher));
        change(&hub, &Notice::Auction(closed(7, 2)));
        assert!(hub.lock().topics.is_empty(), "nothing watches a closed auction");
    }

    /// While a stream is being opened on an auction, neither the auction's close
    /// delivered to its watchers nor their leaving forgets it: the stream opens
    /// (on the close, if closed), not a 404.
    #[test]
    fn an_auction_being_opened_on_is_kept_through_its_close_and_its_watchers_leaving() {
        let hub = hub(10);
        let mut watcher = open(&hub, &[7], None);
        ready(&mut watcher);
        let (closing, _) = hub.opening(&[7], auction(7, 1).ends_at);
        change(&hub, &Notice::Auction(closed(7, 2)));
        ready(&mut watcher);
        assert!(has_ended(&mut watcher));
        assert!(hub.install(vec![closed(7, 2)]).is_empty());
        let mut late = hub.subscribe(hub.reserve().unwrap(), closing, None, Connection::default()).unwrap();
        assert!(ready(&mut late)[0].starts_with("event: closed\nid: 2\n"));
        assert!(has_ended(&mut late));

        let only = open(&hub, &[8], None);
        let (opening, unknown) = hub.opening(&[8, 9], Utc::now());
        assert_eq!(unknown, [9]);
        drop(only);
        assert!(hub.install(vec![auction(9, 1)]).is_empty());
        assert!(hub.subscribe(hub.reserve().unwrap(), opening, None, Connection::default()).is_ok());
    }

    /// A stream given up while it was being opened (its client left, its read
    /// failed) leaves nothing behind.
    #[test]
    fn a_stream_given_up_while_opening_leaves_no_topics() {
        let hub = hub(10);
        let ids: Vec<i64> = (1..=100).collect();
        let (opening, unknown) = hub.opening(&ids, Utc::now());
        assert_eq!(unknown.len(), 100);
        drop(hub.claim(unknown));
        drop(opening);
        assert!(hub.lock().topics.is_empty());
        let kept = open(&hub, &[7], None);
        drop(hub.opening(&[7, 8], Utc::now()));
        assert_eq!(hub.lock().topics.keys().collect::<Vec<_>>(), [&7], "the watched one stays");
        drop(kept);
    }

    /// A load begun before the notifications were interrupted may have missed a
    /// change nobody announced: it is read again.
    #[test]
    fn a_load_across_an_interruption_of_the_notifications_is_read_again() {
        let hub = hub(10);
        let (_opening, unknown) = hub.opening(&[7], Utc::now());
        assert_eq!(unknown, [7]);
        assert!(hub.watched().is_empty(), "nothing to reload: it has no state yet");
        assert_eq!(hub.install(vec![auction(7, 1)]), [7]);
        assert!(hub.install(vec![auction(7, 1)]).is_empty(), "read after the interruption");
    }

    /// A stream that waited for a read while the drain began ends at once too.
    #[test]
    fn a_stream_opened_after_the_drain_began_ends_with_a_retry_hint() {
        let hub = hub(10);
        let slot = hub.reserve().unwrap();
        let (opening, unknown) = hub.opening(&[7], Utc::now());
        hub.drain();
        assert!(hub.install(unknown.iter().map(|id| auction(*id, 1)).collect()).is_empty());
        let mut s = hub.subscribe(slot, opening, None, Connection::default()).unwrap();
        assert_eq!(ready(&mut s).last().map(String::as_str), Some("retry: 1000\n\n"));
        assert!(has_ended(&mut s));
    }

    #[test]
    fn the_cap_refuses_streams_beyond_it_until_one_closes() {
        let hub = hub(2);
        let a = open(&hub, &[7], None);
        let _b = open(&hub, &[7], None);
        assert_eq!(hub.reserve().err(), Some(Refused::Full));
        drop(a);
        assert!(hub.reserve().is_ok());
        assert_eq!(hub.open_streams(), 1);
    }

    #[test]
    fn a_drain_ends_every_stream_with_a_retry_hint_and_refuses_new_ones() {
        let hub = hub(10);
        let mut s = open(&hub, &[7], None);
        ready(&mut s);
        hub.heartbeat();
        assert_eq!(ready(&mut s), [": heartbeat\n\n"]);
        hub.drain();
        assert_eq!(ready(&mut s), ["retry: 1000\n\n"]);
        let waker = Waker::noop();
        assert!(matches!(Pin::new(&mut s).poll_frame(&mut Context::from_waker(waker)), Poll::Ready(None)));
        assert_eq!(hub.reserve().err(), Some(Refused::Draining));
    }

    /// A pass's streams are woken a connection at a time, and the core's other
    /// tasks run once a slice's worth has been woken, before the next connection;
    /// one connection's crowd is cut into slices too; a dropped pass wakes the rest.
    #[tokio::test]
    async fn a_pass_wakes_a_connection_at_a_time_and_lets_other_tasks_run_between_slices() {
        struct Record(Arc<Mutex<Vec<u64>>>, u64);
        impl std::task::Wake for Record {
            fn wake(self: Arc<Self>) {
                self.0.lock().unwrap().push(self.1);
            }
        }
        let log = Arc::new(Mutex::new(Vec::new()));
        let record = |c: u64| Waker::from(Arc::new(Record(log.clone(), c)));
        // Whether another task runs while `to_wake` wakes, and where in the log.
        let wake = |mut to_wake: ToWake| {
            let log = log.clone();
            async move {
                log.lock().unwrap().clear();
                let other = tokio::spawn({
                    let log = log.clone();
                    async move { log.lock().unwrap().push(0) }
                });
                to_wake.wake().await;
                other.await.unwrap();
                assert!(to_wake.wakers.is_empty());
                log.lock().unwrap().clone()
            }
        };
        // Three connections of just over half a slice each, arriving interleaved.
        let per = WAKE_SLICE / 2 + 1;
        let mut to_wake = ToWake::default();
        for _ in 0..per {
            for c in [3, 1, 2] {
                to_wake.wakers.push((Connection(c), record(c)));
            }
        }
        let woken = wake(to_wake).await;
        assert_eq!(woken.len(), 3 * per + 1);
        assert_eq!(woken[2 * per], 0, "two connections fill a slice, then the other task runs: {woken:?}");
        let groups = [&woken[..per], &woken[per..2 * per], &woken[2 * per + 1..]];
        assert!(groups.iter().all(|g| g.iter().all(|c| *c == g[0])), "a connection at a time: {woken:?}");
        let mut connections: Vec<u64> = groups.iter().map(|g| g[0]).collect();
        connections.sort();
        assert_eq!(connections, [1, 2, 3]);

        // One connection of more than a connection's slice.
        let mut crowd = ToWake::default();
        crowd.wakers.extend((0..ToWake::CONNECTION_SLICE + 1).map(|_| (Connection(5), record(5))));
        let woken = wake(crowd).await;
        assert_eq!(woken.iter().position(|c| *c == 0), Some(ToWake::CONNECTION_SLICE), "{woken:?}");

        // Not woken by a pass: woken when dropped.
        let mut dropped = ToWake::default();
        dropped.wakers.push((Connection(7), record(7)));
        log.lock().unwrap().clear();
        drop(dropped);
        assert_eq!(*log.lock().unwrap(), [7]);
    }

    #[test]
    fn a_delivery_pass_stops_at_its_budget_and_later_changes_coalesce() {
        let hub = hub(10);
        let mut streams: Vec<EventStream> = (1..=3).map(|id| open(&hub, &[id], None)).collect();
        for s in &mut streams {
            ready(s);
        }
        for id in 1..=3 {
            hub.apply(&bid(id, 2, 150), 1);
        }
        assert_eq!(hub.deliver(1, &mut ToWake::default()), 1, "one topic of one watcher");
        assert_eq!(ready(&mut streams[0]).len(), 1);
        assert!(ready(&mut streams[1]).is_empty(), "the rest waits for the next pass");
        hub.apply(&bid(2, 3, 160), 1);
        assert_eq!(hub.deliver(usize::MAX, &mut ToWake::default()), 2);
        let frames = ready(&mut streams[1]);
        assert_eq!(frames.len(), 1, "only the newest state: {frames:?}");
        assert!(frames[0].contains("id: 3"));
        assert_eq!(ready(&mut streams[2]).len(), 1);
    }

    /// The first stream to open on an auction the core does not hold reads it;
    /// the others opening on it meanwhile wait for that read: settled if it read
    /// the auction or found there is none, not if it ended without an answer.
    #[tokio::test]
    async fn a_crowd_opening_on_one_cold_auction_costs_one_read() {
        let hub = hub(10);
        let (_opening, unknown) = hub.opening(&[7, 8, 9], Utc::now());
        assert_eq!(unknown, [7, 8, 9]);
        let (first, none) = hub.claim(vec![7, 8]);
        assert_eq!(first.ids(), [7, 8]);
        assert!(none.is_empty());
        let (second, theirs) = hub.claim(vec![7, 8, 9]);
        assert_eq!(second.ids(), [9], "7 and 8 are being read already");
        assert_eq!(theirs.iter().map(|w| w.id).collect::<Vec<_>>(), [7, 8]);
        let waiting = tokio::spawn(futures::future::join_all(theirs.into_iter().map(Waiting::settled)));
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished(), "waits while the first read is in flight");
        drop(second);
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished(), "another read's end is not this one's");
        assert!(first.install(vec![auction(7, 1)]).is_empty(), "the database had 7 and not 8");
        let settled = tokio::time::timeout(Duration::from_secs(5), waiting).await.expect("told when the read ends");
        assert_eq!(settled.unwrap(), [true, true], "7 is held, 8 does not exist: neither is read again");

        let (failed, none) = hub.claim(vec![9]);
        assert!(none.is_empty(), "a read that ended is no longer claimed");
        let (_, theirs) = hub.claim(vec![9]);
        let waiting = tokio::spawn(futures::future::join_all(theirs.into_iter().map(Waiting::settled)));
        drop(failed);
        assert_eq!(waiting.await.unwrap(), [false], "a read that failed leaves the waiter to read it");
    }

    /// A large pass makes the next one wait for the pace, so that a connection's
    /// streams get the changes of those milliseconds in one write; a small one
    /// does not hold the next change back.
    #[tokio::test(start_paused = true)]
    async fn large_passes_are_paced_and_small_ones_are_not() {
        let hub = hub(PACED_PASS + 1);
        let mut crowd: Vec<EventStream> = (0..PACED_PASS).map(|_| open(&hub, &[1], None)).collect();
        let mut alone = open(&hub, &[2], None);
        for s in crowd.iter_mut().chain([&mut alone]) {
            ready(s);
        }
        let (_stop, shutdown) = tokio::sync::watch::channel(false);
        tokio::spawn(hub.clone().deliver_changes(|| 0, shutdown));
        let settle = || async {
            for _ in 0..10 {
                tokio::task::yield_now().await;
            }
        };
        hub.apply(&bid(1, 2, 150), 1);
        settle().await;
        assert!(crowd.iter_mut().all(|s| ready(s).len() == 1), "the first change goes out at once");
        hub.apply(&bid(1, 3, 160), 1);
        hub.apply(&bid(2, 2, 150), 1);
        settle().await;
        assert!(ready(&mut crowd[0]).is_empty(), "a change after a large pass waits for the pace");
        assert!(ready(&mut alone).is_empty(), "and so does any change behind it");
        tokio::time::advance(DELIVERY_PACE).await;
        settle().await;
        assert!(crowd.iter_mut().all(|s| ready(s).len() == 1), "the pace is over");
        assert_eq!(ready(&mut alone).len(), 1);
        hub.apply(&bid(2, 3, 160), 1);
        settle().await;
        assert_eq!(ready(&mut alone).len(), 0, "the pass before was large too");
        tokio::time::advance(DELIVERY_PACE).await;
        settle().await;
        assert_eq!(ready(&mut alone).len(), 1);
        hub.apply(&bid(2, 4, 170), 1);
        settle().await;
        assert_eq!(ready(&mut alone).len(), 1, "after a small pass the next change goes at once");
    }

    #[test]
    fn an_outbid_bidder_alone_is_told() {
        let hub = hub(10);
        let mut outbid = hub.subscribe_account(hub.reserve().unwrap(), 41, session(0));
        let mut other = hub.subscribe_account(hub.reserve().unwrap(), 42, session(0));
        let Notice::Bids(states, _) = bid(7, 3, 150) else { unreachable!() };
        hub.apply(&Notice::Bids(states, vec![Outbid { auction_id: 7, bidder: 41 }]), 1);
        let frames = ready(&mut outbid);
        assert_eq!(frames.len(), 1);
        assert!(
            frames[0]
                .starts_with("event: outbid\nid: 3\ndata: {\"auction_id\":7,\"high_bid\":150,\"min_next_bid\":160,"),
            "{}",
            frames[0]
        );
        assert!(ready(&mut other).is_empty(), "nobody else's stream carries it");
        drop(outbid);
        assert!(!hub.lock().accounts.contains_key(&41), "a closed stream leaves its account");
    }

    #[test]
    fn the_bidders_of_a_closed_auction_are_told_who_won() {
        let hub = hub(10);
        let mut winner = hub.subscribe_account(hub.reserve().unwrap(), 41, session(0));
        let mut loser = hub.subscribe_account(hub.reserve().unwrap(), 42, session(0));
        let mut bystander = hub.subscribe_account(hub.reserve().unwrap(), 43, session(0));
        let ended =
            Ended { auction_id: 7, winner_id: Some(41), high_bid: Some(150), version: 9, bidders: vec![41, 42] };
        hub.apply(&Notice::Ended(ended), 1);
        assert_eq!(ready(&mut winner), ["event: won\nid: 9\ndata: {\"auction_id\":7,\"high_bid\":150}\n\n"]);
        assert_eq!(ready(&mut loser), ["event: lost\nid: 9\ndata: {\"auction_id\":7,\"high_bid\":150}\n\n"]);
        assert!(ready(&mut bystander).is_empty());
    }
}

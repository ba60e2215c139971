//! Header-read deadlines for a core's connections, kept by one sweep per core
//! instead of a timer per request.
//!
//! hyper enforces `--header-read-timeout` through the connection's
//! [`Timer`]: it asks for a new sleep each time it starts reading a request head
//! and drops it once the head has arrived. With tokio's timer that is, per
//! request, a boxed `Sleep`, two clock reads, and an insertion into and removal
//! from the runtime's timer wheel — none of which a cached read needs. Here each
//! connection gets a [`ConnTimer`] whose sleeps only store their due time in the
//! connection's [`Slot`] and leave a waker; the core's [`Deadlines::sweep`]
//! advances a coarse clock every [`TICK`] and wakes the connections whose head is
//! overdue, which hyper then closes exactly as with tokio's timer (the sleep it
//! polls is ready). A deadline is kept to within two ticks.
//!
//! Measured side by side: two gavel processes on one PostgreSQL, one with tokio's
//! timer and one with this, `gavel-loadtest run auction-read --auction-ids
//! 1-1000 --connections 64`, 5 s each, alternating, four rounds on the 2-core
//! machine: 130.1K/128.1K/126.1K/127.1K requests/s with tokio's timer,
//! 132.8K/129.9K/129.5K/130.9K with this (+1.4 to +3.0 %); the server's CPU per
//! read at 50K/s open loop (`/proc` times over 4 s), 16.2–16.5 µs against
//! 15.6–16.0 µs.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use atomic_waker::AtomicWaker;
use hyper::rt::{Sleep, Timer};

/// How often the clock advances and overdue connections are woken.
pub const TICK: Duration = Duration::from_millis(100);

/// One core's coarse clock and the deadlines of its connections.
#[derive(Clone)]
pub struct Deadlines {
    shared: Arc<Shared>,
}

struct Shared {
    base: Instant,
    /// Milliseconds since `base`, as of the last tick.
    now_ms: AtomicU64,
    /// Every connection handed a timer; the dead ones are dropped by the sweep.
    slots: Mutex<Vec<Weak<Slot>>>,
}

/// One connection's pending deadline, and the clock it is kept by.
struct Slot {
    /// When the head being read is due, in the clock's milliseconds; 0 for none.
    due_ms: AtomicU64,
    waker: AtomicWaker,
    shared: Arc<Shared>,
}

impl Default for Deadlines {
    fn default() -> Self {
        Deadlines {
            shared: Arc::new(Shared { base: Instant::now(), now_ms: AtomicU64::new(0), slots: Mutex::new(Vec::new()) }),
        }
    }
}

impl Deadlines {
    /// A timer for one new connection.
    pub fn timer(&self) -> ConnTimer {
        let slot = Arc::new(Slot { due_ms: AtomicU64::new(0), waker: AtomicWaker::new(), shared: self.shared.clone() });
        self.shared.lock().push(Arc::downgrade(&slot));
        ConnTimer { slot }
    }

    /// Advances the clock and wakes overdue connections every [`TICK`], for ever.
    pub async fn sweep(self) {
        let mut interval = tokio::time::interval(TICK);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            interval.tick().await;
            self.tick();
        }
    }

    /// One step of the sweep: returns how many connections it woke.
    fn tick(&self) -> usize {
        let now = self.shared.advance();
        let mut woken = 0;
        self.shared.lock().retain(|slot| {
            let Some(slot) = slot.upgrade() else { return false };
            let due = slot.due_ms.load(Ordering::Acquire);
            if due != 0 && due <= now {
                slot.waker.wake();
                woken += 1;
            }
            true
        });
        woken
    }

    /// Connections whose timers are still alive (as of the last sweep).
    #[cfg(test)]
    fn tracked(&self) -> usize {
        self.shared.lock().len()
    }
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Weak<Slot>>> {
        self.slots.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn advance(&self) -> u64 {
        let now = self.base.elapsed().as_millis() as u64;
        self.now_ms.store(now, Ordering::Release);
        now
    }

    fn now_ms(&self) -> u64 {
        self.now_ms.load(Ordering::Acquire)
    }

    fn ms(&self, at: Instant) -> u64 {
        at.saturating_duration_since(self.base).as_millis() as u64
    }
}

/// The [`Timer`] of one connection: hyper keeps at most one sleep alive per
/// connection (the head it is reading). A sleep costs one reference count of
/// the connection's slot and a small box.
pub struct ConnTimer {
    slot: Arc<Slot>,
}

impl Timer for ConnTimer {
    fn sleep(&self, duration: Duration) -> Pin<Box<dyn Sleep>> {
        self.sleep_until(self.now() + duration)
    }

    fn sleep_until(&self, deadline: Instant) -> Pin<Box<dyn Sleep>> {
        Box::pin(self.due_at(deadline))
    }

    /// The coarse clock: no clock read per request.
    fn now(&self) -> Instant {
        let shared = &self.slot.shared;
        shared.base + Duration::from_millis(shared.now_ms())
    }
}

impl ConnTimer {
    /// Arms the connection's deadline `within` from now (by the coarse clock),
    /// for a reader of its own: see `runtime::fast`.
    pub fn due_in(&self, within: Duration) -> Due {
        self.due_at(self.now() + within)
    }

    fn due_at(&self, deadline: Instant) -> Due {
        // 0 means "none", so a deadline at the clock's start is due at 1 ms.
        let due = self.slot.shared.ms(deadline).max(1);
        self.slot.due_ms.store(due, Ordering::Release);
        Due { slot: self.slot.clone(), due }
    }
}

/// A sleep until `due`; dropping it disarms its connection's deadline.
pub struct Due {
    slot: Arc<Slot>,
    due: u64,
}

impl Future for Due {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let shared = &self.slot.shared;
        if shared.now_ms() >= self.due {
            return Poll::Ready(());
        }
        self.slot.waker.register(cx.waker());
        // The sweep may have passed `due` between the check and the registration.
        if shared.now_ms() >= self.due { Poll::Ready(()) } else { Poll::Pending }
    }
}

impl Sleep for Due {}

impl Drop for Due {
    fn drop(&mut self) {
        // Only its own deadline: a newer sleep of the connection may have replaced it.
        let _ = self.slot.due_ms.compare_exchange(self.due, 0, Ordering::AcqRel, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;
    use std::task::Wake;

    use super::*;

    struct Count(AtomicUsize);

    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn poll(sleep: &mut Pin<Box<dyn Sleep>>, wakes: &Arc<Count>) -> Poll<()> {
        let waker = std::task::Waker::from(wakes.clone());
        sleep.as_mut().poll(&mut Context::from_waker(&waker))
    }

    #[test]
    fn an_overdue_sleep_is_woken_by_the_sweep_and_then_ready() {
        let deadlines = Deadlines::default();
        let timer = deadlines.timer();
        let wakes = Arc::new(Count(AtomicUsize::new(0)));
        let mut sleep = timer.sleep(Duration::from_millis(30));
        assert!(poll(&mut sleep, &wakes).is_pending());
        assert_eq!(deadlines.tick(), 0, "nothing is due yet");
        std::thread::sleep(Duration::from_millis(40));
        assert!(poll(&mut sleep, &wakes).is_pending(), "the clock moves only with the sweep");
        assert_eq!(deadlines.tick(), 1);
        assert_eq!(wakes.0.load(Ordering::SeqCst), 1, "the connection's task was woken");
        assert!(poll(&mut sleep, &wakes).is_ready());
    }

    #[test]
    fn a_dropped_sleep_disarms_its_connection() {
        let deadlines = Deadlines::default();
        let timer = deadlines.timer();
        let wakes = Arc::new(Count(AtomicUsize::new(0)));
        let mut sleep = timer.sleep(Duration::from_millis(1));
        assert!(poll(&mut sleep, &wakes).is_pending());
        drop(sleep);
        std::thread::sleep(Duration::from_millis(5));
        assert_eq!(deadlines.tick(), 0, "the head arrived: no deadline is left");
        assert_eq!(wakes.0.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn an_old_sleep_dropped_late_leaves_the_new_deadline_armed() {
        let deadlines = Deadlines::default();
        let timer = deadlines.timer();
        let wakes = Arc::new(Count(AtomicUsize::new(0)));
        let old = timer.sleep(Duration::from_secs(60));
        let mut new = timer.sleep(Duration::from_millis(1));
        drop(old);
        assert!(poll(&mut new, &wakes).is_pending());
        std::thread::sleep(Duration::from_millis(5));
        assert_eq!(deadlines.tick(), 1);
    }

    #[test]
    fn closed_connections_leave_the_sweep() {
        let deadlines = Deadlines::default();
        let kept = deadlines.timer();
        drop(deadlines.timer());
        drop(deadlines.timer());
        assert_eq!(deadlines.tracked(), 3);
        deadlines.tick();
        assert_eq!(deadlines.tracked(), 1);
        drop(kept);
        deadlines.tick();
        assert_eq!(deadlines.tracked(), 0);
    }

    #[test]
    fn the_clock_is_the_sweeps() {
        let deadlines = Deadlines::default();
        let timer = deadlines.timer();
        let before = timer.now();
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(timer.now(), before, "no clock read between sweeps");
        deadlines.tick();
        assert!(timer.now() >= before + Duration::from_millis(20));
    }
}

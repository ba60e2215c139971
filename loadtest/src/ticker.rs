//! A precise timer for the open loop: one `timerfd` per thread, armed for the
//! earliest waiting due time, with nanosecond resolution.
//!
//! Why not `tokio::time::sleep_until`: tokio's timer wheel ticks in milliseconds, so
//! every connection due within the same millisecond wakes at once. At 60K requests/s
//! that sends bursts of 60 requests each millisecond instead of one every 17 µs, and
//! the server's queueing of those bursts is then measured as its latency: with tokio
//! sleeps, nginx at half its maximum showed a p50 of 661 µs here. The kernel's
//! high-resolution timers wake within a few tens of microseconds of the due time,
//! so the requests go out spread as scheduled.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::future::Future;
use std::io;
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use nix::sys::time::TimeSpec;
use nix::sys::timerfd::{ClockId, Expiration, TimerFd, TimerFlags, TimerSetTimeFlags};
use tokio::io::unix::AsyncFd;
use tokio::sync::Notify;

/// One thread's timer. Single-threaded: `Rc`, `Cell`s, no locks.
pub struct Ticker {
    fd: AsyncFd<Fd>,
    /// Sleepers by due time, earliest first.
    waiting: RefCell<VecDeque<(Instant, Rc<Slot>)>>,
    /// Tells the driver that the earliest due time changed.
    rearm: Notify,
}

/// The timer as tokio's reactor wants it.
struct Fd(TimerFd);

impl AsRawFd for Fd {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_fd().as_raw_fd()
    }
}

#[derive(Default)]
struct Slot {
    due: Cell<bool>,
    waker: RefCell<Option<Waker>>,
}

impl Ticker {
    /// Needs a tokio runtime with I/O enabled.
    pub fn new() -> io::Result<Rc<Ticker>> {
        let fd = TimerFd::new(ClockId::CLOCK_MONOTONIC, TimerFlags::TFD_NONBLOCK | TimerFlags::TFD_CLOEXEC)?;
        // SAFETY: `Fd` owns the timer's descriptor, which stays open and the same
        // until the `AsyncFd` (and with it the `Fd`) is dropped.
        let fd = unsafe { AsyncFd::register_with_interest(Fd(fd), tokio::io::Interest::READABLE) }
            .map_err(io::Error::from)?;
        Ok(Rc::new(Ticker { fd, waiting: RefCell::default(), rearm: Notify::new() }))
    }

    /// Completes at `due`, give or take the kernel's wake-up latency. Only while
    /// [`Ticker::drive`] runs on the same thread.
    pub fn sleep_until(&self, due: Instant) -> impl Future<Output = ()> + use<> {
        let slot = Rc::new(Slot::default());
        let mut waiting = self.waiting.borrow_mut();
        // Connections claim due times in order, so this is nearly always the back.
        let at = waiting.partition_point(|(d, _)| *d <= due);
        waiting.insert(at, (due, Rc::clone(&slot)));
        if at == 0 {
            self.rearm.notify_one();
        }
        Sleep(slot)
    }

    /// Wakes the sleepers as their times come; runs until dropped or aborted.
    pub async fn drive(self: Rc<Self>) -> io::Result<()> {
        loop {
            let front = self.waiting.borrow().front().map(|(due, _)| *due);
            let Some(due) = front else {
                self.rearm.notified().await;
                continue;
            };
            let now = Instant::now();
            if due > now {
                let wait = (due - now).max(Duration::from_micros(1));
                self.fd
                    .get_ref()
                    .0
                    .set(Expiration::OneShot(TimeSpec::from_duration(wait)), TimerSetTimeFlags::empty())?;
                tokio::select! {
                    ready = self.fd.readable() => {
                        let mut guard = ready?;
                        // Consume the expiry; EAGAIN only means it was consumed already.
                        let _ = guard.get_inner().0.wait();
                        guard.clear_ready();
                    }
                    // An earlier sleeper arrived: re-arm for it.
                    () = self.rearm.notified() => {}
                }
            }
            let now = Instant::now();
            let mut waiting = self.waiting.borrow_mut();
            while waiting.front().is_some_and(|(d, _)| *d <= now) {
                if let Some((_, slot)) = waiting.pop_front() {
                    slot.due.set(true);
                    if let Some(waker) = slot.waker.take() {
                        waker.wake();
                    }
                }
            }
        }
    }
}

struct Sleep(Rc<Slot>);

impl Future for Sleep {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.0.due.get() {
            return Poll::Ready(());
        }
        *self.0.waker.borrow_mut() = Some(cx.waker().clone());
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sleepers_wake_in_order_close_to_their_due_times() {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        tokio::task::LocalSet::new().block_on(&rt, async {
            let ticker = Ticker::new().unwrap();
            let driver = tokio::task::spawn_local(Rc::clone(&ticker).drive());
            let start = Instant::now();
            let woke = Rc::new(RefCell::new(Vec::new()));
            let mut tasks = Vec::new();
            // Registered out of order, including one due at once.
            for offset_us in [3_000u64, 500, 0, 1_500, 250] {
                let due = start + Duration::from_micros(offset_us);
                let sleep = ticker.sleep_until(due);
                let woke = Rc::clone(&woke);
                tasks.push(tokio::task::spawn_local(async move {
                    sleep.await;
                    let late = Instant::now().saturating_duration_since(due);
                    woke.borrow_mut().push((offset_us, late));
                    assert!(Instant::now() >= due, "woke before its due time");
                }));
            }
            for task in tasks {
                task.await.unwrap();
            }
            driver.abort();
            let order: Vec<u64> = woke.borrow().iter().map(|(o, _)| *o).collect();
            assert_eq!(order, [0, 250, 500, 1_500, 3_000]);
            // Far finer than tokio's millisecond ticks, with room for a busy machine.
            let worst = woke.borrow().iter().map(|(_, late)| *late).max().unwrap();
            assert!(worst < Duration::from_millis(50), "woke {worst:?} late");
        });
    }
}

//! What an HTTP/2 connection has open, so that one left idle can be closed.
//!
//! hyper's HTTP/1.1 connections close after `--header-read-timeout` idle (the
//! timer hyper starts when a connection goes idle); its HTTP/2 connections have
//! no such bound. A connection's [`Activity`] counts its open streams, from a
//! request's arrival until its response body ends (an event stream's lasts as
//! long as the stream), and [`Activity::idle_for`] resolves once none has been
//! open for the given time.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::Notify;

/// One connection's open streams.
#[derive(Debug, Default)]
pub struct Activity {
    open: AtomicUsize,
    /// Told when the count changes.
    changed: Notify,
}

impl Activity {
    /// A stream opens; it stays open until the returned guard drops.
    pub fn open(self: &Arc<Self>) -> OpenStream {
        self.open.fetch_add(1, Ordering::Relaxed);
        self.changed.notify_waiters();
        OpenStream(self.clone())
    }

    /// Resolves once no stream has been open for `idle`.
    pub async fn idle_for(&self, idle: Duration) {
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            // Registered before the count is read, so no change slips between.
            changed.as_mut().enable();
            if self.open.load(Ordering::Relaxed) > 0 {
                changed.await;
                continue;
            }
            tokio::select! {
                _ = tokio::time::sleep(idle) => return,
                _ = changed => {}
            }
        }
    }
}

/// A stream counted open until dropped.
#[derive(Debug)]
pub struct OpenStream(Arc<Activity>);

impl Drop for OpenStream {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::Relaxed);
        self.0.changed.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn idle_counts_from_the_last_stream_closing() {
        let activity = Arc::new(Activity::default());
        let stream = activity.open();
        let started = tokio::time::Instant::now();
        let idle = tokio::spawn({
            let activity = activity.clone();
            async move { activity.idle_for(Duration::from_secs(10)).await }
        });
        tokio::time::sleep(Duration::from_secs(30)).await;
        assert!(!idle.is_finished(), "a stream is open");
        drop(stream);
        let again = activity.open();
        tokio::time::sleep(Duration::from_secs(5)).await;
        drop(again);
        idle.await.unwrap();
        assert_eq!(started.elapsed(), Duration::from_secs(45), "ten seconds after the last one closed");
    }
}

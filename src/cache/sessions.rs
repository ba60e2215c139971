//! The sessions one core knows to have ended before their tokens expire.
//!
//! Fed like the rest of the core's caches: loaded whole when the core's LISTEN
//! connection comes (back) up, then kept by the `revoked` and `sessions_ended`
//! notifications (migration `…_sessions.sql`). Checking a token is two hash
//! lookups, no database round trip.
//!
//! Bounded by what can still matter: a revoked session only until its token
//! expires, an account's raised epoch only until every token issued before it
//! has expired (`--session-ttl` after the change). Between the two, the entries
//! are the log-outs and password changes of one token lifetime: about 50 bytes
//! each.

use std::collections::HashMap;

use uuid::Uuid;

use crate::auth::Session;

/// An account's sessions of an epoch below `epoch` have ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Floor {
    epoch: i32,
    /// Seconds since the epoch after which no token of an older session epoch
    /// can still be unexpired.
    until: i64,
}

/// The ended sessions a core remembers.
#[derive(Debug, Default)]
pub struct EndedSessions {
    /// Revoked session ids, each with its token's expiry (seconds since the epoch).
    revoked: HashMap<Uuid, i64>,
    /// Accounts whose password changed within a token's lifetime.
    floors: HashMap<i64, Floor>,
}

impl EndedSessions {
    /// Whether `account`'s `session` has ended.
    pub fn has_ended(&self, account: i64, session: &Session) -> bool {
        self.revoked.contains_key(&session.id) || self.floors.get(&account).is_some_and(|f| session.epoch < f.epoch)
    }

    /// One session ended; its token expires at `expires` (seconds since the epoch).
    pub fn revoke(&mut self, session: Uuid, expires: i64) {
        self.revoked.insert(session, expires);
    }

    /// Every session of `account` older than `epoch` ended; none of them outlives `until`.
    pub fn end_all(&mut self, account: i64, epoch: i32, until: i64) {
        let floor = self.floors.entry(account).or_insert(Floor { epoch, until });
        // Notifications may come late or twice: the highest epoch holds.
        if epoch >= floor.epoch {
            *floor = Floor { epoch, until: until.max(floor.until) };
        }
    }

    /// Forgets what no unexpired token can need any more, as of `now` (seconds
    /// since the epoch).
    pub fn sweep(&mut self, now: i64) {
        self.revoked.retain(|_, expires| *expires >= now);
        self.floors.retain(|_, f| f.until >= now);
    }

    pub fn len(&self) -> usize {
        self.revoked.len() + self.floors.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn session(epoch: i32) -> Session {
        Session { id: Uuid::new_v4(), epoch, expires: 2_000 }
    }

    #[test]
    fn a_revoked_session_ends_alone() {
        let mut ended = EndedSessions::default();
        let (gone, kept) = (session(0), session(0));
        ended.revoke(gone.id, 2_000);
        assert!(ended.has_ended(1, &gone));
        assert!(!ended.has_ended(1, &kept));
    }

    #[test]
    fn a_raised_epoch_ends_the_older_sessions_of_its_account_only() {
        let mut ended = EndedSessions::default();
        ended.end_all(1, 2, 5_000);
        assert!(ended.has_ended(1, &session(0)));
        assert!(ended.has_ended(1, &session(1)));
        assert!(!ended.has_ended(1, &session(2)), "a log-in after the change");
        assert!(!ended.has_ended(2, &session(0)), "another account");
        // A late, older notification does not lower the floor.
        ended.end_all(1, 1, 4_000);
        assert!(ended.has_ended(1, &session(1)));
    }

    #[test]
    fn a_sweep_forgets_only_what_has_expired() {
        let mut ended = EndedSessions::default();
        let (early, late) = (session(0), session(0));
        ended.revoke(early.id, 100);
        ended.revoke(late.id, 300);
        ended.end_all(7, 1, 200);
        ended.sweep(150);
        assert!(!ended.has_ended(1, &early));
        assert!(ended.has_ended(1, &late));
        assert!(ended.has_ended(7, &session(0)));
        ended.sweep(250);
        assert!(!ended.has_ended(7, &session(0)));
        assert_eq!(ended.len(), 1);
    }
}

//! New-session requests we refused without a transaction (no server could
//! take them, the instance drained or stopping), remembered by transaction
//! id for 64 × T1 so that a copy of the same request (a network duplicate,
//! or the UA's retransmission when our 503 was lost) is refused again and
//! never reaches a server that came back meanwhile: the UA's transaction
//! has its final, and a server must not process a request its sender was
//! told failed (RFC 3261 §16.2: the proxy's own final belongs to a server
//! transaction that absorbs retransmissions). A direct-mapped table of
//! `SLOTS` entries: a refusal flood overwrites older ones (a copy of an
//! overwritten one is handled as new), and the cost when nothing was
//! refused for 64 × T1 is one atomic load per new transaction.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use super::txn::TXN_MS;

/// Refusals remembered at once, at most.
pub const SLOTS: usize = 4096;

pub(super) struct Refusals {
    /// (transaction id, remembered until ms); until 0: empty.
    slots: Mutex<Box<[(u64, u64)]>>,
    /// The last refusal's end (ms): none is remembered past it.
    last_until: AtomicU64,
}

impl Default for Refusals {
    fn default() -> Self {
        Refusals::with_slots(SLOTS)
    }
}

impl Refusals {
    /// A table of `n` slots (at least one).
    pub(super) fn with_slots(n: usize) -> Refusals {
        Refusals {
            slots: Mutex::new(vec![(0, 0); n.max(1)].into_boxed_slice()),
            last_until: AtomicU64::new(0),
        }
    }

    /// Remembers that transaction `id` was refused at `ms`.
    pub(super) fn note(&self, id: u64, ms: u64) {
        let until = ms + TXN_MS;
        let mut s = self
            .slots
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let n = s.len();
        s[(id as usize) % n] = (id, until);
        self.last_until.fetch_max(until, Ordering::Relaxed);
    }

    /// Whether transaction `id` was refused within the last 64 × T1.
    pub(super) fn refused(&self, id: u64, ms: u64) -> bool {
        if ms >= self.last_until.load(Ordering::Relaxed) {
            return false;
        }
        let s = self
            .slots
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let (who, until) = s[(id as usize) % s.len()];
        who == id && ms < until
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refusal_is_remembered_for_64_t1_and_a_flood_overwrites_the_oldest() {
        let r = Refusals::default();
        assert!(!r.refused(7, 0));
        r.note(7, 1_000);
        assert!(r.refused(7, 1_000) && r.refused(7, 1_000 + TXN_MS - 1));
        assert!(!r.refused(7, 1_000 + TXN_MS) && !r.refused(8, 1_000));
        r.note(7 + SLOTS as u64, 2_000);
        assert!(!r.refused(7, 2_000) && r.refused(7 + SLOTS as u64, 2_000));
    }
}

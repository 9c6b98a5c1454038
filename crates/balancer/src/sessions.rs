//! The session table (FIG 5 step 508): Call-ID → the server that has the
//! session. Lock-free (`papaya`), bounded (inserts past the maximum are
//! refused and counted; Record-Route affinity still keeps those dialogs
//! whole), and swept of idle entries. Time is a parameter (milliseconds on
//! the balancer's clock), so the rules are tested without waiting.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

/// What kind of entry: a dialog lives until its BYE is answered or it idles
/// out; a lone transaction (OPTIONS, MESSAGE...) only as long as a
/// transaction can (64 × T1 = 32 s).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// INVITE, SUBSCRIBE, REFER.
    Dialog,
    /// Anything else out of dialog.
    Transaction,
}

/// How long a lone transaction's entry lives, ms.
pub const TRANSACTION_MS: u64 = 32_000;

/// One session.
#[derive(Debug)]
pub struct Session {
    /// The server's id.
    pub server: Arc<str>,
    /// Dialog or transaction.
    pub kind: Kind,
    last_ms: AtomicU64,
}

/// The table.
#[derive(Debug)]
pub struct Sessions {
    map: papaya::HashMap<Box<[u8]>, Session>,
    max: usize,
    len: AtomicUsize,
}

impl Sessions {
    /// An empty table holding at most `max` sessions.
    #[must_use]
    pub fn new(max: usize) -> Sessions {
        Sessions {
            map: papaya::HashMap::new(),
            max,
            len: AtomicUsize::new(0),
        }
    }

    /// The server of a session, marking it used at `now_ms`.
    #[must_use]
    pub fn get(&self, call_id: &[u8], now_ms: u64) -> Option<Arc<str>> {
        let m = self.map.pin();
        let s = m.get(call_id)?;
        s.last_ms.store(now_ms, Ordering::Relaxed);
        Some(s.server.clone())
    }

    /// Records a new session; `false` when the table is full (or it exists:
    /// then the existing server stands).
    pub fn insert(&self, call_id: &[u8], server: Arc<str>, kind: Kind, now_ms: u64) -> bool {
        if self.len.load(Ordering::Relaxed) >= self.max {
            return false;
        }
        let m = self.map.pin();
        let fresh = m
            .try_insert(
                call_id.into(),
                Session {
                    server,
                    kind,
                    last_ms: AtomicU64::new(now_ms),
                },
            )
            .is_ok();
        if fresh {
            self.len.fetch_add(1, Ordering::Relaxed);
        }
        fresh
    }

    /// Promotes a transaction entry to a dialog (an INVITE's 2xx).
    pub fn confirm(&self, call_id: &[u8], now_ms: u64) {
        let m = self.map.pin();
        if let Some(s) = m.get(call_id) {
            s.last_ms.store(now_ms, Ordering::Relaxed);
            if s.kind == Kind::Transaction {
                let server = s.server.clone();
                m.insert(
                    call_id.into(),
                    Session {
                        server,
                        kind: Kind::Dialog,
                        last_ms: AtomicU64::new(now_ms),
                    },
                );
            }
        }
    }

    /// Points a session at another server (failover of its INVITE).
    pub fn reassign(&self, call_id: &[u8], server: Arc<str>, now_ms: u64) {
        let m = self.map.pin();
        if let Some(s) = m.get(call_id) {
            let kind = s.kind;
            m.insert(
                call_id.into(),
                Session {
                    server,
                    kind,
                    last_ms: AtomicU64::new(now_ms),
                },
            );
        }
    }

    /// Keeps a session only as long as a transaction (a failed INVITE: its
    /// ACK must still reach the server; then it goes).
    pub fn demote(&self, call_id: &[u8], now_ms: u64) {
        let m = self.map.pin();
        if let Some(s) = m.get(call_id) {
            let server = s.server.clone();
            m.insert(
                call_id.into(),
                Session {
                    server,
                    kind: Kind::Transaction,
                    last_ms: AtomicU64::new(now_ms),
                },
            );
        }
    }

    /// Removes a session (BYE answered).
    pub fn remove(&self, call_id: &[u8]) {
        if self.map.pin().remove(call_id).is_some() {
            self.len.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// Sessions in the table.
    #[must_use]
    pub fn len(&self) -> usize {
        self.len.load(Ordering::Relaxed)
    }

    /// Whether the table is empty.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Removes dialogs idle for `dialog_idle_ms` and transactions older than
    /// [`TRANSACTION_MS`]; returns how many left.
    pub fn sweep(&self, now_ms: u64, dialog_idle_ms: u64) -> usize {
        let m = self.map.pin();
        let mut gone = 0;
        m.retain(|_, s| {
            let idle = now_ms.saturating_sub(s.last_ms.load(Ordering::Relaxed));
            let keep = match s.kind {
                Kind::Dialog => idle < dialog_idle_ms,
                Kind::Transaction => idle < TRANSACTION_MS,
            };
            gone += usize::from(!keep);
            keep
        });
        self.len.fetch_sub(gone.min(self.len()), Ordering::Relaxed);
        gone
    }

    /// Sessions per server id (for the admin API; walks the table).
    #[must_use]
    pub fn per_server(&self) -> std::collections::HashMap<Arc<str>, usize> {
        let mut out = std::collections::HashMap::new();
        for (_, s) in &self.map.pin() {
            if s.kind == Kind::Dialog {
                *out.entry(s.server.clone()).or_insert(0) += 1;
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lifecycle() {
        let t = Sessions::new(10);
        let s1: Arc<str> = "s1".into();
        assert!(t.insert(b"a", s1.clone(), Kind::Transaction, 0));
        assert!(
            !t.insert(b"a", "s2".into(), Kind::Transaction, 1),
            "a retransmission keeps its server"
        );
        assert_eq!(t.get(b"a", 5).as_deref(), Some("s1"));
        t.confirm(b"a", 6);
        assert_eq!(t.per_server().get("s1"), Some(&1));
        t.remove(b"a");
        assert_eq!(t.get(b"a", 7), None);
        assert!(t.is_empty());
    }

    #[test]
    fn bounded_and_swept() {
        let t = Sessions::new(3);
        for (i, id) in [&b"a"[..], b"b", b"c"].iter().enumerate() {
            assert!(t.insert(id, "s1".into(), Kind::Dialog, i as u64));
        }
        assert!(!t.insert(b"d", "s1".into(), Kind::Dialog, 3), "full");
        assert_eq!(t.len(), 3);
        // b is used later than the others; a and c idle out.
        let _ = t.get(b"b", 5_000);
        assert_eq!(t.sweep(6_000, 2_000), 2);
        assert_eq!(t.len(), 1);
        assert!(t.insert(b"d", "s1".into(), Kind::Transaction, 6_000));
        assert_eq!(
            t.sweep(6_000 + TRANSACTION_MS, 1_000_000),
            1,
            "a transaction entry lives 32 s"
        );
        assert_eq!(t.get(b"b", 0).as_deref(), Some("s1"));
    }
}

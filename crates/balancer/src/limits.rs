//! Per-source limits: token buckets keyed by the source address, in a
//! fixed-size table (bounded memory whatever the number of sources, so a
//! flood from spoofed addresses cannot exhaust it). Pure: time is a
//! parameter (milliseconds on the balancer clock); no lock (one atomic word
//! per bucket, updated by compare-and-swap).
//!
//! A source's bucket is found by a keyed hash of its address, so two
//! sources share a bucket only by chance (1 in `slots`), and an attacker who
//! does not know the routing secret cannot aim at a victim's bucket. Each
//! bucket is one `u64`: milli-tokens in the high 32 bits, the time of the
//! last refill (ms, modulo 2^32) in the low 32.

use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};

use ipnet::IpNet;

/// A rate and the burst a source may send above it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rate {
    /// Requests per second, sustained.
    pub per_second: f64,
    /// Requests a source may send at once (the bucket's size).
    pub burst: f64,
}

/// Milli-tokens per token.
const MILLI: u64 = 1000;
/// The largest bucket (milli-tokens fit 32 bits).
const MAX_BURST: f64 = (u32::MAX as u64 / MILLI) as f64;

/// Token buckets for one kind of request, one per (hashed) source.
#[derive(Debug)]
pub struct Buckets {
    slots: Box<[AtomicU64]>,
    key: (u64, u64),
    rate: Rate,
}

impl Buckets {
    /// `slots` buckets (rounded up to a power of two, at least 1) of `rate`;
    /// `key` keys the hash of addresses.
    #[must_use]
    pub fn new(slots: usize, rate: Rate, key: (u64, u64)) -> Buckets {
        let n = slots.max(1).next_power_of_two();
        let rate = Rate {
            per_second: rate.per_second.max(0.0),
            burst: rate.burst.clamp(1.0, MAX_BURST),
        };
        // A fresh bucket is full: the time field says "long ago".
        let full = pack((rate.burst * MILLI as f64) as u64, 0);
        Buckets {
            slots: (0..n).map(|_| AtomicU64::new(full)).collect(),
            key,
            rate,
        }
    }

    /// Memory the table holds, bytes.
    #[must_use]
    pub fn bytes(&self) -> usize {
        self.slots.len() * std::mem::size_of::<AtomicU64>()
    }

    fn slot(&self, ip: IpAddr) -> &AtomicU64 {
        use std::hash::Hasher;
        let mut h = siphasher::sip::SipHasher13::new_with_keys(self.key.0, self.key.1);
        match ip {
            IpAddr::V4(a) => h.write(&a.octets()),
            // An IPv6 source is limited per /64: one host has them all.
            IpAddr::V6(a) => h.write(&a.octets()[..8]),
        }
        let i = (h.finish() as usize) & (self.slots.len() - 1);
        &self.slots[i]
    }

    /// Milli-tokens in a bucket last refilled at `at` with `tokens`, at `now`.
    fn refilled(&self, tokens: u64, at: u32, now: u32) -> u64 {
        let burst = (self.rate.burst * MILLI as f64) as u64;
        let elapsed = now.wrapping_sub(at);
        // A time "in the future" (two threads racing): no refill.
        let elapsed = if elapsed > u32::MAX / 2 { 0 } else { elapsed };
        let refill = (f64::from(elapsed) * self.rate.per_second) as u64;
        (tokens + refill).min(burst)
    }

    /// Whether `ip`'s bucket has a token at `now_ms`, taking none (a source
    /// is refused while it has spent its budget of failures).
    #[must_use]
    pub fn available(&self, ip: IpAddr, now_ms: u64) -> bool {
        let (tokens, at) = unpack(self.slot(ip).load(Ordering::Relaxed));
        self.refilled(tokens, at, now_ms as u32) >= MILLI
    }

    /// Seconds until `ip`'s bucket has a token again (0 when it has one).
    #[must_use]
    pub fn wait_seconds(&self, ip: IpAddr, now_ms: u64) -> u64 {
        let (tokens, at) = unpack(self.slot(ip).load(Ordering::Relaxed));
        let missing = MILLI.saturating_sub(self.refilled(tokens, at, now_ms as u32));
        if missing == 0 || self.rate.per_second <= 0.0 {
            return 0;
        }
        // per_second milli-tokens a millisecond.
        ((missing as f64 / self.rate.per_second) / 1000.0).ceil() as u64
    }

    /// Takes one token from `ip`'s bucket at `now_ms`; `false` when it has
    /// none left (the request is over the limit).
    pub fn take(&self, ip: IpAddr, now_ms: u64) -> bool {
        let slot = self.slot(ip);
        let now = now_ms as u32;
        let mut cur = slot.load(Ordering::Relaxed);
        loop {
            let (tokens, at) = unpack(cur);
            let tokens = self.refilled(tokens, at, now);
            let (next, ok) = if tokens >= MILLI {
                (pack(tokens - MILLI, now), true)
            } else {
                (pack(tokens, now), false)
            };
            match slot.compare_exchange_weak(cur, next, Ordering::Relaxed, Ordering::Relaxed) {
                Ok(_) => return ok,
                Err(actual) => cur = actual,
            }
        }
    }
}

fn pack(milli_tokens: u64, at: u32) -> u64 {
    (milli_tokens.min(u64::from(u32::MAX)) << 32) | u64::from(at)
}

fn unpack(v: u64) -> (u64, u32) {
    (v >> 32, v as u32)
}

/// The buckets of every kind of request a source may send, from `[limits]`.
#[derive(Debug)]
pub struct Limiter {
    /// New sessions: INVITE, SUBSCRIBE, REFER without a To tag.
    pub new_session: Buckets,
    /// REGISTER, before the fork.
    pub register: Buckets,
    /// Other out-of-dialog requests (MESSAGE, OPTIONS, CANCEL, an ACK with
    /// no state...).
    pub request: Buckets,
    /// Failed authentications (a request with credentials answered 401 or
    /// 407): a source that has spent this budget has its requests with
    /// credentials refused until it refills (password guessing).
    pub auth_failure: Buckets,
    /// Our 503s to requests over a limit.
    pub reject: Buckets,
    /// The settings they were built from.
    pub cfg: crate::config::LimitsConfig,
}

impl Limiter {
    /// The buckets for `cfg`, their hashes keyed by `key`.
    #[must_use]
    pub fn new(cfg: &crate::config::LimitsConfig, key: (u64, u64)) -> Limiter {
        let b = |r: Rate, salt: u64| Buckets::new(cfg.slots, r, (key.0 ^ salt, key.1));
        Limiter {
            new_session: b(cfg.new_session, 1),
            register: b(cfg.register, 2),
            request: b(cfg.request, 3),
            reject: b(cfg.reject, 4),
            auth_failure: b(cfg.auth_failure, 5),
            cfg: cfg.clone(),
        }
    }
}

/// Addresses exempt from every limit.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AllowList(pub Vec<IpNet>);

impl AllowList {
    /// Whether `ip` is in one of the networks.
    #[must_use]
    pub fn contains(&self, ip: IpAddr) -> bool {
        self.0.iter().any(|n| n.contains(&ip))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn a_burst_then_the_rate() {
        let b = Buckets::new(
            1024,
            Rate {
                per_second: 10.0,
                burst: 5.0,
            },
            (1, 2),
        );
        let a = ip("192.0.2.1");
        let t0 = 1_000_000;
        let ok = (0..20).filter(|_| b.take(a, t0)).count();
        assert_eq!(ok, 5, "the burst, then nothing");
        // 10/s: one token every 100 ms.
        assert!(!b.take(a, t0 + 50));
        assert!(b.take(a, t0 + 150));
        assert!(!b.take(a, t0 + 160));
        // After a long pause, the bucket is full again, not fuller.
        let later = t0 + 60_000;
        assert_eq!((0..20).filter(|_| b.take(a, later)).count(), 5);
    }

    #[test]
    fn sources_are_apart_and_memory_is_fixed() {
        let b = Buckets::new(
            1 << 16,
            Rate {
                per_second: 1.0,
                burst: 2.0,
            },
            (7, 9),
        );
        let bytes = b.bytes();
        let now = 5_000;
        // A flood from many spoofed sources does not grow the table...
        for i in 0..200_000u32 {
            let _ = b.take(IpAddr::from(i.to_be_bytes()), now);
        }
        assert_eq!(b.bytes(), bytes);
        // ...and a source that hashed apart still has its burst (it may
        // share a bucket with a few flooders: 200k sources over 65k buckets,
        // so test several and require most to pass).
        let fresh = (0..100u32)
            .filter(|i| {
                let a = IpAddr::from([198, 51, 100, *i as u8]);
                b.take(a, now + 10_000)
            })
            .count();
        assert!(fresh >= 95, "{fresh}");
    }

    #[test]
    fn ipv6_is_limited_per_64() {
        let b = Buckets::new(
            1024,
            Rate {
                per_second: 0.0,
                burst: 3.0,
            },
            (3, 4),
        );
        let ok = (0..10u16)
            .filter(|i| b.take(IpAddr::from([0x2001, 0xdb8, 0, 1, 0, 0, 0, *i]), 0))
            .count();
        assert_eq!(ok, 3, "one /64, one bucket");
    }

    #[test]
    fn the_clock_wrapping_does_not_stall_a_bucket() {
        let b = Buckets::new(
            16,
            Rate {
                per_second: 1000.0,
                burst: 1.0,
            },
            (0, 0),
        );
        let a = ip("192.0.2.9");
        let near = u64::from(u32::MAX) - 1;
        assert!(b.take(a, near));
        assert!(!b.take(a, near));
        assert!(b.take(a, near + 10), "past 2^32 ms");
        // A time slightly in the past (threads racing) refills nothing.
        assert!(!b.take(a, near + 5));
    }

    #[test]
    fn a_budget_of_failures_is_looked_at_without_spending_it() {
        let b = Buckets::new(
            16,
            Rate {
                per_second: 0.5,
                burst: 2.0,
            },
            (7, 8),
        );
        let a = ip("192.0.2.1");
        let t = 1_000_000;
        assert!(b.available(a, t));
        assert!(b.available(a, t), "looking takes nothing");
        assert!(b.take(a, t) && b.take(a, t));
        assert!(!b.available(a, t));
        assert_eq!(b.wait_seconds(a, t), 2, "one token in 2 s at 0.5/s");
        assert!(!b.available(a, t + 1_999));
        assert!(b.available(a, t + 2_000));
        assert_eq!(b.wait_seconds(a, t + 2_000), 0);
        assert!(b.available(ip("192.0.2.2"), t), "others keep theirs");
    }

    #[test]
    fn allow_list() {
        let l = AllowList(vec![
            "10.0.0.0/8".parse().unwrap(),
            "2001:db8::/32".parse().unwrap(),
        ]);
        assert!(l.contains(ip("10.1.2.3")));
        assert!(l.contains(ip("2001:db8::1")));
        assert!(!l.contains(ip("192.0.2.1")));
    }
}

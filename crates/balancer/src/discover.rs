//! Members of the pool found by name (`[[discover]]`, `servers[].address`
//! written `host:port`), as the routing core keeps them: pure, no DNS here
//! (the shell resolves, [`crate::dns`]), time passed in as milliseconds.
//!
//! - A member's id comes from its source and its target (the SRV target
//!   and port, or the address and port of an A/AAAA answer), never from
//!   the order of the answer: the same member keeps its id, its counters
//!   and the `sb` tokens of its dialogs across re-resolutions and restarts.
//! - An answer replaces the source's members: new ones join, an address
//!   that changed under the same id follows, and one no longer in the
//!   answer retires: no new session, but its dialogs' requests still reach
//!   it for `dns.retire_after`; then it leaves (as a server removed by a
//!   reload does). One that comes back in an answer before then is a
//!   member again.
//! - A failed resolution changes nothing: the last answer stays.

use std::net::SocketAddr;

use crate::config::{DiscoverConfig, DiscoverKind, ServerConfig};

/// One target of an answer: the name the answer gave (an SRV target; the
/// queried name for A/AAAA) and where it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// The SRV target (`sip1.example.com`), or the name asked.
    pub name: String,
    /// Its address and port.
    pub address: SocketAddr,
}

/// A member of the pool from a source.
#[derive(Debug, Clone, PartialEq)]
pub struct Member {
    /// As the pool takes it.
    pub cfg: ServerConfig,
    /// Not in the last answer since this time (ms): retiring.
    pub gone_since: Option<u64>,
}

/// The id of a member: the source's id, then (SRV) the target name and
/// port, or (A/AAAA) the address and port, with every character that an
/// id may not hold made `-`. A `[[servers]]` entry keeps its own id.
#[must_use]
pub fn member_id(src: &DiscoverConfig, t: &Target) -> String {
    let key = match src.kind {
        DiscoverKind::Server(_) => return src.source.clone(),
        DiscoverKind::Srv => format!("{}-{}", t.name.trim_end_matches('.'), t.address.port()),
        DiscoverKind::Addresses(_) => format!("{}-{}", t.address.ip(), t.address.port()),
    };
    let slug: String = key
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();
    format!("{}-{}", src.source, slug.trim_matches('-'))
}

/// The members after an answer with `targets` at `now` (ms), from `old`.
#[must_use]
pub fn merge(src: &DiscoverConfig, old: &[Member], targets: &[Target], now: u64) -> Vec<Member> {
    let mut out: Vec<Member> = Vec::new();
    let mut targets: Vec<&Target> = targets.iter().collect();
    // One member for a `[[servers]]` name: its first address (stable order).
    targets.sort_by_key(|t| (t.name.clone(), t.address));
    if matches!(src.kind, DiscoverKind::Server(_)) {
        targets.truncate(1);
    }
    for t in targets {
        let id = member_id(src, t);
        if out.iter().any(|m| m.cfg.id == id) {
            // An SRV target with several addresses: its first one.
            continue;
        }
        out.push(Member {
            cfg: ServerConfig {
                id,
                address: t.address,
                ..src.template.clone()
            },
            gone_since: None,
        });
    }
    for m in old {
        if !out.iter().any(|n| n.cfg.id == m.cfg.id) {
            out.push(Member {
                cfg: m.cfg.clone(),
                gone_since: Some(m.gone_since.unwrap_or(now)),
            });
        }
    }
    out
}

/// `members` without those retired for `retire_after_ms` at `now`; whether
/// any left.
pub fn sweep(members: &mut Vec<Member>, now: u64, retire_after_ms: u64) -> bool {
    let before = members.len();
    members.retain(|m| {
        m.gone_since
            .is_none_or(|g| now < g.saturating_add(retire_after_ms))
    });
    members.len() != before
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Transport;

    fn src(kind: DiscoverKind) -> DiscoverConfig {
        DiscoverConfig {
            source: "k8s".into(),
            name: "sip.example.test".into(),
            kind,
            template: ServerConfig {
                id: "k8s".into(),
                address: "0.0.0.0:0".parse().unwrap(),
                transport: Transport::Udp,
                agent: None,
                capacity: None,
                probe: None,
                probe_failures: 2,
                probe_successes: 2,
                tls_name: None,
            },
        }
    }

    fn t(name: &str, a: &str) -> Target {
        Target {
            name: name.into(),
            address: a.parse().unwrap(),
        }
    }

    #[test]
    fn ids_come_from_the_target_not_the_order() {
        let s = src(DiscoverKind::Srv);
        let a = merge(
            &s,
            &[],
            &[t("b.test.", "10.0.0.2:5060"), t("a.test.", "10.0.0.1:5070")],
            0,
        );
        let ids: Vec<&str> = a.iter().map(|m| m.cfg.id.as_str()).collect();
        assert_eq!(ids, ["k8s-a-test-5070", "k8s-b-test-5060"]);
        // The same target at a new address keeps its id.
        let b = merge(
            &s,
            &a,
            &[t("a.test.", "10.0.0.9:5070"), t("b.test.", "10.0.0.2:5060")],
            1,
        );
        assert_eq!(b[0].cfg.id, "k8s-a-test-5070");
        assert_eq!(b[0].cfg.address, "10.0.0.9:5070".parse().unwrap());
        assert!(b.iter().all(|m| m.gone_since.is_none()));
        let h = src(DiscoverKind::Addresses(5060));
        let c = merge(
            &h,
            &[],
            &[t("x", "[fd00::1]:5060"), t("x", "10.1.2.3:5060")],
            0,
        );
        let ids: Vec<&str> = c.iter().map(|m| m.cfg.id.as_str()).collect();
        assert_eq!(ids, ["k8s-10-1-2-3-5060", "k8s-fd00--1-5060"]);
    }

    #[test]
    fn a_member_gone_from_the_answer_retires_then_leaves() {
        let s = src(DiscoverKind::Addresses(5060));
        let a = merge(
            &s,
            &[],
            &[t("x", "10.0.0.1:5060"), t("x", "10.0.0.2:5060")],
            0,
        );
        let mut b = merge(&s, &a, &[t("x", "10.0.0.1:5060")], 1_000);
        assert_eq!(b.len(), 2);
        assert_eq!(b[1].gone_since, Some(1_000));
        // Still gone later: the retirement keeps its start.
        b = merge(&s, &b, &[t("x", "10.0.0.1:5060")], 5_000);
        assert_eq!(b[1].gone_since, Some(1_000));
        assert!(!sweep(&mut b, 60_999, 60_000));
        assert!(sweep(&mut b, 61_000, 60_000));
        assert_eq!(b.len(), 1);
        // Back before its time: a member again.
        let c = merge(&s, &a, &[t("x", "10.0.0.1:5060")], 1_000);
        let d = merge(
            &s,
            &c,
            &[t("x", "10.0.0.2:5060"), t("x", "10.0.0.1:5060")],
            2_000,
        );
        assert!(d.iter().all(|m| m.gone_since.is_none()) && d.len() == 2);
    }

    #[test]
    fn a_named_server_is_one_member_with_its_own_id() {
        let s = src(DiscoverKind::Server(5080));
        let a = merge(
            &s,
            &[],
            &[t("x", "10.0.0.2:5080"), t("x", "10.0.0.1:5080")],
            0,
        );
        assert_eq!(a.len(), 1);
        assert_eq!(a[0].cfg.id, "k8s");
        assert_eq!(a[0].cfg.address, "10.0.0.1:5080".parse().unwrap());
    }
}

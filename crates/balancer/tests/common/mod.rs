//! What the routing-core tests (router_core, pool_core) share: reading
//! the messages a core sent.

#![allow(dead_code)] // each test binary uses its own part

use std::net::SocketAddr;

pub fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

pub fn header_values<'a>(msg: &'a str, name: &str) -> Vec<&'a str> {
    msg.split("\r\n")
        .take_while(|l| !l.is_empty())
        .filter_map(|l| {
            let (n, v) = l.split_once(':')?;
            n.trim().eq_ignore_ascii_case(name).then_some(v.trim())
        })
        .flat_map(|v| v.split(", "))
        .collect()
}

pub fn status(text: &str) -> Option<u16> {
    text.strip_prefix("SIP/2.0 ")?.get(..3)?.parse().ok()
}

/// The first datagram in `sent` to one of `servers` (ip:port), and where.
pub fn to_one_of(
    sent: &[(balancer::router::Dest, String)],
    servers: &[&str],
) -> (SocketAddr, String) {
    sent.iter()
        .find_map(|(d, t)| match d {
            balancer::router::Dest::Udp(a) if servers.iter().any(|s| addr(s) == *a) => {
                Some((*a, t.clone()))
            }
            _ => None,
        })
        .unwrap_or_else(|| panic!("nothing to a server: {sent:?}"))
}

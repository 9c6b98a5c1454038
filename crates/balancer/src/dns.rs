//! Names followed in DNS (the shell's part of `[[discover]]` and of
//! `servers[].address` written `host:port`): one task per name resolves it
//! with hickory-resolver, hands the answer to the routing core as data
//! ([`Router::set_discovered`]), and resolves it again after its TTL
//! (bounded by `dns.min_ttl` and `dns.max_ttl`). A failed resolution (no
//! answer, an error, or an empty answer) changes nothing in the pool: the
//! last answer stays, the failure is logged and counted, and the name is
//! asked again after `dns.min_ttl`.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use hickory_resolver::TokioResolver;
use hickory_resolver::config::{LookupIpStrategy, NameServerConfig, ResolverConfig};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::proto::rr::RData;
use tracing::{debug, warn};

use crate::config::{DiscoverConfig, DiscoverKind, DnsConfig};
use crate::discover::Target;
use crate::router::Router;

/// A resolver for `cfg`: its name servers, else those of /etc/resolv.conf.
///
/// # Errors
/// /etc/resolv.conf cannot be read (with no `dns.nameservers`).
pub fn resolver(cfg: &DnsConfig) -> Result<TokioResolver, String> {
    let provider = TokioRuntimeProvider::default();
    let mut b = if cfg.nameservers.is_empty() {
        TokioResolver::builder(provider).map_err(|e| format!("/etc/resolv.conf: {e}"))?
    } else {
        let servers = cfg
            .nameservers
            .iter()
            .map(|a| {
                let mut ns = NameServerConfig::udp_and_tcp(a.ip());
                for c in &mut ns.connections {
                    c.port = a.port();
                }
                ns
            })
            .collect();
        TokioResolver::builder_with_config(ResolverConfig::from_name_servers(servers), provider)
    };
    let o = b.options_mut();
    // Each answer as the name server gives it now, TTL included: the
    // re-resolution schedule is ours.
    o.cache_size = 0;
    o.timeout = cfg.timeout;
    o.attempts = 2;
    o.ip_strategy = LookupIpStrategy::Ipv4AndIpv6;
    b.build().map_err(|e| e.to_string())
}

/// The name as asked: fully qualified when it has a dot (no search list).
fn fqdn(name: &str) -> String {
    if name.contains('.') {
        format!("{}.", name.trim_end_matches('.'))
    } else {
        name.to_owned()
    }
}

/// The addresses of `host` and the smallest TTL among them.
async fn addresses(r: &TokioResolver, host: &str) -> Result<(Vec<IpAddr>, u32), String> {
    let l = r
        .lookup_ip(fqdn(host).as_str())
        .await
        .map_err(|e| format!("{host}: {e}"))?;
    let mut ips = Vec::new();
    let mut ttl = u32::MAX;
    for rec in l.as_lookup().answers() {
        let ip = match &rec.data {
            RData::A(a) => IpAddr::V4(a.0),
            RData::AAAA(a) => IpAddr::V6(a.0),
            _ => continue,
        };
        ips.push(ip);
        ttl = ttl.min(rec.ttl);
    }
    Ok((ips, ttl))
}

/// Resolves `src` once: its targets and the answer's TTL.
///
/// # Errors
/// The name does not resolve, or its answer is empty.
pub async fn resolve(
    r: &TokioResolver,
    src: &DiscoverConfig,
) -> Result<(Vec<Target>, u32), String> {
    let mut targets = Vec::new();
    let mut ttl = u32::MAX;
    match src.kind {
        DiscoverKind::Srv => {
            let l = r
                .srv_lookup(fqdn(&src.name).as_str())
                .await
                .map_err(|e| format!("{} (SRV): {e}", src.name))?;
            for rec in l.answers() {
                let RData::SRV(srv) = &rec.data else { continue };
                ttl = ttl.min(rec.ttl);
                let target = srv.target.to_ascii();
                if target == "." {
                    // "Decidedly not available at this domain" (RFC 2782).
                    continue;
                }
                let (ips, t) = addresses(r, &target).await?;
                ttl = ttl.min(t);
                targets.extend(ips.into_iter().map(|ip| Target {
                    name: target.trim_end_matches('.').to_owned(),
                    address: SocketAddr::new(ip, srv.port),
                }));
            }
        }
        DiscoverKind::Addresses(port) | DiscoverKind::Server(port) => {
            let (ips, t) = addresses(r, &src.name).await?;
            ttl = t;
            targets.extend(ips.into_iter().map(|ip| Target {
                name: src.name.clone(),
                address: SocketAddr::new(ip, port),
            }));
        }
    }
    if targets.is_empty() {
        return Err(format!("{}: no address in the answer", src.name));
    }
    Ok((targets, ttl))
}

/// How long to wait before asking again after an answer with `ttl` seconds.
#[must_use]
pub fn next_after(ttl: u32, cfg: &DnsConfig) -> Duration {
    Duration::from_secs(u64::from(ttl)).clamp(cfg.min_ttl, cfg.max_ttl)
}

/// Follows `src` for ever (the caller aborts the task): each answer to the
/// router, each failure counted there.
pub async fn follow(
    router: Arc<Router>,
    resolver: TokioResolver,
    src: DiscoverConfig,
    cfg: DnsConfig,
) {
    loop {
        let wait = match resolve(&resolver, &src).await {
            Ok((targets, ttl)) => {
                debug!(source = %src.source, name = %src.name, targets = targets.len(), ttl, "DNS answer");
                router.set_discovered(&src, &targets, crate::forwarding::now());
                next_after(ttl, &cfg)
            }
            Err(e) => {
                warn!(source = %src.source, error = %e, "DNS: resolution failed; the last answer stays");
                router.discovery_failed(&src.source, e);
                cfg.min_ttl
            }
        };
        tokio::time::sleep(wait).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ttl_is_bounded() {
        let c = DnsConfig::default();
        assert_eq!(next_after(0, &c), Duration::from_secs(5));
        assert_eq!(next_after(30, &c), Duration::from_secs(30));
        assert_eq!(next_after(86_400, &c), Duration::from_secs(300));
        assert_eq!(next_after(u32::MAX, &c), Duration::from_secs(300));
    }

    #[test]
    fn names_with_a_dot_are_asked_fully_qualified() {
        assert_eq!(fqdn("_sip._udp.example.test"), "_sip._udp.example.test.");
        assert_eq!(fqdn("sip.example.test."), "sip.example.test.");
        assert_eq!(fqdn("sip"), "sip");
    }
}

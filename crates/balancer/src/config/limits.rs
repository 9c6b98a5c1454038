//! `[limits]`: per-source rates, the allow-list, what to do over a limit.

use serde::Deserialize;

use super::{ConfigError, err};

/// What to do with a request over its source's limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OverLimit {
    /// `503` with `Retry-After` (itself limited per source: past
    /// `limits.reject_rate`, dropped).
    Reject,
    /// Drop it silently.
    Drop,
}

/// `[limits]`
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(super) struct LimitsSection {
    enabled: bool,
    new_session_rate: f64,
    new_session_burst: f64,
    register_rate: f64,
    register_burst: f64,
    request_rate: f64,
    request_burst: f64,
    reject_rate: f64,
    auth_failure_rate: f64,
    auth_failure_burst: f64,
    over_limit: OverLimit,
    allow: Vec<String>,
    slots: usize,
}

impl Default for LimitsSection {
    fn default() -> Self {
        LimitsSection {
            enabled: true,
            new_session_rate: 500.0,
            new_session_burst: 1000.0,
            register_rate: 200.0,
            register_burst: 1000.0,
            request_rate: 1000.0,
            request_burst: 2000.0,
            reject_rate: 10.0,
            // A phone with a wrong password retries once per registration
            // interval; a guesser thousands of times a minute.
            auth_failure_rate: 0.2,
            auth_failure_burst: 30.0,
            over_limit: OverLimit::Reject,
            // The host itself (test tools, a local SBC) is not the internet.
            allow: vec!["127.0.0.0/8".into(), "::1/128".into()],
            slots: 65_536,
        }
    }
}

/// Per-source limits (`[limits]`), checked.
#[derive(Debug, Clone, PartialEq)]
pub struct LimitsConfig {
    /// Off: nothing is limited.
    pub enabled: bool,
    /// New sessions (INVITE, SUBSCRIBE, REFER without a To tag) per source.
    pub new_session: crate::limits::Rate,
    /// REGISTER per source (before the fork).
    pub register: crate::limits::Rate,
    /// Other out-of-dialog requests (MESSAGE, OPTIONS, PUBLISH, NOTIFY...) per source.
    pub request: crate::limits::Rate,
    /// Our `503`s for requests over a limit, per source; past it, drops.
    pub reject: crate::limits::Rate,
    /// Failed authentications (401/407 to a request with credentials) per
    /// source; past it, requests with credentials are refused.
    pub auth_failure: crate::limits::Rate,
    /// Over a limit: reject or drop.
    pub over_limit: OverLimit,
    /// Sources exempt (pool servers always are).
    pub allow: crate::limits::AllowList,
    /// Buckets per kind (memory: 8 bytes each, whatever the number of sources).
    pub slots: usize,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        limits_config(&LimitsSection::default()).expect("the defaults are valid")
    }
}

/// `[limits]` checked.
pub(super) fn limits_config(l: &LimitsSection) -> Result<LimitsConfig, ConfigError> {
    let rate = |name: &str, rate: f64, burst: f64| {
        if !(rate.is_finite() && rate > 0.0) {
            return err(
                format!("limits.{name}_rate"),
                "a number of requests per second above 0",
            );
        }
        if !(burst.is_finite() && (1.0..=1_000_000.0).contains(&burst)) {
            return err(format!("limits.{name}_burst"), "between 1 and 1000000");
        }
        Ok(crate::limits::Rate {
            per_second: rate,
            burst,
        })
    };
    let mut allow = Vec::with_capacity(l.allow.len());
    for (i, a) in l.allow.iter().enumerate() {
        let net = a
            .parse::<ipnet::IpNet>()
            .or_else(|_| a.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
            .or_else(|_| {
                err(
                    format!("limits.allow[{i}]"),
                    format!(
                        "'{a}' is not an address or a CIDR network (10.0.0.0/8, 2001:db8::/32)"
                    ),
                )
            })?;
        allow.push(net);
    }
    if !(1..=(1 << 24)).contains(&l.slots) {
        return err("limits.slots", "between 1 and 16777216");
    }
    Ok(LimitsConfig {
        enabled: l.enabled,
        new_session: rate("new_session", l.new_session_rate, l.new_session_burst)?,
        register: rate("register", l.register_rate, l.register_burst)?,
        request: rate("request", l.request_rate, l.request_burst)?,
        reject: rate("reject", l.reject_rate, l.reject_rate.max(1.0))?,
        auth_failure: rate("auth_failure", l.auth_failure_rate, l.auth_failure_burst)?,
        over_limit: l.over_limit,
        allow: crate::limits::AllowList(allow),
        slots: l.slots,
    })
}

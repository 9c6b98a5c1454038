//! `[capture]`: HEPv3 export of every SIP message in and out to a
//! collector (heplify-server, Homer), checked into a [`CaptureConfig`].

use std::net::SocketAddr;

use serde::Deserialize;

use super::{ConfigError, err};

/// How HEP packets reach the collector.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CaptureTransport {
    /// One UDP datagram per captured message (what heplify-server and
    /// Kamailio's siptrace use by default).
    Udp,
}

/// `[capture]`
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(super) struct CaptureSection {
    hep: Option<String>,
    transport: CaptureTransport,
    capture_id: u32,
    sample: f64,
    queue: usize,
    password: Option<String>,
}

impl Default for CaptureSection {
    fn default() -> Self {
        CaptureSection {
            hep: None,
            transport: CaptureTransport::Udp,
            // Kamailio siptrace's hep_capture_id and heplify's default.
            capture_id: 2001,
            sample: 1.0,
            queue: 10_000,
            password: None,
        }
    }
}

/// Call capture (`[capture]` with `hep` set), checked.
#[derive(Debug, Clone, PartialEq)]
pub struct CaptureConfig {
    /// The collector's address (an IP literal and port).
    pub hep: SocketAddr,
    /// How packets reach it.
    pub transport: CaptureTransport,
    /// HEP chunk 0x000c: which capture agent this is.
    pub capture_id: u32,
    /// Fraction of calls captured (by a hash of the Call-ID), 0 to 1.
    pub sample: f64,
    /// Messages waiting for the capture thread, at most; past it, dropped.
    pub queue: usize,
    /// HEP chunk 0x000e: the collector's auth key, when it wants one.
    pub password: Option<String>,
}

/// Checks `[capture]`: `None` when `hep` is not set (capture off).
pub(super) fn capture_config(c: CaptureSection) -> Result<Option<CaptureConfig>, ConfigError> {
    let Some(hep) = c.hep else {
        return Ok(None);
    };
    let Ok(addr) = hep.parse::<SocketAddr>() else {
        return err(
            "capture.hep",
            format!(
                "'{hep}' is not ip:port (an IP address literal such as \"127.0.0.1:9060\" \
                 or \"[::1]:9060\"; host names are not resolved)"
            ),
        );
    };
    if addr.port() == 0 || addr.ip().is_unspecified() {
        return err(
            "capture.hep",
            format!("'{hep}' is not a collector's address"),
        );
    }
    if !(c.sample.is_finite() && (0.0..=1.0).contains(&c.sample)) {
        return err("capture.sample", "a fraction of calls between 0.0 and 1.0");
    }
    // Its slots are allocated up front (about 130 bytes each), and each
    // waiting message holds its copy.
    if !(1..=100_000).contains(&c.queue) {
        return err("capture.queue", "between 1 and 100000 messages");
    }
    if let Some(p) = &c.password
        && (p.is_empty() || p.len() > 1024)
    {
        return err("capture.password", "1 to 1024 bytes");
    }
    Ok(Some(CaptureConfig {
        hep: addr,
        transport: c.transport,
        capture_id: c.capture_id,
        sample: c.sample,
        queue: c.queue,
        password: c.password,
    }))
}

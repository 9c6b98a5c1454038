//! One performance sample: what an agent measured over one window.

use serde::{Deserialize, Serialize};

/// CPU and memory of one SIP server over one sampling window.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Sample {
    /// Sample number since the agent started (1, 2, ...).
    pub seq: u64,
    /// Wall-clock end of the measured window, milliseconds since the Unix epoch.
    pub window_end_ms: u64,
    /// Length of the measured window, milliseconds (it started at
    /// `window_end_ms - window_ms`).
    pub window_ms: u32,
    /// CPUs the server may use (host CPUs, or the cgroup quota when smaller).
    pub cpus: f64,
    /// CPU busy fraction over the window, 0-1, all CPUs together.
    pub cpu: f64,
    /// Available memory, bytes (MemAvailable, or the cgroup's limit minus usage when smaller).
    pub mem_available: u64,
    /// Total memory, bytes (or the cgroup limit when smaller).
    pub mem_total: u64,
}

//! siplb's balancer (FIG 4): the parts that decide where a request goes.
//!
//! - [`load`] — load computation (box 406): performance scores from
//!   performance data, exactly as FIG 8 says by default;
//! - [`select`] — the FIG 6 draw and the pluggable routing policies;
//! - [`query`] — performance query (box 408): the performance table as
//!   load-computation inputs, and the scoring parameters live-changeable.
//!
//! `load` and `select` are pure: no sockets, no clock, no global RNG. The
//! forwarding and routing boxes (402, 404) join them with the balancer issue.

pub mod admin;
pub mod codec;
pub mod config;
pub mod forwarding;
pub mod load;
pub mod merge;
pub mod outlier;
pub mod policy;
pub mod pool;
pub mod query;
pub mod router;
pub mod select;
pub mod service;
pub mod sessions;
pub mod sim;
pub mod stats;

pub use load::{Input, Load, MemMin, Scoring, ScoringError};
pub use query::{LiveScoring, ScoringPatch, input_for};
pub use select::{Facts, Patent, Policy, PoolView, draw};

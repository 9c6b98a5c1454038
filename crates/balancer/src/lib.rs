//! siplb's balancer (FIG 4): the parts that decide where a request goes.
//!
//! - [`load`] — load computation (box 406): performance scores from
//!   performance data, exactly as FIG 8 says by default;
//! - [`select`] — the FIG 6 draw and the pluggable routing policies;
//!
//! Both are pure: no sockets, no clock, no global RNG. The forwarding and
//! routing boxes (402, 404) and the performance query (408) join them with
//! the balancer issue.

pub mod load;
pub mod select;

pub use load::{Input, Load, MemMin, Scoring, ScoringError};
pub use select::{Facts, Patent, Policy, PoolView, draw};

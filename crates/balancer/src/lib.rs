//! siplb's balancer (FIG 4): the parts that decide where a request goes,
//! and the shell that moves the bytes. docs/architecture.md walks them.
//!
//! - [`router`] — routing (box 404), with no I/O: every decision about a
//!   message, client transactions and failover, the REGISTER fork, health;
//!   driven by inputs (message, timer, tick) and drained of an outbox;
//! - [`forwarding`] — forwarding (box 402), the shell: sockets, timers,
//!   name resolution, and [`forwarding::Balancer::start`];
//! - [`codec`] — what siplb writes on the wire and reads back (our branch,
//!   the connection reference, the signed Record-Route token);
//! - [`load`] — load computation (box 406): performance scores from
//!   performance data, exactly as FIG 8 says by default;
//! - [`select`], [`policy`] — the FIG 6 draw and the pluggable routing policies;
//! - [`query`] — performance query (box 408): the performance table as
//!   load-computation inputs, and the scoring parameters live-changeable;
//! - [`sessions`], [`merge`], [`outlier`], [`pool`] — the pure parts routing uses;
//! - [`lifecycle`] — `/healthz`, `/readyz` and systemd's notify protocol.
//! - [`capture`] — HEPv3 call capture: the encoding (pure) and the queue
//!   and thread the shell hands messages to.
//!
//! Everything but `forwarding`, `service`, `lifecycle`, `admin` and `capture`'s thread is pure: no sockets,
//! no clock, no global RNG.

pub mod admin;
pub mod capture;
pub mod codec;
pub mod config;
pub mod discover;
pub mod dns;
pub mod forwarding;
pub mod lifecycle;
pub mod limits;
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
pub mod stun;
pub mod tls;

pub use load::{Input, Load, MemMin, Scoring, ScoringError};
pub use query::{LiveScoring, ScoringPatch, input_for};
pub use select::{Facts, Patent, Policy, PoolView, draw};

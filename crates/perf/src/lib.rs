//! siplb's performance data path (FIG 10-13, claims 10-13): from /proc on a
//! SIP server to the table the balancer routes by.
//!
//! - [`collect`] — CPU and memory readings (/proc, cgroup v2, or synthetic);
//! - [`agent`] — the agent on each SIP server: collection controller, server
//!   socket with a worker per connection, notification controller;
//! - [`protocol`] — the versioned, authenticated line-JSON wire protocol
//!   (docs/protocol.md), pure framing and messages;
//! - [`client`] — the persistent performance client (PPC), one per agent;
//! - [`server`] — the performance server: PPCs and the lock-free table, and
//!   the standalone mode serving that table to several balancers.
//!
//! Scores are not computed here: that is the balancer's load computation.

pub mod agent;
pub mod client;
pub mod collect;
pub mod error;
pub mod protocol;
pub mod sample;
pub mod server;

pub use error::{Error, Result};
pub use protocol::{AgentState, Event, Key};
pub use sample::Sample;

//! The one error type of the performance data path.

use thiserror::Error;

/// Why a performance connection or a piece of its setup failed.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum Error {
    /// Socket trouble.
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    /// The peer sent a line longer than the limit.
    #[error("line longer than {0} bytes")]
    LineTooLong(usize),
    /// The peer sent something that is not a message of this protocol.
    #[error("malformed message: {0}")]
    Malformed(String),
    /// The peer speaks another protocol version.
    #[error("{}", version_text(.peer, .us, *.version))]
    Version {
        /// What the peer is (`agent`, `performance server`, `balancer`).
        peer: &'static str,
        /// What this side is.
        us: &'static str,
        /// The version the peer speaks.
        version: u32,
    },
    /// The peer is not what this side expected at that address.
    #[error("wrong peer: expected role {expected}, found {found}")]
    Role {
        /// The role expected (`agent` or `perf-server`).
        expected: String,
        /// The role in the peer's `hello`.
        found: String,
    },
    /// The peer does not hold the same key.
    #[error("authentication failed")]
    Auth,
    /// A line after the handshake that is not sealed with this session's key
    /// for its direction: altered, forged, or from another session.
    #[error("message authentication failed: {0}")]
    MessageAuth(String),
    /// An authentic line whose sequence number was already received.
    #[error("replayed message: sequence number {seq} again (expected {expected})")]
    Replay {
        /// The line's sequence number.
        seq: u64,
        /// The next one expected.
        expected: u64,
    },
    /// An authentic line beyond the next sequence number: one was removed.
    #[error("message out of order: sequence number {seq}, expected {expected}")]
    OutOfOrder {
        /// The line's sequence number.
        seq: u64,
        /// The next one expected.
        expected: u64,
    },
    /// The peer said something out of turn.
    #[error("unexpected message: {0}")]
    Unexpected(&'static str),
    /// The peer reported an error and closed.
    #[error("peer error: {0}")]
    Peer(String),
    /// Nothing arrived within the time allowed.
    #[error("timed out after {0:?}")]
    Timeout(std::time::Duration),
    /// The peer closed the connection.
    #[error("connection closed by peer")]
    Closed,
    /// A key file that cannot be used.
    #[error("key file {path}: {reason}")]
    Key {
        /// The file.
        path: String,
        /// What is wrong.
        reason: String,
    },
    /// A synthetic readings spec that cannot be parsed.
    #[error("invalid synthetic readings '{spec}': {reason}")]
    Synthetic {
        /// The spec as given.
        spec: String,
        /// What is wrong.
        reason: &'static str,
    },
}

impl Error {
    /// Whether the peer was refused for what it is or sent: a wrong key, a
    /// forged, altered, replayed or removed message, another protocol
    /// version, another role. Worth a warning rather than a note.
    #[must_use]
    pub fn is_refusal(&self) -> bool {
        matches!(
            self,
            Error::Auth
                | Error::MessageAuth(_)
                | Error::Replay { .. }
                | Error::OutOfOrder { .. }
                | Error::Version { .. }
                | Error::Role { .. }
        )
    }
}

fn version_text(peer: &str, us: &str, version: u32) -> String {
    let ours = crate::protocol::VERSION;
    if version < ours {
        format!("{peer} speaks protocol v{version}; this {us} needs v{ours} (upgrade the {peer})")
    } else {
        format!("{peer} speaks protocol v{version}; this {us} speaks v{ours} (upgrade this {us})")
    }
}

/// Short result alias.
pub type Result<T, E = Error> = std::result::Result<T, E>;

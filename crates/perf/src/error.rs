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
    #[error("unsupported protocol version {0} (this side speaks {v})", v = crate::protocol::VERSION)]
    Version(u32),
    /// The peer does not hold the same key.
    #[error("authentication failed")]
    Auth,
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

/// Short result alias.
pub type Result<T, E = Error> = std::result::Result<T, E>;

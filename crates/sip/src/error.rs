//! The one error type of the SIP layer.
//!
//! Every error says what is wrong and, where a line is involved, which line
//! (1 is the start line). None of them allocates, so a flood of bad
//! messages costs no heap.

use thiserror::Error;

/// Why a message, a header value or a stream frame was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum Error {
    /// The datagram held nothing but whitespace (a keep-alive, not a message).
    #[error("empty message")]
    Empty,
    /// The start line is not a request line or a status line.
    #[error("invalid start line: {0}")]
    StartLine(&'static str),
    /// The start line (or a Via) names a SIP version other than 2.0.
    #[error("unsupported SIP version at line {line}")]
    Version {
        /// The line that carries the version.
        line: u32,
    },
    /// The Request-URI does not follow its grammar.
    #[error("invalid Request-URI: {0}")]
    RequestUri(&'static str),
    /// A header line is broken before its value can even be read.
    #[error("invalid header line {line}: {reason}")]
    HeaderLine {
        /// Line number, 1 being the start line.
        line: u32,
        /// What is wrong.
        reason: &'static str,
    },
    /// A header value does not follow its grammar.
    #[error("invalid {header} at line {line}: {reason}")]
    Header {
        /// Canonical header name.
        header: &'static str,
        /// Line number of the header, 1 being the start line.
        line: u32,
        /// What is wrong.
        reason: &'static str,
    },
    /// A mandatory header is absent.
    #[error("missing {0} header")]
    Missing(&'static str),
    /// A header that may appear once appears again.
    #[error("duplicate {header} header at line {line}")]
    Duplicate {
        /// Canonical header name.
        header: &'static str,
        /// Line of the second occurrence.
        line: u32,
    },
    /// The CSeq method differs from the request method.
    #[error("CSeq method at line {line} does not match the request method")]
    CSeqMethod {
        /// Line of the CSeq header.
        line: u32,
    },
    /// The header section has no terminating empty line.
    #[error("header section not terminated by an empty line")]
    Unterminated,
    /// Content-Length says more bytes than the datagram holds.
    #[error("Content-Length {declared} larger than the {available} body bytes present")]
    BodyTruncated {
        /// Declared Content-Length.
        declared: u32,
        /// Bytes after the header section.
        available: u32,
    },
    /// A stream message without Content-Length cannot be framed.
    #[error("missing Content-Length on a stream transport")]
    StreamWithoutLength,
    /// The message is bigger than the configured maximum.
    #[error("message larger than {max} bytes")]
    TooLarge {
        /// The configured maximum, in bytes.
        max: u32,
    },
}

impl Error {
    /// The status a server answers a request with when it fails this way
    /// (RFC 3261 §21: 400 for syntax, 505 for the version, 513 for size).
    #[must_use]
    pub fn status(&self) -> u16 {
        match self {
            Error::Version { .. } => 505,
            Error::TooLarge { .. } => 513,
            _ => 400,
        }
    }
}

/// Short result alias.
pub type Result<T, E = Error> = std::result::Result<T, E>;

//! Stream framing (RFC 3261 §18.3): where one message ends in a TCP/TLS byte
//! stream. Not having all the bytes yet is not an error.

use crate::error::{Error, Result};
use crate::header::HeaderName;
use crate::scan::{parse_u32, trim};

/// Default maximum message size, in bytes.
pub const DEFAULT_MAX_SIZE: usize = 64 * 1024;

/// What the front of a stream buffer holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Frame {
    /// A whole message of this many bytes (parse it with
    /// [`Transport::Stream`](crate::Transport::Stream)).
    Message(usize),
    /// This many bytes of CRLF keep-alive (RFC 5626 §3.5.1) to skip.
    KeepAlive(usize),
    /// More bytes are needed.
    Incomplete,
}

/// Looks at the front of `buf` and says whether it holds a whole message.
///
/// # Errors
/// [`Error::TooLarge`] past `max_size` bytes, [`Error::StreamWithoutLength`]
/// when the header section has no Content-Length, or a header error for an
/// unreadable or contradictory Content-Length. Any error means the stream
/// cannot be resynchronised: close it.
pub fn check(buf: &[u8], max_size: usize) -> Result<Frame> {
    let ws = buf
        .iter()
        .take_while(|&&b| b == b'\r' || b == b'\n')
        .count();
    if ws > 0 {
        // A lone CR may be the start of a CRLF still in flight.
        return Ok(if ws == buf.len() && buf[ws - 1] == b'\r' {
            if ws == 1 {
                Frame::Incomplete
            } else {
                Frame::KeepAlive(ws - 1)
            }
        } else {
            Frame::KeepAlive(ws)
        });
    }
    let too_large = Error::TooLarge {
        max: u32::try_from(max_size).unwrap_or(u32::MAX),
    };
    // One pass over the lines: find the empty line, reading Content-Length
    // on the way.
    let mut length: Option<u32> = None;
    let mut line_no = 1u32;
    let mut pos = match memchr::memchr(b'\n', buf) {
        Some(nl) => nl + 1,
        None if buf.len() > max_size => return Err(too_large),
        None => return Ok(Frame::Incomplete),
    };
    let body_start = loop {
        line_no += 1;
        let Some(nl) = memchr::memchr(b'\n', &buf[pos..]).map(|n| n + pos) else {
            return if buf.len() > max_size {
                Err(too_large)
            } else {
                Ok(Frame::Incomplete)
            };
        };
        let line = &buf[pos..nl];
        if line.is_empty() || line == b"\r" {
            break nl + 1;
        }
        // Content-Length or its compact form `l`; cheap first-byte filter.
        if matches!(line[0], b'c' | b'C' | b'l' | b'L')
            && let Some(colon) = memchr::memchr(b':', line)
            && HeaderName::classify(trim(&line[..colon])) == HeaderName::ContentLength
        {
            let bad = |reason| Error::Header {
                header: "Content-Length",
                line: line_no,
                reason,
            };
            let n = parse_u32(trim(&line[colon + 1..]), u32::MAX)
                .ok_or(bad("expected a non-negative number"))?;
            if length.replace(n).is_some_and(|old| old != n) {
                return Err(bad("conflicting values"));
            }
        }
        pos = nl + 1;
    };
    let length = length.ok_or(Error::StreamWithoutLength)? as usize;
    let total = body_start.saturating_add(length);
    if total > max_size {
        return Err(too_large);
    }
    Ok(if buf.len() >= total {
        Frame::Message(total)
    } else {
        Frame::Incomplete
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const MSG: &[u8] =
        b"OPTIONS sip:a@b SIP/2.0\r\nVia: SIP/2.0/TCP h;branch=z9hG4bK1\r\nl: 4\r\n\r\nbody";

    #[test]
    fn complete_incomplete_keepalive() {
        assert_eq!(check(MSG, 1000), Ok(Frame::Message(MSG.len())));
        for cut in 0..MSG.len() {
            assert_eq!(check(&MSG[..cut], 1000), Ok(Frame::Incomplete));
        }
        let mut two = MSG.to_vec();
        two.extend_from_slice(MSG);
        assert_eq!(check(&two, 1000), Ok(Frame::Message(MSG.len())));
        assert_eq!(check(b"\r\n\r\nOPT", 1000), Ok(Frame::KeepAlive(4)));
        assert_eq!(check(b"\r\n\r", 1000), Ok(Frame::KeepAlive(2)));
        assert_eq!(check(b"\r", 1000), Ok(Frame::Incomplete));
    }

    #[test]
    fn refusals() {
        assert_eq!(
            check(b"OPTIONS sip:a@b SIP/2.0\r\nVia: x\r\n\r\n", 1000),
            Err(Error::StreamWithoutLength)
        );
        assert_eq!(check(MSG, 20), Err(Error::TooLarge { max: 20 }));
        assert_eq!(check(&[b'a'; 100], 50), Err(Error::TooLarge { max: 50 }));
        assert!(check(b"A sip:a SIP/2.0\r\nContent-Length: -1\r\n\r\n", 1000).is_err());
        assert!(
            check(
                b"A sip:a SIP/2.0\r\nContent-Length: 13\r\nl: 5\r\n\r\n",
                1000
            )
            .is_err()
        );
        assert_eq!(
            check(b"A sip:a SIP/2.0\r\nContent-Length: 100000\r\n\r\n", 1000),
            Err(Error::TooLarge { max: 1000 })
        );
    }
}

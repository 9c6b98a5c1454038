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
    Framer::default().check(buf, max_size)
}

/// [`check`] that remembers how far it has read the message at the front of
/// a stream buffer, so that bytes arriving a few at a time are each looked
/// at once (linear in the bytes received, not quadratic: a header sent one
/// byte at a time costs no more than one sent whole).
///
/// Give it the buffer from the start of the current message every time;
/// after it says [`Frame::Message`] or [`Frame::KeepAlive`] (or an error),
/// it starts afresh for the next message.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Framer {
    /// Where the line being read starts.
    pos: usize,
    /// Bytes from `pos` known to hold no line end (where the search resumes).
    seen: usize,
    /// Bytes looked at, all calls together (for the linearity test).
    #[cfg(test)]
    looked: usize,
    /// Lines read so far.
    line_no: u32,
    /// Content-Length read so far.
    length: Option<u32>,
    /// Where the body starts, once the empty line was seen.
    body_start: Option<usize>,
}

impl Framer {
    /// Looks at the front of `buf` (the same message's bytes as the last
    /// call, and maybe more) and says whether it holds a whole message.
    ///
    /// # Errors
    /// As [`check`].
    pub fn check(&mut self, buf: &[u8], max_size: usize) -> Result<Frame> {
        let r = self.step(buf, max_size);
        if !matches!(r, Ok(Frame::Incomplete)) {
            *self = Framer::default();
        }
        r
    }

    fn step(&mut self, buf: &[u8], max_size: usize) -> Result<Frame> {
        if self.line_no == 0 && self.seen == 0 {
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
        }
        let too_large = Error::TooLarge {
            max: u32::try_from(max_size).unwrap_or(u32::MAX),
        };
        let incomplete = |buf: &[u8]| {
            if buf.len() > max_size {
                Err(too_large)
            } else {
                Ok(Frame::Incomplete)
            }
        };
        if self.body_start.is_none() {
            // One pass over the lines: find the empty line, reading
            // Content-Length on the way; resume where the last call stopped.
            let lines = crate::message::LineEnds::new();
            loop {
                let from = self.seen.max(self.pos);
                let found = lines.find(&buf[from..]).map(|n| n + from);
                #[cfg(test)]
                {
                    self.looked += found.map_or(buf.len(), |nl| nl + 1) - from;
                }
                let Some(nl) = found else {
                    self.seen = buf.len();
                    return incomplete(buf);
                };
                let line = &buf[self.pos..nl];
                self.line_no += 1;
                self.pos = nl + 1;
                self.seen = self.pos;
                if self.line_no == 1 {
                    // The start line.
                    continue;
                }
                if line.is_empty() || line == b"\r" {
                    self.body_start = Some(nl + 1);
                    break;
                }
                // Content-Length or its compact form `l`; cheap first-byte filter.
                if matches!(line[0], b'c' | b'C' | b'l' | b'L')
                    && let Some(colon) = memchr::memchr(b':', line)
                    && HeaderName::classify(trim(&line[..colon])) == HeaderName::ContentLength
                {
                    let line_no = self.line_no;
                    let bad = |reason| Error::Header {
                        header: "Content-Length",
                        line: line_no,
                        reason,
                    };
                    let n = parse_u32(trim(&line[colon + 1..]), u32::MAX)
                        .ok_or(bad("expected a non-negative number"))?;
                    if self.length.replace(n).is_some_and(|old| old != n) {
                        return Err(bad("conflicting values"));
                    }
                }
            }
        }
        let body_start = self.body_start.unwrap_or(buf.len());
        let length = self.length.ok_or(Error::StreamWithoutLength)? as usize;
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
    fn a_framer_fed_byte_by_byte_agrees_with_check() {
        let mut two = MSG.to_vec();
        two.extend_from_slice(b"\r\n\r\n");
        two.extend_from_slice(MSG);
        let mut f = Framer::default();
        let mut start = 0;
        let mut seen = Vec::new();
        for end in 1..=two.len() {
            match f.check(&two[start..end], 1000).unwrap() {
                Frame::Incomplete => {}
                Frame::Message(n) | Frame::KeepAlive(n) => {
                    seen.push(n);
                    start += n;
                }
            }
        }
        // The keep-alive is seen as its bytes arrive: CR (held back), then
        // CRLF, CRLF (the CR after it held back until it is not alone).
        assert_eq!(seen.first(), Some(&MSG.len()));
        assert_eq!(seen.last(), Some(&MSG.len()));
        assert_eq!(seen.iter().sum::<usize>(), two.len());
        // Errors too: a header without Content-Length, fed slowly.
        let bad = b"OPTIONS sip:a@b SIP/2.0\r\nVia: x\r\n\r\n";
        let mut f = Framer::default();
        let mut last = Ok(Frame::Incomplete);
        for end in 1..=bad.len() {
            last = f.check(&bad[..end], 1000);
        }
        assert_eq!(last, Err(Error::StreamWithoutLength));
    }

    #[test]
    fn a_slow_large_header_is_read_once() {
        // 60 KB of header, one byte per call, as lines and as one long line:
        // every byte is looked at once (rescanning would look at ~1.8 G).
        for (head, line, tail) in [
            (
                &b""[..],
                &b"X-Pad: 0123456789012345678901234567890123456789\r\n"[..],
                &b""[..],
            ),
            (b"X-Long: ", b"X", b"\r\n"),
        ] {
            let mut msg = b"OPTIONS sip:a@b SIP/2.0\r\n".to_vec();
            msg.extend_from_slice(head);
            while msg.len() < 60_000 {
                msg.extend_from_slice(line);
            }
            msg.extend_from_slice(tail);
            msg.extend_from_slice(b"Content-Length: 0\r\n\r\n");
            let mut f = Framer::default();
            let mut got = None;
            let mut looked = 0;
            for end in 1..=msg.len() {
                looked = f.looked;
                if let Frame::Message(n) = f.check(&msg[..end], 64 * 1024).unwrap() {
                    got = Some(n);
                }
            }
            assert_eq!(got, Some(msg.len()));
            assert!(
                looked <= msg.len(),
                "{looked} bytes looked at for {}",
                msg.len()
            );
        }
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

//! Responses a proxy makes itself (RFC 3261 §8.2.6, §16.7): a status line,
//! the request's Via, From, To (with a tag), Call-ID and CSeq, a few extra
//! headers, no body.

use bytes::BufMut;

use crate::header::HeaderName;
use crate::message::Message;
use crate::scan::trim;

/// Writes the response to `req` with `code` and `reason` into `out`. `to_tag`
/// is added to To when it has none; `extra` lines are written as given
/// (`Name: value`, no CRLF).
pub fn response_for(
    req: &Message<'_>,
    code: u16,
    reason: &str,
    to_tag: &[u8],
    extra: &[&[u8]],
    out: &mut impl BufMut,
) {
    status_line(code, reason, out);
    for h in req.headers() {
        match h.name {
            HeaderName::Via | HeaderName::From | HeaderName::CallId | HeaderName::CSeq => {
                out.put_slice(h.line);
            }
            HeaderName::To => {
                out.put_slice(trim_crlf(h.line));
                if req.to().ok().and_then(|t| t.tag()).is_none() && !to_tag.is_empty() {
                    out.put_slice(b";tag=");
                    out.put_slice(to_tag);
                }
                out.put_slice(b"\r\n");
            }
            _ => {}
        }
    }
    for e in extra {
        out.put_slice(e);
        out.put_slice(b"\r\n");
    }
    out.put_slice(b"Content-Length: 0\r\n\r\n");
}

/// A response to a request that could not be parsed, built from whatever
/// Via, From, To, Call-ID and CSeq lines it has. `None` when it is not a
/// request or has no Via: then there is nowhere to send one, and it is dropped.
#[must_use]
pub fn error_response(raw: &[u8], code: u16, reason: &str) -> Option<Vec<u8>> {
    let first_end = memchr::memchr(b'\n', raw)?;
    let first = trim(&raw[..first_end]);
    if first.is_empty() || first.len() >= 4 && first[..4].eq_ignore_ascii_case(b"SIP/") {
        return None;
    }
    let mut out = Vec::with_capacity(512);
    status_line(code, reason, &mut out);
    let mut has_via = false;
    let mut copying = false;
    let mut pos = first_end + 1;
    while pos < raw.len() {
        let end = memchr::memchr(b'\n', &raw[pos..]).map_or(raw.len(), |n| pos + n + 1);
        let line = &raw[pos..end];
        if trim(line).is_empty() {
            break;
        }
        if matches!(line[0], b' ' | b'\t') {
            if copying {
                out.extend_from_slice(trim_crlf(line));
                out.extend_from_slice(b"\r\n");
            }
        } else {
            let name = memchr::memchr(b':', line).map_or(&b""[..], |c| trim(&line[..c]));
            let kind = HeaderName::classify(name);
            copying = matches!(
                kind,
                HeaderName::Via
                    | HeaderName::From
                    | HeaderName::To
                    | HeaderName::CallId
                    | HeaderName::CSeq
            );
            has_via |= kind == HeaderName::Via;
            if copying {
                out.extend_from_slice(trim_crlf(line));
                out.extend_from_slice(b"\r\n");
            }
        }
        pos = end;
    }
    if !has_via {
        return None;
    }
    out.extend_from_slice(b"Content-Length: 0\r\n\r\n");
    Some(out)
}

fn status_line(code: u16, reason: &str, out: &mut impl BufMut) {
    out.put_slice(b"SIP/2.0 ");
    let c = [
        b'0' + (code / 100 % 10) as u8,
        b'0' + (code / 10 % 10) as u8,
        b'0' + (code % 10) as u8,
    ];
    out.put_slice(&c);
    out.put_u8(b' ');
    // A reason phrase may not hold CR or LF.
    for b in reason.bytes() {
        out.put_u8(if b == b'\r' || b == b'\n' { b' ' } else { b });
    }
    out.put_slice(b"\r\n");
}

fn trim_crlf(line: &[u8]) -> &[u8] {
    let mut e = line.len();
    while e > 0 && matches!(line[e - 1], b'\r' | b'\n') {
        e -= 1;
    }
    &line[..e]
}

#[cfg(test)]
mod tests {
    use super::*;

    const REQ: &[u8] = b"OPTIONS sip:b@h SIP/2.0\r\nVia: SIP/2.0/UDP 10.0.0.1;branch=z9hG4bK1\r\nVia: SIP/2.0/UDP 10.0.0.2;branch=z9hG4bK2\r\nMax-Forwards: 0\r\nFrom: <sip:a@h>;tag=f\r\nTo: <sip:b@h>\r\nCall-ID: c\r\nCSeq: 5 OPTIONS\r\nContent-Length: 0\r\n\r\n";

    #[test]
    fn a_response_copies_the_dialog_headers_and_tags_to() {
        let m = Message::parse(REQ).unwrap();
        let mut out = Vec::new();
        response_for(
            &m,
            483,
            "Too Many Hops",
            b"lb1",
            &[b"Retry-After: 5"],
            &mut out,
        );
        let r = Message::parse(&out).unwrap();
        assert_eq!(r.status(), Some(483));
        assert_eq!(r.vias().count(), 2);
        assert_eq!(r.to().unwrap().tag(), Some(&b"lb1"[..]));
        assert_eq!(r.cseq().seq, 5);
        assert_eq!(r.header(HeaderName::RetryAfter).unwrap().value, b"5");
    }

    #[test]
    fn an_unparseable_request_still_gets_a_400_when_it_has_a_via() {
        let bad = b"INVITE sip:b@h SIP/2.0\r\nVia: SIP/2.0/UDP 10.0.0.1;branch=z9hG4bK1\r\nCSeq: 99999999999 INVITE\r\ni: x\r\n\r\n";
        let out = error_response(bad, 400, "Bad Request (invalid CSeq)").unwrap();
        assert!(out.starts_with(b"SIP/2.0 400 Bad Request (invalid CSeq)\r\nVia: SIP/2.0/UDP 10.0.0.1;branch=z9hG4bK1\r\n"));
        assert!(error_response(b"garbage\r\n\r\n", 400, "x").is_none());
        assert!(error_response(b"SIP/2.0 200 OK\r\nVia: x\r\n\r\n", 400, "x").is_none());
        assert!(error_response(b"", 400, "x").is_none());
    }
}

//! Requests the balancer writes itself for its client transactions: the
//! CANCEL of an attempt (RFC 3261 §9.1), the ACK of a non-2xx final
//! (§17.1.1.3), and the ACK and BYE of a 2xx that no UA will take (§13.2.2.4,
//! §15). Each is written into the caller's buffer.

use sip::{HeaderName, Message};
use smallvec::SmallVec;

/// A CANCEL for `invite` (as we sent it, without our Via) with `via` as
/// its only Via: same Request-URI, Call-ID, From, To, Route, CSeq number.
pub(super) fn cancel_for(invite: &Message<'_>, via: &[u8], out: &mut Vec<u8>) {
    out.extend_from_slice(b"CANCEL ");
    out.extend_from_slice(invite.request_uri().map_or(&b""[..], |u| u.raw));
    out.extend_from_slice(b" SIP/2.0\r\nVia: ");
    out.extend_from_slice(via);
    out.extend_from_slice(b"\r\nMax-Forwards: 70\r\n");
    for h in invite.headers() {
        if matches!(
            h.name,
            HeaderName::From | HeaderName::To | HeaderName::CallId | HeaderName::Route
        ) {
            out.extend_from_slice(h.line);
        }
    }
    cseq_and_end(invite.cseq().seq, b"CANCEL", out);
}

/// The ACK of a non-2xx final `resp` to `req` (as we sent it): its
/// Request-URI and Route, our Via as the response carries it (same branch),
/// the request's From, the response's To.
pub(super) fn ack_for_failure(req: &Message<'_>, resp: &Message<'_>, out: &mut Vec<u8>) {
    out.extend_from_slice(b"ACK ");
    out.extend_from_slice(req.request_uri().map_or(&b""[..], |u| u.raw));
    out.extend_from_slice(b" SIP/2.0\r\nVia: ");
    out.extend_from_slice(resp.top_via().raw);
    out.extend_from_slice(b"\r\nMax-Forwards: 70\r\n");
    for h in req.headers() {
        if matches!(
            h.name,
            HeaderName::From | HeaderName::CallId | HeaderName::Route
        ) {
            out.extend_from_slice(h.line);
        }
    }
    if let Some(to) = resp.header(HeaderName::To) {
        out.extend_from_slice(to.line);
    }
    cseq_and_end(resp.cseq().seq, b"ACK", out);
}

/// A request in the dialog that the 2xx `resp` established, as its UAC
/// would send it (§12.2.1.1): to the 2xx's Contact, routed by its
/// Record-Route reversed without our own entry (`ours` is its prefix).
pub(super) fn in_dialog(
    resp: &Message<'_>,
    method: &[u8],
    cseq: u32,
    via: &[u8],
    ours: &dyn Fn(&sip::Uri<'_>) -> bool,
    out: &mut Vec<u8>,
) {
    let contact = resp.contacts().flatten().next().map(|c| c.uri.raw);
    let target = contact.or_else(|| resp.to().ok().map(|t| t.uri.raw));
    out.extend_from_slice(method);
    out.push(b' ');
    out.extend_from_slice(target.unwrap_or(b"sip:invalid"));
    out.extend_from_slice(b" SIP/2.0\r\nVia: ");
    out.extend_from_slice(via);
    out.extend_from_slice(b"\r\nMax-Forwards: 70\r\n");
    let routes: SmallVec<[&[u8]; 4]> = resp
        .record_routes()
        .flatten()
        .filter(|r| !ours(&r.uri))
        .map(|r| r.raw)
        .collect();
    for r in routes.iter().rev() {
        out.extend_from_slice(b"Route: ");
        out.extend_from_slice(r);
        out.extend_from_slice(b"\r\n");
    }
    for h in resp.headers() {
        if matches!(
            h.name,
            HeaderName::From | HeaderName::To | HeaderName::CallId
        ) {
            out.extend_from_slice(h.line);
        }
    }
    cseq_and_end(cseq, method, out);
}

fn cseq_and_end(seq: u32, method: &[u8], out: &mut Vec<u8>) {
    use std::io::Write;
    let _ = write!(out, "CSeq: {seq} ");
    out.extend_from_slice(method);
    out.extend_from_slice(b"\r\nContent-Length: 0\r\n\r\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    const INVITE: &[u8] = b"INVITE sip:bob@example.com SIP/2.0\r\n\
        Via: SIP/2.0/UDP 192.0.2.1;branch=z9hG4bKua1;received=192.0.2.1\r\n\
        Route: <sip:edge.example.com;lr>\r\n\
        Max-Forwards: 69\r\nFrom: <sip:alice@example.com>;tag=a1\r\n\
        To: <sip:bob@example.com>\r\nCall-ID: c1\r\nCSeq: 7 INVITE\r\n\
        Contact: <sip:alice@192.0.2.1>\r\nContent-Length: 0\r\n\r\n";

    #[test]
    fn cancel_matches_its_invite() {
        let inv = Message::parse(INVITE).unwrap();
        let mut out = Vec::new();
        cancel_for(
            &inv,
            b"SIP/2.0/UDP 10.0.0.1:5060;branch=z9hG4bKours",
            &mut out,
        );
        let c = Message::parse(&out).unwrap();
        assert_eq!(c.method(), sip::Method::Cancel);
        assert_eq!(c.request_uri().unwrap().raw, b"sip:bob@example.com");
        assert_eq!(c.top_via().branch, Some(&b"z9hG4bKours"[..]));
        assert_eq!(c.vias().count(), 1);
        assert_eq!(c.cseq().seq, 7);
        assert_eq!(c.call_id(), b"c1");
        assert_eq!(c.routes().count(), 1, "the INVITE's Route");
    }

    #[test]
    fn ack_and_bye_for_a_2xx_follow_its_route_set() {
        let ok = b"SIP/2.0 200 OK\r\n\
            Via: SIP/2.0/UDP 10.0.0.1:5060;branch=z9hG4bKours\r\n\
            Record-Route: <sip:p2.example.com;lr>\r\n\
            Record-Route: <sip:10.0.0.1:5060;lr;sb=s1.0011223344556677>\r\n\
            From: <sip:alice@example.com>;tag=a1\r\nTo: <sip:bob@example.com>;tag=b9\r\n\
            Call-ID: c1\r\nCSeq: 7 INVITE\r\nContact: <sip:bob@192.0.2.20:5080>\r\n\
            Content-Length: 0\r\n\r\n";
        let resp = Message::parse(ok).unwrap();
        let mut out = Vec::new();
        in_dialog(
            &resp,
            b"BYE",
            8,
            b"SIP/2.0/UDP 10.0.0.1:5060;branch=z9hG4bKx",
            &|u| u.host.is_some_and(|h| h.to_string() == "10.0.0.1") && u.port == Some(5060),
            &mut out,
        );
        let bye = Message::parse(&out).unwrap();
        assert_eq!(bye.method(), sip::Method::Bye);
        assert_eq!(bye.request_uri().unwrap().raw, b"sip:bob@192.0.2.20:5080");
        let routes: Vec<_> = bye.routes().flatten().map(|r| r.raw.to_vec()).collect();
        assert_eq!(routes, [b"<sip:p2.example.com;lr>".to_vec()]);
        assert_eq!(bye.to().unwrap().tag(), Some(&b"b9"[..]));
        assert_eq!(bye.cseq().seq, 8);
    }
}

//! Edits a proxy makes to a message it forwards (RFC 3261 §16.6, §16.7;
//! RFC 3581), written out as splices: untouched bytes are copied as they came,
//! never re-serialised.

use bytes::BufMut;
use smallvec::SmallVec;

use crate::header::HeaderName;
use crate::message::Message;

/// What to do with Max-Forwards.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum MaxForwards {
    /// Leave it as it is.
    #[default]
    Keep,
    /// Decrement it, or add `Max-Forwards: 70` when absent (RFC 3261 §16.6 step 3).
    Decrement,
    /// Set it (added when absent).
    Set(u8),
}

/// RFC 3581 parameters to write into the top Via of a request we received.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Received<'e> {
    /// Source IP, written as `received=` (IPv6 without brackets, RFC 5118).
    pub received: &'e [u8],
    /// Source port, written as `rport=` when the client asked with `;rport`.
    pub rport: u16,
}

/// The edits to apply to one message as it is written out; the default is none.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Edits<'e> {
    /// A Via value to put on top (e.g. `SIP/2.0/UDP 192.0.2.1:5060;branch=z9hG4bK...`).
    pub prepend_via: Option<&'e [u8]>,
    /// Remove the top Via value (a response on its way back).
    pub remove_top_via: bool,
    /// A Record-Route value to put on top (e.g. `<sip:192.0.2.1;lr>`).
    pub record_route: Option<&'e [u8]>,
    /// Remove the top Route value (it named us).
    pub remove_top_route: bool,
    /// Remove this many top Route values (they all named us: a double
    /// Record-Route, RFC 5658); `remove_top_route` is the same as 1.
    pub remove_routes: u8,
    /// A Path value to put on top (RFC 3327 §5.1: a proxy adds its own
    /// above those already there).
    pub path: Option<&'e [u8]>,
    /// Max-Forwards handling.
    pub max_forwards: MaxForwards,
    /// `received`/`rport` for the top Via. Not to be combined with
    /// `remove_top_via`, which removes that same value.
    pub received: Option<Received<'e>>,
    /// Add `Content-Length` when the message has none (a datagram going
    /// out on a stream).
    pub add_content_length: bool,
}

#[derive(Debug, Clone, Copy)]
enum Ins<'e> {
    Nothing,
    Line(&'static str, &'e [u8]),
    Number(u32),
    LineNumber(&'static str, u32),
    Param(&'static str, &'e [u8]),
    ParamNumber(&'static str, u32),
}

#[derive(Debug, Clone, Copy)]
struct Splice<'e> {
    start: u32,
    end: u32,
    ins: Ins<'e>,
}

impl<'a> Message<'a> {
    /// Writes the message with `edits` applied into `out`. Bytes outside the
    /// edits are copied unchanged; octets after the body (a datagram's
    /// trailing garbage) are not written.
    pub fn write_edited(&self, edits: &Edits<'_>, out: &mut impl BufMut) {
        let mut splices: SmallVec<[Splice<'_>; 8]> = SmallVec::new();
        let heads = self.header_positions();
        let first_line_of = |name| heads.iter().find(|h| h.name == name).map(|h| h.line_at.0);
        let first_via_line = first_line_of(HeaderName::Via).unwrap_or(self.headers_end());

        // Record-Route first: where it goes at the first Via line (no
        // Record-Route yet), it must come before our Via, so that the Via
        // rows stay together (the sort below is stable).
        if let Some(rr) = edits.record_route {
            let at = first_line_of(HeaderName::RecordRoute).unwrap_or(first_via_line);
            splices.push(Splice {
                start: at,
                end: at,
                ins: Ins::Line("Record-Route", rr),
            });
        }
        if let Some(v) = edits.prepend_via {
            splices.push(Splice {
                start: first_via_line,
                end: first_via_line,
                ins: Ins::Line("Via", v),
            });
        }
        if let Some((start, end)) = edits
            .remove_top_via
            .then(|| self.top_value_range(HeaderName::Via))
            .flatten()
        {
            splices.push(Splice {
                start,
                end,
                ins: Ins::Nothing,
            });
        }
        if let Some(p) = edits.path {
            let at = first_line_of(HeaderName::Path).unwrap_or(first_via_line);
            splices.push(Splice {
                start: at,
                end: at,
                ins: Ins::Line("Path", p),
            });
        }
        let pop = edits.remove_routes.max(u8::from(edits.remove_top_route));
        if pop == 1 {
            if let Some((start, end)) = self.top_value_range(HeaderName::Route) {
                splices.push(Splice {
                    start,
                    end,
                    ins: Ins::Nothing,
                });
            }
        } else if pop > 1 {
            for (start, end) in self.top_values_ranges(HeaderName::Route, usize::from(pop)) {
                splices.push(Splice {
                    start,
                    end,
                    ins: Ins::Nothing,
                });
            }
        }
        let mf = match edits.max_forwards {
            MaxForwards::Keep => None,
            MaxForwards::Decrement => Some(self.max_forwards().map_or(70, |n| n.saturating_sub(1))),
            MaxForwards::Set(n) => Some(n),
        };
        if let Some(n) = mf {
            match heads.iter().find(|h| h.name == HeaderName::MaxForwards) {
                Some(h) => splices.push(Splice {
                    start: h.value_at.0,
                    end: h.value_at.1,
                    ins: Ins::Number(n.into()),
                }),
                None => {
                    let at = self.headers_end();
                    splices.push(Splice {
                        start: at,
                        end: at,
                        ins: Ins::LineNumber("Max-Forwards", n.into()),
                    });
                }
            }
        }
        if let Some(rcv) = edits.received {
            let base = self.top_via_at();
            let via = self.top_via();
            let via_end = base + via.raw.len() as u32;
            if let Some((a, b)) = via.rport_at {
                splices.push(Splice {
                    start: base + a as u32,
                    end: base + b as u32,
                    ins: Ins::ParamNumber("rport", rcv.rport.into()),
                });
            }
            let (start, end) = via.received_at.map_or((via_end, via_end), |(a, b)| {
                (base + a as u32, base + b as u32)
            });
            splices.push(Splice {
                start,
                end,
                ins: Ins::Param("received", rcv.received),
            });
        }
        if edits.add_content_length && self.content_length().is_none() {
            let at = self.headers_end();
            splices.push(Splice {
                start: at,
                end: at,
                ins: Ins::LineNumber("Content-Length", self.body().len() as u32),
            });
        }
        // Stable: inserts pushed before a removal at the same place stay first.
        splices.sort_by_key(|s| (s.start, s.end));

        let buf = self.as_bytes();
        let mut cursor = self.start_at() as usize;
        for s in &splices {
            let (start, end) = (s.start as usize, s.end as usize);
            if start < cursor {
                debug_assert!(false, "overlapping edits");
                continue;
            }
            out.put_slice(&buf[cursor..start]);
            match s.ins {
                Ins::Nothing => {}
                Ins::Line(name, value) => {
                    out.put_slice(name.as_bytes());
                    out.put_slice(b": ");
                    out.put_slice(value);
                    out.put_slice(b"\r\n");
                }
                Ins::Number(n) => put_u32(out, n),
                Ins::LineNumber(name, n) => {
                    out.put_slice(name.as_bytes());
                    out.put_slice(b": ");
                    put_u32(out, n);
                    out.put_slice(b"\r\n");
                }
                Ins::Param(name, value) => {
                    out.put_u8(b';');
                    out.put_slice(name.as_bytes());
                    out.put_u8(b'=');
                    out.put_slice(value);
                }
                Ins::ParamNumber(name, n) => {
                    out.put_u8(b';');
                    out.put_slice(name.as_bytes());
                    out.put_u8(b'=');
                    put_u32(out, n);
                }
            }
            cursor = end;
        }
        out.put_slice(&buf[cursor..]);
    }

    /// The bytes to cut to remove the topmost value of a list header: the
    /// whole line when it is the line's only value, else the value, its comma
    /// and the LWS up to the next value.
    fn top_value_range(&self, name: HeaderName) -> Option<(u32, u32)> {
        let mut it = self.value_positions(name);
        let first = it.next()?;
        // Alone on its line unless the next value is on the same line.
        match it.next() {
            Some(next) if next.header == first.header => Some((first.start, next.start)),
            _ => Some(self.header_pos(first.header).line_at),
        }
    }
}

impl Message<'_> {
    /// The bytes to cut to remove the `k` topmost values of a list header:
    /// each line all of whose values go, and on the line where the first
    /// value that stays is, the values before it.
    fn top_values_ranges(&self, name: HeaderName, k: usize) -> SmallVec<[(u32, u32); 2]> {
        let vals: SmallVec<[crate::message::ValuePos; 4]> =
            self.value_positions(name).take(k + 1).collect();
        let gone = &vals[..k.min(vals.len())];
        let stays = vals.get(k);
        let mut out: SmallVec<[(u32, u32); 2]> = SmallVec::new();
        let mut i = 0;
        while i < gone.len() {
            let h = gone[i].header;
            let first = gone[i].start;
            while i < gone.len() && gone[i].header == h {
                i += 1;
            }
            match stays {
                Some(next) if next.header == h => out.push((first, next.start)),
                _ => out.push(self.header_pos(h).line_at),
            }
        }
        out
    }
}

fn put_u32(out: &mut impl BufMut, mut n: u32) {
    let mut digits = [0u8; 10];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.put_slice(&digits[i..]);
}

#[cfg(test)]
mod tests {
    use super::*;

    const REQ: &[u8] = b"INVITE sip:bob@example.com SIP/2.0\r\n\
Via: SIP/2.0/UDP 192.0.2.1:5060;rport;branch=z9hG4bKa, SIP/2.0/UDP 192.0.2.7;branch=z9hG4bKb\r\n\
Route: <sip:lb.example.com;lr>,\r\n <sip:p2.example.com;lr>\r\n\
Max-Forwards: 70\r\n\
From: <sip:alice@example.com>;tag=1\r\n\
To: <sip:bob@example.com>\r\n\
Call-ID: e1\r\n\
CSeq: 1 INVITE\r\n\
\r\n";

    fn edited(msg: &[u8], e: &Edits<'_>) -> Vec<u8> {
        let m = Message::parse(msg).unwrap();
        let mut out = Vec::new();
        m.write_edited(e, &mut out);
        out
    }

    #[test]
    fn two_routes_removed_and_a_path_added() {
        let msg = b"REGISTER sip:example.com SIP/2.0\r\n\
Route: <sip:a;lr>\r\n\
Route: <sip:b;lr>, <sip:c;lr>\r\n\
Via: SIP/2.0/UDP 192.0.2.1;branch=z9hG4bKa\r\n\
Path: <sip:old;lr>\r\n\
From: <sip:alice@example.com>;tag=1\r\n\
To: <sip:alice@example.com>\r\n\
Call-ID: p1\r\n\
CSeq: 1 REGISTER\r\n\
\r\n";
        let e = Edits {
            remove_routes: 2,
            path: Some(b"<sip:lb;lr;ob>"),
            ..Edits::default()
        };
        let out = String::from_utf8(edited(msg, &e)).unwrap();
        assert!(out.contains("\r\nRoute: <sip:c;lr>\r\nVia:"), "{out}");
        assert!(!out.contains("sip:a;") && !out.contains("sip:b;"), "{out}");
        assert!(
            out.contains("Path: <sip:lb;lr;ob>\r\nPath: <sip:old;lr>\r\n"),
            "ours above the others: {out}"
        );
        let m = Message::parse(out.as_bytes()).unwrap();
        assert_eq!(m.routes().count(), 1);
        // All three, and one of one line of two.
        let all = edited(
            msg,
            &Edits {
                remove_routes: 3,
                ..Edits::default()
            },
        );
        assert!(!String::from_utf8_lossy(&all).contains("Route"));
        let msg2 = b"BYE sip:x SIP/2.0\r\nRoute: <sip:a;lr>, <sip:b;lr>, <sip:c;lr>\r\nVia: SIP/2.0/UDP h;branch=z9hG4bKb\r\nFrom: <sip:f>;tag=1\r\nTo: <sip:t>\r\nCall-ID: p2\r\nCSeq: 2 BYE\r\n\r\n";
        let two = String::from_utf8(edited(
            msg2,
            &Edits {
                remove_routes: 2,
                ..Edits::default()
            },
        ))
        .unwrap();
        assert!(two.contains("\r\nRoute: <sip:c;lr>\r\n"), "{two}");
    }

    #[test]
    fn no_edits_copies_bytes() {
        assert_eq!(edited(REQ, &Edits::default()), REQ);
    }

    #[test]
    fn forward_request_edits() {
        let out = edited(
            REQ,
            &Edits {
                prepend_via: Some(b"SIP/2.0/UDP 192.0.2.9;branch=z9hG4bKlb"),
                record_route: Some(b"<sip:192.0.2.9;lr;sb=s1.x>"),
                remove_top_route: true,
                max_forwards: MaxForwards::Decrement,
                received: Some(Received {
                    received: b"192.0.2.100",
                    rport: 40000,
                }),
                add_content_length: true,
                ..Edits::default()
            },
        );
        let text = String::from_utf8(out.clone()).unwrap();
        assert_eq!(
            text,
            "INVITE sip:bob@example.com SIP/2.0\r\n\
Record-Route: <sip:192.0.2.9;lr;sb=s1.x>\r\n\
Via: SIP/2.0/UDP 192.0.2.9;branch=z9hG4bKlb\r\n\
Via: SIP/2.0/UDP 192.0.2.1:5060;rport=40000;branch=z9hG4bKa;received=192.0.2.100, SIP/2.0/UDP 192.0.2.7;branch=z9hG4bKb\r\n\
Route: <sip:p2.example.com;lr>\r\n\
Max-Forwards: 69\r\n\
From: <sip:alice@example.com>;tag=1\r\n\
To: <sip:bob@example.com>\r\n\
Call-ID: e1\r\n\
CSeq: 1 INVITE\r\n\
Content-Length: 0\r\n\
\r\n"
        );
        let m = Message::parse(&out).unwrap();
        m.validate().unwrap();
    }

    #[test]
    fn remove_top_via_of_a_list_and_of_a_line() {
        let out = edited(
            REQ,
            &Edits {
                remove_top_via: true,
                ..Edits::default()
            },
        );
        let m = Message::parse(&out).unwrap();
        assert_eq!(m.top_via().branch, Some(&b"z9hG4bKb"[..]));
        assert_eq!(m.vias().count(), 1);
        let out2 = edited(
            &out,
            &Edits {
                remove_top_via: true,
                ..Edits::default()
            },
        );
        assert_eq!(
            Message::parse(&out2).unwrap_err(),
            crate::Error::Missing("Via")
        );
    }

    #[test]
    fn max_forwards_added_when_absent_and_received_replaced() {
        let msg = b"OPTIONS sip:b@h SIP/2.0\r\nv: SIP/2.0/UDP h;received=1.1.1.1;branch=z9hG4bK1\r\nf: <sip:a@h>;tag=1\r\nt: <sip:b@h>\r\ni: x\r\nCSeq: 1 OPTIONS\r\n\r\n";
        let out = edited(
            msg,
            &Edits {
                max_forwards: MaxForwards::Decrement,
                received: Some(Received {
                    received: b"2001:db8::1",
                    rport: 9,
                }),
                ..Edits::default()
            },
        );
        let m = Message::parse(&out).unwrap();
        assert_eq!(m.max_forwards(), Some(70));
        assert_eq!(m.top_via().received, Some(&b"2001:db8::1"[..]));
        assert_eq!(
            m.top_via().rport,
            None,
            "rport only when the client asked for it"
        );
    }

    #[test]
    fn trailing_datagram_octets_are_not_forwarded() {
        let mut msg = REQ.to_vec();
        msg.splice(msg.len() - 2..msg.len() - 2, b"l: 0\r\n".iter().copied());
        msg.extend_from_slice(b"INVITE junk");
        let out = edited(&msg, &Edits::default());
        assert!(out.ends_with(b"\r\n\r\n"));
    }
}

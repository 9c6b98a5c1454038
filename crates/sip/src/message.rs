//! A parsed SIP message: the received bytes plus offsets (RFC 3261 §7).
//!
//! [`Message::parse`] indexes every header line, reads the fields a proxy
//! routes on (Call-ID, CSeq, Max-Forwards, Content-Length, the top Via, the
//! Request-URI) and checks the framing; [`Message::validate`] additionally
//! checks the grammar of every Via and address header. Neither copies nor
//! allocates for a message of up to 24 header lines.

use smallvec::SmallVec;

use crate::addr::NameAddr;
use crate::error::{Error, Result};
use crate::header::HeaderName;
use crate::scan::{CommaSplit, is_token, is_word, parse_u32, skip_ws, token_len};
use crate::uri::Uri;
use crate::via::{OwnVias, Via, ViaError};

/// How the message arrived, which decides how its body is framed (RFC 3261 §18.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// One datagram is one message; without Content-Length the body is the
    /// rest of the datagram; octets after Content-Length are ignored.
    Datagram,
    /// A stream frame: Content-Length is mandatory and must match.
    Stream,
}

/// A request method. Methods are case-sensitive (RFC 3261 §7.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Method<'a> {
    /// INVITE
    Invite,
    /// ACK
    Ack,
    /// BYE
    Bye,
    /// CANCEL
    Cancel,
    /// REGISTER
    Register,
    /// OPTIONS
    Options,
    /// SUBSCRIBE (RFC 6665)
    Subscribe,
    /// NOTIFY (RFC 6665)
    Notify,
    /// REFER (RFC 3515)
    Refer,
    /// INFO (RFC 6086)
    Info,
    /// UPDATE (RFC 3311)
    Update,
    /// PRACK (RFC 3262)
    Prack,
    /// MESSAGE (RFC 3428)
    Message,
    /// PUBLISH (RFC 3903)
    Publish,
    /// Any other (extension) method, as written.
    Other(&'a [u8]),
}

impl<'a> Method<'a> {
    /// Recognises a method token.
    #[must_use]
    pub fn from_bytes(b: &'a [u8]) -> Method<'a> {
        match b {
            b"INVITE" => Method::Invite,
            b"ACK" => Method::Ack,
            b"BYE" => Method::Bye,
            b"CANCEL" => Method::Cancel,
            b"REGISTER" => Method::Register,
            b"OPTIONS" => Method::Options,
            b"SUBSCRIBE" => Method::Subscribe,
            b"NOTIFY" => Method::Notify,
            b"REFER" => Method::Refer,
            b"INFO" => Method::Info,
            b"UPDATE" => Method::Update,
            b"PRACK" => Method::Prack,
            b"MESSAGE" => Method::Message,
            b"PUBLISH" => Method::Publish,
            other => Method::Other(other),
        }
    }

    /// The method as written.
    #[must_use]
    pub fn as_bytes(&self) -> &'a [u8] {
        match self {
            Method::Invite => b"INVITE",
            Method::Ack => b"ACK",
            Method::Bye => b"BYE",
            Method::Cancel => b"CANCEL",
            Method::Register => b"REGISTER",
            Method::Options => b"OPTIONS",
            Method::Subscribe => b"SUBSCRIBE",
            Method::Notify => b"NOTIFY",
            Method::Refer => b"REFER",
            Method::Info => b"INFO",
            Method::Update => b"UPDATE",
            Method::Prack => b"PRACK",
            Method::Message => b"MESSAGE",
            Method::Publish => b"PUBLISH",
            Method::Other(b) => b,
        }
    }
}

impl std::fmt::Display for Method<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&String::from_utf8_lossy(self.as_bytes()))
    }
}

/// The start line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartLine<'a> {
    /// `Method SP Request-URI SP SIP/2.0`
    Request {
        /// The method.
        method: Method<'a>,
        /// The Request-URI.
        uri: Uri<'a>,
    },
    /// `SIP/2.0 SP Status-Code SP Reason-Phrase`
    Response {
        /// Status code, 100-699.
        code: u16,
        /// Reason phrase (may be empty, may be UTF-8).
        reason: &'a [u8],
    },
}

/// Where one header line sits in the message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeaderPos {
    /// The classified name.
    pub name: HeaderName,
    /// 1-based line number (the start line is line 1).
    pub line_no: u32,
    pub(crate) name_at: (u32, u32),
    pub(crate) value_at: (u32, u32),
    /// From the first byte of the name to just past the CRLF of its last
    /// (folded) line.
    pub(crate) line_at: (u32, u32),
}

/// One header line, borrowing the message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header<'a> {
    /// The classified name.
    pub name: HeaderName,
    /// The name as written.
    pub raw_name: &'a [u8],
    /// The value, trimmed, folding kept as written.
    pub value: &'a [u8],
    /// The whole line(s) including the final CRLF.
    pub line: &'a [u8],
    /// 1-based line number.
    pub line_no: u32,
}

/// CSeq: sequence number and method.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CSeq<'a> {
    /// Sequence number (≤ 2^32-1).
    pub seq: u32,
    /// Method.
    pub method: Method<'a>,
}

/// A parsed SIP message borrowing its bytes.
#[derive(Debug, Clone)]
pub struct Message<'a> {
    buf: &'a [u8],
    start: StartLine<'a>,
    start_at: u32,
    headers: SmallVec<[HeaderPos; 24]>,
    /// Offset of the empty line that ends the header section.
    headers_end: u32,
    body_start: u32,
    call_id: &'a [u8],
    cseq: CSeq<'a>,
    max_forwards: Option<u8>,
    content_length: Option<u32>,
    top_via: Via<'a>,
    /// Offset of the top Via value.
    top_via_at: u32,
    /// The From and To tags (offsets into `buf`), once looked for: by
    /// [`Message::validate`] or the first [`Message::tags`].
    tags: std::cell::Cell<Option<Tags>>,
}

/// The From and To tags as offsets into the message.
type Tags = [Option<(u32, u32)>; 2];

fn header_err(h: &HeaderPos, reason: &'static str) -> Error {
    Error::Header {
        header: h.name.as_str(),
        line: h.line_no,
        reason,
    }
}

impl<'a> Message<'a> {
    /// Parses one message that arrived as a datagram (trailing octets after
    /// Content-Length are not part of it).
    ///
    /// # Errors
    /// An [`Error`] naming what is wrong and where.
    pub fn parse(buf: &'a [u8]) -> Result<Message<'a>> {
        Self::parse_as(buf, Transport::Datagram)
    }

    /// Parses one message framed as `transport` says.
    ///
    /// # Errors
    /// An [`Error`] naming what is wrong and where.
    pub fn parse_as(buf: &'a [u8], transport: Transport) -> Result<Message<'a>> {
        const NONE: OwnVias = OwnVias::none();
        Self::parse_known(buf, transport, &NONE)
    }

    /// Parses as [`Message::parse_as`] does, with the same result, reading a
    /// top Via that is one of `own` (ours, on a response) from what is known
    /// of it rather than parsing all of it.
    ///
    /// # Errors
    /// An [`Error`] naming what is wrong and where.
    pub fn parse_known(buf: &'a [u8], transport: Transport, own: &OwnVias) -> Result<Message<'a>> {
        let mut pos = 0;
        while pos < buf.len() && matches!(buf[pos], b'\r' | b'\n') {
            pos += 1;
        }
        if pos == buf.len() {
            return Err(Error::Empty);
        }
        let start_at = pos;
        let lines = LineEnds::new();
        let nl = lines.find(&buf[pos..]).ok_or(Error::Unterminated)? + pos;
        let line_end = if buf[nl - 1] == b'\r' { nl - 1 } else { nl };
        let start = parse_start_line(&buf[pos..line_end])?;
        pos = nl + 1;

        let mut headers: SmallVec<[HeaderPos; 24]> = SmallVec::new();
        let mut line_no = 1u32;
        // The single-valued headers, each at most once.
        let mut once: [Option<usize>; 6] = [None; 6];
        let mut first_via = None;
        let (headers_end, body_start) = loop {
            line_no += 1;
            let nl = lines.find(&buf[pos..]).ok_or(Error::Unterminated)? + pos;
            let end = if nl > pos && buf[nl - 1] == b'\r' {
                nl - 1
            } else {
                nl
            };
            if end == pos {
                break (pos, nl + 1);
            }
            if matches!(buf[pos], b' ' | b'\t') {
                let last = headers.last_mut().ok_or(Error::HeaderLine {
                    line: line_no,
                    reason: "continuation line before any header",
                })?;
                let (start, stop) = trimmed(buf, pos, end);
                if start < stop {
                    if last.value_at.0 == last.value_at.1 {
                        last.value_at.0 = start as u32;
                    }
                    last.value_at.1 = stop as u32;
                }
                last.line_at.1 = (nl + 1) as u32;
            } else {
                // One pass: token characters, optional SP/HT, then ':'.
                let line = &buf[pos..end];
                let name_len = token_len(line, 0);
                let mut colon = name_len;
                while colon < line.len() && matches!(line[colon], b' ' | b'\t') {
                    colon += 1;
                }
                if name_len == 0 || line.get(colon) != Some(&b':') {
                    return Err(Error::HeaderLine {
                        line: line_no,
                        reason: if memchr::memchr(b':', line).is_some() {
                            "invalid header name"
                        } else {
                            "missing ':'"
                        },
                    });
                }
                let name_end = pos + name_len;
                let name = HeaderName::classify(&buf[pos..name_end]);
                let idx = headers.len();
                let slot = match name {
                    HeaderName::CallId => 0,
                    HeaderName::CSeq => 1,
                    HeaderName::MaxForwards => 2,
                    HeaderName::ContentLength => 3,
                    HeaderName::From => 4,
                    HeaderName::To => 5,
                    HeaderName::Via => {
                        first_via.get_or_insert(idx);
                        6
                    }
                    _ => 6,
                };
                if slot < 6 && once[slot].replace(idx).is_some() {
                    return Err(Error::Duplicate {
                        header: name.as_str(),
                        line: line_no,
                    });
                }
                let (start, stop) = trimmed(buf, pos + colon + 1, end);
                headers.push(HeaderPos {
                    name,
                    line_no,
                    name_at: (pos as u32, name_end as u32),
                    value_at: (start as u32, stop as u32),
                    line_at: (pos as u32, (nl + 1) as u32),
                });
            }
            pos = nl + 1;
        };

        let value = |i: usize| value_of(buf, &headers[i]);
        let call_id = once[0].ok_or(Error::Missing("Call-ID"))?;
        if !valid_call_id(value(call_id)) {
            return Err(header_err(&headers[call_id], "not a word[@word]"));
        }
        let cseq_idx = once[1].ok_or(Error::Missing("CSeq"))?;
        let cseq = parse_cseq(value(cseq_idx)).ok_or_else(|| {
            header_err(
                &headers[cseq_idx],
                "expected a number up to 2^32-1 and a method",
            )
        })?;
        let max_forwards = match once[2] {
            Some(i) => Some(
                parse_u32(value(i), 255).ok_or_else(|| header_err(&headers[i], "expected 0-255"))?
                    as u8,
            ),
            None => None,
        };
        let content_length = match once[3] {
            Some(i) => Some(
                parse_u32(value(i), u32::MAX)
                    .ok_or_else(|| header_err(&headers[i], "expected a non-negative number"))?,
            ),
            None => None,
        };
        once[4].ok_or(Error::Missing("From"))?;
        once[5].ok_or(Error::Missing("To"))?;
        let first_via = first_via.ok_or(Error::Missing("Via"))?;

        if let StartLine::Request { method, uri } = start {
            if cseq.method != method {
                return Err(Error::CSeqMethod {
                    line: headers[cseq_idx].line_no,
                });
            }
            if uri.is_sip() && !uri.headers.is_empty() {
                return Err(Error::RequestUri(
                    "a SIP Request-URI must not carry headers",
                ));
            }
        }

        let available = (buf.len() - body_start) as u32;
        let msg_end = match (content_length, transport) {
            (Some(cl), _) if cl > available => {
                return Err(Error::BodyTruncated {
                    declared: cl,
                    available,
                });
            }
            (Some(cl), _) => body_start + cl as usize,
            (None, Transport::Datagram) => buf.len(),
            (None, Transport::Stream) => return Err(Error::StreamWithoutLength),
        };

        let call_id_bytes = value(call_id);
        let vh = headers[first_via];
        let vv = &buf[vh.value_at.0 as usize..vh.value_at.1 as usize];
        // Our own Via is on top of the responses we are sent, not of requests.
        let (top_via, _) = match start {
            StartLine::Response { .. } => Via::parse_prefix_known(vv, own),
            StartLine::Request { .. } => Via::parse_prefix(vv),
        }
        .map_err(|e| via_err(&vh, e))?;
        let top_via_at = vh.value_at.0;

        Ok(Message {
            buf: &buf[..msg_end],
            start,
            start_at: start_at as u32,
            headers,
            headers_end: headers_end as u32,
            body_start: body_start as u32,
            call_id: call_id_bytes,
            cseq,
            max_forwards,
            content_length,
            top_via,
            top_via_at,
            tags: std::cell::Cell::new(None),
        })
    }

    /// The From tag and the To tag (each `None` when absent, or when the
    /// header does not parse), found once per message.
    #[must_use]
    pub fn tags(&self) -> (Option<&'a [u8]>, Option<&'a [u8]>) {
        let t = self.tags.get().unwrap_or_else(|| {
            let at =
                |a: Result<NameAddr<'a>>| a.ok().and_then(|a| a.tag()).map(|t| self.offsets(t));
            let t = [at(self.from()), at(self.to())];
            self.tags.set(Some(t));
            t
        });
        let get = |r: Option<(u32, u32)>| r.map(|r| self.slice(r));
        (get(t[0]), get(t[1]))
    }

    /// Where `part` (a slice of this message's bytes) is in them.
    fn offsets(&self, part: &[u8]) -> (u32, u32) {
        let a = part.as_ptr() as usize - self.buf.as_ptr() as usize;
        (a as u32, (a + part.len()) as u32)
    }

    /// Checks the grammar of every Via, From, To, Contact, Route and
    /// Record-Route value, beyond what [`Message::parse`] reads.
    ///
    /// # Errors
    /// The first value that breaks its grammar.
    pub fn validate(&self) -> Result<()> {
        let mut tags: Tags = [None, None];
        for h in &self.headers {
            let v = self.slice(h.value_at);
            match h.name {
                HeaderName::Via => {
                    let mut top = h.value_at.0 == self.top_via_at;
                    for r in CommaSplit::new(v) {
                        let (a, b) = r.map_err(|()| header_err(h, "unbalanced quote or '<'"))?;
                        if a == b {
                            return Err(header_err(h, "empty value in list"));
                        }
                        // The top one was parsed with the message.
                        if std::mem::take(&mut top) {
                            continue;
                        }
                        Via::parse(&v[a..b]).map_err(|e| via_err(h, e))?;
                    }
                }
                HeaderName::From | HeaderName::To => {
                    let a = NameAddr::parse(v).map_err(|r| header_err(h, r))?;
                    tags[usize::from(h.name == HeaderName::To)] = a.tag().map(|t| self.offsets(t));
                }
                HeaderName::Contact if v == b"*" => {}
                HeaderName::Contact | HeaderName::Route | HeaderName::RecordRoute => {
                    for r in CommaSplit::new(v) {
                        let (a, b) = r.map_err(|()| header_err(h, "unbalanced quote or '<'"))?;
                        if a == b {
                            return Err(header_err(h, "empty value in list"));
                        }
                        NameAddr::parse(&v[a..b]).map_err(|r| header_err(h, r))?;
                    }
                }
                _ => {}
            }
        }
        self.tags.set(Some(tags));
        Ok(())
    }

    fn slice(&self, r: (u32, u32)) -> &'a [u8] {
        &self.buf[r.0 as usize..r.1 as usize]
    }

    /// The message bytes: start line to the end of the body, nothing after.
    #[must_use]
    pub fn as_bytes(&self) -> &'a [u8] {
        self.buf
    }

    /// The start line.
    #[must_use]
    pub fn start_line(&self) -> &StartLine<'a> {
        &self.start
    }

    /// Whether this is a request.
    #[must_use]
    pub fn is_request(&self) -> bool {
        matches!(self.start, StartLine::Request { .. })
    }

    /// The request method, or the CSeq method of a response.
    #[must_use]
    pub fn method(&self) -> Method<'a> {
        match self.start {
            StartLine::Request { method, .. } => method,
            StartLine::Response { .. } => self.cseq.method,
        }
    }

    /// The Request-URI of a request.
    #[must_use]
    pub fn request_uri(&self) -> Option<&Uri<'a>> {
        match &self.start {
            StartLine::Request { uri, .. } => Some(uri),
            StartLine::Response { .. } => None,
        }
    }

    /// The status code of a response.
    #[must_use]
    pub fn status(&self) -> Option<u16> {
        match self.start {
            StartLine::Response { code, .. } => Some(code),
            StartLine::Request { .. } => None,
        }
    }

    /// The Call-ID.
    #[must_use]
    pub fn call_id(&self) -> &'a [u8] {
        self.call_id
    }

    /// The CSeq.
    #[must_use]
    pub fn cseq(&self) -> CSeq<'a> {
        self.cseq
    }

    /// Max-Forwards, when present.
    #[must_use]
    pub fn max_forwards(&self) -> Option<u8> {
        self.max_forwards
    }

    /// Content-Length, when present.
    #[must_use]
    pub fn content_length(&self) -> Option<u32> {
        self.content_length
    }

    /// The body.
    #[must_use]
    pub fn body(&self) -> &'a [u8] {
        &self.buf[self.body_start as usize..]
    }

    /// The topmost Via value.
    #[must_use]
    pub fn top_via(&self) -> &Via<'a> {
        &self.top_via
    }

    /// Every header line in order.
    pub fn headers(&self) -> impl Iterator<Item = Header<'a>> + '_ {
        self.headers.iter().map(|h| self.header_at(h))
    }

    fn header_at(&self, h: &HeaderPos) -> Header<'a> {
        Header {
            name: h.name,
            raw_name: self.slice(h.name_at),
            value: self.slice(h.value_at),
            line: self.slice(h.line_at),
            line_no: h.line_no,
        }
    }

    /// The first header of that name.
    #[must_use]
    pub fn header(&self, name: HeaderName) -> Option<Header<'a>> {
        self.headers
            .iter()
            .find(|h| h.name == name)
            .map(|h| self.header_at(h))
    }

    /// Every value of a list header (Via, Route, Record-Route, Contact...), in
    /// order, across all its header lines; yields the value bytes.
    pub fn values(&self, name: HeaderName) -> impl Iterator<Item = &'a [u8]> + '_ {
        self.value_positions(name)
            .map(|p| self.slice((p.start, p.end)))
    }

    pub(crate) fn value_positions(&self, name: HeaderName) -> impl Iterator<Item = ValuePos> + '_ {
        let buf = self.buf;
        self.headers
            .iter()
            .enumerate()
            .filter(move |(_, h)| h.name == name)
            .flat_map(move |(idx, h)| {
                let base = h.value_at.0;
                let v = &buf[h.value_at.0 as usize..h.value_at.1 as usize];
                // One pass over the line (whether a value is its line's only
                // one, the value after it says: see `top_value_range`).
                CommaSplit::new(v).filter_map(move |r| {
                    let (a, b) = r.ok()?;
                    (a < b).then_some(ValuePos {
                        header: idx,
                        start: base + a as u32,
                        end: base + b as u32,
                    })
                })
            })
    }

    /// Every Via value, parsed, top first.
    pub fn vias(&self) -> impl Iterator<Item = Result<Via<'a>>> + '_ {
        self.value_positions(HeaderName::Via).map(|p| {
            let h = &self.headers[p.header];
            Via::parse(self.slice((p.start, p.end))).map_err(|e| via_err(h, e))
        })
    }

    /// Every Via value below the top one (which is [`Message::top_via`],
    /// parsed with the message), parsed, in order.
    pub fn vias_below_top(&self) -> impl Iterator<Item = Result<Via<'a>>> + '_ {
        self.value_positions(HeaderName::Via).skip(1).map(|p| {
            let h = &self.headers[p.header];
            Via::parse(self.slice((p.start, p.end))).map_err(|e| via_err(h, e))
        })
    }

    /// Every Route value, parsed, top first.
    pub fn routes(&self) -> impl Iterator<Item = Result<NameAddr<'a>>> + '_ {
        self.addresses(HeaderName::Route)
    }

    /// Every Record-Route value, parsed, top first.
    pub fn record_routes(&self) -> impl Iterator<Item = Result<NameAddr<'a>>> + '_ {
        self.addresses(HeaderName::RecordRoute)
    }

    /// Every Contact value, parsed (none for `Contact: *`).
    pub fn contacts(&self) -> impl Iterator<Item = Result<NameAddr<'a>>> + '_ {
        self.addresses(HeaderName::Contact)
    }

    fn addresses(&self, name: HeaderName) -> impl Iterator<Item = Result<NameAddr<'a>>> + '_ {
        self.value_positions(name)
            .filter(|p| self.slice((p.start, p.end)) != b"*")
            .map(|p| {
                let h = &self.headers[p.header];
                NameAddr::parse(self.slice((p.start, p.end))).map_err(|r| header_err(h, r))
            })
    }

    /// The From header, parsed.
    ///
    /// # Errors
    /// When the value breaks the grammar.
    pub fn from(&self) -> Result<NameAddr<'a>> {
        self.single_address(HeaderName::From)
    }

    /// The To header, parsed.
    ///
    /// # Errors
    /// When the value breaks the grammar.
    pub fn to(&self) -> Result<NameAddr<'a>> {
        self.single_address(HeaderName::To)
    }

    fn single_address(&self, name: HeaderName) -> Result<NameAddr<'a>> {
        let h = self
            .headers
            .iter()
            .find(|h| h.name == name)
            .ok_or(Error::Missing(name.as_str()))?;
        NameAddr::parse(self.slice(h.value_at)).map_err(|r| header_err(h, r))
    }

    pub(crate) fn header_pos(&self, idx: usize) -> &HeaderPos {
        &self.headers[idx]
    }

    pub(crate) fn header_positions(&self) -> &[HeaderPos] {
        &self.headers
    }

    pub(crate) fn start_at(&self) -> u32 {
        self.start_at
    }

    pub(crate) fn headers_end(&self) -> u32 {
        self.headers_end
    }

    pub(crate) fn top_via_at(&self) -> u32 {
        self.top_via_at
    }
}

/// Position of one value of a list header.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ValuePos {
    pub(crate) header: usize,
    pub(crate) start: u32,
    pub(crate) end: u32,
}

/// Finds the `\n` that ends a line: memchr's AVX2 searcher made once per
/// message, not dispatched and set up again for each of its short lines.
pub(crate) struct LineEnds {
    #[cfg(target_arch = "x86_64")]
    avx2: Option<memchr::arch::x86_64::avx2::memchr::One>,
}

impl LineEnds {
    #[inline]
    pub(crate) fn new() -> LineEnds {
        LineEnds {
            #[cfg(target_arch = "x86_64")]
            avx2: memchr::arch::x86_64::avx2::memchr::One::new(b'\n'),
        }
    }

    #[inline]
    pub(crate) fn find(&self, hay: &[u8]) -> Option<usize> {
        #[cfg(target_arch = "x86_64")]
        if let Some(one) = &self.avx2 {
            return one.find(hay);
        }
        memchr::memchr(b'\n', hay)
    }
}

/// `[start, end)` of `buf` without leading and trailing SP/HT; empty at
/// `end` when it is all whitespace.
fn trimmed(buf: &[u8], mut start: usize, mut end: usize) -> (usize, usize) {
    while start < end && matches!(buf[start], b' ' | b'\t') {
        start += 1;
    }
    while end > start && matches!(buf[end - 1], b' ' | b'\t') {
        end -= 1;
    }
    (start, end)
}

fn value_of<'a>(buf: &'a [u8], h: &HeaderPos) -> &'a [u8] {
    &buf[h.value_at.0 as usize..h.value_at.1 as usize]
}

fn via_err(h: &HeaderPos, e: ViaError) -> Error {
    match e {
        ViaError::Version => Error::Version { line: h.line_no },
        ViaError::Syntax(r) => header_err(h, r),
    }
}

fn valid_call_id(v: &[u8]) -> bool {
    // word [ "@" word ]
    let mut at = None;
    for (i, &b) in v.iter().enumerate() {
        if b == b'@' {
            if at.replace(i).is_some() {
                return false;
            }
        } else if !is_word(b) {
            return false;
        }
    }
    !v.is_empty() && at.is_none_or(|i| i > 0 && i + 1 < v.len())
}

fn parse_cseq(v: &[u8]) -> Option<CSeq<'_>> {
    let n = v.iter().take_while(|b| b.is_ascii_digit()).count();
    let seq = parse_u32(&v[..n], u32::MAX)?;
    let m = skip_ws(v, n);
    if m == n {
        return None;
    }
    let len = token_len(v, m);
    if len == 0 || m + len != v.len() {
        return None;
    }
    Some(CSeq {
        seq,
        method: Method::from_bytes(&v[m..m + len]),
    })
}

fn is_sip_version(v: &[u8]) -> bool {
    v.eq_ignore_ascii_case(b"SIP/2.0")
}

/// `SIP/x.y` with digits: a version we can name as unsupported (505).
fn is_other_version(v: &[u8]) -> bool {
    v.len() > 4
        && v[..4].eq_ignore_ascii_case(b"SIP/")
        && v[4..].iter().all(|&b| b.is_ascii_digit() || b == b'.')
        && v[4..].iter().filter(|&&b| b == b'.').count() == 1
}

fn parse_start_line(line: &[u8]) -> Result<StartLine<'_>> {
    if line.len() >= 4 && line[..4].eq_ignore_ascii_case(b"SIP/") {
        let sp = memchr::memchr(b' ', line).ok_or(Error::StartLine("missing status code"))?;
        let version = &line[..sp];
        if !is_sip_version(version) {
            return Err(if is_other_version(version) {
                Error::Version { line: 1 }
            } else {
                Error::StartLine("malformed SIP version")
            });
        }
        let rest = &line[sp + 1..];
        let digits = rest.iter().take_while(|b| b.is_ascii_digit()).count();
        if digits != 3 || (rest.len() > 3 && rest[3] != b' ') {
            return Err(Error::StartLine("status code must be three digits"));
        }
        let code =
            parse_u32(&rest[..3], 699).ok_or(Error::StartLine("status code out of range"))? as u16;
        if code < 100 {
            return Err(Error::StartLine("status code out of range"));
        }
        let reason = rest.get(4..).unwrap_or_default();
        if reason.iter().any(|&b| b == b'\r' || b == b'\n') {
            return Err(Error::StartLine("control character in reason phrase"));
        }
        return Ok(StartLine::Response { code, reason });
    }
    let mut parts = line.split(|&b| b == b' ');
    let (Some(method), Some(uri), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(Error::StartLine(
            "expected 'Method SP Request-URI SP SIP-Version'",
        ));
    };
    if method.is_empty() || !method.iter().all(|&b| is_token(b)) {
        return Err(Error::StartLine("invalid method"));
    }
    if !is_sip_version(version) {
        return Err(if is_other_version(version) {
            Error::Version { line: 1 }
        } else {
            Error::StartLine("malformed SIP version")
        });
    }
    let uri = Uri::parse(uri).map_err(Error::RequestUri)?;
    Ok(StartLine::Request {
        method: Method::from_bytes(method),
        uri,
    })
}

#[cfg(test)]
mod tests {
    use super::LineEnds;

    proptest::proptest! {
        /// The searcher made once per message finds what `memchr` does, in
        /// lines shorter and longer than its vectors.
        #[test]
        fn line_ends_agree_with_memchr(
            hay in proptest::collection::vec(proptest::sample::select(b"a \r\n:".to_vec()), 0..200),
        ) {
            let lines = LineEnds::new();
            let mut pos = 0;
            loop {
                let ours = lines.find(&hay[pos..]);
                proptest::prop_assert_eq!(ours, memchr::memchr(b'\n', &hay[pos..]));
                match ours {
                    Some(i) => pos += i + 1,
                    None => break,
                }
            }
        }
    }
}

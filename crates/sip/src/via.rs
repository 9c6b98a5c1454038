//! Via header values (RFC 3261 §20.42, RFC 3581 `rport`).

use crate::scan::{parse_params, skip_ws, token_len};
use crate::uri::{Host, parse_host};

/// One Via value, borrowing the message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Via<'a> {
    /// The whole value as written (may include folding).
    pub raw: &'a [u8],
    /// Transport token (`UDP`, `TCP`, `TLS`, `SCTP`, `WS`... as written).
    pub transport: &'a [u8],
    /// sent-by host.
    pub host: Host<'a>,
    /// sent-by port, when written.
    pub port: Option<u16>,
    /// `branch`, when present.
    pub branch: Option<&'a [u8]>,
    /// `received`, when present.
    pub received: Option<&'a [u8]>,
    /// `rport`: `Some(None)` when present without a value (a request for it).
    pub rport: Option<Option<u16>>,
    /// `maddr`, when present.
    pub maddr: Option<&'a [u8]>,
    /// Byte range (within `raw`) of the `;rport[=n]` parameter.
    pub(crate) rport_at: Option<(usize, usize)>,
    /// Byte range (within `raw`) of the `;received=x` parameter.
    pub(crate) received_at: Option<(usize, usize)>,
}

/// Why a Via value is refused; `Version` maps to 505.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ViaError {
    Version,
    Syntax(&'static str),
}

impl From<&'static str> for ViaError {
    fn from(s: &'static str) -> Self {
        ViaError::Syntax(s)
    }
}

impl<'a> Via<'a> {
    /// Parses one Via value (one element of a comma list, trimmed).
    pub(crate) fn parse(s: &'a [u8]) -> Result<Via<'a>, ViaError> {
        let (via, end) = Self::parse_prefix(s)?;
        if end != s.len() {
            return Err(ViaError::Syntax("unexpected character after parameters"));
        }
        Ok(via)
    }

    /// Parses the first Via value of a list; returns it and where it ends
    /// (at the `,` before the next value, or the end). Errors when something
    /// other than a comma follows the value.
    pub(crate) fn parse_prefix(s: &'a [u8]) -> Result<(Via<'a>, usize), ViaError> {
        // sent-protocol = protocol-name SLASH protocol-version SLASH transport,
        // with LWS allowed around each slash (RFC 4475 wsinv).
        let i = match s.get(..8) {
            // As nearly everyone writes it.
            Some(p) if p[..4].eq_ignore_ascii_case(b"SIP/") && &p[4..] == b"2.0/" => skip_ws(s, 8),
            _ => sent_protocol(s)?,
        };
        Self::parse_after_protocol(s, i)
    }

    /// The rest of [`Via::parse_prefix`], from the transport at `i`.
    fn parse_after_protocol(s: &'a [u8], mut i: usize) -> Result<(Via<'a>, usize), ViaError> {
        let t_len = token_len(s, i);
        if t_len == 0 {
            return Err(ViaError::Syntax("missing transport"));
        }
        let transport = &s[i..i + t_len];
        i += t_len;
        let j = skip_ws(s, i);
        if j == i || j >= s.len() {
            return Err(ViaError::Syntax("missing sent-by"));
        }
        let (host, n) =
            parse_host(&s[j..]).map_err(|_| ViaError::Syntax("invalid sent-by host"))?;
        i = j + n;
        let mut port = None;
        let k = skip_ws(s, i);
        if s.get(k) == Some(&b':') {
            let p = skip_ws(s, k + 1);
            let len = s[p..].iter().take_while(|b| b.is_ascii_digit()).count();
            let v = crate::scan::parse_u32(&s[p..p + len], 65535).ok_or("invalid sent-by port")?;
            port = Some(v as u16);
            i = p + len;
        }
        Self::parse_params_from(s, Via::bare(s, transport, host, port, None), i)
    }

    /// Parses one of `own`'s Vias, or any other, as [`Via::parse_prefix`]
    /// does: a value that begins with one of them byte for byte and goes on
    /// with a token branch is read from the template, the rest of its
    /// parameters parsed as usual.
    pub(crate) fn parse_prefix_known(
        s: &'a [u8],
        own: &OwnVias,
    ) -> Result<(Via<'a>, usize), ViaError> {
        for o in &own.0 {
            if let Some(rest) = s.strip_prefix(&*o.prefix) {
                let start = o.prefix.len();
                let end = start + token_len(rest, 0);
                // Anything else (an empty, quoted or IPv6-like value) takes
                // the general path, which says what is wrong with it.
                let plain = end > start
                    && s.get(end)
                        .is_none_or(|&b| !matches!(b, b':' | b'[' | b']' | b'"'));
                if plain {
                    let host = match o.host {
                        OwnHost::Ip(h) => h,
                        OwnHost::Name(a, b) => Host::Name(&s[a..b]),
                    };
                    let transport = &s[o.transport.0..o.transport.1];
                    let branch = Some(&s[start..end]);
                    let via = Via::bare(s, transport, host, o.port, branch);
                    return Self::parse_params_from(s, via, end);
                }
                break;
            }
        }
        Self::parse_prefix(s)
    }

    /// A Via with no parameter read yet but perhaps its branch.
    fn bare(
        raw: &'a [u8],
        transport: &'a [u8],
        host: Host<'a>,
        port: Option<u16>,
        branch: Option<&'a [u8]>,
    ) -> Via<'a> {
        Via {
            raw,
            transport,
            host,
            port,
            branch,
            received: None,
            rport: None,
            maddr: None,
            rport_at: None,
            received_at: None,
        }
    }

    /// The parameters from `i` on, and the end of the value.
    fn parse_params_from(
        s: &'a [u8],
        mut via: Via<'a>,
        i: usize,
    ) -> Result<(Via<'a>, usize), ViaError> {
        let mut bad = None;
        let end = parse_params(s, i, |p| {
            let name = &s[p.name.0..p.name.1];
            let value = p.value.map(|(a, b)| &s[a..b]);
            let is = |n: &[u8]| name.len() == n.len() && name.eq_ignore_ascii_case(n);
            match name.len() {
                6 if is(b"branch") => match value {
                    // A token: not quoted, no ':' '[' ']'.
                    Some(v) if p.token => via.branch = Some(v),
                    _ => bad = Some("invalid branch"),
                },
                8 if is(b"received") => {
                    via.received = value;
                    via.received_at = Some(p.whole);
                    if value.is_none() {
                        bad = Some("received without a value");
                    }
                }
                5 if is(b"rport") => {
                    via.rport_at = Some(p.whole);
                    via.rport = Some(match value {
                        None => None,
                        Some(v) => match crate::scan::parse_u32(v, 65535) {
                            Some(n) => Some(n as u16),
                            None => {
                                bad = Some("invalid rport");
                                None
                            }
                        },
                    });
                }
                5 if is(b"maddr") => via.maddr = value,
                _ => {}
            }
        })?;
        if let Some(reason) = bad {
            return Err(ViaError::Syntax(reason));
        }
        if end != s.len() && s[end] != b',' {
            return Err(ViaError::Syntax("unexpected character after parameters"));
        }
        let mut raw_end = end;
        while raw_end > 0 && crate::scan::is_ws(s[raw_end - 1]) {
            raw_end -= 1;
        }
        via.raw = &s[..raw_end];
        Ok((via, end))
    }

    /// Whether the branch carries the RFC 3261 magic cookie.
    #[must_use]
    pub fn is_rfc3261(&self) -> bool {
        self.branch
            .is_some_and(|b| b.len() > 7 && b[..7].eq_ignore_ascii_case(b"z9hG4bK"))
    }
}

/// `SIP / 2.0 /` with any LWS around the slashes: where the transport starts.
fn sent_protocol(s: &[u8]) -> Result<usize, ViaError> {
    let mut i = skip_ws(s, 0);
    let name_len = token_len(s, i);
    if name_len == 0 {
        return Err(ViaError::Syntax("missing protocol"));
    }
    let name = &s[i..i + name_len];
    i = expect_slash(s, i + name_len)?;
    let ver_len = token_len(s, i);
    let version = &s[i..i + ver_len];
    i = expect_slash(s, i + ver_len)?;
    if !name.eq_ignore_ascii_case(b"SIP") {
        return Err(ViaError::Syntax("protocol is not SIP"));
    }
    if version != b"2.0" {
        return Err(if version.is_empty() {
            ViaError::Syntax("missing protocol version")
        } else {
            ViaError::Version
        });
    }
    Ok(i)
}

/// The Via values a proxy writes itself, up to and including `;branch=`
/// (RFC 3261 §16.6 step 8): the top Via of every response it is sent.
/// [`crate::Message::parse_known`] reads such a Via from what is known of
/// it instead of parsing that part again.
#[derive(Debug, Clone, Default)]
pub struct OwnVias(Vec<OwnVia>);

#[derive(Debug, Clone)]
struct OwnVia {
    prefix: Box<[u8]>,
    transport: (usize, usize),
    host: OwnHost,
    port: Option<u16>,
}

#[derive(Debug, Clone, Copy)]
enum OwnHost {
    Ip(Host<'static>),
    Name(usize, usize),
}

impl OwnVias {
    /// How many there are.
    #[must_use]
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether there are none.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// No own Vias: every Via parsed in full.
    #[must_use]
    pub const fn none() -> OwnVias {
        OwnVias(Vec::new())
    }

    /// The Vias written as `prefixes`, each a Via value up to its branch
    /// (`SIP/2.0/UDP 192.0.2.1:5060;branch=`).
    ///
    /// # Errors
    /// A prefix that is not a Via value ending in `;branch=`, followed by
    /// nothing else: the reason, naming what is wrong.
    pub fn new<B: AsRef<[u8]>>(
        prefixes: impl IntoIterator<Item = B>,
    ) -> Result<OwnVias, &'static str> {
        let mut own = Vec::new();
        for p in prefixes {
            let prefix = p.as_ref();
            if !prefix.ends_with(b";branch=") {
                return Err("an own Via must end in ;branch=");
            }
            let probe = [prefix, b"x"].concat();
            let via = Via::parse(&probe).map_err(|_| "an own Via must parse as a Via")?;
            if via.branch != Some(&b"x"[..])
                || via.received.is_some()
                || via.rport.is_some()
                || via.maddr.is_some()
            {
                return Err("an own Via must have no parameter before its branch");
            }
            let at = |part: &[u8]| {
                let a = part.as_ptr() as usize - probe.as_ptr() as usize;
                (a, a + part.len())
            };
            own.push(OwnVia {
                prefix: prefix.into(),
                transport: at(via.transport),
                host: match via.host {
                    Host::Name(n) => {
                        let (a, b) = at(n);
                        OwnHost::Name(a, b)
                    }
                    Host::V4(a) => OwnHost::Ip(Host::V4(a)),
                    Host::V6(a) => OwnHost::Ip(Host::V6(a)),
                },
                port: via.port,
            });
        }
        Ok(OwnVias(own))
    }
}

fn expect_slash(s: &[u8], i: usize) -> Result<usize, ViaError> {
    let j = skip_ws(s, i);
    if s.get(j) != Some(&b'/') {
        return Err(ViaError::Syntax("malformed sent-protocol"));
    }
    Ok(skip_ws(s, j + 1))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn folded_and_spaced() {
        let v = Via::parse(b"SIP  /   2.0\r\n /UDP\r\n    192.0.2.2;branch=390skdjuw").unwrap();
        assert_eq!(v.transport, b"UDP");
        assert_eq!(v.host, Host::V4("192.0.2.2".parse().unwrap()));
        assert_eq!(v.branch, Some(&b"390skdjuw"[..]));
        assert!(!v.is_rfc3261());
        let v = Via::parse(b"SIP  /    2.0   / UDP  192.168.255.111   ; branch=\r\n z9hG4bK30239")
            .unwrap();
        assert_eq!(v.branch, Some(&b"z9hG4bK30239"[..]));
        assert!(v.is_rfc3261());
    }

    #[test]
    fn ipv6_rport_received() {
        let v = Via::parse(
            b"SIP/2.0/TCP [2001:db8::9:1]:5070;rport;branch=z9hG4bKx;received=2001:db8::9:255",
        )
        .unwrap();
        assert_eq!(v.port, Some(5070));
        assert_eq!(v.rport, Some(None));
        assert_eq!(v.received, Some(&b"2001:db8::9:255"[..]));
        assert_eq!(v.maddr, None);
        let (a, b) = v.rport_at.unwrap();
        assert_eq!(&v.raw[a..b], b";rport");
    }

    /// Via-like bytes: a sent-protocol as written in the wild or nearly,
    /// then sent-by and parameters from a small alphabet.
    fn via_bytes() -> impl Strategy<Value = Vec<u8>> {
        let protocol = prop::sample::select(vec![
            &b"SIP/2.0/"[..],
            b"sip/2.0/",
            b"SiP/2.0/ ",
            b"SIP /2.0/",
            b"SIP/ 2.0 /",
            b"SIP/2.0",
            b"SIP/2.1/",
            b"SIP/2.0x/",
            b"SIPS/2.0/",
            b" SIP/2.0/",
            b"SIP/2.",
            b"",
        ]);
        let tail = prop::collection::vec(
            prop::sample::select(
                b"UDPTCPws 127.0.0.1:5060;branch=z9hG4bK-\"rport,received:[]x\r\n\t".to_vec(),
            ),
            0..48,
        );
        (protocol, tail).prop_map(|(p, t)| [p, &t[..]].concat())
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 4096, ..ProptestConfig::default() })]

        /// The `SIP/2.0/` shortcut gives what the general sent-protocol
        /// grammar gives, on every input.
        #[test]
        fn the_common_prefix_agrees_with_the_grammar(s in via_bytes()) {
            let general = sent_protocol(&s).and_then(|i| Via::parse_after_protocol(&s, i));
            prop_assert_eq!(Via::parse_prefix(&s), general);
        }

        /// A branch is taken when it is an unquoted token: no ':', '[' or ']'.
        #[test]
        fn a_branch_is_an_unquoted_token(v in prop::collection::vec(
            prop::sample::select(b"z9hG4bK-.:[]\"x%~".to_vec()), 1..12)
        ) {
            let s = [&b"SIP/2.0/UDP h;branch="[..], &v].concat();
            let token = v.iter().all(|&b| crate::scan::is_token(b));
            match Via::parse(&s) {
                Ok(via) => prop_assert_eq!(via.branch, token.then_some(&v[..])),
                Err(_) => prop_assert!(!token),
            }
        }
    }

    const OWN: [&[u8]; 3] = [
        b"SIP/2.0/UDP 127.0.0.1:5360;branch=",
        b"SIP/2.0/TCP lb.example.com;branch=",
        b"SIP/2.0/WSS [2001:db8::1]:443;branch=",
    ];

    /// One of [`OWN`], perhaps cut short or with one byte changed, then
    /// pieces of parameters, values and separators.
    fn after_own() -> impl Strategy<Value = Vec<u8>> {
        let piece = prop::sample::select(vec![
            &b"z9hG4bK"[..],
            b"0f3a",
            b"-",
            b";",
            b"=",
            b"rport",
            b"received",
            b"branch",
            b"maddr",
            b"192.0.2.1",
            b"5060",
            b":",
            b"[",
            b"]",
            b"\"",
            b",",
            b" ",
            b"\r\n ",
            b"<",
        ]);
        (
            prop::sample::select(OWN.to_vec()),
            0usize..40,
            prop::option::of((0usize..40, any::<u8>())),
            prop::collection::vec(piece, 0..10),
        )
            .prop_map(|(own, cut, change, tail)| {
                let mut v = own[..own.len() - cut.min(own.len()) * usize::from(cut < 4)].to_vec();
                if let Some((i, b)) = change
                    && i < v.len()
                {
                    v[i] = b;
                }
                v.extend(tail.concat());
                v
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 8192, ..ProptestConfig::default() })]

        /// An own Via read from its template gives what parsing it gives.
        #[test]
        fn an_own_via_reads_as_it_parses(s in after_own()) {
            let own = OwnVias::new(OWN).unwrap();
            prop_assert_eq!(Via::parse_prefix_known(&s, &own), Via::parse_prefix(&s));
        }
    }

    #[test]
    fn own_vias_are_checked() {
        assert!(OwnVias::new(OWN).is_ok());
        for bad in [
            &b"SIP/2.0/UDP 127.0.0.1:5360;branch"[..],
            b"SIP/2.0/UDP 127.0.0.1:5360;rport;branch=",
            b"SIP/2.0/UDP 127.0.0.1:5360 junk;branch=",
            b"SIP/2.0/UDP ;branch=",
            b"SIP/3.0/UDP h;branch=",
        ] {
            assert!(
                OwnVias::new([bad]).is_err(),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn refusals() {
        assert_eq!(Via::parse(b"SIP/7.0/UDP host"), Err(ViaError::Version));
        for bad in [
            &b"SIP/2.0/UDP"[..],
            b"SIP/2.0/UDP ",
            b"SIP/2.0 host",
            b"SIP/2.0/UDP host;;",
            b"SIP/2.0/UDP host:70000",
            b"SIP/2.0/UDP host;rport=x",
            b"SIP/2.0/UDP host junk",
            b"HTTP/2.0/UDP host",
        ] {
            assert!(Via::parse(bad).is_err(), "{}", String::from_utf8_lossy(bad));
        }
    }
}

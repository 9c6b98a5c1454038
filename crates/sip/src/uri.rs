//! URIs as SIP uses them (RFC 3261 §19.1, §25.1; RFC 3966 `tel`): a borrowed
//! view of the bytes with the parts a proxy needs split out. Nothing is
//! unescaped or copied unless asked for ([`unescape`]).

use std::borrow::Cow;
use std::net::{Ipv4Addr, Ipv6Addr};

use crate::scan::{Param, find_byte, parse_params};

/// URI scheme.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    /// `sip:`
    Sip,
    /// `sips:`
    Sips,
    /// `tel:` (RFC 3966)
    Tel,
    /// Any other scheme: well formed, opaque to us.
    Other,
}

/// The host part of a SIP URI or a Via sent-by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Host<'a> {
    /// A domain name, as written.
    Name(&'a [u8]),
    /// An IPv4 address.
    V4(Ipv4Addr),
    /// An IPv6 reference (written in brackets).
    V6(Ipv6Addr),
}

impl Host<'_> {
    /// The IP address, when the host is one.
    #[must_use]
    pub fn ip(&self) -> Option<std::net::IpAddr> {
        match *self {
            Host::V4(a) => Some(a.into()),
            Host::V6(a) => Some(a.into()),
            Host::Name(_) => None,
        }
    }
}

impl std::fmt::Display for Host<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Host::Name(n) => f.write_str(&String::from_utf8_lossy(n)),
            Host::V4(a) => write!(f, "{a}"),
            Host::V6(a) => write!(f, "[{a}]"),
        }
    }
}

/// A parsed URI borrowing the message bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Uri<'a> {
    /// The whole URI as written.
    pub raw: &'a [u8],
    /// The scheme.
    pub scheme: Scheme,
    /// User part (still escaped); for `tel:` the number.
    pub user: Option<&'a [u8]>,
    /// Password (still escaped).
    pub password: Option<&'a [u8]>,
    /// Host, for `sip:`/`sips:`.
    pub host: Option<Host<'a>>,
    /// Port, when written.
    pub port: Option<u16>,
    /// The parameters, from the first `;` (empty when there are none).
    pub params: &'a [u8],
    /// The headers after `?` (empty when there are none).
    pub headers: &'a [u8],
}

const HOST_END: u8 = 0;
const HOST_DIGIT: u8 = 1;
const HOST_ALPHA: u8 = 2;
const HOST_DOT: u8 = 3;

/// What each byte is to a host name: a digit, a letter (or `-`, `_`), a
/// dot, or the end of the name.
const HOST_CLASS: [u8; 256] = {
    let mut t = [HOST_END; 256];
    let mut c = 0;
    while c < 256 {
        let b = c as u8;
        t[c] = if b == b'.' {
            HOST_DOT
        } else if b.is_ascii_digit() {
            HOST_DIGIT
        } else if b.is_ascii_alphabetic() || b == b'-' || b == b'_' {
            HOST_ALPHA
        } else {
            HOST_END
        };
        c += 1;
    }
    t
};

/// Parses a host (`name`, IPv4 or `[IPv6]`) at the start of `s`; returns it and
/// its length in bytes.
pub(crate) fn parse_host(s: &[u8]) -> Result<(Host<'_>, usize), &'static str> {
    if s.first() == Some(&b'[') {
        let end = find_byte(b']', s).ok_or("unterminated IPv6 reference")?;
        let text = std::str::from_utf8(&s[1..end]).map_err(|_| "invalid IPv6 reference")?;
        let addr: Ipv6Addr = text.parse().map_err(|_| "invalid IPv6 reference")?;
        return Ok((Host::V6(addr), end + 1));
    }
    // Most hosts in SIP traffic are addresses: a dotted quad is read in the
    // pass that finds its end.
    if let Some((addr, n)) = ipv4_prefix(s) {
        return Ok((Host::V4(addr), n));
    }
    // One pass: the extent of the name, and whether it is digits and dots
    // (one table lookup per byte).
    let mut n = 0;
    let mut numeric = true;
    let mut after_dot = true;
    while let Some(&b) = s.get(n) {
        match HOST_CLASS[b as usize] {
            HOST_DOT => {
                if after_dot {
                    return Err("invalid host name");
                }
                after_dot = true;
            }
            HOST_DIGIT => after_dot = false,
            HOST_ALPHA => {
                numeric = false;
                after_dot = false;
            }
            _ => break,
        }
        n += 1;
    }
    if n == 0 {
        return Err("missing host");
    }
    let name = &s[..n];
    if numeric {
        return Ok((Host::V4(parse_ipv4(name).ok_or("invalid IPv4 address")?), n));
    }
    if name[0] == b'-' {
        return Err("invalid host name");
    }
    Ok((Host::Name(name), n))
}

/// A dotted quad (each part 0-255 in at most three digits) at the start of
/// `s` and followed by a byte no host name holds: the address and its
/// length. `None` for anything else, which the general scan decides (the
/// same answer: proptest `parse_host_agrees_with_the_byte_at_a_time_scan`).
#[inline]
fn ipv4_prefix(s: &[u8]) -> Option<(Ipv4Addr, usize)> {
    let mut octets = [0u8; 4];
    let mut i = 0;
    for (k, o) in octets.iter_mut().enumerate() {
        if k > 0 {
            if s.get(i) != Some(&b'.') {
                return None;
            }
            i += 1;
        }
        let start = i;
        let mut v = 0u32;
        while let Some(&b) = s.get(i) {
            if !b.is_ascii_digit() {
                break;
            }
            v = v * 10 + u32::from(b - b'0');
            i += 1;
            if i - start > 3 {
                return None;
            }
        }
        if i == start || v > 255 {
            return None;
        }
        *o = v as u8;
    }
    match s.get(i) {
        Some(&b) if HOST_CLASS[b as usize] != HOST_END => None,
        _ => Some((Ipv4Addr::from(octets), i)),
    }
}

/// Dotted-quad IPv4, each part 0-255 in at most three digits.
fn parse_ipv4(s: &[u8]) -> Option<Ipv4Addr> {
    let mut octets = [0u8; 4];
    let (mut k, mut digits, mut value) = (0usize, 0u32, 0u32);
    for &b in s {
        if b == b'.' {
            if digits == 0 || k == 3 {
                return None;
            }
            octets[k] = value as u8;
            (k, digits, value) = (k + 1, 0, 0);
        } else {
            value = value * 10 + u32::from(b - b'0');
            digits += 1;
            if digits > 3 || value > 255 {
                return None;
            }
        }
    }
    if digits == 0 || k != 3 {
        return None;
    }
    octets[3] = value as u8;
    Some(Ipv4Addr::from(octets))
}

const fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric()
        || matches!(
            b,
            b'-' | b'_' | b'.' | b'!' | b'~' | b'*' | b'\'' | b'(' | b')'
        )
}

/// The characters a part of a URI may hold besides escapes: unreserved
/// ones and the part's own extra set, one bit per part in one table.
#[derive(Clone, Copy)]
struct Part {
    bit: u8,
    what: &'static str,
}

const USER: Part = Part {
    bit: 1,
    what: "invalid character in user part",
};
const PASSWORD: Part = Part {
    bit: 2,
    what: "invalid character in password",
};
const PARAM: Part = Part {
    bit: 4,
    what: "invalid character in URI parameter",
};
const HEADER: Part = Part {
    bit: 8,
    what: "invalid character in URI header",
};

const USER_EXTRA: &[u8] = b"&=+$,;?/";
const PASSWORD_EXTRA: &[u8] = b"&=+$,";
const PARAM_EXTRA: &[u8] = b"[]/:&+$";
const HEADER_EXTRA: &[u8] = b"[]/?:+$";

const URI_CHARS: [u8; 256] = {
    let mut t = [0u8; 256];
    let mut c = 0;
    while c < 256 {
        if is_unreserved(c as u8) {
            t[c] = USER.bit | PASSWORD.bit | PARAM.bit | HEADER.bit;
        }
        c += 1;
    }
    let sets: [(&[u8], u8); 4] = [
        (USER_EXTRA, USER.bit),
        (PASSWORD_EXTRA, PASSWORD.bit),
        (PARAM_EXTRA, PARAM.bit),
        (HEADER_EXTRA, HEADER.bit),
    ];
    let mut k = 0;
    while k < sets.len() {
        let (extra, bit) = sets[k];
        let mut i = 0;
        while i < extra.len() {
            t[extra[i] as usize] |= bit;
            i += 1;
        }
        k += 1;
    }
    t
};

/// Checks that every byte of `s` is unreserved, an escape `%HH`, or in the
/// part's extra set.
fn check_chars(s: &[u8], part: Part) -> Result<(), &'static str> {
    let mut i = 0;
    while let Some(&b) = s.get(i) {
        if URI_CHARS[b as usize] & part.bit != 0 {
            i += 1;
        } else if b == b'%' {
            if !(s.get(i + 1).is_some_and(u8::is_ascii_hexdigit)
                && s.get(i + 2).is_some_and(u8::is_ascii_hexdigit))
            {
                return Err("invalid escape");
            }
            i += 3;
        } else {
            return Err(part.what);
        }
    }
    Ok(())
}

impl<'a> Uri<'a> {
    /// Parses a whole URI; `s` must hold nothing else (no brackets, no LWS).
    ///
    /// # Errors
    /// A reason naming the part that breaks the grammar.
    pub fn parse(s: &'a [u8]) -> Result<Uri<'a>, &'static str> {
        // As nearly every URI a proxy sees begins.
        if let Some(rest) = s.get(..4).filter(|p| p.eq_ignore_ascii_case(b"sip:")) {
            let mut uri = Uri::empty(s, Scheme::Sip);
            uri.parse_sip(&s[rest.len()..])?;
            return Ok(uri);
        }
        Self::parse_general(s)
    }

    fn empty(raw: &'a [u8], scheme: Scheme) -> Uri<'a> {
        Uri {
            raw,
            scheme,
            user: None,
            password: None,
            host: None,
            port: None,
            params: &[],
            headers: &[],
        }
    }

    /// [`Uri::parse`] for any scheme.
    fn parse_general(s: &'a [u8]) -> Result<Uri<'a>, &'static str> {
        let colon = find_byte(b':', s).ok_or("missing scheme")?;
        let scheme_raw = &s[..colon];
        if scheme_raw.is_empty()
            || !scheme_raw[0].is_ascii_alphabetic()
            || !scheme_raw
                .iter()
                .all(|&b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'-' | b'.'))
        {
            return Err("invalid scheme");
        }
        let rest = &s[colon + 1..];
        let mut uri = Uri::empty(s, Scheme::Other);
        if scheme_raw.eq_ignore_ascii_case(b"sip") {
            uri.scheme = Scheme::Sip;
        } else if scheme_raw.eq_ignore_ascii_case(b"sips") {
            uri.scheme = Scheme::Sips;
        } else if scheme_raw.eq_ignore_ascii_case(b"tel") {
            uri.scheme = Scheme::Tel;
        }
        match uri.scheme {
            Scheme::Sip | Scheme::Sips => uri.parse_sip(rest)?,
            Scheme::Tel => {
                let end = find_byte(b';', rest).unwrap_or(rest.len());
                let number = &rest[..end];
                if number.is_empty()
                    || !number.iter().all(|&b| {
                        b.is_ascii_hexdigit()
                            || matches!(b, b'+' | b'-' | b'.' | b'(' | b')' | b'*' | b'#')
                    })
                {
                    return Err("invalid telephone number");
                }
                uri.user = Some(number);
                uri.params = &rest[end..];
                check_params(uri.params)?;
            }
            Scheme::Other => {
                if rest.is_empty()
                    || !rest
                        .iter()
                        .all(|&b| b.is_ascii_graphic() && !matches!(b, b'<' | b'>' | b'"'))
                {
                    return Err("invalid URI");
                }
            }
        }
        Ok(uri)
    }

    fn parse_sip(&mut self, rest: &'a [u8]) -> Result<(), &'static str> {
        let mut hostpart = rest;
        if let Some(at) = find_byte(b'@', rest) {
            let userinfo = &rest[..at];
            let (user, password) = match find_byte(b':', userinfo) {
                Some(c) => (&userinfo[..c], Some(&userinfo[c + 1..])),
                None => (userinfo, None),
            };
            if user.is_empty() {
                return Err("empty user part");
            }
            check_chars(user, USER)?;
            if let Some(p) = password {
                check_chars(p, PASSWORD)?;
            }
            self.user = Some(user);
            self.password = password;
            hostpart = &rest[at + 1..];
        }
        let (host, mut i) = parse_host(hostpart)?;
        self.host = Some(host);
        if hostpart.get(i) == Some(&b':') {
            let n = hostpart[i + 1..]
                .iter()
                .take_while(|b| b.is_ascii_digit())
                .count();
            let port =
                crate::scan::parse_u32(&hostpart[i + 1..i + 1 + n], 65535).ok_or("invalid port")?;
            self.port = Some(port as u16);
            i += 1 + n;
        }
        let tail = &hostpart[i..];
        let q = find_byte(b'?', tail).unwrap_or(tail.len());
        self.params = &tail[..q];
        if !self.params.is_empty() && self.params[0] != b';' {
            return Err("unexpected character after host");
        }
        for p in self.params.split(|&b| b == b';').skip(1) {
            let (name, value) = match find_byte(b'=', p) {
                Some(e) => (&p[..e], Some(&p[e + 1..])),
                None => (p, None),
            };
            if name.is_empty() {
                return Err("empty URI parameter");
            }
            check_chars(name, PARAM)?;
            if let Some(v) = value {
                if v.is_empty() {
                    return Err("empty URI parameter value");
                }
                check_chars(v, PARAM)?;
            }
        }
        if q < tail.len() {
            self.headers = &tail[q + 1..];
            for h in self.headers.split(|&b| b == b'&') {
                let e = find_byte(b'=', h).ok_or("URI header without '='")?;
                if e == 0 {
                    return Err("empty URI header name");
                }
                check_chars(&h[..e], HEADER)?;
                check_chars(&h[e + 1..], HEADER)?;
            }
        }
        Ok(())
    }

    /// Looks up a URI parameter by name (case-insensitive). `Some(None)` is a
    /// parameter without a value (`;lr`).
    #[must_use]
    pub fn param(&self, name: &[u8]) -> Option<Option<&'a [u8]>> {
        uri_param(self.params, name)
    }

    /// Whether this is a SIP or SIPS URI.
    #[must_use]
    pub fn is_sip(&self) -> bool {
        matches!(self.scheme, Scheme::Sip | Scheme::Sips)
    }
}

/// Looks up `name` in a raw `;a=b;c` parameter list.
pub(crate) fn uri_param<'a>(params: &'a [u8], name: &[u8]) -> Option<Option<&'a [u8]>> {
    params.split(|&b| b == b';').skip(1).find_map(|p| {
        let (n, v) = match find_byte(b'=', p) {
            Some(e) => (&p[..e], Some(&p[e + 1..])),
            None => (p, None),
        };
        n.eq_ignore_ascii_case(name).then_some(v)
    })
}

fn check_params(params: &[u8]) -> Result<(), &'static str> {
    let end = parse_params(params, 0, |_: Param| {})?;
    if end != params.len() {
        return Err("invalid parameter");
    }
    Ok(())
}

/// Replaces `%HH` escapes by their octets; borrows when there are none.
#[must_use]
pub fn unescape(s: &[u8]) -> Cow<'_, [u8]> {
    if find_byte(b'%', s).is_none() {
        return Cow::Borrowed(s);
    }
    let mut out = Vec::with_capacity(s.len());
    let mut i = 0;
    while i < s.len() {
        if s[i] == b'%' && i + 2 < s.len() {
            let hex = |b: u8| (b as char).to_digit(16);
            if let (Some(h), Some(l)) = (hex(s[i + 1]), hex(s[i + 2])) {
                out.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
        }
        out.push(s[i]);
        i += 1;
    }
    Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The byte-at-a-time host scan the table replaced: the reference.
    fn host_extent_reference(s: &[u8]) -> Result<(usize, bool), &'static str> {
        let (mut n, mut numeric, mut prev) = (0, true, b'.');
        while n < s.len() {
            let b = s[n];
            if b == b'.' {
                if prev == b'.' {
                    return Err("invalid host name");
                }
            } else if b.is_ascii_digit() {
            } else if b.is_ascii_alphabetic() || b == b'-' || b == b'_' {
                numeric = false;
            } else {
                break;
            }
            prev = b;
            n += 1;
        }
        Ok((n, numeric))
    }

    fn parse_host_reference(s: &[u8]) -> Result<(Host<'_>, usize), &'static str> {
        if s.first() == Some(&b'[') {
            return parse_host(s);
        }
        let (n, numeric) = host_extent_reference(s)?;
        if n == 0 {
            return Err("missing host");
        }
        let name = &s[..n];
        if numeric {
            return Ok((Host::V4(parse_ipv4(name).ok_or("invalid IPv4 address")?), n));
        }
        if name[0] == b'-' {
            return Err("invalid host name");
        }
        Ok((Host::Name(name), n))
    }

    /// The check the one-table version replaced: the reference.
    fn check_chars_reference(
        s: &[u8],
        extra: &[u8],
        what: &'static str,
    ) -> Result<(), &'static str> {
        let mut i = 0;
        while i < s.len() {
            let b = s[i];
            if b == b'%' {
                if !(s.get(i + 1).is_some_and(u8::is_ascii_hexdigit)
                    && s.get(i + 2).is_some_and(u8::is_ascii_hexdigit))
                {
                    return Err("invalid escape");
                }
                i += 3;
                continue;
            }
            if !(is_unreserved(b) || extra.contains(&b)) {
                return Err(what);
            }
            i += 1;
        }
        Ok(())
    }

    /// Bytes that matter to hosts and URI parts, and some that end them.
    fn uri_bytes() -> impl Strategy<Value = Vec<u8>> {
        prop::collection::vec(
            prop_oneof![
                prop::sample::select(b"0123456789.-_aZ%fF:;@[]?&=+$,/!~*'()<> \t\x00\xff".to_vec()),
                any::<u8>(),
            ],
            0..24,
        )
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 4096, ..ProptestConfig::default() })]
        #[test]
        fn parse_host_agrees_with_the_byte_at_a_time_scan(s in uri_bytes()) {
            prop_assert_eq!(parse_host(&s), parse_host_reference(&s));
        }

        /// Near-addresses: four or five parts of 0-4 digits (some over 255),
        /// and what may follow one.
        #[test]
        fn a_dotted_quad_reads_as_the_scan_reads_it(
            parts in prop::collection::vec(
                prop_oneof![
                    (0u32..300).prop_map(|v| v.to_string()),
                    prop::sample::select(vec!["", "0", "00", "000", "0000", "255", "256", "999", "1000"])
                        .prop_map(str::to_string),
                ],
                3..6),
            tail in prop::sample::select(vec!["", ":5060", ";transport=udp", ">", " ", "a", "-", "_", ".", "..", "5", "\u{ff}", "]"]),
        ) {
            let s = format!("{}{tail}", parts.join("."));
            prop_assert_eq!(parse_host(s.as_bytes()), parse_host_reference(s.as_bytes()));
        }

        /// The `sip:` shortcut gives what the general scheme grammar gives.
        #[test]
        fn the_sip_prefix_agrees_with_the_general_scheme(
            scheme in prop::sample::select(vec![&b"sip:"[..], b"SIP:", b"sIp:", b"sips:", b"sip", b"si:", b"tel:", b"x:", b""]),
            s in uri_bytes(),
        ) {
            let s = [scheme, &s[..]].concat();
            prop_assert_eq!(Uri::parse(&s), Uri::parse_general(&s));
        }

        #[test]
        fn check_chars_agrees_with_the_per_part_sets(s in uri_bytes()) {
            for (part, extra) in [
                (USER, USER_EXTRA),
                (PASSWORD, PASSWORD_EXTRA),
                (PARAM, PARAM_EXTRA),
                (HEADER, HEADER_EXTRA),
            ] {
                prop_assert_eq!(check_chars(&s, part), check_chars_reference(&s, extra, part.what));
            }
        }
    }

    #[test]
    fn sip_uri_parts() {
        let u = Uri::parse(b"sip:alice:pw@[2001:db8::1]:5070;transport=tcp;lr?subject=x").unwrap();
        assert_eq!(u.scheme, Scheme::Sip);
        assert_eq!(u.user, Some(&b"alice"[..]));
        assert_eq!(u.password, Some(&b"pw"[..]));
        assert_eq!(u.host, Some(Host::V6("2001:db8::1".parse().unwrap())));
        assert_eq!(u.port, Some(5070));
        assert_eq!(u.param(b"transport"), Some(Some(&b"tcp"[..])));
        assert_eq!(u.param(b"LR"), Some(None));
        assert_eq!(u.param(b"maddr"), None);
        assert_eq!(u.headers, b"subject=x");
    }

    #[test]
    fn rfc4475_uris() {
        let odd = b"sip:1_unusual.URI~(to-be!sure)&isn't+it$/crazy?,/;;*:&it+has=1,weird!*pas$wo~d_too.(doesn't-it)@example.com";
        let u = Uri::parse(odd).unwrap();
        assert_eq!(
            u.user,
            Some(&b"1_unusual.URI~(to-be!sure)&isn't+it$/crazy?,/;;*"[..])
        );
        assert_eq!(u.host, Some(Host::Name(b"example.com")));
        let u = Uri::parse(b"sip:user;par=u%40example.net@example.com").unwrap();
        assert_eq!(u.user, Some(&b"user;par=u%40example.net"[..]));
        assert_eq!(&*unescape(u.user.unwrap()), b"user;par=u@example.net");
        assert!(Uri::parse(b"sip:null-%00-null@example.com").is_ok());
        assert!(Uri::parse(b"nobodyKnowsThisScheme:totallyopaquecontent").is_ok());
        assert!(Uri::parse(b"soap.beep://192.0.2.103:3002").is_ok());
        assert_eq!(
            Uri::parse(b"tel:+1-201-555-0123;phone-context=x")
                .unwrap()
                .scheme,
            Scheme::Tel
        );
    }

    #[test]
    fn bad_uris() {
        for bad in [
            &b"<sip:user@example.com>"[..],
            b"sip:user@example.com; lr",
            b"sip:@example.com",
            b"sip:user@",
            b"sip:user@host:99999",
            b"sip:user@[::1",
            b"sip:user@[zz::1]",
            b"sip:user@300.1.1.1",
            b"sip:us%zzer@host",
            b"sip:host;;lr",
            b"sip:host?noequals",
            b"example.com",
            b"1sip:host",
            b"tel:",
        ] {
            assert!(Uri::parse(bad).is_err(), "{}", String::from_utf8_lossy(bad));
        }
    }
}

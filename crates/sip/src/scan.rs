//! Byte-level helpers shared by the parsers: character classes, LWS, quoted
//! strings and comma lists. Header values keep their folding (CRLF followed by
//! SP/HT), so every helper here treats CR and LF as whitespace.

/// `token` characters of RFC 3261 §25.1.
const TOKEN: [bool; 256] = {
    let mut t = [false; 256];
    let mut c = 0;
    while c < 256 {
        let b = c as u8;
        t[c] = b.is_ascii_alphanumeric()
            || matches!(
                b,
                b'-' | b'.' | b'!' | b'%' | b'*' | b'_' | b'+' | b'`' | b'\'' | b'~'
            );
        c += 1;
    }
    t
};

/// `word` characters (Call-ID) of RFC 3261 §25.1.
const WORD: [bool; 256] = {
    let mut t = TOKEN;
    let extra = b"()<>:\\\"/[]?{}";
    let mut i = 0;
    while i < extra.len() {
        t[extra[i] as usize] = true;
        i += 1;
    }
    t
};

/// Unquoted parameter value characters: token ([`VALUE_TOKEN`]), plus `:`,
/// `[`, `]` for IPv6 (`received=2001:db8::1`, `maddr=[::1]`:
/// [`VALUE_IPV6`]); 0 ends the value.
const PARAM_VALUE: [u8; 256] = {
    let mut t = [0u8; 256];
    let mut c = 0;
    while c < 256 {
        if TOKEN[c] {
            t[c] = VALUE_TOKEN;
        }
        c += 1;
    }
    t[b':' as usize] = VALUE_IPV6;
    t[b'[' as usize] = VALUE_IPV6;
    t[b']' as usize] = VALUE_IPV6;
    t
};
const VALUE_TOKEN: u8 = 1;
const VALUE_IPV6: u8 = 2;

/// The first `needle` in `hay`. A plain loop for the short parts of a URI
/// or an address (memchr's dispatch and set-up cost more than they save on
/// a few bytes: `bench/callgrind-sip.sh`), memchr beyond 32 bytes.
#[inline]
pub(crate) fn find_byte(needle: u8, hay: &[u8]) -> Option<usize> {
    if hay.len() < 32 {
        hay.iter().position(|&b| b == needle)
    } else {
        memchr::memchr(needle, hay)
    }
}

#[inline]
pub(crate) fn is_token(b: u8) -> bool {
    TOKEN[b as usize]
}

#[inline]
pub(crate) fn is_word(b: u8) -> bool {
    WORD[b as usize]
}

#[inline]
pub(crate) fn is_ws(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\r' | b'\n')
}

/// Index of the first non-whitespace byte at or after `i`.
#[inline]
pub(crate) fn skip_ws(s: &[u8], mut i: usize) -> usize {
    while i < s.len() && is_ws(s[i]) {
        i += 1;
    }
    i
}

/// `s` without leading and trailing whitespace.
#[inline]
pub(crate) fn trim(s: &[u8]) -> &[u8] {
    let start = skip_ws(s, 0);
    let mut end = s.len();
    while end > start && is_ws(s[end - 1]) {
        end -= 1;
    }
    &s[start..end]
}

/// Length of the run of token characters starting at `i`.
#[inline]
pub(crate) fn token_len(s: &[u8], i: usize) -> usize {
    s[i.min(s.len())..]
        .iter()
        .take_while(|&&b| is_token(b))
        .count()
}

/// Index just past the closing quote of the quoted string whose opening quote
/// is at `i`, honouring quoted-pairs; `None` when it is not terminated or
/// holds a bare CR/LF that is not folding.
pub(crate) fn quoted_end(s: &[u8], i: usize) -> Option<usize> {
    debug_assert_eq!(s.get(i), Some(&b'"'));
    let mut j = i + 1;
    while j < s.len() {
        match s[j] {
            b'"' => return Some(j + 1),
            b'\\' => {
                // quoted-pair: any octet but CR and LF
                match s.get(j + 1) {
                    Some(b'\r' | b'\n') | None => return None,
                    Some(_) => j += 2,
                }
            }
            _ => j += 1,
        }
    }
    None
}

/// Splits a header value into its comma-separated elements, ignoring commas
/// inside quoted strings and `<...>`. Yields `(start, end)` of each element,
/// trimmed; an element may be empty. Yields `Err(())` once and stops at an
/// unterminated quote or bracket.
#[derive(Debug)]
pub(crate) struct CommaSplit<'a> {
    s: &'a [u8],
    pos: usize,
    done: bool,
}

impl<'a> CommaSplit<'a> {
    pub(crate) fn new(s: &'a [u8]) -> Self {
        CommaSplit {
            s,
            pos: 0,
            done: false,
        }
    }
}

impl Iterator for CommaSplit<'_> {
    type Item = Result<(usize, usize), ()>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        let s = self.s;
        let start = self.pos;
        let mut i = start;
        let mut in_angle = false;
        // Jump between the bytes that matter (a quote, the brackets, a
        // comma outside them) rather than matching every byte.
        loop {
            let next = if in_angle {
                memchr::memchr2(b'"', b'>', &s[i..])
            } else {
                memchr::memchr3(b'"', b'<', b',', &s[i..])
            };
            let Some(off) = next else {
                i = s.len();
                break;
            };
            i += off;
            match s[i] {
                b'"' => match quoted_end(s, i) {
                    Some(e) => {
                        i = e;
                        continue;
                    }
                    None => {
                        self.done = true;
                        return Some(Err(()));
                    }
                },
                b'<' => in_angle = true,
                b'>' => in_angle = false,
                _ => break, // a comma outside brackets
            }
            i += 1;
        }
        if in_angle {
            self.done = true;
            return Some(Err(()));
        }
        let (mut a, mut b) = (skip_ws(s, start), i);
        while b > a && is_ws(s[b - 1]) {
            b -= 1;
        }
        if a > b {
            a = b;
        }
        if i >= s.len() {
            self.done = true;
        } else {
            self.pos = i + 1;
        }
        Some(Ok((a, b)))
    }
}

/// Parses an unsigned decimal of at most `max`, rejecting empty input,
/// non-digits and overflow. Leading zeros are allowed (RFC 4475 `wsinv`).
pub(crate) fn parse_u32(s: &[u8], max: u32) -> Option<u32> {
    if s.is_empty() {
        return None;
    }
    let mut v: u64 = 0;
    for &b in s {
        if !b.is_ascii_digit() {
            return None;
        }
        v = v * 10 + u64::from(b - b'0');
        if v > u64::from(max) {
            return None;
        }
    }
    u32::try_from(v).ok()
}

/// Parses a generic parameter list `*( SEMI name [ EQUAL value ] )` starting at
/// `i` (which must point at `;` or at the end/terminator). Stops at `,`, `>`,
/// `?` or the end of `s`; LWS is allowed around `;` and `=`. Calls `f(name,
/// value_range)` for each parameter with positions relative to `s`.
///
/// Returns the index where the list ends.
pub(crate) fn parse_params(
    s: &[u8],
    mut i: usize,
    mut f: impl FnMut(Param),
) -> Result<usize, &'static str> {
    loop {
        i = skip_ws(s, i);
        if i >= s.len() || s[i] != b';' {
            return Ok(i);
        }
        let param_start = i;
        i = skip_ws(s, i + 1);
        let n = token_len(s, i);
        if n == 0 {
            return Err("empty or invalid parameter name");
        }
        let name = (i, i + n);
        i += n;
        let j = skip_ws(s, i);
        let mut value = None;
        let mut token = false;
        if j < s.len() && s[j] == b'=' {
            let k = skip_ws(s, j + 1);
            if k < s.len() && s[k] == b'"' {
                let e = quoted_end(s, k).ok_or("unterminated quoted parameter value")?;
                value = Some((k, e));
                i = e;
            } else {
                // One pass: the value's extent, and whether it is all
                // token characters (the classes seen, ORed).
                let (mut m, mut seen) = (k, 0);
                while let Some(&b) = s.get(m) {
                    let class = PARAM_VALUE[b as usize];
                    if class == 0 {
                        break;
                    }
                    seen |= class;
                    m += 1;
                }
                if m == k {
                    return Err("empty parameter value");
                }
                value = Some((k, m));
                token = seen == VALUE_TOKEN;
                i = m;
            }
        }
        f(Param {
            whole: (param_start, i),
            name,
            value,
            token,
        });
    }
}

/// One parameter found by [`parse_params`]; ranges index the parsed slice.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Param {
    /// From the `;` to the end of the value.
    pub(crate) whole: (usize, usize),
    pub(crate) name: (usize, usize),
    pub(crate) value: Option<(usize, usize)>,
    /// Whether the value is unquoted and all token characters (no `:`,
    /// `[`, `]`).
    pub(crate) token: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn comma_split_respects_quotes_and_angles() {
        let s = br#""a,b" <sip:x@y;p=1,2>;q=1 , <sip:z> ,"#;
        let parts: Vec<_> = CommaSplit::new(s)
            .map(|r| {
                let (a, b) = r.unwrap();
                std::str::from_utf8(&s[a..b]).unwrap().to_owned()
            })
            .collect();
        assert_eq!(parts, [r#""a,b" <sip:x@y;p=1,2>;q=1"#, "<sip:z>", ""]);
    }

    /// The byte-at-a-time split the memchr version replaced.
    fn reference_split(s: &[u8]) -> Vec<Result<(usize, usize), ()>> {
        let mut out = Vec::new();
        let mut pos = 0;
        loop {
            let (start, mut i, mut in_angle) = (pos, pos, false);
            while i < s.len() {
                match s[i] {
                    b'"' => match quoted_end(s, i) {
                        Some(e) => {
                            i = e;
                            continue;
                        }
                        None => {
                            out.push(Err(()));
                            return out;
                        }
                    },
                    b'<' => in_angle = true,
                    b'>' => in_angle = false,
                    b',' if !in_angle => break,
                    _ => {}
                }
                i += 1;
            }
            if in_angle {
                out.push(Err(()));
                return out;
            }
            let (mut a, mut b) = (skip_ws(s, start), i);
            while b > a && is_ws(s[b - 1]) {
                b -= 1;
            }
            if a > b {
                a = b;
            }
            out.push(Ok((a, b)));
            if i >= s.len() {
                return out;
            }
            pos = i + 1;
        }
    }

    proptest::proptest! {
        #[test]
        fn comma_split_matches_the_byte_at_a_time_split(
            s in proptest::collection::vec(proptest::sample::select(
                b"ab ,<>\"\\;=\r\n\t".to_vec()), 0..40)
        ) {
            let ours: Vec<_> = CommaSplit::new(&s).collect();
            proptest::prop_assert_eq!(ours, reference_split(&s));
        }
    }

    proptest::proptest! {
        /// Short and long haystacks, the needle anywhere or nowhere.
        #[test]
        fn find_byte_agrees_with_memchr(
            hay in proptest::collection::vec(proptest::sample::select(b"ab@:;?=".to_vec()), 0..80),
            needle in proptest::sample::select(b"@:;?=x".to_vec()),
        ) {
            proptest::prop_assert_eq!(find_byte(needle, &hay), memchr::memchr(needle, &hay));
        }
    }

    #[test]
    fn comma_split_reports_unterminated() {
        assert!(CommaSplit::new(b"\"abc").any(|r| r.is_err()));
        assert!(CommaSplit::new(b"<sip:abc").any(|r| r.is_err()));
    }

    #[test]
    fn numbers() {
        assert_eq!(parse_u32(b"0068", 255), Some(68));
        assert_eq!(parse_u32(b"256", 255), None);
        assert_eq!(parse_u32(b"36893488147419103232", u32::MAX), None);
        assert_eq!(parse_u32(b"-1", 10), None);
        assert_eq!(parse_u32(b"", 10), None);
    }

    #[test]
    fn params_with_lws() {
        let s = b" ;   tag    = 1918181833n ; lr;x=\"q;\"";
        let mut names = Vec::new();
        let end = parse_params(s, 0, |p| names.push((p.name, p.value))).unwrap();
        assert_eq!(end, s.len());
        assert_eq!(names.len(), 3);
        let (n, v) = names[0];
        assert_eq!(&s[n.0..n.1], b"tag");
        let v = v.unwrap();
        assert_eq!(&s[v.0..v.1], b"1918181833n");
        assert!(parse_params(b";;", 0, |_| {}).is_err());
        assert!(parse_params(b";a=", 0, |_| {}).is_err());
    }
}

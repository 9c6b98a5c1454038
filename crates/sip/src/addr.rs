//! Address headers: From, To, Contact, Route, Record-Route (RFC 3261 §20.10,
//! §25.1 `name-addr` / `addr-spec`).

use crate::scan::{find_byte, is_token, is_ws, parse_params, quoted_end, skip_ws};
use crate::uri::{Uri, uri_param};

/// One address value: `[display-name] <uri> *(;param)` or `uri *(;param)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NameAddr<'a> {
    /// The whole value as written.
    pub raw: &'a [u8],
    /// The display name as written (quotes included), if any.
    pub display: Option<&'a [u8]>,
    /// The URI.
    pub uri: Uri<'a>,
    /// Header parameters after the address, from the first `;` (may hold LWS).
    pub params: &'a [u8],
    /// The first `tag` parameter, found while the parameters were checked:
    /// `Some(None)` when it has no value.
    tag: Option<Option<&'a [u8]>>,
}

impl<'a> NameAddr<'a> {
    /// Parses one address value (one element of a list, trimmed).
    ///
    /// # Errors
    /// A reason naming what breaks the grammar.
    pub fn parse(s: &'a [u8]) -> Result<NameAddr<'a>, &'static str> {
        let mut i = skip_ws(s, 0);
        let mut display = None;
        let uri;
        if s.get(i) == Some(&b'"') {
            let e = quoted_end(s, i).ok_or("unterminated quoted display name")?;
            display = Some(&s[i..e]);
            i = skip_ws(s, e);
            if s.get(i) != Some(&b'<') {
                return Err("display name not followed by <URI>");
            }
        }
        let lt = if s.get(i) == Some(&b'<') {
            Some(i)
        } else {
            // Either `tokens <uri>` or a bare addr-spec.
            // A '<' after a ';' or a quote belongs to a parameter, not to us.
            memchr::memchr3(b'<', b';', b'"', &s[i..])
                .map(|p| p + i)
                .filter(|&p| s[p] == b'<')
        };
        if let Some(lt) = lt {
            if display.is_none() && lt > i {
                let dn = trim_end(&s[i..lt]);
                if !dn.iter().all(|&b| is_token(b) || is_ws(b)) {
                    return Err("display name with characters that need quoting");
                }
                display = Some(dn);
            }
            let gt = find_byte(b'>', &s[lt..]).ok_or("missing '>'")? + lt;
            uri = Uri::parse(&s[lt + 1..gt]).map_err(|_| "invalid URI in <>")?;
            i = gt + 1;
        } else {
            // addr-spec: the URI ends at the first ';' (what follows are header
            // parameters), and may not carry '?' headers (RFC 3261 §20).
            let rest = &s[i..];
            let end = rest
                .iter()
                .position(|&b| b == b';' || is_ws(b) || b == b',')
                .unwrap_or(rest.len());
            let spec = &rest[..end];
            if find_byte(b'?', spec).is_some() {
                return Err("URI with headers must be enclosed in <>");
            }
            uri = Uri::parse(spec).map_err(|_| "invalid URI")?;
            i += end;
        }
        let pstart = skip_ws(s, i);
        let mut tag = None;
        let end = parse_params(s, i, |p| {
            if tag.is_none() && s[p.name.0..p.name.1].eq_ignore_ascii_case(b"tag") {
                tag = Some(p.value.map(|(a, b)| &s[a..b]));
            }
        })?;
        if end != s.len() {
            return Err("unexpected character after address");
        }
        Ok(NameAddr {
            raw: s,
            display,
            uri,
            params: &s[pstart.min(end)..end],
            tag,
        })
    }

    /// A header parameter by name, e.g. `tag` (LWS around `=` is allowed).
    #[must_use]
    pub fn param(&self, name: &[u8]) -> Option<Option<&'a [u8]>> {
        let s = self.params;
        let mut found = None;
        let _ = parse_params(s, 0, |p| {
            if found.is_none() && s[p.name.0..p.name.1].eq_ignore_ascii_case(name) {
                found = Some(p.value.map(|(a, b)| &s[a..b]));
            }
        });
        found
    }

    /// The `tag` parameter.
    #[must_use]
    pub fn tag(&self) -> Option<&'a [u8]> {
        self.tag.flatten()
    }

    /// Whether the URI carries `;lr` (a loose router, RFC 3261 §16.12).
    #[must_use]
    pub fn is_loose_route(&self) -> bool {
        uri_param(self.uri.params, b"lr").is_some()
    }
}

fn trim_end(s: &[u8]) -> &[u8] {
    let mut e = s.len();
    while e > 0 && is_ws(s[e - 1]) {
        e -= 1;
    }
    &s[..e]
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig { cases: 2048, ..ProptestConfig::default() })]
        /// The tag found while parsing is the one a lookup finds afterwards.
        #[test]
        fn the_tag_found_while_parsing_is_the_looked_up_one(
            display in prop::sample::select(vec!["", "Bob ", "\"A b\" "]),
            uri in prop::sample::select(vec!["sip:a@h", "sip:h:5060;lr", "tel:+1"]),
            angle in any::<bool>(),
            params in prop::collection::vec(
                (prop::sample::select(vec!["tag", "TAG", "Tag", "x", "tagx", "ta"]),
                 prop::option::of(prop::sample::select(vec!["1", "abc", "\"q\""])),
                 prop::sample::select(vec!["", " ", "\r\n "])),
                0..4),
        ) {
            let mut v = if angle || !display.is_empty() {
                format!("{display}<{uri}>")
            } else {
                uri.to_string()
            };
            for (name, value, ws) in &params {
                v.push_str(&format!("{ws};{ws}{name}"));
                if let Some(x) = value {
                    v.push_str(&format!("{ws}={ws}{x}"));
                }
            }
            if let Ok(a) = NameAddr::parse(v.as_bytes()) {
                prop_assert_eq!(a.tag(), a.param(b"tag").flatten(), "{}", v);
            }
        }
    }

    #[test]
    fn forms() {
        let a = NameAddr::parse(
            b"\"J Rosenberg \\\\\\\"\"       <sip:jdrosen@example.com>\r\n  ;\r\n  tag = 98asjd8",
        )
        .unwrap();
        assert_eq!(a.tag(), Some(&b"98asjd8"[..]));
        assert_eq!(a.uri.host.unwrap().to_string(), "example.com");
        let a = NameAddr::parse(b"caller<sip:caller@example.com>;tag=323").unwrap();
        assert_eq!(a.display, Some(&b"caller"[..]));
        let a = NameAddr::parse(b"sip:+19725552222@gw1.example.net;unknownparam").unwrap();
        assert_eq!(a.uri.params, b"");
        assert_eq!(a.param(b"unknownparam"), Some(None));
        let a = NameAddr::parse(b"isbn:2983792873").unwrap();
        assert_eq!(a.uri.scheme, crate::uri::Scheme::Other);
        let a =
            NameAddr::parse(b"<sip:services.example.com;lr;unknownwith=value;unknown-no-value>")
                .unwrap();
        assert!(a.is_loose_route());
    }

    #[test]
    fn refusals() {
        for bad in [
            &b"\"Mr. J. User <sip:j.user@example.com>"[..],
            b"\"Watson, Thomas\" < sip:t.watson@example.org >",
            b"Watson, Thomas <sip:t.watson@example.org>",
            b"sip:user@example.com?Route=%3Csip:sip.example.com%3E",
            b"\"Joe\" <sip:joe@example.org>;;;;",
            b"<sip:joe@example.org",
            b"<sip:joe@example.org> junk",
            b"",
        ] {
            assert!(
                NameAddr::parse(bad).is_err(),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }
}

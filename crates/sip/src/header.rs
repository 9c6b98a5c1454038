//! Header names: the ones a proxy reads, recognised case-insensitively in
//! their long and compact forms (RFC 3261 §7.3.3 and the IANA registry).

/// A header the SIP layer knows by name; everything else is [`HeaderName::Other`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum HeaderName {
    /// `Via` / `v`
    Via,
    /// `Call-ID` / `i`
    CallId,
    /// `From` / `f`
    From,
    /// `To` / `t`
    To,
    /// `CSeq`
    CSeq,
    /// `Contact` / `m`
    Contact,
    /// `Content-Length` / `l`
    ContentLength,
    /// `Content-Type` / `c`
    ContentType,
    /// `Max-Forwards`
    MaxForwards,
    /// `Route`
    Route,
    /// `Record-Route`
    RecordRoute,
    /// `Require`
    Require,
    /// `Proxy-Require`
    ProxyRequire,
    /// `Supported` / `k`
    Supported,
    /// `Subject` / `s`
    Subject,
    /// `Content-Encoding` / `e`
    ContentEncoding,
    /// `Event` / `o` (RFC 6665)
    Event,
    /// `Refer-To` / `r` (RFC 3515)
    ReferTo,
    /// `Allow-Events` / `u` (RFC 6665)
    AllowEvents,
    /// `Accept-Contact` / `a` (RFC 3841)
    AcceptContact,
    /// `Referred-By` / `b` (RFC 3892)
    ReferredBy,
    /// `Request-Disposition` / `d` (RFC 3841)
    RequestDisposition,
    /// `Reject-Contact` / `j` (RFC 3841)
    RejectContact,
    /// `Identity-Info` / `n` (RFC 4474)
    IdentityInfo,
    /// `Session-Expires` / `x` (RFC 4028)
    SessionExpires,
    /// `Identity` / `y` (RFC 8224)
    Identity,
    /// `Expires`
    Expires,
    /// `Retry-After`
    RetryAfter,
    /// `Authorization`
    Authorization,
    /// `Proxy-Authorization`
    ProxyAuthorization,
    /// `Path` (RFC 3327)
    Path,
    /// Any other header.
    Other,
}

/// A header name literal as its two words (see [`words`]) and its kind.
struct Lit(u64, u64, HeaderName);

/// 0x20 in every byte: OR-ed in, it lower-cases letters and leaves `-`.
const LOWER: u64 = 0x2020_2020_2020_2020;

/// A name of 2 to 16 bytes as two little-endian words that overlap when
/// they must: its first and last 8 bytes (9-16), 4 bytes (4-8) or 2 bytes
/// (2-3), zero-extended. Two names of one length are equal exactly when
/// their words are.
#[inline(always)]
fn words(name: &[u8]) -> (u64, u64) {
    let len = name.len();
    if len >= 8 {
        let w = |i: usize| u64::from_le_bytes(name[i..i + 8].try_into().expect("8 bytes"));
        (w(0), w(len - 8))
    } else if len >= 4 {
        let w = |i: usize| {
            u64::from(u32::from_le_bytes(
                name[i..i + 4].try_into().expect("4 bytes"),
            ))
        };
        (w(0), w(len - 4))
    } else {
        let w = |i: usize| {
            u64::from(u16::from_le_bytes(
                name[i..i + 2].try_into().expect("2 bytes"),
            ))
        };
        (w(0), w(len - 2))
    }
}

/// [`Lit`] of a lower-case literal, at compile time: [`words`] of it.
const fn lit(l: &[u8], k: HeaderName) -> Lit {
    let n = if l.len() >= 8 {
        8
    } else if l.len() >= 4 {
        4
    } else {
        2
    };
    // OR-ed with LOWER like the name's: the zero bytes above a short word too.
    Lit(load(l, 0, n) | LOWER, load(l, l.len() - n, n) | LOWER, k)
}

/// `n` bytes of `l` at `i` as a little-endian word.
const fn load(l: &[u8], i: usize, n: usize) -> u64 {
    let mut v = 0u64;
    let mut j = 0;
    while j < n {
        v |= (l[i + j] as u64) << (8 * j);
        j += 1;
    }
    v
}

impl HeaderName {
    /// Classifies a header name as written (any case, long or compact form).
    #[must_use]
    pub fn classify(name: &[u8]) -> HeaderName {
        use HeaderName::*;
        if name.is_empty() {
            return Other;
        }
        if name.len() == 1 {
            return match name[0].to_ascii_lowercase() {
                b'v' => Via,
                b'i' => CallId,
                b'f' => From,
                b't' => To,
                b'm' => Contact,
                b'l' => ContentLength,
                b'c' => ContentType,
                b'k' => Supported,
                b's' => Subject,
                b'e' => ContentEncoding,
                b'o' => Event,
                b'r' => ReferTo,
                b'u' => AllowEvents,
                b'a' => AcceptContact,
                b'b' => ReferredBy,
                b'd' => RequestDisposition,
                b'j' => RejectContact,
                b'n' => IdentityInfo,
                b'x' => SessionExpires,
                b'y' => Identity,
                _ => Other,
            };
        }
        // Dispatch on the length, then compare the name as (at most) two
        // overlapping words with each lower-case literal of that length
        // (`const` blocks: the literals' words are computed at compile time).
        let candidates: &[Lit] = match name.len() {
            2 => const { &[lit(b"to", To)] },
            3 => const { &[lit(b"via", Via)] },
            4 => const { &[lit(b"from", From), lit(b"cseq", CSeq), lit(b"path", Path)] },
            5 => const { &[lit(b"route", Route), lit(b"event", Event)] },
            7 => {
                const {
                    &[
                        lit(b"call-id", CallId),
                        lit(b"contact", Contact),
                        lit(b"require", Require),
                        lit(b"subject", Subject),
                        lit(b"expires", Expires),
                    ]
                }
            }
            8 => const { &[lit(b"refer-to", ReferTo), lit(b"identity", Identity)] },
            9 => const { &[lit(b"supported", Supported)] },
            11 => {
                const {
                    &[
                        lit(b"referred-by", ReferredBy),
                        lit(b"retry-after", RetryAfter),
                    ]
                }
            }
            12 => {
                const {
                    &[
                        lit(b"max-forwards", MaxForwards),
                        lit(b"content-type", ContentType),
                        lit(b"record-route", RecordRoute),
                        lit(b"allow-events", AllowEvents),
                    ]
                }
            }
            13 => {
                const {
                    &[
                        lit(b"proxy-require", ProxyRequire),
                        lit(b"identity-info", IdentityInfo),
                        lit(b"authorization", Authorization),
                    ]
                }
            }
            14 => {
                const {
                    &[
                        lit(b"content-length", ContentLength),
                        lit(b"accept-contact", AcceptContact),
                        lit(b"reject-contact", RejectContact),
                    ]
                }
            }
            15 => const { &[lit(b"session-expires", SessionExpires)] },
            16 => const { &[lit(b"content-encoding", ContentEncoding)] },
            19 => {
                // Longer than two words: byte by byte (rare headers).
                return [
                    (&b"request-disposition"[..], RequestDisposition),
                    (b"proxy-authorization", ProxyAuthorization),
                ]
                .iter()
                .find(|(l, _)| l.iter().zip(name).all(|(l, b)| b | 0x20 == *l))
                .map_or(Other, |&(_, k)| k);
            }
            _ => return Other,
        };
        // The literals are letters and '-', so OR-ing 0x20 into every byte
        // of the name compares token characters exactly, without case.
        let w = words(name);
        let w = (w.0 | LOWER, w.1 | LOWER);
        candidates
            .iter()
            .find(|l| (l.0, l.1) == w)
            .map_or(Other, |l| l.2)
    }

    /// The canonical (long) name.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        use HeaderName::*;
        match self {
            Via => "Via",
            CallId => "Call-ID",
            From => "From",
            To => "To",
            CSeq => "CSeq",
            Contact => "Contact",
            ContentLength => "Content-Length",
            ContentType => "Content-Type",
            MaxForwards => "Max-Forwards",
            Route => "Route",
            RecordRoute => "Record-Route",
            Require => "Require",
            ProxyRequire => "Proxy-Require",
            Supported => "Supported",
            Subject => "Subject",
            ContentEncoding => "Content-Encoding",
            Event => "Event",
            ReferTo => "Refer-To",
            AllowEvents => "Allow-Events",
            AcceptContact => "Accept-Contact",
            ReferredBy => "Referred-By",
            RequestDisposition => "Request-Disposition",
            RejectContact => "Reject-Contact",
            IdentityInfo => "Identity-Info",
            SessionExpires => "Session-Expires",
            Identity => "Identity",
            Expires => "Expires",
            RetryAfter => "Retry-After",
            Authorization => "Authorization",
            ProxyAuthorization => "Proxy-Authorization",
            Path => "Path",
            Other => "extension header",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::HeaderName::{self, *};
    use proptest::prelude::*;

    /// Every name of two bytes or more, lower-case.
    const ALL: &[(&[u8], HeaderName)] = &[
        (b"to", To),
        (b"via", Via),
        (b"from", From),
        (b"cseq", CSeq),
        (b"path", Path),
        (b"route", Route),
        (b"event", Event),
        (b"call-id", CallId),
        (b"contact", Contact),
        (b"require", Require),
        (b"subject", Subject),
        (b"expires", Expires),
        (b"refer-to", ReferTo),
        (b"identity", Identity),
        (b"supported", Supported),
        (b"referred-by", ReferredBy),
        (b"retry-after", RetryAfter),
        (b"max-forwards", MaxForwards),
        (b"content-type", ContentType),
        (b"record-route", RecordRoute),
        (b"allow-events", AllowEvents),
        (b"proxy-require", ProxyRequire),
        (b"identity-info", IdentityInfo),
        (b"authorization", Authorization),
        (b"content-length", ContentLength),
        (b"accept-contact", AcceptContact),
        (b"reject-contact", RejectContact),
        (b"session-expires", SessionExpires),
        (b"content-encoding", ContentEncoding),
        (b"request-disposition", RequestDisposition),
        (b"proxy-authorization", ProxyAuthorization),
    ];

    /// The byte-by-byte comparison the word one replaced: the reference.
    fn classify_reference(name: &[u8]) -> HeaderName {
        if name.len() == 1 {
            return HeaderName::classify(name);
        }
        ALL.iter()
            .find(|(l, _)| l.len() == name.len() && l.iter().zip(name).all(|(l, b)| b | 0x20 == *l))
            .map_or(Other, |&(_, k)| k)
    }

    /// Token names near the known ones: each known name, cased at random,
    /// with at most one byte changed to another token byte, or cut short.
    fn near_names() -> impl Strategy<Value = Vec<u8>> {
        let known: Vec<&'static [u8]> = ALL.iter().map(|(n, _)| *n).collect();
        (
            prop::sample::select(known),
            any::<u64>(),
            any::<prop::sample::Index>(),
            prop::sample::select(b"aZ-.!%*_+`'~09\r\x0d\x00MmEe".to_vec()),
            0u8..4,
        )
            .prop_map(|(name, case, at, byte, how)| {
                let mut v: Vec<u8> = name
                    .iter()
                    .enumerate()
                    .map(|(i, b)| {
                        if case >> (i % 64) & 1 == 1 {
                            b.to_ascii_uppercase()
                        } else {
                            *b
                        }
                    })
                    .collect();
                match how {
                    0 => {}
                    1 => v[at.index(name.len())] = byte,
                    2 => v.truncate(at.index(name.len()).max(1)),
                    _ => v.insert(at.index(name.len() + 1), byte),
                }
                v
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 8192, ..ProptestConfig::default() })]
        #[test]
        fn classify_agrees_with_the_byte_comparison(name in near_names()) {
            prop_assert_eq!(HeaderName::classify(&name), classify_reference(&name));
        }

        #[test]
        fn classify_agrees_on_any_bytes(name in prop::collection::vec(any::<u8>(), 0..24)) {
            prop_assert_eq!(HeaderName::classify(&name), classify_reference(&name));
        }
    }

    #[test]
    fn long_and_compact_forms() {
        for (n, k) in [
            (&b"via"[..], Via),
            (b"V", Via),
            (b"CALL-id", CallId),
            (b"i", CallId),
            (b"l", ContentLength),
            (b"content-LENGTH", ContentLength),
            (b"MaX-fOrWaRdS", MaxForwards),
            (b"record-route", RecordRoute),
            (b"m", Contact),
            (b"x", SessionExpires),
            (b"Authorization", Authorization),
            (b"PROXY-authorization", ProxyAuthorization),
            (b"Path", Path),
            (b"q", Other),
            (b"NewFangledHeader", Other),
            (b"Vias", Other),
        ] {
            assert_eq!(HeaderName::classify(n), k, "{}", String::from_utf8_lossy(n));
        }
    }
}

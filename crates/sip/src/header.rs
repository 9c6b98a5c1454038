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
    /// Any other header.
    Other,
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
        // Dispatch on length and first letter: one comparison, two at most.
        let candidates: &[HeaderName] = match (name.len(), name[0].to_ascii_lowercase()) {
            (2, b't') => &[To],
            (3, b'v') => &[Via],
            (4, b'c') => &[CSeq],
            (4, b'f') => &[From],
            (5, b'e') => &[Event],
            (5, b'r') => &[Route],
            (7, b'c') => &[CallId, Contact],
            (7, b'e') => &[Expires],
            (7, b'r') => &[Require],
            (7, b's') => &[Subject],
            (8, b'i') => &[Identity],
            (8, b'r') => &[ReferTo],
            (9, b's') => &[Supported],
            (11, b'r') => &[ReferredBy, RetryAfter],
            (12, b'a') => &[AllowEvents],
            (12, b'c') => &[ContentType],
            (12, b'm') => &[MaxForwards],
            (12, b'r') => &[RecordRoute],
            (13, b'i') => &[IdentityInfo],
            (13, b'p') => &[ProxyRequire],
            (14, b'a') => &[AcceptContact],
            (14, b'c') => &[ContentLength],
            (14, b'r') => &[RejectContact],
            (15, b's') => &[SessionExpires],
            (16, b'c') => &[ContentEncoding],
            (19, b'r') => &[RequestDisposition],
            _ => &[],
        };
        candidates
            .iter()
            .find(|k| {
                // Known names are letters and '-', so OR-ing 0x20 into both
                // sides is an exact case-insensitive comparison for tokens.
                let c = k.as_str().as_bytes();
                c.len() == name.len() && c.iter().zip(name).all(|(a, b)| a | 0x20 == b | 0x20)
            })
            .copied()
            .unwrap_or(Other)
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
            Other => "extension header",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::HeaderName::{self, *};

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
            (b"q", Other),
            (b"NewFangledHeader", Other),
            (b"Vias", Other),
        ] {
            assert_eq!(HeaderName::classify(n), k, "{}", String::from_utf8_lossy(n));
        }
    }
}

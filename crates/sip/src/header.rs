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
        // Dispatch on the length, then compare with lower-case literals.
        let candidates: &[(&[u8], HeaderName)] = match name.len() {
            2 => &[(b"to", To)],
            3 => &[(b"via", Via)],
            4 => &[(b"from", From), (b"cseq", CSeq), (b"path", Path)],
            5 => &[(b"route", Route), (b"event", Event)],
            7 => &[
                (b"call-id", CallId),
                (b"contact", Contact),
                (b"require", Require),
                (b"subject", Subject),
                (b"expires", Expires),
            ],
            8 => &[(b"refer-to", ReferTo), (b"identity", Identity)],
            9 => &[(b"supported", Supported)],
            11 => &[(b"referred-by", ReferredBy), (b"retry-after", RetryAfter)],
            12 => &[
                (b"max-forwards", MaxForwards),
                (b"content-type", ContentType),
                (b"record-route", RecordRoute),
                (b"allow-events", AllowEvents),
            ],
            13 => &[
                (b"proxy-require", ProxyRequire),
                (b"identity-info", IdentityInfo),
                (b"authorization", Authorization),
            ],
            14 => &[
                (b"content-length", ContentLength),
                (b"accept-contact", AcceptContact),
                (b"reject-contact", RejectContact),
            ],
            15 => &[(b"session-expires", SessionExpires)],
            16 => &[(b"content-encoding", ContentEncoding)],
            19 => &[
                (b"request-disposition", RequestDisposition),
                (b"proxy-authorization", ProxyAuthorization),
            ],
            _ => return Other,
        };
        // The literals are letters and '-', so OR-ing 0x20 into the name
        // compares token characters exactly, without case.
        candidates
            .iter()
            .find(|(lit, _)| lit.iter().zip(name).all(|(l, b)| b | 0x20 == *l))
            .map_or(Other, |&(_, k)| k)
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

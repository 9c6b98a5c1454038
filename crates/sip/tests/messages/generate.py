#!/usr/bin/env python3
"""Writes siplb's own conformance messages (the cases RFC 4475 misses) and
verdicts.tsv. Run it from this folder; the .sip files it writes are committed."""

SDP = "v=0\r\no=alice 2890844526 2890844526 IN IP4 192.0.2.1\r\ns=-\r\nc=IN IP4 192.0.2.1\r\nt=0 0\r\nm=audio 49170 RTP/AVP 0\r\n"

def msg(start, headers, body="", cl=True):
    h = list(headers)
    if cl:
        h.append(f"Content-Length: {len(body.encode('latin-1'))}")
    return (start + "\r\n" + "".join(x + "\r\n" for x in h) + "\r\n" + body).encode("latin-1")

BASE = [
    "Via: SIP/2.0/UDP 192.0.2.1:5060;branch=z9hG4bK74bf9",
    "Max-Forwards: 70",
    "From: Alice <sip:alice@example.com>;tag=9fxced76sl",
    "To: Bob <sip:bob@example.com>",
    "Call-ID: 3848276298220188511@example.com",
    "CSeq: 1 INVITE",
    "Contact: <sip:alice@192.0.2.1:5060>",
    "Content-Type: application/sdp",
]
INV = "INVITE sip:bob@example.com SIP/2.0"

def replace(headers, prefix, new):
    out = []
    for x in headers:
        if x.lower().startswith(prefix.lower()):
            if new is not None:
                out.append(new)
        else:
            out.append(x)
    return out

cases = []  # (name, verdict, expect, description, bytes)
def add(name, verdict, expect, desc, data):
    cases.append((name, verdict, expect, desc, data))

add("compact_all", "ok", "OK INVITE", "every compact form of RFC 3261 and later RFCs", msg(INV, [
    "v: SIP/2.0/UDP 192.0.2.1:5060;branch=z9hG4bK74bf9", "Max-Forwards: 70",
    "f: Alice <sip:alice@example.com>;tag=9fxced76sl", "t: <sip:bob@example.com>",
    "i: compact.1@example.com", "CSeq: 1 INVITE", "m: <sip:alice@192.0.2.1>", "c: application/sdp",
    "s: compact forms", "k: 100rel", "e: identity", "o: presence", "u: dialog", "r: <sip:carol@example.com>",
    "a: *;audio", "b: <sip:referrer@example.com>", "d: proxy", "j: *;video", "x: 1800", "y: sig", "n: <https://example.com/cert>"],
    SDP, cl=False) .replace(b"\r\n\r\nv=0", b"\r\nl: %d\r\n\r\nv=0" % len(SDP)))
add("compact_upper", "ok", "OK INVITE", "compact forms in upper case", msg(INV, [
    "V: SIP/2.0/UDP 192.0.2.1;branch=z9hG4bK1", "F: <sip:alice@example.com>;tag=1", "T: <sip:bob@example.com>",
    "I: upper@example.com", "CSEQ: 1 INVITE", "MAX-FORWARDS: 70", "C: application/sdp"], SDP))
add("ipv6_everywhere", "ok", "OK INVITE", "IPv6 references in R-URI, Via, received, From, To, Contact, Route, Record-Route", msg(
    "INVITE sip:bob@[2001:db8::2]:5070;transport=udp SIP/2.0", [
    "Via: SIP/2.0/UDP [2001:db8::1]:5060;branch=z9hG4bKv6;rport=5060;received=2001:db8::1",
    "Route: <sip:[2001:db8::9];lr>, <sip:[::1]:5080;lr>",
    "Record-Route: <sip:[2001:db8::8]:5062;lr>",
    "Max-Forwards: 70", "From: <sip:alice@[2001:db8::1]>;tag=v6", "To: <sip:bob@[2001:db8::2]:5070>",
    "Call-ID: v6@[2001:db8::1]", "CSeq: 7 INVITE", "Contact: <sip:alice@[2001:db8::1]:5060;transport=tcp>"]))
add("ipv6_loopback_tcp", "ok", "OK OPTIONS", "IPv6 loopback sent-by without a port", msg("OPTIONS sip:[::1] SIP/2.0", [
    "Via: SIP/2.0/TCP [::1];branch=z9hG4bKlo", "From: <sip:a@[::1]>;tag=1", "To: <sip:[::1]>",
    "Call-ID: lo6", "CSeq: 1 OPTIONS", "Max-Forwards: 70"]))
add("ipv6_bad_via", "error", "invalid Via", "a Via sent-by that is not an IPv6 address", msg(INV,
    replace(BASE, "Via:", "Via: SIP/2.0/UDP [2001:db8::zz]:5060;branch=z9hG4bK1"), SDP))
add("ipv6_unterminated_ruri", "error", "invalid Request-URI", "an IPv6 reference without ']'", msg(
    "INVITE sip:bob@[2001:db8::1 SIP/2.0", replace(BASE, "CSeq", "CSeq: 1 INVITE"), SDP))
add("via_list_folded", "ok", "OK INVITE", "a Via list across folded lines, SP and HT", msg(INV,
    replace(BASE, "Via:", "Via: SIP/2.0/UDP a.example.com;branch=z9hG4bK1,\r\n SIP/2.0/TCP b.example.com:5061;branch=z9hG4bK2 ,\r\n\tSIP/2.0/UDP [2001:db8::3];branch=z9hG4bK3"), SDP))
add("via_lists_mixed", "ok", "OK INVITE", "Via lines and v: lines mixed, lists on several lines", msg(INV,
    replace(BASE, "Via:", "Via: SIP/2.0/UDP p1.example.com;branch=z9hG4bKa, SIP/2.0/UDP p2.example.com;branch=z9hG4bKb\r\nv: SIP/2.0/TCP p3.example.com;branch=z9hG4bKc\r\nVia: SIP/2.0/UDP 192.0.2.1;branch=z9hG4bKd;rport;maddr=224.2.0.1;ttl=16"), SDP))
add("via_empty_element", "error", "empty value in list", "an empty element in a Via list", msg(INV,
    replace(BASE, "Via:", "Via: SIP/2.0/UDP a.example.com;branch=z9hG4bK1,,SIP/2.0/UDP b.example.com;branch=z9hG4bK2"), SDP))
add("via_missing_sent_by", "error", "invalid Via", "a Via without sent-by", msg(INV,
    replace(BASE, "Via:", "Via: SIP/2.0/UDP ;branch=z9hG4bK1"), SDP))
for h, name in [("Via:", "Via"), ("From:", "From"), ("To:", "To"), ("Call-ID:", "Call-ID"), ("CSeq:", "CSeq")]:
    add("missing_" + name.lower().replace("-", ""), "error", f"missing {name} header", f"no {name} header", msg(INV, replace(BASE, h, None), SDP))
add("missing_max_forwards", "ok", "OK INVITE", "no Max-Forwards (RFC 2543 elements omit it; a proxy adds 70)", msg(INV, replace(BASE, "Max-Forwards", None), SDP))
add("cseq_too_large", "error", "invalid CSeq", "CSeq number 2^32", msg(INV, replace(BASE, "CSeq", "CSeq: 4294967296 INVITE"), SDP))
add("cseq_max", "ok", "OK INVITE", "CSeq number 2^32-1, the largest allowed", msg(INV, replace(BASE, "CSeq", "CSeq: 4294967295 INVITE"), SDP))
add("cseq_negative", "error", "invalid CSeq", "negative CSeq number", msg(INV, replace(BASE, "CSeq", "CSeq: -1 INVITE"), SDP))
add("cseq_no_method", "error", "invalid CSeq", "CSeq without a method", msg(INV, replace(BASE, "CSeq", "CSeq: 12"), SDP))
add("max_forwards_256", "error", "invalid Max-Forwards", "Max-Forwards above 255", msg(INV, replace(BASE, "Max-Forwards", "Max-Forwards: 256"), SDP))
add("max_forwards_255", "ok", "OK INVITE", "Max-Forwards 255", msg(INV, replace(BASE, "Max-Forwards", "Max-Forwards: 255"), SDP))
add("content_length_overflow", "error", "invalid Content-Length", "Content-Length beyond 2^32-1", msg(INV, BASE + ["Content-Length: 99999999999"], SDP, cl=False))
add("status_099", "error", "status code out of range", "status code below 100", msg("SIP/2.0 099 Too Small", replace(BASE, "Max-Forwards", None)))
add("status_700", "error", "status code out of range", "status code above 699", msg("SIP/2.0 700 Too Big", replace(BASE, "Max-Forwards", None)))
add("status_four_digits", "error", "three digits", "a four-digit status code", msg("SIP/2.0 1000 Way Too Big", replace(BASE, "Max-Forwards", None)))
add("via_port_65536", "error", "invalid sent-by port", "Via port above 65535", msg(INV, replace(BASE, "Via:", "Via: SIP/2.0/UDP 192.0.2.1:65536;branch=z9hG4bK1"), SDP))
add("ruri_port_70000", "error", "invalid Request-URI: invalid port", "Request-URI port above 65535", msg("INVITE sip:bob@example.com:70000 SIP/2.0", BASE, SDP))
add("rport_out_of_range", "error", "invalid rport", "rport above 65535", msg(INV, replace(BASE, "Via:", "Via: SIP/2.0/UDP 192.0.2.1;branch=z9hG4bK1;rport=70000"), SDP))
add("response_compact_rr", "ok", "OK 180", "a 180 with compact headers and a Record-Route list", msg("SIP/2.0 180 Ringing", [
    "v: SIP/2.0/UDP 192.0.2.9;branch=z9hG4bKlb, SIP/2.0/UDP 192.0.2.1:5060;branch=z9hG4bK74bf9;received=192.0.2.1;rport=5060",
    "Record-Route: <sip:192.0.2.9;lr;sb=s1.abcd>, <sip:p.example.com;lr>", "f: <sip:alice@example.com>;tag=1",
    "t: <sip:bob@example.com>;tag=2", "i: r180", "CSeq: 1 INVITE", "m: <sip:bob@192.0.2.4>"]))
add("status_empty_reason_no_space", "ok", "OK 200", "a status line with no reason and no SP after the code", msg("SIP/2.0 200", replace(BASE, "Max-Forwards", None)))
add("multipart_binary", "ok", "OK MESSAGE", "a multipart body holding CRLFs, NULs and bytes above 0x7f", msg(
    "MESSAGE sip:bob@example.com SIP/2.0", replace(replace(BASE, "CSeq", "CSeq: 2 MESSAGE"), "Content-Type", 'Content-Type: multipart/mixed;boundary="b1"'),
    "--b1\r\nContent-Type: text/plain\r\n\r\nhello\r\n--b1\r\nContent-Type: application/octet-stream\r\n\r\n\x00\x01\r\n\r\n\xff\xfe\x00\r\n--b1--\r\n"))
add("long_header", "ok", "OK INVITE", "a 6000-byte extension header value", msg(INV, BASE + ["X-Long: " + "abcdefghij" * 600], SDP))
add("unknown_method_tel", "ok", "OK FROBNICATE", "an extension method to a tel: URI", msg(
    "FROBNICATE tel:+1-201-555-0123;phone-context=example.com SIP/2.0", replace(BASE, "CSeq", "CSeq: 5 FROBNICATE")))
add("tel_from_to", "ok", "OK INVITE", "tel: URIs in From and To", msg(INV, replace(replace(BASE, "From", "From: <tel:+15551234567>;tag=t1"), "To:", "To: tel:+15557654321"), SDP))
add("sips_tls", "ok", "OK INVITE", "a SIPS Request-URI over TLS", msg("INVITE sips:bob@example.com SIP/2.0",
    replace(BASE, "Via:", "Via: SIP/2.0/TLS client.example.com:5061;branch=z9hG4bKtls"), SDP))
add("uri_escapes", "ok", "OK INVITE", "escapes in the user part and parameters", msg("INVITE sip:%61lice%20smith@example.com;x=%41%42 SIP/2.0", BASE, SDP))
add("uri_bad_escape", "error", "invalid Request-URI: invalid escape", "a % not followed by two hex digits", msg("INVITE sip:al%4ice@example.com SIP/2.0", BASE, SDP))
add("contact_list_quoted_comma", "ok", "OK REGISTER", "a Contact list whose display name holds a comma", msg("REGISTER sip:example.com SIP/2.0",
    replace(replace(BASE, "CSeq", "CSeq: 3 REGISTER"), "Contact", 'Contact: "Doe, John" <sip:j@192.0.2.5>;expires=60, <sip:k@192.0.2.6>;q=0.5')))
add("route_list_folded", "ok", "OK INVITE", "a Route list folded over two lines", msg(INV, BASE + ["Route: <sip:p1.example.com;lr>,\r\n <sip:p2.example.com;lr>"], SDP))
add("contact_star", "ok", "OK REGISTER", "REGISTER removing every binding with Contact: *", msg("REGISTER sip:example.com SIP/2.0",
    replace(replace(BASE, "CSeq", "CSeq: 4 REGISTER"), "Contact", "Contact: *") + ["Expires: 0"]))
add("header_without_colon", "error", "missing ':'", "a header line without a colon", msg(INV, BASE + ["X-Broken header line"], SDP))
add("fold_before_first_header", "error", "continuation line before any header", "a folded line right after the start line", msg(INV, [" folded"] + BASE, SDP))
add("bare_lf", "ok", "OK OPTIONS", "LF instead of CRLF line ends (accepted, as most stacks do)",
    msg("OPTIONS sip:bob@example.com SIP/2.0", replace(BASE, "CSeq", "CSeq: 1 OPTIONS")).replace(b"\r\n", b"\n"))
add("no_empty_line", "error", "not terminated", "no empty line after the headers",
    msg("OPTIONS sip:bob@example.com SIP/2.0", replace(BASE, "CSeq", "CSeq: 1 OPTIONS"), cl=False)[:-2])
add("version_3", "error", "unsupported SIP version", "SIP/3.0 (505)", msg("OPTIONS sip:bob@example.com SIP/3.0", replace(BASE, "CSeq", "CSeq: 1 OPTIONS")))
add("lowercase_method", "ok", "OK invite", "methods are case-sensitive: 'invite' is an extension method", msg(
    "invite sip:bob@example.com SIP/2.0", replace(BASE, "CSeq", "CSeq: 1 invite"), SDP))
add("ack_cseq_invite", "error", "does not match", "an ACK whose CSeq says INVITE", msg("ACK sip:bob@example.com SIP/2.0", BASE))
add("duplicate_call_id_compact", "error", "duplicate Call-ID", "Call-ID twice, long and compact form", msg(INV, BASE + ["i: other@example.com"], SDP))
add("udp_trailing_octets", "ok", "OK OPTIONS", "octets after Content-Length in a datagram are ignored",
    msg("OPTIONS sip:bob@example.com SIP/2.0", replace(BASE, "CSeq", "CSeq: 1 OPTIONS")) + b"garbage that is not part of it")
add("header_name_space", "error", "invalid header name", "a space inside a header name", msg(INV, BASE + ["Bad Header: x"], SDP))
add("from_missing_gt", "error", "invalid From", "From without '>'", msg(INV, replace(BASE, "From", "From: <sip:alice@example.com;tag=1"), SDP))
add("call_id_space", "error", "invalid Call-ID", "a space inside the Call-ID", msg(INV, replace(BASE, "Call-ID", "Call-ID: abc def"), SDP))
add("empty_datagram", "error", "empty message", "only CRLFs (a keep-alive)", b"\r\n\r\n")

with open("verdicts.tsv", "w") as f:
    f.write("name\tverdict\texpect\tdescription\n")
    for name, verdict, expect, desc, data in cases:
        with open(name + ".sip", "wb") as m:
            m.write(data)
        f.write(f"{name}\t{verdict}\t{expect}\t{desc}\n")
print(len(cases), "messages")

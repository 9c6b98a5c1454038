//! Property tests: parse → edit → parse sees the edit and every other header
//! unchanged, byte for byte; no input makes the parser or framer panic.

use proptest::prelude::*;
use sip::{Edits, Frame, HeaderName, MaxForwards, Message, Received, framing};

#[derive(Debug, Clone)]
struct Spec {
    method: &'static str,
    vias: Vec<(String, u16, Option<bool>)>,
    via_lines: Vec<usize>,
    routes: Vec<String>,
    max_forwards: Option<u8>,
    extra: Vec<(String, String)>,
    compact: bool,
    fold: bool,
    body: Vec<u8>,
}

fn host() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-z]{1,8}(\\.[a-z]{1,8}){0,2}",
        (1u8..=254, 0u8..=255, 0u8..=255, 1u8..=254)
            .prop_map(|(a, b, c, d)| format!("{a}.{b}.{c}.{d}")),
        any::<[u16; 8]>().prop_map(|s| format!("[{}]", std::net::Ipv6Addr::from(s))),
    ]
}

fn spec() -> impl Strategy<Value = Spec> {
    (
        prop::sample::select(vec![
            "INVITE", "OPTIONS", "REGISTER", "BYE", "MESSAGE", "X-CUSTOM",
        ]),
        prop::collection::vec(
            (host(), any::<u16>(), prop::option::of(any::<bool>())),
            1..5,
        ),
        prop::collection::vec(1usize..3, 1..5),
        prop::collection::vec(host(), 0..4),
        prop::option::of(1u8..=255),
        prop::collection::vec(("X-[A-Za-z]{1,10}", "[ -~]{0,40}"), 0..5),
        any::<bool>(),
        any::<bool>(),
        prop::collection::vec(any::<u8>(), 0..200),
    )
        .prop_map(
            |(method, vias, via_lines, routes, max_forwards, extra, compact, fold, body)| Spec {
                method,
                vias,
                via_lines,
                routes,
                max_forwards,
                extra: extra
                    .into_iter()
                    .map(|(n, v)| (n, v.trim().to_owned()))
                    .collect(),
                compact,
                fold,
                body,
            },
        )
}

fn render(s: &Spec) -> Vec<u8> {
    let mut m = format!("{} sip:bob@example.com SIP/2.0\r\n", s.method);
    let sep = if s.fold { ",\r\n  " } else { ", " };
    // Spread the Via values over header lines of 1-2 values each.
    let mut i = 0;
    let mut k = 0;
    while i < s.vias.len() {
        let n = s.via_lines[k % s.via_lines.len()].min(s.vias.len() - i);
        let values: Vec<String> = s.vias[i..i + n]
            .iter()
            .enumerate()
            .map(|(j, (h, port, rport))| {
                let rp = match rport {
                    None => "",
                    Some(false) => ";rport",
                    Some(true) => ";rport=5060",
                };
                format!("SIP/2.0/UDP {h}:{port}{rp};branch=z9hG4bK{}x{j}", i)
            })
            .collect();
        let name = if s.compact && k % 2 == 0 { "v" } else { "Via" };
        m += &format!("{name}: {}\r\n", values.join(sep));
        i += n;
        k += 1;
    }
    if !s.routes.is_empty() {
        let r: Vec<String> = s.routes.iter().map(|h| format!("<sip:{h};lr>")).collect();
        m += &format!("Route: {}\r\n", r.join(sep));
    }
    if let Some(mf) = s.max_forwards {
        m += &format!("Max-Forwards: {mf}\r\n");
    }
    let (f, t, i, l) = if s.compact {
        ("f", "t", "i", "l")
    } else {
        ("From", "To", "Call-ID", "Content-Length")
    };
    m += &format!(
        "{f}: <sip:alice@example.com>;tag=a1\r\n{t}: <sip:bob@example.com>\r\n{i}: rt-1@example.com\r\nCSeq: 1 {}\r\n",
        s.method
    );
    for (n, v) in &s.extra {
        m += &format!("{n}: {v}\r\n");
    }
    m += &format!("{l}: {}\r\n\r\n", s.body.len());
    let mut bytes = m.into_bytes();
    bytes.extend_from_slice(&s.body);
    bytes
}

/// Header lines other than those `edits` may touch, as (name, value) bytes.
fn untouched(m: &Message<'_>) -> Vec<(Vec<u8>, Vec<u8>)> {
    m.headers()
        .filter(|h| {
            !matches!(
                h.name,
                HeaderName::Via
                    | HeaderName::Route
                    | HeaderName::RecordRoute
                    | HeaderName::MaxForwards
                    | HeaderName::Path
            )
        })
        .map(|h| (h.raw_name.to_vec(), h.value.to_vec()))
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn parse_edit_parse(
        s in spec(),
        prepend in any::<bool>(),
        remove_via in any::<bool>(),
        rr in any::<bool>(),
        remove_route in any::<bool>(),
        pops in 0u8..4,
        path in any::<bool>(),
        mf in 0u8..3,
        received in any::<bool>(),
    ) {
        let bytes = render(&s);
        let m = Message::parse(&bytes).unwrap();
        m.validate().unwrap();
        let vias: Vec<Vec<u8>> = m.values(HeaderName::Via).map(<[u8]>::to_vec).collect();
        prop_assert_eq!(vias.len(), s.vias.len());
        let routes: Vec<Vec<u8>> = m.values(HeaderName::Route).map(<[u8]>::to_vec).collect();
        let remove_via = remove_via && !received && vias.len() > 1;
        let edits = Edits {
            prepend_via: prepend.then_some(&b"SIP/2.0/TCP 127.0.0.1:5060;branch=z9hG4bKours"[..]),
            remove_top_via: remove_via,
            record_route: rr.then_some(&b"<sip:127.0.0.1:5060;lr;sb=s1.mac>"[..]),
            remove_top_route: remove_route,
            remove_routes: pops,
            path: path.then_some(&b"<sip:127.0.0.1:5060;lr;ob;flow=u7f0000011f90.0123>"[..]),
            max_forwards: [MaxForwards::Keep, MaxForwards::Decrement, MaxForwards::Set(9)][mf as usize],
            received: received.then_some(Received { received: b"192.0.2.200", rport: 4242 }),
            add_content_length: true,
        };
        let mut out = Vec::new();
        m.write_edited(&edits, &mut out);
        let e = Message::parse(&out).unwrap();
        e.validate().unwrap();

        let mut want_vias = vias.clone();
        if remove_via { want_vias.remove(0); }
        let got_vias: Vec<Vec<u8>> = e.values(HeaderName::Via).map(<[u8]>::to_vec).collect();
        let skip = usize::from(prepend);
        if prepend {
            prop_assert_eq!(&got_vias[0][..], &b"SIP/2.0/TCP 127.0.0.1:5060;branch=z9hG4bKours"[..]);
        }
        if received {
            let v = e.vias().nth(skip).unwrap().unwrap();
            prop_assert_eq!(v.received, Some(&b"192.0.2.200"[..]));
            if s.vias[0].2.is_some() {
                prop_assert_eq!(v.rport, Some(Some(4242)));
            }
            prop_assert_eq!(&got_vias[skip + 1..], &want_vias[1..]);
        } else {
            prop_assert_eq!(&got_vias[skip..], &want_vias[..]);
        }
        let got_routes: Vec<Vec<u8>> = e.values(HeaderName::Route).map(<[u8]>::to_vec).collect();
        let pop = usize::from(pops.max(u8::from(remove_route))).min(routes.len());
        let want_routes = routes[pop..].to_vec();
        prop_assert_eq!(got_routes, want_routes);
        if path {
            let top = e.values(HeaderName::Path).next().unwrap();
            prop_assert_eq!(top, &b"<sip:127.0.0.1:5060;lr;ob;flow=u7f0000011f90.0123>"[..]);
        }
        if rr {
            let top = e.record_routes().next().unwrap().unwrap();
            prop_assert_eq!(top.uri.param(b"sb"), Some(Some(&b"s1.mac"[..])));
        }
        let want_mf = match edits.max_forwards {
            MaxForwards::Keep => s.max_forwards,
            MaxForwards::Decrement => Some(s.max_forwards.map_or(70, |n| n - 1)),
            MaxForwards::Set(n) => Some(n),
        };
        prop_assert_eq!(e.max_forwards(), want_mf);
        prop_assert_eq!(untouched(&e), untouched(&m));
        prop_assert_eq!(e.body(), m.body());
        prop_assert_eq!(e.call_id(), m.call_id());
    }

    #[test]
    fn stream_framing_agrees_with_parse(s in spec(), cut in any::<prop::sample::Index>()) {
        let bytes = render(&s);
        prop_assert_eq!(framing::check(&bytes, 65536), Ok(Frame::Message(bytes.len())));
        let n = cut.index(bytes.len());
        prop_assert_eq!(framing::check(&bytes[..n], 65536), Ok(Frame::Incomplete));
        let m = Message::parse_as(&bytes, sip::Transport::Stream).unwrap();
        prop_assert_eq!(m.as_bytes().len(), bytes.len());
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..600)) {
        if let Ok(m) = Message::parse(&bytes) {
            let _ = m.validate();
            let mut out = Vec::new();
            m.write_edited(&Edits { remove_top_route: true, max_forwards: MaxForwards::Decrement, ..Edits::default() }, &mut out);
        }
        let _ = framing::check(&bytes, 1024);
    }

    #[test]
    fn mutated_messages_never_panic(s in spec(), pos in any::<prop::sample::Index>(), byte in any::<u8>(), cut in any::<prop::sample::Index>()) {
        let mut bytes = render(&s);
        let p = pos.index(bytes.len());
        bytes[p] = byte;
        bytes.truncate(cut.index(bytes.len()) + 1);
        if let Ok(m) = Message::parse(&bytes) {
            let _ = m.validate();
            let _ = m.from();
            let _ = m.to();
            let _ = m.vias().count();
            let _ = m.routes().count();
            let _ = m.contacts().count();
            let mut out = Vec::new();
            m.write_edited(&Edits {
                prepend_via: Some(b"SIP/2.0/UDP 127.0.0.1;branch=z9hG4bKx"),
                remove_top_route: true,
                received: Some(Received { received: b"127.0.0.1", rport: 1 }),
                max_forwards: MaxForwards::Decrement,
                add_content_length: true,
                ..Edits::default()
            }, &mut out);
        }
        let _ = framing::check(&bytes, 65536);
    }
}

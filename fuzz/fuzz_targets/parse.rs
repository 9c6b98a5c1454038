//! Any datagram: parsing and validation never panic, and a message that
//! parses survives the forwarding edits and parses again with the edits seen
//! and its Call-ID, CSeq and body unchanged; parsing with our own Vias
//! known gives what parsing without them gives.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sip::{Edits, MaxForwards, Message, OwnVias, Received, Transport};

static OWN: std::sync::LazyLock<OwnVias> = std::sync::LazyLock::new(|| {
    OwnVias::new(["SIP/2.0/UDP 127.0.0.1:5060;branch=", "SIP/2.0/TCP lb.example.com;branch="])
        .expect("own Vias")
});

fuzz_target!(|data: &[u8]| {
    let parsed = Message::parse(data);
    match (&parsed, &Message::parse_known(data, Transport::Datagram, &OWN)) {
        (Ok(a), Ok(b)) => assert_eq!(a.top_via(), b.top_via()),
        (Err(a), Err(b)) => assert_eq!(a.to_string(), b.to_string()),
        (a, b) => panic!("parse {:?} but parse_known {:?}", a.is_ok(), b.is_ok()),
    }
    let Ok(m) = parsed else {
        return;
    };
    let valid = m.validate().is_ok();
    let _ = (m.from(), m.to());
    let _ = m.vias().count() + m.routes().count() + m.record_routes().count() + m.contacts().count();
    let mut out = Vec::new();
    m.write_edited(
        &Edits {
            prepend_via: Some(b"SIP/2.0/UDP 127.0.0.1:5060;branch=z9hG4bKfuzz"),
            record_route: Some(b"<sip:127.0.0.1:5060;lr;sb=s1.mac>"),
            remove_top_route: true,
            max_forwards: MaxForwards::Decrement,
            received: Some(Received { received: b"127.0.0.2", rport: 5060 }),
            add_content_length: true,
            ..Edits::default()
        },
        &mut out,
    );
    let e = Message::parse(&out).expect("an edited message parses");
    if valid {
        e.validate().expect("an edited valid message stays valid");
    }
    assert_eq!(e.call_id(), m.call_id());
    assert_eq!(e.cseq(), m.cseq());
    assert_eq!(e.body(), m.body());
    assert_eq!(e.top_via().branch, Some(&b"z9hG4bKfuzz"[..]));
    assert_eq!(e.max_forwards(), Some(m.max_forwards().map_or(70, |n| n.saturating_sub(1))));
});

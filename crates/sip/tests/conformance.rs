//! Every RFC 4475 torture message against the RFC's verdict, and siplb's own
//! messages (tests/messages) against theirs.

use std::path::Path;

fn dir(name: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests")
        .join(name)
}

fn verdict(bytes: &[u8]) -> Result<sip::Message<'_>, sip::Error> {
    let m = sip::Message::parse(bytes)?;
    m.validate()?;
    Ok(m)
}

/// What `siplb check` must say for an RFC 4475 message: `Some(true)` accept,
/// `Some(false)` reject, `None` either (the RFC allows repair or fallback).
fn expected(class: &str, expectation: &str) -> Option<bool> {
    match class {
        "valid" | "valid-backcompat" | "semantic-wellformed" => Some(true),
        _ if expectation == "drop" => Some(false),
        _ if expectation.starts_with("reject:") && !expectation.contains("-or-") => Some(false),
        _ => None,
    }
}

#[test]
fn rfc4475_all_49_agree_with_the_rfc() {
    let root = dir("rfc4475");
    let tsv = std::fs::read_to_string(root.join("verdicts.tsv")).unwrap();
    let mut seen = 0;
    let mut failures = Vec::new();
    for line in tsv.lines().skip(1) {
        let cols: Vec<&str> = line.split('\t').collect();
        let (name, file, class, expectation) = (cols[0], cols[1], cols[4], cols[6]);
        let bytes = std::fs::read(root.join(file)).unwrap();
        let got = verdict(&bytes);
        seen += 1;
        match (expected(class, expectation), &got) {
            (Some(true), Err(e)) => {
                failures.push(format!("{name}: rejected ({e}) but the RFC says {class}"))
            }
            (Some(false), Ok(_)) => {
                failures.push(format!("{name}: accepted but the RFC says {expectation}"))
            }
            _ => {}
        }
        if let Err(e) = &got {
            assert!(!e.to_string().is_empty());
        }
    }
    assert_eq!(seen, 49, "verdicts.tsv should list all 49 messages");
    assert!(failures.is_empty(), "{failures:#?}");
}

#[test]
fn rfc4475_specific_answers() {
    let root = dir("rfc4475");
    let read = |f: &str| std::fs::read(root.join(f)).unwrap();
    // badvers: 505, not 400.
    assert_eq!(
        verdict(&read("invalid/badvers.sip")).unwrap_err().status(),
        505
    );
    // zeromf is well formed and carries Max-Forwards 0 (the balancer answers 483).
    assert_eq!(
        verdict(&read("invalid/zeromf.sip")).unwrap().max_forwards(),
        Some(0)
    );
    // dblreq: the REGISTER only, the INVITE octets after it are not part of it.
    let dbl = read("valid/dblreq.sip");
    let m = verdict(&dbl).unwrap();
    assert_eq!(m.method(), sip::Method::Register);
    assert!(!m.as_bytes().windows(6).any(|w| w == b"INVITE"));
    // inv2543: no Content-Length, the body is the rest of the datagram.
    let inv = read("valid/inv2543.sip");
    let m = verdict(&inv).unwrap();
    assert_eq!(m.content_length(), None);
    assert!(m.body().starts_with(b"v=0"));
    // mpart01: binary body framed by Content-Length.
    let mp = read("valid/mpart01.sip");
    let m = verdict(&mp).unwrap();
    assert_eq!(m.body().len(), m.content_length().unwrap() as usize);
    assert!(m.body().contains(&0));
    // wsinv: folded and spaced values read right.
    let ws = read("valid/wsinv.sip");
    let m = verdict(&ws).unwrap();
    assert_eq!(m.max_forwards(), Some(68));
    assert_eq!(m.cseq().seq, 9);
    assert_eq!(m.to().unwrap().tag(), Some(&b"1918181833n"[..]));
    assert_eq!(m.from().unwrap().tag(), Some(&b"98asjd8"[..]));
    let vias: Vec<_> = m.vias().map(Result::unwrap).collect();
    assert_eq!(vias.len(), 3);
    assert_eq!(vias[1].transport, b"TCP");
    assert_eq!(vias[2].branch, Some(&b"z9hG4bK30239"[..]));
    // transports: every Via, including an unknown transport.
    let tr = read("valid/transports.sip");
    let m = verdict(&tr).unwrap();
    let t: Vec<_> = m.vias().map(|v| v.unwrap().transport.to_vec()).collect();
    assert_eq!(t, [&b"UDP"[..], b"SCTP", b"TLS", b"UNKNOWN", b"TCP"]);
}

#[test]
fn own_messages_agree_with_their_verdicts() {
    let root = dir("messages");
    let tsv = std::fs::read_to_string(root.join("verdicts.tsv")).unwrap();
    let mut n = 0;
    let mut failures = Vec::new();
    for line in tsv.lines().skip(1) {
        let cols: Vec<&str> = line.split('\t').collect();
        let (name, want, expect) = (cols[0], cols[1], cols[2]);
        let bytes = std::fs::read(root.join(format!("{name}.sip"))).unwrap();
        n += 1;
        let said = match verdict(&bytes) {
            Ok(m) => {
                let what = match m.start_line() {
                    sip::StartLine::Request { method, .. } => method.to_string(),
                    sip::StartLine::Response { code, .. } => code.to_string(),
                };
                format!("OK {what}")
            }
            Err(e) => format!("ERROR {e}"),
        };
        let ok = match want {
            "ok" => said.starts_with("OK") && said.contains(expect),
            _ => said.starts_with("ERROR") && said.contains(expect),
        };
        if !ok {
            failures.push(format!("{name}: wanted {want} '{expect}', got '{said}'"));
        }
    }
    assert!(n >= 30, "at least 30 own messages, found {n}");
    assert!(failures.is_empty(), "{failures:#?}");
}

/// The shortcuts the router takes give what parsing every value again
/// gives, on every torture message and every own message that parses:
/// `tags()` (before and after `validate`, which finds them on its way) and
/// `vias_below_top()`.
#[test]
fn cached_tags_and_the_vias_below_the_top_agree_with_a_full_parse() {
    let mut n = 0;
    for d in ["rfc4475/valid", "rfc4475/invalid", "messages"] {
        for e in std::fs::read_dir(dir(d)).unwrap() {
            let path = e.unwrap().path();
            if path.extension().is_none_or(|x| x != "sip" && x != "dat") {
                continue;
            }
            let bytes = std::fs::read(&path).unwrap();
            let Ok(m) = sip::Message::parse(&bytes) else {
                continue;
            };
            let full = (
                m.from().ok().and_then(|a| a.tag()),
                m.to().ok().and_then(|a| a.tag()),
            );
            let below: Vec<_> = m.vias().skip(1).map(|v| v.map(|v| v.raw)).collect();
            let fast: Vec<_> = m.vias_below_top().map(|v| v.map(|v| v.raw)).collect();
            assert_eq!(format!("{below:?}"), format!("{fast:?}"), "{path:?}");
            let fresh = m.clone();
            assert_eq!(fresh.tags(), full, "{path:?} without validate");
            if m.validate().is_ok() {
                assert_eq!(m.tags(), full, "{path:?} after validate");
                n += 1;
            }
        }
    }
    assert!(n >= 40, "{n} messages checked");
}

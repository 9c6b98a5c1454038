//! Parses (or frames) the benchmark's INVITE N times: a fixed workload for
//! `bench/callgrind-sip.sh`, which counts instructions per message with
//! valgrind (a figure that does not drift with machine load).
//!
//! `cargo run --release -p sip --example parse_loop -- N [parse|validate|forward|frame]`

use sip::{Edits, MaxForwards, Message, Received};

/// The benchmark's INVITE (crates/sip/benches/invite.sip).
const INVITE: &[u8] = include_bytes!("../benches/invite.sip");

fn main() {
    let mut args = std::env::args().skip(1);
    let n: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(1);
    let mode = args.next().unwrap_or_else(|| "parse".into());
    let mut out = Vec::with_capacity(2048);
    let mut acc = 0usize;
    for _ in 0..n {
        let b = std::hint::black_box(INVITE);
        acc += match mode.as_str() {
            "frame" => match sip::framing::check(b, sip::DEFAULT_MAX_SIZE) {
                Ok(sip::Frame::Message(x)) => x,
                _ => 0,
            },
            "forward" => {
                out.clear();
                let m = Message::parse(b).expect("valid");
                m.write_edited(
                    &Edits {
                        prepend_via: Some(
                            b"SIP/2.0/UDP 127.0.0.1:5060;branch=z9hG4bK.s1.0000000000000001",
                        ),
                        record_route: Some(b"<sip:127.0.0.1:5060;lr;sb=s1.0123456789abcdef>"),
                        max_forwards: MaxForwards::Decrement,
                        received: Some(Received {
                            received: b"192.0.2.10",
                            rport: 5060,
                        }),
                        ..Edits::default()
                    },
                    &mut out,
                );
                out.len()
            }
            "validate" => {
                let m = Message::parse(b).expect("valid");
                m.validate().expect("valid");
                m.cseq().seq as usize
            }
            _ => Message::parse(b).expect("valid").cseq().seq as usize,
        };
    }
    println!("{acc}");
}

//! `cargo bench -p sip`: parse a typical 600-byte INVITE, and parse + write
//! the forwarded request. Targets on a 2-core machine: parse ≤ 500 ns,
//! parse + forward ≤ 1 µs, zero heap allocations on the parse path (the
//! allocation columns come from divan's `AllocProfiler`).

use divan::{AllocProfiler, Bencher, black_box};
use sip::{Edits, MaxForwards, Message, Received};

#[global_allocator]
static ALLOC: AllocProfiler = AllocProfiler::system();

/// A typical INVITE as a softphone sends it: 600 bytes with SDP.
pub const INVITE: &[u8] = include_bytes!("invite.sip");

fn main() {
    assert!(INVITE.len() > 550 && INVITE.len() < 650, "{}", INVITE.len());
    divan::main();
}

#[divan::bench]
fn parse() -> usize {
    let m = Message::parse(black_box(INVITE)).expect("valid");
    m.cseq().seq as usize
}

#[divan::bench]
fn parse_and_validate() -> usize {
    let m = Message::parse(black_box(INVITE)).expect("valid");
    m.validate().expect("valid");
    m.cseq().seq as usize
}

#[divan::bench]
fn parse_and_forward(b: Bencher) {
    // The output buffer is reused, as the balancer's buffer pool does.
    let mut out = Vec::with_capacity(2048);
    b.bench_local(|| {
        out.clear();
        let m = Message::parse(black_box(INVITE)).expect("valid");
        m.write_edited(
            &Edits {
                prepend_via: Some(b"SIP/2.0/UDP 127.0.0.1:5060;branch=z9hG4bK.s1.0000000000000001"),
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
    });
}

#[divan::bench]
fn stream_frame_check() -> usize {
    match sip::framing::check(black_box(INVITE), sip::DEFAULT_MAX_SIZE) {
        Ok(sip::Frame::Message(n)) => n,
        _ => 0,
    }
}

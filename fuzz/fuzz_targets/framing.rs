//! Any byte stream: the framer never panics, and every frame it reports is a
//! prefix of the input within the size limit that a stream parse accepts or
//! refuses without panicking.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sip::{Frame, Message, Transport, framing};

fuzz_target!(|data: &[u8]| {
    let mut rest = data;
    for _ in 0..64 {
        match framing::check(rest, 4096) {
            Ok(Frame::Message(n)) => {
                assert!(n > 0 && n <= rest.len() && n <= 4096);
                if let Ok(m) = Message::parse_as(&rest[..n], Transport::Stream) {
                    let _ = m.validate();
                }
                rest = &rest[n..];
            }
            Ok(Frame::KeepAlive(n)) => {
                assert!(n > 0 && n <= rest.len());
                rest = &rest[n..];
            }
            Ok(Frame::Incomplete) => {
                assert!(rest.len() <= 4096);
                return;
            }
            Err(_) => return,
        }
    }
});

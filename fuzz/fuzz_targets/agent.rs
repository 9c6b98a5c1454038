//! Any bytes on the agent protocol (v2): the handshake (as the agent's end)
//! and the sealed-message layer never panic, and no line that a sealer did
//! not make opens.
#![no_main]

use libfuzzer_sys::fuzz_target;
use perf::protocol::{Key, LineReader, Session, accept_handshake, transcript};

fuzz_target!(|data: &[u8]| {
    let key = Key::new(b"fuzz-key-0123456789abcdef").unwrap();
    // The message layer: every line of the input, in order.
    let t = transcript(
        "agent",
        "0123456789abcdef0123456789abcdef",
        "fedcba9876543210fedcba9876543210",
    );
    let (_, mut opener) = Session::for_fuzzing(&key, "agent", &t, true).split();
    for line in data.split(|&b| b == b'\n').take(64) {
        assert!(opener.open(line).is_err(), "a line nobody sealed opened");
    }
    // The handshake, as the agent accepting a connection.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut r = LineReader::new(data, 4096);
        let mut w = tokio::io::sink();
        let _ = tokio::time::timeout(
            std::time::Duration::from_millis(50),
            accept_handshake(&mut r, &mut w, &key, "agent"),
        )
        .await;
    });
});

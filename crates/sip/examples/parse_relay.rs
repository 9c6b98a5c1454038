//! The floor relay (`../shared/bench/floor/relay.c`, one `recvfrom`/`sendto`
//! per datagram) in Rust, with our SIP layer optionally run on every
//! datagram: what parsing and checking every message costs on the real CPU,
//! in the same harness as the relay and siplb (`bench/floor-parse.sh`).
//! Datagrams from the client's port go to the server, everything else to the
//! client, unchanged; a datagram that does not parse (or, with `validate`, a
//! request that does not validate) is dropped and counted.
//!
//! `cargo run --release -p sip --example parse_relay -- LISTEN_PORT SERVER_PORT CLIENT_PORT none|parse|validate`
//! (all on 127.0.0.1; it runs until killed, and prints the count of dropped
//! datagrams on stderr at the first drop and at every 10,000th after it).

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};

use sip::Message;

#[derive(Clone, Copy, PartialEq)]
enum Mode {
    /// Relay only: the Rust twin of relay.c.
    None,
    /// `Message::parse` of every datagram.
    Parse,
    /// `Message::parse`, and `Message::validate` of every request (what
    /// siplb checks of each message before routing it).
    Validate,
}

fn port(arg: Option<String>, what: &str) -> u16 {
    arg.and_then(|a| a.parse().ok()).unwrap_or_else(|| {
        eprintln!("parse_relay: {what}: expected a port number");
        eprintln!("usage: parse_relay LISTEN_PORT SERVER_PORT CLIENT_PORT none|parse|validate");
        std::process::exit(2)
    })
}

fn main() {
    let mut args = std::env::args().skip(1);
    let listen = port(args.next(), "LISTEN_PORT");
    let server = port(args.next(), "SERVER_PORT");
    let client = port(args.next(), "CLIENT_PORT");
    let mode = match args.next().as_deref() {
        Some("none") => Mode::None,
        Some("parse") => Mode::Parse,
        Some("validate") => Mode::Validate,
        other => {
            eprintln!("parse_relay: MODE: expected none, parse or validate, not {other:?}");
            std::process::exit(2)
        }
    };
    let lo = Ipv4Addr::LOCALHOST;
    let socket = UdpSocket::bind((lo, listen)).unwrap_or_else(|e| {
        eprintln!("parse_relay: bind 127.0.0.1:{listen}: {e}");
        std::process::exit(1)
    });
    let to_server = SocketAddr::from((lo, server));
    let to_client = SocketAddr::from((lo, client));
    let mut buf = vec![0u8; 65_536];
    let mut dropped = 0u64;
    loop {
        let Ok((n, from)) = socket.recv_from(&mut buf) else {
            continue;
        };
        let data = &buf[..n];
        let ok = match mode {
            Mode::None => true,
            Mode::Parse => std::hint::black_box(Message::parse(data)).is_ok(),
            Mode::Validate => {
                Message::parse(data).is_ok_and(|m| !m.is_request() || m.validate().is_ok())
            }
        };
        if !ok {
            dropped += 1;
            if dropped % 10_000 == 1 {
                eprintln!("parse_relay: {dropped} datagrams dropped (not SIP, or invalid)");
            }
            continue;
        }
        let to = if from.port() == client {
            to_server
        } else {
            to_client
        };
        // A send that fails loses the datagram, as relay.c does.
        let _ = socket.send_to(data, to);
    }
}

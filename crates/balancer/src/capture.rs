//! Call capture (`[capture]`): every SIP message in and out, as HEPv3 (the
//! Homer Encapsulation Protocol, <https://github.com/sipcapture/HEP>) to a
//! collector such as heplify-server.
//!
//! The shell ([`crate::forwarding`]) calls [`Capture::record`] where bytes
//! are read or written: a copy of the message into a bounded queue
//! (`try_send`: a full queue drops the copy and counts it), never a wait.
//! A thread of its own encodes each message ([`encode`]) and sends it from
//! a UDP socket of its own; a collector that is down costs failed sends,
//! counted, never a stalled SIP path. With capture off the shell holds no
//! [`Capture`] and each hook is one `if let Some` on a `None`.
//!
//! The HEPv3 packet (all integers big-endian): `"HEP3"`, the total length
//! (u16), then chunks of `vendor` (u16, 0 = generic), `type` (u16) and
//! `length` (u16, its 6 header bytes included) before the value:
//!
//! | type   | value                                   |
//! |--------|-----------------------------------------|
//! | 0x0001 | IP family, u8: 2 (IPv4), 10 (IPv6)      |
//! | 0x0002 | IP protocol, u8: 17 (UDP), 6 (TCP)      |
//! | 0x0003 / 0x0004 | IPv4 source / destination, 4 bytes |
//! | 0x0005 / 0x0006 | IPv6 source / destination, 16 bytes |
//! | 0x0007 / 0x0008 | source / destination port, u16 |
//! | 0x0009 / 0x000a | time: seconds, microseconds, u32 each |
//! | 0x000b | protocol type, u8: 1 (SIP)              |
//! | 0x000c | capture agent id, u32                   |
//! | 0x000e | auth key (the collector's password)     |
//! | 0x000f | the captured message, as it was on the wire |
//! | 0x0011 | correlation id: the Call-ID             |
//!
//! TLS and WebSocket connections are captured as TCP (protocol 6) with the
//! SIP message in plaintext, as it was before encryption or framing.

use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use siphasher::sip::SipHasher13;

use crate::config::CaptureConfig;

/// The transport a message travelled on (chunk 0x0002).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proto {
    /// UDP (17).
    Udp,
    /// TCP (6), also under TLS or WebSocket.
    Tcp,
}

impl Proto {
    fn number(self) -> u8 {
        match self {
            Proto::Udp => 17,
            Proto::Tcp => 6,
        }
    }
}

/// One captured message, as [`encode`] writes it.
#[derive(Debug, Clone, Copy)]
pub struct Packet<'a> {
    /// Who sent it.
    pub src: SocketAddr,
    /// Where it went.
    pub dst: SocketAddr,
    /// Over what.
    pub proto: Proto,
    /// When, since the Unix epoch: seconds.
    pub secs: u32,
    /// And microseconds.
    pub micros: u32,
    /// Chunk 0x000c.
    pub capture_id: u32,
    /// Chunk 0x000e, when set.
    pub auth_key: Option<&'a [u8]>,
    /// Chunk 0x0011, when known.
    pub correlation: Option<&'a [u8]>,
    /// The SIP message.
    pub payload: &'a [u8],
}

/// HEPv3's length field is a u16: a packet is at most this long.
pub const MAX_PACKET: usize = u16::MAX as usize;

fn chunk(out: &mut Vec<u8>, kind: u16, value: &[u8]) {
    out.extend_from_slice(&0u16.to_be_bytes());
    out.extend_from_slice(&kind.to_be_bytes());
    // Callers keep the whole packet under 64 KiB, so each chunk is too.
    out.extend_from_slice(&((value.len() + 6) as u16).to_be_bytes());
    out.extend_from_slice(value);
}

/// Writes `p` as one HEPv3 packet into `out` (cleared first); `false`,
/// with `out` empty, when it would exceed [`MAX_PACKET`].
pub fn encode(p: &Packet<'_>, out: &mut Vec<u8>) -> bool {
    out.clear();
    let (src, dst) = match (p.src.ip(), p.dst.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => (IpAddr::V4(s), IpAddr::V4(d)),
        // One family per packet: a mixed pair as IPv6 (IPv4-mapped).
        (s, d) => (IpAddr::V6(v6(s)), IpAddr::V6(v6(d))),
    };
    let fixed = 6 + 7 + 7 + 2 * if src.is_ipv4() { 10 } else { 22 } + 2 * 8 + 2 * 10 + 7 + 10;
    let extra = p.auth_key.map_or(0, |k| 6 + k.len())
        + p.correlation.map_or(0, |c| 6 + c.len())
        + 6
        + p.payload.len();
    let total = fixed + extra;
    if total > MAX_PACKET {
        return false;
    }
    out.reserve(total);
    out.extend_from_slice(b"HEP3");
    out.extend_from_slice(&(total as u16).to_be_bytes());
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            chunk(out, 0x0001, &[2]);
            chunk(out, 0x0002, &[p.proto.number()]);
            chunk(out, 0x0003, &s.octets());
            chunk(out, 0x0004, &d.octets());
        }
        (s, d) => {
            chunk(out, 0x0001, &[10]);
            chunk(out, 0x0002, &[p.proto.number()]);
            chunk(out, 0x0005, &v6(s).octets());
            chunk(out, 0x0006, &v6(d).octets());
        }
    }
    chunk(out, 0x0007, &p.src.port().to_be_bytes());
    chunk(out, 0x0008, &p.dst.port().to_be_bytes());
    chunk(out, 0x0009, &p.secs.to_be_bytes());
    chunk(out, 0x000a, &p.micros.to_be_bytes());
    chunk(out, 0x000b, &[1]);
    chunk(out, 0x000c, &p.capture_id.to_be_bytes());
    if let Some(k) = p.auth_key {
        chunk(out, 0x000e, k);
    }
    chunk(out, 0x000f, p.payload);
    if let Some(c) = p.correlation {
        chunk(out, 0x0011, c);
    }
    debug_assert_eq!(out.len(), total);
    true
}

fn v6(ip: IpAddr) -> std::net::Ipv6Addr {
    match ip {
        IpAddr::V4(a) => a.to_ipv6_mapped(),
        IpAddr::V6(a) => a,
    }
}

/// The Call-ID of a SIP message (`Call-ID:` or its compact form `i:`),
/// found by a scan of its header lines; `None` without one.
#[must_use]
pub fn call_id(msg: &[u8]) -> Option<&[u8]> {
    let mut lines = msg.split(|&b| b == b'\n');
    lines.next()?;
    for line in lines {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.is_empty() {
            return None;
        }
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            continue;
        };
        let name = line[..colon].trim_ascii();
        if name.eq_ignore_ascii_case(b"call-id") || name.eq_ignore_ascii_case(b"i") {
            let v = line[colon + 1..].trim_ascii();
            return (!v.is_empty()).then_some(v);
        }
    }
    None
}

/// Whether the call with this Call-ID is among the `sample` fraction
/// captured: by a fixed hash, so every message of a call gets the same
/// answer, on every balancer.
#[must_use]
pub fn sampled(call_id: &[u8], sample: f64) -> bool {
    if sample >= 1.0 {
        return true;
    }
    let mut hasher = SipHasher13::new();
    std::hash::Hasher::write(&mut hasher, call_id);
    let h = std::hash::Hasher::finish(&hasher);
    // The top 53 bits as a fraction in [0, 1).
    ((h >> 11) as f64) / ((1u64 << 53) as f64) < sample
}

/// What the capture counts, for `/metrics` (in [`crate::stats::Stats`]).
#[derive(Debug, Default)]
pub struct CaptureStats {
    /// HEP packets sent to the collector.
    pub sent: AtomicU64,
    /// Messages dropped: the queue was full.
    pub queue_full: AtomicU64,
    /// HEP packets the socket would not send (an ICMP error from a
    /// collector that is down comes back as the next send's error).
    pub send_failed: AtomicU64,
    /// Messages too large for one HEP packet (64 KiB).
    pub too_large: AtomicU64,
}

impl CaptureStats {
    /// `(reason, count)` of messages not captured.
    pub fn dropped(&self) -> [(&'static str, u64); 3] {
        [
            ("queue_full", self.queue_full.load(Ordering::Relaxed)),
            ("send_failed", self.send_failed.load(Ordering::Relaxed)),
            ("too_large", self.too_large.load(Ordering::Relaxed)),
        ]
    }
}

/// A message on its way to the capture thread.
struct Event {
    at: SystemTime,
    src: SocketAddr,
    dst: SocketAddr,
    proto: Proto,
    data: Bytes,
}

/// The shell's handle on the capture: cheap to clone, never blocks.
#[derive(Clone)]
pub struct Capture {
    tx: SyncSender<Event>,
    sample: f64,
    stats: Arc<CaptureStats>,
}

impl std::fmt::Debug for Capture {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Capture")
            .field("sample", &self.sample)
            .finish_non_exhaustive()
    }
}

impl Capture {
    /// Binds a UDP socket towards the collector and starts the thread that
    /// sends; it ends when the last handle is dropped.
    ///
    /// # Errors
    /// The socket cannot be made or the thread cannot start.
    pub fn start(cfg: &CaptureConfig, stats: Arc<CaptureStats>) -> std::io::Result<Capture> {
        let any: SocketAddr = if cfg.hep.is_ipv4() {
            ([0, 0, 0, 0], 0).into()
        } else {
            (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
        };
        let socket = UdpSocket::bind(any)?;
        // Connected: the kernel fills in the destination, and an ICMP
        // error about the collector shows up (and is counted) instead of
        // going unseen.
        socket.connect(cfg.hep)?;
        let (tx, rx) = sync_channel(cfg.queue);
        let sender = Sender {
            socket,
            capture_id: cfg.capture_id,
            auth_key: cfg.password.clone().map(String::into_bytes),
            stats: stats.clone(),
        };
        std::thread::Builder::new()
            .name("siplb-capture".into())
            .spawn(move || sender.run(&rx))?;
        Ok(Capture {
            tx,
            sample: cfg.sample,
            stats,
        })
    }

    /// Captures a message read or written: copied into the queue, or
    /// dropped and counted when the queue is full. What cannot be SIP
    /// (CRLF keep-alives, STUN: a SIP message starts with a letter) and
    /// calls outside the sample are left out.
    pub fn record(&self, src: SocketAddr, dst: SocketAddr, proto: Proto, data: &[u8]) {
        if self.wanted(data) {
            self.push(src, dst, proto, Bytes::copy_from_slice(data));
        }
    }

    /// [`Capture::record`] for bytes the shell already holds as [`Bytes`]
    /// (a connection's queue): no copy.
    pub fn record_bytes(&self, src: SocketAddr, dst: SocketAddr, proto: Proto, data: &Bytes) {
        if self.wanted(data) {
            self.push(src, dst, proto, data.clone());
        }
    }

    fn wanted(&self, data: &[u8]) -> bool {
        if !data.first().is_some_and(u8::is_ascii_alphabetic) {
            return false;
        }
        self.sample >= 1.0 || call_id(data).is_some_and(|c| sampled(c, self.sample))
    }

    fn push(&self, src: SocketAddr, dst: SocketAddr, proto: Proto, data: Bytes) {
        let ev = Event {
            at: SystemTime::now(),
            src,
            dst,
            proto,
            data,
        };
        match self.tx.try_send(ev) {
            Ok(()) => {}
            // Disconnected: the thread is gone (it never exits on its own
            // while a handle lives); counted the same.
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                self.stats.queue_full.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// The capture thread's side.
struct Sender {
    socket: UdpSocket,
    capture_id: u32,
    auth_key: Option<Vec<u8>>,
    stats: Arc<CaptureStats>,
}

impl Sender {
    fn run(self, rx: &Receiver<Event>) {
        let mut buf = Vec::with_capacity(4096);
        while let Ok(ev) = rx.recv() {
            let t = ev.at.duration_since(UNIX_EPOCH).unwrap_or_default();
            let p = Packet {
                src: ev.src,
                dst: ev.dst,
                proto: ev.proto,
                secs: t.as_secs() as u32,
                micros: t.subsec_micros(),
                capture_id: self.capture_id,
                auth_key: self.auth_key.as_deref(),
                correlation: call_id(&ev.data),
                payload: &ev.data,
            };
            if !encode(&p, &mut buf) {
                self.stats.too_large.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            match self.socket.send(&buf) {
                Ok(_) => self.stats.sent.fetch_add(1, Ordering::Relaxed),
                Err(_) => self.stats.send_failed.fetch_add(1, Ordering::Relaxed),
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const INVITE: &[u8] =
        b"INVITE sip:b@x SIP/2.0\r\nVia: SIP/2.0/UDP h\r\ni:  abc@h \r\nCSeq: 1 INVITE\r\n\r\n";

    fn packet<'a>(src: &str, dst: &str, payload: &'a [u8]) -> Packet<'a> {
        Packet {
            src: src.parse().unwrap(),
            dst: dst.parse().unwrap(),
            proto: Proto::Udp,
            secs: 0x6500_0001,
            micros: 123_456,
            capture_id: 2001,
            auth_key: None,
            correlation: None,
            payload,
        }
    }

    #[test]
    fn an_ipv4_packet_byte_for_byte() {
        let mut out = Vec::new();
        assert!(encode(
            &packet("10.0.0.1:5060", "192.168.1.2:5080", b"OPTIONS"),
            &mut out
        ));
        #[rustfmt::skip]
        let golden: &[u8] = &[
            b'H', b'E', b'P', b'3', 0, 106,
            0, 0, 0, 0x01, 0, 7, 2,
            0, 0, 0, 0x02, 0, 7, 17,
            0, 0, 0, 0x03, 0, 10, 10, 0, 0, 1,
            0, 0, 0, 0x04, 0, 10, 192, 168, 1, 2,
            0, 0, 0, 0x07, 0, 8, 0x13, 0xc4,
            0, 0, 0, 0x08, 0, 8, 0x13, 0xd8,
            0, 0, 0, 0x09, 0, 10, 0x65, 0, 0, 1,
            0, 0, 0, 0x0a, 0, 10, 0, 1, 0xe2, 0x40,
            0, 0, 0, 0x0b, 0, 7, 1,
            0, 0, 0, 0x0c, 0, 10, 0, 0, 0x07, 0xd1,
            0, 0, 0, 0x0f, 0, 13, b'O', b'P', b'T', b'I', b'O', b'N', b'S',
        ];
        assert_eq!(out, golden);
    }

    #[test]
    fn ipv6_tcp_with_auth_key_and_correlation() {
        let mut p = packet("[::1]:5061", "[2001:db8::2]:5062", b"X");
        p.proto = Proto::Tcp;
        p.auth_key = Some(b"pw");
        p.correlation = Some(b"c1");
        let mut out = Vec::new();
        assert!(encode(&p, &mut out));
        let mut ipv6 = [0u8; 16];
        ipv6[15] = 1;
        #[rustfmt::skip]
        let mut golden: Vec<u8> = vec![b'H', b'E', b'P', b'3', 0, 140,
            0, 0, 0, 0x01, 0, 7, 10,
            0, 0, 0, 0x02, 0, 7, 6,
            0, 0, 0, 0x05, 0, 22];
        golden.extend_from_slice(&ipv6);
        golden.extend_from_slice(&[0, 0, 0, 0x06, 0, 22]);
        golden.extend_from_slice(
            &"2001:db8::2"
                .parse::<std::net::Ipv6Addr>()
                .unwrap()
                .octets(),
        );
        #[rustfmt::skip]
        golden.extend_from_slice(&[
            0, 0, 0, 0x07, 0, 8, 0x13, 0xc5,
            0, 0, 0, 0x08, 0, 8, 0x13, 0xc6,
            0, 0, 0, 0x09, 0, 10, 0x65, 0, 0, 1,
            0, 0, 0, 0x0a, 0, 10, 0, 1, 0xe2, 0x40,
            0, 0, 0, 0x0b, 0, 7, 1,
            0, 0, 0, 0x0c, 0, 10, 0, 0, 0x07, 0xd1,
            0, 0, 0, 0x0e, 0, 8, b'p', b'w',
            0, 0, 0, 0x0f, 0, 7, b'X',
            0, 0, 0, 0x11, 0, 8, b'c', b'1',
        ]);
        assert_eq!(out, golden);
    }

    #[test]
    fn a_mixed_pair_is_ipv6_and_an_oversize_message_is_refused() {
        let mut out = Vec::new();
        assert!(encode(&packet("127.0.0.1:1", "[::1]:2", b"X"), &mut out));
        assert_eq!(&out[6..13], &[0, 0, 0, 1, 0, 7, 10]);
        assert_eq!(
            &out[26..42],
            &"::ffff:127.0.0.1"
                .parse::<std::net::Ipv6Addr>()
                .unwrap()
                .octets()
        );
        let big = vec![b'x'; MAX_PACKET];
        assert!(!encode(
            &packet("127.0.0.1:1", "127.0.0.1:2", &big),
            &mut out
        ));
        assert!(out.is_empty());
        let fits = vec![b'x'; MAX_PACKET - 99];
        assert!(encode(
            &packet("127.0.0.1:1", "127.0.0.1:2", &fits),
            &mut out
        ));
        assert_eq!(out.len(), MAX_PACKET);
    }

    #[test]
    fn call_ids_long_and_compact_and_none() {
        assert_eq!(call_id(INVITE), Some(&b"abc@h"[..]));
        assert_eq!(
            call_id(b"SIP/2.0 200 OK\r\nCALL-ID:x\r\n\r\n"),
            Some(&b"x"[..])
        );
        // Only in the header, not in a body.
        assert_eq!(
            call_id(b"BYE sip:x SIP/2.0\r\nTo: a\r\n\r\nCall-ID: b"),
            None
        );
        assert_eq!(call_id(b""), None);
    }

    #[test]
    fn sampling_is_by_call_and_about_the_fraction() {
        let n = 10_000;
        let ids: Vec<String> = (0..n).map(|i| format!("{i}-4242@127.0.0.1")).collect();
        let half = ids.iter().filter(|c| sampled(c.as_bytes(), 0.5)).count();
        assert!((4_700..=5_300).contains(&half), "{half}");
        assert!(ids.iter().all(|c| sampled(c.as_bytes(), 1.0)));
        assert!(!ids.iter().any(|c| sampled(c.as_bytes(), 0.0)));
        // The same answer every time, and nested: 10 % is within 50 %.
        for c in &ids {
            assert_eq!(sampled(c.as_bytes(), 0.5), sampled(c.as_bytes(), 0.5));
            assert!(!sampled(c.as_bytes(), 0.1) || sampled(c.as_bytes(), 0.5));
        }
    }

    #[test]
    fn a_full_queue_drops_and_counts_and_never_waits() {
        let collector = UdpSocket::bind("127.0.0.1:0").unwrap();
        let cfg = CaptureConfig {
            hep: collector.local_addr().unwrap(),
            transport: crate::config::CaptureTransport::Udp,
            capture_id: 9,
            sample: 1.0,
            queue: 1,
            password: None,
        };
        let stats = Arc::new(CaptureStats::default());
        let c = Capture::start(&cfg, stats.clone()).unwrap();
        let (a, b) = (
            "127.0.0.1:1".parse().unwrap(),
            "127.0.0.1:2".parse().unwrap(),
        );
        for _ in 0..1000 {
            c.record(a, b, Proto::Udp, INVITE);
        }
        // Keep-alives and STUN (a binding request) are not SIP.
        c.record(a, b, Proto::Tcp, b"\r\n\r\n");
        c.record(a, b, Proto::Udp, &[0, 1, 0, 0, 0x21, 0x12, 0xa4, 0x42]);
        drop(c);
        // The thread sends what was queued, then ends: wait (bounded) for
        // the sum to reach every message.
        for _ in 0..200 {
            let s = &stats;
            if s.sent.load(Ordering::Relaxed) + s.queue_full.load(Ordering::Relaxed) == 1000 {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        let (sent, full) = (
            stats.sent.load(Ordering::Relaxed),
            stats.queue_full.load(Ordering::Relaxed),
        );
        assert_eq!(sent + full, 1000);
        assert!(sent >= 1 && full >= 1, "sent {sent}, full {full}");
        let mut buf = [0u8; 2048];
        let n = collector.recv(&mut buf).unwrap();
        assert_eq!(&buf[..4], b"HEP3");
        assert_eq!(usize::from(u16::from_be_bytes([buf[4], buf[5]])), n);
        assert!(
            buf[..n].ends_with(b"abc@h"),
            "the Call-ID as correlation id"
        );
    }
}

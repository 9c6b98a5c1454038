//! The STUN keep-alive of RFC 5626 §4.4.2 on our UDP port: a user agent
//! behind NAT sends a STUN Binding request (RFC 5389) to keep its binding
//! open; we answer with a Binding success response carrying the address we
//! saw (XOR-MAPPED-ADDRESS), so it can also tell when the binding changed.

use std::net::SocketAddr;

/// RFC 5389 magic cookie.
const COOKIE: u32 = 0x2112_A442;
/// Binding request and success response message types.
const BINDING_REQUEST: u16 = 0x0001;
const BINDING_SUCCESS: u16 = 0x0101;
/// XOR-MAPPED-ADDRESS attribute type.
const XOR_MAPPED_ADDRESS: u16 = 0x0020;

/// Whether `data` looks like a STUN message (not SIP): the first two bits
/// zero and the magic cookie at bytes 4..8.
#[must_use]
pub fn is_stun(data: &[u8]) -> bool {
    data.len() >= 20 && data[0] & 0xC0 == 0 && data[4..8] == COOKIE.to_be_bytes()
}

/// The Binding success response to a Binding request from `peer`, written
/// into `out`; `false` (nothing written) for any other STUN message.
pub fn answer(data: &[u8], peer: SocketAddr, out: &mut Vec<u8>) -> bool {
    if !is_stun(data) || u16::from_be_bytes([data[0], data[1]]) != BINDING_REQUEST {
        return false;
    }
    let len = usize::from(u16::from_be_bytes([data[2], data[3]]));
    if data.len() != 20 + len || len % 4 != 0 {
        return false;
    }
    let txid = &data[8..20];
    let port = peer.port() ^ (COOKIE >> 16) as u16;
    let (family, addr): (u8, smallvec::SmallVec<[u8; 16]>) = match peer.ip() {
        std::net::IpAddr::V4(ip) => {
            let x = u32::from_be_bytes(ip.octets()) ^ COOKIE;
            (1, x.to_be_bytes().iter().copied().collect())
        }
        std::net::IpAddr::V6(ip) => {
            let mut key = [0u8; 16];
            key[..4].copy_from_slice(&COOKIE.to_be_bytes());
            key[4..].copy_from_slice(txid);
            (2, ip.octets().iter().zip(key).map(|(a, k)| a ^ k).collect())
        }
    };
    let attr_len = 4 + addr.len();
    out.extend_from_slice(&BINDING_SUCCESS.to_be_bytes());
    out.extend_from_slice(&((4 + attr_len) as u16).to_be_bytes());
    out.extend_from_slice(&COOKIE.to_be_bytes());
    out.extend_from_slice(txid);
    out.extend_from_slice(&XOR_MAPPED_ADDRESS.to_be_bytes());
    out.extend_from_slice(&(attr_len as u16).to_be_bytes());
    out.extend_from_slice(&[0, family]);
    out.extend_from_slice(&port.to_be_bytes());
    out.extend_from_slice(&addr);
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(txid: [u8; 12]) -> Vec<u8> {
        let mut r = vec![0x00, 0x01, 0x00, 0x00];
        r.extend_from_slice(&COOKIE.to_be_bytes());
        r.extend_from_slice(&txid);
        r
    }

    #[test]
    fn a_binding_request_gets_the_address_we_saw() {
        let txid = *b"abcdefghijkl";
        let peer: SocketAddr = "192.0.2.33:40000".parse().unwrap();
        let mut out = Vec::new();
        assert!(answer(&request(txid), peer, &mut out));
        // RFC 5389 §15.2 by hand: port 40000 ^ 0x2112, 192.0.2.33 ^ cookie.
        assert_eq!(&out[0..2], &[0x01, 0x01]);
        assert_eq!(&out[2..4], &12u16.to_be_bytes());
        assert_eq!(&out[8..20], &txid);
        assert_eq!(&out[20..24], &[0x00, 0x20, 0x00, 0x08]);
        assert_eq!(&out[24..26], &[0, 1]);
        assert_eq!(u16::from_be_bytes([out[26], out[27]]), 40000 ^ 0x2112);
        let x = u32::from_be_bytes([out[28], out[29], out[30], out[31]]) ^ COOKIE;
        assert_eq!(
            std::net::Ipv4Addr::from(x),
            "192.0.2.33".parse::<std::net::Ipv4Addr>().unwrap()
        );
        let v6: SocketAddr = "[2001:db8::7]:5062".parse().unwrap();
        out.clear();
        assert!(answer(&request(txid), v6, &mut out));
        assert_eq!(out.len(), 20 + 4 + 20);
    }

    #[test]
    fn not_stun_or_not_a_binding_request() {
        let peer: SocketAddr = "192.0.2.33:40000".parse().unwrap();
        let mut out = Vec::new();
        assert!(!answer(b"OPTIONS sip:x SIP/2.0\r\n\r\n", peer, &mut out));
        let mut r = request([0; 12]);
        r[1] = 0x11; // a Binding indication
        assert!(is_stun(&r) && !answer(&r, peer, &mut out));
        let mut r = request([0; 12]);
        r.push(0); // length field says 0
        assert!(!answer(&r, peer, &mut out));
        assert!(out.is_empty());
    }
}

//! Stateless affinity and transaction ids: the Record-Route MAC that names a
//! dialog's server (`;sb=<server-id>.<mac>`), and the branch of our Via.

use std::hash::{Hash, Hasher};

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// Signs and checks server ids with the configured secret.
#[derive(Clone)]
pub struct Signer {
    secret: Vec<u8>,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Signer(..)")
    }
}

/// Hex digits of MAC kept in the URI (64 bits).
const MAC_HEX: usize = 16;

impl Signer {
    /// A signer over `secret`.
    #[must_use]
    pub fn new(secret: &[u8]) -> Signer {
        Signer {
            secret: secret.to_vec(),
        }
    }

    fn mac(&self, server: &str) -> Hmac<Sha256> {
        let mut m =
            <Hmac<Sha256> as Mac>::new_from_slice(&self.secret).expect("HMAC takes any key length");
        m.update(b"siplb-sb ");
        m.update(server.as_bytes());
        m
    }

    /// The `sb` parameter value for `server`: `<id>.<mac>`.
    #[must_use]
    pub fn sb(&self, server: &str) -> String {
        let tag = self.mac(server).finalize().into_bytes();
        format!("{server}.{}", &hex::encode(tag)[..MAC_HEX])
    }

    /// The server id of a valid `sb` value, checked in constant time.
    #[must_use]
    pub fn verify<'a>(&self, sb: &'a [u8]) -> Option<&'a str> {
        let dot = sb.iter().rposition(|&b| b == b'.')?;
        let (id, mac_hex) = (std::str::from_utf8(&sb[..dot]).ok()?, &sb[dot + 1..]);
        if mac_hex.len() != MAC_HEX {
            return None;
        }
        let mac = hex::decode(mac_hex).ok()?;
        self.mac(id).verify_truncated_left(&mac).ok()?;
        Some(id)
    }

    /// A 64-bit keyed hash of the parts (for branches): deterministic across
    /// restarts, so retransmissions forwarded by a restarted balancer match.
    #[must_use]
    pub fn hash(&self, parts: &[&[u8]]) -> u64 {
        // SipHash-1-3 with fixed keys, over the secret and the parts.
        let mut h = std::hash::DefaultHasher::new();
        self.secret.hash(&mut h);
        for p in parts {
            p.hash(&mut h);
        }
        h.finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sb_round_trip_and_forgery() {
        let s = Signer::new(b"0123456789abcdef0123");
        let sb = s.sb("s1");
        assert_eq!(s.verify(sb.as_bytes()), Some("s1"));
        let forged = sb.replacen("s1.", "s2.", 1);
        assert_eq!(s.verify(forged.as_bytes()), None);
        let other = Signer::new(b"another-secret-0123456");
        assert_eq!(other.verify(sb.as_bytes()), None, "another secret");
        assert_eq!(s.verify(b"s1"), None);
        assert_eq!(s.verify(b"s1.zz"), None);
        assert_eq!(s.verify(b"s1.0000000000000000"), None);
        assert_eq!(
            Signer::new(b"0123456789abcdef0123").sb("s1"),
            sb,
            "same secret, same MAC"
        );
    }
}

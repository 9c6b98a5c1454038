//! The SIP message layer of siplb: parse, validate, edit and frame SIP
//! messages (RFC 3261 §7, §18.3, §20, §25), without copying and without I/O.
//!
//! A proxy reads a few headers, splices a few, and forwards everything else
//! byte for byte. So a [`Message`] is the received bytes plus offsets:
//! parsing indexes the header lines and reads only what routing needs
//! (Call-ID, CSeq, Max-Forwards, Content-Length, the top Via, the
//! Request-URI); [`Message::validate`] checks the grammar of the address
//! and Via headers on demand; [`Message::write_edited`] writes the forwarded
//! message as splices of the original. [`framing::check`] finds message
//! boundaries in a stream. This crate owns no socket, no clock and no
//! randomness, and never panics on any input.
//!
//! ```
//! let raw = b"OPTIONS sip:bob@example.com SIP/2.0\r\n\
//!     Via: SIP/2.0/UDP 192.0.2.1:5060;branch=z9hG4bK77\r\n\
//!     Max-Forwards: 70\r\nFrom: <sip:a@example.com>;tag=1\r\n\
//!     To: <sip:bob@example.com>\r\nCall-ID: c1\r\nCSeq: 1 OPTIONS\r\n\
//!     Content-Length: 0\r\n\r\n";
//! let msg = sip::Message::parse(raw)?;
//! assert_eq!(msg.call_id(), b"c1");
//! let mut out = Vec::new();
//! msg.write_edited(
//!     &sip::Edits {
//!         prepend_via: Some(b"SIP/2.0/UDP 192.0.2.9;branch=z9hG4bKlb1"),
//!         max_forwards: sip::MaxForwards::Decrement,
//!         ..Default::default()
//!     },
//!     &mut out,
//! );
//! let fwd = sip::Message::parse(&out)?;
//! assert_eq!(fwd.top_via().branch, Some(&b"z9hG4bKlb1"[..]));
//! assert_eq!(fwd.max_forwards(), Some(69));
//! # Ok::<(), sip::Error>(())
//! ```

pub mod addr;
pub mod edit;
pub mod error;
pub mod framing;
pub mod header;
pub mod message;
pub mod reply;
mod scan;
pub mod uri;
pub mod via;

pub use addr::NameAddr;
pub use edit::{Edits, MaxForwards, Received};
pub use error::{Error, Result};
pub use framing::{DEFAULT_MAX_SIZE, Frame, Framer};
pub use header::HeaderName;
pub use message::{CSeq, Header, Message, Method, StartLine, Transport};
pub use uri::{Host, Scheme, Uri, unescape};
pub use via::{OwnVias, Via};

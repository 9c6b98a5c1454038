//! A small built-in UAS: answers INVITE with 200 (echoing Record-Route),
//! BYE, REGISTER, OPTIONS and CANCEL with 200, ignores ACK, and counts the
//! INVITEs it answered. Enough to stand for a SIP server in the test bed.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use sip::{HeaderName, Message, Method};
use tokio::net::UdpSocket;

/// A running UAS.
#[derive(Debug)]
pub struct Uas {
    /// Where it listens.
    pub addr: SocketAddr,
    /// INVITEs answered (retransmissions included once per Call-ID would need
    /// state; the UAC here does not retransmit unless a reply is lost).
    pub invites: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Uas {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Uas {
    /// Binds on `addr` (port 0 picks one) and starts answering.
    ///
    /// # Errors
    /// When the address cannot be bound.
    pub async fn start(addr: SocketAddr) -> std::io::Result<Uas> {
        let sock = UdpSocket::bind(addr).await?;
        let addr = sock.local_addr()?;
        let invites = Arc::new(AtomicU64::new(0));
        let count = invites.clone();
        let task = tokio::spawn(async move {
            let mut buf = vec![0u8; 65_535];
            let mut out = Vec::with_capacity(2048);
            loop {
                let Ok((n, peer)) = sock.recv_from(&mut buf).await else {
                    continue;
                };
                let Ok(m) = Message::parse(&buf[..n]) else {
                    continue;
                };
                if !m.is_request() || m.method() == Method::Ack {
                    continue;
                }
                if m.method() == Method::Invite {
                    count.fetch_add(1, Ordering::Relaxed);
                }
                let mut extra: Vec<Vec<u8>> = m
                    .headers()
                    .filter(|h| h.name == HeaderName::RecordRoute)
                    .map(|h| [b"Record-Route: ".as_slice(), h.value].concat())
                    .collect();
                if m.method() == Method::Invite {
                    extra.push(format!("Contact: <sip:uas@{addr}>").into_bytes());
                }
                let refs: Vec<&[u8]> = extra.iter().map(Vec::as_slice).collect();
                out.clear();
                sip::reply::response_for(&m, 200, "OK", b"uas", &refs, &mut out);
                let _ = sock.send_to(&out, peer).await;
            }
        });
        Ok(Uas {
            addr,
            invites,
            task,
        })
    }

    /// INVITEs answered so far.
    #[must_use]
    pub fn invites(&self) -> u64 {
        self.invites.load(Ordering::Relaxed)
    }
}

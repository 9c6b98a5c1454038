//! A small built-in UAC: places whole calls (INVITE, 200, ACK, BYE, 200)
//! through a proxy over UDP, retransmitting on the RFC 3261 timer T1.

use std::net::SocketAddr;
use std::time::Duration;

use sip::Message;
use tokio::net::UdpSocket;

/// T1 (RFC 3261): first retransmission interval.
const T1: Duration = Duration::from_millis(500);

/// Why a call failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CallError {
    /// The final response to INVITE or BYE was not 2xx.
    Status(u16),
    /// No final response after the retransmissions.
    Timeout(&'static str),
    /// A socket error.
    Io(String),
}

/// A request of a UAC at `local` through `proxy`: Via with `branch`, From tag
/// `uac`, To tag and Route when given.
#[allow(clippy::too_many_arguments)]
#[must_use]
pub fn request(
    method: &str,
    call_id: &str,
    cseq: u32,
    local: SocketAddr,
    proxy: SocketAddr,
    to_tag: Option<&str>,
    route: Option<&str>,
    branch: &str,
) -> Vec<u8> {
    let to = to_tag.map_or(String::new(), |t| format!(";tag={t}"));
    let route = route.map_or(String::new(), |r| format!("Route: {r}\r\n"));
    format!(
        "{method} sip:service@{proxy} SIP/2.0\r\nVia: SIP/2.0/UDP {local};branch=z9hG4bK{branch};rport\r\n\
         Max-Forwards: 70\r\nFrom: <sip:uac@{local}>;tag=uac\r\nTo: <sip:service@{proxy}>{to}\r\n\
         Call-ID: {call_id}\r\nCSeq: {cseq} {method}\r\nContact: <sip:uac@{local}>\r\n{route}Content-Length: 0\r\n\r\n"
    )
    .into_bytes()
}

/// The To tag and the first Record-Route of a 2xx: what the ACK and BYE need.
#[must_use]
pub fn dialog_of(m: &Message<'_>) -> (Option<String>, Option<String>) {
    let to_tag = m
        .to()
        .ok()
        .and_then(|t| t.tag())
        .map(|t| String::from_utf8_lossy(t).into_owned());
    let route = m
        .record_routes()
        .next()
        .and_then(Result::ok)
        .map(|r| String::from_utf8_lossy(r.raw).into_owned());
    (to_tag, route)
}

/// A UAC bound to one local socket.
#[derive(Debug)]
pub struct Uac {
    sock: UdpSocket,
    proxy: SocketAddr,
    local: SocketAddr,
    branches: std::sync::atomic::AtomicU64,
}

impl Uac {
    /// Binds on `local` (port 0 picks one); requests go to `proxy`.
    ///
    /// # Errors
    /// When the address cannot be bound.
    pub async fn new(local: SocketAddr, proxy: SocketAddr) -> std::io::Result<Uac> {
        let sock = UdpSocket::bind(local).await?;
        let local = sock.local_addr()?;
        Ok(Uac {
            sock,
            proxy,
            local,
            branches: std::sync::atomic::AtomicU64::new(1),
        })
    }

    /// Sends `req` and waits for its final response (by CSeq method and
    /// Call-ID), retransmitting after T1 and 2T1 (3.5 s in all); returns the
    /// response bytes.
    async fn transact(
        &self,
        req: &[u8],
        call_id: &str,
        method: &str,
    ) -> Result<Vec<u8>, CallError> {
        let mut buf = vec![0u8; 65_535];
        let mut wait = T1;
        for _ in 0..3 {
            self.sock
                .send_to(req, self.proxy)
                .await
                .map_err(|e| CallError::Io(e.to_string()))?;
            let deadline = tokio::time::Instant::now() + wait;
            loop {
                let r = tokio::time::timeout_at(deadline, self.sock.recv_from(&mut buf)).await;
                let Ok(Ok((n, _))) = r else { break };
                let Ok(m) = Message::parse(&buf[..n]) else {
                    continue;
                };
                if m.call_id() == call_id.as_bytes()
                    && m.cseq().method.as_bytes() == method.as_bytes()
                    && m.status().is_some_and(|c| c >= 200)
                {
                    return Ok(buf[..n].to_vec());
                }
            }
            wait *= 2;
        }
        Err(CallError::Timeout(if method == "INVITE" {
            "no final response to INVITE"
        } else {
            "no final response to BYE"
        }))
    }

    /// Places one call: INVITE, 200, ACK, BYE, 200.
    ///
    /// # Errors
    /// Why it failed.
    pub async fn call(&self, call_id: &str) -> Result<(), CallError> {
        // Branches are tokens: derive them from a counter, not from the Call-ID.
        let b = self
            .branches
            .fetch_add(3, std::sync::atomic::Ordering::Relaxed);
        let invite = request(
            "INVITE",
            call_id,
            1,
            self.local,
            self.proxy,
            None,
            None,
            &format!("uac{b}"),
        );
        let resp = self.transact(&invite, call_id, "INVITE").await?;
        let m = Message::parse(&resp).map_err(|e| CallError::Io(e.to_string()))?;
        let code = m.status().unwrap_or(0);
        if code >= 300 {
            return Err(CallError::Status(code));
        }
        let (to_tag, route) = dialog_of(&m);
        let ack = request(
            "ACK",
            call_id,
            1,
            self.local,
            self.proxy,
            to_tag.as_deref(),
            route.as_deref(),
            &format!("uac{}", b + 1),
        );
        self.sock
            .send_to(&ack, self.proxy)
            .await
            .map_err(|e| CallError::Io(e.to_string()))?;
        let bye = request(
            "BYE",
            call_id,
            2,
            self.local,
            self.proxy,
            to_tag.as_deref(),
            route.as_deref(),
            &format!("uac{}", b + 2),
        );
        let resp = self.transact(&bye, call_id, "BYE").await?;
        match Message::parse(&resp).ok().and_then(|m| m.status()) {
            Some(200..=299) => Ok(()),
            Some(c) => Err(CallError::Status(c)),
            None => Err(CallError::Io("unparseable BYE response".into())),
        }
    }
}

//! SIP over WebSocket (RFC 7118), the shell's side: the HTTP upgrade (path,
//! `Origin` allow-list, the `sip` subprotocol required, RFC 7118 §4), then
//! one SIP message per WebSocket message, text or binary, each way. The
//! connection is a flow of the core's like a TCP one (RFC 5626): requests
//! from servers reach the browser down it. Pings are answered by the
//! WebSocket layer (tokio-tungstenite); a close ends the flow.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::{HeaderValue, StatusCode};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};
use tracing::debug;

use super::{Admitted, CONN_QUEUE, Ends, Net};
use crate::capture::Proto;
use crate::config::Transport;
use crate::router::{Origin, Outbox};
use crate::stats::ConnEvent;

/// Why an upgrade was refused: the HTTP answer.
fn refuse(status: StatusCode, why: &str) -> ErrorResponse {
    let mut r = ErrorResponse::new(Some(format!("{why}\n")));
    *r.status_mut() = status;
    r
}

/// Checks the upgrade request against the config: the path, the `Origin`
/// (when `sip.ws_origins` lists some) and the `sip` subprotocol, which the
/// answer then names.
#[allow(clippy::result_large_err)] // the WebSocket layer's callback type
fn check_upgrade(
    path: &str,
    origins: &[String],
    req: &Request,
    mut resp: Response,
) -> Result<Response, ErrorResponse> {
    if req.uri().path() != path {
        return Err(refuse(StatusCode::NOT_FOUND, "no WebSocket here"));
    }
    if !origins.is_empty() {
        let origin = req.headers().get("origin").and_then(|o| o.to_str().ok());
        if !origin.is_some_and(|o| origins.iter().any(|a| a.eq_ignore_ascii_case(o))) {
            return Err(refuse(StatusCode::FORBIDDEN, "Origin not allowed"));
        }
    }
    let sip = req
        .headers()
        .get_all("sec-websocket-protocol")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|p| p.trim().eq_ignore_ascii_case("sip"));
    if !sip {
        return Err(refuse(
            StatusCode::BAD_REQUEST,
            "the sip subprotocol is required (RFC 7118)",
        ));
    }
    resp.headers_mut()
        .insert("sec-websocket-protocol", HeaderValue::from_static("sip"));
    Ok(resp)
}

/// Serves one admitted WebSocket connection (after TLS for `wss`): the
/// upgrade within `sip.message_timeout`, then SIP until either side closes
/// or nothing comes for `sip.idle_timeout`.
pub(super) async fn ws_conn<S>(
    net: Arc<Net>,
    stream: S,
    ends: Ends,
    admitted: Admitted,
    transport: Transport,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let peer: SocketAddr = ends.peer;
    let capture = net.capture.clone();
    let cfg = net.router.config();
    let (path, origins) = (cfg.ws_path.clone(), cfg.ws_origins.clone());
    let limits = WebSocketConfig::default()
        .max_message_size(Some(cfg.max_message_size))
        .max_frame_size(Some(cfg.max_message_size))
        // Allocated per connection up front: small, grown on demand.
        .read_buffer_size(4096)
        .write_buffer_size(0);
    #[allow(clippy::result_large_err)] // the WebSocket layer's callback type
    let check = move |req: &Request, resp: Response| check_upgrade(&path, &origins, req, resp);
    let upgrade = tokio_tungstenite::accept_hdr_async_with_config(stream, check, Some(limits));
    let ws = match tokio::time::timeout(cfg.message_timeout, upgrade).await {
        Ok(Ok(ws)) => ws,
        Ok(Err(e)) => {
            net.router.stats.conn_event(ConnEvent::WsRefused);
            debug!(%peer, error = %e, "websocket upgrade refused");
            return;
        }
        Err(_) => {
            net.router.stats.conn_event(ConnEvent::ClosedSlow);
            debug!(%peer, "websocket upgrade not done in time");
            return;
        }
    };
    let id = net.next_conn.fetch_add(1, Ordering::Relaxed);
    let (tx, mut rx) = mpsc::channel::<Bytes>(CONN_QUEUE);
    net.conns.pin().insert(id, tx);
    net.router.conn_opened(id, peer, transport);
    let (mut sink, mut source) = ws.split();
    let (closing, mut closed) = tokio::sync::oneshot::channel::<()>();
    let writer = tokio::spawn(async move {
        let text = |b: Bytes| match Utf8Bytes::try_from(b.clone()) {
            // SIP is text; a body that is not UTF-8 goes as binary.
            Ok(t) => Message::Text(t),
            Err(_) => Message::Binary(b),
        };
        loop {
            tokio::select! {
                m = rx.recv() => match m {
                    Some(b) => {
                        if let Some(c) = &capture {
                            c.record_bytes(ends.local, ends.peer, Proto::Tcp, &b);
                        }
                        if sink.send(text(b)).await.is_err() {
                            return;
                        }
                    }
                    None => break,
                },
                _ = &mut closed => {
                    // The reader is done: what is queued, then the close
                    // (our answer to theirs, or ours), flushed.
                    while let Ok(b) = rx.try_recv() {
                        if let Some(c) = &capture {
                            c.record_bytes(ends.local, ends.peer, Proto::Tcp, &b);
                        }
                        if sink.send(text(b)).await.is_err() {
                            return;
                        }
                    }
                    break;
                }
            }
        }
        let _ = sink.close().await;
    });
    let origin = Origin::Conn {
        peer,
        conn: id,
        inbound: true,
    };
    let mut out = Outbox::new();
    let idle = cfg.idle_timeout;
    drop(cfg);
    loop {
        let next = match tokio::time::timeout(idle, source.next()).await {
            Ok(n) => n,
            Err(_) => {
                net.router.stats.conn_event(ConnEvent::ClosedIdle);
                break;
            }
        };
        let sip: Option<&[u8]> = match &next {
            Some(Ok(Message::Text(t))) => Some(t.as_bytes()),
            Some(Ok(Message::Binary(b))) => Some(b),
            _ => None,
        };
        if let Some(sip) = sip {
            if let Some(c) = &net.capture {
                c.record(ends.peer, ends.local, Proto::Tcp, sip);
            }
            net.handle(sip, origin, &mut out).await;
            continue;
        }
        match next {
            Some(Ok(Message::Close(_))) | None => break,
            // Pings are answered by the layer below; pongs and raw frames
            // carry no SIP.
            Some(Ok(_)) => {}
            Some(Err(e)) => {
                debug!(%peer, error = %e, "websocket error; closing");
                break;
            }
        }
    }
    debug!(%peer, conn = id, "websocket closed");
    net.router.conn_closed(id);
    net.conns.pin().remove(&id);
    // The registry's sender may outlive its removal (lazy frees): tell the
    // writer, which sends what is queued and the close, bounded.
    let _ = closing.send(());
    let abort = writer.abort_handle();
    if tokio::time::timeout(Duration::from_secs(1), writer)
        .await
        .is_err()
    {
        abort.abort();
    }
    drop(admitted);
}

#[cfg(test)]
#[allow(clippy::result_large_err)]
mod tests {
    use super::*;

    fn upgrade(path: &str, origin: Option<&str>, protocols: Option<&str>) -> Request {
        let mut b = Request::builder().uri(path);
        if let Some(o) = origin {
            b = b.header("origin", o);
        }
        if let Some(p) = protocols {
            b = b.header("sec-websocket-protocol", p);
        }
        b.body(()).unwrap()
    }

    #[test]
    fn the_upgrade_needs_the_path_the_origin_and_the_sip_subprotocol() {
        let ok =
            |r: &Request, origins: &[String]| check_upgrade("/ws", origins, r, Response::new(()));
        let r = ok(&upgrade("/ws", None, Some("foo, sip")), &[]).unwrap();
        assert_eq!(r.headers()["sec-websocket-protocol"], "sip");
        assert_eq!(
            ok(&upgrade("/other", None, Some("sip")), &[])
                .unwrap_err()
                .status(),
            StatusCode::NOT_FOUND
        );
        assert_eq!(
            ok(&upgrade("/ws", None, None), &[]).unwrap_err().status(),
            StatusCode::BAD_REQUEST
        );
        let allowed = ["https://phone.example".to_owned()];
        assert!(
            ok(
                &upgrade("/ws", Some("https://phone.example"), Some("sip")),
                &allowed
            )
            .is_ok()
        );
        assert_eq!(
            ok(
                &upgrade("/ws", Some("https://evil.example"), Some("sip")),
                &allowed
            )
            .unwrap_err()
            .status(),
            StatusCode::FORBIDDEN
        );
        assert_eq!(
            ok(&upgrade("/ws", None, Some("sip")), &allowed)
                .unwrap_err()
                .status(),
            StatusCode::FORBIDDEN,
            "no Origin with an allow-list"
        );
    }
}

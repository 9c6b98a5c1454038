//! The performance wire protocol, version 1 (docs/protocol.md): one JSON
//! object per line over TCP, readable and typeable with `nc`.
//!
//! A connection opens with the accepting side's `hello` carrying a random
//! challenge; the connecting side answers `auth` with
//! `HMAC-SHA256(key, "siplb-perf/1 client " + challenge)` and a challenge of
//! its own; the accepting side proves it holds the key too with `welcome`
//! carrying `HMAC-SHA256(key, "siplb-perf/1 server " + that challenge)`.
//! The key never crosses the wire. After that the connecting side asks
//! (`get`, `subscribe`) and the accepting side answers and pushes (`data`,
//! `notice`, `table`). Lines are limited to [`MAX_LINE`] bytes; an `error`
//! line precedes every close the protocol decides.

use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};

use crate::error::{Error, Result};
use crate::sample::Sample;

/// Protocol version spoken here.
pub const VERSION: u32 = 1;

/// Longest line accepted, in bytes (a `table` of 256 servers fits in
/// [`MAX_TABLE_LINE`] instead).
pub const MAX_LINE: usize = 4096;

/// Longest `table` line a subscriber accepts.
pub const MAX_TABLE_LINE: usize = 1 << 20;

/// Threshold crossings an agent reports in a `notice`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Event {
    /// CPU went above the high threshold.
    CpuHigh,
    /// CPU came back below the threshold minus the hysteresis.
    CpuNormal,
    /// Available memory went below the low threshold.
    MemLow,
    /// Available memory came back above the threshold plus the hysteresis.
    MemNormal,
}

/// How the performance server sees one agent, in a `table`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerStatus {
    /// Configured server id.
    pub id: String,
    /// The agent's address.
    pub agent: String,
    /// `up` when the agent answers, `down` when it does not, `connecting` before the first answer.
    pub state: AgentState,
    /// The latest sample, if any.
    pub sample: Option<Sample>,
    /// Milliseconds since the sample was received by the performance server.
    pub age_ms: Option<u64>,
    /// Why the agent is down, when it is.
    pub error: Option<String>,
}

/// Whether an agent answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AgentState {
    /// Not answered yet since the performance client was created.
    Connecting,
    /// Answering.
    Up,
    /// Not answering (connection refused or lost, or no reply within the timeout).
    Down,
}

/// Every message of the protocol.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum Msg {
    /// Accepting side, first line.
    Hello {
        /// Protocol version.
        version: u32,
        /// `agent` or `perf-server`.
        role: String,
        /// 32 hex digits.
        challenge: String,
    },
    /// Connecting side, answer to `hello`.
    Auth {
        /// Protocol version.
        version: u32,
        /// HMAC over the `hello` challenge, hex.
        mac: String,
        /// The connecting side's own challenge, 32 hex digits.
        challenge: String,
    },
    /// Accepting side: authenticated.
    Welcome {
        /// HMAC over the `auth` challenge, hex.
        mac: String,
    },
    /// Ask an agent for its latest sample.
    Get {
        /// Echoed in the `data` reply.
        id: u64,
    },
    /// An agent's latest sample.
    Data {
        /// The `get` it answers.
        id: u64,
        /// The cached sample; absent before the first sample is taken.
        sample: Option<Sample>,
    },
    /// Pushed by an agent when a threshold is crossed.
    Notice {
        /// What was crossed.
        events: Vec<Event>,
        /// The sample that crossed it.
        sample: Sample,
    },
    /// Ask a performance server to push its table on every change.
    Subscribe {},
    /// A performance server's view of every agent.
    Table {
        /// One entry per configured server.
        servers: Vec<ServerStatus>,
    },
    /// Said before closing.
    Error {
        /// Why.
        error: String,
    },
}

/// A pre-shared key.
#[derive(Clone)]
pub struct Key(Vec<u8>);

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Key(..)")
    }
}

impl Key {
    /// Shortest key accepted, in bytes.
    pub const MIN_LEN: usize = 16;

    /// A key from its bytes.
    ///
    /// # Errors
    /// When it is shorter than [`Key::MIN_LEN`].
    pub fn new(bytes: &[u8]) -> Result<Key, &'static str> {
        if bytes.len() < Self::MIN_LEN {
            return Err("key shorter than 16 bytes");
        }
        Ok(Key(bytes.to_vec()))
    }

    /// Reads a key file: its content with surrounding whitespace removed.
    ///
    /// # Errors
    /// [`Error::Key`] naming the file when it cannot be read or is too short.
    pub fn from_file(path: &std::path::Path) -> Result<Key> {
        let bad = |reason: String| Error::Key {
            path: path.display().to_string(),
            reason,
        };
        let raw = std::fs::read(path).map_err(|e| bad(e.to_string()))?;
        let trimmed = raw.trim_ascii();
        Key::new(trimmed).map_err(|r| bad(r.to_owned()))
    }

    fn mac(&self, purpose: &str, challenge: &str) -> Hmac<Sha256> {
        let mut m =
            <Hmac<Sha256> as Mac>::new_from_slice(&self.0).expect("HMAC takes any key length");
        m.update(b"siplb-perf/1 ");
        m.update(purpose.as_bytes());
        m.update(b" ");
        m.update(challenge.as_bytes());
        m
    }

    /// The proof over `challenge` for `purpose` (`client` or `server`), hex.
    #[must_use]
    pub fn sign(&self, purpose: &str, challenge: &str) -> String {
        hex::encode(self.mac(purpose, challenge).finalize().into_bytes())
    }

    /// Checks a proof in constant time.
    #[must_use]
    pub fn verify(&self, purpose: &str, challenge: &str, mac_hex: &str) -> bool {
        match hex::decode(mac_hex) {
            Ok(mac) => self.mac(purpose, challenge).verify_slice(&mac).is_ok(),
            Err(_) => false,
        }
    }
}

/// A fresh random challenge: 16 bytes from the thread's CSPRNG (seeded by
/// the OS), hex.
#[must_use]
pub fn challenge() -> String {
    use rand::RngCore;
    let mut b = [0u8; 16];
    rand::rng().fill_bytes(&mut b);
    hex::encode(b)
}

/// Reads protocol lines with a length limit; never buffers more than the limit.
#[derive(Debug)]
pub struct LineReader<R> {
    inner: BufReader<R>,
    buf: Vec<u8>,
    max: usize,
}

impl<R: AsyncRead + Unpin> LineReader<R> {
    /// Wraps a reader; lines longer than `max` bytes are an error.
    pub fn new(inner: R, max: usize) -> Self {
        LineReader {
            inner: BufReader::new(inner),
            buf: Vec::new(),
            max,
        }
    }

    /// The next message, or `None` at a clean end of stream.
    ///
    /// # Errors
    /// [`Error::LineTooLong`], [`Error::Malformed`], or the socket's error.
    /// Not cancel-safe: run it in its own task when racing it against timers.
    pub async fn next(&mut self) -> Result<Option<Msg>> {
        self.buf.clear();
        let limit = self.max as u64 + 1;
        let n = (&mut self.inner)
            .take(limit)
            .read_until(b'\n', &mut self.buf)
            .await?;
        if n == 0 {
            return Ok(None);
        }
        if self.buf.last() != Some(&b'\n') {
            return Err(if self.buf.len() > self.max {
                Error::LineTooLong(self.max)
            } else {
                Error::Closed
            });
        }
        let line = self.buf.trim_ascii();
        serde_json::from_slice(line)
            .map(Some)
            .map_err(|e| Error::Malformed(e.to_string()))
    }
}

/// Reads messages in a task of its own and hands them over a channel:
/// [`LineReader::next`] is not cancel-safe, a channel receive is, so the
/// caller can race it against timers. The stream of items ends after the
/// first error or end of stream.
pub fn spawn_reader<R>(
    mut r: LineReader<R>,
) -> (
    tokio::task::JoinHandle<()>,
    tokio::sync::mpsc::Receiver<Result<Option<Msg>>>,
)
where
    R: AsyncRead + Unpin + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    let task = tokio::spawn(async move {
        loop {
            let m = r.next().await;
            let end = !matches!(m, Ok(Some(_)));
            if tx.send(m).await.is_err() || end {
                break;
            }
        }
    });
    (task, rx)
}

/// Writes one message as one line.
///
/// # Errors
/// The socket's error.
pub async fn write_msg<W: AsyncWrite + Unpin>(w: &mut W, msg: &Msg) -> Result<()> {
    let mut line = serde_json::to_vec(msg).map_err(|e| Error::Malformed(e.to_string()))?;
    line.push(b'\n');
    w.write_all(&line).await?;
    Ok(())
}

/// Runs the accepting side of the handshake: `hello`, check `auth`, `welcome`.
///
/// # Errors
/// [`Error::Auth`] for a wrong key, [`Error::Version`], or a protocol error;
/// an `error` line has been sent to the peer where it helps.
pub async fn accept_handshake<R, W>(
    r: &mut LineReader<R>,
    w: &mut W,
    key: &Key,
    role: &str,
) -> Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let ours = challenge();
    write_msg(
        w,
        &Msg::Hello {
            version: VERSION,
            role: role.to_owned(),
            challenge: ours.clone(),
        },
    )
    .await?;
    let reply = r.next().await;
    let err = match reply {
        Ok(Some(Msg::Auth {
            version,
            mac,
            challenge,
        })) => {
            if version != VERSION {
                Error::Version(version)
            } else if !key.verify("client", &ours, &mac) {
                Error::Auth
            } else if challenge.len() < 16 {
                Error::Malformed("client challenge shorter than 16 characters".into())
            } else {
                let mac = key.sign("server", &challenge);
                return write_msg(w, &Msg::Welcome { mac }).await;
            }
        }
        Ok(Some(_)) => Error::Unexpected("expected auth"),
        Ok(None) => Error::Closed,
        Err(e) => e,
    };
    let _ = write_msg(
        w,
        &Msg::Error {
            error: err.to_string(),
        },
    )
    .await;
    Err(err)
}

/// Runs the connecting side of the handshake; returns the peer's role.
///
/// # Errors
/// [`Error::Auth`] when the peer's proof is wrong (it does not hold the key),
/// [`Error::Peer`] when the peer refused us, or a protocol error.
pub async fn connect_handshake<R, W>(r: &mut LineReader<R>, w: &mut W, key: &Key) -> Result<String>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let (role, theirs) = match r.next().await? {
        Some(Msg::Hello {
            version,
            role,
            challenge,
        }) => {
            if version != VERSION {
                let err = Error::Version(version);
                let _ = write_msg(
                    w,
                    &Msg::Error {
                        error: err.to_string(),
                    },
                )
                .await;
                return Err(err);
            }
            (role, challenge)
        }
        Some(Msg::Error { error }) => return Err(Error::Peer(error)),
        Some(_) => return Err(Error::Unexpected("expected hello")),
        None => return Err(Error::Closed),
    };
    let ours = challenge();
    write_msg(
        w,
        &Msg::Auth {
            version: VERSION,
            mac: key.sign("client", &theirs),
            challenge: ours.clone(),
        },
    )
    .await?;
    match r.next().await? {
        Some(Msg::Welcome { mac }) if key.verify("server", &ours, &mac) => Ok(role),
        Some(Msg::Welcome { .. }) => Err(Error::Auth),
        Some(Msg::Error { error }) => Err(Error::Peer(error)),
        Some(_) => Err(Error::Unexpected("expected welcome")),
        None => Err(Error::Closed),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_are_one_json_line_each() {
        let m = Msg::Get { id: 7 };
        assert_eq!(
            serde_json::to_string(&m).unwrap(),
            r#"{"type":"get","id":7}"#
        );
        let parsed: Msg = serde_json::from_str(r#"{"type":"subscribe"}"#).unwrap();
        assert_eq!(parsed, Msg::Subscribe {});
        assert!(serde_json::from_str::<Msg>(r#"{"type":"get","id":7,"extra":1}"#).is_err());
    }

    #[test]
    fn macs_verify_only_with_the_same_key_and_purpose() {
        let k = Key::new(b"0123456789abcdef-secret").unwrap();
        let other = Key::new(b"0123456789abcdef-other!").unwrap();
        let mac = k.sign("client", "abc");
        assert!(k.verify("client", "abc", &mac));
        assert!(!k.verify("server", "abc", &mac));
        assert!(!k.verify("client", "abd", &mac));
        assert!(!other.verify("client", "abc", &mac));
        assert!(!k.verify("client", "abc", "not hex"));
        assert!(Key::new(b"short").is_err());
    }

    #[tokio::test]
    async fn handshake_both_ways() {
        let key = Key::new(b"0123456789abcdef-secret").unwrap();
        let (a, b) = tokio::io::duplex(4096);
        let (ar, mut aw) = tokio::io::split(a);
        let (br, mut bw) = tokio::io::split(b);
        let k2 = key.clone();
        let server = tokio::spawn(async move {
            let mut r = LineReader::new(ar, MAX_LINE);
            accept_handshake(&mut r, &mut aw, &k2, "agent").await
        });
        let mut r = LineReader::new(br, MAX_LINE);
        assert_eq!(
            connect_handshake(&mut r, &mut bw, &key).await.unwrap(),
            "agent"
        );
        server.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn wrong_key_is_refused_on_both_sides() {
        let key = Key::new(b"0123456789abcdef-secret").unwrap();
        let wrong = Key::new(b"0123456789abcdef-wrong!").unwrap();
        let (a, b) = tokio::io::duplex(4096);
        let (ar, mut aw) = tokio::io::split(a);
        let (br, mut bw) = tokio::io::split(b);
        let server = tokio::spawn(async move {
            let mut r = LineReader::new(ar, MAX_LINE);
            accept_handshake(&mut r, &mut aw, &key, "agent").await
        });
        let mut r = LineReader::new(br, MAX_LINE);
        let client = connect_handshake(&mut r, &mut bw, &wrong)
            .await
            .unwrap_err();
        assert!(
            matches!(client, Error::Peer(ref e) if e == "authentication failed"),
            "{client}"
        );
        assert!(matches!(server.await.unwrap(), Err(Error::Auth)));
    }

    #[tokio::test]
    async fn long_lines_and_garbage_are_errors() {
        let (mut a, b) = tokio::io::duplex(1 << 16);
        let mut r = LineReader::new(b, 64);
        a.write_all(&[b'x'; 100]).await.unwrap();
        assert!(matches!(r.next().await, Err(Error::LineTooLong(64))));
        let (mut a, b) = tokio::io::duplex(1 << 16);
        let mut r = LineReader::new(b, 64);
        a.write_all(b"hello there\n").await.unwrap();
        assert!(matches!(r.next().await, Err(Error::Malformed(_))));
        drop(a);
    }
}

//! The performance wire protocol, version 2 (docs/protocol.md): one JSON
//! object per line over TCP, readable with `nc`.
//!
//! A connection opens with a handshake in clear. The accepting side's
//! `hello` carries its role and a random challenge; the connecting side
//! answers `auth` with a challenge of its own and the proof
//! `HMAC-SHA256(key, "siplb-perf/2 client " + T)`, where the transcript `T`
//! is `role + " " + hello challenge + " " + auth challenge`; the accepting
//! side proves it holds the key too with `welcome` carrying
//! `HMAC-SHA256(key, "siplb-perf/2 server " + T)`. The key never crosses the
//! wire. Both sides then derive one session key per direction,
//! `HMAC-SHA256(key, "siplb-perf/2 key client-to-server " + T)` and
//! `... server-to-client ...`, and every later line is sealed:
//! `{"seq":N,"msg":{...},"mac":"<32 hex>"}`, where `seq` counts the
//! direction's messages from 1 and `mac` is HMAC-SHA256 under the
//! direction's key over `N + " " + the exact bytes of msg`, truncated to
//! 128 bits ([`Sealer`], [`Opener`]). A forged or altered line, a replayed
//! one, one out of order or one from another session or direction is
//! refused and the connection closed.
//!
//! After the handshake the connecting side asks (`get`, `subscribe`) and the
//! accepting side answers and pushes (`data`, `notice`, `table`). Lines are
//! limited to [`MAX_LINE`] bytes; an `error` line precedes every close the
//! protocol decides.

use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use sha2::Sha256;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};

use crate::error::{Error, Result};
use crate::sample::Sample;

/// Protocol version spoken here.
pub const VERSION: u32 = 2;

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
        /// 32 lowercase hex digits.
        challenge: String,
    },
    /// Connecting side, answer to `hello`.
    Auth {
        /// Protocol version.
        version: u32,
        /// The client proof over the transcript, hex.
        mac: String,
        /// The connecting side's own challenge, 32 lowercase hex digits.
        challenge: String,
    },
    /// Accepting side: authenticated.
    Welcome {
        /// The server proof over the transcript, hex.
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

/// What a proof or a derived key is for: each use of the pre-shared key has
/// its own label, so no value made for one use is valid for another.
const CLIENT_PROOF: &str = "client";
const SERVER_PROOF: &str = "server";
const KEY_CLIENT_TO_SERVER: &str = "key client-to-server";
const KEY_SERVER_TO_CLIENT: &str = "key server-to-client";

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

    /// `HMAC-SHA256(key, "siplb-perf/2 " + purpose + " " + data)`.
    fn prf(&self, purpose: &str, data: &str) -> Hmac<Sha256> {
        let mut m =
            <Hmac<Sha256> as Mac>::new_from_slice(&self.0).expect("HMAC takes any key length");
        m.update(b"siplb-perf/2 ");
        m.update(purpose.as_bytes());
        m.update(b" ");
        m.update(data.as_bytes());
        m
    }

    /// The proof over `data` (a [`transcript`]) for `purpose` (`client` or
    /// `server`), hex.
    #[must_use]
    pub fn sign(&self, purpose: &str, data: &str) -> String {
        hex::encode(self.prf(purpose, data).finalize().into_bytes())
    }

    /// Checks a proof in constant time.
    #[must_use]
    pub fn verify(&self, purpose: &str, data: &str, mac_hex: &str) -> bool {
        match hex::decode(mac_hex) {
            Ok(mac) => self.prf(purpose, data).verify_slice(&mac).is_ok(),
            Err(_) => false,
        }
    }

    fn derive(&self, purpose: &str, data: &str) -> SessionKey {
        SessionKey(self.prf(purpose, data).finalize().into_bytes().into())
    }
}

/// What both proofs and both session keys of a connection are computed over:
/// the accepting side's role and both challenges, in the order they crossed
/// the wire. The challenges have a fixed length, so this is unambiguous.
#[must_use]
pub fn transcript(role: &str, hello_challenge: &str, auth_challenge: &str) -> String {
    format!("{role} {hello_challenge} {auth_challenge}")
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

/// Whether `s` has the shape of a challenge: 32 lowercase hex digits.
fn is_challenge(s: &str) -> bool {
    s.len() == 32 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// Bytes of the MAC carried by a sealed line: HMAC-SHA256 truncated to its
/// first 128 bits (RFC 2104 section 5, as HMAC-SHA-256-128 in RFC 4868).
pub const TAG_LEN: usize = 16;

/// A per-session, per-direction key (32 bytes).
#[derive(Clone)]
struct SessionKey([u8; 32]);

impl std::fmt::Debug for SessionKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SessionKey(..)")
    }
}

impl SessionKey {
    /// `HMAC-SHA256(session key, decimal seq + " " + body)`.
    fn mac(&self, seq: u64, body: &[u8]) -> Hmac<Sha256> {
        let mut m =
            <Hmac<Sha256> as Mac>::new_from_slice(&self.0).expect("HMAC takes any key length");
        m.update(seq.to_string().as_bytes());
        m.update(b" ");
        m.update(body);
        m
    }
}

/// The sending half of a session: numbers and seals each message.
#[derive(Debug)]
pub struct Sealer {
    key: SessionKey,
    next: u64,
}

impl Sealer {
    /// The sealed line of the next message, `\n` included:
    /// `{"seq":N,"msg":<msg>,"mac":"<32 hex>"}`.
    ///
    /// # Errors
    /// [`Error::Malformed`] when the message cannot be serialized.
    pub fn seal(&mut self, msg: &Msg) -> Result<Vec<u8>> {
        let body = serde_json::to_vec(msg).map_err(|e| Error::Malformed(e.to_string()))?;
        Ok(self.seal_body(&body))
    }

    /// Seals `body`, which must be one JSON value.
    fn seal_body(&mut self, body: &[u8]) -> Vec<u8> {
        let seq = self.next;
        self.next += 1;
        let tag = self.key.mac(seq, body).finalize().into_bytes();
        let mut line = Vec::with_capacity(body.len() + 80);
        line.extend_from_slice(b"{\"seq\":");
        line.extend_from_slice(seq.to_string().as_bytes());
        line.extend_from_slice(b",\"msg\":");
        line.extend_from_slice(body);
        line.extend_from_slice(b",\"mac\":\"");
        line.extend_from_slice(hex::encode(&tag[..TAG_LEN]).as_bytes());
        line.extend_from_slice(b"\"}\n");
        line
    }
}

/// A sealed line as it arrives; `msg` keeps its exact bytes.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Envelope<'a> {
    seq: u64,
    #[serde(borrow)]
    msg: &'a RawValue,
    mac: String,
}

/// The receiving half of a session: checks each line's MAC, then its
/// sequence number, then parses the message.
#[derive(Debug)]
pub struct Opener {
    key: SessionKey,
    next: u64,
}

impl Opener {
    /// The message of the next sealed line (without its `\n`). A line that
    /// fails leaves the state as it was; the caller closes the connection.
    ///
    /// # Errors
    /// [`Error::MessageAuth`] for a line that is not sealed or whose MAC is
    /// wrong (altered, forged, from another session or the other direction),
    /// [`Error::Replay`] for a sequence number already received,
    /// [`Error::OutOfOrder`] for one beyond the next (a message was
    /// removed), [`Error::Malformed`] for an authentic line that is not a
    /// message.
    pub fn open(&mut self, line: &[u8]) -> Result<Msg> {
        let env: Envelope<'_> = serde_json::from_slice(line).map_err(|_| {
            Error::MessageAuth("line is not sealed (no valid seq, msg and mac)".into())
        })?;
        let body = env.msg.get().as_bytes();
        // Lowercase only, as sealed: then no byte of a line can change
        // without the line being refused.
        let lowercase = env.mac.len() == 2 * TAG_LEN
            && env
                .mac
                .bytes()
                .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
        let authentic = lowercase
            && hex::decode(&env.mac).is_ok_and(|tag| {
                self.key
                    .mac(env.seq, body)
                    .verify_truncated_left(&tag)
                    .is_ok()
            });
        if !authentic {
            return Err(Error::MessageAuth(format!(
                "bad MAC on message {}",
                env.seq
            )));
        }
        match env.seq.cmp(&self.next) {
            std::cmp::Ordering::Less => Err(Error::Replay {
                seq: env.seq,
                expected: self.next,
            }),
            std::cmp::Ordering::Greater => Err(Error::OutOfOrder {
                seq: env.seq,
                expected: self.next,
            }),
            std::cmp::Ordering::Equal => {
                self.next += 1;
                serde_json::from_slice(body).map_err(|e| Error::Malformed(e.to_string()))
            }
        }
    }
}

/// Which end of the connection a session is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    /// Sent `hello` (agent, performance server to its subscribers).
    Accepting,
    /// Sent `auth` (performance client, subscriber).
    Connecting,
}

/// What a handshake establishes: the accepting side's role and the two
/// halves of the session, to wrap the connection's halves in
/// ([`Session::attach`]).
#[derive(Debug)]
pub struct Session {
    /// The accepting side's role (`agent` or `perf-server`).
    pub role: String,
    send: Sealer,
    recv: Opener,
}

impl Session {
    fn new(key: &Key, role: &str, transcript: &str, side: Side) -> Session {
        let c2s = key.derive(KEY_CLIENT_TO_SERVER, transcript);
        let s2c = key.derive(KEY_SERVER_TO_CLIENT, transcript);
        let (send, recv) = match side {
            Side::Accepting => (s2c, c2s),
            Side::Connecting => (c2s, s2c),
        };
        Session {
            role: role.to_owned(),
            send: Sealer { key: send, next: 1 },
            recv: Opener { key: recv, next: 1 },
        }
    }

    /// One end of a session keyed from `transcript` without a handshake, for
    /// fuzzing the message layer (`accepting`: the agent's end).
    #[doc(hidden)]
    #[must_use]
    pub fn for_fuzzing(key: &Key, role: &str, transcript: &str, accepting: bool) -> Session {
        let side = if accepting {
            Side::Accepting
        } else {
            Side::Connecting
        };
        Session::new(key, role, transcript, side)
    }

    /// The two halves, for code that frames lines itself.
    #[must_use]
    pub fn split(self) -> (Sealer, Opener) {
        (self.send, self.recv)
    }

    /// Wraps the connection's halves: every later message goes through these.
    pub fn attach<R, W>(self, r: LineReader<R>, w: W) -> (Reader<R>, Writer<W>) {
        (
            Reader {
                lines: r,
                open: self.recv,
            },
            Writer {
                inner: w,
                seal: self.send,
            },
        )
    }
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

    /// The next line without its end and surrounding whitespace, or `None`
    /// at a clean end of stream.
    ///
    /// # Errors
    /// [`Error::LineTooLong`], or the socket's error.
    /// Not cancel-safe.
    pub async fn next_line(&mut self) -> Result<Option<&[u8]>> {
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
        Ok(Some(self.buf.trim_ascii()))
    }

    /// The next message in clear (the handshake), or `None` at a clean end
    /// of stream.
    ///
    /// # Errors
    /// [`Error::LineTooLong`], [`Error::Malformed`], or the socket's error.
    /// Not cancel-safe: run it in its own task when racing it against timers.
    pub async fn next(&mut self) -> Result<Option<Msg>> {
        match self.next_line().await? {
            None => Ok(None),
            Some(line) => serde_json::from_slice(line)
                .map(Some)
                .map_err(|e| Error::Malformed(e.to_string())),
        }
    }
}

/// The receiving half of an established session: sealed lines, opened.
#[derive(Debug)]
pub struct Reader<R> {
    lines: LineReader<R>,
    open: Opener,
}

impl<R: AsyncRead + Unpin> Reader<R> {
    /// The next message, or `None` at a clean end of stream.
    ///
    /// # Errors
    /// What [`Opener::open`] and [`LineReader::next_line`] return.
    /// Not cancel-safe: run it in its own task when racing it against timers.
    pub async fn next(&mut self) -> Result<Option<Msg>> {
        match self.lines.next_line().await? {
            None => Ok(None),
            Some(line) => self.open.open(line).map(Some),
        }
    }
}

/// The sending half of an established session.
#[derive(Debug)]
pub struct Writer<W> {
    inner: W,
    seal: Sealer,
}

impl<W: AsyncWrite + Unpin> Writer<W> {
    /// Seals and writes one message as one line.
    ///
    /// # Errors
    /// The socket's error.
    pub async fn send(&mut self, msg: &Msg) -> Result<()> {
        let line = self.seal.seal(msg)?;
        self.inner.write_all(&line).await?;
        Ok(())
    }

    /// Sends a closing `error` (best effort, within `limit`) so the peer
    /// learns why; not after socket trouble or the peer's own close.
    pub async fn send_error(&mut self, err: &Error, limit: std::time::Duration) {
        if matches!(err, Error::Io(_) | Error::Closed | Error::Peer(_)) {
            return;
        }
        let msg = Msg::Error {
            error: err.to_string(),
        };
        let _ = tokio::time::timeout(limit, self.send(&msg)).await;
    }
}

/// Reads messages in a task of its own and hands them over a channel:
/// [`Reader::next`] is not cancel-safe, a channel receive is, so the
/// caller can race it against timers. The stream of items ends after the
/// first error or end of stream.
pub fn spawn_reader<R>(
    mut r: Reader<R>,
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

/// Writes one message in clear as one line: handshake lines, and the
/// `error` that refuses a connection before or during the handshake.
///
/// # Errors
/// The socket's error.
pub async fn write_msg<W: AsyncWrite + Unpin>(w: &mut W, msg: &Msg) -> Result<()> {
    let mut line = serde_json::to_vec(msg).map_err(|e| Error::Malformed(e.to_string()))?;
    line.push(b'\n');
    w.write_all(&line).await?;
    Ok(())
}

/// How the peer and this side are named in messages, for a connection to
/// the accepting `role`, on the accepting side or not.
fn names(role: &str, side: Side) -> (&'static str, &'static str) {
    let (acceptor, connector) = match role {
        "agent" => ("agent", "performance server"),
        "perf-server" => ("performance server", "balancer"),
        _ => return ("peer", "side"),
    };
    match side {
        Side::Accepting => (connector, acceptor),
        Side::Connecting => (acceptor, connector),
    }
}

fn version_error(role: &str, side: Side, version: u32) -> Error {
    let (peer, us) = names(role, side);
    Error::Version { peer, us, version }
}

/// The version a version-1 peer says it speaks when it refuses our `hello`:
/// its error reads "unsupported protocol version 2 (this side speaks 1)".
fn refused_version(error: &str) -> Option<u32> {
    let (_, v) = error.rsplit_once("(this side speaks ")?;
    v.strip_suffix(')')?.parse().ok()
}

async fn refuse<W: AsyncWrite + Unpin>(w: &mut W, err: Error) -> Error {
    let _ = write_msg(
        w,
        &Msg::Error {
            error: err.to_string(),
        },
    )
    .await;
    err
}

/// Runs the accepting side of the handshake: `hello`, check `auth`,
/// `welcome`; returns the session.
///
/// # Errors
/// [`Error::Auth`] for a wrong key, [`Error::Version`], or a protocol error;
/// an `error` line has been sent to the peer where it helps.
pub async fn accept_handshake<R, W>(
    r: &mut LineReader<R>,
    w: &mut W,
    key: &Key,
    role: &str,
) -> Result<Session>
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
    let err = match r.next().await {
        Ok(Some(Msg::Auth {
            version,
            mac,
            challenge,
        })) => {
            let t = transcript(role, &ours, &challenge);
            if version != VERSION {
                version_error(role, Side::Accepting, version)
            } else if !is_challenge(&challenge) {
                Error::Malformed("the auth challenge must be 32 lowercase hex digits".into())
            } else if !key.verify(CLIENT_PROOF, &t, &mac) {
                Error::Auth
            } else {
                let mac = key.sign(SERVER_PROOF, &t);
                write_msg(w, &Msg::Welcome { mac }).await?;
                return Ok(Session::new(key, role, &t, Side::Accepting));
            }
        }
        // A version-1 peer refuses our hello: say so in our terms.
        Ok(Some(Msg::Error { error })) => {
            return Err(match refused_version(&error) {
                Some(version) if version != VERSION => {
                    version_error(role, Side::Accepting, version)
                }
                _ => Error::Peer(error),
            });
        }
        Ok(Some(_)) => Error::Unexpected("expected auth"),
        Ok(None) => Error::Closed,
        Err(e) => e,
    };
    Err(refuse(w, err).await)
}

/// Runs the connecting side of the handshake with a peer expected to have
/// `role` (`agent` or `perf-server`); returns the session.
///
/// # Errors
/// [`Error::Version`] when the peer speaks another version,
/// [`Error::Role`] when it is not what was expected, [`Error::Auth`] when its
/// proof is wrong (it does not hold the key), [`Error::Peer`] when the peer
/// refused us, or a protocol error; an `error` line has been sent to the
/// peer where it helps.
pub async fn connect_handshake<R, W>(
    r: &mut LineReader<R>,
    w: &mut W,
    key: &Key,
    role: &str,
) -> Result<Session>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let theirs = match r.next().await? {
        Some(Msg::Hello {
            version,
            role: found,
            challenge,
        }) => {
            if version != VERSION {
                let err = version_error(role, Side::Connecting, version);
                return Err(refuse(w, err).await);
            }
            if found != role {
                let err = Error::Role {
                    expected: role.to_owned(),
                    found,
                };
                return Err(refuse(w, err).await);
            }
            if !is_challenge(&challenge) {
                let err =
                    Error::Malformed("the hello challenge must be 32 lowercase hex digits".into());
                return Err(refuse(w, err).await);
            }
            challenge
        }
        Some(Msg::Error { error }) => return Err(Error::Peer(error)),
        Some(_) => return Err(Error::Unexpected("expected hello")),
        None => return Err(Error::Closed),
    };
    let ours = challenge();
    let t = transcript(role, &theirs, &ours);
    write_msg(
        w,
        &Msg::Auth {
            version: VERSION,
            mac: key.sign(CLIENT_PROOF, &t),
            challenge: ours,
        },
    )
    .await?;
    match r.next().await? {
        Some(Msg::Welcome { mac }) if key.verify(SERVER_PROOF, &t, &mac) => {
            Ok(Session::new(key, role, &t, Side::Connecting))
        }
        Some(Msg::Welcome { .. }) => Err(Error::Auth),
        Some(Msg::Error { error }) => Err(Error::Peer(error)),
        Some(_) => Err(Error::Unexpected("expected welcome")),
        None => Err(Error::Closed),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PSK: &[u8] = b"siplb-example-key-change-me-0123456789";
    const HELLO_CH: &str = "eca85bb6e4440848b6d0f089f082184d";
    const AUTH_CH: &str = "0123456789abcdef0123456789abcdef";

    /// Both ends of one session, without a handshake.
    fn pair() -> (Session, Session) {
        let key = Key::new(PSK).unwrap();
        let t = transcript("agent", HELLO_CH, AUTH_CH);
        (
            Session::new(&key, "agent", &t, Side::Connecting),
            Session::new(&key, "agent", &t, Side::Accepting),
        )
    }

    fn line(mut l: Vec<u8>) -> Vec<u8> {
        assert_eq!(l.pop(), Some(b'\n'));
        l
    }

    fn sample() -> Sample {
        Sample {
            seq: 9,
            window_end_ms: 1_795_792_410_144,
            window_ms: 500,
            cpus: 1.0,
            cpu: 0.12,
            mem_available: 2_147_483_648,
            mem_total: 8_589_934_592,
        }
    }

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
    fn proofs_verify_only_with_the_same_key_purpose_and_transcript() {
        let k = Key::new(b"0123456789abcdef-secret").unwrap();
        let other = Key::new(b"0123456789abcdef-other!").unwrap();
        let t = transcript("agent", HELLO_CH, AUTH_CH);
        let mac = k.sign(CLIENT_PROOF, &t);
        assert!(k.verify(CLIENT_PROOF, &t, &mac));
        assert!(!k.verify(SERVER_PROOF, &t, &mac));
        assert!(!k.verify(
            CLIENT_PROOF,
            &transcript("perf-server", HELLO_CH, AUTH_CH),
            &mac
        ));
        assert!(!k.verify(CLIENT_PROOF, &transcript("agent", AUTH_CH, HELLO_CH), &mac));
        assert!(!other.verify(CLIENT_PROOF, &t, &mac));
        assert!(!k.verify(CLIENT_PROOF, &t, "not hex"));
        assert!(Key::new(b"short").is_err());
        assert!(is_challenge(HELLO_CH) && is_challenge(&challenge()));
        assert!(!is_challenge("0123456789abcdef") && !is_challenge(&HELLO_CH.to_uppercase()));
    }

    /// The values of the by-hand session in docs/protocol.md, computed there
    /// with openssl: the same here.
    #[test]
    fn known_answers_match_the_by_hand_session_in_the_docs() {
        let key = Key::new(PSK).unwrap();
        let t = transcript("agent", HELLO_CH, AUTH_CH);
        assert_eq!(
            key.sign(CLIENT_PROOF, &t),
            "f6e5e10b9ce05087909c73c280bae1a098e8136988fd05b5a740f86129f636e6"
        );
        assert_eq!(
            key.sign(SERVER_PROOF, &t),
            "76658fc1c6768619298666a54e63de307b5b991fb1210173483a3f96f53f6b96"
        );
        let (client, agent) = pair();
        assert_eq!(
            hex::encode(client.send.key.0),
            "a9f0b399868f8ffbee67347adac43b53d51fa982f26d5d0dfaae45239fa73738"
        );
        assert_eq!(
            hex::encode(agent.send.key.0),
            "2d9a9fcb3b051d6e89745174b34dbde0c597c9eb5120cdc761dc00422e658071"
        );
        let (mut seal, _) = client.split();
        assert_eq!(
            String::from_utf8(seal.seal(&Msg::Get { id: 1 }).unwrap()).unwrap(),
            "{\"seq\":1,\"msg\":{\"type\":\"get\",\"id\":1},\"mac\":\"28ce2093f3da745bf484f92225146b5d\"}\n"
        );
    }

    #[test]
    fn sealed_lines_go_both_ways_in_sequence() {
        let (client, agent) = pair();
        let ((mut cs, mut co), (mut as_, mut ao)) = (client.split(), agent.split());
        for id in 1..=3 {
            let get = line(cs.seal(&Msg::Get { id }).unwrap());
            assert!(get.starts_with(format!("{{\"seq\":{id},").as_bytes()));
            assert_eq!(ao.open(&get).unwrap(), Msg::Get { id });
            let data = Msg::Data {
                id,
                sample: Some(sample()),
            };
            assert_eq!(co.open(&line(as_.seal(&data).unwrap())).unwrap(), data);
        }
        // Whitespace around the fields, as someone typing might leave, is fine:
        // the MAC covers the bytes of `msg` from its `{` to its `}`.
        let sealed = String::from_utf8(line(cs.seal(&Msg::Get { id: 4 }).unwrap())).unwrap();
        let spaced = sealed
            .replace("{\"seq\"", "{ \"seq\" ")
            .replace(",\"msg\":", " , \"msg\" :  ");
        assert_eq!(ao.open(spaced.as_bytes()).unwrap(), Msg::Get { id: 4 });
    }

    #[test]
    fn a_flipped_bit_anywhere_is_refused_and_changes_nothing() {
        let (_, agent) = pair();
        let (mut seal, _) = agent.split();
        let (client, _) = pair();
        let (_, mut open) = client.split();
        let data = Msg::Data {
            id: 1,
            sample: Some(sample()),
        };
        let good = line(seal.seal(&data).unwrap());
        for i in 0..good.len() {
            for bit in (0..8).map(|b| 1u8 << b) {
                let mut bad = good.clone();
                bad[i] ^= bit;
                match open.open(&bad) {
                    Err(Error::MessageAuth(_)) => {}
                    other => panic!(
                        "byte {i} ^ {bit:#x} ({:?}): {other:?}",
                        String::from_utf8_lossy(&bad)
                    ),
                }
            }
        }
        // A forged value with a recomputed-looking MAC is no better.
        let forged = String::from_utf8(good.clone())
            .unwrap()
            .replace("\"cpu\":0.12", "\"cpu\":0.92");
        assert!(matches!(
            open.open(forged.as_bytes()),
            Err(Error::MessageAuth(ref m)) if m == "bad MAC on message 1"
        ));
        assert_eq!(
            Error::MessageAuth("bad MAC on message 1".into()).to_string(),
            "message authentication failed: bad MAC on message 1"
        );
        // None of that moved the sequence on.
        assert_eq!(open.open(&good).unwrap(), data);
    }

    #[test]
    fn replayed_reordered_and_removed_messages_are_refused() {
        let (client, agent) = pair();
        let (mut seal, _) = client.split();
        let (_, mut open) = agent.split();
        let l: Vec<Vec<u8>> = (1..=4)
            .map(|id| line(seal.seal(&Msg::Get { id }).unwrap()))
            .collect();
        open.open(&l[0]).unwrap();
        open.open(&l[1]).unwrap();
        let e = open.open(&l[0]).unwrap_err();
        assert!(
            matches!(
                e,
                Error::Replay {
                    seq: 1,
                    expected: 3
                }
            ),
            "{e}"
        );
        assert!(e.to_string().starts_with("replayed message"), "{e}");
        assert!(matches!(
            open.open(&l[1]),
            Err(Error::Replay {
                seq: 2,
                expected: 3
            })
        ));
        // 4 before 3: out of order (3 was removed or delayed).
        let e = open.open(&l[3]).unwrap_err();
        assert!(
            matches!(
                e,
                Error::OutOfOrder {
                    seq: 4,
                    expected: 3
                }
            ),
            "{e}"
        );
        assert!(e.to_string().starts_with("message out of order"), "{e}");
        // A sequence number changed to the expected one breaks the MAC.
        let renumbered =
            String::from_utf8(l[3].clone())
                .unwrap()
                .replacen("\"seq\":4", "\"seq\":3", 1);
        assert!(matches!(
            open.open(renumbered.as_bytes()),
            Err(Error::MessageAuth(_))
        ));
        open.open(&l[2]).unwrap();
        open.open(&l[3]).unwrap();
    }

    #[test]
    fn a_line_for_the_other_direction_or_another_session_is_refused() {
        let (client, agent) = pair();
        let ((mut cs, mut co), (mut as_, mut ao)) = (client.split(), agent.split());
        // Reflected back to its sender: the other direction's key.
        let get = line(cs.seal(&Msg::Get { id: 1 }).unwrap());
        assert!(matches!(co.open(&get), Err(Error::MessageAuth(_))));
        let data = line(
            as_.seal(&Msg::Data {
                id: 1,
                sample: None,
            })
            .unwrap(),
        );
        assert!(matches!(ao.open(&data), Err(Error::MessageAuth(_))));
        // Same key, same role, another handshake: other session keys.
        let key = Key::new(PSK).unwrap();
        let t2 = transcript("agent", HELLO_CH, &challenge());
        let (_, mut other) = Session::new(&key, "agent", &t2, Side::Accepting).split();
        assert!(matches!(other.open(&get), Err(Error::MessageAuth(_))));
        // A v1-style bare message after the handshake.
        let e = ao.open(br#"{"type":"get","id":1}"#).unwrap_err();
        assert!(matches!(e, Error::MessageAuth(_)), "{e}");
        assert!(matches!(ao.open(b"garbage"), Err(Error::MessageAuth(_))));
        assert!(matches!(
            ao.open(br#"{"seq":1,"msg":{"type":"get","id":1},"mac":"00"}"#),
            Err(Error::MessageAuth(_))
        ));
        assert_eq!(ao.open(&get).unwrap(), Msg::Get { id: 1 });
    }

    #[tokio::test]
    async fn handshake_both_ways_then_sealed_messages() {
        let key = Key::new(b"0123456789abcdef-secret").unwrap();
        let (a, b) = tokio::io::duplex(4096);
        let (ar, mut aw) = tokio::io::split(a);
        let (br, mut bw) = tokio::io::split(b);
        let k2 = key.clone();
        let server = tokio::spawn(async move {
            let mut r = LineReader::new(ar, MAX_LINE);
            let s = accept_handshake(&mut r, &mut aw, &k2, "agent").await?;
            let (mut r, mut w) = s.attach(r, aw);
            let got = r.next().await?;
            w.send(&Msg::Data {
                id: 5,
                sample: None,
            })
            .await?;
            Ok::<_, Error>(got)
        });
        let mut r = LineReader::new(br, MAX_LINE);
        let s = connect_handshake(&mut r, &mut bw, &key, "agent")
            .await
            .unwrap();
        assert_eq!(s.role, "agent");
        let (mut r, mut w) = s.attach(r, bw);
        w.send(&Msg::Get { id: 5 }).await.unwrap();
        assert_eq!(
            r.next().await.unwrap(),
            Some(Msg::Data {
                id: 5,
                sample: None
            })
        );
        assert_eq!(server.await.unwrap().unwrap(), Some(Msg::Get { id: 5 }));
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
            accept_handshake(&mut r, &mut aw, &key, "agent")
                .await
                .map(|_| ())
        });
        let mut r = LineReader::new(br, MAX_LINE);
        let client = connect_handshake(&mut r, &mut bw, &wrong, "agent")
            .await
            .unwrap_err();
        assert!(
            matches!(client, Error::Peer(ref e) if e == "authentication failed"),
            "{client}"
        );
        assert!(matches!(server.await.unwrap(), Err(Error::Auth)));
    }

    /// A version-1 agent's hello: the connecting side refuses it, says why
    /// in an `error` line, and never sends `auth`.
    #[tokio::test]
    async fn a_v1_hello_is_refused_with_a_clear_error() {
        let key = Key::new(PSK).unwrap();
        let (a, b) = tokio::io::duplex(4096);
        let (ar, mut aw) = tokio::io::split(a);
        let (br, mut bw) = tokio::io::split(b);
        let old = tokio::spawn(async move {
            let hello = format!(
                "{{\"type\":\"hello\",\"version\":1,\"role\":\"agent\",\"challenge\":\"{HELLO_CH}\"}}\n"
            );
            aw.write_all(hello.as_bytes()).await.unwrap();
            let mut r = LineReader::new(ar, MAX_LINE);
            r.next().await
        });
        let mut r = LineReader::new(br, MAX_LINE);
        let e = connect_handshake(&mut r, &mut bw, &key, "agent")
            .await
            .unwrap_err();
        let want = "agent speaks protocol v1; this performance server needs v2 (upgrade the agent)";
        assert_eq!(e.to_string(), want);
        drop(bw);
        assert_eq!(
            old.await.unwrap().unwrap(),
            Some(Msg::Error { error: want.into() })
        );
        // The other way round, seen by a balancer subscribing to an old
        // performance server, and a peer newer than us.
        let e = version_error("perf-server", Side::Connecting, 1);
        assert_eq!(
            e.to_string(),
            "performance server speaks protocol v1; this balancer needs v2 (upgrade the performance server)"
        );
        let e = Error::Version {
            peer: "agent",
            us: "performance server",
            version: 3,
        };
        assert_eq!(
            e.to_string(),
            "agent speaks protocol v3; this performance server speaks v2 (upgrade this performance server)"
        );
    }

    /// A version-1 performance server at our agent: its `auth` says version
    /// 1 and it gets the error line; if it refuses our hello first (as v1
    /// code does), the agent reports that in the same words.
    #[tokio::test]
    async fn a_v1_auth_or_refusal_is_reported_as_a_version_error() {
        let key = Key::new(PSK).unwrap();
        for old_says in [
            r#"{"type":"auth","version":1,"mac":"00","challenge":"0123456789abcdef"}"#.to_owned()
                + "\n",
            r#"{"type":"error","error":"unsupported protocol version 2 (this side speaks 1)"}"#
                .to_owned()
                + "\n",
        ] {
            let (a, b) = tokio::io::duplex(4096);
            let (ar, mut aw) = tokio::io::split(a);
            let (br, mut bw) = tokio::io::split(b);
            let k = key.clone();
            let agent = tokio::spawn(async move {
                let mut r = LineReader::new(ar, MAX_LINE);
                accept_handshake(&mut r, &mut aw, &k, "agent")
                    .await
                    .map(|_| ())
            });
            let mut r = LineReader::new(br, MAX_LINE);
            assert!(matches!(
                r.next().await.unwrap(),
                Some(Msg::Hello { version: 2, .. })
            ));
            bw.write_all(old_says.as_bytes()).await.unwrap();
            let e = agent.await.unwrap().unwrap_err();
            let want = "performance server speaks protocol v1; this agent needs v2 (upgrade the performance server)";
            assert_eq!(e.to_string(), want);
            if old_says.contains("auth") {
                assert_eq!(
                    r.next().await.unwrap(),
                    Some(Msg::Error { error: want.into() })
                );
            }
        }
    }

    #[tokio::test]
    async fn a_peer_of_the_wrong_role_is_refused() {
        let key = Key::new(PSK).unwrap();
        let (a, b) = tokio::io::duplex(4096);
        let (ar, mut aw) = tokio::io::split(a);
        let (br, mut bw) = tokio::io::split(b);
        let k = key.clone();
        let server = tokio::spawn(async move {
            let mut r = LineReader::new(ar, MAX_LINE);
            accept_handshake(&mut r, &mut aw, &k, "perf-server")
                .await
                .map(|_| ())
        });
        let mut r = LineReader::new(br, MAX_LINE);
        let e = connect_handshake(&mut r, &mut bw, &key, "agent")
            .await
            .unwrap_err();
        assert!(matches!(e, Error::Role { .. }), "{e}");
        assert!(server.await.unwrap().is_err());
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

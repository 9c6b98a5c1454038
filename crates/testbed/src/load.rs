//! `siplb load`: a SIP load generator built to cost as little as possible per
//! call, so that the balancer (not the harness) is what a ceiling run finds.
//!
//! Plain std threads and blocking `std::net::UdpSocket`s, no runtime: the UAC
//! runs one thread per client socket, each with its own calls, pacing and
//! timers (nothing shared between threads until the report); the UAS is one
//! thread on one socket. Messages are written from fixed pieces into reused
//! buffers; a response is matched by scanning (memchr) for its status,
//! Call-ID, CSeq and To tag, never by a full parse. A call's number is in its
//! Call-ID (`<n>.<socket>.<run>@siplb-load`), so its state is found by index in
//! a window of the calls in flight, with no hashing.
//!
//! Each call: INVITE, (180,) 200, ACK, BYE, 200. INVITE and BYE are
//! retransmitted on RFC 3261 timers A and E (T1 doubling; BYE capped at T2),
//! at most `max_retrans` times, and a call fails when a transaction is not
//! answered within `timeout` or is answered with a non-2xx. A 2xx to INVITE
//! that arrives again (a retransmission by the UAS, or one reordered behind
//! the BYE's answer) is ACKed again and counted. The UAS answers INVITE with
//! 180 and 200 and retransmits the 200 until the ACK (timer G), BYE and any
//! other request with 200, always to the datagram's source address: what a
//! UAS behind a proxy does with `rport`.
//!
//! Time: the generator reads the wall clock (it is a shell, not a core); CPU
//! is utime+stime of the whole process from `/proc/self/stat`.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use memchr::memmem;

/// RFC 3261 T2: the longest interval between retransmissions of a non-INVITE
/// request or of a 2xx to INVITE.
const T2: Duration = Duration::from_secs(4);

/// The largest UDP datagram.
const MAX_DATAGRAM: usize = 65_535;

/// How many calls one UAC thread starts before it reads again, when it is
/// late on its schedule.
const MAX_BURST: u64 = 256;

/// A small SDP offer/answer, about the size of SIPp's.
const SDP: &[u8] = b"v=0\r\no=load 53655765 2353687637 IN IP4 127.0.0.1\r\ns=-\r\n\
c=IN IP4 127.0.0.1\r\nt=0 0\r\nm=audio 6000 RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\n";

// ------------------------------------------------------------------ UAC

/// What `siplb load uac` runs.
#[derive(Debug, Clone)]
pub struct UacConfig {
    /// Where every request goes (the balancer, a relay, or the UAS).
    pub target: SocketAddr,
    /// The local address of the client sockets.
    pub local_ip: IpAddr,
    /// The first client socket's port (0: any); socket i binds this + i.
    pub local_port: u16,
    /// Client sockets, one thread each.
    pub sockets: usize,
    /// New calls per second, over all sockets.
    pub rate: f64,
    /// Calls to place.
    pub calls: u64,
    /// A transaction (INVITE or BYE) unanswered this long fails its call.
    pub timeout: Duration,
    /// RFC 3261 T1.
    pub t1: Duration,
    /// Retransmissions of one request at most.
    pub max_retrans: u32,
}

/// Why calls failed, by reason.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Failures {
    /// No final response to INVITE within the timeout.
    pub invite_timeout: u64,
    /// No final response to BYE within the timeout.
    pub bye_timeout: u64,
    /// INVITE answered with a non-2xx final response.
    pub invite_rejected: u64,
    /// BYE answered with a non-2xx final response.
    pub bye_rejected: u64,
}

impl Failures {
    /// All failed calls.
    #[must_use]
    pub fn total(&self) -> u64 {
        self.invite_timeout + self.bye_timeout + self.invite_rejected + self.bye_rejected
    }

    fn add(&mut self, o: &Failures) {
        self.invite_timeout += o.invite_timeout;
        self.bye_timeout += o.bye_timeout;
        self.invite_rejected += o.invite_rejected;
        self.bye_rejected += o.bye_rejected;
    }
}

/// What a UAC run did.
#[derive(Debug, Clone)]
pub struct UacReport {
    /// The configured rate, calls/s.
    pub offered: f64,
    /// Calls completed per second of the sending window (first INVITE to
    /// last first INVITE, plus one interval).
    pub achieved: f64,
    /// Calls started.
    pub calls: u64,
    /// Calls that completed (200 to INVITE and to BYE).
    pub ok: u64,
    /// Calls that failed.
    pub failed: Failures,
    /// INVITE retransmissions.
    pub invite_retrans: u64,
    /// BYE retransmissions.
    pub bye_retrans: u64,
    /// 2xx to INVITE received again and ACKed again.
    pub reacks: u64,
    /// Responses that changed nothing (a provisional after the 200, a BYE's
    /// 200 again).
    pub duplicates: u64,
    /// Datagrams that were not a response to a call of this run.
    pub strays: u64,
    /// Errors sending (the call goes on; its timers retransmit).
    pub send_errors: u64,
    /// INVITE (first sent) to 200, median, ms.
    pub p50_ms: f64,
    /// INVITE (first sent) to 200, 99th percentile, ms.
    pub p99_ms: f64,
    /// Wall time of the run, s.
    pub elapsed_s: f64,
    /// CPU (user+system) of this process over the run, ms.
    pub cpu_ms: f64,
}

impl UacReport {
    /// The generator's CPU per 1,000 calls started.
    #[must_use]
    pub fn cpu_ms_per_1000(&self) -> f64 {
        if self.calls == 0 {
            0.0
        } else {
            self.cpu_ms * 1000.0 / self.calls as f64
        }
    }

    /// The report as one line of `key=value`.
    #[must_use]
    pub fn line(&self) -> String {
        let f = &self.failed;
        format!(
            "uac offered={:.0} achieved={:.0} calls={} ok={} failed={} invite_timeout={} \
             bye_timeout={} invite_rejected={} bye_rejected={} invite_retrans={} bye_retrans={} \
             reacks={} duplicates={} strays={} send_errors={} p50_ms={:.2} p99_ms={:.2} \
             elapsed_s={:.2} cpu_ms={:.0} cpu_ms_per_1000={:.1}",
            self.offered,
            self.achieved,
            self.calls,
            self.ok,
            f.total(),
            f.invite_timeout,
            f.bye_timeout,
            f.invite_rejected,
            f.bye_rejected,
            self.invite_retrans,
            self.bye_retrans,
            self.reacks,
            self.duplicates,
            self.strays,
            self.send_errors,
            self.p50_ms,
            self.p99_ms,
            self.elapsed_s,
            self.cpu_ms,
            self.cpu_ms_per_1000(),
        )
    }

    /// The report as JSON.
    #[must_use]
    pub fn json(&self) -> serde_json::Value {
        let f = &self.failed;
        serde_json::json!({
            "offered": self.offered,
            "achieved": self.achieved,
            "calls": self.calls,
            "ok": self.ok,
            "failed": f.total(),
            "failed_by": {
                "invite_timeout": f.invite_timeout,
                "bye_timeout": f.bye_timeout,
                "invite_rejected": f.invite_rejected,
                "bye_rejected": f.bye_rejected,
            },
            "invite_retrans": self.invite_retrans,
            "bye_retrans": self.bye_retrans,
            "reacks": self.reacks,
            "duplicates": self.duplicates,
            "strays": self.strays,
            "send_errors": self.send_errors,
            "p50_ms": self.p50_ms,
            "p99_ms": self.p99_ms,
            "elapsed_s": self.elapsed_s,
            "cpu_ms": self.cpu_ms,
            "cpu_ms_per_1000": self.cpu_ms_per_1000(),
        })
    }
}

/// Places `cfg.calls` calls at `cfg.rate` and waits for each to complete or
/// fail; bounded by the schedule plus the timeout.
///
/// # Errors
/// When a client socket cannot be bound.
pub fn run_uac(cfg: &UacConfig) -> io::Result<UacReport> {
    let sockets = cfg.sockets.max(1);
    let rate = cfg.rate.max(0.001);
    let run = run_id();
    let mut socks = Vec::with_capacity(sockets);
    for i in 0..sockets {
        let port = if cfg.local_port == 0 {
            0
        } else {
            cfg.local_port
                .checked_add(u16::try_from(i).unwrap_or(u16::MAX))
                .ok_or_else(|| io::Error::other("--local-port + --sockets passes 65535"))?
        };
        socks.push(bind_udp(
            SocketAddr::new(cfg.local_ip, port),
            Duration::from_millis(1),
        )?);
    }
    let cpu0 = cpu_ms();
    let t0 = Instant::now();
    let threads: Vec<_> = socks
        .into_iter()
        .enumerate()
        .map(|(i, sock)| {
            let n = cfg.calls / sockets as u64 + u64::from((i as u64) < cfg.calls % sockets as u64);
            let t = Thread {
                cfg: cfg.clone(),
                index: i,
                sockets,
                rate,
                calls: n,
                t0,
                run,
            };
            std::thread::spawn(move || t.run(&sock))
        })
        .collect();
    let mut stats = Stats::default();
    for t in threads {
        let s = t
            .join()
            .map_err(|_| io::Error::other("a UAC thread panicked"))??;
        stats.add(&s);
    }
    let elapsed = t0.elapsed();
    let cpu = cpu_ms().zip(cpu0).map_or(0.0, |(b, a)| b - a);
    let window = stats
        .last_first_send
        .map_or(0.0, |l| l.duration_since(t0).as_secs_f64())
        + 1.0 / rate;
    Ok(UacReport {
        offered: cfg.rate,
        achieved: if stats.calls == 0 {
            0.0
        } else {
            stats.ok as f64 / window
        },
        calls: stats.calls,
        ok: stats.ok,
        failed: stats.failed,
        invite_retrans: stats.invite_retrans,
        bye_retrans: stats.bye_retrans,
        reacks: stats.reacks,
        duplicates: stats.duplicates,
        strays: stats.strays,
        send_errors: stats.send_errors,
        p50_ms: stats.hist.quantile_us(0.50) / 1000.0,
        p99_ms: stats.hist.quantile_us(0.99) / 1000.0,
        elapsed_s: elapsed.as_secs_f64(),
        cpu_ms: cpu,
    })
}

/// One UAC thread's counts.
#[derive(Debug, Default)]
struct Stats {
    calls: u64,
    ok: u64,
    failed: Failures,
    invite_retrans: u64,
    bye_retrans: u64,
    reacks: u64,
    duplicates: u64,
    strays: u64,
    send_errors: u64,
    last_first_send: Option<Instant>,
    hist: Hist,
}

impl Stats {
    fn add(&mut self, o: &Stats) {
        self.calls += o.calls;
        self.ok += o.ok;
        self.failed.add(&o.failed);
        self.invite_retrans += o.invite_retrans;
        self.bye_retrans += o.bye_retrans;
        self.reacks += o.reacks;
        self.duplicates += o.duplicates;
        self.strays += o.strays;
        self.send_errors += o.send_errors;
        self.last_first_send = match (self.last_first_send, o.last_first_send) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        };
        self.hist.add(&o.hist);
    }
}

/// Where a call is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// INVITE sent, nothing heard: retransmitting.
    Inviting,
    /// A provisional heard: waiting for the final response.
    Proceeding,
    /// ACK and BYE sent: waiting for the BYE's final response.
    Closing,
    /// Completed or failed.
    Done,
}

#[derive(Debug)]
struct Call {
    phase: Phase,
    /// When the current transaction's request was first sent.
    sent: Instant,
    /// Retransmissions of the current request so far.
    retrans: u32,
    /// The To tag of the 200 (for BYE retransmissions).
    to_tag: Vec<u8>,
}

/// A timer: at `at`, call `call` (its `retrans` count then `attempt`).
#[derive(Debug, Clone, Copy)]
struct Timer {
    at: Instant,
    call: u64,
    attempt: u32,
}

/// A UAC thread: one socket, its share of the calls.
#[derive(Debug)]
struct Thread {
    cfg: UacConfig,
    index: usize,
    sockets: usize,
    rate: f64,
    calls: u64,
    t0: Instant,
    run: u32,
}

/// The fixed pieces of this thread's requests.
#[derive(Debug)]
struct Writer {
    target: Vec<u8>,
    local: Vec<u8>,
    /// `.<socket>.<run>`: the tail of every call's id.
    tail: Vec<u8>,
}

impl Writer {
    /// `<n>.<socket>.<run>`.
    fn id(&self, out: &mut Vec<u8>, n: u64) {
        push_u64(out, n);
        out.extend_from_slice(&self.tail);
    }

    /// A request of call `n`: `method`, Via branch suffix `b`, CSeq `cseq`
    /// (`1 INVITE`), the To tag when in a dialog, SDP on INVITE.
    fn request(
        &self,
        out: &mut Vec<u8>,
        method: &[u8],
        n: u64,
        b: &[u8],
        cseq: &[u8],
        to_tag: Option<&[u8]>,
    ) {
        out.clear();
        out.extend_from_slice(method);
        out.extend_from_slice(b" sip:service@");
        out.extend_from_slice(&self.target);
        out.extend_from_slice(b" SIP/2.0\r\nVia: SIP/2.0/UDP ");
        out.extend_from_slice(&self.local);
        out.extend_from_slice(b";branch=z9hG4bK");
        self.id(out, n);
        out.extend_from_slice(b);
        out.extend_from_slice(b";rport\r\nMax-Forwards: 70\r\nFrom: <sip:load@");
        out.extend_from_slice(&self.local);
        out.extend_from_slice(b">;tag=");
        self.id(out, n);
        out.extend_from_slice(b"\r\nTo: <sip:service@");
        out.extend_from_slice(&self.target);
        out.push(b'>');
        if let Some(t) = to_tag {
            out.extend_from_slice(b";tag=");
            out.extend_from_slice(t);
        }
        out.extend_from_slice(b"\r\nCall-ID: ");
        self.id(out, n);
        out.extend_from_slice(b"@siplb-load\r\nCSeq: ");
        out.extend_from_slice(cseq);
        if method == b"INVITE" {
            out.extend_from_slice(b"\r\nContact: <sip:load@");
            out.extend_from_slice(&self.local);
            out.extend_from_slice(b">\r\nContent-Type: application/sdp\r\nContent-Length: ");
            push_u64(out, SDP.len() as u64);
            out.extend_from_slice(b"\r\n\r\n");
            out.extend_from_slice(SDP);
        } else {
            out.extend_from_slice(b"\r\nContent-Length: 0\r\n\r\n");
        }
    }

    fn invite(&self, out: &mut Vec<u8>, n: u64) {
        self.request(out, b"INVITE", n, b".i", b"1 INVITE", None);
    }

    /// The ACK of a 2xx (its own branch) or, `non2xx`, of a failure (the
    /// INVITE's branch, hop by hop).
    fn ack(&self, out: &mut Vec<u8>, n: u64, to_tag: &[u8], non2xx: bool) {
        let b: &[u8] = if non2xx { b".i" } else { b".a" };
        self.request(out, b"ACK", n, b, b"1 ACK", Some(to_tag));
    }

    fn bye(&self, out: &mut Vec<u8>, n: u64, to_tag: &[u8]) {
        self.request(out, b"BYE", n, b".b", b"2 BYE", Some(to_tag));
    }
}

/// What a response says, as far as the UAC needs.
#[derive(Debug)]
struct Answer<'a> {
    status: u16,
    call: u64,
    invite: bool,
    to_tag: &'a [u8],
}

/// The finders of the headers a response is matched by.
#[derive(Debug)]
struct Scanner {
    call_id: memmem::Finder<'static>,
    cseq: memmem::Finder<'static>,
    to: memmem::Finder<'static>,
}

impl Scanner {
    fn new() -> Scanner {
        Scanner {
            call_id: memmem::Finder::new(b"\r\nCall-ID:"),
            cseq: memmem::Finder::new(b"\r\nCSeq:"),
            to: memmem::Finder::new(b"\r\nTo:"),
        }
    }

    /// A header's value: the usual spelling first, any other (case, compact
    /// form) by a line scan.
    fn header<'a>(
        &self,
        msg: &'a [u8],
        fast: &memmem::Finder<'_>,
        name: &[u8],
        compact: u8,
    ) -> Option<&'a [u8]> {
        let start = match fast.find(msg) {
            Some(i) => i + fast.needle().len(),
            None => slow_header(msg, name, compact)?,
        };
        let rest = &msg[start..];
        let end = memchr::memchr(b'\r', rest).unwrap_or(rest.len());
        Some(trim(&rest[..end]))
    }

    /// The response's status, call number (when the Call-ID is one of this
    /// run's socket's), method and To tag.
    fn answer<'a>(&self, msg: &'a [u8], sock: usize, run: u32) -> Option<Answer<'a>> {
        if msg.len() < 12 || !msg.starts_with(b"SIP/2.0 ") {
            return None;
        }
        let status = parse_u64(&msg[8..11])?;
        let cid = self.header(msg, &self.call_id, b"call-id", b'i')?;
        let call = parse_call_id(cid, sock, run)?;
        let cseq = self.header(msg, &self.cseq, b"cseq", 0)?;
        let method = trim(&cseq[cseq.iter().position(|c| !c.is_ascii_digit())?..]);
        let invite = method == b"INVITE";
        if !invite && method != b"BYE" {
            return None;
        }
        let to = self.header(msg, &self.to, b"to", b't').unwrap_or(b"");
        Some(Answer {
            status: u16::try_from(status).ok()?,
            call,
            invite,
            to_tag: tag(to),
        })
    }
}

impl Thread {
    fn run(self, sock: &UdpSocket) -> io::Result<Stats> {
        let local = sock.local_addr()?;
        let tail = format!(".{}.{:x}", self.index, self.run);
        let mut f = Flight::new(sock, local, &self.cfg, tail.as_bytes());
        let scan = Scanner::new();
        let mut buf = vec![0u8; MAX_DATAGRAM];
        let per_thread = self.sockets as f64;
        let offset = self.index as f64;
        // Every call has been placed and had its timeout well before this.
        let hard_end = self.t0
            + Duration::from_secs_f64((self.calls as f64 * per_thread) / self.rate)
            + self.cfg.timeout.saturating_mul(2)
            + Duration::from_secs(2);
        loop {
            let now = Instant::now();
            // New calls on schedule: call n (global n * sockets + index) at
            // t0 + global / rate.
            if f.issued < self.calls {
                let x = now.duration_since(self.t0).as_secs_f64() * self.rate - offset;
                let due = if x < 0.0 {
                    0
                } else {
                    ((x / per_thread) as u64 + 1).min(self.calls)
                };
                let until = due.min(f.issued + MAX_BURST);
                while f.issued < until {
                    f.start();
                }
            }
            f.retransmit(now, true);
            f.retransmit(now, false);
            f.time_out(now, true);
            f.time_out(now, false);
            while f.window.front().is_some_and(|c| c.phase == Phase::Done) {
                f.window.pop_front();
                f.base += 1;
            }
            if f.issued == self.calls && f.finished == self.calls {
                break;
            }
            if now >= hard_end {
                // Cannot happen with the timeouts above; bounded all the same.
                for c in &f.window {
                    match c.phase {
                        Phase::Inviting | Phase::Proceeding => f.st.failed.invite_timeout += 1,
                        Phase::Closing => f.st.failed.bye_timeout += 1,
                        Phase::Done => {}
                    }
                }
                break;
            }
            // One datagram, or 1 ms of nothing.
            let n = match sock.recv_from(&mut buf) {
                Ok((n, _)) => n,
                Err(e) if quiet(&e) => continue,
                Err(e) => return Err(e),
            };
            match scan.answer(&buf[..n], self.index, self.run) {
                Some(a) if a.call < f.issued => f.on_answer(&a, Instant::now()),
                _ => f.st.strays += 1,
            }
        }
        f.st.calls = f.issued;
        Ok(f.st)
    }
}

/// A receive error that only means "nothing now".
fn quiet(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock
            | io::ErrorKind::TimedOut
            | io::ErrorKind::Interrupted
            | io::ErrorKind::ConnectionRefused
    )
}

/// One UAC thread's calls in flight, their timers and counts.
#[derive(Debug)]
struct Flight<'a> {
    sock: &'a UdpSocket,
    target: SocketAddr,
    timeout: Duration,
    t1: Duration,
    w: Writer,
    st: Stats,
    out: Vec<u8>,
    out2: Vec<u8>,
    /// The calls not yet done and those after them: call `base + j` at `window[j]`.
    window: VecDeque<Call>,
    base: u64,
    issued: u64,
    finished: u64,
    /// Retransmission timers per attempt (one interval per level, so each
    /// queue is in time order).
    invite_rt: Vec<VecDeque<Timer>>,
    bye_rt: Vec<VecDeque<Timer>>,
    /// Transaction timeouts (one interval, so in time order).
    invite_to: VecDeque<Timer>,
    bye_to: VecDeque<Timer>,
}

impl<'a> Flight<'a> {
    fn new(sock: &'a UdpSocket, local: SocketAddr, cfg: &UacConfig, tail: &[u8]) -> Flight<'a> {
        let levels = cfg.max_retrans as usize;
        Flight {
            sock,
            target: cfg.target,
            timeout: cfg.timeout,
            t1: cfg.t1.max(Duration::from_millis(1)),
            w: Writer {
                target: cfg.target.to_string().into_bytes(),
                local: local.to_string().into_bytes(),
                tail: tail.to_vec(),
            },
            st: Stats::default(),
            out: Vec::with_capacity(2048),
            out2: Vec::with_capacity(1024),
            window: VecDeque::new(),
            base: 0,
            issued: 0,
            finished: 0,
            invite_rt: vec![VecDeque::new(); levels],
            bye_rt: vec![VecDeque::new(); levels],
            invite_to: VecDeque::new(),
            bye_to: VecDeque::new(),
        }
    }

    /// Timer A (INVITE: T1 doubling) or E (BYE: capped at T2) before `attempt`.
    fn interval(&self, attempt: usize, invite: bool) -> Duration {
        let d = self.t1.saturating_mul(1u32 << attempt.min(20));
        if invite { d } else { d.min(T2) }
    }

    fn slot(&self, call: u64) -> Option<usize> {
        let j = usize::try_from(call.checked_sub(self.base)?).ok()?;
        (j < self.window.len()).then_some(j)
    }

    fn send(&mut self, second: bool) {
        let m = if second { &self.out2 } else { &self.out };
        if self.sock.send_to(m, self.target).is_err() {
            self.st.send_errors += 1;
        }
    }

    /// The next call's INVITE, and its timers.
    fn start(&mut self) {
        let n = self.issued;
        self.w.invite(&mut self.out, n);
        self.send(false);
        let sent = Instant::now();
        self.window.push_back(Call {
            phase: Phase::Inviting,
            sent,
            retrans: 0,
            to_tag: Vec::new(),
        });
        self.arm(n, sent, true);
        self.st.last_first_send = Some(sent);
        self.issued += 1;
    }

    /// The first retransmission timer and the timeout of a transaction.
    fn arm(&mut self, call: u64, sent: Instant, invite: bool) {
        let first = Timer {
            at: sent + self.interval(0, invite),
            call,
            attempt: 0,
        };
        let (rt, to) = if invite {
            (&mut self.invite_rt, &mut self.invite_to)
        } else {
            (&mut self.bye_rt, &mut self.bye_to)
        };
        if let Some(q) = rt.first_mut() {
            q.push_back(first);
        }
        to.push_back(Timer {
            at: sent + self.timeout,
            call,
            attempt: 0,
        });
    }

    /// Sends again each INVITE (or BYE) whose timer is due and is still
    /// unanswered; its timer moves to the next level.
    fn retransmit(&mut self, now: Instant, invite: bool) {
        let levels = self.invite_rt.len();
        for lvl in 0..levels {
            loop {
                let q = if invite {
                    &mut self.invite_rt[lvl]
                } else {
                    &mut self.bye_rt[lvl]
                };
                let Some(t) = q.front().copied().filter(|t| t.at <= now) else {
                    break;
                };
                q.pop_front();
                let Some(j) = self.slot(t.call) else {
                    continue;
                };
                let c = &self.window[j];
                let live = if invite {
                    c.phase == Phase::Inviting
                } else {
                    c.phase == Phase::Closing
                };
                if !live || c.retrans != t.attempt {
                    continue;
                }
                if invite {
                    self.w.invite(&mut self.out, t.call);
                    self.st.invite_retrans += 1;
                } else {
                    self.w.bye(&mut self.out, t.call, &c.to_tag);
                    self.st.bye_retrans += 1;
                }
                self.send(false);
                let c = &mut self.window[j];
                c.retrans += 1;
                let attempt = c.retrans;
                if lvl + 1 < levels {
                    let at = now + self.interval(lvl + 1, invite);
                    let q = if invite {
                        &mut self.invite_rt
                    } else {
                        &mut self.bye_rt
                    };
                    q[lvl + 1].push_back(Timer {
                        at,
                        call: t.call,
                        attempt,
                    });
                }
            }
        }
    }

    /// Fails each call whose INVITE (or BYE) is unanswered at its timeout.
    fn time_out(&mut self, now: Instant, invite: bool) {
        loop {
            let q = if invite {
                &mut self.invite_to
            } else {
                &mut self.bye_to
            };
            let Some(t) = q.front().copied().filter(|t| t.at <= now) else {
                break;
            };
            q.pop_front();
            let Some(j) = self.slot(t.call) else {
                continue;
            };
            let c = &mut self.window[j];
            let live = if invite {
                matches!(c.phase, Phase::Inviting | Phase::Proceeding)
            } else {
                c.phase == Phase::Closing
            };
            if live {
                c.phase = Phase::Done;
                self.finished += 1;
                if invite {
                    self.st.failed.invite_timeout += 1;
                } else {
                    self.st.failed.bye_timeout += 1;
                }
            }
        }
    }

    /// A response to one of this thread's calls.
    fn on_answer(&mut self, a: &Answer<'_>, now: Instant) {
        let slot = self.slot(a.call);
        let phase = slot.map(|j| self.window[j].phase);
        let inviting = matches!(phase, Some(Phase::Inviting | Phase::Proceeding));
        match (a.invite, a.status) {
            (true, 100..=199) if inviting => {
                if let Some(j) = slot {
                    self.window[j].phase = Phase::Proceeding;
                }
            }
            (true, 200..=299) if inviting => {
                let j = slot.expect("inviting: in the window");
                self.w.ack(&mut self.out, a.call, a.to_tag, false);
                self.w.bye(&mut self.out2, a.call, a.to_tag);
                self.send(false);
                self.send(true);
                let c = &mut self.window[j];
                self.st.hist.record(now.duration_since(c.sent));
                c.phase = Phase::Closing;
                c.sent = now;
                c.retrans = 0;
                c.to_tag.clear();
                c.to_tag.extend_from_slice(a.to_tag);
                self.arm(a.call, now, false);
            }
            (true, 200..=299) => {
                // A 2xx again (retransmitted, or behind the BYE's answer):
                // its ACK again, from the response alone.
                self.w.ack(&mut self.out, a.call, a.to_tag, false);
                self.send(false);
                self.st.reacks += 1;
            }
            (true, 300..=699) => {
                // Hop by hop: the ACK of a failure takes the INVITE's branch.
                self.w.ack(&mut self.out, a.call, a.to_tag, true);
                self.send(false);
                match slot {
                    Some(j) if inviting => {
                        self.window[j].phase = Phase::Done;
                        self.finished += 1;
                        self.st.failed.invite_rejected += 1;
                    }
                    _ => self.st.duplicates += 1,
                }
            }
            (false, 100..=199) => {}
            (false, 200..=699) if phase == Some(Phase::Closing) => {
                let j = slot.expect("closing: in the window");
                self.window[j].phase = Phase::Done;
                self.finished += 1;
                if a.status < 300 {
                    self.st.ok += 1;
                } else {
                    self.st.failed.bye_rejected += 1;
                }
            }
            _ => self.st.duplicates += 1,
        }
    }
}

// ------------------------------------------------------------------ UAS

/// What `siplb load uas` runs.
#[derive(Debug, Clone)]
pub struct UasConfig {
    /// Where it listens.
    pub listen: SocketAddr,
    /// Send 180 Ringing before the 200.
    pub ringing: bool,
    /// RFC 3261 T1 (the 200's first retransmission).
    pub t1: Duration,
    /// A 200 not ACKed within this is given up (timer H).
    pub timeout: Duration,
    /// Exit after this long (None: until stopped).
    pub seconds: Option<Duration>,
    /// Exit after this long without a datagram, once one came (None: never).
    pub idle_exit: Option<Duration>,
}

/// What a UAS has answered so far.
#[derive(Debug, Clone, Copy, Default)]
pub struct UasReport {
    /// New INVITEs (a Call-ID not seen in the last while).
    pub invites: u64,
    /// INVITE retransmissions (answered with the 200 again).
    pub invite_retrans: u64,
    /// 200s to INVITE retransmitted for want of an ACK.
    pub ok_retrans: u64,
    /// ACKs that ended a 200's retransmissions.
    pub acks: u64,
    /// ACKs of nothing pending (again, or unknown).
    pub acks_other: u64,
    /// BYEs answered.
    pub byes: u64,
    /// Other requests answered with 200.
    pub other: u64,
    /// 200s never ACKed (timer H).
    pub ack_timeouts: u64,
    /// Datagrams that were not a request it understood.
    pub strays: u64,
    /// CPU (user+system) of this process since it started, ms.
    pub cpu_ms: f64,
}

impl UasReport {
    /// The report as one line of `key=value`.
    #[must_use]
    pub fn line(&self) -> String {
        let per = if self.invites == 0 {
            0.0
        } else {
            self.cpu_ms * 1000.0 / self.invites as f64
        };
        format!(
            "uas invites={} invite_retrans={} ok_retrans={} acks={} acks_other={} byes={} \
             other={} ack_timeouts={} strays={} cpu_ms={:.0} cpu_ms_per_1000={per:.1}",
            self.invites,
            self.invite_retrans,
            self.ok_retrans,
            self.acks,
            self.acks_other,
            self.byes,
            self.other,
            self.ack_timeouts,
            self.strays,
            self.cpu_ms,
        )
    }
}

/// A 200 to INVITE sent and not yet ACKed (or ACKed a moment ago).
#[derive(Debug)]
struct Pending {
    ok: Vec<u8>,
    to: SocketAddr,
    born: Instant,
    retrans: u32,
    acked: bool,
}

/// A UAS timer on one Call-ID.
#[derive(Debug)]
struct UasTimer {
    at: Instant,
    call_id: Box<[u8]>,
    attempt: u32,
}

/// The header lines of a request the answer copies, as byte ranges.
#[derive(Debug, Default)]
struct Lines {
    copy: Vec<(usize, usize)>,
    to: Option<(usize, usize)>,
    call_id: Option<(usize, usize)>,
}

/// How long an ACKed call is remembered, so that an INVITE retransmitted
/// late is not a new call.
const LINGER: Duration = Duration::from_secs(4);

/// Answers until `cfg.seconds` or `cfg.idle_exit` (or forever); prints its
/// report line to stdout each time it has been idle for a second after
/// traffic, and at the end.
///
/// # Errors
/// When the socket cannot be bound or fails.
pub fn run_uas(cfg: &UasConfig) -> io::Result<UasReport> {
    let sock = bind_udp(cfg.listen, Duration::from_millis(10))?;
    let local = sock.local_addr()?;
    let contact = format!("Contact: <sip:load@{local}>\r\n").into_bytes();
    let start = Instant::now();
    let cpu0 = cpu_ms();
    let t1 = cfg.t1.max(Duration::from_millis(1));
    let mut r = UasReport::default();
    let mut buf = vec![0u8; MAX_DATAGRAM];
    let mut out = Vec::with_capacity(2048);
    let mut lines = Lines::default();
    let mut pending: HashMap<Box<[u8]>, Pending> = HashMap::new();
    // Timer G per attempt (4 levels: T1, 2T1, 4T1, then T2 each), lingers.
    let mut g: [VecDeque<UasTimer>; 4] = Default::default();
    let mut linger: VecDeque<UasTimer> = VecDeque::new();
    let mut last_traffic: Option<Instant> = None;
    let mut reported = true;
    loop {
        let now = Instant::now();
        for lvl in 0..g.len() {
            while g[lvl].front().is_some_and(|t| t.at <= now) {
                let t = g[lvl].pop_front().expect("front checked");
                let Some(p) = pending.get_mut(&t.call_id) else {
                    continue;
                };
                if p.acked || p.retrans != t.attempt {
                    continue;
                }
                if now.duration_since(p.born) >= cfg.timeout {
                    r.ack_timeouts += 1;
                    pending.remove(&t.call_id);
                    continue;
                }
                let _ = sock.send_to(&p.ok, p.to);
                r.ok_retrans += 1;
                p.retrans += 1;
                let next = (lvl + 1).min(g.len() - 1);
                let at = now + t1.saturating_mul(1 << next).min(T2);
                g[next].push_back(UasTimer {
                    at,
                    call_id: t.call_id,
                    attempt: p.retrans,
                });
            }
        }
        while linger.front().is_some_and(|t| t.at <= now) {
            let t = linger.pop_front().expect("front checked");
            if pending.get(&t.call_id).is_some_and(|p| p.acked) {
                pending.remove(&t.call_id);
            }
        }
        if cfg.seconds.is_some_and(|s| now.duration_since(start) >= s) {
            break;
        }
        if let Some(last) = last_traffic {
            let quiet = now.duration_since(last);
            if cfg.idle_exit.is_some_and(|d| quiet >= d) {
                break;
            }
            if !reported && quiet >= Duration::from_secs(1) {
                r.cpu_ms = cpu_ms().zip(cpu0).map_or(0.0, |(b, a)| b - a);
                println!("{}", r.line());
                reported = true;
            }
        }
        let (n, src) = match sock.recv_from(&mut buf) {
            Ok(x) => x,
            Err(e) if quiet(&e) => continue,
            Err(e) => return Err(e),
        };
        last_traffic = Some(now);
        reported = false;
        let msg = &buf[..n];
        if msg.starts_with(b"SIP/2.0 ") || !scan_request(msg, &mut lines) {
            r.strays += 1;
            continue;
        }
        let Some((cs, ce)) = lines.call_id else {
            r.strays += 1;
            continue;
        };
        let call_id = trim(&msg[cs..ce]);
        let method = &msg[..memchr::memchr(b' ', msg).unwrap_or(0)];
        match method {
            b"INVITE" => {
                if let Some(p) = pending.get_mut(call_id) {
                    r.invite_retrans += 1;
                    if !p.ok.is_empty() {
                        let _ = sock.send_to(&p.ok, src);
                    }
                    continue;
                }
                r.invites += 1;
                let tag = to_tag_for(call_id);
                if cfg.ringing {
                    response(&mut out, msg, &lines, b"180 Ringing", &tag, &contact, false);
                    let _ = sock.send_to(&out, src);
                }
                response(&mut out, msg, &lines, b"200 OK", &tag, &contact, true);
                let _ = sock.send_to(&out, src);
                let key: Box<[u8]> = call_id.into();
                g[0].push_back(UasTimer {
                    at: now + t1,
                    call_id: key.clone(),
                    attempt: 0,
                });
                pending.insert(
                    key,
                    Pending {
                        ok: out.clone(),
                        to: src,
                        born: now,
                        retrans: 0,
                        acked: false,
                    },
                );
            }
            b"ACK" => match pending.get_mut(call_id) {
                Some(p) if !p.acked => {
                    p.acked = true;
                    p.ok = Vec::new();
                    r.acks += 1;
                    linger.push_back(UasTimer {
                        at: now + LINGER,
                        call_id: call_id.into(),
                        attempt: 0,
                    });
                }
                _ => r.acks_other += 1,
            },
            _ => {
                if method == b"BYE" {
                    r.byes += 1;
                } else {
                    r.other += 1;
                }
                let tag = to_tag_for(call_id);
                response(&mut out, msg, &lines, b"200 OK", &tag, b"", false);
                let _ = sock.send_to(&out, src);
            }
        }
    }
    r.cpu_ms = cpu_ms().zip(cpu0).map_or(0.0, |(b, a)| b - a);
    Ok(r)
}

/// Finds the lines an answer copies (Via, Record-Route, From, To, Call-ID,
/// CSeq, in any spelling); `false` when `msg` is not a request with a head.
fn scan_request(msg: &[u8], lines: &mut Lines) -> bool {
    lines.copy.clear();
    lines.to = None;
    lines.call_id = None;
    let Some(first) = memmem::find(msg, b"\r\n") else {
        return false;
    };
    let mut at = first + 2;
    loop {
        let Some(len) = memmem::find(&msg[at..], b"\r\n") else {
            return false;
        };
        if len == 0 {
            return true;
        }
        let line = &msg[at..at + len];
        if let Some(colon) = memchr::memchr(b':', line) {
            let name = trim(&line[..colon]);
            let whole = (at, at + len);
            let value = (at + colon + 1, at + len);
            if name.eq_ignore_ascii_case(b"via")
                || name.eq_ignore_ascii_case(b"v")
                || name.eq_ignore_ascii_case(b"record-route")
                || name.eq_ignore_ascii_case(b"from")
                || name.eq_ignore_ascii_case(b"f")
                || name.eq_ignore_ascii_case(b"cseq")
            {
                lines.copy.push(whole);
            } else if name.eq_ignore_ascii_case(b"to") || name.eq_ignore_ascii_case(b"t") {
                lines.to = Some(whole);
            } else if name.eq_ignore_ascii_case(b"call-id") || name.eq_ignore_ascii_case(b"i") {
                lines.copy.push(whole);
                lines.call_id = Some(value);
            }
        }
        at += len + 2;
    }
}

/// An answer to the request `msg` (its lines in `lines`): `status` (`200
/// OK`), the To tag added when the request has none, SDP when `sdp`.
fn response(
    out: &mut Vec<u8>,
    msg: &[u8],
    lines: &Lines,
    status: &[u8],
    tag: &[u8],
    contact: &[u8],
    sdp: bool,
) {
    out.clear();
    out.extend_from_slice(b"SIP/2.0 ");
    out.extend_from_slice(status);
    out.extend_from_slice(b"\r\n");
    for &(s, e) in &lines.copy {
        out.extend_from_slice(&msg[s..e]);
        out.extend_from_slice(b"\r\n");
    }
    if let Some((s, e)) = lines.to {
        let to = &msg[s..e];
        out.extend_from_slice(to);
        if memmem::find(to, b";tag=").is_none() {
            out.extend_from_slice(b";tag=");
            out.extend_from_slice(tag);
        }
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(contact);
    if sdp {
        out.extend_from_slice(b"Content-Type: application/sdp\r\nContent-Length: ");
        push_u64(out, SDP.len() as u64);
        out.extend_from_slice(b"\r\n\r\n");
        out.extend_from_slice(SDP);
    } else {
        out.extend_from_slice(b"Content-Length: 0\r\n\r\n");
    }
}

/// The UAS's To tag for a Call-ID: the same for every answer of one call,
/// with no state (FNV-1a).
fn to_tag_for(call_id: &[u8]) -> [u8; 17] {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in call_id {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    let mut t = [b'u'; 17];
    for (i, slot) in t[1..].iter_mut().enumerate() {
        *slot = b"0123456789abcdef"[((h >> (60 - 4 * i)) & 0xf) as usize];
    }
    t
}

// ------------------------------------------------------------------ pieces

/// A UDP socket on `addr` with large buffers and a read timeout.
fn bind_udp(addr: SocketAddr, read_timeout: Duration) -> io::Result<UdpSocket> {
    let s = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::DGRAM,
        Some(socket2::Protocol::UDP),
    )?;
    // Bursts of thousands of datagrams must not overflow the queue; the
    // kernel caps these at net.core.{r,w}mem_max.
    let _ = s.set_recv_buffer_size(8 << 20);
    let _ = s.set_send_buffer_size(8 << 20);
    s.bind(&addr.into())?;
    let s: UdpSocket = s.into();
    s.set_read_timeout(Some(read_timeout))?;
    Ok(s)
}

/// This run's id in Call-IDs: another run's late answers are strays.
fn run_id() -> u32 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    t ^ std::process::id().rotate_left(16)
}

/// User+system CPU of this process (all threads), ms: fields 14 and 15 of
/// /proc/self/stat, in clock ticks of 10 ms (USER_HZ is 100 on Linux).
#[must_use]
pub fn cpu_ms() -> Option<f64> {
    let s = std::fs::read_to_string("/proc/self/stat").ok()?;
    let rest = &s[s.rfind(')')? + 1..];
    let mut f = rest.split_ascii_whitespace().skip(11);
    let u: f64 = f.next()?.parse().ok()?;
    let st: f64 = f.next()?.parse().ok()?;
    Some((u + st) * 10.0)
}

fn push_u64(out: &mut Vec<u8>, mut v: u64) {
    let mut d = [0u8; 20];
    let mut i = d.len();
    loop {
        i -= 1;
        d[i] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    out.extend_from_slice(&d[i..]);
}

fn parse_u64(s: &[u8]) -> Option<u64> {
    if s.is_empty() || s.len() > 19 {
        return None;
    }
    let mut v = 0u64;
    for &c in s {
        if !c.is_ascii_digit() {
            return None;
        }
        v = v * 10 + u64::from(c - b'0');
    }
    Some(v)
}

fn trim(s: &[u8]) -> &[u8] {
    s.trim_ascii()
}

/// Where the value of header `name` (or its `compact` form, 0: none) starts,
/// by a case-insensitive scan of the head's lines.
fn slow_header(msg: &[u8], name: &[u8], compact: u8) -> Option<usize> {
    let mut at = memmem::find(msg, b"\r\n")? + 2;
    loop {
        let len = memmem::find(&msg[at..], b"\r\n")?;
        if len == 0 {
            return None;
        }
        let line = &msg[at..at + len];
        if let Some(colon) = memchr::memchr(b':', line) {
            let n = trim(&line[..colon]);
            if n.eq_ignore_ascii_case(name)
                || (compact != 0 && n.len() == 1 && n[0].eq_ignore_ascii_case(&compact))
            {
                return Some(at + colon + 1);
            }
        }
        at += len + 2;
    }
}

/// The call number of `<n>.<socket>.<run hex>@siplb-load`, when socket and
/// run are these.
fn parse_call_id(cid: &[u8], sock: usize, run: u32) -> Option<u64> {
    let at = memchr::memchr(b'@', cid)?;
    let mut parts = cid[..at].split(|&c| c == b'.');
    let n = parse_u64(parts.next()?)?;
    let s = parse_u64(parts.next()?)?;
    let r = std::str::from_utf8(parts.next()?).ok()?;
    let r = u32::from_str_radix(r, 16).ok()?;
    (s == sock as u64 && r == run && parts.next().is_none()).then_some(n)
}

/// The `tag` parameter of a To value (empty when none).
fn tag(to: &[u8]) -> &[u8] {
    let Some(i) = memmem::find(to, b";tag=") else {
        return b"";
    };
    let v = &to[i + 5..];
    let end = v
        .iter()
        .position(|c| matches!(c, b';' | b'>' | b' ' | b'\t' | b','))
        .unwrap_or(v.len());
    &v[..end]
}

/// INVITE-to-200 times: 10 µs buckets to 10 ms, 100 µs to 100 ms, 1 ms to
/// 1 s, 100 ms to 64 s; a quantile is its bucket's upper bound.
#[derive(Debug, Clone)]
struct Hist {
    buckets: Vec<u64>,
    count: u64,
}

impl Default for Hist {
    fn default() -> Hist {
        Hist {
            buckets: vec![0; 1000 + 900 + 900 + 630 + 1],
            count: 0,
        }
    }
}

impl Hist {
    fn index(us: u64) -> usize {
        let i = match us {
            0..10_000 => us / 10,
            10_000..100_000 => 1000 + (us - 10_000) / 100,
            100_000..1_000_000 => 1900 + (us - 100_000) / 1000,
            _ => 2800 + (us.min(64_000_000) - 1_000_000) / 100_000,
        };
        usize::try_from(i).unwrap_or(usize::MAX)
    }

    fn upper_us(i: usize) -> f64 {
        let i = i as f64;
        if i < 1000.0 {
            (i + 1.0) * 10.0
        } else if i < 1900.0 {
            10_000.0 + (i - 999.0) * 100.0
        } else if i < 2800.0 {
            100_000.0 + (i - 1899.0) * 1000.0
        } else {
            1_000_000.0 + (i - 2799.0) * 100_000.0
        }
    }

    fn record(&mut self, d: Duration) {
        let us = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        let i = Hist::index(us).min(self.buckets.len() - 1);
        self.buckets[i] += 1;
        self.count += 1;
    }

    fn add(&mut self, o: &Hist) {
        for (a, b) in self.buckets.iter_mut().zip(&o.buckets) {
            *a += b;
        }
        self.count += o.count;
    }

    fn quantile_us(&self, q: f64) -> f64 {
        if self.count == 0 {
            return 0.0;
        }
        let want = ((self.count as f64) * q).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (i, &b) in self.buckets.iter().enumerate() {
            seen += b;
            if seen >= want {
                return Hist::upper_us(i);
            }
        }
        Hist::upper_us(self.buckets.len() - 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn writer() -> Writer {
        Writer {
            target: b"127.0.0.1:5060".to_vec(),
            local: b"127.0.0.1:5070".to_vec(),
            tail: b".3.abc".to_vec(),
        }
    }

    #[test]
    fn a_request_parses_and_names_its_call() {
        let w = writer();
        let mut out = Vec::new();
        w.invite(&mut out, 42);
        let m = sip::Message::parse(&out).expect("a valid INVITE");
        assert_eq!(m.call_id(), b"42.3.abc@siplb-load");
        w.bye(&mut out, 42, b"t1");
        let m = sip::Message::parse(&out).expect("a valid BYE");
        assert_eq!(m.to().unwrap().tag(), Some(&b"t1"[..]));
    }

    #[test]
    fn the_uas_answer_matches_back_to_the_call() {
        let w = writer();
        let mut inv = Vec::new();
        w.invite(&mut inv, 7);
        // A proxy's Via on top, as siplb forwards it.
        let proxied = String::from_utf8(inv).unwrap().replacen(
            "\r\nVia:",
            "\r\nVia: SIP/2.0/UDP 127.0.0.1:5060;branch=z9hG4bKp\r\nVia:",
            1,
        );
        let mut lines = Lines::default();
        assert!(scan_request(proxied.as_bytes(), &mut lines));
        let mut out = Vec::new();
        let tag = to_tag_for(b"7.3.abc@siplb-load");
        response(
            &mut out,
            proxied.as_bytes(),
            &lines,
            b"200 OK",
            &tag,
            b"",
            true,
        );
        let m = sip::Message::parse(&out).expect("a valid 200");
        assert_eq!(m.vias().count(), 2);
        // What the UAC reads of it once the proxy has taken its Via off.
        let back = String::from_utf8(out).unwrap().replacen(
            "Via: SIP/2.0/UDP 127.0.0.1:5060;branch=z9hG4bKp\r\n",
            "",
            1,
        );
        let a = Scanner::new()
            .answer(back.as_bytes(), 3, 0xabc)
            .expect("matched");
        assert_eq!((a.status, a.call, a.invite), (200, 7, true));
        assert_eq!(a.to_tag, &tag[..]);
        assert!(Scanner::new().answer(back.as_bytes(), 2, 0xabc).is_none());
    }

    #[test]
    fn compact_and_lower_case_headers_are_found() {
        let msg = b"SIP/2.0 180 Ringing\r\nv: SIP/2.0/UDP x\r\ni: 5.0.1f@siplb-load\r\n\
cseq: 1 INVITE\r\nt: <sip:a@b>;tag=zz\r\n\r\n";
        let a = Scanner::new().answer(msg, 0, 0x1f).expect("matched");
        assert_eq!((a.status, a.call, a.to_tag), (180, 5, &b"zz"[..]));
    }

    /// A Flight whose requests go to a socket nobody reads.
    fn flight<'a>(sock: &'a UdpSocket, sink: &UdpSocket) -> Flight<'a> {
        let cfg = UacConfig {
            target: sink.local_addr().unwrap(),
            local_ip: [127, 0, 0, 1].into(),
            local_port: 0,
            sockets: 1,
            rate: 1.0,
            calls: 1,
            timeout: Duration::from_secs(8),
            t1: Duration::from_millis(500),
            max_retrans: 7,
        };
        Flight::new(sock, sock.local_addr().unwrap(), &cfg, b".0.1")
    }

    fn answer(status: u16, invite: bool) -> Answer<'static> {
        Answer {
            status,
            call: 0,
            invite,
            to_tag: b"t",
        }
    }

    #[test]
    fn a_call_counts_its_late_and_repeated_answers() {
        let (sock, sink) = (
            UdpSocket::bind("127.0.0.1:0").unwrap(),
            UdpSocket::bind("127.0.0.1:0").unwrap(),
        );
        let mut f = flight(&sock, &sink);
        f.start();
        let now = Instant::now();
        for a in [
            answer(100, true),
            answer(180, true),
            answer(200, true), // ACK and BYE
            answer(200, true), // again: ACKed again
            answer(180, true), // behind the 200
            answer(200, false),
            answer(200, false), // the BYE's 200 again
        ] {
            f.on_answer(&a, now);
        }
        let st = &f.st;
        assert_eq!((st.ok, st.failed.total(), f.finished), (1, 0, 1));
        assert_eq!((st.reacks, st.duplicates), (1, 2));
    }

    #[test]
    fn an_unanswered_invite_is_sent_again_on_timer_a_then_fails() {
        let (sock, sink) = (
            UdpSocket::bind("127.0.0.1:0").unwrap(),
            UdpSocket::bind("127.0.0.1:0").unwrap(),
        );
        let mut f = flight(&sock, &sink);
        f.start();
        let t0 = f.window[0].sent;
        let at = |ms| t0 + Duration::from_millis(ms);
        // T1 = 500 ms, doubling: sent again at 0.5, 1.5, 3.5, 7.5 s.
        for (ms, sent_again) in [
            (499, 0),
            (500, 1),
            (1499, 1),
            (1500, 2),
            (3500, 3),
            (7500, 4),
        ] {
            f.retransmit(at(ms), true);
            f.time_out(at(ms), true);
            assert_eq!(f.st.invite_retrans, sent_again, "at {ms} ms");
        }
        assert_eq!(f.st.failed.invite_timeout, 0);
        f.time_out(at(8000), true);
        assert_eq!((f.st.failed.invite_timeout, f.finished), (1, 1));
        // A failed call's late 200 is ACKed all the same, and changes nothing else.
        f.on_answer(&answer(200, true), at(8100));
        assert_eq!((f.st.reacks, f.st.ok, f.finished), (1, 0, 1));
    }

    #[test]
    fn quantiles_come_from_the_buckets() {
        let mut h = Hist::default();
        for ms in 1..=100 {
            h.record(Duration::from_millis(ms));
        }
        assert!(
            (h.quantile_us(0.5) - 50_100.0).abs() < 1.0,
            "{}",
            h.quantile_us(0.5)
        );
        assert!((h.quantile_us(0.99) - 99_100.0).abs() < 1.0);
    }
}

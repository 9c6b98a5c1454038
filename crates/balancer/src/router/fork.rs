//! REGISTER forked to every server (RFC 3261 §16.7 with the patent's
//! registration to all servers): each leg built from the request as
//! processed once, the finals merged ([`crate::merge`]), a 2xx passed at once.
//! The answer the UA got is kept: a retransmission of the REGISTER gets it
//! again (§17.2.2), while the fork runs and, over UDP, 64 × T1 after it
//! ended (Timer J), so that no retransmission starts a fork of its own.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use sip::Message;
use smallvec::SmallVec;

use super::request::Hop;
use super::{Dest, Now, Origin, Outbox, Router, TimerKey};
use crate::codec::Leg;
use crate::config::{Config, RegisterMode};
use crate::merge;
use crate::pool::{Pool, Server};
use crate::stats::{DropReason, ServerStats};

/// A REGISTER sent to several servers.
#[derive(Debug)]
pub(super) struct Fork {
    /// The REGISTER as processed once (for our 408).
    request: Vec<u8>,
    reply_to: Dest,
    /// Each leg's server counters, and whether it still owes a final.
    legs: SmallVec<[(Arc<ServerStats>, bool); 4]>,
    finals: Vec<(u16, Vec<u8>)>,
    done: bool,
    /// What the UA got (a 2xx passed at once, the merged answer, our 408).
    answer: Option<Vec<u8>>,
    /// Every leg settled: the entry only answers retransmissions until
    /// then (ms).
    linger_until: Option<u64>,
    /// The REGISTER carried credentials from this source: a merged 401/407
    /// spends one of its failed authentications.
    auth_from: Option<std::net::IpAddr>,
}

impl Fork {
    fn pending(&self) -> usize {
        self.legs.iter().filter(|(_, p)| *p).count()
    }

    /// Leg `i` owes nothing more.
    fn settle(&mut self, i: usize) {
        if let Some((stats, pending)) = self.legs.get_mut(i)
            && std::mem::take(pending)
        {
            stats.outstanding.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

impl Router {
    #[allow(clippy::too_many_arguments)]
    pub(super) fn register(
        &self,
        cfg: &Config,
        msg: &Message<'_>,
        pool: &Pool,
        pop_route: u8,
        loop_hash: u32,
        origin: Origin,
        now: Now,
        out: &mut Outbox,
    ) {
        let back = origin.reply_dest();
        let id = self.txn_id(msg);
        if let Some(f) = self.forks.pin().get(&id).cloned() {
            // A retransmission: the servers were asked; the answer again if
            // the UA has lost it.
            let f = f.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            return match &f.answer {
                Some(a) => out.send(f.reply_to.clone(), a),
                None => self.drop_counted(DropReason::Merged, out),
            };
        }
        let targets: SmallVec<[Arc<Server>; 8]> = match cfg.register {
            RegisterMode::Registrar => cfg
                .registrar
                .as_deref()
                .and_then(|id| pool.by_id(id))
                .filter(|s| !s.stats.drained.load(Ordering::Relaxed))
                .into_iter()
                .cloned()
                .collect(),
            RegisterMode::Fork => pool
                .servers
                .iter()
                .filter(|s| self.usable(cfg, s, now))
                .cloned()
                .collect(),
        };
        if targets.is_empty() {
            let ra = format!("Retry-After: {}", cfg.retry_after);
            return self.reply(msg, 503, "Service Unavailable", &[ra.as_bytes()], back, out);
        }
        let auth_from = self.credentials_from(msg, origin);
        // One server and no credentials to account for: stateless.
        if targets.len() == 1 && auth_from.is_none() {
            let branch = Self::branch(id, Leg::Attempt(0), loop_hash);
            return self.forward_to_server(
                msg,
                &targets[0],
                Hop {
                    path: self.wants_path(cfg, msg),
                    ..Hop::stateless(pop_route)
                },
                branch,
                origin,
                out,
            );
        }
        if !self.room_for_transaction(cfg, msg, back.clone(), self.ms(now), out) {
            return;
        }
        let mut base = Vec::with_capacity(msg.as_bytes().len() + 64);
        self.write_processed(msg, pop_route, origin, &mut base);
        let Ok(processed) = Message::parse(&base) else {
            return;
        };
        let fork = Fork {
            request: Vec::new(),
            reply_to: back,
            legs: targets.iter().map(|s| (s.stats.clone(), true)).collect(),
            finals: Vec::new(),
            done: false,
            answer: None,
            linger_until: None,
            auth_from,
        };
        let fork = Arc::new(std::sync::Mutex::new(fork));
        let mut guard = fork
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if self.forks.pin().try_insert(id, fork.clone()).is_err() {
            return self.drop_counted(DropReason::Merged, out);
        }
        let path = self.wants_path(cfg, msg);
        for (i, s) in targets.iter().enumerate() {
            s.stats.outstanding.fetch_add(1, Ordering::Relaxed);
            let branch = Self::branch(id, Leg::Fork(i as u16), loop_hash);
            let hop = Hop {
                pop_routes: 0,
                record_route: false,
                fresh: false,
                path,
            };
            self.forward_to_server(&processed, s, hop, branch, origin, out);
        }
        drop(processed);
        guard.request = base;
        // Whatever has not answered by the timeout does not hold the UA up.
        out.arm(now.at + cfg.register_timeout, TimerKey::Fork { fork: id });
    }

    pub(super) fn fork_response(
        &self,
        id: u64,
        leg: u16,
        msg: &Message<'_>,
        code: u16,
        now: Now,
        out: &mut Outbox,
    ) {
        if code < 200 {
            return self.drop_counted(DropReason::Merged, out);
        }
        let Some(f) = self.forks.pin().get(&id).cloned() else {
            return self.drop_counted(DropReason::Merged, out);
        };
        let mut f = f.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        f.settle(usize::from(leg));
        if f.done {
            self.drop_counted(DropReason::Merged, out);
        } else if (200..300).contains(&code) {
            f.done = true;
            self.stats.response(code);
            let mut answer = Vec::with_capacity(msg.as_bytes().len());
            super::txn::without_top_via(msg, &mut answer);
            out.send(f.reply_to.clone(), &answer);
            f.answer = Some(answer);
        } else {
            let mut without = Vec::with_capacity(msg.as_bytes().len());
            super::txn::without_top_via(msg, &mut without);
            f.finals.push((code, without));
            self.drop_counted(DropReason::Merged, out);
        }
        if f.pending() == 0 && f.linger_until.is_none() {
            drop(f);
            self.finish_fork(id, false, now, out);
        }
    }

    /// Sends the merged answer once every server answered (or at the
    /// timeout, which also ends the fork); the entry then stays for the
    /// UA's retransmissions (over UDP) until its last timer.
    pub(super) fn finish_fork(&self, id: u64, timed_out: bool, now: Now, out: &mut Outbox) {
        let Some(f) = self.forks.pin().get(&id).cloned() else {
            return;
        };
        let mut f = f.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(until) = f.linger_until {
            if timed_out && self.ms(now) >= until {
                drop(f);
                self.forks.pin().remove(&id);
            }
            return;
        }
        if !f.done && (timed_out || f.pending() == 0) {
            f.done = true;
            let codes: SmallVec<[u16; 8]> = f.finals.iter().map(|(c, _)| *c).collect();
            match merge::best(&codes) {
                Some(i) => {
                    let bytes = merge_challenges(&f.finals, i);
                    self.auth_failed(f.auth_from, f.finals[i].0, now);
                    self.stats.response(merge::outgoing_status(f.finals[i].0));
                    out.send(f.reply_to.clone(), &bytes);
                    f.answer = Some(bytes);
                }
                None => {
                    // Nobody answered: 408.
                    if let Ok(req) = Message::parse(&f.request) {
                        let tag = self.to_tag(&req);
                        let mut bytes = Vec::with_capacity(f.request.len());
                        sip::reply::response_for(
                            &req,
                            408,
                            "Request Timeout",
                            &tag,
                            &[],
                            &mut bytes,
                        );
                        out.send(f.reply_to.clone(), &bytes);
                        f.answer = Some(bytes);
                        self.stats.refusal(408);
                    }
                }
            }
        }
        if timed_out || f.pending() == 0 {
            for i in 0..f.legs.len() {
                f.settle(i);
            }
            if f.reply_to.reliable() {
                drop(f);
                self.forks.pin().remove(&id);
            } else {
                // Timer J: the UA retransmits until its Timer F.
                f.linger_until = Some(self.ms(now) + super::txn::TXN_MS);
                out.arm(
                    now.at + Duration::from_millis(super::txn::TXN_MS),
                    TimerKey::Fork { fork: id },
                );
            }
        }
    }
}

/// The chosen final with every other 401/407's challenges added (§16.7 step 7).
fn merge_challenges(finals: &[(u16, Vec<u8>)], chosen: usize) -> Vec<u8> {
    let (code, bytes) = &finals[chosen];
    let mut out = bytes.clone();
    merge::set_outgoing_status(&mut out, *code);
    if !matches!(code, 401 | 407) {
        return out;
    }
    let mut extra = Vec::new();
    for (i, (c, b)) in finals.iter().enumerate() {
        if i == chosen || !matches!(c, 401 | 407) {
            continue;
        }
        if let Ok(m) = Message::parse(b) {
            for h in m.headers() {
                if h.raw_name.eq_ignore_ascii_case(b"WWW-Authenticate")
                    || h.raw_name.eq_ignore_ascii_case(b"Proxy-Authenticate")
                {
                    extra.extend_from_slice(h.line);
                }
            }
        }
    }
    if let Some(pos) = out.windows(4).position(|w| w == b"\r\n\r\n") {
        out.splice(pos + 2..pos + 2, extra);
    }
    out
}

//! The client transactions' timers: failover on silence, the
//! retransmission of our own finals (Timer G), and the once-a-second round
//! (Timer C, the end of transactions, calls stranded on a server that
//! stopped answering after ringing).

use super::*;

impl Router {
    /// `failover_timeout` of attempt `attempt` (and, for an attempt that
    /// waits on as the last server, each look again after it).
    ///
    /// An attempt unanswered within `failover_timeout` counts as its
    /// server's failure (outlier detection, claim 9) once, and the request
    /// goes to the next server the policy draws. With none to take it (one
    /// server, the others down or tried, `max_attempts` used) giving up
    /// would lose a call the server may still answer (a queue, a slow
    /// database): it waits on, looking again every `failover_timeout` (a
    /// server that comes up takes it then), until `last_attempt_timeout`
    /// after it was sent or a health signal says its server is down (agent,
    /// probe, ejection, its own overload; a drain keeps its calls); then 503.
    pub(in crate::router) fn failover_timer(
        &self,
        id: u64,
        attempt: u8,
        now: Now,
        rng: &mut dyn RngCore,
        out: &mut Outbox,
    ) {
        let Some(t) = self.txns.pin().get(&id).cloned() else {
            return;
        };
        let mut t = t.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if t.current() != attempt || t.phase != Phase::Trying {
            return;
        }
        let i = usize::from(attempt);
        if t.tries.get(i).is_none_or(|x| x.answered) {
            return;
        }
        let cfg = self.cfg.load();
        let pool = self.pool.load();
        let server = pool.by_id(&t.tries[i].server).cloned();
        let first_miss = !std::mem::replace(&mut t.tries[i].late, true);
        if first_miss
            && !t.cancelled
            && let Some(s) = &server
        {
            self.record_outcome(&cfg, &pool, s, false, now);
        }
        let next = self.next_server(&cfg, &t, now, rng);
        let deadline = t.tries[i].sent + cfg.last_attempt_timeout;
        if next.is_none()
            && !t.cancelled
            && now.at < deadline
            && let Some(s) = &server
            && !self.known_down(&cfg, s, now)
        {
            if first_miss {
                s.stats.last_waits.fetch_add(1, Ordering::Relaxed);
            }
            out.arm(
                (now.at + cfg.failover_timeout).min(deadline),
                TimerKey::Failover { txn: id, attempt },
            );
            return;
        }
        t.release(i);
        if !t.cancelled
            && let Some(s) = &server
        {
            s.stats.failovers.fetch_add(1, Ordering::Relaxed);
        }
        let why = if first_miss {
            "no response"
        } else {
            "no response from the last server"
        };
        self.move_on(&cfg, &mut t, id, next, why, now, out);
    }

    /// Retransmits our final response (Timer G), until the ACK or Timer H.
    pub(in crate::router) fn retransmit_timer(&self, id: u64, n: u8, now: Now, out: &mut Outbox) {
        let Some(t) = self.txns.pin().get(&id).cloned() else {
            return;
        };
        let t = t.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if t.acked {
            return;
        }
        let Some(f) = &t.local_final else { return };
        out.send(t.reply_to.clone(), f);
        let next = (T1 * 2u32.saturating_pow(u32::from(n) + 1)).min(T2);
        if self.ms(now) + (next.as_millis() as u64) < t.expires_ms {
            out.arm(
                now.at + next,
                TimerKey::Retransmit {
                    txn: id,
                    n: n.saturating_add(1),
                },
            );
        }
    }

    /// `routing.trying_after` passed for INVITE transaction `id`: our `100
    /// Trying` unless a provisional or final went to the UA meanwhile.
    pub(in crate::router) fn trying_timer(&self, id: u64, now: Now, out: &mut Outbox) {
        let Some(t) = self.txns.pin().get(&id).cloned() else {
            return;
        };
        let mut t = t.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if t.phase != Phase::Trying || t.local_final.is_some() {
            return;
        }
        // The first attempt's failover timer, if it is still unanswered
        // (at the time it would have been armed for from the start).
        if let Some(a) = t.failover_deferred.take() {
            let unanswered =
                t.current() == a && t.tries.get(usize::from(a)).is_some_and(|x| !x.answered);
            if unanswered {
                let cfg = self.cfg.load();
                let at = t.tries[usize::from(a)].sent + cfg.failover_timeout;
                out.arm(
                    at.max(now.at),
                    TimerKey::Failover {
                        txn: id,
                        attempt: a,
                    },
                );
            }
        }
        if t.trying_sent {
            return;
        }
        t.trying_sent = true;
        let Ok(req) = sip::Message::parse(&t.request) else {
            return;
        };
        self.reply(&req, 100, "Trying", &[], t.reply_to.clone(), out);
    }

    /// Once a second: Timer C (RFC 3261 §16.8) and the end of transactions.
    /// It looks at the transactions in progress and at the completed
    /// entries whose end is due (`Sweep`), not at the whole table: at
    /// 3,000 calls/s the table holds some 100,000 entries, and walking it
    /// (a lock and cold cache lines each) every second cost more than a
    /// microsecond per call.
    pub(in crate::router) fn txn_round(&self, now: Now, rng: &mut dyn RngCore, out: &mut Outbox) {
        let cfg = self.cfg.load();
        let ms = self.ms(now);
        let limit = cfg.invite_timeout.as_millis() as u64;
        let mut gone: SmallVec<[u64; 16]> = SmallVec::new();
        let mut timer_c: SmallVec<[u64; 16]> = SmallVec::new();
        let mut trying: Vec<u64> = Vec::new();
        let mut ends: Vec<(u64, u64)> = Vec::new();
        let due = self.sweep_lock().take_due(ms);
        let table = self.txns.pin();
        for id in due {
            let Some(t) = table.get(&id) else { continue };
            let t = t.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            let over = match t.phase {
                Phase::Completed | Phase::Accepted => t.over(ms),
                Phase::Trying if t.invite => {
                    let ringing = t.tries.last().is_some_and(|x| x.provisional);
                    if ringing && ms.saturating_sub(t.timer_c_from) >= limit
                        || t.cancelled && ms.saturating_sub(t.cancelled_ms) >= TXN_MS
                    {
                        // Timer C; or a CANCEL the server never answered
                        // with a final (the UA gives up after 64 x T1 too).
                        timer_c.push(id);
                    }
                    // A transaction that lives past Timer C and a whole
                    // transaction timeout more has lost its way.
                    ms.saturating_sub(t.timer_c_from) >= limit + TXN_MS
                }
                // Timer F: the UA has given up too.
                Phase::Trying => ms.saturating_sub(t.created_ms) >= TXN_MS,
            };
            if over {
                gone.push(id);
            } else if t.phase == Phase::Trying {
                trying.push(id);
            } else {
                ends.push((t.next_end(ms), id));
            }
        }
        drop(table);
        {
            let mut sweep = self.sweep_lock();
            for id in trying {
                sweep.watch(id);
            }
            for (at, id) in ends {
                sweep.end_at(at, id);
            }
        }
        // In a fixed order (the work list's comes from who pushed first):
        // what is done here (the order of the sends, the draws, which
        // server an ejection budget lets go) must follow from the inputs
        // alone.
        timer_c.sort_unstable();
        gone.sort_unstable();
        for id in timer_c {
            self.timer_c(id, now, rng, out);
        }
        let pool = self.pool.load();
        for id in gone {
            let Some(t) = self.txns.pin().remove(&id).cloned() else {
                continue;
            };
            let mut t = t.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            if t.phase == Phase::Trying
                && let Some(x) = t.tries.last()
                && !x.answered
                && !x.late
                && let Some(s) = pool.by_id(&x.server)
            {
                self.record_outcome(&cfg, &pool, s, false, now);
            }
            t.release_all();
        }
    }

    /// Timer C fired: CANCEL the ringing attempt, 408 to the UA.
    pub(super) fn timer_c(&self, id: u64, now: Now, _rng: &mut dyn RngCore, out: &mut Outbox) {
        let Some(t) = self.txns.pin().get(&id).cloned() else {
            return;
        };
        let mut t = t.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if t.phase != Phase::Trying {
            return;
        }
        let i = t.current() as usize;
        let Ok(req) = Message::parse(&t.request).map(|m| m.call_id().to_vec()) else {
            return;
        };
        let (code, reason) = if t.cancelled {
            (487, "Request Terminated")
        } else {
            warn!(call_id = %String::from_utf8_lossy(&req), server = t.tries.get(i).map(|x| &*x.server), method = "INVITE", "no final response within invite_timeout: CANCEL, 408");
            (408, "Request Timeout")
        };
        self.cancel_attempt(&mut t, id, i, now, out);
        t.release(i);
        self.sessions.demote(&req, self.ms(now));
        self.final_from_request(&mut t, id, code, reason, &[], now, out);
    }

    /// New sessions whose server answered provisionally and then stopped
    /// answering SIP (ejected, or its probes unanswered; not merely its agent
    /// down: the server may still be ringing) go to another server, the
    /// given-up attempt CANCELled.
    pub(in crate::router) fn rescue(
        &self,
        down: &[Arc<str>],
        now: Now,
        rng: &mut dyn RngCore,
        out: &mut Outbox,
    ) {
        let cfg = self.cfg.load();
        let mut stuck: SmallVec<[u64; 8]> = self
            .txns
            .pin()
            .iter()
            .filter_map(|(id, t)| {
                let t = t.lock().ok()?;
                (t.invite
                    && t.phase == Phase::Trying
                    && !t.cancelled
                    && t.tries
                        .last()
                        .is_some_and(|x| x.provisional && down.contains(&x.server)))
                .then_some(*id)
            })
            .collect();
        // In a fixed order (see `txn_round`): each move draws a server.
        stuck.sort_unstable();
        for id in stuck {
            let Some(t) = self.txns.pin().get(&id).cloned() else {
                continue;
            };
            let mut t = t.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            let i = t.current() as usize;
            self.cancel_attempt(&mut t, id, i, now, out);
            t.release(i);
            self.next_attempt(
                &cfg,
                &mut t,
                id,
                "server stopped answering after a provisional response",
                now,
                rng,
                out,
            );
        }
    }
}

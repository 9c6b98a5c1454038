//! Requests the balancer sends itself for its client transactions: the
//! CANCEL of an attempt (RFC 3261 §9.1), the ACK of a non-2xx final
//! (§17.1.1.3), the ACK and BYE of a 2xx that no UA will take, and the
//! retransmission of our CANCELs and BYEs over UDP until answered (Timer E).

use super::*;
use crate::router::request::response_hop;

impl Router {
    /// CANCELs attempt `i` (once; over UDP retransmitted by Timer E until
    /// it is answered or the attempt's final comes, RFC 3261 §9.1, §17.1.2.2).
    pub(super) fn cancel_attempt(
        &self,
        t: &mut ClientTxn,
        id: u64,
        i: usize,
        now: Now,
        out: &mut Outbox,
    ) {
        let Some(x) = t.tries.get_mut(i) else { return };
        if x.cancel_sent || x.final_seen {
            return;
        }
        x.cancel_sent = true;
        self.write_cancel(t, id, i, out);
        self.own_request_sent(t, id, i, false, now, out);
    }

    pub(super) fn write_cancel(&self, t: &ClientTxn, id: u64, i: usize, out: &mut Outbox) {
        let Some(x) = t.tries.get(i) else { return };
        let (address, transport) = (x.address, x.transport);
        let Ok(invite) = Message::parse(&t.request) else {
            return;
        };
        let mut via = ViaText::default();
        // The INVITE's branch at this hop exactly (§9.1), MAC included.
        let branch = Self::branch(id, Leg::Attempt(i as u8), t.loop_hash);
        let branch = self.seal(branch, &response_hop(&invite, t.origin(), false));
        self.write_via(&mut via.0, transport, branch, t.conn);
        out.send_with(dest_of(address, transport), |b| {
            build::cancel_for(&invite, &via.0, b);
        });
    }

    /// A CANCEL (`bye: false`) or BYE of ours went to attempt `i`: the
    /// entry stays for its answer, and over UDP it is retransmitted.
    pub(super) fn own_request_sent(
        &self,
        t: &mut ClientTxn,
        id: u64,
        i: usize,
        bye: bool,
        now: Now,
        out: &mut Outbox,
    ) {
        t.own_until_ms = t.own_until_ms.max(self.ms(now) + TXN_MS);
        if t.tries
            .get(i)
            .is_some_and(|x| x.transport == Transport::Udp)
        {
            out.arm(
                now.at + T1,
                TimerKey::Resend {
                    txn: id,
                    attempt: i as u8,
                    bye,
                    n: 0,
                },
            );
        }
    }

    /// Timer E of a CANCEL or BYE of ours: again, until it is answered
    /// (a CANCEL also once the attempt's final came) or for 64 × T1.
    pub(in crate::router) fn resend_timer(
        &self,
        id: u64,
        attempt: u8,
        bye: bool,
        n: u8,
        now: Now,
        out: &mut Outbox,
    ) {
        let Some(t) = self.txns.pin().get(&id).cloned() else {
            return;
        };
        let t = t.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let i = usize::from(attempt);
        let Some(x) = t.tries.get(i) else { return };
        if bye {
            let Some(b) = x.bye.as_ref().filter(|_| !x.bye_answered) else {
                return;
            };
            out.send(dest_of(x.address, x.transport), b);
        } else {
            if x.cancel_answered || x.final_seen {
                return;
            }
            self.write_cancel(&t, id, i, out);
        }
        // Timer E: T1, 2 T1, ... up to T2; Timer F ends it at 64 × T1.
        let next = (T1 * 2u32.saturating_pow(u32::from(n) + 1)).min(T2);
        let sent: Duration = (0..=u32::from(n))
            .map(|k| (T1 * 2u32.saturating_pow(k)).min(T2))
            .sum();
        if (sent + next).as_millis() < u128::from(TXN_MS) {
            out.arm(
                now.at + next,
                TimerKey::Resend {
                    txn: id,
                    attempt,
                    bye,
                    n: n.saturating_add(1),
                },
            );
        }
    }

    /// The answer to a CANCEL (`bye: false`) or BYE of ours to attempt `i`.
    pub(in crate::router) fn own_answered(&self, id: u64, i: u8, bye: bool) {
        let Some(t) = self.txns.pin().get(&id).cloned() else {
            return;
        };
        let mut t = t.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(x) = t.tries.get_mut(usize::from(i)) {
            if bye {
                x.bye_answered = true;
            } else {
                x.cancel_answered = true;
            }
        }
        // A completed entry that only waited for this answer may go now.
        if t.phase != Phase::Trying {
            self.sweep_lock().end_at(0, id);
        }
    }

    /// ACKs a non-2xx final of attempt `i` (RFC 3261 §17.1.1.3).
    pub(super) fn ack_attempt(
        &self,
        t: &ClientTxn,
        i: usize,
        resp: &Message<'_>,
        out: &mut Outbox,
    ) {
        let Some(x) = t.tries.get(i) else { return };
        let Ok(req) = Message::parse(&t.request) else {
            return;
        };
        out.send_with(dest_of(x.address, x.transport), |b| {
            build::ack_for_failure(&req, resp, b);
        });
    }

    /// ACKs, and once BYEs, a 2xx from attempt `i` that the UA must not get.
    pub(super) fn ack_and_bye(
        &self,
        t: &mut ClientTxn,
        id: u64,
        i: usize,
        resp: &Message<'_>,
        now: Now,
        out: &mut Outbox,
    ) {
        let Some(x) = t.tries.get_mut(i) else { return };
        let bye = !std::mem::replace(&mut x.byed, true);
        let (address, transport) = (x.address, x.transport);
        let dest = dest_of(address, transport);
        let mut via = ViaText::default();
        let ack_branch = Self::branch(
            self.keys.hash(&[&id.to_be_bytes(), b"ack"]),
            Leg::Local(i as u8),
            t.loop_hash,
        );
        self.write_via(&mut via.0, transport, ack_branch, None);
        out.send_with(dest.clone(), |b| {
            build::in_dialog(
                resp,
                b"ACK",
                resp.cseq().seq,
                &via.0,
                &|u| self.uri_is_ours(u),
                b,
            );
        });
        if bye {
            warn!(call_id = %String::from_utf8_lossy(resp.call_id()), server = %x.server, method = "INVITE", "2xx from an attempt given up: ACK and BYE");
            let mut via = ViaText::default();
            // The transaction's own id: its answer finds the entry.
            let bye_branch = Self::branch(id, Leg::Local(i as u8), t.loop_hash);
            self.write_via(&mut via.0, transport, bye_branch, None);
            let mut b = Vec::with_capacity(512);
            build::in_dialog(
                resp,
                b"BYE",
                resp.cseq().seq.saturating_add(1),
                &via.0,
                &|u| self.uri_is_ours(u),
                &mut b,
            );
            out.send(dest, &b);
            t.tries[i].bye = Some(b);
            self.own_request_sent(t, id, i, true, now, out);
        }
    }
}

//! The requester half of an RC queue pair (`rxe_req.c` and `rxe_comp.c`): segmentation,
//! the window, acknowledgements, NAKs, READ responses, retransmission.
use rdma_wire::{opcode, Reth, RocePacket};

use super::core::{wc_opcode, RcCore, SqEntry};
use super::{psn, rnr_timer_us, OutPacket, QpState, SendOp, SendWr, WcOpcode, WcStatus, ACK_EVERY};
use crate::counters::bump;

/// Packets (PSNs) a message of `len` bytes takes at `mtu`.
pub(super) fn packets(len: usize, mtu: usize) -> u32 {
    len.div_ceil(mtu).max(1) as u32
}

impl RcCore {
    pub(super) fn enqueue_send(&mut self, wr: SendWr) {
        let mtu = self.attrs.path_mtu;
        let (npkts, read_mr) = match &wr.op {
            SendOp::Send { data, .. } | SendOp::Write { data, .. } => {
                (packets(data.len(), mtu), None)
            }
            SendOp::Read {
                len,
                lkey,
                local_addr,
                ..
            } => (
                packets(*len as usize, mtu),
                self.mrs
                    .check_local_write(*lkey, *local_addr, *len as usize)
                    .ok(),
            ),
        };
        self.sq.push_back(SqEntry {
            wr,
            first_psn: 0,
            npkts,
            sent: 0,
            started: false,
            read_done: 0,
            read_mr,
        });
    }

    /// Sends what the window allows, starting work requests in order.
    pub(super) fn fill(&mut self, now: u64) {
        if !matches!(self.state, QpState::Rts | QpState::Sqd) || self.rnr_until.is_some() {
            return;
        }
        let mtu = self.attrs.path_mtu;
        let window = self.attrs.max_inflight as i32;
        let mut i = 0;
        'entries: while i < self.sq.len() {
            if !self.sq[i].started {
                if self.state == QpState::Sqd {
                    break;
                }
                if let SendOp::Read { .. } = self.sq[i].wr.op {
                    if self.sq[i].read_mr.is_none() {
                        // The local region check failed at post time: complete it in order.
                        if i == 0 {
                            self.fail_head(WcStatus::LocProtErr);
                            return;
                        }
                        break;
                    }
                }
                let e = &mut self.sq[i];
                e.first_psn = self.next_psn;
                e.started = true;
                self.next_psn = psn::add(self.next_psn, e.npkts);
            }
            while self.sq[i].sent < self.sq[i].npkts {
                let e = &self.sq[i];
                let p = psn::add(e.first_psn, e.sent);
                if psn::diff(p, self.una) >= window {
                    break 'entries;
                }
                let (pkt, next_sent) = build(e, mtu);
                let fresh = psn::diff(p, self.sent_high) >= 0;
                let end = psn::add(e.first_psn, next_sent);
                self.sq[i].sent = next_sent;
                if fresh {
                    bump(&self.counters.tx_packets);
                    self.sent_high = end;
                } else {
                    bump(&self.counters.tx_retransmits);
                }
                self.out.push(pkt);
            }
            i += 1;
        }
        if self.timer.is_none() && self.outstanding() {
            self.timer = Some(now + self.attrs.timeout_us);
        }
    }

    /// Whether anything sent waits for an acknowledgement or a response.
    pub(super) fn outstanding(&self) -> bool {
        self.sq.front().is_some_and(|e| e.started && e.sent > 0)
    }

    /// Rewinds transmission to PSN `p` (go-back-N).
    pub(super) fn go_back(&mut self, p: u32) {
        for e in self.sq.iter_mut().filter(|e| e.started) {
            let d = psn::diff(p, e.first_psn);
            if d >= e.npkts as i32 {
                continue; // wholly before p
            }
            e.sent = match e.wr.op {
                SendOp::Read { .. } => e.read_done,
                _ => d.max(0) as u32,
            };
        }
    }

    /// Completes the head work request with `status` and moves the QP to ERR.
    pub(super) fn fail_head(&mut self, status: WcStatus) {
        if let Some(e) = self.sq.pop_front() {
            let op = wc_opcode(&e.wr);
            self.complete(e.wr.wr_id, status, op, 0, None, Vec::new());
        }
        self.to_err();
    }

    pub(super) fn on_timeout(&mut self, now: u64) {
        self.timer = None;
        if !self.outstanding() {
            return;
        }
        bump(&self.counters.timeouts);
        if self.retries_left == 0 {
            self.fail_head(WcStatus::RetryExcErr);
            return;
        }
        self.retries_left -= 1;
        self.go_back(self.una);
        self.fill(now);
    }

    /// Whether `p` names a PSN that was sent and is not acknowledged yet.
    fn in_flight(&self, p: u32) -> bool {
        psn::diff(p, self.una) >= 0 && psn::diff(p, self.sent_high) < 0
    }

    /// Everything up to and including `p` is acknowledged: completes SENDs and WRITEs; a READ
    /// whose responses are missing below `p` is asked again (an implied NAK).
    fn ack_through(&mut self, now: u64, p: u32) {
        let mut progressed = false;
        while let Some(e) = self.sq.front() {
            if !e.started {
                break;
            }
            let last = psn::add(e.first_psn, e.npkts - 1);
            if let SendOp::Read { .. } = e.wr.op {
                let missing = psn::add(e.first_psn, e.read_done);
                if psn::diff(p, missing) >= 0 {
                    // Later PSNs are acknowledged but this READ's responses did not come.
                    self.una = missing;
                    self.go_back(missing);
                    bump(&self.counters.tx_retransmits);
                }
                break;
            }
            if psn::diff(last, p) > 0 {
                break;
            }
            let e = self.sq.pop_front().expect("front exists");
            let len = match &e.wr.op {
                SendOp::Send { data, .. } | SendOp::Write { data, .. } => data.len() as u32,
                SendOp::Read { len, .. } => *len,
            };
            let op = wc_opcode(&e.wr);
            self.complete(e.wr.wr_id, WcStatus::Success, op, len, None, Vec::new());
            self.give_back(e.wr.op);
            bump(&self.counters.sends_completed);
            progressed = true;
        }
        let next = psn::add(p, 1);
        if psn::diff(next, self.una) > 0 {
            let limit = self
                .sq
                .front()
                .filter(|e| e.started && matches!(e.wr.op, SendOp::Read { .. }))
                .map(|e| psn::add(e.first_psn, e.read_done));
            self.una = match limit {
                Some(l) if psn::diff(next, l) > 0 => l,
                _ => next,
            };
            progressed = true;
        }
        if progressed {
            self.retries_left = self.attrs.retry_count;
            self.rnr_left = self.attrs.rnr_retry;
            self.timer = self.outstanding().then_some(now + self.attrs.timeout_us);
        }
    }

    pub(super) fn on_response(&mut self, now: u64, pkt: &RocePacket<'_>) {
        bump(&self.counters.rx_responses);
        let p = pkt.bth.psn;
        if !self.in_flight(p) {
            bump(&self.counters.rx_stale_responses);
            return;
        }
        let before = psn::add(p, psn::PSN_MASK);
        match pkt.bth.opcode {
            opcode::RC_ACKNOWLEDGE => {
                let Some(aeth) = pkt.aeth else {
                    bump(&self.counters.rx_stale_responses);
                    return;
                };
                let s = aeth.syndrome;
                match (s >> 5) & 3 {
                    0 => self.ack_through(now, p),
                    1 => {
                        bump(&self.counters.rnr_naks_received);
                        self.ack_through(now, before);
                        if self.rnr_left == 0 {
                            self.fail_head(WcStatus::RnrRetryExcErr);
                            return;
                        }
                        if self.attrs.rnr_retry != 7 {
                            self.rnr_left -= 1;
                        }
                        self.una = p;
                        self.timer = None;
                        self.rnr_until = Some(now + rnr_timer_us(s & 31));
                        return;
                    }
                    3 => {
                        self.ack_through(now, before);
                        match s & 31 {
                            0 => {
                                if self.retries_left == 0 {
                                    self.fail_head(WcStatus::RetryExcErr);
                                    return;
                                }
                                self.retries_left -= 1;
                                self.una = p;
                                self.go_back(p);
                            }
                            1 => return self.fail_head(WcStatus::RemInvReqErr),
                            2 => return self.fail_head(WcStatus::RemAccessErr),
                            _ => return self.fail_head(WcStatus::RemOpErr),
                        }
                    }
                    _ => {
                        bump(&self.counters.rx_stale_responses);
                        return;
                    }
                }
            }
            opcode::RC_RDMA_READ_RESPONSE_FIRST
            | opcode::RC_RDMA_READ_RESPONSE_MIDDLE
            | opcode::RC_RDMA_READ_RESPONSE_LAST
            | opcode::RC_RDMA_READ_RESPONSE_ONLY => {
                self.ack_through(now, before);
                if !self.on_read_response(now, pkt) {
                    bump(&self.counters.rx_stale_responses);
                }
            }
            _ => bump(&self.counters.rx_stale_responses),
        }
        self.fill(now);
    }

    /// One READ response; `false` when it is not the one expected next.
    fn on_read_response(&mut self, now: u64, pkt: &RocePacket<'_>) -> bool {
        let mtu = self.attrs.path_mtu;
        let Some(e) = self.sq.front_mut() else {
            return false;
        };
        let SendOp::Read {
            len, local_addr, ..
        } = e.wr.op
        else {
            return false;
        };
        if !e.started || pkt.bth.psn != psn::add(e.first_psn, e.read_done) {
            return false;
        }
        let k = e.read_done;
        let last = k + 1 == e.npkts;
        let op = pkt.bth.opcode;
        let op_ok = if last {
            matches!(
                op,
                opcode::RC_RDMA_READ_RESPONSE_LAST | opcode::RC_RDMA_READ_RESPONSE_ONLY
            )
        } else {
            matches!(
                op,
                opcode::RC_RDMA_READ_RESPONSE_FIRST | opcode::RC_RDMA_READ_RESPONSE_MIDDLE
            )
        };
        let off = k as usize * mtu;
        let want = if last { len as usize - off } else { mtu };
        if !op_ok || pkt.payload.len() != want {
            return false;
        }
        let Some(mr) = &e.read_mr else {
            return false;
        };
        if !mr.write(local_addr + off as u64, pkt.payload) {
            return false;
        }
        e.read_done += 1;
        self.una = psn::add(pkt.bth.psn, 1);
        self.retries_left = self.attrs.retry_count;
        if last {
            let e = self.sq.pop_front().expect("front exists");
            self.complete(
                e.wr.wr_id,
                WcStatus::Success,
                WcOpcode::RdmaRead,
                len,
                None,
                Vec::new(),
            );
            bump(&self.counters.sends_completed);
        }
        self.timer = self.outstanding().then_some(now + self.attrs.timeout_us);
        true
    }
}

/// The packet of `e` at its `sent` position, and the new `sent`.
fn build(e: &SqEntry, mtu: usize) -> (OutPacket, u32) {
    let k = e.sent;
    let p = psn::add(e.first_psn, k);
    let n = e.npkts;
    match &e.wr.op {
        SendOp::Read {
            len,
            remote_addr,
            rkey,
            ..
        } => {
            let off = k as usize * mtu;
            (
                OutPacket {
                    opcode: opcode::RC_RDMA_READ_REQUEST,
                    psn: p,
                    ack_req: true,
                    reth: Some(Reth {
                        virtual_address: remote_addr.wrapping_add(off as u64),
                        r_key: *rkey,
                        dma_length: len - off as u32,
                    }),
                    aeth: None,
                    imm: None,
                    payload: Vec::new(),
                },
                n,
            )
        }
        SendOp::Send { data, imm } | SendOp::Write { data, imm, .. } => {
            let write = matches!(e.wr.op, SendOp::Write { .. });
            let start = k as usize * mtu;
            let end = (start + mtu).min(data.len());
            let (only, first, last) = (n == 1, k == 0, k + 1 == n);
            let with_imm = imm.is_some() && last;
            let op = match (write, only, first, last, with_imm) {
                (false, true, _, _, false) => opcode::RC_SEND_ONLY,
                (false, true, _, _, true) => opcode::RC_SEND_ONLY_WITH_IMMEDIATE,
                (false, _, true, _, _) => opcode::RC_SEND_FIRST,
                (false, _, _, true, false) => opcode::RC_SEND_LAST,
                (false, _, _, true, true) => opcode::RC_SEND_LAST_WITH_IMMEDIATE,
                (false, ..) => opcode::RC_SEND_MIDDLE,
                (true, true, _, _, false) => opcode::RC_RDMA_WRITE_ONLY,
                (true, true, _, _, true) => opcode::RC_RDMA_WRITE_ONLY_WITH_IMMEDIATE,
                (true, _, true, _, _) => opcode::RC_RDMA_WRITE_FIRST,
                (true, _, _, true, false) => opcode::RC_RDMA_WRITE_LAST,
                (true, _, _, true, true) => opcode::RC_RDMA_WRITE_LAST_WITH_IMMEDIATE,
                (true, ..) => opcode::RC_RDMA_WRITE_MIDDLE,
            };
            let reth = match e.wr.op {
                SendOp::Write {
                    remote_addr, rkey, ..
                } if first => Some(Reth {
                    virtual_address: remote_addr,
                    r_key: rkey,
                    dma_length: data.len() as u32,
                }),
                _ => None,
            };
            (
                OutPacket {
                    opcode: op,
                    psn: p,
                    ack_req: last || (k + 1) % ACK_EVERY == 0,
                    reth,
                    aeth: None,
                    imm: if with_imm { *imm } else { None },
                    payload: data[start.min(end)..end].to_vec(),
                },
                k + 1,
            )
        }
    }
}

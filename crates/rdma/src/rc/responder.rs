//! The responder half of an RC queue pair (`rxe_resp.c`): PSN checks, duplicates, the
//! opcode sequence, receives, remote WRITE and READ through the region checks, NAKs, ACKs.
use rdma_wire::{opcode, Aeth, RocePacket};

use super::core::{syndrome, InProgress, RcCore};
use super::mr::{AccessError, RemoteOp};
use super::requester::packets;
use super::{psn, OutPacket, WcOpcode, WcStatus, ACK_EVERY};
use crate::counters::bump;

/// Largest RDMA READ served (longer ones are refused as invalid requests), bounding the
/// responses one request can make this side build.
pub const MAX_READ: u32 = 16 << 20;
/// READ requests remembered for answering duplicates.
const RECENT_READS: usize = 16;

impl RcCore {
    pub(super) fn on_request(&mut self, pkt: &RocePacket<'_>) {
        let p = pkt.bth.psn;
        let d = psn::diff(p, self.epsn);
        if d > 0 {
            bump(&self.counters.rx_out_of_sequence);
            if !self.nak_sent {
                self.nak_sent = true;
                self.nak(syndrome::NAK_PSN_SEQ);
            }
            return;
        }
        if d < 0 {
            bump(&self.counters.rx_duplicates);
            if pkt.bth.opcode == opcode::RC_RDMA_READ_REQUEST {
                // Answer it again (the responses were lost) if it is a READ executed lately
                // — or the tail of one: a requester retries from the first missing response
                // with the address and length moved on; nothing else changes.
                let known = pkt.reth.filter(|r| {
                    self.recent_reads.iter().any(|(q, o)| {
                        let k = psn::diff(p, *q);
                        let moved = u64::from(k.max(0) as u32) * self.attrs.path_mtu as u64;
                        k >= 0
                            && o.r_key == r.r_key
                            && o.virtual_address.wrapping_add(moved) == r.virtual_address
                            && u64::from(o.dma_length) == u64::from(r.dma_length) + moved
                    })
                });
                match known {
                    Some(reth) => {
                        let _ = self.read_responses(p, reth);
                    }
                    None => bump(&self.counters.rx_unknown_duplicate_reads),
                }
            } else {
                self.ack_now();
            }
            return;
        }
        self.nak_sent = false;
        let op = pkt.bth.opcode;
        use opcode::*;
        let ok = match (op, &self.in_progress) {
            (RC_COMPARE_SWAP | RC_FETCH_ADD, _) => {
                bump(&self.counters.atomics_refused);
                return self.refuse_invalid();
            }
            (RC_SEND_FIRST | RC_SEND_ONLY | RC_SEND_ONLY_WITH_IMMEDIATE, None) => true,
            (
                RC_SEND_MIDDLE | RC_SEND_LAST | RC_SEND_LAST_WITH_IMMEDIATE,
                Some(InProgress::Send(..)),
            ) => true,
            (
                RC_RDMA_WRITE_FIRST | RC_RDMA_WRITE_ONLY | RC_RDMA_WRITE_ONLY_WITH_IMMEDIATE,
                None,
            ) => true,
            (
                RC_RDMA_WRITE_MIDDLE | RC_RDMA_WRITE_LAST | RC_RDMA_WRITE_LAST_WITH_IMMEDIATE,
                Some(InProgress::Write(..)),
            ) => true,
            (RC_RDMA_READ_REQUEST, None) => true,
            _ => false,
        };
        if !ok {
            return self.refuse_invalid();
        }
        let done = match op {
            RC_SEND_FIRST
            | RC_SEND_MIDDLE
            | RC_SEND_LAST
            | RC_SEND_ONLY
            | RC_SEND_LAST_WITH_IMMEDIATE
            | RC_SEND_ONLY_WITH_IMMEDIATE => self.on_send(pkt),
            RC_RDMA_READ_REQUEST => {
                let Some(reth) = pkt.reth else {
                    return self.refuse_invalid();
                };
                if reth.dma_length > MAX_READ {
                    return self.refuse_invalid();
                }
                if !self.remote_read {
                    return self.refuse_access(AccessError::NotPermitted);
                }
                match self.read_responses(p, reth) {
                    Ok(n) => {
                        if self.recent_reads.len() >= RECENT_READS {
                            self.recent_reads.pop_front();
                        }
                        self.recent_reads.push_back((p, reth));
                        self.epsn = psn::add(self.epsn, n);
                        self.unacked = 0;
                        bump(&self.counters.rx_packets);
                        return;
                    }
                    Err(e) => return self.refuse_access(e),
                }
            }
            _ => self.on_write(pkt),
        };
        if let Some(ends_message) = done {
            self.epsn = psn::add(self.epsn, 1);
            if ends_message {
                self.msn = psn::add(self.msn, 1);
            }
            bump(&self.counters.rx_packets);
            self.counters.rx_bytes.fetch_add(
                pkt.payload.len() as u64,
                std::sync::atomic::Ordering::Relaxed,
            );
            self.unacked += 1;
            if pkt.bth.ack_req || self.unacked >= ACK_EVERY {
                self.ack_now();
            }
        }
    }

    /// ACK everything received in order so far.
    fn ack_now(&mut self) {
        self.unacked = 0;
        bump(&self.counters.tx_acks);
        self.send_aeth(psn::add(self.epsn, psn::PSN_MASK), syndrome::ACK);
    }

    fn nak(&mut self, s: u8) {
        bump(&self.counters.tx_naks);
        self.send_aeth(self.epsn, s);
    }

    fn refuse_invalid(&mut self) {
        bump(&self.counters.rx_invalid);
        self.nak(syndrome::NAK_INVALID_REQUEST);
        self.to_err();
    }

    fn refuse_access(&mut self, why: AccessError) {
        bump(&self.counters.rx_access_refused);
        tracing::debug!(qpn = self.qpn, ?why, "remote access refused");
        self.nak(syndrome::NAK_REMOTE_ACCESS);
        self.to_err();
    }

    fn rnr(&mut self) {
        // Like a sequence NAK: the packets after this one are dropped silently until the
        // requester comes back to it.
        self.nak_sent = true;
        bump(&self.counters.rnr_naks_sent);
        self.nak(syndrome::RNR_NAK | (self.attrs.min_rnr_timer & 31));
    }

    /// Whether a payload length fits its place in the message: exactly one MTU for FIRST and
    /// MIDDLE, at most one for LAST and ONLY (at least one byte for LAST).
    fn len_ok(&self, len: usize, first_or_middle: bool, last: bool) -> bool {
        let mtu = self.attrs.path_mtu;
        if first_or_middle {
            len == mtu
        } else {
            len <= mtu && (len > 0 || !last)
        }
    }

    /// A SEND packet; `Some(ends_message)` when taken.
    fn on_send(&mut self, pkt: &RocePacket<'_>) -> Option<bool> {
        use opcode::*;
        let op = pkt.bth.opcode;
        let first = matches!(
            op,
            RC_SEND_FIRST | RC_SEND_ONLY | RC_SEND_ONLY_WITH_IMMEDIATE
        );
        let last = !matches!(op, RC_SEND_FIRST | RC_SEND_MIDDLE);
        let is_last_not_only = matches!(op, RC_SEND_LAST | RC_SEND_LAST_WITH_IMMEDIATE);
        if !self.len_ok(pkt.payload.len(), !last, is_last_not_only) {
            self.refuse_invalid();
            return None;
        }
        let (r, mut buf) = if first {
            let Some(r) = self.rq.pop_front() else {
                self.rnr();
                return None;
            };
            (r, Vec::new())
        } else {
            match self.in_progress.take() {
                Some(InProgress::Send(r, b)) => (r, b),
                _ => {
                    self.refuse_invalid();
                    return None;
                }
            }
        };
        if buf.len() + pkt.payload.len() > r.max_len {
            self.complete(
                r.wr_id,
                WcStatus::LocLenErr,
                WcOpcode::Recv,
                0,
                None,
                Vec::new(),
            );
            self.refuse_invalid();
            return None;
        }
        buf.extend_from_slice(pkt.payload);
        if last {
            let imm = pkt.imm_dt.map(|i| u32::from_be_bytes(i.0));
            let n = buf.len() as u32;
            self.complete(r.wr_id, WcStatus::Success, WcOpcode::Recv, n, imm, buf);
            bump(&self.counters.recvs_completed);
        } else {
            self.in_progress = Some(InProgress::Send(r, buf));
        }
        Some(last)
    }

    /// An RDMA WRITE packet; `Some(ends_message)` when taken.
    fn on_write(&mut self, pkt: &RocePacket<'_>) -> Option<bool> {
        use opcode::*;
        let op = pkt.bth.opcode;
        let len = pkt.payload.len();
        let mtu = self.attrs.path_mtu;
        let with_imm = matches!(
            op,
            RC_RDMA_WRITE_ONLY_WITH_IMMEDIATE | RC_RDMA_WRITE_LAST_WITH_IMMEDIATE
        );
        let (mr, va, remaining, last, total) = match op {
            RC_RDMA_WRITE_FIRST | RC_RDMA_WRITE_ONLY | RC_RDMA_WRITE_ONLY_WITH_IMMEDIATE => {
                let reth = pkt.reth?;
                if !self.remote_write {
                    self.refuse_access(AccessError::NotPermitted);
                    return None;
                }
                let total = reth.dma_length as usize;
                let mr = match self.mrs.check_remote(
                    reth.r_key,
                    reth.virtual_address,
                    total,
                    RemoteOp::Write,
                ) {
                    Ok(mr) => mr,
                    Err(e) => {
                        self.refuse_access(e);
                        return None;
                    }
                };
                let only = op != RC_RDMA_WRITE_FIRST;
                let len_ok = if only {
                    len == total && len <= mtu
                } else {
                    len == mtu && total > mtu
                };
                if !len_ok {
                    self.refuse_invalid();
                    return None;
                }
                (mr, reth.virtual_address, total, only, total)
            }
            _ => {
                let Some(InProgress::Write(mr, va, remaining, total)) = self.in_progress.take()
                else {
                    self.refuse_invalid();
                    return None;
                };
                let last = op != RC_RDMA_WRITE_MIDDLE;
                let len_ok = if last {
                    len == remaining
                } else {
                    len == mtu && remaining > mtu
                };
                if !len_ok {
                    self.refuse_invalid();
                    return None;
                }
                (mr, va, remaining, last, total)
            }
        };
        if with_imm && self.rq.is_empty() {
            // Nothing written yet for this packet; it comes again after the RNR wait.
            if !matches!(op, RC_RDMA_WRITE_ONLY_WITH_IMMEDIATE) {
                self.in_progress = Some(InProgress::Write(mr, va, remaining, total));
            }
            self.rnr();
            return None;
        }
        if !mr.write(va, pkt.payload) {
            // Cannot happen: the whole range was checked on the first packet.
            self.refuse_access(AccessError::OutOfBounds);
            return None;
        }
        if last {
            if with_imm {
                if let Some(r) = self.rq.pop_front() {
                    let imm = pkt.imm_dt.map(|i| u32::from_be_bytes(i.0));
                    self.complete(
                        r.wr_id,
                        WcStatus::Success,
                        WcOpcode::RecvRdmaWithImm,
                        total as u32,
                        imm,
                        Vec::new(),
                    );
                    bump(&self.counters.recvs_completed);
                }
            }
        } else {
            self.in_progress = Some(InProgress::Write(
                mr,
                va + len as u64,
                remaining - len,
                total,
            ));
        }
        Some(last)
    }

    /// Queues the responses of a READ request at PSN `p` (checked against the regions); the
    /// number of PSNs they use.
    fn read_responses(&mut self, p: u32, reth: rdma_wire::Reth) -> Result<u32, AccessError> {
        let len = reth.dma_length as usize;
        if reth.dma_length > MAX_READ {
            return Err(AccessError::OutOfBounds);
        }
        let mr = self
            .mrs
            .check_remote(reth.r_key, reth.virtual_address, len, RemoteOp::Read)?;
        let mtu = self.attrs.path_mtu;
        let n = packets(len, mtu);
        let msn = psn::add(self.msn, 1);
        let data = mr
            .read(reth.virtual_address, len)
            .ok_or(AccessError::OutOfBounds)?;
        for k in 0..n {
            let start = k as usize * mtu;
            let end = (start + mtu).min(len);
            let op = match (n == 1, k == 0, k + 1 == n) {
                (true, ..) => opcode::RC_RDMA_READ_RESPONSE_ONLY,
                (_, true, _) => opcode::RC_RDMA_READ_RESPONSE_FIRST,
                (_, _, true) => opcode::RC_RDMA_READ_RESPONSE_LAST,
                _ => opcode::RC_RDMA_READ_RESPONSE_MIDDLE,
            };
            let aeth = (op != opcode::RC_RDMA_READ_RESPONSE_MIDDLE).then_some(Aeth {
                syndrome: syndrome::ACK,
                msn,
            });
            self.out.push(OutPacket {
                opcode: op,
                psn: psn::add(p, k),
                ack_req: false,
                reth: None,
                aeth,
                imm: None,
                payload: data[start.min(end)..end].to_vec(),
            });
        }
        if p == self.epsn {
            self.msn = msn;
        }
        Ok(n)
    }
}

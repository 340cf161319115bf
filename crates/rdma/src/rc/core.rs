//! The RC transport's state: QP state machine, queues, counters, and the dispatch of packets
//! and timers to the requester ([`super::requester`]) and responder ([`super::responder`]).
use std::collections::VecDeque;
use std::sync::Arc;

use rdma_wire::{opcode, Aeth, RocePacket};

use super::mr::{MemoryRegion, MrTable};
use super::{
    mtu_code, psn, Completion, OutPacket, QpState, RcAttrs, RcError, SendWr, WcOpcode, WcStatus,
};
use crate::counters::counters;

counters! {
    /// Per-QP counters (JSON in reports).
    RcCounters => RcStats {
        /// Request packets sent (first transmissions).
        tx_packets,
        /// Packets retransmitted (go-back-N after a NAK, a timeout or an RNR wait).
        tx_retransmits,
        /// ACKs sent (coalesced).
        tx_acks,
        /// NAKs sent (sequence, RNR, access, invalid request).
        tx_naks,
        /// Request packets received in order and executed.
        rx_packets,
        /// Duplicate request packets (re-acknowledged or READs answered again).
        rx_duplicates,
        /// Duplicate READ requests not among the recent READs: dropped.
        rx_unknown_duplicate_reads,
        /// Request packets after a gap (NAK sequence error sent once, then dropped).
        rx_out_of_sequence,
        /// ACK/NAK/READ responses received.
        rx_responses,
        /// Responses ignored: for PSNs not outstanding, or out of order.
        rx_stale_responses,
        /// Remote accesses refused: bad rkey, out of the region, access not granted.
        rx_access_refused,
        /// Requests refused as invalid (opcode sequence, lengths, receive too small).
        rx_invalid,
        /// Atomic requests refused (NAK invalid request).
        atomics_refused,
        /// RNR NAKs sent (no receive posted).
        rnr_naks_sent,
        /// RNR NAKs received.
        rnr_naks_received,
        /// Retransmission timeouts.
        timeouts,
        /// Packets dropped because of the QP's state (RESET, INIT, ERR).
        rx_wrong_state,
        /// Send work requests completed successfully.
        sends_completed,
        /// Receives completed successfully.
        recvs_completed,
        /// Payload bytes received into receives and regions.
        rx_bytes,
    }
}

/// A send work request on its way.
#[derive(Debug)]
pub(super) struct SqEntry {
    pub wr: SendWr,
    /// PSN of its first packet (assigned when it starts).
    pub first_psn: u32,
    /// PSNs it uses (packets; for a READ the responses).
    pub npkts: u32,
    /// Packets sent so far (for a READ: `npkts` once the request left).
    pub sent: u32,
    /// Whether it has started (has PSNs).
    pub started: bool,
    /// READ: response packets received in order.
    pub read_done: u32,
    /// READ: the local region.
    pub read_mr: Option<Arc<MemoryRegion>>,
}

/// A posted receive.
#[derive(Debug, Clone, Copy)]
pub(super) struct RecvWr {
    pub wr_id: u64,
    pub max_len: usize,
}

/// A message being received over several packets.
#[derive(Debug)]
pub(super) enum InProgress {
    /// A SEND: the receive it fills and the bytes so far.
    Send(RecvWr, Vec<u8>),
    /// An RDMA WRITE: the region, the next address, bytes still to come, the whole length
    /// (a WRITE with immediate completes its receive with it, as rxe does).
    Write(Arc<MemoryRegion>, u64, usize, usize),
}

/// Buffers [`RcCore::give_back`] keeps at most, the largest it keeps, and the most bytes
/// it keeps in all (a sender with 64 WRITEs of 64 KiB outstanding reuses all of theirs).
const MAX_SPARE: usize = 64;
const MAX_SPARE_BYTES: usize = 1 << 20;
const MAX_SPARE_TOTAL: usize = 4 << 20;

/// The RC transport of one queue pair (see the module documentation).
#[derive(Debug)]
pub struct RcCore {
    pub(super) qpn: u32,
    pub(super) state: QpState,
    pub(super) attrs: RcAttrs,
    pub(super) remote_write: bool,
    pub(super) remote_read: bool,
    pub(super) mrs: Arc<MrTable>,
    pub(super) max_sq: usize,
    pub(super) max_rq: usize,
    // Requester.
    pub(super) sq: VecDeque<SqEntry>,
    /// Next PSN to assign to a starting work request.
    pub(super) next_psn: u32,
    /// Oldest PSN not acknowledged.
    pub(super) una: u32,
    /// One past the highest PSN ever sent (what is below it and not acknowledged is in flight).
    pub(super) sent_high: u32,
    pub(super) retries_left: u8,
    pub(super) rnr_left: u8,
    /// Retransmission deadline, µs.
    pub(super) timer: Option<u64>,
    /// End of an RNR wait, µs (nothing is sent before).
    pub(super) rnr_until: Option<u64>,
    // Responder.
    pub(super) epsn: u32,
    pub(super) msn: u32,
    pub(super) rq: VecDeque<RecvWr>,
    pub(super) in_progress: Option<InProgress>,
    pub(super) nak_sent: bool,
    pub(super) unacked: u32,
    /// The last READ requests executed (PSN, RETH): a duplicate READ is answered again only
    /// when it is one of them (rxe's read resources), so an old or made-up PSN cannot make
    /// this side send a region's contents over and over.
    pub(super) recent_reads: VecDeque<(u32, rdma_wire::Reth)>,
    // Out.
    pub(super) out: Vec<OutPacket>,
    pub(super) cq: VecDeque<Completion>,
    /// Buffers of SENDs and WRITEs that completed, for the next ones ([`RcCore::spare_buffer`]):
    /// a sender reusing them does not allocate (and fault in) fresh memory per message.
    pub(super) spare: Vec<Vec<u8>>,
    /// Counters.
    pub counters: RcCounters,
}

impl RcCore {
    /// A QP in RESET with room for `max_sq` send and `max_rq` receive work requests, using the
    /// regions of `mrs` (its protection domain).
    pub fn new(qpn: u32, mrs: Arc<MrTable>, max_sq: usize, max_rq: usize) -> RcCore {
        RcCore {
            qpn,
            state: QpState::Reset,
            attrs: RcAttrs::default(),
            remote_write: false,
            remote_read: false,
            mrs,
            max_sq: max_sq.max(1),
            max_rq: max_rq.max(1),
            sq: VecDeque::new(),
            next_psn: 0,
            una: 0,
            sent_high: 0,
            retries_left: 0,
            rnr_left: 0,
            timer: None,
            rnr_until: None,
            epsn: 0,
            msn: 0,
            rq: VecDeque::new(),
            in_progress: None,
            nak_sent: false,
            unacked: 0,
            recent_reads: VecDeque::new(),
            out: Vec::new(),
            cq: VecDeque::new(),
            spare: Vec::new(),
            counters: RcCounters::default(),
        }
    }

    /// Its QPN.
    pub fn qpn(&self) -> u32 {
        self.qpn
    }

    /// Its state.
    pub fn state(&self) -> QpState {
        self.state
    }

    /// The connection attributes.
    pub fn attrs(&self) -> &RcAttrs {
        &self.attrs
    }

    fn bad_state(&self) -> RcError {
        RcError::BadState {
            qpn: self.qpn,
            state: self.state,
        }
    }

    /// RESET → INIT, with the remote accesses the QP allows.
    pub fn to_init(&mut self, remote_write: bool, remote_read: bool) -> Result<(), RcError> {
        if !matches!(self.state, QpState::Reset | QpState::Init) {
            return Err(self.bad_state());
        }
        self.remote_write = remote_write;
        self.remote_read = remote_read;
        self.state = QpState::Init;
        Ok(())
    }

    /// INIT → RTR with the connection's attributes.
    pub fn to_rtr(&mut self, attrs: RcAttrs) -> Result<(), RcError> {
        if self.state != QpState::Init {
            return Err(self.bad_state());
        }
        if mtu_code(attrs.path_mtu).is_none() {
            return Err(RcError::BadAttr(format!("path MTU {}", attrs.path_mtu)));
        }
        if attrs.retry_count > 7 || attrs.rnr_retry > 7 || attrs.min_rnr_timer > 31 {
            return Err(RcError::BadAttr("retry counts ≤ 7, RNR timer ≤ 31".into()));
        }
        if attrs.dest_qpn > psn::PSN_MASK {
            return Err(RcError::BadAttr(format!("QPN {:#x}", attrs.dest_qpn)));
        }
        self.attrs = RcAttrs {
            rq_psn: attrs.rq_psn & psn::PSN_MASK,
            sq_psn: attrs.sq_psn & psn::PSN_MASK,
            max_inflight: attrs.max_inflight.clamp(1, 1 << 20),
            ..attrs
        };
        self.epsn = self.attrs.rq_psn;
        self.state = QpState::Rtr;
        Ok(())
    }

    /// RTR → RTS (also SQD → RTS): the requester starts at the attributes' `sq_psn`.
    pub fn to_rts(&mut self) -> Result<(), RcError> {
        match self.state {
            QpState::Rtr => {
                self.next_psn = self.attrs.sq_psn;
                self.una = self.attrs.sq_psn;
                self.sent_high = self.attrs.sq_psn;
                self.retries_left = self.attrs.retry_count;
                self.rnr_left = self.attrs.rnr_retry;
            }
            QpState::Sqd => {}
            _ => return Err(self.bad_state()),
        }
        self.state = QpState::Rts;
        Ok(())
    }

    /// RTS → SQD: no new send work request starts; those started finish.
    pub fn to_sqd(&mut self) -> Result<(), RcError> {
        if self.state != QpState::Rts {
            return Err(self.bad_state());
        }
        self.state = QpState::Sqd;
        Ok(())
    }

    /// Whether SQD has drained (nothing started is outstanding).
    pub fn drained(&self) -> bool {
        self.sq.iter().all(|e| !e.started)
    }

    /// Any state → ERR: every outstanding work request completes with `WrFlushErr`.
    pub fn to_err(&mut self) {
        if self.state == QpState::Err {
            return;
        }
        self.state = QpState::Err;
        self.timer = None;
        self.rnr_until = None;
        for e in std::mem::take(&mut self.sq) {
            let opcode = wc_opcode(&e.wr);
            self.flushed(e.wr.wr_id, opcode);
        }
        if let Some(InProgress::Send(r, _)) = self.in_progress.take() {
            self.flushed(r.wr_id, WcOpcode::Recv);
        }
        for r in std::mem::take(&mut self.rq) {
            self.flushed(r.wr_id, WcOpcode::Recv);
        }
    }

    /// Completes a work request with `WrFlushErr`.
    fn flushed(&mut self, wr_id: u64, opcode: WcOpcode) {
        self.complete(wr_id, WcStatus::WrFlushErr, opcode, 0, None, Vec::new());
    }

    /// ERR (or any state) → RESET: queues emptied, counters kept.
    pub fn reset(&mut self) {
        self.to_err();
        self.cq.clear();
        self.out.clear();
        self.in_progress = None;
        self.state = QpState::Reset;
    }

    /// Posts a receive for a message of up to `max_len` bytes.
    pub fn post_recv(&mut self, wr_id: u64, max_len: usize) -> Result<(), RcError> {
        if self.state == QpState::Reset {
            return Err(self.bad_state());
        }
        if self.state == QpState::Err {
            self.flushed(wr_id, WcOpcode::Recv);
            return Ok(());
        }
        if self.rq.len() >= self.max_rq {
            return Err(RcError::QueueFull(self.qpn));
        }
        self.rq.push_back(RecvWr { wr_id, max_len });
        Ok(())
    }

    /// Posts a send work request and sends what the window allows.
    pub fn post_send(&mut self, now: u64, wr: SendWr) -> Result<(), RcError> {
        if !matches!(self.state, QpState::Rts | QpState::Sqd | QpState::Err) {
            return Err(self.bad_state());
        }
        if self.state == QpState::Err {
            self.flushed(wr.wr_id, wc_opcode(&wr));
            return Ok(());
        }
        if self.sq.len() >= self.max_sq {
            return Err(RcError::QueueFull(self.qpn));
        }
        self.enqueue_send(wr);
        self.fill(now);
        Ok(())
    }

    /// Takes one packet. `false` when the QP's state drops it.
    pub fn on_packet(&mut self, now: u64, pkt: &RocePacket<'_>) -> bool {
        if !matches!(self.state, QpState::Rtr | QpState::Rts | QpState::Sqd) {
            crate::counters::bump(&self.counters.rx_wrong_state);
            return false;
        }
        let op = pkt.bth.opcode;
        match op {
            opcode::RC_ACKNOWLEDGE
            | opcode::RC_ATOMIC_ACKNOWLEDGE
            | opcode::RC_RDMA_READ_RESPONSE_FIRST
            | opcode::RC_RDMA_READ_RESPONSE_MIDDLE
            | opcode::RC_RDMA_READ_RESPONSE_LAST
            | opcode::RC_RDMA_READ_RESPONSE_ONLY => {
                if self.state != QpState::Rtr {
                    self.on_response(now, pkt);
                }
            }
            _ => self.on_request(pkt),
        }
        true
    }

    /// Fires due timers (retransmission, end of an RNR wait).
    pub fn on_timer(&mut self, now: u64) {
        if let Some(t) = self.rnr_until {
            if now >= t {
                self.rnr_until = None;
                self.go_back(self.una);
                self.fill(now);
            }
        }
        if let Some(t) = self.timer {
            if now >= t {
                self.on_timeout(now);
            }
        }
    }

    /// The next time [`RcCore::on_timer`] has something to do.
    pub fn next_deadline(&self) -> Option<u64> {
        match (self.timer, self.rnr_until) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Packets to send, in order.
    pub fn take_out(&mut self) -> Vec<OutPacket> {
        std::mem::take(&mut self.out)
    }

    /// Whether packets wait in [`RcCore::take_out`].
    pub fn has_out(&self) -> bool {
        !self.out.is_empty()
    }

    /// The next completion.
    pub fn poll_cq(&mut self) -> Option<Completion> {
        self.cq.pop_front()
    }

    /// A buffer for the next SEND or WRITE: one a completed work request gave back (its
    /// capacity kept, and its length and bytes as that request left them: the caller
    /// overwrites or clears them, and keeping them spares re-zeroing a 64 KiB buffer per
    /// WRITE), or a new, empty one.
    pub fn spare_buffer(&mut self) -> Vec<u8> {
        self.spare.pop().unwrap_or_default()
    }

    /// Keeps the buffer of a finished SEND or WRITE for [`RcCore::spare_buffer`] (a few, of
    /// bounded size).
    pub(super) fn give_back(&mut self, op: super::SendOp) {
        if let super::SendOp::Send { data, .. } | super::SendOp::Write { data, .. } = op {
            let kept: usize = self.spare.iter().map(Vec::capacity).sum();
            if self.spare.len() < MAX_SPARE
                && data.capacity() <= MAX_SPARE_BYTES
                && kept + data.capacity() <= MAX_SPARE_TOTAL
            {
                self.spare.push(data);
            }
        }
    }

    /// Completions waiting.
    pub fn cq_len(&self) -> usize {
        self.cq.len()
    }

    /// Send work requests not completed yet.
    pub fn sq_len(&self) -> usize {
        self.sq.len()
    }

    /// Receives posted and not used yet.
    pub fn rq_len(&self) -> usize {
        self.rq.len()
    }

    pub(super) fn complete(
        &mut self,
        wr_id: u64,
        status: WcStatus,
        opcode: WcOpcode,
        byte_len: u32,
        imm: Option<u32>,
        data: Vec<u8>,
    ) {
        self.cq.push_back(Completion {
            wr_id,
            status,
            opcode,
            byte_len,
            imm,
            data,
        });
    }

    /// Queues an ACK/NAK with `syndrome` for `psn`.
    pub(super) fn send_aeth(&mut self, psn: u32, syndrome: u8) {
        self.out.push(OutPacket {
            opcode: opcode::RC_ACKNOWLEDGE,
            psn,
            ack_req: false,
            reth: None,
            aeth: Some(Aeth {
                syndrome,
                msn: self.msn,
            }),
            imm: None,
            payload: Vec::new(),
        });
    }
}

/// The completion opcode of a send work request.
pub(super) fn wc_opcode(wr: &SendWr) -> WcOpcode {
    match wr.op {
        super::SendOp::Send { .. } => WcOpcode::Send,
        super::SendOp::Write { .. } => WcOpcode::RdmaWrite,
        super::SendOp::Read { .. } => WcOpcode::RdmaRead,
    }
}

/// AETH syndromes (IBA 9.7.5.1).
pub(super) mod syndrome {
    /// ACK with "invalid" credit count (credits not used, as rdma_rxe).
    pub const ACK: u8 = 0x1f;
    /// RNR NAK (low 5 bits: the timer code).
    pub const RNR_NAK: u8 = 0x20;
    /// NAK PSN sequence error.
    pub const NAK_PSN_SEQ: u8 = 0x60;
    /// NAK invalid request.
    pub const NAK_INVALID_REQUEST: u8 = 0x61;
    /// NAK remote access error.
    pub const NAK_REMOTE_ACCESS: u8 = 0x62;
}

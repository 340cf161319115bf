//! Reliable Connected (RC) queue pairs of the software port, following Linux `rdma_rxe`
//! (`rxe_req.c` requester, `rxe_resp.c` responder, `rxe_comp.c` completer).
//!
//! - [`core::RcCore`] is the transport, with no I/O and no clock of its own: packets in
//!   ([`RcCore::on_packet`]), work requests in ([`RcCore::post_send`], [`RcCore::post_recv`]),
//!   timers fired by the caller with the time of an injectable [`Clock`]
//!   ([`RcCore::on_timer`]), packets out ([`OutPacket`]) and completions out. Unit tests drive
//!   two of them through a lossy, reordering "wire" without sleeping.
//! - [`qp::RcQp`] puts one on the software port: packets to and from UDP, a timer thread, a
//!   completion queue callers wait on.
//!
//! What it does: the QP state machine RESET → INIT → RTR → RTS ⇄ SQD, any → ERR (flushing
//! every outstanding work request with `WrFlushErr`); SEND (with immediate), RDMA WRITE (with
//! immediate, consuming a receive), RDMA READ (request, responses written into a local
//! region); segmentation at the path MTU (256–4096) into FIRST/MIDDLE/LAST packets; 24-bit
//! PSNs with wrap-around ([`psn`]); a window of packets in flight; ACKs coalesced (one per
//! message, or every [`ACK_EVERY`] packets); NAK on sequence errors (once until the missing
//! packet arrives), go-back-N retransmission on NAK and on timeout with the QP's retry count;
//! RNR NAK when no receive is posted, retried after the advertised RNR timer with the QP's
//! RNR retry count (7 = forever); duplicates re-acknowledged, duplicate READs answered again;
//! error completions (`RetryExcErr`, `RnrRetryExcErr`, `RemAccessErr`, `RemInvReqErr`,
//! `LocLenErr`, `LocProtErr`).
//!
//! The peer is hostile: every remote access goes through [`mr::MrTable::check_remote`]
//! (key, bounds, access flags of the region and of the QP) and is refused with NAK
//! remote-access-error and counted otherwise; packet lengths must match the opcode sequence
//! and the MTU; ACKs for PSNs never sent are ignored and counted.
//!
//! **Atomics are refused**: COMPARE_SWAP and FETCH_ADD are answered with NAK invalid request
//! (the requester completes with `RemInvReqErr`) and counted (`atomics_refused`); the QP
//! reports `max_dest_rd_atomic`-style atomic capability as none. Posting one locally is
//! not possible (there is no work-request type for it).
pub mod core;
pub mod mr;
pub mod psn;
pub mod qp;
mod requester;
mod responder;
#[cfg(test)]
mod tests;

use serde::{Deserialize, Serialize};

pub use self::core::{RcCore, RcCounters, RcStats};
pub use mr::{Access, AccessError, HostBuffer, MemoryRegion, MrTable, RegionMemory, RemoteOp};
pub use qp::RcQp;

/// The responder sends an ACK at least every this many packets of one message.
pub const ACK_EVERY: u32 = 16;

/// A clock in microseconds (monotonic). Tests use a manual one.
pub trait Clock: Send + Sync {
    /// Now, in microseconds from an arbitrary origin.
    fn now_us(&self) -> u64;
}

/// The process's monotonic clock.
#[derive(Debug)]
pub struct MonotonicClock(std::time::Instant);

impl Default for MonotonicClock {
    fn default() -> MonotonicClock {
        MonotonicClock(std::time::Instant::now())
    }
}

impl Clock for MonotonicClock {
    fn now_us(&self) -> u64 {
        self.0.elapsed().as_micros() as u64
    }
}

/// State of a queue pair (IBA 10.3.1; SQE is not modelled: send-queue errors go to ERR).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum QpState {
    /// Just created: neither sends nor receives.
    Reset,
    /// Initialized: receives may be posted; packets are still dropped.
    Init,
    /// Ready to receive: the responder runs.
    Rtr,
    /// Ready to send: both run.
    Rts,
    /// Send queue drained: no new send work request starts; outstanding ones finish.
    Sqd,
    /// Error: everything outstanding completed with `WrFlushErr`, packets dropped.
    Err,
}

/// The connection attributes (what `ibv_modify_qp` sets for RTR and RTS).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RcAttrs {
    /// Path MTU in bytes: 256, 512, 1024, 2048 or 4096.
    pub path_mtu: usize,
    /// The remote QPN.
    pub dest_qpn: u32,
    /// First PSN expected from the peer (its starting PSN).
    pub rq_psn: u32,
    /// Our first PSN.
    pub sq_psn: u32,
    /// Retransmissions on timeout or sequence NAK before `RetryExcErr` (0–7).
    pub retry_count: u8,
    /// Retries after RNR NAKs before `RnrRetryExcErr` (0–6; 7 = forever).
    pub rnr_retry: u8,
    /// The RNR timer code this QP advertises in its RNR NAKs (IBA table 45; 12 = 0.64 ms).
    pub min_rnr_timer: u8,
    /// Local ACK timeout, µs.
    pub timeout_us: u64,
    /// Packets in flight (sent, not acknowledged) before the sender waits.
    pub max_inflight: u32,
}

impl Default for RcAttrs {
    fn default() -> RcAttrs {
        RcAttrs {
            path_mtu: 4096,
            dest_qpn: 0,
            rq_psn: 0,
            sq_psn: 0,
            retry_count: 7,
            rnr_retry: 7,
            min_rnr_timer: 12,
            timeout_us: 67_000, // 4.096 µs × 2^14, rdma_cm's default local ACK timeout
            // 512 KiB at a 4096-byte MTU: twice what 64 packets gave, which left a 64 KiB
            // WRITE stream waiting on ACKs (no thread busy); 256 packets overran loopback
            // socket buffers under load (a lost tail costs a 67 ms timeout).
            max_inflight: 128,
        }
    }
}

/// The IBA path MTU code (1–5) of a size, if valid.
pub fn mtu_code(mtu: usize) -> Option<u8> {
    match mtu {
        256 => Some(1),
        512 => Some(2),
        1024 => Some(3),
        2048 => Some(4),
        4096 => Some(5),
        _ => None,
    }
}

/// The size of an IBA path MTU code.
pub fn mtu_of_code(code: u8) -> Option<usize> {
    match code {
        1..=5 => Some(128 << code),
        _ => None,
    }
}

/// The RNR NAK timer of a code (IBA table 45), µs.
pub fn rnr_timer_us(code: u8) -> u64 {
    const T: [u64; 32] = [
        655_360, 10, 20, 30, 40, 60, 80, 120, 160, 240, 320, 480, 640, 960, 1280, 1920, 2560, 3840,
        5120, 7680, 10_240, 15_360, 20_480, 30_720, 40_960, 61_440, 81_920, 122_880, 163_840,
        245_760, 327_680, 491_520,
    ];
    T[usize::from(code & 31)]
}

/// What a send work request does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SendOp {
    /// SEND (with immediate data).
    Send {
        /// The message.
        data: Vec<u8>,
        /// Immediate data.
        imm: Option<u32>,
    },
    /// RDMA WRITE (with immediate data, which consumes a receive at the peer).
    Write {
        /// The data.
        data: Vec<u8>,
        /// Remote virtual address.
        remote_addr: u64,
        /// Remote key.
        rkey: u32,
        /// Immediate data.
        imm: Option<u32>,
    },
    /// RDMA READ of `len` bytes into the local region `lkey` at `local_addr`.
    Read {
        /// Bytes.
        len: u32,
        /// Remote virtual address.
        remote_addr: u64,
        /// Remote key.
        rkey: u32,
        /// Local region key (needs local write access).
        lkey: u32,
        /// Local virtual address.
        local_addr: u64,
    },
}

/// A send work request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SendWr {
    /// The caller's ID, returned in the completion.
    pub wr_id: u64,
    /// What to do.
    pub op: SendOp,
}

/// Completion status (the `ibv_wc_status` values that occur).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum WcStatus {
    /// Done.
    Success,
    /// A received message did not fit the receive buffer.
    LocLenErr,
    /// A local region check failed (READ into a bad region).
    LocProtErr,
    /// Flushed by the error state.
    WrFlushErr,
    /// The peer said invalid request (NAK).
    RemInvReqErr,
    /// The peer refused a remote access (NAK).
    RemAccessErr,
    /// The peer said remote operational error (NAK).
    RemOpErr,
    /// No ACK after the retry count's retransmissions.
    RetryExcErr,
    /// RNR NAKs beyond the RNR retry count.
    RnrRetryExcErr,
}

/// What a completion is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum WcOpcode {
    /// A SEND we posted.
    Send,
    /// An RDMA WRITE we posted.
    RdmaWrite,
    /// An RDMA READ we posted.
    RdmaRead,
    /// A SEND received.
    Recv,
    /// An RDMA WRITE with immediate received (consumed a receive).
    RecvRdmaWithImm,
}

/// A work completion.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Completion {
    /// The work request's ID.
    pub wr_id: u64,
    /// Status.
    pub status: WcStatus,
    /// What completed.
    pub opcode: WcOpcode,
    /// Bytes transferred.
    pub byte_len: u32,
    /// Immediate data (receives).
    pub imm: Option<u32>,
    /// The received message (SEND receives).
    pub data: Vec<u8>,
}

/// A packet the transport wants sent (the destination QPN and P_Key are the QP's).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutPacket {
    /// Opcode.
    pub opcode: u8,
    /// PSN.
    pub psn: u32,
    /// AckReq bit.
    pub ack_req: bool,
    /// RETH (WRITE FIRST/ONLY, READ request).
    pub reth: Option<rdma_wire::Reth>,
    /// AETH (ACK, READ RESPONSE FIRST/LAST/ONLY).
    pub aeth: Option<rdma_wire::Aeth>,
    /// Immediate data.
    pub imm: Option<u32>,
    /// Payload.
    pub payload: Vec<u8>,
}

/// Why a work request or a state change was refused at once.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RcError {
    /// The QP is not in a state that allows it.
    #[error("QP {qpn:#x} is in state {state:?}")]
    BadState {
        /// The QP.
        qpn: u32,
        /// Its state.
        state: QpState,
    },
    /// An attribute out of range.
    #[error("invalid attribute: {0}")]
    BadAttr(String),
    /// The send or receive queue is full.
    #[error("queue of QP {0:#x} is full")]
    QueueFull(u32),
}

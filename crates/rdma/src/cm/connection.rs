//! One CM connection's state (IBA 12.9 state machine, as Linux's `ib_cm_state`).
use std::time::{Duration, Instant};

use crossbeam_channel::Sender;
use rdma_wire::{Gid, Mad};
use serde::{Deserialize, Serialize};

use crate::RdmaError;

/// Connection states (the subset RC connection setup and teardown go through).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ConnState {
    /// Active: REQ sent, waiting for REP.
    ReqSent,
    /// Active: MRA received for the REQ; waiting longer.
    MraReqRcvd,
    /// Passive: REQ received, the application has not answered.
    ReqRcvd,
    /// Passive: MRA sent because the application is slow.
    MraReqSent,
    /// Passive: REP sent, waiting for RTU.
    RepSent,
    /// Connected.
    Established,
    /// DREQ sent, waiting for DREP.
    DreqSent,
    /// Disconnected; the IDs stay reserved until time-wait ends.
    TimeWait,
}

/// What a connection's owner learns when it is established.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConnInfo {
    /// Our communication ID.
    pub local_comm_id: u32,
    /// The other side's communication ID.
    pub remote_comm_id: u32,
    /// The other side's GID.
    #[serde(with = "crate::addr::gid_serde")]
    pub remote_gid: Gid,
    /// The other side's QPN.
    pub remote_qpn: u32,
    /// The starting PSN we announced (REQ or REP): our RC QP's first expected PSN (Linux's
    /// CM sets the receiver's rq_psn from the starting PSN it announced).
    pub local_psn: u32,
    /// The starting PSN the other side announced: our RC QP's first send PSN.
    pub remote_psn: u32,
    /// The path MTU of the REQ (IBA code: 1 = 256 … 5 = 4096).
    pub path_mtu: u8,
    /// Service ID.
    pub service_id: u64,
    /// Private data of the REQ (passive side) or REP (active side).
    pub private_data: Vec<u8>,
}

pub(crate) type ConnWaiter = Sender<Result<ConnInfo, RdmaError>>;
pub(crate) type DoneWaiter = Sender<Result<(), RdmaError>>;

/// One connection.
#[derive(Debug)]
pub(crate) struct Conn {
    pub local_id: u32,
    pub remote_id: u32,
    pub remote_gid: Gid,
    pub active: bool,
    pub state: ConnState,
    pub service_id: u64,
    pub tid: u64,
    pub local_qpn: u32,
    pub remote_qpn: u32,
    pub local_psn: u32,
    pub remote_psn: u32,
    pub path_mtu: u8,
    pub private_data: Vec<u8>,
    /// The message the timer retransmits (REQ, REP, DREQ) and the one answering duplicates
    /// (MRA, RTU, DREP).
    pub last: Option<Box<Mad>>,
    pub retries_left: u8,
    pub max_retries: u8,
    pub timeout: Duration,
    pub deadline: Option<Instant>,
    pub waiter: Option<ConnWaiter>,
    pub disc_waiter: Option<DoneWaiter>,
}

impl Conn {
    pub fn info(&self) -> ConnInfo {
        ConnInfo {
            local_comm_id: self.local_id,
            remote_comm_id: self.remote_id,
            remote_gid: self.remote_gid,
            remote_qpn: self.remote_qpn,
            local_psn: self.local_psn,
            remote_psn: self.remote_psn,
            path_mtu: self.path_mtu,
            service_id: self.service_id,
            private_data: self.private_data.clone(),
        }
    }

    /// Arms the retry timer for a freshly sent message.
    pub fn arm(&mut self, now: Instant, msg: Box<Mad>) {
        self.last = Some(msg);
        self.retries_left = self.max_retries;
        self.deadline = Some(now + self.timeout);
    }

    /// Tells the blocked `connect()` caller, if any — after `out`'s MADs are sent (so that,
    /// e.g., the RTU leaves before a DREQ the caller may send at once).
    pub fn finish(&mut self, r: Result<ConnInfo, RdmaError>, out: &mut Out) {
        if let Some(w) = self.waiter.take() {
            out.wakes.push(Wake::Conn(w, r));
        }
    }

    /// Tells the blocked `disconnect()` caller, if any, after `out`'s MADs are sent.
    pub fn finish_disconnect(&mut self, out: &mut Out) {
        if let Some(w) = self.disc_waiter.take() {
            out.wakes.push(Wake::Done(w));
        }
    }
}

/// A caller to wake once the MADs are sent.
#[derive(Debug)]
pub(crate) enum Wake {
    Conn(ConnWaiter, Result<ConnInfo, RdmaError>),
    Done(DoneWaiter),
}

/// What an event produced: MADs to send (after the state lock is released), then callers to
/// wake.
#[derive(Debug, Default)]
pub(crate) struct Out {
    pub mads: Vec<(Gid, Box<Mad>)>,
    pub wakes: Vec<Wake>,
}

impl Out {
    pub fn push(&mut self, m: (Gid, Box<Mad>)) {
        self.mads.push(m);
    }

    pub fn one(dgid: Gid, mad: Box<Mad>) -> Out {
        Out {
            mads: vec![(dgid, mad)],
            wakes: Vec::new(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.mads.is_empty() && self.wakes.is_empty()
    }
}

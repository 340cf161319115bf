//! Queue pairs of the software port. QP1 (GSI) is handled by the port itself and handed to a
//! [`super::GsiHandler`]; every other QP implements [`QueuePair`]: [`UdQp`] here, and the RC
//! queue pairs of [`crate::rc`].
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use crossbeam_channel::{Receiver, Sender, TrySendError};
use rdma_wire::{Gid, RocePacket};
use serde::{Deserialize, Serialize};

use crate::addr::GRH_LEN;
use crate::counters::counters;

/// Transport service of a queue pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum QpType {
    /// Unreliable datagram.
    Ud,
    /// Reliable connected.
    Rc,
}

/// What happened to a packet handed to a queue pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RxVerdict {
    /// Placed in the receive queue.
    Accepted,
    /// Q_Key differs from the QP's.
    BadQKey,
    /// The packet's opcode is not one this QP type takes.
    WrongTransport,
    /// The destination GID is not the one the QP is bound to.
    WrongDgid,
    /// The receive queue is full.
    QueueFull,
    /// Taken by an RC queue pair (which counts what it did with it).
    Rc,
    /// The IP source is not the peer the (connected) QP talks to.
    WrongSource,
}

/// A packet arriving at a queue pair, after the port's ICRC and P_Key checks.
#[derive(Debug)]
pub struct RxPacket<'a> {
    /// Source GID.
    pub sgid: Gid,
    /// Destination GID.
    pub dgid: Gid,
    /// The sender's UDP source port.
    pub src_port: u16,
    /// GRH area as a receive buffer would start with.
    pub grh: [u8; GRH_LEN],
    /// The parsed packet.
    pub packet: &'a RocePacket<'a>,
}

/// A queue pair the port can deliver packets to.
pub trait QueuePair: Send + Sync {
    /// Its number.
    fn qpn(&self) -> u32;
    /// Its transport.
    fn qp_type(&self) -> QpType;
    /// Takes one packet (never blocks).
    fn receive(&self, rx: &RxPacket<'_>) -> RxVerdict;
}

/// A datagram received on a UD queue pair (a completion with its buffer).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UdMessage {
    /// Sender's GID.
    pub sgid: Gid,
    /// Destination GID the packet carried.
    pub dgid: Gid,
    /// Sender's QPN (from the DETH).
    pub src_qpn: u32,
    /// GRH area ("GRH present" is always true on RoCE).
    pub grh: [u8; GRH_LEN],
    /// Immediate data, if sent with immediate.
    pub imm: Option<u32>,
    /// The payload.
    pub data: Vec<u8>,
}

counters! {
    /// Per-QP counters.
    UdQpCounters => UdQpStats {
        /// Messages queued for the application.
        rx_messages,
        /// Dropped: Q_Key mismatch.
        rx_bad_qkey,
        /// Dropped: DGID not the QP's GID.
        rx_wrong_dgid,
        /// Dropped: receive queue full.
        rx_queue_full,
        /// Messages sent.
        tx_messages,
    }
}

/// What a [`UdQp`] calls after queueing a message (see [`UdQp::set_notify`]).
type Notify = Arc<dyn Fn() + Send + Sync>;

/// An unreliable-datagram queue pair bound to one GID, with a bounded receive queue.
pub struct UdQp {
    qpn: u32,
    gid: Gid,
    qkey: u32,
    tx: Sender<UdMessage>,
    rx: Receiver<UdMessage>,
    notify: OnceLock<Notify>,
    pub(crate) psn: AtomicU32,
    /// Counters.
    pub counters: UdQpCounters,
}

impl std::fmt::Debug for UdQp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UdQp")
            .field("qpn", &self.qpn)
            .field("gid", &self.gid)
            .field("qkey", &self.qkey)
            .field("notify", &self.notify.get().is_some())
            .field("counters", &self.counters)
            .finish_non_exhaustive()
    }
}

impl UdQp {
    pub(crate) fn new(qpn: u32, gid: Gid, qkey: u32, depth: usize) -> UdQp {
        let (tx, rx) = crossbeam_channel::bounded(depth.max(1));
        UdQp {
            qpn,
            gid: gid.canonical(),
            qkey,
            tx,
            rx,
            notify: OnceLock::new(),
            psn: AtomicU32::new(0),
            counters: UdQpCounters::default(),
        }
    }

    /// Its QPN.
    pub fn qpn_value(&self) -> u32 {
        self.qpn
    }

    /// The GID the QP is bound to.
    pub fn gid(&self) -> Gid {
        self.gid
    }

    /// Its Q_Key.
    pub fn qkey(&self) -> u32 {
        self.qkey
    }

    /// Sets what is called (on the port's receive thread; it must not block) after each
    /// message queued for [`UdQp::try_recv`], so a consumer can sleep until there is one.
    /// Only the first call takes effect.
    pub fn set_notify(&self, f: Arc<dyn Fn() + Send + Sync>) {
        let _ = self.notify.set(f);
    }

    /// The next received message, waiting up to `timeout`.
    pub fn recv_timeout(&self, timeout: Duration) -> Option<UdMessage> {
        self.rx.recv_timeout(timeout).ok()
    }

    /// The next received message, if one is queued.
    pub fn try_recv(&self) -> Option<UdMessage> {
        self.rx.try_recv().ok()
    }

    pub(crate) fn next_psn(&self) -> u32 {
        self.psn.fetch_add(1, Ordering::Relaxed) & rdma_wire::MAX_U24
    }
}

impl QueuePair for UdQp {
    fn qpn(&self) -> u32 {
        self.qpn
    }

    fn qp_type(&self) -> QpType {
        QpType::Ud
    }

    fn receive(&self, rx: &RxPacket<'_>) -> RxVerdict {
        use crate::counters::bump;
        let Some(deth) = rx.packet.deth else {
            return RxVerdict::WrongTransport;
        };
        if rx.dgid.canonical() != self.gid {
            bump(&self.counters.rx_wrong_dgid);
            return RxVerdict::WrongDgid;
        }
        if deth.q_key != self.qkey {
            bump(&self.counters.rx_bad_qkey);
            return RxVerdict::BadQKey;
        }
        let msg = UdMessage {
            sgid: rx.sgid,
            dgid: rx.dgid,
            src_qpn: deth.src_qp,
            grh: rx.grh,
            imm: rx.packet.imm_dt.map(|i| u32::from_be_bytes(i.0)),
            data: rx.packet.payload.to_vec(),
        };
        match self.tx.try_send(msg) {
            Ok(()) => {
                bump(&self.counters.rx_messages);
                if let Some(n) = self.notify.get() {
                    n();
                }
                RxVerdict::Accepted
            }
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                bump(&self.counters.rx_queue_full);
                RxVerdict::QueueFull
            }
        }
    }
}

//! The device model, split by concern: this file holds the object tables and the device's
//! state (plain data, what a migration carries), construction, reset and counters;
//! [`registers`] the BAR1 registers and MSI-X, [`commands`] the command channel (every verb the
//! guest's driver sends), [`datapath`] the send, receive and completion queues, [`rc`] the RC
//! queue pairs and the regions their peers reach. Everything read from the guest is validated
//! against guest RAM and the objects this VM owns; a bad command gets the ABI's error value,
//! a bad work request an error completion, a bad ring index puts that queue pair (or CQ) in
//! the error state. Nothing the guest writes can make the device panic or touch memory outside
//! the VM.

mod commands;
mod datapath;
pub mod rc;
mod registers;
use std::{collections::BTreeMap, sync::Arc};

use pvrdma_abi::{self as abi, cmd_code, errno, qp_attr_mask, qp_state, qp_type, FromBytes};
use rdma_wire::{Gid, MAD_SIZE};
use serde::{Deserialize, Serialize};

use crate::{
    backend::{MadInbox, RdmaBackend, UdQueue, GRH_LEN},
    mem::{check_page, read_obj, walk_pdir, write_obj, GuestMemory},
    VrdmaError,
};

/// Device limits (reported in the capabilities and enforced).
pub mod limits {
    /// Entries of the GID table.
    pub const GID_TBL_LEN: usize = 16;
    /// Protection domains.
    pub const MAX_PD: usize = 64;
    /// Memory regions.
    pub const MAX_MR: usize = 256;
    /// Completion queues.
    pub const MAX_CQ: usize = 64;
    /// Entries of one CQ.
    pub const MAX_CQE: u32 = 4096;
    /// Queue pairs.
    pub const MAX_QP: usize = 64;
    /// Work requests of one queue.
    pub const MAX_QP_WR: u32 = 1024;
    /// Scatter-gather entries of one work request.
    pub const MAX_SGE: u32 = 4;
    /// Pages of one memory region (256 MiB).
    pub const MAX_MR_PAGES: u32 = 65536;
    /// Largest UD payload (one 4096-byte MTU).
    pub const MAX_UD_PAYLOAD: usize = 4096;
    /// Work requests one queue executes per poll (fairness between queues and VMs).
    pub const WR_BUDGET: usize = 64;
    /// Pages of the async event and CQ notification rings.
    pub const MAX_RING_PAGES: u32 = 16;
}
use limits::*;

/// The `rdma_cm` UD Q_Key: UD queue pairs of this device use it (the host port checks Q_Keys
/// when the QP is created, before the guest's INIT transition names one).
pub const UD_QKEY: u32 = 0x0123_4567;

/// A protection domain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pd {
    /// Handle.
    pub handle: u32,
}

/// A memory region.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mr {
    /// Handle (= lkey = rkey).
    pub handle: u32,
    /// Its PD.
    pub pd: u32,
    /// Access flags.
    pub access: u32,
    /// DMA region: addresses are guest-physical, any guest RAM.
    pub dma: bool,
    /// First virtual address (non-DMA).
    pub start: u64,
    /// Length (non-DMA).
    pub length: u64,
    /// Pages backing `[start & !0xfff, …)` (non-DMA).
    pub pages: Vec<u64>,
    /// lkey = rkey: the key of the region in its PD's RC region table.
    #[serde(default)]
    pub key: u32,
}

/// A completion queue.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cq {
    /// Handle.
    pub handle: u32,
    /// Entries (power of two).
    pub cqe: u32,
    /// Pages: ring state, then CQEs.
    pub pages: Vec<u64>,
    /// Set after an invalid index or overflow: nothing more is written.
    pub error: bool,
}

/// A queue pair.
pub struct Qp {
    /// Handle.
    pub handle: u32,
    /// QP number (1 for GSI, the host port's QPN for UD).
    pub qpn: u32,
    /// `qp_type::*`.
    pub qp_type: u8,
    /// `qp_state::*`.
    pub state: u32,
    /// PD.
    pub pd: u32,
    /// Send CQ.
    pub send_cq: u32,
    /// Receive CQ.
    pub recv_cq: u32,
    /// Send queue slots (power of two).
    pub sq_wqes: u32,
    /// Receive queue slots (power of two).
    pub rq_wqes: u32,
    /// SGEs per send WQE.
    pub sq_sge: u32,
    /// SGEs per receive WQE.
    pub rq_sge: u32,
    /// Pages sent with the SQ (after the header page).
    pub send_chunks: u32,
    /// Pages: header (ring indexes), SQ pages, RQ pages.
    pub pages: Vec<u64>,
    /// Signal every send.
    pub sig_all: bool,
    /// Q_Key.
    pub qkey: u32,
    /// The host port's UD queue pair (UD only); dropped when its GID is unbound.
    pub ud: Option<Box<dyn UdQueue>>,
    /// The GID the host queue pair (UD or RC) sends and receives as: the only source a UD
    /// send may name, and the binding whose DESTROY_BIND cuts the queue pair off.
    pub ud_gid: Option<Gid>,
    /// The host port's RC queue pair and what it holds (RC only).
    pub rc: Option<Box<rc::RcQpState>>,
}

impl std::fmt::Debug for Qp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Qp")
            .field("handle", &self.handle)
            .field("qpn", &self.qpn)
            .field("qp_type", &self.qp_type)
            .field("state", &self.state)
            .finish()
    }
}

/// A device ring (async events, CQ notifications) in guest pages.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DevRing {
    /// Pages: ring state, then elements.
    pub pages: Vec<u64>,
    /// Elements.
    pub elems: u32,
    /// Element size.
    pub elem_size: u32,
}

/// A queue pair as plain data.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QpState {
    /// Handle (= QP number).
    pub handle: u32,
    /// `qp_type::*`.
    pub qp_type: u8,
    /// `qp_state::*`.
    pub state: u32,
    /// PD.
    pub pd: u32,
    /// Send CQ.
    pub send_cq: u32,
    /// Receive CQ.
    pub recv_cq: u32,
    /// Send queue slots.
    pub sq_wqes: u32,
    /// Receive queue slots.
    pub rq_wqes: u32,
    /// SGEs per send WQE.
    pub sq_sge: u32,
    /// SGEs per receive WQE.
    pub rq_sge: u32,
    /// Pages sent with the SQ.
    pub send_chunks: u32,
    /// Pages: header, SQ, RQ.
    pub pages: Vec<u64>,
    /// Signal every send.
    pub sig_all: bool,
    /// Q_Key.
    pub qkey: u32,
}

/// The whole device state as plain data: registers, shared-region addresses, GID table and
/// object tables (what a migration would carry; the host's UD queue pairs are re-created by
/// the destination from `qps`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceState {
    /// Device shared region address, once activated.
    pub dsr_gpa: Option<u64>,
    /// Command slot.
    pub cmd_slot: u64,
    /// Response slot.
    pub resp_slot: u64,
    /// Interrupt mask register.
    pub imr: u32,
    /// MAC registers.
    pub mac: [u32; 2],
    /// Async event ring.
    pub async_ring: Option<DevRing>,
    /// GID table (raw GIDs).
    pub gids: Vec<Option<[u8; 16]>>,
    /// Protection domains.
    pub pds: Vec<Pd>,
    /// Memory regions.
    pub mrs: Vec<Mr>,
    /// Completion queues.
    pub cqs: Vec<Cq>,
    /// Queue pairs.
    pub qps: Vec<QpState>,
    /// Next handle to hand out.
    pub next_handle: u32,
}

/// Counters of one device.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceStats {
    /// Commands executed.
    pub commands: u64,
    /// Commands that failed (bad fields, unknown handles, refused, unsupported).
    pub command_errors: u64,
    /// GIDs bound (CREATE_BIND accepted).
    pub binds: u64,
    /// CREATE_BIND refused.
    pub binds_refused: u64,
    /// QP1 MADs sent.
    pub mads_sent: u64,
    /// QP1 sends refused by the multiplexer.
    pub mads_refused: u64,
    /// QP1 MADs delivered into guest receive buffers.
    pub mads_received: u64,
    /// UD messages sent.
    pub ud_sent: u64,
    /// UD messages delivered.
    pub ud_received: u64,
    /// Work requests completed with an error status.
    pub wr_errors: u64,
    /// Queue pairs moved to the error state by an invalid ring index.
    pub qp_ring_errors: u64,
    /// Completions lost to a full or broken CQ.
    pub cq_overflows: u64,
    /// Async events written.
    pub async_events: u64,
    /// UD queue pairs cut off from the host port because their GID was unbound.
    #[serde(default)]
    pub ud_qps_unbound: u64,
    /// The RC path.
    #[serde(default)]
    pub rc: rc::RcStats,
    /// VM exits on Ferry's idle-wait register (send, then wait for a completion).
    #[serde(default)]
    pub idle_waits: u64,
    /// VM exits on Ferry's send-now register.
    #[serde(default)]
    pub send_nows: u64,
}

/// The registers and everything behind them, for one VM.
pub struct Device {
    mem: Arc<dyn GuestMemory>,
    backend: Arc<dyn RdmaBackend>,
    inbox: Arc<MadInbox>,
    dsr_low: u32,
    dsr_high: u32,
    err: u32,
    icr: u32,
    imr: u32,
    mac: [u32; 2],
    dsr_gpa: Option<u64>,
    cmd_slot: u64,
    resp_slot: u64,
    async_ring: Option<DevRing>,
    gids: [Option<Gid>; GID_TBL_LEN],
    pds: BTreeMap<u32, Pd>,
    mrs: BTreeMap<u32, Mr>,
    cqs: BTreeMap<u32, Cq>,
    qps: BTreeMap<u32, Qp>,
    pub(crate) rc: rc::RcTables,
    next_handle: u32,
    stats: DeviceStats,
    msix: Msix,
    /// Completions written so far (what a vCPU in the idle wait watches).
    completions: u64,
}

/// Where the device's MSI-X messages go (the VMM injects them into the VM).
pub trait MsiSink: Send + Sync {
    /// Delivers the message (`address`, `data`).
    fn signal(&self, address: u64, data: u32);
}

/// MSI-X vectors: [`abi::PVRDMA_MAX_INTERRUPTS`] table entries (BAR0 offset 0, 16 bytes
/// each), the pending bits (BAR0 offset [`MSIX_PBA_OFFSET`]), and the capability's enable and
/// function-mask bits (written through PCI configuration space).
#[derive(Default)]
pub struct Msix {
    table: [[u32; 4]; abi::PVRDMA_MAX_INTERRUPTS as usize],
    pending: u32,
    enabled: bool,
    function_mask: bool,
    sink: Option<Arc<dyn MsiSink>>,
    /// CQs armed through the CQ doorbell (one-shot, as on real hardware).
    armed: std::collections::BTreeSet<u32>,
}

/// Offset of the pending-bit array in BAR0.
pub const MSIX_PBA_OFFSET: u64 = 0x800;

fn invalid(field: &'static str, value: u64, why: &'static str) -> VrdmaError {
    VrdmaError::Invalid { field, value, why }
}

fn no(kind: &'static str, handle: u32) -> VrdmaError {
    VrdmaError::NoSuchObject { kind, handle }
}

/// Address of element `slot` of `size` bytes in a ring whose elements start at page
/// `first_page` of `pages` (elements never cross pages: sizes are powers of two ≤ 4096).
fn elem_addr(pages: &[u64], first_page: usize, slot: u32, size: u32) -> Option<u64> {
    let off = slot as u64 * size as u64;
    let page = pages.get(first_page + (off / abi::PVRDMA_PAGE_SIZE) as usize)?;
    Some(page + off % abi::PVRDMA_PAGE_SIZE)
}

impl Device {
    /// A device reading and writing `mem`, reaching the host through `backend`; inbound MADs
    /// arrive in `inbox`.
    pub fn new(
        mem: Arc<dyn GuestMemory>,
        backend: Arc<dyn RdmaBackend>,
        inbox: Arc<MadInbox>,
    ) -> Device {
        Device {
            mem,
            backend,
            inbox,
            dsr_low: 0,
            dsr_high: 0,
            err: 0,
            icr: 0,
            imr: 0,
            mac: [0x0200_0000, 0x0000_0000],
            dsr_gpa: None,
            cmd_slot: 0,
            resp_slot: 0,
            async_ring: None,
            gids: [None; GID_TBL_LEN],
            pds: BTreeMap::new(),
            mrs: BTreeMap::new(),
            cqs: BTreeMap::new(),
            qps: BTreeMap::new(),
            rc: rc::RcTables::default(),
            next_handle: 1,
            stats: DeviceStats::default(),
            msix: Msix::default(),
            completions: 0,
        }
    }

    /// Counts a VM exit on the idle-wait (`send_now` false) or send-now register.
    pub(crate) fn count_exit(&mut self, send_now: bool) {
        if send_now {
            self.stats.send_nows += 1;
        } else {
            self.stats.idle_waits += 1;
        }
    }

    /// Counters.
    pub fn stats(&self) -> DeviceStats {
        DeviceStats {
            rc: self.rc_stats(),
            ..self.stats.clone()
        }
    }

    /// The device state as plain data.
    pub fn state(&self) -> DeviceState {
        DeviceState {
            dsr_gpa: self.dsr_gpa,
            cmd_slot: self.cmd_slot,
            resp_slot: self.resp_slot,
            imr: self.imr,
            mac: self.mac,
            async_ring: self.async_ring.clone(),
            gids: self.gids.iter().map(|g| g.map(|g| g.0)).collect(),
            pds: self.pds.values().cloned().collect(),
            mrs: self.mrs.values().cloned().collect(),
            cqs: self.cqs.values().cloned().collect(),
            qps: self
                .qps
                .values()
                .map(|q| QpState {
                    handle: q.handle,
                    qp_type: q.qp_type,
                    state: q.state,
                    pd: q.pd,
                    send_cq: q.send_cq,
                    recv_cq: q.recv_cq,
                    sq_wqes: q.sq_wqes,
                    rq_wqes: q.rq_wqes,
                    sq_sge: q.sq_sge,
                    rq_sge: q.rq_sge,
                    send_chunks: q.send_chunks,
                    pages: q.pages.clone(),
                    sig_all: q.sig_all,
                    qkey: q.qkey,
                })
                .collect(),
            next_handle: self.next_handle,
        }
    }

    /// Commands executed so far (the device thread treats a new command as activity).
    pub fn command_count(&self) -> u64 {
        self.stats.commands
    }

    /// Completions written since the device was created.
    pub fn completion_count(&self) -> u64 {
        self.completions
    }

    /// Whether a completion queue holds entries the guest has not consumed yet.
    pub fn completions_pending(&self) -> bool {
        self.cqs.values().filter(|c| !c.error).any(|c| {
            let Some(page) = c.pages.first() else {
                return false;
            };
            let hdr = page + abi::RING_STATE_RX_OFFSET;
            match (self.mem.load_u32(hdr), self.mem.load_u32(hdr + 4)) {
                (Ok(prod), Ok(cons)) => prod != cons,
                _ => false,
            }
        })
    }

    /// The GIDs bound now.
    pub fn gids(&self) -> Vec<Gid> {
        self.gids.iter().flatten().copied().collect()
    }

    /// Destroys every object and unbinds every GID (device reset, VM shutdown).
    pub fn reset(&mut self) {
        for gid in self.gids.iter_mut().filter_map(Option::take) {
            if let Err(e) = self.backend.unbind_gid(gid) {
                tracing::warn!(%gid, error = &e as &dyn std::error::Error, "unbinding on reset");
            }
        }
        self.qps.clear();
        self.cqs.clear();
        self.mrs.clear();
        self.rc.clear();
        self.pds.clear();
        self.inbox.clear();
        self.msix.armed.clear();
        self.msix.pending = 0;
        self.icr = 0;
        self.dsr_gpa = None;
        self.async_ring = None;
        self.err = 0;
    }

    // ---- data path ----
}

impl Drop for Device {
    fn drop(&mut self) {
        self.reset();
    }
}

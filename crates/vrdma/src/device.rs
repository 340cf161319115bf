//! The device model: registers, the command channel, object tables, and the data path (send
//! queues, receive queues, completion queues). Everything read from the guest is validated
//! against guest RAM and the objects this VM owns; a bad command gets the ABI's error value,
//! a bad work request an error completion, a bad ring index puts that queue pair (or CQ) in
//! the error state. Nothing the guest writes can make the device panic or touch memory outside
//! the VM.
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
    /// The host port's UD queue pair (UD only).
    pub ud: Option<Box<dyn UdQueue>>,
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
            next_handle: 1,
            stats: DeviceStats::default(),
            msix: Msix::default(),
            completions: 0,
        }
    }

    /// Sends MSI-X messages to `sink`.
    pub fn set_msi_sink(&mut self, sink: Arc<dyn MsiSink>) {
        self.msix.sink = Some(sink);
    }

    /// The MSI-X capability's enable and function-mask bits changed.
    pub fn set_msix_control(&mut self, enabled: bool, function_mask: bool) {
        self.msix.enabled = enabled;
        self.msix.function_mask = function_mask;
        self.deliver_pending();
    }

    /// Reads BAR0 (MSI-X table and pending bits).
    pub fn read_msix(&self, offset: u64) -> u32 {
        if offset >= MSIX_PBA_OFFSET {
            return if offset == MSIX_PBA_OFFSET {
                self.msix.pending
            } else {
                0
            };
        }
        let (i, w) = ((offset / 16) as usize, ((offset % 16) / 4) as usize);
        self.msix.table.get(i).map_or(0, |e| e[w])
    }

    /// Writes BAR0 (the MSI-X table; the pending bits are read-only).
    pub fn write_msix(&mut self, offset: u64, v: u32) {
        let (i, w) = ((offset / 16) as usize, ((offset % 16) / 4) as usize);
        if offset < MSIX_PBA_OFFSET {
            if let Some(e) = self.msix.table.get_mut(i) {
                e[w] = v;
                if w == 3 {
                    self.deliver_pending();
                }
            }
        }
    }

    /// Raises interrupt `vector` (its cause bit goes to `PVRDMA_REG_ICR`): sent now if MSI-X
    /// is enabled and the vector unmasked, else remembered as pending.
    fn raise(&mut self, vector: u32) {
        self.icr |= 1 << vector;
        self.msix.pending |= 1 << vector;
        self.deliver_pending();
    }

    fn deliver_pending(&mut self) {
        if !self.msix.enabled || self.msix.function_mask {
            return;
        }
        let Some(sink) = self.msix.sink.clone() else {
            return;
        };
        for (v, e) in self.msix.table.iter().enumerate() {
            if self.msix.pending & (1 << v) != 0 && e[3] & 1 == 0 {
                self.msix.pending &= !(1 << v);
                sink.signal((e[1] as u64) << 32 | e[0] as u64, e[2]);
            }
        }
    }

    /// A CQ doorbell word the guest wrote: arms the CQ for one completion interrupt.
    pub fn cq_doorbell(&mut self, v: u32) {
        let h = v & abi::PVRDMA_UAR_HANDLE_MASK;
        if v & (abi::PVRDMA_UAR_CQ_ARM | abi::PVRDMA_UAR_CQ_ARM_SOL) != 0
            && self.cqs.contains_key(&h)
        {
            self.msix.armed.insert(h);
        }
    }

    /// Counters.
    pub fn stats(&self) -> DeviceStats {
        self.stats.clone()
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

    /// Reads a register.
    pub fn read_reg(&self, offset: u64) -> u32 {
        match offset {
            abi::PVRDMA_REG_VERSION => abi::PVRDMA_VERSION,
            abi::PVRDMA_REG_DSRLOW => self.dsr_low,
            abi::PVRDMA_REG_DSRHIGH => self.dsr_high,
            abi::PVRDMA_REG_ERR => self.err,
            abi::PVRDMA_REG_ICR => self.icr,
            abi::PVRDMA_REG_IMR => self.imr,
            abi::PVRDMA_REG_MACL => self.mac[0],
            abi::PVRDMA_REG_MACH => self.mac[1],
            _ => 0,
        }
    }

    /// Writes a register.
    pub fn write_reg(&mut self, offset: u64, v: u32) {
        match offset {
            abi::PVRDMA_REG_DSRLOW => self.dsr_low = v,
            abi::PVRDMA_REG_DSRHIGH => self.dsr_high = v,
            abi::PVRDMA_REG_CTL => {
                let r = match v {
                    abi::PVRDMA_DEVICE_CTL_ACTIVATE => self.activate(),
                    abi::PVRDMA_DEVICE_CTL_UNQUIESCE => Ok(()),
                    abi::PVRDMA_DEVICE_CTL_RESET => {
                        self.reset();
                        Ok(())
                    }
                    other => Err(invalid("device control", other as u64, "unknown code")),
                };
                self.err = match r {
                    Ok(()) => 0,
                    Err(e) => {
                        tracing::debug!(error = &e as &dyn std::error::Error, "pvrdma control {v}");
                        e.errno() as u32
                    }
                };
            }
            abi::PVRDMA_REG_REQUEST => self.request(),
            abi::PVRDMA_REG_IMR => self.imr = v,
            // Write 1 to clear a cause bit.
            abi::PVRDMA_REG_ICR => self.icr &= !v,
            abi::PVRDMA_REG_MACL => self.mac[0] = v,
            abi::PVRDMA_REG_MACH => self.mac[1] = v & 0xffff,
            _ => {}
        }
    }

    fn caps() -> abi::DeviceCaps {
        abi::DeviceCaps {
            fw_ver: 1,
            node_guid: 0x0200_00ff_fe00_0000u64.to_be(),
            sys_image_guid: 0x0200_00ff_fe00_0000u64.to_be(),
            max_mr_size: (MAX_MR_PAGES as u64) * abi::PVRDMA_PAGE_SIZE,
            page_size_cap: abi::PVRDMA_PAGE_SIZE,
            vendor_id: abi::PCI_VENDOR_ID_VMWARE as u32,
            vendor_part_id: abi::PCI_DEVICE_ID_VMWARE_PVRDMA as u32,
            hw_ver: 1,
            max_qp: MAX_QP as u32,
            max_qp_wr: MAX_QP_WR,
            max_sge: MAX_SGE,
            max_cq: MAX_CQ as u32,
            max_cqe: MAX_CQE,
            max_mr: MAX_MR as u32,
            max_pd: MAX_PD as u32,
            max_ah: 1024,
            max_uar: 1,
            gid_tbl_len: GID_TBL_LEN as u32,
            max_pkeys: 1,
            phys_port_cnt: 1,
            mode: abi::PVRDMA_DEVICE_MODE_ROCE,
            gid_types: abi::PVRDMA_GID_TYPE_FLAG_ROCE_V2,
            ..Default::default()
        }
    }

    fn activate(&mut self) -> Result<(), VrdmaError> {
        let gpa = (self.dsr_high as u64) << 32 | self.dsr_low as u64;
        check_page(&*self.mem, gpa)?;
        let mut dsr: abi::DeviceSharedRegion = read_obj(&*self.mem, gpa)?;
        let cmd = check_page(&*self.mem, dsr.cmd_slot_dma)?;
        let resp = check_page(&*self.mem, dsr.resp_slot_dma)?;
        // The async ring is optional for Ferry's polled guest; if given it must be valid.
        let async_ring = if dsr.async_ring_pages.num_pages != 0 {
            let pages = walk_pdir(
                &*self.mem,
                dsr.async_ring_pages.pdir_dma,
                dsr.async_ring_pages.num_pages,
                MAX_RING_PAGES,
            )?;
            if pages.len() < 2 {
                return Err(invalid(
                    "async ring pages",
                    1,
                    "need a header page and a data page",
                ));
            }
            // Linux sizes the ring as all data pages' worth of elements; the index arithmetic
            // needs a power of two, so the device uses the largest one that fits.
            let fit = ((pages.len() as u64 - 1) * abi::PVRDMA_PAGE_SIZE / 8) as u32;
            Some(DevRing {
                pages,
                elems: 1 << (31 - fit.leading_zeros()),
                elem_size: 8,
            })
        } else {
            None
        };
        dsr.caps = Self::caps();
        write_obj(&*self.mem, gpa, &dsr)?;
        self.dsr_gpa = Some(gpa);
        self.cmd_slot = cmd;
        self.resp_slot = resp;
        self.async_ring = async_ring;
        tracing::info!(dsr = format_args!("{gpa:#x}"), "pvrdma device activated");
        Ok(())
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
        self.pds.clear();
        self.inbox.clear();
        self.msix.armed.clear();
        self.msix.pending = 0;
        self.icr = 0;
        self.dsr_gpa = None;
        self.async_ring = None;
        self.err = 0;
    }

    fn alloc_handle(&mut self) -> u32 {
        loop {
            let h = self.next_handle & abi::PVRDMA_UAR_HANDLE_MASK;
            self.next_handle = self.next_handle.wrapping_add(1);
            if h != 0
                && !self.pds.contains_key(&h)
                && !self.mrs.contains_key(&h)
                && !self.cqs.contains_key(&h)
                && !self.qps.contains_key(&h)
            {
                return h;
            }
        }
    }

    /// Executes the command in the command slot and writes the response.
    fn request(&mut self) {
        if self.dsr_gpa.is_none() {
            self.err = errno::EINVAL as u32;
            self.stats.command_errors += 1;
            return;
        }
        let mut slot = [0u8; 256];
        if let Err(e) = self.mem.read(self.cmd_slot, &mut slot) {
            tracing::debug!(
                error = &e as &dyn std::error::Error,
                "reading the command slot"
            );
            self.err = e.errno() as u32;
            self.stats.command_errors += 1;
            return;
        }
        let hdr = abi::CmdHdr::read_from_prefix(&slot)
            .map(|(h, _)| h)
            .unwrap_or_default();
        self.stats.commands += 1;
        let mut resp = [0u8; 256];
        let result = self.execute(&hdr, &slot, &mut resp);
        let (err, len) = match result {
            Ok(len) => (0u8, len),
            Err(e) => {
                tracing::debug!(
                    cmd = hdr.cmd,
                    error = &e as &dyn std::error::Error,
                    "pvrdma command failed"
                );
                self.stats.command_errors += 1;
                (e.errno(), core::mem::size_of::<abi::RespHdr>())
            }
        };
        let rh = abi::RespHdr {
            response: hdr.response,
            ack: abi::resp_code::for_cmd(hdr.cmd.min(cmd_code::MAX)),
            err,
            reserved: [0; 3],
        };
        resp[..16].copy_from_slice(pvrdma_abi::IntoBytes::as_bytes(&rh));
        if let Err(e) = self.mem.write(self.resp_slot, &resp[..len.max(16)]) {
            tracing::debug!(
                error = &e as &dyn std::error::Error,
                "writing the response slot"
            );
        }
        self.err = err as u32;
        self.raise(0);
    }

    fn execute(
        &mut self,
        hdr: &abi::CmdHdr,
        slot: &[u8; 256],
        resp: &mut [u8; 256],
    ) -> Result<usize, VrdmaError> {
        fn cmd<T: FromBytes + pvrdma_abi::KnownLayout + pvrdma_abi::Immutable>(slot: &[u8]) -> T {
            T::read_from_prefix(slot)
                .map(|(v, _)| v)
                .unwrap_or_else(|_| T::new_zeroed())
        }
        fn put<T: pvrdma_abi::IntoBytes + pvrdma_abi::Immutable>(
            resp: &mut [u8; 256],
            v: &T,
        ) -> usize {
            let b = v.as_bytes();
            resp[..b.len()].copy_from_slice(b);
            b.len()
        }
        match hdr.cmd {
            cmd_code::QUERY_PORT => {
                let c: abi::CmdQueryPort = cmd(slot);
                if c.port_num != 1 {
                    return Err(invalid(
                        "port_num",
                        c.port_num as u64,
                        "the device has port 1",
                    ));
                }
                let r = abi::RespQueryPort {
                    hdr: Default::default(),
                    attrs: abi::PortAttr {
                        state: abi::port_state::ACTIVE,
                        max_mtu: abi::mtu::MTU_4096,
                        active_mtu: abi::mtu::MTU_4096,
                        gid_tbl_len: GID_TBL_LEN as u32,
                        port_cap_flags: abi::PVRDMA_PORT_CM_SUP | abi::PVRDMA_PORT_IP_BASED_GIDS,
                        max_msg_sz: MAX_UD_PAYLOAD as u32,
                        pkey_tbl_len: 1,
                        active_width: 1,
                        active_speed: 1,
                        phys_state: 5,
                        ..Default::default()
                    },
                };
                Ok(put(resp, &r))
            }
            cmd_code::QUERY_PKEY => {
                let c: abi::CmdQueryPkey = cmd(slot);
                if c.port_num != 1 || c.index != 0 {
                    return Err(invalid(
                        "pkey index",
                        c.index as u64,
                        "one P_Key at index 0",
                    ));
                }
                Ok(put(
                    resp,
                    &abi::RespQueryPkey {
                        pkey: 0xffff,
                        ..Default::default()
                    },
                ))
            }
            cmd_code::CREATE_PD => {
                if self.pds.len() >= MAX_PD {
                    return Err(VrdmaError::TableFull {
                        kind: "PD",
                        max: MAX_PD,
                    });
                }
                let h = self.alloc_handle();
                self.pds.insert(h, Pd { handle: h });
                Ok(put(
                    resp,
                    &abi::RespCreatePd {
                        pd_handle: h,
                        ..Default::default()
                    },
                ))
            }
            cmd_code::DESTROY_PD => {
                let c: abi::CmdDestroyPd = cmd(slot);
                if !self.pds.contains_key(&c.pd_handle) {
                    return Err(no("PD", c.pd_handle));
                }
                let used = self.mrs.values().any(|m| m.pd == c.pd_handle)
                    || self.qps.values().any(|q| q.pd == c.pd_handle);
                if used {
                    return Err(VrdmaError::Busy {
                        kind: "PD",
                        handle: c.pd_handle,
                    });
                }
                self.pds.remove(&c.pd_handle);
                Ok(16)
            }
            cmd_code::CREATE_MR => {
                let c: abi::CmdCreateMr = cmd(slot);
                let h = self.create_mr(&c)?;
                Ok(put(
                    resp,
                    &abi::RespCreateMr {
                        mr_handle: h,
                        lkey: h,
                        rkey: h,
                        ..Default::default()
                    },
                ))
            }
            cmd_code::DESTROY_MR => {
                let c: abi::CmdDestroyMr = cmd(slot);
                self.mrs.remove(&c.mr_handle).ok_or(no("MR", c.mr_handle))?;
                Ok(16)
            }
            cmd_code::CREATE_CQ => {
                let c: abi::CmdCreateCq = cmd(slot);
                let (h, n) = self.create_cq(&c)?;
                Ok(put(
                    resp,
                    &abi::RespCreateCq {
                        cq_handle: h,
                        cqe: n,
                        ..Default::default()
                    },
                ))
            }
            cmd_code::DESTROY_CQ => {
                let c: abi::CmdDestroyCq = cmd(slot);
                if !self.cqs.contains_key(&c.cq_handle) {
                    return Err(no("CQ", c.cq_handle));
                }
                if self
                    .qps
                    .values()
                    .any(|q| q.send_cq == c.cq_handle || q.recv_cq == c.cq_handle)
                {
                    return Err(VrdmaError::Busy {
                        kind: "CQ",
                        handle: c.cq_handle,
                    });
                }
                self.cqs.remove(&c.cq_handle);
                Ok(16)
            }
            cmd_code::CREATE_QP => {
                let c: abi::CmdCreateQp = cmd(slot);
                let r = self.create_qp(&c)?;
                Ok(put(resp, &r))
            }
            cmd_code::MODIFY_QP => {
                let c: abi::CmdModifyQp = cmd(slot);
                self.modify_qp(&c)?;
                Ok(16)
            }
            cmd_code::QUERY_QP => {
                let c: abi::CmdQueryQp = cmd(slot);
                let q = self.qps.get(&c.qp_handle).ok_or(no("QP", c.qp_handle))?;
                let r = abi::RespQueryQp {
                    hdr: Default::default(),
                    attrs: abi::QpAttr {
                        qp_state: q.state,
                        cur_qp_state: q.state,
                        path_mtu: abi::mtu::MTU_4096,
                        qkey: q.qkey,
                        port_num: 1,
                        cap: abi::QpCap {
                            max_send_wr: q.sq_wqes,
                            max_recv_wr: q.rq_wqes,
                            max_send_sge: q.sq_sge,
                            max_recv_sge: q.rq_sge,
                            ..Default::default()
                        },
                        ..Default::default()
                    },
                };
                Ok(put(resp, &r))
            }
            cmd_code::DESTROY_QP => {
                let c: abi::CmdDestroyQp = cmd(slot);
                self.qps.remove(&c.qp_handle).ok_or(no("QP", c.qp_handle))?;
                Ok(put(resp, &abi::RespDestroyQp::default()))
            }
            cmd_code::CREATE_BIND => {
                let c: abi::CmdCreateBind = cmd(slot);
                self.create_bind(&c)?;
                Ok(16)
            }
            cmd_code::DESTROY_BIND => {
                let c: abi::CmdDestroyBind = cmd(slot);
                let i = c.index as usize;
                let gid = self.gids.get(i).copied().flatten().ok_or(invalid(
                    "GID index",
                    c.index as u64,
                    "no GID bound there",
                ))?;
                if gid.canonical() != Gid(c.dest_gid).canonical() {
                    return Err(invalid("GID index", c.index as u64, "holds another GID"));
                }
                self.backend.unbind_gid(gid)?;
                self.gids[i] = None;
                Ok(16)
            }
            other => Err(VrdmaError::Unsupported(other)),
        }
    }

    fn create_mr(&mut self, c: &abi::CmdCreateMr) -> Result<u32, VrdmaError> {
        if !self.pds.contains_key(&c.pd_handle) {
            return Err(no("PD", c.pd_handle));
        }
        if self.mrs.len() >= MAX_MR {
            return Err(VrdmaError::TableFull {
                kind: "MR",
                max: MAX_MR,
            });
        }
        let dma = c.flags & abi::PVRDMA_MR_FLAG_DMA != 0;
        if c.flags & !abi::PVRDMA_MR_FLAG_DMA != 0 {
            return Err(invalid(
                "MR flags",
                c.flags as u64,
                "only DMA and plain regions",
            ));
        }
        let mut mr = Mr {
            handle: 0,
            pd: c.pd_handle,
            access: c.access_flags,
            dma,
            start: c.start,
            length: c.length,
            pages: Vec::new(),
        };
        if !dma {
            let end = c
                .start
                .checked_add(c.length)
                .filter(|_| c.length > 0)
                .ok_or(invalid("MR length", c.length, "empty or wraps"))?;
            let first = c.start / abi::PVRDMA_PAGE_SIZE;
            let last = (end - 1) / abi::PVRDMA_PAGE_SIZE;
            let need = last - first + 1;
            if need != c.nchunks as u64 {
                return Err(invalid(
                    "MR nchunks",
                    c.nchunks as u64,
                    "does not cover start..start+length",
                ));
            }
            mr.pages = walk_pdir(&*self.mem, c.pdir_dma, c.nchunks, MAX_MR_PAGES)?;
        }
        let h = self.alloc_handle();
        mr.handle = h;
        self.mrs.insert(h, mr);
        Ok(h)
    }

    fn create_cq(&mut self, c: &abi::CmdCreateCq) -> Result<(u32, u32), VrdmaError> {
        if self.cqs.len() >= MAX_CQ {
            return Err(VrdmaError::TableFull {
                kind: "CQ",
                max: MAX_CQ,
            });
        }
        if c.cqe == 0 || c.cqe > MAX_CQE || !c.cqe.is_power_of_two() {
            return Err(invalid(
                "cqe",
                c.cqe as u64,
                "must be a power of two up to 4096",
            ));
        }
        let need = 1 + (c.cqe as u64 * 64).div_ceil(abi::PVRDMA_PAGE_SIZE);
        if (c.nchunks as u64) < need {
            return Err(invalid(
                "CQ nchunks",
                c.nchunks as u64,
                "too few pages for the entries",
            ));
        }
        let pages = walk_pdir(&*self.mem, c.pdir_dma, c.nchunks, need as u32)?;
        let h = self.alloc_handle();
        self.cqs.insert(
            h,
            Cq {
                handle: h,
                cqe: c.cqe,
                pages,
                error: false,
            },
        );
        Ok((h, c.cqe))
    }

    fn create_qp(&mut self, c: &abi::CmdCreateQp) -> Result<abi::RespCreateQp, VrdmaError> {
        if self.qps.len() >= MAX_QP {
            return Err(VrdmaError::TableFull {
                kind: "QP",
                max: MAX_QP,
            });
        }
        if !self.pds.contains_key(&c.pd_handle) {
            return Err(no("PD", c.pd_handle));
        }
        for h in [c.send_cq_handle, c.recv_cq_handle] {
            if !self.cqs.contains_key(&h) {
                return Err(no("CQ", h));
            }
        }
        if c.is_srq != 0 {
            return Err(invalid(
                "is_srq",
                c.is_srq as u64,
                "shared receive queues are not supported",
            ));
        }
        let pow2 = |field, v: u32, max| {
            if v == 0 || v > max || !v.is_power_of_two() {
                Err(invalid(
                    field,
                    v as u64,
                    "must be a power of two within the device limit",
                ))
            } else {
                Ok(v)
            }
        };
        let sq_wqes = pow2("max_send_wr", c.max_send_wr, MAX_QP_WR)?;
        let rq_wqes = pow2("max_recv_wr", c.max_recv_wr, MAX_QP_WR)?;
        for (f, v) in [
            ("max_send_sge", c.max_send_sge),
            ("max_recv_sge", c.max_recv_sge),
        ] {
            if v == 0 || v > MAX_SGE {
                return Err(invalid(f, v as u64, "1 to 4 SGEs"));
            }
        }
        let sq_bytes = sq_wqes as u64 * abi::sq_wqe_size(c.max_send_sge) as u64;
        let rq_bytes = rq_wqes as u64 * abi::rq_wqe_size(c.max_recv_sge) as u64;
        let sq_pages = sq_bytes.div_ceil(abi::PVRDMA_PAGE_SIZE);
        let rq_pages = rq_bytes.div_ceil(abi::PVRDMA_PAGE_SIZE);
        if (c.send_chunks as u64) < sq_pages
            || (c.total_chunks as u64) < 1 + c.send_chunks as u64 + rq_pages
        {
            return Err(invalid(
                "QP chunks",
                c.total_chunks as u64,
                "too few pages for the queues",
            ));
        }
        let max_pages = (1 + sq_pages + rq_pages) as u32 + c.send_chunks as u32;
        let pages = walk_pdir(&*self.mem, c.pdir_dma, c.total_chunks as u32, max_pages)?;
        let (qpn, ud) = match c.qp_type {
            qp_type::GSI => {
                if self.qps.values().any(|q| q.qp_type == qp_type::GSI) {
                    return Err(VrdmaError::Invalid {
                        field: "qp_type",
                        value: c.qp_type as u64,
                        why: "the port already has its GSI QP",
                    });
                }
                (1, None)
            }
            qp_type::UD => {
                let gid = self.gids[0].ok_or(invalid(
                    "GID index",
                    0,
                    "bind a GID (CREATE_BIND index 0) before creating UD QPs",
                ))?;
                let q = self.backend.create_ud_qp(gid, UD_QKEY)?;
                // A datagram arriving wakes the device thread (the same one MADs wake).
                let inbox = self.inbox.clone();
                q.set_waker(Arc::new(move || inbox.wake()));
                (q.qpn(), Some(q))
            }
            other => {
                return Err(invalid(
                    "qp_type",
                    other as u64,
                    "only GSI and UD QPs are supported",
                ))
            }
        };
        // The QP's handle is its number (as on VMware's device, where Linux uses the create
        // response's `qpn` both as the handle and as `qp_num`): 1 for GSI, the host port's QPN
        // for UD, which is unique on the port.
        let h = qpn;
        if self.qps.contains_key(&h) {
            return Err(invalid("QP number", h as u64, "already in use"));
        }
        self.qps.insert(
            h,
            Qp {
                handle: h,
                qpn,
                qp_type: c.qp_type,
                state: qp_state::RESET,
                pd: c.pd_handle,
                send_cq: c.send_cq_handle,
                recv_cq: c.recv_cq_handle,
                sq_wqes,
                rq_wqes,
                sq_sge: c.max_send_sge,
                rq_sge: c.max_recv_sge,
                send_chunks: c.send_chunks as u32,
                pages,
                sig_all: c.sq_sig_all != 0,
                qkey: if c.qp_type == qp_type::GSI {
                    rdma_wire::GSI_QKEY
                } else {
                    UD_QKEY
                },
                ud,
            },
        );
        Ok(abi::RespCreateQp {
            hdr: Default::default(),
            qpn,
            max_send_wr: sq_wqes,
            max_recv_wr: rq_wqes,
            max_send_sge: c.max_send_sge,
            max_recv_sge: c.max_recv_sge,
            max_inline_data: 0,
        })
    }

    fn modify_qp(&mut self, c: &abi::CmdModifyQp) -> Result<(), VrdmaError> {
        let q = self
            .qps
            .get_mut(&c.qp_handle)
            .ok_or(no("QP", c.qp_handle))?;
        if c.attr_mask & !qp_attr_mask::ALL != 0 {
            return Err(invalid("attr_mask", c.attr_mask as u64, "unknown bits"));
        }
        if c.attr_mask & qp_attr_mask::QKEY != 0 {
            let want = if q.qp_type == qp_type::GSI {
                rdma_wire::GSI_QKEY
            } else {
                UD_QKEY
            };
            if c.attrs.qkey != want {
                return Err(invalid(
                    "qkey",
                    c.attrs.qkey as u64,
                    "UD QPs use the rdma_cm Q_Key 0x01234567",
                ));
            }
        }
        if c.attr_mask & qp_attr_mask::STATE != 0 {
            let to = c.attrs.qp_state;
            let ok = matches!(
                (q.state, to),
                (_, qp_state::RESET)
                    | (_, qp_state::ERR)
                    | (qp_state::RESET, qp_state::INIT)
                    | (qp_state::INIT, qp_state::INIT)
                    | (qp_state::INIT, qp_state::RTR)
                    | (qp_state::RTR, qp_state::RTS)
                    | (qp_state::RTS, qp_state::RTS)
            );
            if !ok {
                return Err(invalid("qp_state", to as u64, "not a valid transition"));
            }
            if to == qp_state::RESET {
                // Reset empties both queues: indexes back to zero.
                let hdr = q.pages[0];
                for off in [0u64, 4, 8, 12] {
                    self.mem.store_u32(hdr + off, 0)?;
                }
            }
            q.state = to;
        }
        Ok(())
    }

    fn create_bind(&mut self, c: &abi::CmdCreateBind) -> Result<(), VrdmaError> {
        let i = c.index as usize;
        if i >= GID_TBL_LEN {
            return Err(invalid("GID index", c.index as u64, "beyond the GID table"));
        }
        let gid = Gid(c.new_gid);
        if gid.is_zero() {
            return Err(invalid("GID", 0, "the zero GID cannot be bound"));
        }
        if self.gids[i].is_some() {
            return Err(VrdmaError::Invalid {
                field: "GID index",
                value: c.index as u64,
                why: "already holds a GID",
            });
        }
        if let Err(e) = self.backend.bind_gid(gid) {
            self.stats.binds_refused += 1;
            tracing::info!(%gid, error = &e as &dyn std::error::Error, "GID registration refused");
            return Err(e.into());
        }
        self.stats.binds += 1;
        self.gids[i] = Some(gid.canonical());
        Ok(())
    }

    // ---- data path ----

    /// Runs the queues once: sends, UD receives, QP1 receives. Returns the work done.
    pub fn poll(&mut self) -> usize {
        if self.dsr_gpa.is_none() {
            return 0;
        }
        let handles: Vec<u32> = self.qps.keys().copied().collect();
        let mut work = 0;
        for h in handles {
            work += self.process_sq(h);
            work += self.process_rq(h);
        }
        work
    }

    fn ring_error(&mut self, qp: u32, why: &str) {
        if let Some(q) = self.qps.get_mut(&qp) {
            if q.state != qp_state::ERR {
                tracing::info!(qp, "queue pair to the error state: {why}");
                q.state = qp_state::ERR;
                self.stats.qp_ring_errors += 1;
                self.async_event(abi::event::QP_FATAL, qp);
            }
        }
    }

    fn async_event(&mut self, kind: u32, info: u32) {
        let Some(ring) = &self.async_ring else { return };
        let hdr = ring.pages[0];
        let ok = (|| -> Result<bool, VrdmaError> {
            let r = abi::Ring {
                prod_tail: self.mem.load_u32(hdr + abi::RING_STATE_RX_OFFSET)?,
                cons_head: self.mem.load_u32(hdr + abi::RING_STATE_RX_OFFSET + 4)?,
            };
            let Ok(Some(slot)) = abi::has_space(r, ring.elems) else {
                return Ok(false);
            };
            let at =
                elem_addr(&ring.pages, 1, slot, ring.elem_size).ok_or(VrdmaError::Invalid {
                    field: "async ring slot",
                    value: slot as u64,
                    why: "outside the ring",
                })?;
            write_obj(&*self.mem, at, &abi::Eqe { kind, info })?;
            self.mem.store_u32(
                hdr + abi::RING_STATE_RX_OFFSET,
                abi::idx_inc(r.prod_tail, ring.elems),
            )?;
            Ok(true)
        })();
        if matches!(ok, Ok(true)) {
            self.stats.async_events += 1;
            self.raise(1);
        }
    }

    /// Writes a completion into CQ `cq`; false if it could not (full or broken CQ).
    fn complete(&mut self, cq: u32, cqe: &abi::Cqe) -> bool {
        let Some(c) = self.cqs.get(&cq) else {
            return false;
        };
        if c.error {
            self.stats.cq_overflows += 1;
            return false;
        }
        let hdr = c.pages[0] + abi::RING_STATE_RX_OFFSET;
        let res = (|| -> Result<Option<()>, VrdmaError> {
            let r = abi::Ring {
                prod_tail: self.mem.load_u32(hdr)?,
                cons_head: self.mem.load_u32(hdr + 4)?,
            };
            let slot = match abi::has_space(r, c.cqe) {
                Ok(Some(s)) => s,
                Ok(None) => return Ok(None),
                Err(()) => {
                    return Err(invalid(
                        "CQ ring index",
                        r.prod_tail as u64,
                        "beyond 2 x entries",
                    ))
                }
            };
            let at = elem_addr(&c.pages, 1, slot, 64).ok_or(invalid(
                "CQ slot",
                slot as u64,
                "outside the CQ pages",
            ))?;
            write_obj(&*self.mem, at, cqe)?;
            self.mem.store_u32(hdr, abi::idx_inc(r.prod_tail, c.cqe))?;
            Ok(Some(()))
        })();
        match res {
            Ok(Some(())) => {
                self.completions += 1;
                if self.msix.armed.remove(&cq) {
                    self.raise(2);
                }
                true
            }
            Ok(None) => {
                self.stats.cq_overflows += 1;
                if let Some(c) = self.cqs.get_mut(&cq) {
                    c.error = true;
                }
                self.async_event(abi::event::CQ_ERR, cq);
                false
            }
            Err(e) => {
                tracing::info!(
                    cq,
                    error = &e as &dyn std::error::Error,
                    "completion queue broken"
                );
                self.stats.cq_overflows += 1;
                if let Some(c) = self.cqs.get_mut(&cq) {
                    c.error = true;
                }
                self.async_event(abi::event::CQ_ERR, cq);
                false
            }
        }
    }

    /// Copies the bytes the SGEs describe (send), checking lkeys, PDs and bounds.
    fn gather(&self, pd: u32, sges: &[abi::Sge], max: usize) -> Result<Vec<u8>, u32> {
        let total: u64 = sges.iter().map(|s| s.length as u64).sum();
        if total > max as u64 {
            return Err(abi::wc_status::LOC_LEN_ERR);
        }
        let mut out = Vec::with_capacity(total as usize);
        for s in sges {
            let mut buf = vec![0u8; s.length as usize];
            self.sge_io(
                pd,
                s,
                |mem, gpa, range| mem.read(gpa, &mut buf[range]).is_ok(),
                false,
            )?;
            out.extend_from_slice(&buf);
        }
        Ok(out)
    }

    /// Copies `data` into the buffers the SGEs describe (receive).
    fn scatter(&self, pd: u32, sges: &[abi::Sge], data: &[u8]) -> Result<(), u32> {
        let room: u64 = sges.iter().map(|s| s.length as u64).sum();
        if room < data.len() as u64 {
            return Err(abi::wc_status::LOC_LEN_ERR);
        }
        let mut done = 0usize;
        for s in sges {
            if done == data.len() {
                break;
            }
            let n = (s.length as usize).min(data.len() - done);
            let part = abi::Sge {
                length: n as u32,
                ..*s
            };
            let chunk = &data[done..done + n];
            self.sge_io(
                pd,
                &part,
                |mem, gpa, range| mem.write(gpa, &chunk[range]).is_ok(),
                true,
            )?;
            done += n;
        }
        Ok(())
    }

    /// Resolves an SGE to guest-physical pieces and runs `io` on each (`range` indexes the
    /// SGE's bytes).
    fn sge_io(
        &self,
        pd: u32,
        s: &abi::Sge,
        mut io: impl FnMut(&dyn GuestMemory, u64, std::ops::Range<usize>) -> bool,
        write: bool,
    ) -> Result<(), u32> {
        use abi::wc_status::LOC_PROT_ERR;
        let mr = self.mrs.get(&s.lkey).ok_or(LOC_PROT_ERR)?;
        if mr.pd != pd {
            return Err(LOC_PROT_ERR);
        }
        if write && mr.access & 1 == 0 {
            // PVRDMA_ACCESS_LOCAL_WRITE is required for receive buffers.
            return Err(LOC_PROT_ERR);
        }
        let len = s.length as u64;
        if len == 0 {
            return Ok(());
        }
        let end = s.addr.checked_add(len).ok_or(LOC_PROT_ERR)?;
        if mr.dma {
            if !self.mem.contains(s.addr, len) {
                return Err(LOC_PROT_ERR);
            }
            return if io(&*self.mem, s.addr, 0..len as usize) {
                Ok(())
            } else {
                Err(LOC_PROT_ERR)
            };
        }
        if s.addr < mr.start || end > mr.start + mr.length {
            return Err(LOC_PROT_ERR);
        }
        let base = mr.start & !(abi::PVRDMA_PAGE_SIZE - 1);
        let mut va = s.addr;
        while va < end {
            let page = ((va - base) / abi::PVRDMA_PAGE_SIZE) as usize;
            let off = (va - base) % abi::PVRDMA_PAGE_SIZE;
            let n = (abi::PVRDMA_PAGE_SIZE - off).min(end - va);
            let gpa = mr.pages.get(page).ok_or(LOC_PROT_ERR)? + off;
            let r = (va - s.addr) as usize..(va - s.addr + n) as usize;
            if !io(&*self.mem, gpa, r) {
                return Err(LOC_PROT_ERR);
            }
            va += n;
        }
        Ok(())
    }

    fn read_sges(&self, at: u64, n: u32) -> Option<Vec<abi::Sge>> {
        (0..n as u64)
            .map(|i| read_obj::<abi::Sge>(&*self.mem, at + 16 * i).ok())
            .collect()
    }

    fn process_sq(&mut self, h: u32) -> usize {
        let Some(q) = self.qps.get(&h) else { return 0 };
        if q.state != qp_state::RTS {
            return 0;
        }
        let hdr = q.pages[0];
        let mut done = 0;
        while done < WR_BUDGET {
            let Some(q) = self.qps.get(&h) else { break };
            let ring = match (self.mem.load_u32(hdr), self.mem.load_u32(hdr + 4)) {
                (Ok(t), Ok(hd)) => abi::Ring {
                    prod_tail: t,
                    cons_head: hd,
                },
                _ => break,
            };
            let slot = match abi::has_data(ring, q.sq_wqes) {
                Ok(Some(s)) => s,
                Ok(None) => break,
                Err(()) => {
                    self.ring_error(h, "send ring index beyond 2 x size");
                    break;
                }
            };
            let size = abi::sq_wqe_size(q.sq_sge);
            let Some(at) = elem_addr(&q.pages, 1, slot, size) else {
                self.ring_error(h, "send queue slot outside its pages");
                break;
            };
            let wqe: Option<abi::SqWqeHdr> = read_obj(&*self.mem, at).ok();
            let (status, wr_id, byte_len) = match wqe {
                None => (abi::wc_status::LOC_QP_OP_ERR, 0, 0),
                Some(w) => {
                    let st = self.execute_send(h, &w, at + 80);
                    (st.err().unwrap_or(0), w.wr_id, st.unwrap_or(0))
                }
            };
            let Some(q) = self.qps.get(&h) else { break };
            let signaled = q.sig_all
                || wqe.is_none_or(|w| w.send_flags & abi::send_flags::SIGNALED != 0)
                || status != 0;
            let (send_cq, qpn) = (q.send_cq, q.qpn);
            let _ = self
                .mem
                .store_u32(hdr + 4, abi::idx_inc(ring.cons_head, q.sq_wqes));
            if status != 0 {
                self.stats.wr_errors += 1;
            }
            if signaled {
                let cqe = abi::Cqe {
                    wr_id,
                    qp: h as u64,
                    opcode: abi::wc_opcode::SEND,
                    status,
                    byte_len,
                    src_qp: qpn,
                    port_num: 1,
                    ..Default::default()
                };
                self.complete(send_cq, &cqe);
            }
            done += 1;
        }
        done
    }

    /// Executes one send WQE; `Ok(bytes)` or `Err(wc_status)`.
    fn execute_send(&mut self, h: u32, w: &abi::SqWqeHdr, sge_at: u64) -> Result<u32, u32> {
        use abi::wc_status::*;
        let q = self.qps.get(&h).ok_or(GENERAL_ERR)?;
        if w.num_sge > q.sq_sge {
            return Err(LOC_LEN_ERR);
        }
        if w.opcode != abi::wr_opcode::SEND && w.opcode != abi::wr_opcode::SEND_WITH_IMM {
            return Err(LOC_QP_OP_ERR);
        }
        let sges = self.read_sges(sge_at, w.num_sge).ok_or(LOC_PROT_ERR)?;
        let data = self.gather(q.pd, &sges, MAX_UD_PAYLOAD)?;
        let sgid = self
            .gids
            .get(w.ud_av.gid_index as usize)
            .copied()
            .flatten()
            .ok_or(LOC_QP_OP_ERR)?;
        let dgid = Gid(w.ud_av.dgid);
        match q.qp_type {
            qp_type::GSI => {
                if data.len() != MAD_SIZE || w.ud_remote_qpn != 1 {
                    return Err(LOC_LEN_ERR);
                }
                match self.backend.send_mad(sgid, dgid, &data) {
                    Ok(()) => {
                        self.stats.mads_sent += 1;
                        Ok(data.len() as u32)
                    }
                    Err(e) => {
                        tracing::info!(%sgid, %dgid, error = &e as &dyn std::error::Error, "QP1 send refused");
                        self.stats.mads_refused += 1;
                        Err(GENERAL_ERR)
                    }
                }
            }
            _ => {
                let ud = q.ud.as_ref().ok_or(GENERAL_ERR)?;
                if sgid.canonical() != self.gids[0].map(|g| g.canonical()).unwrap_or_default() {
                    // The host QP is bound to GID index 0; another source would be spoofing.
                    return Err(LOC_QP_OP_ERR);
                }
                let imm = (w.opcode == abi::wr_opcode::SEND_WITH_IMM).then_some(w.ex);
                let qkey = if w.ud_remote_qkey & 0x8000_0000 != 0 {
                    q.qkey
                } else {
                    w.ud_remote_qkey
                };
                match ud.send(dgid, w.ud_remote_qpn & rdma_wire::MAX_U24, qkey, imm, &data) {
                    Ok(()) => {
                        self.stats.ud_sent += 1;
                        Ok(data.len() as u32)
                    }
                    Err(e) => {
                        tracing::debug!(error = &e as &dyn std::error::Error, "UD send failed");
                        Err(GENERAL_ERR)
                    }
                }
            }
        }
    }

    /// Free receive WQEs of a QP (posted, not yet consumed), or `None` on a broken ring.
    fn rq_posted(&self, q: &Qp) -> Option<u32> {
        let at = q.pages[0] + abi::QP_RQ_RING_OFFSET;
        let t = self.mem.load_u32(at).ok()?;
        let hd = self.mem.load_u32(at + 4).ok()?;
        if !abi::idx_valid(t, q.rq_wqes) || !abi::idx_valid(hd, q.rq_wqes) {
            return None;
        }
        Some(t.wrapping_sub(hd) & (2 * q.rq_wqes - 1))
    }

    /// Delivers one received buffer (GRH area + payload) into the next receive WQE.
    /// `Ok(false)` when no WQE is posted.
    fn deliver(
        &mut self,
        h: u32,
        grh: &[u8; GRH_LEN],
        payload: &[u8],
        src_qp: u32,
        imm: Option<u32>,
    ) -> Result<bool, ()> {
        let q = self.qps.get(&h).ok_or(())?;
        let at = q.pages[0] + abi::QP_RQ_RING_OFFSET;
        let ring = abi::Ring {
            prod_tail: self.mem.load_u32(at).map_err(|_| ())?,
            cons_head: self.mem.load_u32(at + 4).map_err(|_| ())?,
        };
        let slot = match abi::has_data(ring, q.rq_wqes) {
            Ok(Some(s)) => s,
            Ok(None) => return Ok(false),
            Err(()) => return Err(()),
        };
        let size = abi::rq_wqe_size(q.rq_sge);
        let first = 1 + q.send_chunks as usize;
        let wat = elem_addr(&q.pages, first, slot, size).ok_or(())?;
        let (pd, rq_wqes, recv_cq) = (q.pd, q.rq_wqes, q.recv_cq);
        let wqe: Option<abi::RqWqeHdr> = read_obj(&*self.mem, wat).ok();
        let mut buf = Vec::with_capacity(GRH_LEN + payload.len());
        buf.extend_from_slice(grh);
        buf.extend_from_slice(payload);
        let status = match wqe {
            Some(w) if w.num_sge <= q.rq_sge => match self.read_sges(wat + 16, w.num_sge) {
                Some(sges) => self.scatter(pd, &sges, &buf).err().unwrap_or(0),
                None => abi::wc_status::LOC_PROT_ERR,
            },
            _ => abi::wc_status::LOC_LEN_ERR,
        };
        self.mem
            .store_u32(at + 4, abi::idx_inc(ring.cons_head, rq_wqes))
            .map_err(|_| ())?;
        if status != 0 {
            self.stats.wr_errors += 1;
        }
        let cqe = abi::Cqe {
            wr_id: wqe.map(|w| w.wr_id).unwrap_or(0),
            qp: h as u64,
            opcode: abi::wc_opcode::RECV,
            status,
            byte_len: if status == 0 { buf.len() as u32 } else { 0 },
            imm_data: imm.unwrap_or(0),
            src_qp,
            wc_flags: abi::wc_flags::GRH
                | if imm.is_some() {
                    abi::wc_flags::WITH_IMM
                } else {
                    0
                },
            port_num: 1,
            ..Default::default()
        };
        self.complete(recv_cq, &cqe);
        Ok(status == 0)
    }

    fn process_rq(&mut self, h: u32) -> usize {
        let Some(q) = self.qps.get(&h) else { return 0 };
        if q.state != qp_state::RTR && q.state != qp_state::RTS {
            return 0;
        }
        let mut done = 0;
        if q.qp_type == qp_type::GSI {
            let Some(posted) = self.rq_posted(q) else {
                self.ring_error(h, "receive ring index beyond 2 x size");
                return 0;
            };
            self.inbox.set_credits(posted as usize);
            if posted > 0 {
                self.backend.receive_buffers_posted();
            }
            while done < WR_BUDGET {
                let Some(m) = self.inbox.pop() else { break };
                match self.deliver(h, &m.0, &m.1[..], 1, None) {
                    Ok(true) => self.stats.mads_received += 1,
                    Ok(false) => {
                        self.inbox.unpop(m);
                        break;
                    }
                    Err(()) => {
                        self.ring_error(h, "receive ring index beyond 2 x size");
                        break;
                    }
                }
                done += 1;
            }
            if let Some(q) = self.qps.get(&h) {
                if let Some(p) = self.rq_posted(q) {
                    self.inbox.set_credits(p as usize);
                }
            }
        } else {
            while done < WR_BUDGET {
                let Some(q) = self.qps.get(&h) else { break };
                match self.rq_posted(q) {
                    Some(0) => break,
                    None => {
                        self.ring_error(h, "receive ring index beyond 2 x size");
                        break;
                    }
                    Some(_) => {}
                }
                let Some(d) = q.ud.as_ref().and_then(|u| u.try_recv()) else {
                    break;
                };
                match self.deliver(h, &d.grh, &d.data, d.src_qpn, d.imm) {
                    Ok(true) => self.stats.ud_received += 1,
                    Ok(false) => break,
                    Err(()) => {
                        self.ring_error(h, "receive ring index beyond 2 x size");
                        break;
                    }
                }
                done += 1;
            }
        }
        done
    }
}

impl Drop for Device {
    fn drop(&mut self) {
        self.reset();
    }
}

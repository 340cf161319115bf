//! Reliable Connected queue pairs: the guest's RC QPs run on crates/rdma's RC transport
//! ([`crate::backend::RcQueue`]) and its memory regions are that transport's regions, over
//! guest pages.
//!
//! - **Regions.** Every MR is also registered in its protection domain's
//!   [`rdma::rc::MrTable`] (one table per PD, so a key of another PD is unknown to a QP); the
//!   table's key (not guessable: a counter mixed with a per-table secret) is the MR's lkey and
//!   rkey. A plain region's memory is the pages of its page directory ([`PagedRegion`], each
//!   checked as guest RAM when registered and on every access); the transport checks every
//!   remote access against the region's bounds, its access flags and the QP's. A DMA region
//!   (guest-physical addresses) serves local access only: its remote flags are dropped, so no
//!   peer reaches guest memory through it.
//! - **Send queue.** Each WQE (SEND, SEND_WITH_IMM, RDMA_WRITE, RDMA_WRITE_WITH_IMM,
//!   RDMA_READ) is read from the guest's ring, its SGEs checked (lkey, PD, bounds) and gathered,
//!   and posted to the transport, which segments, retransmits and completes it; the WQE's slot
//!   is released at once. Atomics are refused (`LOC_QP_OP_ERR`, counted). A WQE that fails a
//!   local check completes with its error and moves the QP to ERR, as on hardware. Bytes
//!   posted and not completed are bounded per QP ([`MAX_RC_OUTSTANDING`]) and per device
//!   ([`MAX_RC_OUTSTANDING_DEVICE`]): a guest cannot make the host buffer more.
//! - **Receive queue.** WQEs are posted to the transport with their SGE list kept here; a
//!   received SEND is scattered into them when it completes.
//! - **Completions** come back in the transport's order and become CQEs with the Linux
//!   driver's opcodes and statuses (`pvrdma_wc_opcode`, `pvrdma_wc_status`); an error status
//!   other than a flush moves the QP to ERR; in ERR, WQEs still in the rings complete flushed.
//!
//! Nothing here waits: the transport's completions wake the device thread (the same wake-up
//! as MADs and datagrams), the guest's doorbells wake it too, and one pass moves at most
//! [`WR_BUDGET`] WQEs of each queue.
use std::collections::HashMap;

use rdma::rc::{Access, MrTable, RcAttrs, RcError, RegionMemory, SendOp, SendWr, WcOpcode};

use super::*;
use crate::backend::RcQueue;

/// Largest RC message (SEND or WRITE gathered, READ length).
pub const MAX_RC_MSG: usize = 1 << 20;
/// Bytes one QP may have posted to the transport and not completed.
pub const MAX_RC_OUTSTANDING: usize = 4 << 20;
/// Bytes all RC QPs of a device may have posted and not completed (a QP with nothing
/// outstanding may still post one work request, so none starves).
pub const MAX_RC_OUTSTANDING_DEVICE: usize = 32 << 20;
/// Longest local ACK timeout honoured, µs (the IBA code allows hours).
const MAX_TIMEOUT_US: u64 = 30_000_000;
/// Timeout used for code 0 ("infinite"), µs.
const INFINITE_TIMEOUT_US: u64 = MAX_TIMEOUT_US;

/// The device's RC tables: one region table per protection domain, and the MR handle of
/// each key.
#[derive(Default)]
pub struct RcTables {
    pds: BTreeMap<u32, Arc<MrTable>>,
    keys: HashMap<u32, u32>,
    /// Bytes posted to the transport and not completed, all QPs.
    outstanding: usize,
    /// Keys derived from this secret instead of a random one (fuzzing: the same keys in
    /// every run).
    pub(crate) fixed_secret: Option<u32>,
}

impl RcTables {
    /// The MR handle of lkey `key`.
    pub(super) fn handle_of(&self, key: u32) -> Option<u32> {
        self.keys.get(&key).copied()
    }

    fn table(&mut self, pd: u32) -> Arc<MrTable> {
        self.pds
            .entry(pd)
            .or_insert_with(|| {
                Arc::new(match self.fixed_secret {
                    Some(secret) => MrTable::with_secret(MAX_MR, secret),
                    None => MrTable::new(MAX_MR),
                })
            })
            .clone()
    }

    /// Forgets a PD's table (DESTROY_PD of an unused PD, reset).
    pub(super) fn drop_pd(&mut self, pd: u32) {
        self.pds.remove(&pd);
    }

    /// Forgets everything (device reset).
    pub(super) fn clear(&mut self) {
        self.pds.clear();
        self.keys.clear();
        self.outstanding = 0;
    }
}

/// Counters of the RC path.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RcStats {
    /// Send WQEs posted to the transport.
    pub sends_posted: u64,
    /// Receive WQEs posted to the transport.
    pub recvs_posted: u64,
    /// Completions written for RC QPs.
    pub completions: u64,
    /// Atomic work requests refused.
    pub atomics_refused: u64,
    /// Completions of the transport no posted WQE matched (dropped).
    pub unmatched_completions: u64,
    /// Transport: remote READs/WRITEs refused (bad rkey, outside a region, access not
    /// granted), NAK remote access error sent.
    pub remote_access_refused: u64,
    /// Transport: requests refused as invalid (opcode sequence, lengths), atomics included.
    pub invalid_requests_refused: u64,
    /// Transport: atomic requests from peers refused.
    pub remote_atomics_refused: u64,
    /// Transport: packets retransmitted.
    pub retransmits: u64,
    /// Transport: retransmission timeouts.
    pub timeouts: u64,
    /// Transport: packets from the connected peer dropped for the QP's state.
    pub wrong_state_drops: u64,
}

impl RcStats {
    /// Adds a transport QP's counters.
    fn add(&mut self, t: &rdma::rc::RcStats) {
        self.remote_access_refused += t.rx_access_refused;
        self.invalid_requests_refused += t.rx_invalid;
        self.remote_atomics_refused += t.atomics_refused;
        self.retransmits += t.tx_retransmits;
        self.timeouts += t.timeouts;
        self.wrong_state_drops += t.rx_wrong_state;
    }
}

/// A send WQE the transport holds.
struct PostedSend {
    wr_id: u64,
    signaled: bool,
    bytes: usize,
}

/// A receive WQE the transport holds.
struct PostedRecv {
    wr_id: u64,
    sges: Vec<abi::Sge>,
}

/// The RC side of one queue pair.
pub struct RcQpState {
    queue: Box<dyn RcQueue>,
    sends: HashMap<u64, PostedSend>,
    recvs: HashMap<u64, PostedRecv>,
    next_id: u64,
    attrs: RcAttrs,
    remote: Option<Gid>,
    access: u32,
    /// The ACK timeout code the guest gave (QUERY_QP reports it back).
    timeout_code: u8,
    outstanding: usize,
}

impl RcQpState {
    /// Moves the host RC queue pair to ERR (its GID was unbound).
    pub(super) fn to_err(&self) {
        self.queue.to_err();
    }

    /// The RC attributes QUERY_QP reports (what MODIFY_QP set).
    pub(super) fn query(&self, a: &mut abi::QpAttr) {
        a.path_mtu = rdma::rc::mtu_code(self.attrs.path_mtu).map_or(0, u32::from);
        a.dest_qp_num = self.attrs.dest_qpn;
        a.rq_psn = self.attrs.rq_psn;
        a.sq_psn = self.attrs.sq_psn;
        a.qp_access_flags = self.access;
        a.timeout = self.timeout_code;
        a.retry_cnt = self.attrs.retry_count;
        a.rnr_retry = self.attrs.rnr_retry;
        a.min_rnr_timer = self.attrs.min_rnr_timer;
        a.ah_attr.grh.dgid = self.remote.map_or([0; 16], |g| g.0);
    }
}

impl RcQpState {
    fn forget(&mut self) {
        self.sends.clear();
        self.recvs.clear();
        self.outstanding = 0;
    }
}

/// A plain region's memory: the guest pages of its page directory, from `first` bytes into
/// the first page, `len` bytes.
struct PagedRegion {
    mem: Arc<dyn GuestMemory>,
    pages: Vec<u64>,
    first: usize,
    len: usize,
}

impl std::fmt::Debug for PagedRegion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PagedRegion")
            .field("pages", &self.pages.len())
            .field("len", &self.len)
            .finish()
    }
}

impl PagedRegion {
    /// Runs `io` on each guest-physical piece of `[off, off + len)` (with the range of the
    /// caller's bytes it covers); false if out of the region or an access failed.
    fn walk(
        &self,
        off: usize,
        len: usize,
        mut io: impl FnMut(u64, std::ops::Range<usize>) -> bool,
    ) -> bool {
        let Some(end) = off.checked_add(len).filter(|&e| e <= self.len) else {
            return false;
        };
        let page = abi::PVRDMA_PAGE_SIZE as usize;
        let mut at = off;
        while at < end {
            let abs = self.first + at;
            let (i, in_page) = (abs / page, abs % page);
            let n = (page - in_page).min(end - at);
            let Some(gpa) = self.pages.get(i) else {
                return false;
            };
            if !io(gpa + in_page as u64, at - off..at - off + n) {
                return false;
            }
            at += n;
        }
        true
    }
}

impl RegionMemory for PagedRegion {
    fn len(&self) -> usize {
        self.len
    }
    fn read(&self, off: usize, buf: &mut [u8]) -> bool {
        let mem = &self.mem;
        self.walk(off, buf.len(), |gpa, r| mem.read(gpa, &mut buf[r]).is_ok())
    }
    fn write(&self, off: usize, data: &[u8]) -> bool {
        let mem = &self.mem;
        self.walk(off, data.len(), |gpa, r| mem.write(gpa, &data[r]).is_ok())
    }
}

/// A DMA region's memory: guest-physical addresses, every access checked against guest RAM.
struct DmaRegion {
    mem: Arc<dyn GuestMemory>,
}

impl std::fmt::Debug for DmaRegion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DmaRegion")
    }
}

impl RegionMemory for DmaRegion {
    fn len(&self) -> usize {
        1 << 48
    }
    fn read(&self, off: usize, buf: &mut [u8]) -> bool {
        self.mem.read(off as u64, buf).is_ok()
    }
    fn write(&self, off: usize, data: &[u8]) -> bool {
        self.mem.write(off as u64, data).is_ok()
    }
}

/// The IBA local ACK timeout of a code (4.096 µs × 2^code; 0 = none), µs, bounded.
pub fn timeout_us(code: u8) -> u64 {
    if code == 0 {
        return INFINITE_TIMEOUT_US;
    }
    (4096u64 << code.min(31)) / 1000
}

/// The completion status of a transport status.
fn wc_status(s: rdma::rc::WcStatus) -> u32 {
    use abi::wc_status as w;
    use rdma::rc::WcStatus as S;
    match s {
        S::Success => w::SUCCESS,
        S::LocLenErr => w::LOC_LEN_ERR,
        S::LocProtErr => w::LOC_PROT_ERR,
        S::WrFlushErr => w::WR_FLUSH_ERR,
        S::RemInvReqErr => w::REM_INV_REQ_ERR,
        S::RemAccessErr => w::REM_ACCESS_ERR,
        S::RemOpErr => w::REM_OP_ERR,
        S::RetryExcErr => w::RETRY_EXC_ERR,
        S::RnrRetryExcErr => w::RNR_RETRY_EXC_ERR,
    }
}

/// The CQE opcode of a transport completion.
fn wc_opcode(o: WcOpcode) -> u32 {
    use abi::wc_opcode as w;
    match o {
        WcOpcode::Send => w::SEND,
        WcOpcode::RdmaWrite => w::RDMA_WRITE,
        WcOpcode::RdmaRead => w::RDMA_READ,
        WcOpcode::Recv => w::RECV,
        WcOpcode::RecvRdmaWithImm => w::RECV_RDMA_WITH_IMM,
    }
}

/// The CQE opcode of a send WQE's opcode.
fn wr_wc_opcode(op: u32) -> u32 {
    match op {
        abi::wr_opcode::RDMA_WRITE | abi::wr_opcode::RDMA_WRITE_WITH_IMM => {
            abi::wc_opcode::RDMA_WRITE
        }
        abi::wr_opcode::RDMA_READ => abi::wc_opcode::RDMA_READ,
        _ => abi::wc_opcode::SEND,
    }
}

fn rc_invalid(e: RcError) -> VrdmaError {
    tracing::debug!("RC transport refused: {e}");
    invalid("RC QP attributes", 0, "refused by the RC transport")
}

impl Device {
    /// The RC counters: the device's, plus the transport's of every QP (live or destroyed).
    pub(super) fn rc_stats(&self) -> RcStats {
        let mut s = self.stats.rc.clone();
        for st in self.qps.values().filter_map(|q| q.rc.as_ref()) {
            if let Some(t) = st.queue.counters() {
                s.add(&t);
            }
        }
        s
    }

    /// A QP went away (DESTROY_QP): what it had outstanding leaves the device's total, its
    /// transport counters stay in the device's.
    pub(super) fn rc_destroyed(&mut self, q: &Qp) {
        if let Some(st) = &q.rc {
            self.rc.outstanding = self.rc.outstanding.saturating_sub(st.outstanding);
            if let Some(t) = st.queue.counters() {
                self.stats.rc.add(&t);
            }
        }
    }

    /// Registers MR `handle` (already in `mrs`) in its PD's region table; returns its key.
    pub(super) fn rc_register_mr(&mut self, handle: u32) -> Result<u32, VrdmaError> {
        let mr = self.mrs.get(&handle).ok_or(no("MR", handle))?;
        let table = self.rc.table(mr.pd);
        let local_write = mr.access & abi::access::LOCAL_WRITE != 0;
        let (mem, iova, access): (Arc<dyn RegionMemory>, u64, Access) = if mr.dma {
            let access = Access {
                local_write,
                ..Access::default()
            };
            (
                Arc::new(DmaRegion {
                    mem: self.mem.clone(),
                }),
                0,
                access,
            )
        } else {
            let access = Access {
                local_write,
                remote_write: mr.access & abi::access::REMOTE_WRITE != 0,
                remote_read: mr.access & abi::access::REMOTE_READ != 0,
            };
            let region = PagedRegion {
                mem: self.mem.clone(),
                pages: mr.pages.clone(),
                first: (mr.start % abi::PVRDMA_PAGE_SIZE) as usize,
                len: usize::try_from(mr.length).map_err(|_| {
                    invalid("MR length", mr.length, "larger than the host's addresses")
                })?,
            };
            (Arc::new(region), mr.start, access)
        };
        let region = table
            .register_memory(iova, mem, access)
            .ok_or(VrdmaError::TableFull {
                kind: "MR",
                max: MAX_MR,
            })?;
        self.rc.keys.insert(region.key(), handle);
        Ok(region.key())
    }

    /// Removes MR `mr`'s key from its PD's table: no peer reaches it any more.
    pub(super) fn rc_deregister_mr(&mut self, mr: &Mr) {
        if let Some(t) = self.rc.pds.get(&mr.pd) {
            t.deregister(mr.key);
        }
        self.rc.keys.remove(&mr.key);
    }

    /// The host RC queue pair of a new RC QP in `pd`, sending from GID index 0.
    pub(super) fn rc_create(&mut self, pd: u32) -> Result<(u32, Box<RcQpState>), VrdmaError> {
        let gid = self.gids[0].ok_or(invalid(
            "GID index",
            0,
            "bind a GID (CREATE_BIND index 0) before creating RC QPs",
        ))?;
        let table = self.rc.table(pd);
        let queue = self.backend.create_rc_qp(gid, table)?;
        // Completions wake the device thread (the same one MADs and datagrams wake).
        let inbox = self.inbox.clone();
        // Not the receive thread's direct delivery: that one writes MADs and datagrams only,
        // and the transport may call this with its own lock held.
        queue.set_waker(Arc::new(move || inbox.wake_device_thread()));
        let qpn = queue.qpn();
        Ok((
            qpn,
            Box::new(RcQpState {
                queue,
                sends: HashMap::new(),
                recvs: HashMap::new(),
                next_id: 1,
                attrs: RcAttrs::default(),
                remote: None,
                access: 0,
                timeout_code: 14,
                outstanding: 0,
            }),
        ))
    }

    /// MODIFY_QP of an RC QP: attributes, then the state transition.
    pub(super) fn rc_modify(&mut self, c: &abi::CmdModifyQp) -> Result<(), VrdmaError> {
        use abi::qp_attr_mask as m;
        let gid0 = self.gids[0];
        let sgid_ok = |i: u8| {
            self.gids
                .get(i as usize)
                .copied()
                .flatten()
                .is_some_and(|g| Some(g) == gid0)
        };
        let sgid_ok = sgid_ok(c.attrs.ah_attr.grh.sgid_index);
        let q = self
            .qps
            .get_mut(&c.qp_handle)
            .ok_or(no("QP", c.qp_handle))?;
        let Some(st) = q.rc.as_mut() else {
            return Err(invalid("qp_type", q.qp_type as u64, "not an RC QP"));
        };
        let (mask, a) = (c.attr_mask, &c.attrs);
        if mask & !m::ALL != 0 {
            return Err(invalid("attr_mask", mask as u64, "unknown bits"));
        }
        // Validate everything before changing anything.
        let mtu = if mask & m::PATH_MTU != 0 {
            let code = u8::try_from(a.path_mtu).unwrap_or(0);
            Some(rdma::rc::mtu_of_code(code).ok_or(invalid(
                "path_mtu",
                a.path_mtu as u64,
                "256 to 4096 (codes 1 to 5)",
            ))?)
        } else {
            None
        };
        for (bit, v, max, f) in [
            (m::RETRY_CNT, a.retry_cnt, 7, "retry_cnt"),
            (m::RNR_RETRY, a.rnr_retry, 7, "rnr_retry"),
            (m::MIN_RNR_TIMER, a.min_rnr_timer, 31, "min_rnr_timer"),
        ] {
            if mask & bit != 0 && v > max {
                return Err(invalid(f, v as u64, "beyond the IBA range"));
            }
        }
        let remote = if mask & m::AV != 0 {
            let dgid = Gid(a.ah_attr.grh.dgid);
            if dgid.is_zero() {
                return Err(invalid("ah_attr.dgid", 0, "the zero GID"));
            }
            if !sgid_ok {
                return Err(invalid(
                    "ah_attr.sgid_index",
                    a.ah_attr.grh.sgid_index as u64,
                    "RC QPs send from the GID at index 0",
                ));
            }
            Some(dgid.canonical())
        } else {
            None
        };
        if mask & m::ACCESS_FLAGS != 0 {
            st.access = a.qp_access_flags;
        }
        if let Some(mtu) = mtu {
            st.attrs.path_mtu = mtu;
        }
        if mask & m::DEST_QPN != 0 {
            st.attrs.dest_qpn = a.dest_qp_num & rdma_wire::MAX_U24;
        }
        if mask & m::RQ_PSN != 0 {
            st.attrs.rq_psn = a.rq_psn & rdma_wire::MAX_U24;
        }
        if mask & m::SQ_PSN != 0 {
            st.attrs.sq_psn = a.sq_psn & rdma_wire::MAX_U24;
        }
        if mask & m::TIMEOUT != 0 {
            st.attrs.timeout_us = timeout_us(a.timeout);
            st.timeout_code = a.timeout;
        }
        if mask & m::RETRY_CNT != 0 {
            st.attrs.retry_count = a.retry_cnt;
        }
        if mask & m::RNR_RETRY != 0 {
            st.attrs.rnr_retry = a.rnr_retry;
        }
        if mask & m::MIN_RNR_TIMER != 0 {
            st.attrs.min_rnr_timer = a.min_rnr_timer;
        }
        if remote.is_some() {
            st.remote = remote;
        }
        if mask & m::STATE == 0 {
            return Ok(());
        }
        use qp_state::*;
        let to = a.qp_state;
        match (q.state, to) {
            (_, RESET) => {
                st.queue.reset();
                self.rc.outstanding = self.rc.outstanding.saturating_sub(st.outstanding);
                st.forget();
                let hdr = q.pages[0];
                for off in [0u64, 4, 8, 12] {
                    self.mem.store_u32(hdr + off, 0)?;
                }
            }
            (_, ERR) => st.queue.to_err(),
            (RESET, INIT) | (INIT, INIT) | (RTS, RTS) | (SQD, SQD) => {}
            (INIT, RTR) => {
                let remote = st.remote.ok_or(invalid(
                    "attr_mask",
                    mask as u64,
                    "RTR needs the address vector (destination GID)",
                ))?;
                let (rw, rr) = (
                    st.access & abi::access::REMOTE_WRITE != 0,
                    st.access & abi::access::REMOTE_READ != 0,
                );
                st.queue
                    .modify_rtr(remote, st.attrs, rw, rr)
                    .map_err(rc_invalid)?;
            }
            (RTR, RTS) => {
                let a = st.attrs;
                st.queue
                    .modify_rts(a.sq_psn, a.timeout_us, a.retry_count, a.rnr_retry)
                    .map_err(rc_invalid)?;
            }
            (RTS, SQD) => st.queue.drain().map_err(rc_invalid)?,
            (SQD, RTS) => st.queue.resume().map_err(rc_invalid)?,
            _ => return Err(invalid("qp_state", to as u64, "not a valid transition")),
        }
        q.state = to;
        if to == RTR {
            // Receives posted in INIT go to the transport before the first packet can come.
            self.rc_rq(c.qp_handle);
        }
        Ok(())
    }

    /// One pass over an RC QP: new send WQEs, new receive WQEs, the transport's completions.
    pub(super) fn rc_process(&mut self, h: u32) -> usize {
        self.rc_sq(h) + self.rc_rq(h) + self.rc_completions(h)
    }

    /// Writes an error (or flush) completion for a WQE the transport never saw.
    fn rc_complete_now(&mut self, h: u32, recv: bool, wr_id: u64, opcode: u32, status: u32) {
        let Some(q) = self.qps.get(&h) else { return };
        let (cq, src) = if recv {
            (q.recv_cq, q.rc.as_ref().map_or(0, |s| s.attrs.dest_qpn))
        } else {
            (q.send_cq, q.rc.as_ref().map_or(0, |s| s.attrs.dest_qpn))
        };
        if status != abi::wc_status::SUCCESS {
            self.stats.wr_errors += 1;
        }
        let cqe = abi::Cqe {
            wr_id,
            qp: h as u64,
            opcode,
            status,
            src_qp: src,
            port_num: 1,
            ..Default::default()
        };
        self.stats.rc.completions += 1;
        self.complete(cq, &cqe);
    }

    /// A local error on a WQE: its error completion, and the QP to ERR.
    fn rc_local_error(&mut self, h: u32, wr_id: u64, opcode: u32, status: u32) {
        self.rc_complete_now(h, false, wr_id, opcode, status);
        if let Some(q) = self.qps.get_mut(&h) {
            q.state = qp_state::ERR;
            if let Some(st) = &q.rc {
                st.queue.to_err();
            }
        }
    }

    /// The work request a send WQE asks for, or its error status.
    fn rc_build_send(&mut self, h: u32, w: &abi::SqWqeHdr, sge_at: u64) -> Result<SendOp, u32> {
        use abi::wc_status::*;
        use abi::wr_opcode as op;
        let q = self.qps.get(&h).ok_or(GENERAL_ERR)?;
        if w.num_sge > q.sq_sge {
            return Err(LOC_LEN_ERR);
        }
        let pd = q.pd;
        let sges = self.read_sges(sge_at, w.num_sge).ok_or(LOC_PROT_ERR)?;
        let imm = matches!(w.opcode, op::SEND_WITH_IMM | op::RDMA_WRITE_WITH_IMM).then_some(w.ex);
        // The data goes into a buffer an earlier work request gave back (no fresh memory to
        // fault in per message).
        let spare = || {
            q.rc.as_ref()
                .map(|st| st.queue.spare_buffer())
                .unwrap_or_default()
        };
        match w.opcode {
            op::SEND | op::SEND_WITH_IMM => Ok(SendOp::Send {
                data: self.gather_into(pd, &sges, MAX_RC_MSG, spare())?,
                imm,
            }),
            op::RDMA_WRITE | op::RDMA_WRITE_WITH_IMM => Ok(SendOp::Write {
                data: self.gather_into(pd, &sges, MAX_RC_MSG, spare())?,
                remote_addr: w.rdma_remote_addr(),
                rkey: w.rdma_rkey(),
                imm,
            }),
            op::RDMA_READ => {
                // The READ's data lands through one SGE, in a region of this QP's PD (the
                // transport checks its key, bounds and local-write access).
                let [s] = sges.as_slice() else {
                    return Err(LOC_LEN_ERR);
                };
                if s.length as usize > MAX_RC_MSG {
                    return Err(LOC_LEN_ERR);
                }
                Ok(SendOp::Read {
                    len: s.length,
                    remote_addr: w.rdma_remote_addr(),
                    rkey: w.rdma_rkey(),
                    lkey: s.lkey,
                    local_addr: s.addr,
                })
            }
            op::ATOMIC_CMP_AND_SWP | op::ATOMIC_FETCH_AND_ADD => {
                self.stats.rc.atomics_refused += 1;
                Err(LOC_QP_OP_ERR)
            }
            _ => Err(LOC_QP_OP_ERR),
        }
    }

    /// The bytes a send WQE moves (the sum of its SGE lengths), if its SGEs can be read.
    fn rc_wqe_bytes(&self, h: u32, w: &abi::SqWqeHdr, sge_at: u64) -> Option<usize> {
        let q = self.qps.get(&h)?;
        if w.num_sge > q.sq_sge {
            return None;
        }
        let sges = self.read_sges(sge_at, w.num_sge)?;
        Some(sges.iter().map(|s| s.length as usize).sum())
    }

    /// Whether posting `bytes` more on RC QP `h` would pass the per-QP or per-device bound
    /// of bytes outstanding (a QP with nothing outstanding may always post one).
    fn rc_full(&self, h: u32, bytes: usize) -> bool {
        let Some(st) = self.qps.get(&h).and_then(|q| q.rc.as_ref()) else {
            return true;
        };
        st.outstanding > 0
            && (st.outstanding.saturating_add(bytes) > MAX_RC_OUTSTANDING
                || self.rc.outstanding.saturating_add(bytes) > MAX_RC_OUTSTANDING_DEVICE)
    }

    fn rc_sq(&mut self, h: u32) -> usize {
        let Some(q) = self.qps.get(&h) else { return 0 };
        if !matches!(q.state, qp_state::RTS | qp_state::SQD | qp_state::ERR) {
            return 0;
        }
        let hdr = q.pages[0];
        let mut done = 0;
        while done < WR_BUDGET {
            let Some(q) = self.qps.get(&h) else { break };
            let Some(ring) = self.load_ring(hdr) else {
                break;
            };
            let slot = match abi::has_data(ring, q.sq_wqes) {
                Ok(Some(s)) => s,
                Ok(None) => break,
                Err(()) => {
                    self.ring_error(h, "send ring index beyond 2 x size");
                    self.rc_to_err(h);
                    break;
                }
            };
            let Some(at) = elem_addr(&q.pages, 1, slot, abi::sq_wqe_size(q.sq_sge)) else {
                self.ring_error(h, "send queue slot outside its pages");
                self.rc_to_err(h);
                break;
            };
            let (state, sig_all, sq_wqes) = (q.state, q.sig_all, q.sq_wqes);
            let release = |dev: &Device| {
                let _ = dev
                    .mem
                    .store_u32(hdr + 4, abi::idx_inc(ring.cons_head, sq_wqes));
            };
            let Ok(w) = read_obj::<abi::SqWqeHdr>(&*self.mem, at) else {
                release(self);
                self.rc_local_error(h, 0, abi::wc_opcode::SEND, abi::wc_status::LOC_QP_OP_ERR);
                done += 1;
                continue;
            };
            let opcode = wr_wc_opcode(w.opcode);
            if state == qp_state::ERR {
                release(self);
                self.rc_complete_now(h, false, w.wr_id, opcode, abi::wc_status::WR_FLUSH_ERR);
                done += 1;
                continue;
            }
            // Room first: a WQE that has to wait is not gathered (its copy thrown away) on
            // every pass until completions make room.
            if let Some(need) = self.rc_wqe_bytes(h, &w, at + 80) {
                if self.rc_full(h, need) {
                    break;
                }
            }
            let op = match self.rc_build_send(h, &w, at + 80) {
                Ok(op) => op,
                Err(status) => {
                    release(self);
                    self.rc_local_error(h, w.wr_id, opcode, status);
                    done += 1;
                    continue;
                }
            };
            let bytes = match &op {
                SendOp::Send { data, .. } | SendOp::Write { data, .. } => data.len(),
                SendOp::Read { len, .. } => *len as usize,
            };
            if self.rc_full(h, bytes) {
                break; // the WQE stays in the ring until completions make room
            }
            let Some(st) = self.qps.get_mut(&h).and_then(|q| q.rc.as_mut()) else {
                break;
            };
            let id = st.next_id;
            match st.queue.post_send(SendWr { wr_id: id, op }) {
                Ok(()) => {
                    st.next_id += 1;
                    st.outstanding += bytes;
                    self.rc.outstanding += bytes;
                    let signaled = sig_all || w.send_flags & abi::send_flags::SIGNALED != 0;
                    st.sends.insert(
                        id,
                        PostedSend {
                            wr_id: w.wr_id,
                            signaled,
                            bytes,
                        },
                    );
                    self.stats.rc.sends_posted += 1;
                    release(self);
                }
                Err(RcError::QueueFull(_)) => break,
                Err(e) => {
                    tracing::debug!(qp = h, "RC send refused: {e}");
                    release(self);
                    self.rc_local_error(h, w.wr_id, opcode, abi::wc_status::LOC_QP_OP_ERR);
                }
            }
            done += 1;
        }
        done
    }

    fn rc_rq(&mut self, h: u32) -> usize {
        let Some(q) = self.qps.get(&h) else { return 0 };
        // The transport takes receives from RTR on (the guest may post them in INIT: they
        // wait in its ring until then).
        if matches!(q.state, qp_state::RESET | qp_state::INIT) {
            return 0;
        }
        let at = q.pages[0] + abi::QP_RQ_RING_OFFSET;
        let mut done = 0;
        while done < WR_BUDGET {
            let Some(q) = self.qps.get(&h) else { break };
            let Some(ring) = self.load_ring(at) else {
                break;
            };
            let slot = match abi::has_data(ring, q.rq_wqes) {
                Ok(Some(s)) => s,
                Ok(None) => break,
                Err(()) => {
                    self.ring_error(h, "receive ring index beyond 2 x size");
                    self.rc_to_err(h);
                    break;
                }
            };
            let first = 1 + q.send_chunks as usize;
            let Some(wat) = elem_addr(&q.pages, first, slot, abi::rq_wqe_size(q.rq_sge)) else {
                self.ring_error(h, "receive queue slot outside its pages");
                self.rc_to_err(h);
                break;
            };
            let (state, rq_wqes, rq_sge) = (q.state, q.rq_wqes, q.rq_sge);
            let release = |dev: &Device| {
                let _ = dev
                    .mem
                    .store_u32(at + 4, abi::idx_inc(ring.cons_head, rq_wqes));
            };
            let wqe: Option<abi::RqWqeHdr> = read_obj(&*self.mem, wat).ok();
            let sges = wqe
                .filter(|w| w.num_sge <= rq_sge)
                .and_then(|w| self.read_sges(wat + 16, w.num_sge));
            let wr_id = wqe.map_or(0, |w| w.wr_id);
            let Some(sges) = sges.filter(|_| state != qp_state::ERR) else {
                release(self);
                let status = if state == qp_state::ERR {
                    abi::wc_status::WR_FLUSH_ERR
                } else {
                    abi::wc_status::LOC_LEN_ERR
                };
                self.rc_complete_now(h, true, wr_id, abi::wc_opcode::RECV, status);
                done += 1;
                continue;
            };
            let room = sges
                .iter()
                .map(|s| s.length as usize)
                .sum::<usize>()
                .min(MAX_RC_MSG);
            let Some(st) = self.qps.get_mut(&h).and_then(|q| q.rc.as_mut()) else {
                break;
            };
            let id = st.next_id;
            match st.queue.post_recv(id, room) {
                Ok(()) => {
                    st.next_id += 1;
                    st.recvs.insert(id, PostedRecv { wr_id, sges });
                    self.stats.rc.recvs_posted += 1;
                    release(self);
                }
                Err(RcError::QueueFull(_)) => break,
                Err(e) => {
                    tracing::debug!(qp = h, "RC receive refused: {e}");
                    release(self);
                    let status = abi::wc_status::LOC_QP_OP_ERR;
                    self.rc_complete_now(h, true, wr_id, abi::wc_opcode::RECV, status);
                }
            }
            done += 1;
        }
        done
    }

    /// The producer and consumer indexes at `at`.
    fn load_ring(&self, at: u64) -> Option<abi::Ring> {
        Some(abi::Ring {
            prod_tail: self.mem.load_u32(at).ok()?,
            cons_head: self.mem.load_u32(at + 4).ok()?,
        })
    }

    fn rc_to_err(&mut self, h: u32) {
        if let Some(st) = self.qps.get(&h).and_then(|q| q.rc.as_ref()) {
            st.queue.to_err();
        }
    }

    fn rc_completions(&mut self, h: u32) -> usize {
        let mut done = 0;
        while done < 2 * WR_BUDGET {
            let Some(q) = self.qps.get_mut(&h) else { break };
            let (pd, send_cq, recv_cq) = (q.pd, q.send_cq, q.recv_cq);
            let Some(st) = q.rc.as_mut() else { break };
            let Some(wc) = st.queue.poll() else { break };
            done += 1;
            let src_qp = st.attrs.dest_qpn;
            let mut status = wc_status(wc.status);
            let failed = !matches!(
                wc.status,
                rdma::rc::WcStatus::Success | rdma::rc::WcStatus::WrFlushErr
            );
            let recv = matches!(wc.opcode, WcOpcode::Recv | WcOpcode::RecvRdmaWithImm);
            let (cq, wr_id, signaled, sges) = if recv {
                let Some(r) = st.recvs.remove(&wc.wr_id) else {
                    self.stats.rc.unmatched_completions += 1;
                    continue;
                };
                (recv_cq, r.wr_id, true, Some(r.sges))
            } else {
                let Some(s) = st.sends.remove(&wc.wr_id) else {
                    self.stats.rc.unmatched_completions += 1;
                    continue;
                };
                st.outstanding = st.outstanding.saturating_sub(s.bytes);
                self.rc.outstanding = self.rc.outstanding.saturating_sub(s.bytes);
                (send_cq, s.wr_id, s.signaled, None)
            };
            if let (Some(sges), WcOpcode::Recv, true) =
                (&sges, wc.opcode, status == abi::wc_status::SUCCESS)
            {
                if let Err(e) = self.scatter(pd, sges, &wc.data) {
                    status = e;
                    self.rc_to_err(h);
                }
            }
            if failed || status != wc_status(wc.status) {
                if let Some(q) = self.qps.get_mut(&h) {
                    q.state = qp_state::ERR;
                }
            }
            if status != abi::wc_status::SUCCESS {
                self.stats.wr_errors += 1;
            } else if !signaled {
                continue;
            }
            let cqe = abi::Cqe {
                wr_id,
                qp: h as u64,
                opcode: wc_opcode(wc.opcode),
                status,
                byte_len: if status == abi::wc_status::SUCCESS {
                    wc.byte_len
                } else {
                    0
                },
                imm_data: wc.imm.unwrap_or(0),
                src_qp,
                wc_flags: if wc.imm.is_some() {
                    abi::wc_flags::WITH_IMM
                } else {
                    0
                },
                port_num: 1,
                ..Default::default()
            };
            self.stats.rc.completions += 1;
            self.complete(cq, &cqe);
        }
        done
    }
}

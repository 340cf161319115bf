//! A minimal driver for the PVRDMA device ABI (`pvrdma_abi`): finds the function on the PCI
//! bus, sets up the device shared region, command and response slots and the async ring,
//! issues commands through the register BAR (each command costs a few VM exits, which is fine:
//! commands are rare), and drives QP/CQ rings in guest memory. Doorbells go to the UAR page,
//! which the VMM maps as memory: posting work never exits. Completions are polled.
use core::sync::atomic::{compiler_fence, AtomicU64, Ordering};

use guest_abi::layout::WORK_BASE;
use pvrdma_abi::{self as abi, cmd_code, FromBytes, Immutable, IntoBytes, KnownLayout};

use crate::{
    io::{mmio_read32, mmio_write32},
    pci,
};

mod rc;
pub use rc::{RcAttrs, RcSend};

const PAGE: u64 = 4096;

static NEXT_PAGE: AtomicU64 = AtomicU64::new(WORK_BASE);

/// Allocates `n` zeroed, contiguous pages (never freed: the workloads are short-lived).
pub fn alloc_pages(n: u64) -> u64 {
    let p = NEXT_PAGE.fetch_add(n * PAGE, Ordering::Relaxed);
    for i in 0..(n * PAGE / 8) {
        write_u64(p + 8 * i, 0);
    }
    p
}

/// Writes a u64 to guest memory.
pub fn write_u64(gpa: u64, v: u64) {
    // SAFETY: `gpa` is identity-mapped RAM this driver allocated.
    unsafe { core::ptr::write_volatile(gpa as *mut u64, v) }
}

/// Reads a u32 from guest memory (ring indexes the device updates).
pub fn read_u32(gpa: u64) -> u32 {
    // SAFETY: as for `write_u64`; aligned.
    unsafe { core::ptr::read_volatile(gpa as *const u32) }
}

/// Writes a u32 to guest memory (ring indexes the device reads).
pub fn write_u32(gpa: u64, v: u32) {
    // SAFETY: as for `write_u64`; aligned.
    unsafe { core::ptr::write_volatile(gpa as *mut u32, v) }
}

/// Copies bytes into guest memory.
pub fn write_bytes(gpa: u64, b: &[u8]) {
    // SAFETY: the destination is RAM this driver allocated, `b.len()` bytes long.
    unsafe { core::ptr::copy_nonoverlapping(b.as_ptr(), gpa as *mut u8, b.len()) }
}

/// Copies bytes out of guest memory.
pub fn read_bytes(gpa: u64, b: &mut [u8]) {
    // SAFETY: the source is RAM this driver allocated, `b.len()` bytes long.
    unsafe { core::ptr::copy_nonoverlapping(gpa as *const u8, b.as_mut_ptr(), b.len()) }
}

/// Writes a layout struct.
pub fn write_obj<T: IntoBytes + Immutable>(gpa: u64, v: &T) {
    write_bytes(gpa, v.as_bytes());
}

/// Reads a layout struct.
pub fn read_obj<T: FromBytes + IntoBytes + KnownLayout>(gpa: u64) -> T {
    let mut v = T::new_zeroed();
    read_bytes(gpa, v.as_mut_bytes());
    v
}

/// A page directory over `n` fresh pages (one table: n ≤ 512). Returns (directory, first
/// page); the pages are contiguous.
pub fn pdir(n: u64) -> (u64, u64) {
    let dir = alloc_pages(1);
    let table = alloc_pages(1);
    let pages = alloc_pages(n);
    write_u64(dir, table);
    for i in 0..n {
        write_u64(table + 8 * i, pages + i * PAGE);
    }
    (dir, pages)
}

/// A completion queue of `n` ≤ 64 entries (one page of CQEs after the ring page).
#[derive(Clone, Copy)]
pub struct Cq {
    /// Handle.
    pub handle: u32,
    n: u32,
    ring: u64,
    cqes: u64,
}

impl Cq {
    /// The next completion, if any.
    pub fn poll(&self) -> Option<abi::Cqe> {
        let tail = read_u32(self.ring + 8);
        let head = read_u32(self.ring + 12);
        if tail == head {
            return None;
        }
        compiler_fence(Ordering::Acquire);
        let c: abi::Cqe = read_obj(self.cqes + 64 * (head & (self.n - 1)) as u64);
        compiler_fence(Ordering::Release);
        write_u32(self.ring + 12, abi::idx_inc(head, self.n));
        Some(c)
    }
}

/// Send queue slots of [`Device::create_qp`].
pub const SQ_WQES: u32 = 16;
/// Receive queue slots.
pub const RQ_WQES: u32 = 32;

/// A queue pair with one SGE per work request.
pub struct Qp {
    /// Its number (= its handle).
    pub qpn: u32,
    hdr: u64,
    sq: u64,
    rq: u64,
    uar: u64,
    /// Send and receive queue slots (powers of two).
    sq_n: u32,
    rq_n: u32,
}

impl Qp {
    /// Posts a UD send of `len` bytes at `addr` to (`dgid`, `dqpn`, `qkey`) from GID index
    /// `gid_index`. False when the send queue is full.
    #[allow(clippy::too_many_arguments)]
    pub fn post_send(
        &self,
        wr_id: u64,
        addr: u64,
        len: u32,
        lkey: u32,
        dgid: [u8; 16],
        dqpn: u32,
        qkey: u32,
        gid_index: u8,
    ) -> bool {
        self.post_send_imm(wr_id, addr, len, lkey, dgid, dqpn, qkey, gid_index, None)
    }

    /// [`Qp::post_send`] as SEND_WITH_IMM when `imm` is given (the device puts it on the
    /// wire big endian, as `htobe32` in a verbs application).
    #[allow(clippy::too_many_arguments)]
    pub fn post_send_imm(
        &self,
        wr_id: u64,
        addr: u64,
        len: u32,
        lkey: u32,
        dgid: [u8; 16],
        dqpn: u32,
        qkey: u32,
        gid_index: u8,
        imm: Option<u32>,
    ) -> bool {
        self.post_send_ex(
            wr_id, addr, len, lkey, dgid, dqpn, qkey, gid_index, imm, true,
        )
    }

    /// [`Qp::post_send_imm`], signaled or not (an unsignaled send completes silently when it
    /// succeeds; a failed one always completes with its error status).
    #[allow(clippy::too_many_arguments)]
    pub fn post_send_ex(
        &self,
        wr_id: u64,
        addr: u64,
        len: u32,
        lkey: u32,
        dgid: [u8; 16],
        dqpn: u32,
        qkey: u32,
        gid_index: u8,
        imm: Option<u32>,
        signaled: bool,
    ) -> bool {
        let Some(at) = self.sq_slot() else {
            return false;
        };
        let w = abi::SqWqeHdr {
            wr_id,
            num_sge: 1,
            opcode: if imm.is_some() {
                abi::wr_opcode::SEND_WITH_IMM
            } else {
                abi::wr_opcode::SEND
            },
            ex: imm.unwrap_or(0),
            send_flags: if signaled {
                abi::send_flags::SIGNALED
            } else {
                0
            },
            ud_remote_qpn: dqpn,
            ud_remote_qkey: qkey,
            ud_av: abi::Av {
                dgid,
                gid_index,
                port_pd: 1,
                hop_limit: 64,
                ..Default::default()
            },
            ..Default::default()
        };
        write_obj(at, &w);
        write_obj(
            at + 80,
            &abi::Sge {
                addr,
                length: len,
                lkey,
            },
        );
        self.sq_commit();
        true
    }

    /// The address of the next free send WQE, or `None` when the send queue is full.
    fn sq_slot(&self) -> Option<u64> {
        self.sq_free_slot()
            .map(|i| self.sq + abi::sq_wqe_size(1) as u64 * i as u64)
    }

    /// Publishes the WQE written at [`Qp::sq_slot`] and rings the send doorbell.
    fn sq_commit(&self) {
        let tail = read_u32(self.hdr);
        compiler_fence(Ordering::Release);
        write_u32(self.hdr, abi::idx_inc(tail, self.sq_n));
        mmio_write32(
            self.uar + abi::PVRDMA_UAR_QP_OFFSET,
            self.qpn | abi::PVRDMA_UAR_QP_SEND,
        );
    }

    /// The send queue slot the next post uses (its ring index), or `None` when it is full.
    pub fn sq_free_slot(&self) -> Option<u32> {
        let tail = read_u32(self.hdr);
        let head = read_u32(self.hdr + 4);
        (tail != head ^ self.sq_n).then_some(tail & (self.sq_n - 1))
    }

    /// Whether the device has taken every posted send.
    pub fn sq_idle(&self) -> bool {
        read_u32(self.hdr) == read_u32(self.hdr + 4)
    }

    /// Posts a receive buffer. False when the receive queue is full.
    pub fn post_recv(&self, wr_id: u64, addr: u64, len: u32, lkey: u32) -> bool {
        let tail = read_u32(self.hdr + 8);
        let head = read_u32(self.hdr + 12);
        if tail == head ^ self.rq_n {
            return false;
        }
        let at = self.rq + abi::rq_wqe_size(1) as u64 * (tail & (self.rq_n - 1)) as u64;
        write_obj(
            at,
            &abi::RqWqeHdr {
                wr_id,
                num_sge: 1,
                total_len: 0,
            },
        );
        write_obj(
            at + 16,
            &abi::Sge {
                addr,
                length: len,
                lkey,
            },
        );
        compiler_fence(Ordering::Release);
        write_u32(self.hdr + 8, abi::idx_inc(tail, self.rq_n));
        mmio_write32(
            self.uar + abi::PVRDMA_UAR_QP_OFFSET,
            self.qpn | abi::PVRDMA_UAR_QP_RECV,
        );
        true
    }

    /// The QP's ring header page (hostile tests scribble on it).
    pub fn header_page(&self) -> u64 {
        self.hdr
    }
}

/// The PVRDMA function.
pub struct Device {
    regs: u64,
    uar: u64,
    cmd: u64,
    resp: u64,
}

/// Result of a command: the response slot address, or the device's errno.
pub type CmdResult = Result<u64, u8>;

impl Device {
    /// Finds the device on the PCI bus and activates it.
    pub fn open() -> Option<Device> {
        let mut found = None;
        pci::enumerate(|f| {
            if f.vendor == abi::PCI_VENDOR_ID_VMWARE && f.device == abi::PCI_DEVICE_ID_VMWARE_PVRDMA
            {
                found = Some(f);
            }
        });
        let f = found?;
        let bar = |i: u8| pci::config_read(0, f.dev, f.func, 0x10 + 4 * i);
        let regs = (bar(1) & !0xf) as u64;
        let uar = (bar(2) & !0xf) as u64 | (bar(3) as u64) << 32;
        if mmio_read32(regs + abi::PVRDMA_REG_VERSION) < abi::PVRDMA_ROCEV2_VERSION {
            return None;
        }
        let dsr = alloc_pages(1);
        let cmd = alloc_pages(1);
        let resp = alloc_pages(1);
        let (async_dir, _) = pdir(2);
        let (cq_dir, _) = pdir(2);
        let d = abi::DeviceSharedRegion {
            driver_version: abi::PVRDMA_VERSION,
            gos_info: abi::GosInfo { bits: 2, pad: 0 },
            cmd_slot_dma: cmd,
            resp_slot_dma: resp,
            async_ring_pages: abi::RingPageInfo {
                num_pages: 2,
                reserved: 0,
                pdir_dma: async_dir,
            },
            cq_ring_pages: abi::RingPageInfo {
                num_pages: 2,
                reserved: 0,
                pdir_dma: cq_dir,
            },
            uar_pfn: (uar / PAGE) as u32,
            ..Default::default()
        };
        write_obj(dsr, &d);
        mmio_write32(regs + abi::PVRDMA_REG_DSRLOW, dsr as u32);
        mmio_write32(regs + abi::PVRDMA_REG_DSRHIGH, (dsr >> 32) as u32);
        mmio_write32(regs + abi::PVRDMA_REG_CTL, abi::PVRDMA_DEVICE_CTL_ACTIVATE);
        if mmio_read32(regs + abi::PVRDMA_REG_ERR) != 0 {
            return None;
        }
        Some(Device {
            regs,
            uar,
            cmd,
            resp,
        })
    }

    /// The idle wait (one VM exit): the device first sends what was posted, then returns
    /// once a completion queue holds entries or after at most 5 ms, leaving the CPU to the
    /// host meanwhile. For when polling has found nothing for a while, or right after
    /// posting sends the guest then waits on: never per work request.
    pub fn idle_wait(&self) -> u32 {
        mmio_read32(self.regs + abi::FERRY_REG_IDLE_WAIT)
    }

    /// Send now (one VM exit): the device sends everything posted before the read returns;
    /// 1 if a completion queue holds entries. Never blocks.
    pub fn send_now(&self) -> u32 {
        mmio_read32(self.regs + abi::FERRY_REG_SEND_NOW)
    }

    /// Writes raw bytes into the command slot and rings the request register; returns ERR.
    pub fn raw_command(&self, bytes: &[u8]) -> u32 {
        write_bytes(self.cmd, bytes);
        compiler_fence(Ordering::SeqCst);
        mmio_write32(self.regs + abi::PVRDMA_REG_REQUEST, 0);
        mmio_read32(self.regs + abi::PVRDMA_REG_ERR)
    }

    /// Executes a command.
    pub fn command<C: IntoBytes + Immutable>(&self, c: &C) -> CmdResult {
        match self.raw_command(c.as_bytes()) {
            0 => Ok(self.resp),
            e => Err(e as u8),
        }
    }

    fn hdr(cmd: u32) -> abi::CmdHdr {
        abi::CmdHdr {
            response: cmd as u64,
            cmd,
            reserved: 0,
        }
    }

    /// CREATE_PD.
    pub fn create_pd(&self) -> Result<u32, u8> {
        let r = self.command(&abi::CmdCreatePd {
            hdr: Self::hdr(cmd_code::CREATE_PD),
            ..Default::default()
        })?;
        Ok(read_obj::<abi::RespCreatePd>(r).pd_handle)
    }

    /// A DMA memory region over all of guest memory (lkey; addresses are guest-physical).
    pub fn dma_mr(&self, pd: u32) -> Result<u32, u8> {
        let r = self.command(&abi::CmdCreateMr {
            hdr: Self::hdr(cmd_code::CREATE_MR),
            length: u64::MAX,
            pd_handle: pd,
            access_flags: 1,
            flags: abi::PVRDMA_MR_FLAG_DMA,
            ..Default::default()
        })?;
        Ok(read_obj::<abi::RespCreateMr>(r).lkey)
    }

    /// A CQ of 64 entries.
    pub fn create_cq(&self) -> Result<Cq, u8> {
        let (dir, pages) = pdir(2);
        let r = self.command(&abi::CmdCreateCq {
            hdr: Self::hdr(cmd_code::CREATE_CQ),
            pdir_dma: dir,
            cqe: 64,
            nchunks: 2,
            ..Default::default()
        })?;
        Ok(Cq {
            handle: read_obj::<abi::RespCreateCq>(r).cq_handle,
            n: 64,
            ring: pages,
            cqes: pages + PAGE,
        })
    }

    /// A QP of `qp_type` (GSI or UD) with `SQ_WQES`/`RQ_WQES` one-SGE slots, moved to RTS.
    pub fn create_qp(&self, pd: u32, scq: &Cq, rcq: &Cq, qp_type: u8) -> Result<Qp, u8> {
        let qp = self.create_qp_sized(pd, scq, rcq, qp_type, SQ_WQES, RQ_WQES)?;
        self.datagram_rts(&qp, qp_type)?;
        Ok(qp)
    }

    /// Moves a GSI or UD QP of `qp_type` from RESET to RTS (with its Q_Key).
    pub fn datagram_rts(&self, qp: &Qp, qp_type: u8) -> Result<(), u8> {
        let qkey = if qp_type == abi::qp_type::GSI {
            0x8001_0000
        } else {
            0x0123_4567
        };
        for state in [abi::qp_state::INIT, abi::qp_state::RTR, abi::qp_state::RTS] {
            self.modify_qp(qp.qpn, state, qkey)?;
        }
        Ok(())
    }

    /// A QP of `qp_type` with `sq_wqes` send and `rq_wqes` receive slots of one SGE (powers
    /// of two, at most 1024), left in RESET.
    pub fn create_qp_sized(
        &self,
        pd: u32,
        scq: &Cq,
        rcq: &Cq,
        qp_type: u8,
        sq_wqes: u32,
        rq_wqes: u32,
    ) -> Result<Qp, u8> {
        let sq_pages = (sq_wqes as u64 * abi::sq_wqe_size(1) as u64).div_ceil(PAGE);
        let rq_pages = (rq_wqes as u64 * abi::rq_wqe_size(1) as u64).div_ceil(PAGE);
        let total = 1 + sq_pages + rq_pages;
        let (dir, pages) = pdir(total);
        let r = self.command(&abi::CmdCreateQp {
            hdr: Self::hdr(cmd_code::CREATE_QP),
            pdir_dma: dir,
            pd_handle: pd,
            send_cq_handle: scq.handle,
            recv_cq_handle: rcq.handle,
            max_send_wr: sq_wqes,
            max_recv_wr: rq_wqes,
            max_send_sge: 1,
            max_recv_sge: 1,
            total_chunks: total as u16,
            send_chunks: sq_pages as u16,
            qp_type,
            ..Default::default()
        })?;
        let qpn = read_obj::<abi::RespCreateQp>(r).qpn;
        Ok(Qp {
            qpn,
            hdr: pages,
            sq: pages + PAGE,
            rq: pages + (1 + sq_pages) * PAGE,
            uar: self.uar,
            sq_n: sq_wqes,
            rq_n: rq_wqes,
        })
    }

    /// MODIFY_QP to `state` (with the Q_Key on INIT).
    pub fn modify_qp(&self, qpn: u32, state: u32, qkey: u32) -> Result<(), u8> {
        let mut mask = abi::qp_attr_mask::STATE;
        if state == abi::qp_state::INIT {
            mask |= abi::qp_attr_mask::QKEY;
        }
        self.command(&abi::CmdModifyQp {
            hdr: Self::hdr(cmd_code::MODIFY_QP),
            qp_handle: qpn,
            attr_mask: mask,
            attrs: abi::QpAttr {
                qp_state: state,
                qkey,
                ..Default::default()
            },
        })?;
        Ok(())
    }

    /// QUERY_QP: the QP's state.
    pub fn qp_state(&self, qpn: u32) -> Result<u32, u8> {
        let r = self.command(&abi::CmdQueryQp {
            hdr: Self::hdr(cmd_code::QUERY_QP),
            qp_handle: qpn,
            attr_mask: 0,
        })?;
        Ok(read_obj::<abi::RespQueryQp>(r).attrs.qp_state)
    }

    /// DESTROY_QP.
    pub fn destroy_qp(&self, qpn: u32) -> Result<(), u8> {
        self.command(&abi::CmdDestroyQp {
            hdr: Self::hdr(cmd_code::DESTROY_QP),
            qp_handle: qpn,
            ..Default::default()
        })?;
        Ok(())
    }

    /// CREATE_BIND: adds `gid` at `index` of the GID table (registers it with the host).
    pub fn bind(&self, index: u32, gid: [u8; 16]) -> Result<(), u8> {
        self.command(&abi::CmdCreateBind {
            hdr: Self::hdr(cmd_code::CREATE_BIND),
            mtu: 1024,
            index,
            new_gid: gid,
            gid_type: 1,
            ..Default::default()
        })?;
        Ok(())
    }

    /// DESTROY_BIND.
    pub fn unbind(&self, index: u32, gid: [u8; 16]) -> Result<(), u8> {
        self.command(&abi::CmdDestroyBind {
            hdr: Self::hdr(cmd_code::DESTROY_BIND),
            index,
            dest_gid: gid,
            ..Default::default()
        })?;
        Ok(())
    }
}

//! Work requests, scatter-gather entries, address vectors, completions
//! (`include/uapi/rdma/vmw_pvrdma-abi.h`).
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

/// Address vector (`pvrdma_av`, 40 bytes).
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct Av {
    pub port_pd: u32,
    pub sl_tclass_flowlabel: u32,
    pub dgid: [u8; 16],
    pub src_path_bits: u8,
    pub gid_index: u8,
    pub stat_rate: u8,
    pub hop_limit: u8,
    pub dmac: [u8; 6],
    pub reserved: [u8; 6],
}

/// Scatter-gather entry (`pvrdma_sge`, 16 bytes).
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct Sge {
    pub addr: u64,
    pub length: u32,
    pub lkey: u32,
}

/// Receive WQE header (`pvrdma_rq_wqe_hdr`, 16 bytes), followed by `num_sge` [`Sge`]s.
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct RqWqeHdr {
    pub wr_id: u64,
    pub num_sge: u32,
    pub total_len: u32,
}

/// Send WQE header (`pvrdma_sq_wqe_hdr`, 80 bytes), followed by `num_sge` [`Sge`]s. The
/// 48-byte `wr` union is given in its UD view (the only one Ferry's device executes); the
/// other views (rdma, atomic, fast_reg) overlay the same bytes.
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct SqWqeHdr {
    pub wr_id: u64,
    pub num_sge: u32,
    pub total_len: u32,
    pub opcode: u32,
    pub send_flags: u32,
    /// `ex.imm_data` / `ex.invalidate_rkey`.
    pub ex: u32,
    pub reserved: u32,
    /// `wr.ud.remote_qpn`.
    pub ud_remote_qpn: u32,
    /// `wr.ud.remote_qkey`.
    pub ud_remote_qkey: u32,
    /// `wr.ud.av`.
    pub ud_av: Av,
}

impl SqWqeHdr {
    /// `wr.rdma.remote_addr` (RC RDMA WRITE/READ view of the union: the bytes of the UD
    /// view's `remote_qpn` and `remote_qkey`).
    pub const fn rdma_remote_addr(&self) -> u64 {
        (self.ud_remote_qkey as u64) << 32 | self.ud_remote_qpn as u64
    }

    /// `wr.rdma.rkey` (the bytes of the UD view's `av.port_pd`).
    pub const fn rdma_rkey(&self) -> u32 {
        self.ud_av.port_pd
    }

    /// Sets the RDMA view (`wr.rdma.remote_addr`, `wr.rdma.rkey`).
    pub fn set_rdma(&mut self, remote_addr: u64, rkey: u32) {
        self.ud_remote_qpn = remote_addr as u32;
        self.ud_remote_qkey = (remote_addr >> 32) as u32;
        self.ud_av.port_pd = rkey;
    }
}

/// Completion queue element (`pvrdma_cqe`, 64 bytes).
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct Cqe {
    pub wr_id: u64,
    /// QP handle (the device writes the QP's handle; Linux looks the QP up by it).
    pub qp: u64,
    pub opcode: u32,
    pub status: u32,
    pub byte_len: u32,
    pub imm_data: u32,
    pub src_qp: u32,
    pub wc_flags: u32,
    pub vendor_err: u32,
    pub pkey_index: u16,
    pub slid: u16,
    pub sl: u8,
    pub dlid_path_bits: u8,
    pub port_num: u8,
    pub smac: [u8; 6],
    pub reserved2: [u8; 7],
}

/// Size of the GRH area at the start of UD/GSI receive buffers.
pub const GRH_AREA: usize = 40;

/// Bytes of one send WQE slot: header plus `max_sge` SGEs, rounded up to a power of two (as
/// Linux's driver lays the queue out).
pub const fn sq_wqe_size(max_sge: u32) -> u32 {
    let n = core::mem::size_of::<SqWqeHdr>() as u32 + 16 * max_sge;
    n.next_power_of_two()
}

/// Bytes of one receive WQE slot.
pub const fn rq_wqe_size(max_sge: u32) -> u32 {
    let n = core::mem::size_of::<RqWqeHdr>() as u32 + 16 * max_sge;
    n.next_power_of_two()
}

//! Commands and responses (`pvrdma_dev_api.h`): the guest writes one command into the
//! command slot and writes `PVRDMA_REG_REQUEST`; the device answers in the response slot.
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

use crate::verbs::{PortAttr, QpAttr};

/// Size of the command and response slots (one page each).
pub const SLOT_SIZE: usize = 4096;

/// Command header (`pvrdma_cmd_hdr`).
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct CmdHdr {
    pub response: u64,
    pub cmd: u32,
    pub reserved: u32,
}

/// Response header (`pvrdma_cmd_resp_hdr`).
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct RespHdr {
    pub response: u64,
    pub ack: u32,
    pub err: u8,
    pub reserved: [u8; 3],
}

/// `pvrdma_cmd_query_port`.
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct CmdQueryPort {
    pub hdr: CmdHdr,
    pub port_num: u8,
    pub reserved: [u8; 7],
}

/// `pvrdma_cmd_query_port_resp`.
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct RespQueryPort {
    pub hdr: RespHdr,
    pub attrs: PortAttr,
}

/// `pvrdma_cmd_query_pkey`.
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct CmdQueryPkey {
    pub hdr: CmdHdr,
    pub port_num: u8,
    pub index: u8,
    pub reserved: [u8; 6],
}

/// `pvrdma_cmd_query_pkey_resp`.
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct RespQueryPkey {
    pub hdr: RespHdr,
    pub pkey: u16,
    pub reserved: [u8; 6],
}

/// `pvrdma_cmd_create_uc`.
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct CmdCreateUc {
    pub hdr: CmdHdr,
    pub pfn: u32,
    pub reserved: [u8; 4],
}

/// `pvrdma_cmd_create_uc_resp`.
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct RespCreateUc {
    pub hdr: RespHdr,
    pub ctx_handle: u32,
    pub reserved: [u8; 4],
}

/// `pvrdma_cmd_destroy_uc`.
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct CmdDestroyUc {
    pub hdr: CmdHdr,
    pub ctx_handle: u32,
    pub reserved: [u8; 4],
}

/// `pvrdma_cmd_create_pd`.
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct CmdCreatePd {
    pub hdr: CmdHdr,
    pub ctx_handle: u32,
    pub reserved: [u8; 4],
}

/// `pvrdma_cmd_create_pd_resp`.
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct RespCreatePd {
    pub hdr: RespHdr,
    pub pd_handle: u32,
    pub reserved: [u8; 4],
}

/// `pvrdma_cmd_destroy_pd`.
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct CmdDestroyPd {
    pub hdr: CmdHdr,
    pub pd_handle: u32,
    pub reserved: [u8; 4],
}

/// `pvrdma_cmd_create_mr`.
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct CmdCreateMr {
    pub hdr: CmdHdr,
    pub start: u64,
    pub length: u64,
    pub pdir_dma: u64,
    pub pd_handle: u32,
    pub access_flags: u32,
    pub flags: u32,
    pub nchunks: u32,
}

/// `pvrdma_cmd_create_mr_resp`.
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct RespCreateMr {
    pub hdr: RespHdr,
    pub mr_handle: u32,
    pub lkey: u32,
    pub rkey: u32,
    pub reserved: [u8; 4],
}

/// `pvrdma_cmd_destroy_mr`.
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct CmdDestroyMr {
    pub hdr: CmdHdr,
    pub mr_handle: u32,
    pub reserved: [u8; 4],
}

/// `pvrdma_cmd_create_cq`.
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct CmdCreateCq {
    pub hdr: CmdHdr,
    pub pdir_dma: u64,
    pub ctx_handle: u32,
    pub cqe: u32,
    pub nchunks: u32,
    pub reserved: [u8; 4],
}

/// `pvrdma_cmd_create_cq_resp`.
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct RespCreateCq {
    pub hdr: RespHdr,
    pub cq_handle: u32,
    pub cqe: u32,
}

/// `pvrdma_cmd_resize_cq`.
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct CmdResizeCq {
    pub hdr: CmdHdr,
    pub cq_handle: u32,
    pub cqe: u32,
}

/// `pvrdma_cmd_resize_cq_resp`.
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct RespResizeCq {
    pub hdr: RespHdr,
    pub cqe: u32,
    pub reserved: [u8; 4],
}

/// `pvrdma_cmd_destroy_cq`.
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct CmdDestroyCq {
    pub hdr: CmdHdr,
    pub cq_handle: u32,
    pub reserved: [u8; 4],
}

/// `pvrdma_cmd_create_qp`.
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct CmdCreateQp {
    pub hdr: CmdHdr,
    pub pdir_dma: u64,
    pub pd_handle: u32,
    pub send_cq_handle: u32,
    pub recv_cq_handle: u32,
    pub srq_handle: u32,
    pub max_send_wr: u32,
    pub max_recv_wr: u32,
    pub max_send_sge: u32,
    pub max_recv_sge: u32,
    pub max_inline_data: u32,
    pub lkey: u32,
    pub access_flags: u32,
    pub total_chunks: u16,
    pub send_chunks: u16,
    pub max_atomic_arg: u16,
    pub sq_sig_all: u8,
    pub qp_type: u8,
    pub is_srq: u8,
    pub reserved: [u8; 3],
}

/// `pvrdma_cmd_create_qp_resp`.
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct RespCreateQp {
    pub hdr: RespHdr,
    pub qpn: u32,
    pub max_send_wr: u32,
    pub max_recv_wr: u32,
    pub max_send_sge: u32,
    pub max_recv_sge: u32,
    pub max_inline_data: u32,
}

/// `pvrdma_cmd_modify_qp`.
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct CmdModifyQp {
    pub hdr: CmdHdr,
    pub qp_handle: u32,
    pub attr_mask: u32,
    pub attrs: QpAttr,
}

/// `pvrdma_cmd_query_qp`.
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct CmdQueryQp {
    pub hdr: CmdHdr,
    pub qp_handle: u32,
    pub attr_mask: u32,
}

/// `pvrdma_cmd_query_qp_resp`.
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct RespQueryQp {
    pub hdr: RespHdr,
    pub attrs: QpAttr,
}

/// `pvrdma_cmd_destroy_qp`.
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct CmdDestroyQp {
    pub hdr: CmdHdr,
    pub qp_handle: u32,
    pub reserved: [u8; 4],
}

/// `pvrdma_cmd_destroy_qp_resp`.
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct RespDestroyQp {
    pub hdr: RespHdr,
    pub events_reported: u32,
    pub reserved: [u8; 4],
}

/// `pvrdma_cmd_create_bind`.
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct CmdCreateBind {
    pub hdr: CmdHdr,
    pub mtu: u32,
    pub vlan: u32,
    pub index: u32,
    pub new_gid: [u8; 16],
    pub gid_type: u8,
    pub reserved: [u8; 3],
}

/// `pvrdma_cmd_destroy_bind`.
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct CmdDestroyBind {
    pub hdr: CmdHdr,
    pub index: u32,
    pub dest_gid: [u8; 16],
    pub reserved: [u8; 4],
}

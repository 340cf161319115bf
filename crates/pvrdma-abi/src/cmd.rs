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
    /// The guest's cookie, echoed in the response.
    pub response: u64,
    /// The command code (`PVRDMA_CMD_*`).
    pub cmd: u32,
    /// Reserved; zero.
    pub reserved: u32,
}

/// Response header (`pvrdma_cmd_resp_hdr`).
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct RespHdr {
    /// The guest's cookie, echoed in the response.
    pub response: u64,
    /// The response code (`PVRDMA_CMD_*_RESP`).
    pub ack: u32,
    /// Error status (0: success).
    pub err: u8,
    /// Reserved; zero.
    pub reserved: [u8; 3],
}

/// `pvrdma_cmd_query_port`.
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct CmdQueryPort {
    /// The common header.
    pub hdr: CmdHdr,
    /// The port number (1-based).
    pub port_num: u8,
    /// Reserved; zero.
    pub reserved: [u8; 7],
}

/// `pvrdma_cmd_query_port_resp`.
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct RespQueryPort {
    /// The common header.
    pub hdr: RespHdr,
    /// The attributes.
    pub attrs: PortAttr,
}

/// `pvrdma_cmd_query_pkey`.
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct CmdQueryPkey {
    /// The common header.
    pub hdr: CmdHdr,
    /// The port number (1-based).
    pub port_num: u8,
    /// The table index.
    pub index: u8,
    /// Reserved; zero.
    pub reserved: [u8; 6],
}

/// `pvrdma_cmd_query_pkey_resp`.
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct RespQueryPkey {
    /// The common header.
    pub hdr: RespHdr,
    /// P_Key.
    pub pkey: u16,
    /// Reserved; zero.
    pub reserved: [u8; 6],
}

/// `pvrdma_cmd_create_uc`.
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct CmdCreateUc {
    /// The common header.
    pub hdr: CmdHdr,
    /// Page frame number.
    pub pfn: u32,
    /// Reserved; zero.
    pub reserved: [u8; 4],
}

/// `pvrdma_cmd_create_uc_resp`.
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct RespCreateUc {
    /// The common header.
    pub hdr: RespHdr,
    /// Handle of the user context.
    pub ctx_handle: u32,
    /// Reserved; zero.
    pub reserved: [u8; 4],
}

/// `pvrdma_cmd_destroy_uc`.
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct CmdDestroyUc {
    /// The common header.
    pub hdr: CmdHdr,
    /// Handle of the user context.
    pub ctx_handle: u32,
    /// Reserved; zero.
    pub reserved: [u8; 4],
}

/// `pvrdma_cmd_create_pd`.
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct CmdCreatePd {
    /// The common header.
    pub hdr: CmdHdr,
    /// Handle of the user context.
    pub ctx_handle: u32,
    /// Reserved; zero.
    pub reserved: [u8; 4],
}

/// `pvrdma_cmd_create_pd_resp`.
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct RespCreatePd {
    /// The common header.
    pub hdr: RespHdr,
    /// Handle of the protection domain.
    pub pd_handle: u32,
    /// Reserved; zero.
    pub reserved: [u8; 4],
}

/// `pvrdma_cmd_destroy_pd`.
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct CmdDestroyPd {
    /// The common header.
    pub hdr: CmdHdr,
    /// Handle of the protection domain.
    pub pd_handle: u32,
    /// Reserved; zero.
    pub reserved: [u8; 4],
}

/// `pvrdma_cmd_create_mr`.
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct CmdCreateMr {
    /// The common header.
    pub hdr: CmdHdr,
    /// Start address (guest virtual).
    pub start: u64,
    /// Length in bytes.
    pub length: u64,
    /// Guest-physical address of the page directory that lists the pages.
    pub pdir_dma: u64,
    /// Handle of the protection domain.
    pub pd_handle: u32,
    /// Access flags (`PVRDMA_ACCESS_*`).
    pub access_flags: u32,
    /// Flags.
    pub flags: u32,
    /// Number of pages listed by the page directory.
    pub nchunks: u32,
}

/// `pvrdma_cmd_create_mr_resp`.
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct RespCreateMr {
    /// The common header.
    pub hdr: RespHdr,
    /// Handle of the memory region.
    pub mr_handle: u32,
    /// Local key of the memory region.
    pub lkey: u32,
    /// Remote key of the memory region.
    pub rkey: u32,
    /// Reserved; zero.
    pub reserved: [u8; 4],
}

/// `pvrdma_cmd_destroy_mr`.
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct CmdDestroyMr {
    /// The common header.
    pub hdr: CmdHdr,
    /// Handle of the memory region.
    pub mr_handle: u32,
    /// Reserved; zero.
    pub reserved: [u8; 4],
}

/// `pvrdma_cmd_create_cq`.
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct CmdCreateCq {
    /// The common header.
    pub hdr: CmdHdr,
    /// Guest-physical address of the page directory that lists the pages.
    pub pdir_dma: u64,
    /// Handle of the user context.
    pub ctx_handle: u32,
    /// Number of completion queue entries.
    pub cqe: u32,
    /// Number of pages listed by the page directory.
    pub nchunks: u32,
    /// Reserved; zero.
    pub reserved: [u8; 4],
}

/// `pvrdma_cmd_create_cq_resp`.
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct RespCreateCq {
    /// The common header.
    pub hdr: RespHdr,
    /// Handle of the completion queue.
    pub cq_handle: u32,
    /// Number of completion queue entries.
    pub cqe: u32,
}

/// `pvrdma_cmd_resize_cq`.
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct CmdResizeCq {
    /// The common header.
    pub hdr: CmdHdr,
    /// Handle of the completion queue.
    pub cq_handle: u32,
    /// Number of completion queue entries.
    pub cqe: u32,
}

/// `pvrdma_cmd_resize_cq_resp`.
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct RespResizeCq {
    /// The common header.
    pub hdr: RespHdr,
    /// Number of completion queue entries.
    pub cqe: u32,
    /// Reserved; zero.
    pub reserved: [u8; 4],
}

/// `pvrdma_cmd_destroy_cq`.
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct CmdDestroyCq {
    /// The common header.
    pub hdr: CmdHdr,
    /// Handle of the completion queue.
    pub cq_handle: u32,
    /// Reserved; zero.
    pub reserved: [u8; 4],
}

/// `pvrdma_cmd_create_qp`.
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct CmdCreateQp {
    /// The common header.
    pub hdr: CmdHdr,
    /// Guest-physical address of the page directory that lists the pages.
    pub pdir_dma: u64,
    /// Handle of the protection domain.
    pub pd_handle: u32,
    /// Handle of the send completion queue.
    pub send_cq_handle: u32,
    /// Handle of the receive completion queue.
    pub recv_cq_handle: u32,
    /// Handle of the shared receive queue.
    pub srq_handle: u32,
    /// Maximum send work requests.
    pub max_send_wr: u32,
    /// Maximum receive work requests.
    pub max_recv_wr: u32,
    /// Maximum send scatter/gather entries.
    pub max_send_sge: u32,
    /// Maximum receive scatter/gather entries.
    pub max_recv_sge: u32,
    /// Maximum inline data.
    pub max_inline_data: u32,
    /// Local key of the memory region.
    pub lkey: u32,
    /// Access flags (`PVRDMA_ACCESS_*`).
    pub access_flags: u32,
    /// Pages in the page directory.
    pub total_chunks: u16,
    /// Pages of the send queue in the page directory.
    pub send_chunks: u16,
    /// Largest atomic argument.
    pub max_atomic_arg: u16,
    /// Non-zero: every send is signalled.
    pub sq_sig_all: u8,
    /// Queue pair type (`PVRDMA_QPT_*`).
    pub qp_type: u8,
    /// Non-zero when the QP uses a shared receive queue.
    pub is_srq: u8,
    /// Reserved; zero.
    pub reserved: [u8; 3],
}

/// `pvrdma_cmd_create_qp_resp`.
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct RespCreateQp {
    /// The common header.
    pub hdr: RespHdr,
    /// Queue pair number.
    pub qpn: u32,
    /// Maximum send work requests.
    pub max_send_wr: u32,
    /// Maximum receive work requests.
    pub max_recv_wr: u32,
    /// Maximum send scatter/gather entries.
    pub max_send_sge: u32,
    /// Maximum receive scatter/gather entries.
    pub max_recv_sge: u32,
    /// Maximum inline data.
    pub max_inline_data: u32,
}

/// `pvrdma_cmd_modify_qp`.
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct CmdModifyQp {
    /// The common header.
    pub hdr: CmdHdr,
    /// Handle of the queue pair.
    pub qp_handle: u32,
    /// Which attributes are set (`PVRDMA_QP_*` mask bits).
    pub attr_mask: u32,
    /// The attributes.
    pub attrs: QpAttr,
}

/// `pvrdma_cmd_query_qp`.
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct CmdQueryQp {
    /// The common header.
    pub hdr: CmdHdr,
    /// Handle of the queue pair.
    pub qp_handle: u32,
    /// Which attributes are set (`PVRDMA_QP_*` mask bits).
    pub attr_mask: u32,
}

/// `pvrdma_cmd_query_qp_resp`.
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct RespQueryQp {
    /// The common header.
    pub hdr: RespHdr,
    /// The attributes.
    pub attrs: QpAttr,
}

/// `pvrdma_cmd_destroy_qp`.
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct CmdDestroyQp {
    /// The common header.
    pub hdr: CmdHdr,
    /// Handle of the queue pair.
    pub qp_handle: u32,
    /// Reserved; zero.
    pub reserved: [u8; 4],
}

/// `pvrdma_cmd_destroy_qp_resp`.
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct RespDestroyQp {
    /// The common header.
    pub hdr: RespHdr,
    /// Asynchronous events reported.
    pub events_reported: u32,
    /// Reserved; zero.
    pub reserved: [u8; 4],
}

/// `pvrdma_cmd_create_bind`.
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct CmdCreateBind {
    /// The common header.
    pub hdr: CmdHdr,
    /// MTU (`PVRDMA_MTU_*`).
    pub mtu: u32,
    /// VLAN tag.
    pub vlan: u32,
    /// The table index.
    pub index: u32,
    /// The GID to bind.
    pub new_gid: [u8; 16],
    /// GID type (`PVRDMA_GID_TYPE_*`).
    pub gid_type: u8,
    /// Reserved; zero.
    pub reserved: [u8; 3],
}

/// `pvrdma_cmd_destroy_bind`.
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct CmdDestroyBind {
    /// The common header.
    pub hdr: CmdHdr,
    /// The table index.
    pub index: u32,
    /// Destination GID.
    pub dest_gid: [u8; 16],
    /// Reserved; zero.
    pub reserved: [u8; 4],
}

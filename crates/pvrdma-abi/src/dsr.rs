//! The device shared region (`pvrdma_device_shared_region`) and device capabilities.
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

/// Guest OS information (`pvrdma_gos_info`: a 32-bit bit field word, then padding).
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct GosInfo {
    /// gos_bits:2, gos_type:4, gos_ver:16, gos_misc:10 (from the least significant bit).
    pub bits: u32,
    /// Padding; zero.
    pub pad: u32,
}

/// Device capabilities (`pvrdma_device_caps`, 208 bytes).
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct DeviceCaps {
    /// Firmware version.
    pub fw_ver: u64,
    /// Big-endian.
    pub node_guid: u64,
    /// Big-endian.
    pub sys_image_guid: u64,
    /// Maximum memory regions size.
    pub max_mr_size: u64,
    /// Supported page sizes (bit mask).
    pub page_size_cap: u64,
    /// Atomic argument sizes supported.
    pub atomic_arg_sizes: u64,
    /// Extended comp mask.
    pub ex_comp_mask: u32,
    /// More device capability flags.
    pub device_cap_flags2: u32,
    /// Fetch-and-add bit boundary.
    pub max_fa_bit_boundary: u32,
    /// Log2 of the largest inline atomic argument.
    pub log_max_atomic_inline_arg: u32,
    /// Vendor ID.
    pub vendor_id: u32,
    /// Vendor part ID.
    pub vendor_part_id: u32,
    /// Hardware version.
    pub hw_ver: u32,
    /// Maximum queue pairs.
    pub max_qp: u32,
    /// Maximum queue pairs work requests.
    pub max_qp_wr: u32,
    /// Device capability flags.
    pub device_cap_flags: u32,
    /// Maximum scatter/gather entries.
    pub max_sge: u32,
    /// Maximum scatter/gather entries RDMA read.
    pub max_sge_rd: u32,
    /// Maximum completion queues.
    pub max_cq: u32,
    /// Maximum completion queue entries.
    pub max_cqe: u32,
    /// Maximum memory regions.
    pub max_mr: u32,
    /// Maximum protection domains.
    pub max_pd: u32,
    /// Maximum queue pairs RDMA read atomic resources.
    pub max_qp_rd_atom: u32,
    /// Maximum EE contexts RDMA read atomic resources.
    pub max_ee_rd_atom: u32,
    /// Maximum responder RDMA read atomic resources.
    pub max_res_rd_atom: u32,
    /// Maximum queue pairs initiator RDMA read atomic resources.
    pub max_qp_init_rd_atom: u32,
    /// Maximum EE contexts initiator RDMA read atomic resources.
    pub max_ee_init_rd_atom: u32,
    /// Maximum EE contexts.
    pub max_ee: u32,
    /// Maximum RD domains.
    pub max_rdd: u32,
    /// Maximum memory windows.
    pub max_mw: u32,
    /// Maximum raw IPv6 queue pairs.
    pub max_raw_ipv6_qp: u32,
    /// Maximum raw Ethernet queue pairs.
    pub max_raw_ethy_qp: u32,
    /// Maximum multicast groups.
    pub max_mcast_grp: u32,
    /// Maximum multicast queue pairs attachments.
    pub max_mcast_qp_attach: u32,
    /// Maximum total multicast queue pairs attachments.
    pub max_total_mcast_qp_attach: u32,
    /// Maximum address handles.
    pub max_ah: u32,
    /// Maximum fast memory regions.
    pub max_fmr: u32,
    /// Maximum maps per fast memory regions.
    pub max_map_per_fmr: u32,
    /// Maximum shared receive queues.
    pub max_srq: u32,
    /// Maximum shared receive queues work requests.
    pub max_srq_wr: u32,
    /// Maximum shared receive queues scatter/gather entries.
    pub max_srq_sge: u32,
    /// Number of UAR pages.
    pub max_uar: u32,
    /// Entries in the GID table.
    pub gid_tbl_len: u32,
    /// Maximum P_Keys.
    pub max_pkeys: u16,
    /// Local CA ACK delay.
    pub local_ca_ack_delay: u8,
    /// Number of physical ports.
    pub phys_port_cnt: u8,
    /// Mode.
    pub mode: u8,
    /// Atomic operations supported.
    pub atomic_ops: u8,
    /// Base memory management extension flags.
    pub bmme_flags: u8,
    /// Supported GID types (bit mask).
    pub gid_types: u8,
    /// Reserved; zero.
    pub reserved: [u8; 4],
}

/// Pages of a device ring (`pvrdma_ring_page_info`, 16 bytes).
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct RingPageInfo {
    /// Pages including the header page.
    pub num_pages: u32,
    /// Reserved; zero.
    pub reserved: u32,
    /// Guest-physical address of the page directory.
    pub pdir_dma: u64,
}

/// The device shared region (`pvrdma_device_shared_region`, packed in C, 280 bytes; every
/// field is naturally aligned, so `repr(C)` gives the same layout).
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct DeviceSharedRegion {
    /// W: driver version.
    pub driver_version: u32,
    /// Padding; zero.
    pub pad: u32,
    /// W: guest OS information.
    pub gos_info: GosInfo,
    /// W: command slot (one page).
    pub cmd_slot_dma: u64,
    /// W: response slot (one page).
    pub resp_slot_dma: u64,
    /// W: async event ring.
    pub async_ring_pages: RingPageInfo,
    /// W: CQ notification ring.
    pub cq_ring_pages: RingPageInfo,
    /// W: UAR page frame.
    pub uar_pfn: u32,
    /// Padding; zero.
    pub pad2: u32,
    /// R: device capabilities (written by the device on activation).
    pub caps: DeviceCaps,
}

/// Async event queue element (`pvrdma_eqe`).
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct Eqe {
    /// `event::*`.
    pub kind: u32,
    /// Handle of the object concerned.
    pub info: u32,
}

/// CQ notification element (`pvrdma_cqne`).
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct Cqne {
    /// CQ handle.
    pub info: u32,
}

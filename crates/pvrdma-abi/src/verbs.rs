//! Verbs attribute layouts (`pvrdma_verbs.h`).
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

/// Port attributes (`pvrdma_port_attr`, 48 bytes).
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct PortAttr {
    /// State.
    pub state: u32,
    /// Largest MTU supported.
    pub max_mtu: u32,
    /// Active MTU.
    pub active_mtu: u32,
    /// Entries in the GID table.
    pub gid_tbl_len: u32,
    /// Port capability flags.
    pub port_cap_flags: u32,
    /// Maximum message size.
    pub max_msg_sz: u32,
    /// Bad P_Key counter.
    pub bad_pkey_cntr: u32,
    /// Q_Key violation counter.
    pub qkey_viol_cntr: u32,
    /// Entries in the P_Key table.
    pub pkey_tbl_len: u16,
    /// LID.
    pub lid: u16,
    /// Subnet manager LID.
    pub sm_lid: u16,
    /// LID mask control.
    pub lmc: u8,
    /// Virtual lanes.
    pub max_vl_num: u8,
    /// Subnet manager service level.
    pub sm_sl: u8,
    /// Subnet timeout.
    pub subnet_timeout: u8,
    /// Init type reply.
    pub init_type_reply: u8,
    /// Active link width.
    pub active_width: u8,
    /// Active link speed.
    pub active_speed: u8,
    /// Physical port state.
    pub phys_state: u8,
    /// Reserved; zero.
    pub reserved: [u8; 2],
}

/// Global route (`pvrdma_global_route`, 24 bytes).
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct GlobalRoute {
    /// Destination GID.
    pub dgid: [u8; 16],
    /// Flow label.
    pub flow_label: u32,
    /// Source GID's index in the GID table.
    pub sgid_index: u8,
    /// Hop limit.
    pub hop_limit: u8,
    /// Traffic class.
    pub traffic_class: u8,
    /// Reserved; zero.
    pub reserved: u8,
}

/// Address handle attributes (`pvrdma_ah_attr`, 40 bytes).
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct AhAttr {
    /// Global routing header fields.
    pub grh: GlobalRoute,
    /// Destination LID.
    pub dlid: u16,
    /// VLAN ID.
    pub vlan_id: u16,
    /// Service level.
    pub sl: u8,
    /// Source path bits.
    pub src_path_bits: u8,
    /// Static rate.
    pub static_rate: u8,
    /// Address vector flags.
    pub ah_flags: u8,
    /// The port number (1-based).
    pub port_num: u8,
    /// Destination MAC address.
    pub dmac: [u8; 6],
    /// Reserved; zero.
    pub reserved: u8,
}

/// QP capabilities (`pvrdma_qp_cap`, 24 bytes).
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct QpCap {
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
    /// Reserved; zero.
    pub reserved: u32,
}

/// QP attributes (`pvrdma_qp_attr`, 160 bytes).
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct QpAttr {
    /// Queue pair state (`PVRDMA_QPS_*`).
    pub qp_state: u32,
    /// Current queue pair state.
    pub cur_qp_state: u32,
    /// Path MTU.
    pub path_mtu: u32,
    /// Path migration state.
    pub path_mig_state: u32,
    /// Q_Key.
    pub qkey: u32,
    /// Receive queue packet sequence number.
    pub rq_psn: u32,
    /// Send queue packet sequence number.
    pub sq_psn: u32,
    /// Destination queue pair number.
    pub dest_qp_num: u32,
    /// Remote access allowed on the queue pair.
    pub qp_access_flags: u32,
    /// Index in the P_Key table.
    pub pkey_index: u16,
    /// P_Key index of the alternate path.
    pub alt_pkey_index: u16,
    /// Non-zero: notify when the send queue drained.
    pub en_sqd_async_notify: u8,
    /// Non-zero while the send queue drains.
    pub sq_draining: u8,
    /// Outstanding RDMA reads/atomics as initiator.
    pub max_rd_atomic: u8,
    /// Outstanding RDMA reads/atomics as target.
    pub max_dest_rd_atomic: u8,
    /// Minimum RNR NAK timer.
    pub min_rnr_timer: u8,
    /// The port number (1-based).
    pub port_num: u8,
    /// Local ACK timeout (4.096 us * 2^timeout).
    pub timeout: u8,
    /// Transport retries.
    pub retry_cnt: u8,
    /// RNR retries.
    pub rnr_retry: u8,
    /// Port of the alternate path.
    pub alt_port_num: u8,
    /// Local ACK timeout of the alternate path.
    pub alt_timeout: u8,
    /// Reserved; zero.
    pub reserved: [u8; 5],
    /// Queue pair capacities.
    pub cap: QpCap,
    /// Address vector (primary path).
    pub ah_attr: AhAttr,
    /// Address vector (alternate path).
    pub alt_ah_attr: AhAttr,
}

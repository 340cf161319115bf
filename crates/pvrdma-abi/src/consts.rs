//! Identity, register offsets, control codes, command codes, flags.

/// PCI vendor ID (VMware).
pub const PCI_VENDOR_ID_VMWARE: u16 = 0x15ad;
/// PCI device ID of PVRDMA.
pub const PCI_DEVICE_ID_VMWARE_PVRDMA: u16 = 0x0820;
/// PCI class: network controller, "other" (the real device reports 0x0207xx; Linux matches
/// on IDs only).
pub const PCI_CLASS_PVRDMA: u32 = 0x02_80_00;

/// Device version with RoCEv1 only.
pub const PVRDMA_ROCEV1_VERSION: u32 = 17;
/// Device version with RoCEv2.
pub const PVRDMA_ROCEV2_VERSION: u32 = 18;
/// The version Ferry's device reports.
pub const PVRDMA_VERSION: u32 = PVRDMA_ROCEV2_VERSION;

/// BAR index of the MSI-X table.
pub const PCI_RESOURCE_MSIX: usize = 0;
/// BAR index of the registers.
pub const PCI_RESOURCE_REG: usize = 1;
/// BAR index of the UAR (doorbell) pages (64-bit BAR, so it occupies BARs 2 and 3).
pub const PCI_RESOURCE_UAR: usize = 2;

/// R: device version.
pub const PVRDMA_REG_VERSION: u64 = 0x00;
/// W: device shared region address, low 32 bits.
pub const PVRDMA_REG_DSRLOW: u64 = 0x04;
/// W: device shared region address, high 32 bits.
pub const PVRDMA_REG_DSRHIGH: u64 = 0x08;
/// W: a `PVRDMA_DEVICE_CTL_*` value.
pub const PVRDMA_REG_CTL: u64 = 0x0c;
/// W: a command waits in the command slot.
pub const PVRDMA_REG_REQUEST: u64 = 0x10;
/// R: error of the last command or control operation (an errno value; 0 = success).
pub const PVRDMA_REG_ERR: u64 = 0x14;
/// R: interrupt cause.
pub const PVRDMA_REG_ICR: u64 = 0x18;
/// R/W: interrupt mask.
pub const PVRDMA_REG_IMR: u64 = 0x1c;
/// R/W: MAC address, low 32 bits.
pub const PVRDMA_REG_MACL: u64 = 0x20;
/// R/W: MAC address, high 16 bits.
pub const PVRDMA_REG_MACH: u64 = 0x24;
/// R (Ferry extension, unused by Linux): the idle wait. The device first runs the queues on
/// the exiting vCPU (what the guest posted is sent now); the read then returns at once (1)
/// if a completion queue holds unconsumed entries, else blocks the vCPU until the device
/// writes a completion (1) or at most 5 ms pass (0). A polling guest reads it after
/// it has found nothing to do for a while, or right after posting sends it then waits on
/// (one exit sends and waits), giving the CPU to the device instead of spinning; one exit
/// per idle period, never one per work request. Devices without it read 0.
pub const FERRY_REG_IDLE_WAIT: u64 = 0x40;
/// R (Ferry extension, unused by Linux): send now. The device runs the queues on the exiting
/// vCPU (everything posted is sent before the read returns) and returns 1 if a completion
/// queue holds unconsumed entries, else 0; it never blocks. Devices without it read 0.
pub const FERRY_REG_SEND_NOW: u64 = 0x44;

/// `PVRDMA_REG_CTL`: activate the device (the shared region must be set).
pub const PVRDMA_DEVICE_CTL_ACTIVATE: u32 = 0;
/// `PVRDMA_REG_CTL`: unquiesce.
pub const PVRDMA_DEVICE_CTL_UNQUIESCE: u32 = 1;
/// `PVRDMA_REG_CTL`: reset (all objects destroyed, GIDs unbound).
pub const PVRDMA_DEVICE_CTL_RESET: u32 = 2;

/// Interrupt vectors.
pub const PVRDMA_MAX_INTERRUPTS: u32 = 3;

/// Page directory: 1 directory × 512 tables × 512 pages.
pub const PVRDMA_PDIR_SHIFT: u32 = 18;
/// Bits of the page index within a table.
pub const PVRDMA_PTABLE_SHIFT: u32 = 9;
/// Most pages a page directory maps.
pub const PVRDMA_PAGE_DIR_MAX_PAGES: u32 = 512 * 512;
/// Entries in a directory or table page.
pub const PVRDMA_PDIR_ENTRIES: u32 = 512;
/// The ABI's page size.
pub const PVRDMA_PAGE_SIZE: u64 = 4096;

/// Directory index of page `x` (always 0: one directory).
pub const fn page_dir_dir(x: u32) -> u32 {
    (x >> PVRDMA_PDIR_SHIFT) & 0x1
}
/// Table index of page `x`.
pub const fn page_dir_table(x: u32) -> u32 {
    (x >> PVRDMA_PTABLE_SHIFT) & 0x1ff
}
/// Index of page `x` within its table.
pub const fn page_dir_page(x: u32) -> u32 {
    x & 0x1ff
}

/// CQ armed for solicited completions only.
pub const PVRDMA_CQ_FLAG_ARMED_SOL: u32 = 1 << 0;
/// CQ armed.
pub const PVRDMA_CQ_FLAG_ARMED: u32 = 1 << 1;
/// `create_mr.flags`: a DMA region (all of guest memory, address = guest-physical).
pub const PVRDMA_MR_FLAG_DMA: u32 = 1 << 0;
/// `create_mr.flags`: fast-register MR.
pub const PVRDMA_MR_FLAG_FRMR: u32 = 1 << 1;

/// `caps.gid_types`: RoCEv1.
pub const PVRDMA_GID_TYPE_FLAG_ROCE_V1: u8 = 1 << 0;
/// `caps.gid_types`: RoCEv2.
pub const PVRDMA_GID_TYPE_FLAG_ROCE_V2: u8 = 1 << 1;
/// `caps.mode`: RoCE.
pub const PVRDMA_DEVICE_MODE_ROCE: u8 = 0;

/// Command codes (`pvrdma_cmd_hdr.cmd`).
pub mod cmd_code {
    /// Query port attributes.
    pub const QUERY_PORT: u32 = 0;
    /// Query a P_Key.
    pub const QUERY_PKEY: u32 = 1;
    /// Create a protection domain.
    pub const CREATE_PD: u32 = 2;
    /// Destroy a protection domain.
    pub const DESTROY_PD: u32 = 3;
    /// Register a memory region.
    pub const CREATE_MR: u32 = 4;
    /// Deregister a memory region.
    pub const DESTROY_MR: u32 = 5;
    /// Create a completion queue.
    pub const CREATE_CQ: u32 = 6;
    /// Resize a completion queue.
    pub const RESIZE_CQ: u32 = 7;
    /// Destroy a completion queue.
    pub const DESTROY_CQ: u32 = 8;
    /// Create a queue pair.
    pub const CREATE_QP: u32 = 9;
    /// Modify a queue pair.
    pub const MODIFY_QP: u32 = 10;
    /// Query a queue pair.
    pub const QUERY_QP: u32 = 11;
    /// Destroy a queue pair.
    pub const DESTROY_QP: u32 = 12;
    /// Create a user context.
    pub const CREATE_UC: u32 = 13;
    /// Destroy a user context.
    pub const DESTROY_UC: u32 = 14;
    /// Add a GID to the port's table.
    pub const CREATE_BIND: u32 = 15;
    /// Remove a GID from the port's table.
    pub const DESTROY_BIND: u32 = 16;
    /// First code not defined.
    pub const MAX: u32 = 17;
}

/// Response codes (`pvrdma_cmd_resp_hdr.ack`): `1 << 31` plus the command code.
pub mod resp_code {
    /// Bit set in every response code.
    pub const FIRST: u32 = 1 << 31;
    /// The response code of command `cmd`.
    pub const fn for_cmd(cmd: u32) -> u32 {
        FIRST | cmd
    }
    /// QUERY_PORT response.
    pub const QUERY_PORT: u32 = FIRST;
    /// QUERY_PKEY response.
    pub const QUERY_PKEY: u32 = FIRST + 1;
    /// CREATE_PD response.
    pub const CREATE_PD: u32 = FIRST + 2;
    /// DESTROY_PD response (no payload).
    pub const DESTROY_PD_NOOP: u32 = FIRST + 3;
    /// CREATE_MR response.
    pub const CREATE_MR: u32 = FIRST + 4;
    /// DESTROY_MR response (no payload).
    pub const DESTROY_MR_NOOP: u32 = FIRST + 5;
    /// CREATE_CQ response.
    pub const CREATE_CQ: u32 = FIRST + 6;
    /// RESIZE_CQ response.
    pub const RESIZE_CQ: u32 = FIRST + 7;
    /// DESTROY_CQ response (no payload).
    pub const DESTROY_CQ_NOOP: u32 = FIRST + 8;
    /// CREATE_QP response.
    pub const CREATE_QP: u32 = FIRST + 9;
    /// MODIFY_QP response.
    pub const MODIFY_QP: u32 = FIRST + 10;
    /// QUERY_QP response.
    pub const QUERY_QP: u32 = FIRST + 11;
    /// DESTROY_QP response.
    pub const DESTROY_QP: u32 = FIRST + 12;
    /// CREATE_UC response.
    pub const CREATE_UC: u32 = FIRST + 13;
    /// DESTROY_UC response (no payload).
    pub const DESTROY_UC_NOOP: u32 = FIRST + 14;
    /// CREATE_BIND response (no payload).
    pub const CREATE_BIND_NOOP: u32 = FIRST + 15;
    /// DESTROY_BIND response (no payload).
    pub const DESTROY_BIND_NOOP: u32 = FIRST + 16;
}

/// Error values the device reports in `PVRDMA_REG_ERR` and `resp.hdr.err` (Linux errno
/// numbers, as VMware's and QEMU's devices use).
pub mod errno {
    /// Operation not permitted (e.g. a GID owned by another VM).
    pub const EPERM: u8 = 1;
    /// No such object (unknown handle).
    pub const ENOENT: u8 = 2;
    /// Out of resources (object table full).
    pub const ENOMEM: u8 = 12;
    /// Bad guest address (page directory, ring page, slot outside guest RAM).
    pub const EFAULT: u8 = 14;
    /// Object busy (e.g. a PD still used by a QP).
    pub const EBUSY: u8 = 16;
    /// Already exists.
    pub const EEXIST: u8 = 17;
    /// Invalid argument.
    pub const EINVAL: u8 = 22;
    /// Command not supported by this device.
    pub const EOPNOTSUPP: u8 = 95;
    /// Address in use (GID bound elsewhere).
    pub const EADDRINUSE: u8 = 98;
}

/// UAR page: QP doorbell offset.
pub const PVRDMA_UAR_QP_OFFSET: u64 = 0;
/// QP doorbell: send queue.
pub const PVRDMA_UAR_QP_SEND: u32 = 1 << 30;
/// QP doorbell: receive queue.
pub const PVRDMA_UAR_QP_RECV: u32 = 1 << 31;
/// UAR page: CQ doorbell offset.
pub const PVRDMA_UAR_CQ_OFFSET: u64 = 4;
/// CQ doorbell: arm for solicited.
pub const PVRDMA_UAR_CQ_ARM_SOL: u32 = 1 << 29;
/// CQ doorbell: arm.
pub const PVRDMA_UAR_CQ_ARM: u32 = 1 << 30;
/// CQ doorbell: poll.
pub const PVRDMA_UAR_CQ_POLL: u32 = 1 << 31;
/// Doorbell handle bits.
pub const PVRDMA_UAR_HANDLE_MASK: u32 = 0x00ff_ffff;

/// Work request opcodes.
pub mod wr_opcode {
    /// RDMA write.
    pub const RDMA_WRITE: u32 = 0;
    /// RDMA write with immediate.
    pub const RDMA_WRITE_WITH_IMM: u32 = 1;
    /// Send.
    pub const SEND: u32 = 2;
    /// Send with immediate.
    pub const SEND_WITH_IMM: u32 = 3;
    /// RDMA read.
    pub const RDMA_READ: u32 = 4;
    /// Atomic compare and swap (Ferry's device refuses atomics).
    pub const ATOMIC_CMP_AND_SWP: u32 = 5;
    /// Atomic fetch and add (Ferry's device refuses atomics).
    pub const ATOMIC_FETCH_AND_ADD: u32 = 6;
}

/// Memory region and QP access flags (`pvrdma_access_flags`).
pub mod access {
    /// The local side may write (receives, READ responses).
    pub const LOCAL_WRITE: u32 = 1 << 0;
    /// Peers may RDMA WRITE.
    pub const REMOTE_WRITE: u32 = 1 << 1;
    /// Peers may RDMA READ.
    pub const REMOTE_READ: u32 = 1 << 2;
    /// Peers may use atomics (refused by Ferry's device).
    pub const REMOTE_ATOMIC: u32 = 1 << 3;
}

/// Completion status values.
pub mod wc_status {
    /// Success.
    pub const SUCCESS: u32 = 0;
    /// Local length error (buffer too small, too many SGEs).
    pub const LOC_LEN_ERR: u32 = 1;
    /// Local QP operation error (bad opcode, bad destination).
    pub const LOC_QP_OP_ERR: u32 = 2;
    /// Local protection error (bad lkey, address outside the region).
    pub const LOC_PROT_ERR: u32 = 4;
    /// Flushed (QP in error).
    pub const WR_FLUSH_ERR: u32 = 5;
    /// Bad response from the peer.
    pub const BAD_RESP_ERR: u32 = 7;
    /// The peer said invalid request.
    pub const REM_INV_REQ_ERR: u32 = 9;
    /// Remote access error.
    pub const REM_ACCESS_ERR: u32 = 10;
    /// The peer said remote operational error.
    pub const REM_OP_ERR: u32 = 11;
    /// No acknowledgement after the retry count.
    pub const RETRY_EXC_ERR: u32 = 12;
    /// RNR NAKs beyond the RNR retry count.
    pub const RNR_RETRY_EXC_ERR: u32 = 13;
    /// General error (e.g. the multiplexer refused the send).
    pub const GENERAL_ERR: u32 = 21;
}

/// Completion opcodes.
pub mod wc_opcode {
    /// Send completed.
    pub const SEND: u32 = 0;
    /// RDMA write completed.
    pub const RDMA_WRITE: u32 = 1;
    /// RDMA read completed.
    pub const RDMA_READ: u32 = 2;
    /// Receive completed.
    pub const RECV: u32 = 1 << 7;
    /// An RDMA write with immediate consumed a receive.
    pub const RECV_RDMA_WITH_IMM: u32 = (1 << 7) + 1;
}

/// Completion flags.
pub mod wc_flags {
    /// The receive buffer starts with a 40-byte GRH area.
    pub const GRH: u32 = 1 << 0;
    /// Immediate data present.
    pub const WITH_IMM: u32 = 1 << 1;
}

/// Send flags.
pub mod send_flags {
    /// Fence.
    pub const FENCE: u32 = 1 << 0;
    /// Generate a completion.
    pub const SIGNALED: u32 = 1 << 1;
    /// Solicited event.
    pub const SOLICITED: u32 = 1 << 2;
    /// Inline data (not supported by Ferry's device).
    pub const INLINE: u32 = 1 << 3;
}

/// QP types.
pub mod qp_type {
    /// Subnet management (QP0; not on RoCE).
    pub const SMI: u8 = 0;
    /// General services (QP1).
    pub const GSI: u8 = 1;
    /// Reliable connected.
    pub const RC: u8 = 2;
    /// Unreliable connected.
    pub const UC: u8 = 3;
    /// Unreliable datagram.
    pub const UD: u8 = 4;
}

/// QP states.
pub mod qp_state {
    /// Reset.
    pub const RESET: u32 = 0;
    /// Initialized.
    pub const INIT: u32 = 1;
    /// Ready to receive.
    pub const RTR: u32 = 2;
    /// Ready to send.
    pub const RTS: u32 = 3;
    /// Send queue drained.
    pub const SQD: u32 = 4;
    /// Send queue error.
    pub const SQE: u32 = 5;
    /// Error.
    pub const ERR: u32 = 6;
}

/// `modify_qp.attr_mask` bits.
pub mod qp_attr_mask {
    /// `qp_state`.
    pub const STATE: u32 = 1 << 0;
    /// `cur_qp_state`.
    pub const CUR_STATE: u32 = 1 << 1;
    /// `qp_access_flags`.
    pub const ACCESS_FLAGS: u32 = 1 << 3;
    /// `pkey_index`.
    pub const PKEY_INDEX: u32 = 1 << 4;
    /// `port_num`.
    pub const PORT: u32 = 1 << 5;
    /// `qkey`.
    pub const QKEY: u32 = 1 << 6;
    /// `ah_attr`.
    pub const AV: u32 = 1 << 7;
    /// `path_mtu`.
    pub const PATH_MTU: u32 = 1 << 8;
    /// `timeout` (local ACK timeout code).
    pub const TIMEOUT: u32 = 1 << 9;
    /// `retry_cnt`.
    pub const RETRY_CNT: u32 = 1 << 10;
    /// `rnr_retry`.
    pub const RNR_RETRY: u32 = 1 << 11;
    /// `rq_psn`.
    pub const RQ_PSN: u32 = 1 << 12;
    /// `max_rd_atomic`.
    pub const MAX_QP_RD_ATOMIC: u32 = 1 << 13;
    /// `min_rnr_timer`.
    pub const MIN_RNR_TIMER: u32 = 1 << 15;
    /// `sq_psn`.
    pub const SQ_PSN: u32 = 1 << 16;
    /// `max_dest_rd_atomic`.
    pub const MAX_DEST_RD_ATOMIC: u32 = 1 << 17;
    /// `dest_qp_num`.
    pub const DEST_QPN: u32 = 1 << 20;
    /// Every bit the ABI defines.
    pub const ALL: u32 = (1 << 21) - 1;
}

/// Port states.
pub mod port_state {
    /// Down.
    pub const DOWN: u32 = 1;
    /// Active.
    pub const ACTIVE: u32 = 4;
}

/// MTU enumeration.
pub mod mtu {
    /// 1024 bytes.
    pub const MTU_1024: u32 = 3;
    /// 4096 bytes.
    pub const MTU_4096: u32 = 5;
}

/// Async event types (`pvrdma_eqe.type`).
pub mod event {
    /// CQ error (overflow).
    pub const CQ_ERR: u32 = 0;
    /// QP fatal error.
    pub const QP_FATAL: u32 = 1;
    /// Port active.
    pub const PORT_ACTIVE: u32 = 9;
    /// GID table changed.
    pub const GID_CHANGE: u32 = 18;
}

/// Port capability: CM supported.
pub const PVRDMA_PORT_CM_SUP: u32 = 1 << 16;
/// Port capability: IP-based GIDs.
pub const PVRDMA_PORT_IP_BASED_GIDS: u32 = 1 << 26;

//! The driver's RC verbs: memory regions with remote access (page directories), the RC
//! state transitions rdma_cm makes after REQ/REP, and RC send work requests (SEND, RDMA
//! WRITE with or without immediate data, RDMA READ) in the rdma view of the send WQE.
use pvrdma_abi::{self as abi, cmd_code, qp_attr_mask as m};

use super::{pdir, read_obj, write_obj, Device, Qp};

/// What the CM exchange decided for an RC connection.
#[derive(Clone, Copy, Debug)]
pub struct RcAttrs {
    /// The peer's GID.
    pub dgid: [u8; 16],
    /// The peer's QPN.
    pub dest_qpn: u32,
    /// First PSN expected from the peer (the one this side announced).
    pub rq_psn: u32,
    /// First PSN this side sends (the one the peer announced).
    pub sq_psn: u32,
    /// Path MTU code (1–5).
    pub mtu: u32,
}

impl Device {
    /// A region of `pages` fresh contiguous pages that peers may READ and WRITE; returns
    /// (address, key). Addresses are the pages' own (identity mapping).
    pub fn reg_mr(&self, pd: u32, pages: u64) -> Result<(u64, u32), u8> {
        let (dir, at) = pdir(pages);
        let r = self.command(&abi::CmdCreateMr {
            hdr: Self::hdr(cmd_code::CREATE_MR),
            start: at,
            length: pages * super::PAGE,
            pdir_dma: dir,
            pd_handle: pd,
            access_flags: abi::access::LOCAL_WRITE
                | abi::access::REMOTE_WRITE
                | abi::access::REMOTE_READ,
            nchunks: pages as u32,
            ..Default::default()
        })?;
        Ok((at, read_obj::<abi::RespCreateMr>(r).lkey))
    }

    fn modify(&self, qpn: u32, mask: u32, attrs: abi::QpAttr) -> Result<(), u8> {
        self.command(&abi::CmdModifyQp {
            hdr: Self::hdr(cmd_code::MODIFY_QP),
            qp_handle: qpn,
            attr_mask: mask,
            attrs,
        })?;
        Ok(())
    }

    /// RESET → INIT (remote READ and WRITE allowed): receives may be posted.
    pub fn rc_init(&self, qpn: u32) -> Result<(), u8> {
        let a = abi::QpAttr {
            qp_state: abi::qp_state::INIT,
            qp_access_flags: abi::access::LOCAL_WRITE
                | abi::access::REMOTE_WRITE
                | abi::access::REMOTE_READ,
            port_num: 1,
            ..Default::default()
        };
        self.modify(qpn, m::STATE | m::ACCESS_FLAGS | m::PORT | m::PKEY_INDEX, a)
    }

    /// INIT → RTR → RTS with the connection's attributes (rdma_cm's defaults: ACK timeout
    /// code 14, 7 retries, RNR retries forever).
    pub fn rc_connect(&self, qpn: u32, c: &RcAttrs) -> Result<(), u8> {
        let mut rtr = abi::QpAttr {
            qp_state: abi::qp_state::RTR,
            path_mtu: c.mtu,
            dest_qp_num: c.dest_qpn,
            rq_psn: c.rq_psn,
            max_dest_rd_atomic: 1,
            min_rnr_timer: 12,
            ..Default::default()
        };
        rtr.ah_attr.grh.dgid = c.dgid;
        rtr.ah_attr.grh.hop_limit = 64;
        let mask = m::STATE
            | m::AV
            | m::PATH_MTU
            | m::DEST_QPN
            | m::RQ_PSN
            | m::MAX_DEST_RD_ATOMIC
            | m::MIN_RNR_TIMER;
        self.modify(qpn, mask, rtr)?;
        let rts = abi::QpAttr {
            qp_state: abi::qp_state::RTS,
            sq_psn: c.sq_psn,
            timeout: 14,
            retry_cnt: 7,
            rnr_retry: 7,
            max_rd_atomic: 1,
            ..Default::default()
        };
        let mask =
            m::STATE | m::SQ_PSN | m::TIMEOUT | m::RETRY_CNT | m::RNR_RETRY | m::MAX_QP_RD_ATOMIC;
        self.modify(qpn, mask, rts)
    }
}

/// An RC send work request.
#[derive(Clone, Copy, Debug)]
pub struct RcSend {
    /// `wr_opcode::*`.
    pub opcode: u32,
    /// Local buffer (one SGE).
    pub addr: u64,
    /// Its length.
    pub len: u32,
    /// Its key.
    pub lkey: u32,
    /// Remote address (WRITE, READ).
    pub remote_addr: u64,
    /// Remote key (WRITE, READ).
    pub rkey: u32,
    /// Immediate data (SEND/WRITE with immediate).
    pub imm: u32,
    /// Ask for a completion.
    pub signaled: bool,
}

impl Qp {
    /// Posts an RC send work request. False when the send queue is full.
    pub fn post_rc(&self, wr_id: u64, s: &RcSend) -> bool {
        let Some(at) = self.sq_slot() else {
            return false;
        };
        let mut w = abi::SqWqeHdr {
            wr_id,
            num_sge: 1,
            opcode: s.opcode,
            ex: s.imm,
            send_flags: if s.signaled {
                abi::send_flags::SIGNALED
            } else {
                0
            },
            ..Default::default()
        };
        w.set_rdma(s.remote_addr, s.rkey);
        write_obj(at, &w);
        write_obj(
            at + 80,
            &abi::Sge {
                addr: s.addr,
                length: s.len,
                lkey: s.lkey,
            },
        );
        self.sq_commit();
        true
    }
}

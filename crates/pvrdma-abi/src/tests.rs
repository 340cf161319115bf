//! Sizes and offsets against the values of the Linux headers (computed from the C layouts of
//! `pvrdma_dev_api.h`, `pvrdma_verbs.h`, `pvrdma_ring.h` and `vmw_pvrdma-abi.h` on x86-64).
use core::mem::{offset_of, size_of};

use super::*;

#[test]
fn device_shared_region_layout() {
    assert_eq!(size_of::<GosInfo>(), 8);
    assert_eq!(size_of::<RingPageInfo>(), 16);
    assert_eq!(size_of::<DeviceCaps>(), 208);
    assert_eq!(offset_of!(DeviceCaps, ex_comp_mask), 48);
    assert_eq!(offset_of!(DeviceCaps, vendor_id), 64);
    assert_eq!(offset_of!(DeviceCaps, max_qp), 76);
    assert_eq!(offset_of!(DeviceCaps, max_cqe), 100);
    assert_eq!(offset_of!(DeviceCaps, gid_tbl_len), 192);
    assert_eq!(offset_of!(DeviceCaps, max_pkeys), 196);
    assert_eq!(offset_of!(DeviceCaps, mode), 200);
    assert_eq!(offset_of!(DeviceCaps, gid_types), 203);
    assert_eq!(offset_of!(DeviceSharedRegion, gos_info), 8);
    assert_eq!(offset_of!(DeviceSharedRegion, cmd_slot_dma), 16);
    assert_eq!(offset_of!(DeviceSharedRegion, resp_slot_dma), 24);
    assert_eq!(offset_of!(DeviceSharedRegion, async_ring_pages), 32);
    assert_eq!(offset_of!(DeviceSharedRegion, cq_ring_pages), 48);
    assert_eq!(offset_of!(DeviceSharedRegion, uar_pfn), 64);
    assert_eq!(offset_of!(DeviceSharedRegion, caps), 72);
    assert_eq!(size_of::<DeviceSharedRegion>(), 280);
    assert_eq!(size_of::<Eqe>(), 8);
    assert_eq!(size_of::<Cqne>(), 4);
}

#[test]
fn verbs_layouts() {
    assert_eq!(size_of::<PortAttr>(), 48);
    assert_eq!(offset_of!(PortAttr, pkey_tbl_len), 32);
    assert_eq!(offset_of!(PortAttr, lmc), 38);
    assert_eq!(size_of::<GlobalRoute>(), 24);
    assert_eq!(size_of::<AhAttr>(), 40);
    assert_eq!(offset_of!(AhAttr, dlid), 24);
    assert_eq!(offset_of!(AhAttr, dmac), 33);
    assert_eq!(size_of::<QpCap>(), 24);
    assert_eq!(size_of::<QpAttr>(), 160);
    assert_eq!(offset_of!(QpAttr, qkey), 16);
    assert_eq!(offset_of!(QpAttr, dest_qp_num), 28);
    assert_eq!(offset_of!(QpAttr, pkey_index), 36);
    assert_eq!(offset_of!(QpAttr, cap), 56);
    assert_eq!(offset_of!(QpAttr, ah_attr), 80);
    assert_eq!(offset_of!(QpAttr, alt_ah_attr), 120);
}

#[test]
fn command_layouts() {
    assert_eq!(size_of::<CmdHdr>(), 16);
    assert_eq!(size_of::<RespHdr>(), 16);
    assert_eq!(offset_of!(RespHdr, ack), 8);
    assert_eq!(offset_of!(RespHdr, err), 12);
    assert_eq!(size_of::<CmdQueryPort>(), 24);
    assert_eq!(size_of::<RespQueryPort>(), 64);
    assert_eq!(size_of::<CmdQueryPkey>(), 24);
    assert_eq!(size_of::<RespQueryPkey>(), 24);
    assert_eq!(size_of::<CmdCreatePd>(), 24);
    assert_eq!(size_of::<RespCreatePd>(), 24);
    assert_eq!(size_of::<CmdCreateMr>(), 56);
    assert_eq!(offset_of!(CmdCreateMr, pdir_dma), 32);
    assert_eq!(offset_of!(CmdCreateMr, nchunks), 52);
    assert_eq!(size_of::<RespCreateMr>(), 32);
    assert_eq!(size_of::<CmdCreateCq>(), 40);
    assert_eq!(offset_of!(CmdCreateCq, cqe), 28);
    assert_eq!(size_of::<RespCreateCq>(), 24);
    assert_eq!(size_of::<CmdResizeCq>(), 24);
    assert_eq!(size_of::<CmdCreateQp>(), 80);
    assert_eq!(offset_of!(CmdCreateQp, max_send_wr), 40);
    assert_eq!(offset_of!(CmdCreateQp, lkey), 60);
    assert_eq!(offset_of!(CmdCreateQp, total_chunks), 68);
    assert_eq!(offset_of!(CmdCreateQp, sq_sig_all), 74);
    assert_eq!(offset_of!(CmdCreateQp, qp_type), 75);
    assert_eq!(size_of::<RespCreateQp>(), 40);
    assert_eq!(size_of::<CmdModifyQp>(), 184);
    assert_eq!(offset_of!(CmdModifyQp, attrs), 24);
    assert_eq!(size_of::<CmdQueryQp>(), 24);
    assert_eq!(size_of::<RespQueryQp>(), 176);
    assert_eq!(size_of::<CmdDestroyQp>(), 24);
    assert_eq!(size_of::<RespDestroyQp>(), 24);
    assert_eq!(size_of::<CmdCreateBind>(), 48);
    assert_eq!(offset_of!(CmdCreateBind, new_gid), 28);
    assert_eq!(offset_of!(CmdCreateBind, gid_type), 44);
    assert_eq!(size_of::<CmdDestroyBind>(), 40);
    assert_eq!(offset_of!(CmdDestroyBind, dest_gid), 20);
    assert_eq!(size_of::<CmdCreateUc>(), 24);
    assert_eq!(size_of::<RespCreateUc>(), 24);
}

#[test]
fn queue_layouts() {
    assert_eq!(size_of::<Ring>(), 8);
    assert_eq!(size_of::<RingState>(), 16);
    assert_eq!(offset_of!(RingState, rx), RING_STATE_RX_OFFSET as usize);
    assert_eq!(size_of::<Av>(), 40);
    assert_eq!(offset_of!(Av, dgid), 8);
    assert_eq!(offset_of!(Av, gid_index), 25);
    assert_eq!(offset_of!(Av, dmac), 28);
    assert_eq!(size_of::<Sge>(), 16);
    assert_eq!(size_of::<RqWqeHdr>(), 16);
    assert_eq!(size_of::<SqWqeHdr>(), 80);
    assert_eq!(offset_of!(SqWqeHdr, opcode), 16);
    assert_eq!(offset_of!(SqWqeHdr, ex), 24);
    assert_eq!(offset_of!(SqWqeHdr, ud_remote_qpn), 32);
    assert_eq!(offset_of!(SqWqeHdr, ud_av), 40);
    assert_eq!(size_of::<Cqe>(), 64);
    assert_eq!(offset_of!(Cqe, opcode), 16);
    assert_eq!(offset_of!(Cqe, byte_len), 24);
    assert_eq!(offset_of!(Cqe, src_qp), 32);
    assert_eq!(offset_of!(Cqe, wc_flags), 36);
    assert_eq!(offset_of!(Cqe, pkey_index), 44);
    assert_eq!(offset_of!(Cqe, port_num), 50);
    assert_eq!(offset_of!(Cqe, smac), 51);
    assert_eq!(sq_wqe_size(1), 128);
    assert_eq!(rq_wqe_size(1), 32);
    assert_eq!(rq_wqe_size(2), 64);
}

#[test]
fn ring_index_arithmetic() {
    // Empty, one element, full, wrap of the generation bit.
    let n = 4;
    let r = Ring {
        prod_tail: 0,
        cons_head: 0,
    };
    assert_eq!(has_data(r, n), Ok(None));
    assert_eq!(has_space(r, n), Ok(Some(0)));
    let r = Ring {
        prod_tail: 4,
        cons_head: 0,
    };
    assert_eq!(has_space(r, n), Ok(None), "tail == head ^ size is full");
    assert_eq!(has_data(r, n), Ok(Some(0)));
    let r = Ring {
        prod_tail: 1,
        cons_head: 7,
    };
    assert_eq!(has_data(r, n), Ok(Some(3)));
    assert_eq!(idx_inc(7, n), 0);
    assert_eq!(idx_inc(3, n), 4);
    // Hostile indexes: beyond 2 × size, or a ring size that is not a power of two.
    assert_eq!(
        has_data(
            Ring {
                prod_tail: 8,
                cons_head: 0
            },
            n
        ),
        Err(())
    );
    assert_eq!(
        has_space(
            Ring {
                prod_tail: 0,
                cons_head: u32::MAX
            },
            n
        ),
        Err(())
    );
    assert!(!idx_valid(0, 3));
    assert!(!idx_valid(0, 0));
    assert!(!idx_valid(0, 1 << 31));
    assert_eq!(idx_slot(5, 4), Some(1));
}

#[test]
fn page_directory_indexes() {
    assert_eq!(page_dir_table(511), 0);
    assert_eq!(page_dir_table(512), 1);
    assert_eq!(page_dir_page(513), 1);
    assert_eq!(page_dir_dir(PVRDMA_PAGE_DIR_MAX_PAGES - 1), 0);
}

#[test]
fn bytes_round_trip() {
    let c = CmdCreateBind {
        hdr: CmdHdr {
            response: 7,
            cmd: cmd_code::CREATE_BIND,
            reserved: 0,
        },
        index: 3,
        new_gid: [0xab; 16],
        ..Default::default()
    };
    let b = c.as_bytes();
    assert_eq!(&b[8..12], &cmd_code::CREATE_BIND.to_le_bytes());
    let back = CmdCreateBind::read_from_bytes(b).unwrap();
    assert_eq!(back, c);
    assert_eq!(
        resp_code::for_cmd(cmd_code::DESTROY_BIND),
        resp_code::DESTROY_BIND_NOOP
    );
}

#[test]
fn rdma_view_of_the_send_wqe() {
    // `wr.rdma` overlays the union at offset 32: remote_addr (8 bytes), then rkey.
    let mut w = SqWqeHdr::default();
    w.set_rdma(0x1122_3344_5566_7788, 0xabcd_ef01);
    let b = w.as_bytes();
    assert_eq!(&b[32..40], &0x1122_3344_5566_7788u64.to_le_bytes());
    assert_eq!(&b[40..44], &0xabcd_ef01u32.to_le_bytes());
    assert_eq!(w.rdma_remote_addr(), 0x1122_3344_5566_7788);
    assert_eq!(w.rdma_rkey(), 0xabcd_ef01);
}

//! RC queue pairs of the device end to end: two devices (byte-vector guests driven by a
//! scripted driver) whose backends are real software RoCEv2 ports on loopback addresses,
//! connected by MODIFY_QP as rdma_cm would, moving SENDs, WRITEs and READs between guest
//! pages; and the hostile cases (wrong rkey, outside a region, DMA regions, atomics).
use std::time::{Duration, Instant};

use rdma::port::{PortConfig, SoftPort};

use super::*;
use crate::backend::{PortRcQueue, RcQueue};

/// A backend over a software port: GIDs claimed on the port, RC QPs on it.
struct PortBackend {
    port: SoftPort,
}

impl RdmaBackend for PortBackend {
    fn bind_gid(&self, gid: Gid) -> Result<(), BackendError> {
        self.port
            .claim_gid(gid)
            .map_err(|e| BackendError::new(BackendErrorKind::Refused, e.to_string()))
    }
    fn unbind_gid(&self, gid: Gid) -> Result<(), BackendError> {
        self.port.release_gid(gid);
        Ok(())
    }
    fn send_mad(&self, _: Gid, _: Gid, _: &[u8]) -> Result<(), BackendError> {
        Err(BackendError::new(BackendErrorKind::Refused, "no QP1 here"))
    }
    fn receive_buffers_posted(&self) {}
    fn create_ud_qp(&self, _: Gid, _: u32) -> Result<Box<dyn UdQueue>, BackendError> {
        Err(BackendError::new(BackendErrorKind::Refused, "no UD here"))
    }
    fn create_rc_qp(
        &self,
        gid: Gid,
        mrs: Arc<rdma::rc::MrTable>,
    ) -> Result<Box<dyn RcQueue>, BackendError> {
        Ok(PortRcQueue::create(&self.port, gid, mrs))
    }
}

/// One side: a guest with an RC QP, a CQ, and a 96 KiB region.
struct Side {
    g: Guest,
    gid: Gid,
    qp: u32,
    qp_pages: Vec<u64>,
    cq_pages: Vec<u64>,
    /// Guest-virtual base of the region (not its guest-physical pages).
    va: u64,
    pages: Vec<u64>,
    mr: u32,
    key: u32,
    dma_key: u32,
    sq: u32,
    rq: u32,
    seen: usize,
}

const REGION: usize = 96 << 10;
const SLOTS: u32 = 16;

fn side(udp_port: u16, last: u8) -> Side {
    let addr = core::net::Ipv4Addr::new(127, 77, 0, last);
    let mut cfg = PortConfig::new(addr);
    cfg.udp_port = udp_port;
    let port = SoftPort::bind(cfg).expect("binding a loopback port");
    let mut g = Guest::with_backend(
        Arc::new(FakeBackend::default()),
        Arc::new(PortBackend { port }),
    );
    let gid = Gid::from_ipv4(addr).canonical();
    assert_eq!(g.bind(0, gid), 0);
    let pd = g.create_pd();
    let dma_key = g.dma_mr(pd);
    let (cq, cq_pages) = g.create_cq(64);
    // A region at a guest-virtual address, starting mid-page, over scattered pages.
    let va = 0x7f00_0000_0800u64;
    let npages = (REGION + 0x800).div_ceil(4096);
    let (dir, pages) = g.pdir(npages);
    let (e, r) = g.cmd(&abi::CmdCreateMr {
        hdr: Guest::hdr(cmd_code::CREATE_MR),
        start: va,
        length: REGION as u64,
        pdir_dma: dir,
        pd_handle: pd,
        access_flags: abi::access::LOCAL_WRITE
            | abi::access::REMOTE_WRITE
            | abi::access::REMOTE_READ,
        nchunks: npages as u32,
        ..Default::default()
    });
    assert_eq!(e, 0);
    let (mr, key) = (Guest::u32_at(&r, 16), Guest::u32_at(&r, 20));
    assert_eq!(key, Guest::u32_at(&r, 24), "lkey = rkey");
    let (e, qp, qp_pages) = g.create_qp(pd, cq, abi::qp_type::RC);
    assert_eq!(e, 0, "CREATE_QP RC");
    Side {
        g,
        gid,
        qp,
        qp_pages,
        cq_pages,
        va,
        pages,
        mr,
        key,
        dma_key,
        sq: 0,
        rq: 0,
        seen: 0,
    }
}

impl Side {
    fn modify(&mut self, mask: u32, attrs: abi::QpAttr) -> u8 {
        self.g
            .cmd(&abi::CmdModifyQp {
                hdr: Guest::hdr(cmd_code::MODIFY_QP),
                qp_handle: self.qp,
                attr_mask: mask,
                attrs,
            })
            .0
    }

    /// INIT → RTR → RTS towards `peer` (rdma_cm's attributes: this side receives from the
    /// PSN it announced, `my_psn`, and sends from the peer's).
    fn connect(&mut self, peer: &Side, my_psn: u32, peer_psn: u32, mtu: u32) {
        use abi::qp_attr_mask as m;
        let init = abi::QpAttr {
            qp_state: qp_state::INIT,
            qp_access_flags: abi::access::LOCAL_WRITE
                | abi::access::REMOTE_WRITE
                | abi::access::REMOTE_READ,
            port_num: 1,
            ..Default::default()
        };
        assert_eq!(
            self.modify(m::STATE | m::ACCESS_FLAGS | m::PORT | m::PKEY_INDEX, init),
            0
        );
        let mut rtr = abi::QpAttr {
            qp_state: qp_state::RTR,
            path_mtu: mtu,
            dest_qp_num: peer.qp,
            rq_psn: my_psn,
            max_dest_rd_atomic: 1,
            min_rnr_timer: 12,
            ..Default::default()
        };
        rtr.ah_attr.grh.dgid = peer.gid.0;
        let mask = m::STATE
            | m::AV
            | m::PATH_MTU
            | m::DEST_QPN
            | m::RQ_PSN
            | m::MAX_DEST_RD_ATOMIC
            | m::MIN_RNR_TIMER;
        assert_eq!(self.modify(mask, rtr), 0, "to RTR");
        let rts = abi::QpAttr {
            qp_state: qp_state::RTS,
            sq_psn: peer_psn,
            timeout: 14,
            retry_cnt: 7,
            rnr_retry: 7,
            max_rd_atomic: 1,
            ..Default::default()
        };
        let mask =
            m::STATE | m::SQ_PSN | m::TIMEOUT | m::RETRY_CNT | m::RNR_RETRY | m::MAX_QP_RD_ATOMIC;
        assert_eq!(self.modify(mask, rts), 0, "to RTS");
    }

    fn post_recv(&mut self, wr_id: u64, addr: u64, len: u32) {
        let slot = self.rq % SLOTS;
        let at = self.qp_pages[2] + 32 * slot as u64;
        let h = abi::RqWqeHdr {
            wr_id,
            num_sge: 1,
            total_len: 0,
        };
        self.g.mem.write(at, h.as_bytes()).unwrap();
        let s = abi::Sge {
            addr,
            length: len,
            lkey: self.key,
        };
        self.g.mem.write(at + 16, s.as_bytes()).unwrap();
        self.rq += 1;
        self.g
            .mem
            .store_u32(self.qp_pages[0] + 8, self.rq % (2 * SLOTS))
            .unwrap();
    }

    fn post_send(&mut self, mut w: abi::SqWqeHdr, sges: &[abi::Sge]) {
        let slot = self.sq % SLOTS;
        let at = self.qp_pages[1] + 128 * slot as u64;
        w.num_sge = sges.len() as u32;
        w.send_flags |= abi::send_flags::SIGNALED;
        self.g.mem.write(at, w.as_bytes()).unwrap();
        for (i, s) in sges.iter().enumerate() {
            self.g
                .mem
                .write(at + 80 + 16 * i as u64, s.as_bytes())
                .unwrap();
        }
        self.sq += 1;
        self.g
            .mem
            .store_u32(self.qp_pages[0], self.sq % (2 * SLOTS))
            .unwrap();
    }

    fn sge(&self, off: u64, len: u32) -> abi::Sge {
        abi::Sge {
            addr: self.va + off,
            length: len,
            lkey: self.key,
        }
    }

    /// Bytes of the region at offset `off` (read through its guest pages).
    fn region(&self, off: usize, len: usize) -> Vec<u8> {
        (off..off + len)
            .map(|o| {
                let a = o + 0x800;
                let mut b = [0u8];
                self.g
                    .mem
                    .read(self.pages[a / 4096] + (a % 4096) as u64, &mut b)
                    .unwrap();
                b[0]
            })
            .collect()
    }

    fn fill(&self, off: usize, data: &[u8]) {
        for (i, b) in data.iter().enumerate() {
            let a = off + i + 0x800;
            self.g
                .mem
                .write(self.pages[a / 4096] + (a % 4096) as u64, &[*b])
                .unwrap();
        }
    }

    /// CQEs not seen yet.
    fn new_cqes(&mut self) -> Vec<abi::Cqe> {
        let all = self.g.cqes(&self.cq_pages);
        let new = all[self.seen..].to_vec();
        self.seen = all.len();
        new
    }
}

/// Polls both devices until `a` and `b` hold at least `na` and `nb` new CQEs.
fn run(a: &mut Side, b: &mut Side, na: usize, nb: usize) -> (Vec<abi::Cqe>, Vec<abi::Cqe>) {
    let end = Instant::now() + Duration::from_secs(30);
    let (mut ca, mut cb) = (Vec::new(), Vec::new());
    while ca.len() < na || cb.len() < nb {
        assert!(
            Instant::now() < end,
            "completions: {} of {na}, {} of {nb}: {ca:?} {cb:?} {:?} {:?}",
            ca.len(),
            cb.len(),
            a.g.dev.stats(),
            b.g.dev.stats()
        );
        let work = a.g.dev.poll() + b.g.dev.poll();
        ca.extend(a.new_cqes());
        cb.extend(b.new_cqes());
        if work == 0 {
            std::thread::yield_now();
        }
    }
    (ca, cb)
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31) ^ seed)
        .collect()
}

fn pair(udp_port: u16, mtu_code: u32) -> (Side, Side) {
    let mut a = side(udp_port, 1);
    let mut b = side(udp_port, 2);
    let (psn_a, psn_b) = (0xff_fff0, 0x12_3456); // a's wraps around 2^24
    a.connect(&b, psn_a, psn_b, mtu_code);
    b.connect(&a, psn_b, psn_a, mtu_code);
    (a, b)
}

#[test]
fn rc_send_write_read_between_two_devices() {
    let (mut a, mut b) = pair(24_911, 3);
    use abi::wr_opcode as op;

    // QUERY_QP reports what MODIFY_QP set.
    let (e, r) = a.g.cmd(&abi::CmdQueryQp {
        hdr: Guest::hdr(cmd_code::QUERY_QP),
        qp_handle: a.qp,
        attr_mask: 0,
    });
    assert_eq!(e, 0);
    let q = <abi::RespQueryQp as pvrdma_abi::FromBytes>::read_from_prefix(&r[..])
        .unwrap()
        .0
        .attrs;
    assert_eq!(
        (q.qp_state, q.path_mtu, q.dest_qp_num, q.rq_psn, q.sq_psn),
        (qp_state::RTS, 3, b.qp, 0xff_fff0, 0x12_3456)
    );
    assert_eq!((q.timeout, q.retry_cnt, q.rnr_retry), (14, 7, 7));
    assert_eq!(q.ah_attr.grh.dgid, b.gid.0);

    // SEND with immediate, 3000 bytes (3 packets at MTU 1024).
    let msg = pattern(1, 3000);
    a.fill(0, &msg);
    b.post_recv(7, b.va + 0x1000, 4096);
    let w = abi::SqWqeHdr {
        wr_id: 1,
        opcode: op::SEND_WITH_IMM,
        ex: 0xdead_beef,
        ..Default::default()
    };
    a.post_send(w, &[a.sge(0, 3000)]);
    let (ca, cb) = run(&mut a, &mut b, 1, 1);
    assert_eq!(
        (ca[0].wr_id, ca[0].status, ca[0].opcode),
        (1, 0, abi::wc_opcode::SEND)
    );
    let r = &cb[0];
    assert_eq!((r.wr_id, r.status, r.opcode), (7, 0, abi::wc_opcode::RECV));
    assert_eq!((r.byte_len, r.imm_data), (3000, 0xdead_beef));
    assert_eq!(r.wc_flags, abi::wc_flags::WITH_IMM);
    assert_eq!(r.src_qp, a.qp);
    assert_eq!(b.region(0x1000, 3000), msg);

    // RDMA WRITE of 64 KiB into b's region (crossing its pages), then WRITE with immediate
    // (consumes a receive).
    let big = pattern(2, 64 << 10);
    a.fill(0x4000, &big);
    let mut w = abi::SqWqeHdr {
        wr_id: 2,
        opcode: op::RDMA_WRITE,
        ..Default::default()
    };
    w.set_rdma(b.va + 0x100, b.key);
    a.post_send(w, &[a.sge(0x4000, 64 << 10)]);
    b.post_recv(8, b.va, 16);
    let mut w = abi::SqWqeHdr {
        wr_id: 3,
        opcode: op::RDMA_WRITE_WITH_IMM,
        ex: 42,
        ..Default::default()
    };
    w.set_rdma(b.va + 0x100 + (64 << 10), b.key);
    a.post_send(w, &[a.sge(0, 100)]);
    let (ca, cb) = run(&mut a, &mut b, 2, 1);
    assert_eq!(ca[0].opcode, abi::wc_opcode::RDMA_WRITE);
    assert_eq!((ca[0].wr_id, ca[0].status), (2, 0));
    assert_eq!((ca[1].wr_id, ca[1].status), (3, 0));
    assert_eq!(b.region(0x100, 64 << 10), big);
    assert_eq!(b.region(0x100 + (64 << 10), 100), msg[..100]);
    let r = &cb[0];
    assert_eq!(
        (r.wr_id, r.opcode, r.imm_data, r.byte_len),
        (8, abi::wc_opcode::RECV_RDMA_WITH_IMM, 42, 100)
    );

    // RDMA READ of 20000 bytes of b's region into a's, at another offset.
    let mut w = abi::SqWqeHdr {
        wr_id: 4,
        opcode: op::RDMA_READ,
        ..Default::default()
    };
    w.set_rdma(b.va + 0x100, b.key);
    a.post_send(w, &[a.sge(0x100, 20000)]);
    let (ca, _) = run(&mut a, &mut b, 1, 0);
    assert_eq!(
        (ca[0].wr_id, ca[0].status, ca[0].opcode, ca[0].byte_len),
        (4, 0, abi::wc_opcode::RDMA_READ, 20000)
    );
    assert_eq!(a.region(0x100, 20000), big[..20000]);

    // Back the other way: b SENDs to a.
    let back = b.region(0x1000, 64);
    a.post_recv(9, a.va, 64);
    let w = abi::SqWqeHdr {
        wr_id: 5,
        opcode: op::SEND,
        ..Default::default()
    };
    b.post_send(w, &[b.sge(0x1000, 64)]);
    let (ca, cb) = run(&mut a, &mut b, 1, 1);
    assert_eq!((ca[0].wr_id, ca[0].byte_len, ca[0].status), (9, 64, 0));
    assert_eq!((cb[0].wr_id, cb[0].status), (5, 0));
    assert_eq!(a.region(0, 64), back);
    let st = a.g.dev.stats();
    assert_eq!(st.rc.sends_posted, 4);
    assert_eq!(st.wr_errors, 0);

    // a's finished WRITEs gave their buffers back with their bytes in them: later, shorter
    // and longer WRITEs carry exactly their own bytes, none of the stale ones.
    for (wr_id, seed, len) in [(10, 3, 50), (11, 4, 64 << 10), (12, 5, 7), (13, 6, 5000)] {
        let data = pattern(seed, len);
        a.fill(0x4000, &data);
        let before = b.region(0x8000, (64 << 10) + 16);
        let mut w = abi::SqWqeHdr {
            wr_id,
            opcode: op::RDMA_WRITE,
            ..Default::default()
        };
        w.set_rdma(b.va + 0x8000, b.key);
        a.post_send(w, &[a.sge(0x4000, len as u32)]);
        let (ca, _) = run(&mut a, &mut b, 1, 0);
        assert_eq!((ca[0].wr_id, ca[0].status), (wr_id, 0));
        let after = b.region(0x8000, (64 << 10) + 16);
        assert_eq!(after[..len], data[..]);
        assert_eq!(after[len..], before[len..]);
    }
}

#[test]
fn rc_remote_accesses_outside_regions_are_refused() {
    use abi::wr_opcode as op;
    // A write outside b's region: remote access error at a, a's QP in ERR, b's memory
    // around the region untouched; then every later WQE completes flushed.
    let (mut a, mut b) = pair(24_912, 5);
    let before = b.region(0, 64);
    let mut w = abi::SqWqeHdr {
        wr_id: 1,
        opcode: op::RDMA_WRITE,
        ..Default::default()
    };
    w.set_rdma(b.va + REGION as u64 - 8, b.key);
    a.post_send(w, &[a.sge(0, 16)]);
    let (ca, _) = run(&mut a, &mut b, 1, 0);
    assert_eq!(
        (ca[0].wr_id, ca[0].status),
        (1, abi::wc_status::REM_ACCESS_ERR)
    );
    assert_eq!(b.region(0, 64), before);
    let w = abi::SqWqeHdr {
        wr_id: 2,
        opcode: op::SEND,
        ..Default::default()
    };
    a.post_send(w, &[a.sge(0, 8)]);
    let (ca, _) = run(&mut a, &mut b, 1, 0);
    assert_eq!(
        (ca[0].wr_id, ca[0].status),
        (2, abi::wc_status::WR_FLUSH_ERR)
    );

    // A wrong rkey, a READ beyond the region, the DMA region's key (local only): each refused.
    for (i, (rkey, va, read)) in [
        (b.key ^ 0x100, b.va, false),
        (b.key, b.va + REGION as u64 - 4, true),
        (b.dma_key, 0x10000, true),
        (b.dma_key, 0x10000, false),
    ]
    .into_iter()
    .enumerate()
    {
        let (mut a, mut b) = pair(24_913 + i as u16, 3);
        let mut w = abi::SqWqeHdr {
            wr_id: 10,
            opcode: if read { op::RDMA_READ } else { op::RDMA_WRITE },
            ..Default::default()
        };
        w.set_rdma(va, rkey);
        let guest_page = b.g.mem.load_u32(0x10000).unwrap();
        a.post_send(w, &[a.sge(0, 64)]);
        let (ca, _) = run(&mut a, &mut b, 1, 0);
        assert_eq!(
            ca[0].status,
            abi::wc_status::REM_ACCESS_ERR,
            "case {i}: rkey {rkey:#x} va {va:#x}"
        );
        assert_eq!(b.g.mem.load_u32(0x10000).unwrap(), guest_page);
        assert_eq!(
            b.g.dev.stats().rc.remote_access_refused,
            1,
            "case {i}: counted"
        );
    }
}

#[test]
fn rc_local_errors_and_atomics() {
    use abi::wr_opcode as op;
    let (mut a, mut b) = pair(24_920, 4);
    // An atomic: refused locally, the QP to ERR.
    let mut w = abi::SqWqeHdr {
        wr_id: 1,
        opcode: op::ATOMIC_FETCH_AND_ADD,
        ..Default::default()
    };
    w.set_rdma(b.va, b.key);
    a.post_send(w, &[a.sge(0, 8)]);
    let (ca, _) = run(&mut a, &mut b, 1, 0);
    assert_eq!(
        (ca[0].wr_id, ca[0].status),
        (1, abi::wc_status::LOC_QP_OP_ERR)
    );
    assert_eq!(a.g.dev.stats().rc.atomics_refused, 1);

    // An SGE beyond the sender's own region: local protection error.
    let (mut a, mut b) = pair(24_921, 4);
    let w = abi::SqWqeHdr {
        wr_id: 2,
        opcode: op::SEND,
        ..Default::default()
    };
    a.post_send(w, &[a.sge(REGION as u64 - 4, 8)]);
    let (ca, _) = run(&mut a, &mut b, 1, 0);
    assert_eq!(
        (ca[0].wr_id, ca[0].status),
        (2, abi::wc_status::LOC_PROT_ERR)
    );

    // A receive too small for the message: the receiver's completion says so.
    let (mut a, mut b) = pair(24_922, 4);
    b.post_recv(3, b.va, 10);
    let w = abi::SqWqeHdr {
        wr_id: 4,
        opcode: op::SEND,
        ..Default::default()
    };
    a.post_send(w, &[a.sge(0, 100)]);
    let (_, cb) = run(&mut a, &mut b, 0, 1);
    assert_eq!(
        (cb[0].wr_id, cb[0].status),
        (3, abi::wc_status::LOC_LEN_ERR)
    );

    // Bad attributes: MTU code 6, retry count 8, RTR without an address vector.
    let mut s = side(24_923, 9);
    use abi::qp_attr_mask as m;
    let init = abi::QpAttr {
        qp_state: qp_state::INIT,
        ..Default::default()
    };
    assert_eq!(s.modify(m::STATE, init), 0);
    let bad_mtu = abi::QpAttr {
        qp_state: qp_state::RTR,
        path_mtu: 6,
        ..Default::default()
    };
    assert_eq!(s.modify(m::STATE | m::PATH_MTU, bad_mtu), errno::EINVAL);
    let bad_retry = abi::QpAttr {
        retry_cnt: 8,
        ..Default::default()
    };
    assert_eq!(s.modify(m::RETRY_CNT, bad_retry), errno::EINVAL);
    let no_av = abi::QpAttr {
        qp_state: qp_state::RTR,
        path_mtu: 3,
        ..Default::default()
    };
    assert_eq!(s.modify(m::STATE | m::PATH_MTU, no_av), errno::EINVAL);
    let rts = abi::QpAttr {
        qp_state: qp_state::RTS,
        ..Default::default()
    };
    assert_eq!(s.modify(m::STATE, rts), errno::EINVAL, "INIT → RTS");
}

#[test]
fn rc_a_destroyed_region_is_out_of_reach() {
    use abi::wr_opcode as op;
    let (mut a, mut b) = pair(24_930, 3);
    // The region works, then the guest destroys it: the same rkey is refused and the pages
    // (still guest memory, maybe reused) are not written.
    let mut w = abi::SqWqeHdr {
        wr_id: 1,
        opcode: op::RDMA_WRITE,
        ..Default::default()
    };
    w.set_rdma(b.va, b.key);
    a.fill(0, &pattern(3, 32));
    a.post_send(w, &[a.sge(0, 32)]);
    let (ca, _) = run(&mut a, &mut b, 1, 0);
    assert_eq!(ca[0].status, 0);
    assert_eq!(b.region(0, 32), pattern(3, 32));
    let (e, _) = b.g.cmd(&abi::CmdDestroyMr {
        hdr: Guest::hdr(cmd_code::DESTROY_MR),
        mr_handle: b.mr,
        ..Default::default()
    });
    assert_eq!(e, 0);
    b.fill(0, &[0u8; 32]);
    a.fill(0, &pattern(4, 32));
    w.wr_id = 2;
    a.post_send(w, &[a.sge(0, 32)]);
    let (ca, _) = run(&mut a, &mut b, 1, 0);
    assert_eq!(
        (ca[0].wr_id, ca[0].status),
        (2, abi::wc_status::REM_ACCESS_ERR)
    );
    assert_eq!(b.region(0, 32), vec![0u8; 32]);
}

#[test]
fn rc_a_queue_pair_sends_nothing_once_its_gid_is_unbound() {
    use abi::wr_opcode as op;
    let (mut a, mut b) = pair(24_940, 3);
    b.post_recv(1, b.va, 64);
    // A unbinds the GID its RC QP sends from (another VM may own it next).
    let (e, _) = a.g.cmd(&abi::CmdDestroyBind {
        hdr: Guest::hdr(cmd_code::DESTROY_BIND),
        index: 0,
        dest_gid: a.gid.0,
        ..Default::default()
    });
    assert_eq!(e, 0);
    assert_eq!(
        a.g.dev.stats().ud_qps_unbound,
        1,
        "the RC QP was cut off and counted"
    );
    let w = abi::SqWqeHdr {
        wr_id: 2,
        opcode: op::SEND,
        ..Default::default()
    };
    a.fill(0, b"as the unbound GID");
    a.post_send(w, &[a.sge(0, 18)]);
    let (ca, _) = run(&mut a, &mut b, 1, 0);
    assert_eq!(
        (ca[0].wr_id, ca[0].status),
        (2, abi::wc_status::WR_FLUSH_ERR),
        "the send flushes"
    );
    // Give the peer every chance to receive something: it must not.
    for _ in 0..100 {
        a.g.dev.poll();
        b.g.dev.poll();
    }
    assert!(b.new_cqes().is_empty(), "nothing reached the peer");
    assert_eq!(b.region(0, 18), vec![0; 18]);
}

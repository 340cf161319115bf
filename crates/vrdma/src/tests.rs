//! Device tests without KVM: a byte-vector guest memory, a scripted guest driver, an in-memory
//! backend; happy paths and hostile inputs.
use std::sync::{Arc, Mutex};

use pvrdma_abi::{self as abi, cmd_code, errno, qp_state, IntoBytes};
use rdma_wire::Gid;

mod rc;

use crate::{
    backend::{MadInbox, RdmaBackend, UdDatagram, UdOut, UdQueue, GRH_LEN},
    device::Device,
    mem::{GuestMemory, VecMemory},
    BackendError, BackendErrorKind,
};

type Sent = Arc<Mutex<Vec<(Gid, u32, Vec<u8>)>>>;

#[derive(Default)]
struct FakeBackend {
    bound: Mutex<Vec<Gid>>,
    taken: Vec<Gid>,
    mads: Mutex<Vec<(Gid, Gid, Vec<u8>)>>,
    ud_sent: Sent,
    ud_inbound: Arc<Mutex<Vec<UdDatagram>>>,
    /// The size of each `send_batch` call.
    ud_batches: Arc<Mutex<Vec<usize>>>,
}

struct FakeUd {
    sent: Sent,
    inbound: Arc<Mutex<Vec<UdDatagram>>>,
    batches: Arc<Mutex<Vec<usize>>>,
}

impl UdQueue for FakeUd {
    fn qpn(&self) -> u32 {
        0x42
    }
    fn send(
        &self,
        dgid: Gid,
        dqpn: u32,
        _qkey: u32,
        _imm: Option<u32>,
        data: &[u8],
    ) -> Result<(), BackendError> {
        if data == b"fail" {
            return Err(BackendError::new(BackendErrorKind::Refused, "no route"));
        }
        self.sent.lock().unwrap().push((dgid, dqpn, data.to_vec()));
        Ok(())
    }
    fn send_batch(
        &self,
        msgs: &[UdOut<'_>],
        done: &mut dyn FnMut(usize, Result<(), BackendError>),
    ) {
        self.batches.lock().unwrap().push(msgs.len());
        for (i, m) in msgs.iter().enumerate() {
            done(i, self.send(m.dgid, m.dqpn, m.qkey, m.imm, m.data));
        }
    }
    fn try_recv(&self) -> Option<UdDatagram> {
        self.inbound.lock().unwrap().pop()
    }
}

impl RdmaBackend for FakeBackend {
    fn bind_gid(&self, gid: Gid) -> Result<(), BackendError> {
        if self.taken.contains(&gid) {
            return Err(BackendError::new(
                BackendErrorKind::AddressInUse,
                format!("{gid} is owned by another VM"),
            ));
        }
        self.bound.lock().unwrap().push(gid);
        Ok(())
    }
    fn unbind_gid(&self, gid: Gid) -> Result<(), BackendError> {
        self.bound.lock().unwrap().retain(|g| *g != gid);
        Ok(())
    }
    fn send_mad(&self, sgid: Gid, dgid: Gid, mad: &[u8]) -> Result<(), BackendError> {
        if !self.bound.lock().unwrap().contains(&sgid) {
            return Err(BackendError::new(BackendErrorKind::Refused, "spoofed"));
        }
        self.mads.lock().unwrap().push((sgid, dgid, mad.to_vec()));
        Ok(())
    }
    fn receive_buffers_posted(&self) {}
    fn create_ud_qp(&self, _gid: Gid, _qkey: u32) -> Result<Box<dyn UdQueue>, BackendError> {
        Ok(Box::new(FakeUd {
            sent: self.ud_sent.clone(),
            inbound: self.ud_inbound.clone(),
            batches: self.ud_batches.clone(),
        }))
    }
}

const MEM: usize = 4 << 20;

/// A scripted guest driver writing into the byte-vector memory.
struct Guest {
    mem: Arc<VecMemory>,
    dev: Device,
    backend: Arc<FakeBackend>,
    inbox: Arc<MadInbox>,
    next: u64,
    cmd: u64,
    resp: u64,
    async_pages: Vec<u64>,
}

fn gid(a: u8) -> Gid {
    Gid::from_ipv4(core::net::Ipv4Addr::new(127, 0, 1, a)).canonical()
}

impl Guest {
    fn new(backend: FakeBackend) -> Guest {
        let backend = Arc::new(backend);
        Guest::with_backend(backend.clone(), backend)
    }

    /// A guest whose device uses `dev_backend` (`backend` only answers the fake's queries).
    fn with_backend(backend: Arc<FakeBackend>, dev_backend: Arc<dyn RdmaBackend>) -> Guest {
        let mem = Arc::new(VecMemory::new(MEM));
        let inbox = Arc::new(MadInbox::default());
        let dev = Device::new(mem.clone(), dev_backend, inbox.clone());
        let mut g = Guest {
            mem,
            dev,
            backend,
            inbox,
            next: 0x10000,
            cmd: 0,
            resp: 0,
            async_pages: Vec::new(),
        };
        g.cmd = g.page();
        g.resp = g.page();
        let dsr = g.page();
        let (async_dir, async_pages) = g.pdir(2);
        g.async_pages = async_pages;
        let d = abi::DeviceSharedRegion {
            cmd_slot_dma: g.cmd,
            resp_slot_dma: g.resp,
            async_ring_pages: abi::RingPageInfo {
                num_pages: 2,
                reserved: 0,
                pdir_dma: async_dir,
            },
            ..Default::default()
        };
        g.mem.write(dsr, d.as_bytes()).unwrap();
        g.dev.write_reg(abi::PVRDMA_REG_DSRLOW, dsr as u32);
        g.dev.write_reg(abi::PVRDMA_REG_DSRHIGH, 0);
        g.dev
            .write_reg(abi::PVRDMA_REG_CTL, abi::PVRDMA_DEVICE_CTL_ACTIVATE);
        assert_eq!(g.dev.read_reg(abi::PVRDMA_REG_ERR), 0);
        g
    }

    /// A PD, a DMA MR, a CQ of 16 entries and a UD QP in RTS on GID index 0 (`gid(1)`):
    /// (lkey, CQ pages, QPN, QP pages).
    fn ud_qp_in_rts(&mut self) -> (u32, Vec<u64>, u32, Vec<u64>) {
        let pd = self.create_pd();
        let lkey = self.dma_mr(pd);
        let (cq, cq_pages) = self.create_cq(16);
        assert_eq!(self.bind(0, gid(1)), 0);
        let (e, qpn, qp_pages) = self.create_qp(pd, cq, abi::qp_type::UD);
        assert_eq!(e, 0);
        for s in [qp_state::INIT, qp_state::RTR, qp_state::RTS] {
            assert_eq!(self.modify(qpn, s), 0);
        }
        (lkey, cq_pages, qpn, qp_pages)
    }

    fn page(&mut self) -> u64 {
        let p = self.next;
        self.next += 4096;
        p
    }

    /// A page directory for `n` fresh pages; returns (pdir, pages).
    fn pdir(&mut self, n: usize) -> (u64, Vec<u64>) {
        let dir = self.page();
        let table = self.page();
        self.mem.write(dir, &table.to_le_bytes()).unwrap();
        let pages: Vec<u64> = (0..n).map(|_| self.page()).collect();
        for (i, p) in pages.iter().enumerate() {
            self.mem
                .write(table + 8 * i as u64, &p.to_le_bytes())
                .unwrap();
        }
        (dir, pages)
    }

    /// Runs a command; returns (err, response bytes).
    fn cmd<T: IntoBytes + pvrdma_abi::Immutable>(&mut self, c: &T) -> (u8, Vec<u8>) {
        self.mem.write(self.cmd, c.as_bytes()).unwrap();
        self.dev.write_reg(abi::PVRDMA_REG_REQUEST, 0);
        let mut r = vec![0u8; 256];
        self.mem.read(self.resp, &mut r).unwrap();
        let err = self.dev.read_reg(abi::PVRDMA_REG_ERR) as u8;
        assert_eq!(r[12], err, "response header and ERR register agree");
        (err, r)
    }

    fn u32_at(r: &[u8], off: usize) -> u32 {
        u32::from_le_bytes(r[off..off + 4].try_into().unwrap())
    }

    fn hdr(cmd: u32) -> abi::CmdHdr {
        abi::CmdHdr {
            response: 0x77,
            cmd,
            reserved: 0,
        }
    }

    fn create_pd(&mut self) -> u32 {
        let (e, r) = self.cmd(&abi::CmdCreatePd {
            hdr: Self::hdr(cmd_code::CREATE_PD),
            ..Default::default()
        });
        assert_eq!(e, 0);
        assert_eq!(Self::u32_at(&r, 8), abi::resp_code::CREATE_PD);
        Self::u32_at(&r, 16)
    }

    fn dma_mr(&mut self, pd: u32) -> u32 {
        let (e, r) = self.cmd(&abi::CmdCreateMr {
            hdr: Self::hdr(cmd_code::CREATE_MR),
            length: u64::MAX,
            pd_handle: pd,
            access_flags: 1,
            flags: abi::PVRDMA_MR_FLAG_DMA,
            ..Default::default()
        });
        assert_eq!(e, 0);
        Self::u32_at(&r, 20)
    }

    fn create_cq(&mut self, n: u32) -> (u32, Vec<u64>) {
        let (dir, pages) = self.pdir(2);
        let (e, r) = self.cmd(&abi::CmdCreateCq {
            hdr: Self::hdr(cmd_code::CREATE_CQ),
            pdir_dma: dir,
            cqe: n,
            nchunks: 2,
            ..Default::default()
        });
        assert_eq!(e, 0);
        (Self::u32_at(&r, 16), pages)
    }

    fn create_qp(&mut self, pd: u32, cq: u32, ty: u8) -> (u8, u32, Vec<u64>) {
        let (dir, pages) = self.pdir(3);
        let (e, r) = self.cmd(&abi::CmdCreateQp {
            hdr: Self::hdr(cmd_code::CREATE_QP),
            pdir_dma: dir,
            pd_handle: pd,
            send_cq_handle: cq,
            recv_cq_handle: cq,
            max_send_wr: 16,
            max_recv_wr: 16,
            max_send_sge: 1,
            max_recv_sge: 1,
            total_chunks: 3,
            send_chunks: 1,
            qp_type: ty,
            ..Default::default()
        });
        (e, Self::u32_at(&r, 16), pages)
    }

    fn modify(&mut self, qp: u32, state: u32) -> u8 {
        let mut attrs = abi::QpAttr {
            qp_state: state,
            ..Default::default()
        };
        attrs.qkey = 0;
        self.cmd(&abi::CmdModifyQp {
            hdr: Self::hdr(cmd_code::MODIFY_QP),
            qp_handle: qp,
            attr_mask: abi::qp_attr_mask::STATE,
            attrs,
        })
        .0
    }

    fn bind(&mut self, index: u32, g: Gid) -> u8 {
        self.cmd(&abi::CmdCreateBind {
            hdr: Self::hdr(cmd_code::CREATE_BIND),
            index,
            new_gid: g.0,
            gid_type: 1,
            ..Default::default()
        })
        .0
    }

    fn cqes(&self, cq_pages: &[u64]) -> Vec<abi::Cqe> {
        let tail = self.mem.load_u32(cq_pages[0] + 8).unwrap();
        (0..tail)
            .map(|i| {
                let mut c = abi::Cqe::default();
                self.mem
                    .read(cq_pages[1] + 64 * i as u64, c.as_mut_bytes())
                    .unwrap();
                c
            })
            .collect()
    }

    /// Posts a receive of `len` bytes at `buf` with `lkey` into slot `i` of the QP's RQ.
    fn post_recv(&self, qp_pages: &[u64], i: u32, buf: u64, len: u32, lkey: u32) {
        let at = qp_pages[2] + 32 * i as u64;
        let h = abi::RqWqeHdr {
            wr_id: 100 + i as u64,
            num_sge: 1,
            total_len: 0,
        };
        self.mem.write(at, h.as_bytes()).unwrap();
        let s = abi::Sge {
            addr: buf,
            length: len,
            lkey,
        };
        self.mem.write(at + 16, s.as_bytes()).unwrap();
        self.mem.store_u32(qp_pages[0] + 8, i + 1).unwrap();
    }

    /// INIT → RTR → RTS, each accepted.
    fn move_to_rts(&mut self, qpn: u32) {
        for s in [qp_state::INIT, qp_state::RTR, qp_state::RTS] {
            assert_eq!(self.modify(qpn, s), 0);
        }
    }

    /// Posts a QP1 send of `length` bytes at `addr` to QP1 of `gid(9)`.
    fn post_mad(&self, qp_pages: &[u64], i: u32, addr: u64, length: u32, lkey: u32) {
        self.post_send(qp_pages, i, gid(9), 1, abi::Sge { addr, length, lkey });
    }

    fn post_send(&self, qp_pages: &[u64], i: u32, dgid: Gid, dqpn: u32, sge: abi::Sge) {
        let at = qp_pages[1] + 128 * i as u64;
        let h = abi::SqWqeHdr {
            wr_id: 200 + i as u64,
            num_sge: 1,
            opcode: abi::wr_opcode::SEND,
            send_flags: abi::send_flags::SIGNALED,
            ud_remote_qpn: dqpn,
            ud_remote_qkey: 0x8001_0000,
            ud_av: abi::Av {
                dgid: dgid.0,
                gid_index: 0,
                ..Default::default()
            },
            ..Default::default()
        };
        self.mem.write(at, h.as_bytes()).unwrap();
        self.mem.write(at + 80, sge.as_bytes()).unwrap();
        self.mem.store_u32(qp_pages[0], i + 1).unwrap();
    }
}

#[test]
fn gsi_queue_pair_sends_and_receives_mads() {
    let mut g = Guest::new(FakeBackend::default());
    let (e, r) = g.cmd(&abi::CmdQueryPort {
        hdr: Guest::hdr(cmd_code::QUERY_PORT),
        port_num: 1,
        ..Default::default()
    });
    assert_eq!(e, 0);
    assert_eq!(Guest::u32_at(&r, 16), abi::port_state::ACTIVE);
    assert_eq!(g.bind(0, gid(1)), 0);
    assert_eq!(g.backend.bound.lock().unwrap().as_slice(), &[gid(1)]);
    let pd = g.create_pd();
    let lkey = g.dma_mr(pd);
    let (cq, cq_pages) = g.create_cq(64);
    let (e, qpn, qp_pages) = g.create_qp(pd, cq, abi::qp_type::GSI);
    assert_eq!((e, qpn), (0, 1));
    g.move_to_rts(qpn);
    // Send a MAD.
    let buf = g.page();
    g.mem.write(buf, &[0x11; 256]).unwrap();
    g.post_mad(&qp_pages, 0, buf, 256, lkey);
    g.dev.poll();
    assert_eq!(g.backend.mads.lock().unwrap().len(), 1);
    // Inbound MAD: refused while no buffer, accepted once one is posted.
    let mad = [0x22u8; 256];
    assert!(g.inbox.deliver(&[0xaa; GRH_LEN], &mad).is_err());
    let rbuf = g.page();
    g.post_recv(&qp_pages, 0, rbuf, 296, lkey);
    g.dev.poll();
    g.inbox.deliver(&[0xaa; GRH_LEN], &mad).unwrap();
    g.dev.poll();
    let cqes = g.cqes(&cq_pages);
    assert_eq!(cqes.len(), 2);
    assert_eq!(
        (cqes[0].opcode, cqes[0].status, cqes[0].wr_id),
        (abi::wc_opcode::SEND, 0, 200)
    );
    assert_eq!(
        (cqes[1].opcode, cqes[1].status, cqes[1].byte_len),
        (abi::wc_opcode::RECV, 0, 296)
    );
    assert_eq!(cqes[1].wc_flags & abi::wc_flags::GRH, abi::wc_flags::GRH);
    let mut got = [0u8; 296];
    g.mem.read(rbuf, &mut got).unwrap();
    assert_eq!(&got[..40], &[0xaa; 40]);
    assert_eq!(&got[40..], &mad);
    // The device state is plain data.
    let st = g.dev.state();
    assert_eq!(
        (st.pds.len(), st.mrs.len(), st.cqs.len(), st.qps.len()),
        (1, 1, 1, 1)
    );
    assert_eq!(st.qps[0].state, qp_state::RTS);
    assert_eq!(st.gids[0], Some(gid(1).0));
    let json = serde_json::to_string(&st).unwrap();
    assert_eq!(
        serde_json::from_str::<crate::device::DeviceState>(&json).unwrap(),
        st
    );
    // Unbinding on DESTROY_BIND.
    let (e, _) = g.cmd(&abi::CmdDestroyBind {
        hdr: Guest::hdr(cmd_code::DESTROY_BIND),
        index: 0,
        dest_gid: gid(1).0,
        ..Default::default()
    });
    assert_eq!(e, 0);
    assert!(g.backend.bound.lock().unwrap().is_empty());
}

/// A backend whose peer answers every MAD at once, inside the send (as a loopback answer can
/// come back before the device's pass ends).
struct AnsweringBackend {
    inner: Arc<FakeBackend>,
    inbox: Mutex<Option<Arc<MadInbox>>>,
    /// Whether each answer was taken (the guest had a receive buffer the device knew of).
    taken: Mutex<Vec<bool>>,
}

impl RdmaBackend for AnsweringBackend {
    fn bind_gid(&self, gid: Gid) -> Result<(), BackendError> {
        self.inner.bind_gid(gid)
    }
    fn unbind_gid(&self, gid: Gid) -> Result<(), BackendError> {
        self.inner.unbind_gid(gid)
    }
    fn send_mad(&self, sgid: Gid, dgid: Gid, mad: &[u8]) -> Result<(), BackendError> {
        self.inner.send_mad(sgid, dgid, mad)?;
        if let Some(inbox) = &*self.inbox.lock().unwrap() {
            let ok = inbox.deliver(&[0xbb; GRH_LEN], &[0x33; 256]).is_ok();
            self.taken.lock().unwrap().push(ok);
        }
        Ok(())
    }
    fn receive_buffers_posted(&self) {}
    fn create_ud_qp(&self, gid: Gid, qkey: u32) -> Result<Box<dyn UdQueue>, BackendError> {
        self.inner.create_ud_qp(gid, qkey)
    }
}

#[test]
fn an_answer_that_comes_back_during_the_send_finds_the_receive_buffers() {
    // The guest posts its QP1 receive buffers and its first MAD between two passes of the
    // device (a fresh VM connecting); the answer arrives while the pass is still sending.
    let inner = Arc::new(FakeBackend::default());
    let answering = Arc::new(AnsweringBackend {
        inner: inner.clone(),
        inbox: Mutex::new(None),
        taken: Mutex::new(Vec::new()),
    });
    let mut g = Guest::with_backend(inner, answering.clone());
    *answering.inbox.lock().unwrap() = Some(g.inbox.clone());
    assert_eq!(g.bind(0, gid(1)), 0);
    let pd = g.create_pd();
    let lkey = g.dma_mr(pd);
    let (cq, cq_pages) = g.create_cq(64);
    let (_, qpn, qp_pages) = g.create_qp(pd, cq, abi::qp_type::GSI);
    g.move_to_rts(qpn);
    g.dev.poll();
    let rbuf = g.page();
    g.post_recv(&qp_pages, 0, rbuf, 296, lkey);
    let buf = g.page();
    g.mem.write(buf, &[0x11; 256]).unwrap();
    g.post_mad(&qp_pages, 0, buf, 256, lkey);
    g.dev.poll();
    assert_eq!(
        answering.taken.lock().unwrap().as_slice(),
        &[true],
        "the answer was refused for lack of a buffer the guest had posted"
    );
    g.dev.poll_receives();
    let recv: Vec<_> = g
        .cqes(&cq_pages)
        .into_iter()
        .filter(|c| c.opcode == abi::wc_opcode::RECV)
        .collect();
    assert_eq!(recv.len(), 1);
    let mut got = [0u8; 296];
    g.mem.read(rbuf, &mut got).unwrap();
    assert_eq!(&got[40..], &[0x33; 256]);
}

#[test]
fn ud_queue_pair_maps_to_a_host_queue_pair() {
    let mut g = Guest::new(FakeBackend::default());
    let pd = g.create_pd();
    let lkey = g.dma_mr(pd);
    let (cq, cq_pages) = g.create_cq(16);
    let (e, _, _) = g.create_qp(pd, cq, abi::qp_type::UD);
    assert_eq!(e, errno::EINVAL, "UD QPs need a bound GID");
    assert_eq!(g.bind(0, gid(1)), 0);
    let (e, qpn, qp_pages) = g.create_qp(pd, cq, abi::qp_type::UD);
    assert_eq!((e, qpn), (0, 0x42));
    g.move_to_rts(qpn);
    let buf = g.page();
    g.mem.write(buf, b"hello").unwrap();
    g.post_send(
        &qp_pages,
        0,
        gid(2),
        0x99,
        abi::Sge {
            addr: buf,
            length: 5,
            lkey,
        },
    );
    g.backend.ud_inbound.lock().unwrap().push(UdDatagram {
        sgid: gid(2),
        src_qpn: 0x99,
        grh: [1; 40],
        imm: None,
        data: b"world".to_vec(),
    });
    let rbuf = g.page();
    g.post_recv(&qp_pages, 0, rbuf, 100, lkey);
    // What the idle wait watches: nothing pending or written yet.
    assert!(!g.dev.completions_pending());
    assert_eq!(g.dev.completion_count(), 0);
    g.dev.poll();
    assert_eq!(
        g.backend.ud_sent.lock().unwrap()[0],
        (gid(2), 0x99, b"hello".to_vec())
    );
    let cqes = g.cqes(&cq_pages);
    assert_eq!(cqes.len(), 2);
    assert_eq!(g.dev.completion_count(), 2);
    assert!(g.dev.completions_pending(), "unconsumed CQEs are pending");
    // The guest consumes both (cons_head := prod_tail): nothing pending any more.
    let tail = g.mem.load_u32(cq_pages[0] + 8).unwrap();
    g.mem.store_u32(cq_pages[0] + 12, tail).unwrap();
    assert!(!g.dev.completions_pending());
    // One pass runs the receives, then the sends.
    assert_eq!(
        cqes.iter().map(|c| c.opcode).collect::<Vec<_>>(),
        [abi::wc_opcode::RECV, abi::wc_opcode::SEND]
    );
    assert_eq!((cqes[0].byte_len, cqes[0].src_qp), (45, 0x99));
    let mut got = [0u8; 5];
    g.mem.read(rbuf + 40, &mut got).unwrap();
    assert_eq!(&got, b"world");
}

/// The UD sends one pass finds leave in one batch; their completions keep the WQEs' order,
/// and a send the host refuses completes with an error while the others go out.
#[test]
fn the_ud_sends_of_a_pass_leave_in_one_batch_and_complete_in_order() {
    let mut g = Guest::new(FakeBackend::default());
    let pd = g.create_pd();
    let lkey = g.dma_mr(pd);
    let (cq, cq_pages) = g.create_cq(16);
    assert_eq!(g.bind(0, gid(1)), 0);
    let (e, qpn, qp_pages) = g.create_qp(pd, cq, abi::qp_type::UD);
    assert_eq!(e, 0);
    g.move_to_rts(qpn);
    let msgs: [&[u8]; 4] = [b"one", b"two", b"fail", b"four"];
    for (i, m) in msgs.iter().enumerate() {
        let buf = g.page();
        g.mem.write(buf, m).unwrap();
        let sge = abi::Sge {
            addr: buf,
            length: m.len() as u32,
            lkey,
        };
        g.post_send(&qp_pages, i as u32, gid(2), 0x99, sge);
    }
    g.dev.poll();
    assert_eq!(g.backend.ud_batches.lock().unwrap().as_slice(), &[4]);
    let sent: Vec<Vec<u8>> = g
        .backend
        .ud_sent
        .lock()
        .unwrap()
        .iter()
        .map(|s| s.2.clone())
        .collect();
    assert_eq!(sent, [b"one".to_vec(), b"two".to_vec(), b"four".to_vec()]);
    let cqes = g.cqes(&cq_pages);
    let got: Vec<(u64, u32, u32)> = cqes
        .iter()
        .map(|c| (c.wr_id, c.status, c.byte_len))
        .collect();
    let fail = abi::wc_status::GENERAL_ERR;
    assert_eq!(got, [(200, 0, 3), (201, 0, 3), (202, fail, 0), (203, 0, 4)]);
    let st = g.dev.stats();
    assert_eq!((st.ud_sent, st.wr_errors), (3, 1));
}

/// What arrives while another thread holds the device (a vCPU sending in its idle wait) is
/// delivered by that thread when it lets go: the receive thread never blocks on the lock,
/// and nothing is left waiting for the device thread.
#[test]
fn a_delivery_that_finds_the_device_locked_is_run_when_the_holder_lets_go() {
    let mut g = Guest::new(FakeBackend::default());
    let (lkey, cq_pages, _, qp_pages) = g.ud_qp_in_rts();
    let rbufs = [g.page(), g.page()];
    for (i, b) in rbufs.iter().enumerate() {
        g.post_recv(&qp_pages, i as u32, *b, 100, lkey);
    }
    let datagram = |data: &[u8]| UdDatagram {
        sgid: gid(2),
        src_qpn: 0x99,
        grh: [1; 40],
        imm: None,
        data: data.to_vec(),
    };
    let Guest {
        mem, dev, backend, ..
    } = g;
    let shared = Arc::new(crate::attach::Shared::new(dev));

    // The device is free: delivered at once on the calling thread.
    backend.ud_inbound.lock().unwrap().push(datagram(b"first"));
    shared.deliver();
    assert_eq!(shared.lock().completion_count(), 1);
    assert_eq!(shared.published(), 1);

    // The device is held: the delivery returns without it and without blocking ...
    let held = shared.lock();
    backend.ud_inbound.lock().unwrap().push(datagram(b"second"));
    let s = shared.clone();
    std::thread::spawn(move || s.deliver()).join().unwrap();
    assert_eq!(
        held.completion_count(),
        1,
        "nothing delivered under the lock"
    );
    assert_eq!(shared.published(), 1);
    // ... and the holder runs it when it lets go.
    drop(held);
    assert_eq!(shared.published(), 2);
    assert_eq!(shared.lock().completion_count(), 2);
    let mut got = [0u8; 6];
    mem.read(rbufs[1] + 40, &mut got).unwrap();
    assert_eq!(&got, b"second");
    let tail = mem.load_u32(cq_pages[0] + 8).unwrap();
    assert_eq!(tail, 2, "two CQEs written");
}

#[test]
fn hostile_commands_get_errors() {
    let mut taken = FakeBackend::default();
    taken.taken.push(gid(7));
    let mut g = Guest::new(taken);
    // Unknown and unsupported commands.
    let (e, r) = g.cmd(&Guest::hdr(0xdead_beef));
    assert_eq!(e, errno::EOPNOTSUPP);
    assert_eq!(Guest::u32_at(&r, 8), abi::resp_code::for_cmd(cmd_code::MAX));
    let (e, _) = g.cmd(&abi::CmdCreateUc {
        hdr: Guest::hdr(cmd_code::CREATE_UC),
        ..Default::default()
    });
    assert_eq!(e, errno::EOPNOTSUPP);
    // GID owned by another VM; index beyond the table; zero GID.
    assert_eq!(g.bind(0, gid(7)), errno::EADDRINUSE);
    assert_eq!(g.bind(99, gid(1)), errno::EINVAL);
    assert_eq!(g.bind(0, Gid::default()), errno::EINVAL);
    // Unknown handles.
    let (e, _) = g.cmd(&abi::CmdDestroyPd {
        hdr: Guest::hdr(cmd_code::DESTROY_PD),
        pd_handle: 12345,
        ..Default::default()
    });
    assert_eq!(e, errno::ENOENT);
    let pd = g.create_pd();
    let (e, _, _) = g.create_qp(pd, 999, abi::qp_type::GSI);
    assert_eq!(e, errno::ENOENT);
    // Page directories outside guest RAM, unaligned, or with tables pointing outside.
    for pdir in [0x1_0000_0000u64, 0x10008, !0xfffu64] {
        let (e, _) = g.cmd(&abi::CmdCreateCq {
            hdr: Guest::hdr(cmd_code::CREATE_CQ),
            pdir_dma: pdir,
            cqe: 16,
            nchunks: 2,
            ..Default::default()
        });
        assert!(e == errno::EFAULT, "pdir {pdir:#x}: {e}");
    }
    let dir = g.page();
    g.mem.write(dir, &(MEM as u64).to_le_bytes()).unwrap();
    let (e, _) = g.cmd(&abi::CmdCreateCq {
        hdr: Guest::hdr(cmd_code::CREATE_CQ),
        pdir_dma: dir,
        cqe: 16,
        nchunks: 2,
        ..Default::default()
    });
    assert_eq!(e, errno::EFAULT);
    // Sizes: not a power of two, too many pages, MR that wraps.
    let (e, _) = g.cmd(&abi::CmdCreateCq {
        hdr: Guest::hdr(cmd_code::CREATE_CQ),
        pdir_dma: dir,
        cqe: 17,
        nchunks: 2,
        ..Default::default()
    });
    assert_eq!(e, errno::EINVAL);
    let (e, _) = g.cmd(&abi::CmdCreateMr {
        hdr: Guest::hdr(cmd_code::CREATE_MR),
        start: u64::MAX - 10,
        length: 100,
        pdir_dma: dir,
        pd_handle: pd,
        nchunks: u32::MAX,
        ..Default::default()
    });
    assert_eq!(e, errno::EINVAL);
    // Illegal state transition.
    let (cq, _) = g.create_cq(16);
    let (e, qpn, _) = g.create_qp(pd, cq, abi::qp_type::GSI);
    assert_eq!(e, 0);
    assert_eq!(g.modify(qpn, qp_state::RTS), errno::EINVAL);
    // A second GSI QP.
    assert_eq!(g.create_qp(pd, cq, abi::qp_type::GSI).0, errno::EINVAL);
    // Busy PD and CQ.
    let (e, _) = g.cmd(&abi::CmdDestroyPd {
        hdr: Guest::hdr(cmd_code::DESTROY_PD),
        pd_handle: pd,
        ..Default::default()
    });
    assert_eq!(e, errno::EBUSY);
    // Command slot moved outside RAM by a hostile DSR: activation fails, commands fail.
    let dsr = g.page();
    let d = abi::DeviceSharedRegion {
        cmd_slot_dma: 0xdead_0000_0000,
        resp_slot_dma: g.resp,
        ..Default::default()
    };
    g.mem.write(dsr, d.as_bytes()).unwrap();
    g.dev.write_reg(abi::PVRDMA_REG_DSRLOW, dsr as u32);
    g.dev
        .write_reg(abi::PVRDMA_REG_CTL, abi::PVRDMA_DEVICE_CTL_ACTIVATE);
    assert_eq!(g.dev.read_reg(abi::PVRDMA_REG_ERR), errno::EFAULT as u32);
    assert!(g.dev.stats().command_errors >= 12);
}

#[test]
fn hostile_work_requests_and_ring_indexes() {
    let mut g = Guest::new(FakeBackend::default());
    assert_eq!(g.bind(0, gid(1)), 0);
    let pd = g.create_pd();
    let lkey = g.dma_mr(pd);
    let (cq, cq_pages) = g.create_cq(16);
    let (_, qpn, qp_pages) = g.create_qp(pd, cq, abi::qp_type::GSI);
    g.move_to_rts(qpn);
    let buf = g.page();
    // Bad lkey, buffer outside RAM, wrong length for a MAD, unbound GID index.
    g.post_mad(&qp_pages, 0, buf, 256, 0xbad);
    g.post_mad(&qp_pages, 1, MEM as u64 - 8, 256, lkey);
    g.post_mad(&qp_pages, 2, buf, 100, lkey);
    g.dev.poll();
    let st: Vec<u32> = g.cqes(&cq_pages).iter().map(|c| c.status).collect();
    assert_eq!(
        st,
        [
            abi::wc_status::LOC_PROT_ERR,
            abi::wc_status::LOC_PROT_ERR,
            abi::wc_status::LOC_LEN_ERR
        ]
    );
    assert!(g.backend.mads.lock().unwrap().is_empty());
    // A producer index beyond 2 x size: the QP goes to the error state, the device carries on.
    g.mem.store_u32(qp_pages[0], 0xffff_0000).unwrap();
    g.dev.poll();
    assert_eq!(g.dev.stats().qp_ring_errors, 1);
    // ... and the guest hears of it on the async event ring.
    assert_eq!(g.mem.load_u32(g.async_pages[0] + 8).unwrap(), 1);
    let mut eqe = abi::Eqe::default();
    g.mem.read(g.async_pages[1], eqe.as_mut_bytes()).unwrap();
    assert_eq!((eqe.kind, eqe.info), (abi::event::QP_FATAL, qpn));
    let (e, r) = g.cmd(&abi::CmdQueryQp {
        hdr: Guest::hdr(cmd_code::QUERY_QP),
        qp_handle: qpn,
        attr_mask: 0,
    });
    assert_eq!(e, 0);
    assert_eq!(Guest::u32_at(&r, 16), qp_state::ERR);
    // A CQ whose indexes are garbage stops taking completions, without harm.
    g.mem.store_u32(cq_pages[0] + 8, 0x7777_7777).unwrap();
    assert_eq!(g.modify(qpn, qp_state::RESET), 0);
    g.move_to_rts(qpn);
    g.mem.write(buf, &[0; 256]).unwrap();
    g.post_mad(&qp_pages, 0, buf, 256, lkey);
    g.dev.poll();
    assert_eq!(g.backend.mads.lock().unwrap().len(), 1);
    assert!(g.dev.stats().cq_overflows >= 1);
    // The device still answers commands.
    assert!(g.create_pd() > 0);
}

#[test]
fn reset_unbinds_every_gid() {
    let mut g = Guest::new(FakeBackend::default());
    assert_eq!(g.bind(0, gid(1)), 0);
    assert_eq!(g.bind(1, gid(2)), 0);
    g.dev
        .write_reg(abi::PVRDMA_REG_CTL, abi::PVRDMA_DEVICE_CTL_RESET);
    assert!(g.backend.bound.lock().unwrap().is_empty());
    assert!(g.dev.gids().is_empty());
}

#[derive(Default)]
struct Msis(Mutex<Vec<(u64, u32)>>);

impl crate::device::MsiSink for Msis {
    fn signal(&self, address: u64, data: u32) {
        self.0.lock().unwrap().push((address, data));
    }
}

#[test]
fn msix_vectors_for_responses_and_armed_cqs() {
    let mut g = Guest::new(FakeBackend::default());
    let msis = Arc::new(Msis::default());
    g.dev.set_msi_sink(msis.clone());
    for v in 0..3u64 {
        g.dev.write_msix(16 * v, 0xfee0_0000);
        g.dev.write_msix(16 * v + 4, 0);
        g.dev.write_msix(16 * v + 8, 0x40 + v as u32);
        g.dev.write_msix(16 * v + 12, 0);
    }
    // Disabled: the response interrupt stays pending.
    let pd = g.create_pd();
    assert!(msis.0.lock().unwrap().is_empty());
    assert_eq!(g.dev.read_msix(crate::device::MSIX_PBA_OFFSET) & 1, 1);
    // Enabling delivers it; then every command raises vector 0.
    g.dev.set_msix_control(true, false);
    assert_eq!(msis.0.lock().unwrap().as_slice(), &[(0xfee0_0000, 0x40)]);
    let lkey = g.dma_mr(pd);
    assert_eq!(msis.0.lock().unwrap().len(), 2);
    assert_eq!(g.dev.read_reg(abi::PVRDMA_REG_ICR) & 1, 1);
    // A masked vector is held back.
    g.dev.write_msix(12, 1);
    g.create_pd();
    assert_eq!(msis.0.lock().unwrap().len(), 2);
    g.dev.write_msix(12, 0);
    assert_eq!(msis.0.lock().unwrap().len(), 3);
    // A CQ armed through its doorbell raises vector 2 once.
    assert_eq!(g.bind(0, gid(1)), 0);
    let (cq, _) = g.create_cq(16);
    let (_, qpn, qp_pages) = g.create_qp(pd, cq, abi::qp_type::GSI);
    g.move_to_rts(qpn);
    g.dev.cq_doorbell(cq | abi::PVRDMA_UAR_CQ_ARM);
    msis.0.lock().unwrap().clear();
    let buf = g.page();
    g.post_mad(&qp_pages, 0, buf, 256, lkey);
    g.post_mad(&qp_pages, 1, buf, 256, lkey);
    g.dev.poll();
    assert_eq!(msis.0.lock().unwrap().as_slice(), &[(0xfee0_0000, 0x42)]);
}

#[test]
fn random_garbage_in_commands_rings_and_page_directories_never_breaks_the_device() {
    let mut g = Guest::new(FakeBackend::default());
    assert_eq!(g.bind(0, gid(1)), 0);
    let pd = g.create_pd();
    let lkey = g.dma_mr(pd);
    let (cq, cq_pages) = g.create_cq(16);
    let (_, qpn, qp_pages) = g.create_qp(pd, cq, abi::qp_type::GSI);
    g.move_to_rts(qpn);
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut rnd = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    // A scratch page directory whose entries are garbage.
    let dir = g.page();
    for _ in 0..3000 {
        let mut slot = [0u8; 256];
        for b in slot.iter_mut() {
            *b = rnd() as u8;
        }
        // Mostly real command codes, with garbage in every field.
        let code = (rnd() % 20) as u32;
        slot[8..12].copy_from_slice(&code.to_le_bytes());
        if rnd() % 2 == 0 {
            // Point page directories at the scratch directory, full of garbage entries.
            slot[16..24].copy_from_slice(&dir.to_le_bytes());
            slot[24..32].copy_from_slice(&(rnd() % 8).to_le_bytes());
        }
        for i in 0..4 {
            g.mem.write(dir + 8 * i, &rnd().to_le_bytes()).unwrap();
        }
        g.mem.write(g.cmd, &slot).unwrap();
        g.dev.write_reg(abi::PVRDMA_REG_REQUEST, 0);
        // Garbage ring indexes and work requests.
        let which = rnd() % 4;
        let at = match which {
            0 => qp_pages[0] + (rnd() % 16),
            1 => qp_pages[1] + (rnd() % 4096),
            2 => cq_pages[0] + (rnd() % 16),
            _ => qp_pages[2] + (rnd() % 4096),
        } & !3;
        g.mem.store_u32(at, rnd() as u32).unwrap();
        g.dev.poll();
    }
    // The device still answers, and a fresh set of objects works.
    let (e, _) = g.cmd(&abi::CmdQueryPort {
        hdr: Guest::hdr(cmd_code::QUERY_PORT),
        port_num: 1,
        ..Default::default()
    });
    assert_eq!(e, 0);
    assert!(g.dev.stats().command_errors > 1000);
    let _ = lkey;
}

mod hostile;

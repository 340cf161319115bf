//! The controller's command processing, driven by the shared polled driver (nvme-spec) over
//! real shared memory: a memfd for the doorbells and a memfd as the client's DMA memory.
use std::{
    fs::File,
    os::fd::FromRawFd,
    sync::{Arc, Mutex},
};

use nvme_device::{
    controller::{Controller, Doorbells},
    layout::{DOORBELL_AREA, DOORBELL_AREA_SIZE},
    namespace::Namespace,
};
use nvme_spec::{
    identify,
    opcode::{admin, io, log},
    queue::{self, DriverError, Platform, QueueMem, QueuePair},
    regs, Cqe, Sqe, Status,
};

const MEM: u64 = 8 << 20;
const IOVA: u64 = 0x100_0000;

fn memfd(size: u64) -> File {
    // SAFETY: valid name, checked result.
    let fd = unsafe { libc::memfd_create(c"test".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0);
    // SAFETY: fresh fd.
    let f = unsafe { File::from_raw_fd(fd) };
    f.set_len(size).unwrap();
    f
}

fn map(f: &File, off: u64, len: usize) -> *mut u8 {
    use std::os::fd::AsRawFd;
    // SAFETY: shared mapping of our own memfd, checked.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            f.as_raw_fd(),
            off as i64,
        )
    };
    assert_ne!(p, libc::MAP_FAILED);
    p.cast()
}

struct Env {
    ctrl: Arc<Mutex<Controller>>,
    db: *mut u8,
    mem: *mut u8,
    t: u64,
    _dir: tempdir::Dir,
}

mod tempdir {
    pub struct Dir(pub std::path::PathBuf);
    impl Dir {
        pub fn new(tag: &str) -> Self {
            let p = std::env::temp_dir().join(format!("nvme-dev-{tag}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&p);
            std::fs::create_dir_all(&p).unwrap();
            Dir(p)
        }
    }
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

impl Platform for &mut Env {
    fn reg_read32(&mut self, offset: u64) -> u32 {
        let mut b = [0u8; 4];
        self.ctrl.lock().unwrap().bar_read(offset, &mut b);
        u32::from_le_bytes(b)
    }
    fn reg_write32(&mut self, offset: u64, value: u32) {
        self.ctrl
            .lock()
            .unwrap()
            .bar_write(offset, &value.to_le_bytes());
    }
    fn doorbell(&mut self, offset: u64) -> *mut u32 {
        // SAFETY: inside the doorbell mapping.
        unsafe { self.db.add((offset - DOORBELL_AREA) as usize).cast() }
    }
    fn now_us(&mut self) -> u64 {
        // The device's polling thread, run inline: every clock read is one polling round.
        self.ctrl.lock().unwrap().poll();
        self.t += 1;
        self.t
    }
}

impl Env {
    fn new(tag: &str, block_size: u32, dstrd: u8) -> Env {
        let dir = tempdir::Dir::new(tag);
        let ns = Namespace::open(&dir.0.join("disk"), 4 << 20, block_size, true).unwrap();
        let bar = memfd(0x40000);
        let doorbells = Doorbells::map(&bar, DOORBELL_AREA, DOORBELL_AREA_SIZE as usize).unwrap();
        let mut ctrl = Controller::new(ns, doorbells, dstrd);
        let ram = memfd(MEM);
        ctrl.dma.map(IOVA, MEM, 0, &ram).unwrap();
        Env {
            ctrl: Arc::new(Mutex::new(ctrl)),
            db: map(&bar, DOORBELL_AREA, DOORBELL_AREA_SIZE as usize),
            mem: map(&ram, 0, MEM as usize),
            t: 0,
            _dir: dir,
        }
    }
    fn qmem(&self, index: u64, entries: u16) -> QueueMem {
        let base = 0x10000 * index;
        // SAFETY: inside the mapping.
        unsafe {
            QueueMem {
                sq: self.mem.add(base as usize).cast(),
                sq_bus: IOVA + base,
                cq: self.mem.add(base as usize + 0x8000).cast(),
                cq_bus: IOVA + base + 0x8000,
                entries,
            }
        }
    }
    fn buf(&mut self, off: u64, len: usize) -> &mut [u8] {
        // SAFETY: test-only view into the mapping.
        unsafe { std::slice::from_raw_parts_mut(self.mem.add(off as usize), len) }
    }
}

fn io_cmd(q: &mut QueuePair, env: &mut Env, sqe: Sqe) -> Cqe {
    q.submit(&sqe).unwrap();
    for _ in 0..1000 {
        env.ctrl.lock().unwrap().poll();
        if let Some(c) = q.poll() {
            q.ack();
            assert_eq!(c.cid(), sqe.cid());
            return c;
        }
    }
    panic!("no completion");
}

fn rw(op: u8, cid: u16, slba: u64, blocks: u32, prp1: u64, prp2: u64) -> Sqe {
    let mut s = Sqe::new(op, cid);
    s.set_nsid(1)
        .set_prps(prp1, prp2)
        .set_lba_range(slba, blocks);
    s
}

#[test]
fn bring_up_io_errors_and_reset() {
    let mut env = Env::new("bringup", 512, 9);
    let admin_mem = env.qmem(0, 32);
    let io_mem = env.qmem(1, 64);
    let ctrl_arc = env.ctrl.clone();
    // SAFETY: queue memory inside the mapping, zeroed.
    let mut c = unsafe { queue::Controller::init(&mut env, admin_mem) }.unwrap();
    assert_eq!(queue::Controller::<&mut Env>::dstrd(&c), 9);
    c.identify_controller(IOVA + 0x100000).unwrap();
    c.identify(0, 1, IOVA + 0x101000).unwrap();
    assert_eq!(c.set_queue_count(4).unwrap(), 4);
    // SAFETY: as above.
    let mut q = unsafe { c.create_io_queue(1, io_mem) }.unwrap();

    // Bad queue ids and sizes.
    let mut s = Sqe::new(admin::CREATE_CQ, 0);
    s.set_prps(IOVA + 0x30000, 0)
        .set_cdw(10, 15 << 16)
        .set_cdw(11, 1);
    let e = |r: Result<Cqe, DriverError>| match r {
        Err(DriverError::Command { status, .. }) => status,
        other => panic!("expected an error status, got {other:?}"),
    };
    assert!(e(c.admin(s)).same(Status::INVALID_QUEUE_ID), "qid 0");
    s.set_cdw(10, 15 << 16 | 1);
    assert!(e(c.admin(s)).same(Status::INVALID_QUEUE_ID), "duplicate");
    s.set_cdw(10, 15 << 16 | 9);
    assert!(
        e(c.admin(s)).same(Status::INVALID_QUEUE_ID),
        "beyond the granted 4"
    );
    s.set_cdw(10, 5000 << 16 | 2);
    assert!(e(c.admin(s)).same(Status::INVALID_QUEUE_SIZE));
    s.set_cdw(10, 15 << 16 | 2).set_prps(0x7000_0000, 0);
    assert!(
        e(c.admin(s)).same(Status::DATA_TRANSFER_ERROR),
        "queue outside DMA"
    );
    let mut sq = Sqe::new(admin::CREATE_SQ, 0);
    sq.set_prps(IOVA + 0x30000, 0)
        .set_cdw(10, 15 << 16 | 2)
        .set_cdw(11, 1 | 3 << 16);
    assert!(e(c.admin(sq)).same(Status::CQ_INVALID));
    let mut d = Sqe::new(admin::DELETE_SQ, 0);
    d.set_cdw(10, 3);
    assert!(e(c.admin(d)).same(Status::INVALID_QUEUE_ID));
    let mut d = Sqe::new(admin::DELETE_CQ, 0);
    d.set_cdw(10, 1);
    assert!(
        e(c.admin(d)).same(Status::INVALID_QUEUE_DELETION),
        "SQ 1 still uses CQ 1"
    );
    assert!(e(c.admin(Sqe::new(0x7f, 0))).same(Status::INVALID_OPCODE));

    // Features, logs, abort.
    let mut f = Sqe::new(admin::SET_FEATURES, 0);
    f.set_cdw(10, 8).set_cdw(11, 0x0a04);
    c.admin(f).unwrap();
    let mut g = Sqe::new(admin::GET_FEATURES, 0);
    g.set_cdw(10, 8);
    assert_eq!(c.admin(g).unwrap().result(), 0x0a04);
    let mut lp = Sqe::new(admin::GET_LOG_PAGE, 0);
    lp.set_prps(IOVA + 0x102000, 0)
        .set_cdw(10, log::SMART as u32 | 127 << 16);
    c.admin(lp).unwrap();
    lp.set_cdw(10, 0x7e | 127 << 16);
    assert!(e(c.admin(lp)).same(Status::INVALID_LOG_PAGE));
    let mut ab = Sqe::new(admin::ABORT, 0);
    ab.set_cdw(10, 1 | 5 << 16);
    assert_eq!(c.admin(ab).unwrap().result() & 1, 1, "not aborted");

    {
        let page = env.buf(0x100000, 4096);
        assert_eq!(identify::get_u32(page, identify::ctrl::SGLS), 0, "no SGLs");
        assert_eq!(identify::get_u32(page, identify::ctrl::NN), 1);
        let ns = env.buf(0x101000, 4096);
        assert_eq!(identify::get_u64(ns, identify::ns::NSZE), (4 << 20) / 512);
        assert_eq!(identify::lba_size(ns, 0), 512);
        let smart = env.buf(0x102000, 512);
        assert_eq!(smart[3], 100);
    }

    // I/O: a 64 KiB write through a PRP list, read back into another buffer.
    let data: Vec<u8> = (0..65536u32).map(|i| (i * 7 + 3) as u8).collect();
    env.buf(0x200000, 65536).copy_from_slice(&data);
    for i in 0..15u64 {
        let entry = IOVA + 0x201000 + i * 4096;
        env.buf(0x300000 + i * 8, 8)
            .copy_from_slice(&entry.to_le_bytes());
    }
    let w = io_cmd(
        &mut q,
        &mut env,
        rw(io::WRITE, 10, 100, 128, IOVA + 0x200000, IOVA + 0x300000),
    );
    assert!(w.status().is_success(), "{}", w.status());
    for i in 0..15u64 {
        let entry = IOVA + 0x401000 + i * 4096;
        env.buf(0x310000 + i * 8, 8)
            .copy_from_slice(&entry.to_le_bytes());
    }
    let r = io_cmd(
        &mut q,
        &mut env,
        rw(io::READ, 11, 100, 128, IOVA + 0x400000, IOVA + 0x310000),
    );
    assert!(r.status().is_success(), "{}", r.status());
    assert_eq!(env.buf(0x400000, 65536), &data[..]);
    let fl = io_cmd(&mut q, &mut env, *Sqe::new(io::FLUSH, 12).set_nsid(1));
    assert!(fl.status().is_success());

    // I/O errors.
    let st = |c: Cqe| c.status();
    assert!(st(io_cmd(
        &mut q,
        &mut env,
        rw(io::READ, 20, 8191, 2, IOVA + 0x400000, 0)
    ))
    .same(Status::LBA_OUT_OF_RANGE));
    assert!(st(io_cmd(
        &mut q,
        &mut env,
        rw(io::READ, 21, u64::MAX, 1, IOVA + 0x400000, 0)
    ))
    .same(Status::LBA_OUT_OF_RANGE));
    assert!(st(io_cmd(&mut q, &mut env, rw(0x55, 22, 0, 1, IOVA, 0))).same(Status::INVALID_OPCODE));
    assert!(st(io_cmd(
        &mut q,
        &mut env,
        rw(io::READ, 23, 0, 1, IOVA + 0x400002, 0)
    ))
    .same(Status::INVALID_PRP_OFFSET));
    assert!(st(io_cmd(
        &mut q,
        &mut env,
        rw(io::READ, 24, 0, 1, 0x7000_0000, 0)
    ))
    .same(Status::DATA_TRANSFER_ERROR));
    assert!(st(io_cmd(
        &mut q,
        &mut env,
        rw(io::WRITE, 25, 0, 16, IOVA + 0x400000, 0x7000_0000)
    ))
    .same(Status::DATA_TRANSFER_ERROR));
    assert!(
        st(io_cmd(
            &mut q,
            &mut env,
            rw(io::READ, 26, 0, 24, IOVA + 0x400000, 0x7000_0000)
        ))
        .same(Status::DATA_TRANSFER_ERROR),
        "list outside DMA"
    );
    let mut sgl = rw(io::READ, 27, 0, 1, IOVA + 0x400000, 0);
    sgl.dw[0] |= 1 << 14;
    assert!(
        st(io_cmd(&mut q, &mut env, sgl)).same(Status::INVALID_FIELD),
        "SGLs are refused"
    );
    let mut ns2 = rw(io::READ, 28, 0, 1, IOVA + 0x400000, 0);
    ns2.set_nsid(2);
    assert!(st(io_cmd(&mut q, &mut env, ns2)).same(Status::INVALID_NAMESPACE));
    assert!(
        st(io_cmd(
            &mut q,
            &mut env,
            rw(io::READ, 29, 0, 257, IOVA + 0x400000, 0)
        ))
        .same(Status::INVALID_FIELD),
        "beyond MDTS"
    );

    // Out-of-range doorbell values are ignored and counted.
    // SAFETY: inside the doorbell mapping.
    unsafe { env.db.add(0x1000).cast::<u32>().write_volatile(9999) };
    ctrl_arc.lock().unwrap().poll();
    assert_eq!(ctrl_arc.lock().unwrap().stats.bad_doorbells, 1);

    // Reset and shutdown.
    let stats = ctrl_arc.lock().unwrap().stats.clone();
    assert_eq!((stats.reads, stats.writes, stats.flushes), (4, 2, 1));
    assert!(stats.io_errors >= 10);
    let mut ctl = ctrl_arc.lock().unwrap();
    ctl.bar_write(regs::CC, &(regs::cc::ENABLE | 1 << 14).to_le_bytes());
    assert_eq!(
        ctl.csts() & regs::csts::SHST_MASK,
        regs::csts::SHST_COMPLETE
    );
    ctl.bar_write(regs::CC, &0u32.to_le_bytes());
    assert_eq!(ctl.csts(), 0);
    assert!(ctl.state().io_sqs.is_empty());
}

#[test]
fn dstrd_0_and_4k_blocks() {
    let mut env = Env::new("dstrd0", 4096, 0);
    let admin_mem = env.qmem(0, 8);
    let io_mem = env.qmem(1, 4);
    // SAFETY: as above.
    let mut c = unsafe { queue::Controller::init(&mut env, admin_mem) }.unwrap();
    assert_eq!(queue::Controller::<&mut Env>::dstrd(&c), 0);
    // SAFETY: as above.
    let mut q = unsafe { c.create_io_queue(1, io_mem) }.unwrap();
    // Wrap the 4-entry queue several times.
    for i in 0..10u16 {
        env.buf(0x200000, 4096).fill(i as u8);
        let w = io_cmd(
            &mut q,
            &mut env,
            rw(io::WRITE, i, i as u64, 1, IOVA + 0x200000, 0),
        );
        assert!(w.status().is_success());
    }
    for i in 0..10u16 {
        let r = io_cmd(
            &mut q,
            &mut env,
            rw(io::READ, 100 + i, i as u64, 1, IOVA + 0x300000, 0),
        );
        assert!(r.status().is_success());
        assert!(env.buf(0x300000, 4096).iter().all(|&b| b == i as u8));
    }
    assert!(io_cmd(
        &mut q,
        &mut env,
        rw(io::READ, 50, 1024, 1, IOVA + 0x300000, 0)
    )
    .status()
    .same(Status::LBA_OUT_OF_RANGE));
}

#[test]
fn the_wake_protocol_words_survive_a_reset_and_a_client_cannot_write_them() {
    use nvme_device::wake;
    let env = Env::new("wakewords", 512, 0);
    let word = |off: u64| {
        // SAFETY: inside the doorbell mapping, aligned.
        unsafe {
            &*env
                .db
                .add(off as usize)
                .cast::<std::sync::atomic::AtomicU32>()
        }
    };
    word(wake::MAGIC_OFFSET).store(wake::MAGIC, std::sync::atomic::Ordering::SeqCst);
    word(wake::HOST_KICKS_OFFSET).store(1, std::sync::atomic::Ordering::SeqCst);
    // A trapped write to a protocol word (a guest's, through the mediation) is dropped; an
    // ordinary doorbell write lands.
    let mut c = env.ctrl.lock().unwrap();
    c.bar_write(DOORBELL_AREA + wake::MAGIC_OFFSET, &0u32.to_le_bytes());
    c.bar_write(DOORBELL_AREA + wake::HOST_KICKS_OFFSET, &0u32.to_le_bytes());
    c.bar_write(DOORBELL_AREA + wake::WAKE_OFFSET, &1u32.to_le_bytes());
    c.bar_write(DOORBELL_AREA + 4, &3u32.to_le_bytes());
    assert_eq!(
        word(wake::MAGIC_OFFSET).load(std::sync::atomic::Ordering::SeqCst),
        wake::MAGIC
    );
    assert_eq!(
        word(wake::HOST_KICKS_OFFSET).load(std::sync::atomic::Ordering::SeqCst),
        1
    );
    assert_eq!(
        word(wake::WAKE_OFFSET).load(std::sync::atomic::Ordering::SeqCst),
        wake::AWAKE
    );
    assert_eq!(word(4).load(std::sync::atomic::Ordering::SeqCst), 3);
    // A controller reset zeroes the doorbells, not the protocol's words.
    c.reset();
    assert_eq!(word(4).load(std::sync::atomic::Ordering::SeqCst), 0);
    assert_eq!(
        word(wake::MAGIC_OFFSET).load(std::sync::atomic::Ordering::SeqCst),
        wake::MAGIC
    );
    assert_eq!(
        word(wake::HOST_KICKS_OFFSET).load(std::sync::atomic::Ordering::SeqCst),
        1
    );
}

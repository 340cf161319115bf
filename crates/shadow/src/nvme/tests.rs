//! The NVMe adapter against a simulated device and a simulated guest driver, both working on
//! in-memory buffers: exactly-once completions, dirty pages, hostile entries, and the
//! destination's re-alignment followed by direct operation.
use super::*;
use crate::VecBuffers;
use nvme_spec::opcode::io;

const BASE: u64 = 0x10_0000;
const SQ: u64 = BASE;
const CQ: u64 = BASE + 0x1000;
const DATA: u64 = BASE + 0x2000;
const PAGES: u64 = 32;

fn geo(entries: u32) -> QueueGeometry {
    QueueGeometry {
        qid: 1,
        sq_base: SQ,
        sq_entries: entries,
        cq_base: CQ,
        cq_entries: entries,
    }
}

fn limits() -> Limits {
    Limits {
        nsid: 1,
        block_size: 4096,
        max_transfer: 1 << 20,
    }
}

/// A device that completes every fetched command at once; Reads fill the page with a stamp.
#[derive(Default)]
struct Device {
    sq_head: u32,
    sq_tail: u32,
    cq_tail: u32,
    cq_head: u32,
    phase_flip: bool,
    fetched: Vec<u16>,
}

impl Device {
    fn process(&mut self, g: &QueueGeometry, bufs: &VecBuffers) {
        while self.sq_head != self.sq_tail {
            if step(self.cq_tail, g.cq_entries) == self.cq_head {
                return; // CQ full
            }
            let mut raw = [0u8; 64];
            assert!(bufs.read_device(g.sq_base + self.sq_head as u64 * 64, &mut raw));
            let sqe = Sqe::from_bytes(&raw);
            self.sq_head = step(self.sq_head, g.sq_entries);
            if sqe.opcode() == io::READ {
                let stamp = [sqe.cid() as u8; 4096];
                assert!(bufs.write_device(sqe.prp1(), &stamp));
            }
            self.fetched.push(sqe.cid());
            let cqe = Cqe::new(
                0,
                self.sq_head as u16,
                g.qid,
                sqe.cid(),
                Status::SUCCESS,
                !self.phase_flip,
            );
            assert!(bufs.write_device(g.cq_base + self.cq_tail as u64 * 16, &cqe.to_bytes()));
            self.cq_tail = step(self.cq_tail, g.cq_entries);
            if self.cq_tail == 0 {
                self.phase_flip = !self.phase_flip;
            }
        }
    }
}

/// A polled guest driver on the vCPU buffer (or on the device buffer in direct mode).
struct Guest {
    sq_tail: u32,
    cq_head: u32,
    phase: bool,
    next_cid: u16,
    outstanding: HashMap<u16, u8>,
    completed: Vec<(u16, Status)>,
}

impl Guest {
    fn new() -> Self {
        Guest {
            sq_tail: 0,
            cq_head: 0,
            phase: true,
            next_cid: 1,
            outstanding: HashMap::new(),
            completed: vec![],
        }
    }

    fn write(&mut self, g: &QueueGeometry, sqe: Sqe, direct: bool, bufs: &VecBuffers) -> u16 {
        let at = g.sq_base + self.sq_tail as u64 * 64;
        let ok = if direct {
            bufs.write_device(at, &sqe.to_bytes())
        } else {
            bufs.write_vcpu(at, &sqe.to_bytes())
        };
        assert!(ok);
        self.sq_tail = step(self.sq_tail, g.sq_entries);
        sqe.cid()
    }

    fn read(&mut self, g: &QueueGeometry, page: u64, direct: bool, bufs: &VecBuffers) -> u16 {
        let cid = self.next_cid;
        self.next_cid += 1;
        let mut s = Sqe::new(io::READ, cid);
        s.set_nsid(1)
            .set_prps(DATA + page * 4096, 0)
            .set_lba_range(page, 0);
        self.outstanding.insert(cid, 0);
        self.write(g, s, direct, bufs)
    }

    fn poll(&mut self, g: &QueueGeometry, direct: bool, bufs: &VecBuffers) -> usize {
        let mut n = 0;
        loop {
            let mut b = [0u8; 16];
            let at = g.cq_base + self.cq_head as u64 * 16;
            assert!(if direct {
                bufs.read_device(at, &mut b)
            } else {
                bufs.read_vcpu(at, &mut b)
            });
            let cqe = Cqe::from_bytes(&b);
            if cqe.phase() != self.phase {
                return n;
            }
            if cqe.status().is_success() {
                assert!(
                    self.outstanding.remove(&cqe.cid()).is_some(),
                    "completion for cid {} twice or never submitted",
                    cqe.cid()
                );
            }

            self.completed.push((cqe.cid(), cqe.status()));
            self.cq_head = step(self.cq_head, g.cq_entries);
            if self.cq_head == 0 {
                self.phase = !self.phase;
            }
            n += 1;
        }
    }
}

/// Runs `n` reads through the adapter; returns the dirty pages reported.
fn run_shadowed(
    q: &mut NvmeQueue,
    dev: &mut Device,
    guest: &mut Guest,
    bufs: &VecBuffers,
    n: usize,
) -> Vec<u64> {
    let g = q.geometry();
    let mut dirty = Vec::new();
    let mut submitted = 0;
    let mut rounds = 0;
    while submitted < n || !guest.outstanding.is_empty() {
        rounds += 1;
        assert!(rounds < 100_000, "no progress");
        // keep up to 3 outstanding
        while submitted < n && guest.outstanding.len() < 3 {
            guest.read(&g, (submitted as u64 * 7) % PAGES, false, bufs);
            submitted += 1;
        }
        if let Some(t) = q.on_guest_submit(guest.sq_tail, bufs).unwrap() {
            dev.sq_tail = t;
        }
        dev.process(&g, bufs);
        q.forward_completions(bufs, &mut dirty).unwrap();
        if guest.poll(&g, false, bufs) > 0 {
            if let Some(h) = q.on_guest_consume(guest.cq_head) {
                dev.cq_head = h;
            }
        }
    }
    dirty
}

#[test]
fn every_command_completes_exactly_once_and_read_pages_are_dirty() {
    let bufs = VecBuffers::new(BASE, (2 + PAGES as usize) * 4096);
    let g = geo(8);
    let mut q = NvmeQueue::attach(g, limits(), 0, 0, &bufs).unwrap();
    let (mut dev, mut guest) = (Device::default(), Guest::new());
    let dirty = run_shadowed(&mut q, &mut dev, &mut guest, &bufs, 50);
    assert_eq!(guest.completed.len(), 50);
    assert!(guest.completed.iter().all(|(_, s)| s.is_success()));
    assert_eq!(dirty.len(), 50);
    assert!(dirty
        .iter()
        .all(|p| (DATA..DATA + PAGES * 4096).contains(p)));
    assert_eq!(q.stats().forwarded, 50);
    assert_eq!(q.in_flight(), 0);
    assert!(q.in_sync());
    // the device wrote data into the device buffer, where the guest RAM is
    let mut b = [0u8; 1];
    bufs.read_device(DATA, &mut b);
    assert_ne!(b[0], 0);
}

#[test]
fn hostile_entries_get_errors_and_never_reach_the_device() {
    let bufs = VecBuffers::new(BASE, (2 + PAGES as usize) * 4096);
    let g = geo(8);
    let mut q = NvmeQueue::attach(g, limits(), 0, 0, &bufs).unwrap();
    let (mut dev, mut guest) = (Device::default(), Guest::new());
    // a PRP outside RAM, an unknown opcode, a duplicate command id while in flight
    let mut bad = Sqe::new(io::READ, 100);
    bad.set_nsid(1).set_prps(0x1000, 0);
    guest.write(&g, bad, false, &bufs);
    guest.write(&g, Sqe::new(0x42, 101), false, &bufs);
    let cid = guest.read(&g, 1, false, &bufs);
    let mut dup = Sqe::new(io::READ, cid);
    dup.set_nsid(1).set_prps(DATA, 0);
    guest.write(&g, dup, false, &bufs);
    dev.sq_tail = q.on_guest_submit(guest.sq_tail, &bufs).unwrap().unwrap();
    dev.process(&g, &bufs);
    let mut dirty = vec![];
    q.forward_completions(&bufs, &mut dirty).unwrap();
    guest.poll(&g, false, &bufs);
    let statuses: Vec<Status> = guest.completed.iter().map(|c| c.1).collect();
    assert_eq!(
        statuses,
        vec![
            Status::DATA_TRANSFER_ERROR,
            Status::INVALID_OPCODE,
            Status::CID_CONFLICT,
            Status::SUCCESS
        ]
    );
    assert_eq!(
        dev.fetched,
        vec![cid],
        "only the valid command reached the device"
    );
    assert_eq!(q.stats().refused, 3);
    // nonsense doorbells are counted and ignored
    assert_eq!(q.on_guest_submit(99, &bufs).unwrap(), None);
    assert_eq!(q.on_guest_consume(99), None);
    assert_eq!(q.on_guest_consume(7), None, "7 entries consumed, 4 posted");

    assert_eq!(q.stats().anomalies, 3);
    // the hypervisor-made completions delay the device's head but not the guest's
    let h = q.on_guest_consume(guest.cq_head);
    assert_eq!(h, Some(1));
}

#[test]
fn attach_finds_completions_posted_before_and_during_the_switch() {
    let bufs = VecBuffers::new(BASE, (2 + PAGES as usize) * 4096);
    let g = geo(8);
    let (mut dev, mut guest) = (Device::default(), Guest::new());
    // direct mode: three reads, the device completes them, the guest consumes one
    for p in 0..3 {
        guest.read(&g, p, true, &bufs);
    }
    dev.sq_tail = guest.sq_tail;
    dev.process(&g, &bufs);
    // the guest has seen and consumed exactly one completion
    let mut b = [0u8; 16];
    bufs.read_device(CQ, &mut b);
    guest.outstanding.remove(&Cqe::from_bytes(&b).cid());
    guest.cq_head = 1;
    dev.cq_head = 1;
    // two more reads submitted; the device fetches them after the copy was taken
    guest.read(&g, 3, true, &bufs);
    guest.read(&g, 4, true, &bufs);
    dev.sq_tail = guest.sq_tail;
    // the copy (vCPU buffer) is taken now
    let snapshot = bufs.device.borrow().clone();
    *bufs.vcpu.borrow_mut() = snapshot;
    dev.process(&g, &bufs); // completions posted between the copy and the swap
    let mut q = NvmeQueue::attach(g, limits(), guest.sq_tail, guest.cq_head, &bufs).unwrap();
    let mut dirty = vec![];
    q.forward_completions(&bufs, &mut dirty).unwrap();
    assert_eq!(
        dirty.len(),
        2,
        "the two reads completed after the copy dirtied their pages"
    );
    guest.poll(&g, false, &bufs);
    assert!(
        guest.outstanding.is_empty(),
        "every read completed exactly once: {:?}",
        guest.outstanding
    );
    assert_eq!(guest.completed.len(), 4);
}

#[test]
fn a_rebuilt_queue_realigns_with_fillers_then_runs_direct() {
    for (entries, before) in [(8u32, 0usize), (8, 5), (8, 13), (16, 37), (5, 11)] {
        let bufs = VecBuffers::new(BASE, (2 + PAGES as usize) * 4096);
        let g = geo(entries);
        let mut q = NvmeQueue::attach(g, limits(), 0, 0, &bufs).unwrap();
        let (mut dev, mut guest) = (Device::default(), Guest::new());
        run_shadowed(&mut q, &mut dev, &mut guest, &bufs, before);
        // one more completion the guest has not consumed yet at switchover
        guest.read(&g, 2, false, &bufs);
        dev.sq_tail = q
            .on_guest_submit(guest.sq_tail, &bufs)
            .unwrap()
            .unwrap_or(dev.sq_tail);
        dev.process(&g, &bufs);
        q.forward_completions(&bufs, &mut vec![]).unwrap();
        let state = q.state();

        // destination: the vCPU buffer arrives as is; the device is fresh
        let dest = VecBuffers::new(BASE, (2 + PAGES as usize) * 4096);
        *dest.vcpu.borrow_mut() = bufs.vcpu.borrow().clone();
        *dest.device.borrow_mut() = bufs.vcpu.borrow().clone();
        let mut q2 = NvmeQueue::rebuild(&state, limits(), &dest).unwrap();
        let mut dev2 = Device::default();
        let k = q2.start_alignment().unwrap();
        let mut steps = 0;
        loop {
            let s = q2.alignment_step(&dest).unwrap();
            if let Some(t) = s.sq_tail {
                dev2.sq_tail = t;
            }
            if let Some(h) = s.cq_head {
                dev2.cq_head = h;
            }
            if s.done {
                break;
            }
            dev2.process(&g, &dest);
            steps += 1;
            assert!(steps < 10_000);
        }
        assert_eq!(
            dev2.fetched.len() as u64,
            k,
            "fillers reached the device only"
        );
        assert!(dev2.fetched.iter().all(|&c| c == FILLER_CID));
        // the guest consumes the pending completion through the shadow
        guest.poll(&g, false, &dest);
        if let Some(h) = q2.on_guest_consume(guest.cq_head) {
            dev2.cq_head = h;
        }
        assert!(q2.in_sync(), "entries {entries}, {before} before");
        // leave shadow mode: the vCPU buffer becomes the device buffer; run direct
        for r in q2.rings() {
            let mut b = vec![0u8; (r.end - r.start) as usize];
            dest.read_vcpu(r.start, &mut b);
            dest.write_device(r.start, &b);
        }
        for round in 0..3 * entries {
            guest.read(&g, (round % 4) as u64, true, &dest);
            dev2.sq_tail = guest.sq_tail;
            dev2.process(&g, &dest);
            assert_eq!(
                guest.poll(&g, true, &dest),
                1,
                "direct I/O after re-alignment (round {round})"
            );
            dev2.cq_head = guest.cq_head;
        }
        assert!(guest.outstanding.is_empty());
    }
}

/// Buffers with a bounce area for PRP lists in the device's memory (one page per slot).
struct BounceBuffers {
    inner: VecBuffers,
    at: u64,
}

impl Buffers for BounceBuffers {
    fn read_vcpu(&self, gpa: u64, buf: &mut [u8]) -> bool {
        self.inner.read_vcpu(gpa, buf)
    }
    fn write_vcpu(&self, gpa: u64, data: &[u8]) -> bool {
        self.inner.write_vcpu(gpa, data)
    }
    fn read_device(&self, gpa: u64, buf: &mut [u8]) -> bool {
        self.inner.read_device(gpa, buf)
    }
    fn write_device(&self, gpa: u64, data: &[u8]) -> bool {
        self.inner.write_device(gpa, data)
    }
    fn in_ram(&self, gpa: u64, len: u64) -> bool {
        gpa.checked_add(len).is_some_and(|e| e <= self.at) && self.inner.in_ram(gpa, len)
    }
    fn bounce_prp_list(&self, _qid: u16, slot: usize, entries: &[u64]) -> Option<u64> {
        let iova = self.at + slot as u64 * 4096;
        let bytes = super::bounce::build(entries, iova, 1)?;
        self.inner.write_device(iova, &bytes).then_some(iova)
    }
}

#[test]
fn prp_lists_reach_the_device_as_validated_copies_the_guest_cannot_change() {
    // RAM: rings, data pages, the guest's list page; then 8 bounce pages (not guest RAM).
    let ram_len = (2 + PAGES as usize + 1) * 4096;
    let bufs = BounceBuffers {
        inner: VecBuffers::new(BASE, ram_len + 8 * 4096),
        at: BASE + ram_len as u64,
    };
    let list = DATA + PAGES * 4096;
    let g = geo(8);
    let mut q = NvmeQueue::attach(g, limits(), 0, 0, &bufs).unwrap();
    let mut dirty = Vec::new();
    let (mut sq_tail, mut dev_cq_head) = (0u32, 0u32);
    for i in 0..20u16 {
        let pages: Vec<u64> = (0..3)
            .map(|k| DATA + ((i as u64 * 3 + k) % PAGES) * 4096)
            .collect();
        let raw: Vec<u8> = pages[1..].iter().flat_map(|p| p.to_le_bytes()).collect();
        assert!(bufs.write_device(list, &raw));
        let mut s = Sqe::new(io::READ, 100 + i);
        s.set_nsid(1).set_prps(pages[0], list).set_lba_range(0, 3);
        assert!(bufs.write_vcpu(g.sq_base + sq_tail as u64 * 64, &s.to_bytes()));
        let slot = q.d.sq_tail;
        sq_tail = step(sq_tail, 8);
        assert!(q.on_guest_submit(sq_tail, &bufs).unwrap().is_some());
        // The guest rewrites its list after submitting: the device must not see it.
        let evil: Vec<u8> = [DATA, DATA].iter().flat_map(|p| p.to_le_bytes()).collect();
        assert!(bufs.write_device(list, &evil));
        let mut dev_sqe = [0u8; 64];
        assert!(bufs.read_device(g.sq_base + slot as u64 * 64, &mut dev_sqe));
        let dev_sqe = Sqe::from_bytes(&dev_sqe);
        assert!(
            dev_sqe.prp2() >= bufs.at,
            "PRP2 still names the guest's list"
        );
        let seen = validate::prp_pages(dev_sqe.prp1(), dev_sqe.prp2(), 3 * 4096, &bufs.inner);
        assert_eq!(seen.unwrap(), pages, "command {i}");
        // The device completes it; the bounce slot is free for the next one.
        let cqe = Cqe::new(
            0,
            q.d.sq_tail as u16,
            1,
            100 + i,
            Status::SUCCESS,
            (i / 8) % 2 == 0,
        );
        assert!(bufs.write_device(g.cq_base + (i as u64 % 8) * 16, &cqe.to_bytes()));
        assert_eq!(q.forward_completions(&bufs, &mut dirty).unwrap(), 1);
        dev_cq_head = step(dev_cq_head, 8);
        let _ = q.on_guest_consume(dev_cq_head);
    }
    assert_eq!(q.stats().bounced, 20);
    assert_eq!(
        dirty.len(),
        60,
        "every validated page of every read is dirty"
    );
}

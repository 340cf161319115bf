//! The virtio adapter between a simulated driver (on the vCPU buffer) and a simulated device
//! (on the device buffer), over in-memory guest RAM with ring copies standing for either side
//! as the engine's two designations do: exactly-once used entries, data and dirty pages,
//! indirect tables, 16-bit index wrap-around, chains in flight when shadowing begins, the
//! destination's rebuild, and hostile rings on both sides.
use std::{
    cell::{Cell, RefCell},
    collections::{BTreeSet, HashMap},
};

use virtio_spec::ring::{DESC_F_INDIRECT, DESC_F_NEXT, DESC_F_WRITE};

use super::*;

const BASE: u64 = 0x10_0000;
const PAGES: u64 = 64;
const DESC: u64 = BASE;
const AVAIL: u64 = BASE + 0x1000;
const USED: u64 = BASE + 0x2000;
/// First data page.
const DATA: u64 = BASE + 0x4000;
const DATA_PAGES: u64 = PAGES - 4;
/// Where the device reaches bounced indirect tables (outside guest RAM).
const BOUNCE: u64 = 0x1_0000_0000;
const PAGE: u64 = 4096;

fn features() -> u64 {
    bit(RING_INDIRECT_DESC) | bit(virtio_spec::features::VERSION_1)
}

fn geo(size: u16) -> VirtqGeometry {
    VirtqGeometry {
        index: 1,
        size,
        desc: DESC,
        avail: AVAIL,
        used: USED,
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Designation {
    /// The guest sees the ring copies, the device guest RAM.
    CopyIsVcpu,
    /// The guest sees guest RAM, the device the ring copies.
    CopyIsDevice,
}

/// Guest RAM, ring copies and a bounce area, seen as the engine's `EngineBuffers` sees them.
struct Mem {
    ram: RefCell<Vec<u8>>,
    copy: RefCell<Vec<u8>>,
    bounce: Option<RefCell<Vec<u8>>>,
    rings: Vec<Range<u64>>,
    designation: Designation,
    /// Before shadowing both sides are guest RAM.
    shadowed: Cell<bool>,
}

impl Mem {
    fn new(size: u16, designation: Designation, bounce: bool) -> Self {
        Mem {
            ram: RefCell::new(vec![0; (PAGES * PAGE) as usize]),
            copy: RefCell::new(vec![0; (PAGES * PAGE) as usize]),
            bounce: bounce.then(|| RefCell::new(vec![0; usize::from(size) * PAGE as usize])),
            rings: geo(size).ranges().to_vec(),
            designation,
            shadowed: Cell::new(false),
        }
    }

    /// What the engine does when shadowing begins: copy the ring pages.
    fn start_shadowing(&self) {
        for r in &self.rings {
            let (s, e) = ((r.start - BASE) as usize, (r.end - BASE) as usize);
            let src = self.ram.borrow()[s..e].to_vec();
            self.copy.borrow_mut()[s..e].copy_from_slice(&src);
        }
        self.shadowed.set(true);
    }

    fn off(gpa: u64, len: usize) -> Option<Range<usize>> {
        let s = usize::try_from(gpa.checked_sub(BASE)?).ok()?;
        let e = s.checked_add(len)?;
        (e as u64 <= PAGES * PAGE).then_some(s..e)
    }

    fn in_rings(&self, gpa: u64, len: usize) -> bool {
        let end = gpa.saturating_add(len as u64);
        self.rings.iter().any(|r| gpa < r.end && r.start < end)
    }

    fn access(
        &self,
        copy_side: bool,
        gpa: u64,
        len: usize,
    ) -> Option<(&RefCell<Vec<u8>>, Range<usize>)> {
        if copy_side && self.shadowed.get() && self.in_rings(gpa, len) {
            return Some((&self.copy, Self::off(gpa, len)?));
        }
        if let Some(b) = &self.bounce {
            if gpa >= BOUNCE {
                let s = usize::try_from(gpa - BOUNCE).ok()?;
                let e = s.checked_add(len)?;
                return (e <= b.borrow().len()).then_some((b, s..e));
            }
        }
        Some((&self.ram, Self::off(gpa, len)?))
    }

    fn read(&self, copy_side: bool, gpa: u64, buf: &mut [u8]) -> bool {
        self.access(copy_side, gpa, buf.len())
            .map(|(v, r)| buf.copy_from_slice(&v.borrow()[r]))
            .is_some()
    }

    fn write(&self, copy_side: bool, gpa: u64, data: &[u8]) -> bool {
        self.access(copy_side, gpa, data.len())
            .map(|(v, r)| v.borrow_mut()[r].copy_from_slice(data))
            .is_some()
    }

    fn ram_bytes(&self, gpa: u64, len: usize) -> Vec<u8> {
        let r = Self::off(gpa, len).expect("inside RAM");
        self.ram.borrow()[r].to_vec()
    }
}

impl Buffers for Mem {
    fn read_vcpu(&self, gpa: u64, buf: &mut [u8]) -> bool {
        self.read(self.designation == Designation::CopyIsVcpu, gpa, buf)
    }
    fn write_vcpu(&self, gpa: u64, data: &[u8]) -> bool {
        self.write(self.designation == Designation::CopyIsVcpu, gpa, data)
    }
    fn read_device(&self, gpa: u64, buf: &mut [u8]) -> bool {
        self.read(self.designation == Designation::CopyIsDevice, gpa, buf)
    }
    fn write_device(&self, gpa: u64, data: &[u8]) -> bool {
        self.write(self.designation == Designation::CopyIsDevice, gpa, data)
    }
    fn in_ram(&self, gpa: u64, len: u64) -> bool {
        usize::try_from(len)
            .ok()
            .and_then(|l| Self::off(gpa, l))
            .is_some()
    }
    fn bounce_prp_list(&self, qid: u16, slot: usize, entries: &[u64]) -> Option<u64> {
        let b = self.bounce.as_ref()?;
        assert_eq!(qid, 1);
        let bytes = crate::nvme::bounce::build(entries, BOUNCE + slot as u64 * PAGE, 1)?;
        let at = slot * PAGE as usize;
        b.borrow_mut()
            .get_mut(at..at + bytes.len())?
            .copy_from_slice(&bytes);
        Some(BOUNCE + at as u64)
    }
}

/// A buffer of a chain: address, length, device-writable.
type Seg = (u64, u32, bool);

/// A chain the driver posted: the descriptors it took, its writable buffers.
type Posted = (Vec<u16>, Vec<(u64, u32)>);

/// A polled virtio driver on the vCPU buffer.
struct Driver {
    size: u16,
    avail_idx: u16,
    last_used: u16,
    free: Vec<u16>,
    /// Head → (descriptors it took, its writable buffers).
    outstanding: HashMap<u16, Posted>,
}

impl Driver {
    /// A driver whose indexes start at `start` (written into the rings).
    fn new(size: u16, start: u16, mem: &Mem) -> Self {
        w16(mem, AVAIL + avail::IDX, start, true);
        w16(mem, USED + used::IDX, start, true);
        Driver {
            size,
            avail_idx: start,
            last_used: start,
            free: (0..size).rev().collect(),
            outstanding: HashMap::new(),
        }
    }

    fn write_desc(mem: &Mem, at: u64, d: Descriptor) {
        assert!(mem.write_vcpu(at, &d.to_bytes()));
    }

    /// Makes `head` available (whatever its descriptors hold).
    fn publish(&mut self, mem: &Mem, head: u16) {
        let at = AVAIL + avail::entry(self.avail_idx & (self.size - 1));
        w16(mem, at, head, true);
        self.avail_idx = self.avail_idx.wrapping_add(1);
        w16(mem, AVAIL + avail::IDX, self.avail_idx, true);
    }

    /// Writes `segs` as a chain: descriptor `k` at `at(k)`, chained to `next(k + 1)`.
    fn write_chain(
        mem: &Mem,
        segs: &[Seg],
        at: impl Fn(usize) -> u64,
        next: impl Fn(usize) -> u16,
    ) {
        for (k, &(addr, len, write)) in segs.iter().enumerate() {
            let last = k + 1 == segs.len();
            let d = Descriptor {
                addr,
                len,
                flags: if write { DESC_F_WRITE } else { 0 } | if last { 0 } else { DESC_F_NEXT },
                next: if last { 0 } else { next(k + 1) },
            };
            Self::write_desc(mem, at(k), d);
        }
    }

    /// Posts a chain of direct descriptors; None when out of descriptors.
    fn post(&mut self, mem: &Mem, segs: &[Seg]) -> Option<u16> {
        if self.free.len() < segs.len() {
            return None;
        }
        let idx: Vec<u16> = (0..segs.len()).filter_map(|_| self.free.pop()).collect();
        Self::write_chain(mem, segs, |k| DESC + u64::from(idx[k]) * 16, |k| idx[k]);
        let w = segs.iter().filter(|s| s.2).map(|s| (s.0, s.1)).collect();
        self.outstanding.insert(idx[0], (idx.clone(), w));
        self.publish(mem, idx[0]);
        Some(idx[0])
    }

    /// Posts one indirect descriptor whose table (at `table`, in RAM) holds `segs`.
    fn post_indirect(&mut self, mem: &Mem, table: u64, segs: &[Seg]) -> Option<u16> {
        let head = self.free.pop()?;
        Self::write_chain(mem, segs, |k| table + k as u64 * 16, |k| k as u16);
        let d = Descriptor {
            addr: table,
            len: segs.len() as u32 * 16,
            flags: DESC_F_INDIRECT,
            next: 0,
        };
        Self::write_desc(mem, DESC + u64::from(head) * 16, d);
        let w = segs.iter().filter(|s| s.2).map(|s| (s.0, s.1)).collect();
        self.outstanding.insert(head, (vec![head], w));
        self.publish(mem, head);
        Some(head)
    }

    /// Reaps used entries; each must be for a head outstanding (exactly once).
    fn reap(&mut self, mem: &Mem) -> Vec<UsedElem> {
        let idx = r16(mem, USED + used::IDX, true);
        let mut out = Vec::new();
        while self.last_used != idx {
            let mut b = [0u8; 8];
            let at = USED + used::entry(self.last_used & (self.size - 1));
            assert!(mem.read_vcpu(at, &mut b));
            let e = UsedElem::from_bytes(&b);
            let (descs, _) = self
                .outstanding
                .remove(&(e.id as u16))
                .unwrap_or_else(|| panic!("used entry for head {} twice or never posted", e.id));
            self.free.extend(descs);
            out.push(e);
            self.last_used = self.last_used.wrapping_add(1);
        }
        out
    }
}

fn r16(mem: &Mem, gpa: u64, vcpu: bool) -> u16 {
    let mut b = [0u8; 2];
    assert!(if vcpu {
        mem.read_vcpu(gpa, &mut b)
    } else {
        mem.read_device(gpa, &mut b)
    });
    u16::from_le_bytes(b)
}

fn w16(mem: &Mem, gpa: u64, v: u16, vcpu: bool) {
    assert!(if vcpu {
        mem.write_vcpu(gpa, &v.to_le_bytes())
    } else {
        mem.write_device(gpa, &v.to_le_bytes())
    });
}

/// A device on the device buffer: fetches chains (walking indirect tables where it is told
/// they are), fills writable buffers with a stamp, posts used entries.
struct Device {
    size: u16,
    last_avail: u16,
    used_idx: u16,
    fetched: Vec<(u16, Vec<Seg>)>,
}

impl Device {
    fn new(size: u16, start: u16) -> Self {
        Device {
            size,
            last_avail: start,
            used_idx: start,
            fetched: Vec::new(),
        }
    }

    fn desc(mem: &Mem, at: u64) -> Descriptor {
        let mut b = [0u8; 16];
        assert!(mem.read_device(at, &mut b), "device read at {at:#x}");
        Descriptor::from_bytes(&b)
    }

    fn fetch(&mut self, mem: &Mem) {
        let idx = r16(mem, AVAIL + avail::IDX, false);
        while self.last_avail != idx {
            let at = AVAIL + avail::entry(self.last_avail & (self.size - 1));
            let head = r16(mem, at, false);
            self.last_avail = self.last_avail.wrapping_add(1);
            let mut segs = Vec::new();
            let mut d = Self::desc(mem, DESC + u64::from(head) * 16);
            loop {
                if d.is_indirect() {
                    let mut k = 0;
                    loop {
                        let e = Self::desc(mem, d.addr + k * 16);
                        segs.push((e.addr, e.len, e.is_write()));
                        if !e.has_next() {
                            break;
                        }
                        k = u64::from(e.next);
                    }
                    break;
                }
                segs.push((d.addr, d.len, d.is_write()));
                if !d.has_next() {
                    break;
                }
                d = Self::desc(mem, DESC + u64::from(d.next) * 16);
            }
            self.fetched.push((head, segs));
        }
    }

    /// Completes fetched chain `k`, writing `stamp` into at most `limit` bytes of its
    /// writable buffers; returns (head, bytes written, pages written).
    fn complete(&mut self, mem: &Mem, k: usize, stamp: u8, limit: u32) -> (u16, u32, Vec<u64>) {
        let (head, segs) = self.fetched.remove(k);
        let mut left = limit;
        let mut pages = BTreeSet::new();
        let mut written = 0;
        for &(addr, len, write) in &segs {
            if !write || left == 0 {
                continue;
            }
            let n = len.min(left);
            assert!(mem.write_device(addr, &vec![stamp; n as usize]));
            for p in addr / PAGE..=(addr + u64::from(n) - 1) / PAGE {
                pages.insert(p * PAGE);
            }
            left -= n;
            written += n;
        }
        self.post_used(mem, u32::from(head), written);
        (head, written, pages.into_iter().collect())
    }

    fn post_used(&mut self, mem: &Mem, id: u32, len: u32) {
        let at = USED + used::entry(self.used_idx & (self.size - 1));
        assert!(mem.write_device(at, &UsedElem { id, len }.to_bytes()));
        self.used_idx = self.used_idx.wrapping_add(1);
        w16(mem, USED + used::IDX, self.used_idx, false);
    }
}

/// Deterministic pseudo-random numbers.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn submit(q: &mut VirtQueue, mem: &Mem) -> Option<u32> {
    let idx = q.guest_avail_idx(mem).expect("available index readable");
    q.on_guest_submit(idx, mem).expect("buffers reachable")
}

fn forward(q: &mut VirtQueue, mem: &Mem) -> Vec<u64> {
    let mut dirty = Vec::new();
    q.forward_completions(mem, &mut dirty)
        .expect("buffers reachable");
    dirty
}

/// A random chain shape: 0-2 readable buffers then 0-3 writable ones (at least one buffer),
/// anywhere in the data pages, some crossing a page boundary.
fn random_segs(rng: &mut Rng) -> Vec<Seg> {
    let (r, w) = loop {
        let (r, w) = (rng.below(3), rng.below(4));
        if r + w > 0 {
            break (r, w);
        }
    };
    (0..r + w)
        .map(|k| {
            let page = rng.below(DATA_PAGES - 4);
            let off = rng.below(PAGE);
            let len = 1 + rng.below(2 * PAGE - off) as u32;
            (DATA + page * PAGE + off, len, k >= r)
        })
        .collect()
}

/// The whole path, many times round the 16-bit indexes: the guest gets exactly one used
/// entry per chain with the device's length, the data the device wrote is there, and the
/// dirty pages are exactly the pages the device wrote.
fn round_trips(designation: Designation, start: u16, size: u16, seed: u64) {
    let mem = Mem::new(size, designation, true);
    let mut drv = Driver::new(size, start, &mem);
    let mut dev = Device::new(size, start);
    mem.start_shadowing();
    let mut q = VirtQueue::attach(geo(size), features(), ChainLimits::default(), &mem)
        .expect("queue attaches");
    let mut rng = Rng(seed);
    let (mut posted, mut reaped) = (0u64, 0u64);
    let table_area = DATA + (DATA_PAGES - 2) * PAGE;
    for round in 0..600u32 {
        // Post a few chains (indirect ones get their own table slot by head).
        for _ in 0..rng.below(4) {
            let segs = random_segs(&mut rng);
            let posted_head = if rng.below(4) == 0 {
                let slot = drv.free.last().copied().unwrap_or(0);
                let table = table_area + u64::from(slot) * 16 * 8;
                if segs.len() <= 8 && table + 16 * 8 <= BASE + PAGES * PAGE {
                    drv.post_indirect(&mem, table, &segs)
                } else {
                    None
                }
            } else {
                drv.post(&mem, &segs)
            };
            posted += u64::from(posted_head.is_some());
        }
        if let Some(v) = submit(&mut q, &mem) {
            assert_eq!(v, u32::from(r16(&mem, AVAIL + avail::IDX, false)));
        }
        dev.fetch(&mem);
        // Complete some, in any order, with any length up to the writable bytes.
        let mut expect_pages = BTreeSet::new();
        let mut expect = HashMap::new();
        for _ in 0..rng.below(4) {
            if dev.fetched.is_empty() {
                break;
            }
            let k = rng.below(dev.fetched.len() as u64) as usize;
            let limit = rng.below(3 * PAGE) as u32;
            let stamp = (round % 251) as u8 + 1;
            let (head, len, pages) = dev.complete(&mem, k, stamp, limit);
            expect_pages.extend(pages);
            expect.insert(head, (len, stamp));
        }
        let dirty = forward(&mut q, &mem);
        let got: BTreeSet<u64> = dirty.iter().copied().collect();
        assert_eq!(got, expect_pages, "round {round}: dirty pages");
        let writable: HashMap<u16, Vec<(u64, u32)>> = drv
            .outstanding
            .iter()
            .map(|(h, (_, w))| (*h, w.clone()))
            .collect();
        for e in drv.reap(&mem) {
            let (len, stamp) = expect
                .remove(&(e.id as u16))
                .expect("the device completed it");
            assert_eq!(e.len, len);
            // The first `len` writable bytes carry the stamp, in guest RAM.
            let mut left = len;
            for &(addr, blen) in &writable[&(e.id as u16)] {
                let n = blen.min(left);
                if n > 0 {
                    assert!(mem.ram_bytes(addr, n as usize).iter().all(|b| *b == stamp));
                }
                left -= n;
            }
            reaped += 1;
        }
        assert!(expect.is_empty(), "completions not forwarded: {expect:?}");
        assert_eq!(q.in_flight(), drv.outstanding.len());
    }
    let s = q.stats();
    assert!(posted > 500, "{posted} chains posted");
    assert_eq!(s.forwarded, posted);
    assert_eq!(s.completed, reaped);
    assert_eq!(s.refused, 0);
    assert_eq!(
        s.unknown_used + s.bad_used_len + s.bad_avail_idx + s.bad_used_idx,
        0
    );
    assert!(s.bounced > 0 && s.unbounced == 0);
    // Indexes went round 16 bits at least once from a start near the wrap.
    assert_eq!(drv.avail_idx.wrapping_sub(start) as u64, posted % 65536);
}

#[test]
fn round_trips_with_the_copy_as_vcpu_buffer() {
    round_trips(Designation::CopyIsVcpu, 0, 16, 0x9e37_79b9_7f4a_7c15);
}

#[test]
fn round_trips_with_the_copy_as_device_buffer() {
    round_trips(Designation::CopyIsDevice, 0, 16, 0x2545_f491_4f6c_dd1d);
}

#[test]
fn indexes_wrap_around_16_bits() {
    for d in [Designation::CopyIsVcpu, Designation::CopyIsDevice] {
        round_trips(d, 0xfff0, 8, 0x1234_5678_9abc_def1);
        round_trips(d, 0xffff, 4, 0x0fed_cba9_8765_4321);
    }
}

fn setup(size: u16, feats: u64, bounce: bool) -> (Mem, Driver, Device, VirtQueue) {
    let mem = Mem::new(size, Designation::CopyIsVcpu, bounce);
    let drv = Driver::new(size, 0, &mem);
    let dev = Device::new(size, 0);
    mem.start_shadowing();
    // A chain limit below the RAM size, so that oversized chains are not refused for RAM.
    let limits = ChainLimits {
        max_chain_bytes: 16 * PAGE,
        ..ChainLimits::default()
    };
    let q = VirtQueue::attach(geo(size), feats, limits, &mem).expect("attaches");
    (mem, drv, dev, q)
}

#[test]
fn indirect_tables_reach_the_device_as_validated_copies() {
    let (mem, mut drv, mut dev, mut q) = setup(8, features(), true);
    let table = DATA + 40 * PAGE;
    let head = drv
        .post_indirect(
            &mem,
            table,
            &[
                (DATA, 100, false),
                (DATA + PAGE, 3000, true),
                (DATA + 3 * PAGE, 10, true),
            ],
        )
        .expect("posted");
    assert!(submit(&mut q, &mem).is_some());
    // The guest rewrites its table after submitting: the device must not see it.
    Driver::write_desc(
        &mem,
        table + 16,
        Descriptor {
            addr: DATA + 20 * PAGE,
            len: 3000,
            flags: DESC_F_WRITE | DESC_F_NEXT,
            next: 2,
        },
    );
    dev.fetch(&mem);
    assert_eq!(
        dev.fetched[0].1,
        vec![
            (DATA, 100, false),
            (DATA + PAGE, 3000, true),
            (DATA + 3 * PAGE, 10, true)
        ]
    );
    dev.complete(&mem, 0, 7, 3010);
    assert_eq!(forward(&mut q, &mem), vec![DATA + PAGE, DATA + 3 * PAGE]);
    assert_eq!(
        drv.reap(&mem),
        vec![UsedElem {
            id: head.into(),
            len: 3010
        }]
    );
    assert_eq!(q.stats().bounced, 1);

    // Without bounce memory the device reads the guest's table (counted).
    let (mem, mut drv, mut dev, mut q) = setup(8, features(), false);
    drv.post_indirect(&mem, table, &[(DATA, 64, true)]);
    submit(&mut q, &mem);
    dev.fetch(&mem);
    assert_eq!(dev.fetched[0].1, vec![(DATA, 64, true)]);
    assert_eq!(q.stats().unbounced, 1);
}

/// Writes raw descriptors at `idx`, makes `head` available, submits; the chain must be
/// refused (the device sees nothing, the guest gets `head` back with length 0) and counted
/// where `counter` says.
fn refused(
    mem: &Mem,
    drv: &mut Driver,
    q: &mut VirtQueue,
    descs: &[(u16, Descriptor)],
    head: u16,
    counter: fn(&Refusals) -> u64,
) {
    for &(i, d) in descs {
        Driver::write_desc(mem, DESC + u64::from(i) * 16, d);
    }
    let before = (q.stats(), r16(mem, AVAIL + avail::IDX, false));
    drv.publish(mem, head);
    assert_eq!(submit(q, mem), None, "head {head} {descs:?}");
    let after = q.stats();
    assert_eq!(
        r16(mem, AVAIL + avail::IDX, false),
        before.1,
        "device saw it"
    );
    assert_eq!(after.refused, before.0.refused + 1);
    assert_eq!(
        counter(&after.refusals),
        counter(&before.0.refusals) + 1,
        "{descs:?}: {:?}",
        after.refusals
    );
    // The guest gets its head back, empty.
    let idx = r16(mem, USED + used::IDX, true);
    let mut b = [0u8; 8];
    assert!(mem.read_vcpu(
        USED + used::entry(idx.wrapping_sub(1) & (drv.size - 1)),
        &mut b
    ));
    assert_eq!(
        UsedElem::from_bytes(&b),
        UsedElem {
            id: head.into(),
            len: 0
        }
    );
    drv.last_used = idx;
}

fn d(addr: u64, len: u32, flags: u16, next: u16) -> Descriptor {
    Descriptor {
        addr,
        len,
        flags,
        next,
    }
}

#[test]
fn hostile_chains_are_refused_and_counted() {
    let (mem, mut drv, mut dev, mut q) = setup(8, features(), true);
    let (n, w, i) = (DESC_F_NEXT, DESC_F_WRITE, DESC_F_INDIRECT);
    let t = DATA + 30 * PAGE; // an indirect table
    let t2 = |a: Descriptor, b: Descriptor| vec![a, b];
    type Case = (
        Vec<Descriptor>,
        Vec<(u16, Descriptor)>,
        u16,
        fn(&Refusals) -> u64,
    );
    let cases: Vec<Case> = vec![
        // Loops: two descriptors pointing at each other, one at itself, every descriptor of
        // the table in one ring (more than the table holds), a loop inside an indirect table.
        (
            vec![],
            vec![(0, d(DATA, 8, n, 1)), (1, d(DATA, 8, n, 0))],
            0,
            |r| r.loops,
        ),
        (vec![], vec![(2, d(DATA, 8, n, 2))], 2, |r| r.loops),
        (
            vec![],
            (0..8u16).map(|k| (k, d(DATA, 8, n, (k + 1) % 8))).collect(),
            3,
            |r| r.loops,
        ),
        (
            t2(d(DATA, 8, n, 1), d(DATA, 8, n, 0)),
            vec![(0, d(t, 32, i, 0))],
            0,
            |r| r.loops,
        ),
        // Outside guest RAM (after it, before it, wrapping, low memory, an indirect table).
        (vec![], vec![(0, d(BASE + PAGES * PAGE, 8, w, 0))], 0, |r| {
            r.out_of_ram
        }),
        (vec![], vec![(0, d(BASE - 4, 8, 0, 0))], 0, |r| r.out_of_ram),
        (vec![], vec![(0, d(u64::MAX - 3, 8, w, 0))], 0, |r| {
            r.out_of_ram
        }),
        (vec![], vec![(0, d(0x1000, 8, 0, 0))], 0, |r| r.out_of_ram),
        (vec![], vec![(0, d(t + 64 * PAGE, 32, i, 0))], 0, |r| {
            r.out_of_ram
        }),
        // On the rings: a buffer on the used ring, one across the available ring's start, an
        // indirect table on the descriptor table.
        (vec![], vec![(0, d(USED, 64, w, 0))], 0, |r| r.on_rings),
        (vec![], vec![(0, d(AVAIL - 8, 16, w, 0))], 0, |r| r.on_rings),
        (vec![], vec![(0, d(DESC, 32, i, 0))], 0, |r| r.on_rings),
        // Oversized: one buffer, two buffers, a buffer inside an indirect table.
        (
            vec![],
            vec![(0, d(DATA, 16 * PAGE as u32 + 1, w, 0))],
            0,
            |r| r.too_large,
        ),
        (
            vec![],
            vec![
                (0, d(DATA, 10 * PAGE as u32, n, 1)),
                (1, d(DATA, 10 * PAGE as u32, w, 0)),
            ],
            0,
            |r| r.too_large,
        ),
        (
            vec![d(DATA, u32::MAX, w, 0)],
            vec![(0, d(t, 16, i, 0))],
            0,
            |r| r.too_large,
        ),
        // Indirect tables: nested, with NEXT, sized wrongly, too long.
        (
            vec![d(t + 256, 16, i, 0)],
            vec![(0, d(t, 16, i, 0))],
            0,
            |r| r.indirect,
        ),
        (
            vec![d(DATA, 8, w, 0)],
            vec![(0, d(t, 16, i | n, 1)), (1, d(DATA, 8, w, 0))],
            0,
            |r| r.indirect,
        ),
        (vec![], vec![(0, d(t, 20, i, 0))], 0, |r| r.indirect),
        (vec![], vec![(0, d(t, 0, i, 0))], 0, |r| r.indirect),
        (vec![], vec![(0, d(t, 16 * 257, i, 0))], 0, |r| r.indirect),
        // A readable buffer after a writable one, directly and inside a table.
        (
            vec![],
            vec![(0, d(DATA, 8, w | n, 1)), (1, d(DATA, 8, 0, 0))],
            0,
            |r| r.order,
        ),
        (
            t2(d(DATA, 8, w | n, 1), d(DATA, 8, 0, 0)),
            vec![(0, d(t, 32, i, 0))],
            0,
            |r| r.order,
        ),
        // Indexes out of range: a next, a next inside a table (heads: see
        // `heads_outside_the_table_are_dropped`).
        (vec![], vec![(0, d(DATA, 8, n, 8))], 0, |r| r.index),
        (
            t2(d(DATA, 8, n, 5), d(DATA, 8, 0, 0)),
            vec![(0, d(t, 32, i, 0))],
            0,
            |r| r.index,
        ),
        // Unknown flags.
        (vec![], vec![(0, d(DATA, 8, 0x8, 0))], 0, |r| r.flags),
    ];
    for (table, descs, head, counter) in cases {
        for (k, e) in table.into_iter().enumerate() {
            Driver::write_desc(&mem, t + 16 * k as u64, e);
        }
        refused(&mem, &mut drv, &mut q, &descs, head, counter);
    }

    // Nothing reached the device; the queue still works.
    dev.fetch(&mem);
    assert!(dev.fetched.is_empty());
    let head = drv
        .post(&mem, &[(DATA, 8, false), (DATA + PAGE, 8, true)])
        .expect("posted");
    assert!(submit(&mut q, &mem).is_some());
    // The same head again while in flight, and a chain sharing its second descriptor.
    let second = drv.outstanding[&head].0[1];
    refused(&mem, &mut drv, &mut q, &[], head, |r| r.reposted);
    let other = drv.free.pop().expect("a free descriptor");
    refused(
        &mem,
        &mut drv,
        &mut q,
        &[(other, d(DATA, 8, n, second))],
        other,
        |r| r.shared,
    );
    drv.free.push(other);
    dev.fetch(&mem);
    assert_eq!(dev.fetched.len(), 1);
    dev.complete(&mem, 0, 1, 8);
    assert_eq!(forward(&mut q, &mem), vec![DATA + PAGE]);
    assert_eq!(
        drv.reap(&mem),
        vec![UsedElem {
            id: head.into(),
            len: 8
        }]
    );
    assert_eq!(q.in_flight(), 0);
    // Its descriptors are free again.
    let again = drv.post(&mem, &[(DATA, 8, true)]).expect("posted");
    assert!(submit(&mut q, &mem).is_some(), "head {again}");
}

#[test]
fn indirect_descriptors_need_the_feature() {
    let (mem, mut drv, _dev, mut q) = setup(8, bit(virtio_spec::features::VERSION_1), true);
    let t = DATA + 30 * PAGE;
    Driver::write_desc(&mem, t, d(DATA, 8, DESC_F_WRITE, 0));
    refused(
        &mem,
        &mut drv,
        &mut q,
        &[(0, d(t, 16, DESC_F_INDIRECT, 0))],
        0,
        |r| r.indirect,
    );
}

/// An available index more than a queue size ahead of the entries taken, or behind them,
/// breaks the queue as it breaks the device's (virtio-net-device `QueueError::AvailJump`):
/// counted once, nothing taken from then on (a good index neither), not aligned (shadow mode
/// cannot be left with it); the engine reports DEVICE_NEEDS_RESET for it.
#[test]
fn available_index_jumps_break_the_queue() {
    for bad in [9u32, 0xfff0, 0x8000] {
        let (mem, mut drv, mut dev, mut q) = setup(8, features(), true);
        drv.post(&mem, &[(DATA, 8, true)]);
        assert!(!q.broken());
        assert_eq!(q.on_guest_submit(bad, &mem).expect("no access error"), None);
        assert!(q.broken(), "{bad:#x}");
        // Stuck or moving on: counted once, never taken.
        for again in [bad, 1, 2, 3] {
            assert_eq!(q.on_guest_submit(again, &mem).expect("no access"), None);
        }
        assert_eq!(q.stats().bad_avail_idx, 1, "{bad:#x}");
        assert_eq!(q.stats().forwarded + q.stats().refused, 0);
        assert_eq!(r16(&mem, USED + used::IDX, true), 0);
        assert_eq!(
            r16(&mem, AVAIL + avail::IDX, false),
            0,
            "device saw nothing"
        );
        dev.fetch(&mem);
        assert!(dev.fetched.is_empty());
        assert!(!q.aligned());
    }
    // A jump of exactly the queue size is the guest filling every slot: taken.
    let (mem, mut drv, _dev, mut q) = setup(8, features(), true);
    for k in 0..8 {
        drv.post(&mem, &[(DATA + k * 64, 8, true)]).expect("posted");
    }
    assert_eq!(submit(&mut q, &mem), Some(8));
    assert!(!q.broken());
    assert_eq!(q.stats().bad_avail_idx, 0);
}

/// A head at or beyond the queue size names no buffer: like the device, the adapter drops it
/// (no used entry with an id outside the table ever reaches the guest), counts it, and keeps
/// the queue running; the saved state carries the dropped count so a destination's checks
/// still hold, and attaching to a queue the device already dropped heads on does not wait for
/// them.
#[test]
fn heads_outside_the_table_are_dropped() {
    let (mem, mut drv, mut dev, mut q) = setup(8, features(), true);
    for head in [8u16, 64, 32767, 65535] {
        let before = r16(&mem, USED + used::IDX, true);
        drv.publish(&mem, head);
        assert_eq!(submit(&mut q, &mem), None, "head {head}");
        assert_eq!(
            r16(&mem, USED + used::IDX, true),
            before,
            "head {head} given back"
        );
        assert_eq!(
            r16(&mem, AVAIL + avail::IDX, false),
            0,
            "device saw head {head}"
        );
    }
    let st = q.stats();
    assert_eq!(
        (
            st.dropped_heads,
            st.refused,
            st.refusals.index,
            st.forwarded
        ),
        (4, 4, 4, 0)
    );
    assert!(!q.broken());
    // The queue keeps working: a good chain after them goes to the device and back.
    let head = drv.post(&mem, &[(DATA, 8, true)]).expect("posted");
    assert_eq!(submit(&mut q, &mem), Some(1));
    dev.fetch(&mem);
    assert_eq!(dev.fetched.len(), 1);
    dev.complete(&mem, 0, 1, 8);
    assert_eq!(forward(&mut q, &mem), vec![DATA]);
    assert_eq!(
        drv.reap(&mem),
        vec![UsedElem {
            id: head.into(),
            len: 8
        }]
    );
    let state = q.state();
    assert_eq!(
        (state.guest_avail, state.guest_used, state.dropped),
        (5, 1, 4)
    );
    assert!(state.in_flight.is_empty());
    assert!(VirtQueue::rebuild(&state, 0, &mem).is_ok());

    // Shadowing begins after the device dropped a head (its available entry has no used
    // entry): nothing is waited for.
    let mem = Mem::new(8, Designation::CopyIsVcpu, false);
    let mut drv = Driver::new(8, 0, &mem);
    drv.publish(&mem, 200);
    mem.start_shadowing();
    let q = VirtQueue::attach(geo(8), features(), ChainLimits::default(), &mem).expect("attach");
    assert_eq!(q.in_flight(), 0);
    assert_eq!(q.state().dropped, 1);
}

#[test]
fn hostile_used_entries_are_refused_and_counted() {
    let (mem, mut drv, mut dev, mut q) = setup(8, features(), true);
    let a = drv
        .post(
            &mem,
            &[
                (DATA, 16, false),
                (DATA + PAGE, 100, true),
                (DATA + 3 * PAGE, PAGE as u32, true),
            ],
        )
        .expect("posted");
    let b = drv
        .post(&mem, &[(DATA + 5 * PAGE, 50, true)])
        .expect("posted");
    submit(&mut q, &mem);
    dev.fetch(&mem);
    // Unknown ids: never made available, beyond the table, beyond 16 bits.
    let unknown = drv.free[0];
    for id in [u32::from(unknown), 8, 0x1_0000 + u32::from(a)] {
        dev.post_used(&mem, id, 1);
    }
    // A length over the writable bytes of `a`: completed with 0, every writable page dirty.
    dev.post_used(&mem, a.into(), 100 + PAGE as u32 + 1);
    // `a` again (no longer in flight), then `b` properly.
    dev.post_used(&mem, a.into(), 1);
    dev.post_used(&mem, b.into(), 50);
    dev.fetched.clear();
    let dirty = forward(&mut q, &mem);
    assert_eq!(dirty, vec![DATA + PAGE, DATA + 3 * PAGE, DATA + 5 * PAGE]);
    assert_eq!(
        drv.reap(&mem),
        vec![
            UsedElem {
                id: a.into(),
                len: 0
            },
            UsedElem {
                id: b.into(),
                len: 50
            }
        ]
    );
    let s = q.stats();
    assert_eq!((s.unknown_used, s.bad_used_len, s.completed), (4, 1, 2));
    assert_eq!(q.in_flight(), 0);

    // A used index more than a queue size ahead: nothing read, counted once while it stays.
    let c = drv
        .post(&mem, &[(DATA + 7 * PAGE, 10, true)])
        .expect("posted");
    submit(&mut q, &mem);
    dev.fetch(&mem);
    let real = dev.used_idx;
    w16(&mem, USED + used::IDX, real.wrapping_add(9), false);
    for _ in 0..3 {
        assert!(forward(&mut q, &mem).is_empty());
    }
    assert_eq!(q.stats().bad_used_idx, 1);
    assert!(drv.reap(&mem).is_empty());
    // The device behaves again.
    w16(&mem, USED + used::IDX, real, false);
    dev.complete(&mem, 0, 3, 10);
    assert_eq!(forward(&mut q, &mem), vec![DATA + 7 * PAGE]);
    assert_eq!(
        drv.reap(&mem),
        vec![UsedElem {
            id: c.into(),
            len: 10
        }]
    );
}

#[test]
fn held_submissions_wait_for_the_release() {
    let (mem, mut drv, mut dev, mut q) = setup(8, features(), true);
    q.hold(true);
    drv.post(&mem, &[(DATA, 8, true)]);
    assert_eq!(submit(&mut q, &mem), None);
    assert_eq!(q.pending(), 1);
    dev.fetch(&mem);
    assert!(dev.fetched.is_empty());
    q.hold(false);
    assert_eq!(submit(&mut q, &mem), Some(1));
    assert_eq!(q.pending(), 0);
    assert!(q.aligned());
    assert_eq!(q.in_flight(), 1);
}

/// Chains the device took before shadowing began still complete through the adapter, with
/// their pages; the count of them comes from the indexes.
#[test]
fn chains_in_flight_when_shadowing_begins_still_complete() {
    for designation in [Designation::CopyIsVcpu, Designation::CopyIsDevice] {
        let size = 8;
        let mem = Mem::new(size, designation, true);
        let mut drv = Driver::new(size, 0xfffe, &mem);
        let mut dev = Device::new(size, 0xfffe);
        let heads: Vec<u16> = (0..3u64)
            .filter_map(|k| drv.post(&mem, &[(DATA + k * PAGE, 200, true)]))
            .collect();
        dev.fetch(&mem); // direct mode: both sides are guest RAM
        dev.complete(&mem, 0, 9, 200); // one completes before shadowing, already in the rings
        drv.reap(&mem);
        assert_eq!(
            VirtQueue::outstanding(&geo(size), &mem).expect("readable"),
            2
        );
        mem.start_shadowing();
        let mut q = VirtQueue::attach(geo(size), features(), ChainLimits::default(), &mem)
            .expect("attaches");
        assert_eq!(q.in_flight(), 2);
        assert!(q.legacy_device_pages().contains(&(DATA + PAGE)));
        assert_eq!(q.state().in_flight, heads[1..].to_vec());
        // A new chain goes through the adapter meanwhile.
        let new = drv
            .post(&mem, &[(DATA + 10 * PAGE, 20, true)])
            .expect("posted");
        submit(&mut q, &mem);
        dev.fetch(&mem);
        // The device completes out of order: the new one, then the old ones.
        dev.complete(&mem, 2, 1, 20);
        dev.complete(&mem, 1, 2, 100);
        dev.complete(&mem, 0, 3, 200);
        let dirty = forward(&mut q, &mem);
        assert_eq!(dirty, vec![DATA + 10 * PAGE, DATA + 2 * PAGE, DATA + PAGE]);
        let got: Vec<(u32, u32)> = drv.reap(&mem).iter().map(|e| (e.id, e.len)).collect();
        assert_eq!(
            got,
            vec![
                (new.into(), 20),
                (heads[2].into(), 100),
                (heads[1].into(), 200)
            ]
        );
        assert_eq!(q.in_flight(), 0);
        // Legacy is over: a repeat of an old head is unknown.
        dev.post_used(&mem, heads[1].into(), 1);
        assert!(forward(&mut q, &mem).is_empty());
        assert_eq!(q.stats().unknown_used, 1);
    }
}

#[test]
fn the_saved_state_rebuilds_the_queue_on_a_destination() {
    let size = 8;
    let (src, mut drv, mut dev, mut q) = setup(size, features(), true);
    // Receive-like buffers stay in flight; one completes; one indirect.
    let heads: Vec<u16> = (0..4u64)
        .filter_map(|k| drv.post(&src, &[(DATA + k * PAGE, 1500, true)]))
        .collect();
    let ind = drv
        .post_indirect(&src, DATA + 30 * PAGE, &[(DATA + 9 * PAGE, 64, true)])
        .expect("posted");
    submit(&mut q, &src);
    dev.fetch(&src);
    dev.complete(&src, 0, 4, 60);
    forward(&mut q, &src);
    drv.reap(&src);
    q.hold(true);
    let state = q.state();
    assert_eq!(state.in_flight, vec![heads[1], heads[2], heads[3], ind]);
    let wire = postcard::to_allocvec(&state).expect("encodes");
    let state: VirtqState = postcard::from_bytes(&wire).expect("decodes");

    let (v, d) = (Designation::CopyIsVcpu, Designation::CopyIsDevice);
    let cases = [(0, v), (0, d), (state.guest_used, v), (state.guest_used, d)];
    for (start, designation) in cases {
        // The destination: guest RAM arrived (the guest's view of the rings), the device's
        // side of the rings blank.
        let dst = Mem::new(size, designation, true);
        *dst.ram.borrow_mut() = src.ram.borrow().clone();
        for r in &dst.rings {
            let (s, e) = ((r.start - BASE) as usize, (r.end - BASE) as usize);
            dst.ram.borrow_mut()[s..e].copy_from_slice(&src.copy.borrow()[s..e]);
        }
        dst.start_shadowing();
        let device_side = match designation {
            Designation::CopyIsVcpu => &dst.ram,
            Designation::CopyIsDevice => &dst.copy,
        };
        for r in &dst.rings {
            let (s, e) = ((r.start - BASE) as usize, (r.end - BASE) as usize);
            device_side.borrow_mut()[s..e].fill(0);
        }
        let mut q = VirtQueue::rebuild(&state, start, &dst).expect("rebuilds");
        assert_eq!(q.in_flight(), 4);
        assert_eq!(submit(&mut q, &dst), None, "held until restarted");
        assert_eq!(
            q.restart(&dst).expect("restarts"),
            Some(u32::from(start) + 4)
        );
        assert_eq!(q.aligned(), start == state.guest_used);
        let mut dev = Device::new(size, start);
        dev.fetch(&dst);
        let fetched: Vec<u16> = dev.fetched.iter().map(|f| f.0).collect();
        assert_eq!(fetched, state.in_flight);
        assert_eq!(dev.fetched[3].1, vec![(DATA + 9 * PAGE, 64, true)]);
        for _ in 0..4 {
            dev.complete(&dst, 0, 5, 64);
        }
        assert_eq!(forward(&mut q, &dst).len(), 4);
        // The guest's driver continues where it was.
        let mut g = Driver {
            size,
            avail_idx: drv.avail_idx,
            last_used: drv.last_used,
            free: drv.free.clone(),
            outstanding: drv.outstanding.clone(),
        };
        let got: Vec<u32> = g.reap(&dst).iter().map(|e| e.id).collect();
        assert_eq!(
            got,
            state
                .in_flight
                .iter()
                .map(|h| u32::from(*h))
                .collect::<Vec<_>>()
        );
        let more = g.post(&dst, &[(DATA, 8, true)]).expect("posted");
        assert_eq!(
            submit(&mut q, &dst),
            Some(u32::from(start) + 5),
            "head {more}"
        );
        assert_eq!(q.aligned(), start == state.guest_used);
    }
}

#[test]
fn hostile_saved_states_are_refused() {
    let size = 8;
    let mem = Mem::new(size, Designation::CopyIsVcpu, false);
    let good = VirtqState {
        geometry: geo(size),
        features: features(),
        limits: ChainLimits::default(),
        guest_avail: 3,
        guest_used: 1,
        device_avail: 3,
        device_used: 1,
        in_flight: vec![4, 5],
        dropped: 0,
        stats: VirtqStats::default(),
    };
    assert!(VirtQueue::rebuild(&good, 0, &mem).is_ok());
    // Dropped heads (outside the table) take available entries without a used entry.
    let with_dropped = VirtqState {
        guest_avail: 5,
        dropped: 2,
        ..good.clone()
    };
    assert!(VirtQueue::rebuild(&with_dropped, 0, &mem).is_ok());
    let bad: Vec<fn(&mut VirtqState)> = vec![
        |s| s.in_flight = vec![4, 4],
        |s| s.in_flight = vec![4, 8],
        |s| s.in_flight = vec![4],
        |s| s.guest_used = 4,
        |s| s.dropped = 1,
        |s| s.dropped = u16::MAX,
        |s| {
            s.guest_avail = 10;
            s.guest_used = 0;
            s.in_flight = (0..10).collect();
        },
        |s| s.geometry.size = 12,
        |s| s.geometry.size = 0,
        |s| s.geometry.desc = BASE + PAGES * PAGE,
        |s| s.geometry.used = s.geometry.avail,
        |s| s.geometry.avail = u64::MAX - 1,
        |s| s.geometry.used = USED + 2,
        |s| s.features |= bit(RING_PACKED),
        |s| s.features |= bit(IN_ORDER),
        |s| s.limits.max_indirect = 1000,
        |s| s.limits.max_chain_bytes = u64::MAX,
    ];
    for (k, f) in bad.iter().enumerate() {
        let mut s = good.clone();
        f(&mut s);
        assert!(VirtQueue::rebuild(&s, 0, &mem).is_err(), "case {k}: {s:?}");
    }
}

#[test]
fn notifications_follow_the_guest_and_device_suppression() {
    // With EVENT_IDX: the guest's used_event, the device's avail_event.
    let (mem, mut drv, mut dev, mut q) = setup(8, features() | bit(RING_EVENT_IDX), true);
    // The adapter asks the guest to notify at the next entry, the device to interrupt.
    assert_eq!(r16(&mem, USED + used::avail_event(8), true), 0);
    assert_eq!(r16(&mem, AVAIL + avail::used_event(8), false), 0);
    let a = drv.post(&mem, &[(DATA, 8, true)]).expect("posted");
    let b = drv.post(&mem, &[(DATA + PAGE, 8, true)]).expect("posted");
    w16(&mem, USED + used::avail_event(8), 1, false); // the device wants to hear at 2
    submit(&mut q, &mem);
    assert_eq!(r16(&mem, USED + used::avail_event(8), true), 2);
    assert!(q.take_device_notify(&mem).expect("readable"));
    assert!(
        !q.take_device_notify(&mem).expect("readable"),
        "nothing new"
    );
    dev.fetch(&mem);
    w16(&mem, AVAIL + avail::used_event(8), 1, true); // the guest wants the second
    dev.complete(&mem, 0, 1, 8);
    forward(&mut q, &mem);
    assert_eq!(r16(&mem, AVAIL + avail::used_event(8), false), 1);
    assert!(!q.guest_needs_interrupt(&mem).expect("readable"));
    dev.complete(&mem, 0, 1, 8);
    forward(&mut q, &mem);
    assert!(q.guest_needs_interrupt(&mem).expect("readable"));
    assert_eq!(drv.reap(&mem).len(), 2, "{a} {b}");

    // Without: the flags.
    let (mem, mut drv, mut dev, mut q) = setup(8, features(), true);
    w16(&mem, USED + used::FLAGS, USED_F_NO_NOTIFY, false);
    w16(&mem, AVAIL + avail::FLAGS, AVAIL_F_NO_INTERRUPT, true);
    drv.post(&mem, &[(DATA, 8, true)]);
    submit(&mut q, &mem);
    assert!(!q.take_device_notify(&mem).expect("readable"));
    assert_eq!(
        r16(&mem, USED + used::FLAGS, true),
        0,
        "the guest is asked to notify"
    );
    dev.fetch(&mem);
    dev.complete(&mem, 0, 1, 8);
    forward(&mut q, &mem);
    assert!(!q.guest_needs_interrupt(&mem).expect("readable"));
    assert_eq!(
        r16(&mem, AVAIL + avail::FLAGS, false),
        0,
        "the device is asked to interrupt"
    );
}

#[test]
fn packed_and_in_order_queues_are_not_shadowed() {
    let mem = Mem::new(8, Designation::CopyIsVcpu, false);
    for f in [bit(RING_PACKED), bit(IN_ORDER)] {
        assert!(VirtQueue::attach(geo(8), features() | f, ChainLimits::default(), &mem).is_err());
    }
    // More in flight than the queue holds.
    w16(&mem, AVAIL + avail::IDX, 9, true);
    assert!(VirtQueue::attach(geo(8), features(), ChainLimits::default(), &mem).is_err());
}

/// Random bytes in every ring on both sides, random indexes and random operations: the
/// adapter never panics, never has more in flight than the queue holds, and never reports a
/// page outside guest RAM or a used entry the device did not post for a head in flight.
#[test]
fn garbage_on_both_sides_never_panics() {
    for seed in 1..=40u64 {
        let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
        let size = 1u16 << rng.below(5);
        let designation = if seed % 2 == 0 {
            Designation::CopyIsVcpu
        } else {
            Designation::CopyIsDevice
        };
        let mem = Mem::new(size, designation, seed % 3 != 0);
        mem.start_shadowing();
        let feats = features()
            | if seed % 4 == 0 {
                bit(RING_EVENT_IDX)
            } else {
                0
            };
        let Ok(mut q) = VirtQueue::attach(geo(size), feats, ChainLimits::default(), &mem) else {
            continue;
        };
        for _ in 0..400 {
            match rng.below(8) {
                0 | 1 => {
                    // Garbage into the guest's rings or an indirect table area.
                    let at = [DESC, AVAIL, USED, DATA + 30 * PAGE][rng.below(4) as usize]
                        + rng.below(256);
                    let mut b = [0u8; 8];
                    for x in &mut b {
                        *x = rng.next() as u8;
                    }
                    // Mostly plausible addresses inside RAM.
                    if rng.below(2) == 0 {
                        b.copy_from_slice(&(DATA + rng.below(DATA_PAGES * PAGE)).to_le_bytes());
                    }
                    let _ = mem.write_vcpu(at, &b);
                }
                2 => {
                    let at =
                        [USED, USED + 4 + rng.below(8 * u64::from(size))][rng.below(2) as usize];
                    let v = rng.next().to_le_bytes();
                    let _ = mem.write_device(at, &v[..2 + rng.below(3) as usize * 2]);
                }
                3 | 4 => {
                    let v = if rng.below(4) == 0 {
                        rng.next() as u32
                    } else {
                        q.guest_avail_idx(&mem).expect("readable")
                            + rng.below(u64::from(size) + 2) as u32
                    };
                    let _ = q.on_guest_submit(v, &mem);
                }
                5 => {
                    let mut dirty = Vec::new();
                    let before = r16(&mem, USED + used::IDX, true);
                    if q.forward_completions(&mem, &mut dirty).is_ok() {
                        for p in &dirty {
                            assert!(mem.in_ram(*p, PAGE) && *p >= DATA, "page {p:#x}");
                        }
                        let after = r16(&mem, USED + used::IDX, true);
                        assert!(after.wrapping_sub(before) <= size);
                    }
                }
                6 => q.hold(rng.below(2) == 0),
                _ => {
                    let _ = q.guest_needs_interrupt(&mem);
                    let _ = q.take_device_notify(&mem);
                    let s = q.state();
                    assert_eq!(
                        s.guest_avail
                            .wrapping_sub(s.guest_used)
                            .wrapping_sub(s.dropped) as usize,
                        s.in_flight.len(),
                        "seed {seed}"
                    );
                }
            }
            assert!(q.in_flight() <= usize::from(size), "seed {seed}");
        }
    }
}

/// What the other side does in the middle of an adapter call.
type Hook<'a> = Box<dyn FnOnce(&Mem) + 'a>;

/// Buffers that run `hook` once, right after the adapter writes `at` on the `vcpu` side (or
/// the device side): the other side acting between the adapter's index read and its event
/// index write.
struct Racy<'a> {
    mem: &'a Mem,
    at: u64,
    vcpu: bool,
    hook: RefCell<Option<Hook<'a>>>,
}

impl Racy<'_> {
    fn fire(&self, vcpu: bool, gpa: u64) {
        if vcpu == self.vcpu && gpa == self.at {
            if let Some(h) = self.hook.borrow_mut().take() {
                h(self.mem);
            }
        }
    }
}

impl Buffers for Racy<'_> {
    fn read_vcpu(&self, gpa: u64, buf: &mut [u8]) -> bool {
        self.mem.read_vcpu(gpa, buf)
    }
    fn write_vcpu(&self, gpa: u64, data: &[u8]) -> bool {
        let ok = self.mem.write_vcpu(gpa, data);
        self.fire(true, gpa);
        ok
    }
    fn read_device(&self, gpa: u64, buf: &mut [u8]) -> bool {
        self.mem.read_device(gpa, buf)
    }
    fn write_device(&self, gpa: u64, data: &[u8]) -> bool {
        let ok = self.mem.write_device(gpa, data);
        self.fire(false, gpa);
        ok
    }
    fn in_ram(&self, gpa: u64, len: u64) -> bool {
        self.mem.in_ram(gpa, len)
    }
}

/// With EVENT_IDX, an entry the guest adds while the adapter's `avail_event` still names an
/// older position comes without a notification; likewise a used entry the device posts
/// before it sees the new `used_event` comes without an interrupt. The adapter reads the
/// index again after publishing its event index and takes them in the same call.
#[test]
fn entries_added_during_the_event_index_update_are_not_lost() {
    let (mem, drv, mut dev, mut q) = setup(8, features() | bit(RING_EVENT_IDX), true);
    let drv = RefCell::new(drv);
    let first = drv
        .borrow_mut()
        .post(&mem, &[(DATA, 8, true)])
        .expect("posted");
    let late = RefCell::new(None);
    let racy = Racy {
        mem: &mem,
        at: USED + used::avail_event(8),
        vcpu: true,
        hook: RefCell::new(Some(Box::new(|m: &Mem| {
            *late.borrow_mut() = drv.borrow_mut().post(m, &[(DATA + PAGE, 8, true)]);
        }))),
    };
    let idx = q.guest_avail_idx(&mem).expect("readable");
    assert_eq!(q.on_guest_submit(idx, &racy).expect("reachable"), Some(2));
    assert!(late.borrow().is_some());
    dev.fetch(&mem);
    let heads: Vec<u16> = dev.fetched.iter().map(|f| f.0).collect();
    assert_eq!(heads, vec![first, late.borrow().expect("posted")]);

    // The device side: a used entry posted right after the adapter moved `used_event`.
    dev.complete(&mem, 0, 1, 8);
    let dev = RefCell::new(dev);
    let racy = Racy {
        mem: &mem,
        at: AVAIL + avail::used_event(8),
        vcpu: false,
        hook: RefCell::new(Some(Box::new(|m: &Mem| {
            dev.borrow_mut().complete(m, 0, 2, 8);
        }))),
    };
    let mut dirty = Vec::new();
    assert_eq!(
        q.forward_completions(&racy, &mut dirty).expect("reachable"),
        2
    );
    assert_eq!(dirty, vec![DATA, DATA + PAGE]);
    assert_eq!(drv.borrow_mut().reap(&mem).len(), 2);
}

/// Chains the device reads from (transmitted packets) must be drained before a switchover;
/// receive buffers may stay in flight and go to the destination's device.
#[test]
fn chains_with_reads_are_told_apart_from_receive_buffers() {
    let (mem, mut drv, mut dev, mut q) = setup(8, features(), true);
    drv.post(&mem, &[(DATA, 1500, true)]);
    drv.post(&mem, &[(DATA + PAGE, 1500, true)]);
    drv.post(&mem, &[(DATA + 2 * PAGE, 60, false)]);
    drv.post_indirect(
        &mem,
        DATA + 30 * PAGE,
        &[(DATA + 3 * PAGE, 12, false), (DATA + 4 * PAGE, 1, true)],
    );
    submit(&mut q, &mem);
    assert_eq!((q.in_flight(), q.in_flight_with_reads()), (4, 2));
    dev.fetch(&mem);
    dev.complete(&mem, 3, 1, 1);
    dev.complete(&mem, 2, 1, 0);
    forward(&mut q, &mem);
    assert_eq!((q.in_flight(), q.in_flight_with_reads()), (2, 0));
    // A rebuilt queue restarts once: a second call leaves the device's rings alone.
    let state = q.state();
    let mut r = VirtQueue::rebuild(&state, 0, &mem).expect("rebuilds");
    assert_eq!(r.restart(&mem).expect("restarts"), Some(2));
    w16(&mem, USED + used::IDX, 1, false); // the device moved on
    assert_eq!(r.restart(&mem).expect("no-op"), None);
    assert_eq!(r16(&mem, USED + used::IDX, false), 1);
}

/// Chains as long as the table, every one of them: one call reads a bounded number of
/// descriptors and leaves the rest pending for the next calls; all are refused in the end.
#[test]
fn long_hostile_chains_are_taken_a_bounded_number_at_a_time() {
    let size = 64u16;
    let (mem, mut drv, mut dev, mut q) = setup(size, features(), true);
    for k in 0..size {
        let next = (k + 1) % size;
        Driver::write_desc(
            &mem,
            DESC + u64::from(k) * 16,
            d(DATA, 8, DESC_F_NEXT, next),
        );
    }
    for head in 0..size {
        drv.publish(&mem, head);
    }
    assert_eq!(submit(&mut q, &mem), None);
    let first = q.stats().refused;
    assert!(
        first > 0 && first < u64::from(size),
        "{first} refused in one call"
    );
    assert_eq!(q.pending(), size - first as u16);
    let mut calls = 1;
    while q.pending() > 0 {
        submit(&mut q, &mem);
        calls += 1;
        assert!(calls <= 64, "no progress");
    }
    assert_eq!(q.stats().refusals.loops, u64::from(size));
    assert_eq!(r16(&mem, USED + used::IDX, true), size);
    dev.fetch(&mem);
    assert!(dev.fetched.is_empty());
}

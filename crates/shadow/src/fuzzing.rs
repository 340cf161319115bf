//! Entry points for the coverage-guided fuzzer (`fuzz/` at the top of the repository) and for
//! the corpus replay test that runs the same bodies on the stable toolchain. Not an API.
use nvme_spec::{fuzz_records::Records, opcode::io, Sqe, PAGE_SIZE};
use passthrough::{config_log::RestoreBounds, msix::MsixState, ConfigLog};

use crate::{
    engine::device::SavedDevice,
    nvme::{
        validate::{self, Limits},
        NvmeQueue, QueueGeometry,
    },
    Buffers, RingAdapter, VecBuffers,
};

/// Guest RAM the fuzzed queues live in: 64 pages at 1 MiB.
const BASE: u64 = 0x10_0000;
const PAGES: u64 = 64;
const SQ: u64 = BASE;
const CQ: u64 = BASE + PAGE_SIZE;

fn le(b: &[u8], at: usize, n: usize) -> u64 {
    let mut w = [0u8; 8];
    for (i, x) in w.iter_mut().enumerate().take(n) {
        *x = b.get(at + i).copied().unwrap_or(0);
    }
    u64::from_le_bytes(w)
}

fn sqe(b: &[u8]) -> Sqe {
    let mut raw = [0u8; 64];
    let n = b.len().min(64);
    raw[..n].copy_from_slice(&b[..n]);
    Sqe::from_bytes(&raw)
}

/// Checks the validator's promise on one command: every page it yields is a whole page of
/// guest RAM, and no more pages than the transfer limit allows.
fn check(sqe: &Sqe, limits: &Limits, bufs: &VecBuffers) {
    if let Ok(c) = validate::check_io(sqe, limits, bufs) {
        assert!(
            c.pages.len() as u64 <= limits.max_transfer / PAGE_SIZE + 1,
            "{} pages for a limit of {} bytes",
            c.pages.len(),
            limits.max_transfer
        );
        for p in &c.pages {
            assert!(
                p % PAGE_SIZE == 0 && bufs.in_ram(*p, PAGE_SIZE),
                "page {p:#x} is not guest RAM"
            );
        }
    }
}

/// NVMe submission validation and PRP walking, and a shadowed queue pair driven by a hostile
/// guest and a device. The input starts with 4 bytes: block size (0: 512, else 4096), MDTS
/// exponent (transfer limit 4096 << (b % 8)), SQ and CQ entries (2 + b % 63); then records
/// `[control][len: u16 LE][bytes]`: 0 validate the 64-byte entry, 1 write the vCPU buffer, 2
/// write the device buffer (address offset: 2 bytes LE, then data), 3 the guest's SQ tail
/// doorbell, 4 the guest's CQ head doorbell, 5 forward the device's completions, 6 hold or
/// release, 7 validate the entry once its PRP list is written (PRP2 page gets the rest of the
/// bytes), anything else re-alignment steps.
pub fn nvme_submission(data: &[u8]) {
    let Some((h, rest)) = data.split_first_chunk::<4>() else {
        return;
    };
    let limits = Limits {
        nsid: 1,
        block_size: if h[0] == 0 { 512 } else { 4096 },
        max_transfer: PAGE_SIZE << (h[1] % 8),
    };
    let bufs = VecBuffers::new(BASE, (PAGES * PAGE_SIZE) as usize);
    let geo = QueueGeometry {
        qid: 1,
        sq_base: SQ,
        sq_entries: 2 + u32::from(h[2] % 63),
        cq_base: CQ,
        cq_entries: 2 + u32::from(h[3] % 63),
    };
    let Ok(mut q) = NvmeQueue::attach(geo, limits, 0, 0, &bufs) else {
        return;
    };
    let mut dirty = Vec::new();
    for (ctl, b) in Records(rest) {
        match ctl {
            0 => check(&sqe(b), &limits, &bufs),
            1 | 2 => {
                let at = BASE + le(b, 0, 2);
                let d = b.get(2..).unwrap_or(&[]);
                let _ = if ctl == 1 {
                    bufs.write_vcpu(at, d)
                } else {
                    bufs.write_device(at, d)
                };
            }
            3 => {
                let _ = q.on_guest_submit(le(b, 0, 4) as u32, &bufs);
            }
            4 => {
                let _ = q.on_guest_consume(le(b, 0, 4) as u32);
            }
            5 => {
                dirty.clear();
                if q.forward_completions(&bufs, &mut dirty).is_ok() {
                    for p in &dirty {
                        assert!(bufs.in_ram(*p, PAGE_SIZE), "dirty page {p:#x} outside RAM");
                    }
                }
            }
            6 => q.hold(b.first().is_some_and(|x| x & 1 != 0)),
            7 => {
                let s = sqe(b);
                let list = b.get(64..).unwrap_or(&[]);
                let _ = bufs.write_device(s.prp2() & !7, list);
                check(&s, &limits, &bufs);
            }
            _ => {
                if q.start_alignment().is_ok() {
                    for _ in 0..4 {
                        match q.alignment_step(&bufs) {
                            Ok(s) if !s.done => {}
                            _ => break,
                        }
                    }
                }
            }
        }
        assert!(q.in_flight() <= geo.sq_entries as usize);
    }
}

fn bounds() -> RestoreBounds {
    RestoreBounds {
        ram: std::iter::once(BASE..BASE + PAGES * PAGE_SIZE).collect(),
        max_queue_entries: 1024,
        msix_vectors: 8,
        dstrd: 0,
        bar0_size: 0x4000,
    }
}

/// Device state restored on a destination, as it arrives from the network: the first byte
/// picks the NVMe passthrough device's saved state (0: decoded, validated against this host's
/// bounds, its queues rebuilt) or the VMM's own state (else: the vCPU, irqchip, PIT and serial
/// state decoded as the destination decodes it).
pub fn device_state(data: &[u8]) {
    let Some((&which, rest)) = data.split_first() else {
        return;
    };
    if which != 0 {
        if let Ok(s) = postcard::from_bytes::<vmm::state::VmState>(rest) {
            for chip in &s.kvm.irqchips {
                let _ = chip.to_kvm();
            }
            let _ = postcard::to_allocvec(&s);
        }
        return;
    }
    let Ok(saved) = SavedDevice::decode(rest) else {
        return;
    };
    if saved.validate(&bounds()).is_err() {
        return;
    }
    let bufs = VecBuffers::new(BASE, (PAGES * PAGE_SIZE) as usize);
    for state in &saved.queues {
        if let Ok(mut q) = NvmeQueue::rebuild(state, saved.limits, &bufs) {
            let _ = q.start_alignment();
            let _ = q.alignment_step(&bufs);
            let _ = q.forward_completions(&bufs, &mut Vec::new());
        }
    }
}

/// A saved device as a source sends it (the corpus seed): one I/O queue pair that ran a few
/// commands.
pub fn sample_saved_device() -> Vec<u8> {
    let bufs = VecBuffers::new(BASE, (PAGES * PAGE_SIZE) as usize);
    let limits = Limits {
        nsid: 1,
        block_size: 4096,
        max_transfer: 1 << 17,
    };
    let geo = QueueGeometry {
        qid: 1,
        sq_base: SQ,
        sq_entries: 16,
        cq_base: CQ,
        cq_entries: 16,
    };
    let mut queues = Vec::new();
    if let Ok(mut q) = NvmeQueue::attach(geo, limits, 0, 0, &bufs) {
        let mut s = Sqe::new(io::READ, 7);
        s.set_nsid(1)
            .set_prps(BASE + 8 * PAGE_SIZE, 0)
            .set_lba_range(0, 1);
        let _ = bufs.write_vcpu(SQ, &s.to_bytes());
        let _ = q.on_guest_submit(1, &bufs);
        queues.push(q.state());
    }
    let saved = SavedDevice {
        config: ConfigLog {
            cc: 0x46_0001,
            aqa: 0x001f_001f,
            asq: BASE + 32 * PAGE_SIZE,
            acq: BASE + 33 * PAGE_SIZE,
            enables: 1,
            ..ConfigLog::default()
        },
        limits,
        dstrd: 0,
        queues,
        doorbells: vec![(1, 0)],
        admin: (0, 0),
        msix: MsixState::default(),
    };
    let mut out = vec![0u8];
    out.extend(saved.encode().unwrap_or_default());
    out
}

/// A shadowed split virtqueue between a hostile guest and a hostile device. The input starts
/// with 2 bytes: the queue size (`1 << (b % 6)`) and features (bit 0 indirect descriptors,
/// bit 1 EVENT_IDX); then records `[control][len: u16 LE][bytes]`: 0 write the vCPU buffer and
/// 1 the device buffer (address offset: 2 bytes LE, then data), 2 a descriptor in the guest's
/// table (index, address offset: 2 bytes, length: 2 bytes, flags, next), 3 an available entry
/// (head: 2 bytes) and the guest's index moved on, 4 a used entry from the device (id: 4 bytes,
/// len: 4 bytes) and its index moved on, 5 the guest's submit (a raw value when 4 bytes are
/// given, else the index in its ring), 6 forward the device's used entries, 7 hold or release,
/// 8 notification decisions, anything else save the state and rebuild it on a destination.
/// Checks: no more in flight than the queue holds, the saved state lists exactly the chains
/// in flight, dirty pages are whole pages of guest RAM.
pub fn virtio_queue(data: &[u8]) {
    use virtio_spec::{
        features::{bit, RING_EVENT_IDX, RING_INDIRECT_DESC},
        ring::{avail, used, Descriptor, UsedElem},
    };

    use crate::virtio::{chain::ChainLimits, VirtQueue, VirtqGeometry};

    let Some((h, rest)) = data.split_first_chunk::<2>() else {
        return;
    };
    let size = 1u16 << (h[0] % 6);
    let features = if h[1] & 1 != 0 {
        bit(RING_INDIRECT_DESC)
    } else {
        0
    } | if h[1] & 2 != 0 {
        bit(RING_EVENT_IDX)
    } else {
        0
    };
    let geo = VirtqGeometry {
        index: 0,
        size,
        desc: BASE,
        avail: BASE + PAGE_SIZE,
        used: BASE + 2 * PAGE_SIZE,
    };
    let limits = ChainLimits {
        max_chain_bytes: 16 * PAGE_SIZE,
        ..ChainLimits::default()
    };
    let bufs = VecBuffers::new(BASE, (PAGES * PAGE_SIZE) as usize);
    let Ok(mut q) = VirtQueue::attach(geo, features, limits, &bufs) else {
        return;
    };
    let (mut guest_idx, mut device_idx) = (0u16, 0u16);
    let mask = size - 1;
    for (ctl, b) in Records(rest) {
        match ctl {
            0 | 1 => {
                let at = BASE + le(b, 0, 2);
                let d = b.get(2..).unwrap_or(&[]);
                let _ = if ctl == 0 {
                    bufs.write_vcpu(at, d)
                } else {
                    bufs.write_device(at, d)
                };
            }
            2 => {
                let d = Descriptor {
                    addr: BASE + le(b, 1, 2),
                    len: le(b, 3, 2) as u32,
                    flags: le(b, 5, 1) as u16,
                    next: le(b, 6, 1) as u16,
                };
                let i = le(b, 0, 1) & u64::from(mask);
                let _ = bufs.write_vcpu(geo.desc + 16 * i, &d.to_bytes());
            }
            3 => {
                let at = geo.avail + avail::entry(guest_idx & mask);
                let _ = bufs.write_vcpu(at, &(le(b, 0, 2) as u16).to_le_bytes());
                guest_idx = guest_idx.wrapping_add(1);
                let _ = bufs.write_vcpu(geo.avail + avail::IDX, &guest_idx.to_le_bytes());
            }
            4 => {
                let e = UsedElem {
                    id: le(b, 0, 4) as u32,
                    len: le(b, 4, 4) as u32,
                };
                let _ = bufs.write_device(geo.used + used::entry(device_idx & mask), &e.to_bytes());
                device_idx = device_idx.wrapping_add(1);
                let _ = bufs.write_device(geo.used + used::IDX, &device_idx.to_le_bytes());
            }
            5 => {
                let v = if b.len() >= 4 {
                    Some(le(b, 0, 4) as u32)
                } else {
                    q.guest_avail_idx(&bufs).ok()
                };
                if let Some(v) = v {
                    let _ = q.on_guest_submit(v, &bufs);
                }
            }
            6 => {
                let mut dirty = Vec::new();
                if let Ok(n) = q.forward_completions(&bufs, &mut dirty) {
                    assert!(
                        n <= usize::from(size),
                        "{n} used entries from a queue of {size}"
                    );
                    for p in &dirty {
                        assert!(
                            p % PAGE_SIZE == 0 && bufs.in_ram(*p, PAGE_SIZE),
                            "dirty page {p:#x} outside RAM"
                        );
                    }
                }
            }
            7 => q.hold(b.first().is_some_and(|x| x & 1 != 0)),
            8 => {
                let _ = q.guest_needs_interrupt(&bufs);
                let _ = q.take_device_notify(&bufs);
            }
            _ => {
                let s = q.state();
                let dst = VecBuffers::new(BASE, (PAGES * PAGE_SIZE) as usize);
                *dst.vcpu.borrow_mut() = bufs.vcpu.borrow().clone();
                if let Ok(mut r) = VirtQueue::rebuild(&s, le(b, 0, 2) as u16, &dst) {
                    let _ = r.restart(&dst);
                    assert!(r.in_flight() <= usize::from(size));
                }
            }
        }
        let s = q.state();
        assert_eq!(
            usize::from(
                s.guest_avail
                    .wrapping_sub(s.guest_used)
                    .wrapping_sub(s.dropped)
            ),
            s.in_flight.len(),
            "the saved state's indexes and chains in flight disagree"
        );
        assert!(q.in_flight() <= usize::from(size));
    }
}

/// A virtio queue session (the corpus seed): a direct chain and an indirect one submitted,
/// used by the device (one with a length too large, one unknown id), saved and rebuilt.
pub fn sample_virtio_session() -> Vec<u8> {
    let mut o = vec![4, 3]; // 16 entries, indirect + EVENT_IDX
    let rec = |o: &mut Vec<u8>, ctl: u8, bytes: &[u8]| {
        o.push(ctl);
        o.extend_from_slice(&(bytes.len() as u16).to_le_bytes());
        o.extend_from_slice(bytes);
    };
    let desc = |i: u8, off: u16, len: u16, flags: u8, next: u8| {
        let mut b = vec![i];
        b.extend_from_slice(&off.to_le_bytes());
        b.extend_from_slice(&len.to_le_bytes());
        b.extend_from_slice(&[flags, next]);
        b
    };
    // Chain 0 → 1: a readable header, a writable page.
    rec(&mut o, 2, &desc(0, 0x8000, 12, 1, 1));
    rec(&mut o, 2, &desc(1, 0x9000, 4096, 2, 0));
    rec(&mut o, 3, &0u16.to_le_bytes());
    // Descriptor 2: an indirect table of two entries at offset 0xa000.
    let mut table = 0xa000u16.to_le_bytes().to_vec();
    for (addr, len, flags, next) in [(0xb000u64, 64u32, 1u16, 1u16), (0xc000, 512, 2, 0)] {
        let d = virtio_spec::ring::Descriptor {
            addr: BASE + addr,
            len,
            flags,
            next,
        };
        table.extend_from_slice(&d.to_bytes());
    }
    rec(&mut o, 0, &table);
    rec(&mut o, 2, &desc(2, 0xa000, 32, 4, 0));
    rec(&mut o, 3, &2u16.to_le_bytes());
    rec(&mut o, 5, &[]);
    // The device uses head 0 (100 bytes), head 2 with too many bytes, and an unknown id.
    for (id, len) in [(0u32, 100u32), (2, 4096), (9, 1)] {
        let mut u = id.to_le_bytes().to_vec();
        u.extend_from_slice(&len.to_le_bytes());
        rec(&mut o, 4, &u);
    }
    rec(&mut o, 6, &[]);
    rec(&mut o, 8, &[]);
    // Another chain, held, saved and rebuilt at index 0.
    rec(&mut o, 3, &0u16.to_le_bytes());
    rec(&mut o, 5, &[]);
    rec(&mut o, 7, &[1]);
    rec(&mut o, 0xff, &0u16.to_le_bytes());
    o
}

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

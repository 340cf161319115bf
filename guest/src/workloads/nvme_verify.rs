//! `nvme-verify`: random reads and writes over a region of namespace 1 where every block carries
//! a self-describing header (magic, LBA, generation, checksum) and a payload derived from
//! (LBA, generation). The guest keeps the last generation of every block and checks every
//! block of every read against it; command ids carry a slot and a tag so that a lost,
//! duplicated or corrupted completion is caught. IOPS and latency percentiles are printed every
//! report interval; at the end every block is read back and verified, and a digest of the
//! region's (LBA, generation) state is printed so that a later VM run can check it adopted the
//! same state.
//!
//! With `NVME_WITH_DIRTY` the `dirty` workload runs too, in the work area left after the NVMe
//! queues, state and buffers: every turn of the I/O loop writes the ledger pages that are due
//! and answers a pending ledger verification, so the vCPU dirties memory KVM sees while the
//! device writes memory KVM does not see.
use guest_abi::{
    params::{
        status, NVME_ADMIN_POLL, NVME_ADOPT_EXISTING, NVME_ALIGNED, NVME_INTERRUPTS,
        NVME_NO_DATA_CHECK, NVME_NO_FINAL_VERIFY, NVME_WITH_DIRTY, OFF_PROGRESS, READS_DEFAULT,
    },
    BootParams,
};
use nvme_spec::{
    opcode::{cns, io},
    Cqe, Sqe,
};

use crate::{
    clock,
    nvme::{prps, Arena, Nvme, MAX_DEPTH, MAX_QUEUES},
    params, println,
    workloads::dirty::{Dirtier, WorkArea},
};

const MAGIC: u64 = u64::from_le_bytes(*b"FERRYBLK");
const HDR_WORDS: usize = 4;
const LOST_AFTER_MS: u64 = 10_000;
/// Latency histogram in nanoseconds: 1 ns buckets below 4096 ns, then 64 buckets per power of
/// two (at most 1/64 = 1.6% coarse).
const HIST: usize = 4096 + 52 * 64;
/// How often (at most) the loop looks for a lost completion and for a due report.
const CHECK_EVERY_MS: u64 = 1;

fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn payload_word(lba: u64, gen: u32, i: usize) -> u64 {
    mix(lba ^ (gen as u64) << 40 ^ (i as u64) << 20)
}

fn checksum(words: &[u64]) -> u64 {
    words.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &w| {
        (h ^ w).wrapping_mul(0x0100_0000_01b3).rotate_left(7)
    })
}

/// Writes block `lba` generation `gen` into `words`.
fn fill(words: &mut [u64], lba: u64, gen: u32) {
    for (i, w) in words.iter_mut().enumerate().skip(HDR_WORDS) {
        *w = payload_word(lba, gen, i);
    }
    words[0] = MAGIC;
    words[1] = lba;
    words[2] = gen as u64;
    words[3] = checksum(&words[HDR_WORDS..]);
}

/// What a block holds: `Ok(Some(gen))`, `Ok(None)` for all zeros, `Err(reason)`.
fn inspect(words: &[u64], lba: u64) -> Result<Option<u32>, &'static str> {
    if words[0] != MAGIC {
        return if words.iter().all(|&w| w == 0) {
            Ok(None)
        } else {
            Err("neither a Ferry block header nor zeros")
        };
    }
    if words[1] != lba {
        return Err("header names another LBA");
    }
    if words[2] == 0 || words[2] > u32::MAX as u64 {
        return Err("header generation invalid");
    }
    if words[3] != checksum(&words[HDR_WORDS..]) {
        return Err("payload checksum mismatch");
    }
    let gen = words[2] as u32;
    for (i, &w) in words.iter().enumerate().skip(HDR_WORDS) {
        if w != payload_word(lba, gen, i) {
            return Err("payload differs from its generation's pattern");
        }
    }
    Ok(Some(gen))
}

#[derive(Clone, Copy)]
struct Slot {
    active: bool,
    write: bool,
    adopt: bool,
    tag: u8,
    blocks: u32,
    lba: u64,
    start: u64,
    buf: u64,
    list: u64,
}

struct Hist(&'static mut [u32]);

impl Hist {
    fn add(&mut self, ns: u64) {
        let b = if ns < 4096 {
            ns as usize
        } else {
            let exp = 63 - ns.leading_zeros() as usize; // >= 12
            let sub = ((ns >> (exp - 6)) & 63) as usize;
            (4096 + (exp - 12) * 64 + sub).min(HIST - 1)
        };
        self.0[b] += 1;
    }
    fn count(&self) -> u64 {
        self.0.iter().map(|&c| c as u64).sum()
    }
    fn pct(&self, p: u64) -> u64 {
        let total = self.count();
        if total == 0 {
            return 0;
        }
        let want = (total * p).div_ceil(100).max(1);
        let mut seen = 0u64;
        for (b, &c) in self.0.iter().enumerate() {
            seen += c as u64;
            if seen >= want {
                return if b < 4096 {
                    b as u64
                } else {
                    let (exp, sub) = ((b - 4096) / 64 + 12, (b - 4096) % 64);
                    ((64 + sub) as u64) << (exp - 6)
                };
            }
        }
        0
    }
    fn clear(&mut self) {
        self.0.fill(0);
    }
}

/// Nanoseconds as microseconds with three decimals, for the report lines.
struct Us(u64);

impl core::fmt::Display for Us {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "{}.{:03}", self.0 / 1000, self.0 % 1000)
    }
}

/// TSC ticks to nanoseconds without a division: `ticks * mul >> 32` (exact to 2^-32 relative).
#[derive(Clone, Copy)]
struct TickScale {
    mul: u64,
}

impl TickScale {
    fn new() -> Self {
        // ns per tick = 1e6 / ticks_per_ms, as a 32.32 fixed-point number.
        TickScale {
            mul: (1_000_000u64 << 32) / clock::ticks_per_ms().max(1),
        }
    }
    fn ns(self, ticks: u64) -> u64 {
        ((ticks as u128 * self.mul as u128) >> 32) as u64
    }
}

enum Plan {
    Random { to_issue: u64, until: u64 },
    Sequential { next: u64, adopt: bool },
}

struct Run {
    nvme: Nvme,
    slots: &'static mut [Slot],
    gens: &'static mut [u32],
    busy: &'static mut [u8],
    depth: usize,
    /// Slots with a command on the device.
    active: usize,
    /// `NVME_NO_DATA_CHECK`: completed reads' data is not inspected.
    check_data: bool,
    scale: TickScale,
    bs: u64,
    region_start: u64,
    region_blocks: u64,
    min_blocks: u32,
    max_blocks: u32,
    /// Random I/O starts at multiples of this many blocks (`NVME_ALIGNED`: `min_blocks`, else 1).
    align: u64,
    read_pct: u64,
    rng: u64,
    reads: u64,
    writes: u64,
    done: u64,
    total: Hist,
    interval: Hist,
    /// `dirty`, run between NVMe steps (`NVME_WITH_DIRTY`).
    dirty: Option<Dirtier>,
    /// `NVME_ADMIN_POLL`: the page Identify data lands in, the next deadline, commands sent.
    admin_poll: Option<(u64, u64, u64)>,
}

impl Run {
    fn rand(&mut self) -> u64 {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        self.rng
    }

    /// `NVME_ADMIN_POLL`: when due, Identify Controller into the poll page and check what came
    /// back (the model number a device with no name would not have; the page was zeroed).
    fn poll_admin(&mut self) -> Result<(), u32> {
        let Some((page, due, sent)) = self.admin_poll else {
            return Ok(());
        };
        let now = clock::rdtsc();
        if now < due {
            return Ok(());
        }
        // SAFETY: the poll page is ours, 4096 bytes, and no command is using it now.
        unsafe { core::ptr::write_bytes(page as *mut u8, 0, 4096) };
        if let Err(e) = self.nvme.ctrl.identify(cns::CONTROLLER, 0, page) {
            println!(
                "nvme-verify: admin poll {}: Identify failed: {}",
                sent + 1,
                e
            );
            return Err(status::NVME_IO_ERROR);
        }
        // SAFETY: the device wrote the page; nothing else uses it.
        let id = unsafe { core::slice::from_raw_parts(page as *const u8, 4096) };
        // VID (bytes 0..2) and the model number (24..64) are never all zero.
        if id[0..2] == [0, 0] || id[24..64].iter().all(|&b| b == 0) {
            println!(
                "nvme-verify: admin poll {}: Identify data missing",
                sent + 1
            );
            return Err(status::NVME_DATA_MISMATCH);
        }
        self.admin_poll = Some((page, now + clock::ticks_per_ms(), sent + 1));
        Ok(())
    }

    fn outstanding(&self) -> usize {
        self.active
    }

    /// Picks and submits the next command on queue `q`, slot `s`. Returns false when the plan
    /// has nothing to issue right now.
    fn issue(&mut self, q: usize, s: usize, plan: &mut Plan) -> bool {
        let (lba, blocks, write, adopt) = match plan {
            Plan::Random { to_issue, until } => {
                if *to_issue == 0
                    || (*until != 0 && clock::rdtsc() >= *until)
                    || params::stop_requested()
                {
                    return false;
                }
                let span = (self.max_blocks - self.min_blocks) as u64 + 1;
                let blocks = self.min_blocks + (self.rand() % span) as u32;
                let mut pick = None;
                for _ in 0..4 {
                    // Starts rel with rel % align == 0 and rel + blocks <= region_blocks.
                    let starts = (self.region_blocks - blocks as u64) / self.align + 1;
                    let rel = self.rand() % starts * self.align;
                    if (rel..rel + blocks as u64).all(|b| self.busy[b as usize] == 0) {
                        pick = Some(rel);
                        break;
                    }
                }
                let Some(rel) = pick else { return false };
                let write = self.rand() % 100 >= self.read_pct;
                *to_issue -= 1;
                (rel, blocks, write, false)
            }
            Plan::Sequential { next, adopt } => {
                if *next >= self.region_blocks {
                    return false;
                }
                let blocks = (self.max_blocks as u64).min(self.region_blocks - *next) as u32;
                let rel = *next;
                *next += blocks as u64;
                (rel, blocks, false, *adopt)
            }
        };
        let i = q * self.depth + s;
        let slot = self.slots[i];
        let len = blocks as u64 * self.bs;
        if write {
            let words_per_block = (self.bs / 8) as usize;
            // SAFETY: the slot buffer holds max_blocks blocks and belongs to this idle slot.
            let words = unsafe {
                core::slice::from_raw_parts_mut(
                    slot.buf as *mut u64,
                    blocks as usize * words_per_block,
                )
            };
            for b in 0..blocks as u64 {
                let rel = lba + b;
                let gen = self.gens[rel as usize].wrapping_add(1).max(1);
                let w =
                    &mut words[b as usize * words_per_block..(b as usize + 1) * words_per_block];
                fill(w, self.region_start + rel, gen);
            }
        }
        for b in lba..lba + blocks as u64 {
            self.busy[b as usize] = 1;
        }
        let tag = slot.tag.wrapping_add(1);
        let (p1, p2) = prps(slot.buf, len, slot.list);
        let mut sqe = Sqe::new(
            if write { io::WRITE } else { io::READ },
            (tag as u16) << 8 | s as u16,
        );
        sqe.set_nsid(1)
            .set_prps(p1, p2)
            .set_lba_range(self.region_start + lba, blocks);
        self.slots[i] = Slot {
            active: true,
            write,
            adopt,
            tag,
            blocks,
            lba,
            start: clock::rdtsc(),
            ..slot
        };
        self.active += 1;
        if let Some(qp) = self.nvme.queues[q].as_mut() {
            if qp.push(&sqe).is_err() {
                println!("nvme-verify: queue {} full with a free slot", q + 1);
                self.slots[i].active = false;
                self.active -= 1;
                for b in lba..lba + blocks as u64 {
                    self.busy[b as usize] = 0;
                }
                return false;
            }
        }
        true
    }

    /// Handles one completion from queue `q`.
    fn complete(&mut self, q: usize, c: Cqe) -> Result<(), u32> {
        let qid = q as u16 + 1;
        let s = (c.cid() & 0xff) as usize;
        let tag = (c.cid() >> 8) as u8;
        if c.sq_id() != qid || s >= self.depth {
            println!(
                "nvme-verify: completion on CQ {} names SQ {} cid {:#06x}: no such command",
                qid,
                c.sq_id(),
                c.cid()
            );
            return Err(status::NVME_UNEXPECTED_COMPLETION);
        }
        let i = q * self.depth + s;
        let slot = self.slots[i];
        if !slot.active || slot.tag != tag {
            println!(
                "nvme-verify: completion for cid {:#06x} on queue {}, which is not outstanding (slot active {}, tag {}): duplicate or corrupted completion",
                c.cid(),
                qid,
                slot.active,
                slot.tag
            );
            return Err(status::NVME_UNEXPECTED_COMPLETION);
        }
        self.slots[i].active = false;
        self.active -= 1;
        let lba = self.region_start + slot.lba;
        if !c.status().is_success() {
            println!(
                "nvme-verify: {} of {} blocks at LBA {} (queue {}, cid {:#06x}) failed: {}",
                if slot.write { "write" } else { "read" },
                slot.blocks,
                lba,
                qid,
                c.cid(),
                c.status()
            );
            return Err(status::NVME_IO_ERROR);
        }
        let ns = self.scale.ns(clock::rdtsc().wrapping_sub(slot.start));
        self.total.add(ns);
        self.interval.add(ns);
        if !slot.write && !slot.adopt && !self.check_data {
            for b in slot.lba..slot.lba + slot.blocks as u64 {
                self.busy[b as usize] = 0;
            }
            self.reads += 1;
            self.done += 1;
            return Ok(());
        }
        let wpb = (self.bs / 8) as usize;
        // SAFETY: the slot's buffer, written by the device for a read and by us for a write.
        let words = unsafe {
            core::slice::from_raw_parts(slot.buf as *const u64, slot.blocks as usize * wpb)
        };
        for b in 0..slot.blocks as u64 {
            let rel = (slot.lba + b) as usize;
            self.busy[rel] = 0;
            let w = &words[b as usize * wpb..(b as usize + 1) * wpb];
            if slot.write {
                self.gens[rel] = self.gens[rel].wrapping_add(1).max(1);
                continue;
            }
            let expected = self.gens[rel];
            match inspect(w, lba + b) {
                Ok(found) if slot.adopt && expected == 0 => self.gens[rel] = found.unwrap_or(0),
                Ok(found) if found.unwrap_or(0) == expected => {}
                Ok(found) => {
                    println!(
                        "nvme-verify: data mismatch at LBA {} (queue {}, cid {:#06x}): expected generation {}, block holds generation {}",
                        lba + b,
                        qid,
                        c.cid(),
                        expected,
                        found.unwrap_or(0)
                    );
                    return Err(status::NVME_DATA_MISMATCH);
                }
                Err(why) => {
                    println!(
                        "nvme-verify: corrupt block at LBA {} (queue {}, cid {:#06x}, expected generation {}): {} (words {:#x} {:#x} {:#x})",
                        lba + b,
                        qid,
                        c.cid(),
                        expected,
                        why,
                        w[0],
                        w[1],
                        w[2]
                    );
                    return Err(status::NVME_DATA_MISMATCH);
                }
            }
        }
        if slot.write {
            self.writes += 1;
        } else {
            self.reads += 1;
        }
        self.done += 1;
        Ok(())
    }

    /// Runs `plan` to completion with every queue kept as full as the plan allows.
    fn drive(&mut self, mut plan: Plan, report_every: u64) -> Result<(), u32> {
        let t0 = clock::rdtsc();
        let mut last_report = t0;
        let mut done_at_report = self.done;
        let lost_ticks = LOST_AFTER_MS * clock::ticks_per_ms();
        // A slot found overdue once: lost only if it is still overdue after one more poll
        // (a VM paused for longer than the limit may resume between the poll and the check,
        // its completions waiting in the queue).
        let mut overdue: Option<usize> = None;
        let mut spins = 0u64;
        let check_ticks = CHECK_EVERY_MS * clock::ticks_per_ms();
        let mut last_check = t0;
        loop {
            let mut issued_any = false;
            for q in 0..self.nvme.nqueues {
                let mut pushed = false;
                for s in 0..self.depth {
                    if !self.slots[q * self.depth + s].active {
                        if !self.issue(q, s, &mut plan) {
                            break;
                        }
                        pushed = true;
                    }
                }
                if pushed {
                    if let Some(qp) = self.nvme.queues[q].as_mut() {
                        qp.ring();
                    }
                    issued_any = true;
                }
            }
            let mut completed = false;
            for q in 0..self.nvme.nqueues {
                let mut got = false;
                while let Some(c) = self.nvme.queues[q].as_mut().and_then(|qp| qp.poll()) {
                    got = true;
                    self.complete(q, c)?;
                }
                if got {
                    if let Some(qp) = self.nvme.queues[q].as_mut() {
                        qp.ack();
                    }
                    completed = true;
                }
            }
            if let Some(d) = self.dirty.as_mut() {
                d.write_batch(false);
                d.serve_verify()?;
            }
            if !issued_any && !completed && self.outstanding() == 0 {
                return Ok(());
            }
            if matches!(plan, Plan::Random { .. }) {
                self.poll_admin()?;
            }
            spins += 1;
            if completed {
                params::write64(OFF_PROGRESS, self.done);
            }
            // The lost-completion scan and the report look at the clock and every slot: at most
            // once per CHECK_EVERY_MS (and every 4096 idle turns), not per completion.
            if (completed && clock::rdtsc().wrapping_sub(last_check) >= check_ticks)
                || spins.is_multiple_of(4096)
            {
                let now = clock::rdtsc();
                last_check = now;
                if let Some(i) = self
                    .slots
                    .iter()
                    .position(|s| s.active && now.wrapping_sub(s.start) > lost_ticks)
                {
                    if overdue != Some(i) {
                        overdue = Some(i);
                        continue;
                    }
                    let s = &self.slots[i];
                    println!(
                        "nvme-verify: lost completion: {} of {} blocks at LBA {} (tag {}) outstanding for more than {} ms",
                        if s.write { "write" } else { "read" },
                        s.blocks,
                        self.region_start + s.lba,
                        s.tag,
                        LOST_AFTER_MS
                    );
                    return Err(status::NVME_LOST_COMPLETION);
                }
                if report_every != 0 && now.wrapping_sub(last_report) >= report_every {
                    let ms = clock::ticks_to_ms(now - last_report).max(1);
                    let n = self.done - done_at_report;
                    println!(
                        "nvme-verify: {} ms: {} I/Os, {} IOPS, latency p50 {} us p99 {} us",
                        clock::ticks_to_ms(now - t0),
                        n,
                        n * 1000 / ms,
                        Us(self.interval.pct(50)),
                        Us(self.interval.pct(99))
                    );
                    if let Some(d) = &self.dirty {
                        d.report(now);
                    }
                    self.interval.clear();
                    last_report = now;
                    done_at_report = self.done;
                }
            }
        }
    }

    fn digest(&self) -> (u64, u64) {
        let mut h = 0u64;
        let mut written = 0;
        for (i, &g) in self.gens.iter().enumerate() {
            if g != 0 {
                written += 1;
                h = mix(h ^ ((self.region_start + i as u64) << 32 | g as u64));
            }
        }
        (h, written)
    }
}

pub fn run(p: &BootParams) -> u32 {
    let a = p.args.nvme;
    let queues = if a.queues == 0 { 2 } else { a.queues as usize };
    let depth = if a.depth == 0 { 32 } else { a.depth };
    if queues > MAX_QUEUES || !(1..=MAX_DEPTH).contains(&depth) {
        println!(
            "nvme-verify: {} queues of depth {}: at most {} queues of depth 1..={}",
            queues, depth, MAX_QUEUES, MAX_DEPTH
        );
        return status::BAD_PARAMS;
    }
    let mut arena = Arena::new(p.ram_lo_size);
    let nvme = match Nvme::init(
        &mut arena,
        queues,
        depth as u16,
        a.flags & NVME_INTERRUPTS != 0,
    ) {
        Ok(n) => n,
        Err(e) => {
            println!("nvme-verify: controller bring-up failed: {}", e);
            return match e {
                crate::nvme::InitError::NotFound => status::NVME_NOT_FOUND,
                _ => status::NVME_INIT_FAILED,
            };
        }
    };
    let bs = nvme.block_size as u64;
    let io_min = if a.io_min_bytes == 0 {
        4096
    } else {
        a.io_min_bytes as u64
    };
    let io_max = if a.io_max_bytes == 0 {
        io_min
    } else {
        a.io_max_bytes as u64
    };
    if bs == 0
        || io_min % bs != 0
        || io_max % bs != 0
        || io_max < io_min
        || io_max > nvme.max_transfer.min(128 << 10)
    {
        println!(
            "nvme-verify: I/O sizes {}..{} bytes do not fit blocks of {} bytes and the {} KiB maximum",
            io_min,
            io_max,
            bs,
            nvme.max_transfer.min(128 << 10) >> 10
        );
        return status::BAD_PARAMS;
    }
    let region_start = a.lba_start;
    let default_count = (16u64 << 20) / bs;
    let wanted = if a.lba_count == 0 {
        default_count
    } else {
        a.lba_count
    };
    let region_blocks = wanted.min(nvme.blocks.saturating_sub(region_start));
    let max_blocks = (io_max / bs) as u32;
    if region_blocks < max_blocks as u64 * 2 {
        println!(
            "nvme-verify: region of {} blocks at LBA {} is too small (namespace has {})",
            region_blocks, region_start, nvme.blocks
        );
        return status::BAD_PARAMS;
    }
    let nq = nvme.nqueues;
    let total_slots = nq * depth as usize;
    let (Some(slots), Some(gens), Some(busy), Some(h1), Some(h2)) = (
        arena.array::<Slot>(total_slots),
        arena.array::<u32>(region_blocks as usize),
        arena.array::<u8>(region_blocks as usize),
        arena.array::<u32>(HIST),
        arena.array::<u32>(HIST),
    ) else {
        println!(
            "nvme-verify: work area too small for {} blocks of state",
            region_blocks
        );
        return status::BAD_PARAMS;
    };
    for s in slots.iter_mut() {
        let (Some(buf), Some(list)) = (arena.alloc(io_max), arena.alloc(4096)) else {
            println!(
                "nvme-verify: work area too small for {} buffers of {} bytes",
                total_slots, io_max
            );
            return status::BAD_PARAMS;
        };
        s.buf = buf;
        s.list = list;
    }
    let admin_poll = if a.flags & NVME_ADMIN_POLL != 0 {
        let Some(page) = arena.alloc(4096) else {
            println!("nvme-verify: work area too small for the admin poll page");
            return status::BAD_PARAMS;
        };
        Some((page, 0, 0))
    } else {
        None
    };
    let dirty = if a.flags & NVME_WITH_DIRTY != 0 {
        match Dirtier::new(WorkArea::from(arena.take_rest(), p), p) {
            Ok(d) => Some(d),
            Err(st) => return st,
        }
    } else {
        None
    };
    let read_pct = if a.read_percent == READS_DEFAULT {
        50
    } else {
        a.read_percent.min(100) as u64
    };
    let mut run = Run {
        nvme,
        slots,
        gens,
        busy,
        depth: depth as usize,
        active: 0,
        check_data: a.flags & NVME_NO_DATA_CHECK == 0 || read_pct != 100,
        scale: TickScale::new(),
        bs,
        region_start,
        region_blocks,
        min_blocks: (io_min / bs) as u32,
        max_blocks,
        align: if a.flags & NVME_ALIGNED != 0 {
            (io_min / bs).max(1)
        } else {
            1
        },
        read_pct,
        rng: p.args.seed | 1,
        reads: 0,
        writes: 0,
        done: 0,
        total: Hist(h1),
        interval: Hist(h2),
        dirty,
        admin_poll,
    };
    println!(
        "nvme-verify: region LBA {}..{} ({} blocks), I/O {}..{} bytes, {}% reads, {} queue(s) x {}",
        region_start,
        region_start + region_blocks,
        region_blocks,
        io_min,
        io_max,
        read_pct,
        nq,
        depth
    );
    let tpms = clock::ticks_per_ms();
    let report_every = p.args.report_interval_ms.saturating_mul(tpms);
    if a.flags & NVME_ADOPT_EXISTING != 0 {
        if let Err(st) = run.drive(
            Plan::Sequential {
                next: 0,
                adopt: true,
            },
            0,
        ) {
            return st;
        }
        let (h, n) = run.digest();
        println!(
            "nvme-verify: adopted existing data: digest {:016x}, {} blocks written",
            h, n
        );
        run.reads = 0;
        run.done = 0;
        run.total.clear();
    }
    let ios = if a.ios == 0 && p.args.duration_ms == 0 {
        10_000
    } else if a.ios == 0 {
        u64::MAX
    } else {
        a.ios
    };
    let t0 = clock::rdtsc();
    let until = if a.ios == 0 {
        t0.saturating_add(p.args.duration_ms.saturating_mul(tpms))
    } else {
        0
    };
    run.interval.clear();
    if let Err(st) = run.drive(
        Plan::Random {
            to_issue: ios,
            until,
        },
        report_every,
    ) {
        return st;
    }
    let ticks = clock::rdtsc() - t0;
    let us = clock::ticks_to_us(ticks).max(1);
    println!(
        "nvme-verify: result ios={} reads={} writes={} iops={} p50_us={} p99_us={} elapsed_ms={}",
        run.done,
        run.reads,
        run.writes,
        run.done * 1_000_000 / us,
        Us(run.total.pct(50)),
        Us(run.total.pct(99)),
        us / 1000
    );
    let checked_data = run.check_data;
    if a.flags & NVME_NO_FINAL_VERIFY == 0 {
        // The read-back always checks the data.
        run.check_data = true;
        let before = run.done;
        if let Err(st) = run.drive(
            Plan::Sequential {
                next: 0,
                adopt: false,
            },
            0,
        ) {
            return st;
        }
        println!(
            "nvme-verify: final verification read {} blocks in {} commands: OK",
            region_blocks,
            run.done - before
        );
    }
    let (h, n) = run.digest();
    println!("nvme-verify: state digest {:016x}, {} blocks written", h, n);
    if let Err(e) = run.nvme.shutdown() {
        println!("nvme-verify: controller shutdown failed: {}", e);
        return status::NVME_IO_ERROR;
    }
    if checked_data {
        println!("nvme-verify: done, every read verified");
    } else {
        println!("nvme-verify: done, every completion checked (data of the random reads not read)");
    }
    run.dirty.as_ref().map_or(status::OK, Dirtier::finish)
}

//! `dirty`: dirty a working set at a configurable rate and keep a ledger that makes every lost
//! page write detectable.
//!
//! Work-area layout (pages counted from the start of the ledger's work area, `WORK_BASE` for
//! `dirty`, continuing above 4 GiB if the VM has RAM there): page 0 holds the header, then the ledger (one u64 generation per data page), then the
//! data pages. Writing page `p` for the `g`-th time stores `g` in word 0, `p` in word 1 and a
//! stamp derived from `(p, g, seed)` in word `2 + g % 510`, then records `g` in the ledger and
//! counts the write in the header. A page that misses its latest write (an older copy after a
//! migration, say) no longer matches its ledger entry; a ledger page that misses a write no
//! longer adds up to the header's total. Verification runs between writes, never in the middle
//! of one.
//!
//! [`Dirtier`] is the whole workload minus its main loop: `dirty` runs it alone over the whole
//! work area; `nvme-verify` with `NVME_WITH_DIRTY` gives it the part of the work area its own
//! allocations leave free and calls it between NVMe steps, so the ledger is written and verified
//! on request while the device does I/O.
use crate::{clock, params, println};
use guest_abi::{
    layout::{HIGH_RAM_START, WORK_BASE},
    params::status,
    BootParams,
};

const PAGE: u64 = 4096;
const WORDS: u64 = PAGE / 8;
const HEADER_MAGIC: u64 = u64::from_le_bytes(*b"LEDGER01");

/// The RAM a ledger lives in: low RAM from `lo_base` to its end, then all RAM above 4 GiB.
pub struct WorkArea {
    lo_base: u64,
    lo_pages: u64,
    hi_pages: u64,
}

impl WorkArea {
    /// The work area from `lo_base` on (rounded up to a page, at least `WORK_BASE`): the part
    /// of it below `lo_base` belongs to someone else.
    pub fn from(lo_base: u64, p: &BootParams) -> Self {
        let lo_base = lo_base.max(WORK_BASE).div_ceil(PAGE).saturating_mul(PAGE);
        WorkArea {
            lo_base,
            lo_pages: p.ram_lo_size.saturating_sub(lo_base) / PAGE,
            hi_pages: p.ram_hi_size / PAGE,
        }
    }

    fn pages(&self) -> u64 {
        self.lo_pages.saturating_add(self.hi_pages)
    }

    /// Address of work-area page `i` (callers keep `i < pages()`).
    fn page(&self, i: u64) -> *mut u64 {
        let addr = if i < self.lo_pages {
            self.lo_base + i * PAGE
        } else {
            HIGH_RAM_START + (i - self.lo_pages) * PAGE
        };
        addr as *mut u64
    }
}

struct Ledger {
    area: WorkArea,
    data_pages: u64,
    ledger_pages: u64,
    seed: u64,
}

fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

impl Ledger {
    fn stamp(&self, page: u64, gen: u64) -> u64 {
        mix(page ^ gen.rotate_left(32) ^ self.seed)
    }

    fn header(&self) -> *mut u64 {
        self.area.page(0)
    }

    fn entry(&self, page: u64) -> *mut u64 {
        let base = self.area.page(1 + page / WORDS);
        // SAFETY: page / WORDS < ledger_pages, so the entry lies in a ledger page.
        unsafe { base.add((page % WORDS) as usize) }
    }

    fn data(&self, page: u64) -> *mut u64 {
        self.area.page(1 + self.ledger_pages + page)
    }

    fn total(&self) -> u64 {
        // SAFETY: the header page is in the work area, which is guest RAM.
        unsafe { self.header().add(2).read_volatile() }
    }

    fn init(&self) {
        let h = self.header();
        // SAFETY: the header page is in the work area, which is guest RAM.
        unsafe {
            if h.read_volatile() == HEADER_MAGIC && h.add(1).read_volatile() == self.data_pages {
                return; // a ledger from before a state restore: keep it
            }
            h.write_volatile(HEADER_MAGIC);
            h.add(1).write_volatile(self.data_pages);
            h.add(2).write_volatile(0);
        }
    }

    fn write(&self, page: u64) {
        let e = self.entry(page);
        let d = self.data(page);
        // SAFETY: `page < data_pages`, so `d` is a whole data page and `e` its ledger entry,
        // both inside the work area.
        unsafe {
            let gen = e.read_volatile() + 1;
            d.write_volatile(gen);
            d.add(1).write_volatile(page);
            d.add((2 + gen % (WORDS - 2)) as usize)
                .write_volatile(self.stamp(page, gen));
            e.write_volatile(gen);
            let h = self.header().add(2);
            h.write_volatile(h.read_volatile() + 1);
        }
    }

    /// Checks every page against the ledger; returns (status, pages checked, total writes).
    fn verify(&self) -> (u32, u64, u64) {
        let mut sum = 0u64;
        for page in 0..self.data_pages {
            let e = self.entry(page);
            let d = self.data(page);
            // SAFETY: as in `write`.
            let (gen, g0, p1, st) = unsafe {
                let gen = e.read_volatile();
                let slot = (2 + gen % (WORDS - 2)) as usize;
                (
                    gen,
                    d.read_volatile(),
                    d.add(1).read_volatile(),
                    d.add(slot).read_volatile(),
                )
            };
            sum = sum.wrapping_add(gen);
            if g0 != gen {
                println!(
                    "dirty: ledger mismatch: page {} holds generation {}, ledger says {}",
                    page, g0, gen
                );
                return (status::LEDGER_PAGE_MISMATCH, page, sum);
            }
            if gen != 0 && (p1 != page || st != self.stamp(page, gen)) {
                println!(
                    "dirty: stamp mismatch: page {} generation {} (word1 {:#x}, stamp {:#x})",
                    page, gen, p1, st
                );
                return (status::LEDGER_STAMP_MISMATCH, page, sum);
            }
        }
        let total = self.total();
        if sum != total {
            println!(
                "dirty: ledger total mismatch: entries add up to {}, header says {}",
                sum, total
            );
            return (status::LEDGER_TOTAL_MISMATCH, self.data_pages, sum);
        }
        (status::OK, self.data_pages, total)
    }
}

fn report_verify(req: Option<u32>, ledger: &Ledger) -> u32 {
    let t0 = clock::rdtsc();
    let (st, pages, writes) = ledger.verify();
    let us = clock::ticks_to_us(clock::rdtsc() - t0);
    if st == status::OK {
        println!(
            "dirty: ledger verified: OK ({} pages, {} writes, {} us)",
            pages, writes, us
        );
    } else {
        println!("dirty: ledger verification FAILED (status {})", st);
    }
    if let Some(req) = req {
        params::complete_verify(req, st, pages, writes);
    }
    st
}

/// Formats a page-write rate, 0 meaning unlimited.
struct Rate(u64);

impl core::fmt::Display for Rate {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self.0 {
            0 => f.write_str("unlimited"),
            r => write!(f, "{} pages/s", r),
        }
    }
}

/// The `dirty` workload's state: the ledger, the page picker and the pacing of the writes.
pub struct Dirtier {
    ledger: Ledger,
    rng: u64,
    /// TSC ticks between writes; 0 = unlimited.
    ticks_per_write: u64,
    /// Most writes per call of [`Dirtier::write_batch`].
    batch: u64,
    /// When the next write is due (paced runs).
    deadline: u64,
    /// A pause longer than this (a migration, say) restarts the pacing instead of bursting.
    max_lag: u64,
    start: u64,
    writes_here: u64,
}

impl Dirtier {
    /// Lays the ledger out in `area` for the working set the boot parameters ask for (what fits)
    /// and prints what it will do. `Err` carries the exit status when nothing fits.
    pub fn new(area: WorkArea, p: &BootParams) -> Result<Self, u32> {
        let wanted = p.args.working_set_bytes / PAGE;
        // header + ledger + data must fit in the work area
        let capacity = area.pages().saturating_sub(1).saturating_mul(WORDS) / (WORDS + 1);
        let data_pages = wanted.min(capacity.saturating_sub(1));
        if data_pages == 0 {
            println!(
                "dirty: no room for a working set ({} bytes asked, {} pages free)",
                p.args.working_set_bytes,
                area.pages()
            );
            return Err(status::BAD_PARAMS);
        }
        let ledger = Ledger {
            data_pages,
            ledger_pages: data_pages.div_ceil(WORDS),
            area,
            seed: p.args.seed,
        };
        ledger.init();
        let rate = p.args.rate_pages_per_sec;
        println!(
            "dirty: working set {} MiB ({} pages), rate {}, duration {} ms",
            (data_pages * PAGE) >> 20,
            data_pages,
            Rate(rate),
            p.args.duration_ms
        );
        let tpms = clock::ticks_per_ms();
        let start = clock::rdtsc();
        Ok(Dirtier {
            ledger,
            rng: p.args.seed | 1,
            ticks_per_write: (tpms * 1000).checked_div(rate).unwrap_or(0),
            batch: if rate == 0 {
                256
            } else {
                (rate / 100).clamp(1, 256)
            },
            deadline: start,
            max_lag: 100 * tpms,
            start,
            writes_here: 0,
        })
    }

    /// Writes up to one batch of pages, paced to the rate. With `wait` it waits for every
    /// write's turn and always writes a whole batch; without, it writes only the writes that are
    /// due and returns at once. Returns the number of writes.
    pub fn write_batch(&mut self, wait: bool) -> u64 {
        let mut n = 0;
        while n < self.batch {
            if self.ticks_per_write != 0 {
                let now = clock::rdtsc();
                if now > self.deadline.saturating_add(self.max_lag) {
                    self.deadline = now; // paused for a long time (migration): do not burst
                }
                if now < self.deadline && !wait {
                    break;
                }
                while clock::rdtsc() < self.deadline {
                    core::hint::spin_loop();
                }
                self.deadline += self.ticks_per_write;
            }
            self.rng ^= self.rng << 13;
            self.rng ^= self.rng >> 7;
            self.rng ^= self.rng << 17;
            self.ledger.write(self.rng % self.ledger.data_pages);
            n += 1;
        }
        self.writes_here += n;
        n
    }

    /// Page writes recorded in the ledger (across state restores and migrations).
    pub fn total(&self) -> u64 {
        self.ledger.total()
    }

    /// Answers a pending verification request, if any. `Err` carries the status when the
    /// ledger does not hold.
    pub fn serve_verify(&self) -> Result<(), u32> {
        match params::pending_verify() {
            Some(req) => match report_verify(Some(req), &self.ledger) {
                status::OK => Ok(()),
                st => Err(st),
            },
            None => Ok(()),
        }
    }

    /// Prints a progress line for the time up to TSC `now`.
    pub fn report(&self, now: u64) {
        let ms = clock::ticks_to_ms(now.saturating_sub(self.start)).max(1);
        println!(
            "dirty: {} ms, {} writes ({} /s), ledger total {}",
            ms,
            self.writes_here,
            self.writes_here * 1000 / ms,
            self.ledger.total()
        );
    }

    /// The final verification, published as the answer to the pending (or the last)
    /// request. Returns its status.
    pub fn finish(&self) -> u32 {
        let st = report_verify(
            params::pending_verify().or(Some(params::read32(guest_abi::params::OFF_VERIFY_REQ))),
            &self.ledger,
        );
        println!("dirty: done");
        st
    }
}

pub fn run(p: &BootParams) -> u32 {
    let mut dirtier = match Dirtier::new(WorkArea::from(WORK_BASE, p), p) {
        Ok(d) => d,
        Err(st) => return st,
    };
    let tpms = clock::ticks_per_ms();
    let start = dirtier.start;
    let end = start.saturating_add(p.args.duration_ms.saturating_mul(tpms));
    let report_every = p.args.report_interval_ms.saturating_mul(tpms);
    let mut next_report = start.saturating_add(report_every);
    loop {
        dirtier.write_batch(true);
        params::write64(guest_abi::params::OFF_PROGRESS, dirtier.total());
        if let Err(st) = dirtier.serve_verify() {
            return st;
        }
        let now = clock::rdtsc();
        if (p.args.duration_ms != 0 && now >= end) || params::stop_requested() {
            break;
        }
        if report_every != 0 && now >= next_report {
            dirtier.report(now);
            next_report = now + report_every;
        }
    }
    dirtier.finish()
}

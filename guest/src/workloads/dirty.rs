//! `dirty`: dirty a working set at a configurable rate and keep a ledger that makes every lost
//! page write detectable.
//!
//! Work-area layout (pages counted from `WORK_BASE`, continuing above 4 GiB if the VM has RAM
//! there): page 0 holds the header, then the ledger (one u64 generation per data page), then the
//! data pages. Writing page `p` for the `g`-th time stores `g` in word 0, `p` in word 1 and a
//! stamp derived from `(p, g, seed)` in word `2 + g % 510`, then records `g` in the ledger and
//! counts the write in the header. A page that misses its latest write (an older copy after a
//! migration, say) no longer matches its ledger entry; a ledger page that misses a write no
//! longer adds up to the header's total. Verification runs between writes, never in the middle
//! of one.
use crate::{clock, params, println};
use guest_abi::{
    layout::{HIGH_RAM_START, WORK_BASE},
    params::status,
    BootParams,
};

const PAGE: u64 = 4096;
const WORDS: u64 = PAGE / 8;
const HEADER_MAGIC: u64 = u64::from_le_bytes(*b"LEDGER01");

struct WorkArea {
    lo_pages: u64,
    hi_pages: u64,
}

impl WorkArea {
    fn new(p: &BootParams) -> Self {
        WorkArea {
            lo_pages: p.ram_lo_size.saturating_sub(WORK_BASE) / PAGE,
            hi_pages: p.ram_hi_size / PAGE,
        }
    }

    fn pages(&self) -> u64 {
        self.lo_pages + self.hi_pages
    }

    /// Address of work-area page `i` (callers keep `i < pages()`).
    fn page(&self, i: u64) -> *mut u64 {
        let addr = if i < self.lo_pages {
            WORK_BASE + i * PAGE
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

pub fn run(p: &BootParams) -> u32 {
    let area = WorkArea::new(p);
    let wanted = p.args.working_set_bytes / PAGE;
    // header + ledger + data must fit in the work area
    let capacity = area.pages().saturating_sub(1) * WORDS / (WORDS + 1);
    let data_pages = wanted.min(capacity.saturating_sub(1));
    if data_pages == 0 {
        println!(
            "dirty: no room for a working set ({} bytes asked)",
            p.args.working_set_bytes
        );
        return status::BAD_PARAMS;
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
    let end = start.saturating_add(p.args.duration_ms.saturating_mul(tpms));
    let report_every = p.args.report_interval_ms.saturating_mul(tpms);
    let mut next_report = start.saturating_add(report_every);
    let ticks_per_write = (tpms * 1000).checked_div(rate).unwrap_or(0);
    let batch = if rate == 0 {
        256
    } else {
        (rate / 100).clamp(1, 256)
    };
    let mut deadline = start;
    let mut rng = p.args.seed | 1;
    let mut writes_here = 0u64;
    loop {
        for _ in 0..batch {
            if ticks_per_write != 0 {
                let now = clock::rdtsc();
                if now > deadline + 100 * tpms {
                    deadline = now; // paused for a long time (migration): do not burst
                }
                while clock::rdtsc() < deadline {
                    core::hint::spin_loop();
                }
                deadline += ticks_per_write;
            }
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            ledger.write(rng % data_pages);
        }
        writes_here += batch;
        params::write64(guest_abi::params::OFF_PROGRESS, ledger.total());
        if let Some(req) = params::pending_verify() {
            let st = report_verify(Some(req), &ledger);
            if st != status::OK {
                return st;
            }
        }
        let now = clock::rdtsc();
        if (p.args.duration_ms != 0 && now >= end) || params::stop_requested() {
            break;
        }
        if report_every != 0 && now >= next_report {
            let ms = clock::ticks_to_ms(now - start).max(1);
            println!(
                "dirty: {} ms, {} writes ({} /s), ledger total {}",
                ms,
                writes_here,
                writes_here * 1000 / ms,
                ledger.total()
            );
            next_report = now + report_every;
        }
    }
    let st = report_verify(
        params::pending_verify().or(Some(params::read32(guest_abi::params::OFF_VERIFY_REQ))),
        &ledger,
    );
    println!("dirty: done");
    st
}

//! The engine's CPU cost per forwarded I/O (`ferry bench shadow --engine`).
//!
//! One queue pair over the engine's real buffers (guest RAM and a ring copy, copy = vCPU
//! buffer), driven by a simulated guest driver and an in-process device that completes every
//! command at once. Only the engine's own calls are timed: the guest's submissions validated
//! and copied into the device's SQ (`on_guest_submit`), the device's completions translated
//! and copied into the guest's CQ with the written data page recorded (`forward_completions`),
//! and the guest's CQ head passed on (`on_guest_consume`). The floor is the same number of
//! plain copies of a 64-byte entry and a 16-byte completion between the same buffers. The
//! cost of the clock reads around the timed regions is measured and subtracted.
use std::{hint::black_box, sync::Arc};

use nvme_spec::{opcode::io, Cqe, Sqe, Status};
use serde::Serialize;
use vmm::memory::GuestRam;

use super::memory::{copy_rings, Designation, EngineBuffers};
use crate::{
    nvme::{validate::Limits, NvmeQueue, QueueGeometry},
    Buffers, Error, Result, RingAdapter,
};

const RAM: u64 = 32 << 20;
const SQ_BASE: u64 = 0x10_0000;
const CQ_BASE: u64 = 0x11_0000;
/// First data page of the reads.
const DATA: u64 = 0x20_0000;
const DATA_PAGES: u64 = 1024;

/// The result of one measurement.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct EngineCost {
    /// I/Os forwarded per run.
    pub ios: u64,
    /// Commands in flight per round (the batch the engine forwards at once).
    pub batch: u32,
    /// Engine CPU time per forwarded I/O, nanoseconds.
    pub ns_per_io: f64,
    /// Copying a 64-byte entry and a 16-byte completion between the same buffers, ns.
    pub floor_ns_per_io: f64,
    /// `ns_per_io / floor_ns_per_io`.
    pub ratio: f64,
    /// Data pages recorded as device-written (per run).
    pub dirty_pages: u64,
}

/// Who moves entries between the guest's and the device's rings.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Mover {
    /// The engine (the adapter).
    Engine,
    /// Plain copies of each entry (the floor).
    Copies,
    /// Nobody: the device works on the guest's rings (what the simulation itself costs).
    Shared,
}

/// Forwards `ios` 4 KiB reads in rounds of `batch` commands, `runs` times, and returns the
/// medians. Time is this thread's CPU time (time descheduled on a busy machine does not
/// count): the engine's cost is a run with the engine minus a run where the simulated device
/// works on the guest's rings directly; the floor is a run with plain copies minus the same.
pub fn measure(ios: u64, batch: u32, runs: usize) -> Result<EngineCost> {
    if batch == 0 || batch >= ENTRIES || ios == 0 || runs == 0 {
        return Err(Error::Engine(format!(
            "engine cost: batch {batch} must be in 1..{ENTRIES}, ios and runs positive"
        )));
    }
    let ram = GuestRam::new(RAM).map_err(|source| Error::Vmm {
        what: "guest RAM for the engine cost".into(),
        source,
    })?;
    let copies = Arc::new(copy_rings(&ram, &[GEO])?);
    let bufs = EngineBuffers::new(ram, copies, Designation::VcpuBuffer);
    let (mut engine, mut floor, mut dirty_pages) = (Vec::new(), Vec::new(), 0);
    for _ in 0..runs {
        let (shared, _) = run(&bufs, ios, batch, Mover::Shared)?;
        let (with_engine, dirty) = run(&bufs, ios, batch, Mover::Engine)?;
        let (copies, _) = run(&bufs, ios, batch, Mover::Copies)?;
        dirty_pages = dirty;
        engine.push((with_engine - shared).max(0.0) / ios as f64);
        floor.push((copies - shared).max(0.0) / ios as f64);
    }
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (ns, floor_ns) = (median(engine), median(floor));
    Ok(EngineCost {
        ios,
        batch,
        ns_per_io: ns,
        floor_ns_per_io: floor_ns,
        ratio: ns / floor_ns.max(1e-3),
        dirty_pages,
    })
}

const ENTRIES: u32 = 256;
const GEO: QueueGeometry = QueueGeometry {
    qid: 1,
    sq_base: SQ_BASE,
    sq_entries: ENTRIES,
    cq_base: CQ_BASE,
    cq_entries: ENTRIES,
};

/// This thread's CPU time, ns.
fn thread_cpu_ns() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec to write; the clock id is a constant.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as f64 * 1e9 + ts.tv_nsec as f64
}

/// One run on fresh rings; returns (CPU ns, data pages recorded).
fn run(bufs: &EngineBuffers, ios: u64, batch: u32, mover: Mover) -> Result<(f64, u64)> {
    for (base, len) in [
        (SQ_BASE, ENTRIES as usize * 64),
        (CQ_BASE, ENTRIES as usize * 16),
    ] {
        let zero = vec![0u8; len];
        write(bufs, true, base, &zero)?;
        write(bufs, false, base, &zero)?;
    }
    let limits = Limits {
        nsid: 1,
        block_size: 512,
        max_transfer: 128 << 10,
    };
    let mut q = NvmeQueue::attach(GEO, limits, 0, 0, bufs)?;
    let mut sim = Sim::new(ENTRIES, mover != Mover::Shared);
    let mut dirty = Vec::with_capacity(batch as usize * 2);
    let mut done = 0u64;
    let mut dirty_pages = 0u64;
    let (mut sqe, mut cqe) = ([0u8; 64], [0u8; 16]);
    let t0 = thread_cpu_ns();
    while done < ios {
        let n = batch.min((ios - done) as u32);
        let tail = sim.guest_submit(bufs, n)?;
        let rung = match mover {
            Mover::Engine => q.on_guest_submit(tail, bufs)?,
            Mover::Copies => {
                let mut i = sim.dev_sq_head;
                while i != tail {
                    let at = SQ_BASE + i as u64 * 64;
                    bufs.read_vcpu(at, &mut sqe);
                    bufs.write_device(at, black_box(&sqe));
                    i = (i + 1) % ENTRIES;
                }
                Some(tail)
            }
            Mover::Shared => Some(tail),
        };
        let Some(rung) = rung else {
            return Err(Error::Engine("engine cost: nothing forwarded".into()));
        };
        let first = sim.dev_cq_tail;
        sim.device_complete(bufs, rung)?;
        match mover {
            Mover::Engine => {
                let forwarded = q.forward_completions(bufs, &mut dirty)?;
                if forwarded != n as usize {
                    return Err(Error::Engine(format!(
                        "engine cost: {forwarded} of {n} completions forwarded"
                    )));
                }
            }
            Mover::Copies => {
                let mut i = first;
                while i != sim.dev_cq_tail {
                    let at = CQ_BASE + i as u64 * 16;
                    bufs.read_device(at, &mut cqe);
                    bufs.write_vcpu(at, black_box(&cqe));
                    i = (i + 1) % ENTRIES;
                }
            }
            Mover::Shared => {}
        }
        let head = sim.guest_consume(bufs, n)?;
        if mover == Mover::Engine {
            black_box(q.on_guest_consume(head));
        }
        dirty_pages += dirty.len() as u64;
        dirty.clear();
        done += n as u64;
    }
    Ok((thread_cpu_ns() - t0, dirty_pages))
}

/// The guest driver and the device.
struct Sim {
    entries: u32,
    /// Guest: next SQ slot, next CQ slot to read and its phase, next command id.
    sq_tail: u32,
    cq_head: u32,
    cq_phase: bool,
    cid: u16,
    /// Device: next SQ slot to fetch, next CQ slot to fill and its phase.
    dev_sq_head: u32,
    dev_cq_tail: u32,
    dev_phase: bool,
    lba: u64,
    /// The device works on its own rings (false: on the guest's).
    own_rings: bool,
}

impl Sim {
    fn new(entries: u32, own_rings: bool) -> Self {
        Sim {
            entries,
            own_rings,
            sq_tail: 0,
            cq_head: 0,
            cq_phase: true,
            cid: 0,
            dev_sq_head: 0,
            dev_cq_tail: 0,
            dev_phase: true,
            lba: 0,
        }
    }

    fn guest_submit(&mut self, bufs: &EngineBuffers, n: u32) -> Result<u32> {
        for _ in 0..n {
            let page = DATA + (self.lba % DATA_PAGES) * 4096;
            let mut s = Sqe::new(io::READ, self.cid);
            s.set_nsid(1)
                .set_prps(page, 0)
                .set_lba_range(self.lba * 8, 8);
            self.cid = (self.cid + 1) % 1024;
            self.lba += 1;
            write(
                bufs,
                true,
                SQ_BASE + self.sq_tail as u64 * 64,
                &s.to_bytes(),
            )?;
            self.sq_tail = (self.sq_tail + 1) % self.entries;
        }
        Ok(self.sq_tail)
    }

    fn device_complete(&mut self, bufs: &EngineBuffers, tail: u32) -> Result<()> {
        while self.dev_sq_head != tail {
            let mut raw = [0u8; 64];
            let at = SQ_BASE + self.dev_sq_head as u64 * 64;
            read(bufs, !self.own_rings, at, &mut raw)?;
            let sqe = Sqe::from_bytes(&raw);
            self.dev_sq_head = (self.dev_sq_head + 1) % self.entries;
            let c = Cqe::new(
                0,
                self.dev_sq_head as u16,
                1,
                sqe.cid(),
                Status::SUCCESS,
                self.dev_phase,
            );
            write(
                bufs,
                !self.own_rings,
                CQ_BASE + self.dev_cq_tail as u64 * 16,
                &c.to_bytes(),
            )?;
            self.dev_cq_tail = (self.dev_cq_tail + 1) % self.entries;
            if self.dev_cq_tail == 0 {
                self.dev_phase = !self.dev_phase;
            }
        }
        Ok(())
    }

    fn guest_consume(&mut self, bufs: &EngineBuffers, n: u32) -> Result<u32> {
        for _ in 0..n {
            let mut raw = [0u8; 16];
            read(bufs, true, CQ_BASE + self.cq_head as u64 * 16, &mut raw)?;
            let c = Cqe::from_bytes(&raw);
            if c.phase() != self.cq_phase || !c.status().is_success() {
                return Err(Error::Engine(format!(
                    "engine cost: guest CQ slot {} holds no good completion",
                    self.cq_head
                )));
            }
            self.cq_head = (self.cq_head + 1) % self.entries;
            if self.cq_head == 0 {
                self.cq_phase = !self.cq_phase;
            }
        }
        Ok(self.cq_head)
    }
}

fn read(bufs: &EngineBuffers, vcpu: bool, gpa: u64, buf: &mut [u8]) -> Result<()> {
    let ok = if vcpu {
        bufs.read_vcpu(gpa, buf)
    } else {
        bufs.read_device(gpa, buf)
    };
    ok.then_some(()).ok_or(Error::Access {
        buffer: if vcpu { "vCPU" } else { "device" },
        gpa,
        len: buf.len(),
    })
}

fn write(bufs: &EngineBuffers, vcpu: bool, gpa: u64, data: &[u8]) -> Result<()> {
    let ok = if vcpu {
        bufs.write_vcpu(gpa, data)
    } else {
        bufs.write_device(gpa, data)
    };
    ok.then_some(()).ok_or(Error::Access {
        buffer: if vcpu { "vCPU" } else { "device" },
        gpa,
        len: data.len(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_io_forwarded_and_its_page_recorded() {
        for batch in [1, 32] {
            let c = measure(10_000, batch, 1).unwrap();
            assert_eq!(c.ios, 10_000);
            assert_eq!(c.dirty_pages, 10_000);
        }
    }
}

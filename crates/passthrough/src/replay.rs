//! Rebuilding a device from a configuration log (migration destination), through the guest's
//! own admin queue: the controller is reset and enabled with the guest's admin queue registers
//! (AQA/ASQ/ACQ as the guest programmed them); while the features and I/O queues are replayed
//! the device's DMA view of the two admin rings is moved onto hypervisor memory (the VM has
//! not started and no I/O queue has a command, so nothing guest-controlled runs meanwhile),
//! and harmless fillers (Get Features) bring the device's admin positions onto the guest's
//! (SQ tail, CQ head and phase). The rings' DMA view then goes back to guest RAM and the
//! guest's admin commands run on its own ring, as on a device it owns: no hypervisor admin
//! queue stays in the device's DMA space, so no guest-supplied address can reach one, and no
//! proxy stands between the guest and its admin queue.
use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use nvme_spec::{
    opcode::{admin, feature},
    regs::{self, aqa, cc, csts},
    Cqe, Sqe,
};
use vmm::memory::GuestRam;

use crate::{
    client::Connection, config_log::ConfigLog, dma_layout::DmaLayout, hooks::DeviceBacking,
    host_client::DmaMemory, Error, Result,
};

const PAGE: u64 = 4096;
/// Most fillers spent re-aligning the admin queue (queues of one size need at most twice
/// their size; odd pairs of sizes may need more, up to this).
pub const MAX_ADMIN_FILLERS: u64 = 1 << 16;
/// How long one batch of admin commands may take.
const BATCH_TIMEOUT: Duration = Duration::from_secs(10);

/// The smallest number of admin commands `n >= at_least` after which a freshly enabled
/// controller (positions 0, phase 1) stands where the guest's admin queue does: its next
/// submission fetched from slot `sq_tail`, its next completion posted at `cq_head` with phase
/// `phase`. None when no count up to `at_least + MAX_ADMIN_FILLERS` does.
pub fn commands_to_align(
    (sq_entries, cq_entries): (u32, u32),
    (sq_tail, cq_head, phase): (u32, u32, bool),
    at_least: u64,
) -> Option<u64> {
    let (s, c) = (sq_entries as u64, cq_entries as u64);
    if s < 2 || c < 2 {
        return None;
    }
    (at_least..=at_least + MAX_ADMIN_FILLERS).find(|&n| {
        n % s == sq_tail as u64 && n % c == cq_head as u64 && (n / c).is_multiple_of(2) == phase
    })
}

/// The hypervisor's stand-in for the guest's admin rings while the configuration is replayed:
/// memory the device's DMA view of the two rings is moved onto, and a polled driver over it.
struct Ring<'a> {
    conn: &'a Connection,
    mem: DmaMemory,
    sq_entries: u32,
    cq_entries: u32,
    cq_offset: u64,
    tail: u32,
    head: u32,
    phase: bool,
    dstrd: u8,
}

impl Ring<'_> {
    /// Submits `cmds` (at most one batch) and waits for their completions; an error status
    /// fails the replay.
    fn run(&mut self, cmds: &[Sqe], name: &str) -> Result<()> {
        for (i, c) in cmds.iter().enumerate() {
            let mut c = *c;
            c.set_cid(i as u16);
            self.mem.write(self.tail as u64 * 64, &c.to_bytes());
            self.tail = (self.tail + 1) % self.sq_entries;
        }
        self.conn.region_write(
            0,
            regs::sq_tail_doorbell(0, self.dstrd),
            &self.tail.to_le_bytes(),
        )?;
        let deadline = Instant::now() + BATCH_TIMEOUT;
        let mut done = 0;
        while done < cmds.len() {
            let mut raw = [0u8; 16];
            self.mem
                .read(self.cq_offset + self.head as u64 * 16, &mut raw);
            let c = Cqe::from_bytes(&raw);
            if c.phase() != self.phase {
                if Instant::now() > deadline {
                    return Err(Error::Unsupported {
                        name: name.into(),
                        reason: format!(
                            "the device completed {done} of {} replayed admin commands within \
                             {BATCH_TIMEOUT:?}",
                            cmds.len()
                        ),
                    });
                }
                std::thread::sleep(Duration::from_micros(20));
                continue;
            }
            let i = c.cid() as usize;
            if !c.status().is_success() {
                return Err(Error::Driver {
                    name: name.into(),
                    what: "replaying the configuration",
                    source: nvme_spec::queue::DriverError::Command {
                        opcode: cmds.get(i).map_or(0, |s| s.opcode()),
                        status: c.status(),
                    },
                });
            }
            done += 1;
            self.head = (self.head + 1) % self.cq_entries;
            if self.head == 0 {
                self.phase = !self.phase;
            }
        }
        self.conn.region_write(
            0,
            regs::cq_head_doorbell(0, self.dstrd),
            &self.head.to_le_bytes(),
        )
    }
}

fn reg_read(conn: &Connection, off: u64) -> Result<u32> {
    let mut b = [0u8; 4];
    conn.region_read(0, off, &mut b)?;
    Ok(u32::from_le_bytes(b))
}

fn wait_ready(conn: &Connection, name: &str, ready: bool) -> Result<()> {
    let deadline = Instant::now() + BATCH_TIMEOUT;
    loop {
        let s = reg_read(conn, regs::CSTS)?;
        if s == u32::MAX || s & csts::CFS != 0 {
            return Err(Error::Driver {
                name: name.into(),
                what: "replaying the configuration",
                source: nvme_spec::queue::DriverError::Fatal(s),
            });
        }
        if (s & csts::RDY != 0) == ready {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(Error::Driver {
                name: name.into(),
                what: "replaying the configuration",
                source: nvme_spec::queue::DriverError::Timeout(if ready {
                    "CSTS.RDY = 1"
                } else {
                    "CSTS.RDY = 0"
                }),
            });
        }
        std::thread::sleep(Duration::from_micros(50));
    }
}

/// Resets the device behind `conn` and enables it on the guest's own admin queue (`log`'s
/// AQA/ASQ/ACQ), replays `log` (features, I/O CQs and SQs at the guest's addresses) with the
/// rings' DMA view on hypervisor memory, re-aligns the device's admin positions onto
/// `guest_admin` (SQ tail, CQ head) with fillers, and gives the rings' DMA view back to guest
/// RAM. `remap` moves a range of the device's DMA view (the attachment's layout).
///
/// `phase` is the phase the guest expects its next admin completion with; None reads it from
/// the entry before `cq_head` in guest RAM ([`admin_phase`]). Returns the phase used.
pub(crate) fn replay(
    conn: &Connection,
    ram: &GuestRam,
    layout: &Mutex<DmaLayout>,
    log: &ConfigLog,
    guest_admin: (u32, u32),
    phase: Option<bool>,
) -> Result<bool> {
    let name = conn.name.clone();
    let unsupported = |reason: String| Error::Unsupported {
        name: name.clone(),
        reason,
    };
    let (sq_entries, cq_entries) = (aqa::sq_entries(log.aqa), aqa::cq_entries(log.aqa));
    let (sq_tail, cq_head) = guest_admin;
    if sq_entries < 2 || cq_entries < 2 || sq_tail >= sq_entries || cq_head >= cq_entries {
        return Err(unsupported(format!(
            "guest admin queue positions {sq_tail}/{cq_head} do not fit AQA {:#x}",
            log.aqa
        )));
    }
    let sq_len = (sq_entries as u64 * 64).next_multiple_of(PAGE);
    let cq_len = (cq_entries as u64 * 16).next_multiple_of(PAGE);
    let overlap =
        log.asq < log.acq.saturating_add(cq_len) && log.acq < log.asq.saturating_add(sq_len);
    if overlap || !log.asq.is_multiple_of(PAGE) || !log.acq.is_multiple_of(PAGE) {
        return Err(unsupported(format!(
            "guest admin rings at {:#x}+{sq_len:#x} and {:#x}+{cq_len:#x} overlap or are not \
             page aligned",
            log.asq, log.acq
        )));
    }
    let phase = phase.unwrap_or_else(|| admin_phase(ram, log, cq_head));
    let mut cmds = Vec::new();
    for (&fid, &cdw11) in &log.features {
        let mut s = Sqe::new(admin::SET_FEATURES, 0);
        s.set_cdw(10, fid as u32).set_cdw(11, cdw11);
        cmds.push(s);
    }
    for (&qid, c) in &log.io_cqs {
        let mut s = Sqe::new(admin::CREATE_CQ, 0);
        s.set_prps(c.base, 0)
            .set_cdw(10, (c.entries - 1) << 16 | qid as u32)
            .set_cdw(11, 1 | (c.interrupts as u32) << 1 | (c.vector as u32) << 16);
        cmds.push(s);
    }
    for (&qid, q) in &log.io_sqs {
        let mut s = Sqe::new(admin::CREATE_SQ, 0);
        s.set_prps(q.base, 0)
            .set_cdw(10, (q.entries - 1) << 16 | qid as u32)
            .set_cdw(11, 1 | (q.priority as u32) << 1 | (q.cqid as u32) << 16);
        cmds.push(s);
    }
    let n = commands_to_align(
        (sq_entries, cq_entries),
        (sq_tail, cq_head, phase),
        cmds.len() as u64,
    )
    .ok_or_else(|| {
        unsupported(format!(
            "the device's admin queue cannot be brought onto the guest's positions {sq_tail}/\
             {cq_head} (AQA {:#x}) with at most {MAX_ADMIN_FILLERS} fillers",
            log.aqa
        ))
    })?;
    let mut filler = Sqe::new(admin::GET_FEATURES, 0);
    filler.set_cdw(10, feature::NUMBER_OF_QUEUES as u32);
    cmds.resize(n as usize, filler);

    let mem = DmaMemory::at(sq_len + cq_len, 0)?;
    let fd: Arc<std::os::fd::OwnedFd> = Arc::new(
        mem._file
            .try_clone()
            .map_err(|source| Error::Os {
                what: "duplicating the replay ring memfd".into(),
                source,
            })?
            .into(),
    );
    let remap =
        |gpa, size, backing| crate::attach::remap_dma(conn, ram, layout, gpa, size, backing);
    remap(
        log.asq,
        sq_len,
        DeviceBacking::Host {
            fd: fd.clone(),
            offset: 0,
        },
    )?;
    let moved_cq = remap(
        log.acq,
        cq_len,
        DeviceBacking::Host {
            fd: fd.clone(),
            offset: sq_len,
        },
    );
    let cq_moved = moved_cq.is_ok();
    let result = moved_cq.and_then(|()| {
        let mut cap = [0u8; 8];
        conn.region_read(0, regs::CAP, &mut cap)?;
        let dstrd = regs::cap::dstrd(u64::from_le_bytes(cap));
        if reg_read(conn, regs::CC)? & cc::EN != 0 {
            conn.region_write(0, regs::CC, &0u32.to_le_bytes())?;
        }
        wait_ready(conn, &name, false)?;
        for (off, v) in [
            (regs::AQA, log.aqa),
            (regs::ASQ, log.asq as u32),
            (regs::ASQ + 4, (log.asq >> 32) as u32),
            (regs::ACQ, log.acq as u32),
            (regs::ACQ + 4, (log.acq >> 32) as u32),
            (regs::CC, cc::ENABLE),
        ] {
            conn.region_write(0, off, &v.to_le_bytes())?;
        }
        wait_ready(conn, &name, true)?;
        let mut ring = Ring {
            conn,
            mem,
            sq_entries,
            cq_entries,
            cq_offset: sq_len,
            tail: 0,
            head: 0,
            phase: true,
            dstrd,
        };
        let batch = (sq_entries.min(cq_entries) - 1) as usize;
        for chunk in cmds.chunks(batch) {
            ring.run(chunk, &name)?;
        }
        debug_assert_eq!(
            (ring.tail, ring.head, ring.phase),
            (sq_tail, cq_head, phase)
        );
        // A controller the guest had already told to shut down is shut down here too (the
        // guest may be polling CSTS.SHST for it).
        if cc::shn(log.cc) != 0 {
            let v = reg_read(conn, regs::CC)?;
            conn.region_write(
                0,
                regs::CC,
                &((v & !(3 << 14)) | cc::shn(log.cc) << 14).to_le_bytes(),
            )?;
        }
        Ok(())
    });
    // The rings' DMA view goes back to guest RAM whatever happened: nothing of the
    // hypervisor's stays where the device can reach it.
    let back_sq = remap(log.asq, sq_len, DeviceBacking::Ram);
    let back_cq = if cq_moved {
        remap(log.acq, cq_len, DeviceBacking::Ram)
    } else {
        Ok(())
    };
    result?;
    back_sq?;
    back_cq?;
    tracing::info!(
        name = %name,
        commands = n,
        fillers = n - (log.features.len() + log.io_cqs.len() + log.io_sqs.len()) as u64,
        sq_tail,
        cq_head,
        "configuration replayed through the guest's admin queue"
    );
    Ok(phase)
}

/// The phase the guest expects its next admin completion at `cq_head` with, read from guest
/// RAM: everything it submitted was completed and consumed before the switchover (the source
/// checks), so its CQ tail is its CQ head, and the phase follows from the last entry it
/// consumed. `log`'s AQA must give at least 2 CQ entries and `cq_head` be below that.
pub fn admin_phase(ram: &GuestRam, log: &ConfigLog, cq_head: u32) -> bool {
    let cq_entries = aqa::cq_entries(log.aqa).max(1);
    let phase_at = |i: u32| -> bool {
        let mut b = [0u8; 16];
        let at = log.acq.wrapping_add(i as u64 * 16);
        ram.contains(at, 16) && ram.read(at, &mut b).is_ok() && Cqe::from_bytes(&b).phase()
    };
    if cq_head == 0 {
        !phase_at(cq_entries - 1)
    } else {
        phase_at(cq_head - 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fillers_land_the_device_on_the_guests_admin_positions() {
        // One size: the count is the guest's total modulo twice the size.
        for total in [0u64, 5, 31, 32, 33, 63, 64, 100] {
            let (s, c) = (32u32, 32u32);
            let pos = (
                (total % s as u64) as u32,
                (total % c as u64) as u32,
                (total / c as u64).is_multiple_of(2),
            );
            let n = commands_to_align((s, c), pos, 7).unwrap();
            assert!((7..7 + 64).contains(&n), "{total}: {n}");
            assert_eq!(n % 64, total % 64, "{total}");
        }
        // Different sizes: still the guest's count modulo lcm(S, 2C).
        let (s, c) = (16u32, 24u32);
        let total = 1000u64;
        let pos = (
            (total % 16) as u32,
            (total % 24) as u32,
            (total / 24).is_multiple_of(2),
        );
        let n = commands_to_align((s, c), pos, 3).unwrap();
        assert_eq!(n % 48, total % 48);
        // Positions no history can produce (a command outstanding on a one-size queue).
        assert_eq!(commands_to_align((32, 32), (5, 4, true), 0), None);
        assert_eq!(commands_to_align((1, 32), (0, 0, true), 0), None);
    }
}

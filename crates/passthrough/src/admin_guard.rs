//! The guest's admin submission queue as the device reads it while the hypervisor has memory
//! of its own in the device's DMA space (the shadow engine's bounce areas and ring copies):
//! the trapped admin SQ tail doorbell checks the guest's new commands with
//! [`crate::admin_check`] before the device is rung, and the device fetches only what was
//! checked. A refused command reaches the device rewritten so that the device itself fails it
//! with the status the check gave — its addresses moved to an IOVA nothing is mapped at, its
//! opcode replaced — and nothing outside guest RAM is reached.
//!
//! The guest's ring and the ring the device reads are two buffers, as for the shadowed I/O
//! queues; which one is hypervisor memory is chosen by whoever turns the guard on:
//! - [`GuardMode::Copy`] (the device is idle when the guard goes on, so its DMA mapping may be
//!   re-made): the device's DMA view of the ring is moved onto a hypervisor copy that only the
//!   trap fills; the guest keeps writing its ring in RAM.
//! - [`GuardMode::Swap`] (the device may be busy: its mapping is left alone): the guest's
//!   memory slot over the ring is moved onto a hypervisor copy (what the vCPUs see), and the
//!   trap writes each checked entry into the ring in RAM, which only the device reads.
//!
//! Either way a guest that rewrites an entry after the doorbell rewrites its own buffer, never
//! the one the device fetches from, and the check refuses guest addresses inside the ring the
//! device fetches from (a command's data aimed there would write unchecked commands).
//!
//! A guest that resets its controller and moves its admin queue while guarded is followed:
//! when it enables the controller again (the device then has no command, so its mapping may
//! be re-made) the new ring is guarded in [`GuardMode::Copy`].
use std::{
    ops::Range,
    os::fd::OwnedFd,
    sync::{Arc, Mutex, RwLock},
};

use nvme_spec::{opcode::admin, Sqe, Status};
use vmm::memory::GuestRam;

use crate::{hooks::DeviceBacking, host_client::DmaMemory, Error, Result};

/// A reserved admin opcode: the device fails it with Invalid Opcode.
const REFUSED_OPCODE: u8 = 0x7e;
const PAGE: u64 = 4096;

/// Guest ranges whose device side only the hypervisor writes — the admin SQ the device
/// fetches checked entries from, the shadow engine's ring copies — which no data address a
/// guest supplies may point into (the device would write commands or ring state nobody
/// checked, or, where the device side is a copy, hypervisor memory). Shared by the guard,
/// the attachment and the shadow engine's validator.
#[derive(Debug, Default)]
pub struct Protected {
    /// `[guard's rings, engine's rings]`.
    ranges: RwLock<[Vec<Range<u64>>; 2]>,
}

/// Who registered a set of [`Protected`] ranges.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Owner {
    /// The admin SQ guard.
    Guard = 0,
    /// The shadow engine (its I/O ring copies).
    Engine = 1,
}

impl Protected {
    /// Replaces `owner`'s ranges.
    pub fn set(&self, owner: Owner, ranges: Vec<Range<u64>>) {
        self.ranges.write().unwrap_or_else(|e| e.into_inner())[owner as usize] = ranges;
    }

    /// True when `[gpa, gpa + len)` overlaps a protected range.
    pub fn overlaps(&self, gpa: u64, len: u64) -> bool {
        let end = gpa.saturating_add(len);
        self.ranges
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .flatten()
            .any(|r| gpa < r.end && r.start < end)
    }
}

/// Which of the two buffers of the guarded ring is hypervisor memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GuardMode {
    /// The device reads a hypervisor copy of the ring (its DMA view moved onto it).
    Copy,
    /// The vCPUs see a hypervisor copy of the ring (their memory slot moved onto it); the
    /// device reads the ring in RAM, which only the guard writes.
    Swap,
}

/// One guarded ring: where it is and the hypervisor's buffer of it.
pub struct GuardedRing {
    /// Which buffer is the hypervisor's.
    pub mode: GuardMode,
    /// Guest-physical base of the ring.
    pub gpa: u64,
    /// Bytes of the buffer (the ring rounded up to pages).
    pub len: u64,
    entries: u32,
    mem: DmaMemory,
    /// The buffer's file (the device maps it in [`GuardMode::Copy`]).
    pub fd: Arc<OwnedFd>,
}

impl GuardedRing {
    fn new(gpa: u64, entries: u32, mode: GuardMode) -> Result<Self> {
        let len = (entries as u64 * 64).next_multiple_of(PAGE);
        let mem = DmaMemory::at(len, 0)?;
        let fd = mem._file.try_clone().map_err(|source| Error::Os {
            what: "duplicating the admin SQ copy's memfd".into(),
            source,
        })?;
        Ok(GuardedRing {
            mode,
            gpa,
            len,
            entries,
            mem,
            fd: Arc::new(fd.into()),
        })
    }

    /// Host address of the buffer (the guest's memory slot in [`GuardMode::Swap`]).
    pub fn host(&self) -> u64 {
        self.mem.host_addr()
    }

    fn range(&self) -> Range<u64> {
        self.gpa..self.gpa.saturating_add(self.len)
    }
}

/// The checked view of the guest's admin SQ.
pub struct AdminSqGuard {
    ring: GuardedRing,
    /// Rings guarded in [`GuardMode::Swap`] the guest moved its admin SQ away from: still
    /// behind the vCPUs' memory slots until the guard goes off.
    retired: Vec<GuardedRing>,
    /// An IOVA with nothing mapped (refused commands' addresses point there).
    unmapped: u64,
    protected: Arc<Protected>,
    /// Guest admin commands refused.
    pub refused: u64,
    /// Times the guard followed the guest's admin SQ to a new place.
    pub moves: u64,
}

/// The guard slot shared by the attachment and the trap.
pub type GuardSlot = Arc<Mutex<Option<AdminSqGuard>>>;

/// `sqe` as the device should see it when the check refused it with `status`.
pub fn rewrite_refused(sqe: &Sqe, status: Status, unmapped: u64) -> Sqe {
    let mut out = Sqe::new(REFUSED_OPCODE, sqe.cid());
    if status.same(Status::DATA_TRANSFER_ERROR) || status.same(Status::INVALID_PRP_OFFSET) {
        // The same command, its data and queue addresses aimed where nothing is mapped.
        out = *sqe;
        out.dw[0] &= !(3 << 14 | 3 << 8); // no SGL, not fused
        out.set_prps(
            unmapped | (sqe.prp1() & 0xfff),
            unmapped | (sqe.prp2() & 0xfff),
        );
    } else if status.same(Status::INVALID_FIELD) {
        // Get Features of the reserved feature 0: Invalid Field.
        out = Sqe::new(admin::GET_FEATURES, sqe.cid());
    }
    out
}

fn read_entry(ram: &GuestRam, at: u64) -> [u8; 64] {
    let mut raw = [0u8; 64];
    if ram.read(at, &mut raw).is_err() {
        raw = [0; 64];
    }
    raw
}

impl AdminSqGuard {
    /// Guards the `entries`-entry ring at `gpa`. [`GuardMode::Copy`]: the copy is filled with
    /// every entry checked (the device may not have fetched them all yet); the caller then
    /// moves the device's DMA view of [`AdminSqGuard::ring`] onto it. [`GuardMode::Swap`]: the
    /// copy takes the guest's ring as it is and refused entries are rewritten in RAM; the
    /// caller then moves the guest's memory slot onto the copy (vCPUs paused).
    pub fn new(
        ram: &GuestRam,
        (gpa, entries): (u64, u32),
        unmapped: u64,
        mode: GuardMode,
        protected: Arc<Protected>,
    ) -> Result<Self> {
        let mut g = AdminSqGuard {
            ring: GuardedRing::new(gpa, entries, mode)?,
            retired: Vec::new(),
            unmapped,
            protected,
            refused: 0,
            moves: 0,
        };
        g.publish();
        g.fill(ram);
        Ok(g)
    }

    /// Registers the rings the device must not be aimed at.
    fn publish(&self) {
        let ranges = std::iter::once(&self.ring)
            .chain(&self.retired)
            .map(GuardedRing::range)
            .collect();
        self.protected.set(Owner::Guard, ranges);
    }

    fn fill(&mut self, ram: &GuestRam) {
        for slot in 0..self.ring.entries {
            let at = self.ring.gpa + slot as u64 * 64;
            let raw = read_entry(ram, at);
            let out = self.check(ram, &raw);
            match self.ring.mode {
                GuardMode::Copy => self.ring.mem.write(slot as u64 * 64, &out.to_bytes()),
                GuardMode::Swap => {
                    self.ring.mem.write(slot as u64 * 64, &raw);
                    if out.to_bytes() != raw {
                        let _ = ram.write(at, &out.to_bytes());
                    }
                }
            }
        }
    }

    /// The ring guarded now.
    pub fn ring(&self) -> &GuardedRing {
        &self.ring
    }

    /// The entry the device should fetch for the guest's `raw` one.
    fn check(&mut self, ram: &GuestRam, raw: &[u8; 64]) -> Sqe {
        let sqe = Sqe::from_bytes(raw);
        let checked = if sqe.opcode() == admin::CREATE_SQ {
            // A queue created now would run direct: its doorbell is the device's, so its
            // commands would never be checked and could aim the device at hypervisor memory.
            Err(Status::INVALID_FIELD)
        } else {
            let in_ram = |g: u64, l: u64| ram.contains(g, l) && !self.protected.overlaps(g, l);
            crate::admin_check::check_admin(&sqe, &in_ram)
        };
        match checked {
            Ok(()) => sqe,
            Err(status) => {
                self.refused += 1;
                if self.refused.is_power_of_two() {
                    tracing::warn!(
                        opcode = sqe.opcode(),
                        refused = self.refused,
                        "guest admin command refused while guarded: {status:?}"
                    );
                }
                rewrite_refused(&sqe, status, self.unmapped)
            }
        }
    }

    /// The guest moved its admin SQ tail from `from` to `to`: the new entries are checked and
    /// written where the device fetches them.
    pub fn submitted(&mut self, ram: &GuestRam, from: u32, to: u32) {
        let entries = self.ring.entries;
        if from >= entries || to >= entries {
            return;
        }
        let mut i = from;
        while i != to {
            let off = i as u64 * 64;
            let at = self.ring.gpa + off;
            match self.ring.mode {
                GuardMode::Copy => {
                    let out = self.check(ram, &read_entry(ram, at));
                    self.ring.mem.write(off, &out.to_bytes());
                }
                GuardMode::Swap => {
                    let mut raw = [0u8; 64];
                    self.ring.mem.read(off, &mut raw);
                    let out = self.check(ram, &raw);
                    let _ = ram.write(at, &out.to_bytes());
                }
            }
            i = (i + 1) % entries;
        }
    }

    /// The guest enables its controller (the device has no command: it was disabled) with
    /// its admin SQ of `entries` at `gpa`: a ring somewhere new is guarded in
    /// [`GuardMode::Copy`] (`remap` moves the device's DMA view of a range); the old one goes
    /// back to RAM for the device (a copy) or stays behind the vCPUs' slot until the guard
    /// goes off (a swap). On an error the caller must not enable the controller.
    pub fn follow(
        &mut self,
        ram: &GuestRam,
        gpa: u64,
        entries: u32,
        remap: &dyn Fn(u64, u64, DeviceBacking) -> Result<()>,
    ) -> Result<()> {
        if gpa == self.ring.gpa && entries == self.ring.entries {
            return Ok(());
        }
        let new = GuardedRing::new(gpa, entries, GuardMode::Copy)?;
        if self.retired.iter().any(|r| {
            let n = new.range();
            n.start < r.range().end && r.range().start < n.end
        }) {
            return Err(Error::Unsupported {
                name: "admin SQ guard".into(),
                reason: format!(
                    "the guest's new admin SQ at {gpa:#x} overlaps one it left while guarded"
                ),
            });
        }
        let old_copy = self.ring.mode == GuardMode::Copy;
        if old_copy {
            remap(self.ring.gpa, self.ring.len, DeviceBacking::Ram)?;
        }
        let mut old = Some(std::mem::replace(&mut self.ring, new));
        if !old_copy {
            self.retired.extend(old.take());
        }
        self.publish();
        self.fill(ram);
        let moved = remap(
            self.ring.gpa,
            self.ring.len,
            DeviceBacking::Host {
                fd: self.ring.fd.clone(),
                offset: 0,
            },
        );
        if let Err(e) = moved {
            // Back to the old ring (best effort; the controller stays disabled anyway).
            if let Some(o) = old.take().or_else(|| self.retired.pop()) {
                self.ring = o;
            }
            self.publish();
            if old_copy {
                let _ = remap(
                    self.ring.gpa,
                    self.ring.len,
                    DeviceBacking::Host {
                        fd: self.ring.fd.clone(),
                        offset: 0,
                    },
                );
            }
            return Err(e);
        }
        self.moves += 1;
        tracing::info!(
            gpa = format_args!("{gpa:#x}"),
            entries,
            "the guest moved its admin SQ while guarded: the new one is guarded"
        );
        Ok(())
    }

    /// In [`GuardMode::Swap`], RAM gets the guest's view of the ring, each entry checked (the
    /// device may fetch any of the ones the guest submitted; refused ones stay rewritten), and
    /// the ring's pages are returned: the guest's writes went to the copy and the guard's into
    /// RAM, so KVM's dirty log saw neither, and a migration must send them. Nothing in
    /// [`GuardMode::Copy`] (the guest's ring is RAM).
    pub fn sync(&mut self, ram: &GuestRam) -> Vec<u64> {
        if self.ring.mode != GuardMode::Swap {
            return Vec::new();
        }
        for slot in 0..self.ring.entries {
            let off = slot as u64 * 64;
            let mut raw = [0u8; 64];
            self.ring.mem.read(off, &mut raw);
            let out = self.check(ram, &raw).to_bytes();
            let at = self.ring.gpa + off;
            if read_entry(ram, at) != out {
                let _ = ram.write(at, &out);
            }
        }
        self.ring.range().step_by(PAGE as usize).collect()
    }

    /// Turns the guard off: the rings whose device side (`Copy`) or vCPU side (`Swap`) must go
    /// back to RAM. For `Swap` rings, RAM first gets the guest's view: the entries of the ring
    /// in use checked ([`AdminSqGuard::sync`]), those of retired rings as they are. vCPUs
    /// paused for `Swap` rings.
    pub fn off(mut self, ram: &GuestRam) -> Vec<GuardedRing> {
        self.sync(ram);
        for r in &self.retired {
            let mut buf = vec![0u8; r.len as usize];
            r.mem.read(0, &mut buf);
            let _ = ram.write(r.gpa, &buf);
        }
        self.protected.set(Owner::Guard, Vec::new());
        let AdminSqGuard {
            ring, mut retired, ..
        } = self;
        retired.push(ring);
        retired
    }
}

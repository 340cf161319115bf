//! The guest's admin submission queue as the device reads it while the shadow engine runs
//! (the source): the trapped admin SQ tail doorbell checks the guest's new commands with
//! [`crate::admin_check`] before the device is rung, and a refused command reaches the device
//! rewritten so that the device itself fails it with the status the check gave — its
//! addresses moved to an IOVA nothing is mapped at, its opcode replaced — and nothing outside
//! guest RAM is reached.
//!
//! Two ways, chosen by whoever turns the guard on:
//! - [`GuardMode::Copy`] (the device is idle when the guard goes on, so its DMA mapping may be
//!   re-made): the device's DMA view of the ring is moved onto a hypervisor copy that only the
//!   trap fills; the guest cannot rewrite a command after the check.
//! - [`GuardMode::InPlace`] (the device may be busy: its mapping is left alone): refused
//!   commands are rewritten in the guest's own ring before the doorbell is forwarded. A guest
//!   with several vCPUs could still rewrite an entry between the check and the device's fetch.
use std::{
    os::fd::OwnedFd,
    sync::{Arc, Mutex},
};

use nvme_spec::{opcode::admin, Sqe, Status};
use vmm::memory::GuestRam;

use crate::{host_client::DmaMemory, Error, Result};

/// A reserved admin opcode: the device fails it with Invalid Opcode.
const REFUSED_OPCODE: u8 = 0x7e;

/// How the guard keeps refused commands from the device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GuardMode {
    /// The device reads a hypervisor copy of the ring.
    Copy,
    /// Refused commands are rewritten in the guest's ring.
    InPlace,
}

/// The checked view of the guest's admin SQ.
pub struct AdminSqGuard {
    /// How refused commands are kept from the device.
    pub mode: GuardMode,
    /// Guest-physical base of the ring.
    pub gpa: u64,
    /// Bytes of the copy (the ring rounded up to pages).
    pub len: u64,
    entries: u32,
    mem: DmaMemory,
    /// The copy's file, as the device maps it.
    pub fd: Arc<OwnedFd>,
    /// An IOVA with nothing mapped (refused commands' addresses point there).
    unmapped: u64,
    /// Guest admin commands refused.
    pub refused: u64,
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

impl AdminSqGuard {
    /// A copy of the `entries`-entry ring at `gpa`, filled from guest RAM (every entry checked:
    /// the device may not have fetched them all yet).
    pub fn new(
        ram: &GuestRam,
        gpa: u64,
        entries: u32,
        unmapped: u64,
        mode: GuardMode,
    ) -> Result<Self> {
        let len = (entries as u64 * 64).next_multiple_of(4096);
        let mem = DmaMemory::at(if mode == GuardMode::Copy { len } else { 4096 }, 0)?;
        let fd = mem._file.try_clone().map_err(|source| Error::Os {
            what: "duplicating the admin SQ copy's memfd".into(),
            source,
        })?;
        let mut g = AdminSqGuard {
            mode,
            gpa,
            len,
            entries,
            mem,
            fd: Arc::new(fd.into()),
            unmapped,
            refused: 0,
        };
        if mode == GuardMode::Copy {
            for i in 0..entries {
                g.copy_entry(ram, i);
            }
        }
        Ok(g)
    }

    fn copy_entry(&mut self, ram: &GuestRam, slot: u32) {
        let mut raw = [0u8; 64];
        let at = self.gpa + slot as u64 * 64;
        if ram.read(at, &mut raw).is_err() {
            raw = [0; 64];
        }
        let sqe = Sqe::from_bytes(&raw);
        let out = match crate::admin_check::check_admin(&sqe, &|g, l| ram.contains(g, l)) {
            Ok(()) => sqe,
            Err(status) => {
                self.refused += 1;
                if self.refused.is_power_of_two() {
                    tracing::warn!(
                        opcode = sqe.opcode(),
                        refused = self.refused,
                        "guest admin command refused while shadowed: {status:?}"
                    );
                }
                rewrite_refused(&sqe, status, self.unmapped)
            }
        };
        match self.mode {
            GuardMode::Copy => self.mem.write(slot as u64 * 64, &out.to_bytes()),
            GuardMode::InPlace => {
                if out != sqe {
                    let _ = ram.write(at, &out.to_bytes());
                }
            }
        }
    }

    /// The guest moved its admin SQ tail from `from` to `to`: the new entries go into the copy.
    pub fn submitted(&mut self, ram: &GuestRam, from: u32, to: u32) {
        if from >= self.entries || to >= self.entries {
            return;
        }
        let mut i = from;
        while i != to {
            self.copy_entry(ram, i);
            i = (i + 1) % self.entries;
        }
    }
}

//! The NVMe ring adapter: one I/O submission queue and its completion queue.
//!
//! Two cursors per side. On the guest side: the next SQ slot to take (`sq`), the next CQ slot
//! to fill and its phase (`cq`, `phase`), and the last CQ head the guest wrote. On the device
//! side: the next SQ slot to fill (= the SQ tail rung), the device's SQ head from its
//! completions, the next CQ slot to read and its phase, and the CQ head rung. On the source
//! both sides move together; on the destination the device side starts at zero and is brought
//! in line by fillers (see [`align`]).
pub mod align;
pub mod bounce;
pub mod validate;

use std::{
    collections::{HashMap, VecDeque},
    ops::Range,
};

use nvme_spec::{opcode::io, Cqe, Sqe, Status};
use serde::{Deserialize, Serialize};

use crate::{buffers::BuffersExt, Buffers, Error, Result, RingAdapter};
use align::Position;
use validate::{Checked, Direction, Limits};

const SQE: u64 = 64;
const CQE: u64 = 16;
/// Command identifier of filler commands (fillers never share the device with guest commands).
pub const FILLER_CID: u16 = 0xfffe;
/// Namespace of filler commands: 0, never a valid namespace, so a filler Flush is refused
/// (Invalid Namespace or Format) and has no effect; only its completion counts.
pub const FILLER_NSID: u32 = 0;

/// Where a queue pair lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueGeometry {
    /// Queue identifier (SQ and CQ share it).
    pub qid: u16,
    /// Guest-physical base of the SQ.
    pub sq_base: u64,
    /// SQ entries.
    pub sq_entries: u32,
    /// Guest-physical base of the CQ.
    pub cq_base: u64,
    /// CQ entries.
    pub cq_entries: u32,
}

/// The guest's side of a queue pair.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestSide {
    /// Last SQ tail the guest wrote.
    pub sq_tail: u32,
    /// Next guest SQ slot the hypervisor takes.
    pub sq_taken: u32,
    /// Next guest CQ slot the hypervisor fills.
    pub cq_tail: u32,
    /// Phase written at `cq_tail`.
    pub cq_phase: bool,
    /// Last CQ head the guest wrote.
    pub cq_head: u32,
}

/// The device's side of a queue pair.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceSide {
    /// Next device SQ slot the hypervisor fills (the SQ tail rung).
    pub sq_tail: u32,
    /// Device SQ head from its latest completion.
    pub sq_head: u32,
    /// Next device CQ slot to read.
    pub cq_tail: u32,
    /// Phase expected at `cq_tail`.
    pub cq_phase: bool,
    /// CQ head rung.
    pub cq_head: u32,
}

/// Counters of one shadowed queue.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueStats {
    /// Guest commands forwarded to the device.
    pub forwarded: u64,
    /// Completions forwarded to the guest.
    pub completed: u64,
    /// Guest commands refused by the hypervisor (completed with an error status).
    pub refused: u64,
    /// Data pages the device wrote for completed commands.
    pub dirty_pages: u64,
    /// Filler commands run for re-alignment.
    pub fillers: u64,
    /// Doorbell values or completions that made no sense (ignored, counted).
    pub anomalies: u64,
    /// Commands whose PRP list the device read from a hypervisor copy.
    pub bounced: u64,
}

/// The saved state of a queue pair (sent at switchover).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueState {
    /// Where it lives.
    pub geometry: QueueGeometry,
    /// Guest side.
    pub guest: GuestSide,
    /// Device side.
    pub device: DeviceSide,
    /// Counters.
    pub stats: QueueStats,
}

#[derive(Clone, Debug)]
struct InFlight {
    direction: Direction,
    pages: Vec<u64>,
    /// The bounce slot holding its PRP list, returned at completion.
    bounce: Option<usize>,
}

/// One shadowed NVMe I/O queue pair.
pub struct NvmeQueue {
    geo: QueueGeometry,
    limits: Limits,
    g: GuestSide,
    d: DeviceSide,
    /// Guest CQ entries not yet consumed, oldest first: the device CQ slot behind each one,
    /// or `None` for a completion the hypervisor made itself.
    slots: VecDeque<Option<u32>>,
    inflight: HashMap<u16, InFlight, CidHash>,
    /// Free bounce slots for PRP lists (one per command that can be in flight).
    bounce_free: Vec<usize>,
    /// Commands submitted before shadowing began, from the SQ ring, by command id: their
    /// completions still tell which pages the device wrote.
    legacy: HashMap<u16, Checked>,
    /// Commands submitted before shadowing began and not completed yet (known from the
    /// positions when the SQ and CQ have the same size; 0 otherwise).
    legacy_outstanding: u32,
    hold: bool,
    realign: Option<Realign>,
    stats: QueueStats,
}

#[derive(Clone, Copy, Debug)]
struct Realign {
    to_submit: u64,
    to_reap: u64,
}

/// What one re-alignment step asks of the engine.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AlignStep {
    /// Ring the device's SQ tail doorbell with this.
    pub sq_tail: Option<u32>,
    /// Ring the device's CQ head doorbell with this.
    pub cq_head: Option<u32>,
    /// The queue is aligned.
    pub done: bool,
}

/// Hashing of command ids for the in-flight table: one multiplication instead of SipHash on
/// the hot path. Command ids come from the guest; a guest that picks colliding ids only slows
/// its own queue, whose table is bounded by the queue size.
#[derive(Clone, Copy, Debug, Default)]
struct CidHash;

impl std::hash::BuildHasher for CidHash {
    type Hasher = CidHasher;
    fn build_hasher(&self) -> CidHasher {
        CidHasher(0)
    }
}

#[derive(Clone, Copy, Debug, Default)]
struct CidHasher(u64);

impl std::hash::Hasher for CidHasher {
    fn finish(&self) -> u64 {
        // Fibonacci hashing: spreads consecutive ids over the top bits hashbrown uses too.
        self.0.wrapping_mul(0x9e37_79b9_7f4a_7c15)
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 << 8) | u64::from(b);
        }
    }
    fn write_u16(&mut self, i: u16) {
        self.0 = u64::from(i);
    }
}

fn step(i: u32, n: u32) -> u32 {
    if i + 1 == n {
        0
    } else {
        i + 1
    }
}

impl NvmeQueue {
    fn check_geometry(geo: &QueueGeometry, bufs: &dyn Buffers) -> Result<()> {
        let bad = |reason: String| Error::BadQueue {
            qid: geo.qid,
            reason,
        };
        if !(2..=65536).contains(&geo.sq_entries) || !(2..=65536).contains(&geo.cq_entries) {
            return Err(bad(format!(
                "{} SQ / {} CQ entries",
                geo.sq_entries, geo.cq_entries
            )));
        }
        if !bufs.in_ram(geo.sq_base, geo.sq_entries as u64 * SQE)
            || !bufs.in_ram(geo.cq_base, geo.cq_entries as u64 * CQE)
        {
            return Err(bad(format!(
                "rings at {:#x}/{:#x} are not inside guest RAM",
                geo.sq_base, geo.cq_base
            )));
        }
        Ok(())
    }

    /// Starts shadowing a live queue pair whose device is where the guest left it.
    ///
    /// `sq_tail` and `cq_head` are the doorbell values the guest last wrote. The vCPU buffer
    /// must be the copy taken while the vCPUs were paused: completions the device posted
    /// after the copy are found by their phase and forwarded later.
    pub fn attach(
        geo: QueueGeometry,
        limits: Limits,
        sq_tail: u32,
        cq_head: u32,
        bufs: &dyn Buffers,
    ) -> Result<Self> {
        Self::check_geometry(&geo, bufs)?;
        let (s, c) = (geo.sq_entries, geo.cq_entries);
        if sq_tail >= s || cq_head >= c {
            return Err(Error::BadQueue {
                qid: geo.qid,
                reason: format!("doorbells {sq_tail}/{cq_head} out of range"),
            });
        }
        let phase_at = |i: u32| -> Result<bool> {
            let mut b = [0u8; 16];
            bufs.vcpu_read(geo.cq_base + i as u64 * CQE, &mut b)?;
            Ok(Cqe::from_bytes(&b).phase())
        };
        // The phase of the first unconsumed entry follows from the last consumed one.
        let phase = if cq_head == 0 {
            !phase_at(c - 1)?
        } else {
            phase_at(cq_head - 1)?
        };
        // Entries already in the copy, not yet consumed by the guest.
        let (mut tail, mut tail_phase, mut slots) = (cq_head, phase, VecDeque::new());
        while slots.len() + 1 < c as usize && phase_at(tail)? == tail_phase {
            slots.push_back(Some(tail));
            tail = step(tail, c);
            if tail == 0 {
                tail_phase = !tail_phase;
            }
        }
        // Commands that may still be in flight: the most recent submission of each command
        // id in the SQ ring.
        let mut legacy = HashMap::new();
        for back in 1..=s {
            let i = (sq_tail + s - back) % s;
            let mut raw = [0u8; 64];
            bufs.vcpu_read(geo.sq_base + i as u64 * SQE, &mut raw)?;
            let sqe = Sqe::from_bytes(&raw);
            if let Ok(c) = validate::check_io(&sqe, &limits, bufs) {
                legacy.entry(c.cid).or_insert(c);
            }
        }
        // Every command yields one completion: with rings of one size, the commands not yet
        // completed are the SQ entries between the CQ tail and the SQ tail.
        let legacy_outstanding = if s == c { (sq_tail + s - tail) % s } else { 0 };
        Ok(NvmeQueue {
            geo,
            limits,
            legacy_outstanding,
            g: GuestSide {
                sq_tail,
                sq_taken: sq_tail,
                cq_tail: tail,
                cq_phase: tail_phase,
                cq_head,
            },
            d: DeviceSide {
                sq_tail,
                sq_head: sq_tail,
                cq_tail: tail,
                cq_phase: tail_phase,
                cq_head,
            },
            slots,
            inflight: HashMap::with_hasher(CidHash),
            bounce_free: (0..geo.sq_entries as usize).rev().collect(),
            legacy,
            hold: false,
            realign: None,
            stats: QueueStats::default(),
        })
    }

    /// Data pages the device may still write for commands submitted before the queue was
    /// attached (their command ids found in the SQ ring).
    pub fn legacy_device_pages(&self) -> Vec<u64> {
        self.legacy
            .values()
            .filter(|c| c.direction == Direction::FromDevice)
            .flat_map(|c| c.pages.iter().copied())
            .collect()
    }

    /// Rebuilds a queue pair on the destination from its saved state, in front of a fresh
    /// device queue (SQ 0, CQ 0, phase 1). It must be re-aligned before it can run direct.
    pub fn rebuild(state: &QueueState, limits: Limits, bufs: &dyn Buffers) -> Result<Self> {
        Self::check_geometry(&state.geometry, bufs)?;
        let geo = state.geometry;
        let g = state.guest;
        if g.sq_tail >= geo.sq_entries
            || g.sq_taken >= geo.sq_entries
            || g.cq_tail >= geo.cq_entries
            || g.cq_head >= geo.cq_entries
        {
            return Err(Error::BadQueue {
                qid: geo.qid,
                reason: format!("guest positions {g:?} out of range"),
            });
        }
        let unconsumed = (g.cq_tail + geo.cq_entries - g.cq_head) % geo.cq_entries;
        Ok(NvmeQueue {
            geo,
            limits,
            g,
            d: DeviceSide {
                cq_phase: true,
                ..Default::default()
            },
            slots: (0..unconsumed).map(|_| None).collect(),
            inflight: HashMap::with_hasher(CidHash),
            bounce_free: (0..geo.sq_entries as usize).rev().collect(),
            legacy: HashMap::new(),
            legacy_outstanding: 0,
            hold: true,
            realign: None,
            stats: state.stats,
        })
    }

    /// The state to send at switchover (after a drain: nothing in flight).
    pub fn state(&self) -> QueueState {
        QueueState {
            geometry: self.geo,
            guest: self.g,
            device: self.d,
            stats: self.stats,
        }
    }

    /// Counters.
    pub fn stats(&self) -> QueueStats {
        self.stats
    }

    /// Where the queue lives.
    pub fn geometry(&self) -> QueueGeometry {
        self.geo
    }

    /// Guest submissions not forwarded yet.
    pub fn pending(&self) -> u32 {
        (self.g.sq_tail + self.geo.sq_entries - self.g.sq_taken) % self.geo.sq_entries
    }

    /// True when device positions equal guest positions and nothing is in flight or pending:
    /// the rings can be made identical and shadowing dropped.
    pub fn in_sync(&self) -> bool {
        self.in_flight() == 0
            && self.pending() == 0
            && self.d.sq_tail == self.g.sq_taken
            && self.d.cq_tail == self.g.cq_tail
            && self.d.cq_phase == self.g.cq_phase
            && self.slots.iter().all(|s| s.is_some())
    }

    fn guest_sq_head(&self) -> u16 {
        let s = self.geo.sq_entries;
        let unfetched = (self.d.sq_tail + s - self.d.sq_head) % s;
        ((self.g.sq_taken + s - unfetched) % s) as u16
    }

    fn guest_cq_full(&self) -> bool {
        step(self.g.cq_tail, self.geo.cq_entries) == self.g.cq_head
    }

    /// Writes a completion into the guest's CQ (phase dword last, so a polling guest never
    /// sees half an entry).
    fn post_guest(&mut self, cqe: &Cqe, bufs: &dyn Buffers) -> Result<()> {
        let at = self.geo.cq_base + self.g.cq_tail as u64 * CQE;
        let b = cqe.to_bytes();
        bufs.vcpu_write(at, &b[..12])?;
        std::sync::atomic::fence(std::sync::atomic::Ordering::Release);
        bufs.vcpu_write(at + 12, &b[12..])?;
        self.g.cq_tail = step(self.g.cq_tail, self.geo.cq_entries);
        if self.g.cq_tail == 0 {
            self.g.cq_phase = !self.g.cq_phase;
        }
        Ok(())
    }

    /// Reads the device's next completion if it is there (phase checked before the body).
    fn peek_device(&self, bufs: &dyn Buffers) -> Result<Option<Cqe>> {
        let at = self.geo.cq_base + self.d.cq_tail as u64 * CQE;
        let mut last = [0u8; 4];
        bufs.device_read(at + 12, &mut last)?;
        if ((u32::from_le_bytes(last) >> 16) & 1 == 1) != self.d.cq_phase {
            return Ok(None);
        }
        std::sync::atomic::fence(std::sync::atomic::Ordering::Acquire);
        let mut b = [0u8; 16];
        bufs.device_read(at, &mut b)?;
        Ok(Some(Cqe::from_bytes(&b)))
    }

    fn advance_device_cq(&mut self) {
        self.d.cq_tail = step(self.d.cq_tail, self.geo.cq_entries);
        if self.d.cq_tail == 0 {
            self.d.cq_phase = !self.d.cq_phase;
        }
    }

    /// Device position, for re-alignment.
    pub fn device_position(&self) -> Position {
        Position {
            sq: self.d.sq_tail,
            cq: self.d.cq_tail,
            phase: self.d.cq_phase,
        }
    }

    /// Guest position, for re-alignment.
    pub fn guest_position(&self) -> Position {
        Position {
            sq: self.g.sq_taken,
            cq: self.g.cq_tail,
            phase: self.g.cq_phase,
        }
    }

    /// Plans the re-alignment of a held queue with nothing in flight; returns the number of
    /// fillers it takes (0: already aligned).
    pub fn start_alignment(&mut self) -> Result<u64> {
        let qid = self.geo.qid;
        if !self.hold || self.in_flight() > 0 {
            return Err(Error::Realign {
                qid,
                reason: "the queue must be held and idle".into(),
            });
        }
        let c = self.geo.cq_entries;
        let unconsumed = self.slots.len() as u32;
        let aligned = self.device_position() == self.guest_position()
            && self.d.cq_head == (self.d.cq_tail + c - unconsumed) % c;
        let k = if aligned {
            0
        } else {
            align::fillers_needed(
                self.geo.sq_entries,
                c,
                self.device_position(),
                self.guest_position(),
                unconsumed as u64,
            )
            .ok_or_else(|| Error::Realign {
                qid,
                reason: format!(
                    "device at {:?} cannot reach guest at {:?}",
                    self.device_position(),
                    self.guest_position()
                ),
            })?
        };
        self.realign = Some(Realign {
            to_submit: k,
            to_reap: k,
        });
        Ok(k)
    }

    /// One step of a re-alignment: reaps filler completions, rings the device CQ head as far
    /// as it may go, submits more fillers. Returns the doorbells to ring and whether the
    /// queue is aligned (then submissions flow again).
    pub fn alignment_step(&mut self, bufs: &dyn Buffers) -> Result<AlignStep> {
        let Some(mut r) = self.realign else {
            return Ok(AlignStep {
                sq_tail: None,
                cq_head: None,
                done: true,
            });
        };
        let (s, c) = (self.geo.sq_entries, self.geo.cq_entries);
        while r.to_reap > r.to_submit {
            let Some(cqe) = self.peek_device(bufs)? else {
                break;
            };
            if cqe.cid() != FILLER_CID {
                self.stats.anomalies += 1;
            }
            if (cqe.sq_head() as u32) < s {
                self.d.sq_head = cqe.sq_head() as u32;
            }
            self.advance_device_cq();
            r.to_reap -= 1;
        }
        // Consume what the device posted, except what must stay outstanding at the end: the
        // guest's unconsumed entries, which the fillers still to come do not cover.
        let posted = (self.d.cq_tail + c - self.d.cq_head) % c;
        let keep = (self.slots.len() as u64)
            .saturating_sub(r.to_reap)
            .min(posted as u64) as u32;
        let head = (self.d.cq_tail + c - keep) % c;
        let cq_head = (head != self.d.cq_head).then(|| {
            self.d.cq_head = head;
            head
        });
        let mut sq_tail = None;
        loop {
            let outstanding =
                (self.d.cq_tail + c - self.d.cq_head) % c + (r.to_reap - r.to_submit) as u32;
            if r.to_submit == 0 || step(self.d.sq_tail, s) == self.d.sq_head || outstanding + 1 >= c
            {
                break;
            }
            // A Flush of namespace 0, which no namespace has: the controller completes it
            // with Invalid Namespace at once, without touching the media (a Flush of the
            // guest's namespace made the device sync its backing store once per filler:
            // 3 ms each under write load, 0.6 s of I/O stall after a switchover).
            let mut f = Sqe::new(io::FLUSH, FILLER_CID);
            f.set_nsid(FILLER_NSID);
            bufs.device_write(
                self.geo.sq_base + self.d.sq_tail as u64 * SQE,
                &f.to_bytes(),
            )?;
            self.d.sq_tail = step(self.d.sq_tail, s);
            self.stats.fillers += 1;
            r.to_submit -= 1;
            sq_tail = Some(self.d.sq_tail);
        }
        let done = r.to_reap == 0;
        if done {
            if self.device_position() != self.guest_position() {
                return Err(Error::Realign {
                    qid: self.geo.qid,
                    reason: "positions still differ after the fillers".into(),
                });
            }
            let n = self.slots.len() as u32;
            self.slots = (0..n).map(|i| Some((self.g.cq_head + i) % c)).collect();
            self.realign = None;
            self.hold = false;
        } else {
            self.realign = Some(r);
        }
        Ok(AlignStep {
            sq_tail,
            cq_head,
            done,
        })
    }

    /// The guest-physical ranges of both rings.
    pub fn rings(&self) -> [Range<u64>; 2] {
        [
            self.geo.sq_base..self.geo.sq_base + self.geo.sq_entries as u64 * SQE,
            self.geo.cq_base..self.geo.cq_base + self.geo.cq_entries as u64 * CQE,
        ]
    }
}

impl RingAdapter for NvmeQueue {
    fn ring_ranges(&self) -> Vec<Range<u64>> {
        self.rings().to_vec()
    }

    fn on_guest_submit(&mut self, tail: u32, bufs: &dyn Buffers) -> Result<Option<u32>> {
        let s = self.geo.sq_entries;
        if tail >= s {
            self.stats.anomalies += 1;
            return Ok(None);
        }
        self.g.sq_tail = tail;
        if self.hold {
            return Ok(None);
        }
        let start = self.d.sq_tail;
        while self.g.sq_taken != self.g.sq_tail {
            if step(self.d.sq_tail, s) == self.d.sq_head {
                break; // the device has not fetched enough yet; retried on its next completion
            }
            let mut raw = [0u8; 64];
            bufs.vcpu_read(self.geo.sq_base + self.g.sq_taken as u64 * SQE, &mut raw)?;
            let sqe = Sqe::from_bytes(&raw);
            let verdict = validate::check_io(&sqe, &self.limits, bufs).and_then(|c| {
                if self.inflight.contains_key(&c.cid) || c.cid == FILLER_CID {
                    Err(Status::CID_CONFLICT)
                } else {
                    Ok(c)
                }
            });
            match verdict {
                Ok(c) => {
                    // A list the guest could still rewrite: the device gets the validated copy.
                    let mut bounce = None;
                    if c.pages.len() > 2 {
                        if let Some(slot) = self.bounce_free.pop() {
                            match bufs.bounce_prp_list(self.geo.qid, slot, &c.pages[1..]) {
                                Some(iova) => {
                                    raw[32..40].copy_from_slice(&iova.to_le_bytes());
                                    bounce = Some(slot);
                                    self.stats.bounced += 1;
                                }
                                None => self.bounce_free.push(slot),
                            }
                        }
                    }
                    bufs.device_write(self.geo.sq_base + self.d.sq_tail as u64 * SQE, &raw)?;
                    self.inflight.insert(
                        c.cid,
                        InFlight {
                            direction: c.direction,
                            pages: c.pages,
                            bounce,
                        },
                    );
                    self.d.sq_tail = step(self.d.sq_tail, s);
                    self.stats.forwarded += 1;
                }
                Err(status) => {
                    if self.guest_cq_full() {
                        break;
                    }
                    self.g.sq_taken = step(self.g.sq_taken, s);
                    let cqe = Cqe::new(
                        0,
                        self.guest_sq_head(),
                        self.geo.qid,
                        sqe.cid(),
                        status,
                        self.g.cq_phase,
                    );
                    self.post_guest(&cqe, bufs)?;
                    self.slots.push_back(None);
                    self.stats.refused += 1;
                    continue;
                }
            }
            self.g.sq_taken = step(self.g.sq_taken, s);
        }
        Ok((self.d.sq_tail != start).then_some(self.d.sq_tail))
    }

    fn on_guest_consume(&mut self, head: u32) -> Option<u32> {
        let c = self.geo.cq_entries;
        if head >= c {
            self.stats.anomalies += 1;
            return None;
        }
        let n = ((head + c - self.g.cq_head) % c) as usize;
        if n > self.slots.len() {
            // the guest claims entries nobody posted
            self.stats.anomalies += 1;
            return None;
        }
        self.g.cq_head = head;
        let mut device_head = None;
        for slot in self.slots.drain(..n).flatten() {
            device_head = Some(step(slot, c));
        }
        match device_head {
            Some(h) if h != self.d.cq_head => {
                self.d.cq_head = h;
                Some(h)
            }
            _ => None,
        }
    }

    fn forward_completions(&mut self, bufs: &dyn Buffers, dirty: &mut Vec<u64>) -> Result<usize> {
        if self.realign.is_some() {
            return Ok(0); // fillers are reaped by the re-alignment, never forwarded
        }
        let mut n = 0;
        while !self.guest_cq_full() {
            let Some(cqe) = self.peek_device(bufs)? else {
                break;
            };
            match self.inflight.remove(&cqe.cid()) {
                Some(f) => {
                    self.bounce_free.extend(f.bounce);
                    if f.direction == Direction::FromDevice {
                        self.stats.dirty_pages += f.pages.len() as u64;
                        dirty.extend_from_slice(&f.pages);
                    }
                }
                None => {
                    // A command submitted before shadowing began.
                    self.legacy_outstanding = self.legacy_outstanding.saturating_sub(1);
                    match self.legacy.remove(&cqe.cid()) {
                        Some(c) => {
                            if c.direction == Direction::FromDevice {
                                self.stats.dirty_pages += c.pages.len() as u64;
                                dirty.extend_from_slice(&c.pages);
                            }
                        }
                        None => self.stats.anomalies += 1,
                    }
                }
            }
            let sq_head = cqe.sq_head() as u32;
            if sq_head < self.geo.sq_entries {
                self.d.sq_head = sq_head;
            } else {
                self.stats.anomalies += 1;
            }
            let out = Cqe::new(
                cqe.result(),
                self.guest_sq_head(),
                self.geo.qid,
                cqe.cid(),
                cqe.status(),
                self.g.cq_phase,
            );
            self.post_guest(&out, bufs)?;
            self.slots.push_back(Some(self.d.cq_tail));
            self.advance_device_cq();
            self.stats.completed += 1;
            n += 1;
        }
        // Space in the device SQ may have opened: take more guest submissions.
        Ok(n)
    }

    fn in_flight(&self) -> usize {
        self.inflight.len() + self.legacy_outstanding as usize
    }

    fn hold(&mut self, on: bool) {
        self.hold = on;
    }
}

#[cfg(test)]
mod tests;

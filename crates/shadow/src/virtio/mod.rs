//! The virtio ring adapter: one split virtqueue (descriptor table, available ring, used ring).
//!
//! The guest writes descriptors and available entries into the vCPU buffer; the adapter
//! validates each new chain ([`chain`]) and copies the validated descriptors and the head into
//! the device buffer, which is all the device reads. The device writes used entries into the
//! device buffer; the adapter checks each against the chains in flight and writes it into the
//! vCPU buffer. Descriptor indexes (heads) are the same on both sides; ring positions are not:
//! a refused chain is completed to the guest by the hypervisor (a used entry of length 0) and
//! never reaches the device, so each side keeps its own available and used index.
//!
//! Rules the adapter keeps:
//! - every available entry the guest publishes with a head inside the table yields exactly
//!   one used entry in the guest's ring: the device's (checked), or the hypervisor's (length
//!   0) for a refused chain;
//! - a descriptor belongs to at most one chain in flight: a chain that reuses the head or any
//!   descriptor of a chain in flight is refused (otherwise copying it would change what the
//!   device reads for the first one, and the first one's dirty pages would be wrong);
//! - a head outside the descriptor table names no buffer: it is dropped (counted in
//!   `dropped_heads`, no used entry), as the device does in direct passthrough;
//! - an available index more than a queue size ahead of the entries taken (or behind them)
//!   breaks the queue, as it does the device's: nothing more is taken until the guest resets
//!   the device, and [`VirtQueue::broken`] tells the engine to report DEVICE_NEEDS_RESET;
//! - a used entry from the device is forwarded only for a head in flight and a length within
//!   the chain's writable bytes; an unknown head is dropped, a length too large completes the
//!   chain with length 0 (the device's claim is not passed on, every writable page of the
//!   chain is reported dirty), both counted;
//! - notifications: the guest is always asked to notify (used flags 0, `avail_event` at the
//!   next entry), the device is always asked to interrupt (available flags 0, `used_event` at
//!   the next entry); [`VirtQueue::guest_needs_interrupt`] and [`VirtQueue::take_device_notify`]
//!   apply the guest's and the device's own suppression to what the engine sends.
pub mod chain;

use std::{collections::HashMap, ops::Range};

use serde::{Deserialize, Serialize};
use virtio_spec::{
    features::{bit, IN_ORDER, RING_EVENT_IDX, RING_INDIRECT_DESC, RING_PACKED},
    ring::{
        avail, need_event, used, Descriptor, SplitRing, UsedElem, AVAIL_F_NO_INTERRUPT, DESC_SIZE,
        USED_F_NO_NOTIFY,
    },
};

use crate::{buffers::BuffersExt, Buffers, Error, Result, RingAdapter};
use chain::{Chain, ChainLimits, Marks, Refusal, Table, MAX_CHAIN_BYTES, MAX_INDIRECT};

/// Rounds one call makes over a ring before it returns (each re-reads the other side's
/// index after publishing its event index), so a side that keeps adding cannot hold the
/// caller.
const PASSES: usize = 4;

/// Where a split virtqueue lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VirtqGeometry {
    /// The queue's index in its device (the value a notification carries).
    pub index: u16,
    /// Entries (a power of two up to 32768).
    pub size: u16,
    /// Descriptor table address.
    pub desc: u64,
    /// Available ring address.
    pub avail: u64,
    /// Used ring address.
    pub used: u64,
}

impl VirtqGeometry {
    /// The three parts: descriptor table, available ring, used ring.
    pub fn ranges(&self) -> [Range<u64>; 3] {
        let ring = self.ring();
        [
            self.desc..self.desc.saturating_add(ring.desc_bytes()),
            self.avail..self.avail.saturating_add(avail::bytes(self.size)),
            self.used..self.used.saturating_add(used::bytes(self.size)),
        ]
    }

    fn ring(&self) -> SplitRing {
        SplitRing {
            size: self.size,
            desc: self.desc,
            avail: self.avail,
            used: self.used,
        }
    }

    /// Size, alignment, no wrapping, inside guest RAM, parts not overlapping.
    pub fn check(&self, bufs: &dyn Buffers) -> Result<()> {
        let bad = |reason: String| Error::BadQueue {
            qid: self.index,
            reason,
        };
        SplitRing::new(self.size, self.desc, self.avail, self.used)
            .map_err(|e| bad(format!("virtqueue layout: {e}")))?;
        let r = self.ranges();
        for p in &r {
            if !bufs.in_ram(p.start, p.end - p.start) {
                return Err(bad(format!(
                    "virtqueue part {:#x}..{:#x} is not guest RAM",
                    p.start, p.end
                )));
            }
        }
        for (i, a) in r.iter().enumerate() {
            if r[i + 1..]
                .iter()
                .any(|b| a.start < b.end && b.start < a.end)
            {
                return Err(bad("virtqueue parts overlap".into()));
            }
        }
        Ok(())
    }
}

/// Chains refused, by reason.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Refusals {
    /// A head or `next` outside its table.
    pub index: u64,
    /// Loops (a descriptor visited twice, or more descriptors than the table holds).
    pub loops: u64,
    /// More bytes than the limit.
    pub too_large: u64,
    /// Misplaced, nested, not negotiated or wrongly sized indirect tables.
    pub indirect: u64,
    /// Readable buffers after writable ones.
    pub order: u64,
    /// Buffers outside guest RAM or wrapping the address space.
    pub out_of_ram: u64,
    /// Buffers on the rings themselves.
    pub on_rings: u64,
    /// Unknown descriptor flags.
    pub flags: u64,
    /// Heads made available again while in flight.
    pub reposted: u64,
    /// Descriptors shared with a chain in flight.
    pub shared: u64,
}

impl Refusals {
    fn count(&mut self, r: &Refusal) {
        use virtio_spec::ring::ChainError as C;
        let c = match r {
            Refusal::Ring(C::IndexOutOfRange(_)) => &mut self.index,
            Refusal::Ring(C::TooLong(_)) | Refusal::Loop(_) => &mut self.loops,
            Refusal::Ring(C::TooManyBytes) => &mut self.too_large,
            Refusal::Ring(C::BadIndirect | C::BadIndirectLength(_)) => &mut self.indirect,
            Refusal::Ring(C::ReadAfterWrite) => &mut self.order,
            Refusal::Ring(C::AddressOverflow(_)) | Refusal::OutOfRam { .. } => &mut self.out_of_ram,
            Refusal::OverlapsRing { .. } => &mut self.on_rings,
            Refusal::Flags(_) => &mut self.flags,
            Refusal::Reposted(_) => &mut self.reposted,
            Refusal::Shared(_) => &mut self.shared,
        };
        *c += 1;
    }
}

/// Counters of one shadowed virtqueue.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VirtqStats {
    /// Chains forwarded to the device.
    pub forwarded: u64,
    /// Used entries forwarded to the guest (the device's).
    pub completed: u64,
    /// Chains refused (never seen by the device; completed to the guest with length 0 unless
    /// the head is outside the table, see `dropped_heads`).
    pub refused: u64,
    /// Why.
    pub refusals: Refusals,
    /// Guest pages the device wrote for completed chains.
    pub dirty_pages: u64,
    /// Indirect tables the device read from a hypervisor copy.
    pub bounced: u64,
    /// Indirect tables the device read from guest memory (no bounce memory).
    pub unbounced: u64,
    /// Available indexes more than a queue size ahead of (or behind) the last one taken.
    pub bad_avail_idx: u64,
    /// Device used indexes more than a queue size ahead of the last one read.
    pub bad_used_idx: u64,
    /// Device used entries for a head not in flight (dropped).
    pub unknown_used: u64,
    /// Device used entries with a length over the chain's writable bytes.
    pub bad_used_len: u64,
    /// Available entries whose head is outside the descriptor table: dropped without a used
    /// entry (they name no buffer to give back), also counted in `refused` and
    /// `refusals.index`.
    #[serde(default)]
    pub dropped_heads: u64,
}

impl VirtqStats {
    /// Adds `o`'s counters to these (totals over several shadow sessions).
    pub fn add(&mut self, o: &VirtqStats) {
        let r = &mut self.refusals;
        let p = &o.refusals;
        for (a, b) in [
            (&mut r.index, p.index),
            (&mut r.loops, p.loops),
            (&mut r.too_large, p.too_large),
            (&mut r.indirect, p.indirect),
            (&mut r.order, p.order),
            (&mut r.out_of_ram, p.out_of_ram),
            (&mut r.on_rings, p.on_rings),
            (&mut r.flags, p.flags),
            (&mut r.reposted, p.reposted),
            (&mut r.shared, p.shared),
            (&mut self.forwarded, o.forwarded),
            (&mut self.completed, o.completed),
            (&mut self.refused, o.refused),
            (&mut self.dirty_pages, o.dirty_pages),
            (&mut self.bounced, o.bounced),
            (&mut self.unbounced, o.unbounced),
            (&mut self.bad_avail_idx, o.bad_avail_idx),
            (&mut self.bad_used_idx, o.bad_used_idx),
            (&mut self.unknown_used, o.unknown_used),
            (&mut self.bad_used_len, o.bad_used_len),
            (&mut self.dropped_heads, o.dropped_heads),
        ] {
            *a = a.saturating_add(b);
        }
    }
}

/// The saved state of a virtqueue (sent at switchover; treated as hostile on arrival).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VirtqState {
    /// Where it lives.
    pub geometry: VirtqGeometry,
    /// Negotiated features (`VIRTIO_F_*`, device bits included).
    pub features: u64,
    /// Validator limits.
    pub limits: ChainLimits,
    /// Available entries the hypervisor has taken (the guest's available index it acted on).
    pub guest_avail: u16,
    /// The guest's used index (entries the hypervisor wrote).
    pub guest_used: u16,
    /// The device's available index.
    pub device_avail: u16,
    /// The device's used index read so far.
    pub device_used: u16,
    /// Heads in flight on the device, oldest first: the destination gives them to its device
    /// again. `guest_avail - guest_used - dropped` of them.
    pub in_flight: Vec<u16>,
    /// Available entries taken whose head was outside the table (no used entry follows them),
    /// counted modulo 2^16 like the indexes.
    #[serde(default)]
    pub dropped: u16,
    /// Counters.
    pub stats: VirtqStats,
}

#[derive(Clone, Debug)]
struct InFlight {
    chain: Chain,
    /// Order of submission to the device.
    seq: u64,
}

/// One shadowed split virtqueue.
pub struct VirtQueue {
    geo: VirtqGeometry,
    /// `geo.ranges()`: no buffer may overlap them.
    rings: [Range<u64>; 3],
    features: u64,
    limits: ChainLimits,
    /// Last available index the guest published (as far as the adapter accepted it).
    g_avail: u16,
    /// Next guest available position to take.
    g_taken: u16,
    /// The guest's used index.
    g_used: u16,
    /// Available entries taken that will never have a used entry (heads outside the table),
    /// modulo 2^16: `g_taken - g_used - dropped` chains are in flight.
    dropped: u16,
    /// The guest moved its available index more than a queue size: nothing more is taken
    /// (until a reset drops this queue).
    broken: bool,
    /// The device's available index.
    d_avail: u16,
    /// Next device used position to read.
    d_used: u16,
    inflight: HashMap<u16, InFlight>,
    seq: u64,
    /// Descriptor indexes owned by chains in flight.
    busy: Vec<bool>,
    /// The walks' loop detection.
    marks: Marks,
    /// Chains made available before shadowing began, by head (from every available slot):
    /// their used entries are still forwarded, with their pages.
    legacy: HashMap<u16, Chain>,
    /// Heads at the available positions the device had not used when shadowing began, oldest
    /// first (exact for devices that use buffers in order).
    legacy_order: Vec<u16>,
    /// Chains made available before shadowing began and not used yet (from the indexes).
    legacy_outstanding: u16,
    /// Chains to give a fresh device (destination), oldest first.
    resubmit: Vec<u16>,
    /// Rebuilt and not restarted yet: the device-side rings are still to be prepared.
    fresh: bool,
    hold: bool,
    stats: VirtqStats,
    /// The last bad device used index counted (a stuck one is counted once).
    bad_used_seen: Option<u16>,
    /// The last bad guest available index counted.
    bad_avail_seen: Option<u16>,
    /// Guest used index at the last interrupt decision.
    signalled: u16,
    /// Device available index at the last notification decision.
    notified: u16,
}

fn check_features(qid: u16, features: u64) -> Result<()> {
    let bad = |what: &str| Error::BadQueue {
        qid,
        reason: format!("{what} cannot be shadowed"),
    };
    if features & bit(RING_PACKED) != 0 {
        return Err(bad("a packed virtqueue"));
    }
    if features & bit(IN_ORDER) != 0 {
        // One used entry may then stand for a batch of chains.
        return Err(bad("VIRTIO_F_IN_ORDER"));
    }
    Ok(())
}

impl VirtQueue {
    fn new(geo: VirtqGeometry, features: u64, limits: ChainLimits, avail: u16, used: u16) -> Self {
        VirtQueue {
            geo,
            rings: geo.ranges(),
            features,
            limits,
            g_avail: avail,
            g_taken: avail,
            g_used: used,
            dropped: 0,
            broken: false,
            d_avail: avail,
            d_used: used,
            inflight: HashMap::new(),
            seq: 0,
            busy: vec![false; usize::from(geo.size)],
            marks: Marks::default(),
            legacy: HashMap::new(),
            legacy_order: Vec::new(),
            legacy_outstanding: 0,
            resubmit: Vec::new(),
            fresh: false,
            hold: false,
            stats: VirtqStats::default(),
            bad_used_seen: None,
            bad_avail_seen: None,
            signalled: used,
            notified: avail,
        }
    }

    /// Chains made available and not used, from the indexes in the vCPU buffer. With the copy
    /// as the device buffer the engine waits for 0 before it moves the device's mapping.
    pub fn outstanding(geo: &VirtqGeometry, bufs: &dyn Buffers) -> Result<u16> {
        let a = read_u16(bufs, geo.avail + avail::IDX, Side::Vcpu)?;
        let u = read_u16(bufs, geo.used + used::IDX, Side::Vcpu)?;
        Ok(a.wrapping_sub(u))
    }

    /// Starts shadowing a live virtqueue whose device is where the guest left it. The vCPU
    /// buffer must be the copy taken while the vCPUs were paused (or guest RAM, with the
    /// device buffer a copy). Chains already available are the device's: they are not
    /// validated again, but their heads are remembered so that their used entries (and the
    /// pages they write) are still forwarded.
    pub fn attach(
        geo: VirtqGeometry,
        features: u64,
        limits: ChainLimits,
        bufs: &dyn Buffers,
    ) -> Result<Self> {
        check_features(geo.index, features)?;
        geo.check(bufs)?;
        let a = read_u16(bufs, geo.avail + avail::IDX, Side::Vcpu)?;
        let u = read_u16(bufs, geo.used + used::IDX, Side::Vcpu)?;
        let outstanding = a.wrapping_sub(u);
        if outstanding > geo.size {
            return Err(Error::BadQueue {
                qid: geo.index,
                reason: format!(
                    "available index {a} and used index {u} leave {outstanding} chains in \
                     flight in a queue of {}",
                    geo.size
                ),
            });
        }
        let mut q = VirtQueue::new(geo, features, limits, a, u);
        let mut legacy_outstanding = outstanding;
        // Every available slot, newest first: a chain in flight was made available in one of
        // them (unless the guest reused its slot, as out-of-order devices allow).
        // The walks are bounded in all (a guest's chains share no descriptors).
        let mut spent = 0;
        for back in 1..=geo.size {
            let pos = a.wrapping_sub(back);
            let head = read_u16(bufs, q.ring().avail_entry_addr(pos), Side::Vcpu)?;
            if back <= outstanding {
                if head >= geo.size {
                    // Dropped by the device: no used entry will come for it.
                    q.dropped = q.dropped.wrapping_add(1);
                    legacy_outstanding -= 1;
                } else {
                    q.legacy_order.push(head);
                }
            }
            if !q.legacy.contains_key(&head) && spent < q.budget() {
                if let Ok(c) = q.walk(head, false, bufs, &mut spent)? {
                    q.legacy.insert(head, c);
                }
            }
        }
        q.legacy_order.reverse();
        q.legacy_outstanding = legacy_outstanding;
        q.ask_guest_notify(bufs)?;
        q.ask_device_interrupt(bufs)?;
        Ok(q)
    }

    /// Rebuilds a virtqueue on the destination from its saved state, in front of a fresh
    /// device queue whose indexes start at `device_start` (0 for a device reset the standard
    /// way; the guest's used index for a device told to continue there, which makes the
    /// queue [`aligned`](Self::aligned) once the chains in flight are given back). The state
    /// is checked against the geometry and this VM's RAM first. The queue is held: call
    /// [`restart`](Self::restart) once the device's queue is enabled.
    pub fn rebuild(state: &VirtqState, device_start: u16, bufs: &dyn Buffers) -> Result<Self> {
        let geo = state.geometry;
        check_features(geo.index, state.features)?;
        geo.check(bufs)?;
        let bad = |reason: String| Error::BadQueue {
            qid: geo.index,
            reason,
        };
        let l = state.limits;
        if l.max_indirect > MAX_INDIRECT || l.max_chain_bytes > MAX_CHAIN_BYTES {
            return Err(bad(format!("validator limits {l:?} over the maximum")));
        }
        let n = state
            .guest_avail
            .wrapping_sub(state.guest_used)
            .wrapping_sub(state.dropped);
        if usize::from(n) != state.in_flight.len() || n > geo.size {
            return Err(bad(format!(
                "indexes {}/{} disagree with {} chains in flight",
                state.guest_avail,
                state.guest_used,
                state.in_flight.len()
            )));
        }
        let mut seen = vec![false; usize::from(geo.size)];
        for &h in &state.in_flight {
            if h >= geo.size || std::mem::replace(&mut seen[usize::from(h)], true) {
                return Err(bad(format!("head {h} in flight is out of range or twice")));
            }
        }
        let mut q = VirtQueue::new(geo, state.features, l, state.guest_avail, state.guest_used);
        q.dropped = state.dropped;
        q.d_avail = device_start;
        q.d_used = device_start;
        q.notified = device_start;
        q.resubmit = state.in_flight.clone();
        q.fresh = true;
        q.hold = true;
        q.stats = state.stats;
        Ok(q)
    }

    /// Destination: prepares the device-side rings (used index `device_start`, notification
    /// fields), gives the device again the chains that were in flight on the source (each
    /// validated again from the arrived memory; one that no longer validates is completed to
    /// the guest with length 0), publishes them and ends the hold. Returns the device
    /// available index to notify, if any chain was given.
    pub fn restart(&mut self, bufs: &dyn Buffers) -> Result<Option<u32>> {
        if !std::mem::take(&mut self.fresh) {
            return Ok(None); // once only: the device owns its used index from here on
        }
        let start = self.d_avail;
        write_u16(bufs, self.geo.used + used::IDX, self.d_used, Side::Device)?;
        let g_used = self.g_used;
        for head in std::mem::take(&mut self.resubmit) {
            match self.walk(head, true, bufs, &mut 0)? {
                Ok(c) => self.forward(c, bufs)?,
                Err(r) => self.refuse(head, r, bufs)?,
            }
        }
        if self.g_used != g_used {
            self.publish_guest_used(bufs)?;
        }
        self.hold = false;
        self.ask_guest_notify(bufs)?;
        self.ask_device_interrupt(bufs)?;
        self.publish_device_avail(bufs)?;
        Ok((self.d_avail != start).then_some(u32::from(self.d_avail)))
    }

    /// The state to send at switchover (after the hold and drain; chains the device keeps,
    /// such as receive buffers, stay in flight and are listed).
    pub fn state(&self) -> VirtqState {
        let mut flying: Vec<(u64, u16)> = self.inflight.iter().map(|(h, f)| (f.seq, *h)).collect();
        flying.sort_unstable();
        let in_flight = self
            .resubmit
            .iter()
            .copied()
            .chain(self.legacy_order.iter().copied())
            .chain(flying.into_iter().map(|(_, h)| h))
            .collect();
        VirtqState {
            geometry: self.geo,
            features: self.features,
            limits: self.limits,
            guest_avail: self.g_taken,
            guest_used: self.g_used,
            device_avail: self.d_avail,
            device_used: self.d_used,
            in_flight,
            dropped: self.dropped,
            stats: self.stats,
        }
    }

    /// Counters.
    pub fn stats(&self) -> VirtqStats {
        self.stats
    }

    /// Where the queue lives.
    pub fn geometry(&self) -> VirtqGeometry {
        self.geo
    }

    /// Available entries the guest published and the adapter has not taken (held).
    pub fn pending(&self) -> u16 {
        self.g_avail.wrapping_sub(self.g_taken)
    }

    /// True once the guest moved its available index more than a queue size ahead of the
    /// entries taken (or behind them): the queue takes nothing more, and the engine reports
    /// DEVICE_NEEDS_RESET, as the device does for its own queues. Only a reset ends it.
    pub fn broken(&self) -> bool {
        self.broken
    }

    /// True when the device's indexes equal the guest's and nothing is pending: the device
    /// can be handed the guest's own rings (leaving shadow mode) without translation.
    pub fn aligned(&self) -> bool {
        !self.broken
            && self.pending() == 0
            && self.resubmit.is_empty()
            && self.d_avail == self.g_taken
            && self.d_used == self.g_used
    }

    /// Chains in flight with device-readable buffers (transmitted packets, requests). Giving
    /// such a chain to another device would repeat what it does, so a switchover waits until
    /// there are none; chains with writable buffers only (receive buffers) may stay in
    /// flight and are given to the destination's device again. Chains made available before
    /// shadowing began whose descriptors did not validate count as readable.
    pub fn in_flight_with_reads(&self) -> usize {
        let legacy = self
            .legacy_order
            .iter()
            .filter(|h| self.legacy.get(h).is_none_or(|c| c.readable_bytes > 0))
            .count();
        let resubmit = self.resubmit.len();
        let flying = self
            .inflight
            .values()
            .filter(|f| f.chain.readable_bytes > 0)
            .count();
        legacy + resubmit + flying
    }

    /// Pages the device may still write for chains made available before shadowing began.
    pub fn legacy_device_pages(&self) -> Vec<u64> {
        let mut pages: Vec<u64> = self
            .legacy
            .values()
            .flat_map(|c| c.written_pages(c.writable_bytes))
            .collect();
        pages.sort_unstable();
        pages.dedup();
        pages
    }

    /// Reads the guest's available index from the vCPU buffer (a virtio notification does not
    /// carry it): the value for [`RingAdapter::on_guest_submit`].
    pub fn guest_avail_idx(&self, bufs: &dyn Buffers) -> Result<u32> {
        read_u16(bufs, self.geo.avail + avail::IDX, Side::Vcpu).map(u32::from)
    }

    /// Whether the guest wants an interrupt for the used entries written since the last call
    /// (its `used_event`, or `VIRTQ_AVAIL_F_NO_INTERRUPT` without EVENT_IDX). Spurious
    /// interrupts are allowed; the engine may always send one, this saves them.
    pub fn guest_needs_interrupt(&mut self, bufs: &dyn Buffers) -> Result<bool> {
        let old = std::mem::replace(&mut self.signalled, self.g_used);
        let (avail, size) = (self.geo.avail, self.geo.size);
        self.wants(
            bufs,
            Side::Vcpu,
            old,
            self.g_used,
            avail + avail::used_event(size),
            avail + avail::FLAGS,
            AVAIL_F_NO_INTERRUPT,
        )
    }

    /// Whether the device wants a notification for the entries published since the last call
    /// (its `avail_event`, or `VIRTQ_USED_F_NO_NOTIFY` without EVENT_IDX).
    pub fn take_device_notify(&mut self, bufs: &dyn Buffers) -> Result<bool> {
        let old = std::mem::replace(&mut self.notified, self.d_avail);
        let (used, size) = (self.geo.used, self.geo.size);
        self.wants(
            bufs,
            Side::Device,
            old,
            self.d_avail,
            used + used::avail_event(size),
            used + used::FLAGS,
            USED_F_NO_NOTIFY,
        )
    }

    /// The event-index rule (or the suppression flag without EVENT_IDX) for an index moved
    /// from `old` to `new`, read from `side`'s ring.
    #[allow(clippy::too_many_arguments)]
    fn wants(
        &self,
        bufs: &dyn Buffers,
        side: Side,
        old: u16,
        new: u16,
        event_at: u64,
        flags_at: u64,
        suppress: u16,
    ) -> Result<bool> {
        if old == new {
            return Ok(false);
        }
        // The index is published before the other side's wish is read (virtio §2.6.7.2).
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        Ok(if self.event_idx() {
            need_event(read_u16(bufs, event_at, side)?, new, old)
        } else {
            read_u16(bufs, flags_at, side)? & suppress == 0
        })
    }

    fn event_idx(&self) -> bool {
        self.features & bit(RING_EVENT_IDX) != 0
    }

    fn ring(&self) -> SplitRing {
        self.geo.ring()
    }

    fn table(&self) -> Table<'_> {
        Table {
            desc: self.geo.desc,
            size: self.geo.size,
            indirect: self.features & bit(RING_INDIRECT_DESC) != 0,
            limits: &self.limits,
            rings: &self.rings,
            busy: &self.busy,
        }
    }

    /// Validates the chain at `head` (against the chains in flight when `busy`).
    fn walk(
        &mut self,
        head: u16,
        busy: bool,
        bufs: &dyn Buffers,
        spent: &mut usize,
    ) -> Result<std::result::Result<Chain, Refusal>> {
        let mut marks = std::mem::take(&mut self.marks);
        let mut t = self.table();
        if !busy {
            t.busy = &[];
        }
        let r = chain::walk(head, &t, bufs, &mut marks, spent);
        self.marks = marks;
        r
    }

    /// Descriptors one call may read: every descriptor and a few indirect tables, twice.
    fn budget(&self) -> usize {
        4 * usize::from(self.geo.size) + 2 * usize::from(MAX_INDIRECT)
    }

    /// The guest: always notify (the hypervisor must see every submission).
    fn ask_guest_notify(&self, bufs: &dyn Buffers) -> Result<()> {
        write_u16(bufs, self.geo.used + used::FLAGS, 0, Side::Vcpu)?;
        if self.event_idx() {
            let at = self.geo.used + used::avail_event(self.geo.size);
            write_u16(bufs, at, self.g_taken, Side::Vcpu)?;
        }
        Ok(())
    }

    /// The device: always interrupt (or be polled) on the next used entry.
    fn ask_device_interrupt(&self, bufs: &dyn Buffers) -> Result<()> {
        write_u16(bufs, self.geo.avail + avail::FLAGS, 0, Side::Device)?;
        if self.event_idx() {
            let at = self.geo.avail + avail::used_event(self.geo.size);
            write_u16(bufs, at, self.d_used, Side::Device)?;
        }
        Ok(())
    }

    /// Copies a validated chain into the device buffer and records it.
    fn forward(&mut self, c: Chain, bufs: &dyn Buffers) -> Result<()> {
        for &(i, d) in &c.direct {
            let mut d: Descriptor = d;
            if let Some(ind) = c.indirect.as_ref().filter(|ind| ind.at == i) {
                // The slot is the head: one per chain in flight.
                match bufs.bounce_prp_list(self.geo.index, usize::from(c.head), &ind.words()) {
                    Some(iova) => {
                        d.addr = iova;
                        d.len = (ind.table.len() as u64 * DESC_SIZE) as u32;
                        self.stats.bounced += 1;
                    }
                    None => self.stats.unbounced += 1,
                }
            }
            bufs.device_write(self.ring().desc_addr(i), &d.to_bytes())?;
            self.busy[usize::from(i)] = true;
        }
        write_u16(
            bufs,
            self.ring().avail_entry_addr(self.d_avail),
            c.head,
            Side::Device,
        )?;
        self.d_avail = self.d_avail.wrapping_add(1);
        self.legacy.remove(&c.head);
        self.seq += 1;
        self.inflight.insert(
            c.head,
            InFlight {
                chain: c,
                seq: self.seq,
            },
        );
        self.stats.forwarded += 1;
        Ok(())
    }

    fn refuse(&mut self, head: u16, r: Refusal, bufs: &dyn Buffers) -> Result<()> {
        tracing::debug!(queue = self.geo.index, head, "virtqueue chain refused: {r}");
        self.stats.refused += 1;
        self.stats.refusals.count(&r);
        if head >= self.geo.size {
            // A used entry must name a head inside the table; this one names no buffer the
            // guest could get back. The device drops such heads too.
            self.stats.dropped_heads += 1;
            self.dropped = self.dropped.wrapping_add(1);
            return Ok(());
        }
        self.post_guest_used(
            UsedElem {
                id: u32::from(head),
                len: 0,
            },
            bufs,
        )
    }

    fn post_guest_used(&mut self, e: UsedElem, bufs: &dyn Buffers) -> Result<()> {
        bufs.vcpu_write(self.ring().used_entry_addr(self.g_used), &e.to_bytes())?;
        self.g_used = self.g_used.wrapping_add(1);
        Ok(())
    }

    /// The guest's used index, after its entries.
    fn publish_guest_used(&self, bufs: &dyn Buffers) -> Result<()> {
        std::sync::atomic::fence(std::sync::atomic::Ordering::Release);
        write_u16(bufs, self.geo.used + used::IDX, self.g_used, Side::Vcpu)
    }

    /// The device's available index, after its entries.
    fn publish_device_avail(&self, bufs: &dyn Buffers) -> Result<()> {
        std::sync::atomic::fence(std::sync::atomic::Ordering::Release);
        write_u16(
            bufs,
            self.geo.avail + avail::IDX,
            self.d_avail,
            Side::Device,
        )
    }

    fn release(&mut self, c: &Chain) {
        for i in c.indexes() {
            if let Some(b) = self.busy.get_mut(usize::from(i)) {
                *b = false;
            }
        }
    }

    /// Takes a new guest available index unless it is more than a queue size ahead of the
    /// last entry taken (the guest owns at most `size` descriptors; an index going backwards
    /// wraps to a huge distance and is refused the same way). A refused index breaks the
    /// queue (nothing more is taken, as the device stops its queue) and is counted once.
    fn accept_avail_idx(&mut self, idx: u16) -> bool {
        if self.broken {
            return false;
        }
        if idx.wrapping_sub(self.g_taken) > self.geo.size {
            self.broken = true;
            if count_once(&mut self.bad_avail_seen, idx, &mut self.stats.bad_avail_idx) {
                tracing::debug!(
                    queue = self.geo.index,
                    idx,
                    taken = self.g_taken,
                    "virtqueue available index refused; the queue is broken until a reset"
                );
            }
            self.g_avail = self.g_taken;
            return false;
        }
        self.g_avail = idx;
        true
    }

    /// Reads the device's next used entry and forwards it if it is for a chain in flight
    /// with a length the chain allows.
    fn take_used(&mut self, bufs: &dyn Buffers, dirty: &mut Vec<u64>) -> Result<()> {
        let mut raw = [0u8; 8];
        bufs.device_read(self.ring().used_entry_addr(self.d_used), &mut raw)?;
        self.d_used = self.d_used.wrapping_add(1);
        let e = UsedElem::from_bytes(&raw);
        let Some(c) = self.completed_chain(e.id) else {
            self.stats.unknown_used += 1;
            tracing::debug!(
                queue = self.geo.index,
                id = e.id,
                "unknown used entry dropped"
            );
            return Ok(());
        };
        let (len, pages) = if u64::from(e.len) > c.writable_bytes {
            self.stats.bad_used_len += 1;
            tracing::debug!(
                queue = self.geo.index,
                id = e.id,
                len = e.len,
                writable = c.writable_bytes,
                "used length over the chain's writable bytes"
            );
            (0, c.written_pages(c.writable_bytes))
        } else {
            (e.len, c.written_pages(u64::from(e.len)))
        };
        self.stats.dirty_pages += pages.len() as u64;
        dirty.extend_from_slice(&pages);
        self.post_guest_used(UsedElem { id: e.id, len }, bufs)?;
        self.stats.completed += 1;
        Ok(())
    }

    /// The chain behind a used entry from the device, taken out of flight.
    fn completed_chain(&mut self, id: u32) -> Option<Chain> {
        let head = u16::try_from(id).ok().filter(|h| *h < self.geo.size)?;
        if let Some(f) = self.inflight.remove(&head) {
            self.release(&f.chain);
            return Some(f.chain);
        }
        if self.legacy_outstanding == 0 {
            return None;
        }
        let c = self.legacy.remove(&head)?;
        self.legacy_outstanding -= 1;
        // Keep the ordered list as long as the count: the head if listed, else the oldest.
        match self.legacy_order.iter().position(|h| *h == head) {
            Some(p) => {
                self.legacy_order.remove(p);
            }
            None if !self.legacy_order.is_empty() => {
                self.legacy_order.remove(0);
            }
            None => {}
        }
        Some(c)
    }
}

impl RingAdapter for VirtQueue {
    fn ring_ranges(&self) -> Vec<Range<u64>> {
        self.rings.to_vec()
    }

    /// `value` is the guest's available index (see [`VirtQueue::guest_avail_idx`]); the
    /// return value is the device's available index, to notify the device with (its queue
    /// index, or with VIRTIO_F_NOTIFICATION_DATA the index as well).
    fn on_guest_submit(&mut self, value: u32, bufs: &dyn Buffers) -> Result<Option<u32>> {
        let Ok(idx) = u16::try_from(value) else {
            self.stats.bad_avail_idx += 1;
            return Ok(None);
        };
        if !self.accept_avail_idx(idx) || self.hold || !self.resubmit.is_empty() {
            return Ok(None);
        }
        if self.g_taken == self.g_avail {
            return Ok(None); // nothing new; `avail_event` already names the next entry
        }
        let (d_start, g_start) = (self.d_avail, self.g_used);
        // Descriptors read in this call: past the budget the rest waits for the next call
        // (`pending()`), so hostile chains cannot hold the poller for long.
        let mut spent = 0;
        for _ in 0..PASSES {
            while self.g_taken != self.g_avail && spent < self.budget() {
                let at = self.ring().avail_entry_addr(self.g_taken);
                let head = read_u16(bufs, at, Side::Vcpu)?;
                match self.walk(head, true, bufs, &mut spent)? {
                    Ok(c) => self.forward(c, bufs)?,
                    Err(r) => self.refuse(head, r, bufs)?,
                }
                self.g_taken = self.g_taken.wrapping_add(1);
            }
            self.ask_guest_notify(bufs)?;
            // An entry the guest added after its index was read, while `avail_event` still
            // said an older position, came without a notification: take it now, or none
            // would ever come again (virtio §2.6.7.1).
            std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
            let now = read_u16(bufs, self.geo.avail + avail::IDX, Side::Vcpu)?;
            if now == self.g_avail || !self.accept_avail_idx(now) {
                break;
            }
        }
        if self.g_used != g_start {
            self.publish_guest_used(bufs)?;
        }
        if self.d_avail == d_start {
            return Ok(None);
        }
        self.publish_device_avail(bufs)?;
        Ok(Some(u32::from(self.d_avail)))
    }

    /// Virtio has no consumption doorbell: the guest's used entries are its own.
    fn on_guest_consume(&mut self, _value: u32) -> Option<u32> {
        None
    }

    fn forward_completions(&mut self, bufs: &dyn Buffers, dirty: &mut Vec<u64>) -> Result<usize> {
        let start = self.g_used;
        for _ in 0..PASSES {
            let idx = read_u16(bufs, self.geo.used + used::IDX, Side::Device)?;
            let n = idx.wrapping_sub(self.d_used);
            if n == 0 {
                break;
            }
            if n > self.geo.size {
                if count_once(&mut self.bad_used_seen, idx, &mut self.stats.bad_used_idx) {
                    tracing::debug!(
                        queue = self.geo.index,
                        idx,
                        read = self.d_used,
                        "virtqueue device used index refused"
                    );
                }
                break;
            }
            std::sync::atomic::fence(std::sync::atomic::Ordering::Acquire);
            for _ in 0..n {
                self.take_used(bufs, dirty)?;
            }
            // `used_event` moves on; an entry the device posted before it saw the new value
            // came without an interrupt, so the index is read again.
            self.ask_device_interrupt(bufs)?;
            std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        }
        if self.g_used != start {
            self.publish_guest_used(bufs)?;
        }
        Ok(usize::from(self.g_used.wrapping_sub(start)))
    }

    fn in_flight(&self) -> usize {
        self.inflight.len() + usize::from(self.legacy_outstanding) + self.resubmit.len()
    }

    fn hold(&mut self, on: bool) {
        self.hold = on;
    }
}

/// Counts a bad index unless it is the one counted last (a stuck index is counted once).
fn count_once(seen: &mut Option<u16>, idx: u16, counter: &mut u64) -> bool {
    if *seen == Some(idx) {
        return false;
    }
    *seen = Some(idx);
    *counter += 1;
    true
}

#[derive(Clone, Copy)]
enum Side {
    Vcpu,
    Device,
}

fn read_u16(bufs: &dyn Buffers, gpa: u64, side: Side) -> Result<u16> {
    let mut b = [0u8; 2];
    match side {
        Side::Vcpu => bufs.vcpu_read(gpa, &mut b)?,
        Side::Device => bufs.device_read(gpa, &mut b)?,
    }
    Ok(u16::from_le_bytes(b))
}

fn write_u16(bufs: &dyn Buffers, gpa: u64, v: u16, side: Side) -> Result<()> {
    match side {
        Side::Vcpu => bufs.vcpu_write(gpa, &v.to_le_bytes()),
        Side::Device => bufs.device_write(gpa, &v.to_le_bytes()),
    }
}

#[cfg(test)]
mod tests;

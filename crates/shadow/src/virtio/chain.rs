//! Validation of one descriptor chain the guest made available: a bounded walk of the
//! descriptor table (and of at most one indirect table, as its last element; virtio 1.1
//! §2.6.5.3) that yields every buffer the device will touch, or the reason the chain is
//! refused. The structural rules come from `virtio_spec::ring::ChainWalker`; this module adds
//! what only the hypervisor knows: guest RAM, the shadowed rings, descriptors owned by chains
//! still in flight.
//!
//! Descriptors and indirect tables are read from the vCPU buffer — what the guest wrote; the
//! device is then given the validated copy (descriptors copied into the device buffer's table,
//! indirect tables bounced into hypervisor memory when the engine has some), so a guest
//! rewriting them after validation changes nothing the device sees.
use std::ops::Range;

use serde::{Deserialize, Serialize};
use virtio_spec::ring::{
    ChainError, ChainWalker, DescLocation, Descriptor, DESC_F_INDIRECT, DESC_F_NEXT, DESC_F_WRITE,
    DESC_SIZE,
};

use crate::{buffers::BuffersExt, Buffers, Result};

/// Largest indirect table the adapter accepts: one 4 KiB page of descriptors, so that its
/// copy fits one bounce page.
pub const MAX_INDIRECT: u16 = 256;
/// Largest chain length limit a saved state may carry.
pub const MAX_CHAIN_BYTES: u64 = 1 << 30;

/// What the validator accepts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChainLimits {
    /// Largest sum of buffer lengths of one chain (readable and writable together).
    pub max_chain_bytes: u64,
    /// Largest indirect table, in descriptors (at most [`MAX_INDIRECT`]).
    pub max_indirect: u16,
}

impl Default for ChainLimits {
    fn default() -> Self {
        ChainLimits {
            max_chain_bytes: 4 << 20,
            max_indirect: MAX_INDIRECT,
        }
    }
}

/// Why a chain is refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// A structural rule of the split ring (index range, length, order of readable and
    /// writable buffers, indirect placement and size, byte limit, wrapping address).
    #[error("{0}")]
    Ring(ChainError),
    /// The chain visits a descriptor twice.
    #[error("the chain loops back to descriptor {0}")]
    Loop(u16),
    /// A buffer (or indirect table) outside guest RAM.
    #[error("buffer at {addr:#x} ({len} bytes) is not guest RAM")]
    OutOfRam {
        /// Address.
        addr: u64,
        /// Length.
        len: u32,
    },
    /// A buffer (or indirect table) overlapping the shadowed rings themselves.
    #[error("buffer at {addr:#x} ({len} bytes) overlaps the rings")]
    OverlapsRing {
        /// Address.
        addr: u64,
        /// Length.
        len: u32,
    },
    /// Flags the split ring does not define.
    #[error("unknown descriptor flags {0:#x}")]
    Flags(u16),
    /// The head is the head of a chain still in flight.
    #[error("head {0} is already in flight")]
    Reposted(u16),
    /// A descriptor of the chain belongs to another chain still in flight.
    #[error("descriptor {0} belongs to a chain in flight")]
    Shared(u16),
}

/// The indirect table of a chain, validated and laid out compactly (entry `i` chains to
/// `i + 1`), ready to be copied where the device reads it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Indirect {
    /// Index, in the main table, of the descriptor that points to the table.
    pub at: u16,
    /// The table's chain, compacted.
    pub table: Vec<Descriptor>,
}

impl Indirect {
    /// The compact table as little-endian 64-bit words (two per descriptor), the form the
    /// engine's bounce areas take.
    pub fn words(&self) -> Vec<u64> {
        self.table
            .iter()
            .flat_map(|d| {
                let b = d.to_bytes();
                [
                    u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]),
                    u64::from_le_bytes([b[8], b[9], b[10], b[11], b[12], b[13], b[14], b[15]]),
                ]
            })
            .collect()
    }
}

/// A chain that passed validation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Chain {
    /// Its head.
    pub head: u16,
    /// The main-table descriptors, in chain order: (index, descriptor as the guest wrote it).
    pub direct: Vec<(u16, Descriptor)>,
    /// The indirect table, when the chain ends in one.
    pub indirect: Option<Indirect>,
    /// Device-writable buffers in chain order: (guest-physical address, bytes), none empty.
    pub writable: Vec<(u64, u32)>,
    /// Sum of the writable lengths.
    pub writable_bytes: u64,
    /// Sum of the readable lengths (what the device consumes: a transmitted packet, a
    /// request).
    pub readable_bytes: u64,
}

const PAGE: u64 = 4096;

impl Chain {
    /// The main-table descriptor indexes the chain occupies.
    pub fn indexes(&self) -> impl Iterator<Item = u16> + '_ {
        self.direct.iter().map(|(i, _)| *i)
    }

    /// The guest pages covered by the first `len` bytes of the writable buffers (the device
    /// writes from the start of the writable part, virtio 1.1 §2.6.8.2; bytes past `len` are
    /// ones the driver must not look at), each once, ascending.
    pub fn written_pages(&self, len: u64) -> Vec<u64> {
        let mut pages = Vec::new();
        let mut left = len;
        for &(addr, blen) in &self.writable {
            if left == 0 {
                break;
            }
            let n = left.min(u64::from(blen));
            left -= n;
            // Validated: [addr, addr + blen) does not wrap and blen > 0.
            let (first, last) = (addr / PAGE, (addr + n - 1) / PAGE);
            pages.extend((first..=last).map(|p| p * PAGE));
        }
        pages.sort_unstable();
        pages.dedup();
        pages
    }
}

const KNOWN_FLAGS: u16 = DESC_F_NEXT | DESC_F_WRITE | DESC_F_INDIRECT;

/// What the walk needs to know about its queue.
pub struct Table<'a> {
    /// Descriptor table address.
    pub desc: u64,
    /// Queue size.
    pub size: u16,
    /// Indirect descriptors negotiated (`VIRTIO_F_INDIRECT_DESC`).
    pub indirect: bool,
    /// Validator limits.
    pub limits: &'a ChainLimits,
    /// The shadowed rings: no buffer may overlap them.
    pub rings: &'a [Range<u64>],
    /// Descriptor indexes owned by chains in flight (empty: none).
    pub busy: &'a [bool],
}

impl Table<'_> {
    /// Guest memory the device may touch: inside RAM (the walker has checked wrapping), not
    /// on the rings.
    fn region(&self, bufs: &dyn Buffers, addr: u64, len: u32) -> std::result::Result<(), Refusal> {
        let end = addr.saturating_add(u64::from(len));
        if !bufs.in_ram(addr, u64::from(len)) {
            return Err(Refusal::OutOfRam { addr, len });
        }
        if self.rings.iter().any(|r| addr < r.end && r.start < end) {
            return Err(Refusal::OverlapsRing { addr, len });
        }
        Ok(())
    }
}

/// Visited marks of the descriptor table for loop detection, kept across walks: each walk is
/// a new generation instead of a cleared table, so a walk costs what the chain is long, not
/// what the queue is large.
#[derive(Clone, Debug, Default)]
pub struct Marks {
    generation: u32,
    table: Vec<u32>,
}

impl Marks {
    fn start(&mut self, size: u16) {
        if self.table.len() != usize::from(size) {
            self.table = vec![0; usize::from(size)];
        }
        self.generation = self.generation.wrapping_add(1);
        if self.generation == 0 {
            self.table.fill(0);
            self.generation = 1;
        }
    }

    /// Marks `i`; true if it was marked already in this walk.
    fn visit(&mut self, i: u16) -> bool {
        match self.table.get_mut(usize::from(i)) {
            Some(m) => std::mem::replace(m, self.generation) == self.generation,
            None => true,
        }
    }
}

/// Walks the chain at `head`, adding the descriptors it reads to `visited`. `Err` is a
/// buffer access failure (the engine's problem); `Ok(Err)` a refused chain (the guest's).
pub fn walk(
    head: u16,
    t: &Table<'_>,
    bufs: &dyn Buffers,
    marks: &mut Marks,
    visited: &mut usize,
) -> Result<std::result::Result<Chain, Refusal>> {
    let max_indirect = t.limits.max_indirect.min(MAX_INDIRECT);
    let mut w = match ChainWalker::new(
        t.size,
        head,
        t.indirect,
        u32::from(max_indirect),
        t.limits.max_chain_bytes,
    ) {
        Ok(w) => w,
        Err(e) => return Ok(Err(Refusal::Ring(e))),
    };
    marks.start(t.size);
    let mut seen_indirect = [false; MAX_INDIRECT as usize];
    let mut chain = Chain {
        head,
        direct: Vec::new(),
        indirect: None,
        writable: Vec::new(),
        writable_bytes: 0,
        readable_bytes: 0,
    };
    while let Some(loc) = w.location() {
        let mut raw = [0u8; 16];
        let d = match loc {
            DescLocation::Table(i) => {
                if t.busy.get(usize::from(i)).copied().unwrap_or(false) {
                    return Ok(Err(if i == head {
                        Refusal::Reposted(i)
                    } else {
                        Refusal::Shared(i)
                    }));
                }
                if marks.visit(i) {
                    return Ok(Err(Refusal::Loop(i)));
                }
                *visited += 1;
                bufs.vcpu_read(t.desc + u64::from(i) * DESC_SIZE, &mut raw)?;
                let d = Descriptor::from_bytes(&raw);
                chain.direct.push((i, d));
                d
            }
            DescLocation::Indirect(addr) => {
                // The walker hands out entries of the table the last main-table descriptor
                // points to (checked for RAM when it was accepted).
                let base = chain.direct.last().map_or(addr, |(_, d)| d.addr);
                let k = (addr.wrapping_sub(base) / DESC_SIZE) as usize;
                if k >= seen_indirect.len() {
                    return Ok(Err(Refusal::Ring(ChainError::IndexOutOfRange(k as u16))));
                }
                if std::mem::replace(&mut seen_indirect[k], true) {
                    return Ok(Err(Refusal::Loop(k as u16)));
                }
                *visited += 1;
                bufs.vcpu_read(addr, &mut raw)?;
                Descriptor::from_bytes(&raw)
            }
        };
        if d.flags & !KNOWN_FLAGS != 0 {
            return Ok(Err(Refusal::Flags(d.flags)));
        }
        match w.accept(d) {
            Err(e) => return Ok(Err(Refusal::Ring(e))),
            Ok(None) => {
                // An indirect descriptor: its table is walked next.
                if let Err(r) = t.region(bufs, d.addr, d.len) {
                    return Ok(Err(r));
                }
                let at = chain.direct.last().map_or(head, |(i, _)| *i);
                chain.indirect = Some(Indirect {
                    at,
                    table: Vec::new(),
                });
            }
            Ok(Some(seg)) => {
                if let Err(r) = t.region(bufs, seg.addr, seg.len) {
                    return Ok(Err(r));
                }
                if !seg.write {
                    chain.readable_bytes += u64::from(seg.len);
                } else if seg.len > 0 {
                    chain.writable.push((seg.addr, seg.len));
                    chain.writable_bytes += u64::from(seg.len);
                }
                if let Some(ind) = chain.indirect.as_mut() {
                    let next = ind.table.len() as u16 + 1;
                    ind.table.push(Descriptor {
                        addr: seg.addr,
                        len: seg.len,
                        flags: (d.flags & (DESC_F_WRITE | DESC_F_NEXT)),
                        next: if d.has_next() { next } else { 0 },
                    });
                }
            }
        }
    }
    Ok(Ok(chain))
}

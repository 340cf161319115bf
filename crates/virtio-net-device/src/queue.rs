//! One split virtqueue as the device sees it. Everything read from the rings is hostile: the
//! available index may jump, heads and chains may point anywhere, loop or be absurdly long;
//! each is refused with a [`QueueError`] the caller counts, and nothing panics. Memory is
//! reached only through the client's DMA mappings.
use std::sync::atomic::{fence, Ordering};

use vfio_user_device::dma::{DmaError, DmaSpace};
use virtio_spec::ring::{
    self, ChainError, ChainWalker, DescLocation, Descriptor, LayoutError, Segment, SplitRing,
    UsedElem,
};

/// Most entries an indirect table may have.
pub const MAX_INDIRECT: u32 = 64;

/// Why a queue operation failed.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    /// A ring or buffer access outside the DMA mappings.
    #[error("ring access")]
    Dma(#[from] DmaError),
    /// A descriptor chain broke a rule.
    #[error("descriptor chain: {0}")]
    Chain(ChainError),
    /// The available index moved by more than the queue size.
    #[error("available index jumped from {last} to {idx} in a queue of {size}")]
    AvailJump {
        /// Last index the device consumed.
        last: u16,
        /// What the driver wrote.
        idx: u16,
        /// Queue size.
        size: u16,
    },
}

/// A virtqueue's configuration (what the driver wrote) and the device's positions.
#[derive(Clone, Debug)]
pub struct Queue {
    /// Size the driver chose (`queue_size`).
    pub size: u16,
    /// MSI-X vector (`queue_msix_vector`).
    pub msix_vector: u16,
    /// Descriptor table address.
    pub desc: u64,
    /// Available ring address.
    pub driver: u64,
    /// Used ring address.
    pub device: u64,
    ring: Option<SplitRing>,
    last_avail: u16,
    used_idx: u16,
    max_size: u16,
}

impl Queue {
    /// A reset queue offering `max_size` entries.
    pub fn new(max_size: u16) -> Self {
        Queue {
            size: max_size,
            msix_vector: virtio_spec::pci::NO_VECTOR,
            desc: 0,
            driver: 0,
            device: 0,
            ring: None,
            last_avail: 0,
            used_idx: 0,
            max_size,
        }
    }

    /// Back to the state after reset.
    pub fn reset(&mut self) {
        *self = Queue::new(self.max_size);
    }

    /// True once enabled with a valid layout.
    pub fn enabled(&self) -> bool {
        self.ring.is_some()
    }

    /// `queue_enable` = 1: checks the layout the driver wrote (size at most the offered one).
    pub fn enable(&mut self) -> Result<(), LayoutError> {
        if self.size > self.max_size {
            return Err(LayoutError::BadSize(self.size));
        }
        self.ring = Some(SplitRing::new(
            self.size,
            self.desc,
            self.driver,
            self.device,
        )?);
        self.last_avail = 0;
        self.used_idx = 0;
        Ok(())
    }

    /// Stops using the queue (a broken driver): nothing more is read or written.
    pub fn disable(&mut self) {
        self.ring = None;
    }

    fn read_u16(dma: &DmaSpace, at: u64) -> Result<u16, QueueError> {
        let mut b = [0u8; 2];
        dma.read(at, &mut b)?;
        Ok(u16::from_le_bytes(b))
    }

    /// True when the driver made a buffer available the device has not taken.
    pub fn has_avail(&self, dma: &DmaSpace) -> Result<bool, QueueError> {
        let Some(r) = self.ring else { return Ok(false) };
        Ok(Self::read_u16(dma, r.avail + ring::avail::IDX)? != self.last_avail)
    }

    /// Takes the next available head (None when there is none).
    pub fn pop(&mut self, dma: &DmaSpace) -> Result<Option<u16>, QueueError> {
        let Some(r) = self.ring else { return Ok(None) };
        let idx = Self::read_u16(dma, r.avail + ring::avail::IDX)?;
        let pending = idx.wrapping_sub(self.last_avail);
        if pending == 0 {
            return Ok(None);
        }
        if pending > r.size {
            return Err(QueueError::AvailJump {
                last: self.last_avail,
                idx,
                size: r.size,
            });
        }
        // The ring entry is read after the index that published it.
        fence(Ordering::Acquire);
        let head = Self::read_u16(dma, r.avail_entry_addr(self.last_avail))?;
        self.last_avail = self.last_avail.wrapping_add(1);
        Ok(Some(head))
    }

    /// Walks the chain at `head` into `out` (cleared first): every rule of
    /// [`ChainWalker`] plus each buffer inside the DMA mappings.
    pub fn chain(
        &self,
        dma: &DmaSpace,
        head: u16,
        indirect_ok: bool,
        max_bytes: u64,
        out: &mut Vec<Segment>,
    ) -> Result<(), QueueError> {
        out.clear();
        let Some(r) = self.ring else { return Ok(()) };
        let mut w = ChainWalker::new(r.size, head, indirect_ok, MAX_INDIRECT, max_bytes)
            .map_err(QueueError::Chain)?;
        while let Some(loc) = w.location() {
            let at = match loc {
                DescLocation::Table(i) => r.desc_addr(i),
                DescLocation::Indirect(a) => a,
            };
            let mut b = [0u8; 16];
            dma.read(at, &mut b)?;
            if let Some(seg) = w
                .accept(Descriptor::from_bytes(&b))
                .map_err(QueueError::Chain)?
            {
                if !dma.contains(seg.addr, u64::from(seg.len)) {
                    return Err(QueueError::Dma(DmaError {
                        kind: if seg.write { "write" } else { "read" },
                        iova: seg.addr,
                        len: seg.len as usize,
                    }));
                }
                out.push(seg);
            }
        }
        Ok(())
    }

    /// Returns chain `head` to the driver with `len` bytes written.
    pub fn push_used(&mut self, dma: &DmaSpace, head: u16, len: u32) -> Result<(), QueueError> {
        let Some(r) = self.ring else { return Ok(()) };
        let elem = UsedElem {
            id: u32::from(head),
            len,
        };
        dma.write(r.used_entry_addr(self.used_idx), &elem.to_bytes())?;
        self.used_idx = self.used_idx.wrapping_add(1);
        // The element is visible before the index that publishes it.
        fence(Ordering::Release);
        dma.write(r.used + ring::used::IDX, &self.used_idx.to_le_bytes())?;
        Ok(())
    }

    /// False when the driver asked not to be interrupted (AVAIL_F_NO_INTERRUPT).
    pub fn wants_interrupt(&self, dma: &DmaSpace) -> bool {
        let Some(r) = self.ring else { return false };
        Self::read_u16(dma, r.avail + ring::avail::FLAGS)
            .is_ok_and(|f| f & ring::AVAIL_F_NO_INTERRUPT == 0)
    }
}

/// Copies the device-readable buffers of `segs` into `out`, skipping the first `skip` bytes.
pub fn gather(
    dma: &DmaSpace,
    segs: &[Segment],
    skip: usize,
    out: &mut Vec<u8>,
) -> Result<(), DmaError> {
    out.clear();
    let mut skip = skip;
    for s in segs.iter().filter(|s| !s.write) {
        let len = s.len as usize;
        if skip >= len {
            skip -= len;
            continue;
        }
        let start = out.len();
        out.resize(start + len - skip, 0);
        dma.read(s.addr + skip as u64, &mut out[start..])?;
        skip = 0;
    }
    Ok(())
}

/// Copies `data` into the device-writable buffers of `segs`; returns the bytes written (less
/// than `data.len()` when the buffers are too small).
pub fn scatter(dma: &DmaSpace, segs: &[Segment], data: &[u8]) -> Result<usize, DmaError> {
    let mut done = 0;
    for s in segs.iter().filter(|s| s.write) {
        if done == data.len() {
            break;
        }
        let n = (s.len as usize).min(data.len() - done);
        dma.write(s.addr, &data[done..done + n])?;
        done += n;
    }
    Ok(done)
}

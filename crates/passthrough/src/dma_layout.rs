//! The device's DMA view (its IOMMU mapping): which memory backs each IOVA range it may reach.
//! It starts as all of guest RAM (IOVA == GPA); the shadow engine may move a range onto
//! hypervisor memory (copy = device buffer) and back.
//!
//! vfio-user, like VFIO type1 v2, unmaps whole mappings only (`DMA_UNMAP` may not split one), so
//! moving a range re-maps the pieces around it: [`DmaLayout::plan`] works out which mappings to
//! remove and which to add, and the attachment sends them. Between the two the device reaches
//! none of the affected pieces, so callers make sure it is not doing DMA there (queues held and
//! drained). Adjacent RAM pieces are merged again when a range goes back to RAM, so the number of
//! mappings stays bounded.
use std::{os::fd::RawFd, sync::Arc};

use crate::HookError;

const PAGE: u64 = 4096;

/// What memory backs a piece of the DMA space.
#[derive(Clone, Debug)]
pub enum DmaBacking {
    /// Guest RAM at this offset of the VM's memory file.
    Ram {
        /// Offset in the guest RAM memfd.
        file_offset: u64,
    },
    /// Hypervisor memory: a shareable file (memfd) at this offset.
    Host {
        /// The file; kept open while the piece is mapped.
        fd: Arc<std::os::fd::OwnedFd>,
        /// Offset in it.
        offset: u64,
    },
}

impl DmaBacking {
    /// The backing `delta` bytes further on.
    fn advance(&self, delta: u64) -> DmaBacking {
        match self {
            DmaBacking::Ram { file_offset } => DmaBacking::Ram {
                file_offset: file_offset + delta,
            },
            DmaBacking::Host { fd, offset } => DmaBacking::Host {
                fd: fd.clone(),
                offset: offset + delta,
            },
        }
    }

    /// The file and offset to send with `DMA_MAP` (`ram_fd` for guest RAM).
    pub fn fd_and_offset(&self, ram_fd: RawFd) -> (RawFd, u64) {
        match self {
            DmaBacking::Ram { file_offset } => (ram_fd, *file_offset),
            DmaBacking::Host { fd, offset } => (std::os::fd::AsRawFd::as_raw_fd(&**fd), *offset),
        }
    }
}

/// One `DMA_MAP` the device holds.
#[derive(Clone, Debug)]
pub struct Piece {
    /// IOVA of the first byte.
    pub iova: u64,
    /// Length in bytes.
    pub size: u64,
    /// What backs it.
    pub backing: DmaBacking,
}

impl Piece {
    fn end(&self) -> u64 {
        self.iova + self.size
    }

    /// `[from, to)` of this piece (inside it).
    fn part(&self, from: u64, to: u64) -> Piece {
        Piece {
            iova: from,
            size: to - from,
            backing: self.backing.advance(from - self.iova),
        }
    }

    fn is_ram(&self) -> bool {
        matches!(self.backing, DmaBacking::Ram { .. })
    }

    /// `next` continues this RAM piece in the memory file.
    fn continued_by(&self, next: &Piece) -> bool {
        match (&self.backing, &next.backing) {
            (DmaBacking::Ram { file_offset: a }, DmaBacking::Ram { file_offset: b }) => {
                self.end() == next.iova && a + self.size == *b
            }
            _ => false,
        }
    }
}

/// The mappings to remove and to add for one change.
#[derive(Debug)]
pub struct Plan {
    /// Pieces to `DMA_UNMAP` (whole).
    pub unmap: Vec<Piece>,
    /// Pieces to `DMA_MAP`.
    pub map: Vec<Piece>,
}

/// The device's DMA mappings, sorted and disjoint.
#[derive(Debug, Default)]
pub struct DmaLayout {
    pieces: Vec<Piece>,
}

impl DmaLayout {
    /// A layout of the given initial mappings.
    pub fn new(mut pieces: Vec<Piece>) -> Self {
        pieces.sort_by_key(|p| p.iova);
        DmaLayout { pieces }
    }

    /// The current mappings.
    pub fn pieces(&self) -> &[Piece] {
        &self.pieces
    }

    /// What backs IOVA `iova` (None: not mapped).
    pub fn backing_at(&self, iova: u64) -> Option<DmaBacking> {
        self.pieces
            .iter()
            .find(|p| iova >= p.iova && iova < p.end())
            .map(|p| p.backing.advance(iova - p.iova))
    }

    /// Works out how to make `[iova, iova + size)` backed by `backing` (`Ram` backings are
    /// merged with RAM neighbours that continue them). The range must be page aligned and
    /// fully mapped already.
    pub fn plan(&self, iova: u64, size: u64, backing: DmaBacking) -> Result<Plan, HookError> {
        let end = iova
            .checked_add(size)
            .filter(|_| size > 0 && iova.is_multiple_of(PAGE) && size.is_multiple_of(PAGE))
            .ok_or(HookError::DmaNotPages { iova, size })?;
        let hit: Vec<usize> = (0..self.pieces.len())
            .filter(|&i| self.pieces[i].iova < end && iova < self.pieces[i].end())
            .collect();
        let covered: u64 = hit
            .iter()
            .map(|&i| {
                let p = &self.pieces[i];
                p.end().min(end) - p.iova.max(iova)
            })
            .sum();
        if covered != size {
            return Err(HookError::DmaNotMapped { iova, size });
        }
        let (first, last) = (hit[0], hit[hit.len() - 1]);
        let mut remove: Vec<usize> = hit.clone();
        let new = Piece {
            iova,
            size,
            backing,
        };
        let mut map = Vec::new();
        // What stays of the first and last piece outside the range.
        let head = (self.pieces[first].iova < iova)
            .then(|| self.pieces[first].part(self.pieces[first].iova, iova));
        let tail = (self.pieces[last].end() > end)
            .then(|| self.pieces[last].part(end, self.pieces[last].end()));
        let mut middle = vec![new];
        if middle[0].is_ram() {
            // Merge RAM that continues it on either side (untouched neighbours included).
            let mut merged = middle.pop().expect("one piece");
            if let Some(h) = &head {
                if h.continued_by(&merged) {
                    merged = Piece {
                        iova: h.iova,
                        size: h.size + merged.size,
                        backing: h.backing.clone(),
                    };
                }
            } else if first > 0 && self.pieces[first - 1].continued_by(&merged) {
                let p = &self.pieces[first - 1];
                remove.insert(0, first - 1);
                merged = Piece {
                    iova: p.iova,
                    size: p.size + merged.size,
                    backing: p.backing.clone(),
                };
            }
            let mut tail_merged = false;
            if let Some(t) = &tail {
                if merged.continued_by(t) {
                    merged.size += t.size;
                    tail_merged = true;
                }
            } else if let Some(p) = self.pieces.get(last + 1) {
                if merged.continued_by(p) {
                    remove.push(last + 1);
                    merged.size += p.size;
                }
            }
            let head_merged = head.as_ref().is_some_and(|h| h.iova == merged.iova);
            if let Some(h) = head.filter(|_| !head_merged) {
                map.push(h);
            }
            map.push(merged);
            if let Some(t) = tail.filter(|_| !tail_merged) {
                map.push(t);
            }
        } else {
            map.extend(head);
            map.append(&mut middle);
            map.extend(tail);
        }
        Ok(Plan {
            unmap: remove.iter().map(|&i| self.pieces[i].clone()).collect(),
            map,
        })
    }

    /// Records that `plan` was carried out.
    pub fn apply(&mut self, plan: &Plan) {
        self.pieces.retain(|p| {
            !plan
                .unmap
                .iter()
                .any(|u| u.iova == p.iova && u.size == p.size)
        });
        self.pieces.extend(plan.map.iter().cloned());
        self.pieces.sort_by_key(|p| p.iova);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn memfd() -> Arc<std::os::fd::OwnedFd> {
        let f = std::fs::File::open("/dev/null").unwrap();
        Arc::new(f.into())
    }

    fn ram(iova: u64, size: u64, off: u64) -> Piece {
        Piece {
            iova,
            size,
            backing: DmaBacking::Ram { file_offset: off },
        }
    }

    fn spans(l: &DmaLayout) -> Vec<(u64, u64, bool)> {
        l.pieces()
            .iter()
            .map(|p| (p.iova, p.size, p.is_ram()))
            .collect()
    }

    #[test]
    fn moving_a_range_splits_its_piece_and_moving_back_merges_it() {
        let mut l = DmaLayout::new(vec![ram(0, 0x10000, 0), ram(0x100000, 0x4000, 0x10000)]);
        let host = DmaBacking::Host {
            fd: memfd(),
            offset: 0,
        };
        let p = l.plan(0x3000, 0x2000, host).unwrap();
        assert_eq!(p.unmap.len(), 1);
        assert_eq!(
            p.map.iter().map(|p| (p.iova, p.size)).collect::<Vec<_>>(),
            vec![(0, 0x3000), (0x3000, 0x2000), (0x5000, 0xb000)]
        );
        l.apply(&p);
        assert_eq!(
            spans(&l),
            vec![
                (0, 0x3000, true),
                (0x3000, 0x2000, false),
                (0x5000, 0xb000, true),
                (0x100000, 0x4000, true)
            ]
        );
        match l.backing_at(0x6000) {
            Some(DmaBacking::Ram { file_offset }) => assert_eq!(file_offset, 0x6000),
            other => panic!("{other:?}"),
        }
        // Back to RAM: one piece again, the neighbours merged in.
        let p = l
            .plan(
                0x3000,
                0x2000,
                DmaBacking::Ram {
                    file_offset: 0x3000,
                },
            )
            .unwrap();
        assert_eq!(p.unmap.len(), 3);
        assert_eq!(p.map.len(), 1);
        l.apply(&p);
        assert_eq!(
            spans(&l),
            vec![(0, 0x10000, true), (0x100000, 0x4000, true)]
        );
    }

    #[test]
    fn two_ranges_in_one_piece_and_edges() {
        let mut l = DmaLayout::new(vec![ram(0, 0x10000, 0)]);
        for (at, off) in [(0, 0u64), (0xf000, 0x1000)] {
            let p = l
                .plan(
                    at,
                    0x1000,
                    DmaBacking::Host {
                        fd: memfd(),
                        offset: off,
                    },
                )
                .unwrap();
            l.apply(&p);
        }
        assert_eq!(
            spans(&l),
            vec![
                (0, 0x1000, false),
                (0x1000, 0xe000, true),
                (0xf000, 0x1000, false)
            ]
        );
        let p = l
            .plan(
                0xf000,
                0x1000,
                DmaBacking::Ram {
                    file_offset: 0xf000,
                },
            )
            .unwrap();
        l.apply(&p);
        assert_eq!(spans(&l), vec![(0, 0x1000, false), (0x1000, 0xf000, true)]);
    }

    #[test]
    fn unmapped_or_unaligned_ranges_are_refused() {
        let l = DmaLayout::new(vec![ram(0, 0x2000, 0)]);
        let h = || DmaBacking::Host {
            fd: memfd(),
            offset: 0,
        };
        assert!(l.plan(0x1000, 0x2000, h()).is_err());
        assert!(l.plan(0x800, 0x1000, h()).is_err());
        assert!(l.plan(0x1000, 0, h()).is_err());
        assert!(l.plan(!0xfff, 0x2000, h()).is_err());
    }
}

//! PRP walking with every guest-supplied value treated as hostile: offsets, list pointers,
//! chained list pages, lengths. A walk costs at most one list entry read per data page.
use nvme_spec::{Status, PAGE_SIZE};

use crate::dma::DmaError;

/// Why a PRP walk failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PrpError {
    /// An entry has an offset the spec forbids.
    #[error("PRP entry {entry:#x} has an invalid offset")]
    Offset {
        /// The entry.
        entry: u64,
    },
    /// The transfer is longer than the device accepts.
    #[error("transfer of {0} bytes exceeds the maximum")]
    TooLong(u64),
    /// Reading a PRP list failed.
    #[error("reading the PRP list")]
    List(#[source] DmaError),
}

impl PrpError {
    /// The NVMe status for the failure.
    pub fn status(&self) -> Status {
        match self {
            PrpError::Offset { .. } => Status::INVALID_PRP_OFFSET,
            PrpError::TooLong(_) => Status::INVALID_FIELD,
            PrpError::List(_) => Status::DATA_TRANSFER_ERROR,
        }
    }
}

/// A contiguous piece of a transfer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    /// Bus address.
    pub iova: u64,
    /// Length in bytes.
    pub len: u32,
}

/// Walks PRP1/PRP2 for `len` bytes (at most `max_len`), reading list entries with `read_u64`.
pub fn walk(
    prp1: u64,
    prp2: u64,
    len: u64,
    max_len: u64,
    mut read_u64: impl FnMut(u64) -> Result<u64, DmaError>,
) -> Result<Vec<Segment>, PrpError> {
    if len > max_len {
        return Err(PrpError::TooLong(len));
    }
    if len == 0 {
        return Ok(Vec::new());
    }
    if !prp1.is_multiple_of(4) {
        return Err(PrpError::Offset { entry: prp1 });
    }
    let mut segs = Vec::with_capacity(nvme_spec::prp::pages(prp1, len) as usize);
    let first = len.min(PAGE_SIZE - prp1 % PAGE_SIZE);
    segs.push(Segment {
        iova: prp1,
        len: first as u32,
    });
    let mut remaining = len - first;
    if remaining == 0 {
        return Ok(segs);
    }
    if remaining <= PAGE_SIZE {
        if !prp2.is_multiple_of(PAGE_SIZE) {
            return Err(PrpError::Offset { entry: prp2 });
        }
        segs.push(Segment {
            iova: prp2,
            len: remaining as u32,
        });
        return Ok(segs);
    }
    // PRP2 points to a list; it may start inside a page (qword aligned).
    if !prp2.is_multiple_of(8) {
        return Err(PrpError::Offset { entry: prp2 });
    }
    let mut list = prp2;
    while remaining > 0 {
        let entries_left_in_page = (PAGE_SIZE - list % PAGE_SIZE) / 8;
        let pages_left = remaining.div_ceil(PAGE_SIZE);
        let entry = read_u64(list).map_err(PrpError::List)?;
        if entries_left_in_page == 1 && pages_left > 1 {
            // The last entry of a list page chains to the next list page.
            if entry % PAGE_SIZE != 0 {
                return Err(PrpError::Offset { entry });
            }
            list = entry;
            continue;
        }
        if entry % PAGE_SIZE != 0 {
            return Err(PrpError::Offset { entry });
        }
        let n = remaining.min(PAGE_SIZE);
        segs.push(Segment {
            iova: entry,
            len: n as u32,
        });
        remaining -= n;
        list += 8;
    }
    Ok(segs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    const MAX: u64 = 128 * 1024;

    fn mem(entries: &[(u64, u64)]) -> impl FnMut(u64) -> Result<u64, DmaError> + '_ {
        let m: HashMap<u64, u64> = entries.iter().copied().collect();
        move |a| {
            m.get(&a).copied().ok_or(DmaError {
                kind: "read",
                iova: a,
                len: 8,
            })
        }
    }

    #[test]
    fn one_and_two_pages() {
        let s = walk(0x1000, 0, 4096, MAX, mem(&[])).unwrap();
        assert_eq!(
            s,
            vec![Segment {
                iova: 0x1000,
                len: 4096
            }]
        );
        let s = walk(0x1800, 0x5000, 4096, MAX, mem(&[])).unwrap();
        assert_eq!(
            s[0],
            Segment {
                iova: 0x1800,
                len: 2048
            }
        );
        assert_eq!(
            s[1],
            Segment {
                iova: 0x5000,
                len: 2048
            }
        );
        assert_eq!(walk(0x1000, 0, 512, MAX, mem(&[])).unwrap().len(), 1);
    }

    #[test]
    fn lists_and_chaining() {
        // 3 pages: PRP2 is a list with 2 entries
        let s = walk(
            0x1000,
            0x9000,
            3 * 4096,
            MAX,
            mem(&[(0x9000, 0xa000), (0x9008, 0xb000)]),
        )
        .unwrap();
        assert_eq!(
            s.iter().map(|s| s.iova).collect::<Vec<_>>(),
            vec![0x1000, 0xa000, 0xb000]
        );
        // a list starting at the last slot of its page chains to another list page
        let s = walk(
            0x1000,
            0x9ff8,
            3 * 4096,
            MAX,
            mem(&[(0x9ff8, 0x20000), (0x20000, 0xa000), (0x20008, 0xb000)]),
        )
        .unwrap();
        assert_eq!(s.len(), 3);
        assert_eq!(s[2].iova, 0xb000);
    }

    #[test]
    fn hostile_prps_fail_cleanly() {
        assert_eq!(
            walk(0x1002, 0, 512, MAX, mem(&[])),
            Err(PrpError::Offset { entry: 0x1002 })
        );
        assert_eq!(
            walk(0x1000, 0x5010, 8192, MAX, mem(&[])),
            Err(PrpError::Offset { entry: 0x5010 })
        );
        assert_eq!(
            walk(0x1000, 0x9004, 3 * 4096, MAX, mem(&[])),
            Err(PrpError::Offset { entry: 0x9004 })
        );
        assert_eq!(
            walk(
                0x1000,
                0x9000,
                3 * 4096,
                MAX,
                mem(&[(0x9000, 0xa010), (0x9008, 0xb000)])
            ),
            Err(PrpError::Offset { entry: 0xa010 })
        );
        assert!(matches!(
            walk(0x1000, 0x9000, 3 * 4096, MAX, mem(&[])),
            Err(PrpError::List(_))
        ));
        assert_eq!(
            walk(0x1000, 0, MAX + 1, MAX, mem(&[])),
            Err(PrpError::TooLong(MAX + 1))
        );
        assert_eq!(
            walk(0x1000, 0, u64::MAX, MAX, mem(&[])),
            Err(PrpError::TooLong(u64::MAX))
        );
    }

    #[test]
    fn a_list_that_chains_to_itself_terminates() {
        // the chain entry points back at the same list page: the walk consumes entries and
        // ends after at most len / 4096 data pages
        let mut entries: Vec<(u64, u64)> = (0..511)
            .map(|i| (0x9000 + i * 8, 0x10_0000 + i * 4096))
            .collect();
        entries.push((0x9ff8, 0x9000));
        let s = walk(0x1000, 0x9000, MAX, MAX, mem(&entries)).unwrap();
        assert_eq!(s.len() as u64, MAX / 4096);
        // even when every entry is the self-chain, the walk makes progress or fails
        let looped = [(0x9ff8u64, 0x9ff8u64)];
        assert!(walk(0x1000, 0x9ff8, MAX, MAX, mem(&looped)).is_err());
    }
}

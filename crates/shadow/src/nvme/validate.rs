//! Validation of I/O commands the guest submits while shadowed: opcode, namespace, transfer
//! size, and a bounded walk of PRP1/PRP2/PRP lists that yields every data page the device
//! will touch. Lists are read from the device buffer — what the device itself will read.
use nvme_spec::{opcode::io, prp, Sqe, Status, PAGE_SIZE};

use crate::Buffers;

/// Which way data moves.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Direction {
    /// No data (Flush).
    None,
    /// The device reads guest memory (Write).
    ToDevice,
    /// The device writes guest memory (Read): these pages become dirty.
    FromDevice,
}

/// What a namespace looks like to the validator.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Limits {
    /// Namespace the guest may address.
    pub nsid: u32,
    /// Its logical block size in bytes.
    pub block_size: u32,
    /// Largest transfer accepted in bytes.
    pub max_transfer: u64,
}

/// A command that passed validation.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Checked {
    /// Command identifier.
    pub cid: u16,
    /// Data direction.
    pub direction: Direction,
    /// Guest-physical data pages, in transfer order.
    pub pages: Vec<u64>,
}

fn page_in_ram(bufs: &dyn Buffers, page: u64) -> Result<(), Status> {
    if !page.is_multiple_of(PAGE_SIZE) {
        return Err(Status::INVALID_PRP_OFFSET);
    }
    if !bufs.data_in_ram(page, PAGE_SIZE) {
        return Err(Status::DATA_TRANSFER_ERROR);
    }
    Ok(())
}

/// Walks the PRPs of a `len`-byte transfer; returns the data pages.
pub fn prp_pages(prp1: u64, prp2: u64, len: u64, bufs: &dyn Buffers) -> Result<Vec<u64>, Status> {
    if len == 0 {
        return Ok(Vec::new());
    }
    if !prp1.is_multiple_of(4) {
        return Err(Status::INVALID_PRP_OFFSET);
    }
    let first = prp1 - prp1 % PAGE_SIZE;
    if !bufs.data_in_ram(first, PAGE_SIZE) {
        return Err(Status::DATA_TRANSFER_ERROR);
    }
    let total = prp::pages(prp1, len);
    let mut pages = Vec::with_capacity(total as usize);
    pages.push(first);
    match total {
        1 => {}
        2 => {
            page_in_ram(bufs, prp2)?;
            pages.push(prp2);
        }
        _ => {
            let mut needed = total - 1;
            let mut list = prp2;
            // Each list page holds up to 512 entries; the last one chains when more follow.
            // `needed` strictly decreases, so the walk ends after at most `total` entries.
            loop {
                if !list.is_multiple_of(8) {
                    return Err(Status::INVALID_PRP_OFFSET);
                }
                let in_page = (PAGE_SIZE - list % PAGE_SIZE) / 8;
                let take = if needed > in_page {
                    in_page - 1
                } else {
                    needed
                };
                let count = if needed > in_page { in_page } else { needed };
                let mut raw = vec![0u8; (count * 8) as usize];
                if !bufs.read_device(list, &mut raw) || !bufs.data_in_ram(list, count * 8) {
                    return Err(Status::DATA_TRANSFER_ERROR);
                }
                let entries: Vec<u64> = raw
                    .chunks_exact(8)
                    .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")))
                    .collect();
                for &p in &entries[..take as usize] {
                    page_in_ram(bufs, p)?;
                    pages.push(p);
                }
                needed -= take;
                if needed == 0 {
                    break;
                }
                list = entries[count as usize - 1];
                if take == 0 {
                    return Err(Status::INVALID_PRP_OFFSET);
                }
            }
        }
    }
    Ok(pages)
}

/// Validates an I/O submission entry.
pub fn check_io(sqe: &Sqe, limits: &Limits, bufs: &dyn Buffers) -> Result<Checked, Status> {
    if sqe.fuse() != 0 || sqe.psdt() != 0 {
        // fused operations and SGLs are not supported
        return Err(Status::INVALID_FIELD);
    }
    let cid = sqe.cid();
    let direction = match sqe.opcode() {
        io::FLUSH => {
            if sqe.nsid() != limits.nsid && sqe.nsid() != u32::MAX {
                return Err(Status::INVALID_NAMESPACE);
            }
            return Ok(Checked {
                cid,
                direction: Direction::None,
                pages: Vec::new(),
            });
        }
        io::WRITE => Direction::ToDevice,
        io::READ => Direction::FromDevice,
        _ => return Err(Status::INVALID_OPCODE),
    };
    if sqe.nsid() != limits.nsid {
        return Err(Status::INVALID_NAMESPACE);
    }
    let len = sqe.nlb() as u64 * limits.block_size as u64;
    if len > limits.max_transfer {
        return Err(Status::INVALID_FIELD);
    }
    let pages = prp_pages(sqe.prp1(), sqe.prp2(), len, bufs)?;
    Ok(Checked {
        cid,
        direction,
        pages,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::VecBuffers;

    const BASE: u64 = 0x10_0000;

    fn bufs() -> VecBuffers {
        VecBuffers::new(BASE, 64 * 4096)
    }

    fn write_list(b: &VecBuffers, at: u64, entries: &[u64]) {
        let bytes: Vec<u8> = entries.iter().flat_map(|e| e.to_le_bytes()).collect();
        assert!(b.write_device(at, &bytes));
    }

    fn limits() -> Limits {
        Limits {
            nsid: 1,
            block_size: 512,
            max_transfer: 128 << 10,
        }
    }

    fn read(prp1: u64, prp2: u64, blocks: u32) -> Sqe {
        let mut s = Sqe::new(io::READ, 7);
        s.set_nsid(1).set_prps(prp1, prp2).set_lba_range(0, blocks);
        s
    }

    #[test]
    fn one_two_and_listed_pages() {
        let b = bufs();
        let p = |i: u64| BASE + i * 4096;
        let c = check_io(&read(p(1), 0, 8), &limits(), &b).unwrap();
        assert_eq!((c.direction, c.pages), (Direction::FromDevice, vec![p(1)]));
        let c = check_io(&read(p(1) + 512, p(5), 8), &limits(), &b).unwrap();
        assert_eq!(c.pages, vec![p(1), p(5)]);
        write_list(&b, p(10), &[p(3), p(4), p(9)]);
        let c = check_io(&read(p(2), p(10), 32), &limits(), &b).unwrap();
        assert_eq!(c.pages, vec![p(2), p(3), p(4), p(9)]);
    }

    #[test]
    fn chained_lists_are_followed_within_bounds() {
        let b = bufs();
        let p = |i: u64| BASE + i * 4096;
        // a list starting 16 bytes before the end of its page: one entry, then the chain
        let list = p(20) + 4096 - 16;
        write_list(&b, list, &[p(30), p(21)]);
        write_list(&b, p(21), &[p(31), p(32)]);
        let mut s = read(p(29), list, 32);
        s.set_lba_range(0, 32);
        let c = check_io(&s, &limits(), &b).unwrap();
        assert_eq!(c.pages, vec![p(29), p(30), p(31), p(32)]);
    }

    #[test]
    fn hostile_prps_are_refused() {
        let b = bufs();
        let p = |i: u64| BASE + i * 4096;
        // outside RAM
        assert_eq!(
            check_io(&read(0x1000, 0, 8), &limits(), &b),
            Err(Status::DATA_TRANSFER_ERROR)
        );
        assert_eq!(
            check_io(&read(p(1) + 8, 1 << 40, 8), &limits(), &b),
            Err(Status::DATA_TRANSFER_ERROR)
        );
        // misaligned
        assert_eq!(
            check_io(&read(p(1) + 2, 0, 8), &limits(), &b),
            Err(Status::INVALID_PRP_OFFSET)
        );
        assert_eq!(
            check_io(&read(p(1) + 8, p(2) + 8, 8), &limits(), &b),
            Err(Status::INVALID_PRP_OFFSET)
        );
        // a list entry outside RAM, a list outside RAM, a list chaining to itself
        write_list(&b, p(10), &[p(3), !0xfff]);
        assert_eq!(
            check_io(&read(p(2), p(10), 24), &limits(), &b),
            Err(Status::DATA_TRANSFER_ERROR)
        );
        assert_eq!(
            check_io(&read(p(2), 1 << 45, 24), &limits(), &b),
            Err(Status::DATA_TRANSFER_ERROR)
        );
        let last = p(11) + 4096 - 8;
        write_list(&b, last, &[last]);
        let r = check_io(&read(p(2), last, 255), &limits(), &b);
        assert!(
            r.is_err(),
            "a self-chaining list ends in an error, not a loop: {r:?}"
        );
        // too long, SGL, fused, bad opcode, bad namespace
        assert_eq!(
            check_io(&read(p(1), 0, 65535), &limits(), &b),
            Err(Status::INVALID_FIELD)
        );
        let mut s = read(p(1), 0, 8);
        s.dw[0] |= 1 << 14;
        assert_eq!(check_io(&s, &limits(), &b), Err(Status::INVALID_FIELD));
        let mut s = read(p(1), 0, 8);
        s.dw[0] |= 1 << 8;
        assert_eq!(check_io(&s, &limits(), &b), Err(Status::INVALID_FIELD));
        assert_eq!(
            check_io(&Sqe::new(0x7f, 1), &limits(), &b),
            Err(Status::INVALID_OPCODE)
        );
        let mut s = read(p(1), 0, 8);
        s.set_nsid(2);
        assert_eq!(check_io(&s, &limits(), &b), Err(Status::INVALID_NAMESPACE));
        let mut f = Sqe::new(io::FLUSH, 3);
        f.set_nsid(u32::MAX);
        assert_eq!(
            check_io(&f, &limits(), &b).unwrap().direction,
            Direction::None
        );
    }

    #[test]
    fn random_garbage_never_panics() {
        let b = bufs();
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for i in 0..2000 {
            let list: Vec<u64> = (0..8).map(|_| BASE + (next() % (80 * 4096))).collect();
            write_list(&b, BASE + (i % 60) * 4096, &list);
            let mut s = Sqe::new((next() % 4) as u8, next() as u16);
            for d in s.dw.iter_mut().skip(1) {
                *d = next() as u32;
            }
            s.dw[1] = 1;
            s.dw[0] &= 0x3fff_00ff;
            let _ = check_io(&s, &limits(), &b);
        }
    }
}

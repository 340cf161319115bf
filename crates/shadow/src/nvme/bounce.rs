//! PRP lists copied out of the guest's reach. A PRP list lives in guest RAM, so a guest could
//! rewrite it between the engine's validation and the device's read, and have the device write
//! pages the engine never recorded as dirty. While shadowed, the engine copies every validated
//! list into hypervisor memory the device can read and hands the device that copy instead.

/// Entries in one list page.
const PER_PAGE: usize = 512;
const PAGE: u64 = 4096;

/// List pages needed for `n` entries (the last entry of a full page chains to the next).
pub fn pages_for(n: usize) -> usize {
    if n <= PER_PAGE {
        1
    } else {
        // Every page but the last carries PER_PAGE - 1 entries and the chain pointer.
        (n - 1).div_ceil(PER_PAGE - 1)
    }
}

/// Lays out a PRP list of `entries` (the data pages after the first) in consecutive pages whose
/// first page the device reaches at `iova`: the bytes to write there. None when `entries` is
/// empty or would need more than `max_pages` pages.
pub fn build(entries: &[u64], iova: u64, max_pages: usize) -> Option<Vec<u8>> {
    if entries.is_empty() || pages_for(entries.len()) > max_pages {
        return None;
    }
    let mut out = Vec::with_capacity(pages_for(entries.len()) * PAGE as usize);
    let mut rest = entries;
    let mut page = 0u64;
    loop {
        if rest.len() <= PER_PAGE {
            out.extend(rest.iter().flat_map(|e| e.to_le_bytes()));
            return Some(out);
        }
        let (here, more) = rest.split_at(PER_PAGE - 1);
        out.extend(here.iter().flat_map(|e| e.to_le_bytes()));
        page += 1;
        out.extend((iova + page * PAGE).to_le_bytes());
        rest = more;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{nvme::validate::prp_pages, Buffers, VecBuffers};

    #[test]
    fn page_counts() {
        assert_eq!(pages_for(1), 1);
        assert_eq!(pages_for(512), 1);
        assert_eq!(pages_for(513), 2);
        assert_eq!(pages_for(1022), 2);
        assert_eq!(pages_for(1023), 2);
        assert_eq!(pages_for(1024), 3);
    }

    /// A built list walks back, through the same code that validates guest lists, to exactly
    /// the entries it was built from, chained or not.
    #[test]
    fn built_lists_walk_back_to_their_entries() {
        const BASE: u64 = 0x10_0000;
        for n in [2usize, 7, 512, 513, 700, 1100] {
            let bufs = VecBuffers::new(BASE, (n + 8) * 4096 + 4 * 4096);
            let list_at = BASE + 4096;
            let data: Vec<u64> = (0..n as u64).map(|i| BASE + (4 + i) * 4096).collect();
            let bytes = build(&data, list_at, 4).unwrap();
            assert!(bufs.write_device(list_at, &bytes));
            let len = (n as u64 + 1) * 4096;
            let pages = prp_pages(BASE, list_at, len, &bufs).unwrap();
            assert_eq!(pages[0], BASE);
            assert_eq!(&pages[1..], &data[..], "{n} entries");
        }
        assert!(build(&[1; 1100], 0, 2).is_none());
        assert!(build(&[], 0, 2).is_none());
    }
}

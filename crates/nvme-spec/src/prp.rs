//! PRP arithmetic: how many entries a transfer needs and whether PRP2 is a list.
use crate::PAGE_SIZE;

/// Number of memory pages (= PRP entries) a transfer of `len` bytes starting at `prp1` touches.
pub const fn pages(prp1: u64, len: u64) -> u64 {
    if len == 0 {
        return 0;
    }
    ((prp1 % PAGE_SIZE) + len).div_ceil(PAGE_SIZE)
}

/// True when PRP2 must point to a PRP list (more than two pages).
pub const fn needs_list(prp1: u64, len: u64) -> bool {
    pages(prp1, len) > 2
}

/// Entries in the PRP list (pages after the first), 0 when no list is needed.
pub const fn list_entries(prp1: u64, len: u64) -> u64 {
    if needs_list(prp1, len) {
        pages(prp1, len) - 1
    } else {
        0
    }
}

/// PRP list entries per page (the last one chains to the next list page when more follow).
pub const ENTRIES_PER_PAGE: u64 = PAGE_SIZE / 8;

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn counts() {
        assert_eq!(pages(0x1000, 4096), 1);
        assert_eq!(pages(0x1200, 4096), 2);
        assert!(!needs_list(0x1000, 8192));
        assert!(needs_list(0x1000, 8193));
        assert!(needs_list(0x1004, 8192));
        assert_eq!(list_entries(0x1000, 128 * 1024), 31);
        assert_eq!(pages(0x1000, 0), 0);
    }
}

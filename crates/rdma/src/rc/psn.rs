//! 24-bit packet sequence numbers: arithmetic and comparison modulo 2²⁴ (IBA 9.7.1: a PSN is
//! "ahead" of another when it is within half the space after it).

/// PSN mask.
pub const PSN_MASK: u32 = 0x00FF_FFFF;

/// `psn + n` modulo 2²⁴.
pub fn add(psn: u32, n: u32) -> u32 {
    psn.wrapping_add(n) & PSN_MASK
}

/// Signed distance from `b` to `a` (positive when `a` is after `b`), in −2²³..2²³.
pub fn diff(a: u32, b: u32) -> i32 {
    let d = a.wrapping_sub(b) & PSN_MASK;
    if d & 0x0080_0000 != 0 {
        d as i32 - 0x0100_0000
    } else {
        d as i32
    }
}

/// Whether `a` comes before `b`.
pub fn before(a: u32, b: u32) -> bool {
    diff(a, b) < 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wraps_at_24_bits() {
        assert_eq!(add(PSN_MASK, 1), 0);
        assert_eq!(add(PSN_MASK - 1, 5), 3);
        assert_eq!(diff(2, PSN_MASK), 3);
        assert_eq!(diff(PSN_MASK, 2), -3);
        assert!(before(PSN_MASK, 0));
        assert!(!before(0, PSN_MASK));
        assert_eq!(diff(0x40_0000, 0), 0x40_0000);
        assert_eq!(diff(0, 0x40_0000), -0x40_0000);
    }
}

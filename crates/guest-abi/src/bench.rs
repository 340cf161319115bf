//! Code that is compiled both into the guest and into the host so that their speed can be
//! compared (`ferry bench boot`).

/// A compute-bound loop: `iterations` rounds of an xorshift/multiply mix. Returns the final
/// value so the work cannot be optimised away.
#[inline(never)]
pub fn spin_loop(iterations: u64, seed: u64) -> u64 {
    let mut x = seed | 1;
    let mut acc = 0u64;
    let mut i = 0;
    while i < iterations {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        acc = acc.wrapping_add(x.wrapping_mul(0x9e37_79b9_7f4a_7c15));
        i += 1;
    }
    core::hint::black_box(acc)
}

#[cfg(test)]
mod tests {
    #[test]
    fn spin_loop_is_deterministic() {
        assert_eq!(super::spin_loop(1000, 7), super::spin_loop(1000, 7));
        assert_ne!(super::spin_loop(1000, 7), super::spin_loop(1001, 7));
    }
}

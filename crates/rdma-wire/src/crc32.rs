//! The standard CRC-32 (IEEE 802.3 / zlib): reflected polynomial 0xEDB88320, initial value
//! all ones, final inversion. Table driven, table computed at compile time.

const POLY: u32 = 0xEDB8_8320;

const TABLE: [u32; 256] = {
    let mut t = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 { POLY ^ (c >> 1) } else { c >> 1 };
            k += 1;
        }
        t[i] = c;
        i += 1;
    }
    t
};

/// Running CRC-32 state: short pieces (headers) through the table here, long ones (the
/// payload) through `crc32fast`, which folds with carry-less multiplication where the CPU
/// has it. Both compute the same standard CRC-32; `crc32fast`'s state is the finished CRC of
/// what came before.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Crc32(u32);

/// Pieces at least this long go to `crc32fast` (below 128 bytes it works 16 bytes a step
/// through its sliced tables, several times the speed of the byte loop here).
const FAST_MIN: usize = 16;

impl Crc32 {
    #[cfg(test)]
    pub(crate) const fn new() -> Crc32 {
        Crc32(0xFFFF_FFFF)
    }

    /// The state after eight bytes of 0xFF, where the ICRC starts (rxe's seed, `0xdebb20e3`).
    pub(crate) const fn after_lrh() -> Crc32 {
        Crc32(0xDEBB_20E3)
    }

    pub(crate) fn update(&mut self, data: &[u8]) {
        if data.len() >= FAST_MIN {
            let mut h = crc32fast::Hasher::new_with_initial(!self.0);
            h.update(data);
            self.0 = !h.finalize();
            return;
        }
        let mut c = self.0;
        for &b in data {
            c = TABLE[((c ^ u32::from(b)) & 0xFF) as usize] ^ (c >> 8);
        }
        self.0 = c;
    }

    pub(crate) const fn finish(self) -> u32 {
        !self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn check_values() {
        let mut c = Crc32::new();
        c.update(b"123456789");
        assert_eq!(c.finish(), 0xCBF4_3926);
        assert_eq!(Crc32::new().finish(), 0);
        // The rxe seed: the CRC state after eight 0xFF bytes is 0xdebb20e3 (before inversion).
        let mut c = Crc32::new();
        c.update(&[0xFF; 8]);
        assert_eq!(!c.finish(), 0xDEBB_20E3);
        let mut seeded = Crc32::after_lrh();
        seeded.update(b"123456789");
        c.update(b"123456789");
        assert_eq!(seeded.finish(), c.finish());
        // Long pieces (crc32fast) and short ones (the table) agree, in any split.
        let data: [u8; 300] = core::array::from_fn(|i| (i * 7 + 3) as u8);
        let mut whole = Crc32::new();
        whole.update(&data);
        let mut bytes = Crc32::new();
        for b in data {
            bytes.update(&[b]);
        }
        let mut mixed = Crc32::new();
        mixed.update(&data[..10]);
        mixed.update(&data[10..200]);
        mixed.update(&data[200..]);
        assert_eq!(whole.finish(), bytes.finish());
        assert_eq!(whole.finish(), mixed.finish());
    }
}

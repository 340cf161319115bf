//! Big-endian field access on fixed-size arrays and checked slicing of untrusted input.
//!
//! The `get_*`/`put_*` helpers are used with constant offsets into fixed-size arrays (a MAD is
//! a `[u8; 256]`, a BTH a `[u8; 12]`), so their bounds are known when the code is written; input
//! of untrusted length only ever goes through [`take`] and [`array`], which return errors.

use crate::WireError;

/// Copies `N` bytes starting at `off` out of `buf`.
///
/// Only called with constant offsets that lie inside the fixed-size buffers of this crate.
#[inline]
pub(crate) fn get<const N: usize>(buf: &[u8], off: usize) -> [u8; N] {
    let mut out = [0u8; N];
    out.copy_from_slice(&buf[off..off + N]);
    out
}

#[inline]
pub(crate) fn put(buf: &mut [u8], off: usize, bytes: &[u8]) {
    buf[off..off + bytes.len()].copy_from_slice(bytes);
}

#[inline]
pub(crate) fn get_u16(buf: &[u8], off: usize) -> u16 {
    u16::from_be_bytes(get(buf, off))
}

#[inline]
pub(crate) fn get_u24(buf: &[u8], off: usize) -> u32 {
    let b: [u8; 3] = get(buf, off);
    u32::from_be_bytes([0, b[0], b[1], b[2]])
}

#[inline]
pub(crate) fn get_u32(buf: &[u8], off: usize) -> u32 {
    u32::from_be_bytes(get(buf, off))
}

#[inline]
pub(crate) fn get_u64(buf: &[u8], off: usize) -> u64 {
    u64::from_be_bytes(get(buf, off))
}

#[inline]
pub(crate) fn put_u16(buf: &mut [u8], off: usize, v: u16) {
    put(buf, off, &v.to_be_bytes());
}

/// Writes the low 24 bits of `v`.
#[inline]
pub(crate) fn put_u24(buf: &mut [u8], off: usize, v: u32) {
    let b = v.to_be_bytes();
    put(buf, off, &b[1..]);
}

#[inline]
pub(crate) fn put_u32(buf: &mut [u8], off: usize, v: u32) {
    put(buf, off, &v.to_be_bytes());
}

#[inline]
pub(crate) fn put_u64(buf: &mut [u8], off: usize, v: u64) {
    put(buf, off, &v.to_be_bytes());
}

/// Reads a bit field of `width` bits starting `shift` bits from the most significant bit of
/// the byte `byte` (the numbering the InfiniBand specification uses).
#[inline]
pub(crate) fn bits(byte: u8, shift: u32, width: u32) -> u8 {
    (byte >> (8 - shift - width)) & mask(width)
}

/// The inverse of [`bits`]: `value` truncated to `width` bits and shifted into place.
#[inline]
pub(crate) fn place(value: u8, shift: u32, width: u32) -> u8 {
    (value & mask(width)) << (8 - shift - width)
}

#[inline]
fn mask(width: u32) -> u8 {
    ((1u16 << width) - 1) as u8
}

/// Splits `len` bytes off the front of `input`, or reports that `what` is too short.
#[inline]
pub(crate) fn take<'a>(
    input: &'a [u8],
    len: usize,
    what: &'static str,
) -> Result<(&'a [u8], &'a [u8]), WireError> {
    input.split_at_checked(len).ok_or(WireError::TooShort {
        what,
        len: input.len(),
        need: len,
    })
}

/// The first `N` bytes of `input` as an array reference, or a "too short" error.
#[inline]
pub(crate) fn array<'a, const N: usize>(
    input: &'a [u8],
    what: &'static str,
) -> Result<&'a [u8; N], WireError> {
    input.first_chunk::<N>().ok_or(WireError::TooShort {
        what,
        len: input.len(),
        need: N,
    })
}

/// The first `need` bytes of `out` for writing, or a "buffer too small" error.
#[inline]
pub(crate) fn out_slice<'a>(
    out: &'a mut [u8],
    need: usize,
    what: &'static str,
) -> Result<&'a mut [u8], WireError> {
    let len = out.len();
    out.get_mut(..need)
        .ok_or(WireError::BufferTooSmall { what, len, need })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bit_fields_count_from_the_msb() {
        assert_eq!(bits(0b1010_0111, 0, 5), 0b10100);
        assert_eq!(bits(0b1010_0111, 5, 3), 0b111);
        assert_eq!(bits(0b0011_0111, 4, 1), 0);
        assert_eq!(place(0x1f, 2, 6), 0x1f);
        assert_eq!(place(0xff, 0, 2), 0xc0);
        assert_eq!(place(1, 7, 1), 1);
    }

    #[test]
    fn checked_slicing() {
        let b = [1u8, 2, 3];
        assert!(take(&b, 4, "x").is_err());
        assert_eq!(take(&b, 3, "x").unwrap().1.len(), 0);
        assert_eq!(
            array::<4>(&b, "thing"),
            Err(WireError::TooShort {
                what: "thing",
                len: 3,
                need: 4
            })
        );
        let mut o = [0u8; 2];
        assert!(out_slice(&mut o, 3, "x").is_err());
        assert_eq!(out_slice(&mut o, 2, "x").map(|s| s.len()), Ok(2));
        let mut w = [0u8; 8];
        put_u24(&mut w, 1, 0xAABBCCDD);
        assert_eq!(w, [0, 0xBB, 0xCC, 0xDD, 0, 0, 0, 0]);
        assert_eq!(get_u24(&w, 1), 0xBBCCDD);
    }
}

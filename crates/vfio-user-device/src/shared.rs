//! Copies to and from memory another party writes at the same time (guest RAM a vCPU runs
//! on, ring pages a device polls).
//!
//! A ring index or flags word must be read and written with one access of its width: a
//! plain `memcpy`/`memmove` of a 2-byte range loads a byte and then the whole word (or
//! stores them apart), and a carry between the two (an index going from 0xa4ff to 0xa500)
//! gave 0xa5ff, an available index 256 ahead that broke the queue. Lengths 2, 4 and 8 at
//! an address aligned to their width are therefore one volatile access; anything else is a
//! byte copy (descriptors and entries have their own publication rules: they are read only
//! after the index that published them).

/// Copies `buf.len()` bytes from `src`, a naturally aligned 2-, 4- or 8-byte range as one
/// load.
///
/// # Safety
/// `src..src + buf.len()` must be readable memory for the whole call (another thread or
/// process may write it concurrently).
pub unsafe fn read(src: *const u8, buf: &mut [u8]) {
    match buf.len() {
        2 if (src as usize).is_multiple_of(2) => {
            // SAFETY: aligned, and readable by the caller's promise.
            let v = unsafe { std::ptr::read_volatile(src.cast::<u16>()) };
            buf.copy_from_slice(&v.to_ne_bytes());
        }
        4 if (src as usize).is_multiple_of(4) => {
            // SAFETY: aligned, and readable by the caller's promise.
            let v = unsafe { std::ptr::read_volatile(src.cast::<u32>()) };
            buf.copy_from_slice(&v.to_ne_bytes());
        }
        8 if (src as usize).is_multiple_of(8) => {
            // SAFETY: aligned, and readable by the caller's promise.
            let v = unsafe { std::ptr::read_volatile(src.cast::<u64>()) };
            buf.copy_from_slice(&v.to_ne_bytes());
        }
        // SAFETY: readable by the caller's promise; `buf` is a distinct Rust allocation.
        n => unsafe { std::ptr::copy_nonoverlapping(src, buf.as_mut_ptr(), n) },
    }
}

/// Copies `data` to `dst`, a naturally aligned 2-, 4- or 8-byte range as one store.
///
/// # Safety
/// `dst..dst + data.len()` must be writable memory for the whole call (another thread or
/// process may read it concurrently).
pub unsafe fn write(dst: *mut u8, data: &[u8]) {
    match data.len() {
        2 if (dst as usize).is_multiple_of(2) => {
            let v = u16::from_ne_bytes([data[0], data[1]]);
            // SAFETY: aligned, and writable by the caller's promise.
            unsafe { std::ptr::write_volatile(dst.cast::<u16>(), v) };
        }
        4 if (dst as usize).is_multiple_of(4) => {
            let v = u32::from_ne_bytes([data[0], data[1], data[2], data[3]]);
            // SAFETY: aligned, and writable by the caller's promise.
            unsafe { std::ptr::write_volatile(dst.cast::<u32>(), v) };
        }
        8 if (dst as usize).is_multiple_of(8) => {
            let mut b = [0u8; 8];
            b.copy_from_slice(data);
            // SAFETY: aligned, and writable by the caller's promise.
            unsafe { std::ptr::write_volatile(dst.cast::<u64>(), u64::from_ne_bytes(b)) };
        }
        // SAFETY: writable by the caller's promise; `data` is a distinct Rust allocation.
        n => unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), dst, n) },
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, AtomicU16, Ordering};

    /// A reader of an index another thread carries over a byte boundary (0x12ff <-> 0x1300)
    /// only ever sees the two values written, never 0x13ff or 0x1200.
    #[test]
    fn an_index_carried_across_a_byte_is_never_torn() {
        const WRITTEN: [u16; 2] = [0x12ff, 0x1300];
        let cell = AtomicU16::new(WRITTEN[0]);
        let stop = AtomicBool::new(false);
        let addr = cell.as_ptr() as usize;
        // Called through an opaque pointer so the length is not a constant the compiler
        // could fold into a word move: the test sees what a caller with a runtime length gets.
        let read: unsafe fn(*const u8, &mut [u8]) = std::hint::black_box(super::read);
        let write: unsafe fn(*mut u8, &[u8]) = std::hint::black_box(super::write);
        std::thread::scope(|s| {
            s.spawn(|| {
                let p = addr as *mut u8;
                let mut i = 0;
                while !stop.load(Ordering::Relaxed) {
                    i ^= 1;
                    // SAFETY: the cell outlives the scope; aligned and 2 bytes long.
                    unsafe { write(p, &WRITTEN[i].to_le_bytes()) };
                }
            });
            let mut torn = Vec::new();
            for _ in 0..1_000_000 {
                let mut b = [0u8; 2];
                // SAFETY: as above.
                unsafe { read(addr as *const u8, &mut b) };
                let v = u16::from_le_bytes(b);
                if !WRITTEN.contains(&v) && torn.len() < 4 {
                    torn.push(v);
                }
            }
            stop.store(true, Ordering::Relaxed);
            assert!(torn.is_empty(), "torn reads of a 2-byte index: {torn:x?}");
        });
    }

    #[test]
    fn odd_lengths_and_unaligned_ranges_are_byte_copies() {
        let mut src = [0u8; 16];
        for (i, b) in src.iter_mut().enumerate() {
            *b = i as u8;
        }
        let mut out = [0u8; 3];
        // SAFETY: in bounds of `src`.
        unsafe { super::read(src.as_ptr().add(1), &mut out) };
        assert_eq!(out, [1, 2, 3]);
        let mut two = [0u8; 2];
        // SAFETY: in bounds; an odd address takes the byte path.
        unsafe { super::read(src.as_ptr().add(1), &mut two) };
        assert_eq!(two, [1, 2]);
        let mut dst = [0u8; 16];
        // SAFETY: in bounds of `dst`.
        unsafe { super::write(dst.as_mut_ptr().add(8), &[9, 8, 7, 6, 5, 4, 3, 2]) };
        assert_eq!(&dst[8..], &[9, 8, 7, 6, 5, 4, 3, 2]);
    }
}

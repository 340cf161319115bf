//! The MSI-X table of a function (in BAR0) and the eventfds the client installed for its
//! vectors: a vector is signalled only while MSI-X is enabled and the vector unmasked.
use std::{fs::File, io::Write};

/// Bytes of one MSI-X table entry.
const ENTRY: usize = 16;

/// MSI-X table and interrupt eventfds.
#[derive(Debug)]
pub struct Msix {
    /// Offset of the table in BAR0.
    base: u64,
    table: Vec<u8>,
    irqs: Vec<Option<File>>,
}

impl Msix {
    /// A table of `vectors` entries at `base` in BAR0, all zero (unmasked, no address), and no
    /// eventfds.
    pub fn new(base: u64, vectors: u16) -> Self {
        Msix {
            base,
            table: vec![0; usize::from(vectors) * ENTRY],
            irqs: (0..vectors).map(|_| None).collect(),
        }
    }

    /// The byte of the table at BAR0 offset `offset`, if the table holds it.
    pub fn byte(&self, offset: u64) -> Option<u8> {
        let o = usize::try_from(offset.checked_sub(self.base)?).ok()?;
        self.table.get(o).copied()
    }

    /// A BAR0 read starting at `offset`: false if the table does not hold `offset`; bytes
    /// past the table's end read as zero.
    pub fn read(&self, offset: u64, data: &mut [u8]) -> bool {
        if self.byte(offset).is_none() {
            return false;
        }
        for (i, d) in data.iter_mut().enumerate() {
            *d = offset
                .checked_add(i as u64)
                .and_then(|o| self.byte(o))
                .unwrap_or(0);
        }
        true
    }

    /// A BAR0 write starting at `offset`: false if the table does not hold `offset`; bytes
    /// past the table's end are dropped.
    pub fn write(&mut self, offset: u64, data: &[u8]) -> bool {
        let Some(o) = offset
            .checked_sub(self.base)
            .and_then(|o| usize::try_from(o).ok())
            .filter(|&o| o < self.table.len())
        else {
            return false;
        };
        let n = data.len().min(self.table.len() - o);
        self.table[o..o + n].copy_from_slice(&data[..n]);
        true
    }

    /// Installs eventfds for vectors `start..start + count` (no fds: clears them). Refuses an
    /// out-of-range span or a number of fds other than `count`.
    pub fn set_eventfds(&mut self, start: u32, count: u32, fds: Vec<File>) -> bool {
        let Some(end) = start.checked_add(count) else {
            return false;
        };
        if end as usize > self.irqs.len() || (!fds.is_empty() && fds.len() != count as usize) {
            return false;
        }
        let mut fds = fds.into_iter();
        for v in start..end {
            self.irqs[v as usize] = fds.next();
        }
        true
    }

    /// Signals `vector` if MSI-X is `enabled` (and not function-masked), the vector is not
    /// masked and has an eventfd. True if an interrupt was sent.
    pub fn signal(&mut self, vector: u16, enabled: bool) -> bool {
        let v = usize::from(vector);
        let masked = self
            .table
            .get(v * ENTRY + 12)
            .is_none_or(|control| control & 1 != 0);
        if !enabled || masked {
            return false;
        }
        match self.irqs.get_mut(v) {
            Some(Some(f)) => f.write_all(&1u64.to_le_bytes()).is_ok(),
            _ => false,
        }
    }

    /// Back to the state after `new`: table zeroed, eventfds dropped.
    pub fn reset(&mut self) {
        self.table.fill(0);
        self.irqs.iter_mut().for_each(|i| *i = None);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn eventfd() -> File {
        // SAFETY: plain syscall; the result is checked.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: a fresh descriptor owned by nobody else.
        unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(fd) }
    }

    fn count(f: &File) -> u64 {
        let mut b = [0u8; 8];
        match std::io::Read::read(&mut &*f, &mut b) {
            Ok(8) => u64::from_le_bytes(b),
            _ => 0,
        }
    }

    #[test]
    fn table_accesses_stay_inside_the_table() {
        let mut m = Msix::new(0x4000, 2);
        assert!(m.write(0x4000 + 28, &[1, 2, 3, 4, 5, 6]));
        let mut b = [9u8; 6];
        assert!(m.read(0x4000 + 28, &mut b));
        assert_eq!(b, [1, 2, 3, 4, 0, 0], "past the end: dropped, reads zero");
        assert!(!m.write(0x3fff, &[1]));
        assert!(!m.write(0x4000 + 32, &[1]));
        assert!(!m.read(u64::MAX, &mut b));
        assert_eq!(m.byte(0x4000 + 29), Some(2));
        m.reset();
        assert_eq!(m.byte(0x4000 + 29), Some(0));
    }

    #[test]
    fn vectors_fire_only_when_enabled_unmasked_and_installed() {
        let mut m = Msix::new(0, 2);
        assert!(!m.set_eventfds(1, 2, vec![]), "out of range");
        assert!(!m.set_eventfds(u32::MAX, 2, vec![]), "wraps");
        assert!(!m.set_eventfds(0, 2, vec![eventfd()]), "fds != count");
        let fd = eventfd();
        let probe = fd.try_clone().unwrap();
        assert!(m.set_eventfds(1, 1, vec![fd]));
        assert!(!m.signal(0, true), "no eventfd");
        assert!(!m.signal(1, false), "MSI-X disabled");
        assert!(m.signal(1, true));
        assert_eq!(count(&probe), 1);
        assert!(m.write(16 + 12, &[1]), "mask vector 1");
        assert!(!m.signal(1, true));
        assert!(!m.signal(7, true), "no such vector");
        assert!(m.set_eventfds(1, 1, vec![]), "clear");
        assert!(m.write(16 + 12, &[0]));
        assert!(!m.signal(1, true));
        assert_eq!(count(&probe), 0);
    }
}

//! Memory regions of the software port's RC queue pairs, and the checks every remote access
//! goes through.
//!
//! A region is a byte buffer the port owns with a base virtual address (`iova`), a length,
//! access flags and a key (lkey = rkey). A remote peer names memory by (rkey, virtual address,
//! length); [`MrTable::check_remote`] refuses, with the reason, anything that is not wholly
//! inside one region of the QP's protection domain with the access asked for. The peer is
//! hostile: keys are not sequential (a counter mixed with a per-table secret), lengths and
//! addresses are checked with overflow-free arithmetic.
use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use parking_lot::RwLock;
use serde::{Deserialize, Serialize};

/// Access flags of a region (the `ibv_access_flags` that matter here).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Access {
    /// The local side may write (RDMA READ responses, received SENDs land here).
    pub local_write: bool,
    /// Peers may RDMA WRITE.
    pub remote_write: bool,
    /// Peers may RDMA READ.
    pub remote_read: bool,
}

impl Access {
    /// Everything.
    pub const ALL: Access = Access {
        local_write: true,
        remote_write: true,
        remote_read: true,
    };
}

/// What a remote access wants.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RemoteOp {
    /// RDMA WRITE.
    Write,
    /// RDMA READ.
    Read,
}

/// Why a remote (or local) access was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AccessError {
    /// No region has this key.
    BadKey,
    /// The range is not inside the region.
    OutOfBounds,
    /// The region does not allow the operation.
    NotPermitted,
}

/// The bytes behind a region: a buffer of the port's own ([`HostBuffer`]), or memory of a
/// VM (the virtual RDMA device implements it over the guest pages of a PVRDMA region's page
/// directory). Offsets are from the region's start; the region checks bounds before calling.
pub trait RegionMemory: Send + Sync + std::fmt::Debug {
    /// Length in bytes.
    fn len(&self) -> usize;
    /// Whether it is empty.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Copies `buf.len()` bytes from offset `off`; `false` when that fails.
    fn read(&self, off: usize, buf: &mut [u8]) -> bool;
    /// Copies `data` to offset `off`; `false` when that fails.
    fn write(&self, off: usize, data: &[u8]) -> bool;
}

/// A zeroed buffer owned by the region.
#[derive(Debug)]
pub struct HostBuffer(RwLock<Box<[u8]>>);

impl HostBuffer {
    /// A buffer holding `data`.
    pub fn new(data: Vec<u8>) -> HostBuffer {
        HostBuffer(RwLock::new(data.into_boxed_slice()))
    }
}

impl RegionMemory for HostBuffer {
    fn len(&self) -> usize {
        self.0.read().len()
    }
    fn read(&self, off: usize, buf: &mut [u8]) -> bool {
        let d = self.0.read();
        match d.get(off..off.saturating_add(buf.len())) {
            Some(src) => {
                buf.copy_from_slice(src);
                true
            }
            None => false,
        }
    }
    fn write(&self, off: usize, data: &[u8]) -> bool {
        let mut d = self.0.write();
        match d.get_mut(off..off.saturating_add(data.len())) {
            Some(dst) => {
                dst.copy_from_slice(data);
                true
            }
            None => false,
        }
    }
}

/// One memory region.
#[derive(Debug)]
pub struct MemoryRegion {
    key: u32,
    iova: u64,
    access: Access,
    mem: Arc<dyn RegionMemory>,
}

impl MemoryRegion {
    /// Its key (lkey and rkey).
    pub fn key(&self) -> u32 {
        self.key
    }
    /// Base virtual address.
    pub fn iova(&self) -> u64 {
        self.iova
    }
    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.mem.len()
    }
    /// Whether it is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Access flags.
    pub fn access(&self) -> Access {
        self.access
    }

    /// Offset of `[va, va + len)` inside the region, if it is wholly inside.
    pub fn offset_of(&self, va: u64, len: usize) -> Option<usize> {
        let off = va.checked_sub(self.iova)?;
        let off = usize::try_from(off).ok()?;
        (off.checked_add(len)? <= self.len()).then_some(off)
    }

    /// Copies bytes out (`None` when out of bounds).
    pub fn read(&self, va: u64, len: usize) -> Option<Vec<u8>> {
        let off = self.offset_of(va, len)?;
        let mut v = vec![0u8; len];
        self.mem.read(off, &mut v).then_some(v)
    }

    /// Copies bytes in (`false` when out of bounds).
    pub fn write(&self, va: u64, data: &[u8]) -> bool {
        let Some(off) = self.offset_of(va, data.len()) else {
            return false;
        };
        self.mem.write(off, data)
    }
}

/// The regions of one protection domain.
#[derive(Debug)]
pub struct MrTable {
    regions: RwLock<HashMap<u32, Arc<MemoryRegion>>>,
    next: AtomicU32,
    secret: u32,
    max: usize,
}

impl MrTable {
    /// An empty table holding at most `max` regions.
    pub fn new(max: usize) -> MrTable {
        // The standard library's per-process random hash keys (from the OS) give the secret.
        use std::hash::{BuildHasher, Hasher};
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_usize(max);
        let r = h.finish();
        MrTable::with_secret(max, (r ^ (r >> 32)) as u32 | 1)
    }

    /// An empty table whose keys follow from `secret` (fuzzing and replays need keys that
    /// are the same in every run; everything else uses [`MrTable::new`]).
    pub fn with_secret(max: usize, secret: u32) -> MrTable {
        MrTable {
            regions: RwLock::new(HashMap::new()),
            next: AtomicU32::new(1),
            secret,
            max,
        }
    }

    /// Registers a zeroed region of `len` bytes at virtual address `iova`. `None` when the
    /// table is full.
    pub fn register(&self, iova: u64, len: usize, access: Access) -> Option<Arc<MemoryRegion>> {
        self.register_memory(iova, Arc::new(HostBuffer::new(vec![0u8; len])), access)
    }

    /// Registers `mem` (e.g. a VM's pages) as a region at virtual address `iova`. `None`
    /// when the table is full.
    pub fn register_memory(
        &self,
        iova: u64,
        mem: Arc<dyn RegionMemory>,
        access: Access,
    ) -> Option<Arc<MemoryRegion>> {
        let mut regions = self.regions.write();
        if regions.len() >= self.max {
            return None;
        }
        let key = loop {
            let n = self.next.fetch_add(1, Ordering::Relaxed);
            // The low byte is the "key" part an application may vary; the rest an index
            // scrambled with the table's secret, so keys are not guessable from each other.
            let k = (n.wrapping_mul(0x9e37_79b9) ^ self.secret) & !0xff | (n & 0xff);
            if k != 0 && !regions.contains_key(&k) {
                break k;
            }
        };
        let mr = Arc::new(MemoryRegion {
            key,
            iova,
            access,
            mem,
        });
        regions.insert(key, mr.clone());
        Some(mr)
    }

    /// Registers a region under a given key (tests replaying captures need the rkeys the
    /// capture names, and so does the fuzzer).
    pub(crate) fn register_with_key(
        &self,
        key: u32,
        iova: u64,
        data: Vec<u8>,
        access: Access,
    ) -> Arc<MemoryRegion> {
        let mr = Arc::new(MemoryRegion {
            key,
            iova,
            access,
            mem: Arc::new(HostBuffer::new(data)),
        });
        self.regions.write().insert(key, mr.clone());
        mr
    }

    /// Deregisters a region.
    pub fn deregister(&self, key: u32) -> bool {
        self.regions.write().remove(&key).is_some()
    }

    /// A region by key.
    pub fn get(&self, key: u32) -> Option<Arc<MemoryRegion>> {
        self.regions.read().get(&key).cloned()
    }

    /// The region a remote `op` on `[va, va + len)` with `rkey` may use, or why not.
    pub fn check_remote(
        &self,
        rkey: u32,
        va: u64,
        len: usize,
        op: RemoteOp,
    ) -> Result<Arc<MemoryRegion>, AccessError> {
        let mr = self.get(rkey).ok_or(AccessError::BadKey)?;
        let allowed = match op {
            RemoteOp::Write => mr.access.remote_write,
            RemoteOp::Read => mr.access.remote_read,
        };
        if !allowed {
            return Err(AccessError::NotPermitted);
        }
        mr.offset_of(va, len).ok_or(AccessError::OutOfBounds)?;
        Ok(mr)
    }

    /// The region a local write (READ response data) into `[va, va + len)` with `lkey` uses.
    pub fn check_local_write(
        &self,
        lkey: u32,
        va: u64,
        len: usize,
    ) -> Result<Arc<MemoryRegion>, AccessError> {
        let mr = self.get(lkey).ok_or(AccessError::BadKey)?;
        if !mr.access.local_write {
            return Err(AccessError::NotPermitted);
        }
        mr.offset_of(va, len).ok_or(AccessError::OutOfBounds)?;
        Ok(mr)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Memory in separate 16-byte pages, as a VM's region is in guest pages.
    #[derive(Debug)]
    struct Pages(Vec<HostBuffer>);

    impl RegionMemory for Pages {
        fn len(&self) -> usize {
            self.0.len() * 16
        }
        fn read(&self, off: usize, buf: &mut [u8]) -> bool {
            buf.iter_mut().enumerate().all(|(i, b)| {
                let o = off + i;
                let mut one = [0u8];
                let ok = self.0.get(o / 16).is_some_and(|p| p.read(o % 16, &mut one));
                *b = one[0];
                ok
            })
        }
        fn write(&self, off: usize, data: &[u8]) -> bool {
            data.iter().enumerate().all(|(i, b)| {
                let o = off + i;
                self.0.get(o / 16).is_some_and(|p| p.write(o % 16, &[*b]))
            })
        }
    }

    #[test]
    fn regions_over_outside_memory_are_checked_the_same_way() {
        let t = MrTable::new(2);
        let pages = Arc::new(Pages(
            (0..4).map(|_| HostBuffer::new(vec![0; 16])).collect(),
        ));
        let mr = t
            .register_memory(0x100, pages.clone(), Access::ALL)
            .unwrap();
        assert_eq!(mr.len(), 64);
        assert!(mr.write(0x10c, b"across pages"));
        assert_eq!(mr.read(0x10c, 12).unwrap(), b"across pages");
        let mut second = [0u8; 8];
        assert!(pages.0[1].read(0, &mut second));
        assert_eq!(&second, b"ss pages");
        assert!(t.check_remote(mr.key(), 0x13f, 2, RemoteOp::Write).is_err());
    }

    #[test]
    fn remote_access_is_checked_against_key_bounds_and_flags() {
        let t = MrTable::new(4);
        let rw = t.register(0x1000, 256, Access::ALL).unwrap();
        let ro = t
            .register(
                0x8000,
                64,
                Access {
                    remote_read: true,
                    ..Access::default()
                },
            )
            .unwrap();
        assert_ne!(rw.key(), ro.key());
        assert!(t
            .check_remote(rw.key(), 0x1000, 256, RemoteOp::Write)
            .is_ok());
        assert!(t.check_remote(rw.key(), 0x10ff, 1, RemoteOp::Read).is_ok());
        assert!(t.check_remote(rw.key(), 0x1000, 0, RemoteOp::Read).is_ok());
        let e = |k, va, len, op| t.check_remote(k, va, len, op).unwrap_err();
        assert_eq!(
            e(rw.key(), 0x10ff, 2, RemoteOp::Write),
            AccessError::OutOfBounds
        );
        assert_eq!(
            e(rw.key(), 0xfff, 1, RemoteOp::Write),
            AccessError::OutOfBounds
        );
        assert_eq!(
            e(rw.key(), u64::MAX, 2, RemoteOp::Read),
            AccessError::OutOfBounds
        );
        assert_eq!(
            e(rw.key(), 0x1000, usize::MAX, RemoteOp::Read),
            AccessError::OutOfBounds
        );
        assert_eq!(
            e(ro.key(), 0x8000, 8, RemoteOp::Write),
            AccessError::NotPermitted
        );
        assert_eq!(
            e(rw.key() ^ 0x100, 0x1000, 8, RemoteOp::Read),
            AccessError::BadKey
        );
        assert_eq!(
            t.check_local_write(ro.key(), 0x8000, 1).unwrap_err(),
            AccessError::NotPermitted
        );
        assert!(rw.write(0x1010, b"abc"));
        assert_eq!(rw.read(0x1010, 3).unwrap(), b"abc");
        assert!(!rw.write(0x10fe, b"abc"));
        assert!(t.deregister(rw.key()));
        assert_eq!(e(rw.key(), 0x1000, 8, RemoteOp::Read), AccessError::BadKey);
        t.register(0, 1, Access::ALL).unwrap();
        t.register(0, 1, Access::ALL).unwrap();
        t.register(0, 1, Access::ALL).unwrap();
        assert!(t.register(0, 1, Access::ALL).is_none(), "bounded");
    }
}

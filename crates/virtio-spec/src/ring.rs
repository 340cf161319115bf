//! Split virtqueues (virtio 1.1 §2.6): the descriptor table, the available (driver) ring and
//! the used (device) ring, their sizes and alignments, and [`ChainWalker`], a descriptor-chain
//! walker that treats every descriptor as hostile (bounded length, loops detected, indirect
//! tables checked) without touching memory itself.

/// This descriptor continues via its `next` field.
pub const DESC_F_NEXT: u16 = 1;
/// The buffer is device write-only (otherwise device read-only).
pub const DESC_F_WRITE: u16 = 2;
/// The buffer holds a table of descriptors (an indirect descriptor).
pub const DESC_F_INDIRECT: u16 = 4;
/// Available ring flag: the driver asks the device not to interrupt (without EVENT_IDX).
pub const AVAIL_F_NO_INTERRUPT: u16 = 1;
/// Used ring flag: the device asks the driver not to notify (without EVENT_IDX).
pub const USED_F_NO_NOTIFY: u16 = 1;

/// Largest split queue size (§2.6: at most 32768, a power of two).
pub const MAX_QUEUE_SIZE: u16 = 32768;
/// Size of a descriptor in bytes.
pub const DESC_SIZE: u64 = 16;
/// Size of a used-ring element in bytes.
pub const USED_ELEM_SIZE: u64 = 8;
/// Required alignment of the descriptor table.
pub const DESC_ALIGN: u64 = 16;
/// Required alignment of the available ring.
pub const AVAIL_ALIGN: u64 = 2;
/// Required alignment of the used ring.
pub const USED_ALIGN: u64 = 4;

/// One descriptor: a guest-physical buffer, its length, flags and the next index.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Descriptor {
    /// Guest-physical address of the buffer.
    pub addr: u64,
    /// Length of the buffer in bytes.
    pub len: u32,
    /// `DESC_F_*` flags.
    pub flags: u16,
    /// Next descriptor of the chain when `flags` has [`DESC_F_NEXT`].
    pub next: u16,
}

impl Descriptor {
    /// A descriptor from its four fields.
    pub const fn new(addr: u64, len: u32, flags: u16, next: u16) -> Self {
        Descriptor {
            addr,
            len,
            flags,
            next,
        }
    }
    /// Parses the 16 bytes of a descriptor.
    pub fn from_bytes(b: &[u8; 16]) -> Self {
        Descriptor {
            addr: u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]),
            len: u32::from_le_bytes([b[8], b[9], b[10], b[11]]),
            flags: u16::from_le_bytes([b[12], b[13]]),
            next: u16::from_le_bytes([b[14], b[15]]),
        }
    }
    /// The descriptor as 16 bytes.
    pub fn to_bytes(&self) -> [u8; 16] {
        let mut b = [0u8; 16];
        b[0..8].copy_from_slice(&self.addr.to_le_bytes());
        b[8..12].copy_from_slice(&self.len.to_le_bytes());
        b[12..14].copy_from_slice(&self.flags.to_le_bytes());
        b[14..16].copy_from_slice(&self.next.to_le_bytes());
        b
    }
    /// The chain continues.
    pub const fn has_next(&self) -> bool {
        self.flags & DESC_F_NEXT != 0
    }
    /// The device writes this buffer.
    pub const fn is_write(&self) -> bool {
        self.flags & DESC_F_WRITE != 0
    }
    /// The buffer is a table of descriptors.
    pub const fn is_indirect(&self) -> bool {
        self.flags & DESC_F_INDIRECT != 0
    }
}

/// One used-ring element: the head of a finished chain and the bytes the device wrote.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UsedElem {
    /// Index of the chain's head descriptor (u32 on the wire).
    pub id: u32,
    /// Bytes written into the chain's device-writable buffers.
    pub len: u32,
}

impl UsedElem {
    /// Parses 8 bytes.
    pub fn from_bytes(b: &[u8; 8]) -> Self {
        UsedElem {
            id: u32::from_le_bytes([b[0], b[1], b[2], b[3]]),
            len: u32::from_le_bytes([b[4], b[5], b[6], b[7]]),
        }
    }
    /// The element as 8 bytes.
    pub fn to_bytes(&self) -> [u8; 8] {
        let mut b = [0u8; 8];
        b[0..4].copy_from_slice(&self.id.to_le_bytes());
        b[4..8].copy_from_slice(&self.len.to_le_bytes());
        b
    }
}

/// Offsets inside the available ring: `flags` (u16), `idx` (u16), `ring[size]` (u16 each),
/// then `used_event` (u16).
pub mod avail {
    /// `flags`.
    pub const FLAGS: u64 = 0;
    /// `idx`: where the driver will put the next entry (free-running, wraps at 2^16).
    pub const IDX: u64 = 2;
    /// `ring[0]`.
    pub const RING: u64 = 4;
    /// Offset of `ring[slot]`.
    pub const fn entry(slot: u16) -> u64 {
        RING + 2 * slot as u64
    }
    /// Offset of `used_event` in a ring of `size` entries.
    pub const fn used_event(size: u16) -> u64 {
        RING + 2 * size as u64
    }
    /// Bytes of a ring of `size` entries including `used_event`.
    pub const fn bytes(size: u16) -> u64 {
        6 + 2 * size as u64
    }
}

/// Offsets inside the used ring: `flags` (u16), `idx` (u16), `ring[size]` ([`super::UsedElem`],
/// 8 bytes each), then `avail_event` (u16).
pub mod used {
    /// `flags`.
    pub const FLAGS: u64 = 0;
    /// `idx`: where the device will put the next element (free-running).
    pub const IDX: u64 = 2;
    /// `ring[0]`.
    pub const RING: u64 = 4;
    /// Offset of `ring[slot]`.
    pub const fn entry(slot: u16) -> u64 {
        RING + super::USED_ELEM_SIZE * slot as u64
    }
    /// Offset of `avail_event` in a ring of `size` elements.
    pub const fn avail_event(size: u16) -> u64 {
        RING + super::USED_ELEM_SIZE * size as u64
    }
    /// Bytes of a ring of `size` elements including `avail_event`.
    pub const fn bytes(size: u16) -> u64 {
        6 + super::USED_ELEM_SIZE * size as u64
    }
}

/// True for a valid split queue size: a power of two from 1 to [`MAX_QUEUE_SIZE`].
pub const fn valid_queue_size(size: u16) -> bool {
    size != 0 && size <= MAX_QUEUE_SIZE && size.is_power_of_two()
}

/// The event-index rule (§2.6.7.2): notify/interrupt when `event` lies in `[old, new)`,
/// all indices free-running modulo 2^16.
pub const fn need_event(event: u16, new: u16, old: u16) -> bool {
    new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
}

/// Why a split ring's configuration is unusable.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LayoutError {
    /// The size is 0, above 32768 or not a power of two.
    BadSize(u16),
    /// A part is not aligned as §2.6 requires (which part, its address).
    Misaligned(&'static str, u64),
    /// A part runs past the end of the 64-bit address space.
    Overflow(&'static str),
}

impl core::fmt::Display for LayoutError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            LayoutError::BadSize(s) => {
                write!(f, "queue size {s} is not a power of two in 1..=32768")
            }
            LayoutError::Misaligned(part, a) => write!(f, "{part} at {a:#x} is misaligned"),
            LayoutError::Overflow(part) => write!(f, "{part} wraps around the address space"),
        }
    }
}

/// Where a split virtqueue lives in guest-physical memory, checked for size and alignment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SplitRing {
    /// Number of entries (a power of two).
    pub size: u16,
    /// Descriptor table address (`queue_desc`).
    pub desc: u64,
    /// Available ring address (`queue_driver`).
    pub avail: u64,
    /// Used ring address (`queue_device`).
    pub used: u64,
}

impl SplitRing {
    /// Checks a queue's configuration: size, alignments, no part wrapping the address space.
    pub fn new(size: u16, desc: u64, avail: u64, used: u64) -> Result<Self, LayoutError> {
        if !valid_queue_size(size) {
            return Err(LayoutError::BadSize(size));
        }
        let ring = SplitRing {
            size,
            desc,
            avail,
            used,
        };
        for (part, addr, align, len) in [
            ("descriptor table", desc, DESC_ALIGN, ring.desc_bytes()),
            ("available ring", avail, AVAIL_ALIGN, avail::bytes(size)),
            ("used ring", used, USED_ALIGN, used::bytes(size)),
        ] {
            if !addr.is_multiple_of(align) {
                return Err(LayoutError::Misaligned(part, addr));
            }
            if addr.checked_add(len).is_none() {
                return Err(LayoutError::Overflow(part));
            }
        }
        Ok(ring)
    }
    /// Bytes of the descriptor table.
    pub const fn desc_bytes(&self) -> u64 {
        DESC_SIZE * self.size as u64
    }
    /// Address of descriptor `index` (callers check `index < size`).
    pub const fn desc_addr(&self, index: u16) -> u64 {
        self.desc + DESC_SIZE * index as u64
    }
    /// Address of the available ring entry for free-running index `idx`.
    pub const fn avail_entry_addr(&self, idx: u16) -> u64 {
        self.avail + avail::entry(idx & (self.size - 1))
    }
    /// Address of the used ring element for free-running index `idx`.
    pub const fn used_entry_addr(&self, idx: u16) -> u64 {
        self.used + used::entry(idx & (self.size - 1))
    }
}

/// Where the next descriptor of a chain is to be read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DescLocation {
    /// Entry `index` of the queue's descriptor table.
    Table(u16),
    /// The 16 bytes at this guest-physical address (an entry of an indirect table).
    Indirect(u64),
}

/// One buffer of a validated chain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    /// Guest-physical address.
    pub addr: u64,
    /// Length in bytes (never 0 is not guaranteed: zero-length buffers are legal).
    pub len: u32,
    /// The device writes it.
    pub write: bool,
}

/// Why a descriptor chain was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChainError {
    /// A head or `next` index at or above the queue size.
    IndexOutOfRange(u16),
    /// More descriptors than the table holds: a loop (or a chain over the limit).
    TooLong(u32),
    /// A readable buffer after a writable one (§2.6.4.2 requires readable ones first).
    ReadAfterWrite,
    /// An indirect descriptor inside an indirect table, with NEXT set, or not negotiated.
    BadIndirect,
    /// An indirect table whose length is 0, not a multiple of 16 or over the limit.
    BadIndirectLength(u32),
    /// The chain's buffers add up to more than the walker's byte limit.
    TooManyBytes,
    /// A buffer that wraps around the address space.
    AddressOverflow(u64),
}

impl core::fmt::Display for ChainError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            ChainError::IndexOutOfRange(i) => write!(f, "descriptor index {i} out of range"),
            ChainError::TooLong(n) => write!(f, "chain longer than {n} descriptors (loop?)"),
            ChainError::ReadAfterWrite => write!(f, "device-readable buffer after a writable one"),
            ChainError::BadIndirect => write!(f, "misplaced indirect descriptor"),
            ChainError::BadIndirectLength(l) => write!(f, "indirect table of {l} bytes"),
            ChainError::TooManyBytes => write!(f, "chain buffers exceed the byte limit"),
            ChainError::AddressOverflow(a) => write!(f, "buffer at {a:#x} wraps around"),
        }
    }
}

/// Walks one descriptor chain without touching memory: ask [`ChainWalker::location`] where the
/// next descriptor is, read its 16 bytes, hand them to [`ChainWalker::accept`], repeat until
/// `location` says `None`. Every rule a hostile driver could break is checked: indices in
/// range, at most `size` descriptors in the table and `max_indirect` in an indirect table (so a
/// loop ends), readable before writable buffers, one level of indirection, no byte count
/// overflow.
#[derive(Clone, Copy, Debug)]
pub struct ChainWalker {
    size: u16,
    indirect_ok: bool,
    max_indirect: u32,
    max_bytes: u64,
    next: Option<DescLocation>,
    /// Indirect table: (address, entries).
    table: Option<(u64, u32)>,
    /// `seen` when the indirect descriptor was accepted.
    table_start: u32,
    seen: u32,
    bytes: u64,
    saw_write: bool,
}

impl ChainWalker {
    /// Starts at head `head` of a queue of `size` entries. `indirect_ok` says whether
    /// RING_INDIRECT_DESC was negotiated; `max_indirect` bounds an indirect table's entries;
    /// `max_bytes` bounds the chain's total length.
    pub fn new(
        size: u16,
        head: u16,
        indirect_ok: bool,
        max_indirect: u32,
        max_bytes: u64,
    ) -> Result<Self, ChainError> {
        if head >= size {
            return Err(ChainError::IndexOutOfRange(head));
        }
        Ok(ChainWalker {
            size,
            indirect_ok,
            max_indirect,
            max_bytes,
            next: Some(DescLocation::Table(head)),
            table: None,
            table_start: 0,
            seen: 0,
            bytes: 0,
            saw_write: false,
        })
    }
    /// Where the next descriptor is, or `None` when the chain is complete.
    pub const fn location(&self) -> Option<DescLocation> {
        self.next
    }
    /// Descriptors accepted so far (the indirect descriptor itself included).
    pub const fn count(&self) -> u32 {
        self.seen
    }
    /// Bytes in the buffers accepted so far.
    pub const fn bytes(&self) -> u64 {
        self.bytes
    }
    /// Takes the descriptor read at [`ChainWalker::location`]. Returns the buffer it names, or
    /// `None` for an indirect descriptor (its table is walked next).
    pub fn accept(&mut self, d: Descriptor) -> Result<Option<Segment>, ChainError> {
        let Some(here) = self.next else {
            return Err(ChainError::TooLong(self.seen));
        };
        self.seen += 1;
        if d.is_indirect() {
            if !self.indirect_ok || self.table.is_some() || d.has_next() {
                return Err(ChainError::BadIndirect);
            }
            if d.len == 0
                || !d.len.is_multiple_of(DESC_SIZE as u32)
                || d.len / 16 > self.max_indirect
            {
                return Err(ChainError::BadIndirectLength(d.len));
            }
            if d.addr.checked_add(u64::from(d.len)).is_none() || !d.addr.is_multiple_of(DESC_ALIGN)
            {
                return Err(ChainError::AddressOverflow(d.addr));
            }
            self.table = Some((d.addr, d.len / 16));
            self.table_start = self.seen;
            self.next = Some(DescLocation::Indirect(d.addr));
            return Ok(None);
        }
        if d.addr.checked_add(u64::from(d.len)).is_none() {
            return Err(ChainError::AddressOverflow(d.addr));
        }
        if d.is_write() {
            self.saw_write = true;
        } else if self.saw_write {
            return Err(ChainError::ReadAfterWrite);
        }
        self.bytes += u64::from(d.len);
        if self.bytes > self.max_bytes {
            return Err(ChainError::TooManyBytes);
        }
        self.next = if !d.has_next() {
            None
        } else {
            match (here, self.table) {
                (DescLocation::Table(_), None) => {
                    if d.next >= self.size {
                        return Err(ChainError::IndexOutOfRange(d.next));
                    }
                    if self.seen >= u32::from(self.size) {
                        return Err(ChainError::TooLong(u32::from(self.size)));
                    }
                    Some(DescLocation::Table(d.next))
                }
                (_, Some((base, n))) => {
                    if u32::from(d.next) >= n {
                        return Err(ChainError::IndexOutOfRange(d.next));
                    }
                    if self.seen - self.table_start >= n {
                        return Err(ChainError::TooLong(n));
                    }
                    Some(DescLocation::Indirect(base + DESC_SIZE * u64::from(d.next)))
                }
                (DescLocation::Indirect(_), None) => return Err(ChainError::BadIndirect),
            }
        };
        Ok(Some(Segment {
            addr: d.addr,
            len: d.len,
            write: d.is_write(),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(addr: u64, len: u32, flags: u16, next: u16) -> Descriptor {
        Descriptor::new(addr, len, flags, next)
    }

    /// Walks a chain over an in-memory table and indirect tables; returns the segments.
    fn walk(
        table: &[Descriptor],
        indirect: &[(u64, &[Descriptor])],
        head: u16,
    ) -> Result<([Option<Segment>; 8], usize), ChainError> {
        let mut w = ChainWalker::new(table.len() as u16, head, true, 16, 1 << 20)?;
        let mut out = [None; 8];
        let mut n = 0;
        while let Some(loc) = w.location() {
            let desc = match loc {
                DescLocation::Table(i) => table[usize::from(i)],
                DescLocation::Indirect(a) => {
                    let (base, t) = indirect
                        .iter()
                        .find(|(b, t)| a >= *b && a < b + 16 * t.len() as u64)
                        .expect("test reads inside its tables");
                    t[((a - base) / 16) as usize]
                }
            };
            if let Some(s) = w.accept(desc)? {
                out[n % 8] = Some(s);
                n += 1;
            }
        }
        Ok((out, n))
    }

    #[test]
    fn layout_sizes_and_offsets_match_the_spec() {
        let desc = d(
            0x1122_3344_5566_7788,
            0x99aa_bbcc,
            DESC_F_NEXT | DESC_F_WRITE,
            7,
        );
        let b = desc.to_bytes();
        assert_eq!(&b[0..8], &0x1122_3344_5566_7788u64.to_le_bytes());
        assert_eq!(&b[8..12], &0x99aa_bbccu32.to_le_bytes());
        assert_eq!(&b[12..14], &3u16.to_le_bytes());
        assert_eq!(&b[14..16], &7u16.to_le_bytes());
        assert_eq!(Descriptor::from_bytes(&b), desc);
        let u = UsedElem { id: 5, len: 1514 };
        assert_eq!(UsedElem::from_bytes(&u.to_bytes()), u);
        assert_eq!(avail::bytes(256), 6 + 512);
        assert_eq!(avail::used_event(256), 4 + 512);
        assert_eq!(used::bytes(256), 6 + 2048);
        assert_eq!(used::avail_event(256), 4 + 2048);
        assert_eq!(used::entry(3), 4 + 24);
        assert_eq!([DESC_F_NEXT, DESC_F_WRITE, DESC_F_INDIRECT], [1, 2, 4]);
    }

    #[test]
    fn ring_layout_is_checked() {
        let r = SplitRing::new(256, 0x1000, 0x2000, 0x3000).expect("valid");
        assert_eq!(r.desc_bytes(), 4096);
        assert_eq!(r.desc_addr(2), 0x1020);
        assert_eq!(r.avail_entry_addr(258), 0x2000 + 4 + 4);
        assert_eq!(r.used_entry_addr(257), 0x3000 + 4 + 8);
        assert_eq!(SplitRing::new(0, 0, 0, 0), Err(LayoutError::BadSize(0)));
        assert_eq!(SplitRing::new(100, 0, 0, 0), Err(LayoutError::BadSize(100)));
        assert!(SplitRing::new(32768, 0, 0, 0).is_ok());
        assert!(matches!(
            SplitRing::new(8, 0x1008, 0x2000, 0x3000),
            Err(LayoutError::Misaligned("descriptor table", 0x1008))
        ));
        assert!(matches!(
            SplitRing::new(8, 0x1000, 0x2001, 0x3000),
            Err(LayoutError::Misaligned(..))
        ));
        assert!(matches!(
            SplitRing::new(8, 0x1000, 0x2000, 0x3002),
            Err(LayoutError::Misaligned(..))
        ));
        assert!(matches!(
            SplitRing::new(8, u64::MAX - 15, 0x2000, 0x3000),
            Err(LayoutError::Overflow(..))
        ));
    }

    #[test]
    fn need_event_follows_the_wrapping_rule() {
        assert!(need_event(0, 1, 0));
        assert!(!need_event(1, 1, 0));
        assert!(need_event(5, 10, 3));
        assert!(!need_event(10, 10, 3));
        assert!(need_event(0xffff, 2, 0xfffe));
    }

    #[test]
    fn a_plain_chain_yields_its_buffers_in_order() {
        let t = [
            d(0x1000, 12, DESC_F_NEXT, 2),
            d(0, 0, 0, 0),
            d(0x2000, 100, DESC_F_NEXT | DESC_F_WRITE, 3),
            d(0x3000, 200, DESC_F_WRITE, 0),
        ];
        let (segs, n) = walk(&t, &[], 0).expect("valid chain");
        assert_eq!(n, 3);
        assert_eq!(
            segs[0],
            Some(Segment {
                addr: 0x1000,
                len: 12,
                write: false
            })
        );
        assert_eq!(
            segs[2],
            Some(Segment {
                addr: 0x3000,
                len: 200,
                write: true
            })
        );
    }

    #[test]
    fn loops_and_bad_indices_end_in_errors() {
        let looped = [d(0x1000, 1, DESC_F_NEXT, 1), d(0x2000, 1, DESC_F_NEXT, 0)];
        assert!(matches!(walk(&looped, &[], 0), Err(ChainError::TooLong(2))));
        let selfloop = [d(0x1000, 1, DESC_F_NEXT, 0), d(0, 0, 0, 0)];
        assert!(matches!(
            walk(&selfloop, &[], 0),
            Err(ChainError::TooLong(_))
        ));
        let out = [d(0x1000, 1, DESC_F_NEXT, 9), d(0, 0, 0, 0)];
        assert_eq!(
            walk(&out, &[], 0).err(),
            Some(ChainError::IndexOutOfRange(9))
        );
        assert_eq!(
            walk(&out, &[], 5).err(),
            Some(ChainError::IndexOutOfRange(5))
        );
        let rw = [
            d(0x1000, 1, DESC_F_NEXT | DESC_F_WRITE, 1),
            d(0x2000, 1, 0, 0),
        ];
        assert_eq!(walk(&rw, &[], 0).err(), Some(ChainError::ReadAfterWrite));
        let wrap = [d(u64::MAX - 3, 8, 0, 0)];
        assert!(matches!(
            walk(&wrap, &[], 0),
            Err(ChainError::AddressOverflow(_))
        ));
        let big = [
            d(0x1000, u32::MAX, DESC_F_NEXT, 1),
            d(0x2000, u32::MAX, 0, 0),
        ];
        assert_eq!(walk(&big, &[], 0).err(), Some(ChainError::TooManyBytes));
    }

    #[test]
    fn indirect_tables_are_walked_and_checked() {
        let inner = [
            d(0x5000, 12, DESC_F_NEXT, 1),
            d(0x6000, 1500, DESC_F_WRITE, 0),
        ];
        let t = [d(0x9000, 32, DESC_F_INDIRECT, 0), d(0, 0, 0, 0)];
        let (segs, n) = walk(&t, &[(0x9000, &inner)], 0).expect("valid indirect");
        assert_eq!(n, 2);
        assert_eq!(
            segs[1],
            Some(Segment {
                addr: 0x6000,
                len: 1500,
                write: true
            })
        );

        let inner_loop = [d(0x5000, 1, DESC_F_NEXT, 1), d(0x6000, 1, DESC_F_NEXT, 0)];
        assert!(matches!(
            walk(&t, &[(0x9000, &inner_loop)], 0),
            Err(ChainError::TooLong(2))
        ));
        let nested = [d(0x9000, 32, DESC_F_INDIRECT, 0), d(0, 0, 0, 0)];
        assert_eq!(
            walk(&t, &[(0x9000, &nested)], 0).err(),
            Some(ChainError::BadIndirect)
        );
        let with_next = [
            d(0x9000, 32, DESC_F_INDIRECT | DESC_F_NEXT, 1),
            d(0, 0, 0, 0),
        ];
        assert_eq!(
            walk(&with_next, &[], 0).err(),
            Some(ChainError::BadIndirect)
        );
        let odd = [d(0x9000, 20, DESC_F_INDIRECT, 0)];
        assert_eq!(
            walk(&odd, &[], 0).err(),
            Some(ChainError::BadIndirectLength(20))
        );
        let huge = [d(0x9000, 16 * 17, DESC_F_INDIRECT, 0)];
        assert!(matches!(
            walk(&huge, &[], 0),
            Err(ChainError::BadIndirectLength(_))
        ));
        let out = [d(0x5000, 1, DESC_F_NEXT, 5), d(0, 0, 0, 0)];
        assert_eq!(
            walk(&t, &[(0x9000, &out)], 0).err(),
            Some(ChainError::IndexOutOfRange(5))
        );
        let mut w = ChainWalker::new(4, 0, false, 16, 1 << 20).expect("head in range");
        assert_eq!(w.accept(t[0]).err(), Some(ChainError::BadIndirect));
    }
}

//! Submission (64 B) and completion (16 B) queue entries.
use crate::Status;

/// A submission queue entry: sixteen little-endian dwords.
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Sqe {
    /// The raw dwords.
    pub dw: [u32; 16],
}

const _: () = assert!(core::mem::size_of::<Sqe>() == 64);
const _: () = assert!(core::mem::size_of::<Cqe>() == 16);

impl Sqe {
    /// An entry with `opcode` and command id `cid`, everything else zero.
    pub const fn new(opcode: u8, cid: u16) -> Self {
        let mut dw = [0; 16];
        dw[0] = opcode as u32 | (cid as u32) << 16;
        Sqe { dw }
    }
    /// Parses 64 bytes.
    pub fn from_bytes(b: &[u8; 64]) -> Self {
        let mut dw = [0u32; 16];
        for (i, d) in dw.iter_mut().enumerate() {
            *d = u32::from_le_bytes([b[i * 4], b[i * 4 + 1], b[i * 4 + 2], b[i * 4 + 3]]);
        }
        Sqe { dw }
    }
    /// The entry as bytes.
    pub fn to_bytes(&self) -> [u8; 64] {
        let mut b = [0u8; 64];
        for (i, d) in self.dw.iter().enumerate() {
            b[i * 4..i * 4 + 4].copy_from_slice(&d.to_le_bytes());
        }
        b
    }
    /// Opcode (CDW0 bits 7:0).
    pub const fn opcode(&self) -> u8 {
        self.dw[0] as u8
    }
    /// Fused operation (CDW0 bits 9:8).
    pub const fn fuse(&self) -> u8 {
        ((self.dw[0] >> 8) & 3) as u8
    }
    /// PRP or SGL selection (CDW0 bits 15:14); 0 means PRPs.
    pub const fn psdt(&self) -> u8 {
        ((self.dw[0] >> 14) & 3) as u8
    }
    /// Command identifier.
    pub const fn cid(&self) -> u16 {
        (self.dw[0] >> 16) as u16
    }
    /// Namespace identifier.
    pub const fn nsid(&self) -> u32 {
        self.dw[1]
    }
    /// PRP entry 1.
    pub const fn prp1(&self) -> u64 {
        self.dw[6] as u64 | (self.dw[7] as u64) << 32
    }
    /// PRP entry 2.
    pub const fn prp2(&self) -> u64 {
        self.dw[8] as u64 | (self.dw[9] as u64) << 32
    }
    /// Command dword `n` (10..=15).
    pub const fn cdw(&self, n: usize) -> u32 {
        self.dw[n]
    }
    /// Starting LBA of a Read/Write (CDW10-11).
    pub const fn slba(&self) -> u64 {
        self.dw[10] as u64 | (self.dw[11] as u64) << 32
    }
    /// Number of logical blocks of a Read/Write (CDW12 bits 15:0, 0-based) as a count.
    pub const fn nlb(&self) -> u32 {
        (self.dw[12] & 0xffff) + 1
    }
    /// Sets the namespace.
    pub fn set_nsid(&mut self, nsid: u32) -> &mut Self {
        self.dw[1] = nsid;
        self
    }
    /// Sets PRP1 and PRP2.
    pub fn set_prps(&mut self, prp1: u64, prp2: u64) -> &mut Self {
        self.dw[6] = prp1 as u32;
        self.dw[7] = (prp1 >> 32) as u32;
        self.dw[8] = prp2 as u32;
        self.dw[9] = (prp2 >> 32) as u32;
        self
    }
    /// Sets command dword `n`.
    pub fn set_cdw(&mut self, n: usize, v: u32) -> &mut Self {
        self.dw[n] = v;
        self
    }
    /// Sets the LBA range of a Read/Write (`blocks` ≥ 1).
    pub fn set_lba_range(&mut self, slba: u64, blocks: u32) -> &mut Self {
        self.dw[10] = slba as u32;
        self.dw[11] = (slba >> 32) as u32;
        self.dw[12] = (self.dw[12] & !0xffff) | (blocks.saturating_sub(1) & 0xffff);
        self
    }
    /// Sets the command id.
    pub fn set_cid(&mut self, cid: u16) -> &mut Self {
        self.dw[0] = (self.dw[0] & 0xffff) | (cid as u32) << 16;
        self
    }
}

/// A completion queue entry.
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Cqe {
    /// The raw dwords.
    pub dw: [u32; 4],
}

impl Cqe {
    /// Builds an entry.
    pub const fn new(
        result: u32,
        sq_head: u16,
        sq_id: u16,
        cid: u16,
        status: Status,
        phase: bool,
    ) -> Self {
        Cqe {
            dw: [
                result,
                0,
                sq_head as u32 | (sq_id as u32) << 16,
                cid as u32 | (phase as u32) << 16 | (status.0 as u32) << 17,
            ],
        }
    }
    /// Parses 16 bytes.
    pub fn from_bytes(b: &[u8; 16]) -> Self {
        let mut dw = [0u32; 4];
        for (i, d) in dw.iter_mut().enumerate() {
            *d = u32::from_le_bytes([b[i * 4], b[i * 4 + 1], b[i * 4 + 2], b[i * 4 + 3]]);
        }
        Cqe { dw }
    }
    /// The entry as bytes.
    pub fn to_bytes(&self) -> [u8; 16] {
        let mut b = [0u8; 16];
        for (i, d) in self.dw.iter().enumerate() {
            b[i * 4..i * 4 + 4].copy_from_slice(&d.to_le_bytes());
        }
        b
    }
    /// Command-specific result (DW0).
    pub const fn result(&self) -> u32 {
        self.dw[0]
    }
    /// SQ head pointer.
    pub const fn sq_head(&self) -> u16 {
        self.dw[2] as u16
    }
    /// SQ identifier.
    pub const fn sq_id(&self) -> u16 {
        (self.dw[2] >> 16) as u16
    }
    /// Command identifier.
    pub const fn cid(&self) -> u16 {
        self.dw[3] as u16
    }
    /// Phase tag.
    pub const fn phase(&self) -> bool {
        self.dw[3] & (1 << 16) != 0
    }
    /// Status field (without the phase bit).
    pub const fn status(&self) -> Status {
        Status((self.dw[3] >> 17) as u16)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sqe_fields_sit_where_the_spec_puts_them() {
        let mut s = Sqe::new(0x02, 0xbeef);
        s.set_nsid(1)
            .set_prps(0x1234_5678_9000, 0xabc_d000)
            .set_lba_range(0x1_0000_0002, 8);
        let b = s.to_bytes();
        assert_eq!(b[0], 0x02);
        assert_eq!(u16::from_le_bytes([b[2], b[3]]), 0xbeef);
        assert_eq!(u32::from_le_bytes(b[4..8].try_into().unwrap()), 1);
        assert_eq!(
            u64::from_le_bytes(b[24..32].try_into().unwrap()),
            0x1234_5678_9000
        );
        assert_eq!(
            u64::from_le_bytes(b[32..40].try_into().unwrap()),
            0xabc_d000
        );
        assert_eq!(
            u64::from_le_bytes(b[40..48].try_into().unwrap()),
            0x1_0000_0002
        );
        assert_eq!(u16::from_le_bytes([b[48], b[49]]), 7, "NLB is 0-based");
        let p = Sqe::from_bytes(&b);
        assert_eq!(p, s);
        assert_eq!((p.opcode(), p.cid(), p.nlb(), p.psdt()), (2, 0xbeef, 8, 0));
    }

    #[test]
    fn cqe_fields_sit_where_the_spec_puts_them() {
        let st = Status::new(1, 0x01);
        let c = Cqe::new(7, 3, 2, 0x55, st, true);
        let b = c.to_bytes();
        assert_eq!(u32::from_le_bytes(b[0..4].try_into().unwrap()), 7);
        assert_eq!(u16::from_le_bytes([b[8], b[9]]), 3);
        assert_eq!(u16::from_le_bytes([b[10], b[11]]), 2);
        assert_eq!(u16::from_le_bytes([b[12], b[13]]), 0x55);
        assert_eq!(st.0 & 0x7ff, 0x101);
        assert_eq!(u16::from_le_bytes([b[14], b[15]]), 1 | (st.0 << 1));
        let p = Cqe::from_bytes(&b);
        assert!(p.phase());
        assert_eq!(p.status(), st);
        assert_eq!(
            (p.cid(), p.sq_head(), p.sq_id(), p.result()),
            (0x55, 3, 2, 7)
        );
    }
}

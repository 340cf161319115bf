//! Identify data structures: the fields Ferry uses, as byte offsets into the 4096-byte pages.

/// Size of every Identify data structure.
pub const SIZE: usize = 4096;

/// Identify Controller offsets.
pub mod ctrl {
    /// PCI vendor id (u16).
    pub const VID: usize = 0;
    /// Subsystem vendor id (u16).
    pub const SSVID: usize = 2;
    /// Serial number (20 ASCII bytes).
    pub const SN: usize = 4;
    /// Model number (40 ASCII bytes).
    pub const MN: usize = 24;
    /// Firmware revision (8 ASCII bytes).
    pub const FR: usize = 64;
    /// Maximum data transfer size (u8, power of two in units of the minimum page size).
    pub const MDTS: usize = 77;
    /// Controller id (u16).
    pub const CNTLID: usize = 78;
    /// Version (u32).
    pub const VER: usize = 80;
    /// Optional admin command support (u16).
    pub const OACS: usize = 256;
    /// Abort command limit (u8, 0-based).
    pub const ACL: usize = 258;
    /// Asynchronous event request limit (u8, 0-based).
    pub const AERL: usize = 259;
    /// Log page attributes (u8).
    pub const LPA: usize = 261;
    /// Error log page entries (u8, 0-based).
    pub const ELPE: usize = 262;
    /// SQ entry sizes (u8: max << 4 | required).
    pub const SQES: usize = 512;
    /// CQ entry sizes (u8).
    pub const CQES: usize = 513;
    /// Maximum outstanding commands (u16).
    pub const MAXCMD: usize = 514;
    /// Number of namespaces (u32).
    pub const NN: usize = 516;
    /// Optional NVM command support (u16).
    pub const ONCS: usize = 520;
    /// Volatile write cache (u8).
    pub const VWC: usize = 525;
    /// SGL support (u32); 0 means SGLs are not supported.
    pub const SGLS: usize = 536;
    /// NVM subsystem NQN (256 bytes).
    pub const SUBNQN: usize = 768;
}

/// Identify Namespace offsets.
pub mod ns {
    /// Namespace size in blocks (u64).
    pub const NSZE: usize = 0;
    /// Namespace capacity (u64).
    pub const NCAP: usize = 8;
    /// Namespace utilization (u64).
    pub const NUSE: usize = 16;
    /// Number of LBA formats, 0-based (u8).
    pub const NLBAF: usize = 25;
    /// Formatted LBA size (u8, low nibble = format index).
    pub const FLBAS: usize = 26;
    /// LBA format 0 (u32: metadata size 15:0, LBADS 23:16, relative performance 25:24).
    pub const LBAF0: usize = 128;
}

/// Little-endian u16 at `off` (0 if out of range).
pub fn get_u16(b: &[u8], off: usize) -> u16 {
    match b.get(off..off + 2) {
        Some(s) => u16::from_le_bytes([s[0], s[1]]),
        None => 0,
    }
}

/// Little-endian u32 at `off` (0 if out of range).
pub fn get_u32(b: &[u8], off: usize) -> u32 {
    match b.get(off..off + 4) {
        Some(s) => u32::from_le_bytes([s[0], s[1], s[2], s[3]]),
        None => 0,
    }
}

/// Little-endian u64 at `off` (0 if out of range).
pub fn get_u64(b: &[u8], off: usize) -> u64 {
    (get_u32(b, off) as u64) | (get_u32(b, off + 4) as u64) << 32
}

/// Writes `v` little-endian at `off` (ignored if out of range).
pub fn put(b: &mut [u8], off: usize, v: &[u8]) {
    if let Some(s) = b.get_mut(off..off + v.len()) {
        s.copy_from_slice(v);
    }
}

/// Block size in bytes of LBA format `index` of an Identify Namespace page.
pub fn lba_size(ns_page: &[u8], index: usize) -> u64 {
    let lbads = (get_u32(ns_page, ns::LBAF0 + 4 * index) >> 16) & 0xff;
    if (9..=16).contains(&lbads) {
        1 << lbads
    } else {
        0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn offsets_and_lba_size() {
        assert_eq!(ctrl::SQES, 512);
        assert_eq!(ctrl::NN, 516);
        assert_eq!(ctrl::SGLS, 536);
        let mut page = [0u8; SIZE];
        put(&mut page, ns::LBAF0, &(12u32 << 16).to_le_bytes());
        put(&mut page, ns::NSZE, &1000u64.to_le_bytes());
        assert_eq!(lba_size(&page, 0), 4096);
        assert_eq!(get_u64(&page, ns::NSZE), 1000);
        assert_eq!(get_u32(&page, 4095), 0, "out of range reads 0");
    }
}

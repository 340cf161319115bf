//! A type-0 configuration space for virtual devices: identity registers, the command register,
//! BARs placed by the VMM (with the usual size probing), and a capability list.

/// Identity of a function.
#[derive(Clone, Copy, Debug)]
pub struct PciHeader {
    /// Vendor ID.
    pub vendor_id: u16,
    /// Device ID.
    pub device_id: u16,
    /// Class code (base class << 16 | subclass << 8 | programming interface).
    pub class_code: u32,
    /// Revision ID.
    pub revision: u8,
    /// Subsystem vendor ID.
    pub subsystem_vendor_id: u16,
    /// Subsystem ID.
    pub subsystem_id: u16,
}

/// Kind of a memory BAR.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BarKind {
    /// 32-bit memory BAR.
    Mem32,
    /// 64-bit memory BAR (uses two BAR registers).
    Mem64,
}

#[derive(Clone, Copy, Debug)]
struct Bar {
    addr: u64,
    size: u64,
}

const NUM_REGS: usize = 64;
const BAR0: usize = 4;
const CAP_PTR: usize = 13;
const STATUS_CAP_LIST: u32 = 1 << 20;

/// A 256-byte configuration space.
#[derive(Clone, Debug)]
pub struct PciConfiguration {
    regs: [u32; NUM_REGS],
    writable: [u32; NUM_REGS],
    bars: [Option<Bar>; 6],
    /// BAR registers the guest wrote all ones to: reads return the size mask until rewritten.
    sizing: [bool; 6],
    last_cap: Option<usize>,
    next_cap: usize,
}

impl PciConfiguration {
    /// A configuration space with `header`'s identity and no BARs.
    pub fn new(header: PciHeader) -> Self {
        let mut regs = [0u32; NUM_REGS];
        let mut writable = [0u32; NUM_REGS];
        regs[0] = (header.device_id as u32) << 16 | header.vendor_id as u32;
        regs[2] = header.class_code << 8 | header.revision as u32;
        regs[11] = (header.subsystem_id as u32) << 16 | header.subsystem_vendor_id as u32;
        // command: IO space, memory space, bus master, parity, SERR, INTx disable
        writable[1] = 0x0000_0547;
        // cache line size, latency timer
        writable[3] = 0x0000_ffff;
        // interrupt line
        writable[15] = 0x0000_00ff;
        regs[15] = 0x0000_0100; // interrupt pin A
        PciConfiguration {
            regs,
            writable,
            bars: [None; 6],
            sizing: [false; 6],
            last_cap: None,
            next_cap: 0x40,
        }
    }

    /// Places BAR `index` at `addr` (aligned to its power-of-two `size`).
    pub fn add_bar(&mut self, index: usize, addr: u64, size: u64, kind: BarKind) {
        assert!(
            size.is_power_of_two() && size >= 16 && addr.is_multiple_of(size),
            "BAR layout is the VMM's own"
        );
        let slots = if kind == BarKind::Mem64 { 2 } else { 1 };
        assert!(index + slots <= 6, "BAR {index} does not fit");
        self.bars[index] = Some(Bar { addr, size });
        let type_bits = if kind == BarKind::Mem64 { 0b100 } else { 0 };
        self.regs[BAR0 + index] = (addr as u32 & !0xf) | type_bits;
        self.writable[BAR0 + index] = !(size as u32 - 1) & !0xf;
        if kind == BarKind::Mem64 {
            self.regs[BAR0 + index + 1] = (addr >> 32) as u32;
            self.writable[BAR0 + index + 1] = !((size - 1) >> 32) as u32;
        }
    }

    /// Address and size of BAR `index`.
    pub fn bar(&self, index: usize) -> Option<(u64, u64)> {
        self.bars
            .get(index)
            .copied()
            .flatten()
            .map(|b| (b.addr, b.size))
    }

    /// Appends a capability with `id` and `body` (the bytes after id and next pointer); returns
    /// its offset.
    pub fn add_capability(&mut self, id: u8, body: &[u8]) -> usize {
        let offset = self.next_cap;
        let len = (2 + body.len()).next_multiple_of(4);
        assert!(
            offset + len <= NUM_REGS * 4,
            "capabilities overflow configuration space"
        );
        let mut bytes = vec![0u8; len];
        bytes[0] = id;
        bytes[2..2 + body.len()].copy_from_slice(body);
        for (i, chunk) in bytes.chunks(4).enumerate() {
            self.regs[offset / 4 + i] =
                u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
        }
        match self.last_cap {
            None => self.regs[CAP_PTR] = offset as u32,
            Some(prev) => self.regs[prev / 4] |= (offset as u32) << 8,
        }
        self.regs[1] |= STATUS_CAP_LIST;
        self.last_cap = Some(offset);
        self.next_cap = offset + len;
        offset
    }

    /// Makes bits of a dword guest-writable (capability control registers).
    pub fn set_writable(&mut self, reg: usize, mask: u32) {
        if let Some(w) = self.writable.get_mut(reg) {
            *w = mask;
        }
    }

    fn bar_index(reg: usize) -> Option<usize> {
        (BAR0..BAR0 + 6).contains(&reg).then(|| reg - BAR0)
    }

    /// Reads dword `reg`; registers outside the space read as zero.
    pub fn read(&self, reg: usize) -> u32 {
        let Some(&value) = self.regs.get(reg) else {
            return 0;
        };
        if let Some(i) = Self::bar_index(reg) {
            if self.sizing[i] {
                return self.writable[reg] | (value & 0xf);
            }
        }
        value
    }

    /// Writes `data` at byte `offset` of dword `reg`, honouring the writable mask.
    pub fn write(&mut self, reg: usize, offset: usize, data: &[u8]) {
        if reg >= NUM_REGS || offset + data.len() > 4 || data.is_empty() {
            return;
        }
        let mut value = 0u32;
        let mut mask = 0u32;
        for (i, b) in data.iter().enumerate() {
            value |= (*b as u32) << ((offset + i) * 8);
            mask |= 0xff << ((offset + i) * 8);
        }
        if let Some(i) = Self::bar_index(reg) {
            // BARs stay where the VMM put them; writing all ones probes the size.
            let w = self.writable[reg];
            if w != 0 && mask == 0xffff_ffff {
                self.sizing[i] = value & w == w;
                if !self.sizing[i] && value & w != self.regs[reg] & w {
                    tracing::warn!(
                        bar = i,
                        value = format_args!("{value:#x}"),
                        "guest tried to move a BAR; kept where the VMM placed it"
                    );
                }
            }
            return;
        }
        let w = self.writable[reg] & mask;
        self.regs[reg] = (self.regs[reg] & !w) | (value & w);
    }

    /// The command register.
    pub fn command(&self) -> u16 {
        self.regs[1] as u16
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> PciConfiguration {
        PciConfiguration::new(PciHeader {
            vendor_id: 0x1234,
            device_id: 0x5678,
            class_code: 0x01_08_02,
            revision: 2,
            subsystem_vendor_id: 0,
            subsystem_id: 0,
        })
    }

    #[test]
    fn identity_and_command() {
        let mut c = cfg();
        assert_eq!(c.read(0), 0x5678_1234);
        assert_eq!(c.read(2), 0x0108_0202);
        c.write(1, 0, &[0x06, 0x00]);
        assert_eq!(c.command(), 0x6);
        c.write(0, 0, &[0, 0, 0, 0]);
        assert_eq!(c.read(0), 0x5678_1234, "read-only");
    }

    #[test]
    fn bar_sizing_and_fixed_placement() {
        let mut c = cfg();
        c.add_bar(0, 0xe000_0000, 0x4000, BarKind::Mem64);
        assert_eq!(c.read(4), 0xe000_0004);
        assert_eq!(c.read(5), 0);
        c.write(4, 0, &[0xff; 4]);
        assert_eq!(c.read(4), 0xffff_c004);
        c.write(5, 0, &[0xff; 4]);
        assert_eq!(c.read(5), 0xffff_ffff);
        c.write(4, 0, &0xe000_0000u32.to_le_bytes());
        c.write(5, 0, &[0; 4]);
        assert_eq!(c.read(4), 0xe000_0004);
        assert_eq!(c.read(5), 0);
        c.write(4, 0, &0xd000_0000u32.to_le_bytes());
        assert_eq!(c.read(4), 0xe000_0004, "BARs are not relocatable");
        assert_eq!(c.bar(0), Some((0xe000_0000, 0x4000)));
    }

    #[test]
    fn capability_chain() {
        let mut c = cfg();
        let a = c.add_capability(0x11, &[1, 2, 3, 4, 5, 6, 7, 8, 9, 10]);
        let b = c.add_capability(0x05, &[0; 6]);
        assert_eq!(c.read(13), a as u32);
        assert_eq!(c.read(a / 4) & 0xff, 0x11);
        assert_eq!((c.read(a / 4) >> 8) & 0xff, b as u32);
        assert_eq!((c.read(b / 4) >> 8) & 0xff, 0);
        assert_ne!(c.read(1) & STATUS_CAP_LIST, 0);
    }
}

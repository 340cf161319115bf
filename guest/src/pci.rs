//! PCI enumeration through configuration mechanism #1.
use crate::io::{inl, outl};
use guest_abi::ports::{PCI_CONFIG_ADDRESS, PCI_CONFIG_DATA};

/// Reads a configuration dword.
pub fn config_read(bus: u8, dev: u8, func: u8, reg: u8) -> u32 {
    outl(PCI_CONFIG_ADDRESS, address(bus, dev, func, reg));
    inl(PCI_CONFIG_DATA)
}

/// The configuration-mechanism-#1 address of a dword.
fn address(bus: u8, dev: u8, func: u8, reg: u8) -> u32 {
    0x8000_0000u32
        | (bus as u32) << 16
        | ((dev as u32) & 0x1f) << 11
        | ((func as u32) & 7) << 8
        | (reg as u32 & 0xfc)
}

/// A function found on the bus.
#[derive(Clone, Copy)]
pub struct Function {
    pub dev: u8,
    pub func: u8,
    pub vendor: u16,
    pub device: u16,
    pub class: u32,
}

/// Calls `f` for every function present on bus 0. Returns how many were found.
pub fn enumerate(mut f: impl FnMut(Function)) -> usize {
    let mut n = 0;
    for dev in 0..32u8 {
        let id = config_read(0, dev, 0, 0);
        if id & 0xffff == 0xffff {
            continue;
        }
        let header_type = (config_read(0, dev, 0, 0x0c) >> 16) & 0xff;
        let functions = if header_type & 0x80 != 0 { 8 } else { 1 };
        for func in 0..functions {
            let id = config_read(0, dev, func, 0);
            if id & 0xffff == 0xffff {
                continue;
            }
            let class = config_read(0, dev, func, 0x08) >> 8;
            f(Function {
                dev,
                func,
                vendor: id as u16,
                device: (id >> 16) as u16,
                class,
            });
            n += 1;
        }
    }
    n
}

/// Writes a configuration dword.
pub fn config_write(bus: u8, dev: u8, func: u8, reg: u8, value: u32) {
    outl(PCI_CONFIG_ADDRESS, address(bus, dev, func, reg));
    outl(PCI_CONFIG_DATA, value);
}

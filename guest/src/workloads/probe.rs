//! `probe`: touch things that do not exist and report what real hardware would answer.
use crate::{io, pci, println};

/// A guest-physical address in the MMIO hole below the PCI window, backed by nothing.
const UNBACKED_MMIO: u64 = 0xD000_0000;
/// A port no device decodes.
const UNKNOWN_PORT: u16 = 0x2f0;

pub fn run() -> u32 {
    let v = io::mmio_read32(UNBACKED_MMIO);
    println!("probe: mmio read {:#x} -> {:#010x}", UNBACKED_MMIO, v);
    io::mmio_write32(UNBACKED_MMIO, 0xdead_beef);
    println!("probe: mmio write {:#x} survived", UNBACKED_MMIO);
    let b = io::inb(UNKNOWN_PORT);
    let l = io::inl(UNKNOWN_PORT);
    println!(
        "probe: port {:#x} -> {:#04x} / {:#010x}",
        UNKNOWN_PORT, b, l
    );
    io::outl(UNKNOWN_PORT, 0x1234_5678);
    println!("probe: port write {:#x} survived", UNKNOWN_PORT);
    let absent = pci::config_read(0, 31, 0, 0);
    println!("probe: pci 00:1f.0 id -> {:#010x}", absent);
    println!("probe: done");
    0
}

//! Port and MMIO access. The guest runs with IOPL 3, so `in`/`out` work from ring 3.
use core::arch::asm;

/// Writes a byte to a port.
pub fn outb(port: u16, v: u8) {
    // SAFETY: port IO has no memory effects on the guest; IOPL 3 allows it in ring 3.
    unsafe {
        asm!("out dx, al", in("dx") port, in("al") v, options(nomem, nostack, preserves_flags))
    }
}

/// Writes a 32-bit value to a port.
pub fn outl(port: u16, v: u32) {
    // SAFETY: as for `outb`.
    unsafe {
        asm!("out dx, eax", in("dx") port, in("eax") v, options(nomem, nostack, preserves_flags))
    }
}

/// Reads a byte from a port.
pub fn inb(port: u16) -> u8 {
    let v: u8;
    // SAFETY: as for `outb`.
    unsafe {
        asm!("in al, dx", out("al") v, in("dx") port, options(nomem, nostack, preserves_flags))
    }
    v
}

/// Reads a 32-bit value from a port.
pub fn inl(port: u16) -> u32 {
    let v: u32;
    // SAFETY: as for `outb`.
    unsafe {
        asm!("in eax, dx", out("eax") v, in("dx") port, options(nomem, nostack, preserves_flags))
    }
    v
}

/// Reads 32 bits at a guest-physical address (identity mapped).
pub fn mmio_read32(addr: u64) -> u32 {
    // SAFETY: the whole identity-mapped range is mapped by the VMM's page tables; an address
    // without memory behind it exits to the VMM, which answers like real hardware.
    unsafe { core::ptr::read_volatile(addr as *const u32) }
}

/// Writes 32 bits at a guest-physical address (identity mapped).
pub fn mmio_write32(addr: u64, v: u32) {
    // SAFETY: as for `mmio_read32`.
    unsafe { core::ptr::write_volatile(addr as *mut u32, v) }
}

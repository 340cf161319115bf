//! Guest-physical memory layout of a Ferry VM.
//!
//! ```text
//! 0x0000_0500  GDT (null, code, data, user code, user data, TSS)
//! 0x0000_0800  TSS with an all-ports I/O permission bitmap (to 0x2869)
//! 0x0000_9000  boot parameter block (one page)
//! 0x0001_0000  page tables: PML4, PDPT, then one page directory per GiB
//! 0x0010_0000  guest stack (grows down from 0x0020_0000)
//! 0x0020_0000  guest image (ELF segments), at most up to WORK_BASE
//! 0x0100_0000  work area: everything the workloads use, up to the end of low RAM
//! 0xC000_0000  MMIO hole up to 4 GiB (PCI BARs live at PCI_MMIO_BASE)
//! 0x1_0000_0000 RAM above 4 GiB when the VM has more than LOW_RAM_MAX
//! ```
//! The whole range `[0, IDENTITY_MAP_END)` is identity mapped with 2 MiB user pages, so the
//! guest can reach RAM, the MMIO hole and addresses backed by nothing (which exit to the VMM).

/// Global descriptor table.
pub const GDT_GPA: u64 = 0x500;
/// Task state segment (only needed so that the CPU state is valid on hardware KVM).
pub const TSS_GPA: u64 = 0x800;
/// Boot parameter block ([`crate::BootParams`]).
pub const PARAMS_GPA: u64 = 0x9000;
/// Top-level page table.
pub const PML4_GPA: u64 = 0x1_0000;
/// Page-directory-pointer table.
pub const PDPT_GPA: u64 = 0x1_1000;
/// First page directory; page directory `i` maps GiB `i`.
pub const PD_GPA: u64 = 0x1_2000;
/// Number of page directories, i.e. GiB of identity-mapped guest-physical space.
pub const IDENTITY_MAP_GIB: u64 = 64;
/// End of the identity-mapped guest-physical space.
pub const IDENTITY_MAP_END: u64 = IDENTITY_MAP_GIB << 30;
/// Lowest address of the guest stack.
pub const STACK_BOTTOM: u64 = 0x10_0000;
/// Initial stack pointer (the stack grows down).
pub const STACK_TOP: u64 = 0x20_0000;
/// Where the guest image is linked and loaded.
pub const IMAGE_BASE: u64 = 0x20_0000;
/// First byte after the area reserved for the guest image.
pub const WORK_BASE: u64 = 0x100_0000;
/// Largest amount of RAM placed below 4 GiB; the rest goes above 4 GiB.
pub const LOW_RAM_MAX: u64 = 0xC000_0000;
/// Start of the MMIO hole below 4 GiB.
pub const MMIO_HOLE_START: u64 = LOW_RAM_MAX;
/// Where the VMM places 32-bit PCI memory BARs.
pub const PCI_MMIO_BASE: u64 = 0xE000_0000;
/// End of the PCI memory window (the local APIC and IOAPIC sit above).
pub const PCI_MMIO_END: u64 = 0xFEC0_0000;
/// Start of RAM above the MMIO hole.
pub const HIGH_RAM_START: u64 = 0x1_0000_0000;
/// Smallest VM Ferry builds: room for the fixed layout plus a useful work area.
pub const MIN_RAM: u64 = 32 << 20;
/// Largest VM Ferry builds (bounded by the identity map).
pub const MAX_RAM: u64 = IDENTITY_MAP_END - (HIGH_RAM_START - LOW_RAM_MAX);

/// Splits a RAM size into the part below the MMIO hole and the part above 4 GiB.
pub const fn split_ram(ram_size: u64) -> (u64, u64) {
    if ram_size <= LOW_RAM_MAX {
        (ram_size, 0)
    } else {
        (LOW_RAM_MAX, ram_size - LOW_RAM_MAX)
    }
}

/// Segment selectors the guest runs with (ring 3).
pub mod selectors {
    /// 64-bit user code segment, RPL 3.
    pub const USER_CODE: u16 = 0x1b;
    /// User data segment, RPL 3.
    pub const USER_DATA: u16 = 0x23;
    /// Task state segment.
    pub const TSS: u16 = 0x28;
}

// The fixed areas must not overlap: checked when the crate compiles.
const _: () = {
    assert!(GDT_GPA + 0x300 <= TSS_GPA);
    assert!(TSS_GPA + 0x68 + 0x2001 <= PARAMS_GPA);
    assert!(PARAMS_GPA + 0x1000 <= PML4_GPA);
    assert!(PD_GPA + IDENTITY_MAP_GIB * 0x1000 <= STACK_BOTTOM);
    assert!(STACK_TOP <= IMAGE_BASE);
    assert!(IMAGE_BASE < WORK_BASE && WORK_BASE < MIN_RAM);
    assert!(PCI_MMIO_BASE >= MMIO_HOLE_START && PCI_MMIO_END <= HIGH_RAM_START);
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_ram_places_the_rest_above_4g() {
        assert_eq!(split_ram(256 << 20), (256 << 20, 0));
        assert_eq!(split_ram(LOW_RAM_MAX), (LOW_RAM_MAX, 0));
        assert_eq!(split_ram(4 << 30), (LOW_RAM_MAX, (4 << 30) - LOW_RAM_MAX));
        let (lo, hi) = split_ram(MAX_RAM);
        assert_eq!(HIGH_RAM_START + hi, IDENTITY_MAP_END);
        assert_eq!(lo, LOW_RAM_MAX);
    }
}

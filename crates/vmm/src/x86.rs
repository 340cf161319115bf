//! The x86-64 machine state Ferry boots the guest into: identity page tables with user pages,
//! a GDT with ring-3 segments and a TSS, and the register values platform.md verified for
//! running the guest in 64-bit ring 3 with IOPL 3.
use guest_abi::layout::*;
use kvm_bindings::{kvm_regs, kvm_segment, kvm_sregs};

use crate::{memory::GuestRam, Result};

/// Present | writable | user.
const TABLE_FLAGS: u64 = 0x7;
/// Present | writable | user | 2 MiB page.
const LARGE_PAGE_FLAGS: u64 = 0x87;

const CR0_PE: u64 = 1;
const CR0_MP: u64 = 1 << 1;
const CR0_ET: u64 = 1 << 4;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const CR4_OSFXSR: u64 = 1 << 9;
const CR4_OSXMMEXCPT: u64 = 1 << 10;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;
/// IOPL 3 and the always-one bit 1. Interrupts stay disabled: the guest polls.
const RFLAGS_IOPL3: u64 = 0x3002;

/// Offset of the I/O permission bitmap in the TSS.
const TSS_IOPB_OFFSET: u64 = 0x68;
/// TSS limit: the 104-byte TSS, an 8 KiB bitmap for 65536 ports, and the terminating byte.
const TSS_LIMIT: u64 = TSS_IOPB_OFFSET + 0x2000;

/// GDT entries: null, kernel code, kernel data, user code (0x18), user data (0x20), TSS (0x28,
/// two slots).
fn gdt() -> [u64; 7] {
    let tss_base = TSS_GPA;
    let tss_limit = TSS_LIMIT;
    let tss_low = (tss_limit & 0xffff)
        | (tss_base & 0xff_ffff) << 16
        | 0x89 << 40 // present, 64-bit TSS (available)
        | ((tss_limit >> 16) & 0xf) << 48
        | ((tss_base >> 24) & 0xff) << 56;
    [
        0,
        0x0020_9a00_0000_0000, // kernel code: present, DPL 0, L
        0x0000_9200_0000_0000, // kernel data
        0x0020_fa00_0000_0000, // user code: present, DPL 3, L
        0x0000_f200_0000_0000, // user data: present, DPL 3
        tss_low,
        tss_base >> 32,
    ]
}

/// Writes page tables, GDT and TSS into guest RAM.
pub fn setup_memory(ram: &GuestRam) -> Result<()> {
    let mut pml4 = [0u64; 512];
    pml4[0] = PDPT_GPA | TABLE_FLAGS;
    ram.write(PML4_GPA, bytes_of(&pml4))?;
    let mut pdpt = [0u64; 512];
    for (i, e) in pdpt.iter_mut().take(IDENTITY_MAP_GIB as usize).enumerate() {
        *e = (PD_GPA + i as u64 * 0x1000) | TABLE_FLAGS;
    }
    ram.write(PDPT_GPA, bytes_of(&pdpt))?;
    for gib in 0..IDENTITY_MAP_GIB {
        let mut pd = [0u64; 512];
        for (j, e) in pd.iter_mut().enumerate() {
            *e = (gib << 30 | (j as u64) << 21) | LARGE_PAGE_FLAGS;
        }
        ram.write(PD_GPA + gib * 0x1000, bytes_of(&pd))?;
    }
    ram.write(GDT_GPA, bytes_of(&gdt()))?;
    // An I/O permission bitmap that allows every port. IOPL 3 already allows port I/O from
    // ring 3 on hardware, but the software-assisted KVM Ferry is developed on checks the bitmap.
    let mut tss = vec![0u8; TSS_LIMIT as usize + 1];
    tss[0x66..0x68].copy_from_slice(&(TSS_IOPB_OFFSET as u16).to_le_bytes());
    tss[TSS_LIMIT as usize] = 0xff; // the byte after the bitmap must be all ones
    ram.write(TSS_GPA, &tss)?;
    Ok(())
}

fn bytes_of(words: &[u64]) -> &[u8] {
    // SAFETY: u64 has no padding and any byte pattern is a valid u8; the slice covers exactly
    // the words' memory.
    unsafe { std::slice::from_raw_parts(words.as_ptr().cast::<u8>(), std::mem::size_of_val(words)) }
}

fn segment(selector: u16, type_: u8, code: bool) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_,
        present: 1,
        dpl: 3,
        db: if code { 0 } else { 1 },
        s: 1,
        l: if code { 1 } else { 0 },
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

/// Sets up `sregs` for 64-bit ring 3 (keeps what KVM filled in elsewhere, e.g. the APIC base).
pub fn setup_sregs(sregs: &mut kvm_sregs) {
    let code = segment(selectors::USER_CODE, 0xb, true);
    let data = segment(selectors::USER_DATA, 0x3, false);
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = kvm_segment {
        base: TSS_GPA,
        limit: TSS_LIMIT as u32,
        selector: selectors::TSS,
        type_: 0xb, // busy 64-bit TSS
        present: 1,
        dpl: 0,
        db: 0,
        s: 0,
        l: 0,
        g: 0,
        avl: 0,
        unusable: 0,
        padding: 0,
    };
    sregs.ldt = kvm_segment {
        selector: 0,
        type_: 0x2,
        present: 1,
        unusable: 1,
        ..Default::default()
    };
    sregs.gdt.base = GDT_GPA;
    sregs.gdt.limit = (gdt().len() * 8 - 1) as u16;
    // An empty IDT: any exception escalates to a triple fault, which the VMM reports.
    sregs.idt.base = 0;
    sregs.idt.limit = 0;
    sregs.cr0 = CR0_PE | CR0_MP | CR0_ET | CR0_PG;
    sregs.cr3 = PML4_GPA;
    sregs.cr4 = CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT;
    sregs.efer = EFER_LME | EFER_LMA;
}

/// General registers for the first instruction at `entry`.
pub fn initial_regs(entry: u64) -> kvm_regs {
    kvm_regs {
        rip: entry,
        rsp: STACK_TOP,
        rflags: RFLAGS_IOPL3,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestAddress};

    #[test]
    fn identity_map_covers_ram_and_hole_with_user_pages() {
        let ram = GuestRam::new(32 << 20).unwrap();
        setup_memory(&ram).unwrap();
        let m = ram.memory();
        let pml4: u64 = m.read_obj(GuestAddress(PML4_GPA)).unwrap();
        assert_eq!(pml4, PDPT_GPA | 7);
        let pdpt3: u64 = m.read_obj(GuestAddress(PDPT_GPA + 3 * 8)).unwrap();
        assert_eq!(pdpt3, (PD_GPA + 0x3000) | 7);
        // the 2 MiB page holding 0xD000_0000 (MMIO hole) maps to itself
        let gib = 0xD000_0000u64 >> 30;
        let idx = (0xD000_0000u64 >> 21) & 511;
        let pde: u64 = m
            .read_obj(GuestAddress(PD_GPA + gib * 0x1000 + idx * 8))
            .unwrap();
        assert_eq!(pde, 0xD000_0000 | 0x87);
    }

    #[test]
    fn ring3_segments() {
        let mut s = kvm_sregs::default();
        setup_sregs(&mut s);
        assert_eq!(s.cs.selector & 3, 3);
        assert_eq!(s.cs.dpl, 3);
        assert_eq!(s.cs.l, 1);
        assert_eq!(s.ss.selector, 0x23);
        assert_eq!(initial_regs(0x200000).rflags >> 12 & 3, 3);
        let g = gdt();
        assert_eq!((g[3] >> 45) & 3, 3, "user code DPL 3");
        assert_eq!((g[5] >> 16) & 0xff_ffff, TSS_GPA);
    }
}

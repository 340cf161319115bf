//! `crash`: read a virtual address the page tables do not map. The guest has no exception
//! handlers, so this ends in a triple fault that the VMM must report without dying itself.
use crate::println;

const UNMAPPED: u64 = 0x7f00_0000_0000;

pub fn run() -> u32 {
    println!("crash: reading unmapped virtual address {:#x}", UNMAPPED);
    // SAFETY: deliberately not safe: this faults, which is the point of the workload.
    let v = unsafe { core::ptr::read_volatile(UNMAPPED as *const u64) };
    println!("crash: survived?! read {:#x}", v);
    1
}

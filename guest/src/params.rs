//! Access to the boot parameter block and its mailbox fields.
use guest_abi::{layout::PARAMS_GPA, params::*, BootParams};

/// A copy of the boot parameters as the VMM wrote them.
pub fn boot() -> BootParams {
    // SAFETY: the VMM writes a BootParams at PARAMS_GPA, which is identity mapped RAM.
    unsafe { core::ptr::read_volatile(PARAMS_GPA as *const BootParams) }
}

fn field32(off: usize) -> *mut u32 {
    (PARAMS_GPA as usize + off) as *mut u32
}

fn field64(off: usize) -> *mut u64 {
    (PARAMS_GPA as usize + off) as *mut u64
}

/// Reads a 32-bit mailbox field.
pub fn read32(off: usize) -> u32 {
    // SAFETY: `off` is one of the aligned field offsets of the block in mapped RAM.
    unsafe { core::ptr::read_volatile(field32(off)) }
}

/// Writes a 32-bit mailbox field.
pub fn write32(off: usize, v: u32) {
    // SAFETY: as for `read32`.
    unsafe { core::ptr::write_volatile(field32(off), v) }
}

/// Writes a 64-bit mailbox field.
pub fn write64(off: usize, v: u64) {
    // SAFETY: as for `read32`.
    unsafe { core::ptr::write_volatile(field64(off), v) }
}

/// True when the VMM asked the workload to stop.
pub fn stop_requested() -> bool {
    read32(OFF_STOP_REQ) != 0
}

/// The verification request number, if one is pending.
pub fn pending_verify() -> Option<u32> {
    let req = read32(OFF_VERIFY_REQ);
    (req != read32(OFF_VERIFY_DONE)).then_some(req)
}

/// Publishes a verification result for request `req`.
pub fn complete_verify(req: u32, status: u32, pages: u64, writes: u64) {
    write64(OFF_VERIFY_PAGES, pages);
    write64(OFF_VERIFY_WRITES, writes);
    write32(OFF_VERIFY_STATUS, status);
    core::sync::atomic::fence(core::sync::atomic::Ordering::SeqCst);
    write32(OFF_VERIFY_DONE, req);
}

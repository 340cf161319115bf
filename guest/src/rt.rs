//! Entry point, exit and panic handling.
use guest_abi::ports::{Event, FERRY_EVENT, FERRY_EXIT};

core::arch::global_asm!(
    ".section .text.entry, \"ax\"",
    ".global _start",
    "_start:",
    // Tell the VMM the first instruction ran (the VMM timestamps this exit).
    "mov dx, {event_port}",
    "mov eax, {booted}",
    "out dx, eax",
    "call {main}",
    "ud2",
    event_port = const FERRY_EVENT,
    booted = const Event::Booted as u32,
    main = sym crate::guest_main,
);

/// Reports an event to the VMM.
pub fn event(e: Event) {
    crate::io::outl(FERRY_EVENT, e as u32);
}

/// Ends the VM with `status`.
pub fn exit(status: u32) -> ! {
    loop {
        crate::io::outl(FERRY_EXIT, status);
    }
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    crate::println!("ferry-guest: panic: {}", info);
    exit(guest_abi::params::status::PANIC)
}

/// The precompiled `core` for the host target is built with unwinding tables that name this
/// symbol; with `panic = "abort"` nothing ever calls it.
#[no_mangle]
extern "C" fn rust_eh_personality() {}

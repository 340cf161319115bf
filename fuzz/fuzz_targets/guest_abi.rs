//! The guest-ABI mailbox and the ports every VM has.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| vmm::fuzzing::guest_abi(data));

//! Device state as a destination restores it (NVMe saved device, VMM state).
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| shadow::fuzzing::device_state(data));

//! The stand-in NVMe controller's register file, doorbells and commands.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| nvme_device::fuzzing::register_file(data));

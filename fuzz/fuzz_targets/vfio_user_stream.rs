//! The device process's vfio-user message handling, one connection per input.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| nvme_device::fuzzing::vfio_user_stream(data));

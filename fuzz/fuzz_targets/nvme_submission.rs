//! NVMe submission validation, PRP walking and a shadowed queue pair.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| shadow::fuzzing::nvme_submission(data));

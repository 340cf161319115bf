//! The PVRDMA command channel and rings over fuzzed guest memory.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| vrdma::fuzzing::command_channel(data));

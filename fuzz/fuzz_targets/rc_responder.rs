//! The RC transport fed packets from a hostile peer against a registered region.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| rdma::fuzzing::rc_responder(data));

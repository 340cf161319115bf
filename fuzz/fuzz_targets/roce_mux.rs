//! RoCEv2 parsing, MAD/CM decoding, the QP1 multiplexer's inbound and outbound paths, a CM endpoint.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| rdma::fuzzing::roce_mux(data));

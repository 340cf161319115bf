//! The migration destination as a whole: a fuzzed byte stream from a source.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| migration::fuzzing::destination_stream(data));

//! A shadowed split virtqueue between a hostile guest and a hostile device.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| shadow::fuzzing::virtio_queue(data));

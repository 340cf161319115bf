//! Virtio definitions written once for the built-in guest's driver, the stand-in virtio-net
//! device process and the VMM's shadow engine (Virtual I/O Device (VIRTIO) Version 1.1/1.2,
//! OASIS; section numbers in the module docs).
//!
//! Everything here is `no_std`, allocation free and `forbid(unsafe_code)`: layouts, offsets,
//! flags and bounds checks only. Nothing here touches memory; callers read and write the bytes
//! and use these helpers to interpret them. All multi-byte fields are little-endian (virtio 1.x
//! devices are little-endian regardless of the platform).
#![no_std]
#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod features;
pub mod net;
pub mod pci;
pub mod ring;
pub mod status;

pub use ring::{Descriptor, SplitRing, UsedElem};

//! Ferry's shadow engine: DMA-buffer shadowing of the rings a VM shares with a passthrough
//! device, so the hypervisor sees every submission and completion, knows the pages the device
//! dirtied and the device's queue positions, and can rebuild the device on another host.
//!
//! - [`adapter`]: [`RingAdapter`], the interface device knowledge sits behind;
//! - [`buffers`]: [`Buffers`], the two copies (vCPU buffer, device buffer);
//! - [`nvme`]: the NVMe queue-pair adapter: validation, forwarding, completion translation,
//!   dirty pages, saved state, and re-alignment with filler commands;
//! - [`virtio`]: the split-virtqueue adapter: chain validation, exactly-once heads, used-entry
//!   translation, dirty pages and saved state;
//! - [`engine`]: the copies, designation, doorbell interception, poller and migration glue.
#![deny(missing_docs)]

pub mod adapter;
pub mod buffers;
pub mod engine;
mod error;
#[doc(hidden)]
pub mod fuzzing;
pub mod nvme;
pub mod virtio;

pub use adapter::RingAdapter;
pub use buffers::{Buffers, VecBuffers};
pub use engine::{Engine, EngineOptions, EngineStatus, PollerStatus};
pub use error::{Error, Result, StateError};

//! Ferry's control port device: the guest ends the VM with a status, and timestamps events.
use std::sync::Arc;

use guest_abi::ports::Event;

use crate::{
    bus::BusDevice,
    lifecycle::{Lifecycle, VmOutcome},
};

/// The device at `guest_abi::ports::FERRY_CTL_BASE`.
pub struct ControlDevice {
    lifecycle: Arc<Lifecycle>,
}

impl ControlDevice {
    /// A control device reporting into `lifecycle`.
    pub fn new(lifecycle: Arc<Lifecycle>) -> Self {
        ControlDevice { lifecycle }
    }
}

fn le_u32(data: &[u8]) -> u32 {
    let mut b = [0u8; 4];
    let n = data.len().min(4);
    b[..n].copy_from_slice(&data[..n]);
    u32::from_le_bytes(b)
}

impl BusDevice for ControlDevice {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let value = le_u32(data);
        match offset {
            0 => self.lifecycle.finish(VmOutcome::GuestExit(value)),
            4 => match Event::from_u32(value) {
                Some(e) => self.lifecycle.record(e),
                None => tracing::warn!(value, "guest reported an unknown event"),
            },
            _ => tracing::debug!(offset, value, "write to reserved control port"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_and_events() {
        let lc = Arc::new(Lifecycle::default());
        let mut dev = ControlDevice::new(lc.clone());
        dev.write(4, &1u32.to_le_bytes());
        assert!(lc.event_time(Event::Booted).is_some());
        dev.write(4, &77u32.to_le_bytes());
        assert!(!lc.is_finished());
        dev.write(0, &[3]);
        assert_eq!(lc.outcome(), Some(VmOutcome::GuestExit(3)));
        dev.write(0, &[4, 0, 0, 0]);
        assert_eq!(
            lc.outcome(),
            Some(VmOutcome::GuestExit(3)),
            "first outcome wins"
        );
    }

    #[test]
    fn a_guest_writing_events_in_a_loop_does_not_grow_the_log() {
        let lc = Arc::new(Lifecycle::default());
        let mut dev = ControlDevice::new(lc.clone());
        for i in 0..100_000u32 {
            dev.write(4, &(1 + i % 3).to_le_bytes());
        }
        assert_eq!(lc.events_held(), 3, "one timestamp per kind of event");
        let (start, end) = (
            lc.event_time(Event::BenchStart).unwrap(),
            lc.event_time(Event::BenchEnd).unwrap(),
        );
        assert!(start <= end, "the latest of each is kept");
    }
}

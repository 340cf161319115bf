//! The host bridge in slot 0.
use super::{PciConfiguration, PciDevice, PciHeader};

/// A PCI host bridge (class 06:00:00), as the guest expects to find at 00:00.0.
pub struct HostBridge {
    config: PciConfiguration,
}

impl HostBridge {
    /// Intel 8086:0d57, like Cloud Hypervisor's.
    pub fn new() -> Self {
        HostBridge {
            config: PciConfiguration::new(PciHeader {
                vendor_id: 0x8086,
                device_id: 0x0d57,
                class_code: 0x06_00_00,
                revision: 0,
                subsystem_vendor_id: 0,
                subsystem_id: 0,
            }),
        }
    }
}

impl Default for HostBridge {
    fn default() -> Self {
        Self::new()
    }
}

impl PciDevice for HostBridge {
    fn config_read(&mut self, reg: usize) -> u32 {
        self.config.read(reg)
    }

    fn config_write(&mut self, reg: usize, offset: usize, data: &[u8]) {
        self.config.write(reg, offset, data);
    }
}

//! Device status field (virtio 1.1 §2.1).

/// The guest OS has found the device and recognized it as a valid virtio device.
pub const ACKNOWLEDGE: u8 = 1;
/// The guest OS knows how to drive the device.
pub const DRIVER: u8 = 2;
/// The driver is set up and ready to drive the device.
pub const DRIVER_OK: u8 = 4;
/// The driver has acknowledged the features it understands; feature negotiation is complete.
pub const FEATURES_OK: u8 = 8;
/// The device has experienced an error from which it cannot recover.
pub const DEVICE_NEEDS_RESET: u8 = 0x40;
/// Something went wrong in the guest and it has given up on the device.
pub const FAILED: u8 = 0x80;

/// True when `status` says the driver has finished bring-up and the device may run its queues.
pub const fn is_running(status: u8) -> bool {
    status & (DRIVER_OK | FEATURES_OK | DEVICE_NEEDS_RESET | FAILED) == DRIVER_OK | FEATURES_OK
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bits_match_the_spec() {
        assert_eq!(
            [
                ACKNOWLEDGE,
                DRIVER,
                DRIVER_OK,
                FEATURES_OK,
                DEVICE_NEEDS_RESET,
                FAILED
            ],
            [1, 2, 4, 8, 64, 128]
        );
    }

    #[test]
    fn running_needs_features_ok_and_driver_ok_and_no_failure() {
        let up = ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK;
        assert!(is_running(up));
        assert!(!is_running(ACKNOWLEDGE | DRIVER | FEATURES_OK));
        assert!(!is_running(ACKNOWLEDGE | DRIVER | DRIVER_OK));
        assert!(!is_running(up | FAILED));
        assert!(!is_running(up | DEVICE_NEEDS_RESET));
    }
}

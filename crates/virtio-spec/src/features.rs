//! Feature bits independent of the device type (virtio 1.1 §6), as bit numbers and masks.
//! Device-specific bits (0 to 23) are in the device's module, e.g. [`crate::net::features`].

/// The driver can use descriptors with [`crate::ring::DESC_F_INDIRECT`].
pub const RING_INDIRECT_DESC: u32 = 28;
/// The `used_event` and `avail_event` fields are in use.
pub const RING_EVENT_IDX: u32 = 29;
/// Compliance with virtio 1.x (the modern interface); required by this project.
pub const VERSION_1: u32 = 32;
/// The device sits behind an IOMMU or other platform translation.
pub const ACCESS_PLATFORM: u32 = 33;
/// The packed virtqueue layout.
pub const RING_PACKED: u32 = 34;
/// Buffers are used in the order they were made available.
pub const IN_ORDER: u32 = 35;
/// Memory accesses need platform ordering (hardware devices).
pub const ORDER_PLATFORM: u32 = 36;
/// Single root I/O virtualization.
pub const SR_IOV: u32 = 37;
/// The driver passes extra data in its notifications.
pub const NOTIFICATION_DATA: u32 = 38;

/// The mask of feature bit `bit` (0 to 63).
pub const fn bit(bit: u32) -> u64 {
    1u64 << (bit & 63)
}

/// The 32-bit half of `features` that feature-select value `select` shows (0 = bits 0..31,
/// 1 = bits 32..63, anything else reads as zero, as §4.1.4.3 requires).
pub const fn window(features: u64, select: u32) -> u32 {
    match select {
        0 => features as u32,
        1 => (features >> 32) as u32,
        _ => 0,
    }
}

/// `features` with the 32-bit half `select` replaced by `value` (a select above 1 changes
/// nothing).
pub const fn set_window(features: u64, select: u32, value: u32) -> u64 {
    match select {
        0 => (features & !0xffff_ffff) | value as u64,
        1 => (features & 0xffff_ffff) | (value as u64) << 32,
        _ => features,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bit_numbers_match_the_spec() {
        assert_eq!(bit(RING_INDIRECT_DESC), 0x1000_0000);
        assert_eq!(bit(RING_EVENT_IDX), 0x2000_0000);
        assert_eq!(bit(VERSION_1), 0x1_0000_0000);
        assert_eq!(bit(ACCESS_PLATFORM), 0x2_0000_0000);
        assert_eq!(bit(RING_PACKED), 0x4_0000_0000);
    }

    #[test]
    fn windows_split_and_join() {
        let f = bit(VERSION_1) | bit(RING_INDIRECT_DESC) | 0x21;
        assert_eq!(window(f, 0), 0x1000_0021);
        assert_eq!(window(f, 1), 1);
        assert_eq!(window(f, 2), 0);
        let g = set_window(set_window(0, 0, window(f, 0)), 1, window(f, 1));
        assert_eq!(g, f);
        assert_eq!(set_window(f, 7, 0xffff_ffff), f);
    }
}

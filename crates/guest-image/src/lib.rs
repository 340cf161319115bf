//! The built-in guest, embedded. `build.rs` compiles `guest/` (a `no_std` ring-3 program) as
//! part of the ordinary `cargo build`; this crate exposes the resulting ELF image.

/// The built-in guest's ELF image.
pub static GUEST_ELF: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/ferry-guest.elf"));

#[cfg(test)]
mod tests {
    #[test]
    fn image_is_an_x86_64_elf_linked_at_the_image_base() {
        let elf = super::GUEST_ELF;
        assert_eq!(&elf[..4], b"\x7fELF");
        assert_eq!(elf[4], 2, "64-bit");
        assert_eq!(u16::from_le_bytes([elf[18], elf[19]]), 62, "x86-64");
        let entry = u64::from_le_bytes(elf[24..32].try_into().unwrap());
        assert_eq!(entry, guest_abi::layout::IMAGE_BASE);
    }
}

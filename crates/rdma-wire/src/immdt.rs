//! The Immediate Data header (ImmDt, 4 bytes) of the `*_WITH_IMMEDIATE` opcodes.

use crate::bytes::{array, out_slice};
use crate::WireError;

/// Immediate data: 4 bytes delivered to the receiver in its completion, kept in network byte
/// order as they appear on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct ImmDt(pub [u8; 4]);

impl ImmDt {
    /// Size on the wire.
    pub const LEN: usize = 4;

    /// Parses the first 4 bytes of `input`.
    pub fn parse(input: &[u8]) -> Result<ImmDt, WireError> {
        Ok(ImmDt(*array::<4>(input, "ImmDt")?))
    }

    /// The immediate data read as a big-endian number.
    pub const fn value(&self) -> u32 {
        u32::from_be_bytes(self.0)
    }

    /// Immediate data from a number, written big-endian.
    pub const fn from_value(v: u32) -> ImmDt {
        ImmDt(v.to_be_bytes())
    }

    /// Writes the header to the start of `out`, returning 4.
    pub fn write(&self, out: &mut [u8]) -> Result<usize, WireError> {
        out_slice(out, Self::LEN, "ImmDt")?.copy_from_slice(&self.0);
        Ok(Self::LEN)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn big_endian_value() {
        let i = ImmDt::from_value(0x11);
        assert_eq!(i.0, [0, 0, 0, 0x11]);
        assert_eq!(ImmDt::parse(&[0, 0, 0, 0x11, 9]), Ok(i));
        assert_eq!(i.value(), 0x11);
        assert!(ImmDt::parse(&[1, 2, 3]).is_err());
    }
}

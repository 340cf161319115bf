//! Extension headers of the reliable (RC) and unreliable-connected (UC) transports: RETH,
//! AETH, AtomicETH, AtomicAckETH and IETH.

use crate::bytes::{array, get_u24, get_u32, get_u64, out_slice, put_u24, put_u32, put_u64};
use crate::WireError;

/// RDMA Extended Transport Header (16 bytes): RDMA WRITE first/only and READ requests.
///
/// | byte | field |
/// |---|---|
/// | 0–7 | VirtualAddress |
/// | 8–11 | R_Key |
/// | 12–15 | DMALength |
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Reth {
    /// Remote virtual address.
    pub virtual_address: u64,
    /// Remote key.
    pub r_key: u32,
    /// Length of the whole transfer.
    pub dma_length: u32,
}

impl Reth {
    /// Size on the wire.
    pub const LEN: usize = 16;

    /// Parses the first 16 bytes of `input`.
    pub fn parse(input: &[u8]) -> Result<Reth, WireError> {
        let b = array::<16>(input, "RETH")?;
        Ok(Reth {
            virtual_address: get_u64(b, 0),
            r_key: get_u32(b, 8),
            dma_length: get_u32(b, 12),
        })
    }

    /// Encodes the header.
    pub fn to_bytes(&self) -> [u8; 16] {
        let mut b = [0u8; 16];
        put_u64(&mut b, 0, self.virtual_address);
        put_u32(&mut b, 8, self.r_key);
        put_u32(&mut b, 12, self.dma_length);
        b
    }

    /// Writes the header to the start of `out`, returning 16.
    pub fn write(&self, out: &mut [u8]) -> Result<usize, WireError> {
        out_slice(out, Self::LEN, "RETH")?.copy_from_slice(&self.to_bytes());
        Ok(Self::LEN)
    }
}

/// ACK Extended Transport Header (4 bytes): acknowledgements and read responses.
///
/// | byte | field |
/// |---|---|
/// | 0 | Syndrome (ACK / RNR NAK / NAK code and credit or timer) |
/// | 1–3 | MSN (24) |
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Aeth {
    /// Syndrome byte.
    pub syndrome: u8,
    /// Message sequence number (24 bits; truncated when written).
    pub msn: u32,
}

impl Aeth {
    /// Size on the wire.
    pub const LEN: usize = 4;

    /// Parses the first 4 bytes of `input`.
    pub fn parse(input: &[u8]) -> Result<Aeth, WireError> {
        let b = array::<4>(input, "AETH")?;
        Ok(Aeth {
            syndrome: b[0],
            msn: get_u24(b, 1),
        })
    }

    /// Encodes the header.
    pub fn to_bytes(&self) -> [u8; 4] {
        let mut b = [0u8; 4];
        b[0] = self.syndrome;
        put_u24(&mut b, 1, self.msn);
        b
    }

    /// Writes the header to the start of `out`, returning 4.
    pub fn write(&self, out: &mut [u8]) -> Result<usize, WireError> {
        out_slice(out, Self::LEN, "AETH")?.copy_from_slice(&self.to_bytes());
        Ok(Self::LEN)
    }
}

/// Atomic Extended Transport Header (28 bytes): compare-and-swap and fetch-and-add requests.
///
/// | byte | field |
/// |---|---|
/// | 0–7 | VirtualAddress |
/// | 8–11 | R_Key |
/// | 12–19 | SwapData / AddData |
/// | 20–27 | CompareData |
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct AtomicEth {
    /// Remote virtual address.
    pub virtual_address: u64,
    /// Remote key.
    pub r_key: u32,
    /// Swap (compare-and-swap) or add (fetch-and-add) operand.
    pub swap_add: u64,
    /// Compare operand (compare-and-swap).
    pub compare: u64,
}

impl AtomicEth {
    /// Size on the wire.
    pub const LEN: usize = 28;

    /// Parses the first 28 bytes of `input`.
    pub fn parse(input: &[u8]) -> Result<AtomicEth, WireError> {
        let b = array::<28>(input, "AtomicETH")?;
        Ok(AtomicEth {
            virtual_address: get_u64(b, 0),
            r_key: get_u32(b, 8),
            swap_add: get_u64(b, 12),
            compare: get_u64(b, 20),
        })
    }

    /// Encodes the header.
    pub fn to_bytes(&self) -> [u8; 28] {
        let mut b = [0u8; 28];
        put_u64(&mut b, 0, self.virtual_address);
        put_u32(&mut b, 8, self.r_key);
        put_u64(&mut b, 12, self.swap_add);
        put_u64(&mut b, 20, self.compare);
        b
    }

    /// Writes the header to the start of `out`, returning 28.
    pub fn write(&self, out: &mut [u8]) -> Result<usize, WireError> {
        out_slice(out, Self::LEN, "AtomicETH")?.copy_from_slice(&self.to_bytes());
        Ok(Self::LEN)
    }
}

/// Atomic Acknowledge Extended Transport Header (8 bytes): the original remote data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct AtomicAckEth {
    /// Value at the remote address before the atomic operation.
    pub original_remote_data: u64,
}

impl AtomicAckEth {
    /// Size on the wire.
    pub const LEN: usize = 8;

    /// Parses the first 8 bytes of `input`.
    pub fn parse(input: &[u8]) -> Result<AtomicAckEth, WireError> {
        let b = array::<8>(input, "AtomicAckETH")?;
        Ok(AtomicAckEth {
            original_remote_data: u64::from_be_bytes(*b),
        })
    }

    /// Encodes the header.
    pub fn to_bytes(&self) -> [u8; 8] {
        self.original_remote_data.to_be_bytes()
    }

    /// Writes the header to the start of `out`, returning 8.
    pub fn write(&self, out: &mut [u8]) -> Result<usize, WireError> {
        out_slice(out, Self::LEN, "AtomicAckETH")?.copy_from_slice(&self.to_bytes());
        Ok(Self::LEN)
    }
}

/// Invalidate Extended Transport Header (4 bytes): the R_Key a SEND_WITH_INVALIDATE revokes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Ieth {
    /// Remote key to invalidate.
    pub r_key: u32,
}

impl Ieth {
    /// Size on the wire.
    pub const LEN: usize = 4;

    /// Parses the first 4 bytes of `input`.
    pub fn parse(input: &[u8]) -> Result<Ieth, WireError> {
        let b = array::<4>(input, "IETH")?;
        Ok(Ieth {
            r_key: u32::from_be_bytes(*b),
        })
    }

    /// Encodes the header.
    pub fn to_bytes(&self) -> [u8; 4] {
        self.r_key.to_be_bytes()
    }

    /// Writes the header to the start of `out`, returning 4.
    pub fn write(&self, out: &mut [u8]) -> Result<usize, WireError> {
        out_slice(out, Self::LEN, "IETH")?.copy_from_slice(&self.to_bytes());
        Ok(Self::LEN)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reth_layout() {
        let r = Reth {
            virtual_address: 0x0102_0304_0506_0708,
            r_key: 0x1112_1314,
            dma_length: 0x2122_2324,
        };
        let b = r.to_bytes();
        assert_eq!(
            b,
            [1, 2, 3, 4, 5, 6, 7, 8, 0x11, 0x12, 0x13, 0x14, 0x21, 0x22, 0x23, 0x24]
        );
        assert_eq!(Reth::parse(&b), Ok(r));
        assert!(Reth::parse(&b[..15]).is_err());
    }

    #[test]
    fn aeth_layout() {
        let a = Aeth {
            syndrome: 0x1f,
            msn: 0x00_0102,
        };
        assert_eq!(a.to_bytes(), [0x1f, 0, 1, 2]);
        assert_eq!(Aeth::parse(&a.to_bytes()), Ok(a));
        assert!(Aeth::parse(&[0; 3]).is_err());
    }

    #[test]
    fn atomic_layouts() {
        let a = AtomicEth {
            virtual_address: 0x0102_0304_0506_0708,
            r_key: 0x0a0b_0c0d,
            swap_add: 0x1112_1314_1516_1718,
            compare: 0x2122_2324_2526_2728,
        };
        let b = a.to_bytes();
        assert_eq!(&b[8..12], &[0x0a, 0x0b, 0x0c, 0x0d]);
        assert_eq!(b[12], 0x11);
        assert_eq!(b[20], 0x21);
        assert_eq!(b[27], 0x28);
        assert_eq!(AtomicEth::parse(&b), Ok(a));
        assert!(AtomicEth::parse(&b[..27]).is_err());
        let k = AtomicAckEth {
            original_remote_data: 0x0102_0304_0506_0708,
        };
        assert_eq!(AtomicAckEth::parse(&k.to_bytes()), Ok(k));
        let i = Ieth { r_key: 0xdead_beef };
        assert_eq!(i.to_bytes(), [0xde, 0xad, 0xbe, 0xef]);
        assert_eq!(Ieth::parse(&i.to_bytes()), Ok(i));
        let mut small = [0u8; 3];
        assert!(i.write(&mut small).is_err());
    }
}

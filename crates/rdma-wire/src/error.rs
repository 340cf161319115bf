//! The single error type of the crate.

/// Everything that can go wrong while parsing or building a wire format.
///
/// Every message names what failed and with which value, so a counted drop can be logged
/// usefully (for example `MAD too short: 120 bytes, need 256`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// The input ended before a fixed-size structure was complete.
    #[error("{what} too short: {len} bytes, need {need}")]
    TooShort {
        /// What was being parsed (`"MAD"`, `"BTH"`, …).
        what: &'static str,
        /// Bytes available.
        len: usize,
        /// Bytes needed.
        need: usize,
    },
    /// The input is longer than the structure allows.
    #[error("{what} too long: {len} bytes, at most {max}")]
    TooLong {
        /// What was being parsed.
        what: &'static str,
        /// Bytes given.
        len: usize,
        /// Largest length accepted.
        max: usize,
    },
    /// An output buffer cannot hold what is to be written.
    #[error("output buffer too small for {what}: {len} bytes, need {need}")]
    BufferTooSmall {
        /// What was being written.
        what: &'static str,
        /// Size of the buffer.
        len: usize,
        /// Bytes needed.
        need: usize,
    },
    /// A MAD whose management class is not the one expected.
    #[error("unexpected management class 0x{class:02x}, expected 0x{expected:02x}")]
    WrongMgmtClass {
        /// Class found in the MAD.
        class: u8,
        /// Class expected.
        expected: u8,
    },
    /// A CM MAD whose attribute ID does not belong to the message being parsed.
    #[error("unexpected attribute id 0x{attr:04x} for {message}")]
    WrongAttribute {
        /// Attribute ID found in the MAD.
        attr: u16,
        /// Message that was being parsed (`"REQ"`, …).
        message: &'static str,
    },
    /// A CM MAD whose attribute ID is not one of the CM messages.
    #[error("unknown CM attribute id 0x{attr:04x}")]
    UnknownCmAttribute {
        /// Attribute ID found in the MAD.
        attr: u16,
    },
    /// A BTH opcode this crate has no header layout for (reserved, RD, or vendor specific).
    #[error("unsupported BTH opcode 0x{opcode:02x}")]
    UnsupportedOpcode {
        /// Opcode from the BTH.
        opcode: u8,
    },
    /// The BTH pad count is larger than the payload it would be taken from.
    #[error("bad pad count {pad_count}: payload (with padding) is only {payload_len} bytes")]
    BadPadCount {
        /// PadCnt from the BTH.
        pad_count: u8,
        /// Bytes between the transport headers and the ICRC.
        payload_len: usize,
    },
    /// A packet to be encoded carries an extension header its opcode does not have, or lacks
    /// one it needs.
    #[error("opcode 0x{opcode:02x} {problem} {header}")]
    HeaderMismatch {
        /// Opcode from the BTH.
        opcode: u8,
        /// `"requires"` or `"does not carry"`.
        problem: &'static str,
        /// Name of the extension header.
        header: &'static str,
    },
    /// A padding slice whose length disagrees with the BTH pad count.
    #[error("padding is {len} bytes but the BTH pad count says {pad_count}")]
    PaddingMismatch {
        /// Length of the padding slice.
        len: usize,
        /// PadCnt from the BTH.
        pad_count: u8,
    },
    /// An IP header whose version nibble is neither 4 nor 6.
    #[error("unsupported IP version {version}")]
    BadIpVersion {
        /// Version nibble found.
        version: u8,
    },
    /// An IP header whose length disagrees with what it says about itself.
    #[error("bad IPv{version} header length: {len} bytes given, header says {expected}")]
    BadIpHeaderLength {
        /// IP version (4 or 6).
        version: u8,
        /// Bytes given.
        len: usize,
        /// Bytes the header declares (IPv4 IHL × 4) or requires (IPv6: 40).
        expected: usize,
    },
    /// Source and destination address of different IP families.
    #[error("source and destination addresses are of different IP families")]
    MixedAddressFamilies,
    /// The ICRC stored in a packet is not the one computed over it.
    #[error("ICRC mismatch: packet carries 0x{stored:08x}, computed 0x{computed:08x}")]
    IcrcMismatch {
        /// ICRC read from the packet (little-endian).
        stored: u32,
        /// ICRC computed over the packet.
        computed: u32,
    },
    /// An rdma_cm private-data header whose IP version nibble is neither 4 nor 6.
    #[error("bad rdma_cm header IP version {version}")]
    BadCmaIpVersion {
        /// High nibble of byte 1.
        version: u8,
    },
}

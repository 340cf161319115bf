//! BTH opcodes and the extension headers each of them carries.
//!
//! The top three bits of an opcode select the transport (RC `000`, UC `001`, RD `010`,
//! UD `011`, CNP `100`), the low five bits the operation. [`layout`] tells which extension
//! headers follow the BTH, in wire order: DETH, RETH, AtomicETH, AETH, AtomicAckETH, ImmDt,
//! IETH. The reliable-datagram transport (RD) is not supported: no RoCE implementation uses it.

/// RC SEND first.
pub const RC_SEND_FIRST: u8 = 0x00;
/// RC SEND middle.
pub const RC_SEND_MIDDLE: u8 = 0x01;
/// RC SEND last.
pub const RC_SEND_LAST: u8 = 0x02;
/// RC SEND last with immediate.
pub const RC_SEND_LAST_WITH_IMMEDIATE: u8 = 0x03;
/// RC SEND only.
pub const RC_SEND_ONLY: u8 = 0x04;
/// RC SEND only with immediate.
pub const RC_SEND_ONLY_WITH_IMMEDIATE: u8 = 0x05;
/// RC RDMA WRITE first.
pub const RC_RDMA_WRITE_FIRST: u8 = 0x06;
/// RC RDMA WRITE middle.
pub const RC_RDMA_WRITE_MIDDLE: u8 = 0x07;
/// RC RDMA WRITE last.
pub const RC_RDMA_WRITE_LAST: u8 = 0x08;
/// RC RDMA WRITE last with immediate.
pub const RC_RDMA_WRITE_LAST_WITH_IMMEDIATE: u8 = 0x09;
/// RC RDMA WRITE only.
pub const RC_RDMA_WRITE_ONLY: u8 = 0x0A;
/// RC RDMA WRITE only with immediate.
pub const RC_RDMA_WRITE_ONLY_WITH_IMMEDIATE: u8 = 0x0B;
/// RC RDMA READ request.
pub const RC_RDMA_READ_REQUEST: u8 = 0x0C;
/// RC RDMA READ response first.
pub const RC_RDMA_READ_RESPONSE_FIRST: u8 = 0x0D;
/// RC RDMA READ response middle.
pub const RC_RDMA_READ_RESPONSE_MIDDLE: u8 = 0x0E;
/// RC RDMA READ response last.
pub const RC_RDMA_READ_RESPONSE_LAST: u8 = 0x0F;
/// RC RDMA READ response only.
pub const RC_RDMA_READ_RESPONSE_ONLY: u8 = 0x10;
/// RC ACKNOWLEDGE.
pub const RC_ACKNOWLEDGE: u8 = 0x11;
/// RC ATOMIC ACKNOWLEDGE.
pub const RC_ATOMIC_ACKNOWLEDGE: u8 = 0x12;
/// RC CmpSwap.
pub const RC_COMPARE_SWAP: u8 = 0x13;
/// RC FetchAdd.
pub const RC_FETCH_ADD: u8 = 0x14;
/// RC SEND last with invalidate.
pub const RC_SEND_LAST_WITH_INVALIDATE: u8 = 0x16;
/// RC SEND only with invalidate.
pub const RC_SEND_ONLY_WITH_INVALIDATE: u8 = 0x17;

/// UC SEND first.
pub const UC_SEND_FIRST: u8 = 0x20;
/// UC SEND middle.
pub const UC_SEND_MIDDLE: u8 = 0x21;
/// UC SEND last.
pub const UC_SEND_LAST: u8 = 0x22;
/// UC SEND last with immediate.
pub const UC_SEND_LAST_WITH_IMMEDIATE: u8 = 0x23;
/// UC SEND only.
pub const UC_SEND_ONLY: u8 = 0x24;
/// UC SEND only with immediate.
pub const UC_SEND_ONLY_WITH_IMMEDIATE: u8 = 0x25;
/// UC RDMA WRITE first.
pub const UC_RDMA_WRITE_FIRST: u8 = 0x26;
/// UC RDMA WRITE middle.
pub const UC_RDMA_WRITE_MIDDLE: u8 = 0x27;
/// UC RDMA WRITE last.
pub const UC_RDMA_WRITE_LAST: u8 = 0x28;
/// UC RDMA WRITE last with immediate.
pub const UC_RDMA_WRITE_LAST_WITH_IMMEDIATE: u8 = 0x29;
/// UC RDMA WRITE only.
pub const UC_RDMA_WRITE_ONLY: u8 = 0x2A;
/// UC RDMA WRITE only with immediate.
pub const UC_RDMA_WRITE_ONLY_WITH_IMMEDIATE: u8 = 0x2B;

/// UD SEND only (every QP1 / CM packet).
pub const UD_SEND_ONLY: u8 = 0x64;
/// UD SEND only with immediate.
pub const UD_SEND_ONLY_WITH_IMMEDIATE: u8 = 0x65;

/// RoCEv2 Congestion Notification Packet (BTH, 16 reserved bytes, ICRC).
pub const CNP: u8 = 0x81;

/// The transport service an opcode belongs to (its top three bits).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Transport {
    /// Reliable connected (`000`).
    Rc,
    /// Unreliable connected (`001`).
    Uc,
    /// Reliable datagram (`010`).
    Rd,
    /// Unreliable datagram (`011`).
    Ud,
    /// Congestion notification (`100`).
    Cnp,
    /// Manufacturer specific (`110`, `111`) or reserved (`101`).
    Other,
}

/// The transport of `opcode`.
pub const fn transport(opcode: u8) -> Transport {
    match opcode >> 5 {
        0 => Transport::Rc,
        1 => Transport::Uc,
        2 => Transport::Rd,
        3 => Transport::Ud,
        4 => Transport::Cnp,
        _ => Transport::Other,
    }
}

/// Which extension headers follow the BTH for an opcode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Layout {
    /// Datagram ETH (UD).
    pub deth: bool,
    /// RDMA ETH.
    pub reth: bool,
    /// Atomic ETH.
    pub atomic_eth: bool,
    /// ACK ETH.
    pub aeth: bool,
    /// Atomic acknowledge ETH.
    pub atomic_ack_eth: bool,
    /// Immediate data.
    pub imm_dt: bool,
    /// Invalidate ETH.
    pub ieth: bool,
}

impl Layout {
    const NONE: Layout = Layout {
        deth: false,
        reth: false,
        atomic_eth: false,
        aeth: false,
        atomic_ack_eth: false,
        imm_dt: false,
        ieth: false,
    };

    /// Total length of the extension headers (not counting the BTH).
    pub const fn headers_len(&self) -> usize {
        let mut n = 0;
        if self.deth {
            n += crate::Deth::LEN;
        }
        if self.reth {
            n += crate::Reth::LEN;
        }
        if self.atomic_eth {
            n += crate::AtomicEth::LEN;
        }
        if self.aeth {
            n += crate::Aeth::LEN;
        }
        if self.atomic_ack_eth {
            n += crate::AtomicAckEth::LEN;
        }
        if self.imm_dt {
            n += crate::ImmDt::LEN;
        }
        if self.ieth {
            n += crate::Ieth::LEN;
        }
        n
    }
}

/// The extension headers of `opcode`, or `None` for opcodes this crate does not support
/// (reserved codes, RD, manufacturer-specific codes, and IBA 1.5's FLUSH / ATOMIC WRITE).
pub const fn layout(opcode: u8) -> Option<Layout> {
    let n = Layout::NONE;
    let imm = Layout { imm_dt: true, ..n };
    let reth = Layout { reth: true, ..n };
    let aeth = Layout { aeth: true, ..n };
    match opcode {
        // SEND first/middle/last/only, RDMA WRITE middle/last, READ RESPONSE middle (RC);
        // the same sends and writes for UC.
        0x00 | 0x01 | 0x02 | 0x04 | 0x07 | 0x08 | 0x0E => Some(n),
        0x20 | 0x21 | 0x22 | 0x24 | 0x27 | 0x28 => Some(n),
        0x03 | 0x05 | 0x09 | 0x23 | 0x25 | 0x29 => Some(imm),
        0x06 | 0x0A | 0x0C | 0x26 | 0x2A => Some(reth),
        0x0B | 0x2B => Some(Layout {
            reth: true,
            imm_dt: true,
            ..n
        }),
        0x0D | 0x0F | 0x10 | 0x11 => Some(aeth),
        0x12 => Some(Layout {
            aeth: true,
            atomic_ack_eth: true,
            ..n
        }),
        0x13 | 0x14 => Some(Layout {
            atomic_eth: true,
            ..n
        }),
        0x16 | 0x17 => Some(Layout { ieth: true, ..n }),
        UD_SEND_ONLY => Some(Layout { deth: true, ..n }),
        UD_SEND_ONLY_WITH_IMMEDIATE => Some(Layout {
            deth: true,
            imm_dt: true,
            ..n
        }),
        CNP => Some(n),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_lengths() {
        let len = |op| layout(op).map(|l| l.headers_len());
        assert_eq!(len(UD_SEND_ONLY), Some(8));
        assert_eq!(len(UD_SEND_ONLY_WITH_IMMEDIATE), Some(12));
        assert_eq!(len(RC_SEND_ONLY), Some(0));
        assert_eq!(len(RC_RDMA_WRITE_ONLY), Some(16));
        assert_eq!(len(RC_RDMA_WRITE_ONLY_WITH_IMMEDIATE), Some(20));
        assert_eq!(len(RC_RDMA_READ_REQUEST), Some(16));
        assert_eq!(len(RC_RDMA_READ_RESPONSE_ONLY), Some(4));
        assert_eq!(len(RC_RDMA_READ_RESPONSE_MIDDLE), Some(0));
        assert_eq!(len(RC_ACKNOWLEDGE), Some(4));
        assert_eq!(len(RC_ATOMIC_ACKNOWLEDGE), Some(12));
        assert_eq!(len(RC_COMPARE_SWAP), Some(28));
        assert_eq!(len(RC_FETCH_ADD), Some(28));
        assert_eq!(len(RC_SEND_ONLY_WITH_INVALIDATE), Some(4));
        assert_eq!(len(UC_RDMA_WRITE_ONLY_WITH_IMMEDIATE), Some(20));
        assert_eq!(len(CNP), Some(0));
        for unsupported in [
            0x15, 0x18, 0x19, 0x1f, 0x2c, 0x40, 0x5f, 0x60, 0x66, 0x80, 0xc0,
        ] {
            assert_eq!(layout(unsupported), None, "{unsupported:#x}");
        }
    }

    #[test]
    fn transports() {
        assert_eq!(transport(RC_SEND_ONLY), Transport::Rc);
        assert_eq!(transport(UC_SEND_ONLY), Transport::Uc);
        assert_eq!(transport(0x45), Transport::Rd);
        assert_eq!(transport(UD_SEND_ONLY), Transport::Ud);
        assert_eq!(transport(CNP), Transport::Cnp);
        assert_eq!(transport(0xc0), Transport::Other);
    }
}

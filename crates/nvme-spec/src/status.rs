//! Completion status: the 15-bit status field (SC bits 7:0, SCT bits 10:8, CRD, M, DNR).

/// A completion status field.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Status(pub u16);

/// Do Not Retry.
pub const DNR: u16 = 1 << 14;

impl Status {
    /// Success.
    pub const SUCCESS: Status = Status(0);
    /// Generic: invalid command opcode.
    pub const INVALID_OPCODE: Status = Status::new(0, 0x01);
    /// Generic: invalid field in command.
    pub const INVALID_FIELD: Status = Status::new(0, 0x02);
    /// Generic: command id conflict.
    pub const CID_CONFLICT: Status = Status::new(0, 0x03);
    /// Generic: data transfer error.
    pub const DATA_TRANSFER_ERROR: Status = Status::new(0, 0x04);
    /// Generic: internal error.
    pub const INTERNAL_ERROR: Status = Status::new(0, 0x06);
    /// Generic: command aborted by request.
    pub const ABORTED_BY_REQUEST: Status = Status::new(0, 0x07);
    /// Generic: command aborted due to SQ deletion.
    pub const ABORTED_SQ_DELETION: Status = Status::new(0, 0x08);
    /// Generic: invalid namespace or format.
    pub const INVALID_NAMESPACE: Status = Status::new(0, 0x0b);
    /// Generic: invalid PRP offset.
    pub const INVALID_PRP_OFFSET: Status = Status::new(0, 0x13);
    /// Generic: LBA out of range.
    pub const LBA_OUT_OF_RANGE: Status = Status::new(0, 0x80);
    /// Command specific: completion queue invalid.
    pub const CQ_INVALID: Status = Status::new(1, 0x00);
    /// Command specific: invalid queue identifier.
    pub const INVALID_QUEUE_ID: Status = Status::new(1, 0x01);
    /// Command specific: invalid queue size.
    pub const INVALID_QUEUE_SIZE: Status = Status::new(1, 0x02);
    /// Command specific: abort command limit exceeded.
    pub const ABORT_LIMIT: Status = Status::new(1, 0x03);
    /// Command specific: invalid interrupt vector.
    pub const INVALID_VECTOR: Status = Status::new(1, 0x08);
    /// Command specific: invalid log page.
    pub const INVALID_LOG_PAGE: Status = Status::new(1, 0x09);
    /// Command specific: invalid queue deletion.
    pub const INVALID_QUEUE_DELETION: Status = Status::new(1, 0x0c);
    /// Command specific: feature identifier not saveable.
    pub const FEATURE_NOT_SAVEABLE: Status = Status::new(1, 0x0d);

    /// Status code type `sct` (0 generic, 1 command specific, 2 media) and code `sc`; DNR set
    /// for errors.
    pub const fn new(sct: u8, sc: u8) -> Status {
        let base = ((sct as u16 & 7) << 8) | sc as u16;
        if base == 0 {
            Status(0)
        } else {
            Status(base | DNR)
        }
    }
    /// True for success.
    pub const fn is_success(self) -> bool {
        self.0 & 0x7ff == 0
    }
    /// Status code type.
    pub const fn sct(self) -> u8 {
        ((self.0 >> 8) & 7) as u8
    }
    /// Status code.
    pub const fn sc(self) -> u8 {
        self.0 as u8
    }
    /// Same type and code (ignoring DNR/M/CRD).
    pub const fn same(self, other: Status) -> bool {
        self.0 & 0x7ff == other.0 & 0x7ff
    }
}

impl core::fmt::Display for Status {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "sct {} sc {:#04x}", self.sct(), self.sc())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn encoding() {
        assert!(Status::SUCCESS.is_success());
        assert_eq!(Status::LBA_OUT_OF_RANGE.0 & 0x7ff, 0x080);
        assert_eq!(Status::INVALID_QUEUE_ID.sct(), 1);
        assert_eq!(Status::INVALID_QUEUE_ID.sc(), 1);
        assert!(!Status::INVALID_FIELD.is_success());
        assert!(Status::INVALID_FIELD.same(Status(2)));
    }
}

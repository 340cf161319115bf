//! Controller registers (BAR0) and doorbells.

/// Controller Capabilities (64 bit).
pub const CAP: u64 = 0x00;
/// Version.
pub const VS: u64 = 0x08;
/// Interrupt Mask Set.
pub const INTMS: u64 = 0x0c;
/// Interrupt Mask Clear.
pub const INTMC: u64 = 0x10;
/// Controller Configuration.
pub const CC: u64 = 0x14;
/// Controller Status.
pub const CSTS: u64 = 0x1c;
/// NVM Subsystem Reset.
pub const NSSR: u64 = 0x20;
/// Admin Queue Attributes.
pub const AQA: u64 = 0x24;
/// Admin Submission Queue base (64 bit).
pub const ASQ: u64 = 0x28;
/// Admin Completion Queue base (64 bit).
pub const ACQ: u64 = 0x30;
/// First doorbell (SQ 0 tail).
pub const DOORBELL_BASE: u64 = 0x1000;

/// NVMe 1.4.0.
pub const VERSION_1_4: u32 = 0x0001_0400;

/// CAP fields.
pub mod cap {
    /// Builds a CAP value: `mqes` is the 0-based maximum queue size, `dstrd` the doorbell
    /// stride exponent (stride = 4 << dstrd bytes), `timeout_500ms` CAP.TO, NVM command set,
    /// MPSMIN = MPSMAX = 0 (4 KiB pages).
    pub const fn new(mqes: u16, dstrd: u8, timeout_500ms: u8) -> u64 {
        mqes as u64
            | 1 << 16 // CQR: queues must be physically contiguous
            | (timeout_500ms as u64) << 24
            | ((dstrd as u64) & 0xf) << 32
            | 1 << 37 // CSS: NVM command set
    }
    /// Maximum queue entries, 0-based.
    pub const fn mqes(cap: u64) -> u16 {
        cap as u16
    }
    /// Doorbell stride exponent.
    pub const fn dstrd(cap: u64) -> u8 {
        ((cap >> 32) & 0xf) as u8
    }
    /// Ready timeout in 500 ms units.
    pub const fn timeout(cap: u64) -> u8 {
        (cap >> 24) as u8
    }
    /// Minimum memory page size exponent (page = 4096 << mpsmin).
    pub const fn mpsmin(cap: u64) -> u8 {
        ((cap >> 48) & 0xf) as u8
    }
}

/// CC fields.
pub mod cc {
    /// Enable.
    pub const EN: u32 = 1;
    /// Shutdown notification: none.
    pub const SHN_NONE: u32 = 0;
    /// Shutdown notification: normal.
    pub const SHN_NORMAL: u32 = 1;
    /// Shutdown notification: abrupt.
    pub const SHN_ABRUPT: u32 = 2;
    /// Shutdown notification field.
    pub const fn shn(cc: u32) -> u32 {
        (cc >> 14) & 3
    }
    /// Memory page size exponent.
    pub const fn mps(cc: u32) -> u32 {
        (cc >> 7) & 0xf
    }
    /// I/O submission queue entry size exponent.
    pub const fn iosqes(cc: u32) -> u32 {
        (cc >> 16) & 0xf
    }
    /// I/O completion queue entry size exponent.
    pub const fn iocqes(cc: u32) -> u32 {
        (cc >> 20) & 0xf
    }
    /// The CC value of an enabled controller with 64-byte SQEs, 16-byte CQEs, 4 KiB pages,
    /// NVM command set, round robin.
    pub const ENABLE: u32 = EN | 6 << 16 | 4 << 20;
}

/// CSTS fields.
pub mod csts {
    /// Ready.
    pub const RDY: u32 = 1;
    /// Controller fatal status.
    pub const CFS: u32 = 2;
    /// Shutdown processing occurring.
    pub const SHST_OCCURRING: u32 = 1 << 2;
    /// Shutdown processing complete.
    pub const SHST_COMPLETE: u32 = 2 << 2;
    /// Shutdown status mask.
    pub const SHST_MASK: u32 = 3 << 2;
}

/// AQA fields (sizes are 0-based in the register).
pub mod aqa {
    /// Builds AQA from entry counts (1-based).
    pub const fn new(sq_entries: u16, cq_entries: u16) -> u32 {
        ((sq_entries - 1) as u32 & 0xfff) | (((cq_entries - 1) as u32 & 0xfff) << 16)
    }
    /// Admin SQ entries (1-based).
    pub const fn sq_entries(aqa: u32) -> u32 {
        (aqa & 0xfff) + 1
    }
    /// Admin CQ entries (1-based).
    pub const fn cq_entries(aqa: u32) -> u32 {
        ((aqa >> 16) & 0xfff) + 1
    }
}

/// Bytes between two consecutive doorbells for a DSTRD.
pub const fn doorbell_stride(dstrd: u8) -> u64 {
    4 << dstrd
}

/// BAR0 offset of the submission queue tail doorbell of queue `qid`.
pub const fn sq_tail_doorbell(qid: u16, dstrd: u8) -> u64 {
    DOORBELL_BASE + (2 * qid as u64) * doorbell_stride(dstrd)
}

/// BAR0 offset of the completion queue head doorbell of queue `qid`.
pub const fn cq_head_doorbell(qid: u16, dstrd: u8) -> u64 {
    DOORBELL_BASE + (2 * qid as u64 + 1) * doorbell_stride(dstrd)
}

/// Which doorbell a BAR0 offset is: `(queue id, is the CQ head doorbell)`.
pub const fn decode_doorbell(offset: u64, dstrd: u8) -> Option<(u16, bool)> {
    if offset < DOORBELL_BASE {
        return None;
    }
    let rel = offset - DOORBELL_BASE;
    let stride = doorbell_stride(dstrd);
    if !rel.is_multiple_of(stride) {
        return None;
    }
    let n = rel / stride;
    if n / 2 > u16::MAX as u64 {
        return None;
    }
    Some(((n / 2) as u16, n % 2 == 1))
}

/// The 4 KiB BAR0 page holding queue `qid`'s doorbells (the same page for both with DSTRD ≥ 9
/// only if the stride is ≤ 2 KiB; with DSTRD 9 queue pair `qid` owns page `1 + qid`).
pub const fn doorbell_page(qid: u16, dstrd: u8) -> u64 {
    sq_tail_doorbell(qid, dstrd) / 4096
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn register_offsets_match_the_spec() {
        assert_eq!((CAP, VS, INTMS, INTMC, CC), (0, 8, 0xc, 0x10, 0x14));
        assert_eq!((CSTS, NSSR, AQA, ASQ, ACQ), (0x1c, 0x20, 0x24, 0x28, 0x30));
    }

    #[test]
    fn doorbells_with_dstrd_9_get_a_page_per_queue_pair() {
        assert_eq!(sq_tail_doorbell(0, 9), 0x1000);
        assert_eq!(cq_head_doorbell(0, 9), 0x1800);
        assert_eq!(sq_tail_doorbell(1, 9), 0x2000);
        assert_eq!(cq_head_doorbell(3, 9), 0x4800);
        for q in 0..16 {
            assert_eq!(doorbell_page(q, 9), 1 + q as u64);
            assert_eq!(cq_head_doorbell(q, 9) / 4096, 1 + q as u64);
        }
        assert_eq!(decode_doorbell(0x2800, 9), Some((1, true)));
        assert_eq!(decode_doorbell(0x2804, 9), None);
    }

    #[test]
    fn doorbells_with_dstrd_0_share_one_page() {
        assert_eq!(sq_tail_doorbell(0, 0), 0x1000);
        assert_eq!(cq_head_doorbell(0, 0), 0x1004);
        assert_eq!(sq_tail_doorbell(5, 0), 0x1028);
        assert_eq!(decode_doorbell(0x102c, 0), Some((5, true)));
        assert_eq!(decode_doorbell(0xfff, 0), None);
    }

    #[test]
    fn cap_and_aqa_fields() {
        let c = cap::new(1023, 9, 20);
        assert_eq!(cap::mqes(c), 1023);
        assert_eq!(cap::dstrd(c), 9);
        assert_eq!(cap::timeout(c), 20);
        assert_eq!(cap::mpsmin(c), 0);
        assert_ne!(c & (1 << 37), 0);
        let a = aqa::new(32, 64);
        assert_eq!((aqa::sq_entries(a), aqa::cq_entries(a)), (32, 64));
        assert_eq!(cc::iosqes(cc::ENABLE), 6);
        assert_eq!(cc::iocqes(cc::ENABLE), 4);
        assert_eq!(cc::shn(SHN_TEST), cc::SHN_NORMAL);
    }
    const SHN_TEST: u32 = 1 << 14;
}

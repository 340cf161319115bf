//! Validation of the guest's admin commands wherever the hypervisor stands between the guest's
//! admin queue and the device (the admin SQ guard while shadowed, on either side): the
//! opcodes a guest driver needs, no SGLs or fused pairs, and every address the device would
//! DMA inside guest RAM — data in at most two pages (PRP1 and PRP2, no lists, which the guest
//! could rewrite after the check), queues physically contiguous.
use nvme_spec::{opcode::admin, Sqe, Status};

/// Largest admin data transfer accepted: PRP1 and PRP2, no list.
pub const MAX_ADMIN_DATA: u64 = 8192;
const PAGE: u64 = 4096;

/// Feature ids that move data through PRPs (Ferry's admin validation refuses them): LBA Range
/// Type, Host Memory Buffer, Timestamp, Host Identifier and anything vendor-specific.
fn feature_has_data(fid: u8) -> bool {
    matches!(fid, 0x03 | 0x0d | 0x0e | 0x81) || fid >= 0xc0
}

/// Bytes of data an admin command moves through its PRPs (None: not an allowed opcode).
fn data_len(sqe: &Sqe) -> Result<u64, Status> {
    Ok(match sqe.opcode() {
        admin::IDENTIFY => 4096,
        admin::GET_LOG_PAGE => {
            let dwords = ((sqe.cdw(11) & 0xffff) as u64) << 16 | (sqe.cdw(10) >> 16) as u64;
            (dwords + 1) * 4
        }
        admin::GET_FEATURES | admin::SET_FEATURES => {
            if feature_has_data(sqe.cdw(10) as u8) {
                return Err(Status::INVALID_FIELD);
            }
            0
        }
        admin::DELETE_SQ | admin::DELETE_CQ | admin::ABORT | admin::ASYNC_EVENT => 0,
        admin::CREATE_SQ | admin::CREATE_CQ => 0, // the queue itself is checked below
        _ => return Err(Status::INVALID_OPCODE),
    })
}

/// Checks a guest admin command; `in_ram(gpa, len)` says whether a range is guest RAM.
/// Returns the status to complete it with when it is refused.
pub fn check_admin(sqe: &Sqe, in_ram: &dyn Fn(u64, u64) -> bool) -> Result<(), Status> {
    if sqe.fuse() != 0 || sqe.psdt() != 0 {
        return Err(Status::INVALID_FIELD);
    }
    match sqe.opcode() {
        admin::CREATE_SQ | admin::CREATE_CQ => {
            let (entry, pc) = if sqe.opcode() == admin::CREATE_SQ {
                (64, sqe.cdw(11) & 1 != 0)
            } else {
                (16, sqe.cdw(11) & 1 != 0)
            };
            let entries = (sqe.cdw(10) >> 16) as u64 + 1;
            let base = sqe.prp1();
            if !pc {
                return Err(Status::INVALID_FIELD); // PRP-list queues: not accepted
            }
            if !base.is_multiple_of(PAGE) {
                return Err(Status::INVALID_PRP_OFFSET);
            }
            if !in_ram(base, entries * entry) {
                return Err(Status::DATA_TRANSFER_ERROR);
            }
            return Ok(());
        }
        _ => {}
    }
    let len = data_len(sqe)?;
    if len == 0 {
        return Ok(());
    }
    if len > MAX_ADMIN_DATA {
        return Err(Status::INVALID_FIELD);
    }
    let (prp1, prp2) = (sqe.prp1(), sqe.prp2());
    if !prp1.is_multiple_of(4) {
        return Err(Status::INVALID_PRP_OFFSET);
    }
    let first = (PAGE - prp1 % PAGE).min(len);
    if !in_ram(prp1, first) {
        return Err(Status::DATA_TRANSFER_ERROR);
    }
    let rest = len - first;
    if rest > PAGE {
        return Err(Status::INVALID_FIELD); // would need a PRP list
    }
    if rest > 0 {
        if !prp2.is_multiple_of(PAGE) {
            return Err(Status::INVALID_PRP_OFFSET);
        }
        if !in_ram(prp2, rest) {
            return Err(Status::DATA_TRANSFER_ERROR);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use nvme_spec::opcode::cns;

    use super::*;

    const RAM: std::ops::Range<u64> = 0x10_0000..0x20_0000;

    fn in_ram(gpa: u64, len: u64) -> bool {
        gpa.checked_add(len)
            .is_some_and(|end| gpa >= RAM.start && end <= RAM.end)
    }

    fn identify(prp1: u64, prp2: u64) -> Sqe {
        let mut s = Sqe::new(admin::IDENTIFY, 1);
        s.set_prps(prp1, prp2).set_cdw(10, cns::CONTROLLER as u32);
        s
    }

    #[test]
    fn guest_admin_commands_reach_only_guest_ram() {
        assert_eq!(check_admin(&identify(0x10_1000, 0), &in_ram), Ok(()));
        assert_eq!(
            check_admin(&identify(0x10_1800, 0x10_5000), &in_ram),
            Ok(())
        );
        // Data aimed at hypervisor memory (the admin queue or bounce areas above RAM).
        for (p1, p2) in [
            (0x1_4000_0000, 0),
            (0x10_1800, 0x1_4000_0000),
            (0x1f_f800, 0x20_0000),
        ] {
            assert_eq!(
                check_admin(&identify(p1, p2), &in_ram),
                Err(Status::DATA_TRANSFER_ERROR),
                "{p1:#x}/{p2:#x}"
            );
        }
        assert_eq!(
            check_admin(&identify(0x10_1002, 0), &in_ram),
            Err(Status::INVALID_PRP_OFFSET)
        );
        // A log page that would need a PRP list.
        let mut log = Sqe::new(admin::GET_LOG_PAGE, 2);
        log.set_prps(0x10_0000, 0x10_1000)
            .set_cdw(10, 0x02 | (16383 << 16));
        assert_eq!(check_admin(&log, &in_ram), Err(Status::INVALID_FIELD));
        log.set_cdw(10, 0x02 | (127 << 16));
        assert_eq!(check_admin(&log, &in_ram), Ok(()));
        // Queues: inside RAM and contiguous only.
        let mut cq = Sqe::new(admin::CREATE_CQ, 3);
        cq.set_prps(0x1f_f000, 0)
            .set_cdw(10, 1 | (511 << 16))
            .set_cdw(11, 1);
        assert_eq!(check_admin(&cq, &in_ram), Err(Status::DATA_TRANSFER_ERROR));
        cq.set_prps(0x10_0000, 0);
        assert_eq!(check_admin(&cq, &in_ram), Ok(()));
        cq.set_cdw(11, 0);
        assert_eq!(check_admin(&cq, &in_ram), Err(Status::INVALID_FIELD));
        // Opcodes the guest has no business sending, SGLs, data-moving features.
        for op in [0x10u8, 0x11, 0x80, 0x81, 0x19, 0x7f, 0xc0] {
            assert_eq!(
                check_admin(&Sqe::new(op, 4), &in_ram),
                Err(Status::INVALID_OPCODE),
                "{op:#x}"
            );
        }
        let mut sgl = identify(0x10_1000, 0);
        sgl.dw[0] |= 1 << 14;
        assert_eq!(check_admin(&sgl, &in_ram), Err(Status::INVALID_FIELD));
        let mut hmb = Sqe::new(admin::SET_FEATURES, 5);
        hmb.set_cdw(10, 0x0d);
        assert_eq!(check_admin(&hmb, &in_ram), Err(Status::INVALID_FIELD));
        let mut nq = Sqe::new(admin::SET_FEATURES, 6);
        nq.set_cdw(10, 0x07).set_cdw(11, 0x0003_0003);
        assert_eq!(check_admin(&nq, &in_ram), Ok(()));
    }
}

//! The controller's admin command set: Identify, queue creation and deletion, features, log
//! pages, Abort, Async Event Request — every field the host sends checked before use.
use super::*;

impl Controller {
    /// Sends `len` bytes of `self.buf` (after filling it with `fill`) to the host.
    pub(super) fn send(&mut self, sqe: &Sqe, len: usize, fill: impl FnOnce(&mut [u8])) -> Status {
        self.buf[..len].fill(0);
        fill(&mut self.buf[..len]);
        self.transfer_out(sqe.prp1(), sqe.prp2(), len)
    }

    pub(super) fn admin(&mut self, sqe: &Sqe) -> Option<(u32, Status)> {
        self.stats.admin_commands += 1;
        let r = if sqe.psdt() != 0 || sqe.fuse() != 0 {
            Some((0, Status::INVALID_FIELD))
        } else {
            self.admin_inner(sqe)
        };
        if let Some((_, st)) = r {
            if !st.is_success() {
                self.stats.admin_errors += 1;
                tracing::debug!(opcode = sqe.opcode(), status = %st, "admin command failed");
            }
        }
        r
    }

    pub(super) fn admin_inner(&mut self, sqe: &Sqe) -> Option<(u32, Status)> {
        let ok = |r: u32| Some((r, Status::SUCCESS));
        let err = |s: Status| Some((0, s));
        let qid = (sqe.cdw(10) & 0xffff) as u16;
        let qsize = (sqe.cdw(10) >> 16) + 1;
        match sqe.opcode() {
            admin::IDENTIFY => {
                let cns = sqe.cdw(10) as u8;
                let nsid = sqe.nsid();
                let st = match cns {
                    cns::CONTROLLER => {
                        let page = self.identify_controller();
                        self.send(sqe, identify::SIZE, |b| b.copy_from_slice(&page))
                    }
                    cns::NAMESPACE if nsid == 1 => {
                        let page = self.identify_namespace();
                        self.send(sqe, identify::SIZE, |b| b.copy_from_slice(&page))
                    }
                    cns::NAMESPACE => Status::INVALID_NAMESPACE,
                    cns::ACTIVE_NAMESPACES if nsid < 0xffff_fffe => {
                        self.send(sqe, identify::SIZE, |b| {
                            if nsid < 1 {
                                b[0..4].copy_from_slice(&1u32.to_le_bytes());
                            }
                        })
                    }
                    cns::ACTIVE_NAMESPACES => Status::INVALID_NAMESPACE,
                    _ => Status::INVALID_FIELD,
                };
                err(st)
            }
            admin::CREATE_CQ => {
                let pc = sqe.cdw(11) & 1 != 0;
                let ien = sqe.cdw(11) & 2 != 0;
                let vector = (sqe.cdw(11) >> 16) as u16;
                if qid == 0 || qid > self.granted().1 || self.cqs[qid as usize].is_some() {
                    return err(Status::INVALID_QUEUE_ID);
                }
                if !(2..=MAX_QUEUE_ENTRIES).contains(&qsize) {
                    return err(Status::INVALID_QUEUE_SIZE);
                }
                if !pc || !sqe.prp1().is_multiple_of(PAGE_SIZE) {
                    return err(Status::INVALID_FIELD);
                }
                if ien && vector >= MSIX_VECTORS {
                    return err(Status::INVALID_VECTOR);
                }
                if !self.dma.contains(sqe.prp1(), qsize as u64 * 16) {
                    self.stats.dma_errors += 1;
                    return err(Status::DATA_TRANSFER_ERROR);
                }
                self.cqs[qid as usize] = Some(Cq {
                    base: sqe.prp1(),
                    entries: qsize as u16,
                    tail: 0,
                    head: 0,
                    phase: true,
                    ien,
                    vector,
                    bad_head: None,
                });
                let off = self.db_offset(qid, true);
                self.doorbells.write(off, 0);
                ok(0)
            }
            admin::CREATE_SQ => {
                let pc = sqe.cdw(11) & 1 != 0;
                let cqid = (sqe.cdw(11) >> 16) as u16;
                if qid == 0 || qid > self.granted().0 || self.sqs[qid as usize].is_some() {
                    return err(Status::INVALID_QUEUE_ID);
                }
                if !(2..=MAX_QUEUE_ENTRIES).contains(&qsize) {
                    return err(Status::INVALID_QUEUE_SIZE);
                }
                if cqid == 0 || self.cqs.get(cqid as usize).is_none_or(|c| c.is_none()) {
                    return err(Status::CQ_INVALID);
                }
                if !pc || !sqe.prp1().is_multiple_of(PAGE_SIZE) {
                    return err(Status::INVALID_FIELD);
                }
                if !self.dma.contains(sqe.prp1(), qsize as u64 * 64) {
                    self.stats.dma_errors += 1;
                    return err(Status::DATA_TRANSFER_ERROR);
                }
                self.sqs[qid as usize] = Some(Sq {
                    base: sqe.prp1(),
                    entries: qsize as u16,
                    cqid,
                    head: 0,
                    bad_tail: None,
                });
                let off = self.db_offset(qid, false);
                self.doorbells.write(off, 0);
                self.stats.io_queues_created += 1;
                ok(0)
            }
            admin::DELETE_SQ => {
                if qid == 0 || self.sqs.get(qid as usize).is_none_or(|s| s.is_none()) {
                    return err(Status::INVALID_QUEUE_ID);
                }
                self.sqs[qid as usize] = None;
                ok(0)
            }
            admin::DELETE_CQ => {
                if qid == 0 || self.cqs.get(qid as usize).is_none_or(|c| c.is_none()) {
                    return err(Status::INVALID_QUEUE_ID);
                }
                if self.sqs.iter().flatten().any(|s| s.cqid == qid) {
                    return err(Status::INVALID_QUEUE_DELETION);
                }
                self.cqs[qid as usize] = None;
                ok(0)
            }
            admin::SET_FEATURES => {
                let fid = sqe.cdw(10) as u8;
                if sqe.cdw(10) & (1 << 31) != 0 {
                    return err(Status::FEATURE_NOT_SAVEABLE);
                }
                let v = sqe.cdw(11);
                match fid {
                    feature::NUMBER_OF_QUEUES => {
                        let (nsq, ncq) = ((v & 0xffff) + 1, (v >> 16) + 1);
                        if nsq > 0xffff || ncq > 0xffff {
                            return err(Status::INVALID_FIELD);
                        }
                        let g = |n: u32| n.min(MAX_IO_QUEUES as u32) - 1;
                        let granted = g(nsq) | g(ncq) << 16;
                        self.features.insert(fid, granted);
                        ok(granted)
                    }
                    feature::ARBITRATION
                    | feature::POWER_MANAGEMENT
                    | feature::TEMPERATURE_THRESHOLD
                    | feature::ERROR_RECOVERY
                    | feature::VOLATILE_WRITE_CACHE
                    | feature::INTERRUPT_COALESCING
                    | feature::INTERRUPT_VECTOR_CONFIG
                    | feature::WRITE_ATOMICITY
                    | feature::ASYNC_EVENT_CONFIG => {
                        self.features.insert(fid, v);
                        ok(0)
                    }
                    _ => err(Status::INVALID_FIELD),
                }
            }
            admin::GET_FEATURES => {
                let fid = sqe.cdw(10) as u8;
                let select = (sqe.cdw(10) >> 8) & 7;
                let default = match fid {
                    feature::NUMBER_OF_QUEUES => {
                        let m = MAX_IO_QUEUES as u32 - 1;
                        m | m << 16
                    }
                    feature::VOLATILE_WRITE_CACHE => 1,
                    feature::ARBITRATION
                    | feature::POWER_MANAGEMENT
                    | feature::TEMPERATURE_THRESHOLD
                    | feature::ERROR_RECOVERY
                    | feature::INTERRUPT_COALESCING
                    | feature::INTERRUPT_VECTOR_CONFIG
                    | feature::WRITE_ATOMICITY
                    | feature::ASYNC_EVENT_CONFIG => 0,
                    _ => return err(Status::INVALID_FIELD),
                };
                match select {
                    0 => ok(self.features.get(&fid).copied().unwrap_or(default)),
                    1 | 2 => ok(default),
                    3 => ok(0b100), // changeable, not saveable
                    _ => err(Status::INVALID_FIELD),
                }
            }
            admin::GET_LOG_PAGE => {
                let lid = sqe.cdw(10) as u8;
                let numd = ((sqe.cdw(10) >> 16) as u64 | ((sqe.cdw(11) & 0xffff) as u64) << 16) + 1;
                let len = numd * 4;
                let lpo = sqe.cdw(12) as u64 | (sqe.cdw(13) as u64) << 32;
                if len > MAX_TRANSFER || !lpo.is_multiple_of(4) {
                    return err(Status::INVALID_FIELD);
                }
                let page = match lid {
                    log::ERROR => vec![0u8; 64],
                    log::SMART => self.smart_log(),
                    _ => return err(Status::INVALID_LOG_PAGE),
                };
                if lpo > page.len() as u64 {
                    return err(Status::INVALID_FIELD);
                }
                let st = self.send(sqe, len as usize, |b| {
                    let src = &page[lpo as usize..];
                    let n = src.len().min(b.len());
                    b[..n].copy_from_slice(&src[..n]);
                });
                err(st)
            }
            admin::ABORT => ok(1), // bit 0 set: command not aborted
            admin::ASYNC_EVENT => {
                if self.aers >= AER_LIMIT {
                    return err(Status::new(1, 0x05));
                }
                self.aers += 1;
                None
            }
            _ => err(Status::INVALID_OPCODE),
        }
    }

    pub(super) fn granted(&self) -> (u16, u16) {
        match self.features.get(&feature::NUMBER_OF_QUEUES) {
            Some(v) => ((v & 0xffff) as u16 + 1, (v >> 16) as u16 + 1),
            None => (MAX_IO_QUEUES, MAX_IO_QUEUES),
        }
    }

    pub(super) fn identify_controller(&self) -> [u8; identify::SIZE] {
        use identify::{ctrl, put};
        let mut p = [0u8; identify::SIZE];
        let ascii = |p: &mut [u8], off: usize, len: usize, s: &str| {
            let mut f = vec![b' '; len];
            f[..s.len().min(len)].copy_from_slice(&s.as_bytes()[..s.len().min(len)]);
            put(p, off, &f);
        };
        put(&mut p, ctrl::VID, &crate::layout::VENDOR_ID.to_le_bytes());
        put(&mut p, ctrl::SSVID, &crate::layout::VENDOR_ID.to_le_bytes());
        ascii(&mut p, ctrl::SN, 20, "FERRY-STANDIN-0001");
        ascii(&mut p, ctrl::MN, 40, "Ferry stand-in NVMe controller");
        ascii(&mut p, ctrl::FR, 8, "1.0");
        p[ctrl::MDTS] = MDTS;
        put(&mut p, ctrl::CNTLID, &1u16.to_le_bytes());
        put(&mut p, ctrl::VER, &regs::VERSION_1_4.to_le_bytes());
        p[ctrl::ACL] = 3;
        p[ctrl::AERL] = (AER_LIMIT - 1) as u8;
        p[ctrl::LPA] = 0;
        p[ctrl::ELPE] = 0;
        p[ctrl::SQES] = 0x66;
        p[ctrl::CQES] = 0x44;
        put(
            &mut p,
            ctrl::MAXCMD,
            &(MAX_QUEUE_ENTRIES as u16).to_le_bytes(),
        );
        put(&mut p, ctrl::NN, &1u32.to_le_bytes());
        p[ctrl::VWC] = 1;
        put(&mut p, ctrl::SGLS, &0u32.to_le_bytes()); // SGLs not supported
        let nqn = b"nqn.2024-01.dev.ferry:nvme:stand-in";
        put(&mut p, ctrl::SUBNQN, nqn);
        p
    }

    pub(super) fn identify_namespace(&self) -> [u8; identify::SIZE] {
        use identify::{ns, put};
        let mut p = [0u8; identify::SIZE];
        let blocks = self.ns.blocks();
        put(&mut p, ns::NSZE, &blocks.to_le_bytes());
        put(&mut p, ns::NCAP, &blocks.to_le_bytes());
        put(&mut p, ns::NUSE, &blocks.to_le_bytes());
        p[ns::NLBAF] = 0;
        p[ns::FLBAS] = 0;
        let lbads = self.ns.block_size().trailing_zeros();
        put(&mut p, ns::LBAF0, &(lbads << 16).to_le_bytes());
        p
    }

    pub(super) fn smart_log(&self) -> Vec<u8> {
        let mut p = vec![0u8; 512];
        p[1..3].copy_from_slice(&313u16.to_le_bytes()); // 40 °C in kelvin
        p[3] = 100; // available spare
        p[4] = 10; // spare threshold
        let units = |bytes: u64| (bytes / 512).div_ceil(1000) as u128;
        p[32..48].copy_from_slice(&units(self.stats.bytes_read).to_le_bytes());
        p[48..64].copy_from_slice(&units(self.stats.bytes_written).to_le_bytes());
        p[64..80].copy_from_slice(&(self.stats.reads as u128).to_le_bytes());
        p[80..96].copy_from_slice(&(self.stats.writes as u128).to_le_bytes());
        p[112..128].copy_from_slice(&(self.stats.connections as u128).to_le_bytes());
        p
    }
}

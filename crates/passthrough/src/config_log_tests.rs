//! Tests of the admin mediation and the configuration log.
use super::*;
use nvme_spec::{
    identify,
    opcode::{admin, cns},
    Status,
};
use std::collections::HashMap;

struct Ram(HashMap<u64, Vec<u8>>);
impl Ram {
    fn read(&self, a: u64, b: &mut [u8]) -> bool {
        match self.0.get(&a) {
            Some(v) => {
                b.copy_from_slice(&v[..b.len()]);
                true
            }
            None => false,
        }
    }
}

fn enable(m: &mut AdminMediator) {
    m.register_write(regs::AQA, &aqa::new(4, 4).to_le_bytes());
    m.register_write(regs::ASQ, &0x10000u64.to_le_bytes());
    m.register_write(regs::ACQ, &0x20000u64.to_le_bytes());
    m.register_write(regs::CC, &cc::ENABLE.to_le_bytes());
}

#[test]
fn admin_data_the_device_writes_is_recorded_at_completion() {
    let mut m = AdminMediator::default();
    enable(&mut m);
    let mut ram = Ram(HashMap::new());
    let mut id = Sqe::new(admin::IDENTIFY, 1);
    id.set_prps(0x30000, 0).set_cdw(10, 1);
    // Get Log Page of 3 pages starting mid-page: PRP1, then a list with 3 entries.
    let mut log = Sqe::new(admin::GET_LOG_PAGE, 2);
    log.set_prps(0x40800, 0x50000)
        .set_cdw(10, 2 | ((3 * 1024 - 1) << 16));
    let mut set = Sqe::new(admin::SET_FEATURES, 3);
    set.set_prps(0x60000, 0).set_cdw(10, 7);
    for (i, s) in [id, log, set].iter().enumerate() {
        ram.0.insert(0x10000 + i as u64 * 64, s.to_bytes().to_vec());
    }
    let list: Vec<u8> = [0x41000u64, 0x47000, 0x48000]
        .iter()
        .flat_map(|p| p.to_le_bytes())
        .collect();
    ram.0.insert(0x50000, list);
    m.sq_tail_write(3, |a, b| ram.read(a, b));
    assert!(
        m.take_device_written().is_empty(),
        "nothing before completion"
    );
    for (i, cid) in [1u16, 2, 3].iter().enumerate() {
        ram.0.insert(
            0x20000 + i as u64 * 16,
            Cqe::new(0, 0, 0, *cid, Status::SUCCESS, true)
                .to_bytes()
                .to_vec(),
        );
    }
    m.cq_head_write(3, |a, b| ram.read(a, b));
    assert_eq!(
        m.take_device_written(),
        vec![0x20000, 0x30000, 0x40000, 0x41000, 0x47000, 0x48000],
        "the completion queue's page, Identify's page and the log's four; Set Features \
         writes nothing"
    );
    assert!(m.take_device_written().is_empty());
}

#[test]
fn unanswered_counts_commands_without_a_posted_completion() {
    let mut m = AdminMediator::default();
    enable(&mut m);
    let mut ram = Ram(HashMap::new());
    for (i, cid) in [1u16, 2, 3].iter().enumerate() {
        let sqe = Sqe::new(admin::IDENTIFY, *cid);
        ram.0
            .insert(0x10000 + i as u64 * 64, sqe.to_bytes().to_vec());
    }
    // An empty CQ (all zero, phase 0): the device answers with phase 1.
    for i in 0..4u64 {
        ram.0.insert(0x20000 + i * 16, vec![0; 16]);
    }
    m.sq_tail_write(3, |a, b| ram.read(a, b));
    assert_eq!(m.unanswered(|a, b| ram.read(a, b)), 3);
    let done = |cid| {
        Cqe::new(0, 0, 0, cid, Status::SUCCESS, true)
            .to_bytes()
            .to_vec()
    };
    ram.0.insert(0x20000, done(2));
    assert_eq!(m.unanswered(|a, b| ram.read(a, b)), 2, "cid 2 answered");
    ram.0.insert(0x20010, done(1));
    assert_eq!(m.unanswered(|a, b| ram.read(a, b)), 1);
    // The guest consumes both: pending drops, the last one is still unanswered.
    m.cq_head_write(2, |a, b| ram.read(a, b));
    assert_eq!((m.pending(), m.unanswered(|a, b| ram.read(a, b))), (1, 1));
    ram.0.insert(0x20020, done(3));
    assert_eq!(m.unanswered(|a, b| ram.read(a, b)), 0);
}

#[test]
fn queues_and_features_follow_completions() {
    let mut m = AdminMediator::default();
    enable(&mut m);
    assert_eq!((m.log.asq, m.log.acq, m.log.enables), (0x10000, 0x20000, 1));
    let mut ram = Ram(HashMap::new());
    let mut cq = Sqe::new(admin::CREATE_CQ, 1);
    cq.set_prps(0x30000, 0)
        .set_cdw(10, 63 << 16 | 1)
        .set_cdw(11, 1);
    let mut sq = Sqe::new(admin::CREATE_SQ, 2);
    sq.set_prps(0x40000, 0)
        .set_cdw(10, 63 << 16 | 1)
        .set_cdw(11, 1 | 1 << 16);
    let mut bad = Sqe::new(admin::CREATE_SQ, 3);
    bad.set_cdw(10, 7);
    ram.0.insert(0x10000, cq.to_bytes().to_vec());
    ram.0.insert(0x10040, sq.to_bytes().to_vec());
    ram.0.insert(0x10080, bad.to_bytes().to_vec());
    m.sq_tail_write(3, |a, b| ram.read(a, b));
    assert_eq!(m.log.admin_submitted, 3);
    assert!(m.log.io_cqs.is_empty(), "nothing applies before completion");
    ram.0.insert(
        0x20000,
        Cqe::new(0, 1, 0, 1, Status::SUCCESS, true)
            .to_bytes()
            .to_vec(),
    );
    ram.0.insert(
        0x20010,
        Cqe::new(0, 2, 0, 2, Status::SUCCESS, true)
            .to_bytes()
            .to_vec(),
    );
    ram.0.insert(
        0x20020,
        Cqe::new(0, 3, 0, 3, Status::INVALID_QUEUE_ID, true)
            .to_bytes()
            .to_vec(),
    );
    m.cq_head_write(3, |a, b| ram.read(a, b));
    assert_eq!(m.log.io_cqs[&1].entries, 64);
    assert_eq!(m.log.io_sqs[&1].cqid, 1);
    assert_eq!((m.log.admin_completed, m.log.admin_failed), (3, 1));
    assert!(!m.log.io_sqs.contains_key(&7));
    assert_eq!(m.log.history.len(), 3);
    assert_eq!(m.log.history[2].status, Some(Status::INVALID_QUEUE_ID.0));

    // A reset forgets the queues.
    m.register_write(regs::CC, &0u32.to_le_bytes());
    assert!(m.log.io_cqs.is_empty() && m.log.io_sqs.is_empty());
    assert_eq!(m.log.resets, 1);
}

#[test]
fn identify_data_in_guest_ram_is_never_trusted() {
    let mut m = AdminMediator::default();
    enable(&mut m);
    let mut ram = Ram(HashMap::new());
    let mut ns = Sqe::new(admin::IDENTIFY, 1);
    ns.set_nsid(1)
        .set_prps(0x50000, 0)
        .set_cdw(10, cns::NAMESPACE as u32);
    let mut ctrl = Sqe::new(admin::IDENTIFY, 2);
    ctrl.set_prps(0x60000, 0)
        .set_cdw(10, cns::CONTROLLER as u32);
    ram.0.insert(0x10000, ns.to_bytes().to_vec());
    ram.0.insert(0x10040, ctrl.to_bytes().to_vec());
    let mut page = vec![0u8; 4096];
    page[identify::ns::NSZE..identify::ns::NSZE + 8].copy_from_slice(&1000u64.to_le_bytes());
    // What a hostile guest writes over the data before it consumes the completion: a 512-byte
    // LBA format where the device has 4 KiB, and no transfer limit.
    page[identify::ns::FLBAS] = 1;
    page[identify::ns::LBAF0 + 4 + 2] = 9;
    ram.0.insert(0x50000, page);
    let mut page = vec![0u8; 4096];
    page[identify::ctrl::MDTS] = 0;
    ram.0.insert(0x60000, page);
    m.sq_tail_write(2, |a, b| ram.read(a, b));
    for (i, cid) in [(0u64, 1u16), (1, 2)] {
        ram.0.insert(
            0x20000 + i * 16,
            Cqe::new(0, 2, 0, cid, Status::SUCCESS, true)
                .to_bytes()
                .to_vec(),
        );
    }
    m.cq_head_write(2, |a, b| ram.read(a, b));
    assert_eq!(m.log.admin_completed, 2);
    // The limits come from the hypervisor's own Identify only (the attachment fills them in).
    assert!(m.log.namespaces.is_empty(), "{:?}", m.log.namespaces);
    assert_eq!(m.log.mdts, None);
}

#[test]
fn hostile_doorbells_and_unreadable_entries_are_counted() {
    let mut m = AdminMediator::default();
    m.sq_tail_write(1, |_, _| true);
    assert_eq!(m.log.anomalies, 1, "not enabled");
    enable(&mut m);
    m.sq_tail_write(4, |_, _| true);
    m.sq_tail_write(u32::MAX, |_, _| true);
    assert_eq!(m.log.anomalies, 3, "out of range tails");
    m.sq_tail_write(2, |_, _| false);
    assert_eq!(m.log.anomalies, 5, "two unreadable entries");
    m.cq_head_write(1, |_, b| {
        b.fill(0);
        true
    });
    assert_eq!(m.log.anomalies, 6, "completion for an unknown command");
    assert!(m.log.summary().contains("0 I/O SQ"));
}

fn restorable() -> (ConfigLog, RestoreBounds) {
    let mut log = ConfigLog {
        cc: cc::ENABLE,
        aqa: aqa::new(16, 16),
        asq: 0x1000,
        acq: 0x2000,
        ..Default::default()
    };
    log.io_cqs.insert(
        1,
        CqConfig {
            base: 0x4000,
            entries: 256,
            interrupts: true,
            vector: 1,
        },
    );
    log.io_sqs.insert(
        1,
        SqConfig {
            base: 0x8000,
            entries: 256,
            cqid: 1,
            priority: 0,
        },
    );
    let bounds = RestoreBounds {
        ram: std::iter::once(0..1 << 20).collect(),
        max_queue_entries: 1024,
        msix_vectors: 2,
        dstrd: 0,
        bar0_size: 1 << 14,
    };
    (log, bounds)
}

#[test]
fn a_log_from_another_host_is_checked_before_replay() {
    let (log, b) = restorable();
    log.validate((0, 0), &b).unwrap();
    let refuse = |f: &dyn Fn(&mut ConfigLog), admin: (u32, u32)| {
        let mut l = log.clone();
        f(&mut l);
        l.validate(admin, &b).unwrap_err()
    };
    assert!(matches!(
        refuse(&|l| l.io_cqs.get_mut(&1).unwrap().entries = 0, (0, 0)),
        StateError::QueueSize { entries: 0, .. }
    ));
    assert!(matches!(
        refuse(&|l| l.io_sqs.get_mut(&1).unwrap().entries = 1 << 20, (0, 0)),
        StateError::QueueSize { kind: "SQ", .. }
    ));
    assert!(matches!(
        refuse(&|l| l.io_sqs.get_mut(&1).unwrap().base = !0xfff, (0, 0)),
        StateError::QueueRing { kind: "SQ", .. }
    ));
    assert!(matches!(
        refuse(&|l| l.io_cqs.get_mut(&1).unwrap().base = 1 << 20, (0, 0)),
        StateError::QueueRing { kind: "CQ", .. }
    ));
    assert!(matches!(
        refuse(&|l| l.io_cqs.get_mut(&1).unwrap().vector = 2, (0, 0)),
        StateError::Vector { vector: 2, .. }
    ));
    assert!(matches!(
        refuse(&|l| l.io_sqs.get_mut(&1).unwrap().cqid = 7, (0, 0)),
        StateError::MissingCq { cqid: 7, .. }
    ));
    assert!(matches!(
        refuse(
            &|l| {
                let q = l.io_cqs[&1];
                l.io_cqs.insert(0, q);
            },
            (0, 0)
        ),
        StateError::QueueId { qid: 0, .. }
    ));
    assert!(matches!(
        refuse(&|_| {}, (16, 0)),
        StateError::AdminPositions { sq_tail: 16, .. }
    ));
    assert!(matches!(
        refuse(&|l| l.aqa = 0, (0, 0)),
        StateError::AdminSize { sq: 1, .. }
    ));
    assert!(matches!(
        refuse(&|l| l.acq = 1 << 20, (0, 0)),
        StateError::AdminRing { ring: "CQ", .. }
    ));
    assert!(matches!(
        refuse(
            &|l| l.history = vec![
                l.history.first().cloned().unwrap_or(AdminRecord {
                    opcode: 0,
                    cid: 0,
                    cdw10: 0,
                    cdw11: 0,
                    status: None,
                    result: 0,
                });
                HISTORY + 1
            ],
            (0, 0)
        ),
        StateError::TooLong { .. }
    ));
}

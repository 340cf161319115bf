//! The destination's restore path fed hostile device states: every one is refused with a
//! clear, typed error before anything is allocated, mapped or sent to the device; nothing
//! panics. The pure checks run against bounds written here; the last tests run the real
//! restore (`Engine::restore`) under KVM against an in-process stand-in controller.
use std::{collections::BTreeMap, path::PathBuf, sync::Arc};

use nvme_device::{DeviceConfig, NvmeDevice};
use nvme_spec::regs::{aqa, cc};
use passthrough::{
    config_log::{CqConfig, NamespaceInfo, RestoreBounds, SqConfig},
    msix::MsixState,
    AttachOptions, Attachment, ConfigLog,
};
use shadow::{
    engine::{
        device::{PrecopyDevice, SavedDevice},
        limits_from, EngineOptions,
    },
    nvme::{NvmeQueue, QueueGeometry, QueueState},
    Engine, Error, StateError, VecBuffers,
};
use vmm::{devices::serial::ConsoleSink, Vm, VmConfig};

const RAM: u64 = 64 << 20;

/// Two queue pairs of 64 entries, rings inside the first 1 MiB, admin queue of 32.
fn valid() -> SavedDevice {
    let mut config = ConfigLog {
        cc: cc::ENABLE,
        aqa: aqa::new(32, 32),
        asq: 0x10000,
        acq: 0x11000,
        mdts: Some(5),
        namespaces: BTreeMap::from([(
            1,
            NamespaceInfo {
                block_size: 512,
                blocks: 16384,
            },
        )]),
        ..Default::default()
    };
    let mut queues = Vec::new();
    for qid in 1..=2u16 {
        let geometry = QueueGeometry {
            qid,
            sq_base: 0x20000 + qid as u64 * 0x10000,
            sq_entries: 64,
            cq_base: 0x80000 + qid as u64 * 0x10000,
            cq_entries: 64,
        };
        config.io_cqs.insert(
            qid,
            CqConfig {
                base: geometry.cq_base,
                entries: 64,
                interrupts: true,
                vector: qid,
            },
        );
        config.io_sqs.insert(
            qid,
            SqConfig {
                base: geometry.sq_base,
                entries: 64,
                cqid: qid,
                priority: 0,
            },
        );
        queues.push(QueueState {
            geometry,
            guest: Default::default(),
            device: Default::default(),
            stats: Default::default(),
        });
    }
    SavedDevice {
        limits: limits_from(&config).unwrap(),
        config,
        dstrd: 9,
        doorbells: vec![(0, 0); queues.len()],
        queues,
        admin: (0, 0),
        msix: MsixState {
            table: vec![[0, 0, 0, 1]; 4],
            enabled: true,
            function_masked: false,
        },
    }
}

fn bounds() -> RestoreBounds {
    RestoreBounds {
        ram: std::iter::once(0..RAM).collect(),
        max_queue_entries: 1024,
        msix_vectors: 4,
        dstrd: 9,
        bar0_size: 1 << 16,
    }
}

fn refused(s: &SavedDevice) -> StateError {
    let e = s
        .validate(&bounds())
        .expect_err("a hostile state must be refused");
    // The same state through the wire format is refused the same way.
    let again = SavedDevice::decode(&s.encode().unwrap())
        .unwrap()
        .validate(&bounds())
        .unwrap_err();
    assert_eq!(e.to_string(), again.to_string());
    e
}

fn config_err(e: StateError) -> passthrough::StateError {
    match e {
        StateError::Config(c) => c,
        other => panic!("expected a configuration error, got {other}"),
    }
}

/// Sets queue `i`'s geometry in both the queue state and the configuration log.
fn set_geometry(s: &mut SavedDevice, i: usize, f: impl FnOnce(&mut QueueGeometry)) {
    let old = s.queues[i].geometry.qid;
    f(&mut s.queues[i].geometry);
    let g = s.queues[i].geometry;
    let mut sq = s.config.io_sqs.remove(&old).unwrap();
    let mut cq = s.config.io_cqs.remove(&old).unwrap();
    (sq.base, sq.entries, sq.cqid) = (g.sq_base, g.sq_entries, g.qid);
    (cq.base, cq.entries) = (g.cq_base, g.cq_entries);
    s.config.io_sqs.insert(g.qid, sq);
    s.config.io_cqs.insert(g.qid, cq);
}

#[test]
fn the_valid_state_passes_and_round_trips() {
    let s = valid();
    s.validate(&bounds()).unwrap();
    let back = SavedDevice::decode(&s.encode().unwrap()).unwrap();
    assert_eq!(back, s);
}

#[test]
fn oversized_queue_sizes_are_refused() {
    // Beyond the device's maximum (CAP.MQES + 1 = 1024), in the queue state only.
    let mut s = valid();
    s.queues[0].geometry.sq_entries = 2048;
    assert!(matches!(
        refused(&s),
        StateError::QueueSize {
            qid: 1,
            ring: "SQ",
            entries: 2048,
            max: 1024
        }
    ));
    // Beyond NVMe's 65536, in the log and the state alike: the log is refused first.
    let mut s = valid();
    set_geometry(&mut s, 1, |g| g.cq_entries = 70_000);
    let c = config_err(refused(&s));
    assert!(
        matches!(
            c,
            passthrough::StateError::QueueSize {
                kind: "CQ",
                qid: 2,
                entries: 70_000,
                ..
            }
        ),
        "{c}"
    );
    // Zero and one entry.
    for n in [0, 1] {
        let mut s = valid();
        s.queues[1].geometry.cq_entries = n;
        assert!(matches!(refused(&s), StateError::QueueSize { entries, .. } if entries == n));
    }
    // An admin queue of 4096 entries on a device that takes 1024.
    let mut s = valid();
    s.config.aqa = aqa::new(4096, 32);
    let c = config_err(refused(&s));
    assert!(
        matches!(
            c,
            passthrough::StateError::AdminSize {
                sq: 4096,
                max: 1024,
                ..
            }
        ),
        "{c}"
    );
}

#[test]
fn queue_counts_are_bounded() {
    // No queues at all (the guest deleted them before the switchover) is a valid state.
    let mut s = valid();
    s.queues.clear();
    s.doorbells.clear();
    s.config.io_sqs.clear();
    s.config.io_cqs.clear();
    s.validate(&bounds()).unwrap();
    // Queue states without their log queues.
    let mut s = valid();
    s.config.io_sqs.clear();
    s.config.io_cqs.clear();
    assert!(matches!(refused(&s), StateError::NotInLog { qid: 1 }));
    // 1025 queue states (each the same valid one): refused by count before anything else.
    let mut s = valid();
    s.queues = vec![s.queues[0].clone(); 1025];
    s.doorbells = vec![(0, 0); 1025];
    assert!(matches!(
        refused(&s),
        StateError::QueueCount {
            count: 1025,
            max: 1024
        }
    ));
    // Queue states and doorbells that do not pair up.
    let mut s = valid();
    s.doorbells.push((0, 0));
    assert!(matches!(
        refused(&s),
        StateError::Doorbells {
            queues: 2,
            doorbells: 3
        }
    ));
    // A log with more queues than the limit.
    let mut s = valid();
    let cq = s.config.io_cqs[&1];
    for qid in 3..=1100u16 {
        s.config.io_cqs.insert(qid, cq);
    }
    let c = config_err(refused(&s));
    assert!(
        matches!(c, passthrough::StateError::TooManyQueues { kind: "CQ", .. }),
        "{c}"
    );
}

#[test]
fn rings_beyond_ram_or_overflowing_are_refused() {
    // The SQ starts inside RAM and ends beyond it.
    let mut s = valid();
    set_geometry(&mut s, 0, |g| {
        g.sq_base = RAM - 0x1000;
        g.sq_entries = 128;
    });
    let c = config_err(refused(&s));
    assert!(
        matches!(
            c,
            passthrough::StateError::QueueRing {
                kind: "SQ",
                qid: 1,
                ..
            }
        ),
        "{c}"
    );
    // Only the queue state says so (the log is fine): the ring check says what is wrong.
    let mut s = valid();
    s.queues[0].geometry.cq_base = RAM;
    assert!(matches!(
        refused(&s),
        StateError::Ring {
            qid: 1,
            ring: "CQ",
            base: RAM,
            ..
        }
    ));
    // Address + size overflows 64 bits.
    for base in [u64::MAX - 0xfff, !0xfff, 1 << 63] {
        let mut s = valid();
        s.queues[1].geometry.sq_base = base;
        assert!(matches!(
            refused(&s),
            StateError::Ring {
                qid: 2,
                ring: "SQ",
                ..
            }
        ));
        let mut s = valid();
        set_geometry(&mut s, 1, |g| g.cq_base = base);
        assert!(matches!(
            config_err(refused(&s)),
            passthrough::StateError::QueueRing { kind: "CQ", .. }
        ));
    }
    // Not page aligned.
    let mut s = valid();
    s.queues[0].geometry.sq_base += 64;
    assert!(matches!(refused(&s), StateError::Ring { .. }));
    // The admin queue outside RAM, or overflowing.
    for asq in [RAM, !0xfff] {
        let mut s = valid();
        s.config.asq = asq;
        assert!(matches!(
            config_err(refused(&s)),
            passthrough::StateError::AdminRing { ring: "SQ", .. }
        ));
    }
    // Two queues' rings on the same memory.
    let mut s = valid();
    let other = s.queues[0].geometry.sq_base;
    set_geometry(&mut s, 1, |g| g.sq_base = other);
    assert!(matches!(refused(&s), StateError::RingsOverlap { .. }));
}

#[test]
fn duplicate_and_out_of_range_queue_ids_are_refused() {
    let mut s = valid();
    s.queues[1] = s.queues[0].clone();
    assert!(matches!(refused(&s), StateError::DuplicateQueue { qid: 1 }));
    for qid in [0u16, 1025, u16::MAX] {
        let mut s = valid();
        s.queues[1].geometry.qid = qid;
        assert!(matches!(refused(&s), StateError::QueueId { qid: q, .. } if q == qid));
        let mut s = valid();
        set_geometry(&mut s, 1, |g| g.qid = qid);
        assert!(matches!(
            config_err(refused(&s)),
            passthrough::StateError::QueueId { qid: q, .. } if q == qid
        ));
    }
    // A queue the log does not have, and a log queue without a state.
    let mut s = valid();
    s.queues[1].geometry.qid = 3;
    assert!(matches!(refused(&s), StateError::NotInLog { qid: 3 }));
    let mut s = valid();
    s.queues.pop();
    s.doorbells.pop();
    assert!(matches!(refused(&s), StateError::MissingQueue { qid: 2 }));
    // The state and the log disagree on where a ring is.
    let mut s = valid();
    s.queues[0].geometry.cq_base += 0x1000;
    assert!(matches!(refused(&s), StateError::NotInLog { qid: 1 }));
    // An SQ completing into a CQ that does not exist.
    let mut s = valid();
    s.config.io_sqs.get_mut(&2).unwrap().cqid = 9;
    assert!(matches!(
        config_err(refused(&s)),
        passthrough::StateError::MissingCq { qid: 2, cqid: 9 }
    ));
}

#[test]
fn positions_out_of_range_are_refused() {
    type Mutation = fn(&mut SavedDevice);
    let cases: [(&str, Mutation); 7] = [
        ("guest SQ tail", |s| s.queues[0].guest.sq_tail = 64),
        ("guest SQ taken", |s| s.queues[0].guest.sq_taken = u32::MAX),
        ("guest CQ tail", |s| s.queues[1].guest.cq_tail = 64),
        ("guest CQ head", |s| s.queues[1].guest.cq_head = 1000),
        ("device SQ head", |s| s.queues[0].device.sq_head = 64),
        ("SQ tail doorbell", |s| s.doorbells[1].0 = 64),
        ("CQ head doorbell", |s| s.doorbells[0].1 = u32::MAX),
    ];
    for (what, f) in cases {
        let mut s = valid();
        f(&mut s);
        match refused(&s) {
            StateError::Index {
                what: w,
                entries: 64,
                ..
            } => assert_eq!(w, what),
            other => panic!("{what}: {other}"),
        }
    }
    // Counters that would overflow when the destination counts on.
    let mut s = valid();
    s.queues[1].stats.forwarded = u64::MAX;
    assert!(matches!(
        refused(&s),
        StateError::Counter {
            qid: 2,
            what: "forwarded",
            ..
        }
    ));
    let mut s = valid();
    s.config.admin_submitted = u64::MAX;
    assert!(matches!(
        config_err(refused(&s)),
        passthrough::StateError::Counter {
            what: "admin_submitted",
            ..
        }
    ));
    let mut s = valid();
    s.admin = (32, 0);
    assert!(matches!(
        config_err(refused(&s)),
        passthrough::StateError::AdminPositions { sq_tail: 32, .. }
    ));
}

#[test]
fn device_mismatches_and_memory_demands_are_refused() {
    // Another doorbell stride (the guest's doorbell offsets would be wrong), even a huge one.
    for dstrd in [0u8, 15, 255] {
        let mut s = valid();
        s.dstrd = dstrd;
        assert!(matches!(refused(&s), StateError::Dstrd { saved, device: 9 } if saved == dstrd));
    }
    // Validator limits that the log does not imply.
    let mut s = valid();
    s.limits.max_transfer = u64::MAX;
    assert!(matches!(refused(&s), StateError::Limits { .. }));
    // A log without Identify data.
    let mut s = valid();
    s.config.mdts = None;
    assert!(matches!(refused(&s), StateError::NoLimits(_)));
    // A vector the device lacks; an MSI-X table longer than the device's.
    let mut s = valid();
    s.config.io_cqs.get_mut(&1).unwrap().vector = 4;
    assert!(matches!(
        config_err(refused(&s)),
        passthrough::StateError::Vector {
            vector: 4,
            count: 4,
            ..
        }
    ));
    let mut s = valid();
    s.msix.table = vec![[0; 4]; 1 << 16];
    assert!(matches!(
        config_err(refused(&s)),
        passthrough::StateError::MsixTable {
            entries: 65536,
            count: 4
        }
    ));
    // Huge transfers (MDTS 0, 64 KiB blocks: 4 GiB) on big queues: the validator caps a
    // transfer at 2 MiB whatever the device says, so the bounce areas stay small.
    let mut s = valid();
    s.config.mdts = Some(0);
    s.config.namespaces.get_mut(&1).unwrap().block_size = 65536;
    for i in 0..2 {
        set_geometry(&mut s, i, |g| g.sq_entries = 1024);
    }
    s.limits = limits_from(&s.config).unwrap();
    assert_eq!(s.limits.max_transfer, shadow::engine::MAX_SHADOW_TRANSFER);
    s.validate(&bounds()).unwrap();
    // Block sizes that are not powers of two, or absurd.
    for bs in [0, 520, 1 << 20] {
        let mut s = valid();
        s.config.namespaces.get_mut(&1).unwrap().block_size = bs;
        assert!(matches!(
            config_err(refused(&s)),
            passthrough::StateError::BlockSize { .. }
        ));
    }
    // Doorbells beyond BAR0: a device with a small BAR.
    let b = RestoreBounds {
        bar0_size: 0x2000,
        ..bounds()
    };
    assert!(matches!(
        valid().validate(&b),
        Err(StateError::DoorbellOutsideBar { qid: 1, .. })
    ));
}

#[test]
fn truncated_and_garbage_blobs_are_refused() {
    assert!(matches!(
        SavedDevice::decode(&[]),
        Err(StateError::TooShort { len: 0 })
    ));
    assert!(matches!(
        SavedDevice::decode(&[2, 0, 0]),
        Err(StateError::TooShort { len: 3 })
    ));
    assert!(matches!(
        SavedDevice::decode(&[99, 0, 0, 0, 1, 2, 3]),
        Err(StateError::Version {
            found: 99,
            expected: 2
        })
    ));
    assert!(matches!(
        SavedDevice::decode(&vec![0u8; 5 << 20]),
        Err(StateError::TooLarge { .. })
    ));
    let good = valid().encode().unwrap();
    for len in 4..good.len() {
        assert!(
            SavedDevice::decode(&good[..len]).is_err(),
            "a state truncated to {len} bytes decoded"
        );
    }
    // Garbage after the version header: a length prefix claiming 2^32 queue states must not
    // allocate for them.
    let mut g = 2u32.to_le_bytes().to_vec();
    g.extend([0xff; 64]);
    assert!(matches!(
        SavedDevice::decode(&g),
        Err(StateError::Decode(_))
    ));
}

/// xorshift64*: a fixed-seed generator, so a failure reproduces.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// What a state that passed validation guarantees the restore path.
fn assert_usable(s: &SavedDevice, b: &RestoreBounds) {
    assert_eq!(s.queues.len(), s.doorbells.len());
    for (q, &(sq, cq)) in s.queues.iter().zip(&s.doorbells) {
        let g = q.geometry;
        assert!((2..=b.max_queue_entries).contains(&g.sq_entries));
        assert!((2..=b.max_queue_entries).contains(&g.cq_entries));
        assert!(b.ring_in_ram(g.sq_base, g.sq_entries as u64 * 64));
        assert!(b.ring_in_ram(g.cq_base, g.cq_entries as u64 * 16));
        assert!(q.guest.sq_tail < g.sq_entries && q.guest.cq_head < g.cq_entries);
        assert!(sq < g.sq_entries && cq < g.cq_entries);
    }
}

#[test]
fn random_mutations_never_panic_and_what_passes_is_usable() {
    let good = valid().encode().unwrap();
    let b = bounds();
    let ram = VecBuffers::new(0, RAM as usize);
    let mut rng = Rng(0x5eed_f00d_cafe_1234);
    let (mut decoded, mut passed) = (0, 0);
    for _ in 0..20_000 {
        let mut m = good.clone();
        for _ in 0..1 + rng.below(4) {
            let at = 4 + rng.below(m.len() - 4);
            match rng.below(5) {
                0 => m[at] ^= 1 << rng.below(8),
                1 => m[at] = rng.next() as u8,
                2 => m[at] = [0, 1, 0x7f, 0x80, 0xff][rng.below(5)],
                3 => {
                    m.insert(at, rng.next() as u8);
                }
                _ => m.truncate(at.max(5)),
            }
        }
        if let Ok(s) = SavedDevice::decode(&m) {
            decoded += 1;
            if s.validate(&b).is_ok() {
                passed += 1;
                assert_usable(&s, &b);
                // The adapters rebuild from it and plan their re-alignment without a panic.
                for q in &s.queues {
                    let mut q = NvmeQueue::rebuild(q, s.limits, &ram).unwrap();
                    let _ = q.start_alignment();
                }
            }
        }
    }
    eprintln!("{decoded} of 20000 mutations decoded, {passed} passed validation");
    // The mutations reach the validator (not all stop at decoding), and some survive it
    // (counters, history) while geometry changes do not.
    assert!(decoded > 1000, "{decoded} of 20000 mutations decoded");
    assert!(
        passed > 0 && passed < decoded,
        "{passed} of {decoded} passed"
    );
}

// --- the real restore path under KVM ---------------------------------------------------

struct Dir(PathBuf);
impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn attached(tag: &str) -> (Dir, Arc<NvmeDevice>, Vm, Arc<Attachment>) {
    let d = std::env::temp_dir().join(format!("ferry-shadow-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    let socket = d.join("s");
    let dev = Arc::new(
        NvmeDevice::new(&DeviceConfig {
            socket: socket.clone(),
            backing: d.join("disk"),
            size: 8 << 20,
            block_size: 512,
            dstrd: 9,
            create: true,
        })
        .unwrap(),
    );
    let server = dev.clone();
    std::thread::spawn(move || {
        let _ = server.serve_one();
    });
    let vm = Vm::new(&VmConfig {
        ram_size: RAM,
        console: ConsoleSink::Null,
        ..Default::default()
    })
    .unwrap();
    let att = Arc::new(Attachment::attach(&vm, &AttachOptions::new("nvme0", &socket)).unwrap());
    (Dir(d), dev, vm, att)
}

#[test]
fn the_restore_path_refuses_hostile_states_before_touching_anything() {
    let (_dir, dev, vm, att) = attached("hostile");
    // The device's own bounds are the ones the checks above assume.
    let b = att.restore_bounds();
    assert_eq!(b.ram.len(), 1);
    assert_eq!(b.ram[0], 0..RAM);
    assert_eq!((b.max_queue_entries, b.dstrd), (1024, 9));
    assert!(b.msix_vectors >= 4 && b.bar0_size >= 1 << 16, "{b:?}");
    let slots_before = vm.memory_slots().list();
    let stats_before = dev.stats();
    let hostile: Vec<(&str, SavedDevice)> = vec![
        ("oversized queue", {
            let mut s = valid();
            set_geometry(&mut s, 0, |g| g.sq_entries = 65536);
            s
        }),
        ("ring beyond RAM", {
            let mut s = valid();
            set_geometry(&mut s, 1, |g| g.cq_base = RAM);
            s
        }),
        ("overflowing ring", {
            let mut s = valid();
            s.queues[0].geometry.sq_base = !0xfff;
            s
        }),
        ("duplicate queue", {
            let mut s = valid();
            s.queues[1] = s.queues[0].clone();
            s
        }),
        ("index out of range", {
            let mut s = valid();
            s.queues[1].guest.cq_tail = 64;
            s
        }),
        ("1025 queues", {
            let mut s = valid();
            s.queues = vec![s.queues[0].clone(); 1025];
            s.doorbells = vec![(0, 0); 1025];
            s
        }),
        ("MSI-X table beyond the device's", {
            let mut s = valid();
            s.msix.table = vec![[0xfee0_0000, 0, 0, 0]; 4096];
            s
        }),
    ];
    for (what, s) in &hostile {
        match Engine::restore(&vm, att.clone(), s, EngineOptions::default()) {
            Err(Error::State(e)) => {
                let text = vmm::ErrorChain(&e).to_string();
                assert!(!text.is_empty(), "{what}");
            }
            Err(other) => panic!("{what}: refused late: {}", vmm::ErrorChain(&other)),
            Ok(_) => panic!("{what}: restored"),
        }
    }
    // Nothing was remapped and the device saw no reset, command or queue.
    assert_eq!(vm.memory_slots().list(), slots_before);
    let stats = dev.stats();
    assert_eq!(
        (
            stats.resets,
            stats.enables,
            stats.admin_commands,
            stats.io_queues_created
        ),
        (
            stats_before.resets,
            stats_before.enables,
            stats_before.admin_commands,
            stats_before.io_queues_created
        )
    );
    // The attachment refuses a hostile log and MSI-X table on its own too.
    let mut s = valid();
    s.config.io_cqs.get_mut(&1).unwrap().entries = 0;
    assert!(matches!(
        att.replay(&s.config, s.admin),
        Err(passthrough::Error::InvalidState { .. })
    ));
    assert!(matches!(
        att.restore_msix(&MsixState {
            table: vec![[0; 4]; 1 << 20],
            enabled: true,
            function_masked: false,
        }),
        Err(passthrough::Error::InvalidState { .. })
    ));
    assert_eq!(
        dev.stats().io_queues_created,
        stats_before.io_queues_created
    );
}

#[test]
fn the_valid_state_restores() {
    let (_dir, dev, vm, att) = attached("valid");
    let engine = Engine::restore(&vm, att, &valid(), EngineOptions::default())
        .unwrap_or_else(|e| panic!("{}", vmm::ErrorChain(&e)));
    assert_eq!(dev.stats().io_queues_created, 2);
    assert!(engine.is_shadowed());
    engine.leave(&vm).ok();
}

/// The pre-copy state the source would send for `s` (the guest's admin phase as `att` reads
/// it from guest RAM).
fn precopy_of(s: &SavedDevice, att: &Attachment) -> PrecopyDevice {
    PrecopyDevice {
        config: s.config.clone(),
        limits: s.limits,
        dstrd: s.dstrd,
        admin: s.admin,
        admin_phase: att.admin_phase(&s.config, s.admin.1),
        msix: s.msix.clone(),
    }
}

/// A switchover state that fits the pre-copy preparation takes its replay as it is: the
/// device sees no second reset, admin command or queue in the downtime.
#[test]
fn a_prepared_restore_that_fits_replays_nothing_more() {
    let (_dir, dev, vm, att) = attached("prepared");
    let saved = valid();
    let pre = PrecopyDevice::decode(&precopy_of(&saved, &att).encode().unwrap()).unwrap();
    let opts = EngineOptions::default();
    let prepared = Engine::prepare_restore(&vm, att.clone(), &pre, opts)
        .unwrap_or_else(|e| panic!("{}", vmm::ErrorChain(&e)));
    let after_prepare = dev.stats();
    assert_eq!(after_prepare.io_queues_created, 2);
    assert!(after_prepare.enables >= 1);
    let engine = Engine::restore_prepared(&vm, att, &saved, opts, Some(prepared))
        .unwrap_or_else(|e| panic!("{}", vmm::ErrorChain(&e)));
    let after = dev.stats();
    assert_eq!(
        (
            after.resets,
            after.enables,
            after.admin_commands,
            after.io_queues_created
        ),
        (
            after_prepare.resets,
            after_prepare.enables,
            after_prepare.admin_commands,
            after_prepare.io_queues_created
        )
    );
    assert!(engine.is_shadowed());
    assert_eq!(engine.status().queues.len(), 2);
    engine.leave(&vm).ok();
}

/// The guest changed its admin configuration after the pre-copy state went out (deleted a
/// queue pair, or only ran admin commands that moved its admin queue positions): the restore
/// undoes the preparation and replays the switchover state in full, and the engine shadows
/// exactly the switchover state's queues.
#[test]
fn a_configuration_changed_since_the_precopy_state_is_replayed_in_full() {
    type Change = fn(&mut SavedDevice);
    let changes: Vec<(&str, Change)> = vec![
        ("queue pair 2 deleted", |s| {
            s.config.io_sqs.remove(&2);
            s.config.io_cqs.remove(&2);
            s.queues.truncate(1);
            s.doorbells.truncate(1);
        }),
        ("queue pair 3 created", |s| {
            let mut q = s.queues[1].clone();
            q.geometry.qid = 3;
            q.geometry.sq_base = 0x60000;
            q.geometry.cq_base = 0xc0000;
            let mut sq = s.config.io_sqs[&2];
            let mut cq = s.config.io_cqs[&2];
            (sq.base, sq.cqid, cq.base) = (0x60000, 3, 0xc0000);
            s.config.io_sqs.insert(3, sq);
            s.config.io_cqs.insert(3, cq);
            s.queues.push(q);
            s.doorbells.push((0, 0));
        }),
        ("admin positions moved", |s| {
            s.admin = (2, 2);
            s.config.admin_submitted += 2;
            s.config.admin_completed += 2;
        }),
    ];
    for (what, change) in changes {
        let (_dir, dev, vm, att) = attached(&format!("changed-{}", what.len()));
        let before = valid();
        let opts = EngineOptions::default();
        let prepared = Engine::prepare_restore(&vm, att.clone(), &precopy_of(&before, &att), opts)
            .unwrap_or_else(|e| panic!("{what}: {}", vmm::ErrorChain(&e)));
        let after_prepare = dev.stats();
        let slots_prepared = vm.memory_slots().list();
        let mut saved = valid();
        change(&mut saved);
        saved.validate(&att.restore_bounds()).unwrap();
        let engine = Engine::restore_prepared(&vm, att.clone(), &saved, opts, Some(prepared))
            .unwrap_or_else(|e| panic!("{what}: {}", vmm::ErrorChain(&e)));
        let after = dev.stats();
        assert_eq!(
            after.enables,
            after_prepare.enables + 1,
            "{what}: replayed again"
        );
        assert_eq!(
            after.io_queues_created,
            after_prepare.io_queues_created + saved.queues.len() as u64,
            "{what}"
        );
        let mut shadowed: Vec<u16> = engine
            .status()
            .queues
            .iter()
            .map(|q| q.state.geometry.qid)
            .collect();
        shadowed.sort_unstable();
        let want: Vec<u16> = saved.config.io_sqs.keys().copied().collect();
        assert_eq!(shadowed, want, "{what}");
        assert_eq!(att.config_log().io_sqs, saved.config.io_sqs, "{what}");
        if saved.queues.len() != before.queues.len() {
            assert_ne!(vm.memory_slots().list(), slots_prepared, "{what}");
        }
        engine.leave(&vm).ok();
    }
}

/// A hostile pre-copy state is refused before the device or a memory slot is touched, and
/// garbage does not decode.
#[test]
fn hostile_precopy_states_are_refused_before_touching_anything() {
    let (_dir, dev, vm, att) = attached("hostile-precopy");
    let slots_before = vm.memory_slots().list();
    let stats_before = dev.stats();
    let good = precopy_of(&valid(), &att);
    let hostile: Vec<(&str, PrecopyDevice)> = vec![
        ("ring beyond RAM", {
            let mut p = good.clone();
            p.config.io_cqs.get_mut(&1).unwrap().base = RAM;
            p
        }),
        ("no queues", {
            let mut p = good.clone();
            p.config.io_sqs.clear();
            p.config.io_cqs.clear();
            p
        }),
        ("admin positions beyond the queue", {
            let mut p = good.clone();
            p.admin = (32, 0);
            p
        }),
        ("other limits", {
            let mut p = good.clone();
            p.limits.max_transfer *= 2;
            p
        }),
        ("MSI-X table beyond the device's", {
            let mut p = good.clone();
            p.msix.table = vec![[0xfee0_0000, 0, 0, 0]; 4096];
            p
        }),
    ];
    for (what, p) in &hostile {
        match Engine::prepare_restore(&vm, att.clone(), p, EngineOptions::default()) {
            Err(Error::State(_)) => {}
            Err(other) => panic!("{what}: refused late: {}", vmm::ErrorChain(&other)),
            Ok(_) => panic!("{what}: prepared"),
        }
    }
    for blob in [&[][..], &[1, 0, 0, 0][..], &[9, 0, 0, 0, 1][..]] {
        assert!(PrecopyDevice::decode(blob).is_err(), "{blob:?}");
    }
    assert_eq!(vm.memory_slots().list(), slots_before);
    let stats = dev.stats();
    assert_eq!(
        (stats.resets, stats.enables, stats.admin_commands),
        (
            stats_before.resets,
            stats_before.enables,
            stats_before.admin_commands
        )
    );
}

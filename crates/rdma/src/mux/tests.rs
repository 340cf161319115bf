//! Multiplexer unit tests: no sockets; a recording transmitter and recording sinks. Each
//! defect of earlier multiplexers listed in rdma-wire.md has a `lesson_*` test.
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;
use rdma_wire::cm::{reason, Apr, Drep, Dreq, Lap, Mra, Rej, Rep, Req, Rtu, SidrRep, SidrReq};
use rdma_wire::mad::{attr, class, MadHeader};
use rdma_wire::{Gid, Mad};

use super::*;

#[derive(Default)]
struct RecTx {
    sent: Mutex<Vec<(Gid, Gid, Mad)>>,
}
impl Qp1Tx for RecTx {
    fn send_gsi(&self, sgid: Gid, dgid: Gid, mad: &Mad) -> Result<(), RdmaError> {
        self.sent.lock().push((sgid, dgid, *mad));
        Ok(())
    }
}

struct RecSink {
    got: Mutex<Vec<([u8; GRH_LEN], Mad)>>,
    receiving: AtomicBool,
}
impl RecSink {
    fn new() -> Arc<RecSink> {
        Arc::new(RecSink {
            got: Mutex::new(Vec::new()),
            receiving: AtomicBool::new(true),
        })
    }
    fn count(&self) -> usize {
        self.got.lock().len()
    }
}
impl Qp1Sink for RecSink {
    fn deliver(&self, grh: &[u8; GRH_LEN], mad: &Mad) -> Result<(), Backpressure> {
        if !self.receiving.load(Ordering::SeqCst) {
            return Err(Backpressure);
        }
        self.got.lock().push((*grh, *mad));
        Ok(())
    }
}

fn g(a: u8, b: u8, c: u8, d: u8) -> Gid {
    Gid::from_ipv4(Ipv4Addr::new(a, b, c, d))
}

struct Fixture {
    mux: Arc<Multiplexer>,
    tx: Arc<RecTx>,
    sinks: Vec<Arc<RecSink>>,
}

/// VMs 1..=n, VM i owns 10.0.0.i.
fn fixture(n: u32) -> Fixture {
    let tx = Arc::new(RecTx::default());
    let cfg = MuxConfig {
        timewait: std::time::Duration::from_millis(100),
        ..MuxConfig::default()
    };
    let mux = Multiplexer::new(cfg, tx.clone());
    let mut sinks = Vec::new();
    for vm in 1..=n {
        let s = RecSink::new();
        mux.attach_vm(vm, s.clone()).unwrap();
        mux.register_gid(vm, g(10, 0, 0, vm as u8)).unwrap();
        sinks.push(s);
    }
    Fixture { mux, tx, sinks }
}

fn route(f: &Fixture, sgid: Gid, dgid: Gid, mad: &Mad) -> RouteOutcome {
    f.mux.route(sgid, dgid, &mad_grh(sgid, dgid), mad)
}

fn req(local: u32, from: Gid, to: Gid) -> Mad {
    let mut r = Req {
        hdr: MadHeader::cm(attr::REQ, 7),
        local_comm_id: local,
        ..Req::default()
    };
    r.primary_path.local_gid = from;
    r.primary_path.remote_gid = to;
    r.to_mad()
}

fn rep(local: u32, remote: u32) -> Mad {
    Rep {
        hdr: MadHeader::cm(attr::REP, 7),
        local_comm_id: local,
        remote_comm_id: remote,
        ..Rep::default()
    }
    .to_mad()
}

fn rej(local: u32, remote: u32) -> Mad {
    Rej {
        hdr: MadHeader::cm(attr::REJ, 7),
        local_comm_id: local,
        remote_comm_id: remote,
        reason: reason::TIMEOUT,
        ..Rej::default()
    }
    .to_mad()
}

const REMOTE: Gid = Gid([0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 10, 9, 9, 9]);

#[test]
fn registration_refuses_gid_of_another_vm_and_detach_removes_all() {
    let f = fixture(2);
    let err = f.mux.register_gid(2, g(10, 0, 0, 1)).unwrap_err();
    assert!(matches!(err, RdmaError::GidOwned { owner: 1, .. }), "{err}");
    assert!(err.to_string().contains("10.0.0.1"), "{err}");
    f.mux.register_gid(1, g(10, 0, 0, 1)).unwrap(); // idempotent for the owner
    f.mux.register_gid(1, g(10, 0, 1, 1)).unwrap();
    f.mux.register_gid(1, g(10, 0, 1, 2)).unwrap();
    assert_eq!(f.mux.gid_count(), 4);
    assert!(matches!(
        f.mux.unregister_gid(2, g(10, 0, 1, 1)),
        Err(RdmaError::NotOwner { vm: 2, .. })
    ));
    f.mux.unregister_gid(1, g(10, 0, 1, 2)).unwrap();
    assert_eq!(f.mux.owner_of(g(10, 0, 1, 2)), None);
    assert_eq!(f.mux.detach_vm(1).unwrap(), 2);
    assert_eq!(f.mux.gid_count(), 1);
    assert_eq!(f.mux.owner_of(g(10, 0, 0, 1)), None);
    // The GID is free for another VM now.
    f.mux.register_gid(2, g(10, 0, 0, 1)).unwrap();
    assert_eq!(f.mux.stats().registrations_refused, 1);
}

#[test]
fn lesson_registration_errors_are_reported_not_ignored() {
    let f = fixture(1);
    assert!(matches!(
        f.mux.register_gid(9, g(10, 0, 0, 9)),
        Err(RdmaError::UnknownVm(9))
    ));
    assert!(matches!(
        f.mux.register_gid(1, Gid::ZERO),
        Err(RdmaError::InvalidGid(_))
    ));
    assert!(matches!(
        f.mux.attach_vm(1, RecSink::new()),
        Err(RdmaError::VmExists(1))
    ));
    assert!(matches!(f.mux.detach_vm(9), Err(RdmaError::UnknownVm(9))));
    assert_eq!(f.mux.stats().registrations_refused, 2);
}

#[test]
fn lesson_full_128_bit_gids_no_interface_id_collision() {
    let tx = Arc::new(RecTx::default());
    let mux = Multiplexer::new(MuxConfig::default(), tx);
    let (s1, s2) = (RecSink::new(), RecSink::new());
    mux.attach_vm(1, s1.clone()).unwrap();
    mux.attach_vm(2, s2.clone()).unwrap();
    // Same 64-bit interface ID, different subnet prefixes: two different GIDs.
    let a = Gid::from_parts(0xfe80_0000_0000_0000, 0x0202_c9ff_fe00_0001);
    let b = Gid::from_parts(0x2001_0db8_0000_0000, 0x0202_c9ff_fe00_0001);
    mux.register_gid(1, a).unwrap();
    mux.register_gid(2, b).unwrap();
    let m = req(5, REMOTE, b);
    assert_eq!(
        mux.route(REMOTE, b, &mad_grh(REMOTE, b), &m),
        RouteOutcome::Delivered(2)
    );
    assert_eq!((s1.count(), s2.count()), (0, 1));
    // A third GID sharing only the interface ID has no owner.
    let c = Gid::from_parts(0x2001_0db8_0000_0001, 0x0202_c9ff_fe00_0001);
    assert_eq!(
        mux.route(REMOTE, c, &mad_grh(REMOTE, c), &m),
        RouteOutcome::Dropped(DropReason::NoOwner)
    );
}

#[test]
fn lesson_ipv4_mapped_and_zero_padded_forms_are_one_gid() {
    let f = fixture(2);
    let zero_padded = Gid::from_parts(0, 0x0a00_0001); // ::10.0.0.1
    assert!(matches!(
        f.mux.register_gid(2, zero_padded),
        Err(RdmaError::GidOwned { owner: 1, .. })
    ));
    assert_eq!(f.mux.owner_of(zero_padded), Some(1));
    let m = req(5, REMOTE, zero_padded);
    assert_eq!(
        route(&f, REMOTE, zero_padded, &m),
        RouteOutcome::Delivered(1)
    );
}

#[test]
fn lesson_lookup_miss_is_a_counted_drop_never_vm_zero_or_first() {
    let tx = Arc::new(RecTx::default());
    let mux = Multiplexer::new(MuxConfig::default(), tx);
    let s0 = RecSink::new();
    mux.attach_vm(0, s0.clone()).unwrap(); // a VM with ID 0 exists
    mux.register_gid(0, g(10, 0, 0, 1)).unwrap();
    let d = g(10, 0, 0, 77);
    let out = mux.route(REMOTE, d, &mad_grh(REMOTE, d), &req(1, REMOTE, d));
    assert_eq!(out, RouteOutcome::Dropped(DropReason::NoOwner));
    assert_eq!(s0.count(), 0);
    assert_eq!(mux.stats().no_owner, 1);
}

#[test]
fn lesson_zero_comm_id_never_reuses_the_previous_destination() {
    let f = fixture(2);
    let vm1 = g(10, 0, 0, 1);
    // VM 1 has a connection with REMOTE; then a REJ with remote ID 0 arrives for an unowned GID
    // and for VM 2: neither goes to VM 1.
    f.mux
        .send_from_vm(1, vm1, REMOTE, &req(0x11, vm1, REMOTE))
        .unwrap();
    route(&f, REMOTE, vm1, &rep(0x99, 0x11));
    let before = f.sinks[0].count();
    let nobody = g(10, 0, 0, 50);
    assert_eq!(
        route(&f, REMOTE, nobody, &rej(0x99, 0)),
        RouteOutcome::Dropped(DropReason::NoOwner)
    );
    assert_eq!(
        route(&f, REMOTE, g(10, 0, 0, 2), &rej(0x99, 0)),
        RouteOutcome::Delivered(2)
    );
    assert_eq!(f.sinks[0].count(), before);
}

#[test]
fn lesson_rej_with_remote_id_zero_reaches_the_passive_vm_and_clears_its_entry() {
    let f = fixture(2);
    let vm2 = g(10, 0, 0, 2);
    // REMOTE sent a REQ (its ID 0x42) to VM 2 and later gives up: REJ(timeout, remote 0).
    route(&f, REMOTE, vm2, &req(0x42, REMOTE, vm2));
    assert!(f.mux.has_comm_state(2));
    assert_eq!(
        route(&f, REMOTE, vm2, &rej(0x42, 0)),
        RouteOutcome::Delivered(2)
    );
    assert_eq!(
        f.mux.stats().unknown_comm_id,
        0,
        "the REJ names a REQ VM 2 received"
    );
    assert!(!f.mux.has_comm_state(2));
    assert_eq!(f.sinks[1].count(), 2);
    assert_eq!(f.sinks[0].count(), 0);
}

#[test]
fn lesson_entries_live_with_the_connection_not_with_idleness() {
    let f = fixture(1);
    let vm1 = g(10, 0, 0, 1);
    f.mux
        .send_from_vm(1, vm1, REMOTE, &req(0x11, vm1, REMOTE))
        .unwrap();
    route(&f, REMOTE, vm1, &rep(0x99, 0x11));
    let rtu = Rtu {
        hdr: MadHeader::cm(attr::RTU, 7),
        local_comm_id: 0x11,
        remote_comm_id: 0x99,
        ..Rtu::default()
    };
    f.mux.send_from_vm(1, vm1, REMOTE, &rtu.to_mad()).unwrap();
    assert_eq!(f.mux.connections(1)[0].state, CommState::Established);
    // Idle: there is no timer in the multiplexer at all; the entry is still there.
    std::thread::sleep(std::time::Duration::from_millis(300));
    let dreq = Dreq {
        hdr: MadHeader::cm(attr::DREQ, 8),
        local_comm_id: 0x99,
        remote_comm_id: 0x11,
        ..Dreq::default()
    };
    assert_eq!(
        route(&f, REMOTE, vm1, &dreq.to_mad()),
        RouteOutcome::Delivered(1)
    );
    assert_eq!(f.mux.stats().unknown_comm_id, 0);
    assert_eq!(f.mux.connections(1)[0].state, CommState::Disconnecting);
    let drep = Drep {
        hdr: MadHeader::cm(attr::DREP, 8),
        local_comm_id: 0x11,
        remote_comm_id: 0x99,
        ..Drep::default()
    };
    f.mux.send_from_vm(1, vm1, REMOTE, &drep.to_mad()).unwrap();
    assert_eq!(f.mux.connections(1)[0].state, CommState::TimeWait);
    // A late duplicate RTU does not revive it.
    f.mux.send_from_vm(1, vm1, REMOTE, &rtu.to_mad()).unwrap();
    assert_eq!(f.mux.connections(1)[0].state, CommState::TimeWait);
    // A retransmitted DREQ during time-wait still matches.
    assert_eq!(
        route(&f, REMOTE, vm1, &dreq.to_mad()),
        RouteOutcome::Delivered(1)
    );
    assert_eq!(f.mux.stats().unknown_comm_id, 0);
    std::thread::sleep(std::time::Duration::from_millis(120));
    assert!(!f.mux.has_comm_state(1), "removed when the time-wait ends");
}

#[test]
fn lesson_mra_lap_apr_are_routed_like_every_cm_message() {
    let f = fixture(1);
    let vm1 = g(10, 0, 0, 1);
    f.mux
        .send_from_vm(1, vm1, REMOTE, &req(0x11, vm1, REMOTE))
        .unwrap();
    let mra = Mra {
        hdr: MadHeader::cm(attr::MRA, 7),
        local_comm_id: 0x99,
        remote_comm_id: 0x11,
        ..Mra::default()
    };
    let lap = Lap {
        hdr: MadHeader::cm(attr::LAP, 9),
        local_comm_id: 0x99,
        remote_comm_id: 0x11,
        ..Lap::default()
    };
    let apr = Apr {
        hdr: MadHeader::cm(attr::APR, 9),
        local_comm_id: 0x99,
        remote_comm_id: 0x11,
        ..Apr::default()
    };
    for m in [mra.to_mad(), lap.to_mad(), apr.to_mad()] {
        assert_eq!(route(&f, REMOTE, vm1, &m), RouteOutcome::Delivered(1));
    }
    assert_eq!(f.mux.stats().unknown_comm_id, 0);
    // And a VM may send them.
    f.mux.send_from_vm(1, vm1, REMOTE, &lap.to_mad()).unwrap();
}

#[test]
fn lesson_source_and_destination_gids_are_not_swapped_on_transmit() {
    let f = fixture(1);
    let vm1 = g(10, 0, 0, 1);
    f.mux
        .send_from_vm(1, vm1, REMOTE, &req(0x11, vm1, REMOTE))
        .unwrap();
    let sent = f.tx.sent.lock();
    assert_eq!(sent.len(), 1);
    assert_eq!(
        (sent[0].0, sent[0].1),
        (vm1, REMOTE),
        "(source, destination)"
    );
    // And on the wire: the IP addresses and the ICRC (see port tests) keep the order.
    let grh = mad_grh(vm1, REMOTE);
    assert_eq!(crate::addr::parse_grh(&grh), Some((vm1, REMOTE)));
}

#[test]
fn spoofed_sources_wrong_class_and_malformed_sends_are_refused_and_counted() {
    let f = fixture(2);
    let (vm1, vm2) = (g(10, 0, 0, 1), g(10, 0, 0, 2));
    // Source GID of another VM.
    let e = f
        .mux
        .send_from_vm(1, vm2, REMOTE, &req(1, vm2, REMOTE))
        .unwrap_err();
    assert!(e.to_string().contains("not registered to VM 1"), "{e}");
    // Own source GID but another VM's GID as REQ primary local GID.
    f.mux
        .send_from_vm(1, vm1, REMOTE, &req(1, vm2, REMOTE))
        .unwrap_err();
    // Unregistered source.
    f.mux
        .send_from_vm(1, g(10, 0, 0, 99), REMOTE, &req(1, vm1, REMOTE))
        .unwrap_err();
    // Management class not allowed (subnet administration).
    let mut sa = req(1, vm1, REMOTE);
    sa[1] = class::SUBN_ADM;
    f.mux.send_from_vm(1, vm1, REMOTE, &sa).unwrap_err();
    // Malformed: short, unknown CM attribute.
    f.mux.send_from_vm(1, vm1, REMOTE, &[0u8; 100]).unwrap_err();
    let mut bad = req(1, vm1, REMOTE);
    bad[16..18].copy_from_slice(&0x0099u16.to_be_bytes());
    f.mux.send_from_vm(1, vm1, REMOTE, &bad).unwrap_err();
    let s = f.mux.stats();
    assert_eq!(
        (s.refused_spoofed, s.refused_class, s.refused_malformed),
        (3, 1, 2)
    );
    assert!(
        f.tx.sent.lock().is_empty(),
        "nothing refused reaches the wire"
    );
    assert_eq!(f.mux.vm_report(1).unwrap().counters.refused, 6);
}

#[test]
fn inbound_truncated_malformed_and_foreign_class_mads_are_counted_drops() {
    let f = fixture(1);
    let vm1 = g(10, 0, 0, 1);
    let grh = mad_grh(REMOTE, vm1);
    let m = req(1, REMOTE, vm1);
    assert_eq!(
        f.mux.route(REMOTE, vm1, &grh, &m[..200]),
        RouteOutcome::Dropped(DropReason::Truncated)
    );
    let mut bad = m;
    bad[16..18].copy_from_slice(&0x0077u16.to_be_bytes());
    assert_eq!(
        f.mux.route(REMOTE, vm1, &grh, &bad),
        RouteOutcome::Dropped(DropReason::Malformed)
    );
    let mut perf = m;
    perf[1] = class::PERF_MGMT;
    assert_eq!(
        f.mux.route(REMOTE, vm1, &grh, &perf),
        RouteOutcome::Dropped(DropReason::ClassNotAllowed)
    );
    let s = f.mux.stats();
    assert_eq!((s.truncated, s.malformed, s.class_not_allowed), (1, 1, 1));
    assert_eq!(f.sinks[0].count(), 0);
}

#[test]
fn lesson_no_receive_buffer_means_bounded_queue_then_counted_drop_never_blocking() {
    let f = fixture(2);
    let (vm1, vm2) = (g(10, 0, 0, 1), g(10, 0, 0, 2));
    f.sinks[0].receiving.store(false, Ordering::SeqCst);
    let depth = MuxConfig::default().queue_depth;
    for i in 0..depth as u32 + 10 {
        let out = route(&f, REMOTE, vm1, &req(1000 + i, REMOTE, vm1));
        let want = if (i as usize) < depth {
            RouteOutcome::Queued(1)
        } else {
            RouteOutcome::Dropped(DropReason::QueueFull)
        };
        assert_eq!(out, want, "MAD {i}");
        // VM 2 is not affected.
        assert_eq!(
            route(&f, REMOTE, vm2, &req(i + 1, REMOTE, vm2)),
            RouteOutcome::Delivered(2)
        );
    }
    assert_eq!(f.mux.stats().queue_full, 10);
    assert_eq!(f.mux.vm_report(1).unwrap().pending, depth);
    // Registration requests are answered at once even while VM 1's queue is full: requests
    // and asynchronous MAD traffic do not share a stream.
    f.mux.register_gid(1, g(10, 0, 1, 1)).unwrap();
    f.sinks[0].receiving.store(true, Ordering::SeqCst);
    assert_eq!(f.mux.poll_pending(1), depth);
    assert_eq!(f.sinks[0].count(), depth);
    // In order.
    let first = CmMessage::parse_mad(&f.sinks[0].got.lock()[0].1).unwrap();
    assert_eq!(first.local_comm_id(), Some(1000));
}

#[test]
fn outstanding_ids_of_different_vms_are_kept_apart() {
    let f = fixture(2);
    let (vm1, vm2) = (g(10, 0, 0, 1), g(10, 0, 0, 2));
    // Both VMs pick local ID 7 towards the same remote.
    f.mux
        .send_from_vm(1, vm1, REMOTE, &req(7, vm1, REMOTE))
        .unwrap();
    f.mux
        .send_from_vm(2, vm2, REMOTE, &req(7, vm2, REMOTE))
        .unwrap();
    assert_eq!(
        route(&f, REMOTE, vm2, &rep(0x200, 7)),
        RouteOutcome::Delivered(2)
    );
    assert_eq!(
        route(&f, REMOTE, vm1, &rep(0x100, 7)),
        RouteOutcome::Delivered(1)
    );
    assert_eq!(f.mux.connections(1)[0].remote_comm_id, 0x100);
    assert_eq!(f.mux.connections(2)[0].remote_comm_id, 0x200);
    assert_eq!(f.mux.stats().unknown_comm_id, 0);
    // A reply naming an ID a VM does not have: delivered to the DGID owner, counted.
    assert_eq!(
        route(&f, REMOTE, vm1, &rep(0x300, 8)),
        RouteOutcome::Delivered(1)
    );
    assert_eq!(f.mux.stats().unknown_comm_id, 1);
}

#[test]
fn sidr_request_ids_are_tracked_per_vm() {
    let f = fixture(1);
    let vm1 = g(10, 0, 0, 1);
    let sreq = SidrReq {
        hdr: MadHeader::cm(attr::SIDR_REQ, 3),
        request_id: 0x55,
        ..SidrReq::default()
    };
    f.mux.send_from_vm(1, vm1, REMOTE, &sreq.to_mad()).unwrap();
    let srep = SidrRep {
        hdr: MadHeader::cm(attr::SIDR_REP, 3),
        request_id: 0x55,
        ..SidrRep::default()
    };
    assert_eq!(
        route(&f, REMOTE, vm1, &srep.to_mad()),
        RouteOutcome::Delivered(1)
    );
    assert_eq!(f.mux.stats().unknown_comm_id, 0);
    assert_eq!(
        route(&f, REMOTE, vm1, &srep.to_mad()),
        RouteOutcome::Delivered(1)
    );
    assert_eq!(f.mux.stats().unknown_comm_id, 1, "answered already");
}

#[test]
fn inbound_req_flood_does_not_block_the_vms_own_connections() {
    let tx = Arc::new(RecTx::default());
    let cfg = MuxConfig {
        max_connections_per_vm: 8,
        ..MuxConfig::default()
    };
    let mux = Multiplexer::new(cfg, tx);
    let s = RecSink::new();
    mux.attach_vm(1, s.clone()).unwrap();
    let vm1 = g(10, 0, 0, 1);
    mux.register_gid(1, vm1).unwrap();
    for i in 0..100 {
        mux.route(REMOTE, vm1, &mad_grh(REMOTE, vm1), &req(i + 1, REMOTE, vm1));
    }
    assert_eq!(s.count(), 100, "all delivered");
    // The VM can still open its own connections, up to its own limit.
    for i in 0..8 {
        mux.send_from_vm(1, vm1, REMOTE, &req(0x900 + i, vm1, REMOTE))
            .unwrap();
    }
    let e = mux
        .send_from_vm(1, vm1, REMOTE, &req(0x999, vm1, REMOTE))
        .unwrap_err();
    assert!(e.to_string().contains("table full"), "{e}");
    assert_eq!(mux.stats().refused_table_full, 1);
}

#[test]
fn lesson_registration_requests_and_mad_traffic_do_not_share_a_stream() {
    // Registration is a call with its own result; MADs come through the sink. A VM whose
    // sink is backed up still gets immediate, correct answers to registration requests, and
    // no MAD is ever taken for a registration reply or the other way round.
    let f = fixture(2);
    f.sinks[0].receiving.store(false, Ordering::SeqCst);
    let vm1 = g(10, 0, 0, 1);
    for i in 0..10 {
        route(&f, REMOTE, vm1, &req(i + 1, REMOTE, vm1));
    }
    assert!(f.mux.register_gid(1, g(10, 0, 2, 1)).is_ok());
    assert!(matches!(
        f.mux.register_gid(1, g(10, 0, 0, 2)),
        Err(RdmaError::GidOwned { owner: 2, .. })
    ));
    assert_eq!(f.mux.vm_report(1).unwrap().pending, 10);
    f.sinks[0].receiving.store(true, Ordering::SeqCst);
    assert_eq!(f.mux.poll_pending(1), 10);
    assert!(f.sinks[0]
        .got
        .lock()
        .iter()
        .all(|(_, m)| CmMessage::parse_mad(m).is_ok_and(|c| c.kind() == rdma_wire::CmKind::Req)));
}

mod hostile;

//! A hostile VM or peer against the multiplexer (issue 11): GIDs the host did not give the VM,
//! tables grown by varying IDs, alternate paths and rdma_cm addresses naming another VM.
use super::*;

#[test]
fn a_vm_registers_only_the_gids_the_host_allows_it() {
    let f = fixture(1);
    let (own, configured_elsewhere) = (g(10, 0, 5, 1), g(10, 0, 5, 2));
    f.mux.attach_vm(7, RecSink::new()).unwrap();
    f.mux.set_allowed_gids(7, &[own]).unwrap();
    // A GID nobody has bound yet, but not this VM's: refused and counted.
    let e = f.mux.register_gid(7, configured_elsewhere).unwrap_err();
    assert!(matches!(e, RdmaError::GidNotAllowed { vm: 7, .. }), "{e}");
    assert_eq!(f.mux.owner_of(configured_elsewhere), None);
    // The IPv4-mapped and zero-padded forms are one GID: the allowed one is accepted either way.
    let mut padded = own;
    padded.0[10] = 0;
    padded.0[11] = 0;
    f.mux.register_gid(7, padded).unwrap();
    assert_eq!(f.mux.owner_of(own), Some(7));
    let s = f.mux.stats();
    assert_eq!(
        (s.registrations_refused, s.registrations_not_allowed),
        (1, 1)
    );
    // The other VM, configured with it, gets it.
    f.mux.attach_vm(8, RecSink::new()).unwrap();
    f.mux.set_allowed_gids(8, &[configured_elsewhere]).unwrap();
    f.mux.register_gid(8, configured_elsewhere).unwrap();
}

fn comm_len(f: &Fixture, vm: VmId) -> (usize, usize, usize) {
    let s = f.mux.slot(vm).unwrap();
    let t = s.comm.lock();
    (t.entries().len(), t.remote_len(), t.passive_len())
}

#[test]
fn reps_with_varying_remote_ids_do_not_grow_the_by_remote_table() {
    let f = fixture(1);
    let vm1 = g(10, 0, 0, 1);
    // One local ID, ten thousand remote IDs: from the VM (outbound REPs) ...
    for remote in 1..=10_000 {
        f.mux
            .send_from_vm(1, vm1, REMOTE, &rep(0x77, remote))
            .unwrap();
    }
    assert_eq!(
        comm_len(&f, 1),
        (1, 1, 0),
        "one connection, one by-remote key"
    );
    // ... and from a peer (inbound REPs answering the VM's REQ).
    f.mux
        .send_from_vm(1, vm1, REMOTE, &req(0x88, vm1, REMOTE))
        .unwrap();
    for remote in 20_001..=30_000 {
        route(&f, REMOTE, vm1, &rep(remote, 0x88));
    }
    assert_eq!(comm_len(&f, 1), (2, 2, 0));
}

/// A transmitter whose every send fails (the port is down).
struct FailTx;
impl Qp1Tx for FailTx {
    fn send_gsi(&self, _sgid: Gid, _dgid: Gid, _mad: &Mad) -> Result<(), RdmaError> {
        Err(RdmaError::Cm("port down".into()))
    }
}

#[test]
fn a_mad_that_could_not_be_sent_leaves_nothing_in_the_table() {
    let cfg = MuxConfig {
        max_connections_per_vm: 4,
        ..MuxConfig::default()
    };
    let mux = Multiplexer::new(cfg, Arc::new(FailTx));
    mux.attach_vm(1, RecSink::new()).unwrap();
    let vm1 = g(10, 0, 0, 1);
    mux.register_gid(1, vm1).unwrap();
    for i in 0..100 {
        assert!(mux
            .send_from_vm(1, vm1, REMOTE, &req(i + 1, vm1, REMOTE))
            .is_err());
        assert!(mux
            .send_from_vm(1, vm1, REMOTE, &rep(0x1000 + i, i + 7))
            .is_err());
    }
    assert!(mux.connections(1).is_empty(), "{:?}", mux.connections(1));
    assert!(!mux.has_comm_state(1));
    let s = mux.stats();
    assert_eq!((s.send_errors, s.refused_table_full), (200, 0));
}

#[test]
fn unanswered_and_undelivered_reqs_do_not_stay_forever() {
    let tx = Arc::new(RecTx::default());
    let cfg = MuxConfig {
        queue_depth: 2,
        ..MuxConfig::default()
    };
    let mux = Multiplexer::new(cfg, tx);
    let s = RecSink::new();
    s.receiving.store(false, Ordering::SeqCst);
    mux.attach_vm(1, s.clone()).unwrap();
    let vm1 = g(10, 0, 0, 1);
    mux.register_gid(1, vm1).unwrap();
    for i in 0..50 {
        mux.route(REMOTE, vm1, &mad_grh(REMOTE, vm1), &req(i + 1, REMOTE, vm1));
    }
    let slot = mux.slot(1).unwrap();
    assert_eq!(mux.stats().queue_full, 48);
    assert_eq!(
        slot.comm.lock().passive_len(),
        2,
        "only the REQs that reached the VM's queue are remembered"
    );
    // The VM never answers the two it got: they expire.
    let later = std::time::Instant::now() + comm::PASSIVE_TTL + std::time::Duration::from_secs(1);
    slot.comm.lock().expire(later);
    assert_eq!(slot.comm.lock().passive_len(), 0);
}

fn cma(src: Gid, dst: Gid) -> [u8; 36] {
    let h =
        rdma_wire::rdma_cm::CmaHeader::new(src.canonical().to_ip(), 4000, dst.canonical().to_ip())
            .unwrap();
    h.to_bytes()
}

/// A REQ from `from` to `to` for an rdma_cm service, with an alternate path and an rdma_cm
/// header naming the given addresses.
fn full_req(local: u32, from: Gid, to: Gid, alt: (Gid, Gid), pd: (Gid, Gid)) -> Mad {
    let mut r = Req {
        hdr: MadHeader::cm(attr::REQ, 7),
        local_comm_id: local,
        service_id: rdma_wire::rdma_cm::service_id(rdma_wire::rdma_cm::PortSpace::Tcp, 7174),
        ..Req::default()
    };
    r.primary_path.local_gid = from;
    r.primary_path.remote_gid = to;
    r.alternate_path.local_gid = alt.0;
    r.alternate_path.remote_gid = alt.1;
    r.private_data[..36].copy_from_slice(&cma(pd.0, pd.1));
    r.to_mad()
}

fn lap(local: u32, remote: u32, alt: (Gid, Gid)) -> Mad {
    let mut l = Lap {
        hdr: MadHeader::cm(attr::LAP, 7),
        local_comm_id: local,
        remote_comm_id: remote,
        ..Lap::default()
    };
    l.alternate_path.local_gid = alt.0;
    l.alternate_path.remote_gid = alt.1;
    l.to_mad()
}

#[test]
fn a_vms_req_lap_and_rdma_cm_addresses_may_not_name_another_vm() {
    let f = fixture(2);
    let (vm1, vm2) = (g(10, 0, 0, 1), g(10, 0, 0, 2));
    let ok = (vm1, REMOTE);
    for (what, mad) in [
        (
            "alternate local",
            full_req(1, vm1, REMOTE, (vm2, REMOTE), ok),
        ),
        ("alternate remote", full_req(2, vm1, REMOTE, (vm1, vm2), ok)),
        (
            "rdma_cm source",
            full_req(3, vm1, REMOTE, ok, (vm2, REMOTE)),
        ),
        (
            "rdma_cm destination",
            full_req(4, vm1, REMOTE, ok, (vm1, vm2)),
        ),
        ("primary remote", full_req(5, vm1, vm2, ok, ok)),
        ("LAP alternate local", lap(6, 9, (vm2, REMOTE))),
        ("LAP alternate remote", lap(7, 9, (vm1, vm2))),
    ] {
        let e = f.mux.send_from_vm(1, vm1, REMOTE, &mad).unwrap_err();
        assert!(e.to_string().contains("not the datagram's"), "{what}: {e}");
    }
    assert_eq!(f.mux.stats().refused_spoofed, 7);
    assert!(
        f.tx.sent.lock().is_empty(),
        "nothing refused reaches the wire"
    );
    // Honest ones pass: no alternate path, or one of the VM's own; its own addresses.
    let none = (Gid::default(), Gid::default());
    f.mux
        .send_from_vm(1, vm1, REMOTE, &full_req(8, vm1, REMOTE, none, ok))
        .unwrap();
    f.mux
        .send_from_vm(1, vm1, REMOTE, &full_req(9, vm1, REMOTE, ok, ok))
        .unwrap();
    f.mux.send_from_vm(1, vm1, REMOTE, &lap(8, 9, ok)).unwrap();
    assert_eq!(f.tx.sent.lock().len(), 3);
}

#[test]
fn inbound_paths_and_rdma_cm_addresses_naming_another_source_are_dropped() {
    let f = fixture(2);
    let (vm1, vm2) = (g(10, 0, 0, 1), g(10, 0, 0, 2));
    let ok = (REMOTE, vm1);
    // From REMOTE to VM 1, naming VM 2 (or a third party) as the sender somewhere.
    for mad in [
        full_req(1, REMOTE, vm1, (vm2, vm1), ok),
        full_req(2, REMOTE, vm1, ok, (vm2, vm1)),
        lap(3, 9, (vm2, vm1)),
    ] {
        assert_eq!(
            route(&f, REMOTE, vm1, &mad),
            RouteOutcome::Dropped(DropReason::SpoofedSource)
        );
    }
    // Naming another receiver than the address it came to.
    for mad in [
        full_req(4, REMOTE, vm1, (REMOTE, vm2), ok),
        full_req(5, REMOTE, vm1, ok, (REMOTE, vm2)),
        lap(6, 9, (REMOTE, vm2)),
    ] {
        assert_eq!(
            route(&f, REMOTE, vm1, &mad),
            RouteOutcome::Dropped(DropReason::Misaddressed)
        );
    }
    let s = f.mux.stats();
    assert_eq!((s.spoofed_source, s.misaddressed), (3, 3));
    assert_eq!(f.sinks[0].count() + f.sinks[1].count(), 0);
    // The honest REQ is delivered.
    assert_eq!(
        route(&f, REMOTE, vm1, &full_req(7, REMOTE, vm1, ok, ok)),
        RouteOutcome::Delivered(1)
    );
}

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

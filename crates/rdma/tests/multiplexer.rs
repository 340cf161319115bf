//! Multiplexer behaviour over real UDP sockets on loopback: hosts are ports bound to
//! 127.N.0.h:4791, VMs are GIDs 127.N.h.i behind them, the peer is a bare-metal endpoint.
mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use rdma::cm::{AcceptMode, CmEvent, ConnState, ConnectParams};
use rdma::host::{rc_service, VmOptions, DEFAULT_SERVICE_PORT};
use rdma::Gid;
use rdma_wire::cm::reason;

fn params(qpn: u32) -> ConnectParams {
    ConnectParams {
        service_id: rc_service(DEFAULT_SERVICE_PORT),
        qpn,
        private_data: vec![],
    }
}

/// Two hosts with three VMs each and a bare-metal peer: connections between VMs on different
/// hosts, between VMs on the same host, and from the peer (RC and SIDR+UD); every MAD reaches
/// exactly its owner.
#[test]
fn two_hosts_vms_connect_across_hosts_same_host_and_from_peer() {
    let n = 21;
    let a = start_host(n, 1, 2, 3);
    let b = start_host(n, 2, 2, 3);
    let peer = start_peer(n, 2);
    let all: Vec<_> = a.vms().into_iter().chain(b.vms()).collect();
    let mut conns = Vec::new();
    for src in &all {
        for dst in &all {
            if src.gid() == dst.gid() {
                continue;
            }
            let info = src
                .endpoint()
                .connect(dst.gid(), params(src.ud_qp().qpn_value()), WAIT)
                .unwrap_or_else(|e| panic!("{} -> {}: {e}", src.gid(), dst.gid()));
            assert_eq!(info.remote_gid, dst.gid());
            // The VM's agent gives each RC connection a QP of its own.
            assert!(info.remote_qpn > 1 && info.remote_qpn != dst.ud_qp().qpn_value());
            conns.push((src.clone(), info));
        }
    }
    for vm in &all {
        let r = peer
            .rc_session(vm.gid(), DEFAULT_SERVICE_PORT, WAIT)
            .expect("peer RC");
        assert!(r.remote_comm_id != 0);
        let u = peer
            .ud_session(vm.gid(), DEFAULT_SERVICE_PORT, 20, 256, WAIT)
            .expect("peer UD");
        assert_eq!((u.qpn, u.verified), (vm.ud_qp().qpn_value(), 20));
    }
    for (vm, info) in &conns {
        vm.endpoint()
            .disconnect(info.local_comm_id, WAIT)
            .expect("disconnect");
    }
    for h in [&a, &b] {
        let s = h.mux().stats();
        assert_eq!(s.no_owner, 0);
        assert_eq!(s.unknown_comm_id, 0, "every reply matched its VM's table");
        assert_eq!(
            s.queue_full + s.truncated + s.malformed + s.refused_spoofed,
            0
        );
        // The DREPs arrive asynchronously after the disconnect calls return; wait for them.
        let drained = (0..500).any(|_| {
            std::thread::sleep(Duration::from_millis(10));
            h.vms()
                .iter()
                .all(|v| h.mux().live_connections(v.id()) == 0)
        });
        if !drained {
            for v in h.vms() {
                eprintln!(
                    "VM {} {}: {:?}",
                    v.id(),
                    v.gid(),
                    h.mux().connections(v.id())
                );
            }
            panic!("connection tables did not drain");
        }
        assert_exact_delivery(h);
        let p = h.port().stats();
        assert_eq!(p.rx_bad_icrc + p.rx_malformed + p.rx_no_qp, 0, "{p:?}");
    }
    // 5 other VMs × (REQ/REP/RTU + DREQ/DREP) each way, plus the peer's traffic.
    for vm in &all {
        let ok = (0..300).any(|_| {
            std::thread::sleep(Duration::from_millis(10));
            vm.endpoint().stats().established == 10 + 1
        });
        assert!(ok, "VM {}: {:?}", vm.gid(), vm.endpoint().stats());
    }
}

/// Several VMs pick the same communication IDs and set up connections at the same time, to
/// the same passive VM and to each other: all succeed.
#[test]
fn simultaneous_setups_with_colliding_comm_ids_from_different_vms_all_succeed() {
    let n = 22;
    let a = start_host(n, 1, 2, 0);
    let b = start_host(n, 2, 2, 0);
    let mut cm = fast_cm();
    cm.first_comm_id = Some(0x0c0f_fee0);
    let opts = VmOptions {
        cm,
        accept: AcceptMode::Auto,
        receiving: true,
        service_port: DEFAULT_SERVICE_PORT,
        rc_server: false,
    };
    let mut actives = Vec::new();
    for i in 1..=4u8 {
        actives.push(
            a.add_vm(u32::from(i), vm_gid(n, 1, i), opts.clone())
                .unwrap(),
        );
    }
    for i in 1..=2u8 {
        actives.push(
            b.add_vm(u32::from(i), vm_gid(n, 2, i), opts.clone())
                .unwrap(),
        );
    }
    let target = b.add_vm(9, vm_gid(n, 2, 9), opts.clone()).unwrap();
    let results: Vec<_> = std::thread::scope(|s| {
        let hs: Vec<_> = actives
            .iter()
            .map(|vm| {
                let target = target.gid();
                s.spawn(move || {
                    vm.endpoint()
                        .connect(target, params(vm.ud_qp().qpn_value()), WAIT)
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().expect("thread")).collect()
    });
    let mut remote_ids = Vec::new();
    for (vm, r) in actives.iter().zip(&results) {
        let info = r.as_ref().unwrap_or_else(|e| panic!("{}: {e}", vm.gid()));
        assert_eq!(info.local_comm_id, 0x0c0f_fee0, "all picked the same ID");
        remote_ids.push(info.remote_comm_id);
    }
    remote_ids.sort_unstable();
    remote_ids.dedup();
    assert_eq!(
        remote_ids.len(),
        actives.len(),
        "the passive VM told them apart"
    );
    eventually("the passive side established all", || {
        target.endpoint().stats().established == actives.len() as u64
    });
    // Same IDs between the actives themselves, in both directions at once.
    let (x, y) = (&actives[0], &actives[4]);
    let (rx, ry) = std::thread::scope(|s| {
        let h1 = s.spawn(|| x.endpoint().connect(y.gid(), params(1), WAIT));
        let h2 = s.spawn(|| y.endpoint().connect(x.gid(), params(2), WAIT));
        (h1.join().expect("t"), h2.join().expect("t"))
    });
    rx.expect("x -> y");
    ry.expect("y -> x");
    for h in [&a, &b] {
        assert_eq!(h.mux().stats().unknown_comm_id, 0);
        assert_exact_delivery(h);
    }
}

/// A MAD for an address of the host that no VM registered (the host's own) is a counted drop;
/// no VM sees it. An unregistered VM's address is closed again.
#[test]
fn unregistered_destination_is_dropped_and_counted() {
    let n = 23;
    let a = start_host(n, 1, 1, 2);
    let peer = start_peer(n, 1);
    let nobody: Gid = rdma::addr::gid_v4(host_addr(n, 1));
    let err = peer
        .rc_session(nobody, DEFAULT_SERVICE_PORT, WAIT)
        .unwrap_err();
    assert!(err.to_string().contains("timed out"), "{err}");
    // The REQ and all its retries, and the final REJ.
    let cfg = fast_cm();
    eventually("the REJ", || {
        a.mux().stats().no_owner == u64::from(cfg.max_retries) + 2
    });
    let s = a.mux().stats();
    assert_eq!(s.delivered + s.queued, 0);
    for vm in a.vms() {
        assert_eq!(vm.endpoint().stats().received, 0);
    }
    // After unregistering, a VM's GID is unowned too.
    let vm1 = a.vm(1).unwrap();
    a.remove_vm(1).unwrap();
    assert!(!a
        .port()
        .addresses()
        .contains(&std::net::Ipv4Addr::new(127, n, 1, 1)));
    assert!(peer
        .rc_session(vm1.gid(), DEFAULT_SERVICE_PORT, WAIT)
        .is_err());
    assert_eq!(
        a.mux().stats().no_owner,
        s.no_owner,
        "nothing reached the host"
    );
    peer.rc_session(a.vm(2).unwrap().gid(), DEFAULT_SERVICE_PORT, WAIT)
        .expect("the other VM still works");
}

/// A VM that never posts receive buffers: its MADs queue (bounded) then drop, counted; the
/// other VMs on the host keep working; once it posts buffers it gets the queued MADs.
#[test]
fn vm_without_receive_buffers_does_not_stall_others() {
    let n = 24;
    let a = start_host(n, 1, 1, 2);
    let peer = start_peer(n, 1);
    let (stuck, ok) = (a.vm(1).unwrap(), a.vm(2).unwrap());
    stuck.sink().set_receiving(false);
    // 100 connection attempts to the stuck VM at once (each REQ retried).
    let pending: Vec<_> = (0..100)
        .map(|i| peer.endpoint().connect_async(stuck.gid(), params(i)).1)
        .collect();
    for _ in 0..5 {
        peer.rc_session(ok.gid(), DEFAULT_SERVICE_PORT, WAIT)
            .expect("the other VM answers");
    }
    // Stop the peer (and its REQ retries) so that nothing new arrives while checking.
    peer.shutdown();
    std::thread::sleep(Duration::from_millis(100));
    let s = a.mux().stats();
    let r = a.mux().vm_report(1).unwrap();
    assert_eq!(r.pending, 64);
    assert!(r.counters.queue_full >= 36, "{r:?}");
    assert_eq!(s.queue_full, r.counters.queue_full);
    assert_eq!(stuck.endpoint().stats().received, 0);
    // Buffers posted: the queue drains in order into the VM.
    stuck.sink().set_receiving(true);
    assert_eq!(a.mux().poll_pending(1), 64);
    assert_eq!(stuck.endpoint().stats().received, 64);
    drop(pending);
    assert_exact_delivery(&a);
}

/// A connection idle for a long time (many response timeouts) is still disconnected
/// through the multiplexer: its DREQ reaches the VM (nothing ages by idleness).
#[test]
fn dreq_after_long_idle_period_still_reaches_its_vm() {
    let n = 25;
    let a = start_host(n, 1, 2, 2);
    let b = start_host(n, 2, 2, 1);
    let (vm, far) = (a.vm(1).unwrap(), b.vm(1).unwrap());
    let info = far
        .endpoint()
        .connect(vm.gid(), params(1), WAIT)
        .expect("connect");
    eventually("passive side established", || {
        vm.endpoint().stats().established == 1
    });
    // Idle for ~25 response timeouts of the test configuration.
    std::thread::sleep(Duration::from_millis(1700));
    assert_eq!(a.mux().connections(1).len(), 1, "entry kept while idle");
    far.endpoint()
        .disconnect(info.local_comm_id, WAIT)
        .expect("DREQ answered");
    assert_eq!(vm.endpoint().stats().disconnected, 1, "the VM got the DREQ");
    assert_eq!(a.mux().stats().unknown_comm_id, 0);
    assert_eq!(a.mux().live_connections(1), 0);
    assert_eq!(a.vm(2).unwrap().endpoint().stats().received, 0);
}

/// The active side gives up on a REQ the passive VM never answers (MRA, then timeout): its
/// REJ carries remote ID 0 and still reaches the right VM — the one that got the REQ — even
/// though another VM on that host has a connection using the same IDs.
#[test]
fn rej_with_remote_id_zero_reaches_the_right_vm() {
    let n = 26;
    let a = start_host(n, 1, 2, 0);
    let b = start_host(n, 2, 2, 0);
    let mut cm = fast_cm();
    cm.first_comm_id = Some(0x5000);
    let mut opts = VmOptions {
        cm: cm.clone(),
        accept: AcceptMode::Auto,
        receiving: true,
        service_port: DEFAULT_SERVICE_PORT,
        rc_server: false,
    };
    let active = a.add_vm(1, vm_gid(n, 1, 1), opts.clone()).unwrap();
    let active2 = a.add_vm(2, vm_gid(n, 1, 2), opts.clone()).unwrap();
    let other = b.add_vm(1, vm_gid(n, 2, 1), opts.clone()).unwrap();
    opts.accept = AcceptMode::Manual;
    let silent = b.add_vm(2, vm_gid(n, 2, 2), opts.clone()).unwrap();
    // A live connection with the same ID pair on the other VM of host B.
    active2
        .endpoint()
        .connect(other.gid(), params(1), WAIT)
        .expect("connect");
    let events = silent.endpoint().events();
    let err = active
        .endpoint()
        .connect(silent.gid(), params(1), Duration::from_secs(20))
        .unwrap_err();
    assert!(err.to_string().contains("timed out"), "{err}");
    let mut saw_request = false;
    let mut rejected = None;
    while let Ok(e) = events.recv_timeout(WAIT) {
        match e {
            CmEvent::ConnectRequest(_) => saw_request = true,
            CmEvent::Rejected { reason, .. } => {
                rejected = Some(reason);
                break;
            }
            _ => {}
        }
    }
    assert!(saw_request);
    assert_eq!(
        rejected,
        Some(reason::TIMEOUT),
        "REJ (timeout, remote ID 0) reached the VM"
    );
    let s = silent.endpoint().stats();
    assert!(
        s.mra_sent >= 1,
        "slow application → MRA on the duplicate REQ: {s:?}"
    );
    assert!(active.endpoint().stats().mra_received >= 1);
    assert_eq!(silent.endpoint().connection_count(), 0);
    assert_eq!(b.mux().stats().unknown_comm_id, 0);
    assert!(
        !b.mux().has_comm_state(2),
        "the passive VM's entry ended with the REJ"
    );
    assert_eq!(other.endpoint().stats().rej_received, 0, "not the other VM");
    assert_eq!(
        other.endpoint().connection_state(0x5000),
        Some(ConnState::Established)
    );
    assert_exact_delivery(&b);
}

/// A slow passive application: the duplicate REQ is answered with an MRA, the active side
/// waits the MRA's service time instead of giving up, and the connection completes.
#[test]
fn slow_responder_sends_mra_and_connection_completes() {
    let n = 27;
    let a = start_host(n, 1, 2, 1);
    let b = start_host(n, 2, 2, 0);
    let opts = VmOptions {
        cm: fast_cm(),
        accept: AcceptMode::Manual,
        receiving: true,
        service_port: DEFAULT_SERVICE_PORT,
        rc_server: false,
    };
    let slow = b.add_vm(1, vm_gid(n, 2, 1), opts).unwrap();
    let events = slow.endpoint().events();
    let ep = slow.endpoint().clone();
    let acceptor = std::thread::spawn(move || {
        while let Ok(e) = events.recv_timeout(WAIT) {
            if let CmEvent::ConnectRequest(info) = e {
                // Slow on purpose: accept only once the active side's retransmitted REQ was
                // answered with an MRA (a condition the endpoint reports, not a guess at how
                // long two response timeouts take on this machine).
                let deadline = std::time::Instant::now() + WAIT;
                while ep.stats().mra_sent == 0 {
                    if std::time::Instant::now() > deadline {
                        return Err(rdma::RdmaError::Cm("no MRA was ever sent".into()));
                    }
                    std::thread::sleep(Duration::from_millis(1));
                }
                return ep.accept(info.local_comm_id);
            }
        }
        Err(rdma::RdmaError::Cm("no request".into()))
    });
    let active = a.vm(1).unwrap();
    let info = active
        .endpoint()
        .connect(slow.gid(), params(1), WAIT)
        .expect("connected despite the slow application");
    acceptor.join().expect("thread").expect("accept");
    assert!(slow.endpoint().stats().mra_sent >= 1);
    assert!(active.endpoint().stats().mra_received >= 1);
    eventually("passive established", || {
        slow.endpoint().connection_state(info.remote_comm_id) == Some(ConnState::Established)
    });
    assert_exact_delivery(&b);
}

/// Registration through a live host: a GID owned by another VM is refused; removing a VM
/// unregisters all its GIDs at once.
#[test]
fn registering_a_gid_of_another_vm_is_refused_on_a_live_host() {
    let n = 28;
    let a = start_host(n, 1, 1, 2);
    let opts = VmOptions {
        cm: fast_cm(),
        accept: AcceptMode::Auto,
        receiving: true,
        service_port: DEFAULT_SERVICE_PORT,
        rc_server: false,
    };
    let taken = a.vm(1).unwrap().gid();
    let err = a.add_vm(3, taken, opts).err().expect("refused");
    assert!(
        err.to_string().contains("already registered to VM 1"),
        "{err}"
    );
    a.mux().register_gid(2, vm_gid(n, 1, 50)).unwrap();
    assert_eq!(a.mux().gid_count(), 3);
    assert_eq!(a.remove_vm(2).unwrap(), 2);
    assert_eq!(a.mux().gid_count(), 1);
    let _ = Arc::clone(a.mux());
}

/// A VM sending with another VM's source GID (or a REQ claiming another VM's GID as its
/// primary local GID) is refused and counted; nothing reaches the wire.
#[test]
fn spoofed_source_from_a_vm_is_refused_on_a_live_host() {
    use rdma_wire::cm::Req;
    use rdma_wire::mad::{attr, MadHeader};
    let n = 29;
    let a = start_host(n, 1, 1, 2);
    let peer = start_peer(n, 1);
    let (v1, v2) = (a.vm(1).unwrap(), a.vm(2).unwrap());
    let mut r = Req {
        hdr: MadHeader::cm(attr::REQ, 1),
        local_comm_id: 5,
        service_id: rc_service(DEFAULT_SERVICE_PORT),
        ..Req::default()
    };
    r.primary_path.local_gid = v2.gid();
    r.primary_path.remote_gid = peer.gid();
    let mad = r.to_mad();
    let e = a
        .mux()
        .send_from_vm(1, v2.gid(), peer.gid(), &mad)
        .unwrap_err();
    assert!(e.to_string().contains("not registered to VM 1"), "{e}");
    a.mux()
        .send_from_vm(1, v1.gid(), peer.gid(), &mad)
        .unwrap_err();
    assert_eq!(a.mux().stats().refused_spoofed, 2);
    assert_eq!(a.mux().vm_report(1).unwrap().counters.refused, 2);
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(a.port().stats().tx_datagrams, 0);
    assert_eq!(peer.endpoint().stats().received, 0);
    // The same REQ with its own GID goes out.
    r.primary_path.local_gid = v1.gid();
    a.mux()
        .send_from_vm(1, v1.gid(), peer.gid(), &r.to_mad())
        .unwrap();
    eventually("the peer got the REQ", || {
        peer.endpoint().stats().received == 1
    });
}

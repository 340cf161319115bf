//! RC queue pairs over real UDP sockets on loopback: rping (rdma-core's protocol) and SEND echo sessions
//! through the CM and a host's VM agent; a packet for a connected QP from another address is
//! refused and counted; a WRITE outside the peer's region or with a wrong rkey fails with
//! `RemAccessErr` and the target counts the refusal.
mod common;

use std::net::Ipv4Addr;
use std::sync::Arc;

use common::*;
use rdma::addr::gid_v4;
use rdma::host::DEFAULT_SERVICE_PORT;
use rdma::port::{PortConfig, SoftPort};
use rdma::rc::{Access, MonotonicClock, MrTable, RcAttrs, SendOp, SendWr, WcStatus};
use rdma::rc_session::tools::Tool;
use rdma::rc_session::RcMode;

/// A bare-metal peer runs rping (64 KiB buffers: the VM READs one and WRITEs it into the other,
/// the peer compares) and SEND-echo sessions with a VM; two peers at once each get their own
/// QP.
#[test]
fn rping_and_send_sessions_with_a_vm() {
    let n = 37;
    let a = start_host(n, 1, 1, 1);
    let vm = a.vm(1).unwrap().gid();
    let peer = start_peer(n, 1);
    let r = peer
        .rc_data_session(vm, DEFAULT_SERVICE_PORT, RcMode::Rping, 20, 64 << 10, WAIT)
        .expect("rping session");
    assert_eq!(r.verified, 20);
    assert_eq!(r.bytes, 20 * 2 * (64 << 10));
    let rc = r.rc.unwrap();
    // rping: the VM READs each 64 KiB start buffer (our responses) and WRITEs it back into
    // the second buffer: 64 packets at MTU 1024.
    assert!(rc.rx_packets >= 20 * 64, "{rc:?}");
    assert_eq!(rc.rx_bytes, 20 * (64 << 10) + 40 * 16, "{rc:?}");
    let r = peer
        .rc_data_session(vm, DEFAULT_SERVICE_PORT, RcMode::Send, 50, 3000, WAIT)
        .expect("send session");
    assert_eq!(r.verified, 50);

    let second =
        rdma::peer::Peer::start(PortConfig::new(Ipv4Addr::new(127, n, 0, 201)), fast_cm()).unwrap();
    let t = std::thread::spawn(move || {
        second
            .rc_data_session(vm, DEFAULT_SERVICE_PORT, RcMode::Rping, 30, 5000, WAIT)
            .map(|r| r.verified)
    });
    let mine = peer
        .rc_data_session(vm, DEFAULT_SERVICE_PORT, RcMode::Send, 30, 777, WAIT)
        .expect("concurrent session");
    assert_eq!(mine.verified, 30);
    assert_eq!(t.join().unwrap().expect("the other session"), 30);
    assert_eq!(a.port().stats().rx_wrong_source, 0);
}

/// Two QPs connected by hand across two ports, with a third port as the attacker.
#[test]
fn spoofed_source_and_bad_remote_accesses_are_refused_and_counted() {
    let n = 38;
    let ip = |d| Ipv4Addr::new(127, n, 0, d);
    let (px, py, pz) = (
        SoftPort::bind(PortConfig::new(ip(1))).unwrap(),
        SoftPort::bind(PortConfig::new(ip(2))).unwrap(),
        SoftPort::bind(PortConfig::new(ip(3))).unwrap(),
    );
    let clock = Arc::new(MonotonicClock::default());
    let (mx, my) = (Arc::new(MrTable::new(4)), Arc::new(MrTable::new(4)));
    let qx = px.create_rc_qp(gid_v4(ip(1)), mx.clone(), clock.clone());
    let qy = py.create_rc_qp(gid_v4(ip(2)), my.clone(), clock.clone());
    let region = my.register(0x5000, 4096, Access::ALL).unwrap();
    let attrs = |dest, sq, rq| RcAttrs {
        dest_qpn: dest,
        sq_psn: sq,
        rq_psn: rq,
        path_mtu: 1024,
        ..RcAttrs::default()
    };
    qx.connect(gid_v4(ip(2)), attrs(qy.qpn_value(), 100, 200), true, true)
        .unwrap();
    qy.connect(gid_v4(ip(1)), attrs(qx.qpn_value(), 200, 100), true, true)
        .unwrap();
    // A good WRITE works.
    qx.post_send(SendWr {
        wr_id: 1,
        op: SendOp::Write {
            data: vec![7; 3000],
            remote_addr: 0x5000,
            rkey: region.key(),
            imm: None,
        },
    })
    .unwrap();
    assert_eq!(qx.wait(WAIT).unwrap().status, WcStatus::Success);
    assert_eq!(region.read(0x5000, 3000).unwrap(), vec![7; 3000]);

    // The attacker (another address) sends a well-formed WRITE ONLY with the right QPN, PSN
    // and rkey: refused by the port before the QP sees it.
    let z_qp = pz.create_rc_qp(gid_v4(ip(3)), Arc::new(MrTable::new(1)), clock.clone());
    z_qp.connect(gid_v4(ip(2)), attrs(qy.qpn_value(), 103, 0), true, true)
        .unwrap();
    z_qp.post_send(SendWr {
        wr_id: 9,
        op: SendOp::Write {
            data: vec![0xee; 16],
            remote_addr: 0x5000,
            rkey: region.key(),
            imm: None,
        },
    })
    .unwrap();
    eventually("spoofed packet refused", || py.stats().rx_wrong_source >= 1);
    assert_eq!(
        region.read(0x5000, 16).unwrap(),
        vec![7; 16],
        "nothing written"
    );
    z_qp.to_err();

    // A WRITE past the region's end: RemAccessErr at the requester, counted at the target.
    qx.post_send(SendWr {
        wr_id: 2,
        op: SendOp::Write {
            data: vec![1; 200],
            remote_addr: 0x5000 + 4000,
            rkey: region.key(),
            imm: None,
        },
    })
    .unwrap();
    let wc = qx.wait(WAIT).unwrap();
    assert_eq!((wc.wr_id, wc.status), (2, WcStatus::RemAccessErr));
    assert_eq!(qy.stats().rx_access_refused, 1);
    assert_eq!(region.read(0x5000 + 4000, 96).unwrap(), vec![0; 96]);
    for q in [&qx, &qy, &z_qp] {
        q.shutdown();
    }
    for p in [&px, &py, &pz] {
        p.shutdown();
    }
}

/// Linux tools' protocols (what `ferry rdma peer --mode rping|ucmatose` speaks with rping and
/// ucmatose) between two Ferry peers: the server READs and checks rping's pattern, WRITEs it
/// back, the client compares; ucmatose's SENDs go both ways and the server checks the replies.
#[test]
fn rping_and_ucmatose_protocols_between_two_peers() {
    let n = 39;
    for (tool, port, size) in [(Tool::Rping, 7174, 64), (Tool::Ucmatose, 7471, 100)] {
        let server =
            rdma::peer::Peer::start(PortConfig::new(Ipv4Addr::new(127, n, 0, 1)), fast_cm())
                .expect("server peer");
        let (tx, rx) = std::sync::mpsc::channel();
        let t = std::thread::spawn(move || {
            let r = server.tool_server(port, tool, 7, size, WAIT, || tx.send(()).unwrap());
            server.shutdown();
            r
        });
        rx.recv_timeout(WAIT).expect("the server listens");
        let client =
            rdma::peer::Peer::start(PortConfig::new(Ipv4Addr::new(127, n, 0, 2)), fast_cm())
                .expect("client peer");
        let c = client
            .tool_client(
                gid_v4(Ipv4Addr::new(127, n, 0, 1)),
                port,
                tool,
                7,
                size,
                WAIT,
            )
            .unwrap_or_else(|e| panic!("{tool:?} client: {e}"));
        let s = t
            .join()
            .unwrap()
            .unwrap_or_else(|e| panic!("{tool:?} server: {e}"));
        assert_eq!((c.verified, s.verified), (7, 7), "{tool:?}");
        assert_eq!(c.tool, Some(tool));
        client.shutdown();
    }
}

/// A 64 KiB WRITE at MTU 4096: FIRST (with its RETH) leaves alone, the 15 MIDDLE/LAST
/// packets in one UDP GSO send. A plain socket without GRO gets them from the kernel as 16
/// datagrams, and each one's ICRC verifies against the real IPv4 header the kernel wrote —
/// identification 0 for FIRST, 0..14 along the run — so the wire is exact RoCEv2 for a peer
/// that checks real headers (as Linux rxe does). Between two ports the run arrives in one
/// coalesced receive (GRO) and the WRITE lands intact.
#[test]
fn gso_runs_carry_exact_icrcs_and_arrive_coalesced() {
    let n = 48;
    let ip = |d| Ipv4Addr::new(127, n, 0, d);
    let clock = Arc::new(MonotonicClock::default());
    let data: Vec<u8> = (0..64 << 10)
        .map(|i: u32| (i * 7 + i / 4096) as u8)
        .collect();
    let attrs = |dest, sq, rq| RcAttrs {
        dest_qpn: dest,
        sq_psn: sq,
        rq_psn: rq,
        path_mtu: 4096,
        ..RcAttrs::default()
    };
    let write = |rkey| SendWr {
        wr_id: 1,
        op: SendOp::Write {
            data: data.clone(),
            remote_addr: 0x10_0000,
            rkey,
            imm: None,
        },
    };

    // To a plain socket: the datagrams the kernel makes of the runs.
    let px = SoftPort::bind(PortConfig::new(ip(1))).unwrap();
    let plain = std::net::UdpSocket::bind((ip(2), 4791)).unwrap();
    plain
        .set_read_timeout(Some(std::time::Duration::from_secs(20)))
        .unwrap();
    let qx = px.create_rc_qp(gid_v4(ip(1)), Arc::new(MrTable::new(1)), clock.clone());
    qx.connect(gid_v4(ip(2)), attrs(0x77, 500, 0), true, true)
        .unwrap();
    qx.post_send(write(0x1234)).unwrap();
    let mut ids = Vec::new();
    let mut buf = vec![0u8; 9000];
    for k in 0..16u32 {
        let (len, from) = plain.recv_from(&mut buf).unwrap();
        let std::net::SocketAddr::V4(from) = from else {
            panic!("not IPv4")
        };
        let d = &buf[..len];
        let id = rdma_wire::icrc::verify_for_udp_socket_any_ip_id(
            (*from.ip()).into(),
            ip(2).into(),
            from.port(),
            4791,
            d,
        )
        .unwrap_or_else(|e| panic!("datagram {k}: {e}"));
        ids.push(id);
        let p = rdma_wire::RocePacket::parse(d).unwrap();
        assert_eq!(p.bth.psn, 500 + k, "in order");
        let at = k as usize * 4096;
        assert_eq!(p.payload, &data[at..at + 4096], "datagram {k}'s payload");
    }
    let run: Vec<u16> = (0..15).collect();
    assert_eq!(ids[0], 0, "FIRST alone");
    assert_eq!(ids[1..], run[..], "the run numbered by the kernel");
    assert!(px.stats().tx_gso_runs >= 1, "{:?}", px.stats());
    qx.shutdown();
    px.shutdown();

    // Port to port: coalesced on receive, written intact.
    let (px, py) = (
        SoftPort::bind(PortConfig::new(ip(3))).unwrap(),
        SoftPort::bind(PortConfig::new(ip(4))).unwrap(),
    );
    let my = Arc::new(MrTable::new(1));
    let region = my.register(0x10_0000, 64 << 10, Access::ALL).unwrap();
    let qx = px.create_rc_qp(gid_v4(ip(3)), Arc::new(MrTable::new(1)), clock.clone());
    let qy = py.create_rc_qp(gid_v4(ip(4)), my, clock);
    qx.connect(gid_v4(ip(4)), attrs(qy.qpn_value(), 500, 900), true, true)
        .unwrap();
    qy.connect(gid_v4(ip(3)), attrs(qx.qpn_value(), 900, 500), true, true)
        .unwrap();
    for i in 0..4 {
        qx.post_send(write(region.key())).unwrap();
        let wc = qx.wait(WAIT).unwrap();
        assert_eq!(wc.status, WcStatus::Success, "WRITE {i}");
    }
    assert_eq!(region.read(0x10_0000, 64 << 10).unwrap(), data);
    let (sx, sy) = (px.stats(), py.stats());
    assert!(sx.tx_gso_runs >= 4, "{sx:?}");
    assert!(sy.rx_gro_runs >= 4, "{sy:?}");
    assert_eq!(sy.rx_bad_icrc, 0, "{sy:?}");
    assert_eq!(qx.stats().tx_retransmits, 0);
    for q in [&qx, &qy] {
        q.shutdown();
    }
    for p in [&px, &py] {
        p.shutdown();
    }
}

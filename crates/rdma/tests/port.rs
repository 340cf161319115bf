//! The software RoCEv2 port over real UDP sockets: hostile datagrams (bad ICRC, garbage,
//! truncated, malformed MADs, wrong P_Key or Q_Key, spoofed sources) are counted drops and
//! never disturb the VMs; UD queue pairs; standard RoCEv2 on the wire; pcap capture.
mod common;

use std::net::{Ipv4Addr, SocketAddr};

use common::*;
use rdma::addr::gid_v4;
use rdma::host::DEFAULT_SERVICE_PORT;
use rdma::port::{encode_datagram, PortConfig, SoftPort, UdDest, UdSend};
use rdma_wire::cm::Req;
use rdma_wire::mad::{attr, MadHeader};
use rdma_wire::{Gid, RocePacket, GSI_QKEY};

/// The socket of VM 1 of host 1 (its GID's address).
fn vm_sock(n: u8) -> SocketAddr {
    SocketAddr::from((Ipv4Addr::new(127, n, 1, 1), 4791))
}

fn req_mad(from: Gid, to: Gid) -> rdma_wire::Mad {
    let mut r = Req {
        hdr: MadHeader::cm(attr::REQ, 1),
        local_comm_id: 77,
        ..Req::default()
    };
    r.primary_path.local_gid = from;
    r.primary_path.remote_gid = to;
    r.to_mad()
}

/// Bad ICRC, garbage, truncated datagrams, truncated and malformed MADs, wrong P_Key
/// and GSI Q_Key: each dropped and counted where it belongs; the VMs still work afterwards.
#[test]
fn bad_icrc_truncated_and_malformed_packets_are_dropped_and_counted() {
    let n = 31;
    let a = start_host(n, 1, 1, 2);
    let attacker = SoftPort::bind(PortConfig::new(Ipv4Addr::new(127, n, 0, 66))).unwrap();
    let src = gid_v4(Ipv4Addr::new(127, n, 0, 66));
    let vm = a.vm(1).unwrap();
    let dst = vm.gid();
    let to = vm_sock(n);
    let from = Ipv4Addr::new(127, n, 0, 66);
    let good_mad = req_mad(src, dst);
    let enc = |pkt: &RocePacket<'_>| {
        let mut buf = vec![0u8; 1024];
        let len = encode_datagram(src, dst, attacker.udp_port(), 4791, pkt, &mut buf).unwrap();
        buf.truncate(len);
        buf
    };
    let good = enc(&RocePacket::ud_mad(&good_mad, 0xffff, 0));

    // 1. Bad ICRC.
    let mut bad_icrc = good.clone();
    let last = bad_icrc.len() - 1;
    bad_icrc[last] ^= 0x5a;
    attacker.send_raw(from, to, &bad_icrc).unwrap();
    // 2. Payload corrupted after the ICRC was computed.
    let mut corrupt = good.clone();
    corrupt[12 + 8 + 30] ^= 1;
    attacker.send_raw(from, to, &corrupt).unwrap();
    // 3. Garbage shorter than a BTH and an ICRC.
    attacker.send_raw(from, to, b"hello").unwrap();
    // 4. Truncated datagrams (cut inside the BTH, and inside the MAD).
    attacker.send_raw(from, to, &good[..7]).unwrap();
    attacker.send_raw(from, to, &good[..100]).unwrap();
    // 5. A truncated MAD with a valid ICRC (a 100-byte payload on QP1).
    let short = good_mad[..100].to_vec();
    let mut p = RocePacket::ud_mad(&good_mad, 0xffff, 0);
    p.payload = &short;
    attacker.send_raw(from, to, &enc(&p)).unwrap();
    // 6. A malformed CM MAD (unknown attribute) with a valid ICRC.
    let mut bad_attr = good_mad;
    bad_attr[16..18].copy_from_slice(&0x0099u16.to_be_bytes());
    attacker
        .send_raw(from, to, &enc(&RocePacket::ud_mad(&bad_attr, 0xffff, 0)))
        .unwrap();
    // 7. Wrong P_Key.
    attacker
        .send_raw(from, to, &enc(&RocePacket::ud_mad(&good_mad, 0x8123, 0)))
        .unwrap();
    // 8. QP1 with a wrong Q_Key.
    let mut p = RocePacket::ud_mad(&good_mad, 0xffff, 0);
    p.deth = Some(rdma_wire::Deth {
        q_key: 0x1234,
        src_qp: 1,
    });
    attacker.send_raw(from, to, &enc(&p)).unwrap();
    // 9. A UD packet to a QPN that does not exist.
    let mut p = RocePacket::ud_mad(&good_mad, 0xffff, 0);
    p.bth.dest_qp = 0x00ab_cdef;
    attacker.send_raw(from, to, &enc(&p)).unwrap();

    eventually("all hostile datagrams seen", || {
        a.port().stats().rx_datagrams >= 10
    });
    let ps = a.port().stats();
    assert_eq!(ps.rx_bad_icrc, 3, "{ps:?}"); // bad ICRC, corrupted payload, cut in the MAD
    assert_eq!(ps.rx_malformed, 2, "{ps:?}"); // garbage, cut inside the BTH
    assert_eq!(ps.rx_bad_pkey, 1, "{ps:?}");
    assert_eq!(ps.rx_bad_qkey, 1, "{ps:?}");
    assert_eq!(ps.rx_no_qp, 1, "{ps:?}");
    let ms = a.mux().stats();
    assert_eq!((ms.truncated, ms.malformed), (1, 1), "{ms:?}");
    assert_eq!(ms.delivered + ms.queued, 0);
    assert_eq!(vm.endpoint().stats().received, 0);

    // The good packet still goes through, and the VMs still connect.
    attacker.send_raw(from, to, &good).unwrap();
    eventually("good MAD delivered", || a.mux().stats().delivered == 1);
    let peer = start_peer(n, 1);
    peer.rc_session(a.vm(2).unwrap().gid(), DEFAULT_SERVICE_PORT, WAIT)
        .expect("VM 2 still connects");
    attacker.shutdown();
}

/// UD queue pairs: SIDR gives the VM's QPN and Q_Key; a wrong Q_Key or a DGID that is not
/// the QP's is a counted drop; messages (with immediate data, odd sizes) are echoed.
#[test]
fn ud_qps_check_q_key_and_destination_and_echo() {
    let n = 32;
    let a = start_host(n, 1, 1, 1);
    let peer = start_peer(n, 1);
    let vm = a.vm(1).unwrap();
    let info = peer
        .endpoint()
        .sidr_resolve(
            vm.gid(),
            rdma::host::ud_service(DEFAULT_SERVICE_PORT),
            &[],
            WAIT,
        )
        .expect("SIDR");
    assert_eq!(info.qpn, vm.ud_qp().qpn_value());
    assert_eq!(info.qkey, rdma_wire::rdma_cm::RDMA_CM_UD_QKEY);
    let qp = peer.ud_qp();
    // Wrong Q_Key: counted drop at the VM's QP.
    let bad = UdDest {
        dgid: vm.gid(),
        dqpn: info.qpn,
        qkey: GSI_QKEY,
    };
    peer.port()
        .post_send_ud(qp, bad, None, b"bad qkey")
        .unwrap();
    eventually("Q_Key drop", || {
        vm.ud_qp().counters.snapshot().rx_bad_qkey == 1
    });
    // Right QPN but another of the host's addresses (its own) as destination: counted drop.
    let other = UdDest {
        dgid: gid_v4(host_addr(n, 1)),
        dqpn: info.qpn,
        qkey: info.qkey,
    };
    peer.port()
        .post_send_ud(qp, other, None, b"wrong dgid")
        .unwrap();
    eventually("DGID drop", || a.port().stats().rx_wrong_dgid == 1);
    // Good message with immediate data: echoed back with it.
    let good = UdDest {
        dgid: vm.gid(),
        dqpn: info.qpn,
        qkey: info.qkey,
    };
    peer.port()
        .post_send_ud(qp, good, Some(0xfeed), b"hello, vm")
        .unwrap();
    let echo = qp.recv_timeout(WAIT).expect("echo");
    assert_eq!(echo.data, b"hello, vm");
    assert_eq!(echo.imm, Some(0xfeed));
    assert_eq!(echo.sgid, vm.gid());
    assert_eq!(echo.src_qpn, info.qpn);
    assert_eq!(
        rdma::addr::parse_grh(&echo.grh),
        Some((vm.gid(), peer.gid()))
    );
    // Odd sizes are padded and unpadded.
    let r = peer
        .ud_session(vm.gid(), DEFAULT_SERVICE_PORT, 10, 1021, WAIT)
        .unwrap();
    assert_eq!(r.verified, 10);
}

/// With `pcap`, every packet is written as the Ethernet/IPv4/UDP frame it travelled in: the
/// GIDs are the IP addresses and every frame's ICRC verifies against its own headers. When
/// tshark is installed it must dissect them as InfiniBand CM, with no malformed packet.
#[test]
fn pcap_capture_is_real_rocev2_and_dissected_without_errors() {
    let n = 33;
    let dir = std::env::temp_dir().join(format!("ferry-rdma-pcap-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("host.pcap");
    let mut cfg = rdma::host::HostConfig::new(host_addr(n, 1), 1, Ipv4Addr::new(127, n, 1, 1));
    cfg.port.pcap = Some(path.clone());
    cfg.cm = fast_cm();
    let a = rdma::host::Host::start(cfg).unwrap();
    let peer = start_peer(n, 1);
    let vm = a.vm(1).unwrap();
    peer.rc_session(vm.gid(), DEFAULT_SERVICE_PORT, WAIT)
        .unwrap();
    peer.ud_session(vm.gid(), DEFAULT_SERVICE_PORT, 2, 64, WAIT)
        .unwrap();
    // RC data: SEND (hello), RDMA WRITE FIRST/MIDDLE/LAST, READ request and responses, ACKs.
    peer.rc_data_session(
        vm.gid(),
        DEFAULT_SERVICE_PORT,
        rdma::rc_session::RcMode::Rping,
        2,
        3000,
        WAIT,
    )
    .unwrap();
    a.shutdown();
    let bytes = std::fs::read(&path).unwrap();
    assert_eq!(&bytes[..4], &0xa1b2_c3d4u32.to_le_bytes());
    // Walk the records: every frame is IPv4/UDP to port 4791 with GIDs as addresses, and its
    // ICRC verifies against the frame's own IPv4 and UDP headers.
    let mut at = 24;
    let mut frames = 0;
    while at + 16 <= bytes.len() {
        let len = u32::from_le_bytes(bytes[at + 8..at + 12].try_into().unwrap()) as usize;
        let f = &bytes[at + 16..at + 16 + len];
        assert_eq!(&f[12..14], &[0x08, 0x00]);
        assert_eq!(u16::from_be_bytes([f[36], f[37]]), 4791);
        let (s, d) = (&f[26..30], &f[30..34]);
        assert!(s == [127, n, 1, 1] || d == [127, n, 1, 1], "{s:?} {d:?}");
        rdma_wire::icrc::verify(&f[14..34], &f[34..42], &f[42..]).expect("frame's ICRC");
        RocePacket::parse(&f[42..]).expect("frame parses");
        at += 16 + len;
        frames += 1;
    }
    assert!(
        frames >= 9,
        "REQ REP RTU DREQ DREP SIDR_REQ SIDR_REP and UD: {frames}"
    );
    // One summary line per frame: the CM message or RC opcode, "[Malformed Packet]" if any.
    let tshark = std::process::Command::new("tshark")
        .args(["-r"])
        .arg(&path)
        .output();
    match tshark {
        Ok(out) if out.status.success() => {
            let text = String::from_utf8_lossy(&out.stdout);
            for want in [
                "ConnectRequest",
                "ConnectReply",
                "ReadyToUse",
                "DisconnectRequest",
                "RC RDMA Write First",
                "RC RDMA Read Request",
                "RC RDMA Read Response Last",
                "RC Acknowledge",
                "RC Send Only",
            ] {
                assert!(text.contains(want), "tshark output lacks {want}");
            }
            assert!(
                !text.contains("Malformed"),
                "tshark: malformed packet\n{text}"
            );
            assert_eq!(
                text.lines().filter(|l| l.contains("RRoCE")).count(),
                frames,
                "every frame dissected as RoCEv2\n{text}"
            );
        }
        Ok(out) => panic!("tshark failed: {}", String::from_utf8_lossy(&out.stderr)),
        Err(e) => eprintln!("tshark not run ({e}); the frame checks above still hold"),
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// A host that is shut down and dropped releases its address: the same address binds again
/// (no reference cycle keeps the socket open).
#[test]
fn host_shutdown_releases_its_socket() {
    let n = 34;
    for _ in 0..3 {
        let a = start_host(n, 1, 1, 2);
        let peer = start_peer(n, 1);
        peer.rc_session(a.vm(1).unwrap().gid(), DEFAULT_SERVICE_PORT, WAIT)
            .unwrap();
        a.shutdown();
        drop(a);
        drop(peer);
    }
}

/// On the wire a packet is plain RoCEv2: it leaves from the source GID's address (the kernel
/// writes it), goes to the destination GID's address, and the UDP payload starts with the BTH;
/// the ICRC covers those addresses as IP source and destination — the source is never put
/// where the destination belongs. A port cannot send from an address it does not have.
#[test]
fn transmit_is_plain_rocev2_from_the_source_gid_to_the_destination_gid() {
    let n = 35;
    let (sgid, dgid) = (vm_gid(n, 1, 1), vm_gid(n, 2, 7));
    let receiver = std::net::UdpSocket::bind((Ipv4Addr::new(127, n, 2, 7), 4791)).unwrap();
    receiver
        .set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .unwrap();
    let port = SoftPort::bind(PortConfig::new(Ipv4Addr::new(127, n, 0, 1))).unwrap();
    let not_claimed = rdma::port::Qp1Tx::send_gsi(&port, sgid, dgid, &req_mad(sgid, dgid));
    assert!(
        matches!(not_claimed, Err(rdma::RdmaError::NotLocalGid(_))),
        "{not_claimed:?}"
    );
    port.claim_gid(sgid).unwrap();
    assert_eq!(
        port.addresses(),
        [Ipv4Addr::new(127, n, 0, 1), Ipv4Addr::new(127, n, 1, 1)]
    );
    rdma::port::Qp1Tx::send_gsi(&port, sgid, dgid, &req_mad(sgid, dgid)).unwrap();
    let mut buf = [0u8; 2048];
    let (len, from) = receiver.recv_from(&mut buf).unwrap();
    assert_eq!(from, SocketAddr::from((Ipv4Addr::new(127, n, 1, 1), 4791)));
    let roce = &buf[..len];
    let pkt = RocePacket::parse(roce).expect("the payload is BTH … ICRC");
    assert!(pkt.is_gsi());
    rdma_wire::icrc::verify_for_udp_socket(sgid.to_ip(), dgid.to_ip(), 4791, 4791, roce).unwrap();
    assert!(
        rdma_wire::icrc::verify_for_udp_socket(dgid.to_ip(), sgid.to_ip(), 4791, 4791, roce)
            .is_err()
    );
    // The last release closes the socket; the address binds again.
    port.release_gid(sgid);
    assert_eq!(port.addresses(), [Ipv4Addr::new(127, n, 0, 1)]);
    drop(std::net::UdpSocket::bind((Ipv4Addr::new(127, n, 1, 1), 4791)).unwrap());
    // A GID that is not an address of this host cannot be claimed.
    assert!(port.claim_gid(gid_v4(Ipv4Addr::new(192, 0, 2, 1))).is_err());
    assert_eq!(port.stats().gid_claims_refused, 1);
    port.shutdown();
}

/// Captures what arrives on QP1 of a bare port.
#[derive(Default)]
struct Capture(parking_lot::Mutex<Vec<(Gid, Vec<u8>)>>);

impl rdma::port::GsiHandler for Capture {
    fn on_gsi(&self, pkt: &rdma::port::GsiPacket<'_>) {
        self.0.lock().push((pkt.sgid, pkt.payload.to_vec()));
    }
}

/// The source GID is the datagram's IP source: a REQ from one address claiming another as its
/// primary local GID, a REQ naming another VM's GID as its destination, and a reply to a VM's connection (REP) or SIDR request (SIDR_REP) from an
/// address other than the peer it was made with, are dropped and counted; the real peer's
/// reply still gets through.
#[test]
fn spoofed_sources_are_refused_and_counted() {
    use rdma::port::Qp1Tx;
    use rdma_wire::cm::{CmMessage, Rep, SidrRep};
    let n = 36;
    let a = start_host(n, 1, 1, 1);
    let vm = a.vm(1).unwrap();
    let attacker_ip = Ipv4Addr::new(127, n, 0, 66);
    let attacker = SoftPort::bind(PortConfig::new(attacker_ip)).unwrap();
    let src = gid_v4(attacker_ip);
    let victim = gid_v4(Ipv4Addr::new(127, n, 0, 200));
    // 1. A REQ from the attacker's address naming another host as its primary local GID.
    attacker
        .send_gsi(src, vm.gid(), &req_mad(victim, vm.gid()))
        .unwrap();
    eventually("spoofed REQ counted", || {
        a.mux().stats().spoofed_source == 1
    });
    assert_eq!(vm.endpoint().stats().received, 0);
    // A REQ sent to this VM's address that names another GID as its destination.
    let other = gid_v4(Ipv4Addr::new(127, n, 1, 2));
    attacker
        .send_gsi(src, vm.gid(), &req_mad(src, other))
        .unwrap();
    eventually("misaddressed REQ counted", || {
        a.mux().stats().misaddressed == 1
    });
    assert_eq!(vm.endpoint().stats().received, 0);

    // 2. The VM connects to a quiet port (it captures the REQ and does not answer at once).
    let quiet_ip = Ipv4Addr::new(127, n, 0, 77);
    let quiet = SoftPort::bind(PortConfig::new(quiet_ip)).unwrap();
    let cap = std::sync::Arc::new(Capture::default());
    quiet.set_gsi_handler(cap.clone());
    let (local_id, done) = vm.endpoint().connect_async(
        gid_v4(quiet_ip),
        rdma::cm::ConnectParams {
            service_id: rdma::host::rc_service(DEFAULT_SERVICE_PORT),
            qpn: vm.ud_qp().qpn_value(),
            private_data: vec![0; 36],
        },
    );
    eventually("REQ at the quiet port", || !cap.0.lock().is_empty());
    let (from, mad) = cap.0.lock()[0].clone();
    assert_eq!(from, vm.gid(), "the REQ came from the VM's own address");
    let Ok(CmMessage::Req(req)) = CmMessage::parse_mad(mad.as_slice()) else {
        panic!("not a REQ")
    };
    assert_eq!(req.local_comm_id, local_id);
    let rep = Rep {
        hdr: rdma_wire::mad::MadHeader::cm(attr::REP, req.hdr.transaction_id),
        local_comm_id: 0x5151,
        remote_comm_id: local_id,
        local_qpn: 0x99,
        ..Rep::default()
    }
    .to_mad();
    // The attacker answers for the quiet port: dropped, counted, the connection not made.
    attacker.send_gsi(src, vm.gid(), &rep).unwrap();
    eventually("spoofed REP counted", || {
        a.mux().stats().spoofed_source == 2
    });
    assert!(
        done.try_recv().is_err(),
        "the spoofed REP established nothing"
    );
    // The real peer's REP goes through and the connection completes.
    quiet.send_gsi(gid_v4(quiet_ip), vm.gid(), &rep).unwrap();
    let info = done
        .recv_timeout(WAIT)
        .expect("connect answered")
        .expect("connected");
    assert_eq!(info.remote_comm_id, 0x5151);

    // 3. A SIDR_REP from the wrong address.
    let vm_ep = vm.endpoint().clone();
    let qgid = gid_v4(quiet_ip);
    let sidr =
        std::thread::spawn(move || vm_ep.sidr_resolve(qgid, rdma::host::ud_service(1), &[], WAIT));
    eventually("SIDR_REQ at the quiet port", || {
        cap.0.lock().iter().any(|(_, m)| {
            matches!(
                CmMessage::parse_mad(m.as_slice()),
                Ok(CmMessage::SidrReq(_))
            )
        })
    });
    let sreq = cap
        .0
        .lock()
        .iter()
        .find_map(|(_, m)| match CmMessage::parse_mad(m.as_slice()) {
            Ok(CmMessage::SidrReq(r)) => Some(r),
            _ => None,
        })
        .unwrap();
    let srep = SidrRep {
        hdr: rdma_wire::mad::MadHeader::cm(attr::SIDR_REP, sreq.hdr.transaction_id),
        request_id: sreq.request_id,
        qpn: 0x77,
        qkey: 0x1234_5678,
        service_id: sreq.service_id,
        ..SidrRep::default()
    }
    .to_mad();
    attacker.send_gsi(src, vm.gid(), &srep).unwrap();
    eventually("spoofed SIDR_REP counted", || {
        a.mux().stats().spoofed_source == 3
    });
    quiet.send_gsi(qgid, vm.gid(), &srep).unwrap();
    let r = sidr
        .join()
        .unwrap()
        .expect("SIDR answered by the real peer");
    assert_eq!(r.qpn, 0x77);
    assert_eq!(a.mux().vm_report(1).unwrap().counters.spoofed_source, 3);
    attacker.shutdown();
    quiet.shutdown();
}

/// A batch of UD sends: consecutive messages to one destination leave as GSO runs, each
/// arrives as its own verified message in order, and one message too large for the MTU in
/// the middle is refused alone.
#[test]
fn a_ud_batch_leaves_in_runs_and_arrives_message_by_message() {
    let n = 49;
    let (a, b) = (Ipv4Addr::new(127, n, 0, 1), Ipv4Addr::new(127, n, 0, 2));
    let pa = SoftPort::bind(PortConfig::new(a)).unwrap();
    let pb = SoftPort::bind(PortConfig::new(b)).unwrap();
    let qa = pa.create_ud_qp(gid_v4(a), 0x1234);
    let qb = pb.create_ud_qp(gid_v4(b), 0x1234);
    let dest = UdDest {
        dgid: gid_v4(b),
        dqpn: qb.qpn_value(),
        qkey: 0x1234,
    };
    let big = vec![0u8; rdma::port::MAX_UD_PAYLOAD + 1];
    // 20 of 100 bytes, one too large, 20 of 100 bytes and a shorter last one.
    let datas: Vec<Vec<u8>> = (0..42u8)
        .map(|i| match i {
            20 => big.clone(),
            41 => vec![i; 37],
            _ => vec![i; 100],
        })
        .collect();
    let msgs: Vec<UdSend<'_>> = datas
        .iter()
        .enumerate()
        .map(|(i, d)| UdSend {
            dest,
            imm: Some(i as u32),
            data: d,
        })
        .collect();
    let mut results = vec![None; msgs.len()];
    pa.post_send_ud_batch(&qa, &msgs, |i, r| results[i] = Some(r.is_ok()));
    for (i, r) in results.iter().enumerate() {
        assert_eq!(*r, Some(i != 20), "message {i}");
    }
    assert!(pa.stats().tx_gso_runs >= 2, "{:?}", pa.stats());
    for i in (0..42u32).filter(|&i| i != 20) {
        let m = qb.recv_timeout(WAIT).expect("a message of the batch");
        assert_eq!(m.imm, Some(i));
        assert_eq!(m.data, datas[i as usize]);
        assert_eq!(m.sgid, gid_v4(a));
        assert_eq!(m.src_qpn, qa.qpn_value());
    }
    assert!(qb.try_recv().is_none());
    pa.shutdown();
    pb.shutdown();
}

//! The software RoCEv2 port over real UDP sockets: hostile datagrams (bad ICRC, no preamble,
//! truncated, malformed MADs, wrong P_Key or Q_Key) are counted drops and never disturb the
//! VMs; UD queue pairs; pcap capture.
mod common;

use std::net::{Ipv4Addr, SocketAddr};

use common::*;
use rdma::addr::{gid_v4, ENCAP_LEN};
use rdma::host::DEFAULT_SERVICE_PORT;
use rdma::port::{encode_datagram, PortConfig, SoftPort, UdDest};
use rdma_wire::cm::Req;
use rdma_wire::mad::{attr, MadHeader};
use rdma_wire::{Gid, RocePacket, GSI_QKEY};

fn host_sock(n: u8) -> SocketAddr {
    SocketAddr::from((host_addr(n, 1), 4791))
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

/// Bad ICRC, missing preamble, truncated datagrams, truncated and malformed MADs, wrong P_Key
/// and GSI Q_Key: each dropped and counted where it belongs; the VMs still work afterwards.
#[test]
fn bad_icrc_truncated_and_malformed_packets_are_dropped_and_counted() {
    let n = 31;
    let a = start_host(n, 1, 1, 2);
    let attacker = SoftPort::bind(PortConfig::new(Ipv4Addr::new(127, n, 0, 66))).unwrap();
    let src = gid_v4(Ipv4Addr::new(127, n, 0, 66));
    let vm = a.vm(1).unwrap();
    let dst = vm.gid();
    let to = host_sock(n);
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
    attacker.send_raw(to, &bad_icrc).unwrap();
    // 2. Payload corrupted after the ICRC was computed.
    let mut corrupt = good.clone();
    corrupt[ENCAP_LEN + 12 + 8 + 30] ^= 1;
    attacker.send_raw(to, &corrupt).unwrap();
    // 3. No preamble / garbage.
    attacker.send_raw(to, b"hello").unwrap();
    attacker.send_raw(to, &good[ENCAP_LEN..]).unwrap();
    // 4. Truncated datagrams (cut inside the BTH, and inside the MAD).
    attacker.send_raw(to, &good[..ENCAP_LEN + 7]).unwrap();
    attacker.send_raw(to, &good[..ENCAP_LEN + 100]).unwrap();
    // 5. A truncated MAD with a valid ICRC (a 100-byte payload on QP1).
    let short = good_mad[..100].to_vec();
    let mut p = RocePacket::ud_mad(&good_mad, 0xffff, 0);
    p.payload = &short;
    attacker.send_raw(to, &enc(&p)).unwrap();
    // 6. A malformed CM MAD (unknown attribute) with a valid ICRC.
    let mut bad_attr = good_mad;
    bad_attr[16..18].copy_from_slice(&0x0099u16.to_be_bytes());
    attacker
        .send_raw(to, &enc(&RocePacket::ud_mad(&bad_attr, 0xffff, 0)))
        .unwrap();
    // 7. Wrong P_Key.
    attacker
        .send_raw(to, &enc(&RocePacket::ud_mad(&good_mad, 0x8123, 0)))
        .unwrap();
    // 8. QP1 with a wrong Q_Key.
    let mut p = RocePacket::ud_mad(&good_mad, 0xffff, 0);
    p.deth = Some(rdma_wire::Deth {
        q_key: 0x1234,
        src_qp: 1,
    });
    attacker.send_raw(to, &enc(&p)).unwrap();
    // 9. A UD packet to a QPN that does not exist.
    let mut p = RocePacket::ud_mad(&good_mad, 0xffff, 0);
    p.bth.dest_qp = 0x00ab_cdef;
    attacker.send_raw(to, &enc(&p)).unwrap();

    eventually("all hostile datagrams seen", || {
        a.port().stats().rx_datagrams >= 11
    });
    let ps = a.port().stats();
    assert_eq!(ps.rx_bad_icrc, 3, "{ps:?}"); // bad ICRC, corrupted payload, cut in the MAD
    assert_eq!(ps.rx_bad_encap, 2, "{ps:?}");
    assert_eq!(ps.rx_malformed, 1, "{ps:?}"); // cut inside the BTH
    assert_eq!(ps.rx_bad_pkey, 1, "{ps:?}");
    assert_eq!(ps.rx_bad_qkey, 1, "{ps:?}");
    assert_eq!(ps.rx_no_qp, 1, "{ps:?}");
    let ms = a.mux().stats();
    assert_eq!((ms.truncated, ms.malformed), (1, 1), "{ms:?}");
    assert_eq!(ms.delivered + ms.queued, 0);
    assert_eq!(vm.endpoint().stats().received, 0);

    // The good packet still goes through, and the VMs still connect.
    attacker.send_raw(to, &good).unwrap();
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
    // Right QPN but the DGID of nobody behind that QP: counted drop.
    let other = UdDest {
        dgid: vm_gid(n, 1, 9),
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

/// With `pcap`, every packet is written as an Ethernet/IPv4/UDP frame whose IP addresses are
/// the GIDs; when tshark is installed it must dissect them as InfiniBand CM.
#[test]
fn pcap_capture_is_dissected_as_infiniband_cm() {
    let n = 33;
    let dir = std::env::temp_dir().join(format!("ferry-rdma-pcap-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("host.pcap");
    let mut cfg = rdma::host::HostConfig::new(host_addr(n, 1), 1, Ipv4Addr::new(127, n, 1, 1));
    cfg.port.neighbors = neighbors(n, 1);
    cfg.port.pcap = Some(path.clone());
    cfg.cm = fast_cm();
    let a = rdma::host::Host::start(cfg).unwrap();
    let peer = start_peer(n, 1);
    let vm = a.vm(1).unwrap();
    peer.rc_session(vm.gid(), DEFAULT_SERVICE_PORT, WAIT)
        .unwrap();
    peer.ud_session(vm.gid(), DEFAULT_SERVICE_PORT, 2, 64, WAIT)
        .unwrap();
    a.shutdown();
    let bytes = std::fs::read(&path).unwrap();
    assert_eq!(&bytes[..4], &0xa1b2_c3d4u32.to_le_bytes());
    // Walk the records: every frame is IPv4/UDP to port 4791 with GIDs as addresses.
    let mut at = 24;
    let mut frames = 0;
    while at + 16 <= bytes.len() {
        let len = u32::from_le_bytes(bytes[at + 8..at + 12].try_into().unwrap()) as usize;
        let f = &bytes[at + 16..at + 16 + len];
        assert_eq!(&f[12..14], &[0x08, 0x00]);
        assert_eq!(u16::from_be_bytes([f[36], f[37]]), 4791);
        let (s, d) = (&f[26..30], &f[30..34]);
        assert!(s == [127, n, 1, 1] || d == [127, n, 1, 1], "{s:?} {d:?}");
        at += 16 + len;
        frames += 1;
    }
    assert!(
        frames >= 9,
        "REQ REP RTU DREQ DREP SIDR_REQ SIDR_REP and UD: {frames}"
    );
    let tshark = std::process::Command::new("tshark")
        .args(["-r"])
        .arg(&path)
        .args(["-Y", "infiniband", "-V"])
        .output();
    if let Ok(out) = tshark {
        if out.status.success() {
            let text = String::from_utf8_lossy(&out.stdout);
            for want in [
                "ConnectRequest",
                "ConnectReply",
                "ReadyToUse",
                "DisconnectRequest",
            ] {
                assert!(text.contains(want), "tshark output lacks {want}");
            }
        }
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

/// On the wire the preamble carries (source GID, destination GID) in that order, the
/// datagram goes to the destination GID's host, and the ICRC covers the GIDs as IP source and
/// destination — the source is never put where the destination belongs.
#[test]
fn transmit_puts_the_destination_gid_in_the_destination_field() {
    let n = 35;
    let receiver = std::net::UdpSocket::bind((Ipv4Addr::new(127, n, 0, 2), 4791)).unwrap();
    receiver
        .set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .unwrap();
    let mut cfg = PortConfig::new(Ipv4Addr::new(127, n, 0, 1));
    cfg.neighbors = neighbors(n, 2);
    let port = SoftPort::bind(cfg).unwrap();
    let (sgid, dgid) = (vm_gid(n, 1, 1), vm_gid(n, 2, 7));
    rdma::port::Qp1Tx::send_gsi(&port, sgid, dgid, &req_mad(sgid, dgid)).unwrap();
    let mut buf = [0u8; 2048];
    let (len, from) = receiver.recv_from(&mut buf).unwrap();
    assert_eq!(from, SocketAddr::from((Ipv4Addr::new(127, n, 0, 1), 4791)));
    let (e, roce) = rdma::addr::Encap::split(&buf[..len]).unwrap();
    assert_eq!((e.sgid, e.dgid), (sgid, dgid));
    rdma_wire::icrc::verify_for_udp_socket(sgid.to_ip(), dgid.to_ip(), 4791, 4791, roce).unwrap();
    assert!(
        rdma_wire::icrc::verify_for_udp_socket(dgid.to_ip(), sgid.to_ip(), 4791, 4791, roce)
            .is_err()
    );
    port.shutdown();
}

//! Standard RoCEv2: a sender's GID is the IP source of its datagram, never a field it writes
//! (issue 11). Crafted CM packets whose path records or rdma_cm header name another source
//! than the IP source, or another destination, are counted drops at the multiplexer; a UD
//! receiver sees the IP source as the source GID, in the completion and in the GRH area.
mod common;

use std::net::{Ipv4Addr, SocketAddr};

use common::*;
use rdma::addr::gid_v4;
use rdma::host::DEFAULT_SERVICE_PORT;
use rdma::port::{encode_datagram, PortConfig, SoftPort, UdDest};
use rdma_wire::cm::{Lap, Req};
use rdma_wire::mad::{attr, MadHeader};
use rdma_wire::rdma_cm::{service_id, CmaHeader, PortSpace};
use rdma_wire::{Gid, RocePacket};

const N: u8 = 47;

/// A REQ from `from` to `to` whose alternate path and rdma_cm header name the given
/// addresses.
fn req(local: u32, from: Gid, to: Gid, alt: (Gid, Gid), cma: (Gid, Gid)) -> rdma_wire::Mad {
    let mut r = Req {
        hdr: MadHeader::cm(attr::REQ, u64::from(local)),
        local_comm_id: local,
        service_id: service_id(PortSpace::Tcp, DEFAULT_SERVICE_PORT),
        ..Req::default()
    };
    r.primary_path.local_gid = from;
    r.primary_path.remote_gid = to;
    r.alternate_path.local_gid = alt.0;
    r.alternate_path.remote_gid = alt.1;
    let h = CmaHeader::new(cma.0.to_ip(), 4000, cma.1.to_ip()).unwrap();
    h.write(&mut r.private_data).unwrap();
    r.to_mad()
}

#[test]
fn path_records_and_rdma_cm_addresses_must_name_the_ip_source() {
    let a = start_host(N, 1, 1, 2);
    let attacker_ip = Ipv4Addr::new(127, N, 0, 66);
    let attacker = SoftPort::bind(PortConfig::new(attacker_ip)).unwrap();
    let me = gid_v4(attacker_ip);
    let (vm1, vm2) = (a.vm(1).unwrap(), a.vm(2).unwrap());
    let (v1, v2) = (vm1.gid(), vm2.gid());
    let to = SocketAddr::from((v1.canonical().to_ipv4().unwrap(), 4791));
    let send = |mad: &rdma_wire::Mad| {
        let mut buf = vec![0u8; 1024];
        let pkt = RocePacket::ud_mad(mad, 0xffff, 0);
        let len = encode_datagram(me, v1, attacker.udp_port(), 4791, &pkt, &mut buf).unwrap();
        attacker.send_raw(attacker_ip, to, &buf[..len]).unwrap();
    };
    let honest = (me, v1);
    let mut lap = Lap {
        hdr: MadHeader::cm(attr::LAP, 9),
        local_comm_id: 9,
        remote_comm_id: 1,
        ..Lap::default()
    };
    lap.alternate_path.local_gid = v2;
    lap.alternate_path.remote_gid = v1;
    // Claiming to be VM 2 (on the same host) in every place a CM message names its sender.
    send(&req(1, v2, v1, honest, honest)); // primary path
    send(&req(2, me, v1, (v2, v1), honest)); // alternate path
    send(&req(3, me, v1, honest, (v2, v1))); // rdma_cm source address
    send(&lap.to_mad()); // LAP alternate path
                         // Naming VM 2 as the receiver while sent to VM 1.
    send(&req(5, me, v1, (me, v2), honest));
    send(&req(6, me, v1, honest, (me, v2)));
    eventually("six crafted MADs routed", || a.mux().stats().inbound >= 6);
    let s = a.mux().stats();
    assert_eq!((s.spoofed_source, s.misaddressed), (4, 2), "{s:?}");
    assert_eq!(s.delivered + s.queued, 0, "{s:?}");
    assert_eq!(vm1.endpoint().stats().received, 0);
    assert_eq!(vm2.endpoint().stats().received, 0);
    // The honest REQ reaches VM 1 (which rejects or answers it: it came in).
    send(&req(7, me, v1, honest, honest));
    eventually("the honest REQ delivered", || {
        vm1.endpoint().stats().received == 1
    });

    // UD: the source a receiver sees is the IP source, in the completion and the GRH area.
    let rx_ip = Ipv4Addr::new(127, N, 0, 77);
    let receiver = SoftPort::bind(PortConfig::new(rx_ip)).unwrap();
    let qkey = rdma_wire::rdma_cm::RDMA_CM_UD_QKEY;
    let rx = receiver.create_ud_qp(gid_v4(rx_ip), qkey);
    let qp = attacker.create_ud_qp(me, qkey);
    let dest = UdDest {
        dgid: gid_v4(rx_ip),
        dqpn: rx.qpn_value(),
        qkey,
    };
    attacker.post_send_ud(&qp, dest, None, b"who am I").unwrap();
    let m = rx.recv_timeout(WAIT).expect("the datagram");
    assert_eq!(m.sgid.canonical(), me.canonical());
    let (src, dst) = rdma::addr::parse_grh(&m.grh).expect("a GRH area");
    assert_eq!(
        (src.canonical(), dst.canonical()),
        (me.canonical(), gid_v4(rx_ip).canonical()),
        "the GRH area's addresses are the IP header's"
    );
    attacker.shutdown();
    receiver.shutdown();
}

//! The codecs against real Linux SoftRoCE traffic (`testdata/*.pcap`, see its README).
//!
//! Every RoCE frame must parse, its ICRC must verify against the real IPv4/UDP headers, and
//! re-encoding the parsed packet (ICRC recomputed) must give the captured bytes. CM MADs must
//! parse into the right messages and rebuild to the same 256 bytes. The concrete values
//! asserted were cross-checked with `tshark -r FILE -Y infiniband -V`.

use std::net::Ipv4Addr;

use rdma_wire::cm::{CmMessage, Dreq, Rep, Req, SidrRep, SidrReq};
use rdma_wire::rdma_cm::{self, CmaHeader, PortSpace};
use rdma_wire::{
    icrc, opcode, udp_src_port_for_flow_label, Bth, CmKind, Deth, Gid, ImmDt, RocePacket, GSI_QKEY,
    ROCEV2_UDP_PORT,
};

const RPING: &[u8] = include_bytes!("../testdata/rping.pcap");
const UDADDY: &[u8] = include_bytes!("../testdata/udaddy.pcap");
const UCMATOSE: &[u8] = include_bytes!("../testdata/ucmatose.pcap");

const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 11, 0, 2);
const SERVER: Ipv4Addr = Ipv4Addr::new(10, 11, 0, 1);

/// One RoCEv2 frame of a capture: the real IPv4 and UDP headers and the UDP payload.
struct Frame<'a> {
    ip: &'a [u8],
    udp: &'a [u8],
    payload: &'a [u8],
}

impl Frame<'_> {
    fn src(&self) -> Ipv4Addr {
        Ipv4Addr::new(self.ip[12], self.ip[13], self.ip[14], self.ip[15])
    }
    fn dst(&self) -> Ipv4Addr {
        Ipv4Addr::new(self.ip[16], self.ip[17], self.ip[18], self.ip[19])
    }
    fn src_port(&self) -> u16 {
        u16::from_be_bytes([self.udp[0], self.udp[1]])
    }
}

/// The records of a classic little-endian microsecond pcap file with Ethernet link type.
fn pcap_records(file: &[u8]) -> Vec<&[u8]> {
    assert_eq!(&file[..4], &0xa1b2_c3d4u32.to_le_bytes(), "pcap magic");
    assert_eq!(
        u32::from_le_bytes(file[20..24].try_into().unwrap()),
        1,
        "Ethernet link type"
    );
    let mut records = Vec::new();
    let mut at = 24;
    while at < file.len() {
        let incl = u32::from_le_bytes(file[at + 8..at + 12].try_into().unwrap()) as usize;
        let orig = u32::from_le_bytes(file[at + 12..at + 16].try_into().unwrap()) as usize;
        assert_eq!(incl, orig, "capture is not truncated");
        at += 16;
        records.push(&file[at..at + incl]);
        at += incl;
    }
    assert_eq!(at, file.len());
    records
}

/// Ethernet → IPv4 → UDP to port 4791.
fn roce_frames(file: &[u8]) -> Vec<Frame<'_>> {
    let mut frames = Vec::new();
    for rec in pcap_records(file) {
        if rec.len() < 14 || rec[12..14] != [0x08, 0x00] {
            continue; // ARP, IPv6 neighbour discovery, …
        }
        let ip_and_rest = &rec[14..];
        let ihl = usize::from(ip_and_rest[0] & 0x0f) * 4;
        let total = usize::from(u16::from_be_bytes([ip_and_rest[2], ip_and_rest[3]]));
        assert_eq!(ip_and_rest[0] >> 4, 4);
        if ip_and_rest[9] != 17 {
            continue;
        }
        let (ip, rest) = ip_and_rest[..total].split_at(ihl);
        let (udp, payload) = rest.split_at(8);
        if u16::from_be_bytes([udp[2], udp[3]]) != ROCEV2_UDP_PORT {
            continue;
        }
        assert_eq!(
            usize::from(u16::from_be_bytes([udp[4], udp[5]])),
            8 + payload.len()
        );
        frames.push(Frame { ip, udp, payload });
    }
    frames
}

/// Checks every frame of a capture and returns the CM messages in order, with their frames.
fn check_capture(file: &[u8]) -> Vec<(CmMessage, Frame<'_>)> {
    let frames = roce_frames(file);
    assert!(!frames.is_empty());
    let mut cm = Vec::new();
    for (i, f) in frames.into_iter().enumerate() {
        let pkt = RocePacket::parse(f.payload).unwrap_or_else(|e| panic!("frame {i}: {e}"));
        icrc::verify(f.ip, f.udp, f.payload).unwrap_or_else(|e| panic!("frame {i}: {e}"));
        assert_eq!(
            icrc::compute(f.ip, f.udp, &f.payload[..f.payload.len() - 4]),
            Ok(pkt.icrc)
        );
        assert_eq!(pkt.wire_len(), f.payload.len());
        // What a software port that only has the UDP socket's view (addresses, ports, payload)
        // sees: the ICRC verifies, and the IP identification Linux chose is recovered.
        let id = icrc::verify_for_udp_socket_any_ip_id(
            f.src().into(),
            f.dst().into(),
            f.src_port(),
            ROCEV2_UDP_PORT,
            f.payload,
        )
        .unwrap_or_else(|e| panic!("frame {i}: socket view: {e}"));
        assert_eq!(id.to_be_bytes(), [f.ip[4], f.ip[5]], "frame {i}: IP ID");
        assert_eq!([f.ip[6], f.ip[7]], [0x40, 0], "frame {i}: DF");
        // One flipped payload bit: no identification makes it verify.
        let mut bad = f.payload.to_vec();
        bad[Bth::LEN] ^= 0x10;
        assert!(
            icrc::verify_for_udp_socket_any_ip_id(
                f.src().into(),
                f.dst().into(),
                f.src_port(),
                ROCEV2_UDP_PORT,
                &bad,
            )
            .is_err(),
            "frame {i}: corrupted"
        );

        let mut out = [0u8; 2048];
        let n = pkt.encode(f.ip, f.udp, &mut out).unwrap();
        assert_eq!(
            &out[..n],
            f.payload,
            "frame {i}: re-encoded with fresh ICRC"
        );
        let n = pkt.encode_with_stored_icrc(&mut out).unwrap();
        assert_eq!(
            &out[..n],
            f.payload,
            "frame {i}: re-encoded with stored ICRC"
        );

        if pkt.is_gsi() {
            let mad = pkt.mad().expect("QP1 payload is one MAD");
            let msg = CmMessage::parse_mad(mad).unwrap_or_else(|e| panic!("frame {i}: {e}"));
            assert_eq!(&msg.to_mad(), mad, "frame {i}: {} rebuilt", msg.kind());
            // The typed parser of the kind agrees with the dispatching one.
            let again = match msg.kind() {
                CmKind::Req => Req::parse(mad).map(CmMessage::from),
                CmKind::Rep => Rep::parse(mad).map(CmMessage::from),
                CmKind::Dreq => Dreq::parse(mad).map(CmMessage::from),
                CmKind::SidrReq => SidrReq::parse(mad).map(CmMessage::from),
                CmKind::SidrRep => SidrRep::parse(mad).map(CmMessage::from),
                _ => Ok(msg),
            };
            assert_eq!(again, Ok(msg));
            // Re-building the whole packet with the crate's QP1 builder gives the same bytes.
            let built = RocePacket::ud_mad(mad, pkt.bth.p_key, pkt.bth.psn);
            let n = built.encode(f.ip, f.udp, &mut out).unwrap();
            assert_eq!(&out[..n], f.payload, "frame {i}: QP1 builder");
            cm.push((msg, f));
        }
    }
    cm
}

fn kinds(cm: &[(CmMessage, Frame<'_>)]) -> Vec<CmKind> {
    cm.iter().map(|(m, _)| m.kind()).collect()
}

#[test]
fn rping_capture() {
    let frames = roce_frames(RPING);
    assert_eq!(frames.len(), 41);
    let cm = check_capture(RPING);
    assert_eq!(
        kinds(&cm),
        [
            CmKind::Req,
            CmKind::Rep,
            CmKind::Rtu,
            CmKind::Dreq,
            CmKind::Drep
        ]
    );

    let (CmMessage::Req(req), f) = &cm[0] else {
        panic!("first CM message is not a REQ")
    };
    assert_eq!(req.local_comm_id, 0xbcf3_10e5);
    assert_eq!(req.local_qpn, 0x00_0011);
    assert_eq!(req.starting_psn, 0xf9_b3fb);
    assert_eq!(req.primary_path.local_gid, Gid::from_ipv4(CLIENT));
    assert_eq!(req.primary_path.remote_gid, Gid::from_ipv4(SERVER));
    assert_eq!(req.primary_path.local_gid.to_string(), "10.11.0.2");
    assert_eq!(req.primary_path.remote_gid.to_string(), "10.11.0.1");
    assert_eq!(cm[0].0.primary_remote_gid(), Some(Gid::from_ipv4(f.dst())));
    assert_eq!(cm[0].0.primary_local_gid(), Some(Gid::from_ipv4(f.src())));
    assert_eq!(req.hdr.transaction_id, 0x0000_0002_e510_f3bc);
    assert_eq!(req.service_id, rdma_cm::service_id(PortSpace::Tcp, 7174));
    assert_eq!(req.local_ca_guid, 0x5054_00ff_fe11_0002);
    assert_eq!(req.responder_resources, 1);
    assert_eq!(req.initiator_depth, 1);
    assert_eq!(req.remote_cm_response_timeout, 0x14);
    assert_eq!(req.local_cm_response_timeout, 0x14);
    assert_eq!(req.retry_count, 7);
    assert_eq!(req.p_key, 0xffff);
    assert_eq!(req.path_mtu, 3);
    assert_eq!(req.rnr_retry_count, 7);
    assert_eq!(req.max_cm_retries, 15);
    assert_eq!(req.primary_path.local_lid, 0xffff);
    assert_eq!(req.primary_path.remote_lid, 0xffff);
    assert_eq!(req.primary_path.hop_limit, 64);
    // Linux's layout: flow label in the top 20 bits of the word at 112, packet rate in the low
    // 6 bits of byte 115. (tshark 4.0 decodes this word differently: flow label 0x005fe,
    // packet rate 0x1f.) The RC data's UDP source port confirms Linux's reading: it is derived
    // from this flow label.
    assert_eq!(req.primary_path.flow_label, 0x5_fe8c);
    assert_eq!(req.primary_path.packet_rate, 0);
    assert_eq!(req.primary_path.traffic_class, 0);
    assert!(!req.primary_path.subnet_local);
    assert_eq!(req.primary_path.local_ack_timeout, 0x13);
    assert_eq!(req.alternate_path, Default::default());
    let cma = CmaHeader::parse(&req.private_data).unwrap();
    assert_eq!(cma.version, 0);
    assert_eq!(cma.ip_version, 4);
    assert_eq!(cma.src_port, 0xb4ba);
    assert_eq!(cma.src_ip(), CLIENT);
    assert_eq!(cma.dst_ip(), SERVER);
    // rdma_cm's zero-padded form, not the mapped one; both mean the same IPv4 address.
    assert_ne!(cma.dst_addr, req.primary_path.remote_gid);
    assert_eq!(
        cma.dst_addr.to_ipv4(),
        req.primary_path.remote_gid.to_ipv4()
    );
    assert_eq!(cma.dst_addr.canonical(), req.primary_path.remote_gid);

    let (CmMessage::Rep(rep), f) = &cm[1] else {
        panic!("second CM message is not a REP")
    };
    assert_eq!(rep.local_comm_id, 0xb2ab_03de);
    assert_eq!(rep.remote_comm_id, 0xbcf3_10e5);
    assert_eq!(rep.local_qpn, 0x11);
    assert_eq!(rep.starting_psn, 0x96_fb0c);
    assert_eq!(rep.target_ack_delay, 0x0f);
    assert_eq!(rep.rnr_retry_count, 7);
    assert_eq!(rep.local_ca_guid, 0x5054_00ff_fe11_0001);
    assert_eq!(f.src(), SERVER);

    // Reply-type messages carry the receiver's ID at offset 28.
    let ids: Vec<_> = cm
        .iter()
        .map(|(m, _)| (m.local_comm_id(), m.remote_comm_id()))
        .collect();
    let (c, s) = (0xbcf3_10e5, 0xb2ab_03de);
    assert_eq!(
        ids,
        [
            (Some(c), None),
            (Some(s), Some(c)),
            (Some(c), Some(s)),
            (Some(c), Some(s)),
            (Some(s), Some(c)),
        ]
    );
    let CmMessage::Dreq(dreq) = &cm[3].0 else {
        panic!("fourth CM message is not a DREQ")
    };
    assert_eq!(dreq.remote_qpn, 0x11);

    // The RC traffic: opcodes and their headers.
    let mut seen = std::collections::BTreeSet::new();
    for f in &frames {
        let p = RocePacket::parse(f.payload).unwrap();
        seen.insert(p.bth.opcode);
        if p.bth.dest_qp == req.local_qpn {
            assert_eq!(f.src_port(), udp_src_port_for_flow_label(0x5_fe8c));
        }
        match p.bth.opcode {
            opcode::RC_RDMA_READ_REQUEST | opcode::RC_RDMA_WRITE_ONLY => {
                assert!(p.reth.is_some())
            }
            opcode::RC_ACKNOWLEDGE | opcode::RC_RDMA_READ_RESPONSE_ONLY => {
                assert!(p.aeth.is_some())
            }
            _ => {}
        }
        if p.bth.opcode == opcode::RC_RDMA_READ_REQUEST {
            assert!(p.payload.is_empty());
        }
    }
    assert_eq!(
        seen.into_iter().collect::<Vec<_>>(),
        [
            opcode::RC_SEND_ONLY,
            opcode::RC_RDMA_WRITE_ONLY,
            opcode::RC_RDMA_READ_REQUEST,
            opcode::RC_RDMA_READ_RESPONSE_ONLY,
            opcode::RC_ACKNOWLEDGE,
            opcode::UD_SEND_ONLY,
        ]
    );
}

#[test]
fn udaddy_capture() {
    let cm = check_capture(UDADDY);
    assert_eq!(kinds(&cm), [CmKind::SidrReq, CmKind::SidrRep]);
    let (CmMessage::SidrReq(req), f) = &cm[0] else {
        panic!("first CM message is not a SIDR_REQ")
    };
    assert_eq!(f.src(), CLIENT);
    assert_eq!(req.request_id, 0x5c73_e225);
    assert_eq!(req.p_key, 0xffff);
    assert_eq!(req.service_id, rdma_cm::service_id(PortSpace::Udp, 7174));
    let cma = CmaHeader::parse(&req.private_data).unwrap();
    assert_eq!(cma.ip_version, 4);
    assert_eq!(cma.src_port, 0x916d);
    assert_eq!(cma.src_ip(), CLIENT);
    assert_eq!(cma.dst_ip(), SERVER);
    let (CmMessage::SidrRep(rep), f) = &cm[1] else {
        panic!("second CM message is not a SIDR_REP")
    };
    assert_eq!(f.src(), SERVER);
    assert_eq!(rep.request_id, req.request_id);
    assert_eq!(cm[1].0.sidr_request_id(), cm[0].0.sidr_request_id());
    assert_eq!(rep.status, rdma_wire::cm::sidr_status::SUCCESS);
    assert_eq!(rep.qpn, 0x11);
    assert_eq!(rep.qkey, rdma_cm::RDMA_CM_UD_QKEY);
    assert_eq!(rep.service_id, req.service_id);

    // The data: UD SEND_ONLY with immediate to the resolved QP and Q_Key.
    let data: Vec<_> = roce_frames(UDADDY)
        .into_iter()
        .map(|f| RocePacket::parse(f.payload).unwrap())
        .filter(|p| !p.is_gsi())
        .collect();
    assert_eq!(data.len(), 20);
    for p in data {
        assert_eq!(p.bth.opcode, opcode::UD_SEND_ONLY_WITH_IMMEDIATE);
        assert_eq!(p.bth.dest_qp, 0x11);
        assert_eq!(
            p.deth,
            Some(Deth {
                q_key: rdma_cm::RDMA_CM_UD_QKEY,
                src_qp: 0x11
            })
        );
        assert_eq!(p.imm_dt, Some(ImmDt::from_value(0x11)));
        assert_eq!(p.payload.len(), 100);
        assert!(p.padding.is_empty());
    }
}

#[test]
fn ucmatose_capture() {
    let cm = check_capture(UCMATOSE);
    assert_eq!(
        kinds(&cm),
        [
            CmKind::Req,
            CmKind::Req,
            CmKind::Rep,
            CmKind::Rep,
            CmKind::Rtu,
            CmKind::Rtu,
            CmKind::Dreq,
            CmKind::Dreq,
            CmKind::Drep,
            CmKind::Drep,
        ]
    );
    // Two connections: each REQ's ID comes back as the remote ID of its REP; RTU, DREQ and
    // DREP carry the peer's ID at offset 28.
    let req_ids = [0xa46b_1099u32, 0xa56b_1099];
    let rep_ids = [0xdc95_0b03u32, 0xdf95_0b03];
    for k in 0..2 {
        assert_eq!(cm[k].0.local_comm_id(), Some(req_ids[k]));
        assert_eq!(cm[2 + k].0.local_comm_id(), Some(rep_ids[k]));
        assert_eq!(cm[2 + k].0.remote_comm_id(), Some(req_ids[k]));
        assert_eq!(cm[4 + k].0.local_comm_id(), Some(req_ids[k]));
        assert_eq!(cm[4 + k].0.remote_comm_id(), Some(rep_ids[k]));
        // The server disconnects here: DREQ from the REP side, DREP from the REQ side.
        assert_eq!(cm[6 + k].0.local_comm_id(), Some(rep_ids[k]));
        assert_eq!(cm[6 + k].0.remote_comm_id(), Some(req_ids[k]));
        assert_eq!(cm[6 + k].1.src(), SERVER);
        assert_eq!(cm[8 + k].0.local_comm_id(), Some(req_ids[k]));
        assert_eq!(cm[8 + k].0.remote_comm_id(), Some(rep_ids[k]));
    }
    let qpns: Vec<_> = cm[..2]
        .iter()
        .map(|(m, _)| match m {
            CmMessage::Req(r) => (r.local_qpn, r.starting_psn),
            _ => unreachable!(),
        })
        .collect();
    assert_eq!(qpns, [(0x11, 0x8c_ec70), (0x12, 0xe5_9ab4)]);
    // Each connection's data flows, both ways, from the UDP port derived from its REQ's flow
    // label.
    let frames = roce_frames(UCMATOSE);
    for k in 0..2 {
        let (CmMessage::Req(req), CmMessage::Rep(rep)) = (&cm[k].0, &cm[2 + k].0) else {
            unreachable!()
        };
        let sport = udp_src_port_for_flow_label(req.primary_path.flow_label);
        for (from, to_qpn) in [(CLIENT, rep.local_qpn), (SERVER, req.local_qpn)] {
            let data: Vec<_> = frames
                .iter()
                .filter(|f| f.src() == from)
                .filter(|f| {
                    let p = RocePacket::parse(f.payload).unwrap();
                    p.bth.opcode == opcode::RC_SEND_ONLY && p.bth.dest_qp == to_qpn
                })
                .collect();
            assert_eq!(data.len(), 10);
            assert!(data.iter().all(|f| f.src_port() == sport));
        }
    }
    for (m, f) in &cm[..2] {
        assert_eq!(m.primary_remote_gid(), Some(Gid::from_ipv4(f.dst())));
        assert_eq!(
            m.service_id(),
            Some(rdma_cm::service_id(PortSpace::Tcp, 0x1d2f))
        );
    }
    for (m, _) in &cm {
        assert_eq!(m.header().mgmt_class, 0x07);
    }
    // Every QP1 packet carries the GSI Q_Key.
    for f in roce_frames(UCMATOSE) {
        let p = RocePacket::parse(f.payload).unwrap();
        if p.bth.dest_qp == 1 {
            assert_eq!(p.deth.map(|d| d.q_key), Some(GSI_QKEY));
        }
    }
}

#[test]
fn a_flipped_bit_anywhere_fails_the_icrc() {
    let frames = roce_frames(RPING);
    let f = &frames[0];
    let mut payload = f.payload.to_vec();
    for i in 0..payload.len() {
        if i == 4 {
            continue; // BTH byte 4 (FECN/BECN/reserved) is masked
        }
        payload[i] ^= 0x01;
        assert!(
            icrc::verify(f.ip, f.udp, &payload).is_err(),
            "flip at byte {i} not detected"
        );
        payload[i] ^= 0x01;
    }
    payload[4] ^= 0x80; // FECN may change in flight without breaking the ICRC
    assert_eq!(icrc::verify(f.ip, f.udp, &payload), Ok(()));
    // Mutable IP fields (TOS, TTL, checksum) are masked; the others are covered.
    let mut ip = f.ip.to_vec();
    ip[8] = 1;
    ip[1] = 0xb8;
    assert_eq!(icrc::verify(&ip, f.udp, f.payload), Ok(()));
    ip[4] ^= 1; // identification
    assert!(icrc::verify(&ip, f.udp, f.payload).is_err());
}

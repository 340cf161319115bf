//! Hostile input: truncated, mutated and random bytes through every parser. Nothing may panic;
//! whatever parses must re-encode to something that parses to the same value.

use std::net::{IpAddr, Ipv4Addr};

use rdma_wire::cm::{Apr, CmMessage, Drep, Dreq, Lap, Mra, Rej, Rep, Req, Rtu, SidrRep, SidrReq};
use rdma_wire::rdma_cm::CmaHeader;
use rdma_wire::{icrc, Bth, Deth, Gid, MadHeader, RocePacket, MAD_SIZE};

const CAPTURES: [&[u8]; 3] = [
    include_bytes!("../testdata/rping.pcap"),
    include_bytes!("../testdata/udaddy.pcap"),
    include_bytes!("../testdata/ucmatose.pcap"),
];

/// xorshift64*: small, deterministic, good enough to shake parsers.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// UDP payloads to port 4791 of all captures (Ethernet, IPv4 without options).
fn udp_payloads() -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    for file in CAPTURES {
        let mut at = 24;
        while at + 16 <= file.len() {
            let incl = u32::from_le_bytes(file[at + 8..at + 12].try_into().unwrap()) as usize;
            let rec = &file[at + 16..at + 16 + incl];
            at += 16 + incl;
            if rec.len() > 42
                && rec[12..14] == [8, 0]
                && rec[23] == 17
                && rec[36..38] == [0x12, 0xb7]
            {
                out.push(rec[42..].to_vec());
            }
        }
    }
    assert!(out.len() > 100);
    out
}

/// Runs every parser over `b`, checking re-encode consistency where parsing succeeds.
fn exercise(b: &[u8]) {
    let v4 = IpAddr::V4(Ipv4Addr::new(10, 11, 0, 2));
    let v4b = IpAddr::V4(Ipv4Addr::new(10, 11, 0, 1));
    let _ = Bth::parse(b);
    let _ = Deth::parse(b);
    let _ = MadHeader::parse(b);
    let _ = CmaHeader::parse(b);
    let _ = icrc::split_icrc(b);
    let _ = icrc::verify_for_udp_socket(v4, v4b, 1, 4791, b);
    let ip = [
        0x45u8, 0, 0, 0, 0, 0, 0, 0, 64, 17, 0, 0, 10, 11, 0, 2, 10, 11, 0, 1,
    ];
    let _ = icrc::verify(&ip, &[0u8; 8], b);
    let _ = icrc::compute(b, &[0u8; 8], b);
    if let Ok(p) = RocePacket::parse(b) {
        let mut out = vec![0u8; b.len() + 8];
        let n = p
            .encode_with_stored_icrc(&mut out)
            .expect("a parsed packet encodes");
        assert_eq!(n, b.len());
        assert_eq!(RocePacket::parse(&out[..n]), Ok(p));
        let n = p
            .encode_for_udp_socket(v4, v4b, 1, 4791, &mut out)
            .expect("a parsed packet encodes");
        assert_eq!(
            icrc::verify_for_udp_socket(v4, v4b, 1, 4791, &out[..n]),
            Ok(())
        );
        if let Some(mad) = p.mad() {
            exercise_mad(mad);
        }
    }
    exercise_mad(b);
}

fn exercise_mad(b: &[u8]) {
    if let Ok(m) = CmMessage::parse_mad(b) {
        let mad = m.to_mad();
        assert_eq!(CmMessage::parse_mad(&mad), Ok(m));
        let _ = (m.local_comm_id(), m.remote_comm_id(), m.sidr_request_id());
        if let Some(g) = m.primary_remote_gid() {
            let _ = (g.to_ipv4(), g.canonical(), g.to_string());
        }
        let _ = CmaHeader::parse(m.private_data());
    }
    let _ = Req::parse(b);
    let _ = Mra::parse(b);
    let _ = Rej::parse(b);
    let _ = Rep::parse(b);
    let _ = Rtu::parse(b);
    let _ = Dreq::parse(b);
    let _ = Drep::parse(b);
    let _ = SidrReq::parse(b);
    let _ = SidrRep::parse(b);
    let _ = Lap::parse(b);
    let _ = Apr::parse(b);
}

#[test]
fn every_truncation_of_every_captured_packet() {
    for p in udp_payloads() {
        for n in 0..p.len() {
            exercise(&p[..n]);
        }
        assert!(RocePacket::parse(&p).is_ok());
    }
}

#[test]
fn mutated_captured_packets() {
    let payloads = udp_payloads();
    let mut rng = Rng(0x0123_4567_89ab_cdef);
    for round in 0..20_000 {
        let mut p = payloads[rng.below(payloads.len())].clone();
        let flips = 1 + rng.below(8);
        for _ in 0..flips {
            let i = rng.below(p.len());
            p[i] = rng.next() as u8;
        }
        // Pad count and opcode are the interesting bytes: hit them often.
        if round % 3 == 0 {
            p[1] = rng.next() as u8;
        }
        if round % 5 == 0 {
            p[0] = rng.next() as u8;
        }
        let len = if round % 2 == 0 {
            p.len()
        } else {
            rng.below(p.len() + 1)
        };
        exercise(&p[..len]);
    }
}

#[test]
fn random_bytes() {
    let mut rng = Rng(0xdead_beef_cafe_f00d);
    let mut buf = [0u8; 600];
    for round in 0..20_000 {
        let len = rng.below(buf.len() + 1);
        for b in buf.iter_mut().take(len) {
            *b = rng.next() as u8;
        }
        // Make a quarter of the inputs look like CM MADs so the message parsers get past the
        // class and attribute checks.
        if round % 4 == 0 && len >= MAD_SIZE {
            buf[1] = 0x07;
            buf[16] = 0;
            buf[17] = 0x10 + (rng.below(12) as u8);
            exercise_mad(&buf[..MAD_SIZE]);
        }
        exercise(&buf[..len]);
    }
}

#[test]
fn random_gids() {
    let mut rng = Rng(7);
    for _ in 0..10_000 {
        let mut g = [0u8; 16];
        for b in &mut g {
            *b = rng.next() as u8;
        }
        if rng.below(2) == 0 {
            g[..10].fill(0);
            if rng.below(2) == 0 {
                g[10..12].fill(0xff);
            } else {
                g[10..12].fill(0);
            }
        }
        let gid = Gid(g);
        let _ = gid.to_string();
        let c = gid.canonical();
        assert_eq!(c.to_ipv4(), gid.to_ipv4());
        assert_eq!(c.canonical(), c);
        match gid.to_ipv4() {
            Some(a) if !gid.is_zero() => assert_eq!(c, Gid::from_ipv4(a)),
            _ => assert_eq!(c, gid),
        }
    }
}

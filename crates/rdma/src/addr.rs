//! Addressing: a GID is an IPv4 address (`::ffff:a.b.c.d`) carried in the IP header of every
//! RoCEv2 packet; the 40-byte GRH area a receive buffer starts with.
use std::net::Ipv4Addr;

use rdma_wire::Gid;

use crate::RdmaError;

/// The IPv4 address of an IPv4-mapped (or zero-padded) GID: where a RoCEv2 packet for it is
/// sent, and the address a port binds to receive for it.
pub fn gid_ipv4(gid: Gid) -> Result<Ipv4Addr, RdmaError> {
    gid.canonical().ipv4_mapped().ok_or(RdmaError::NotIpv4(gid))
}

/// Length of the GRH area of a UD/QP1 receive buffer.
pub const GRH_LEN: usize = 40;

/// The Internet checksum (RFC 1071) of `h`: 0 over a header whose checksum is filled in.
pub fn ip_checksum(h: &[u8]) -> u16 {
    let mut sum: u32 = h
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// The IPv4 header a RoCEv2 packet from `src` to `dst` with `udp_payload_len` bytes after
/// the UDP header carries (TTL 64, DF, identification `id`, checksum filled in). Ferry's port
/// sends identification 0, or `k` for the `k`-th packet of a GSO run (see [`crate::port`]).
pub fn ipv4_header(src: Ipv4Addr, dst: Ipv4Addr, id: u16, udp_payload_len: usize) -> [u8; 20] {
    let total = (20 + 8 + udp_payload_len).min(usize::from(u16::MAX)) as u16;
    let mut ip = [0u8; 20];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&total.to_be_bytes());
    ip[4..6].copy_from_slice(&id.to_be_bytes());
    ip[6] = 0x40;
    ip[8] = 64;
    ip[9] = 17;
    ip[12..16].copy_from_slice(&src.octets());
    ip[16..20].copy_from_slice(&dst.octets());
    let c = ip_checksum(&ip);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    ip
}

/// The IPv6 header of a RoCEv2 packet between two non-IPv4 GIDs.
pub fn ipv6_header(src: Gid, dst: Gid, udp_payload_len: usize) -> [u8; 40] {
    let len = (8 + udp_payload_len).min(usize::from(u16::MAX)) as u16;
    let mut ip = [0u8; 40];
    ip[0] = 0x60;
    ip[4..6].copy_from_slice(&len.to_be_bytes());
    ip[6] = 17;
    ip[7] = 64;
    ip[8..24].copy_from_slice(&src.octets());
    ip[24..40].copy_from_slice(&dst.octets());
    ip
}

/// The 40-byte GRH area a receive buffer starts with, as a RoCEv2 RNIC fills it: for IPv4
/// GIDs 20 zero bytes then the IPv4 header; otherwise the IPv6 header. `udp_payload_len` is
/// the RoCEv2 packet length (BTH … ICRC).
pub fn grh_area(sgid: Gid, dgid: Gid, udp_payload_len: usize) -> [u8; GRH_LEN] {
    let mut g = [0u8; GRH_LEN];
    match (
        sgid.canonical().ipv4_mapped(),
        dgid.canonical().ipv4_mapped(),
    ) {
        (Some(s), Some(d)) => g[20..].copy_from_slice(&ipv4_header(s, d, 0, udp_payload_len)),
        _ => g.copy_from_slice(&ipv6_header(sgid, dgid, udp_payload_len)),
    }
    g
}

/// Source and destination GIDs from a GRH area written by [`grh_area`] (or a real RNIC).
pub fn parse_grh(g: &[u8; GRH_LEN]) -> Option<(Gid, Gid)> {
    if g[..20].iter().all(|&b| b == 0) && g[20] >> 4 == 4 {
        let ip = |o: usize| Ipv4Addr::new(g[o], g[o + 1], g[o + 2], g[o + 3]);
        Some((Gid::from_ipv4(ip(32)), Gid::from_ipv4(ip(36))))
    } else if g[0] >> 4 == 6 {
        let gid = |o: usize| -> Option<Gid> { Some(Gid(g[o..o + 16].try_into().ok()?)) };
        Some((gid(8)?, gid(24)?))
    } else {
        None
    }
}

/// The GID of an IPv4 address (`::ffff:a.b.c.d`).
pub fn gid_v4(a: Ipv4Addr) -> Gid {
    Gid::from_ipv4(a)
}

/// The IPv4 address `n` places after `base` (wrapping).
pub fn ipv4_add(base: Ipv4Addr, n: u32) -> Ipv4Addr {
    Ipv4Addr::from_bits(base.to_bits().wrapping_add(n))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gid_ipv4_of_both_forms() {
        let zp = Gid::from_parts(0, 0x7f00_0105);
        assert_eq!(gid_ipv4(zp).unwrap(), Ipv4Addr::new(127, 0, 1, 5));
        assert_eq!(
            gid_ipv4(gid_v4(Ipv4Addr::new(10, 0, 0, 1))).unwrap(),
            Ipv4Addr::new(10, 0, 0, 1)
        );
        assert!(gid_ipv4(Gid::from_parts(0xfe80 << 48, 1)).is_err());
    }

    #[test]
    fn grh_area_round_trip_ipv4_and_ipv6() {
        let s = gid_v4(Ipv4Addr::new(10, 0, 0, 1));
        let d = gid_v4(Ipv4Addr::new(10, 0, 0, 2));
        let g = grh_area(s, d, 300);
        assert!(g[..20].iter().all(|&b| b == 0));
        assert_eq!(g[20], 0x45);
        assert_eq!(ip_checksum(&g[20..]), 0, "header checksum verifies");
        assert_eq!(parse_grh(&g), Some((s, d)));
        let s6 = Gid::from_parts(0xfe80 << 48, 1);
        let d6 = Gid::from_parts(0xfe80 << 48, 2);
        assert_eq!(parse_grh(&grh_area(s6, d6, 300)), Some((s6, d6)));
        assert_eq!(parse_grh(&[0u8; 40]), None);
    }
}

/// Parses a GID written as an IPv4 address (`127.0.1.1` → `::ffff:127.0.1.1`) or IPv6 text.
pub fn parse_gid(s: &str) -> Result<Gid, RdmaError> {
    s.trim()
        .parse::<std::net::IpAddr>()
        .map(Gid::from_ip)
        .map_err(|_| RdmaError::Config(format!("'{s}' is not a GID (an IPv4 or IPv6 address)")))
}

/// `serde` for a [`Gid`] as its text form (`#[serde(with = "crate::addr::gid_serde")]`).
pub mod gid_serde {
    use rdma_wire::Gid;
    use serde::{Deserialize, Deserializer, Serializer};

    /// Writes the GID's text form.
    pub fn serialize<S: Serializer>(g: &Gid, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(g)
    }

    /// Reads a GID from text.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Gid, D::Error> {
        let s = String::deserialize(d)?;
        super::parse_gid(&s).map_err(serde::de::Error::custom)
    }
}

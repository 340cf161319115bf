//! Addressing over the loopback UDP transport: GID → host resolution (a static neighbour
//! table), Ferry's encapsulation preamble carrying SGID and DGID, and the 40-byte GRH area a
//! receive buffer starts with.
use std::net::Ipv4Addr;
use std::str::FromStr;

use rdma_wire::Gid;
use serde::{Deserialize, Serialize};

use crate::RdmaError;

/// One neighbour entry: GIDs whose IPv4 address is in `prefix/len` live behind `host`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Neighbor {
    /// Network address.
    pub prefix: Ipv4Addr,
    /// Prefix length (0–32).
    pub len: u8,
    /// Host address whose port 4791 receives for these GIDs.
    pub host: Ipv4Addr,
}

impl Neighbor {
    fn mask(&self) -> u32 {
        if self.len == 0 {
            0
        } else {
            u32::MAX << (32 - u32::from(self.len.min(32)))
        }
    }

    /// Whether `ip` is inside the entry's prefix.
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        (ip.to_bits() & self.mask()) == (self.prefix.to_bits() & self.mask())
    }
}

impl FromStr for Neighbor {
    type Err = RdmaError;
    /// Parses `A.B.C.D/LEN=HOST` (or `A.B.C.D=HOST` for one address).
    fn from_str(s: &str) -> Result<Neighbor, RdmaError> {
        let bad = || RdmaError::BadNeighbor(s.to_string());
        let (net, host) = s.split_once('=').ok_or_else(bad)?;
        let (prefix, len) = match net.split_once('/') {
            Some((p, l)) => (p, l.trim().parse::<u8>().map_err(|_| bad())?),
            None => (net, 32),
        };
        if len > 32 {
            return Err(bad());
        }
        Ok(Neighbor {
            prefix: prefix.trim().parse().map_err(|_| bad())?,
            len,
            host: host.trim().parse().map_err(|_| bad())?,
        })
    }
}

/// Static GID → host table, longest prefix wins. An address without an entry is its own
/// host (a GID that is a host address).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NeighborTable {
    entries: Vec<Neighbor>,
}

impl NeighborTable {
    /// An empty table.
    pub fn new() -> NeighborTable {
        NeighborTable::default()
    }

    /// Adds an entry.
    pub fn add(&mut self, n: Neighbor) {
        self.entries.push(n);
        self.entries.sort_by_key(|n| std::cmp::Reverse(n.len));
    }

    /// Adds an entry, builder style.
    pub fn with(mut self, n: Neighbor) -> NeighborTable {
        self.add(n);
        self
    }

    /// The entries, longest prefix first.
    pub fn entries(&self) -> &[Neighbor] {
        &self.entries
    }

    /// The host address that receives packets for `ip`.
    pub fn resolve(&self, ip: Ipv4Addr) -> Ipv4Addr {
        self.entries
            .iter()
            .find(|n| n.contains(ip))
            .map_or(ip, |n| n.host)
    }

    /// The host address that receives packets for `gid` (IPv4-mapped or zero-padded form).
    pub fn resolve_gid(&self, gid: Gid) -> Result<Ipv4Addr, RdmaError> {
        gid.canonical()
            .ipv4_mapped()
            .map(|ip| self.resolve(ip))
            .ok_or(RdmaError::NotIpv4(gid))
    }
}

/// Magic and version at the start of every datagram of Ferry's loopback transport.
pub const ENCAP_MAGIC: [u8; 4] = *b"FRY\x01";
/// Length of the preamble: magic, SGID, DGID.
pub const ENCAP_LEN: usize = 4 + 16 + 16;

/// The preamble before the BTH: the packet's source and destination GIDs, which a real
/// RoCEv2 packet carries in its IP header and a UDP socket does not report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Encap {
    /// Source GID (IP source of the RoCEv2 packet).
    pub sgid: Gid,
    /// Destination GID (IP destination).
    pub dgid: Gid,
}

impl Encap {
    /// Writes the preamble into the first [`ENCAP_LEN`] bytes of `out`.
    pub fn write(&self, out: &mut [u8; ENCAP_LEN]) {
        out[..4].copy_from_slice(&ENCAP_MAGIC);
        out[4..20].copy_from_slice(&self.sgid.octets());
        out[20..36].copy_from_slice(&self.dgid.octets());
    }

    /// Splits a datagram into its preamble and the RoCEv2 part (BTH … ICRC). `None` when it
    /// is too short or lacks the magic.
    pub fn split(datagram: &[u8]) -> Option<(Encap, &[u8])> {
        let (head, rest) = datagram.split_at_checked(ENCAP_LEN)?;
        if head[..4] != ENCAP_MAGIC {
            return None;
        }
        let g = |r: &[u8]| -> Option<Gid> { Some(Gid(r.try_into().ok()?)) };
        Some((
            Encap {
                sgid: g(&head[4..20])?,
                dgid: g(&head[20..36])?,
            },
            rest,
        ))
    }
}

/// Length of the GRH area of a UD/QP1 receive buffer.
pub const GRH_LEN: usize = 40;

fn ip_checksum(h: &[u8]) -> u16 {
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
/// the UDP header carries (TTL 64, DF, identification 0, checksum filled in).
pub fn ipv4_header(src: Ipv4Addr, dst: Ipv4Addr, udp_payload_len: usize) -> [u8; 20] {
    let total = (20 + 8 + udp_payload_len).min(usize::from(u16::MAX)) as u16;
    let mut ip = [0u8; 20];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&total.to_be_bytes());
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
        (Some(s), Some(d)) => g[20..].copy_from_slice(&ipv4_header(s, d, udp_payload_len)),
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
    fn neighbor_table_longest_prefix_and_default_to_self() {
        let t = NeighborTable::new()
            .with("127.0.0.0/8=127.0.0.9".parse().unwrap())
            .with("127.0.1.0/24=127.0.0.1".parse().unwrap());
        assert_eq!(
            t.resolve("127.0.1.7".parse().unwrap()),
            Ipv4Addr::new(127, 0, 0, 1)
        );
        assert_eq!(
            t.resolve("127.5.1.7".parse().unwrap()),
            Ipv4Addr::new(127, 0, 0, 9)
        );
        assert_eq!(
            t.resolve("10.0.0.1".parse().unwrap()),
            Ipv4Addr::new(10, 0, 0, 1)
        );
        // The zero-padded form resolves like the mapped one.
        let zp = Gid::from_parts(0, 0x7f00_0105);
        assert_eq!(t.resolve_gid(zp).unwrap(), Ipv4Addr::new(127, 0, 0, 1));
        assert!(t.resolve_gid(Gid::from_parts(0xfe80 << 48, 1)).is_err());
        for bad in [
            "127.0.0.1",
            "1.2.3.4/33=1.1.1.1",
            "x/8=1.1.1.1",
            "1.2.3.4/8=y",
        ] {
            assert!(bad.parse::<Neighbor>().is_err(), "{bad}");
        }
    }

    #[test]
    fn encap_round_trip_and_rejects_garbage() {
        let e = Encap {
            sgid: gid_v4(Ipv4Addr::new(127, 0, 1, 1)),
            dgid: gid_v4(Ipv4Addr::new(127, 0, 2, 1)),
        };
        let mut buf = [0u8; ENCAP_LEN + 3];
        let head: &mut [u8; ENCAP_LEN] = (&mut buf[..ENCAP_LEN]).try_into().unwrap();
        e.write(head);
        let (d, rest) = Encap::split(&buf).unwrap();
        assert_eq!(d, e);
        assert_eq!(rest.len(), 3);
        assert!(Encap::split(&buf[..10]).is_none());
        buf[0] = b'X';
        assert!(Encap::split(&buf).is_none());
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

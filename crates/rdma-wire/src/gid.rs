//! Global identifiers (GIDs): 128-bit port addresses.
//!
//! On RoCEv2 a GID *is* the port's IP address: IPv6 addresses as they are, IPv4 addresses in the
//! IPv4-mapped form `::ffff:a.b.c.d`. rdma_cm's private-data header instead writes IPv4
//! addresses zero-padded (`::a.b.c.d`), so [`Gid::to_ipv4`] accepts both forms, and
//! [`Gid::canonical`] turns the zero-padded form into the mapped one for use as a table key.
//!
//! Equality, ordering and hashing always use all 128 bits. Keying anything by the 64-bit
//! interface ID alone lets two different addresses collide (see `rdma-wire.md`).

use core::fmt;
use core::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// A 128-bit InfiniBand global identifier, stored in network byte order.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Gid(pub [u8; 16]);

impl Gid {
    /// Size on the wire.
    pub const LEN: usize = 16;

    /// The all-zero GID (unused path, unset field).
    pub const ZERO: Gid = Gid([0; 16]);

    /// The GID of an IPv4 address on RoCEv2: `::ffff:a.b.c.d`.
    pub const fn from_ipv4(addr: Ipv4Addr) -> Gid {
        let o = addr.octets();
        Gid([
            0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, o[0], o[1], o[2], o[3],
        ])
    }

    /// The GID of an IPv6 address (its 16 bytes unchanged).
    pub const fn from_ipv6(addr: Ipv6Addr) -> Gid {
        Gid(addr.octets())
    }

    /// The GID of an IP address: mapped for IPv4, unchanged for IPv6.
    pub const fn from_ip(addr: IpAddr) -> Gid {
        match addr {
            IpAddr::V4(a) => Gid::from_ipv4(a),
            IpAddr::V6(a) => Gid::from_ipv6(a),
        }
    }

    /// A GID from its 16 network-order bytes.
    pub const fn from_bytes(bytes: [u8; 16]) -> Gid {
        Gid(bytes)
    }

    /// A GID from a subnet prefix and an interface ID.
    pub const fn from_parts(subnet_prefix: u64, interface_id: u64) -> Gid {
        let p = subnet_prefix.to_be_bytes();
        let i = interface_id.to_be_bytes();
        Gid([
            p[0], p[1], p[2], p[3], p[4], p[5], p[6], p[7], i[0], i[1], i[2], i[3], i[4], i[5],
            i[6], i[7],
        ])
    }

    /// The 16 network-order bytes.
    pub const fn octets(&self) -> [u8; 16] {
        self.0
    }

    /// The upper 64 bits.
    pub const fn subnet_prefix(&self) -> u64 {
        u128::from_be_bytes(self.0).wrapping_shr(64) as u64
    }

    /// The lower 64 bits. Never use this alone to tell GIDs apart.
    pub const fn interface_id(&self) -> u64 {
        u128::from_be_bytes(self.0) as u64
    }

    /// Whether all 128 bits are zero.
    pub const fn is_zero(&self) -> bool {
        u128::from_be_bytes(self.0) == 0
    }

    /// The IPv4 address of an IPv4-mapped GID (`::ffff:a.b.c.d`), the RoCEv2 form.
    pub const fn ipv4_mapped(&self) -> Option<Ipv4Addr> {
        let v = u128::from_be_bytes(self.0);
        if v >> 32 == 0xffff {
            Some(Ipv4Addr::from_bits(v as u32))
        } else {
            None
        }
    }

    /// The IPv4 address of a zero-padded GID (`::a.b.c.d`, 12 zero bytes then the address),
    /// the form rdma_cm's private-data header uses. The all-zero GID gives `0.0.0.0`.
    pub const fn ipv4_zero_padded(&self) -> Option<Ipv4Addr> {
        let v = u128::from_be_bytes(self.0);
        if v >> 32 == 0 {
            Some(Ipv4Addr::from_bits(v as u32))
        } else {
            None
        }
    }

    /// The IPv4 address of a GID in either IPv4 form: mapped (`::ffff:a.b.c.d`) or zero-padded
    /// (`::a.b.c.d`). `None` for any other GID.
    pub const fn to_ipv4(&self) -> Option<Ipv4Addr> {
        match self.ipv4_mapped() {
            Some(a) => Some(a),
            None => self.ipv4_zero_padded(),
        }
    }

    /// The 128 bits as an IPv6 address.
    pub const fn to_ipv6(&self) -> Ipv6Addr {
        Ipv6Addr::from_bits(u128::from_be_bytes(self.0))
    }

    /// The IP address a RoCEv2 packet for this GID carries: IPv4 for a mapped GID, IPv6
    /// otherwise. (The zero-padded form is *not* treated as IPv4 here; see [`Gid::canonical`].)
    pub const fn to_ip(&self) -> IpAddr {
        match self.ipv4_mapped() {
            Some(a) => IpAddr::V4(a),
            None => IpAddr::V6(self.to_ipv6()),
        }
    }

    /// The GID with a zero-padded IPv4 address (`::a.b.c.d`) rewritten to the mapped form
    /// (`::ffff:a.b.c.d`); every other GID unchanged. Use it to key tables that are filled from
    /// both rdma_cm private data and packet headers. The all-zero GID stays all-zero.
    pub const fn canonical(&self) -> Gid {
        if self.is_zero() {
            return *self;
        }
        match self.ipv4_zero_padded() {
            Some(a) => Gid::from_ipv4(a),
            None => *self,
        }
    }
}

impl From<[u8; 16]> for Gid {
    fn from(b: [u8; 16]) -> Gid {
        Gid(b)
    }
}

impl From<Gid> for [u8; 16] {
    fn from(g: Gid) -> [u8; 16] {
        g.0
    }
}

impl From<Ipv4Addr> for Gid {
    fn from(a: Ipv4Addr) -> Gid {
        Gid::from_ipv4(a)
    }
}

impl From<Ipv6Addr> for Gid {
    fn from(a: Ipv6Addr) -> Gid {
        Gid::from_ipv6(a)
    }
}

impl From<IpAddr> for Gid {
    fn from(a: IpAddr) -> Gid {
        Gid::from_ip(a)
    }
}

/// IPv4-mapped GIDs print as dotted IPv4 (`10.11.0.2`), all others as IPv6 text.
impl fmt::Display for Gid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.ipv4_mapped() {
            Some(a) => fmt::Display::fmt(&a, f),
            None => fmt::Display::fmt(&self.to_ipv6(), f),
        }
    }
}

impl fmt::Debug for Gid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Gid({self})")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;
    use std::string::ToString;

    #[test]
    fn ipv4_mapped_round_trip() {
        let g = Gid::from_ipv4(Ipv4Addr::new(10, 11, 0, 2));
        assert_eq!(
            g.0,
            [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 10, 11, 0, 2]
        );
        assert_eq!(g.to_ipv4(), Some(Ipv4Addr::new(10, 11, 0, 2)));
        assert_eq!(g.ipv4_mapped(), Some(Ipv4Addr::new(10, 11, 0, 2)));
        assert_eq!(g.ipv4_zero_padded(), None);
        assert_eq!(g.to_ip(), IpAddr::V4(Ipv4Addr::new(10, 11, 0, 2)));
        assert_eq!(g.to_string(), "10.11.0.2");
        assert_eq!(std::format!("{g:?}"), "Gid(10.11.0.2)");
        assert_eq!(g.subnet_prefix(), 0);
        assert_eq!(g.interface_id(), 0x0000_ffff_0a0b_0002);
    }

    #[test]
    fn zero_padded_ipv4_is_recognized_and_canonicalized() {
        let mut b = [0u8; 16];
        b[12..].copy_from_slice(&[10, 11, 0, 1]);
        let g = Gid(b);
        assert_eq!(g.ipv4_mapped(), None);
        assert_eq!(g.ipv4_zero_padded(), Some(Ipv4Addr::new(10, 11, 0, 1)));
        assert_eq!(g.to_ipv4(), Some(Ipv4Addr::new(10, 11, 0, 1)));
        assert_ne!(g, Gid::from_ipv4(Ipv4Addr::new(10, 11, 0, 1)));
        assert_eq!(g.canonical(), Gid::from_ipv4(Ipv4Addr::new(10, 11, 0, 1)));
        assert_eq!(Gid::ZERO.canonical(), Gid::ZERO);
        assert_eq!(
            g.to_string(),
            "::10.11.0.1".parse::<Ipv6Addr>().unwrap().to_string()
        );
    }

    #[test]
    fn ipv6_gid() {
        let a: Ipv6Addr = "fe80::5054:ff:fe11:1".parse().unwrap();
        let g = Gid::from(a);
        assert_eq!(g.to_ipv4(), None);
        assert_eq!(g.to_ipv6(), a);
        assert_eq!(g.to_ip(), IpAddr::V6(a));
        assert_eq!(g.to_string(), "fe80::5054:ff:fe11:1");
        assert_eq!(g.subnet_prefix(), 0xfe80_0000_0000_0000);
        assert_eq!(g.interface_id(), 0x5054_00ff_fe11_0001);
        assert_eq!(Gid::from_parts(g.subnet_prefix(), g.interface_id()), g);
        assert_eq!(Gid::from(IpAddr::V6(a)), g);
    }

    #[test]
    fn equality_uses_all_128_bits() {
        // Same interface ID, different subnet prefixes: must be different GIDs.
        let a = Gid::from_parts(0xfe80_0000_0000_0000, 0x5054_00ff_fe11_0001);
        let b = Gid::from_parts(0xfd00_0000_0000_0001, 0x5054_00ff_fe11_0001);
        assert_eq!(a.interface_id(), b.interface_id());
        assert_ne!(a, b);
        assert_ne!(a.cmp(&b), core::cmp::Ordering::Equal);
        let set: HashSet<Gid> = [a, b].into_iter().collect();
        assert_eq!(set.len(), 2);
    }
}

//! What Linux's rdma_cm (`librdmacm`, `drivers/infiniband/core/cma.c`) adds on top of IB CM:
//! the private-data header of REQ and SIDR_REQ, IP-based service IDs, and the UD Q_Key.

use core::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::bytes::{array, get, get_u16, out_slice, put, put_u16};
use crate::{Gid, WireError};

/// The Q_Key rdma_cm gives UD QPs (`RDMA_UDP_QKEY`).
pub const RDMA_CM_UD_QKEY: u32 = 0x0123_4567;

/// Length of the rdma_cm private-data header.
pub const CMA_HEADER_LEN: usize = 36;

/// The header version rdma_cm writes and accepts.
pub const CMA_VERSION: u8 = 0;

/// An rdma_cm port space: the upper part of an IP-based service ID.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum PortSpace {
    /// `RDMA_PS_IPOIB`.
    Ipoib,
    /// `RDMA_PS_TCP` (RC connections: rping, ucmatose).
    Tcp,
    /// `RDMA_PS_UDP` (UD, resolved with SIDR: udaddy).
    Udp,
    /// `RDMA_PS_IB`.
    Ib,
}

impl PortSpace {
    /// The numeric port space.
    pub const fn value(self) -> u16 {
        match self {
            PortSpace::Ipoib => 0x0002,
            PortSpace::Tcp => 0x0106,
            PortSpace::Udp => 0x0111,
            PortSpace::Ib => 0x013F,
        }
    }

    /// The port space with numeric value `v`.
    pub const fn from_value(v: u16) -> Option<PortSpace> {
        match v {
            0x0002 => Some(PortSpace::Ipoib),
            0x0106 => Some(PortSpace::Tcp),
            0x0111 => Some(PortSpace::Udp),
            0x013F => Some(PortSpace::Ib),
            _ => None,
        }
    }
}

/// The service ID rdma_cm uses for `port` in `space`: `(space << 16) | port`
/// (e.g. TCP port 7174 → `0x0000_0000_0106_1c06`).
pub const fn service_id(space: PortSpace, port: u16) -> u64 {
    ((space.value() as u64) << 16) | port as u64
}

/// Splits an rdma_cm service ID into port space and port; `None` when the upper 48 bits are
/// not one of the port spaces.
pub const fn parse_service_id(service_id: u64) -> Option<(PortSpace, u16)> {
    if service_id >> 32 != 0 {
        return None;
    }
    match PortSpace::from_value((service_id >> 16) as u16) {
        Some(space) => Some((space, service_id as u16)),
        None => None,
    }
}

/// The rdma_cm private-data header (`struct cma_hdr`), the first 36 bytes of the private data
/// of a REQ or SIDR_REQ sent by rdma_cm.
///
/// | byte | field |
/// |---|---|
/// | 0 | version (0) |
/// | 1 | IP version (4 bits: 4 or 6) · reserved (4) |
/// | 2–3 | source port |
/// | 4–19 | source address |
/// | 20–35 | destination address |
///
/// An IPv4 address is the last 4 bytes of its 16, after 12 **zero** bytes (`::a.b.c.d`, not
/// the `::ffff:`-mapped form of GIDs). The addresses are kept as carried; [`Gid::canonical`]
/// turns them into the form packet GIDs use, and [`CmaHeader::src_ip`] /
/// [`CmaHeader::dst_ip`] read them according to the IP version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct CmaHeader {
    /// Header version (0).
    pub version: u8,
    /// IP version: 4 or 6.
    pub ip_version: u8,
    /// Source (active side) port.
    pub src_port: u16,
    /// Source address, 16 bytes as carried.
    pub src_addr: Gid,
    /// Destination address, 16 bytes as carried.
    pub dst_addr: Gid,
}

impl CmaHeader {
    /// A header for a connection from `src:src_port` to `dst`. Both addresses must be of the
    /// same family.
    pub fn new(src: IpAddr, src_port: u16, dst: IpAddr) -> Result<CmaHeader, WireError> {
        let (ip_version, src_addr, dst_addr) = match (src, dst) {
            (IpAddr::V4(s), IpAddr::V4(d)) => (4, zero_padded(s), zero_padded(d)),
            (IpAddr::V6(s), IpAddr::V6(d)) => (6, Gid::from_ipv6(s), Gid::from_ipv6(d)),
            _ => return Err(WireError::MixedAddressFamilies),
        };
        Ok(CmaHeader {
            version: CMA_VERSION,
            ip_version,
            src_port,
            src_addr,
            dst_addr,
        })
    }

    /// Parses the header from the start of a private-data area (at least 36 bytes). The IP
    /// version must be 4 or 6.
    pub fn parse(private_data: &[u8]) -> Result<CmaHeader, WireError> {
        let b = array::<CMA_HEADER_LEN>(private_data, "rdma_cm header")?;
        let ip_version = b[1] >> 4;
        if ip_version != 4 && ip_version != 6 {
            return Err(WireError::BadCmaIpVersion {
                version: ip_version,
            });
        }
        Ok(CmaHeader {
            version: b[0],
            ip_version,
            src_port: get_u16(b, 2),
            src_addr: Gid(get(b, 4)),
            dst_addr: Gid(get(b, 20)),
        })
    }

    /// Encodes the header (reserved bits zero).
    pub fn to_bytes(&self) -> [u8; CMA_HEADER_LEN] {
        let mut b = [0u8; CMA_HEADER_LEN];
        b[0] = self.version;
        b[1] = (self.ip_version & 0x0F) << 4;
        put_u16(&mut b, 2, self.src_port);
        put(&mut b, 4, &self.src_addr.0);
        put(&mut b, 20, &self.dst_addr.0);
        b
    }

    /// Writes the header to the start of a private-data area, returning 36.
    pub fn write(&self, private_data: &mut [u8]) -> Result<usize, WireError> {
        out_slice(private_data, CMA_HEADER_LEN, "rdma_cm header")?
            .copy_from_slice(&self.to_bytes());
        Ok(CMA_HEADER_LEN)
    }

    /// The source address read according to the IP version (IPv4: last 4 bytes).
    pub fn src_ip(&self) -> IpAddr {
        self.addr(&self.src_addr)
    }

    /// The destination address read according to the IP version (IPv4: last 4 bytes).
    pub fn dst_ip(&self) -> IpAddr {
        self.addr(&self.dst_addr)
    }

    fn addr(&self, a: &Gid) -> IpAddr {
        if self.ip_version == 4 {
            let [.., w, x, y, z] = a.0;
            IpAddr::V4(Ipv4Addr::new(w, x, y, z))
        } else {
            IpAddr::V6(Ipv6Addr::from(a.0))
        }
    }
}

fn zero_padded(a: Ipv4Addr) -> Gid {
    let mut g = [0u8; 16];
    put(&mut g, 12, &a.octets());
    Gid(g)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_ids() {
        assert_eq!(service_id(PortSpace::Tcp, 7174), 0x0000_0000_0106_1c06);
        assert_eq!(service_id(PortSpace::Udp, 1), 0x0000_0000_0111_0001);
        assert_eq!(service_id(PortSpace::Ib, 0xffff), 0x0000_0000_013f_ffff);
        assert_eq!(
            parse_service_id(0x0000_0000_0106_1c06),
            Some((PortSpace::Tcp, 7174))
        );
        assert_eq!(parse_service_id(0x0000_0001_0106_1c06), None);
        assert_eq!(parse_service_id(0x0000_0000_0107_1c06), None);
        for ps in [
            PortSpace::Ipoib,
            PortSpace::Tcp,
            PortSpace::Udp,
            PortSpace::Ib,
        ] {
            assert_eq!(PortSpace::from_value(ps.value()), Some(ps));
            assert_eq!(parse_service_id(service_id(ps, 42)), Some((ps, 42)));
        }
    }

    #[test]
    fn ipv4_header_layout() {
        let h = CmaHeader::new(
            Ipv4Addr::new(10, 11, 0, 2).into(),
            0xb4ba,
            Ipv4Addr::new(10, 11, 0, 1).into(),
        )
        .unwrap();
        let b = h.to_bytes();
        let mut expected = [0u8; 36];
        expected[1] = 0x40;
        expected[2] = 0xb4;
        expected[3] = 0xba;
        expected[16..20].copy_from_slice(&[10, 11, 0, 2]);
        expected[32..36].copy_from_slice(&[10, 11, 0, 1]);
        assert_eq!(b, expected);
        let p = CmaHeader::parse(&b).unwrap();
        assert_eq!(p, h);
        assert_eq!(p.src_ip(), IpAddr::V4(Ipv4Addr::new(10, 11, 0, 2)));
        assert_eq!(p.dst_ip(), IpAddr::V4(Ipv4Addr::new(10, 11, 0, 1)));
        assert_eq!(p.src_addr.to_ipv4(), Some(Ipv4Addr::new(10, 11, 0, 2)));
        assert_eq!(
            p.dst_addr.canonical(),
            Gid::from_ipv4(Ipv4Addr::new(10, 11, 0, 1))
        );
    }

    #[test]
    fn ipv6_header_and_errors() {
        let s: Ipv6Addr = "fd00::2".parse().unwrap();
        let d: Ipv6Addr = "fd00::1".parse().unwrap();
        let h = CmaHeader::new(s.into(), 1, d.into()).unwrap();
        let mut pd = [0u8; 92];
        assert_eq!(h.write(&mut pd), Ok(36));
        assert_eq!(pd[1], 0x60);
        assert_eq!(CmaHeader::parse(&pd).unwrap().dst_ip(), IpAddr::V6(d));
        assert_eq!(
            CmaHeader::new(s.into(), 1, Ipv4Addr::LOCALHOST.into()),
            Err(WireError::MixedAddressFamilies)
        );
        pd[1] = 0x50;
        assert_eq!(
            CmaHeader::parse(&pd),
            Err(WireError::BadCmaIpVersion { version: 5 })
        );
        assert!(CmaHeader::parse(&pd[..35]).is_err());
        assert!(h.write(&mut [0u8; 35]).is_err());
    }
}

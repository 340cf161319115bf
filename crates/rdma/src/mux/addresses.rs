//! Every address a CM message names, checked against the datagram's own (source, destination)
//! — the sender's GID is its IP source on RoCEv2, never a field it writes. The primary path of
//! a REQ is checked on the multiplexer's hot path; this checks the rest, on the way out of a
//! VM and on the way in from the network:
//!
//! - a REQ's primary remote GID the receiver's (what the inbound path also checks);
//! - a REQ's alternate path: local GID the sender's, remote GID the receiver's (or no
//!   alternate path: both zero);
//! - a LAP's alternate path, the same way;
//! - the rdma_cm private-data header of a REQ or SIDR_REQ for an rdma_cm service ID (what a
//!   Linux listener takes as the connection's IP addresses): source address the sender's,
//!   destination address the receiver's.
use core::net::IpAddr;

use rdma_wire::cm::CmPath;
use rdma_wire::rdma_cm::{parse_service_id, CmaHeader, CMA_VERSION};
use rdma_wire::{CmMessage, Gid};

/// An address a message names that is not the datagram's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mismatch {
    /// Names another sender than the source (`what` says where).
    Source(&'static str),
    /// Names another receiver than the destination.
    Destination(&'static str),
}

fn ip_gid(ip: IpAddr) -> Gid {
    match ip {
        IpAddr::V4(a) => Gid::from_ipv4(a),
        IpAddr::V6(a) => Gid::from_ipv6(a),
    }
}

fn check_path(p: &CmPath, src: Gid, dst: Gid, what: [&'static str; 2]) -> Result<(), Mismatch> {
    if p.local_gid.is_zero() && p.remote_gid.is_zero() {
        return Ok(()); // no such path
    }
    if p.local_gid.canonical() != src {
        return Err(Mismatch::Source(what[0]));
    }
    if p.remote_gid.canonical() != dst {
        return Err(Mismatch::Destination(what[1]));
    }
    Ok(())
}

fn check_cma(service_id: u64, private_data: &[u8], src: Gid, dst: Gid) -> Result<(), Mismatch> {
    if parse_service_id(service_id).is_none() {
        return Ok(()); // not rdma_cm: the private data is the application's
    }
    let Ok(h) = CmaHeader::parse(private_data) else {
        return Ok(()); // rdma_cm itself refuses it (no addresses to believe)
    };
    if h.version != CMA_VERSION {
        return Ok(());
    }
    if ip_gid(h.src_ip()).canonical() != src {
        return Err(Mismatch::Source("rdma_cm private-data source address"));
    }
    if ip_gid(h.dst_ip()).canonical() != dst {
        return Err(Mismatch::Destination(
            "rdma_cm private-data destination address",
        ));
    }
    Ok(())
}

/// Checks the addresses `msg` names beyond a REQ's primary path against its datagram's
/// source `src` and destination `dst`.
pub fn check(msg: &CmMessage, src: Gid, dst: Gid) -> Result<(), Mismatch> {
    let (src, dst) = (src.canonical(), dst.canonical());
    match msg {
        CmMessage::Req(m) => {
            if m.primary_path.remote_gid.canonical() != dst {
                return Err(Mismatch::Destination("REQ primary remote GID"));
            }
            check_path(
                &m.alternate_path,
                src,
                dst,
                ["REQ alternate local GID", "REQ alternate remote GID"],
            )?;
            check_cma(m.service_id, &m.private_data, src, dst)
        }
        CmMessage::Lap(m) => check_path(
            &m.alternate_path,
            src,
            dst,
            ["LAP alternate local GID", "LAP alternate remote GID"],
        ),
        CmMessage::SidrReq(m) => check_cma(m.service_id, &m.private_data, src, dst),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use core::net::Ipv4Addr;

    use rdma_wire::cm::{Lap, Req, SidrReq};
    use rdma_wire::mad::{attr, MadHeader};
    use rdma_wire::rdma_cm::{service_id, PortSpace};

    use super::*;

    fn g(d: u8) -> Gid {
        Gid::from_ipv4(Ipv4Addr::new(10, 0, 0, d))
    }

    fn cma(src: u8, dst: u8) -> [u8; 36] {
        let h = CmaHeader::new(
            Ipv4Addr::new(10, 0, 0, src).into(),
            4000,
            Ipv4Addr::new(10, 0, 0, dst).into(),
        )
        .unwrap();
        h.to_bytes()
    }

    fn req(alt: Option<(u8, u8)>, pd: Option<(u8, u8)>) -> CmMessage {
        let mut r = Req {
            hdr: MadHeader::cm(attr::REQ, 1),
            local_comm_id: 1,
            service_id: service_id(PortSpace::Tcp, 7174),
            ..Req::default()
        };
        r.primary_path.local_gid = g(1);
        r.primary_path.remote_gid = g(2);
        if let Some((l, rm)) = alt {
            r.alternate_path.local_gid = g(l);
            r.alternate_path.remote_gid = g(rm);
        }
        if let Some((s, d)) = pd {
            r.private_data[..36].copy_from_slice(&cma(s, d));
        }
        CmMessage::Req(r)
    }

    #[test]
    fn every_address_must_be_the_datagrams() {
        let (a, b) = (g(1), g(2));
        assert_eq!(check(&req(None, None), a, b), Ok(()));
        assert_eq!(check(&req(Some((1, 2)), Some((1, 2))), a, b), Ok(()));
        assert!(matches!(
            check(&req(Some((3, 2)), None), a, b),
            Err(Mismatch::Source(_))
        ));
        assert!(matches!(
            check(&req(Some((1, 3)), None), a, b),
            Err(Mismatch::Destination(_))
        ));
        assert!(matches!(
            check(&req(None, Some((3, 2))), a, b),
            Err(Mismatch::Source(_))
        ));
        assert!(matches!(
            check(&req(None, Some((1, 3))), a, b),
            Err(Mismatch::Destination(_))
        ));
        // Not an rdma_cm service ID: the private data is the application's own.
        let CmMessage::Req(mut r) = req(None, Some((3, 3))) else {
            unreachable!()
        };
        r.service_id = 0x1234_5678_9abc_def0;
        assert_eq!(check(&CmMessage::Req(r), a, b), Ok(()));
        // LAP and SIDR_REQ.
        let mut lap = Lap {
            hdr: MadHeader::cm(attr::LAP, 1),
            ..Lap::default()
        };
        lap.alternate_path.local_gid = g(3);
        lap.alternate_path.remote_gid = b;
        assert!(matches!(
            check(&CmMessage::Lap(lap), a, b),
            Err(Mismatch::Source(_))
        ));
        lap.alternate_path.local_gid = a;
        assert_eq!(check(&CmMessage::Lap(lap), a, b), Ok(()));
        let mut sidr = SidrReq {
            hdr: MadHeader::cm(attr::SIDR_REQ, 1),
            service_id: service_id(PortSpace::Udp, 7174),
            ..SidrReq::default()
        };
        sidr.private_data[..36].copy_from_slice(&cma(3, 2));
        assert!(matches!(
            check(&CmMessage::SidrReq(sidr), a, b),
            Err(Mismatch::Source(_))
        ));
    }
}

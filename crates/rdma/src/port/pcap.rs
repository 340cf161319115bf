//! A pcap writer for the port's traffic: each RoCEv2 packet as the Ethernet/IPv4/UDP frame it
//! travelled in (the IP header as the sending kernel wrote it, identification included — for
//! received packets the one the ICRC check recovered), so Wireshark dissects BTH, the
//! extension headers and CM MADs, and its ICRC verifies against the frame.
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use parking_lot::Mutex;
use std::net::Ipv4Addr;

use crate::addr::ipv4_header;
use crate::RdmaError;

/// Link type Ethernet.
const LINKTYPE_ETHERNET: u32 = 1;

/// Appends frames to a classic (microsecond) pcap file.
#[derive(Debug)]
pub struct PcapWriter {
    path: PathBuf,
    out: Mutex<BufWriter<File>>,
}

/// A locally administered MAC address derived from an IPv4 address.
fn mac_for(ip: Ipv4Addr) -> [u8; 6] {
    let o = ip.octets();
    [0x02, 0x00, o[0], o[1], o[2], o[3]]
}

impl PcapWriter {
    /// Creates (truncates) `path` and writes the pcap file header.
    pub fn create(path: &Path) -> Result<PcapWriter, RdmaError> {
        let err = |source| RdmaError::Pcap {
            path: path.display().to_string(),
            source,
        };
        let mut out = BufWriter::new(File::create(path).map_err(err)?);
        let mut h = Vec::with_capacity(24);
        h.extend_from_slice(&0xa1b2_c3d4u32.to_le_bytes());
        h.extend_from_slice(&2u16.to_le_bytes());
        h.extend_from_slice(&4u16.to_le_bytes());
        h.extend_from_slice(&0i32.to_le_bytes());
        h.extend_from_slice(&0u32.to_le_bytes());
        h.extend_from_slice(&65535u32.to_le_bytes());
        h.extend_from_slice(&LINKTYPE_ETHERNET.to_le_bytes());
        out.write_all(&h).map_err(err)?;
        out.flush().map_err(err)?;
        Ok(PcapWriter {
            path: path.to_path_buf(),
            out: Mutex::new(out),
        })
    }

    /// The file written.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Builds the Ethernet frame of a RoCEv2 packet (`roce`: BTH … ICRC) from `src` to `dst`
    /// with IP identification `ip_id`.
    pub fn frame(
        src: Ipv4Addr,
        dst: Ipv4Addr,
        src_port: u16,
        dst_port: u16,
        ip_id: u16,
        roce: &[u8],
    ) -> Vec<u8> {
        let mut f = Vec::with_capacity(14 + 20 + 8 + roce.len());
        f.extend_from_slice(&mac_for(dst));
        f.extend_from_slice(&mac_for(src));
        f.extend_from_slice(&0x0800u16.to_be_bytes());
        f.extend_from_slice(&ipv4_header(src, dst, ip_id, roce.len()));
        let udp_len = (8 + roce.len()).min(usize::from(u16::MAX)) as u16;
        f.extend_from_slice(&src_port.to_be_bytes());
        f.extend_from_slice(&dst_port.to_be_bytes());
        f.extend_from_slice(&udp_len.to_be_bytes());
        f.extend_from_slice(&0u16.to_be_bytes()); // no UDP checksum (allowed over IPv4)
        f.extend_from_slice(roce);
        f
    }

    /// Appends one packet. Errors are logged, not returned: capture never stops the port.
    pub fn write_packet(
        &self,
        src: Ipv4Addr,
        dst: Ipv4Addr,
        src_port: u16,
        dst_port: u16,
        ip_id: u16,
        roce: &[u8],
    ) {
        let frame = PcapWriter::frame(src, dst, src_port, dst_port, ip_id, roce);
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let mut rec = Vec::with_capacity(16 + frame.len());
        rec.extend_from_slice(&(now.as_secs() as u32).to_le_bytes());
        rec.extend_from_slice(&now.subsec_micros().to_le_bytes());
        rec.extend_from_slice(&(frame.len() as u32).to_le_bytes());
        rec.extend_from_slice(&(frame.len() as u32).to_le_bytes());
        rec.extend_from_slice(&frame);
        let mut out = self.out.lock();
        if let Err(e) = out.write_all(&rec).and_then(|()| out.flush()) {
            tracing::warn!(path = %self.path.display(), error = &e as &dyn std::error::Error, "pcap write failed");
        }
    }
}

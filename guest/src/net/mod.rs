//! The guest's network: the virtio-net [`driver`] and a tiny stack, just what `net-echo` and
//! `net-stream` need: ARP replies for its own address, ICMP echo replies, and UDP datagrams to
//! one port, echoed back or handed to the workload (which answers with [`Stack::udp_frame`]). Every received frame is parsed with its lengths and checksums checked;
//! anything else is counted and dropped, never trusted.
pub mod driver;
pub mod serve;

/// EtherType of IPv4.
const ETH_IPV4: u16 = 0x0800;
/// EtherType of ARP.
const ETH_ARP: u16 = 0x0806;
const ETH_HLEN: usize = 14;
const PROTO_ICMP: u8 = 1;
const PROTO_UDP: u8 = 17;

/// What the stack did with the frames it saw.
#[derive(Default, Clone, Copy)]
pub struct Counters {
    /// ARP requests answered.
    pub arp_replies: u64,
    /// ICMP echo requests answered.
    pub pings: u64,
    /// UDP datagrams echoed.
    pub udp_echoes: u64,
    /// Frames not for this stack (other addresses, protocols, ports).
    pub ignored: u64,
    /// Frames that were malformed (lengths, checksums, fragments).
    pub malformed: u64,
}

/// One IPv4 address on one MAC.
pub struct Stack {
    /// Our MAC address.
    pub mac: [u8; 6],
    /// Our IPv4 address.
    pub ip: [u8; 4],
    /// The UDP port served.
    pub udp_port: u16,
    /// Echo datagrams to `udp_port` (otherwise they are handed to the caller).
    pub echo: bool,
    /// Counters.
    pub counters: Counters,
}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

/// The Internet checksum (RFC 1071) of `data`, starting from the partial sum `init`.
pub fn checksum(data: &[u8], init: u32) -> u16 {
    let mut sum = init;
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        sum += u32::from(u16::from_be_bytes([c[0], c[1]]));
    }
    if let [last] = chunks.remainder() {
        sum += u32::from(*last) << 8;
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// The UDP pseudo-header's partial sum.
fn pseudo_sum(src: &[u8], dst: &[u8], len: usize) -> u32 {
    let mut s = 0u32;
    for w in [src, dst] {
        s += u32::from(be16(w, 0)) + u32::from(be16(w, 2));
    }
    s + u32::from(PROTO_UDP) + len as u32
}

/// Where a datagram came from (where an answer goes).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Peer {
    /// Its MAC address.
    pub mac: [u8; 6],
    /// Its IPv4 address.
    pub ip: [u8; 4],
    /// Its UDP port.
    pub port: u16,
}

/// What to do with a received frame.
pub enum Verdict<'a> {
    /// Send this many bytes of the reply buffer.
    Reply(usize),
    /// A datagram to `udp_port` for the caller (when not echoing).
    Udp(Peer, &'a [u8]),
    /// Nothing to send.
    None,
}

impl Stack {
    /// Handles one frame; a reply, if any, is built in `out` (at least 1514 bytes).
    pub fn handle<'a>(&mut self, f: &'a [u8], out: &mut [u8]) -> Verdict<'a> {
        if f.len() < ETH_HLEN || out.len() < 1514 {
            self.counters.malformed += 1;
            return Verdict::None;
        }
        match be16(f, 12) {
            ETH_ARP => self.arp(f, out).map_or(Verdict::None, Verdict::Reply),
            ETH_IPV4 => self.ipv4(f, out),
            _ => {
                self.counters.ignored += 1;
                Verdict::None
            }
        }
    }

    /// Builds in `out` an Ethernet/IPv4/UDP frame from our `udp_port` to `to` carrying
    /// `payload` (at most 1472 bytes; longer is cut). Returns the frame's length.
    pub fn udp_frame(&self, to: &Peer, payload: &[u8], out: &mut [u8]) -> usize {
        let n = payload.len().min(1472);
        let len = 8 + n;
        let u = &mut out[ETH_HLEN + 20..ETH_HLEN + 20 + len];
        u[0..2].copy_from_slice(&self.udp_port.to_be_bytes());
        u[2..4].copy_from_slice(&to.port.to_be_bytes());
        u[4..6].copy_from_slice(&(len as u16).to_be_bytes());
        u[6..8].fill(0);
        u[8..].copy_from_slice(&payload[..n]);
        let c = match checksum(u, pseudo_sum(&self.ip, &to.ip, len)) {
            0 => 0xffff,
            c => c,
        };
        u[6..8].copy_from_slice(&c.to_be_bytes());
        self.ip_frame(out, &to.mac, &to.ip, PROTO_UDP, len, 0)
    }

    /// Fills the Ethernet and IPv4 headers in front of `payload_len` bytes already at
    /// `out[34..]`; returns the frame's length (padded to the Ethernet minimum).
    fn ip_frame(
        &self,
        out: &mut [u8],
        mac: &[u8],
        ip: &[u8],
        proto: u8,
        payload_len: usize,
        id: u16,
    ) -> usize {
        self.eth(out, mac, ETH_IPV4);
        let h = &mut out[ETH_HLEN..ETH_HLEN + 20];
        h[0] = 0x45;
        h[1] = 0;
        h[2..4].copy_from_slice(&((20 + payload_len) as u16).to_be_bytes());
        h[4..6].copy_from_slice(&id.to_be_bytes());
        h[6..8].copy_from_slice(&0x4000u16.to_be_bytes()); // don't fragment
        h[8] = 64;
        h[9] = proto;
        h[10..12].fill(0);
        h[12..16].copy_from_slice(&self.ip);
        h[16..20].copy_from_slice(ip);
        let c = checksum(h, 0);
        h[10..12].copy_from_slice(&c.to_be_bytes());
        let n = ETH_HLEN + 20 + payload_len;
        if n < 60 {
            out[n..60].fill(0);
        }
        n.max(60)
    }

    fn ignore<T>(&mut self) -> Option<T> {
        self.counters.ignored += 1;
        None
    }

    fn malformed<T>(&mut self) -> Option<T> {
        self.counters.malformed += 1;
        None
    }

    /// An Ethernet header to `dst` from us in `out`.
    fn eth(&self, out: &mut [u8], dst: &[u8], ethertype: u16) {
        out[0..6].copy_from_slice(dst);
        out[6..12].copy_from_slice(&self.mac);
        out[12..14].copy_from_slice(&ethertype.to_be_bytes());
    }

    fn arp(&mut self, f: &[u8], out: &mut [u8]) -> Option<usize> {
        let a = &f[ETH_HLEN..];
        if a.len() < 28 || be16(a, 0) != 1 || be16(a, 2) != ETH_IPV4 || a[4] != 6 || a[5] != 4 {
            return self.malformed();
        }
        // Only requests for our address.
        if be16(a, 6) != 1 || a[24..28] != self.ip {
            return self.ignore();
        }
        self.eth(out, &a[8..14], ETH_ARP);
        let r = &mut out[ETH_HLEN..ETH_HLEN + 28];
        r[0..6].copy_from_slice(&[0, 1, 8, 0, 6, 4]);
        r[6..8].copy_from_slice(&2u16.to_be_bytes());
        r[8..14].copy_from_slice(&self.mac);
        r[14..18].copy_from_slice(&self.ip);
        r[18..24].copy_from_slice(&a[8..14]);
        r[24..28].copy_from_slice(&a[14..18]);
        self.counters.arp_replies += 1;
        // Padded to the Ethernet minimum (60 bytes without FCS).
        out[ETH_HLEN + 28..60].fill(0);
        Some(60)
    }

    fn ipv4<'a>(&mut self, f: &'a [u8], out: &mut [u8]) -> Verdict<'a> {
        let ip = &f[ETH_HLEN..];
        if ip.len() < 20 || ip[0] >> 4 != 4 {
            self.counters.malformed += 1;
            return Verdict::None;
        }
        let ihl = usize::from(ip[0] & 0xf) * 4;
        let total = usize::from(be16(ip, 2));
        if ihl < 20 || total < ihl || total > ip.len() || checksum(&ip[..ihl], 0) != 0 {
            self.counters.malformed += 1;
            return Verdict::None;
        }
        if ip[16..20] != self.ip {
            self.counters.ignored += 1;
            return Verdict::None;
        }
        // More-fragments or an offset: not reassembled here.
        if be16(ip, 6) & 0x3fff != 0 {
            self.counters.malformed += 1;
            return Verdict::None;
        }
        let payload = &ip[ihl..total];
        let mut src = [0u8; 4];
        src.copy_from_slice(&ip[12..16]);
        let reply = match ip[9] {
            PROTO_ICMP => self.icmp(payload, &mut out[ETH_HLEN + 20..]),
            PROTO_UDP => {
                let Some((sport, data)) = self.udp(&src, payload) else {
                    return Verdict::None;
                };
                let mut mac = [0u8; 6];
                mac.copy_from_slice(&f[6..12]);
                let peer = Peer {
                    mac,
                    ip: src,
                    port: sport,
                };
                if !self.echo {
                    return Verdict::Udp(peer, data);
                }
                self.counters.udp_echoes += 1;
                return Verdict::Reply(self.udp_frame(&peer, data, out));
            }
            _ => self.ignore(),
        };
        match reply {
            Some(n) => {
                Verdict::Reply(self.ip_frame(out, &f[6..12], &src, PROTO_ICMP, n, be16(ip, 4)))
            }
            None => Verdict::None,
        }
    }

    fn icmp(&mut self, m: &[u8], out: &mut [u8]) -> Option<usize> {
        if m.len() < 8 || checksum(m, 0) != 0 {
            return self.malformed();
        }
        if m[0] != 8 || m[1] != 0 {
            return self.ignore();
        }
        let r = &mut out[..m.len()];
        r.copy_from_slice(m);
        r[0] = 0; // echo reply
        r[2..4].fill(0);
        let c = checksum(r, 0);
        r[2..4].copy_from_slice(&c.to_be_bytes());
        self.counters.pings += 1;
        Some(m.len())
    }

    /// A checked datagram to `udp_port`: (source port, payload).
    fn udp<'a>(&mut self, src: &[u8], u: &'a [u8]) -> Option<(u16, &'a [u8])> {
        if u.len() < 8 {
            return self.malformed();
        }
        let len = usize::from(be16(u, 4));
        if len < 8 || len > u.len() {
            return self.malformed();
        }
        let u = &u[..len];
        if be16(u, 6) != 0 && checksum(u, pseudo_sum(src, &self.ip, len)) != 0 {
            return self.malformed();
        }
        if be16(u, 2) != self.udp_port {
            return self.ignore();
        }
        Some((be16(u, 0), &u[8..]))
    }
}

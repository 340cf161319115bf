//! The RoCEv2 invariant CRC (ICRC).
//!
//! The ICRC is the standard CRC-32 (Ethernet / zlib: initial value all ones, reflected
//! polynomial 0xEDB88320, final inversion) computed over, in order:
//!
//! 1. 8 bytes of `0xFF`, standing for the LRH that RoCEv2 does not carry;
//! 2. the IP header with the fields routers may change set to all ones:
//!    - IPv4: TOS (byte 1), TTL (byte 8) and header checksum (bytes 10–11);
//!    - IPv6: traffic class and flow label (the 28 bits after the version nibble) and hop
//!      limit (byte 7);
//! 3. the UDP header with its checksum (bytes 6–7) set to all ones;
//! 4. the BTH with byte 4 (FECN, BECN, reserved) set to all ones;
//! 5. everything after the BTH up to the ICRC: extension headers, payload and padding.
//!
//! The 32-bit result is stored **little-endian** in the last 4 bytes of the UDP payload.
//! This is what Linux's `rdma_rxe` computes (`rxe_icrc.c` starts from the CRC state after the
//! eight `0xFF` bytes, `0xdebb20e3`), and it is verified against every RoCE frame of the real
//! captures in this crate's `testdata/`.
//!
//! [`compute`] and [`verify`] take the real IP and UDP headers (from a raw socket, a capture, or
//! the GRH area of a receive buffer). [`icrc_for_udp_socket`] is for a software port that
//! sends over an ordinary UDP socket and never sees the headers the kernel builds; see its
//! documentation for the convention it uses.

use core::net::IpAddr;

use crate::crc32::Crc32;
use crate::{Bth, WireError};

/// Size of the ICRC trailer.
pub const ICRC_LEN: usize = 4;

/// Size of a UDP header.
pub const UDP_HEADER_LEN: usize = 8;

/// Size of an IPv4 header without options.
pub const IPV4_HEADER_LEN: usize = 20;

/// Size of an IPv6 header.
pub const IPV6_HEADER_LEN: usize = 40;

const IPV4_MAX_HEADER_LEN: usize = 60;

/// Computes the ICRC of a RoCEv2 packet.
///
/// - `ip_header`: the whole IPv4 header (its length must equal IHL × 4) or the 40-byte IPv6
///   header;
/// - `udp_header`: the 8-byte UDP header;
/// - `ib_packet`: the UDP payload from the BTH up to, **not** including, the ICRC.
pub fn compute(ip_header: &[u8], udp_header: &[u8], ib_packet: &[u8]) -> Result<u32, WireError> {
    // The masked headers (IP, UDP, BTH) are gathered into one buffer and go through the CRC
    // in one piece: per 4 KiB packet, CRC'ing them piecewise byte by byte cost as much as
    // the payload's carry-less-multiplication pass.
    let mut hdr = [0u8; IPV4_MAX_HEADER_LEN + UDP_HEADER_LEN + Bth::LEN];
    let version = ip_header.first().map_or(0, |b| b >> 4);
    let ip_len = match version {
        4 => {
            let ihl = ip_header.first().map_or(0, |b| usize::from(b & 0x0F)) * 4;
            let bad = WireError::BadIpHeaderLength {
                version: 4,
                len: ip_header.len(),
                expected: ihl,
            };
            if ihl < IPV4_HEADER_LEN || ihl != ip_header.len() {
                return Err(bad);
            }
            let h = hdr.get_mut(..ihl).ok_or(bad)?;
            h.copy_from_slice(ip_header);
            mask_ipv4(h);
            ihl
        }
        6 => {
            let h: &[u8; IPV6_HEADER_LEN] =
                ip_header
                    .try_into()
                    .map_err(|_| WireError::BadIpHeaderLength {
                        version: 6,
                        len: ip_header.len(),
                        expected: IPV6_HEADER_LEN,
                    })?;
            let mut h = *h;
            mask_ipv6(&mut h);
            hdr[..IPV6_HEADER_LEN].copy_from_slice(&h);
            IPV6_HEADER_LEN
        }
        _ => return Err(WireError::BadIpVersion { version }),
    };

    let udp: &[u8; UDP_HEADER_LEN] = udp_header.try_into().map_err(|_| {
        if udp_header.len() < UDP_HEADER_LEN {
            WireError::TooShort {
                what: "UDP header",
                len: udp_header.len(),
                need: UDP_HEADER_LEN,
            }
        } else {
            WireError::TooLong {
                what: "UDP header",
                len: udp_header.len(),
                max: UDP_HEADER_LEN,
            }
        }
    })?;
    let mut udp = *udp;
    mask_udp(&mut udp);
    hdr[ip_len..ip_len + UDP_HEADER_LEN].copy_from_slice(&udp);

    let (bth, rest) = ib_packet
        .split_first_chunk::<{ Bth::LEN }>()
        .ok_or(WireError::TooShort {
            what: "BTH",
            len: ib_packet.len(),
            need: Bth::LEN,
        })?;
    let b = ip_len + UDP_HEADER_LEN;
    hdr[b..b + Bth::LEN].copy_from_slice(bth);
    hdr[b + 4] = 0xFF;

    // The CRC state after the 8 bytes of 0xFF standing for the LRH.
    let mut crc = Crc32::after_lrh();
    crc.update(&hdr[..b + Bth::LEN]);
    crc.update(rest);
    Ok(crc.finish())
}

/// Checks the ICRC at the end of `ib_packet_with_icrc` (the whole UDP payload, BTH to ICRC)
/// against the real IP and UDP headers.
pub fn verify(
    ip_header: &[u8],
    udp_header: &[u8],
    ib_packet_with_icrc: &[u8],
) -> Result<(), WireError> {
    let (ib, stored) = split_icrc(ib_packet_with_icrc)?;
    check(stored, compute(ip_header, udp_header, ib)?)
}

/// The ICRC a RoCEv2 packet sent from an ordinary UDP socket carries, computed over
/// canonical headers because the sender cannot see the ones the kernel will build.
///
/// Ferry's software RoCEv2 port sends and receives the UDP payload (BTH … ICRC) through a UDP
/// socket. The CRC is computed as if the packet had these headers (the fields the ICRC masks
/// are shown as "masked"; their real values do not matter):
///
/// - **IPv4** (both addresses IPv4): version 4, IHL 5, TOS masked, total length
///   = 20 + 8 + `ib_packet.len()` + 4, identification **0**, flags **DF** with fragment offset
///   0 (`0x4000`), TTL masked, protocol 17 (UDP), checksum masked, source, destination.
///   Identification 0 with DF is what Linux itself writes for DF datagrams from an
///   *unconnected* UDP socket, so with `IP_MTU_DISCOVER = IP_PMTUDISC_DO` on an unconnected
///   socket the ICRC also matches the real header and hardware or `rdma_rxe` peers accept it.
///   With a connected socket (per-socket IP IDs) or without DF, only peers that use this same
///   convention (Ferry's own port) agree.
/// - **IPv6** (both addresses IPv6): version 6, traffic class and flow label masked, payload
///   length = 8 + `ib_packet.len()` + 4, next header 17, hop limit masked, source, destination.
///   No field depends on the sending stack.
/// - **UDP**: source port, destination port, length = 8 + `ib_packet.len()` + 4, checksum
///   masked.
///
/// `ib_packet` is the UDP payload from the BTH up to, not including, the ICRC. A receiving
/// software port checks with [`verify_for_udp_socket`] using the datagram's source address and
/// port and its own address and port. An IPv4-mapped GID's address must be passed as
/// [`IpAddr::V4`] (use [`crate::Gid::to_ip`]).
pub fn icrc_for_udp_socket(
    src: IpAddr,
    dst: IpAddr,
    src_port: u16,
    dst_port: u16,
    ib_packet: &[u8],
) -> Result<u32, WireError> {
    let udp_len = udp_len(ib_packet.len(), matches!(src, IpAddr::V4(_)))?;
    let mut udp = [0u8; UDP_HEADER_LEN];
    udp[0..2].copy_from_slice(&src_port.to_be_bytes());
    udp[2..4].copy_from_slice(&dst_port.to_be_bytes());
    udp[4..6].copy_from_slice(&udp_len.to_be_bytes());
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            let total = udp_len + IPV4_HEADER_LEN as u16;
            let mut ip = [0u8; IPV4_HEADER_LEN];
            ip[0] = 0x45;
            ip[2..4].copy_from_slice(&total.to_be_bytes());
            ip[6] = 0x40; // DF, fragment offset 0; identification (4..6) stays 0
            ip[9] = 17;
            ip[12..16].copy_from_slice(&s.octets());
            ip[16..20].copy_from_slice(&d.octets());
            compute(&ip, &udp, ib_packet)
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            let mut ip = [0u8; IPV6_HEADER_LEN];
            ip[0] = 0x60;
            ip[4..6].copy_from_slice(&udp_len.to_be_bytes());
            ip[6] = 17;
            ip[8..24].copy_from_slice(&s.octets());
            ip[24..40].copy_from_slice(&d.octets());
            compute(&ip, &udp, ib_packet)
        }
        _ => Err(WireError::MixedAddressFamilies),
    }
}

/// Checks the ICRC of a packet received on a UDP socket, with the convention of
/// [`icrc_for_udp_socket`]. `src`/`src_port` are the sender's, `dst`/`dst_port` the receiver's.
pub fn verify_for_udp_socket(
    src: IpAddr,
    dst: IpAddr,
    src_port: u16,
    dst_port: u16,
    ib_packet_with_icrc: &[u8],
) -> Result<(), WireError> {
    let (ib, stored) = split_icrc(ib_packet_with_icrc)?;
    check(
        stored,
        icrc_for_udp_socket(src, dst, src_port, dst_port, ib)?,
    )
}

/// Checks the ICRC of a packet received on a UDP socket whose sender may have put any IPv4
/// identification in its header, and returns the identification that makes it verify.
///
/// An ordinary UDP socket does not report the IP header, but the ICRC covers the IPv4
/// identification (Linux `rxe_icrc.c` masks only TOS, TTL and the header checksum) and Linux
/// `rdma_rxe` sends every packet with a fresh identification (DF set). The CRC is affine over
/// GF(2) in the 16 identification bits, so the identification is *solved for* instead of
/// guessed: with `D` = stored ICRC ⊕ ICRC computed with identification 0 (the convention of
/// [`icrc_for_udp_socket`], tried first), the packet verifies iff some identification `id`
/// has `L(id) = D`, where `L` maps each identification bit to its effect on the CRC (its
/// contribution two bytes in, carried through the rest of the packet). `L` is injective (16
/// bits into 32), so the answer is unique; a packet for which no identification works is
/// refused. The other header fields are the convention's (DF, no options, lengths from the
/// datagram): a packet from a stack that sent something else does not verify.
///
/// The price is that a corrupted packet with an arbitrary identification passes with
/// probability 2⁻¹⁶ instead of 2⁻³² — the UDP checksum and the IP header checksum, which the
/// receiving kernel checked, stand in front of it. IPv6 has no identification; there this is
/// [`verify_for_udp_socket`].
pub fn verify_for_udp_socket_any_ip_id(
    src: IpAddr,
    dst: IpAddr,
    src_port: u16,
    dst_port: u16,
    ib_packet_with_icrc: &[u8],
) -> Result<u16, WireError> {
    verify_for_udp_socket_ip_id_hint(
        src,
        dst,
        src_port,
        dst_port,
        ib_packet_with_icrc,
        0,
        &mut None,
    )
}

/// [`verify_for_udp_socket_any_ip_id`] trying the identification `hint` right after 0,
/// before solving for it: the `k`-th datagram of a run a sender passed to the kernel in one
/// UDP GSO send (`UDP_SEGMENT`) carries identification `k` (see [`IpIdEffect`]), and a
/// receiver that gets the run back coalesced (`UDP_GRO`) knows `k`. The result is the same
/// as without the hint; only the solving is skipped. `effect` caches the [`IpIdEffect`] of
/// the last length checked (a run's packets share one).
pub fn verify_for_udp_socket_ip_id_hint(
    src: IpAddr,
    dst: IpAddr,
    src_port: u16,
    dst_port: u16,
    ib_packet_with_icrc: &[u8],
    hint: u16,
    effect: &mut Option<IpIdEffect>,
) -> Result<u16, WireError> {
    let (ib, stored) = split_icrc(ib_packet_with_icrc)?;
    let computed = icrc_for_udp_socket(src, dst, src_port, dst_port, ib)?;
    if stored == computed {
        return Ok(0);
    }
    if !matches!(src, IpAddr::V4(_)) {
        return Err(WireError::IcrcMismatch { stored, computed });
    }
    if hint != 0 {
        let e = match effect {
            Some(e) if e.ib_len == ib.len() => *e,
            _ => *effect.insert(IpIdEffect::new(ib.len())),
        };
        if stored == computed ^ e.of(hint) {
            return Ok(hint);
        }
    }
    // Bytes of the CRC stream (8 × 0xFF, IPv4, UDP, IB) after the identification, which
    // occupies stream bytes 12 and 13.
    let after = 8 + IPV4_HEADER_LEN + UDP_HEADER_LEN + ib.len() - 14;
    solve_ip_id(stored ^ computed, after).ok_or(WireError::IcrcMismatch { stored, computed })
}

/// What the IPv4 identification does to the ICRC of an IB packet of a given length (BTH up
/// to, not including, the ICRC), over the headers of [`icrc_for_udp_socket`]: the ICRC with
/// identification `id` is the one with identification 0 XOR [`IpIdEffect::of`]`(id)` (the
/// CRC is affine in those 16 bits).
///
/// A sender that hands the kernel a run of equal-size datagrams in one UDP GSO send
/// (`UDP_SEGMENT`) from an unconnected socket with DF gets them numbered 0, 1, 2, … (Linux
/// gives a DF datagram of an unconnected socket identification 0, and its GSO segmentation,
/// `inet_gso_segment`, counts up from there), so it stores ICRC(0) ^ `of(k)` in the `k`-th.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpIdEffect {
    shift: u32,
    ib_len: usize,
}

impl IpIdEffect {
    /// The effect for IB packets of `ib_len` bytes.
    pub fn new(ib_len: usize) -> IpIdEffect {
        // Stream bytes after the identification (stream bytes 12 and 13 of 8 × 0xFF, IPv4,
        // UDP, IB).
        let after = 8 + IPV4_HEADER_LEN + UDP_HEADER_LEN + ib_len - 14;
        IpIdEffect {
            shift: x_pow_8n(after),
            ib_len,
        }
    }

    /// The IB packet length it is for.
    pub fn ib_len(&self) -> usize {
        self.ib_len
    }

    /// What identification `id` XORs into the ICRC.
    pub fn of(&self, id: u16) -> u32 {
        mul_mod_p(self.shift, raw_crc_of_id(id))
    }
}

/// Reflected CRC-32 polynomial.
const POLY_REFLECTED: u32 = 0xEDB8_8320;

/// `a · b mod P` for reflected CRC-32 polynomials (bit 31 is x⁰).
fn mul_mod_p(a: u32, mut b: u32) -> u32 {
    let mut m = 1u32 << 31;
    let mut p = 0;
    while m != 0 {
        if a & m != 0 {
            p ^= b;
        }
        m >>= 1;
        b = if b & 1 != 0 {
            (b >> 1) ^ POLY_REFLECTED
        } else {
            b >> 1
        };
    }
    p
}

/// `x^(8·n) mod P`: the operator that carries a raw CRC register through `n` zero bytes.
fn x_pow_8n(mut n: usize) -> u32 {
    let mut sq = 1u32 << 30; // x¹
    for _ in 0..3 {
        sq = mul_mod_p(sq, sq); // x², x⁴, x⁸
    }
    let mut p = 1u32 << 31; // x⁰
    while n != 0 {
        if n & 1 != 0 {
            p = mul_mod_p(sq, p);
        }
        sq = mul_mod_p(sq, sq);
        n >>= 1;
    }
    p
}

/// The raw register (zero initial value, no inversion) after the two identification bytes.
fn raw_crc_of_id(id: u16) -> u32 {
    let mut c = 0u32;
    for b in id.to_be_bytes() {
        c ^= u32::from(b);
        for _ in 0..8 {
            c = if c & 1 != 0 {
                (c >> 1) ^ POLY_REFLECTED
            } else {
                c >> 1
            };
        }
    }
    c
}

/// The identification `id` whose CRC contribution, carried through `after` more bytes, is
/// `d` (Gaussian elimination over GF(2); `None` when there is none).
fn solve_ip_id(d: u32, after: usize) -> Option<u16> {
    let shift = x_pow_8n(after);
    // rows: (image of the combination, the combination of identification bits)
    let mut rows: [(u32, u16); 16] = [(0, 0); 16];
    for (i, r) in rows.iter_mut().enumerate() {
        let bit = 1u16 << i;
        *r = (mul_mod_p(shift, raw_crc_of_id(bit)), bit);
    }
    // Reduce to echelon form keyed by each row's highest set bit, then eliminate `d`.
    let mut basis: [(u32, u16); 32] = [(0, 0); 32];
    for (mut v, mut c) in rows {
        while v != 0 {
            let hb = 31 - v.leading_zeros() as usize;
            if basis[hb].0 == 0 {
                basis[hb] = (v, c);
                break;
            }
            v ^= basis[hb].0;
            c ^= basis[hb].1;
        }
    }
    let (mut v, mut id) = (d, 0u16);
    while v != 0 {
        let hb = 31 - v.leading_zeros() as usize;
        if basis[hb].0 == 0 {
            return None;
        }
        v ^= basis[hb].0;
        id ^= basis[hb].1;
    }
    Some(id)
}

/// Splits a UDP payload into the IB bytes before the ICRC and the ICRC value (read
/// little-endian). The payload must hold at least a BTH and the ICRC.
pub fn split_icrc(ib_packet_with_icrc: &[u8]) -> Result<(&[u8], u32), WireError> {
    let need = Bth::LEN + ICRC_LEN;
    if ib_packet_with_icrc.len() < need {
        return Err(WireError::TooShort {
            what: "RoCE packet",
            len: ib_packet_with_icrc.len(),
            need,
        });
    }
    let (ib, icrc) =
        ib_packet_with_icrc
            .split_last_chunk::<ICRC_LEN>()
            .ok_or(WireError::TooShort {
                what: "RoCE packet",
                len: ib_packet_with_icrc.len(),
                need,
            })?;
    Ok((ib, u32::from_le_bytes(*icrc)))
}

fn check(stored: u32, computed: u32) -> Result<(), WireError> {
    if stored == computed {
        Ok(())
    } else {
        Err(WireError::IcrcMismatch { stored, computed })
    }
}

/// UDP length field for an IB packet of `ib_len` bytes (ICRC added), checked against what the
/// IP length field can express.
fn udp_len(ib_len: usize, v4: bool) -> Result<u16, WireError> {
    let ip_overhead = if v4 { IPV4_HEADER_LEN } else { 0 };
    let max = usize::from(u16::MAX) - ip_overhead - UDP_HEADER_LEN - ICRC_LEN;
    if ib_len > max {
        return Err(WireError::TooLong {
            what: "RoCE packet",
            len: ib_len,
            max,
        });
    }
    u16::try_from(ib_len + UDP_HEADER_LEN + ICRC_LEN).map_err(|_| WireError::TooLong {
        what: "RoCE packet",
        len: ib_len,
        max,
    })
}

fn mask_ipv4(h: &mut [u8]) {
    for i in [1usize, 8, 10, 11] {
        if let Some(b) = h.get_mut(i) {
            *b = 0xFF;
        }
    }
}

fn mask_ipv6(h: &mut [u8; IPV6_HEADER_LEN]) {
    h[0] |= 0x0F;
    h[1] = 0xFF;
    h[2] = 0xFF;
    h[3] = 0xFF;
    h[7] = 0xFF;
}

fn mask_udp(h: &mut [u8; UDP_HEADER_LEN]) {
    h[6] = 0xFF;
    h[7] = 0xFF;
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::net::{Ipv4Addr, Ipv6Addr};
    use std::vec::Vec;

    /// Bit-at-a-time CRC-32, written from the definition, independent of the table.
    fn crc32_bitwise(data: &[u8]) -> u32 {
        let mut crc = 0xFFFF_FFFFu32;
        for &byte in data {
            crc ^= u32::from(byte);
            for _ in 0..8 {
                let lsb = crc & 1;
                crc >>= 1;
                if lsb == 1 {
                    crc ^= 0xEDB8_8320;
                }
            }
        }
        !crc
    }

    fn sample_ib() -> Vec<u8> {
        // UD SEND_ONLY to QP1 with FECN/BECN set (byte 4), DETH, 6 payload bytes, 2 pad bytes.
        let mut ib = std::vec![0x64, 0x20, 0xff, 0xff, 0xc0, 0, 0, 1, 0x80, 0, 0, 7];
        ib.extend_from_slice(&[0x80, 0x01, 0, 0, 0, 0, 0, 1]);
        ib.extend_from_slice(b"abcdef\0\0");
        ib
    }

    #[test]
    fn ipv4_icrc_matches_the_description() {
        let ip = [
            0x45, 0x02, 0x00, 0x34, 0x12, 0x34, 0x40, 0x00, 0x40, 0x11, 0xab, 0xcd, 10, 0, 0, 1,
            10, 0, 0, 2,
        ];
        let udp = [0xc0, 0x01, 0x12, 0xb7, 0x00, 0x20, 0x55, 0x66];
        let ib = sample_ib();
        let mut masked = Vec::new();
        masked.extend_from_slice(&[0xff; 8]);
        masked.extend_from_slice(&[
            0x45, 0xff, 0x00, 0x34, 0x12, 0x34, 0x40, 0x00, 0xff, 0x11, 0xff, 0xff, 10, 0, 0, 1,
            10, 0, 0, 2,
        ]);
        masked.extend_from_slice(&[0xc0, 0x01, 0x12, 0xb7, 0x00, 0x20, 0xff, 0xff]);
        let mut ibm = ib.clone();
        ibm[4] = 0xff;
        masked.extend_from_slice(&ibm);
        let expected = crc32_bitwise(&masked);
        assert_eq!(compute(&ip, &udp, &ib), Ok(expected));

        // The masked fields do not influence the result; an unmasked one does.
        let mut ip2 = ip;
        ip2[1] = 0x00;
        ip2[8] = 1;
        ip2[10] = 0;
        let mut udp2 = udp;
        udp2[6] = 0;
        let mut ib2 = ib.clone();
        ib2[4] = 0;
        assert_eq!(compute(&ip2, &udp2, &ib2), Ok(expected));
        ip2[5] = 0x35;
        assert_ne!(compute(&ip2, &udp2, &ib2), Ok(expected));

        let mut pkt = ib.clone();
        pkt.extend_from_slice(&expected.to_le_bytes());
        assert_eq!(verify(&ip, &udp, &pkt), Ok(()));
        let last = pkt.len() - 1;
        pkt[last] ^= 1;
        assert!(matches!(
            verify(&ip, &udp, &pkt),
            Err(WireError::IcrcMismatch { .. })
        ));
    }

    #[test]
    fn ipv6_icrc_matches_the_description() {
        let mut ip = [0u8; 40];
        ip[0] = 0x6a; // version 6, traffic class high nibble 0xa
        ip[1] = 0xb1; // traffic class low nibble, flow label
        ip[2] = 0x23;
        ip[3] = 0x45;
        ip[4..6].copy_from_slice(&32u16.to_be_bytes());
        ip[6] = 17;
        ip[7] = 64;
        ip[8] = 0xfe;
        ip[9] = 0x80;
        ip[39] = 9;
        let udp = [0xc0, 0x01, 0x12, 0xb7, 0x00, 0x20, 0x55, 0x66];
        let ib = sample_ib();
        let mut masked = std::vec![0xffu8; 8];
        let mut ipm = ip;
        ipm[0] = 0x6f;
        ipm[1] = 0xff;
        ipm[2] = 0xff;
        ipm[3] = 0xff;
        ipm[7] = 0xff;
        masked.extend_from_slice(&ipm);
        masked.extend_from_slice(&[0xc0, 0x01, 0x12, 0xb7, 0x00, 0x20, 0xff, 0xff]);
        let mut ibm = ib.clone();
        ibm[4] = 0xff;
        masked.extend_from_slice(&ibm);
        assert_eq!(compute(&ip, &udp, &ib), Ok(crc32_bitwise(&masked)));
    }

    #[test]
    fn udp_socket_convention_ipv4() {
        let ib = sample_ib();
        let src = Ipv4Addr::new(10, 11, 0, 2);
        let dst = Ipv4Addr::new(10, 11, 0, 1);
        let total = (20 + 8 + ib.len() + 4) as u16;
        let udp_len = (8 + ib.len() + 4) as u16;
        let mut ip = std::vec![0x45, 0xff];
        ip.extend_from_slice(&total.to_be_bytes());
        ip.extend_from_slice(&[0, 0, 0x40, 0, 0xff, 17, 0xff, 0xff]);
        ip.extend_from_slice(&src.octets());
        ip.extend_from_slice(&dst.octets());
        let mut udp = std::vec![0xd8, 0x72, 0x12, 0xb7];
        udp.extend_from_slice(&udp_len.to_be_bytes());
        udp.extend_from_slice(&[0xff, 0xff]);
        let mut all = std::vec![0xffu8; 8];
        all.extend_from_slice(&ip);
        all.extend_from_slice(&udp);
        let mut ibm = ib.clone();
        ibm[4] = 0xff;
        all.extend_from_slice(&ibm);
        let expected = crc32_bitwise(&all);
        let got = icrc_for_udp_socket(src.into(), dst.into(), 0xd872, 4791, &ib);
        assert_eq!(got, Ok(expected));
        let mut pkt = ib.clone();
        pkt.extend_from_slice(&expected.to_le_bytes());
        assert_eq!(
            verify_for_udp_socket(src.into(), dst.into(), 0xd872, 4791, &pkt),
            Ok(())
        );
        assert!(verify_for_udp_socket(dst.into(), src.into(), 0xd872, 4791, &pkt).is_err());
    }

    #[test]
    fn udp_socket_convention_ipv6_and_errors() {
        let ib = sample_ib();
        let src: Ipv6Addr = "fd00::2".parse().unwrap();
        let dst: Ipv6Addr = "fd00::1".parse().unwrap();
        let a = icrc_for_udp_socket(src.into(), dst.into(), 1, 4791, &ib).unwrap();
        let mut ip = [0u8; 40];
        ip[0] = 0x60;
        ip[4..6].copy_from_slice(&((8 + ib.len() + 4) as u16).to_be_bytes());
        ip[6] = 17;
        ip[7] = 5; // hop limit is masked
        ip[8..24].copy_from_slice(&src.octets());
        ip[24..40].copy_from_slice(&dst.octets());
        let mut udp = [0u8; 8];
        udp[0..2].copy_from_slice(&1u16.to_be_bytes());
        udp[2..4].copy_from_slice(&4791u16.to_be_bytes());
        udp[4..6].copy_from_slice(&((8 + ib.len() + 4) as u16).to_be_bytes());
        assert_eq!(compute(&ip, &udp, &ib), Ok(a));
        assert_eq!(
            icrc_for_udp_socket(src.into(), Ipv4Addr::LOCALHOST.into(), 1, 4791, &ib),
            Err(WireError::MixedAddressFamilies)
        );
        let huge = std::vec![0u8; 70_000];
        assert!(matches!(
            icrc_for_udp_socket(
                Ipv4Addr::LOCALHOST.into(),
                Ipv4Addr::LOCALHOST.into(),
                1,
                2,
                &huge
            ),
            Err(WireError::TooLong { .. })
        ));
    }

    #[test]
    fn bad_headers_are_errors() {
        let ib = sample_ib();
        let udp = [0u8; 8];
        let mut ip = [0u8; 20];
        ip[0] = 0x45;
        assert!(compute(&ip, &udp, &ib).is_ok());
        assert_eq!(
            compute(&ip[..19], &udp, &ib),
            Err(WireError::BadIpHeaderLength {
                version: 4,
                len: 19,
                expected: 20
            })
        );
        ip[0] = 0x44;
        assert!(compute(&ip, &udp, &ib).is_err());
        ip[0] = 0x4f;
        assert!(compute(&ip, &udp, &ib).is_err());
        let opts = [0x46u8; 24];
        let mut opts = opts;
        opts[0] = 0x46;
        assert!(compute(&opts, &udp, &ib).is_ok());
        ip[0] = 0x55;
        assert_eq!(
            compute(&ip, &udp, &ib),
            Err(WireError::BadIpVersion { version: 5 })
        );
        assert_eq!(
            compute(&[], &udp, &ib),
            Err(WireError::BadIpVersion { version: 0 })
        );
        ip[0] = 0x60;
        assert!(compute(&ip, &udp, &ib).is_err());
        ip[0] = 0x45;
        assert!(compute(&ip, &udp[..7], &ib).is_err());
        assert!(compute(&ip, &[0u8; 9], &ib).is_err());
        assert!(compute(&ip, &udp, &ib[..11]).is_err());
        for n in 0..16 {
            assert!(verify(&ip, &udp, &ib[..n]).is_err());
        }
    }

    #[test]
    fn ip_id_effect_is_what_the_identification_does() {
        let ib = sample_ib();
        let (src, dst) = (Ipv4Addr::new(127, 0, 0, 2), Ipv4Addr::new(127, 0, 0, 1));
        let zero = icrc_for_udp_socket(src.into(), dst.into(), 4791, 4791, &ib).unwrap();
        let effect = IpIdEffect::new(ib.len());
        assert_eq!(effect.of(0), 0);
        for id in [1u16, 2, 7, 15, 0x1234, 0xffff] {
            // The real header the kernel writes for the id-th segment of a GSO run.
            let total = (20 + 8 + ib.len() + 4) as u16;
            let mut ip = [0u8; 20];
            ip[0] = 0x45;
            ip[2..4].copy_from_slice(&total.to_be_bytes());
            ip[4..6].copy_from_slice(&id.to_be_bytes());
            ip[6] = 0x40;
            ip[8] = 64;
            ip[9] = 17;
            ip[12..16].copy_from_slice(&src.octets());
            ip[16..20].copy_from_slice(&dst.octets());
            let mut udp = [0u8; 8];
            udp[0..2].copy_from_slice(&4791u16.to_be_bytes());
            udp[2..4].copy_from_slice(&4791u16.to_be_bytes());
            udp[4..6].copy_from_slice(&(total - 20).to_be_bytes());
            let real = compute(&ip, &udp, &ib).unwrap();
            assert_eq!(zero ^ effect.of(id), real, "identification {id}");
            let mut pkt = ib.clone();
            pkt.extend_from_slice(&real.to_le_bytes());
            let mut cache = None;
            let mut v = |hint| {
                verify_for_udp_socket_ip_id_hint(
                    src.into(),
                    dst.into(),
                    4791,
                    4791,
                    &pkt,
                    hint,
                    &mut cache,
                )
            };
            assert_eq!(v(id), Ok(id), "hinted");
            assert_eq!(v(id.wrapping_add(1)), Ok(id), "a wrong hint still solves");
        }
    }
}

//! A RoCEv2 packet: the UDP payload from the BTH to the ICRC.

use core::net::IpAddr;

use crate::bytes::{out_slice, take};
use crate::icrc::{self, ICRC_LEN};
use crate::mad::MAD_SIZE;
use crate::opcode::{self, Layout};
use crate::{Aeth, AtomicAckEth, AtomicEth, Bth, Deth, Ieth, ImmDt, Reth, WireError};

/// The UDP destination port of RoCEv2.
pub const ROCEV2_UDP_PORT: u16 = 4791;

const ZERO_PAD: [u8; 3] = [0; 3];

/// The UDP source port Linux derives from a 20-bit GRH flow label for RoCEv2
/// (`rdma_flow_label_to_udp_sport`): the low 14 bits xor the high 6, in the range
/// 0xC000–0xFFFF. Both ends of an RC connection send from this port, so ECMP keeps a flow on
/// one path.
pub const fn udp_src_port_for_flow_label(flow_label: u32) -> u16 {
    let low = flow_label & 0x3FFF;
    let high = (flow_label & 0xF_C000) >> 14;
    ((low ^ high) as u16) | 0xC000
}

/// The BTH pad count for a payload of `payload_len` bytes: 0–3 bytes that make the payload a
/// multiple of 4.
pub const fn pad_count_for(payload_len: usize) -> u8 {
    ((4 - payload_len % 4) % 4) as u8
}

/// Zero padding for a payload of `payload_len` bytes (a slice of [`pad_count_for`] bytes).
pub fn padding_for(payload_len: usize) -> &'static [u8] {
    ZERO_PAD
        .get(..usize::from(pad_count_for(payload_len)))
        .unwrap_or(&[])
}

/// A parsed RoCEv2 packet, borrowing its payload from the input.
///
/// Wire order: BTH, then the extension headers the opcode calls for (DETH, RETH, AtomicETH,
/// AETH, AtomicAckETH, ImmDt, IETH; see [`opcode::layout`]), the payload, `PadCnt` bytes of
/// padding, and the 4-byte ICRC (little-endian).
///
/// Parsing checks the structure (lengths, supported opcode, pad count) but not the ICRC, which
/// needs the IP and UDP headers: check it with [`crate::icrc::verify`] or
/// [`crate::icrc::verify_for_udp_socket`]. Encoding recomputes the ICRC the same two ways
/// ([`RocePacket::encode`], [`RocePacket::encode_for_udp_socket`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RocePacket<'a> {
    /// Base transport header.
    pub bth: Bth,
    /// Datagram ETH (UD opcodes).
    pub deth: Option<Deth>,
    /// RDMA ETH.
    pub reth: Option<Reth>,
    /// Atomic ETH.
    pub atomic_eth: Option<AtomicEth>,
    /// ACK ETH.
    pub aeth: Option<Aeth>,
    /// Atomic acknowledge ETH.
    pub atomic_ack_eth: Option<AtomicAckEth>,
    /// Immediate data (`*_WITH_IMMEDIATE` opcodes).
    pub imm_dt: Option<ImmDt>,
    /// Invalidate ETH (`*_WITH_INVALIDATE` opcodes).
    pub ieth: Option<Ieth>,
    /// Payload, without padding.
    pub payload: &'a [u8],
    /// Padding between payload and ICRC; its length equals `bth.pad_count`.
    pub padding: &'a [u8],
    /// ICRC as carried by the parsed packet (read little-endian). Encoding recomputes it.
    pub icrc: u32,
}

impl<'a> RocePacket<'a> {
    /// Parses a UDP payload (BTH … ICRC).
    pub fn parse(udp_payload: &'a [u8]) -> Result<RocePacket<'a>, WireError> {
        let (ib, icrc) = icrc::split_icrc(udp_payload)?;
        let (bth_bytes, mut rest) = take(ib, Bth::LEN, "BTH")?;
        let bth = Bth::parse(bth_bytes)?;
        let layout = opcode::layout(bth.opcode)
            .ok_or(WireError::UnsupportedOpcode { opcode: bth.opcode })?;
        let mut pkt = RocePacket {
            bth,
            deth: None,
            reth: None,
            atomic_eth: None,
            aeth: None,
            atomic_ack_eth: None,
            imm_dt: None,
            ieth: None,
            payload: &[],
            padding: &[],
            icrc,
        };
        if layout.deth {
            let (h, r) = take(rest, Deth::LEN, "DETH")?;
            pkt.deth = Some(Deth::parse(h)?);
            rest = r;
        }
        if layout.reth {
            let (h, r) = take(rest, Reth::LEN, "RETH")?;
            pkt.reth = Some(Reth::parse(h)?);
            rest = r;
        }
        if layout.atomic_eth {
            let (h, r) = take(rest, AtomicEth::LEN, "AtomicETH")?;
            pkt.atomic_eth = Some(AtomicEth::parse(h)?);
            rest = r;
        }
        if layout.aeth {
            let (h, r) = take(rest, Aeth::LEN, "AETH")?;
            pkt.aeth = Some(Aeth::parse(h)?);
            rest = r;
        }
        if layout.atomic_ack_eth {
            let (h, r) = take(rest, AtomicAckEth::LEN, "AtomicAckETH")?;
            pkt.atomic_ack_eth = Some(AtomicAckEth::parse(h)?);
            rest = r;
        }
        if layout.imm_dt {
            let (h, r) = take(rest, ImmDt::LEN, "ImmDt")?;
            pkt.imm_dt = Some(ImmDt::parse(h)?);
            rest = r;
        }
        if layout.ieth {
            let (h, r) = take(rest, Ieth::LEN, "IETH")?;
            pkt.ieth = Some(Ieth::parse(h)?);
            rest = r;
        }
        let pad = usize::from(bth.pad_count);
        let data_len = rest.len().checked_sub(pad).ok_or(WireError::BadPadCount {
            pad_count: bth.pad_count,
            payload_len: rest.len(),
        })?;
        let (payload, padding) = take(rest, data_len, "payload")?;
        pkt.payload = payload;
        pkt.padding = padding;
        Ok(pkt)
    }

    /// A QP1 packet carrying one MAD: UD SEND_ONLY to DestQP 1 with the GSI DETH (Q_Key
    /// 0x80010000, SrcQP 1), AckReq set (as Linux sends it), no padding. The ICRC field is 0
    /// until the packet is encoded.
    pub fn ud_mad(mad: &'a [u8; MAD_SIZE], p_key: u16, psn: u32) -> RocePacket<'a> {
        RocePacket {
            bth: Bth {
                opcode: opcode::UD_SEND_ONLY,
                p_key,
                dest_qp: crate::GSI_QP,
                ack_req: true,
                psn,
                ..Bth::default()
            },
            deth: Some(Deth::GSI),
            reth: None,
            atomic_eth: None,
            aeth: None,
            atomic_ack_eth: None,
            imm_dt: None,
            ieth: None,
            payload: mad,
            padding: &[],
            icrc: 0,
        }
    }

    /// The header layout of this packet's opcode.
    pub fn layout(&self) -> Result<Layout, WireError> {
        opcode::layout(self.bth.opcode).ok_or(WireError::UnsupportedOpcode {
            opcode: self.bth.opcode,
        })
    }

    /// The payload as a MAD, when it is exactly 256 bytes long.
    pub fn mad(&self) -> Option<&'a [u8; MAD_SIZE]> {
        self.payload.try_into().ok()
    }

    /// Whether this is a QP1 (GSI) datagram: UD SEND_ONLY to DestQP 1 carrying the GSI Q_Key.
    pub fn is_gsi(&self) -> bool {
        self.bth.opcode == opcode::UD_SEND_ONLY
            && self.bth.dest_qp == crate::GSI_QP
            && self.deth.is_some_and(|d| d.q_key == crate::GSI_QKEY)
    }

    /// Length of the BTH and the extension headers present.
    pub fn headers_len(&self) -> usize {
        let opt = |present: bool, len: usize| if present { len } else { 0 };
        Bth::LEN
            + opt(self.deth.is_some(), Deth::LEN)
            + opt(self.reth.is_some(), Reth::LEN)
            + opt(self.atomic_eth.is_some(), AtomicEth::LEN)
            + opt(self.aeth.is_some(), Aeth::LEN)
            + opt(self.atomic_ack_eth.is_some(), AtomicAckEth::LEN)
            + opt(self.imm_dt.is_some(), ImmDt::LEN)
            + opt(self.ieth.is_some(), Ieth::LEN)
    }

    /// Length of the bytes the ICRC covers after the headers: BTH to the end of the padding.
    pub fn ib_len(&self) -> usize {
        self.headers_len() + self.payload.len() + self.padding.len()
    }

    /// Length of the whole UDP payload, ICRC included.
    pub fn wire_len(&self) -> usize {
        self.ib_len() + ICRC_LEN
    }

    /// Checks that the headers present are exactly those of the opcode and that the padding
    /// agrees with the pad count.
    pub fn check_consistency(&self) -> Result<(), WireError> {
        let layout = self.layout()?;
        let opcode = self.bth.opcode;
        let pairs: [(bool, bool, &'static str); 7] = [
            (layout.deth, self.deth.is_some(), "DETH"),
            (layout.reth, self.reth.is_some(), "RETH"),
            (layout.atomic_eth, self.atomic_eth.is_some(), "AtomicETH"),
            (layout.aeth, self.aeth.is_some(), "AETH"),
            (
                layout.atomic_ack_eth,
                self.atomic_ack_eth.is_some(),
                "AtomicAckETH",
            ),
            (layout.imm_dt, self.imm_dt.is_some(), "ImmDt"),
            (layout.ieth, self.ieth.is_some(), "IETH"),
        ];
        for (wanted, present, header) in pairs {
            if wanted != present {
                let problem = if wanted { "requires" } else { "does not carry" };
                return Err(WireError::HeaderMismatch {
                    opcode,
                    problem,
                    header,
                });
            }
        }
        if self.padding.len() != usize::from(self.bth.pad_count) {
            return Err(WireError::PaddingMismatch {
                len: self.padding.len(),
                pad_count: self.bth.pad_count,
            });
        }
        Ok(())
    }

    /// Writes BTH, extension headers, payload and padding (everything but the ICRC) to the
    /// start of `out`, returning the number of bytes written.
    pub fn write_ib(&self, out: &mut [u8]) -> Result<usize, WireError> {
        self.check_consistency()?;
        let out = out_slice(out, self.ib_len(), "RoCE packet")?;
        let mut at = 0;
        let mut emit = |bytes: &[u8]| -> Result<(), WireError> {
            let dst = out
                .get_mut(at..at + bytes.len())
                .ok_or(WireError::BufferTooSmall {
                    what: "RoCE packet",
                    len: at,
                    need: at + bytes.len(),
                })?;
            dst.copy_from_slice(bytes);
            at += bytes.len();
            Ok(())
        };
        emit(&self.bth.to_bytes())?;
        if let Some(h) = self.deth {
            emit(&h.to_bytes())?;
        }
        if let Some(h) = self.reth {
            emit(&h.to_bytes())?;
        }
        if let Some(h) = self.atomic_eth {
            emit(&h.to_bytes())?;
        }
        if let Some(h) = self.aeth {
            emit(&h.to_bytes())?;
        }
        if let Some(h) = self.atomic_ack_eth {
            emit(&h.to_bytes())?;
        }
        if let Some(h) = self.imm_dt {
            emit(&h.0)?;
        }
        if let Some(h) = self.ieth {
            emit(&h.to_bytes())?;
        }
        emit(self.payload)?;
        emit(self.padding)?;
        Ok(at)
    }

    /// Encodes the packet with an ICRC computed over the given real IP and UDP headers (see
    /// [`crate::icrc::compute`]). Returns the number of bytes written (ICRC included).
    pub fn encode(
        &self,
        ip_header: &[u8],
        udp_header: &[u8],
        out: &mut [u8],
    ) -> Result<usize, WireError> {
        self.encode_with(out, |ib| icrc::compute(ip_header, udp_header, ib))
    }

    /// Encodes the packet with an ICRC computed by the UDP-socket convention of
    /// [`crate::icrc::icrc_for_udp_socket`]. Returns the number of bytes written.
    pub fn encode_for_udp_socket(
        &self,
        src: IpAddr,
        dst: IpAddr,
        src_port: u16,
        dst_port: u16,
        out: &mut [u8],
    ) -> Result<usize, WireError> {
        self.encode_with(out, |ib| {
            icrc::icrc_for_udp_socket(src, dst, src_port, dst_port, ib)
        })
    }

    /// Encodes the packet with the ICRC stored in [`RocePacket::icrc`], unchanged.
    pub fn encode_with_stored_icrc(&self, out: &mut [u8]) -> Result<usize, WireError> {
        let icrc = self.icrc;
        self.encode_with(out, |_| Ok(icrc))
    }

    fn encode_with(
        &self,
        out: &mut [u8],
        icrc: impl FnOnce(&[u8]) -> Result<u32, WireError>,
    ) -> Result<usize, WireError> {
        let total = self.wire_len();
        let out = out_slice(out, total, "RoCE packet")?;
        let n = self.write_ib(out)?;
        let (ib, tail) = out
            .split_at_mut_checked(n)
            .ok_or(WireError::BufferTooSmall {
                what: "RoCE packet",
                len: total,
                need: n,
            })?;
        let value = icrc(ib)?;
        out_slice(tail, ICRC_LEN, "ICRC")?.copy_from_slice(&value.to_le_bytes());
        Ok(n + ICRC_LEN)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::net::Ipv4Addr;
    use std::vec::Vec;

    fn ud_mad_bytes() -> [u8; MAD_SIZE] {
        let mut mad = [0u8; MAD_SIZE];
        for (i, b) in mad.iter_mut().enumerate() {
            *b = i as u8;
        }
        mad
    }

    #[test]
    fn ud_mad_builder_layout() {
        let mad = ud_mad_bytes();
        let pkt = RocePacket::ud_mad(&mad, 0xffff, 0x000102);
        assert!(pkt.is_gsi());
        let src = Ipv4Addr::new(10, 11, 0, 2);
        let dst = Ipv4Addr::new(10, 11, 0, 1);
        let mut out = [0u8; 300];
        let n = pkt
            .encode_for_udp_socket(src.into(), dst.into(), 0xd872, ROCEV2_UDP_PORT, &mut out)
            .unwrap();
        assert_eq!(n, 12 + 8 + 256 + 4);
        assert_eq!(
            &out[..20],
            &[
                0x64, 0, 0xff, 0xff, 0, 0, 0, 1, 0x80, 0x00, 0x01, 0x02, 0x80, 0x01, 0, 0, 0, 0, 0,
                1
            ]
        );
        assert_eq!(&out[20..276], &mad[..]);
        assert_eq!(
            icrc::verify_for_udp_socket(src.into(), dst.into(), 0xd872, ROCEV2_UDP_PORT, &out[..n]),
            Ok(())
        );
        let parsed = RocePacket::parse(&out[..n]).unwrap();
        assert_eq!(parsed.mad(), Some(&mad));
        assert_eq!(parsed.bth, pkt.bth);
        assert_eq!(parsed.deth, Some(Deth::GSI));
        let mut small = [0u8; 279];
        assert!(pkt
            .encode_for_udp_socket(src.into(), dst.into(), 1, 2, &mut small)
            .is_err());
    }

    #[test]
    fn padding_and_immediate() {
        let payload = [1u8, 2, 3, 4, 5];
        let pad = padding_for(payload.len());
        assert_eq!(pad, &[0, 0, 0]);
        assert_eq!(padding_for(8), &[] as &[u8]);
        let pkt = RocePacket {
            bth: Bth {
                opcode: opcode::UD_SEND_ONLY_WITH_IMMEDIATE,
                pad_count: pad_count_for(payload.len()),
                dest_qp: 0x11,
                ..Bth::default()
            },
            deth: Some(Deth {
                q_key: 0x0123_4567,
                src_qp: 0x11,
            }),
            imm_dt: Some(ImmDt::from_value(0x11)),
            payload: &payload,
            padding: pad,
            ..RocePacket::ud_mad(&[0; MAD_SIZE], 0, 0)
        };
        let mut out = [0u8; 64];
        let n = pkt.encode_with_stored_icrc(&mut out).unwrap();
        assert_eq!(n, 12 + 8 + 4 + 5 + 3 + 4);
        let p = RocePacket::parse(&out[..n]).unwrap();
        assert_eq!(p.payload, &payload);
        assert_eq!(p.padding, &[0, 0, 0]);
        assert_eq!(p.imm_dt, Some(ImmDt::from_value(0x11)));
        assert_eq!(p, RocePacket { icrc: 0, ..pkt });
    }

    #[test]
    fn inconsistent_packets_are_not_encoded() {
        let mad = [0u8; MAD_SIZE];
        let mut out = [0u8; 400];
        let no_deth = RocePacket {
            deth: None,
            ..RocePacket::ud_mad(&mad, 0xffff, 0)
        };
        assert_eq!(
            no_deth.write_ib(&mut out),
            Err(WireError::HeaderMismatch {
                opcode: 0x64,
                problem: "requires",
                header: "DETH"
            })
        );
        let extra = RocePacket {
            aeth: Some(Aeth::default()),
            ..RocePacket::ud_mad(&mad, 0xffff, 0)
        };
        assert!(extra.write_ib(&mut out).is_err());
        let mut bad_pad = RocePacket::ud_mad(&mad, 0xffff, 0);
        bad_pad.bth.pad_count = 2;
        assert_eq!(
            bad_pad.write_ib(&mut out),
            Err(WireError::PaddingMismatch {
                len: 0,
                pad_count: 2
            })
        );
        let mut unknown = RocePacket::ud_mad(&mad, 0xffff, 0);
        unknown.bth.opcode = 0x15;
        assert_eq!(
            unknown.write_ib(&mut out),
            Err(WireError::UnsupportedOpcode { opcode: 0x15 })
        );
    }

    #[test]
    fn malformed_input_is_an_error() {
        // RC ACK: BTH + AETH + ICRC = 20 bytes.
        let mut ack = Vec::from([0x11u8, 0, 0xff, 0xff, 0, 0, 0, 0x11, 0, 0, 0, 1]);
        ack.extend_from_slice(&[0, 0, 0, 1, 0xaa, 0xbb, 0xcc, 0xdd]);
        let p = RocePacket::parse(&ack).unwrap();
        assert_eq!(
            p.aeth,
            Some(Aeth {
                syndrome: 0,
                msn: 1
            })
        );
        assert_eq!(p.icrc, 0xddccbbaa);
        assert!(p.payload.is_empty());
        for n in 0..ack.len() {
            assert!(RocePacket::parse(&ack[..n]).is_err(), "len {n}");
        }
        // A pad count larger than what follows the headers.
        ack[1] = 0x10;
        assert_eq!(
            RocePacket::parse(&ack),
            Err(WireError::BadPadCount {
                pad_count: 1,
                payload_len: 0
            })
        );
        ack[1] = 0;
        ack[0] = 0x40;
        assert_eq!(
            RocePacket::parse(&ack),
            Err(WireError::UnsupportedOpcode { opcode: 0x40 })
        );
    }
}

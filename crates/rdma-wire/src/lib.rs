//! Wire formats for RoCEv2 and InfiniBand connection management, shared by Ferry's
//! hypervisor, its software RoCEv2 port, the CM multiplexer and the `no_std` guest.
//!
//! The crate is `#![no_std]` without `alloc`: parsers read from `&[u8]`, builders write into
//! `&mut [u8]` (returning the length used) or into fixed `[u8; 256]` MADs. Untrusted input
//! never panics; every failure is a [`WireError`] that says what failed and with which value.
//!
//! What is in it (all multi-byte fields big-endian, bit fields numbered from the most
//! significant bit, as in the InfiniBand specification):
//!
//! - [`Gid`] — 128-bit port address; RoCEv2 IPv4 GIDs are `::ffff:a.b.c.d`, rdma_cm writes
//!   `::a.b.c.d`; both are recognized, and comparisons always use all 128 bits.
//! - Transport headers: [`Bth`] (12 bytes), [`Deth`] (8), [`ImmDt`] (4), and the RC/UC
//!   extension headers [`Reth`], [`Aeth`], [`AtomicEth`], [`AtomicAckEth`], [`Ieth`];
//!   [`opcode`] lists the opcodes and which headers each carries.
//! - [`RocePacket`] — a parsed UDP payload (BTH … ICRC), and the builder of QP1 packets
//!   carrying a MAD ([`RocePacket::ud_mad`]).
//! - [`icrc`] — the invariant CRC over masked IP/UDP/BTH headers, for real headers and for a
//!   software port sending through a UDP socket ([`icrc::icrc_for_udp_socket`]).
//! - [`mad`] — the 256-byte management datagram and its 24-byte common header.
//! - [`cm`] — every CM message (REQ, MRA, REJ, REP, RTU, DREQ, DREP, SIDR_REQ, SIDR_REP, LAP,
//!   APR) as a typed struct, and [`cm::CmMessage`] with the IDs a multiplexer routes by.
//! - [`rdma_cm`] — rdma_cm's private-data header, IP service IDs and UD Q_Key.
//!
//! Constants: RoCEv2 UDP port [`ROCEV2_UDP_PORT`] (4791), GSI QP [`GSI_QP`] (1) and Q_Key
//! [`GSI_QKEY`] (0x80010000), default P_Key [`DEFAULT_P_KEY`] (0xFFFF).
//!
//! A CM message sent from QP1 by a software port, received and routed:
//!
//! ```
//! use core::net::Ipv4Addr;
//! use rdma_wire::cm::Rtu;
//! use rdma_wire::{icrc, CmMessage, MadHeader, RocePacket, ROCEV2_UDP_PORT};
//!
//! let rtu = Rtu {
//!     hdr: MadHeader::cm(Rtu::ATTRIBUTE_ID, 0x2_e510_f3bc),
//!     local_comm_id: 0xbcf3_10e5,
//!     remote_comm_id: 0xb2ab_03de,
//!     ..Rtu::default()
//! };
//! let mad = rtu.to_mad();
//! let (src, dst) = (Ipv4Addr::new(10, 11, 0, 2).into(), Ipv4Addr::new(10, 11, 0, 1).into());
//! let mut buf = [0u8; 512];
//! let n = RocePacket::ud_mad(&mad, 0xffff, 1)
//!     .encode_for_udp_socket(src, dst, 0xd872, ROCEV2_UDP_PORT, &mut buf)?;
//!
//! // The receiver checks the ICRC, parses, and routes by the receiver's communication ID.
//! icrc::verify_for_udp_socket(src, dst, 0xd872, ROCEV2_UDP_PORT, &buf[..n])?;
//! let pkt = RocePacket::parse(&buf[..n])?;
//! assert!(pkt.is_gsi());
//! let msg = CmMessage::parse_mad(pkt.payload)?;
//! assert_eq!(msg.remote_comm_id(), Some(0xb2ab_03de));
//! # Ok::<(), rdma_wire::WireError>(())
//! ```
//!
//! Layouts follow IBA volume 1 as Linux implements it (`include/rdma/ibta_vol1_c12.h`,
//! `drivers/infiniband/sw/rxe/`), and the crate's tests check them against real SoftRoCE
//! captures (`testdata/*.pcap`): every RoCE frame there parses, its ICRC verifies, and it
//! re-encodes byte for byte.
#![forbid(unsafe_code)]
#![deny(missing_docs)]
#![no_std]

#[cfg(any(test, feature = "std"))]
extern crate std;

mod bth;
mod bytes;
pub mod cm;
mod crc32;
mod deth;
mod error;
#[doc(hidden)]
pub mod fuzz_records;
mod gid;
pub mod icrc;
mod immdt;
pub mod mad;
pub mod opcode;
mod packet;
mod rc_headers;
pub mod rdma_cm;

pub use bth::{Bth, DEFAULT_P_KEY, MAX_U24};
pub use cm::{CmKind, CmMessage};
pub use deth::{Deth, GSI_QKEY, GSI_QP};
pub use error::WireError;
pub use gid::Gid;
pub use immdt::ImmDt;
pub use mad::{Mad, MadHeader, MAD_SIZE};
pub use packet::{
    pad_count_for, padding_for, udp_src_port_for_flow_label, RocePacket, ROCEV2_UDP_PORT,
};
pub use rc_headers::{Aeth, AtomicAckEth, AtomicEth, Ieth, Reth};

//! Ferry's RDMA connection-management virtualization, built on [`rdma_wire`]'s codecs.
//!
//! - [`port`] — the software RoCEv2 port, the host's "physical RDMA interface": a UDP socket
//!   on port 4791 of one host address, QP1 (GSI) and UD queue pairs with Q_Key and P_Key
//!   checks, ICRC generated and verified, counters, optional pcap capture.
//! - [`cm`] — CM endpoint state machines (REQ/REP/RTU, DREQ/DREP, REJ, MRA, SIDR, Linux-like
//!   timeouts and retries) driven by any [`cm::MadTx`]: a VM agent, a test, a bare-metal peer.
//! - [`mux`] — the multiplexer: (VM, GID) registrations, inbound QP1 routing by destination
//!   GID to the owning VM, outbound anti-spoofing checks, per-VM communication-ID tables.
//! - [`host`] and [`peer`] — a host daemon with simulated VMs, and a bare-metal endpoint.
//!
//! # Addressing and encapsulation over loopback UDP
//!
//! A host is a UDP socket bound to `IP:4791`. A GID is an IPv4-mapped address
//! `::ffff:a.b.c.d`; GIDs of VMs behind a host are reached through a static neighbour table
//! ([`addr::NeighborTable`], like ARP entries: `127.0.1.0/24 → 127.0.0.1`); a GID without an
//! entry is sent to its own IPv4 address. Because a UDP socket cannot tell which of the GIDs
//! behind its host a datagram was for, every datagram starts with Ferry's 36-byte preamble
//! ([`addr::Encap`]: magic `FRY\x01`, SGID, DGID) before the BTH. The ICRC is computed with
//! [`rdma_wire::icrc::icrc_for_udp_socket`] using the *GIDs'* addresses as IP source and
//! destination and the datagram's real UDP ports, as the RNIC owning those GIDs would; the
//! pcap writer writes the same packets as real Ethernet/IPv4/UDP frames with the GIDs as IP
//! addresses, so Wireshark dissects them as RoCEv2/InfiniBand CM.

pub mod addr;
pub mod cm;
mod counters;
mod error;
pub mod host;
pub mod mux;
pub mod peer;
pub mod port;

pub use error::RdmaError;
pub use rdma_wire::{Gid, Mad, MAD_SIZE};

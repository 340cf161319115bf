//! Ferry's RDMA connection-management virtualization, built on [`rdma_wire`]'s codecs.
//!
//! - [`port`] — the software RoCEv2 port, the host's "physical RDMA interface": UDP sockets on
//!   port 4791 of the host's address and of each GID it serves, QP1 (GSI) and UD queue pairs
//!   with Q_Key and P_Key checks, ICRC generated and verified, counters, optional pcap capture.
//! - [`cm`] — CM endpoint state machines (REQ/REP/RTU, DREQ/DREP, REJ, MRA, SIDR, Linux-like
//!   timeouts and retries) driven by any [`cm::MadTx`]: a VM agent, a test, a bare-metal peer.
//! - [`mux`] — the multiplexer: (VM, GID) registrations, inbound QP1 routing by destination
//!   GID to the owning VM, outbound anti-spoofing checks, per-VM communication-ID tables.
//! - [`rc`] — Reliable Connected queue pairs on the port: the transport (segmentation, PSNs,
//!   ACK/NAK, retransmission, RNR, READ/WRITE through checked memory regions).
//! - [`rc_session`] — rping-like (WRITE + READ) and ucmatose-like (SEND/RECV) sessions over RC.
//! - [`host`] and [`peer`] — a host daemon with simulated VMs, and a bare-metal endpoint.
//!
//! # Addressing: standard RoCEv2 over IPv4
//!
//! A GID is an IPv4-mapped address `::ffff:a.b.c.d` and travels in the IP header: the UDP
//! payload is BTH … ICRC exactly as an RNIC (or Linux `rdma_rxe`) sends it. A VM's GID is an
//! address its host owns (on loopback any `127.x.y.z`; on a real host an address on its
//! interface, `ip addr add 10.0.0.21/32 dev eth0`); the port binds UDP 4791 on it, so IP
//! routing decides where a GID lives and the kernel writes and reports the addresses — the
//! destination GID of a received packet is the address of the socket it arrived on, the source
//! GID the datagram's source address. The ICRC covers the IPv4 and UDP headers as the kernels
//! write them ([`rdma_wire::icrc`]); the pcap writer records the real frames.

pub mod addr;
pub mod cm;
mod counters;
mod error;
#[doc(hidden)]
pub mod fuzzing;
pub mod host;
pub mod mux;
pub mod peer;
pub mod port;
pub mod rc;
pub mod rc_session;

pub use error::RdmaError;
pub use rdma_wire::{Gid, Mad, MAD_SIZE};

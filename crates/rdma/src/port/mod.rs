//! The software RoCEv2 port: the host's "physical RDMA interface".
//!
//! A UDP socket bound to `addr:4791`, one receive thread, QP1 (GSI) whose packets go to a
//! [`GsiHandler`] (the multiplexer on a host, a CM endpoint on a bare-metal peer), and UD
//! queue pairs ([`UdQp`]). Every received datagram is checked in this order, each failure a
//! counted drop: Ferry preamble ([`crate::addr::Encap`]), ICRC, BTH/DETH structure, opcode
//! (UD only for now), P_Key, then QP1 (GSI Q_Key) or the QP table (QPN, DGID, Q_Key, queue
//! space). The receive loop never blocks on a consumer.
mod pcap;
mod qp;

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use parking_lot::RwLock;
use rdma_wire::{opcode, Bth, Deth, Gid, ImmDt, RocePacket, WireError, DEFAULT_P_KEY, GSI_QP};
use serde::{Deserialize, Serialize};

pub use pcap::PcapWriter;
pub use qp::{QpType, QueuePair, RxPacket, RxVerdict, UdMessage, UdQp, UdQpCounters, UdQpStats};

use crate::addr::{grh_area, Encap, NeighborTable, ENCAP_LEN, GRH_LEN};
use crate::counters::{bump, counters};
use crate::RdmaError;

/// Largest datagram the port sends or accepts.
pub const MAX_DATAGRAM: usize = 4096 + ENCAP_LEN + 64;
/// Largest UD payload (one 4096-byte MTU).
pub const MAX_UD_PAYLOAD: usize = 4096;

/// Configuration of a port.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PortConfig {
    /// Host address the socket binds.
    pub addr: Ipv4Addr,
    /// UDP port (4791 unless a test needs otherwise).
    pub udp_port: u16,
    /// GID → host resolution for sending.
    pub neighbors: NeighborTable,
    /// The port's P_Key (one-entry P_Key table).
    pub p_key: u16,
    /// Depth of each UD QP's receive queue.
    pub ud_queue_depth: usize,
    /// Write every sent and received packet to this pcap file.
    pub pcap: Option<PathBuf>,
}

impl PortConfig {
    /// Defaults for a host address: port 4791, no neighbours, P_Key 0xFFFF, queue 256.
    pub fn new(addr: Ipv4Addr) -> PortConfig {
        PortConfig {
            addr,
            udp_port: rdma_wire::ROCEV2_UDP_PORT,
            neighbors: NeighborTable::new(),
            p_key: DEFAULT_P_KEY,
            ud_queue_depth: 256,
            pcap: None,
        }
    }
}

counters! {
    /// Port counters (JSON in reports).
    PortCounters => PortStats {
        /// Datagrams received.
        rx_datagrams,
        /// Dropped: no Ferry preamble.
        rx_bad_encap,
        /// Dropped: ICRC mismatch.
        rx_bad_icrc,
        /// Dropped: headers do not parse (too short, bad pad count, unknown opcode, ...).
        rx_malformed,
        /// Dropped: opcode of a transport the port has no QP type for (RC, UC).
        rx_unsupported_transport,
        /// Dropped: P_Key does not match the port's.
        rx_bad_pkey,
        /// Dropped: Q_Key mismatch (QP1 or UD QP).
        rx_bad_qkey,
        /// Dropped: no QP with the destination QPN.
        rx_no_qp,
        /// Dropped: UD packet whose DGID is not its QP's GID.
        rx_wrong_dgid,
        /// Dropped: a UD QP's receive queue was full.
        rx_queue_full,
        /// Dropped: QP1 packet and no GSI handler.
        rx_no_gsi_handler,
        /// QP1 packets handed to the GSI handler.
        rx_gsi,
        /// UD packets queued on a QP.
        rx_ud,
        /// Datagrams sent.
        tx_datagrams,
        /// Sends that failed (socket error, no route, encoding).
        tx_errors,
    }
}

/// A QP1 packet as the port hands it to its handler.
#[derive(Debug)]
pub struct GsiPacket<'a> {
    /// Source GID (from the packet's IP source).
    pub sgid: Gid,
    /// Destination GID (the packet's IP destination): the routing key.
    pub dgid: Gid,
    /// GRH area a receive buffer would start with.
    pub grh: [u8; GRH_LEN],
    /// P_Key of the packet.
    pub p_key: u16,
    /// The payload (a MAD when it is 256 bytes; the handler checks).
    pub payload: &'a [u8],
}

/// Receives QP1 packets (called on the port's receive thread; must not block).
pub trait GsiHandler: Send + Sync {
    /// One QP1 packet that passed the port's checks.
    fn on_gsi(&self, pkt: &GsiPacket<'_>);
}

/// Sends MADs from QP1: what the multiplexer and CM endpoints need from a port.
pub trait Qp1Tx: Send + Sync {
    /// Sends `mad` from QP1 of `sgid` to QP1 of `dgid`.
    fn send_gsi(&self, sgid: Gid, dgid: Gid, mad: &rdma_wire::Mad) -> Result<(), RdmaError>;
}

/// Whether two P_Keys match (IBA 10.9.3: same 15-bit key, at least one full member, and not
/// the invalid key).
pub fn p_key_matches(a: u16, b: u16) -> bool {
    let (ka, kb) = (a & 0x7fff, b & 0x7fff);
    ka == kb && ka != 0 && (a & 0x8000 != 0 || b & 0x8000 != 0)
}

/// Destination of a UD send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UdDest {
    /// Destination GID.
    pub dgid: Gid,
    /// Destination QPN.
    pub dqpn: u32,
    /// Q_Key.
    pub qkey: u32,
}

struct PortInner {
    cfg: PortConfig,
    socket: UdpSocket,
    local_port: u16,
    counters: PortCounters,
    qps: RwLock<HashMap<u32, Arc<dyn QueuePair>>>,
    next_qpn: AtomicU32,
    gsi: RwLock<Option<Arc<dyn GsiHandler>>>,
    gsi_psn: AtomicU32,
    pcap: Option<PcapWriter>,
    stop: AtomicBool,
}

/// The software RoCEv2 port. Cloning gives another handle to the same port.
#[derive(Clone)]
pub struct SoftPort {
    inner: Arc<PortInner>,
    thread: Arc<parking_lot::Mutex<Option<JoinHandle<()>>>>,
}

impl std::fmt::Debug for SoftPort {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SoftPort")
            .field("addr", &self.inner.cfg.addr)
            .field("udp_port", &self.inner.local_port)
            .finish()
    }
}

impl SoftPort {
    /// Binds the socket and starts the receive thread.
    pub fn bind(cfg: PortConfig) -> Result<SoftPort, RdmaError> {
        let sa = SocketAddr::V4(SocketAddrV4::new(cfg.addr, cfg.udp_port));
        let socket = UdpSocket::bind(sa).map_err(|e| RdmaError::io(format!("binding {sa}"), e))?;
        socket
            .set_read_timeout(Some(Duration::from_millis(50)))
            .map_err(|e| RdmaError::io("setting the socket read timeout", e))?;
        let local_port = socket
            .local_addr()
            .map_err(|e| RdmaError::io("reading the socket address", e))?
            .port();
        let pcap = cfg.pcap.as_deref().map(PcapWriter::create).transpose()?;
        let inner = Arc::new(PortInner {
            cfg,
            socket,
            local_port,
            counters: PortCounters::default(),
            qps: RwLock::new(HashMap::new()),
            next_qpn: AtomicU32::new(2),
            gsi: RwLock::new(None),
            gsi_psn: AtomicU32::new(0),
            pcap,
            stop: AtomicBool::new(false),
        });
        let rx = inner.clone();
        let thread = std::thread::Builder::new()
            .name(format!("roce-rx-{}", inner.cfg.addr))
            .spawn(move || rx.receive_loop())
            .map_err(|e| RdmaError::io("spawning the receive thread", e))?;
        tracing::info!(addr = %inner.cfg.addr, port = local_port, "RoCEv2 port up");
        Ok(SoftPort {
            inner,
            thread: Arc::new(parking_lot::Mutex::new(Some(thread))),
        })
    }

    /// The host address.
    pub fn addr(&self) -> Ipv4Addr {
        self.inner.cfg.addr
    }

    /// The UDP port bound.
    pub fn udp_port(&self) -> u16 {
        self.inner.local_port
    }

    /// The configuration.
    pub fn config(&self) -> &PortConfig {
        &self.inner.cfg
    }

    /// Installs the QP1 handler (replacing any previous one).
    pub fn set_gsi_handler(&self, h: Arc<dyn GsiHandler>) {
        *self.inner.gsi.write() = Some(h);
    }

    /// Creates a UD QP bound to `gid` with Q_Key `qkey`; returns it with its new QPN.
    pub fn create_ud_qp(&self, gid: Gid, qkey: u32) -> Arc<UdQp> {
        let mut qps = self.inner.qps.write();
        let mut qpn = self.inner.next_qpn.fetch_add(1, Ordering::Relaxed) & rdma_wire::MAX_U24;
        while qpn < 2 || qps.contains_key(&qpn) {
            qpn = self.inner.next_qpn.fetch_add(1, Ordering::Relaxed) & rdma_wire::MAX_U24;
        }
        let qp = Arc::new(UdQp::new(qpn, gid, qkey, self.inner.cfg.ud_queue_depth));
        qps.insert(qpn, qp.clone());
        qp
    }

    /// Destroys a QP.
    pub fn destroy_qp(&self, qpn: u32) -> Result<(), RdmaError> {
        self.inner
            .qps
            .write()
            .remove(&qpn)
            .map(|_| ())
            .ok_or(RdmaError::NoSuchQp(qpn))
    }

    /// Sends `data` from UD QP `qp` (source GID: the QP's) to `dest`.
    pub fn post_send_ud(
        &self,
        qp: &UdQp,
        dest: UdDest,
        imm: Option<u32>,
        data: &[u8],
    ) -> Result<(), RdmaError> {
        if data.len() > MAX_UD_PAYLOAD {
            return Err(RdmaError::Config(format!(
                "UD payload of {} bytes exceeds the MTU of {MAX_UD_PAYLOAD}",
                data.len()
            )));
        }
        let pad = rdma_wire::padding_for(data.len());
        let pkt = RocePacket {
            bth: Bth {
                opcode: if imm.is_some() {
                    opcode::UD_SEND_ONLY_WITH_IMMEDIATE
                } else {
                    opcode::UD_SEND_ONLY
                },
                p_key: self.inner.cfg.p_key,
                dest_qp: dest.dqpn,
                psn: qp.next_psn(),
                pad_count: pad.len() as u8,
                ..Bth::default()
            },
            deth: Some(Deth {
                q_key: dest.qkey,
                src_qp: qp.qpn(),
            }),
            reth: None,
            atomic_eth: None,
            aeth: None,
            atomic_ack_eth: None,
            imm_dt: imm.map(|v| ImmDt(v.to_be_bytes())),
            ieth: None,
            payload: data,
            padding: pad,
            icrc: 0,
        };
        let r = self.inner.send_packet(qp.gid(), dest.dgid, &pkt);
        if r.is_ok() {
            bump(&qp.counters.tx_messages);
        }
        r
    }

    /// Counters.
    pub fn stats(&self) -> PortStats {
        self.inner.counters.snapshot()
    }

    /// Sends a raw datagram (tests use it to inject hostile packets).
    pub fn send_raw(&self, to: SocketAddr, datagram: &[u8]) -> Result<(), RdmaError> {
        self.inner
            .socket
            .send_to(datagram, to)
            .map(|_| ())
            .map_err(|e| RdmaError::io(format!("sending to {to}"), e))
    }

    /// Stops the receive thread and drops the GSI handler (breaking reference cycles).
    pub fn shutdown(&self) {
        self.inner.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.lock().take() {
            let _ = t.join();
        }
        *self.inner.gsi.write() = None;
        self.inner.qps.write().clear();
    }
}

impl Qp1Tx for SoftPort {
    fn send_gsi(&self, sgid: Gid, dgid: Gid, mad: &rdma_wire::Mad) -> Result<(), RdmaError> {
        let psn = self.inner.gsi_psn.fetch_add(1, Ordering::Relaxed) & rdma_wire::MAX_U24;
        let pkt = RocePacket::ud_mad(mad, self.inner.cfg.p_key, psn);
        self.inner.send_packet(sgid, dgid, &pkt)
    }
}

/// Encodes a RoCEv2 packet with Ferry's preamble and the UDP-socket ICRC: the datagram a
/// port at UDP port `src_port` sends for (`sgid` → `dgid`).
pub fn encode_datagram(
    sgid: Gid,
    dgid: Gid,
    src_port: u16,
    dst_port: u16,
    pkt: &RocePacket<'_>,
    out: &mut [u8],
) -> Result<usize, RdmaError> {
    let (head, body) =
        out.split_at_mut_checked(ENCAP_LEN)
            .ok_or(RdmaError::Wire(WireError::BufferTooSmall {
                what: "datagram",
                len: 0,
                need: ENCAP_LEN,
            }))?;
    let head: &mut [u8; ENCAP_LEN] = head.try_into().map_err(|_| {
        RdmaError::Wire(WireError::BufferTooSmall {
            what: "preamble",
            len: 0,
            need: ENCAP_LEN,
        })
    })?;
    Encap { sgid, dgid }.write(head);
    let n = pkt.encode_for_udp_socket(ip_of(sgid)?, ip_of(dgid)?, src_port, dst_port, body)?;
    Ok(ENCAP_LEN + n)
}

fn ip_of(gid: Gid) -> Result<IpAddr, RdmaError> {
    Ok(gid.canonical().to_ip())
}

impl PortInner {
    fn send_packet(&self, sgid: Gid, dgid: Gid, pkt: &RocePacket<'_>) -> Result<(), RdmaError> {
        let r = self.try_send_packet(sgid, dgid, pkt);
        match &r {
            Ok(()) => bump(&self.counters.tx_datagrams),
            Err(e) => {
                bump(&self.counters.tx_errors);
                tracing::debug!(%sgid, %dgid, error = e as &dyn std::error::Error, "send failed");
            }
        }
        r
    }

    fn try_send_packet(&self, sgid: Gid, dgid: Gid, pkt: &RocePacket<'_>) -> Result<(), RdmaError> {
        let host = self.cfg.neighbors.resolve_gid(dgid)?;
        let mut buf = [0u8; MAX_DATAGRAM];
        let n = encode_datagram(
            sgid,
            dgid,
            self.local_port,
            self.cfg.udp_port,
            pkt,
            &mut buf,
        )?;
        if let Some(p) = &self.pcap {
            p.write_packet(
                sgid,
                dgid,
                self.local_port,
                self.cfg.udp_port,
                &buf[ENCAP_LEN..n],
            );
        }
        let to = SocketAddrV4::new(host, self.cfg.udp_port);
        self.socket
            .send_to(&buf[..n], to)
            .map_err(|e| RdmaError::io(format!("sending to {to}"), e))?;
        Ok(())
    }

    fn receive_loop(&self) {
        let mut buf = vec![0u8; MAX_DATAGRAM + 1];
        while !self.stop.load(Ordering::Relaxed) {
            match self.socket.recv_from(&mut buf) {
                Ok((n, from)) => self.on_datagram(&buf[..n], from),
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock
                            | std::io::ErrorKind::TimedOut
                            | std::io::ErrorKind::Interrupted
                    ) => {}
                Err(e) => {
                    tracing::warn!(addr = %self.cfg.addr, error = &e as &dyn std::error::Error, "receive failed");
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
        }
    }

    /// Checks and dispatches one datagram. Everything from the network is hostile: every
    /// failure is a counted drop, nothing panics.
    fn on_datagram(&self, datagram: &[u8], from: SocketAddr) {
        let c = &self.counters;
        bump(&c.rx_datagrams);
        let Some((encap, roce)) = Encap::split(datagram) else {
            bump(&c.rx_bad_encap);
            return;
        };
        if let Some(p) = &self.pcap {
            p.write_packet(encap.sgid, encap.dgid, from.port(), self.local_port, roce);
        }
        let (Ok(sip), Ok(dip)) = (ip_of(encap.sgid), ip_of(encap.dgid)) else {
            bump(&c.rx_malformed);
            return;
        };
        match rdma_wire::icrc::verify_for_udp_socket(sip, dip, from.port(), self.local_port, roce) {
            Ok(()) => {}
            Err(WireError::IcrcMismatch { stored, computed }) => {
                bump(&c.rx_bad_icrc);
                tracing::debug!(%from, "bad ICRC {stored:#010x}, expected {computed:#010x}");
                return;
            }
            Err(_) => {
                bump(&c.rx_malformed);
                return;
            }
        }
        let Ok(pkt) = RocePacket::parse(roce) else {
            bump(&c.rx_malformed);
            return;
        };
        if opcode::transport(pkt.bth.opcode) != opcode::Transport::Ud || pkt.deth.is_none() {
            bump(&c.rx_unsupported_transport);
            return;
        }
        if !p_key_matches(pkt.bth.p_key, self.cfg.p_key) {
            bump(&c.rx_bad_pkey);
            return;
        }
        let grh = grh_area(encap.sgid, encap.dgid, roce.len());
        if pkt.bth.dest_qp == GSI_QP {
            if !pkt.is_gsi() {
                bump(&c.rx_bad_qkey);
                return;
            }
            let handler = self.gsi.read().clone();
            let Some(h) = handler else {
                bump(&c.rx_no_gsi_handler);
                return;
            };
            bump(&c.rx_gsi);
            h.on_gsi(&GsiPacket {
                sgid: encap.sgid,
                dgid: encap.dgid,
                grh,
                p_key: pkt.bth.p_key,
                payload: pkt.payload,
            });
            return;
        }
        let qp = self.qps.read().get(&pkt.bth.dest_qp).cloned();
        let Some(qp) = qp else {
            bump(&c.rx_no_qp);
            return;
        };
        let verdict = qp.receive(&RxPacket {
            sgid: encap.sgid,
            dgid: encap.dgid,
            grh,
            packet: &pkt,
        });
        match verdict {
            RxVerdict::Accepted => bump(&c.rx_ud),
            RxVerdict::BadQKey => bump(&c.rx_bad_qkey),
            RxVerdict::WrongDgid => bump(&c.rx_wrong_dgid),
            RxVerdict::QueueFull => bump(&c.rx_queue_full),
            RxVerdict::WrongTransport => bump(&c.rx_unsupported_transport),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn p_key_rules() {
        assert!(p_key_matches(0xffff, 0xffff));
        assert!(p_key_matches(0x7fff, 0xffff));
        assert!(!p_key_matches(0x7fff, 0x7fff), "two limited members");
        assert!(!p_key_matches(0x8001, 0xffff));
        assert!(!p_key_matches(0x8000, 0x8000), "invalid P_Key");
    }
}

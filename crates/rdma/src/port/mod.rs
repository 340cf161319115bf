//! The software RoCEv2 port: the host's "physical RDMA interface".
//!
//! Standard RoCEv2: the UDP payload is BTH … ICRC exactly as an RNIC sends it. A port has a
//! UDP socket on port 4791 of each address it owns — its own address, and every GID claimed
//! for it ([`SoftPort::claim_gid`]; the multiplexer claims a VM's GID when it registers it) —
//! each with a receive thread ([`sock`] says why one socket per GID). A packet's destination
//! GID is the address of the socket it arrived on, its source GID the datagram's source
//! address: nothing a sender writes in the packet decides either. Sends go out of the socket
//! of the source GID, so the kernel writes the VM's GID as the IP source; IP routing decides
//! where the destination GID lives (no table of Ferry's own). Runs of equal-size packets (an
//! RC message's MIDDLEs and LAST) leave in one UDP GSO send and arrive in one GRO receive
//! ([`sock`] says how the ICRC stays exact).
//!
//! QP1 (GSI) packets go to a [`GsiHandler`] (the multiplexer on a host, a CM endpoint on a
//! bare-metal peer); UD queue pairs ([`UdQp`]) and RC queue pairs take the rest. Every
//! received datagram is checked in this order, each failure a counted drop: ICRC (over the
//! IPv4/UDP headers the sender's kernel wrote; see
//! [`rdma_wire::icrc::verify_for_udp_socket_any_ip_id`]), BTH/extension-header structure,
//! P_Key, then QP1 (GSI Q_Key) or the QP table (QPN, then the QP's own checks). The receive
//! loops never block on a consumer.
mod pcap;
mod qp;
mod sock;

pub use sock::bind as bind_rocev2_socket;
/// UDP GSO sends and GRO receives as the port uses them (for baselines that move the same
/// datagrams without RoCE).
pub use sock::{enable_gro, recv as recv_datagrams, send_segments, Received, MAX_GSO_BYTES};

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use parking_lot::RwLock;
use rdma_wire::{opcode, Bth, Deth, Gid, ImmDt, RocePacket, WireError, DEFAULT_P_KEY, GSI_QP};
use serde::{Deserialize, Serialize};

pub use pcap::PcapWriter;
pub use qp::{QpType, QueuePair, RxPacket, RxVerdict, UdMessage, UdQp, UdQpCounters, UdQpStats};

use crate::addr::{gid_ipv4, gid_v4, grh_area, GRH_LEN};
use crate::counters::{bump, counters};
use crate::RdmaError;

/// Largest datagram the port sends or accepts.
pub const MAX_DATAGRAM: usize = 4096 + 64;
/// Largest UD payload (one 4096-byte MTU).
pub const MAX_UD_PAYLOAD: usize = 4096;

/// Configuration of a port.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PortConfig {
    /// The port's own address (bound at start; more with [`SoftPort::claim_gid`]).
    pub addr: Ipv4Addr,
    /// UDP port every socket binds and every packet is sent to (4791).
    pub udp_port: u16,
    /// The port's P_Key (one-entry P_Key table).
    pub p_key: u16,
    /// Depth of each UD QP's receive queue.
    pub ud_queue_depth: usize,
    /// Write every sent and received packet to this pcap file.
    pub pcap: Option<PathBuf>,
}

impl PortConfig {
    /// Defaults for a host address: port 4791, P_Key 0xFFFF, queue 256.
    pub fn new(addr: Ipv4Addr) -> PortConfig {
        PortConfig {
            addr,
            udp_port: rdma_wire::ROCEV2_UDP_PORT,
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
        /// Dropped: not from an IPv4 address.
        rx_not_ipv4,
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
        /// RC packets handed to an RC QP (its own counters say what became of them).
        rx_rc,
        /// Dropped: RC packet whose IP source is not the QP's connected peer.
        rx_wrong_source,
        /// Datagrams sent.
        tx_datagrams,
        /// Runs of datagrams sent with one GSO send (their datagrams count in `tx_datagrams`).
        tx_gso_runs,
        /// Receives that got a coalesced run of datagrams (GRO; each counts in
        /// `rx_datagrams`).
        rx_gro_runs,
        /// Sends that failed (socket error, no route, encoding, source GID not the port's).
        tx_errors,
        /// GIDs claimed (sockets bound) over the port's life.
        gids_claimed,
        /// GID claims refused (address not on this host, or taken).
        gid_claims_refused,
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
    /// Makes `gid` an address packets can be sent from and received for (the port binds
    /// it). Fails when the host does not own the address.
    fn claim_gid(&self, _gid: Gid) -> Result<(), RdmaError> {
        Ok(())
    }
    /// Gives back a claim of [`Qp1Tx::claim_gid`].
    fn release_gid(&self, _gid: Gid) {}
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

/// One message of [`SoftPort::post_send_ud_batch`].
#[derive(Debug, Clone, Copy)]
pub struct UdSend<'a> {
    /// Where it goes.
    pub dest: UdDest,
    /// Immediate data (SEND with immediate).
    pub imm: Option<u32>,
    /// Payload.
    pub data: &'a [u8],
}

/// One address the port owns: its socket and receive thread.
struct AddrSocket {
    addr: Ipv4Addr,
    socket: UdpSocket,
    /// Runs of equal-size packets leave in one UDP GSO send (cleared when the kernel refuses
    /// one: a device without checksum offload, say; they then leave one by one).
    gso: AtomicBool,
    /// Claims on it (the port's own address holds one for the port's life).
    claims: AtomicUsize,
    stop: AtomicBool,
    thread: parking_lot::Mutex<Option<JoinHandle<()>>>,
}

impl AddrSocket {
    fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
        let t = self.thread.lock().take();
        if let Some(t) = t {
            // The receive thread itself may drop the last claim (a handler that unregisters):
            // it then ends on its own at the next read timeout.
            if t.thread().id() != std::thread::current().id() {
                let _ = t.join();
            }
        }
    }
}

struct PortInner {
    cfg: PortConfig,
    counters: PortCounters,
    sockets: RwLock<HashMap<Ipv4Addr, Arc<AddrSocket>>>,
    /// Serializes claims and releases (binding happens outside the `sockets` lock).
    claim_lock: parking_lot::Mutex<()>,
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
}

impl std::fmt::Debug for SoftPort {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SoftPort")
            .field("addr", &self.inner.cfg.addr)
            .field("udp_port", &self.inner.cfg.udp_port)
            .finish()
    }
}

impl SoftPort {
    /// Binds the port's own address and starts its receive thread.
    pub fn bind(cfg: PortConfig) -> Result<SoftPort, RdmaError> {
        let pcap = cfg.pcap.as_deref().map(PcapWriter::create).transpose()?;
        let addr = cfg.addr;
        let port = SoftPort {
            inner: Arc::new(PortInner {
                cfg,
                counters: PortCounters::default(),
                sockets: RwLock::new(HashMap::new()),
                claim_lock: parking_lot::Mutex::new(()),
                qps: RwLock::new(HashMap::new()),
                next_qpn: AtomicU32::new(2),
                gsi: RwLock::new(None),
                gsi_psn: AtomicU32::new(0),
                pcap,
                stop: AtomicBool::new(false),
            }),
        };
        port.claim_gid(gid_v4(addr))?;
        tracing::info!(%addr, port = port.udp_port(), "RoCEv2 port up");
        Ok(port)
    }

    /// The port's own address.
    pub fn addr(&self) -> Ipv4Addr {
        self.inner.cfg.addr
    }

    /// The UDP port bound (4791).
    pub fn udp_port(&self) -> u16 {
        self.inner.cfg.udp_port
    }

    /// The configuration.
    pub fn config(&self) -> &PortConfig {
        &self.inner.cfg
    }

    /// Makes the port receive and send for `gid`: binds a socket on its address (the first
    /// claim) or counts one more claim. Fails when the address is not one this host owns or
    /// another port already has it — a VM's GID must be an address of its host.
    pub fn claim_gid(&self, gid: Gid) -> Result<(), RdmaError> {
        let addr = gid_ipv4(gid)?;
        let inner = &self.inner;
        let _g = inner.claim_lock.lock();
        if let Some(s) = inner.sockets.read().get(&addr) {
            s.claims.fetch_add(1, Ordering::Relaxed);
            return Ok(());
        }
        let socket = sock::bind(addr, inner.cfg.udp_port).map_err(|source| {
            bump(&inner.counters.gid_claims_refused);
            RdmaError::BindGid {
                gid,
                addr,
                port: inner.cfg.udp_port,
                source,
            }
        })?;
        // Runs sent with one GSO send arrive in one receive (see `receive_loop`).
        sock::enable_gro(&socket);
        let s = Arc::new(AddrSocket {
            addr,
            socket,
            gso: AtomicBool::new(true),
            claims: AtomicUsize::new(1),
            stop: AtomicBool::new(false),
            thread: parking_lot::Mutex::new(None),
        });
        let (rx, rs) = (inner.clone(), s.clone());
        let t = std::thread::Builder::new()
            .name(format!("roce-rx-{addr}"))
            .spawn(move || {
                sandbox::enter(sandbox::Kind::RdmaPort);
                rx.receive_loop(&rs)
            })
            .map_err(|e| RdmaError::io("spawning a receive thread", e))?;
        *s.thread.lock() = Some(t);
        inner.sockets.write().insert(addr, s);
        bump(&inner.counters.gids_claimed);
        Ok(())
    }

    /// Drops one claim on `gid`; the last one closes its socket. The port's own address stays.
    pub fn release_gid(&self, gid: Gid) {
        let Ok(addr) = gid_ipv4(gid) else {
            return;
        };
        let inner = &self.inner;
        let _g = inner.claim_lock.lock();
        let last = {
            let sockets = inner.sockets.read();
            let Some(s) = sockets.get(&addr) else {
                return;
            };
            s.claims.fetch_sub(1, Ordering::Relaxed) == 1 && addr != inner.cfg.addr
        };
        if last {
            let s = inner.sockets.write().remove(&addr);
            if let Some(s) = s {
                s.stop();
            }
        }
    }

    /// The addresses the port has sockets on.
    pub fn addresses(&self) -> Vec<Ipv4Addr> {
        let mut v: Vec<Ipv4Addr> = self.inner.sockets.read().keys().copied().collect();
        v.sort();
        v
    }

    /// Installs the QP1 handler (replacing any previous one).
    pub fn set_gsi_handler(&self, h: Arc<dyn GsiHandler>) {
        *self.inner.gsi.write() = Some(h);
    }

    /// A free QPN, reserved by `make` (which builds the QP) under the table's lock.
    pub(crate) fn add_qp<Q: QueuePair + 'static>(
        &self,
        make: impl FnOnce(u32) -> Arc<Q>,
    ) -> Arc<Q> {
        let mut qps = self.inner.qps.write();
        let mut qpn = self.inner.next_qpn.fetch_add(1, Ordering::Relaxed) & rdma_wire::MAX_U24;
        while qpn < 2 || qps.contains_key(&qpn) {
            qpn = self.inner.next_qpn.fetch_add(1, Ordering::Relaxed) & rdma_wire::MAX_U24;
        }
        let qp = make(qpn);
        qps.insert(qpn, qp.clone());
        qp
    }

    /// Creates a UD QP bound to `gid` with Q_Key `qkey`; returns it with its new QPN.
    pub fn create_ud_qp(&self, gid: Gid, qkey: u32) -> Arc<UdQp> {
        let depth = self.inner.cfg.ud_queue_depth;
        self.add_qp(|qpn| Arc::new(UdQp::new(qpn, gid, qkey, depth)))
    }

    /// Destroys a QP (an RC QP's owner also calls its `shutdown`).
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
        let mut r = Ok(());
        self.post_send_ud_batch(qp, &[UdSend { dest, imm, data }], |_, x| r = x);
        r
    }

    /// Sends `msgs` from UD QP `qp` in order, and calls `done(i, result)` for each message.
    /// Consecutive messages to one destination leave together: a run of equal-size ones
    /// (its last may be shorter) in one UDP GSO send, which a Ferry port on loopback receives
    /// in one call (the echo of a burst costs one system call each way, not one per message).
    pub fn post_send_ud_batch(
        &self,
        qp: &UdQp,
        msgs: &[UdSend<'_>],
        mut done: impl FnMut(usize, Result<(), RdmaError>),
    ) {
        let mut i = 0;
        while i < msgs.len() {
            let dest = msgs[i].dest;
            if msgs[i].data.len() > MAX_UD_PAYLOAD {
                done(
                    i,
                    Err(RdmaError::Config(format!(
                        "UD payload of {} bytes exceeds the MTU of {MAX_UD_PAYLOAD}",
                        msgs[i].data.len()
                    ))),
                );
                i += 1;
                continue;
            }
            let mut j = i + 1;
            while j < msgs.len() && msgs[j].dest == dest && msgs[j].data.len() <= MAX_UD_PAYLOAD {
                j += 1;
            }
            let pkts: Vec<RocePacket<'_>> =
                msgs[i..j].iter().map(|m| self.ud_packet(qp, m)).collect();
            self.inner
                .send_packets_each(qp.gid(), dest.dgid, &pkts, |k, r| {
                    if r.is_ok() {
                        bump(&qp.counters.tx_messages);
                    }
                    done(i + k, r);
                });
            i = j;
        }
    }

    /// The packet of a UD message from `qp` (its next PSN).
    fn ud_packet<'a>(&self, qp: &UdQp, m: &UdSend<'a>) -> RocePacket<'a> {
        let pad = rdma_wire::padding_for(m.data.len());
        RocePacket {
            bth: Bth {
                opcode: if m.imm.is_some() {
                    opcode::UD_SEND_ONLY_WITH_IMMEDIATE
                } else {
                    opcode::UD_SEND_ONLY
                },
                p_key: self.inner.cfg.p_key,
                dest_qp: m.dest.dqpn,
                psn: qp.next_psn(),
                pad_count: pad.len() as u8,
                ..Bth::default()
            },
            deth: Some(Deth {
                q_key: m.dest.qkey,
                src_qp: qp.qpn(),
            }),
            reth: None,
            atomic_eth: None,
            aeth: None,
            atomic_ack_eth: None,
            imm_dt: m.imm.map(|v| ImmDt(v.to_be_bytes())),
            ieth: None,
            payload: m.data,
            padding: pad,
            icrc: 0,
        }
    }

    /// Sends `pkts` in order from `sgid` (an address of this port) to `dgid`; each run of
    /// equal-size packets (its last may be shorter) leaves in one UDP GSO send.
    pub(crate) fn send_packets(
        &self,
        sgid: Gid,
        dgid: Gid,
        pkts: &[RocePacket<'_>],
    ) -> Result<(), RdmaError> {
        self.inner.send_packets(sgid, dgid, pkts)
    }

    /// Creates an RC QP bound to `gid` using the regions of `mrs`, with timers on `clock`.
    pub fn create_rc_qp(
        &self,
        gid: Gid,
        mrs: Arc<crate::rc::MrTable>,
        clock: Arc<dyn crate::rc::Clock>,
    ) -> Arc<crate::rc::RcQp> {
        let depth = self.inner.cfg.ud_queue_depth;
        let port = self.clone();
        self.add_qp(|qpn| {
            let core = crate::rc::RcCore::new(qpn, mrs, depth, depth);
            crate::rc::RcQp::new(qpn, gid, port, core, clock)
        })
    }

    /// The port's P_Key.
    pub fn p_key(&self) -> u16 {
        self.inner.cfg.p_key
    }

    /// Counters.
    pub fn stats(&self) -> PortStats {
        self.inner.counters.snapshot()
    }

    /// Sends a raw UDP payload from the socket of `from` (tests use it to inject hostile
    /// packets).
    pub fn send_raw(
        &self,
        from: Ipv4Addr,
        to: SocketAddr,
        datagram: &[u8],
    ) -> Result<(), RdmaError> {
        let s = self
            .inner
            .sockets
            .read()
            .get(&from)
            .cloned()
            .ok_or(RdmaError::NotLocalGid(gid_v4(from)))?;
        s.socket
            .send_to(datagram, to)
            .map(|_| ())
            .map_err(|e| RdmaError::io(format!("sending to {to}"), e))
    }

    /// Stops the receive threads, closes the sockets and drops the GSI handler and the QPs
    /// (breaking reference cycles).
    pub fn shutdown(&self) {
        self.inner.stop.store(true, Ordering::SeqCst);
        let sockets: Vec<Arc<AddrSocket>> = {
            let _g = self.inner.claim_lock.lock();
            self.inner.sockets.write().drain().map(|(_, s)| s).collect()
        };
        for s in sockets {
            s.stop();
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

    fn claim_gid(&self, gid: Gid) -> Result<(), RdmaError> {
        SoftPort::claim_gid(self, gid)
    }

    fn release_gid(&self, gid: Gid) {
        SoftPort::release_gid(self, gid);
    }
}

/// Encodes a RoCEv2 packet as the UDP payload (BTH … ICRC) a port sends from `sgid`'s
/// socket (UDP port `src_port`) to `dgid`'s port `dst_port`, with the ICRC over the IPv4 and
/// UDP headers the kernel will write (identification 0, DF; see [`sock`]).
pub fn encode_datagram(
    sgid: Gid,
    dgid: Gid,
    src_port: u16,
    dst_port: u16,
    pkt: &RocePacket<'_>,
    out: &mut [u8],
) -> Result<usize, RdmaError> {
    let (s, d) = (gid_ipv4(sgid)?, gid_ipv4(dgid)?);
    Ok(pkt.encode_for_udp_socket(s.into(), d.into(), src_port, dst_port, out)?)
}

thread_local! {
    /// A sending thread's GSO run buffer, and the ICRC effects of the IP identification for
    /// the packet lengths it last sent.
    static GSO_BUF: std::cell::RefCell<(Vec<u8>, [rdma_wire::icrc::IpIdEffect; 2])> =
        std::cell::RefCell::new((
            vec![0; sock::MAX_GSO_BYTES],
            [rdma_wire::icrc::IpIdEffect::new(0); 2],
        ));
}

/// How many packets from `pkts[i]` on leave in one GSO send: the following packets of the
/// same size, and one shorter last one, within the kernel's limits.
fn gso_run(pkts: &[RocePacket<'_>], i: usize) -> usize {
    let seg = pkts[i].wire_len();
    let max = (sock::MAX_GSO_BYTES / seg.max(1)).min(sock::MAX_GSO_SEGMENTS);
    let mut j = i + 1;
    while j < pkts.len() && j - i < max && pkts[j].wire_len() == seg {
        j += 1;
    }
    // A shorter last one, unless it starts a run of its own (a WRITE FIRST, which carries
    // a RETH, then MIDDLEs: FIRST alone, the MIDDLEs and LAST in one run).
    let ends = |k: usize| k + 1 == pkts.len() || pkts[k + 1].wire_len() != pkts[k].wire_len();
    if j < pkts.len() && j - i < max && pkts[j].wire_len() < seg && ends(j) {
        j += 1;
    }
    j - i
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
        let src = gid_ipv4(sgid)?;
        let dst = gid_ipv4(dgid)?;
        let s = self.socket_of(sgid, src)?;
        let port = self.cfg.udp_port;
        let mut buf = [0u8; MAX_DATAGRAM];
        let n = pkt.encode_for_udp_socket(src.into(), dst.into(), port, port, &mut buf)?;
        if let Some(p) = &self.pcap {
            p.write_packet(src, dst, port, port, 0, &buf[..n]);
        }
        let to = SocketAddrV4::new(dst, port);
        s.socket
            .send_to(&buf[..n], to)
            .map_err(|e| RdmaError::io(format!("sending to {to}"), e))?;
        Ok(())
    }

    fn socket_of(&self, sgid: Gid, src: Ipv4Addr) -> Result<Arc<AddrSocket>, RdmaError> {
        self.sockets
            .read()
            .get(&src)
            .cloned()
            .ok_or(RdmaError::NotLocalGid(sgid))
    }

    /// See [`SoftPort::send_packets`]. The `k`-th packet of a GSO run carries IPv4
    /// identification `k` (see [`rdma_wire::icrc::IpIdEffect`]), so its ICRC is computed
    /// for that header: receivers that check the real header (Linux `rdma_rxe`, RNICs)
    /// accept it, and Ferry's receivers get the run coalesced and know `k`.
    fn send_packets(&self, sgid: Gid, dgid: Gid, pkts: &[RocePacket<'_>]) -> Result<(), RdmaError> {
        let mut first_err = None;
        self.send_packets_each(sgid, dgid, pkts, |_, r| {
            if let Err(e) = r {
                first_err.get_or_insert(e);
            }
        });
        first_err.map_or(Ok(()), Err)
    }

    /// [`PortInner::send_packets`], calling `done(k, result)` for each packet (a GSO send
    /// goes out whole or not at all: a refused run is sent again one by one).
    fn send_packets_each(
        &self,
        sgid: Gid,
        dgid: Gid,
        pkts: &[RocePacket<'_>],
        mut done: impl FnMut(usize, Result<(), RdmaError>),
    ) {
        let mut i = 0;
        while i < pkts.len() {
            let run = gso_run(pkts, i);
            let r = if run > 1 {
                self.try_send_run(sgid, dgid, &pkts[i..i + run])
            } else {
                Err(None)
            };
            match r {
                Ok(()) => {
                    bump(&self.counters.tx_gso_runs);
                    for k in i..i + run {
                        bump(&self.counters.tx_datagrams);
                        done(k, Ok(()));
                    }
                }
                // One by one: a single packet, or a run the kernel refused as a whole.
                Err(why) => {
                    if let Some(e) = why {
                        tracing::debug!(%sgid, error = &e as &dyn std::error::Error, "GSO send refused, sending one by one");
                    }
                    for (k, p) in pkts.iter().enumerate().skip(i).take(run) {
                        done(k, self.send_packet(sgid, dgid, p));
                    }
                }
            }
            i += run;
        }
    }

    /// One GSO send of `run` (see [`gso_run`]); `Err(Some)` when the kernel refused it
    /// (GSO is then off for the socket), `Err(None)` when it was not tried.
    fn try_send_run(
        &self,
        sgid: Gid,
        dgid: Gid,
        run: &[RocePacket<'_>],
    ) -> Result<(), Option<std::io::Error>> {
        let (Ok(src), Ok(dst)) = (gid_ipv4(sgid), gid_ipv4(dgid)) else {
            return Err(None);
        };
        let Ok(s) = self.socket_of(sgid, src) else {
            return Err(None);
        };
        if !s.gso.load(Ordering::Relaxed) {
            return Err(None);
        }
        let port = self.cfg.udp_port;
        let seg = run[0].wire_len();
        let Ok(seg16) = u16::try_from(seg) else {
            return Err(None);
        };
        GSO_BUF.with(|b| {
            let mut b = b.borrow_mut();
            let (buf, effects) = &mut *b;
            let mut off = 0;
            for (k, p) in run.iter().enumerate() {
                let len = p.wire_len();
                let out = buf.get_mut(off..off + len).ok_or(None)?;
                let n = p
                    .encode_for_udp_socket(src.into(), dst.into(), port, port, out)
                    .map_err(|_| None)?;
                if k > 0 {
                    let ib_len = n - rdma_wire::icrc::ICRC_LEN;
                    let e = match effects.iter().find(|e| e.ib_len() == ib_len) {
                        Some(e) => *e,
                        None => {
                            let e = rdma_wire::icrc::IpIdEffect::new(ib_len);
                            effects.rotate_right(1);
                            effects[0] = e;
                            e
                        }
                    };
                    let icrc = &mut out[ib_len..n];
                    let v =
                        u32::from_le_bytes([icrc[0], icrc[1], icrc[2], icrc[3]]) ^ e.of(k as u16);
                    icrc.copy_from_slice(&v.to_le_bytes());
                }
                if let Some(pc) = &self.pcap {
                    pc.write_packet(src, dst, port, port, k as u16, &out[..n]);
                }
                off += n;
            }
            let to = SocketAddrV4::new(dst, port);
            sock::send_segments(&s.socket, &buf[..off], seg16, to).map_err(|e| {
                s.gso.store(false, Ordering::Relaxed);
                Some(e)
            })
        })
    }

    fn receive_loop(&self, s: &AddrSocket) {
        let mut buf = vec![0u8; sock::RECV_BUFFER];
        let mut effect = None;
        while !self.stop.load(Ordering::Relaxed) && !s.stop.load(Ordering::Relaxed) {
            match sock::recv(&s.socket, &mut buf) {
                Ok(r) => self.on_received(&buf[..r.len], &r, s.addr, &mut effect),
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock
                            | std::io::ErrorKind::TimedOut
                            | std::io::ErrorKind::Interrupted
                    ) => {}
                Err(e) => {
                    tracing::warn!(addr = %s.addr, error = &e as &dyn std::error::Error, "receive failed");
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
        }
    }

    /// Splits what one receive got into datagrams (a coalesced run into its segments) and
    /// checks each.
    fn on_received(
        &self,
        data: &[u8],
        r: &sock::Received,
        local: Ipv4Addr,
        effect: &mut Option<rdma_wire::icrc::IpIdEffect>,
    ) {
        let c = &self.counters;
        let Some(from) = r.from else {
            bump(&c.rx_datagrams);
            bump(&c.rx_not_ipv4);
            return;
        };
        match r.segment {
            Some(seg) if !r.truncated => {
                bump(&c.rx_gro_runs);
                for (k, d) in data.chunks(seg).enumerate() {
                    self.on_datagram(d, from, local, k as u16, effect);
                }
            }
            _ if r.truncated || data.len() > MAX_DATAGRAM => {
                bump(&c.rx_datagrams);
                bump(&c.rx_malformed);
            }
            _ => self.on_datagram(data, from, local, 0, effect),
        }
    }

    /// Checks and dispatches one datagram that arrived on the socket of `local` from `from`
    /// (`k`-th of a coalesced run: its likely IPv4 identification). Everything from the
    /// network is hostile: every failure is a counted drop, nothing panics.
    fn on_datagram(
        &self,
        roce: &[u8],
        from: SocketAddrV4,
        local: Ipv4Addr,
        k: u16,
        effect: &mut Option<rdma_wire::icrc::IpIdEffect>,
    ) {
        let c = &self.counters;
        bump(&c.rx_datagrams);
        if roce.len() > MAX_DATAGRAM {
            bump(&c.rx_malformed);
            return;
        }
        let port = self.cfg.udp_port;
        let ip_id = match rdma_wire::icrc::verify_for_udp_socket_ip_id_hint(
            (*from.ip()).into(),
            local.into(),
            from.port(),
            port,
            roce,
            k,
            effect,
        ) {
            Ok(id) => id,
            Err(WireError::IcrcMismatch { stored, computed }) => {
                bump(&c.rx_bad_icrc);
                tracing::debug!(%from, "bad ICRC {stored:#010x} (no IP identification gives it; {computed:#010x} with 0)");
                return;
            }
            Err(_) => {
                bump(&c.rx_malformed);
                return;
            }
        };
        if let Some(p) = &self.pcap {
            p.write_packet(*from.ip(), local, from.port(), port, ip_id, roce);
        }
        let (sgid, dgid) = (gid_v4(*from.ip()), gid_v4(local));
        let Ok(pkt) = RocePacket::parse(roce) else {
            bump(&c.rx_malformed);
            return;
        };
        match opcode::transport(pkt.bth.opcode) {
            opcode::Transport::Ud if pkt.deth.is_some() => {}
            opcode::Transport::Rc if pkt.bth.dest_qp != GSI_QP => {}
            _ => {
                bump(&c.rx_unsupported_transport);
                return;
            }
        }
        if !p_key_matches(pkt.bth.p_key, self.cfg.p_key) {
            bump(&c.rx_bad_pkey);
            return;
        }
        let grh = grh_area(sgid, dgid, roce.len());
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
                sgid,
                dgid,
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
            sgid,
            dgid,
            src_port: from.port(),
            grh,
            packet: &pkt,
        });
        match verdict {
            RxVerdict::Accepted => bump(&c.rx_ud),
            RxVerdict::Rc => bump(&c.rx_rc),
            RxVerdict::BadQKey => bump(&c.rx_bad_qkey),
            RxVerdict::WrongDgid => bump(&c.rx_wrong_dgid),
            RxVerdict::QueueFull => bump(&c.rx_queue_full),
            RxVerdict::WrongTransport => bump(&c.rx_unsupported_transport),
            RxVerdict::WrongSource => bump(&c.rx_wrong_source),
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

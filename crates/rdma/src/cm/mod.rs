//! CM endpoints: the connection-management state machines of one port GID, usable by a VM's
//! agent (behind the multiplexer), by tests, and by a bare-metal peer (directly on a port).
//!
//! Active side: [`CmEndpoint::connect`] sends a REQ, retries it on the response timeout,
//! waits longer after an MRA, completes on the REP by sending an RTU, and after the last
//! retry sends a REJ with reason 4 (timeout, remote ID 0) as Linux does when it destroys a
//! connecting ID. Passive side: a listener per service ID ([`CmEndpoint::listen`]) answers a
//! REQ with a REP at once ([`AcceptMode::Auto`]) or after the application decides
//! ([`AcceptMode::Manual`], [`CmEndpoint::accept`]); a duplicate REQ while the application is
//! slow is answered with an MRA, one after the REP with the REP again; no RTU after the last
//! REP retry → REJ (timeout). Teardown: DREQ (retried) → DREP → time-wait. SIDR:
//! [`CmEndpoint::sidr_resolve`] and SIDR_REP from listeners. Connections are keyed by our
//! local communication ID and, for duplicates and REJ with remote ID 0, by (remote GID,
//! remote ID) — so two peers picking the same ID never collide.
//!
//! The endpoint sends through a [`Qp1Tx`] (the multiplexer's per-VM sender, or a port) and is
//! fed with [`CmEndpoint::on_mad`]. Timing comes from [`CmConfig`] (Linux defaults; tests use
//! short exponents). No lock is held while sending. The handler of each received message is in
//! `handlers.rs`; this file keeps the endpoint's API, its state and its timers (about 880 lines:
//! the public API documents every call, and splitting the state from the calls that lock it
//! would scatter one lock's invariants over two files).
pub mod clock;
mod connection;
mod handlers;
mod sidr;
pub mod timers;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crossbeam_channel::{Receiver, Sender};
use parking_lot::{Condvar, Mutex};
use rdma_wire::cm::{msg, reason, Dreq, Rej, Rep, Req, SidrReq};
use rdma_wire::mad::{attr, MadHeader};
use rdma_wire::{CmMessage, Gid, Mad, DEFAULT_P_KEY};
use serde::{Deserialize, Serialize};

pub use clock::{Clock, ManualClock, MonotonicClock};
pub use connection::{ConnInfo, ConnState};
pub use sidr::SidrInfo;
pub use timers::cm_timeout;

use crate::addr::{parse_grh, GRH_LEN};
use crate::counters::{bump, counters};
use crate::mux::{Backpressure, Qp1Sink};
use crate::port::{GsiHandler, GsiPacket, Qp1Tx};
use crate::RdmaError;
use connection::{Conn, Out, Wake};
use sidr::SidrOut;

/// Endpoint timing and identity.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CmConfig {
    /// CM response timeout exponent put in our REQs and used for our retries (Linux: 20).
    pub response_timeout: u8,
    /// Retries of REQ, REP, DREQ and SIDR_REQ (≤ 15; Linux: 15).
    pub max_retries: u8,
    /// Service timeout exponent announced in our MRAs (rdma_cm: 24).
    pub mra_service_timeout: u8,
    /// Time-wait after a disconnect.
    pub timewait: Duration,
    /// First communication ID to allocate (`None`: random, as Linux).
    pub first_comm_id: Option<u32>,
    /// P_Key put in REQs and SIDR_REQs.
    pub p_key: u16,
    /// Local CA GUID put in REQs and REPs.
    pub ca_guid: u64,
    /// Connections kept at most (any state, time-wait included): a REQ beyond it is dropped
    /// and counted (`table_full`), so spoofed REQs cannot grow the table without bound.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
}

fn default_max_connections() -> usize {
    4096
}

impl Default for CmConfig {
    fn default() -> CmConfig {
        CmConfig {
            response_timeout: timers::LINUX_RESPONSE_TIMEOUT,
            max_retries: timers::LINUX_MAX_RETRIES,
            mra_service_timeout: timers::LINUX_MRA_SERVICE_TIMEOUT,
            timewait: cm_timeout(timers::LINUX_RESPONSE_TIMEOUT),
            first_comm_id: None,
            p_key: DEFAULT_P_KEY,
            ca_guid: 0,
            max_connections: default_max_connections(),
        }
    }
}

impl CmConfig {
    /// Short timeouts for tests and benchmarks: response timeout 2^14 × 4.096 µs ≈ 67 ms,
    /// 4 retries, MRA service timeout ≈ 268 ms, time-wait 100 ms.
    pub fn fast() -> CmConfig {
        CmConfig {
            response_timeout: 14,
            max_retries: 4,
            mra_service_timeout: 16,
            timewait: Duration::from_millis(100),
            ..CmConfig::default()
        }
    }
}

/// How a listener answers REQs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum AcceptMode {
    /// Send the REP at once.
    Auto,
    /// Report [`CmEvent::ConnectRequest`]; the application calls [`CmEndpoint::accept`] or
    /// [`CmEndpoint::reject`].
    Manual,
    /// Reject every REQ with this reason.
    Reject(u16),
}

/// A listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListenOptions {
    /// QPN announced in REPs and SIDR_REPs.
    pub qpn: u32,
    /// Q_Key announced in SIDR_REPs.
    pub qkey: u32,
    /// REQ handling.
    pub accept: AcceptMode,
}

/// What the application is told.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum CmEvent {
    /// A REQ for a manual listener.
    ConnectRequest(ConnInfo),
    /// Connection established.
    Established(ConnInfo),
    /// Rejected by the other side.
    Rejected {
        /// Our ID.
        local_comm_id: u32,
        /// REJ reason.
        reason: u16,
    },
    /// Gave up after the last retry.
    TimedOut {
        /// Our ID.
        local_comm_id: u32,
    },
    /// Disconnected (DREQ or DREP received, or DREQ retries exhausted).
    Disconnected {
        /// Our ID.
        local_comm_id: u32,
    },
    /// Time-wait over; the ID is free.
    TimewaitExit {
        /// Our ID.
        local_comm_id: u32,
    },
}

/// Parameters of [`CmEndpoint::connect`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectParams {
    /// Service ID.
    pub service_id: u64,
    /// Our QPN.
    pub qpn: u32,
    /// REQ private data (≤ 92 bytes; rdma_cm puts its header in the first 36).
    pub private_data: Vec<u8>,
}

counters! {
    /// Endpoint counters.
    CmCounters => CmStats {
        /// MADs received.
        received,
        /// MADs sent.
        sent,
        /// Sends that failed.
        send_errors,
        /// Dropped: not a well-formed CM MAD.
        malformed,
        /// Dropped: addressed to another GID (must stay 0 behind the multiplexer).
        wrong_dgid,
        /// MADs naming a communication ID we do not have.
        unknown_comm_id,
        /// Duplicate REQs received.
        duplicate_req,
        /// Retransmissions (REQ, REP, DREQ, SIDR_REQ).
        retransmits,
        /// MRAs sent.
        mra_sent,
        /// MRAs received.
        mra_received,
        /// REJs sent.
        rej_sent,
        /// REJs received.
        rej_received,
        /// Connections established.
        established,
        /// Connections disconnected.
        disconnected,
        /// Connection attempts that timed out.
        timeouts,
        /// SIDR_REQs answered.
        sidr_answered,
        /// SIDR requests resolved.
        sidr_resolved,
        /// LAP/APR received (alternate paths are not supported by this endpoint).
        lap_apr,
        /// Events dropped because nobody read them.
        events_dropped,
        /// REQs dropped: the connection table was full.
        table_full,
        /// Timeouts a peer sent (REQ response timeout, MRA service timeout) beyond
        /// [`timers::MAX_PEER_TIMEOUT`], clamped.
        timeouts_clamped,
    }
}

struct State {
    conns: HashMap<u32, Conn>,
    by_remote: HashMap<(Gid, u32), u32>,
    listeners: HashMap<u64, ListenOptions>,
    sidr_out: HashMap<u32, SidrOut>,
    next_id: u32,
    next_tid: u32,
}

struct Inner {
    gid: Gid,
    cfg: CmConfig,
    tx: Arc<dyn Qp1Tx>,
    state: Mutex<State>,
    cond: Condvar,
    events_tx: Sender<CmEvent>,
    events_rx: Receiver<CmEvent>,
    stats: CmCounters,
    tid_hi: u64,
    stop: AtomicBool,
    /// Time for every CM timer.
    clock: Arc<dyn Clock>,
}

/// A CM endpoint for one GID. Cloning gives another handle.
#[derive(Clone)]
pub struct CmEndpoint {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for CmEndpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CmEndpoint")
            .field("gid", &self.inner.gid)
            .finish()
    }
}

fn seed(gid: Gid) -> u64 {
    let t = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos() as u64;
    let g = u128::from_be_bytes(gid.octets());
    let mut x = t ^ (g as u64) ^ ((g >> 64) as u64).rotate_left(17) ^ 0x9e37_79b9_7f4a_7c15;
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^ (x >> 33)
}

impl CmEndpoint {
    /// An endpoint for `gid` sending through `tx` on the real clock; starts its timer thread.
    pub fn new(gid: Gid, cfg: CmConfig, tx: Arc<dyn Qp1Tx>) -> CmEndpoint {
        Self::with_clock(gid, cfg, tx, Arc::new(MonotonicClock))
    }

    /// An endpoint whose timers run on `clock`; with a clock that does not drive timers (a
    /// [`ManualClock`]) no timer thread starts and [`CmEndpoint::run_timers`] fires them.
    pub fn with_clock(
        gid: Gid,
        cfg: CmConfig,
        tx: Arc<dyn Qp1Tx>,
        clock: Arc<dyn Clock>,
    ) -> CmEndpoint {
        let s = seed(gid);
        let first = cfg.first_comm_id.unwrap_or(s as u32);
        let (events_tx, events_rx) = crossbeam_channel::bounded(4096);
        let inner = Arc::new(Inner {
            gid: gid.canonical(),
            cfg,
            tx,
            state: Mutex::new(State {
                conns: HashMap::new(),
                by_remote: HashMap::new(),
                listeners: HashMap::new(),
                sidr_out: HashMap::new(),
                next_id: first,
                next_tid: 1,
            }),
            cond: Condvar::new(),
            events_tx,
            events_rx,
            stats: CmCounters::default(),
            tid_hi: (s >> 32) << 32,
            stop: AtomicBool::new(false),
            clock,
        });
        if !inner.clock.drives_timers() {
            return CmEndpoint { inner };
        }
        let weak = Arc::downgrade(&inner);
        let spawned = std::thread::Builder::new()
            .name(format!("cm-timer-{gid}"))
            .spawn(move || {
                sandbox::enter(sandbox::Kind::RdmaPort);
                timer_loop(weak)
            });
        if let Err(e) = spawned {
            tracing::error!(%gid, error = &e as &dyn std::error::Error, "cannot start the CM timer thread");
        }
        CmEndpoint { inner }
    }

    /// The endpoint's GID.
    pub fn gid(&self) -> Gid {
        self.inner.gid
    }

    /// The configuration.
    pub fn config(&self) -> &CmConfig {
        &self.inner.cfg
    }

    /// Listens on a service ID (RC REQs and SIDR_REQs).
    pub fn listen(&self, service_id: u64, opts: ListenOptions) {
        self.inner.state.lock().listeners.insert(service_id, opts);
    }

    /// Events (connection requests, established, rejected, disconnected, ...).
    pub fn events(&self) -> Receiver<CmEvent> {
        self.inner.events_rx.clone()
    }

    /// Counters.
    pub fn stats(&self) -> CmStats {
        self.inner.stats.snapshot()
    }

    /// State of a connection by our ID.
    pub fn connection_state(&self, local_comm_id: u32) -> Option<ConnState> {
        self.inner
            .state
            .lock()
            .conns
            .get(&local_comm_id)
            .map(|c| c.state)
    }

    /// Number of connections (any state, time-wait included).
    pub fn connection_count(&self) -> usize {
        self.inner.state.lock().conns.len()
    }

    /// Fires the timers due at the clock's current time (retransmissions, timeouts, the end
    /// of time-wait) and sends what they produce. The timer thread does this on the real
    /// clock; with a [`ManualClock`] the test that advanced it calls this.
    pub fn run_timers(&self) {
        let inner = &self.inner;
        let mut out = Out::default();
        {
            let mut st = inner.state.lock();
            inner.on_timers(&mut st, inner.clock.now(), &mut out);
        }
        inner.cond.notify_all();
        inner.send_all(out);
    }

    /// Stops the timer thread; outstanding operations fail by their own timeouts.
    pub fn shutdown(&self) {
        self.inner.stop.store(true, Ordering::SeqCst);
        self.inner.cond.notify_all();
    }

    /// Starts a connection; the receiver yields the result (established, rejected, timed
    /// out). Returns our communication ID too.
    pub fn connect_async(
        &self,
        dgid: Gid,
        p: ConnectParams,
    ) -> (u32, Receiver<Result<ConnInfo, RdmaError>>) {
        let (wtx, wrx) = crossbeam_channel::bounded(1);
        let inner = &self.inner;
        let cfg = &inner.cfg;
        let now = inner.clock.now();
        let dgid = dgid.canonical();
        let mut st = inner.state.lock();
        let id = alloc_id(&mut st);
        let tid = inner.tid(&mut st);
        let mut req = Req {
            hdr: MadHeader::cm(attr::REQ, tid),
            local_comm_id: id,
            service_id: p.service_id,
            local_ca_guid: cfg.ca_guid,
            local_qpn: p.qpn,
            responder_resources: 1,
            initiator_depth: 1,
            remote_cm_response_timeout: cfg.response_timeout,
            starting_psn: (tid as u32) & rdma_wire::MAX_U24,
            local_cm_response_timeout: cfg.response_timeout,
            retry_count: 7,
            p_key: cfg.p_key,
            path_mtu: 3,
            rnr_retry_count: 7,
            max_cm_retries: cfg.max_retries.min(15),
            ..Req::default()
        };
        req.primary_path.local_lid = 0xffff;
        req.primary_path.remote_lid = 0xffff;
        req.primary_path.local_gid = inner.gid;
        req.primary_path.remote_gid = dgid;
        req.primary_path.hop_limit = 64;
        req.primary_path.local_ack_timeout = 14;
        let n = p.private_data.len().min(req.private_data.len());
        req.private_data[..n].copy_from_slice(&p.private_data[..n]);
        let mad = Box::new(req.to_mad());
        let mut conn = Conn {
            local_id: id,
            remote_id: 0,
            remote_gid: dgid,
            active: true,
            state: ConnState::ReqSent,
            service_id: p.service_id,
            tid,
            local_qpn: p.qpn,
            remote_qpn: 0,
            local_psn: (tid as u32) & rdma_wire::MAX_U24,
            remote_psn: 0,
            path_mtu: req.path_mtu,
            private_data: Vec::new(),
            last: None,
            retries_left: 0,
            max_retries: cfg.max_retries.min(15),
            timeout: cm_timeout(cfg.response_timeout),
            deadline: None,
            waiter: Some(wtx),
            disc_waiter: None,
        };
        conn.arm(now, mad.clone());
        st.conns.insert(id, conn);
        drop(st);
        inner.cond.notify_all();
        inner.send_all(Out::one(dgid, mad));
        (id, wrx)
    }

    /// Connects and waits (at most `wait`) for the outcome.
    pub fn connect(
        &self,
        dgid: Gid,
        p: ConnectParams,
        wait: Duration,
    ) -> Result<ConnInfo, RdmaError> {
        let (_, rx) = self.connect_async(dgid, p);
        rx.recv_timeout(wait).unwrap_or(Err(RdmaError::Timeout {
            what: "connect",
            retries: self.inner.cfg.max_retries,
        }))
    }

    /// Accepts a connection request of a manual listener: sends the REP.
    pub fn accept(&self, local_comm_id: u32) -> Result<(), RdmaError> {
        self.accept_with_qpn(local_comm_id, None)
    }

    /// [`CmEndpoint::accept`] announcing `qpn` (the connection's own RC queue pair) instead
    /// of the listener's.
    pub fn accept_with_qpn(&self, local_comm_id: u32, qpn: Option<u32>) -> Result<(), RdmaError> {
        let inner = &self.inner;
        let mut st = inner.state.lock();
        let conn = st
            .conns
            .get_mut(&local_comm_id)
            .ok_or_else(|| RdmaError::Cm(format!("accept: no connection {local_comm_id:#x}")))?;
        if !matches!(conn.state, ConnState::ReqRcvd | ConnState::MraReqSent) {
            return Err(RdmaError::Cm(format!(
                "accept: connection {local_comm_id:#x} is {:?}",
                conn.state
            )));
        }
        if let Some(q) = qpn {
            conn.local_qpn = q & rdma_wire::MAX_U24;
        }
        let mut out = Out::default();
        inner.send_rep(conn, inner.clock.now(), &mut out);
        drop(st);
        inner.cond.notify_all();
        inner.send_all(out);
        Ok(())
    }

    /// Rejects a connection request of a manual listener.
    pub fn reject(&self, local_comm_id: u32, why: u16) -> Result<(), RdmaError> {
        let inner = &self.inner;
        let mut st = inner.state.lock();
        let conn = st
            .conns
            .remove(&local_comm_id)
            .ok_or_else(|| RdmaError::Cm(format!("reject: no connection {local_comm_id:#x}")))?;
        st.by_remote.remove(&(conn.remote_gid, conn.remote_id));
        let rej = inner.rej(conn.tid, conn.local_id, conn.remote_id, msg::REQ, why);
        drop(st);
        inner.send_all(Out::one(conn.remote_gid, rej));
        Ok(())
    }

    /// Disconnects an established connection: DREQ (retried) until DREP, then time-wait.
    /// Waits at most `wait`.
    pub fn disconnect(&self, local_comm_id: u32, wait: Duration) -> Result<(), RdmaError> {
        let inner = &self.inner;
        let (wtx, wrx) = crossbeam_channel::bounded(1);
        let mut st = inner.state.lock();
        let tid = inner.tid(&mut st);
        let conn = st.conns.get_mut(&local_comm_id).ok_or_else(|| {
            RdmaError::Cm(format!("disconnect: no connection {local_comm_id:#x}"))
        })?;
        if conn.state != ConnState::Established {
            return Err(RdmaError::Cm(format!(
                "disconnect: connection {local_comm_id:#x} is {:?}",
                conn.state
            )));
        }
        let dreq = Dreq {
            hdr: MadHeader::cm(attr::DREQ, tid),
            local_comm_id: conn.local_id,
            remote_comm_id: conn.remote_id,
            remote_qpn: conn.remote_qpn,
            ..Dreq::default()
        };
        let mad = Box::new(dreq.to_mad());
        conn.state = ConnState::DreqSent;
        conn.tid = tid;
        conn.timeout = cm_timeout(inner.cfg.response_timeout);
        conn.max_retries = inner.cfg.max_retries.min(15);
        conn.arm(inner.clock.now(), mad.clone());
        conn.disc_waiter = Some(wtx);
        let dgid = conn.remote_gid;
        drop(st);
        inner.cond.notify_all();
        inner.send_all(Out::one(dgid, mad));
        wrx.recv_timeout(wait).unwrap_or(Err(RdmaError::Timeout {
            what: "disconnect",
            retries: inner.cfg.max_retries,
        }))
    }

    /// Resolves a service on `dgid` with SIDR (waits at most `wait`).
    pub fn sidr_resolve(
        &self,
        dgid: Gid,
        service_id: u64,
        private_data: &[u8],
        wait: Duration,
    ) -> Result<SidrInfo, RdmaError> {
        let inner = &self.inner;
        let (wtx, wrx) = crossbeam_channel::bounded(1);
        let dgid = dgid.canonical();
        let mut st = inner.state.lock();
        let tid = inner.tid(&mut st);
        let mut request_id = alloc_id(&mut st);
        while st.sidr_out.contains_key(&request_id) {
            request_id = alloc_id(&mut st);
        }
        let mut req = SidrReq {
            hdr: MadHeader::cm(attr::SIDR_REQ, tid),
            request_id,
            p_key: inner.cfg.p_key,
            service_id,
            ..SidrReq::default()
        };
        let n = private_data.len().min(req.private_data.len());
        req.private_data[..n].copy_from_slice(&private_data[..n]);
        let mad = Box::new(req.to_mad());
        let timeout = cm_timeout(inner.cfg.response_timeout);
        st.sidr_out.insert(
            request_id,
            SidrOut {
                dgid,
                service_id,
                mad: mad.clone(),
                retries_left: inner.cfg.max_retries.min(15),
                timeout,
                deadline: inner.clock.now() + timeout,
                waiter: wtx,
            },
        );
        drop(st);
        inner.cond.notify_all();
        inner.send_all(Out::one(dgid, mad));
        let r = wrx.recv_timeout(wait).unwrap_or(Err(RdmaError::Timeout {
            what: "SIDR",
            retries: inner.cfg.max_retries,
        }));
        inner.state.lock().sidr_out.remove(&request_id);
        r
    }

    /// Feeds one received MAD (from `sgid` to `dgid`).
    pub fn on_mad(&self, sgid: Gid, dgid: Gid, mad: &[u8]) {
        self.inner.on_mad(sgid.canonical(), dgid.canonical(), mad);
    }
}

fn alloc_id(st: &mut State) -> u32 {
    loop {
        let id = st.next_id;
        st.next_id = st.next_id.wrapping_add(1);
        if id != 0 && !st.conns.contains_key(&id) {
            return id;
        }
    }
}

impl Inner {
    fn tid(&self, st: &mut State) -> u64 {
        st.next_tid = st.next_tid.wrapping_add(1);
        self.tid_hi | u64::from(st.next_tid)
    }

    fn event(&self, e: CmEvent) {
        if self.events_tx.try_send(e).is_err() {
            bump(&self.stats.events_dropped);
        }
    }

    fn send_all(&self, out: Out) {
        for (dgid, mad) in out.mads {
            match self.tx.send_gsi(self.gid, dgid, &mad) {
                Ok(()) => bump(&self.stats.sent),
                Err(e) => {
                    bump(&self.stats.send_errors);
                    tracing::debug!(gid = %self.gid, %dgid, error = &e as &dyn std::error::Error, "CM send failed");
                }
            }
        }
        for w in out.wakes {
            match w {
                Wake::Conn(tx, r) => {
                    let _ = tx.try_send(r);
                }
                Wake::Done(tx) => {
                    let _ = tx.try_send(Ok(()));
                }
            }
        }
    }

    fn rej(&self, tid: u64, local: u32, remote: u32, rejected: u8, why: u16) -> Box<Mad> {
        bump(&self.stats.rej_sent);
        let mut r = Rej {
            hdr: MadHeader::cm(attr::REJ, tid),
            local_comm_id: local,
            remote_comm_id: remote,
            message_rejected: rejected,
            reason: why,
            ..Rej::default()
        };
        if why == reason::TIMEOUT {
            // Linux puts the local CA GUID in the ARI of a timeout REJ.
            r.rejected_info_length = 8;
            r.ari[..8].copy_from_slice(&self.cfg.ca_guid.to_be_bytes());
        }
        Box::new(r.to_mad())
    }

    fn send_rep(&self, conn: &mut Conn, now: Instant, out: &mut Out) {
        let rep = Rep {
            hdr: MadHeader::cm(attr::REP, conn.tid),
            local_comm_id: conn.local_id,
            remote_comm_id: conn.remote_id,
            local_qpn: conn.local_qpn,
            starting_psn: conn.local_id & rdma_wire::MAX_U24,
            responder_resources: 1,
            initiator_depth: 1,
            target_ack_delay: 15,
            rnr_retry_count: 7,
            local_ca_guid: self.cfg.ca_guid,
            ..Rep::default()
        };
        let mad = Box::new(rep.to_mad());
        conn.state = ConnState::RepSent;
        conn.arm(now, mad.clone());
        out.push((conn.remote_gid, mad));
    }

    fn on_mad(&self, sgid: Gid, dgid: Gid, mad: &[u8]) {
        bump(&self.stats.received);
        if dgid != self.gid {
            bump(&self.stats.wrong_dgid);
            tracing::warn!(gid = %self.gid, %dgid, "MAD for another GID");
            return;
        }
        let m = match CmMessage::parse_mad(mad) {
            Ok(m) => m,
            Err(e) => {
                bump(&self.stats.malformed);
                tracing::debug!(gid = %self.gid, error = &e as &dyn std::error::Error, "malformed CM MAD");
                return;
            }
        };
        let now = self.clock.now();
        let mut out = Out::default();
        {
            let mut st = self.state.lock();
            self.handle(&mut st, sgid, &m, now, &mut out);
        }
        self.cond.notify_all();
        self.send_all(out);
    }

    fn handle(&self, st: &mut State, sgid: Gid, m: &CmMessage, now: Instant, out: &mut Out) {
        match m {
            CmMessage::Req(r) => self.on_req(st, sgid, r, now, out),
            CmMessage::Rep(r) => self.on_rep(st, sgid, r, out),
            CmMessage::Rtu(r) => self.on_rtu(st, sgid, r),
            CmMessage::Mra(r) => self.on_mra(st, sgid, r, now),
            CmMessage::Rej(r) => self.on_rej(st, sgid, r, out),
            CmMessage::Dreq(r) => self.on_dreq(st, sgid, r, now, out),
            CmMessage::Drep(r) => self.on_drep(st, sgid, r, now, out),
            CmMessage::SidrReq(r) => self.on_sidr_req(st, sgid, r, out),
            CmMessage::SidrRep(r) => self.on_sidr_rep(st, sgid, r),
            CmMessage::Lap(_) | CmMessage::Apr(_) => bump(&self.stats.lap_apr),
        }
    }

    /// Handles expired timers; returns the next deadline.
    fn on_timers(&self, st: &mut State, now: Instant, out: &mut Out) -> Option<Instant> {
        let expired: Vec<u32> = st
            .conns
            .values()
            .filter(|c| c.deadline.is_some_and(|d| d <= now))
            .map(|c| c.local_id)
            .collect();
        for id in expired {
            let Some(c) = st.conns.get_mut(&id) else {
                continue;
            };
            match c.state {
                ConnState::ReqSent
                | ConnState::MraReqRcvd
                | ConnState::RepSent
                | ConnState::DreqSent
                    if c.retries_left > 0 =>
                {
                    c.retries_left -= 1;
                    c.deadline = Some(now + c.timeout);
                    if let Some(l) = &c.last {
                        bump(&self.stats.retransmits);
                        out.push((c.remote_gid, l.clone()));
                    }
                }
                ConnState::ReqSent | ConnState::MraReqRcvd | ConnState::RepSent => {
                    let Some(mut c) = st.conns.remove(&id) else {
                        continue;
                    };
                    st.by_remote.remove(&(c.remote_gid, c.remote_id));
                    let (remote, which) = if c.active {
                        (0, msg::REQ)
                    } else {
                        (c.remote_id, msg::REP)
                    };
                    out.push((
                        c.remote_gid,
                        self.rej(c.tid, c.local_id, remote, which, reason::TIMEOUT),
                    ));
                    bump(&self.stats.timeouts);
                    c.finish(
                        Err(RdmaError::Timeout {
                            what: if c.active { "REQ" } else { "REP" },
                            retries: c.max_retries,
                        }),
                        out,
                    );
                    self.event(CmEvent::TimedOut { local_comm_id: id });
                }
                ConnState::DreqSent => {
                    c.state = ConnState::TimeWait;
                    c.deadline = Some(now + self.cfg.timewait);
                    c.finish_disconnect(out);
                    bump(&self.stats.disconnected);
                    self.event(CmEvent::Disconnected { local_comm_id: id });
                }
                ConnState::TimeWait => {
                    if let Some(c) = st.conns.remove(&id) {
                        st.by_remote.remove(&(c.remote_gid, c.remote_id));
                    }
                    self.event(CmEvent::TimewaitExit { local_comm_id: id });
                }
                _ => c.deadline = None,
            }
        }
        let expired_sidr: Vec<u32> = st
            .sidr_out
            .iter()
            .filter(|(_, s)| s.deadline <= now)
            .map(|(k, _)| *k)
            .collect();
        for k in expired_sidr {
            let Some(s) = st.sidr_out.get_mut(&k) else {
                continue;
            };
            if s.retries_left > 0 {
                s.retries_left -= 1;
                s.deadline = now + s.timeout;
                bump(&self.stats.retransmits);
                out.push((s.dgid, s.mad.clone()));
            } else if let Some(s) = st.sidr_out.remove(&k) {
                bump(&self.stats.timeouts);
                let _ = s.waiter.try_send(Err(RdmaError::Timeout {
                    what: "SIDR",
                    retries: self.cfg.max_retries,
                }));
            }
        }
        st.conns
            .values()
            .filter_map(|c| c.deadline)
            .chain(st.sidr_out.values().map(|s| s.deadline))
            .min()
    }
}

fn timer_loop(weak: Weak<Inner>) {
    loop {
        let Some(inner) = weak.upgrade() else {
            return;
        };
        if inner.stop.load(Ordering::SeqCst) {
            return;
        }
        let mut out = Out::default();
        {
            let mut st = inner.state.lock();
            let now = inner.clock.now();
            let next = inner.on_timers(&mut st, now, &mut out);
            if out.is_empty() {
                let cap = Duration::from_millis(100);
                let wait = next.map_or(cap, |n| n.saturating_duration_since(now).min(cap));
                inner.cond.wait_for(&mut st, wait);
            }
        }
        inner.send_all(out);
    }
}

impl GsiHandler for CmEndpoint {
    fn on_gsi(&self, pkt: &GsiPacket<'_>) {
        self.on_mad(pkt.sgid, pkt.dgid, pkt.payload);
    }
}

/// A VM's virtual QP1 receive side feeding a CM endpoint (the simulated guest agent).
/// [`EndpointSink::set_receiving`]`(false)` models a guest that posts no receive buffers.
pub struct EndpointSink {
    ep: CmEndpoint,
    receiving: AtomicBool,
}

impl EndpointSink {
    /// A sink feeding `ep`, receiving.
    pub fn new(ep: CmEndpoint) -> EndpointSink {
        EndpointSink {
            ep,
            receiving: AtomicBool::new(true),
        }
    }

    /// Whether the guest has receive buffers posted.
    pub fn set_receiving(&self, on: bool) {
        self.receiving.store(on, Ordering::SeqCst);
    }
}

impl Qp1Sink for EndpointSink {
    fn deliver(&self, grh: &[u8; GRH_LEN], mad: &Mad) -> Result<(), Backpressure> {
        if !self.receiving.load(Ordering::SeqCst) {
            return Err(Backpressure);
        }
        match parse_grh(grh) {
            Some((sgid, dgid)) => self.ep.on_mad(sgid, dgid, mad),
            None => bump(&self.ep.inner.stats.malformed),
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;

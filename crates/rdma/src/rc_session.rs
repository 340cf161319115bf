//! RC data sessions between Ferry and RDMA endpoints over connections made rdma_cm-style
//! (REQ/REP/RTU): rdma-core's `rping` protocol, and SENDs echoed (like `ucmatose`). The
//! server is an agent serving many connections, one RC queue pair and region each.
//!
//! **rping** (`rping.c`, byte for byte): the client fills its start buffer with
//! `"rdma-ping-N: "` and a cycling alphabet, SENDs its address/rkey/size (16 bytes, big
//! endian: `struct rping_rdma_info`); the server RDMA READs it, SENDs "go ahead"; the client
//! SENDs the address of a second buffer; the server RDMA WRITEs what it read (up to the
//! string's NUL) into it and SENDs "go ahead"; the client compares both buffers. So a Ferry
//! client runs against Linux `rping -s` and Linux `rping -c` against a Ferry server.
//! **send**: the client SENDs messages (any size but 16, which is rping's), the server SENDs
//! each back, the client compares.
//!
//! Queue pairs use [`SESSION_MTU`] (the path MTU Ferry's CM announces in its REQ), a 100 ms
//! local ACK timeout and 7 retries.
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::select;
use parking_lot::Mutex;
use rdma_wire::Gid;
use serde::{Deserialize, Serialize};

use crate::cm::{CmEndpoint, CmEvent, ConnInfo};
use crate::port::SoftPort;
use crate::rc::{
    Access, Clock, Completion, MemoryRegion, MonotonicClock, MrTable, RcAttrs, RcQp, SendOp,
    SendWr, WcOpcode, WcStatus,
};
use crate::RdmaError;

pub mod tools;

/// Path MTU of session queue pairs: 1024, what Ferry's CM announces in its REQ (code 3).
pub const SESSION_MTU: usize = 1024;
/// Bytes of each side's session region (the largest message).
pub const SESSION_BUF: usize = 1 << 20;
/// Receives each side keeps posted.
const RECVS: u64 = 16;
/// RC connections one server serves at once (more are rejected: "no QP available").
pub const MAX_SESSIONS: usize = 64;
/// Base virtual address of session regions.
pub(crate) const BUF_IOVA: u64 = 0x7f00_0000_0000;

/// What a session exchanges.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RcMode {
    /// RDMA WRITE then RDMA READ of each message, verified (rping-like).
    Rping,
    /// SEND, echoed by SEND, verified (ucmatose-like).
    Send,
}

/// The attributes of a session QP for a connection the CM made: the REQ's path MTU
/// ([`SESSION_MTU`] when it names none).
pub fn session_attrs(info: &ConnInfo) -> RcAttrs {
    RcAttrs {
        path_mtu: crate::rc::mtu_of_code(info.path_mtu).unwrap_or(SESSION_MTU),
        dest_qpn: info.remote_qpn,
        // As Linux's CM does (cm.c: the active side's rq_psn is the REQ's starting PSN, the
        // passive side's is the REP's; see shared rping.pcap): the starting PSN a side
        // announces is the one it expects to receive, the other side's is the one it sends.
        rq_psn: info.local_psn,
        sq_psn: info.remote_psn,
        timeout_us: 100_000,
        ..RcAttrs::default()
    }
}

/// rping's `struct rping_rdma_info`: where a buffer is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct RpingInfo {
    buf: u64,
    rkey: u32,
    size: u32,
}

impl RpingInfo {
    const LEN: usize = 16;

    fn of(mr: &MemoryRegion, size: usize) -> RpingInfo {
        RpingInfo {
            buf: mr.iova(),
            rkey: mr.key(),
            size: size as u32,
        }
    }

    fn to_bytes(self) -> Vec<u8> {
        let mut v = Vec::with_capacity(Self::LEN);
        v.extend_from_slice(&self.buf.to_be_bytes());
        v.extend_from_slice(&self.rkey.to_be_bytes());
        v.extend_from_slice(&self.size.to_be_bytes());
        v
    }

    fn parse(b: &[u8]) -> Option<RpingInfo> {
        if b.len() != Self::LEN {
            return None;
        }
        Some(RpingInfo {
            buf: u64::from_be_bytes(b[0..8].try_into().ok()?),
            rkey: u32::from_be_bytes(b[8..12].try_into().ok()?),
            size: u32::from_be_bytes(b[12..16].try_into().ok()?),
        })
    }
}

/// What rping's client puts in its start buffer for ping `n` (`rping_test_client`): the
/// text `"rdma-ping-n: "`, then letters from `start` cycling through 'A'..='z', a NUL last.
pub fn rping_pattern(n: u64, size: usize) -> Vec<u8> {
    let mut b = format!("rdma-ping-{n}: ").into_bytes();
    b.truncate(size);
    let mut c = 65 + (n % 58) as u8;
    while b.len() < size {
        b.push(c);
        c = if c >= 122 { 65 } else { c + 1 };
    }
    if let Some(last) = b.last_mut() {
        *last = 0;
    }
    b
}

fn rc_err(what: impl Into<String>) -> RdmaError {
    RdmaError::Cm(what.into())
}

/// Where a server session is in rping's exchange.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Waiting for the client's start buffer.
    ReadAdv,
    /// Waiting for the client's second buffer; `len` bytes were read.
    WriteAdv { len: usize },
}

/// One connection of a server.
struct Session {
    qp: Arc<RcQp>,
    mr: Arc<MemoryRegion>,
    phase: Phase,
}

/// The server side: listens on an RC service of a CM endpoint (manual accept), gives each
/// connection its own RC QP and region, serves rping's exchange and echoes other SENDs.
pub struct RcServer {
    stop: Arc<AtomicBool>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl RcServer {
    /// Starts the agent for `service_id` on `endpoint` (whose GID is `gid`, on `port`). The
    /// endpoint must listen on the service with [`crate::cm::AcceptMode::Manual`]; the agent
    /// takes the endpoint's events.
    pub fn start(
        port: SoftPort,
        endpoint: CmEndpoint,
        service_id: u64,
        gid: Gid,
    ) -> Result<RcServer, RdmaError> {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::Builder::new()
            .name(format!("rc-server-{gid}"))
            .spawn(move || serve(&port, &endpoint, service_id, gid, &s))
            .map_err(|e| RdmaError::io("spawning an RC server thread", e))?;
        Ok(RcServer {
            stop,
            thread: Mutex::new(Some(thread)),
        })
    }

    /// Stops the agent and destroys its queue pairs.
    pub fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.lock().take() {
            let _ = t.join();
        }
    }
}

impl Drop for RcServer {
    fn drop(&mut self) {
        self.stop();
    }
}

fn serve(port: &SoftPort, ep: &CmEndpoint, service_id: u64, gid: Gid, stop: &AtomicBool) {
    let events = ep.events();
    let (ntx, nrx) = crossbeam_channel::bounded::<u32>(4 * MAX_SESSIONS);
    let mrs = Arc::new(MrTable::new(MAX_SESSIONS + 1));
    let clock: Arc<dyn Clock> = Arc::new(MonotonicClock::default());
    let mut sessions: HashMap<u32, Session> = HashMap::new();
    let mut by_qpn: HashMap<u32, u32> = HashMap::new();
    let close = |sessions: &mut HashMap<u32, Session>, by_qpn: &mut HashMap<u32, u32>, id| {
        if let Some(s) = sessions.remove(&id) {
            by_qpn.remove(&s.qp.qpn_value());
            s.qp.shutdown();
            let _ = port.destroy_qp(s.qp.qpn_value());
            mrs.deregister(s.mr.key());
        }
    };
    while !stop.load(Ordering::Relaxed) {
        select! {
            recv(events) -> ev => match ev {
                Ok(CmEvent::ConnectRequest(info)) if info.service_id == service_id => {
                    let id = info.local_comm_id;
                    match open(port, ep, &mrs, &clock, gid, &info, sessions.len(), &ntx) {
                        Ok(s) => {
                            by_qpn.insert(s.qp.qpn_value(), id);
                            sessions.insert(id, s);
                        }
                        Err(e) => tracing::debug!(%gid, "RC connection refused: {e}"),
                    }
                }
                Ok(
                    CmEvent::Disconnected { local_comm_id }
                    | CmEvent::TimedOut { local_comm_id }
                    | CmEvent::Rejected { local_comm_id, .. },
                ) => close(&mut sessions, &mut by_qpn, local_comm_id),
                Ok(_) => {}
                Err(_) => return,
            },
            recv(nrx) -> q => {
                let Some(s) = q.ok().and_then(|q| by_qpn.get(&q)).and_then(|id| sessions.get_mut(id)) else {
                    continue;
                };
                while let Some(wc) = s.qp.poll() {
                    answer(s, &wc);
                }
            },
            default(Duration::from_millis(50)) => {}
        }
    }
    let ids: Vec<u32> = sessions.keys().copied().collect();
    for id in ids {
        close(&mut sessions, &mut by_qpn, id);
    }
}

/// Makes the QP and region of a requested connection, ready before the REP leaves.
#[allow(clippy::too_many_arguments)]
fn open(
    port: &SoftPort,
    ep: &CmEndpoint,
    mrs: &Arc<MrTable>,
    clock: &Arc<dyn Clock>,
    gid: Gid,
    info: &ConnInfo,
    live: usize,
    notify: &crossbeam_channel::Sender<u32>,
) -> Result<Session, RdmaError> {
    let id = info.local_comm_id;
    let reject = |why: String| {
        let _ = ep.reject(id, 1); // no QP available
        rc_err(why)
    };
    if live >= MAX_SESSIONS {
        return Err(reject(format!("{live} sessions already")));
    }
    let Some(mr) = mrs.register(BUF_IOVA, SESSION_BUF, Access::ALL) else {
        return Err(reject("no region left".into()));
    };
    let qp = port.create_rc_qp(gid, mrs.clone(), clock.clone());
    qp.set_notifier(notify.clone());
    let ready = qp
        .connect(info.remote_gid, session_attrs(info), true, true)
        .map_err(|e| e.to_string())
        .and_then(|()| {
            (0..RECVS).try_for_each(|i| qp.post_recv(i, SESSION_BUF).map_err(|e| e.to_string()))
        })
        .and_then(|()| {
            ep.accept_with_qpn(id, Some(qp.qpn_value()))
                .map_err(|e| e.to_string())
        });
    if let Err(e) = ready {
        qp.shutdown();
        let _ = port.destroy_qp(qp.qpn_value());
        mrs.deregister(mr.key());
        return Err(reject(e));
    }
    Ok(Session {
        qp,
        mr,
        phase: Phase::ReadAdv,
    })
}

/// Work request IDs of the server's sends.
const GO_AHEAD: u64 = u64::MAX - 1;

/// The server's answer to one completion (`rping_test_server`'s loop, and the echo).
fn answer(s: &mut Session, wc: &Completion) {
    let send = |s: &Session, wr_id, op| {
        if let Err(e) = s.qp.post_send(SendWr { wr_id, op }) {
            tracing::debug!(qpn = s.qp.qpn_value(), "RC server send: {e}");
        }
    };
    let go_ahead = SendOp::Send {
        data: vec![0; RpingInfo::LEN],
        imm: None,
    };
    if wc.status != WcStatus::Success {
        tracing::debug!(
            qpn = s.qp.qpn_value(),
            "{:?} completed with {:?}",
            wc.opcode,
            wc.status
        );
        return;
    }
    match wc.opcode {
        // The READ of the start buffer, or the WRITE of the echo, is done: "go ahead".
        WcOpcode::RdmaRead | WcOpcode::RdmaWrite => send(s, GO_AHEAD, go_ahead),
        WcOpcode::Recv => {
            let _ = s.qp.post_recv(wc.wr_id, SESSION_BUF);
            let Some(info) = RpingInfo::parse(&wc.data) else {
                let op = SendOp::Send {
                    data: wc.data.clone(),
                    imm: wc.imm,
                };
                return send(s, wc.wr_id, op);
            };
            let (mr, size) = (&s.mr, (info.size as usize).min(SESSION_BUF));
            match s.phase {
                Phase::ReadAdv => {
                    s.phase = Phase::WriteAdv { len: size };
                    let op = SendOp::Read {
                        len: size as u32,
                        remote_addr: info.buf,
                        rkey: info.rkey,
                        lkey: mr.key(),
                        local_addr: mr.iova(),
                    };
                    send(s, 0, op);
                }
                Phase::WriteAdv { len } => {
                    s.phase = Phase::ReadAdv;
                    // rping writes strlen(rdma_buf) + 1 bytes.
                    let mut data = mr.read(mr.iova(), len.min(size)).unwrap_or_default();
                    if let Some(nul) = data.iter().position(|&b| b == 0) {
                        data.truncate(nul + 1);
                    }
                    let op = SendOp::Write {
                        data,
                        remote_addr: info.buf,
                        rkey: info.rkey,
                        imm: None,
                    };
                    send(s, 1, op);
                }
            }
        }
        _ => {}
    }
}

/// What a client session did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionStats {
    /// Messages exchanged and verified.
    pub verified: u64,
    /// Payload bytes moved (WRITE + READ, or SEND + echo).
    pub bytes: u64,
    /// Time of the message phase, µs.
    pub data_us: u64,
}

/// The client side of a session on a connected QP `qp`, with two regions of its own
/// (`start` and `rdma`, rping's buffers; `send` mode uses neither).
pub fn run_client(
    qp: &RcQp,
    start: &MemoryRegion,
    rdma: &MemoryRegion,
    mode: RcMode,
    messages: u64,
    size: usize,
    wait: Duration,
) -> Result<SessionStats, RdmaError> {
    let size = size.clamp(1, SESSION_BUF);
    let post_err = |e: crate::rc::RcError| rc_err(format!("posting: {e}"));
    for i in 0..RECVS {
        qp.post_recv(i, SESSION_BUF).map_err(post_err)?;
    }
    // A SEND and a receive, in either order; the received message.
    let exchange = |data: Vec<u8>, what: &str| -> Result<Vec<u8>, RdmaError> {
        qp.post_send(SendWr {
            wr_id: 0,
            op: SendOp::Send { data, imm: None },
        })
        .map_err(post_err)?;
        let (mut got, mut sent) = (None, false);
        while got.is_none() || !sent {
            let wc = next(qp, wait, what)?;
            if wc.opcode == WcOpcode::Recv {
                qp.post_recv(wc.wr_id, SESSION_BUF).map_err(post_err)?;
                got = Some(wc.data);
            } else {
                sent = true;
            }
        }
        got.ok_or_else(|| rc_err("no message"))
    };
    let t = Instant::now();
    let mut st = SessionStats::default();
    for i in 0..messages {
        match mode {
            RcMode::Rping => {
                let data = rping_pattern(i, size);
                if !start.write(start.iova(), &data) || !rdma.write(rdma.iova(), &vec![0; size]) {
                    return Err(rc_err(format!("buffers smaller than {size} bytes")));
                }
                exchange(RpingInfo::of(start, size).to_bytes(), "the server's READ")?;
                exchange(RpingInfo::of(rdma, size).to_bytes(), "the server's WRITE")?;
                if rdma.read(rdma.iova(), size).as_deref() != Some(&data[..]) {
                    return Err(rc_err(format!("ping {i}: the server wrote other bytes")));
                }
            }
            RcMode::Send => {
                // 16 bytes is rping's message: one more.
                let len = if size == RpingInfo::LEN {
                    size + 1
                } else {
                    size
                };
                let data = crate::peer::pattern(i, len.max(8))[..len].to_vec();
                if exchange(data.clone(), "the echo")? != data {
                    return Err(rc_err(format!("message {i}: the echo differs")));
                }
            }
        }
        st.verified += 1;
        st.bytes += 2 * size as u64;
    }
    st.data_us = t.elapsed().as_micros() as u64;
    Ok(st)
}

/// The next completion, which must be a success.
fn next(qp: &RcQp, wait: Duration, what: &str) -> Result<Completion, RdmaError> {
    let wc = qp
        .wait(wait)
        .ok_or_else(|| rc_err(format!("no completion for {what} within {wait:?}")))?;
    if wc.status != WcStatus::Success {
        return Err(rc_err(format!(
            "{what}: {:?} completed with {:?}",
            wc.opcode, wc.status
        )));
    }
    Ok(wc)
}

/// A client region for a session.
pub fn client_region(mrs: &MrTable) -> Result<Arc<MemoryRegion>, RdmaError> {
    mrs.register(BUF_IOVA, SESSION_BUF, Access::ALL)
        .ok_or_else(|| rc_err("no region left"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rping_info_and_pattern_are_rpings() {
        let h = RpingInfo {
            buf: 0x55f0_9fb2_9370,
            rkey: 0x5cf,
            size: 64,
        };
        // rping.pcap's first SEND carries exactly these 16 bytes.
        assert_eq!(
            h.to_bytes(),
            [0, 0, 0x55, 0xf0, 0x9f, 0xb2, 0x93, 0x70, 0, 0, 5, 0xcf, 0, 0, 0, 0x40]
        );
        assert_eq!(RpingInfo::parse(&h.to_bytes()), Some(h));
        assert_eq!(RpingInfo::parse(&[0u8; 20]), None);
        // rping.pcap's first READ response: "rdma-ping-0: ABCDEF…", NUL last.
        let p = rping_pattern(0, 64);
        assert!(p.starts_with(b"rdma-ping-0: ABCDEFGHIJ"));
        assert_eq!(p[63], 0);
        assert!(rping_pattern(2, 64).starts_with(b"rdma-ping-2: CDEF"));
        assert_eq!(rping_pattern(0, 3), b"rd\0");
    }
}

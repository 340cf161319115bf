//! RC data sessions between Ferry endpoints, like rdma-core's `rping` (RDMA WRITE + READ
//! ping-pong with verification) and `ucmatose` (SEND/RECV), over connections rdma_cm-style
//! (REQ/REP/RTU) — the server is an agent serving many connections, one RC queue pair each.
//!
//! The exchange: once connected, the client posts receives and SENDs a hello naming its
//! buffer (virtual address, rkey, length); the server answers with a hello naming a region
//! of its own made for this connection. Then per message either
//! - **rping**: the client RDMA WRITEs a pattern into the server's region, RDMA READs it
//!   back into its own region, and compares; or
//! - **send**: the client SENDs the pattern, the server SENDs every received message back,
//!   the client compares.
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

/// The attributes of a session QP for a connection the CM made.
pub fn session_attrs(info: &ConnInfo) -> RcAttrs {
    RcAttrs {
        path_mtu: SESSION_MTU,
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

/// The hello each side sends first: where its region is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Hello {
    va: u64,
    rkey: u32,
    len: u32,
}

impl Hello {
    const MAGIC: [u8; 4] = *b"FRYR";
    const LEN: usize = 20;

    fn of(mr: &MemoryRegion) -> Hello {
        Hello {
            va: mr.iova(),
            rkey: mr.key(),
            len: mr.len() as u32,
        }
    }

    fn to_bytes(self) -> Vec<u8> {
        let mut v = Vec::with_capacity(Self::LEN);
        v.extend_from_slice(&Self::MAGIC);
        v.extend_from_slice(&self.va.to_be_bytes());
        v.extend_from_slice(&self.rkey.to_be_bytes());
        v.extend_from_slice(&self.len.to_be_bytes());
        v
    }

    fn parse(b: &[u8]) -> Option<Hello> {
        if b.len() != Self::LEN || b[..4] != Self::MAGIC {
            return None;
        }
        Some(Hello {
            va: u64::from_be_bytes(b[4..12].try_into().ok()?),
            rkey: u32::from_be_bytes(b[12..16].try_into().ok()?),
            len: u32::from_be_bytes(b[16..20].try_into().ok()?),
        })
    }
}

fn rc_err(what: impl Into<String>) -> RdmaError {
    RdmaError::Cm(what.into())
}

/// One connection of a server.
struct Session {
    qp: Arc<RcQp>,
    mr: Arc<MemoryRegion>,
}

/// The server side: listens on an RC service of a CM endpoint (manual accept), gives each
/// connection its own RC QP and region, answers hellos and echoes SENDs.
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
                let Some(s) = q.ok().and_then(|q| by_qpn.get(&q)).and_then(|id| sessions.get(id)) else {
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
    Ok(Session { qp, mr })
}

/// The server's answer to one completion: a hello gets the region's hello, another message
/// is sent back; the receive is posted again.
fn answer(s: &Session, wc: &Completion) {
    if wc.opcode != WcOpcode::Recv {
        if wc.status != WcStatus::Success {
            tracing::debug!(
                qpn = s.qp.qpn_value(),
                "RC send completed with {:?}",
                wc.status
            );
        }
        return;
    }
    if wc.status != WcStatus::Success {
        return;
    }
    let reply = match Hello::parse(&wc.data) {
        Some(_) => Hello::of(&s.mr).to_bytes(),
        None => wc.data.clone(),
    };
    let _ = s.qp.post_send(SendWr {
        wr_id: wc.wr_id,
        op: SendOp::Send {
            data: reply,
            imm: wc.imm,
        },
    });
    let _ = s.qp.post_recv(wc.wr_id, SESSION_BUF);
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

/// The client side of a session on a connected QP `qp` whose own region is `local`.
pub fn run_client(
    qp: &RcQp,
    local: &MemoryRegion,
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
    qp.post_send(SendWr {
        wr_id: u64::MAX,
        op: SendOp::Send {
            data: Hello::of(local).to_bytes(),
            imm: None,
        },
    })
    .map_err(post_err)?;
    let mut remote = None;
    let mut hello_sent = false;
    while remote.is_none() || !hello_sent {
        let wc = next(qp, wait, "the server's hello")?;
        match wc.opcode {
            WcOpcode::Recv => {
                remote = Some(Hello::parse(&wc.data).ok_or_else(|| rc_err("not a hello"))?);
                qp.post_recv(wc.wr_id, SESSION_BUF).map_err(post_err)?;
            }
            _ => hello_sent = true,
        }
    }
    let remote = remote.ok_or_else(|| rc_err("no hello"))?;
    if (remote.len as usize) < size {
        return Err(rc_err(format!(
            "the server's region has {} bytes, messages {size}",
            remote.len
        )));
    }
    let t = Instant::now();
    let mut st = SessionStats::default();
    for i in 0..messages {
        let data = crate::peer::pattern(i, size.max(8))[..size].to_vec();
        match mode {
            RcMode::Rping => {
                let ops = [
                    SendOp::Write {
                        data: data.clone(),
                        remote_addr: remote.va,
                        rkey: remote.rkey,
                        imm: None,
                    },
                    SendOp::Read {
                        len: size as u32,
                        remote_addr: remote.va,
                        rkey: remote.rkey,
                        lkey: local.key(),
                        local_addr: local.iova(),
                    },
                ];
                for (k, op) in ops.into_iter().enumerate() {
                    qp.post_send(SendWr {
                        wr_id: k as u64,
                        op,
                    })
                    .map_err(post_err)?;
                }
                for _ in 0..2 {
                    next(qp, wait, "a WRITE/READ completion")?;
                }
                if local.read(local.iova(), size).as_deref() != Some(&data[..]) {
                    return Err(rc_err(format!("message {i}: READ returned other bytes")));
                }
            }
            RcMode::Send => {
                qp.post_send(SendWr {
                    wr_id: i,
                    op: SendOp::Send {
                        data: data.clone(),
                        imm: None,
                    },
                })
                .map_err(post_err)?;
                let mut echoed = None;
                let mut sent = false;
                while echoed.is_none() || !sent {
                    let wc = next(qp, wait, "a SEND completion or its echo")?;
                    if wc.opcode == WcOpcode::Recv {
                        qp.post_recv(wc.wr_id, SESSION_BUF).map_err(post_err)?;
                        echoed = Some(wc.data);
                    } else {
                        sent = true;
                    }
                }
                if echoed.as_deref() != Some(&data[..]) {
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
    fn hello_round_trip_and_garbage() {
        let h = Hello {
            va: 0x1234_5678_9abc,
            rkey: 0xdead_beef,
            len: 4096,
        };
        assert_eq!(Hello::parse(&h.to_bytes()), Some(h));
        assert_eq!(Hello::parse(b"FRYR"), None);
        assert_eq!(Hello::parse(&[0u8; 20]), None);
    }
}

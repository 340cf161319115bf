//! A bare-metal endpoint: its own port, no multiplexer, one CM endpoint on QP1 — what
//! `rping` (RC handshake and disconnect) and `udaddy` (SIDR then UD messages) do.
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdma_wire::rdma_cm::{CmaHeader, RDMA_CM_UD_QKEY};
use rdma_wire::Gid;
use serde::{Deserialize, Serialize};

use crate::addr::gid_v4;
use crate::cm::{AcceptMode, CmEvent, ConnInfo, ListenOptions};
use crate::cm::{CmConfig, CmEndpoint, CmStats, ConnectParams};
use crate::host::{rc_service, ud_service};
use crate::port::{PortConfig, PortStats, SoftPort, UdDest, UdQp};
use crate::rc::{Access, MemoryRegion, RcQp};
use crate::rc::{Clock, MonotonicClock, MrTable, RcStats};
use crate::rc_session::tools::{self, Tool, ToolStats};
use crate::rc_session::{self, RcMode};
use crate::RdmaError;

/// Result of an RC-style session.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RcReport {
    /// Our communication ID.
    pub local_comm_id: u32,
    /// The VM's.
    pub remote_comm_id: u32,
    /// The VM's QPN.
    pub remote_qpn: u32,
    /// REQ → RTU time, µs.
    pub connect_us: u64,
    /// DREQ → DREP time, µs.
    pub disconnect_us: u64,
    /// The data exchanged over the RC QP (none: handshake only).
    pub mode: Option<RcMode>,
    /// Our RC QPN.
    pub qpn: u32,
    /// Messages exchanged and verified.
    pub verified: u64,
    /// Payload bytes moved.
    pub bytes: u64,
    /// Message phase, µs.
    pub data_us: u64,
    /// The RC QP's counters.
    pub rc: Option<RcStats>,
    /// The Linux tool whose protocol was spoken (none: Ferry's own sessions).
    #[serde(default)]
    pub tool: Option<Tool>,
}

/// Result of a UD session.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct UdReport {
    /// QPN from SIDR_REP.
    pub qpn: u32,
    /// Q_Key from SIDR_REP.
    pub qkey: u32,
    /// Messages sent.
    pub sent: u64,
    /// Echoes received with the right content.
    pub verified: u64,
    /// SIDR time, µs.
    pub sidr_us: u64,
    /// Message phase, µs.
    pub messages_us: u64,
}

/// A bare-metal peer.
pub struct Peer {
    port: SoftPort,
    endpoint: CmEndpoint,
    ud_qp: Arc<UdQp>,
    mrs: Arc<MrTable>,
    clock: Arc<dyn Clock>,
}

impl Peer {
    /// Binds the port; the endpoint's GID is the port's address.
    pub fn start(port: PortConfig, cm: CmConfig) -> Result<Peer, RdmaError> {
        let gid = gid_v4(port.addr);
        let port = SoftPort::bind(port)?;
        let endpoint = CmEndpoint::new(gid, cm, Arc::new(port.clone()));
        port.set_gsi_handler(Arc::new(endpoint.clone()));
        let ud_qp = port.create_ud_qp(gid, RDMA_CM_UD_QKEY);
        Ok(Peer {
            port,
            endpoint,
            ud_qp,
            mrs: Arc::new(MrTable::new(64)),
            clock: Arc::new(MonotonicClock::default()),
        })
    }

    /// The peer's GID.
    pub fn gid(&self) -> Gid {
        self.endpoint.gid()
    }

    /// The CM endpoint.
    pub fn endpoint(&self) -> &CmEndpoint {
        &self.endpoint
    }

    /// The port.
    pub fn port(&self) -> &SoftPort {
        &self.port
    }

    /// The UD QP.
    pub fn ud_qp(&self) -> &Arc<UdQp> {
        &self.ud_qp
    }

    fn private_data(&self, dgid: Gid, port: u16) -> Vec<u8> {
        let mut pd = vec![0u8; 36];
        if let Ok(h) = CmaHeader::new(self.gid().to_ip(), port, dgid.canonical().to_ip()) {
            let _ = h.write(&mut pd);
        }
        pd
    }

    /// REQ/REP/RTU to `dgid`'s service port, then DREQ/DREP.
    pub fn rc_session(
        &self,
        dgid: Gid,
        service_port: u16,
        wait: Duration,
    ) -> Result<RcReport, RdmaError> {
        let t0 = Instant::now();
        let info = self.endpoint.connect(
            dgid,
            ConnectParams {
                service_id: rc_service(service_port),
                qpn: self.ud_qp.qpn_value(),
                private_data: self.private_data(dgid, service_port),
            },
            wait,
        )?;
        let connect_us = t0.elapsed().as_micros() as u64;
        let t1 = Instant::now();
        self.endpoint.disconnect(info.local_comm_id, wait)?;
        Ok(RcReport {
            local_comm_id: info.local_comm_id,
            remote_comm_id: info.remote_comm_id,
            remote_qpn: info.remote_qpn,
            connect_us,
            disconnect_us: t1.elapsed().as_micros() as u64,
            mode: None,
            qpn: self.ud_qp.qpn_value(),
            verified: 0,
            bytes: 0,
            data_us: 0,
            rc: None,
            tool: None,
        })
    }

    /// REQ/REP/RTU to `dgid`'s service port with an RC QP of our own, then `messages` RC
    /// messages of `size` bytes exchanged and verified per `mode`, then DREQ/DREP.
    pub fn rc_data_session(
        &self,
        dgid: Gid,
        service_port: u16,
        mode: RcMode,
        messages: u64,
        size: usize,
        wait: Duration,
    ) -> Result<RcReport, RdmaError> {
        let qp = self
            .port
            .create_rc_qp(self.gid(), self.mrs.clone(), self.clock.clone());
        // rping's two buffers (the start buffer the server reads, the one it writes).
        let start = rc_session::client_region(&self.mrs);
        let rdma = rc_session::client_region(&self.mrs);
        let r = match (&start, &rdma) {
            (Ok(start), Ok(rdma)) => self.rc_data_exchange(
                &qp,
                (start, rdma),
                dgid,
                service_port,
                (mode, messages, size),
                wait,
            ),
            (Err(e), _) | (_, Err(e)) => Err(RdmaError::Cm(e.to_string())),
        };
        for m in [start, rdma].into_iter().flatten() {
            self.mrs.deregister(m.key());
        }
        qp.shutdown();
        let _ = self.port.destroy_qp(qp.qpn_value());
        r
    }

    fn rc_data_exchange(
        &self,
        qp: &RcQp,
        (start, rdma): (&MemoryRegion, &MemoryRegion),
        dgid: Gid,
        service_port: u16,
        (mode, messages, size): (RcMode, u64, usize),
        wait: Duration,
    ) -> Result<RcReport, RdmaError> {
        {
            let t0 = Instant::now();
            let info = self.endpoint.connect(
                dgid,
                ConnectParams {
                    service_id: rc_service(service_port),
                    qpn: qp.qpn_value(),
                    private_data: self.private_data(dgid, service_port),
                },
                wait,
            )?;
            let connect_us = t0.elapsed().as_micros() as u64;
            let data = qp
                .connect(dgid, rc_session::session_attrs(&info), true, true)
                .map_err(|e| RdmaError::Cm(format!("RC QP: {e}")))
                .and_then(|()| rc_session::run_client(qp, start, rdma, mode, messages, size, wait));
            let t1 = Instant::now();
            let disc = self.endpoint.disconnect(info.local_comm_id, wait);
            let data = data?;
            disc?;
            Ok(RcReport {
                local_comm_id: info.local_comm_id,
                remote_comm_id: info.remote_comm_id,
                remote_qpn: info.remote_qpn,
                connect_us,
                disconnect_us: t1.elapsed().as_micros() as u64,
                mode: Some(mode),
                qpn: qp.qpn_value(),
                verified: data.verified,
                bytes: data.bytes,
                data_us: data.data_us,
                rc: Some(qp.stats()),
                tool: None,
            })
        }
    }

    /// Registers a session region at `iova`.
    fn region(&self, iova: u64) -> Result<Arc<MemoryRegion>, RdmaError> {
        self.mrs
            .register(iova, rc_session::SESSION_BUF, Access::ALL)
            .ok_or_else(|| RdmaError::Cm("no region left".into()))
    }

    /// Connects to `dgid`'s RC service like the Linux `tool`'s client (`rping -c`,
    /// `ucmatose -s`) and speaks its protocol with Linux's server: `messages` rounds of `size`
    /// bytes, verified; then DREQ/DREP (rping) or the server's DREQ answered (ucmatose).
    pub fn tool_client(
        &self,
        dgid: Gid,
        service_port: u16,
        tool: Tool,
        messages: u64,
        size: usize,
        wait: Duration,
    ) -> Result<RcReport, RdmaError> {
        let qp = self
            .port
            .create_rc_qp(self.gid(), self.mrs.clone(), self.clock.clone());
        let events = self.endpoint.events();
        let r = (|| {
            let source = self.region(rc_session::BUF_IOVA)?;
            let sink = self.region(rc_session::BUF_IOVA + 2 * rc_session::SESSION_BUF as u64);
            let sink = match sink {
                Ok(s) => s,
                Err(e) => {
                    self.mrs.deregister(source.key());
                    return Err(e);
                }
            };
            let t0 = Instant::now();
            let r = self
                .endpoint
                .connect(
                    dgid,
                    ConnectParams {
                        service_id: rc_service(service_port),
                        qpn: qp.qpn_value(),
                        private_data: self.private_data(dgid, service_port),
                    },
                    wait,
                )
                .and_then(|info| {
                    let connect_us = t0.elapsed().as_micros() as u64;
                    let data = qp
                        .connect(dgid, rc_session::session_attrs(&info), true, true)
                        .map_err(|e| RdmaError::Cm(format!("RC QP: {e}")))
                        .and_then(|()| tools::post_recvs(&qp, size.max(64)))
                        .and_then(|()| match tool {
                            Tool::Rping => {
                                tools::rping_client(&qp, &source, &sink, messages, size, wait)
                            }
                            Tool::Ucmatose => tools::ucmatose_client(&qp, messages, size, wait),
                        });
                    let t1 = Instant::now();
                    // rping's client disconnects; ucmatose's server does (our CM answers).
                    let disc = match tool {
                        Tool::Rping => self.endpoint.disconnect(info.local_comm_id, wait),
                        Tool::Ucmatose if data.is_ok() => {
                            wait_disconnected(&events, info.local_comm_id, wait)
                        }
                        Tool::Ucmatose => self.endpoint.disconnect(info.local_comm_id, wait),
                    };
                    let st = data?;
                    disc?;
                    Ok(self.tool_report(&info, &qp, tool, connect_us, t1, st))
                });
            self.mrs.deregister(source.key());
            self.mrs.deregister(sink.key());
            r
        })();
        qp.shutdown();
        let _ = self.port.destroy_qp(qp.qpn_value());
        r
    }

    /// Serves one connection to our RC service like the Linux `tool`'s server (`rping -s`,
    /// `ucmatose`) for Linux's client. Calls `ready` once listening.
    pub fn tool_server(
        &self,
        service_port: u16,
        tool: Tool,
        messages: u64,
        size: usize,
        wait: Duration,
        ready: impl FnOnce(),
    ) -> Result<RcReport, RdmaError> {
        let events = self.endpoint.events();
        self.endpoint.listen(
            rc_service(service_port),
            ListenOptions {
                qpn: self.ud_qp.qpn_value(),
                qkey: 0,
                accept: AcceptMode::Manual,
            },
        );
        ready();
        let info = loop {
            match events.recv_timeout(wait) {
                Ok(CmEvent::ConnectRequest(info)) => break info,
                Ok(_) => continue,
                Err(_) => {
                    return Err(RdmaError::Cm(format!(
                        "no connection request within {wait:?}"
                    )))
                }
            }
        };
        let t0 = Instant::now();
        let id = info.local_comm_id;
        let qp = self
            .port
            .create_rc_qp(self.gid(), self.mrs.clone(), self.clock.clone());
        let buf = match self.region(rc_session::BUF_IOVA) {
            Ok(b) => b,
            Err(e) => {
                let _ = self.endpoint.reject(id, 1);
                return Err(e);
            }
        };
        let r = qp
            .connect(
                info.remote_gid,
                rc_session::session_attrs(&info),
                true,
                true,
            )
            .map_err(|e| RdmaError::Cm(format!("RC QP: {e}")))
            .and_then(|()| tools::post_recvs(&qp, size.max(64)))
            .and_then(|()| self.endpoint.accept_with_qpn(id, Some(qp.qpn_value())))
            .and_then(|()| wait_established(&events, id, wait))
            .and_then(|()| {
                let connect_us = t0.elapsed().as_micros() as u64;
                let mut gone = false;
                let mut disconnected = || {
                    gone = gone || drained_disconnect(&events, id);
                    gone
                };
                let data = match tool {
                    Tool::Rping => tools::rping_server(&qp, &buf, wait, &mut disconnected),
                    Tool::Ucmatose => tools::ucmatose_server(&qp, messages, size, wait),
                };
                let t1 = Instant::now();
                let disc = match tool {
                    Tool::Rping if gone => Ok(()),
                    _ => self.endpoint.disconnect(id, wait),
                };
                let st = data?;
                disc?;
                Ok(self.tool_report(&info, &qp, tool, connect_us, t1, st))
            });
        if r.is_err() {
            let _ = self.endpoint.reject(id, 1);
        }
        self.mrs.deregister(buf.key());
        qp.shutdown();
        let _ = self.port.destroy_qp(qp.qpn_value());
        r
    }

    fn tool_report(
        &self,
        info: &ConnInfo,
        qp: &RcQp,
        tool: Tool,
        connect_us: u64,
        t1: Instant,
        st: ToolStats,
    ) -> RcReport {
        RcReport {
            local_comm_id: info.local_comm_id,
            remote_comm_id: info.remote_comm_id,
            remote_qpn: info.remote_qpn,
            connect_us,
            disconnect_us: t1.elapsed().as_micros() as u64,
            mode: None,
            qpn: qp.qpn_value(),
            verified: st.verified,
            bytes: st.bytes,
            data_us: st.data_us,
            rc: Some(qp.stats()),
            tool: Some(tool),
        }
    }

    /// SIDR to `dgid`'s UD service, then `messages` UD messages of `size` bytes, each echoed
    /// and verified.
    pub fn ud_session(
        &self,
        dgid: Gid,
        service_port: u16,
        messages: u64,
        size: usize,
        wait: Duration,
    ) -> Result<UdReport, RdmaError> {
        let t0 = Instant::now();
        let pd = self.private_data(dgid, service_port);
        let info = self
            .endpoint
            .sidr_resolve(dgid, ud_service(service_port), &pd, wait)?;
        let sidr_us = t0.elapsed().as_micros() as u64;
        let dest = UdDest {
            dgid,
            dqpn: info.qpn,
            qkey: info.qkey,
        };
        let t1 = Instant::now();
        let mut verified = 0;
        let size = size.max(8);
        for seq in 0..messages {
            let data = pattern(seq, size);
            // UD is unreliable: retry a message a few times before giving up.
            let mut ok = false;
            for _ in 0..5 {
                self.port.post_send_ud(&self.ud_qp, dest, None, &data)?;
                let deadline = Instant::now() + wait.min(Duration::from_millis(500));
                while let Some(m) = self
                    .ud_qp
                    .recv_timeout(deadline.saturating_duration_since(Instant::now()))
                {
                    if m.data == data && m.sgid.canonical() == dgid.canonical() {
                        ok = true;
                        break;
                    }
                }
                if ok {
                    break;
                }
            }
            if !ok {
                return Err(RdmaError::Cm(format!(
                    "UD message {seq} to {dgid} QPN {:#x} was not echoed",
                    info.qpn
                )));
            }
            verified += 1;
        }
        Ok(UdReport {
            qpn: info.qpn,
            qkey: info.qkey,
            sent: messages,
            verified,
            sidr_us,
            messages_us: t1.elapsed().as_micros() as u64,
        })
    }

    /// Counters.
    pub fn stats(&self) -> (PortStats, CmStats) {
        (self.port.stats(), self.endpoint.stats())
    }

    /// Stops the port.
    pub fn shutdown(&self) {
        self.endpoint.shutdown();
        self.port.shutdown();
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Waits for the CM to report connection `id` established.
fn wait_established(
    events: &crossbeam_channel::Receiver<CmEvent>,
    id: u32,
    wait: Duration,
) -> Result<(), RdmaError> {
    let end = Instant::now() + wait;
    loop {
        match events.recv_deadline(end) {
            Ok(CmEvent::Established(i)) if i.local_comm_id == id => return Ok(()),
            Ok(
                CmEvent::Disconnected { local_comm_id }
                | CmEvent::TimedOut { local_comm_id }
                | CmEvent::Rejected { local_comm_id, .. },
            ) if local_comm_id == id => {
                return Err(RdmaError::Cm("the connection ended before its RTU".into()))
            }
            Ok(_) => {}
            Err(_) => return Err(RdmaError::Cm(format!("no RTU within {wait:?}"))),
        }
    }
}

/// Waits for the other side to disconnect connection `id` (its DREQ; the CM answers).
fn wait_disconnected(
    events: &crossbeam_channel::Receiver<CmEvent>,
    id: u32,
    wait: Duration,
) -> Result<(), RdmaError> {
    let end = Instant::now() + wait;
    loop {
        match events.recv_deadline(end) {
            Ok(CmEvent::Disconnected { local_comm_id }) if local_comm_id == id => return Ok(()),
            Ok(_) => {}
            Err(_) => return Err(RdmaError::Cm(format!("no DREQ within {wait:?}"))),
        }
    }
}

/// Whether a disconnect of `id` is among the events waiting now.
fn drained_disconnect(events: &crossbeam_channel::Receiver<CmEvent>, id: u32) -> bool {
    events
        .try_iter()
        .any(|e| matches!(e, CmEvent::Disconnected { local_comm_id } if local_comm_id == id))
}

/// The payload of UD message `seq`: the sequence number then a byte pattern.
pub fn pattern(seq: u64, size: usize) -> Vec<u8> {
    let mut v = vec![0u8; size];
    v[..8].copy_from_slice(&seq.to_be_bytes());
    for (i, b) in v.iter_mut().enumerate().skip(8) {
        *b = (seq as usize).wrapping_mul(31).wrapping_add(i) as u8;
    }
    v
}

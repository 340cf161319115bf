//! A host: one software RoCEv2 port, the multiplexer on its QP1, and simulated VMs, each a
//! CM agent (an [`CmEndpoint`] behind the multiplexer) that listens on an rdma_cm service,
//! accepts RC-style connections, answers SIDR, and echoes UD messages from its own UD QP.
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use parking_lot::Mutex;
use rdma_wire::rdma_cm::{service_id, PortSpace, RDMA_CM_UD_QKEY};
use rdma_wire::{Gid, Mad};
use serde::{Deserialize, Serialize};

use crate::addr::{gid_v4, ipv4_add};
use crate::cm::{AcceptMode, CmConfig, CmEndpoint, CmStats, EndpointSink, ListenOptions};
use crate::mux::{Multiplexer, MuxConfig, MuxStats, VmCounterStats, VmId};
use crate::port::{PortConfig, PortStats, Qp1Tx, SoftPort, UdDest, UdQp, UdQpStats};
use crate::rc_session::RcServer;
use crate::RdmaError;

/// rping's and udaddy's default port.
pub const DEFAULT_SERVICE_PORT: u16 = 7174;

/// The RC (rdma_cm TCP port space) service ID of a port.
pub fn rc_service(port: u16) -> u64 {
    service_id(PortSpace::Tcp, port)
}

/// The UD (rdma_cm UDP port space) service ID of a port.
pub fn ud_service(port: u16) -> u64 {
    service_id(PortSpace::Udp, port)
}

/// A host's configuration.
#[derive(Debug, Clone)]
pub struct HostConfig {
    /// The port.
    pub port: PortConfig,
    /// Simulated VMs started with the host.
    pub vms: usize,
    /// GID of the first VM (the next ones follow: .1, .2, ...).
    pub gid_base: Ipv4Addr,
    /// rdma_cm port the VMs listen on (RC and UD service IDs).
    pub service_port: u16,
    /// CM timing of the VMs' agents.
    pub cm: CmConfig,
    /// Multiplexer settings.
    pub mux: MuxConfig,
    /// The VMs serve RC data sessions (see [`VmOptions::rc_server`]).
    pub rc_server: bool,
}

impl HostConfig {
    /// A host at `addr` with `vms` VMs from `gid_base`, Linux CM timing.
    pub fn new(addr: Ipv4Addr, vms: usize, gid_base: Ipv4Addr) -> HostConfig {
        HostConfig {
            port: PortConfig::new(addr),
            vms,
            gid_base,
            service_port: DEFAULT_SERVICE_PORT,
            cm: CmConfig::default(),
            mux: MuxConfig::default(),
            rc_server: true,
        }
    }
}

/// Options of one simulated VM.
#[derive(Debug, Clone)]
pub struct VmOptions {
    /// Its CM timing.
    pub cm: CmConfig,
    /// How its listener answers REQs.
    pub accept: AcceptMode,
    /// Whether it posts receive buffers on its virtual QP1.
    pub receiving: bool,
    /// rdma_cm port it listens on.
    pub service_port: u16,
    /// Serve RC data sessions ([`crate::rc_session::RcServer`]: one RC QP per connection,
    /// accepted manually by the agent, which takes the endpoint's events). Off: REQs for the
    /// RC service are answered per `accept` with the UD QP's number (handshake only).
    pub rc_server: bool,
}

/// The VM's virtual QP1 send side: every send goes through the multiplexer's checks.
struct VmTx {
    mux: Arc<Multiplexer>,
    vm: VmId,
}

impl Qp1Tx for VmTx {
    fn send_gsi(&self, sgid: Gid, dgid: Gid, mad: &Mad) -> Result<(), RdmaError> {
        self.mux.send_from_vm(self.vm, sgid, dgid, mad)
    }
}

/// A simulated VM: GID, CM agent, UD echo QP.
pub struct SimVm {
    id: VmId,
    gid: Gid,
    endpoint: CmEndpoint,
    sink: Arc<EndpointSink>,
    ud_qp: Arc<UdQp>,
    rc: Option<RcServer>,
    stop: Arc<AtomicBool>,
    echo: Mutex<Option<JoinHandle<()>>>,
}

impl SimVm {
    /// Its ID.
    pub fn id(&self) -> VmId {
        self.id
    }
    /// Its GID.
    pub fn gid(&self) -> Gid {
        self.gid
    }
    /// Its CM agent.
    pub fn endpoint(&self) -> &CmEndpoint {
        &self.endpoint
    }
    /// Its virtual QP1 receive side.
    pub fn sink(&self) -> &EndpointSink {
        &self.sink
    }
    /// Its UD QP (echo service).
    pub fn ud_qp(&self) -> &Arc<UdQp> {
        &self.ud_qp
    }

    fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(rc) = &self.rc {
            rc.stop();
        }
        self.endpoint.shutdown();
        if let Some(t) = self.echo.lock().take() {
            let _ = t.join();
        }
    }
}

/// One VM in a host report.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SimVmReport {
    /// VM.
    pub vm: VmId,
    /// GID.
    pub gid: String,
    /// Multiplexer's counters for it.
    pub mux: VmCounterStats,
    /// Its CM agent's counters.
    pub cm: CmStats,
    /// Its UD QP's counters.
    pub ud: UdQpStats,
}

/// What a host reports (JSON with `--json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HostReport {
    /// Host address.
    pub addr: String,
    /// Port counters.
    pub port: PortStats,
    /// Multiplexer counters.
    pub mux: MuxStats,
    /// Registered GIDs.
    pub gids: usize,
    /// VMs.
    pub vms: Vec<SimVmReport>,
}

/// A running host.
pub struct Host {
    cfg: HostConfig,
    port: SoftPort,
    mux: Arc<Multiplexer>,
    vms: Mutex<Vec<Arc<SimVm>>>,
}

impl Host {
    /// Binds the port, installs the multiplexer, starts the VMs.
    pub fn start(cfg: HostConfig) -> Result<Host, RdmaError> {
        let port = SoftPort::bind(cfg.port.clone())?;
        let mux = Multiplexer::new(cfg.mux.clone(), Arc::new(port.clone()));
        port.set_gsi_handler(mux.clone());
        let host = Host {
            cfg,
            port,
            mux,
            vms: Mutex::new(Vec::new()),
        };
        for i in 0..host.cfg.vms {
            let gid = gid_v4(ipv4_add(host.cfg.gid_base, i as u32));
            let opts = VmOptions {
                cm: host.cfg.cm.clone(),
                accept: AcceptMode::Auto,
                receiving: true,
                service_port: host.cfg.service_port,
                rc_server: host.cfg.rc_server,
            };
            if let Err(e) = host.add_vm(i as VmId + 1, gid, opts) {
                host.shutdown();
                return Err(e);
            }
        }
        Ok(host)
    }

    /// Starts a VM with one GID (attach, register, agent, UD echo QP).
    pub fn add_vm(&self, id: VmId, gid: Gid, opts: VmOptions) -> Result<Arc<SimVm>, RdmaError> {
        let gid = gid.canonical();
        let tx = Arc::new(VmTx {
            mux: self.mux.clone(),
            vm: id,
        });
        let endpoint = CmEndpoint::new(gid, opts.cm.clone(), tx);
        let sink = Arc::new(EndpointSink::new(endpoint.clone()));
        sink.set_receiving(opts.receiving);
        self.mux.attach_vm(id, sink.clone())?;
        if let Err(e) = self.mux.register_gid(id, gid) {
            let _ = self.mux.detach_vm(id);
            endpoint.shutdown();
            return Err(e);
        }
        let ud_qp = self.port.create_ud_qp(gid, RDMA_CM_UD_QKEY);
        let rc = if opts.rc_server {
            endpoint.listen(
                rc_service(opts.service_port),
                ListenOptions {
                    qpn: ud_qp.qpn_value(),
                    qkey: 0,
                    accept: AcceptMode::Manual,
                },
            );
            Some(RcServer::start(
                self.port.clone(),
                endpoint.clone(),
                rc_service(opts.service_port),
                gid,
            )?)
        } else {
            endpoint.listen(
                rc_service(opts.service_port),
                ListenOptions {
                    qpn: ud_qp.qpn_value(),
                    qkey: 0,
                    accept: opts.accept,
                },
            );
            None
        };
        endpoint.listen(
            ud_service(opts.service_port),
            ListenOptions {
                qpn: ud_qp.qpn_value(),
                qkey: RDMA_CM_UD_QKEY,
                accept: AcceptMode::Auto,
            },
        );
        let stop = Arc::new(AtomicBool::new(false));
        let echo = {
            let (port, qp, stop) = (self.port.clone(), ud_qp.clone(), stop.clone());
            std::thread::Builder::new()
                .name(format!("vm{id}-ud-echo"))
                .spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        let Some(m) = qp.recv_timeout(Duration::from_millis(50)) else {
                            continue;
                        };
                        let dest = UdDest {
                            dgid: m.sgid,
                            dqpn: m.src_qpn,
                            qkey: RDMA_CM_UD_QKEY,
                        };
                        if let Err(e) = port.post_send_ud(&qp, dest, m.imm, &m.data) {
                            tracing::debug!(
                                vm = id,
                                error = &e as &dyn std::error::Error,
                                "UD echo failed"
                            );
                        }
                    }
                })
                .map_err(|e| RdmaError::io("spawning a UD echo thread", e))?
        };
        let vm = Arc::new(SimVm {
            id,
            gid,
            endpoint,
            sink,
            ud_qp,
            rc,
            stop,
            echo: Mutex::new(Some(echo)),
        });
        self.vms.lock().push(vm.clone());
        tracing::info!(vm = id, %gid, "VM attached");
        Ok(vm)
    }

    /// Stops a VM and unregisters everything it had (one multiplexer call).
    pub fn remove_vm(&self, id: VmId) -> Result<usize, RdmaError> {
        let vm = {
            let mut vms = self.vms.lock();
            let i = vms
                .iter()
                .position(|v| v.id == id)
                .ok_or(RdmaError::UnknownVm(id))?;
            vms.remove(i)
        };
        vm.stop();
        let _ = self.port.destroy_qp(vm.ud_qp.qpn_value());
        self.mux.detach_vm(id)
    }

    /// The port.
    pub fn port(&self) -> &SoftPort {
        &self.port
    }

    /// The multiplexer.
    pub fn mux(&self) -> &Arc<Multiplexer> {
        &self.mux
    }

    /// The VMs.
    pub fn vms(&self) -> Vec<Arc<SimVm>> {
        self.vms.lock().clone()
    }

    /// A VM by ID.
    pub fn vm(&self, id: VmId) -> Option<Arc<SimVm>> {
        self.vms.lock().iter().find(|v| v.id == id).cloned()
    }

    /// Counters of everything.
    pub fn report(&self) -> HostReport {
        let per_vm = self.mux.vm_reports();
        let vms = self
            .vms()
            .iter()
            .map(|v| SimVmReport {
                vm: v.id,
                gid: v.gid.to_string(),
                mux: per_vm
                    .iter()
                    .find(|r| r.vm == v.id)
                    .map(|r| r.counters)
                    .unwrap_or_default(),
                cm: v.endpoint.stats(),
                ud: v.ud_qp.counters.snapshot(),
            })
            .collect();
        HostReport {
            addr: self.port.addr().to_string(),
            port: self.port.stats(),
            mux: self.mux.stats(),
            gids: self.mux.gid_count(),
            vms,
        }
    }

    /// Stops the VMs and the port. Detaching the VMs breaks the reference cycle
    /// multiplexer → VM sink → agent → multiplexer, so the socket is closed once the `Host`
    /// is dropped.
    pub fn shutdown(&self) {
        for vm in self.vms.lock().drain(..) {
            vm.stop();
            let _ = self.mux.detach_vm(vm.id);
        }
        self.port.shutdown();
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        self.shutdown();
    }
}

//! The host side of Ferry's virtual RDMA devices: one software RoCEv2 port and its QP1
//! multiplexer per `ferry` process (the process *is* the host: `ferry run --vrdma` hosts one
//! VM, `ferry vrdma` several), and the [`vrdma::RdmaBackend`] each VM's PVRDMA device uses:
//! CREATE_BIND/DESTROY_BIND register/unregister (VM, GID) with the multiplexer, the guest's
//! QP1 sends go through the multiplexer's checked outbound path, inbound MADs arrive in the
//! device's [`vrdma::MadInbox`] (the multiplexer's callback target), and UD and RC queue
//! pairs are queue pairs on the port (RC ones over the VM's regions, sending from its GID).
use std::{
    net::Ipv4Addr,
    path::PathBuf,
    str::FromStr,
    sync::{
        atomic::{AtomicU32, Ordering},
        Arc,
    },
};

use rdma::{
    mux::{Backpressure, Multiplexer, MuxConfig, MuxStats, Qp1Sink, VmId, VmReport},
    port::{PortConfig, PortStats, SoftPort, UdDest, UdQp, UdSend},
    Gid, Mad, RdmaError,
};
use serde::Serialize;
use vrdma::{
    BackendError, BackendErrorKind, DeviceStats, MadInbox, PortRcQueue, RcQueue, RdmaBackend,
    UdDatagram, UdOut, UdQueue,
};

/// `--vrdma gid=IPV4[,host=ADDR][,pcap=FILE]`. The GID must be an address of this host
/// (the port binds UDP 4791 on it); IP routing says where the other GIDs live.
#[derive(Debug, Clone)]
pub struct VrdmaSpec {
    /// The VM's GID (IPv4-mapped).
    pub gid: Ipv4Addr,
    /// Host address the software RoCEv2 port binds (UDP 4791); default: the GID's address.
    pub host: Option<Ipv4Addr>,
    /// Packet capture file.
    pub pcap: Option<PathBuf>,
}

impl FromStr for VrdmaSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<VrdmaSpec, String> {
        let mut gid = None;
        let mut spec = VrdmaSpec {
            gid: Ipv4Addr::UNSPECIFIED,
            host: None,
            pcap: None,
        };
        for part in s.split(',').filter(|p| !p.is_empty()) {
            let (k, v) = part
                .split_once('=')
                .ok_or_else(|| format!("'{part}': expected KEY=VALUE"))?;
            let ip = |v: &str| v.parse::<Ipv4Addr>().map_err(|e| format!("{k}='{v}': {e}"));
            match k {
                "gid" => gid = Some(ip(v)?),
                "host" => spec.host = Some(ip(v)?),
                "neighbor" | "peer" => {
                    return Err(format!(
                        "--vrdma {k}= is gone: a GID is an address of its host and IP routing \
                         finds it (give the VM a GID its host owns, e.g. any 127.x address)"
                    ))
                }
                "pcap" => spec.pcap = Some(PathBuf::from(v)),
                other => return Err(format!("unknown --vrdma key '{other}'")),
            }
        }
        spec.gid = gid.ok_or("--vrdma needs gid=A.B.C.D")?;
        Ok(spec)
    }
}

/// Inbound MADs into a VM's device.
struct InboxSink(Arc<MadInbox>);

impl Qp1Sink for InboxSink {
    fn deliver(&self, grh: &[u8; 40], mad: &Mad) -> Result<(), Backpressure> {
        self.0.deliver(grh, mad).map_err(|_| Backpressure)
    }
}

fn backend_error(e: RdmaError) -> BackendError {
    let kind = match &e {
        RdmaError::GidOwned { .. } => BackendErrorKind::AddressInUse,
        RdmaError::Refused { .. }
        | RdmaError::NotOwner { .. }
        | RdmaError::InvalidGid(_)
        | RdmaError::GidNotAllowed { .. } => BackendErrorKind::Refused,
        _ => BackendErrorKind::Failed,
    };
    BackendError::new(kind, vmm::ErrorChain(&e).to_string())
}

/// One VM's view of the host: its multiplexer registration and the port.
struct MuxBackend {
    vm: VmId,
    mux: Arc<Multiplexer>,
    port: SoftPort,
}

struct HostUd {
    port: SoftPort,
    qp: Arc<UdQp>,
}

impl UdQueue for HostUd {
    fn qpn(&self) -> u32 {
        self.qp.qpn_value()
    }
    fn send(
        &self,
        dgid: Gid,
        dqpn: u32,
        qkey: u32,
        imm: Option<u32>,
        data: &[u8],
    ) -> Result<(), BackendError> {
        self.port
            .post_send_ud(&self.qp, UdDest { dgid, dqpn, qkey }, imm, data)
            .map_err(backend_error)
    }
    fn send_batch(
        &self,
        msgs: &[UdOut<'_>],
        done: &mut dyn FnMut(usize, Result<(), BackendError>),
    ) {
        let sends: Vec<UdSend<'_>> = msgs
            .iter()
            .map(|m| UdSend {
                dest: UdDest {
                    dgid: m.dgid,
                    dqpn: m.dqpn,
                    qkey: m.qkey,
                },
                imm: m.imm,
                data: m.data,
            })
            .collect();
        self.port
            .post_send_ud_batch(&self.qp, &sends, |i, r| done(i, r.map_err(backend_error)));
    }
    fn try_recv(&self) -> Option<UdDatagram> {
        self.qp.try_recv().map(|m| UdDatagram {
            sgid: m.sgid,
            src_qpn: m.src_qpn,
            grh: m.grh,
            imm: m.imm,
            data: m.data,
        })
    }
    fn set_waker(&self, waker: Arc<dyn Fn() + Send + Sync>) {
        self.qp.set_notify(waker);
    }
}

impl Drop for HostUd {
    fn drop(&mut self) {
        let _ = self.port.destroy_qp(self.qp.qpn_value());
    }
}

impl RdmaBackend for MuxBackend {
    fn bind_gid(&self, gid: Gid) -> Result<(), BackendError> {
        self.mux.register_gid(self.vm, gid).map_err(backend_error)
    }
    fn unbind_gid(&self, gid: Gid) -> Result<(), BackendError> {
        self.mux.unregister_gid(self.vm, gid).map_err(backend_error)
    }
    fn send_mad(&self, sgid: Gid, dgid: Gid, mad: &[u8]) -> Result<(), BackendError> {
        self.mux
            .send_from_vm(self.vm, sgid, dgid, mad)
            .map_err(backend_error)
    }
    fn receive_buffers_posted(&self) {
        self.mux.poll_pending(self.vm);
    }
    fn create_ud_qp(&self, gid: Gid, qkey: u32) -> Result<Box<dyn UdQueue>, BackendError> {
        Ok(Box::new(HostUd {
            port: self.port.clone(),
            qp: self.port.create_ud_qp(gid, qkey),
        }))
    }
    fn create_rc_qp(
        &self,
        gid: Gid,
        mrs: Arc<rdma::rc::MrTable>,
    ) -> Result<Box<dyn RcQueue>, BackendError> {
        Ok(PortRcQueue::create(&self.port, gid, mrs))
    }
}

/// The host: a software RoCEv2 port and its multiplexer.
pub struct VrdmaHost {
    port: SoftPort,
    mux: Arc<Multiplexer>,
    next_vm: AtomicU32,
}

/// What a VM's device and the multiplexer saw.
#[derive(Debug, Clone, Serialize)]
pub struct VmVrdmaReport {
    /// The multiplexer's VM ID.
    pub vm: VmId,
    /// Device counters.
    pub device: DeviceStats,
    /// The multiplexer's report for this VM (GIDs still registered, MADs routed to it, sent,
    /// refused), taken before the VM was detached.
    pub mux: Option<VmReport>,
    /// GIDs still registered when the VM went away (all unregistered then).
    pub gids_at_exit: usize,
}

/// The host's counters.
#[derive(Debug, Clone, Serialize)]
pub struct HostReport {
    /// Host address.
    pub addr: Ipv4Addr,
    /// Multiplexer counters (MADs routed, dropped, refused).
    pub mux: MuxStats,
    /// Port counters.
    pub port: PortStats,
}

impl VrdmaHost {
    /// Binds the port on `addr` and starts the multiplexer. A VM's GID is bound when its
    /// device registers it (CREATE_BIND); it must be an address this host owns.
    pub fn start(addr: Ipv4Addr, pcap: Option<PathBuf>) -> crate::Result<Arc<VrdmaHost>> {
        let mut cfg = PortConfig::new(addr);
        cfg.pcap = pcap;
        let port = SoftPort::bind(cfg).map_err(|source| crate::Error::Rdma {
            what: format!("binding the RoCEv2 port on {addr}"),
            source,
        })?;
        let mux = Multiplexer::new(MuxConfig::default(), Arc::new(port.clone()));
        port.set_gsi_handler(mux.clone());
        Ok(Arc::new(VrdmaHost {
            port,
            mux,
            next_vm: AtomicU32::new(1),
        }))
    }

    /// Attaches a PVRDMA device to `vm`, registered with the multiplexer as a new VM that may
    /// own exactly the GIDs `gids` (its `--vrdma gid=`): the guest's CREATE_BIND of any other
    /// GID is refused and counted, whatever the guest was told.
    pub fn attach(&self, vm: &vmm::Vm, gids: &[Ipv4Addr]) -> crate::Result<VmLink> {
        let id = self.next_vm.fetch_add(1, Ordering::Relaxed);
        let inbox = Arc::new(MadInbox::default());
        let allowed: Vec<Gid> = gids.iter().map(|a| Gid::from_ipv4(*a)).collect();
        self.mux
            .attach_vm(id, Arc::new(InboxSink(inbox.clone())))
            .and_then(|()| self.mux.set_allowed_gids(id, &allowed))
            .map_err(|source| crate::Error::Rdma {
                what: "attaching the VM to the multiplexer".into(),
                source,
            })?;
        let backend = Arc::new(MuxBackend {
            vm: id,
            mux: self.mux.clone(),
            port: self.port.clone(),
        });
        let handle =
            vrdma::attach(vm, backend, inbox, vrdma::DEFAULT_BAR_BASE).map_err(|source| {
                crate::Error::Vrdma {
                    what: "attaching the PVRDMA device",
                    source,
                }
            })?;
        Ok(VmLink {
            handle: Some(handle),
            id,
            mux: self.mux.clone(),
        })
    }

    /// Counters.
    pub fn report(&self) -> HostReport {
        HostReport {
            addr: self.port.addr(),
            mux: self.mux.stats(),
            port: self.port.stats(),
        }
    }

    /// Stops the port.
    pub fn shutdown(&self) {
        self.port.shutdown();
    }
}

/// A VM's device and its registration; [`VmLink::finish`] (or dropping it) unregisters.
pub struct VmLink {
    handle: Option<vrdma::VrdmaHandle>,
    id: VmId,
    mux: Arc<Multiplexer>,
}

impl VmLink {
    /// Stops the device (unbinding its GIDs) and detaches the VM from the multiplexer.
    pub fn finish(mut self) -> VmVrdmaReport {
        self.finish_inner()
    }

    fn finish_inner(&mut self) -> VmVrdmaReport {
        let mux = self.mux.vm_report(self.id);
        let device = self.handle.take().map(|mut h| h.stop()).unwrap_or_default();
        // Stopping the device unbound its GIDs; detaching drops anything left (connections,
        // queued MADs).
        let _ = self.mux.detach_vm(self.id);
        VmVrdmaReport {
            vm: self.id,
            device,
            gids_at_exit: mux.as_ref().map_or(0, |m| m.gids.len()),
            mux,
        }
    }
}

impl Drop for VmLink {
    fn drop(&mut self) {
        if self.handle.is_some() {
            self.finish_inner();
        }
    }
}

//! A VM session: what to boot and how to run it ([`BootSpec`], [`SessionSpec`]), building and
//! booting the VM with its devices ([`run`]), the state save → restore round trip, and the
//! report of how it went ([`SessionReport`]). The supervisor ([`crate::supervisor`]) runs it.
use std::{
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use guest_abi::{Workload, WorkloadArgs};
use migration::{MigrationReport, ReceiveReport};
use serde::{Deserialize, Serialize};
use vmm::{devices::serial::ConsoleSink, vm::VerifyResult, Vm, VmConfig};

use crate::{
    command::CommandSource, passthrough::PassthroughSession, signals::SignalState, Error, Result,
};

/// The guest to boot.
#[derive(Clone)]
pub struct BootSpec {
    /// Guest image (ELF).
    pub image: Arc<Vec<u8>>,
    /// Workload.
    pub workload: Workload,
    /// Workload arguments.
    pub args: WorkloadArgs,
}

/// How to run and supervise the VM.
#[derive(Clone, Default)]
pub struct SessionSpec {
    /// RAM size in bytes.
    pub memory: u64,
    /// Where console output goes.
    pub console: ConsoleSink,
    /// Prefix of console lines.
    pub console_prefix: String,
    /// Hard stop after this long.
    pub timeout: Option<Duration>,
    /// Save all state after this long, rebuild the VM from it and continue.
    pub roundtrip_after: Option<Duration>,
    /// Ask the guest to verify its ledger after this long.
    pub verify_after: Option<Duration>,
    /// The control API's Unix socket (served by the caller, which hands the supervisor a
    /// [`CommandSource`]).
    pub api_socket: Option<PathBuf>,
    /// A passthrough NVMe device to attach.
    pub passthrough: Option<crate::passthrough::PassthroughSource>,
    /// A passthrough virtio-net device to attach: the socket of a running
    /// `ferry device virtio-net` (direct, or shadowed with `shadow_continuous`; shadowed for
    /// a live migration).
    pub net: Option<PathBuf>,
    /// Attach a virtual RDMA device served by this host's port and multiplexer.
    pub vrdma: Option<Arc<crate::vrdma_host::VrdmaHost>>,
    /// Shadow the passthrough device's rings all the time (not only while migrating).
    pub shadow_continuous: bool,
    /// Options of the shadow engine.
    pub shadow: shadow::EngineOptions,
    /// Set by the caller to ask the workload to finish, as SIGUSR2 does (the supervisor
    /// clears it when it passes the request on).
    pub finish: Option<Arc<std::sync::atomic::AtomicBool>>,
    /// Set by the session once continuous shadow mode of the passthrough NIC has been entered
    /// (for callers that measure shadow mode only from then on).
    pub net_shadowed: Option<Arc<std::sync::atomic::AtomicBool>>,
}

impl SessionSpec {
    /// The VM configuration for this session.
    pub fn vm_config(&self) -> VmConfig {
        VmConfig {
            ram_size: self.memory,
            vcpus: 1,
            console: self.console.clone(),
            console_prefix: self.console_prefix.clone(),
        }
    }
}

/// The state save → restore round trip, as it happened.
#[derive(Clone, Debug, Serialize)]
pub struct RoundTrip {
    /// Size of the serialized VM state.
    pub state_bytes: usize,
    /// Workload progress when the VM was paused.
    pub progress_at_pause: u64,
    /// Time from pause to the restored VM running.
    pub pause_ms: f64,
}

/// A verification result, serializable (and read back from another process's summary).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Verification {
    /// 0 = the ledger holds.
    pub status: u32,
    /// Pages checked.
    pub pages: u64,
    /// Writes recorded.
    pub writes: u64,
}

impl From<VerifyResult> for Verification {
    fn from(v: VerifyResult) -> Self {
        Verification {
            status: v.status,
            pages: v.pages,
            writes: v.writes,
        }
    }
}

/// How a session went.
#[derive(Clone, Debug, Serialize)]
pub struct SessionReport {
    /// "exit", "migrated", "crashed", "stopped", "timeout", "failed".
    pub outcome: String,
    /// Guest exit status (for "exit").
    pub status: Option<u32>,
    /// Human-readable outcome.
    pub detail: String,
    /// Process start → the guest's first instruction (booted VMs).
    pub first_instruction_ms: Option<f64>,
    /// Process start → the VM ended.
    pub end_ms: f64,
    /// Workload progress counter at the end (page writes for `dirty`).
    pub progress: u64,
    /// Verifications asked for while running, with their results.
    pub verifications: Vec<Verification>,
    /// The state round trip, if one was asked for.
    pub roundtrip: Option<RoundTrip>,
    /// How this VM arrived, when it came by migration.
    pub incoming: Option<ReceiveReport>,
    /// The migration that moved this VM away.
    pub migration: Option<MigrationReport>,
    /// Migrations that failed (the VM kept running here).
    pub failed_migrations: Vec<String>,
    /// Port accesses no device claimed.
    pub unhandled_pio: u64,
    /// MMIO accesses no device claimed.
    pub unhandled_mmio: u64,
    /// MMIO exits for guest RAM addresses served from RAM (a memory slot being replaced).
    #[serde(default)]
    pub mmio_ram_fallbacks: u64,
    /// Signal that stopped the VM.
    pub signal: Option<i32>,
    /// The passthrough device's configuration log (admin mediation).
    pub config_log: Option<passthrough::ConfigLog>,
    /// The virtual RDMA device's and the multiplexer's counters for this VM.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vrdma: Option<crate::vrdma_host::VmVrdmaReport>,
    /// The shadow engine at the end (positions, counters, mapped doorbell pages).
    pub shadow: Option<shadow::EngineStatus>,
    /// The passthrough virtio-net device's shadow engine at the end.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub net_shadow: Option<shadow::engine::net::NetEngineStatus>,
    /// Last console lines.
    #[serde(skip)]
    pub console_tail: Vec<String>,
}

impl SessionReport {
    /// The process exit code for this outcome.
    pub fn exit_code(&self) -> i32 {
        match (self.outcome.as_str(), self.status, self.signal) {
            ("exit", Some(s), _) => s.min(255) as i32,
            ("migrated", _, _) => 0,
            (_, _, Some(sig)) => 128 + sig,
            ("timeout", _, _) => 124,
            ("crashed", _, _) => 70,
            _ => 1,
        }
    }
}

/// Milliseconds as a float, for reports.
pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Saves the whole VM state, builds a new VM on the same guest RAM, restores, and continues.
pub(crate) fn roundtrip(vm: Vm, spec: &SessionSpec) -> Result<(Vm, RoundTrip)> {
    let t0 = Instant::now();
    vm.pause()
        .map_err(Error::vmm("pausing for the state round trip"))?;
    let progress_at_pause = vm
        .mailbox()
        .progress()
        .map_err(Error::vmm("reading the guest's progress"))?;
    let state = vm.save_state().map_err(Error::vmm("saving VM state"))?;
    let bytes = postcard::to_allocvec(&state).map_err(|source| Error::Encoding {
        what: "serializing VM state",
        source,
    })?;
    let ram = vm.ram().clone();
    drop(vm);
    let state: vmm::state::VmState =
        postcard::from_bytes(&bytes).map_err(|source| Error::Encoding {
            what: "deserializing VM state",
            source,
        })?;
    let mut fresh =
        Vm::with_ram(&spec.vm_config(), ram).map_err(Error::vmm("building the fresh VM"))?;
    fresh
        .restore_state(&state)
        .map_err(Error::vmm("restoring VM state"))?;
    fresh
        .start()
        .map_err(Error::vmm("starting the restored VM"))?;
    tracing::info!(bytes = bytes.len(), "VM state restored into a fresh VM");
    Ok((
        fresh,
        RoundTrip {
            state_bytes: bytes.len(),
            progress_at_pause,
            pause_ms: ms(t0.elapsed()),
        },
    ))
}

/// Checks what [`run`] cannot do before anything is built.
pub fn check(spec: &SessionSpec) -> Result<()> {
    if spec.passthrough.is_some() && spec.roundtrip_after.is_some() {
        return Err(Error::Unsupported(
            "the state round trip does not support passthrough devices".into(),
        ));
    }
    if spec.net.is_some() && spec.roundtrip_after.is_some() {
        return Err(Error::Unsupported(
            "the state round trip does not support the passthrough virtio-net device (live \
             migration does)"
                .into(),
        ));
    }
    if spec.vrdma.is_some() && (spec.api_socket.is_some() || spec.roundtrip_after.is_some()) {
        return Err(Error::Unsupported(
            "the virtual RDMA device does not support migration or the state round trip yet".into(),
        ));
    }
    Ok(())
}

/// Builds a VM, boots the guest, and supervises it to its end; `commands` (the control API)
/// is served to the supervisor.
pub fn run(
    boot: &BootSpec,
    spec: &SessionSpec,
    commands: Option<Box<dyn CommandSource>>,
    process_start: Instant,
    signals: &SignalState,
) -> Result<SessionReport> {
    check(spec)?;
    if let ConsoleSink::File(path) = &spec.console {
        std::fs::File::create(path).map_err(Error::io(format!(
            "creating console file {}",
            path.display()
        )))?;
    }
    let mut vm = Vm::new(&spec.vm_config()).map_err(Error::vmm("building the VM"))?;
    let device = spec
        .passthrough
        .as_ref()
        .map(|p| PassthroughSession::start(p, &vm, spec.shadow_continuous, spec.shadow))
        .transpose()?;
    let net = spec
        .net
        .as_ref()
        .map(|socket| {
            let att = crate::net_session::attach(&vm, socket)?;
            crate::net_session::NetSession::new(att, spec.shadow_continuous, spec.shadow)
                .map(|n| n.report_entered(spec.net_shadowed.clone()))
        })
        .transpose()?;
    let device = match (device, net) {
        (Some(d), Some(n)) => Some(d.with_net(n)),
        (None, Some(n)) => Some(PassthroughSession::net_only(n)),
        (d, None) => d,
    };
    // The VM may own the GID it is configured with (`--vrdma gid=`), nothing else.
    let vrdma_gids = [std::net::Ipv4Addr::from(boot.args.rdma.local_gid)];
    let vrdma = spec
        .vrdma
        .as_ref()
        .map(|h| h.attach(&vm, &vrdma_gids))
        .transpose()?;
    vm.boot(&boot.image, boot.workload, boot.args)
        .map_err(Error::vmm("loading the guest"))?;
    vm.start().map_err(Error::vmm("starting the vCPUs"))?;
    let mut report =
        crate::supervisor::supervise(vm, spec, commands, process_start, signals, None, device)?;
    // VM shutdown unregisters its GIDs.
    report.vrdma = vrdma.map(|l| l.finish());
    Ok(report)
}

//! Boots (or receives) a VM and supervises it until it ends: timeouts, signals, the control
//! API (live migration, ledger verification, status, memory hash, stop), on-request ledger
//! verification and the state save → restore round trip.
use std::{
    path::PathBuf,
    sync::{mpsc::Sender, Arc},
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use guest_abi::{ports::Event, Workload, WorkloadArgs};
use migration::{MigrationReport, ReceiveReport, SourceOptions};
use serde::{Deserialize, Serialize};
use vmm::{devices::serial::ConsoleSink, vm::VerifyResult, Vm, VmConfig, VmOutcome};

use crate::{
    api::{self, ApiServer, Request, Response},
    nvme_session::PassthroughSession,
    signals::{self, SignalState},
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
    /// Serve the control API on this Unix socket.
    pub api_socket: Option<PathBuf>,
    /// A passthrough NVMe device to attach.
    pub passthrough: Option<crate::nvme_args::PassthroughSource>,
    /// Attach a virtual RDMA device served by this host's port and multiplexer.
    pub vrdma: Option<Arc<crate::vrdma_host::VrdmaHost>>,
    /// Shadow the passthrough device's rings all the time (not only while migrating).
    pub shadow_continuous: bool,
    /// Options of the shadow engine.
    pub shadow: shadow::EngineOptions,
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

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Saves the whole VM state, builds a new VM on the same guest RAM, restores, and continues.
fn roundtrip(vm: Vm, spec: &SessionSpec) -> Result<(Vm, RoundTrip)> {
    let t0 = Instant::now();
    vm.pause().context("pausing for the state round trip")?;
    let progress_at_pause = vm.mailbox().progress()?;
    let state = vm.save_state().context("saving VM state")?;
    let bytes = postcard::to_allocvec(&state).context("serializing VM state")?;
    let ram = vm.ram().clone();
    drop(vm);
    let state: vmm::state::VmState =
        postcard::from_bytes(&bytes).context("deserializing VM state")?;
    let mut fresh = Vm::with_ram(&spec.vm_config(), ram).context("building the fresh VM")?;
    fresh.restore_state(&state).context("restoring VM state")?;
    fresh.start()?;
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

/// Builds a VM, boots the guest, and supervises it to its end.
pub fn run(
    boot: &BootSpec,
    spec: &SessionSpec,
    process_start: Instant,
    signals: &SignalState,
) -> Result<SessionReport> {
    if let ConsoleSink::File(path) = &spec.console {
        std::fs::File::create(path)
            .with_context(|| format!("creating console file {}", path.display()))?;
    }
    if spec.passthrough.is_some() && spec.roundtrip_after.is_some() {
        anyhow::bail!("the state round trip does not support passthrough devices");
    }
    if spec.vrdma.is_some() && (spec.api_socket.is_some() || spec.roundtrip_after.is_some()) {
        anyhow::bail!(
            "the virtual RDMA device does not support migration or the state round trip yet"
        );
    }
    let api = spec.api_socket.as_deref().map(api::serve).transpose()?;
    let mut vm = Vm::new(&spec.vm_config()).context("building the VM")?;
    let device = spec
        .passthrough
        .as_ref()
        .map(|p| PassthroughSession::start(p, &vm, spec.shadow_continuous, spec.shadow))
        .transpose()?;
    let vrdma = spec.vrdma.as_ref().map(|h| h.attach(&vm)).transpose()?;
    vm.boot(&boot.image, boot.workload, boot.args)
        .context("loading the guest")?;
    vm.start().context("starting the vCPUs")?;
    let mut report = supervise(vm, spec, api, process_start, signals, None, device)?;
    // VM shutdown unregisters its GIDs.
    report.vrdma = vrdma.map(|l| l.finish());
    Ok(report)
}

/// A ledger verification someone is waiting for.
struct PendingVerify {
    req: u32,
    reply: Option<Sender<Response>>,
}

impl PendingVerify {
    /// Records the guest's answer and passes it on to the API client that asked, if any.
    fn answer(self, r: VerifyResult, verifications: &mut Vec<Verification>) {
        tracing::info!(
            request = self.req,
            status = r.status,
            pages = r.pages,
            "ledger verification finished"
        );
        if let Some(reply) = &self.reply {
            let _ = reply.send(Response::ok(Verification::from(r)));
        }
        verifications.push(Verification::from(r));
    }
}

/// Supervises a running VM until it ends, migrates away, or is stopped.
pub fn supervise(
    mut vm: Vm,
    spec: &SessionSpec,
    api: Option<ApiServer>,
    process_start: Instant,
    signals: &SignalState,
    incoming: Option<ReceiveReport>,
    mut device: Option<PassthroughSession>,
) -> Result<SessionReport> {
    let started = Instant::now();
    let mut first_instruction = None;
    let mut roundtrip_done = None;
    let mut pending: Vec<PendingVerify> = Vec::new();
    let mut verify_asked = false;
    let mut verifications = Vec::new();
    let mut signal = None;
    let mut timed_out = false;
    let mut migrated = None;
    let mut failed_migrations = Vec::new();

    let outcome = loop {
        if let Some(o) = vm.wait(Some(Duration::from_millis(20))) {
            vm.pause().context("parking the vCPUs")?;
            break o;
        }
        let now = started.elapsed();
        if let Some(d) = &mut device {
            d.tick(&vm);
        }
        if first_instruction.is_none() {
            first_instruction = vm.lifecycle().event_time(Event::Booted);
        }
        if let Some(sig) = signals.stop_signal() {
            signal = Some(sig);
            let why = format!("{} received", signals::name(sig));
            vm.stop(&why)?;
            break VmOutcome::Stopped(why);
        }
        if let Some(t) = spec.timeout {
            if now >= t {
                timed_out = true;
                let why = format!("timeout of {} reached", humantime::format_duration(t));
                vm.stop(&why)?;
                break VmOutcome::Stopped(why);
            }
        }
        let due = spec.verify_after.is_some_and(|t| now >= t) && !verify_asked;
        if due || signals.take_verify() {
            verify_asked |= due;
            pending.push(PendingVerify {
                req: vm.mailbox().request_verify()?,
                reply: None,
            });
        }
        let mut still = Vec::new();
        for p in pending.drain(..) {
            match vm.mailbox().verify_result(p.req)? {
                Some(r) => p.answer(r, &mut verifications),
                None => still.push(p),
            }
        }
        pending = still;
        if roundtrip_done.is_none() && spec.roundtrip_after.is_some_and(|t| now >= t) {
            let (fresh, rt) = roundtrip(vm, spec)?;
            vm = fresh;
            roundtrip_done = Some(rt);
        }
        if let Some(api) = &api {
            let mut stop = None;
            while let Ok(p) = api.requests.try_recv() {
                match p.request {
                    Request::Migrate(m) => {
                        let opts = SourceOptions {
                            downtime: Duration::from_millis(m.downtime_ms),
                            max_rounds: m.max_rounds,
                            on_limit: m.on_limit,
                            debug_hash: m.debug_hash,
                            max_bandwidth: m.max_bandwidth,
                            ..Default::default()
                        };
                        let reply = p.reply.clone();
                        let mut devices: Vec<Box<dyn migration::MigratableDevice>> = device
                            .as_ref()
                            .and_then(|d| d.engine())
                            .map(|e| {
                                Box::new(shadow::engine::device::ShadowedDevice::new(
                                    e.clone(),
                                    "nvme0",
                                    m.unsafe_no_shadow,
                                ))
                                    as Box<dyn migration::MigratableDevice>
                            })
                            .into_iter()
                            .collect();
                        let result =
                            migration::migrate(&vm, &mut devices, &m.to, &opts, &mut |prog| {
                                let _ = reply.send(Response::Progress(prog.clone()));
                            });
                        drop(devices);
                        match result {
                            Ok(report) => {
                                eprintln!(
                                    "ferry: migrated to {} (downtime {:.1} ms, total {:.0} ms)",
                                    m.to, report.downtime_ms, report.total_ms
                                );
                                let _ = p.reply.send(Response::ok(&report));
                                stop = Some(VmOutcome::Stopped(format!("migrated to {}", m.to)));
                                migrated = Some(report);
                                break;
                            }
                            Err(e) => {
                                let why = migration::ErrorChain(&e).to_string();
                                eprintln!(
                                    "ferry: migration to {} failed, the VM keeps running here: {why}",
                                    m.to
                                );
                                failed_migrations.push(why.clone());
                                let _ = p.reply.send(Response::err(why));
                            }
                        }
                    }
                    Request::Verify => {
                        pending.push(PendingVerify {
                            req: vm.mailbox().request_verify()?,
                            reply: Some(p.reply),
                        });
                    }
                    Request::Status => {
                        let _ = p.reply.send(Response::ok(serde_json::json!({
                            "state": "running",
                            "uptime_ms": ms(started.elapsed()),
                            "progress": vm.mailbox().progress().unwrap_or(0),
                            "ram_bytes": vm.ram().size(),
                            "shadow": device.as_ref().and_then(|d| d.shadow_status()),
                            "io_queues": device
                                .as_ref()
                                .and_then(|d| d.config_log())
                                .map(|l| l.io_sqs.len()),
                        })));
                    }
                    Request::MemoryHash => {
                        let answer = vm.pause().map(|_| migration::hash::memory_hash(vm.ram()));
                        let resumed = vm.resume();
                        let _ = p.reply.send(match (answer, resumed) {
                            (Ok(h), Ok(())) => {
                                Response::ok(serde_json::json!({ "memory_hash": h }))
                            }
                            (Err(e), _) | (_, Err(e)) => Response::err(e),
                        });
                    }
                    Request::Stop => {
                        let _ = p
                            .reply
                            .send(Response::ok(serde_json::json!({ "stopped": true })));
                        stop = Some(VmOutcome::Stopped("stop requested through the API".into()));
                        break;
                    }
                }
            }
            if let Some(o) = stop {
                vm.stop(&o.to_string())?;
                break o;
            }
        }
    };
    let end = process_start.elapsed();
    let first_instruction_ms = first_instruction
        .or_else(|| vm.lifecycle().event_time(Event::Booted))
        .map(|t| ms(t.duration_since(process_start)));
    // A verification the guest finished in its last moments still counts (a failed one ends
    // the guest); the API clients still waiting get an answer either way.
    for p in pending {
        match vm.mailbox().verify_result(p.req) {
            Ok(Some(r)) => p.answer(r, &mut verifications),
            _ => {
                if let Some(reply) = &p.reply {
                    let _ = reply.send(Response::err(format!(
                        "the VM ended ({outcome}) before the guest answered"
                    )));
                }
            }
        }
    }
    let (kind, status) = match &outcome {
        VmOutcome::GuestExit(s) => ("exit", Some(*s)),
        VmOutcome::Crashed(_) => ("crashed", None),
        VmOutcome::Stopped(_) if migrated.is_some() => ("migrated", None),
        VmOutcome::Stopped(_) if timed_out => ("timeout", None),
        VmOutcome::Stopped(_) => ("stopped", None),
        VmOutcome::Failed(_) => ("failed", None),
    };
    let config_log = device.as_ref().and_then(|d| d.config_log());
    let shadow = device.as_ref().and_then(|d| d.shadow_status());
    if let Some(d) = device {
        d.finish(&vm);
    }
    Ok(SessionReport {
        outcome: kind.into(),
        status,
        detail: outcome.to_string(),
        first_instruction_ms,
        end_ms: ms(end),
        progress: vm.mailbox().progress().unwrap_or(0),
        verifications,
        roundtrip: roundtrip_done,
        incoming,
        migration: migrated,
        failed_migrations,
        unhandled_pio: vm.pio_bus().unhandled_count(),
        unhandled_mmio: vm.mmio_bus().unhandled_count(),
        mmio_ram_fallbacks: vm.mmio_bus().ram_fallback_count(),
        signal,
        config_log,
        vrdma: None,
        shadow,
        console_tail: vm.console_tail().lines(),
    })
}

//! Boots a VM and supervises it until it ends: timeouts, signals, on-request ledger
//! verification and the state save → restore round trip.
use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use guest_abi::{ports::Event, Workload, WorkloadArgs};
use serde::Serialize;
use vmm::{devices::serial::ConsoleSink, vm::VerifyResult, Vm, VmConfig, VmOutcome};

use crate::signals::{self, SignalState};

/// What to run.
#[derive(Clone)]
pub struct SessionSpec {
    /// Guest image (ELF).
    pub image: Arc<Vec<u8>>,
    /// Workload and its arguments.
    pub workload: Workload,
    /// Workload arguments.
    pub args: WorkloadArgs,
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
    /// A passthrough NVMe device to attach.
    pub passthrough: Option<crate::nvme_args::PassthroughSource>,
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

/// How a session went.
#[derive(Clone, Debug, Serialize)]
pub struct SessionReport {
    /// "exit", "crashed", "stopped", "timeout", "failed".
    pub outcome: String,
    /// Guest exit status (for "exit").
    pub status: Option<u32>,
    /// Human-readable outcome.
    pub detail: String,
    /// Process start → the guest's first instruction.
    pub first_instruction_ms: Option<f64>,
    /// Process start → the VM ended.
    pub end_ms: f64,
    /// Guest-measured duration of its `spin` loop (bench events).
    pub bench_loop_ms: Option<f64>,
    /// Workload progress counter at the end (page writes for `dirty`).
    pub progress: u64,
    /// Verifications asked for while running, with their results.
    pub verifications: Vec<Verification>,
    /// The state round trip, if one was asked for.
    pub roundtrip: Option<RoundTrip>,
    /// Port accesses no device claimed.
    pub unhandled_pio: u64,
    /// MMIO accesses no device claimed.
    pub unhandled_mmio: u64,
    /// Signal that stopped the VM.
    pub signal: Option<i32>,
    /// The passthrough device's configuration log (admin mediation).
    pub config_log: Option<passthrough::ConfigLog>,
    /// Last console lines.
    #[serde(skip)]
    pub console_tail: Vec<String>,
}

/// A verification result, serializable.
#[derive(Clone, Debug, Serialize)]
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

impl SessionReport {
    /// The process exit code for this outcome.
    pub fn exit_code(&self) -> i32 {
        match (self.outcome.as_str(), self.status, self.signal) {
            ("exit", Some(s), _) => s.min(255) as i32,
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

fn build(spec: &SessionSpec) -> Result<Vm> {
    let config = VmConfig {
        ram_size: spec.memory,
        vcpus: 1,
        console: spec.console.clone(),
        console_prefix: spec.console_prefix.clone(),
    };
    Vm::new(&config).context("building the VM")
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
    let config = VmConfig {
        ram_size: spec.memory,
        vcpus: 1,
        console: spec.console.clone(),
        console_prefix: spec.console_prefix.clone(),
    };
    let mut fresh = Vm::with_ram(&config, ram).context("building the fresh VM")?;
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

/// Runs a VM to its end.
pub fn run(
    spec: &SessionSpec,
    process_start: Instant,
    signals: &SignalState,
) -> Result<SessionReport> {
    if let ConsoleSink::File(path) = &spec.console {
        std::fs::File::create(path)
            .with_context(|| format!("creating console file {}", path.display()))?;
    }
    let mut vm = build(spec)?;
    if spec.passthrough.is_some() && spec.roundtrip_after.is_some() {
        anyhow::bail!("the state round trip does not support passthrough devices");
    }
    let device = spec
        .passthrough
        .as_ref()
        .map(|p| crate::nvme_session::PassthroughSession::start(p, &vm))
        .transpose()?;
    vm.boot(&spec.image, spec.workload, spec.args)
        .context("loading the guest")?;
    let started = Instant::now();
    vm.start().context("starting the vCPUs")?;
    let mut first_instruction = None;
    let mut bench_loop = None;
    let mut roundtrip_done = None;
    let mut pending_verify = None;
    let mut verify_asked = false;
    let mut verifications = Vec::new();
    let mut signal = None;
    let mut timed_out = false;

    let outcome = loop {
        if let Some(o) = vm.wait(Some(Duration::from_millis(20))) {
            vm.pause().context("parking the vCPUs")?;
            break o;
        }
        let now = started.elapsed();
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
            pending_verify = Some(vm.mailbox().request_verify()?);
        }
        if let Some(req) = pending_verify {
            if let Some(r) = vm.mailbox().verify_result(req)? {
                tracing::info!(
                    request = req,
                    status = r.status,
                    pages = r.pages,
                    "ledger verification finished"
                );
                verifications.push(Verification::from(r));
                pending_verify = None;
            }
        }
        if roundtrip_done.is_none() && spec.roundtrip_after.is_some_and(|t| now >= t) {
            bench_loop = bench_loop.or_else(|| loop_time(&vm));
            let (fresh, rt) = roundtrip(vm, spec)?;
            vm = fresh;
            roundtrip_done = Some(rt);
        }
    };
    let end = process_start.elapsed();
    let first_instruction_ms = first_instruction
        .or_else(|| vm.lifecycle().event_time(Event::Booted))
        .map(|t| ms(t.duration_since(process_start)));
    bench_loop = bench_loop.or_else(|| loop_time(&vm));
    // A verification the guest finished in its last moments still counts.
    if let Some(req) = pending_verify {
        if let Ok(Some(r)) = vm.mailbox().verify_result(req) {
            verifications.push(r.into());
        }
    }
    let (kind, status) = match &outcome {
        VmOutcome::GuestExit(s) => ("exit", Some(*s)),
        VmOutcome::Crashed(_) => ("crashed", None),
        VmOutcome::Stopped(_) if timed_out => ("timeout", None),
        VmOutcome::Stopped(_) => ("stopped", None),
        VmOutcome::Failed(_) => ("failed", None),
    };
    let config_log = device.as_ref().and_then(|d| d.config_log());
    if let Some(d) = device {
        d.finish(&vm);
    }
    Ok(SessionReport {
        outcome: kind.into(),
        status,
        detail: outcome.to_string(),
        first_instruction_ms,
        end_ms: ms(end),
        bench_loop_ms: bench_loop,
        progress: vm.mailbox().progress().unwrap_or(0),
        verifications,
        roundtrip: roundtrip_done,
        unhandled_pio: vm.pio_bus().unhandled_count(),
        unhandled_mmio: vm.mmio_bus().unhandled_count(),
        signal,
        config_log,
        console_tail: vm.console_tail().lines(),
    })
}

fn loop_time(vm: &Vm) -> Option<f64> {
    let lc = vm.lifecycle();
    let (s, e) = (
        lc.event_time(Event::BenchStart)?,
        lc.event_time(Event::BenchEnd)?,
    );
    (e > s).then(|| ms(e - s))
}

//! vCPUs: creation, boot registers, state save/restore, and the run loop in its own thread.
//!
//! Each vCPU runs in a thread that owns its `VcpuFd`. The VM talks to it over a channel; a
//! real-time signal kicks the thread out of `KVM_RUN` so it sees the command. Commands are
//! answered only between two `KVM_RUN`s, so state is always saved at an instruction boundary.
use std::{
    cell::Cell,
    os::unix::thread::JoinHandleExt,
    sync::{
        mpsc::{self, Receiver, RecvTimeoutError, Sender},
        Arc, Once,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use kvm_bindings::{kvm_msr_entry, Msrs, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use vmm_sys_util::signal::{register_signal_handler, SIGRTMIN};

use crate::{
    bus::Bus,
    lifecycle::{Lifecycle, VmOutcome},
    state::{xsave_from_words, xsave_words, VcpuState},
    x86, Error, Result,
};

/// How long a vCPU may take to answer a command before it is declared stuck.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(10);
/// Interval between kicks while waiting for an answer.
const KICK_INTERVAL: Duration = Duration::from_millis(2);

/// One vCPU, not yet running in a thread.
pub struct Vcpu {
    id: usize,
    fd: VcpuFd,
    pio: Arc<Bus>,
    mmio: Arc<Bus>,
    lifecycle: Arc<Lifecycle>,
    msr_index: Arc<Vec<u32>>,
}

enum Flow {
    Continue,
    Stop,
}

impl Vcpu {
    /// Creates vCPU `id` with the host's supported CPUID.
    pub fn new(
        kvm: &Kvm,
        vm: &VmFd,
        id: usize,
        pio: Arc<Bus>,
        mmio: Arc<Bus>,
        lifecycle: Arc<Lifecycle>,
        msr_index: Arc<Vec<u32>>,
    ) -> Result<Self> {
        let fd = vm
            .create_vcpu(id as u64)
            .map_err(Error::kvm("create vCPU"))?;
        let cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(Error::kvm("get supported CPUID"))?;
        fd.set_cpuid2(&cpuid).map_err(Error::kvm("set CPUID"))?;
        Ok(Vcpu {
            id,
            fd,
            pio,
            mmio,
            lifecycle,
            msr_index,
        })
    }

    /// Puts the vCPU at `entry` in 64-bit ring 3.
    pub fn setup_boot(&self, entry: u64) -> Result<()> {
        let mut sregs = self.fd.get_sregs().map_err(Error::kvm("get sregs"))?;
        x86::setup_sregs(&mut sregs);
        self.fd.set_sregs(&sregs).map_err(Error::kvm("set sregs"))?;
        self.fd
            .set_regs(&x86::initial_regs(entry))
            .map_err(Error::kvm("set regs"))?;
        let fpu = kvm_bindings::kvm_fpu {
            fcw: 0x37f,
            mxcsr: 0x1f80,
            ..Default::default()
        };
        self.fd.set_fpu(&fpu).map_err(Error::kvm("set FPU"))?;
        Ok(())
    }

    /// TSC frequency in kHz as KVM runs this vCPU.
    pub fn tsc_khz(&self) -> Option<u32> {
        self.fd.get_tsc_khz().ok().filter(|&k| k != 0)
    }

    fn get_msrs(&self) -> Result<Vec<kvm_msr_entry>> {
        // Some MSRs in the index list cannot be read on every host: KVM stops at the first
        // failing one and returns how many it read, so skip it and go on.
        let mut out = Vec::with_capacity(self.msr_index.len());
        let mut rest: &[u32] = &self.msr_index;
        while !rest.is_empty() {
            let entries: Vec<kvm_msr_entry> = rest
                .iter()
                .map(|&index| kvm_msr_entry {
                    index,
                    ..Default::default()
                })
                .collect();
            let mut msrs = Msrs::from_entries(&entries).map_err(|e| Error::Vcpu {
                id: self.id,
                reason: format!("MSR list of {} entries: {e:?}", entries.len()),
            })?;
            let n = self
                .fd
                .get_msrs(&mut msrs)
                .map_err(Error::kvm("get MSRs"))?;
            out.extend_from_slice(&msrs.as_slice()[..n]);
            if n < rest.len() {
                tracing::debug!(
                    msr = format_args!("{:#x}", rest[n]),
                    "MSR not readable, not saved"
                );
                rest = &rest[n + 1..];
            } else {
                rest = &[];
            }
        }
        Ok(out)
    }

    /// Saves the vCPU's state (Firecracker's order: MP state first, vCPU events last).
    pub fn save_state(&self) -> Result<VcpuState> {
        let k = |op| Error::kvm(op);
        let mp_state = self.fd.get_mp_state().map_err(k("get MP state"))?;
        let regs = self.fd.get_regs().map_err(k("get regs"))?;
        let sregs = self.fd.get_sregs().map_err(k("get sregs"))?;
        let xsave = xsave_words(&self.fd.get_xsave().map_err(k("get xsave"))?);
        let xcrs = self.fd.get_xcrs().map_err(k("get xcrs"))?;
        let debugregs = self.fd.get_debug_regs().map_err(k("get debug regs"))?;
        let lapic = self.fd.get_lapic().map_err(k("get LAPIC"))?;
        let tsc_khz = self.tsc_khz();
        let msrs = self.get_msrs()?;
        let vcpu_events = self.fd.get_vcpu_events().map_err(k("get vCPU events"))?;
        Ok(VcpuState {
            id: self.id as u32,
            mp_state,
            regs,
            sregs,
            xsave,
            xcrs,
            debugregs,
            lapic,
            msrs,
            vcpu_events,
            tsc_khz,
        })
    }

    /// Restores a saved state (SREGS before LAPIC and MSRs, vCPU events last).
    pub fn restore_state(&self, s: &VcpuState) -> Result<()> {
        let k = |op| Error::kvm(op);
        if s.id as usize != self.id {
            return Err(Error::StateMismatch(format!(
                "state of vCPU {} given to vCPU {}",
                s.id, self.id
            )));
        }
        if let (Some(want), Some(have)) = (s.tsc_khz, self.tsc_khz()) {
            if want != have {
                if let Err(e) = self.fd.set_tsc_khz(want) {
                    tracing::warn!(want, have, "cannot set the TSC frequency: {e}");
                }
            }
        }
        self.fd
            .set_mp_state(s.mp_state)
            .map_err(k("set MP state"))?;
        self.fd.set_regs(&s.regs).map_err(k("set regs"))?;
        self.fd.set_sregs(&s.sregs).map_err(k("set sregs"))?;
        let xsave = xsave_from_words(&s.xsave).ok_or_else(|| {
            Error::StateMismatch(format!("xsave area of {} words", s.xsave.len()))
        })?;
        // SAFETY: `xsave` is a complete legacy-size kvm_xsave; KVM reads exactly that size for
        // KVM_SET_XSAVE.
        unsafe { self.fd.set_xsave(&xsave) }.map_err(k("set xsave"))?;
        self.fd.set_xcrs(&s.xcrs).map_err(k("set xcrs"))?;
        self.fd
            .set_debug_regs(&s.debugregs)
            .map_err(k("set debug regs"))?;
        self.fd.set_lapic(&s.lapic).map_err(k("set LAPIC"))?;
        let msrs = Msrs::from_entries(&s.msrs)
            .map_err(|e| Error::StateMismatch(format!("{} MSRs: {e:?}", s.msrs.len())))?;
        let n = self.fd.set_msrs(&msrs).map_err(k("set MSRs"))?;
        if n != s.msrs.len() {
            return Err(Error::StateMismatch(format!(
                "KVM refused MSR {:#x} (set {n} of {})",
                s.msrs[n].index,
                s.msrs.len()
            )));
        }
        self.fd
            .set_vcpu_events(&s.vcpu_events)
            .map_err(k("set vCPU events"))?;
        Ok(())
    }

    fn crash(&self, what: String) -> Flow {
        let rip = self.fd.get_regs().map(|r| r.rip).unwrap_or(0);
        self.lifecycle.finish(VmOutcome::Crashed(format!(
            "{what} (vCPU {}, rip {rip:#x})",
            self.id
        )));
        Flow::Stop
    }

    fn run_once(&mut self) -> Flow {
        enum Fatal {
            Shutdown,
            Hlt,
            FailEntry(u64),
            Internal,
            SystemEvent(u32),
            Other(String),
        }
        let fatal = match self.fd.run() {
            Ok(exit) => match exit {
                VcpuExit::IoOut(port, data) => {
                    self.pio.write(port as u64, data);
                    None
                }
                VcpuExit::IoIn(port, data) => {
                    self.pio.read(port as u64, data);
                    None
                }
                VcpuExit::MmioRead(addr, data) => {
                    self.mmio.read(addr, data);
                    None
                }
                VcpuExit::MmioWrite(addr, data) => {
                    self.mmio.write(addr, data);
                    None
                }
                VcpuExit::Intr => {
                    self.fd.set_kvm_immediate_exit(0);
                    None
                }
                VcpuExit::Shutdown => Some(Fatal::Shutdown),
                VcpuExit::Hlt => Some(Fatal::Hlt),
                VcpuExit::FailEntry(reason, _) => Some(Fatal::FailEntry(reason)),
                VcpuExit::InternalError => Some(Fatal::Internal),
                VcpuExit::SystemEvent(t, _) => Some(Fatal::SystemEvent(t)),
                other => Some(Fatal::Other(format!("{other:?}"))),
            },
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                // A kick (see `kick_handler`): the loop looks at its commands next.
                self.fd.set_kvm_immediate_exit(0);
                None
            }
            Err(e) => {
                self.lifecycle.finish(VmOutcome::Failed(format!(
                    "KVM_RUN on vCPU {}: {e}",
                    self.id
                )));
                return Flow::Stop;
            }
        };
        match fatal {
            None => {}
            Some(Fatal::Shutdown) => return self.crash("triple fault".into()),
            Some(Fatal::Hlt) => return self.crash("halted with interrupts disabled".into()),
            Some(Fatal::FailEntry(r)) => {
                return self.crash(format!("VM entry failed, reason {r:#x}"))
            }
            Some(Fatal::Internal) => {
                let sub = self.fd.get_kvm_run().exit_reason;
                return self.crash(format!("KVM internal error (exit reason {sub})"));
            }
            Some(Fatal::SystemEvent(t)) => return self.crash(format!("system event {t}")),
            Some(Fatal::Other(what)) => return self.crash(format!("unexpected VM exit {what}")),
        }
        if self.lifecycle.is_finished() {
            Flow::Stop
        } else {
            Flow::Continue
        }
    }

    /// Moves the vCPU into its own thread, initially paused.
    pub fn spawn(self) -> Result<VcpuHandle> {
        install_kick_handler();
        let id = self.id;
        let (cmd_tx, cmd_rx) = mpsc::channel();
        let (reply_tx, reply_rx) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name(format!("vcpu{id}"))
            .spawn(move || {
                sandbox::enter(sandbox::Kind::Vcpu);
                vcpu_thread(self, cmd_rx, reply_tx)
            })
            .map_err(|e| Error::Vcpu {
                id,
                reason: format!("cannot spawn thread: {e}"),
            })?;
        Ok(VcpuHandle {
            id,
            chan: std::sync::Mutex::new((cmd_tx, reply_rx)),
            thread: Some(thread),
        })
    }
}

thread_local! {
    /// `kvm_run.immediate_exit` of the vCPU this thread runs (null on other threads).
    static IMMEDIATE_EXIT: Cell<*mut u8> = const { Cell::new(std::ptr::null_mut()) };
}

/// Sets this thread's `immediate_exit` for as long as it lives; clears the pointer before the
/// vCPU (and its `kvm_run` mapping) goes.
struct ImmediateExit;

impl ImmediateExit {
    fn arm(vcpu: &mut Vcpu) -> Self {
        let p: *mut u8 = &mut vcpu.fd.get_kvm_run().immediate_exit;
        IMMEDIATE_EXIT.with(|c| c.set(p));
        ImmediateExit
    }
}

impl Drop for ImmediateExit {
    fn drop(&mut self) {
        IMMEDIATE_EXIT.with(|c| c.set(std::ptr::null_mut()));
    }
}

/// A kick landing while the thread is outside `KVM_RUN` (between its look at the commands and
/// the next `KVM_RUN`) would interrupt nothing, and the command would wait for the next kick
/// (`KICK_INTERVAL`, 2 ms of a switchover's downtime). The handler sets `immediate_exit`, so
/// that `KVM_RUN` returns at once and the loop looks again; `run_once` clears it.
extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let _ = IMMEDIATE_EXIT.try_with(|c| {
        let p = c.get();
        if !p.is_null() {
            // SAFETY: set by this thread to its own vCPU's `kvm_run` mapping, which lives
            // until `ImmediateExit` clears the pointer (on this thread, so never while this
            // handler runs); a byte store is async-signal-safe.
            unsafe { p.write_volatile(1) };
        }
    });
}

fn install_kick_handler() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        if let Err(e) = register_signal_handler(SIGRTMIN(), kick_handler) {
            tracing::error!("cannot install the vCPU kick signal handler: {e}");
        }
    });
}

enum Command {
    Pause,
    Resume,
    Save,
    Restore(Box<VcpuState>),
    Exit,
}

enum Reply {
    Paused,
    Resumed,
    State(Box<Result<VcpuState>>),
    Restored(Result<()>),
}

fn vcpu_thread(mut vcpu: Vcpu, rx: Receiver<Command>, tx: Sender<Reply>) {
    let _armed = ImmediateExit::arm(&mut vcpu);
    let mut running = false;
    loop {
        let cmd = if running {
            match rx.try_recv() {
                Ok(c) => Some(c),
                Err(mpsc::TryRecvError::Empty) => None,
                Err(mpsc::TryRecvError::Disconnected) => return,
            }
        } else {
            match rx.recv() {
                Ok(c) => Some(c),
                Err(_) => return,
            }
        };
        if let Some(cmd) = cmd {
            let reply = match cmd {
                Command::Pause => {
                    running = false;
                    Reply::Paused
                }
                Command::Resume => {
                    running = true;
                    Reply::Resumed
                }
                Command::Save => Reply::State(Box::new(vcpu.save_state())),
                Command::Restore(s) => Reply::Restored(vcpu.restore_state(&s)),
                Command::Exit => return,
            };
            if tx.send(reply).is_err() {
                return;
            }
            continue;
        }
        if let Flow::Stop = vcpu.run_once() {
            running = false;
        }
    }
}

/// A vCPU running in its thread.
pub struct VcpuHandle {
    id: usize,
    /// Commands and their replies, locked for a whole request so that threads sharing the VM
    /// (the supervisor, a migration worker) never read each other's replies.
    chan: std::sync::Mutex<(Sender<Command>, Receiver<Reply>)>,
    thread: Option<JoinHandle<()>>,
}

impl VcpuHandle {
    fn kick(&self) {
        if let Some(t) = &self.thread {
            // SAFETY: the pthread_t belongs to a thread we own and have not joined yet;
            // SIGRTMIN has a no-op handler installed, so delivery only interrupts KVM_RUN.
            unsafe { libc::pthread_kill(t.as_pthread_t(), SIGRTMIN()) };
        }
    }

    fn request(&self, cmd: Command) -> Result<Reply> {
        let stuck = |reason: &str| Error::Vcpu {
            id: self.id,
            reason: reason.to_string(),
        };
        let chan = self.chan.lock().unwrap_or_else(|e| e.into_inner());
        chan.0.send(cmd).map_err(|_| stuck("thread is gone"))?;
        let deadline = Instant::now() + COMMAND_TIMEOUT;
        loop {
            self.kick();
            match chan.1.recv_timeout(KICK_INTERVAL) {
                Ok(r) => return Ok(r),
                Err(RecvTimeoutError::Timeout) if Instant::now() < deadline => continue,
                Err(RecvTimeoutError::Timeout) => return Err(stuck("did not answer within 10 s")),
                Err(RecvTimeoutError::Disconnected) => return Err(stuck("thread is gone")),
            }
        }
    }

    /// Stops running guest code; returns once the vCPU is outside KVM_RUN.
    pub fn pause(&self) -> Result<()> {
        match self.request(Command::Pause)? {
            Reply::Paused => Ok(()),
            _ => Err(Error::Vcpu {
                id: self.id,
                reason: "unexpected answer to pause".into(),
            }),
        }
    }

    /// Runs guest code again.
    pub fn resume(&self) -> Result<()> {
        match self.request(Command::Resume)? {
            Reply::Resumed => Ok(()),
            _ => Err(Error::Vcpu {
                id: self.id,
                reason: "unexpected answer to resume".into(),
            }),
        }
    }

    /// Saves the state of a paused vCPU.
    pub fn save_state(&self) -> Result<VcpuState> {
        match self.request(Command::Save)? {
            Reply::State(s) => *s,
            _ => Err(Error::Vcpu {
                id: self.id,
                reason: "unexpected answer to save".into(),
            }),
        }
    }

    /// Restores the state of a paused vCPU.
    pub fn restore_state(&self, s: VcpuState) -> Result<()> {
        match self.request(Command::Restore(Box::new(s)))? {
            Reply::Restored(r) => r,
            _ => Err(Error::Vcpu {
                id: self.id,
                reason: "unexpected answer to restore".into(),
            }),
        }
    }
}

impl Drop for VcpuHandle {
    fn drop(&mut self) {
        let _ = self
            .chan
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .0
            .send(Command::Exit);
        if let Some(t) = self.thread.take() {
            let deadline = Instant::now() + COMMAND_TIMEOUT;
            while !t.is_finished() && Instant::now() < deadline {
                // SAFETY: as in `kick`.
                unsafe { libc::pthread_kill(t.as_pthread_t(), SIGRTMIN()) };
                std::thread::sleep(KICK_INTERVAL);
            }
            if t.is_finished() {
                let _ = t.join();
            } else {
                tracing::error!(
                    vcpu = self.id,
                    "vCPU thread did not exit; leaving it behind"
                );
            }
        }
    }
}

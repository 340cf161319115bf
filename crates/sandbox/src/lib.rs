//! Per-thread system-call filters (seccomp-bpf, compiled by rust-vmm's `seccompiler`), as
//! Firecracker and Cloud Hypervisor install them: each kind of thread Ferry runs gets the
//! allow-list of the system calls it makes (see `lists.rs` for how they were found), and any
//! other call stops the process.
//!
//! A thread installs its filter itself, first thing, with one call: [`enter`]. Filters are
//! per thread and inherited by the threads (and processes) a filtered thread starts; stacked
//! filters all apply, so a kind that starts other threads allows what those threads need too.
//!
//! What happens on a violation depends on the [`Mode`] (`--seccomp=` on the command line, or the
//! `FERRY_SECCOMP` environment variable, which `ferry` passes to the processes it starts):
//! - [`Mode::Trap`] (the default): the kernel sends SIGSYS; the handler writes one line naming
//!   the system call's number and the thread's kind to stderr, then the process dies by SIGSYS.
//! - [`Mode::Log`]: the call goes through and the kernel logs it (audit log / `dmesg`).
//! - [`Mode::Off`]: no filters.
#![deny(missing_docs)]

use std::{
    cell::Cell,
    collections::BTreeMap,
    fmt,
    str::FromStr,
    sync::{
        atomic::{AtomicBool, AtomicU8, Ordering},
        Once,
    },
};

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

mod lists;

/// The environment variable that carries the mode to the processes Ferry starts.
pub const MODE_ENV: &str = "FERRY_SECCOMP";

/// When set (to anything), [`enter`] first makes a failing `write(-1, "ferry-seccomp:KIND")`,
/// so that `strace -f` shows where each thread's filter starts: how the allow-lists are
/// learned (see `lists.rs`).
pub const LEARN_ENV: &str = "FERRY_SECCOMP_LEARN";

/// The kinds of threads (and processes) that get a filter.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kind {
    /// A vCPU thread: KVM_RUN and the exits it handles (port and MMIO emulation).
    Vcpu,
    /// A device emulation thread inside the VMM: the NVMe passthrough watchdog, the shadow
    /// engine's poller, the virtual RDMA device thread.
    Device,
    /// A live migration's worker (source) and the destination's handshake threads.
    Migration,
    /// The RDMA port's receive threads and the connection manager's and RC timers.
    RdmaPort,
    /// The HTTP control API: its listener and one thread per connection.
    Api,
    /// The VM's supervisor (the event loop on the process's main thread), in a process that
    /// runs one VM (`ferry run`, `ferry receive`).
    EventLoop,
    /// A stand-in device process (`ferry device nvme`): its main thread and its pollers.
    DeviceProcess,
}

impl Kind {
    /// Every kind.
    pub const ALL: [Kind; 7] = [
        Kind::Vcpu,
        Kind::Device,
        Kind::Migration,
        Kind::RdmaPort,
        Kind::Api,
        Kind::EventLoop,
        Kind::DeviceProcess,
    ];

    /// The kind's name in logs.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Vcpu => "vcpu",
            Kind::Device => "device",
            Kind::Migration => "migration",
            Kind::RdmaPort => "rdma-port",
            Kind::Api => "api",
            Kind::EventLoop => "event-loop",
            Kind::DeviceProcess => "device-process",
        }
    }

    fn code(self) -> u8 {
        match self {
            Kind::Vcpu => 1,
            Kind::Device => 2,
            Kind::Migration => 3,
            Kind::RdmaPort => 4,
            Kind::Api => 5,
            Kind::EventLoop => 6,
            Kind::DeviceProcess => 7,
        }
    }

    fn from_code(code: u8) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.code() == code)
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What a filter does with a system call that is not on its list.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// No filters at all.
    Off,
    /// Allow the call and have the kernel log it.
    Log,
    /// SIGSYS: the handler logs the call and the thread's kind, then the process dies.
    Trap,
}

impl Mode {
    /// The spelling `--seccomp=` takes.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Off => "off",
            Mode::Log => "log",
            Mode::Trap => "on",
        }
    }

    fn code(self) -> u8 {
        match self {
            Mode::Off => 1,
            Mode::Log => 2,
            Mode::Trap => 3,
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A `--seccomp=` value that is not one of `on`, `trap`, `log`, `off`.
#[derive(Debug, thiserror::Error)]
#[error("unknown seccomp mode {0:?} (expected on, log or off)")]
pub struct BadMode(String);

impl FromStr for Mode {
    type Err = BadMode;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "on" | "trap" => Ok(Mode::Trap),
            "log" => Ok(Mode::Log),
            "off" => Ok(Mode::Off),
            other => Err(BadMode(other.to_string())),
        }
    }
}

/// Failures to build or install a filter.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The allow-list did not compile to BPF.
    #[error("compiling the {kind} seccomp filter")]
    Compile {
        /// The thread kind.
        kind: Kind,
        /// Why.
        #[source]
        source: seccompiler::BackendError,
    },
    /// The kernel refused the filter.
    #[error("installing the {kind} seccomp filter")]
    Apply {
        /// The thread kind.
        kind: Kind,
        /// Why.
        #[source]
        source: seccompiler::Error,
    },
    /// The SIGSYS handler could not be installed.
    #[error("installing the SIGSYS handler")]
    Handler(#[source] std::io::Error),
}

/// 0: not set (the environment decides on first use).
static MODE: AtomicU8 = AtomicU8::new(0);
static SINGLE_VM: AtomicBool = AtomicBool::new(false);
static HANDLER: Once = Once::new();

thread_local! {
    /// The kind of the filter this thread installed last (0: none); read by the SIGSYS handler.
    static KIND: Cell<u8> = const { Cell::new(0) };
}

/// Sets the mode for this process (from `--seccomp=`).
pub fn set_mode(mode: Mode) {
    MODE.store(mode.code(), Ordering::SeqCst);
}

/// The mode in force: [`set_mode`]'s, else `FERRY_SECCOMP`'s, else [`Mode::Trap`].
pub fn mode() -> Mode {
    match MODE.load(Ordering::SeqCst) {
        1 => Mode::Off,
        2 => Mode::Log,
        3 => Mode::Trap,
        _ => {
            let mode = match std::env::var(MODE_ENV) {
                Ok(v) => v.parse().unwrap_or_else(|e: BadMode| {
                    tracing::warn!("{MODE_ENV}: {e}; filters stay on");
                    Mode::Trap
                }),
                Err(_) => Mode::Trap,
            };
            set_mode(mode);
            mode
        }
    }
}

/// Says this process runs one VM (`ferry run`, `ferry receive`), so its main thread gets the
/// [`Kind::EventLoop`] filter when the supervisor starts. Processes that run several VMs one
/// after another on their main thread and start processes between them (the demo, the
/// benchmarks) leave it unset: their main thread stays unfiltered, their VMs' other threads
/// are filtered as everywhere.
pub fn set_single_vm_process() {
    SINGLE_VM.store(true, Ordering::SeqCst);
}

/// The system calls a kind of thread may make (numbers, sorted).
pub fn allowed(kind: Kind) -> Vec<i64> {
    let mut v: Vec<i64> = lists::allowed(kind);
    v.sort_unstable();
    v.dedup();
    v
}

/// The BPF program of `kind`'s filter with `on_violation` for calls off its list.
pub fn filter(kind: Kind, on_violation: SeccompAction) -> Result<BpfProgram, Error> {
    let compile = |source| Error::Compile { kind, source };
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = allowed(kind)
        .into_iter()
        .map(|nr| (nr, Vec::new()))
        .collect();
    if lists::socket_allowed(kind) {
        let families = lists::SOCKET_FAMILIES
            .iter()
            .map(|&family| {
                // Address families are small non-negative constants.
                let family = u64::from(family.unsigned_abs());
                SeccompCondition::new(0, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, family)
                    .and_then(|c| SeccompRule::new(vec![c]))
            })
            .collect::<Result<Vec<_>, _>>()
            .map_err(compile)?;
        rules.insert(libc::SYS_socket, families);
    }
    if let Some(requests) = lists::ioctl_requests(kind) {
        let requests = requests
            .iter()
            .map(|&request| {
                SeccompCondition::new(1, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, request)
                    .and_then(|c| SeccompRule::new(vec![c]))
            })
            .collect::<Result<Vec<_>, _>>()
            .map_err(compile)?;
        rules.insert(libc::SYS_ioctl, requests);
    }
    SeccompFilter::new(
        rules,
        on_violation,
        SeccompAction::Allow,
        TargetArch::x86_64,
    )
    .and_then(BpfProgram::try_from)
    .map_err(compile)
}

/// The filter that answers `kind`'s refused calls (opening files) with EACCES instead of
/// stopping the process: glibc's malloc opens `/proc/sys/vm/overcommit_memory` and
/// `/sys/devices/system/cpu/online` from whatever thread grows or shrinks an arena, and copes
/// with a failure, so a thread that must not open files is told no rather than killed.
pub fn refusal_filter(kind: Kind) -> Result<Option<BpfProgram>, Error> {
    let refused = lists::refused(kind);
    if refused.is_empty() {
        return Ok(None);
    }
    let rules = refused.iter().map(|&nr| (nr, Vec::new())).collect();
    let errno = u32::try_from(libc::EACCES).unwrap_or(1);
    SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(errno),
        TargetArch::x86_64,
    )
    .and_then(BpfProgram::try_from)
    .map(Some)
    .map_err(|source| Error::Compile { kind, source })
}

/// Installs `kind`'s filter on the calling thread, as the mode says. Returns whether a filter
/// was installed.
pub fn try_enter(kind: Kind) -> Result<bool, Error> {
    if kind == Kind::EventLoop && !SINGLE_VM.load(Ordering::SeqCst) {
        return Ok(false);
    }
    if std::env::var_os(LEARN_ENV).is_some() {
        let marker = format!("ferry-seccomp:{kind}");
        // SAFETY: writes `marker.len()` bytes from a live buffer to fd -1, which fails with
        // EBADF: the call exists only to be seen by strace.
        unsafe { libc::write(-1, marker.as_ptr().cast(), marker.len()) };
    }
    let action = match mode() {
        Mode::Off => return Ok(false),
        Mode::Log => SeccompAction::Log,
        Mode::Trap => SeccompAction::Trap,
    };
    let program = filter(kind, action.clone())?;
    if action == SeccompAction::Trap {
        install_handler()?;
        // Stacked filters: the kernel takes the strictest answer, so a call this one
        // answers with EACCES is refused even though the main filter lets it through.
        if let Some(refusals) = refusal_filter(kind)? {
            seccompiler::apply_filter(&refusals).map_err(|source| Error::Apply { kind, source })?;
        }
    }
    seccompiler::apply_filter(&program).map_err(|source| Error::Apply { kind, source })?;
    KIND.with(|k| k.set(kind.code()));
    tracing::debug!(%kind, calls = allowed(kind).len(), "seccomp filter installed");
    Ok(true)
}

/// Installs `kind`'s filter on the calling thread (one line at each thread's start). A filter
/// that cannot be installed is logged as an error and the thread runs unfiltered.
pub fn enter(kind: Kind) {
    if let Err(e) = try_enter(kind) {
        tracing::error!(
            error = &e as &dyn std::error::Error,
            "{kind} thread runs without its system-call filter"
        );
    }
}

fn install_handler() -> Result<(), Error> {
    let mut result = Ok(());
    HANDLER.call_once(|| {
        // SAFETY: a zeroed sigaction is a valid value to fill in; the handler is an
        // `extern "C"` function with the SA_SIGINFO signature, and it only makes
        // async-signal-safe calls (write, syscall, abort).
        let r = unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_sigsys as *const () as libc::sighandler_t;
            sa.sa_flags = libc::SA_SIGINFO;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(libc::SIGSYS, &sa, std::ptr::null_mut())
        };
        if r != 0 {
            result = Err(Error::Handler(std::io::Error::last_os_error()));
        }
    });
    result
}

/// The SIGSYS fields of `siginfo_t` on x86-64 (`_sigsys` in the kernel's union).
#[repr(C)]
struct SigsysInfo {
    signo: libc::c_int,
    errno: libc::c_int,
    code: libc::c_int,
    _pad: libc::c_int,
    call_addr: *mut libc::c_void,
    syscall: libc::c_int,
    arch: libc::c_uint,
}

/// Appends `s` to `buf` at `*len`, as far as it fits.
fn push(buf: &mut [u8], len: &mut usize, s: &[u8]) {
    for &b in s {
        if *len < buf.len() {
            buf[*len] = b;
            *len += 1;
        }
    }
}

/// Formats `n` in decimal without allocating.
fn push_num(buf: &mut [u8], len: &mut usize, n: i64) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    let negative = n < 0;
    let mut n = n.unsigned_abs();
    loop {
        i -= 1;
        // `n % 10` is below 10: the cast keeps every value.
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 || i == 0 {
            break;
        }
    }
    if negative {
        push(buf, len, b"-");
    }
    push(buf, len, &digits[i..]);
}

/// The line the SIGSYS handler writes.
fn violation_line(buf: &mut [u8], kind: Option<Kind>, nr: i64) -> usize {
    let mut len = 0;
    push(buf, &mut len, b"ferry: seccomp: a ");
    push(
        buf,
        &mut len,
        kind.map_or("filtered (inherited)", Kind::name).as_bytes(),
    );
    push(buf, &mut len, b" thread made the forbidden system call ");
    push_num(buf, &mut len, nr);
    push(
        buf,
        &mut len,
        b"; the process stops (--seccomp=off or log to run without the filters)\n",
    );
    len
}

extern "C" fn on_sigsys(_sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo_t for a SA_SIGINFO handler; for SIGSYS its
    // union holds the `_sigsys` fields that `SigsysInfo` mirrors.
    let nr = unsafe { (*info.cast::<SigsysInfo>()).syscall };
    // A const-initialized thread local without a destructor: a plain TLS read.
    let kind = KIND.with(Cell::get);
    let mut buf = [0u8; 256];
    let len = violation_line(&mut buf, Kind::from_code(kind), i64::from(nr));
    // SAFETY: write(2) and syscall(2) are async-signal-safe; `buf[..len]` is initialized.
    // Repeating the forbidden call while SIGSYS is blocked (it is, inside its own handler)
    // makes the kernel kill the process by SIGSYS; abort is the fallback should it return.
    unsafe {
        libc::write(2, buf.as_ptr().cast(), len);
        libc::syscall(libc::c_long::from(nr));
        libc::abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_compiles() {
        for kind in Kind::ALL {
            for action in [SeccompAction::Trap, SeccompAction::Log] {
                let p = filter(kind, action).expect("compiles");
                assert!(!p.is_empty());
            }
            refusal_filter(kind).expect("compiles");
        }
    }

    #[test]
    fn modes_parse() {
        assert_eq!("on".parse::<Mode>().ok(), Some(Mode::Trap));
        assert_eq!("trap".parse::<Mode>().ok(), Some(Mode::Trap));
        assert_eq!("log".parse::<Mode>().ok(), Some(Mode::Log));
        assert_eq!("off".parse::<Mode>().ok(), Some(Mode::Off));
        assert!("maybe".parse::<Mode>().is_err());
    }

    #[test]
    fn the_violation_line_names_kind_and_call() {
        let mut buf = [0u8; 256];
        let len = violation_line(&mut buf, Some(Kind::Vcpu), 101);
        let line = std::str::from_utf8(&buf[..len]).expect("ascii");
        assert!(
            line.starts_with("ferry: seccomp: a vcpu thread made the forbidden system call 101;")
        );
        assert!(line.ends_with('\n'));
    }

    #[test]
    fn no_list_allows_what_a_hypervisor_thread_never_needs() {
        for kind in Kind::ALL {
            let allowed = allowed(kind);
            for nr in [
                libc::SYS_ptrace,
                libc::SYS_mount,
                libc::SYS_bpf,
                libc::SYS_kexec_load,
            ] {
                assert!(!allowed.contains(&nr), "{kind} allows {nr}");
            }
        }
    }
}

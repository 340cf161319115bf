//! The allow-lists, one per kind of thread.
//!
//! How they were found: Cloud Hypervisor's `vmm/src/seccomp_filters.rs` and Firecracker's
//! `resources/seccomp/` gave the shape (a common core for memory, locks, time and thread exit,
//! then per-thread additions); what Ferry itself calls was then measured: with
//! `FERRY_SECCOMP_LEARN=1` each thread marks where its filter starts, and
//! `strace -f -ff -o DIR ferry --seccomp=off demo` (and the same over the `ferry` integration
//! tests) records every call after the mark, the calls of the threads started after it
//! included (they inherit the filter). `crates/sandbox/learn.py DIR` prints the sets.
//!
//! Calls no Ferry thread needs stay off every list (ptrace, mount, bpf, kexec, module
//! loading, namespaces, keyrings, ...). `socket` is allowed only for the address families
//! Ferry uses (Unix, IPv4, IPv6).
use crate::Kind;

/// `[SYS_a, SYS_b, ...]` from `sys![a, b, ...]`.
macro_rules! sys {
    ($($name:ident),* $(,)?) => {
        &[$(sys!(@one $name)),*]
    };
    (@one $name:ident) => {
        libc::$name
    };
}

/// Every thread: memory (malloc's arenas, thread stacks), locks, time, signal delivery (the
/// vCPU kick, signal-hook's handler that wakes its pipe on whatever thread the signal lands,
/// the SIGSYS handler), logging to stderr, randomness for hash maps, thread exit.
const BASE: &[i64] = sys![
    SYS_brk,
    SYS_clock_gettime,
    SYS_clock_nanosleep,
    SYS_exit,
    SYS_exit_group,
    SYS_futex,
    SYS_getpid,
    SYS_getrandom,
    SYS_gettid,
    SYS_gettimeofday,
    SYS_madvise,
    SYS_mmap,
    SYS_mprotect,
    SYS_mremap,
    SYS_munmap,
    SYS_nanosleep,
    SYS_restart_syscall,
    SYS_rt_sigprocmask,
    SYS_rt_sigreturn,
    SYS_sched_getaffinity,
    SYS_sched_yield,
    SYS_sendto,
    SYS_sigaltstack,
    SYS_write,
    SYS_writev,
];

/// Starting a thread (std's spawn: glibc's clone3, the robust futex list, rseq, the name),
/// which then installs its own filter on top of the inherited one (prctl NO_NEW_PRIVS,
/// seccomp: a filter can only be added, never removed or widened).
const SPAWN: &[i64] = sys![
    SYS_clone,
    SYS_clone3,
    SYS_prctl,
    SYS_rseq,
    SYS_seccomp,
    SYS_set_robust_list
];

/// Sockets and descriptors: the vfio-user client (Unix socket, descriptors passed with
/// SCM_RIGHTS), the RDMA port's UDP sockets, eventfds.
const SOCKETS: &[i64] = sys![
    SYS_bind,
    SYS_close,
    SYS_fcntl,
    SYS_getsockname,
    SYS_getsockopt,
    SYS_poll,
    SYS_ppoll,
    SYS_read,
    SYS_recvfrom,
    SYS_recvmsg,
    SYS_sendmsg,
    SYS_setsockopt,
    SYS_shutdown,
];

/// A vCPU: KVM_RUN and the exits it handles. Its port and MMIO exits reach the devices:
/// the passthrough device's registers (vfio-user messages), the virtual RDMA device's control
/// port, which binds GIDs on the RDMA port (UDP sockets, receive and timer threads) and
/// programs KVM (ioctl on the VM) from the vCPU.
const VCPU: &[i64] = sys![SYS_ioctl, SYS_eventfd2];

/// Device emulation threads: the passthrough watchdog (vfio-user register reads), the shadow
/// engine's poller (guest memory, doorbells, irqfds), the virtual RDMA device thread (UDP
/// datagrams on the port).
const DEVICE: &[i64] = sys![SYS_ioctl];

/// A migration: TCP (connect, TLS), the source's data extents (`mincore` on the guest
/// mapping, `lseek` on the memfd), the data channels (the destination's listener, pages
/// `sendfile`d from the memfd, `vmsplice`d from the mapping or `pread` for TLS, spliced through a pipe into the
/// destination's memfd), guest memory and the dirty log (KVM
/// ioctls), zero runs punched out of the destination's memfd, the devices' state, the memory
/// of a destination being built (memfd), threads it starts (handshakes, channels, a device's
/// poller), pausing the vCPUs (signals).
const MIGRATION: &[i64] = sys![
    SYS_accept4,
    SYS_connect,
    SYS_eventfd2,
    SYS_fallocate,
    SYS_ftruncate,
    SYS_getpeername,
    SYS_ioctl,
    SYS_listen,
    SYS_lseek,
    SYS_memfd_create,
    SYS_mincore,
    SYS_pipe2,
    SYS_pread64,
    SYS_sendfile,
    SYS_splice,
    SYS_tgkill,
    SYS_vmsplice,
];

/// The RDMA port's receive threads and the CM/RC timers: datagrams in and out.
const RDMA_PORT: &[i64] = sys![];

/// The HTTP API: accept on the Unix socket, one thread per connection.
const API: &[i64] = sys![SYS_accept4];

/// The event loop (a single-VM process's main thread): epoll, the VM's end and stop (signals
/// to the vCPUs, the device process stopped and reaped), the socket and the files it
/// removes, reports; it starts the migration worker and, for a save/restore round trip,
/// vCPUs, so it allows what they need too.
const EVENT_LOOP: &[i64] = sys![
    SYS_epoll_ctl,
    SYS_epoll_wait,
    SYS_epoll_pwait,
    SYS_getdents64,
    SYS_kill,
    SYS_newfstatat,
    SYS_openat,
    SYS_statx,
    SYS_tgkill,
    SYS_unlink,
    SYS_unlinkat,
    SYS_wait4,
];

/// The stand-in NVMe device process after its setup: vfio-user on its Unix socket, the
/// backing file (positioned reads and writes, flushes), its polling thread.
const DEVICE_PROCESS: &[i64] = sys![
    SYS_accept4,
    SYS_fdatasync,
    SYS_fsync,
    SYS_pread64,
    SYS_pwrite64,
    SYS_statx,
    SYS_unlink,
];

/// The system calls `kind` may make (socket is allowed separately, see [`socket_allowed`]).
pub(crate) fn allowed(kind: Kind) -> Vec<i64> {
    let parts: &[&[i64]] = match kind {
        Kind::Vcpu => &[SPAWN, SOCKETS, VCPU],
        Kind::Device => &[SOCKETS, DEVICE],
        Kind::Migration => &[SPAWN, SOCKETS, MIGRATION, DEVICE],
        Kind::RdmaPort => &[SOCKETS, RDMA_PORT],
        Kind::Api => &[SPAWN, SOCKETS, API],
        // The event loop starts the migration worker and vCPUs: their calls are its calls.
        Kind::EventLoop => &[SPAWN, SOCKETS, EVENT_LOOP, MIGRATION, VCPU, DEVICE],
        Kind::DeviceProcess => &[SPAWN, SOCKETS, DEVICE_PROCESS],
    };
    BASE.iter()
        .chain(parts.iter().flat_map(|p| p.iter()))
        .chain(refused(kind))
        .copied()
        .collect()
}

/// Calls `kind` may not make but that are answered with EACCES instead of stopping the
/// process (see `refusal_filter`): opening files, which glibc's malloc does on its own.
/// The event loop really opens files (reports, consoles, sockets' directories).
pub(crate) fn refused(kind: Kind) -> &'static [i64] {
    match kind {
        Kind::EventLoop => &[],
        _ => sys![SYS_open, SYS_openat, SYS_openat2],
    }
}

/// Whether `kind` may create sockets (of the families [`SOCKET_FAMILIES`] lists).
pub(crate) fn socket_allowed(kind: Kind) -> bool {
    !matches!(kind, Kind::RdmaPort)
}

/// The only ioctl requests `kind` may make, when its list does not allow ioctl outright:
/// the API sets its connections non-blocking (FIONBIO), nothing else.
pub(crate) fn ioctl_requests(kind: Kind) -> Option<&'static [u64]> {
    match kind {
        Kind::Api => Some(&[FIONBIO]),
        _ => None,
    }
}

/// `FIONBIO` from `include/uapi/asm-generic/ioctls.h`.
const FIONBIO: u64 = 0x5421;

/// The address families `socket` may be called with.
pub(crate) const SOCKET_FAMILIES: &[libc::c_int] = &[libc::AF_UNIX, libc::AF_INET, libc::AF_INET6];

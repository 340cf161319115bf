//! `ferry bench platform`: what this host charges for the two things Ferry's hot paths try
//! hardest to avoid — a guest exit (to user space, or only to the kernel through an
//! ioeventfd) and a hand-off between two processes (the shadow poller and a device process,
//! on one CPU or across two).
//!
//! These are the floors under the figures of `bench shadow` (a trapped doorbell is one exit;
//! the poller and the stand-in device hand a shared core to each other) and `bench vrdma` (each
//! CM message a guest sends or waits for is an exit). docs/platform-costs.md turns them into
//! the ceilings they put on those benches' ratios.
use std::{
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    time::Instant,
};

use anyhow::{bail, Context};
use clap::Args;
use serde::Serialize;

/// `ferry bench platform`.
#[derive(Args, Debug)]
pub struct BenchPlatformArgs {
    /// Exits timed of each kind (port writes from ring 3 of a minimal VM).
    #[arg(long, default_value_t = 20_000)]
    pub exits: u32,
    /// Round trips timed between two processes, on one CPU and across two.
    #[arg(long, default_value_t = 20_000)]
    pub round_trips: u32,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Serialize)]
struct Report {
    exits: vmm::exit_cost::ExitCosts,
    /// ioeventfd exit / exit to user space.
    ioeventfd_vs_user_exit: f64,
    round_trips: u32,
    /// Microseconds per round trip (two hand-offs) between two processes pinned to one CPU.
    same_cpu_round_trip_us: f64,
    /// The same, unpinned (each hand-off a wake-up, on two CPUs a cross-CPU one).
    any_cpu_round_trip_us: Option<f64>,
    /// Unpinned / pinned.
    any_cpu_vs_same_cpu: Option<f64>,
    cpus: usize,
}

pub fn run(args: BenchPlatformArgs) -> anyhow::Result<i32> {
    if args.exits == 0 || args.round_trips == 0 {
        bail!("--exits and --round-trips must be at least 1");
    }
    let exits = vmm::exit_cost::measure(args.exits).context("timing guest exits")?;
    if exits.ioeventfd_signals != u64::from(exits.exits) {
        bail!(
            "the ioeventfd saw {} of {} port writes",
            exits.ioeventfd_signals,
            exits.exits
        );
    }
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let same = round_trips(args.round_trips, Some(current_cpu()))?;
    let any = if cpus > 1 {
        Some(round_trips(args.round_trips, None)?)
    } else {
        None
    };
    let r = Report {
        ioeventfd_vs_user_exit: exits.ioeventfd_us / exits.user_exit_us,
        exits,
        round_trips: args.round_trips,
        same_cpu_round_trip_us: same,
        any_cpu_round_trip_us: any,
        any_cpu_vs_same_cpu: any.map(|a| a / same),
        cpus,
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
        return Ok(0);
    }
    println!("ferry bench platform ({} CPUs)", r.cpus);
    println!(
        "  guest exit to user space and back: {:.2} us ({} port writes from ring 3)",
        r.exits.user_exit_us, r.exits.exits
    );
    println!(
        "  guest exit handled in the kernel (ioeventfd): {:.2} us, ratio {:.2} of an exit to user space",
        r.exits.ioeventfd_us, r.ioeventfd_vs_user_exit
    );
    print!(
        "  round trip between two processes (two hand-offs): one CPU {:.2} us",
        r.same_cpu_round_trip_us
    );
    match (r.any_cpu_round_trip_us, r.any_cpu_vs_same_cpu) {
        (Some(a), Some(x)) => println!(", unpinned {a:.2} us (ratio {x:.2})"),
        _ => println!(),
    }
    Ok(0)
}

/// The CPU this thread runs on now.
fn current_cpu() -> usize {
    // SAFETY: sched_getcpu has no arguments and only returns a number or -1.
    let c = unsafe { libc::sched_getcpu() };
    usize::try_from(c).unwrap_or(0)
}

/// This thread's CPU affinity, set to `cpu` until dropped.
struct Pinned(libc::cpu_set_t);

impl Pinned {
    fn to(cpu: usize) -> anyhow::Result<Self> {
        // SAFETY: cpu_set_t is plain data; all zeroes is the empty set.
        let mut old: libc::cpu_set_t = unsafe { std::mem::zeroed() };
        // SAFETY: `old` is a valid cpu_set_t of the size passed.
        if unsafe { libc::sched_getaffinity(0, std::mem::size_of_val(&old), &mut old) } != 0 {
            return Err(std::io::Error::last_os_error()).context("reading the CPU affinity");
        }
        // SAFETY: as above.
        let mut one: libc::cpu_set_t = unsafe { std::mem::zeroed() };
        if cpu >= libc::CPU_SETSIZE as usize {
            bail!("CPU {cpu} beyond the affinity mask");
        }
        // SAFETY: CPU_SET writes one bit of `one`, and `cpu` is below CPU_SETSIZE (checked).
        unsafe { libc::CPU_SET(cpu, &mut one) };
        // SAFETY: `one` is a valid cpu_set_t of the size passed.
        if unsafe { libc::sched_setaffinity(0, std::mem::size_of_val(&one), &one) } != 0 {
            return Err(std::io::Error::last_os_error()).context("pinning to one CPU");
        }
        Ok(Pinned(old))
    }
}

impl Drop for Pinned {
    fn drop(&mut self) {
        // SAFETY: restores the mask read in `to`; a failure leaves the thread pinned, which
        // only slows what follows.
        unsafe { libc::sched_setaffinity(0, std::mem::size_of_val(&self.0), &self.0) };
    }
}

fn pipe() -> anyhow::Result<(OwnedFd, OwnedFd)> {
    let mut p = [0; 2];
    // SAFETY: `p` has room for the two descriptors pipe2 writes.
    if unsafe { libc::pipe2(p.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error()).context("creating a pipe");
    }
    // SAFETY: both descriptors are fresh from pipe2 and owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(p[0]), OwnedFd::from_raw_fd(p[1])) })
}

/// Microseconds per round trip of one byte between this process and a forked child that
/// echoes it: two hand-offs, both on `cpu` when given (the child inherits the pinning).
fn round_trips(n: u32, cpu: Option<usize>) -> anyhow::Result<f64> {
    let _pin = cpu.map(Pinned::to).transpose()?;
    let (to_child_r, to_child_w) = pipe()?;
    let (from_child_r, from_child_w) = pipe()?;
    // SAFETY: the child only calls read, write and _exit (async-signal-safe) before it
    // exits, so forking a multithreaded process is sound.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(std::io::Error::last_os_error()).context("forking the echo process");
    }
    if pid == 0 {
        // SAFETY: the child's copies of the parent's ends; closing them lets the child see
        // end-of-file when the parent closes its end.
        unsafe {
            libc::close(to_child_w.as_raw_fd());
            libc::close(from_child_r.as_raw_fd());
        }
        let mut b = 0u8;
        loop {
            // SAFETY: one byte into `b` from a descriptor the child inherited.
            let r = unsafe { libc::read(to_child_r.as_raw_fd(), (&mut b as *mut u8).cast(), 1) };
            if r != 1 {
                // SAFETY: ends the child without running the parent's destructors.
                unsafe { libc::_exit(0) };
            }
            // SAFETY: one byte from `b` to an inherited descriptor.
            if unsafe { libc::write(from_child_w.as_raw_fd(), (&b as *const u8).cast(), 1) } != 1 {
                // SAFETY: as above.
                unsafe { libc::_exit(1) };
            }
        }
    }
    drop(to_child_r);
    drop(from_child_w);
    let mut b = 0u8;
    let one = |b: &mut u8| -> anyhow::Result<()> {
        // SAFETY: one byte from `b` to our end of the pipe.
        if unsafe { libc::write(to_child_w.as_raw_fd(), (b as *const u8).cast(), 1) } != 1 {
            return Err(std::io::Error::last_os_error()).context("writing to the echo process");
        }
        // SAFETY: one byte into `b` from our end of the other pipe.
        if unsafe { libc::read(from_child_r.as_raw_fd(), (b as *mut u8).cast(), 1) } != 1 {
            bail!("the echo process stopped answering");
        }
        Ok(())
    };
    let result = (|| {
        for _ in 0..(n / 10).max(1) {
            one(&mut b)?;
        }
        let start = Instant::now();
        for _ in 0..n {
            one(&mut b)?;
        }
        Ok(start.elapsed().as_secs_f64() * 1e6 / f64::from(n))
    })();
    drop(to_child_w);
    let mut status = 0;
    // SAFETY: waits for the child forked above; `status` is a valid out-pointer.
    unsafe { libc::waitpid(pid, &mut status, 0) };
    result
}

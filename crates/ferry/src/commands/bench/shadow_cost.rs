//! `ferry bench shadow`: what shadowing costs.
//!
//! 1. Guest IOPS (4 KiB random reads, one queue) in direct mode against continuous shadow mode
//!    with poll-mode and trap-mode doorbells, at each queue depth, as ratios to direct. Each
//!    run is a fresh VM and device process; the guest reports IOPS every 250 ms and the
//!    intervals from 0.5 s on count (continuous shadow mode starts once the guest's queues
//!    exist), so every counted interval ran entirely in the mode measured.
//! 2. Packets per second through a passthrough virtio-net NIC, direct against shadowed with
//!    polled and trapped notifications ([`super::shadow_net`]).
//! 3. Live migration over loopback of a VM under load, with and without a passthrough device:
//!    the same RAM size and `dirty` load, with `nvme-verify` (4 queues, QD 32, 4 KiB random
//!    reads and writes) on the device next to it. The two VMs migrate in turn (ABBA order) on
//!    the same round schedule ([`MIGRATION_ROUNDS`] pre-copy rounds after round 0, then the
//!    switchover), so the paused round carries what the guest and the device dirtied during
//!    one comparable pre-copy round in both. Downtime and total time, medians.
use std::{
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{bail, Context};
use guest_abi::{
    params::{NvmeArgs, NVME_INTERRUPTS, NVME_NO_FINAL_VERIFY},
    Workload, WorkloadArgs,
};
use migration::MigrationReport;
use serde::Serialize;
use shadow::{
    engine::{Completions, Designation, Interception},
    EngineOptions,
};
use vmm::devices::serial::ConsoleSink;

use crate::{
    api::{self, MigrateRequest, Request, Response},
    cli::BenchShadowArgs,
    nvme_args::{DeviceNvmeArgs, PassthroughSource},
    session::{self, BootSpec, SessionSpec},
    signals::SignalState,
};

#[derive(Clone, Copy, Serialize, PartialEq, Eq, Debug)]
#[serde(rename_all = "kebab-case")]
enum Mode {
    /// No shadowing.
    Direct,
    /// Copy = vCPU buffer, doorbells polled, completions polled.
    Poll,
    /// Copy = vCPU buffer, doorbells trapped, completions polled.
    Trap,
    /// Copy = device buffer, doorbells polled, completions polled.
    PollDeviceBuffer,
    /// Copy = vCPU buffer, doorbells trapped, completions by interrupt (no polling at all).
    TrapInterrupt,
}

impl Mode {
    const ALL: [Mode; 5] = [
        Mode::Direct,
        Mode::Poll,
        Mode::Trap,
        Mode::PollDeviceBuffer,
        Mode::TrapInterrupt,
    ];

    fn parse(s: &str) -> Option<Mode> {
        Mode::ALL.into_iter().find(|m| {
            serde_json::to_value(m)
                .ok()
                .is_some_and(|v| v.as_str() == Some(s))
        })
    }

    fn label(self) -> &'static str {
        match self {
            Mode::Direct => "direct",
            Mode::Poll => "poll",
            Mode::Trap => "trap",
            Mode::PollDeviceBuffer => "poll, copy = device buffer",
            Mode::TrapInterrupt => "trap, completions by interrupt",
        }
    }
}

#[derive(Serialize)]
struct IopsRow {
    qd: u32,
    mode: Mode,
    /// Median IOPS of the counted intervals.
    iops: f64,
    /// Intervals counted.
    intervals: usize,
    /// IOPS / direct IOPS at the same queue depth (median over the runs of each run's
    /// ratio to the direct run just before it).
    ratio: f64,
    /// Runs.
    runs: usize,
}

#[derive(Serialize)]
struct MigrationRow {
    vm: &'static str,
    downtime_ms: f64,
    /// Smallest and largest downtime of the runs.
    downtime_range_ms: (f64, f64),
    total_ms: f64,
    /// Pages sent in the paused round (median), and of them the pages KVM saw the guest
    /// dirty (median): the load the downtime carried.
    paused_pages: f64,
    paused_kvm_pages: f64,
    /// Device-written pages reported to the migration, summed over rounds (a page counts
    /// once per round it was reported in), largest over the runs.
    device_dirty_pages: u64,
    /// With the device: ms the destination's re-alignment took after the resume (its own
    /// report), median; `None` without the device. The guest's I/O waits for it: the
    /// queues are held until they are aligned.
    realign_ms: Option<f64>,
    runs: usize,
}

/// The VM with the passthrough device against the same VM without it.
#[derive(Serialize)]
struct Ratios {
    downtime: f64,
    total: f64,
}

#[derive(Serialize)]
struct Report {
    iops: Vec<IopsRow>,
    net: Vec<super::shadow_net::NetRow>,
    migration: Vec<MigrationRow>,
    with_device_vs_without: Option<Ratios>,
}

/// "nvme-verify: 1250 ms: 12345 I/Os, 49380 IOPS, latency ..." → (1250, 49380).
fn interval(line: &str) -> Option<(u64, f64)> {
    let rest = line.strip_prefix("nvme-verify: ")?;
    let (t, rest) = rest.split_once(" ms: ")?;
    let t: u64 = t.trim().parse().ok()?;
    let mut prev = None;
    for tok in rest.split_whitespace() {
        if tok.starts_with("IOPS") {
            return prev.map(|v| (t, v));
        }
        prev = tok.trim_end_matches(',').parse::<f64>().ok();
    }
    None
}

/// The median of `v` (0 when empty).
pub(super) fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// `--pin`: a thread that, until dropped, pins every new thread named `vcpu0` of this process
/// to CPU 0, and every `shadow-poller` of this process and `nvme-poll` of a child process (the
/// stand-in device) to CPU 1. It looks every 10 ms: the threads are started by the session.
struct Pinner {
    stop: Arc<std::sync::atomic::AtomicBool>,
    handle: Option<std::thread::JoinHandle<()>>,
}

impl Pinner {
    fn start() -> anyhow::Result<Pinner> {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let s = stop.clone();
        let handle = std::thread::Builder::new()
            .name("bench-pinner".into())
            .spawn(move || {
                let me = std::process::id();
                let mut pinned = std::collections::HashSet::new();
                while !s.load(std::sync::atomic::Ordering::Relaxed) {
                    for (tid, cpu) in threads_to_pin(me) {
                        if !pinned.contains(&tid) && pin(tid, cpu) {
                            tracing::debug!(tid, cpu, "bench shadow: pinned");
                            pinned.insert(tid);
                        }
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
            })?;
        Ok(Pinner {
            stop,
            handle: Some(handle),
        })
    }
}

impl Drop for Pinner {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// (thread id, CPU) of the threads `--pin` places: this process's `vcpu0` and `shadow-poller`,
/// its children's `nvme-poll`.
fn threads_to_pin(me: u32) -> Vec<(i32, usize)> {
    let comm = |p: &Path| std::fs::read_to_string(p.join("comm")).unwrap_or_default();
    let tasks = |pid: &str| -> Vec<(i32, String)> {
        let Ok(rd) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
            return Vec::new();
        };
        rd.flatten()
            .filter_map(|e| {
                let tid = e.file_name().to_str()?.parse().ok()?;
                Some((tid, comm(&e.path()).trim().to_string()))
            })
            .collect()
    };
    let mut out = Vec::new();
    for (tid, name) in tasks(&me.to_string()) {
        match name.as_str() {
            "vcpu0" => out.push((tid, 0)),
            "shadow-poller" => out.push((tid, 1)),
            _ => {}
        }
    }
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in rd.flatten() {
        let Some(pid) = e.file_name().to_str().map(str::to_string) else {
            continue;
        };
        if !pid.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        // /proc/PID/stat: "pid (comm) state ppid ..."; comm may hold spaces, so split after ')'.
        let stat = std::fs::read_to_string(e.path().join("stat")).unwrap_or_default();
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|p| p.parse::<u32>().ok());
        if ppid != Some(me) {
            continue;
        }
        out.extend(
            tasks(&pid)
                .into_iter()
                .filter(|(_, n)| n == "nvme-poll")
                .map(|(tid, _)| (tid, 1)),
        );
    }
    out
}

/// Pins thread `tid` to `cpu`; false if it failed (the thread may be gone).
fn pin(tid: i32, cpu: usize) -> bool {
    // SAFETY: a zeroed cpu_set_t is a valid empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: CPU_SET checks `cpu` against the set's size and writes inside it.
    unsafe { libc::CPU_SET(cpu, &mut set) };
    // SAFETY: the set is a live cpu_set_t of the size given; a bad tid only fails the call.
    unsafe { libc::sched_setaffinity(tid, std::mem::size_of::<libc::cpu_set_t>(), &set) == 0 }
}

#[allow(clippy::too_many_arguments)]
fn iops_run(
    dir: &Path,
    qd: u32,
    mode: Mode,
    seconds: u64,
    device_spin: bool,
    pin: bool,
    signals: &SignalState,
) -> anyhow::Result<(f64, usize)> {
    let _pinner = if pin { Some(Pinner::start()?) } else { None };
    let dev = DeviceNvmeArgs {
        socket: Default::default(),
        backing: dir.join("iops.img"),
        size: 64 << 20,
        block_size: 512,
        dstrd: 9,
        create: true,
        once: true,
        poll: device_spin,
    };
    let boot = BootSpec {
        image: Arc::new(guest_image::GUEST_ELF.to_vec()),
        workload: Workload::NvmeVerify,
        args: WorkloadArgs {
            seed: 0x5eed + qd as u64,
            duration_ms: seconds * 1000,
            report_interval_ms: 250,
            nvme: NvmeArgs {
                queues: 1,
                depth: qd,
                ios: 0,
                lba_start: 0,
                lba_count: (64 << 20) / 512,
                read_percent: 100,
                flags: NVME_NO_FINAL_VERIFY
                    | if mode == Mode::TrapInterrupt {
                        NVME_INTERRUPTS
                    } else {
                        0
                    },
                io_min_bytes: 4096,
                io_max_bytes: 4096,
            },
            ..Default::default()
        },
    };
    let spec = SessionSpec {
        memory: 256 << 20,
        console: ConsoleSink::Null,
        timeout: Some(Duration::from_secs(seconds + 120)),
        passthrough: Some(PassthroughSource::Spawn(dev.spec())),
        shadow_continuous: mode != Mode::Direct,
        shadow: EngineOptions {
            interception: if matches!(mode, Mode::Trap | Mode::TrapInterrupt) {
                Interception::Trap
            } else {
                Interception::Poll
            },
            designation: if mode == Mode::PollDeviceBuffer {
                Designation::DeviceBuffer
            } else {
                Designation::VcpuBuffer
            },
            completions: if mode == Mode::TrapInterrupt {
                Completions::Interrupt
            } else {
                Completions::Poll
            },
            ..Default::default()
        },
        ..Default::default()
    };
    let r = session::run(&boot, &spec, Instant::now(), signals)?;
    if r.status != Some(0) {
        bail!("guest run ({mode:?}, QD {qd}) failed: {}", r.detail);
    }
    let shadowed = r.shadow.as_ref().is_some_and(|s| s.shadowed);
    if shadowed != (mode != Mode::Direct) {
        bail!("run {mode:?} at QD {qd}: shadow mode was {shadowed} at the end");
    }
    let v: Vec<f64> = r
        .console_tail
        .iter()
        .filter_map(|l| interval(l))
        .filter(|&(t, _)| t >= 750) // the interval [t - 250, t) starts at 0.5 s or later
        .map(|(_, iops)| iops)
        .collect();
    if v.is_empty() {
        bail!("run {mode:?} at QD {qd}: no interval reports after 0.5 s");
    }
    Ok((median(v.clone()), v.len()))
}

/// A child process killed on drop.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn wait_for(p: &Path) -> anyhow::Result<()> {
    let t0 = Instant::now();
    while std::os::unix::net::UnixStream::connect(p).is_err() {
        if t0.elapsed() > Duration::from_secs(30) {
            bail!("{} never appeared", p.display());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// Page writes per second of the `dirty` load in the migration runs.
const DIRTY_RATE: u32 = 50_000;

/// Pre-copy rounds after round 0 in the migration runs, for both VMs (no early switchover).
/// With the migration's own policy (switch over once the dirty set fits the downtime target)
/// the VM without a device switched over right after round 0, carrying everything dirtied
/// during that long round into the downtime, while the VM with the device always ran one
/// more round (the round its pre-copy state goes out in never switches over) and paused
/// with a third of the pages: the ratio then measured the schedules, not the device.
const MIGRATION_ROUNDS: u32 = 2;

/// Waits (bounded) until the source behind `api` reports its load running: with the device,
/// its four I/O queues created and a thousand I/Os done; without, a second's worth of page
/// writes. (A fixed wait did not do on a loaded machine: the guest was still creating its
/// queues when the migration began.)
fn wait_running(api: &Path, with_device: bool) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Response::Result {
            ok: true,
            data: Some(d),
            ..
        } = api::call(api, &Request::Status, |_| {})?
        {
            let progress = d["progress"].as_u64().unwrap_or(0);
            let running = if with_device {
                d["io_queues"].as_u64() == Some(4) && progress >= 1000
            } else {
                progress >= u64::from(DIRTY_RATE)
            };
            if running {
                return Ok(());
            }
        }
        if Instant::now() > deadline {
            bail!("the source never reported its load running");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The destination's line about its rebuilt device: "... re-aligned with N filler(s) in X
/// ms, ...": X.
fn realigned_ms(line: &str) -> Option<f64> {
    let rest = line.split(" filler(s) in ").nth(1)?;
    rest.split(" ms").next()?.trim().parse().ok()
}

/// One migration; with the device also the ms the destination's re-alignment took.
fn migration_run(
    dir: &Path,
    with_device: bool,
    n: usize,
) -> anyhow::Result<(MigrationReport, Option<f64>)> {
    let exe = std::env::current_exe()?;
    let disk = dir.join(format!("mig-{n}.img"));
    let api_path = dir.join(format!("src-{n}.sock"));
    let mut src = Command::new(&exe);
    src.args([
        "run",
        "--memory",
        "256M",
        "--serial",
        "off",
        "--timeout",
        "120s",
    ])
    .arg("--api-socket")
    .arg(&api_path);
    // The same VM and CPU load both times (`dirty`, 32 MiB at 50 000 pages/s); with the
    // device it also runs nvme-verify on 4 queues of depth 32.
    let rate = DIRTY_RATE.to_string();
    if with_device {
        src.args(["--workload", "nvme-verify", "--duration", "90s"])
            .args(["--with-dirty", "32M", "--rate", &rate])
            .args([
                "--nvme-queues",
                "4",
                "--nvme-depth",
                "32",
                "--nvme-io-size",
                "4K",
            ])
            .arg("--nvme-backing")
            .arg(&disk);
    } else {
        src.args([
            "--workload",
            "dirty",
            "--working-set",
            "32M",
            "--rate",
            &rate,
        ])
        .args(["--duration", "90s"]);
    }
    let _src = Proc(src.stdout(Stdio::null()).stderr(Stdio::null()).spawn()?);
    let mut dst = Command::new(&exe);
    dst.args(["receive", "--listen", "127.0.0.1:0", "--serial", "off"])
        .args(["--accept-timeout", "60s", "--timeout", "5s"]);
    if with_device {
        dst.arg("--nvme-backing").arg(&disk);
    }
    let mut dst = Proc(dst.stdout(Stdio::null()).stderr(Stdio::piped()).spawn()?);
    let mut err = BufReader::new(dst.0.stderr.take().context("destination stderr")?);
    let mut line = String::new();
    err.read_line(&mut line)?;
    let to = line
        .trim()
        .strip_prefix("ferry: waiting for a migration on ")
        .with_context(|| format!("unexpected destination output {line:?}"))?
        .to_string();
    let (direct_tx, direct_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut sink = String::new();
        while err.read_line(&mut sink).unwrap_or(0) > 0 {
            if let Some(ms) = realigned_ms(&sink) {
                let _ = direct_tx.send(ms);
            }
            sink.clear();
        }
    });
    wait_for(&api_path)?;
    wait_running(&api_path, with_device)?;
    let request = Request::Migrate(MigrateRequest {
        to,
        // No early switchover: both VMs run the same rounds.
        downtime_ms: 0,
        max_rounds: MIGRATION_ROUNDS,
        on_limit: migration::LimitPolicy::Finish,
        debug_hash: false,
        unsafe_no_shadow: false,
        max_bandwidth: None,
        compress: None,
        tls: None,
        tls_server_name: None,
        insecure_no_auth: false,
        streams: None,
    });
    let report = match api::call(&api_path, &request, |_| {})? {
        Response::Result {
            ok: true,
            data: Some(d),
            ..
        } => serde_json::from_value(d)?,
        Response::Result { error, .. } => bail!("migration failed: {}", error.unwrap_or_default()),
        Response::Progress(_) => bail!("unexpected progress as the answer"),
    };
    // The destination reports it once its queues run direct (or ends without: None).
    let direct = if with_device {
        direct_rx.recv_timeout(Duration::from_secs(60)).ok()
    } else {
        None
    };
    let _ = std::fs::remove_file(&disk);
    Ok((report, direct))
}

/// The migration rows: the VM without the device and the VM with it, `n` migrations each, in
/// ABBA order (a drift of the machine's load over the runs weighs on both alike).
fn migration_rows(dir: &Path, n: usize) -> anyhow::Result<Vec<MigrationRow>> {
    if n == 0 {
        return Ok(Vec::new());
    }
    let mut runs: [Vec<MigrationReport>; 2] = [Vec::new(), Vec::new()];
    let mut direct: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
    for i in 0..n {
        let order = if i % 2 == 0 {
            [false, true]
        } else {
            [true, false]
        };
        for dev in order {
            let (r, d) = migration_run(dir, dev, i)?;
            direct[dev as usize].extend(d);
            tracing::debug!(
                with_device = dev,
                downtime_ms = r.downtime_ms,
                paused_pages = r.rounds.last().map_or(0, |x| x.pages),
                "bench shadow: migration"
            );
            runs[dev as usize].push(r);
        }
    }
    let names = [
        "dirty (32 MiB, 50k pages/s), no device",
        "the same + nvme-verify on a passthrough",
    ];
    Ok(names
        .into_iter()
        .zip(runs)
        .zip(direct)
        .map(|((vm, runs), direct)| {
            let paused = |f: fn(&migration::RoundReport) -> u64| {
                median(
                    runs.iter()
                        .map(|r| r.rounds.last().map_or(0, f) as f64)
                        .collect(),
                )
            };
            let downtimes = runs.iter().map(|r| r.downtime_ms);
            MigrationRow {
                vm,
                downtime_ms: median(downtimes.clone().collect()),
                downtime_range_ms: (
                    downtimes.clone().fold(f64::INFINITY, f64::min),
                    downtimes.fold(0.0, f64::max),
                ),
                total_ms: median(runs.iter().map(|r| r.total_ms).collect()),
                paused_pages: paused(|x| x.pages),
                paused_kvm_pages: paused(|x| x.dirty_kvm),
                device_dirty_pages: runs
                    .iter()
                    .map(|r| r.rounds.iter().map(|x| x.dirty_device).sum::<u64>())
                    .max()
                    .unwrap_or(0),
                realign_ms: (!direct.is_empty()).then(|| median(direct)),
                runs: runs.len(),
            }
        })
        .collect())
}

pub fn run(args: BenchShadowArgs) -> anyhow::Result<i32> {
    if args.qd.is_empty() || args.qd.iter().any(|&q| q == 0 || q > 255) || args.seconds < 2 {
        bail!("every --qd must be in 1..=255 and --seconds at least 2");
    }
    if args.engine {
        return engine_cost(args.json);
    }
    let signals = SignalState::install()?;
    let dir: PathBuf = control::scratch::fresh_dir("ferry-bench-shadow")?;
    if args.net_only {
        let net = super::shadow_net::rows(&dir, args.seconds, args.net_runs, &signals);
        let _ = std::fs::remove_dir_all(&dir);
        let net = net?;
        if args.json {
            println!("{}", serde_json::to_string_pretty(&net)?);
        } else {
            super::shadow_net::print(&net, args.seconds);
        }
        return Ok(0);
    }
    let mut modes = vec![Mode::Direct];
    for m in &args.modes {
        let m = Mode::parse(m).with_context(|| format!("unknown mode {m}"))?;
        if !modes.contains(&m) {
            modes.push(m);
        }
    }
    let runs = args.runs.max(1);
    let mut iops = Vec::new();
    for &qd in args.qd.iter().filter(|_| !args.migration_only) {
        // Per mode: (IOPS, intervals, ratio to the run's direct) of each run.
        let mut got: Vec<Vec<(f64, usize, f64)>> = vec![Vec::new(); modes.len()];
        for _ in 0..runs {
            let mut direct = 0.0;
            for (i, &mode) in modes.iter().enumerate() {
                let (v, n) = iops_run(
                    &dir,
                    qd,
                    mode,
                    args.seconds,
                    args.device_spin,
                    args.pin,
                    &signals,
                )?;
                if mode == Mode::Direct {
                    direct = v;
                }
                got[i].push((v, n, v / f64::max(direct, 1e-9)));
            }
        }
        for (&mode, g) in modes.iter().zip(got) {
            iops.push(IopsRow {
                qd,
                mode,
                iops: median(g.iter().map(|x| x.0).collect()),
                intervals: g.iter().map(|x| x.1).sum(),
                ratio: median(g.iter().map(|x| x.2).collect()),
                runs: g.len(),
            });
        }
    }
    let net = if args.migration_only {
        Vec::new()
    } else {
        super::shadow_net::rows(&dir, args.seconds, args.net_runs, &signals)?
    };
    let migration = migration_rows(&dir, args.migrations);
    let _ = std::fs::remove_dir_all(&dir);
    let migration = migration?;
    let with_device_vs_without = match migration.as_slice() {
        [without, with] => Some(Ratios {
            downtime: with.downtime_ms / without.downtime_ms.max(1e-9),
            total: with.total_ms / without.total_ms.max(1e-9),
        }),
        _ => None,
    };
    let report = Report {
        iops,
        net,
        migration,
        with_device_vs_without,
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(0);
    }
    if !args.migration_only {
        println!(
            "ferry bench shadow: guest 4 KiB random reads, 1 queue, median of 250 ms intervals after 0.5 s ({} s runs, {} run(s) per mode, device {}{})",
            args.seconds,
            runs,
            if args.device_spin { "always spinning" } else { "adaptive" },
            if args.pin {
                "; pinned: vCPU on CPU 0, shadow poller and device on CPU 1"
            } else {
                ""
            }
        );
        println!("  QD  mode                                 IOPS   vs direct");
        for r in &report.iops {
            println!(
                "  {:>2}  {:<31} {:>10.0}   {:>6.2}x",
                r.qd,
                r.mode.label(),
                r.iops,
                r.ratio
            );
        }
        super::shadow_net::print(&report.net, args.seconds);
    }
    if report.migration.is_empty() {
        return Ok(0);
    }
    println!(
        "live migration over loopback, 256 MiB guest under load (median of {} runs each, the two \
         VMs in turn, both switching over after {MIGRATION_ROUNDS} pre-copy rounds):",
        args.migrations
    );
    println!(
        "  VM                                        downtime ms [range]    total ms   paused \
         pages (KVM-dirtied)   device-dirtied pages"
    );
    for m in &report.migration {
        println!(
            "  {:<41} {:>6.1} [{:.1}-{:.1}] {:>10.0} {:>13.0} ({:.0}) {:>22}",
            m.vm,
            m.downtime_ms,
            m.downtime_range_ms.0,
            m.downtime_range_ms.1,
            m.total_ms,
            m.paused_pages,
            m.paused_kvm_pages,
            m.device_dirty_pages
        );
    }
    if let Some(r) = &report.with_device_vs_without {
        println!(
            "  with the device / without: downtime {:.2}x, total time {:.2}x",
            r.downtime, r.total
        );
    }
    for m in &report.migration {
        if let Some(ms) = m.realign_ms {
            println!(
                "  the destination re-aligned the device's queues in {ms:.2} ms after the resume \
                 (median; the guest's I/O waits for it)"
            );
        }
    }
    Ok(0)
}

/// I/Os per engine-cost run, and runs (the median counts).
const ENGINE_IOS: u64 = 1_000_000;
const ENGINE_RUNS: usize = 5;

/// `--engine`: the engine's CPU cost per forwarded I/O at batches of 1 and 32.
fn engine_cost(json: bool) -> anyhow::Result<i32> {
    let mut rows = Vec::new();
    for batch in [1u32, 32] {
        rows.push(shadow::engine::cost::measure(
            ENGINE_IOS,
            batch,
            ENGINE_RUNS,
        )?);
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(0);
    }
    println!(
        "ferry bench shadow --engine: CPU per forwarded 4 KiB read (submission validated and \
         copied, completion translated and copied, dirty page recorded), in-process device, \
         thread CPU time, median of {ENGINE_RUNS} runs of {ENGINE_IOS} I/Os"
    );
    println!("  batch   engine ns/IO   floor ns/IO (64 B + 16 B copies)   vs floor");
    for r in &rows {
        println!(
            "  {:>5}   {:>12.1}   {:>31.1}   {:>7.1}x",
            r.batch, r.ns_per_io, r.floor_ns_per_io, r.ratio
        );
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::realigned_ms;

    #[test]
    fn the_destinations_realignment_time_is_read_from_its_line() {
        let line = "ferry: passthrough nvme0 rebuilt here (copy = vCPU buffer, configuration \
                    replayed during pre-copy), re-aligned with 207 filler(s) in 0.8 ms, direct \
                    again after 601.5 ms without pausing the VM\n";
        assert_eq!(realigned_ms(line), Some(0.8));
        assert_eq!(realigned_ms("ferry: VM received from 127.0.0.1:1"), None);
        assert_eq!(realigned_ms("re-aligned with 3 filler(s) in soon ms"), None);
    }
}

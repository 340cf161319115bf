//! `ferry bench nvme`: 4 KiB random reads on the stand-in NVMe device at each queue depth, once
//! issued by the guest through the passthrough attachment and once by a host-side vfio-user
//! client in this process (the baseline), each against a fresh device process on the same
//! backing file (read once before the first run, so that every run finds it in the page cache),
//! both reading 4 KiB on 4 KiB boundaries. Reports IOPS and latency and the ratio guest / host,
//! for each polling mode of the device (adaptive, the default, and always-spin `--poll`), and
//! the CPU the device process uses while idle (a client attached, its queues live, no I/O) in
//! each mode. `--runs N` makes N pairs of runs per mode and depth (the order of the two sides
//! alternating) and reports the medians and the spread of the ratios; `--only` runs one side
//! (to profile it).
use std::{sync::Arc, time::Duration};

use anyhow::{bail, Context};
use guest_abi::{
    params::{NvmeArgs, NVME_ALIGNED, NVME_NO_DATA_CHECK, NVME_NO_FINAL_VERIFY},
    Workload, WorkloadArgs,
};
use passthrough::host_client::{HostClient, RunStats};
use serde::Serialize;
use vmm::devices::serial::ConsoleSink;

use crate::{
    nvme_args::{BenchNvmeArgs, DeviceNvmeArgs, PassthroughSource},
    nvme_session::DeviceChild,
    session::{self, BootSpec, SessionSpec},
    signals::SignalState,
};

#[derive(Serialize)]
struct Row {
    device: String,
    qd: u16,
    /// The guest's run of median IOPS.
    guest: RunStats,
    /// The host client's run of median IOPS.
    host: RunStats,
    /// Median of the pairs' IOPS ratios (guest / host).
    iops_ratio: f64,
    /// Median of the pairs' p50 latency ratios.
    p50_ratio: f64,
    /// Every pair's IOPS ratio, in run order.
    ratios: Vec<f64>,
}

/// The median of `v` (the mean of the two middle values for an even count); 0 when empty.
fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// The run of median IOPS among `runs` (the lower middle one for an even count).
fn median_run(runs: &[RunStats]) -> Option<RunStats> {
    let mut v = runs.to_vec();
    v.sort_by(|a, b| a.iops.total_cmp(&b.iops));
    v.get(v.len().saturating_sub(1) / 2).cloned()
}

/// A run that was not made (`--only`): all zeros.
fn skipped() -> RunStats {
    RunStats {
        ios: 0,
        seconds: 0.0,
        iops: 0.0,
        p50_us: 0.0,
        p99_us: 0.0,
    }
}

#[derive(Serialize)]
struct IdleRow {
    device: String,
    /// CPU seconds per second.
    cpu: f64,
}

fn field(line: &str, key: &str) -> Option<f64> {
    line.split_whitespace()
        .find_map(|t| t.strip_prefix(key)?.strip_prefix('='))
        .and_then(|v| v.parse().ok())
}

fn guest_run(
    dev: &DeviceNvmeArgs,
    qd: u16,
    ios: u64,
    blocks: u64,
    signals: &SignalState,
) -> anyhow::Result<RunStats> {
    let boot = BootSpec {
        image: Arc::new(guest_image::GUEST_ELF.to_vec()),
        workload: Workload::NvmeVerify,
        args: WorkloadArgs {
            seed: 0x5eed + qd as u64,
            nvme: NvmeArgs {
                queues: 1,
                depth: qd as u32,
                ios,
                lba_start: 0,
                lba_count: blocks,
                read_percent: 100,
                // Neither side reads the data: the host client does not look at it either.
                // Both read 4 KiB on 4 KiB boundaries: a read that straddles two pages of the
                // backing file costs the device ~25% more (two page-cache pages to copy from).
                flags: NVME_NO_FINAL_VERIFY | NVME_NO_DATA_CHECK | NVME_ALIGNED,
                io_min_bytes: 4096,
                io_max_bytes: 4096,
            },
            ..Default::default()
        },
    };
    let spec = SessionSpec {
        memory: 256 << 20,
        console: ConsoleSink::Null,
        timeout: Some(Duration::from_secs(300)),
        passthrough: Some(PassthroughSource::Spawn(dev.spec())),
        ..Default::default()
    };
    let r = session::run(&boot, &spec, std::time::Instant::now(), signals)?;
    if r.status != Some(0) {
        bail!(
            "guest run at QD {qd} failed: {} (last lines: {:?})",
            r.detail,
            r.console_tail.iter().rev().take(3).collect::<Vec<_>>()
        );
    }
    let line = r
        .console_tail
        .iter()
        .find(|l| l.contains("nvme-verify: result "))
        .context("the guest printed no result line")?;
    let (n, iops, p50, p99, ms) = (
        field(line, "ios").context("ios")?,
        field(line, "iops").context("iops")?,
        field(line, "p50_us").context("p50")?,
        field(line, "p99_us").context("p99")?,
        field(line, "elapsed_ms").context("elapsed")?,
    );
    Ok(RunStats {
        ios: n as u64,
        seconds: ms / 1000.0,
        iops,
        p50_us: p50,
        p99_us: p99,
    })
}

/// CPU time (user + system, seconds) of process `pid` so far, from /proc/PID/stat.
fn cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which may hold spaces) in parentheses.
    let rest = stat.rsplit_once(')').context("malformed /proc/PID/stat")?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let (utime, stime): (u64, u64) = (
        f.get(11).context("utime")?.parse()?,
        f.get(12).context("stime")?.parse()?,
    );
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    Ok((utime + stime) as f64 / hz)
}

/// Idle time measured per device mode.
const IDLE_WINDOW: Duration = Duration::from_secs(3);

/// The device's CPU use while idle: a host client brings the controller up with one I/O queue
/// and sends nothing; the device's CPU time over [`IDLE_WINDOW`] / the window (1.0 = a core).
fn idle_cpu(dev: &DeviceNvmeArgs) -> anyhow::Result<f64> {
    let child = DeviceChild::spawn(&dev.spec())?;
    let c = HostClient::connect(&child.socket, 16 << 20, 1, 2).context("host client bring-up")?;
    // Let the spin window after the bring-up's last command pass (a measurement interval, not
    // a wait for readiness).
    std::thread::sleep(nvme_device::wake::SPIN_WINDOW * 10);
    let (c0, t0) = (cpu_seconds(child.pid())?, std::time::Instant::now());
    std::thread::sleep(IDLE_WINDOW);
    let (c1, t1) = (cpu_seconds(child.pid())?, t0.elapsed());
    c.shutdown()?;
    drop(child);
    Ok((c1 - c0) / t1.as_secs_f64())
}

fn host_run(dev: &DeviceNvmeArgs, qd: u16, ios: u64, blocks: u64) -> anyhow::Result<RunStats> {
    let child = DeviceChild::spawn(&dev.spec())?;
    let mut c =
        HostClient::connect(&child.socket, 16 << 20, 1, qd + 1).context("host client bring-up")?;
    let span = blocks.min(c.blocks);
    let r = c.random_reads(
        qd,
        ios,
        4096,
        span * 512 / c.block_size as u64,
        0x5eed + qd as u64,
    )?;
    c.shutdown()?;
    drop(child);
    Ok(r)
}

/// Creates the backing file of `size` bytes and reads it once, so that the first measured run
/// (the host client's) does not pay for filling the page cache that every later run, the
/// guest's included, finds filled.
fn warm_backing(path: &std::path::Path, size: u64) -> anyhow::Result<()> {
    use std::io::Read;
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    if f.metadata()?.len() < size {
        f.set_len(size)?;
    }
    let mut buf = vec![0u8; 1 << 20];
    while f.read(&mut buf)? > 0 {}
    Ok(())
}

pub fn run(args: BenchNvmeArgs) -> anyhow::Result<i32> {
    if args.ios == 0 || args.qd.is_empty() || args.qd.iter().any(|&q| q == 0 || q > 255) {
        bail!("--ios must be at least 1 and every --qd in 1..=255");
    }
    let signals = SignalState::install()?;
    let dir = control::scratch::fresh_dir("ferry-bench-nvme")?;
    let base = DeviceNvmeArgs {
        socket: Default::default(),
        backing: dir.join("disk.img"),
        size: args.size,
        block_size: 512,
        dstrd: 9,
        create: true,
        once: true,
        poll: false,
    };
    let blocks = args.size / 512;
    warm_backing(&base.backing, args.size)?;
    let mut rows = Vec::new();
    let mut idle = Vec::new();
    for mode in &args.device {
        let dev = DeviceNvmeArgs {
            poll: mode == "spin",
            ..base.clone()
        };
        if args.only.is_none() {
            idle.push(IdleRow {
                device: mode.clone(),
                cpu: idle_cpu(&dev)?,
            });
        }
        for &qd in &args.qd {
            let (mut hosts, mut guests) = (Vec::new(), Vec::new());
            let (mut ratios, mut p50s) = (Vec::new(), Vec::new());
            let (do_host, do_guest) = match args.only.as_deref() {
                Some("guest") => (false, true),
                Some("host") => (true, false),
                _ => (true, true),
            };
            for i in 0..args.runs {
                // Host first in even runs, guest first in odd ones: a drift of the machine's
                // load over the pair does not always favour the same side.
                let mut pair = (skipped(), skipped());
                for side in if i % 2 == 0 { [0, 1] } else { [1, 0] } {
                    if side == 0 && do_host {
                        pair.0 = host_run(&dev, qd, args.ios, blocks)?;
                    } else if side == 1 && do_guest {
                        pair.1 = guest_run(&dev, qd, args.ios, blocks, &signals)?;
                    }
                }
                let (host, guest) = pair;
                ratios.push(guest.iops / host.iops.max(1e-9));
                p50s.push(guest.p50_us / host.p50_us.max(1e-9));
                hosts.push(host);
                guests.push(guest);
            }
            rows.push(Row {
                device: mode.clone(),
                qd,
                iops_ratio: median(&ratios),
                p50_ratio: median(&p50s),
                guest: median_run(&guests).context("no run")?,
                host: median_run(&hosts).context("no run")?,
                ratios,
            });
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({ "runs": rows, "idle": idle }))?
        );
    } else {
        println!(
            "ferry bench nvme: 4 KiB random reads over {} MiB, {} reads per run, stand-in NVMe over vfio-user (DSTRD 9, doorbells mapped){}",
            args.size >> 20,
            args.ios,
            if args.runs > 1 {
                format!("; medians of {} runs per side", args.runs)
            } else {
                String::new()
            }
        );
        println!("  device    QD  side          IOPS    p50 us    p99 us");
        for r in &rows {
            for (side, s) in [("guest", &r.guest), ("host client", &r.host)] {
                if s.ios > 0 {
                    println!(
                        "  {:<8}  {:>2}  {:<11} {:>8.0} {:>9.2} {:>9.2}",
                        r.device, r.qd, side, s.iops, s.p50_us, s.p99_us
                    );
                }
            }
            if args.only.is_some() {
                continue;
            }
            if r.ratios.len() > 1 {
                let lo = r.ratios.iter().copied().fold(f64::INFINITY, f64::min);
                let hi = r.ratios.iter().copied().fold(0.0, f64::max);
                println!(
                    "  {:<8}  {:>2}  guest / host: IOPS {:.2}x (median of {}, {:.2}-{:.2}), p50 latency {:.2}x",
                    r.device,
                    r.qd,
                    r.iops_ratio,
                    r.ratios.len(),
                    lo,
                    hi,
                    r.p50_ratio
                );
            } else {
                println!(
                    "  {:<8}  {:>2}  guest / host: IOPS {:.2}x, p50 latency {:.2}x",
                    r.device, r.qd, r.iops_ratio, r.p50_ratio
                );
            }
        }
        for i in &idle {
            println!(
                "  {:<8}  idle device (queues live, no I/O): {:.1}% of a core",
                i.device,
                i.cpu * 100.0
            );
        }
    }
    Ok(0)
}

//! `ferry bench nvme`: 4 KiB random reads on the stand-in NVMe device at each queue depth, once
//! issued by the guest through the passthrough attachment and once by a host-side vfio-user
//! client in this process (the baseline), each against a fresh device process on the same
//! backing file. Reports IOPS and latency and the ratio guest / host.
use std::{sync::Arc, time::Duration};

use anyhow::{bail, Context};
use guest_abi::{
    params::{NvmeArgs, NVME_NO_FINAL_VERIFY},
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
    qd: u16,
    guest: RunStats,
    host: RunStats,
    iops_ratio: f64,
    p50_ratio: f64,
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
                flags: NVME_NO_FINAL_VERIFY,
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

pub fn run(args: BenchNvmeArgs) -> anyhow::Result<i32> {
    if args.ios == 0 || args.qd.is_empty() || args.qd.iter().any(|&q| q == 0 || q > 255) {
        bail!("--ios must be at least 1 and every --qd in 1..=255");
    }
    let signals = SignalState::install()?;
    let dir = std::env::temp_dir().join(format!("ferry-bench-nvme-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let dev = DeviceNvmeArgs {
        socket: Default::default(),
        backing: dir.join("disk.img"),
        size: args.size,
        block_size: 512,
        dstrd: 9,
        create: true,
        once: true,
    };
    let blocks = args.size / 512;
    let mut rows = Vec::new();
    for &qd in &args.qd {
        let host = host_run(&dev, qd, args.ios, blocks)?;
        let guest = guest_run(&dev, qd, args.ios, blocks, &signals)?;
        rows.push(Row {
            qd,
            iops_ratio: guest.iops / host.iops.max(1e-9),
            p50_ratio: guest.p50_us / host.p50_us.max(1e-9),
            guest,
            host,
        });
    }
    let _ = std::fs::remove_dir_all(&dir);
    if args.json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
    } else {
        println!(
            "ferry bench nvme: 4 KiB random reads over {} MiB, {} reads per run, stand-in NVMe over vfio-user (DSTRD 9, doorbells mapped)",
            args.size >> 20,
            args.ios
        );
        println!("  QD  side          IOPS    p50 us    p99 us");
        for r in &rows {
            for (side, s) in [("guest", &r.guest), ("host client", &r.host)] {
                println!(
                    "  {:>2}  {:<11} {:>8.0} {:>9.1} {:>9.1}",
                    r.qd, side, s.iops, s.p50_us, s.p99_us
                );
            }
            println!(
                "  {:>2}  guest / host: IOPS {:.2}x, p50 latency {:.2}x",
                r.qd, r.iops_ratio, r.p50_ratio
            );
        }
    }
    Ok(0)
}

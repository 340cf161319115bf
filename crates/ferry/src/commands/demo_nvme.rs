//! The passthrough NVMe phase of `ferry demo`: a `ferry device nvme` process on a temporary
//! backing file, attached over vfio-user, driven by `nvme-verify` with three queues for two
//! seconds.
use std::{sync::Arc, time::Duration};

use guest_abi::{params::NvmeArgs, Workload, WorkloadArgs};
use vmm::devices::serial::ConsoleSink;

use crate::{
    nvme_args::{DeviceNvmeArgs, PassthroughSource},
    session::{self, BootSpec, SessionReport, SessionSpec},
    signals::SignalState,
};

pub fn run(
    console: &ConsoleSink,
    prefix: &str,
    signals: &SignalState,
) -> anyhow::Result<SessionReport> {
    let dir = std::env::temp_dir().join(format!("ferry-demo-nvme-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let boot = BootSpec {
        image: Arc::new(guest_image::GUEST_ELF.to_vec()),
        workload: Workload::NvmeVerify,
        args: WorkloadArgs {
            duration_ms: 2000,
            report_interval_ms: 1000,
            seed: 0x5eed,
            nvme: NvmeArgs {
                queues: 3,
                depth: 16,
                ios: 0,
                lba_start: 0,
                lba_count: 0,
                read_percent: 50,
                flags: 0,
                io_min_bytes: 4096,
                io_max_bytes: 64 << 10,
            },
            ..Default::default()
        },
    };
    let spec = SessionSpec {
        memory: 256 << 20,
        console: console.clone(),
        console_prefix: prefix.to_string(),
        timeout: Some(Duration::from_secs(120)),
        passthrough: Some(PassthroughSource::Spawn(DeviceNvmeArgs {
            socket: Default::default(),
            backing: dir.join("disk.img"),
            size: 64 << 20,
            block_size: 512,
            dstrd: 9,
            create: true,
            once: true,
        })),
        ..Default::default()
    };
    let r = session::run(&boot, &spec, std::time::Instant::now(), signals);
    let _ = std::fs::remove_dir_all(&dir);
    r
}

pub fn print(r: &SessionReport, result: Option<&str>) {
    let ok = if r.status == Some(0) { "ok" } else { "FAILED" };
    let figures = result
        .and_then(|l| l.split("nvme-verify: result ").nth(1))
        .map(str::to_string)
        .unwrap_or_else(|| "no result line".into());
    println!(
        "  nvme          passthrough NVMe over vfio-user, 3 queues: {ok} ({}); {figures}",
        r.detail
    );
    if let Some(log) = &r.config_log {
        println!("  config log    {}", log.summary());
    }
}

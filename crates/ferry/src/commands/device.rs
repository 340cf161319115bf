//! `ferry device nvme`: the stand-in NVMe SSD as its own process. It serves one vfio-user client
//! at a time (the next one after a disconnect, unless `--once`), and prints its statistics
//! when it exits (SIGTERM/SIGINT, or with `--once` after the client left).
use std::{
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::Duration,
};

use anyhow::Context;
use nvme_device::{DeviceConfig, NvmeDevice, PollMode};

use crate::{nvme_args::DeviceNvmeArgs, signals::SignalState};

pub fn nvme(args: DeviceNvmeArgs) -> anyhow::Result<i32> {
    let signals = SignalState::install()?;
    let cfg = DeviceConfig {
        socket: args.socket.clone(),
        backing: args.backing.clone(),
        size: args.size,
        block_size: args.block_size,
        dstrd: args.dstrd,
        create: args.create,
    };
    let device = Arc::new(NvmeDevice::new(&cfg).context("starting the NVMe device")?);
    if args.poll {
        device.set_poll_mode(PollMode::Spin);
    }
    sandbox::enter(sandbox::Kind::DeviceProcess);
    let (blocks, bs) = device.geometry();
    eprintln!(
        "ferry device nvme: listening on {} ({} blocks of {} bytes in {}, DSTRD {}, {} polling)",
        args.socket.display(),
        blocks,
        bs,
        args.backing.display(),
        args.dstrd,
        if args.poll { "always-spin" } else { "adaptive" }
    );
    let finished = Arc::new(AtomicBool::new(false));
    let (d, f, once) = (device.clone(), finished.clone(), args.once);
    std::thread::Builder::new()
        .name("vfio-user".into())
        .spawn(move || loop {
            if let Err(e) = d.serve_one() {
                tracing::warn!(
                    error = &e as &dyn std::error::Error,
                    "vfio-user session ended with an error"
                );
            }
            if once {
                f.store(true, Ordering::SeqCst);
                return;
            }
        })
        .context("spawning the vfio-user thread")?;
    while signals.stop_signal().is_none() && !finished.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(20));
    }
    if let Err(e) = device.flush() {
        eprintln!(
            "ferry device nvme: flushing {}: {e}",
            args.backing.display()
        );
    }
    let stats = device.stats();
    eprintln!(
        "ferry device nvme: stats {}",
        serde_json::to_string(&stats)?
    );
    let _ = std::fs::remove_file(&args.socket);
    // The vfio-user thread may be blocked in accept(); the process exit ends it.
    Ok(0)
}

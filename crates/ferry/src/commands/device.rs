//! `ferry device nvme` and `ferry device virtio-net`: the stand-in devices as their own
//! processes. Each serves one vfio-user client at a time (the next one after a disconnect, unless
//! `--once`), and prints its statistics when it exits (SIGTERM/SIGINT, or with `--once` after
//! the client left).
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
    let d = device.clone();
    serve_until_stopped(&signals, args.once, move || d.serve_one())?;
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

/// `ferry device virtio-net`: the stand-in NIC as its own process, on a host tap device. Like
/// `ferry device nvme` it serves one client at a time and prints its statistics on exit.
pub fn virtio_net(args: crate::virtio_net_args::DeviceVirtioNetArgs) -> anyhow::Result<i32> {
    use virtio_net_device::{wire::Tap, DeviceConfig, VirtioNetDevice};
    let signals = SignalState::install()?;
    let tap = Tap::open(&args.tap).with_context(|| format!("opening tap device {}", args.tap))?;
    let cfg = DeviceConfig {
        socket: args.socket.clone(),
        mac: args.mac,
        announce: !args.no_announce,
    };
    let device = Arc::new(
        VirtioNetDevice::new(&cfg, Box::new(tap)).context("starting the virtio-net device")?,
    );
    sandbox::enter(sandbox::Kind::DeviceProcess);
    eprintln!(
        "ferry device virtio-net: listening on {} (tap {})",
        args.socket.display(),
        args.tap
    );
    let d = device.clone();
    serve_until_stopped(&signals, args.once, move || d.serve_one())?;
    eprintln!(
        "ferry device virtio-net: stats {}",
        serde_json::to_string(&device.stats())?
    );
    let _ = std::fs::remove_file(&args.socket);
    Ok(0)
}

/// Serves clients one after another on a thread (`serve_one` returns when a client leaves)
/// until a stop signal, or with `once` until the first client left.
fn serve_until_stopped<E: std::error::Error + Send + Sync + 'static>(
    signals: &SignalState,
    once: bool,
    serve_one: impl Fn() -> Result<(), E> + Send + 'static,
) -> anyhow::Result<()> {
    let finished = Arc::new(AtomicBool::new(false));
    let f = finished.clone();
    std::thread::Builder::new()
        .name("vfio-user".into())
        .spawn(move || loop {
            if let Err(e) = serve_one() {
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
    Ok(())
}

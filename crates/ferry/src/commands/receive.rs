//! `ferry receive`: wait for one live migration, then run the VM that arrived.
use std::time::Instant;

use anyhow::{bail, Context};
use control::net_session::{NetRestorer, NetSession, Restorers};
use migration::DestinationOptions;
use shadow::engine::net_device::NET_DEVICE_NAME;

use crate::{
    cli::ReceiveArgs,
    commands::run::{console_sink, print_report},
    nvme_session::{NvmeRestorer, PassthroughSession},
    session::SessionSpec,
    signals::{self, SignalState},
};

/// This machine's physical memory, the default ceiling on an incoming guest.
fn physical_memory() -> u64 {
    // SAFETY: sysconf only reads system constants.
    let (pages, size) = unsafe {
        (
            libc::sysconf(libc::_SC_PHYS_PAGES),
            libc::sysconf(libc::_SC_PAGESIZE),
        )
    };
    if pages > 0 && size > 0 {
        (pages as u64).saturating_mul(size as u64)
    } else {
        vmm::memory::MAX_RAM_BYTES
    }
}

pub fn run(args: ReceiveArgs, process_start: Instant) -> anyhow::Result<i32> {
    let signals = SignalState::install()?;
    let security = migration::Security::from_files(args.tls.files().as_ref())
        .map_err(|e| anyhow::anyhow!(migration::chain(&e)))?;
    let listener = migration::listen(&args.listen, &security, args.tls.insecure_no_auth)
        .map_err(|e| anyhow::anyhow!(migration::chain(&e)))
        .with_context(|| format!("listening on {}", args.listen))?;
    // Scripts and tests read the address from this first line: keep its form.
    eprintln!(
        "ferry: waiting for a migration on {}",
        listener.local_addr()?
    );
    tracing::info!(
        tls = security.is_tls(),
        "migration listener: {}",
        if security.is_tls() {
            "TLS 1.3, client certificate required"
        } else {
            "plain TCP, no authentication"
        }
    );
    // The destination's own device (if any) starts now, not during the switchover.
    let nvme = args.nvme.source()?;
    let net = crate::virtio_net_args::passthrough_socket(&args.nvme)?;
    let mut devices = Vec::new();
    if nvme.is_some() {
        devices.push("nvme0".to_string());
    }
    if net.is_some() {
        devices.push(NET_DEVICE_NAME.to_string());
    }
    let mut nvme_restorer = NvmeRestorer::new(nvme, args.nvme.engine_options())?;
    let mut net_restorer = NetRestorer::new(net, args.nvme.engine_options());
    let spec = SessionSpec {
        memory: 0,
        console: console_sink(&args.serial),
        console_prefix: String::new(),
        timeout: args.timeout,
        roundtrip_after: None,
        verify_after: args.verify_after,
        api_socket: args.api_socket.clone(),
        passthrough: None,
        net: None,
        vrdma: None,
        shadow_continuous: false,
        shadow: args.nvme.engine_options(),
        finish: None,
        net_shadowed: None,
    };
    let opts = DestinationOptions {
        debug_hash: args.debug_hash,
        handshake_timeout: args.handshake_timeout,
        max_ram: args.max_memory.unwrap_or_else(physical_memory),
        expected_ram: args.memory,
        devices,
        security,
        ..Default::default()
    };
    let deadline = args.accept_timeout.map(|t| Instant::now() + t);
    let mut strangers = migration::Strangers::default();
    let stop = || signals.stop_signal().is_some();
    let accepted = match migration::accept(&listener, &opts, &mut strangers, deadline, &stop) {
        Ok(a) => a,
        Err(migration::MigrationError::Cancelled) => {
            let sig = signals.stop_signal().unwrap_or(libc::SIGTERM);
            eprintln!(
                "ferry: {} received while waiting; no VM arrived",
                signals::name(sig)
            );
            return Ok(128 + sig);
        }
        Err(e) => bail!(
            "no migration arrived on {}: {}",
            args.listen,
            migration::chain(&e)
        ),
    };
    // One VM per `ferry receive`: nobody else gets in from here on.
    drop(listener);
    if strangers.refused + strangers.overflow > 0 {
        eprintln!(
            "ferry: {} connection(s) refused before the source arrived (see the log)",
            strangers.refused + strangers.overflow
        );
    }
    let incoming = match migration::receive_accepted(
        accepted,
        &spec.vm_config(),
        &opts,
        &mut Restorers {
            nvme: &mut nvme_restorer,
            net: &mut net_restorer,
        },
    ) {
        Ok(i) => i,
        Err(e) => {
            let why = migration::chain(&e);
            eprintln!("ferry: incoming migration failed; no VM runs here: {why}");
            if args.json {
                println!(
                    "{}",
                    serde_json::json!({ "outcome": "failed", "detail": why, "strangers": strangers })
                );
            }
            return Ok(1);
        }
    };
    let r = &incoming.report;
    eprintln!(
        "ferry: VM received from {} ({} MiB, {} rounds, {} pages, {} zero pages), running",
        r.source,
        r.ram_bytes >> 20,
        r.rounds,
        r.pages,
        r.zero_pages
    );
    let spec = SessionSpec {
        memory: r.ram_bytes,
        ..spec
    };
    let device = match nvme_restorer.engine.take() {
        Some(engine) => {
            // The VM runs; the device's queues start from zero: re-align them with fillers
            // the guest never sees, then leave shadow mode, all without pausing the VM.
            let t0 = Instant::now();
            let designation = match engine.options().designation {
                shadow::engine::Designation::VcpuBuffer => "vCPU buffer",
                shadow::engine::Designation::DeviceBuffer => "device buffer",
            };
            // A device that fails to re-align, or an engine that cannot leave, keeps the
            // device shadowed: the VM is the only live copy after Go, so it must not end here.
            let left = engine.realign().and_then(|fillers| {
                let realigned = t0.elapsed();
                engine
                    .leave_live(&incoming.vm)
                    .map(|()| (fillers, realigned))
            });
            match left {
                Ok((fillers, realigned)) => {
                    let prepared = if engine.restored_from_precopy() {
                        "configuration replayed during pre-copy"
                    } else {
                        "configuration replayed in the downtime"
                    };
                    eprintln!(
                        "ferry: passthrough nvme0 rebuilt here (copy = {designation}, {prepared}), \
                         re-aligned with {fillers} filler(s) in {:.1} ms, direct again after {:.1} ms \
                         without pausing the VM",
                        realigned.as_secs_f64() * 1000.0,
                        t0.elapsed().as_secs_f64() * 1000.0
                    );
                }
                Err(e) => {
                    let why = vmm::ErrorChain(&e);
                    tracing::error!("leaving shadow mode on the destination: {why}");
                    eprintln!(
                        "ferry: passthrough nvme0 rebuilt here (copy = {designation}) but stays \
                         shadowed: leaving shadow mode failed: {why}"
                    );
                }
            }
            Some(PassthroughSession::with_engine(
                engine,
                nvme_restorer.child.take(),
                false,
            ))
        }
        None => None,
    };
    let net = net_restorer.engine.take().map(|engine| {
        // The NIC stays shadowed: its device counts from 0, the guest carries on from its own
        // indexes (see control::net_session).
        eprintln!(
            "ferry: passthrough {NET_DEVICE_NAME} rebuilt here from the guest's configuration, \
             its queues shadowed ({:?} notifications)",
            engine.options().interception
        );
        NetSession::restored(engine, args.nvme.shadow == "continuous")
    });
    let device = match (device, net) {
        (Some(d), Some(n)) => Some(d.with_net(n)),
        (None, Some(n)) => Some(PassthroughSession::net_only(n)),
        (d, None) => d,
    };
    let report = crate::session::supervise(
        incoming.vm,
        &spec,
        process_start,
        &signals,
        incoming.report,
        device,
    )?;
    print_report(&report, args.json)?;
    Ok(report.exit_code())
}

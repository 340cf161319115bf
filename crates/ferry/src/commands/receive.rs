//! `ferry receive`: wait for one live migration, then run the VM that arrived.
use std::{
    net::TcpListener,
    time::{Duration, Instant},
};

use anyhow::{bail, Context};
use migration::DestinationOptions;

use crate::{
    api,
    cli::ReceiveArgs,
    commands::run::{console_sink, print_report},
    nvme_session::{NvmeRestorer, PassthroughSession},
    session::{self, SessionSpec},
    signals::{self, SignalState},
};

pub fn run(args: ReceiveArgs, process_start: Instant) -> anyhow::Result<i32> {
    let signals = SignalState::install()?;
    let listener =
        TcpListener::bind(&args.listen).with_context(|| format!("listening on {}", args.listen))?;
    listener.set_nonblocking(true)?;
    eprintln!(
        "ferry: waiting for a migration on {}",
        listener.local_addr()?
    );
    // The destination's own device (if any) starts now, not during the switchover.
    let mut restorer = NvmeRestorer::new(args.nvme.source()?, args.nvme.engine_options())?;
    let waited = Instant::now();
    let stream = loop {
        match listener.accept() {
            Ok((s, _)) => break s,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if let Some(sig) = signals.stop_signal() {
                    eprintln!(
                        "ferry: {} received while waiting; no VM arrived",
                        signals::name(sig)
                    );
                    return Ok(128 + sig);
                }
                if args.accept_timeout.is_some_and(|t| waited.elapsed() >= t) {
                    bail!(
                        "no migration arrived on {} within the accept timeout",
                        args.listen
                    );
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => return Err(e).context("accepting the migration connection"),
        }
    };
    stream.set_nonblocking(false)?;
    let spec = SessionSpec {
        memory: 0,
        console: console_sink(&args.serial),
        console_prefix: String::new(),
        timeout: args.timeout,
        roundtrip_after: None,
        verify_after: args.verify_after,
        api_socket: args.api_socket.clone(),
        passthrough: None,
        vrdma: None,
        shadow_continuous: false,
        shadow: args.nvme.engine_options(),
    };
    let opts = DestinationOptions {
        debug_hash: args.debug_hash,
        ..Default::default()
    };
    let incoming = match migration::receive(stream, &spec.vm_config(), &opts, &mut restorer) {
        Ok(i) => i,
        Err(e) => {
            let e = migration::ErrorChain(&e);
            eprintln!("ferry: incoming migration failed; no VM runs here: {e}");
            if args.json {
                println!(
                    "{}",
                    serde_json::json!({ "outcome": "failed", "detail": e.to_string() })
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
    let device = match restorer.engine.take() {
        Some(engine) => {
            // The VM runs; the device's queues start from zero: re-align them with fillers
            // the guest never sees, then leave shadow mode, all without pausing the VM.
            let t0 = Instant::now();
            let designation = match engine.options().designation {
                shadow::engine::Designation::VcpuBuffer => "vCPU buffer",
                shadow::engine::Designation::DeviceBuffer => "device buffer",
            };
            let fillers = engine
                .realign()
                .context("re-aligning the device's queues")?;
            engine
                .leave_live(&incoming.vm)
                .context("leaving shadow mode on the destination")?;
            eprintln!(
                "ferry: passthrough nvme0 rebuilt here (copy = {designation}), re-aligned with \
                 {fillers} filler(s), direct again after {:.1} ms without pausing the VM",
                t0.elapsed().as_secs_f64() * 1000.0
            );
            Some(PassthroughSession::with_engine(
                engine,
                restorer.child.take(),
                false,
            ))
        }
        None => None,
    };
    let api = spec.api_socket.as_deref().map(api::serve).transpose()?;
    let report = session::supervise(
        incoming.vm,
        &spec,
        api,
        process_start,
        &signals,
        Some(incoming.report),
        device,
    )?;
    print_report(&report, args.json)?;
    Ok(report.exit_code())
}

//! `ferry receive`: wait for one live migration, then run the VM that arrived.
use std::{
    net::TcpListener,
    time::{Duration, Instant},
};

use anyhow::{bail, Context};
use migration::{DestinationOptions, NoDevices};

use crate::{
    api,
    cli::ReceiveArgs,
    commands::run::{console_sink, print_report},
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
        shadow_continuous: false,
    };
    let opts = DestinationOptions {
        debug_hash: args.debug_hash,
        ..Default::default()
    };
    let incoming = match migration::receive(stream, &spec.vm_config(), &opts, &mut NoDevices) {
        Ok(i) => i,
        Err(e) => {
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
    let api = spec.api_socket.as_deref().map(api::serve).transpose()?;
    let report = session::supervise(
        incoming.vm,
        &spec,
        api,
        process_start,
        &signals,
        Some(incoming.report),
        None,
    )?;
    print_report(&report, args.json)?;
    Ok(report.exit_code())
}

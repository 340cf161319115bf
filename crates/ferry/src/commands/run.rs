//! `ferry run`: boot a guest and supervise it until it ends.
use std::{path::PathBuf, time::Instant};

use vmm::devices::serial::ConsoleSink;

use crate::{
    cli::RunArgs,
    session::{self, BootSpec, SessionReport, SessionSpec},
    signals::SignalState,
};

/// Parses `--serial`.
pub fn console_sink(s: &str) -> ConsoleSink {
    match s {
        "stdout" | "-" => ConsoleSink::Stdout,
        "off" | "none" | "null" => ConsoleSink::Null,
        path => ConsoleSink::File(PathBuf::from(path)),
    }
}

/// Prints the parts of a session report a person wants on stderr, and the JSON summary.
pub fn print_report(report: &SessionReport, json: bool) -> anyhow::Result<()> {
    if let Some(rt) = &report.roundtrip {
        eprintln!(
            "ferry: VM state round trip: {} bytes, restored into a fresh VM in {:.1} ms",
            rt.state_bytes, rt.pause_ms
        );
    }
    for v in &report.verifications {
        eprintln!(
            "ferry: ledger verification: {} ({} pages, {} writes)",
            if v.status == 0 {
                "OK".to_string()
            } else {
                format!("FAILED, status {}", v.status)
            },
            v.pages,
            v.writes
        );
    }
    if report.outcome != "exit" || report.status != Some(0) {
        eprintln!("ferry: {}", report.detail);
    }
    if let Some(log) = &report.config_log {
        eprintln!(
            "ferry: passthrough nvme0 configuration log: {}",
            log.summary()
        );
    }

    if json {
        println!("{}", serde_json::to_string(report)?);
    }
    Ok(())
}

pub fn run(args: RunArgs, process_start: Instant) -> anyhow::Result<i32> {
    vmm::memory::validate_ram_size(args.guest.memory)?;
    let signals = SignalState::install()?;
    let (image, wargs) = super::guest_from_args(&args.guest)?;
    let boot = BootSpec {
        image,
        workload: args.guest.workload.into(),
        args: wargs,
    };
    let mut boot = boot;
    let host = match &args.vrdma {
        Some(v) => {
            boot.args.rdma.local_gid = u32::from(v.gid);
            Some(control::vrdma_host::VrdmaHost::start(
                v.host.unwrap_or(v.gid),
                v.pcap.clone(),
            )?)
        }
        None => None,
    };
    let spec = SessionSpec {
        memory: args.guest.memory,
        console: console_sink(&args.serial),
        console_prefix: String::new(),
        timeout: args.timeout,
        roundtrip_after: args.state_roundtrip_after,
        verify_after: args.verify_after,
        api_socket: args.api_socket,
        passthrough: args.guest.nvme.source()?,
        net: crate::virtio_net_args::passthrough_socket(&args.guest.nvme)?,
        vrdma: host.clone(),
        shadow_continuous: args.guest.nvme.shadow == "continuous",
        shadow: args.guest.nvme.engine_options(),
        finish: None,
        net_shadowed: None,
    };
    let report = session::run(&boot, &spec, process_start, &signals)?;
    if let (Some(h), Some(v)) = (&host, &report.vrdma) {
        let hr = h.report();
        eprintln!(
            "ferry: vrdma: device MADs sent {} received {} refused {}, UD sent {} received {}; host {} MADs routed to VMs {}, dropped (no owner) {}, refused {}; GIDs registered at VM exit (now unregistered): {}",
            v.device.mads_sent,
            v.device.mads_received,
            v.device.mads_refused,
            v.device.ud_sent,
            v.device.ud_received,
            hr.addr,
            hr.mux.delivered + hr.mux.queued,
            hr.mux.no_owner,
            hr.mux.refused_spoofed + hr.mux.refused_class + hr.mux.refused_malformed,
            v.gids_at_exit
        );
        h.shutdown();
    }
    print_report(&report, args.json)?;
    Ok(report.exit_code())
}

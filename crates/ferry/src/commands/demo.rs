//! `ferry demo`: the main job. Boots the built-in guest under KVM twice: once to enumerate PCI,
//! once to run the `dirty` workload, with a ledger verification on request while it runs and a
//! complete VM state save → restore into a fresh VM in the middle; then prints a report.
use std::{sync::Arc, time::Duration, time::Instant};

use anyhow::Context;
use guest_abi::{Workload, WorkloadArgs};
use serde::Serialize;
use vmm::devices::serial::ConsoleSink;

use crate::{
    cli::DemoArgs,
    session::{self, SessionReport, SessionSpec},
    signals::SignalState,
};

#[derive(Serialize)]
struct DemoReport {
    pass: bool,
    memory_mib: u64,
    working_set_mib: u64,
    hello: SessionReport,
    pci_functions: Vec<String>,
    dirty: SessionReport,
    write_rate_per_s: f64,
    nvme: SessionReport,
    nvme_result: Option<String>,
}

pub fn run(args: DemoArgs, process_start: Instant) -> anyhow::Result<i32> {
    vmm::memory::validate_ram_size(args.memory)?;
    let signals = SignalState::install()?;
    let image = Arc::new(guest_image::GUEST_ELF.to_vec());
    let (console, prefix) = if args.json {
        (ConsoleSink::Null, String::new())
    } else {
        (ConsoleSink::Stdout, "  guest | ".to_string())
    };
    if !args.json {
        println!(
            "Ferry demo: a {} MiB VM under KVM running the built-in guest in 64-bit ring 3",
            args.memory >> 20
        );
    }
    let hello = session::run(
        &SessionSpec {
            image: image.clone(),
            workload: Workload::Hello,
            args: WorkloadArgs::default(),
            memory: args.memory,
            console: console.clone(),
            console_prefix: prefix.clone(),
            timeout: Some(Duration::from_secs(60)),
            roundtrip_after: None,
            verify_after: None,
            passthrough: None,
        },
        process_start,
        &signals,
    )
    .context("hello run")?;
    let pci_functions: Vec<String> = hello
        .console_tail
        .iter()
        .filter(|l| l.starts_with("pci 00:"))
        .cloned()
        .collect();

    let duration = args.duration.max(Duration::from_millis(500));
    let dirty_start = Instant::now();
    let dirty = session::run(
        &SessionSpec {
            image,
            workload: Workload::Dirty,
            args: WorkloadArgs {
                working_set_bytes: args.working_set,
                rate_pages_per_sec: 0,
                duration_ms: duration.as_millis() as u64,
                report_interval_ms: 1000,
                seed: 0x5eed,
                iterations: 0,
                nvme: Default::default(),
            },
            memory: args.memory,
            console: console.clone(),
            console_prefix: prefix.clone(),
            timeout: Some(duration * 4 + Duration::from_secs(30)),
            roundtrip_after: Some(duration / 2),
            verify_after: Some(duration / 4),
            passthrough: None,
        },
        dirty_start,
        &signals,
    )
    .context("dirty run")?;

    let nvme =
        super::demo_nvme::run(&console, &prefix, &signals).context("passthrough NVMe run")?;
    let nvme_result = nvme
        .console_tail
        .iter()
        .find(|l| l.contains("nvme-verify: result "))
        .cloned();

    let verified_mid = dirty.verifications.first().is_some_and(|v| v.status == 0);
    let pass = hello.status == Some(0)
        && !pci_functions.is_empty()
        && dirty.status == Some(0)
        && verified_mid
        && dirty.roundtrip.is_some()
        && nvme.status == Some(0);
    let write_rate = dirty.progress as f64 / (duration.as_secs_f64());
    let report = DemoReport {
        pass,
        memory_mib: args.memory >> 20,
        working_set_mib: args.working_set >> 20,
        hello,
        pci_functions,
        dirty,
        write_rate_per_s: write_rate,
        nvme,
        nvme_result,
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_report(&report);
    }
    Ok(if pass { 0 } else { 1 })
}

fn print_report(r: &DemoReport) {
    let ok = |b: bool| if b { "ok" } else { "FAILED" };
    println!();
    println!("Report");
    if let Some(t) = r.hello.first_instruction_ms {
        println!("  boot          first guest instruction {t:.1} ms after process start");
    }
    println!(
        "  hello         {} ({}); PCI: {}",
        ok(r.hello.status == Some(0)),
        r.hello.detail,
        if r.pci_functions.is_empty() {
            "nothing found".into()
        } else {
            r.pci_functions.join(", ")
        }
    );
    println!(
        "  dirty         {} MiB working set, {} page writes ({:.2} M/s)",
        r.working_set_mib,
        r.dirty.progress,
        r.write_rate_per_s / 1e6
    );
    match r.dirty.verifications.first() {
        Some(v) => println!(
            "  ledger        verified mid-run on request: {} ({} pages, {} writes)",
            ok(v.status == 0),
            v.pages,
            v.writes
        ),
        None => println!("  ledger        mid-run verification: FAILED (no answer)"),
    }
    match &r.dirty.roundtrip {
        Some(rt) => println!(
            "  state         saved, serialized ({} KiB), restored into a fresh VM in {:.1} ms; the guest went on",
            rt.state_bytes / 1024,
            rt.pause_ms
        ),
        None => println!("  state         round trip: FAILED (not done)"),
    }
    println!(
        "  end           {} ({})",
        ok(r.dirty.status == Some(0)),
        r.dirty.detail
    );
    super::demo_nvme::print(&r.nvme, r.nvme_result.as_deref());
    println!(
        "  unclaimed     {} port and {} MMIO accesses answered with all ones",
        r.hello.unhandled_pio + r.dirty.unhandled_pio,
        r.hello.unhandled_mmio + r.dirty.unhandled_mmio
    );
    println!("  result        {}", if r.pass { "PASS" } else { "FAIL" });
}

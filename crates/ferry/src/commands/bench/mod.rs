//! `ferry bench ...`.

pub mod faults;
pub mod migrate;
pub mod nvme;
pub mod platform;
pub mod rc;
pub mod rdma_port;
pub mod rdma_vms;
pub mod rdma_vms_rc;
pub mod shadow_cost;
pub mod shadow_net;

use std::{
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{bail, Context};
use guest_abi::{bench::spin_loop, ports::Event, Workload, WorkloadArgs};
use serde::Serialize;
use vmm::{devices::serial::ConsoleSink, Vm, VmConfig, VmOutcome};

use crate::cli::BenchBootArgs;

#[derive(Serialize)]
struct Stats {
    min: f64,
    median: f64,
    max: f64,
}

fn stats(mut v: Vec<f64>) -> Stats {
    v.sort_by(f64::total_cmp);
    Stats {
        min: v[0],
        median: v[v.len() / 2],
        max: v[v.len() - 1],
    }
}

#[derive(Serialize)]
struct BootBench {
    boots: usize,
    first_instruction_ms: Stats,
    exit_ms: Stats,
    loop_iterations: u64,
    guest_loop_ms: f64,
    native_loop_ms: f64,
    guest_speed_vs_native: f64,
}

/// Runs `ferry run --workload hello` in a fresh process and returns (first instruction, exit)
/// in ms after that process started.
fn one_boot() -> anyhow::Result<(f64, f64)> {
    let exe = std::env::current_exe().context("locating the ferry binary")?;
    let out = Command::new(exe)
        .args(["run", "--workload", "hello", "--serial", "off", "--json"])
        .output()
        .context("starting ferry run")?;
    if !out.status.success() {
        bail!("ferry run failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let last = stdout.lines().last().unwrap_or_default();
    let v: serde_json::Value =
        serde_json::from_str(last).with_context(|| format!("parsing {last:?}"))?;
    let first = v["first_instruction_ms"]
        .as_f64()
        .context("no first_instruction_ms")?;
    let end = v["end_ms"].as_f64().context("no end_ms")?;
    Ok((first, end))
}

/// Runs the `spin` workload in a VM; returns the guest's loop time (ms, between its bench
/// events) and its result.
fn guest_loop(iterations: u64, seed: u64) -> anyhow::Result<(f64, u64)> {
    let config = VmConfig {
        console: ConsoleSink::Null,
        ..Default::default()
    };
    let mut vm = Vm::new(&config)?;
    let args = WorkloadArgs {
        iterations,
        seed,
        ..Default::default()
    };
    vm.boot(guest_image::GUEST_ELF, Workload::Spin, args)?;
    vm.start()?;
    match vm.wait(Some(Duration::from_secs(600))) {
        Some(VmOutcome::GuestExit(0)) => {}
        other => bail!("spin guest ended badly: {other:?}"),
    }
    let lc = vm.lifecycle();
    let (s, e) = (
        lc.event_time(Event::BenchStart).context("no start event")?,
        lc.event_time(Event::BenchEnd).context("no end event")?,
    );
    let (_, result) = vm.mailbox().bench()?;
    Ok(((e - s).as_secs_f64() * 1000.0, result))
}

pub fn boot(args: BenchBootArgs) -> anyhow::Result<i32> {
    if args.boots == 0 || args.reps == 0 {
        bail!("--boots and --reps must be at least 1");
    }
    let mut firsts = Vec::new();
    let mut ends = Vec::new();
    for _ in 0..args.boots {
        let (f, e) = one_boot()?;
        firsts.push(f);
        ends.push(e);
    }
    let seed = 0x1234_5678;
    let mut guest_best = f64::MAX;
    let mut native_best = f64::MAX;
    for _ in 0..args.reps {
        let (g, guest_result) = guest_loop(args.iterations, seed)?;
        guest_best = guest_best.min(g);
        let t = Instant::now();
        let native_result = spin_loop(std::hint::black_box(args.iterations), seed);
        native_best = native_best.min(t.elapsed().as_secs_f64() * 1000.0);
        if guest_result != native_result {
            bail!("guest loop computed {guest_result:#x}, native {native_result:#x}: not the same work");
        }
    }
    let r = BootBench {
        boots: args.boots,
        first_instruction_ms: stats(firsts),
        exit_ms: stats(ends),
        loop_iterations: args.iterations,
        guest_loop_ms: guest_best,
        native_loop_ms: native_best,
        guest_speed_vs_native: native_best / guest_best,
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
    } else {
        println!(
            "ferry bench boot ({} boots of `ferry run --workload hello`, 256 MiB)",
            r.boots
        );
        println!(
            "  process start -> first guest instruction  min {:.1} ms  median {:.1} ms  max {:.1} ms",
            r.first_instruction_ms.min, r.first_instruction_ms.median, r.first_instruction_ms.max
        );
        println!(
            "  process start -> guest exit               min {:.1} ms  median {:.1} ms  max {:.1} ms",
            r.exit_ms.min, r.exit_ms.median, r.exit_ms.max
        );
        println!(
            "  loop of {} iterations: guest {:.1} ms, native {:.1} ms -> guest speed {:.3} x native (best of {})",
            r.loop_iterations, r.guest_loop_ms, r.native_loop_ms, r.guest_speed_vs_native, args.reps
        );
    }
    Ok(0)
}

//! `ferry demo`: the main job.
//!
//! 1. boots the built-in guest under KVM to enumerate PCI;
//! 2. boots it again running the `dirty` workload, verifies its ledger on request, saves the
//!    complete VM state and restores it into a fresh VM mid-run;
//! 3. starts a second Ferry process (`ferry receive`) on loopback and live-migrates the running
//!    workload there through the control API; the guest verifies its ledger on the
//!    destination and finishes there;
//! 4. boots a VM with a passthrough NVMe device running `nvme-verify` and `dirty` together and
//!    live-migrates it, I/O in flight (`demo_nvme.rs`);
//! 5. connects two VMs on two hosts over virtual RDMA (`demo_vrdma.rs`);
//! 6. prints a report.

mod net_phase;
mod nvme_phase;
mod rdma_phase;

use std::{
    io::{BufRead, BufReader},
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::{mpsc, Arc},
    time::{Duration, Instant},
};

use anyhow::{bail, Context};
use guest_abi::{Workload, WorkloadArgs};
use migration::MigrationReport;
use serde::Serialize;
use vmm::devices::serial::ConsoleSink;

use crate::{
    api::{self, MigrateRequest, Request, Response},
    cli::DemoArgs,
    session::{self, BootSpec, SessionReport, SessionSpec},
    signals::SignalState,
};

#[derive(Serialize)]
struct DemoReport {
    pass: bool,
    memory_mib: u64,
    working_set_mib: u64,
    hello: SessionReport,
    pci_functions: Vec<String>,
    source: SessionReport,
    migration: Option<MigrationReport>,
    destination: Option<serde_json::Value>,
    write_rate_per_s: f64,
    nvme: nvme_phase::NvmeMigration,
    net: net_phase::NetMigration,
    vrdma: rdma_phase::VrdmaDemo,
}

/// A `ferry receive` child process whose console lines are echoed with a prefix and whose
/// JSON summary (its last stdout line) is collected.
pub(crate) struct Destination {
    child: Child,
    pub(crate) addr: String,
    summary: mpsc::Receiver<serde_json::Value>,
    /// Its API socket.
    api: PathBuf,
}

/// How much longer than the demo's pacing a workload's own timer runs: a bound only. The demo
/// tells the guest to finish (SIGUSR2, [`Finish`]) once it has run and verified on the
/// destination; a guest whose own timer ran out while a slow migration (a loaded machine) was
/// still under way took the VM with it.
pub(crate) const WORKLOAD_BOUND: Duration = Duration::from_secs(60);

/// When the demo tells the workload on the destination to finish: not before `at` (the demo's
/// pacing) and not before the destination answered `verifications` ledger verifications.
pub(crate) struct Finish {
    pub at: Instant,
    pub verifications: u64,
}

pub(crate) fn start_destination(
    echo: bool,
    verify_after: Duration,
    extra: &[&std::ffi::OsStr],
) -> anyhow::Result<Destination> {
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let api = std::env::temp_dir().join(format!("ferry-demo-dest-{}-{n}.sock", std::process::id()));
    let exe = std::env::current_exe().context("locating the ferry binary")?;
    let mut child = Command::new(exe)
        .args([
            "receive",
            "--listen",
            "127.0.0.1:0",
            "--json",
            "--debug-hash",
        ])
        .args(["--accept-timeout", "60s", "--timeout", "120s"])
        .arg("--api-socket")
        .arg(&api)
        .args(["--verify-after", &format!("{}ms", verify_after.as_millis())])
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting the destination (ferry receive)")?;
    let stderr = child.stderr.take().context("destination stderr")?;
    let stdout = child.stdout.take().context("destination stdout")?;
    let (addr_tx, addr_rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Some(a) = line.strip_prefix("ferry: waiting for a migration on ") {
                let _ = addr_tx.send(a.to_string());
            } else if echo {
                eprintln!("  dest  | {line}");
            }
        }
    });
    let (sum_tx, summary) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            match serde_json::from_str::<serde_json::Value>(&line) {
                Ok(v) if line.starts_with('{') => {
                    let _ = sum_tx.send(v);
                }
                _ if echo => println!("  guest@B | {line}"),
                _ => {}
            }
        }
    });
    let addr = addr_rx
        .recv_timeout(Duration::from_secs(30))
        .context("the destination did not start listening")?;
    Ok(Destination {
        child,
        addr,
        summary,
        api,
    })
}

pub fn run(args: DemoArgs, process_start: Instant) -> anyhow::Result<i32> {
    vmm::memory::validate_ram_size(args.memory)?;
    let signals = SignalState::install()?;
    // Before any session installs a system-call filter on this thread (and so on the threads
    // it starts): the virtio-net phase's peer joins a network namespace.
    let net_peer = net_phase::Peer::start()?;
    let image = Arc::new(guest_image::GUEST_ELF.to_vec());
    let echo = !args.json;
    let (console, prefix) = if echo {
        (ConsoleSink::Stdout, "  guest@A | ")
    } else {
        (ConsoleSink::Null, "")
    };
    if echo {
        println!(
            "Ferry demo: a {} MiB VM under KVM running the built-in guest in 64-bit ring 3",
            args.memory >> 20
        );
    }
    let base = SessionSpec {
        memory: args.memory,
        console,
        console_prefix: prefix.into(),
        timeout: Some(Duration::from_secs(120)),
        ..Default::default()
    };

    // 1. hello
    let hello_boot = BootSpec {
        image: image.clone(),
        workload: Workload::Hello,
        args: WorkloadArgs::default(),
    };
    let hello = session::run(&hello_boot, &base, process_start, &signals).context("hello run")?;
    let pci_functions: Vec<String> = hello
        .console_tail
        .iter()
        .filter(|l| l.starts_with("pci 00:"))
        .cloned()
        .collect();

    // 2 + 3. dirty, verified, state round trip, then live migration to a second process
    let duration = args.duration.max(Duration::from_secs(3));
    let dest = start_destination(echo, Duration::ZERO, &[])?;
    let api_path = std::env::temp_dir().join(format!("ferry-demo-{}.sock", std::process::id()));
    let spec = SessionSpec {
        roundtrip_after: Some(duration / 5),
        verify_after: Some(duration / 10),
        api_socket: Some(api_path.clone()),
        ..base.clone()
    };
    let dirty_boot = BootSpec {
        image,
        workload: Workload::Dirty,
        args: WorkloadArgs {
            working_set_bytes: args.working_set,
            rate_pages_per_sec: args.rate,
            duration_ms: (duration + WORKLOAD_BOUND).as_millis() as u64,
            report_interval_ms: 500,
            seed: 0x5eed,
            iterations: 0,
            ..Default::default()
        },
    };
    let migrate_at = duration * 2 / 5;
    let to = dest.addr.clone();
    let before = Before {
        verifications: 1,
        roundtrip: true,
    };
    let started = Instant::now();
    let migrator = std::thread::spawn(move || migrate_later(api_path, to, migrate_at, before));
    let source = session::run(&dirty_boot, &spec, started, &signals).context("dirty run")?;
    let migration = join_migration(migrator, "migration")?;
    let finish = Finish {
        at: started + duration,
        verifications: 1,
    };
    let destination = finish_destination(dest, migration.is_some(), Some(finish));
    let ran = started.elapsed();

    // 4. a VM with a passthrough NVMe device, live-migrated while nvme-verify and dirty run
    let nvme = nvme_phase::run(&base.console, &base.console_prefix, echo, &signals)
        .context("passthrough NVMe migration")?;

    // 5. a VM with a passthrough virtio-net NIC, live-migrated under a UDP stream (root only)
    let net = net_phase::run(net_peer, echo, &signals);

    // 6. virtual RDMA: two hosts, a VM on each, connected through both multiplexers
    let vrdma = rdma_phase::run().context("virtual RDMA phase")?;

    let verified_mid = source.verifications.first().is_some_and(|v| v.status == 0);
    // The guest verifies its ledger when it finishes and exits non-zero if it does not hold;
    // verifications asked for on the destination must hold too.
    let dest_ok = destination.as_ref().is_some_and(|d| {
        d["outcome"] == "exit"
            && d["status"] == 0
            && d["verifications"]
                .as_array()
                .is_some_and(|v| v.iter().all(|x| x["status"] == 0))
    });
    let pass = hello.status == Some(0)
        && !pci_functions.is_empty()
        && verified_mid
        && source.roundtrip.is_some()
        && source.outcome == "migrated"
        && dest_ok
        && nvme.pass()
        && net.pass()
        && vrdma.pass;
    let total_writes = destination
        .as_ref()
        .and_then(|d| d["progress"].as_u64())
        .unwrap_or(source.progress);
    let report = DemoReport {
        pass,
        memory_mib: args.memory >> 20,
        working_set_mib: args.working_set >> 20,
        hello,
        pci_functions,
        source,
        migration,
        destination,
        write_rate_per_s: total_writes as f64 / ran.as_secs_f64(),
        nvme,
        net,
        vrdma,
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_report(&report);
    }
    Ok(if pass { 0 } else { 1 })
}

/// Waits for the thread running [`migrate_later`]: its report, or `None` after saying on
/// stderr why the `what` failed.
pub(crate) fn join_migration(
    migrator: std::thread::JoinHandle<anyhow::Result<MigrationReport>>,
    what: &str,
) -> anyhow::Result<Option<MigrationReport>> {
    let migration = migrator
        .join()
        .map_err(|_| anyhow::anyhow!("{what} thread panicked"))?;
    Ok(match migration {
        Ok(m) => Some(m),
        Err(e) => {
            eprintln!("ferry demo: {what} failed: {}", vmm::ErrorChain(e.as_ref()));
            None
        }
    })
}

/// What the source must have reported before the demo migrates it.
#[derive(Clone, Copy)]
pub(crate) struct Before {
    /// Ledger verifications answered.
    pub verifications: u64,
    /// The state round trip done.
    pub roundtrip: bool,
}

/// Lets the workload run for `after` (the demo's pacing), then waits — on what the source's
/// API reports, bounded — until `before` holds, and migrates the VM to `to`.
pub(crate) fn migrate_later(
    api_path: PathBuf,
    to: String,
    after: Duration,
    before: Before,
) -> anyhow::Result<MigrationReport> {
    std::thread::sleep(after);
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if let Response::Result {
            ok: true,
            data: Some(d),
            ..
        } = api::call(&api_path, &Request::Status, |_| {})?
        {
            let verified = d["verifications"].as_u64().unwrap_or(0) >= before.verifications;
            let rt = !before.roundtrip || d["roundtrip"] == true;
            if verified && rt {
                break;
            }
        }
        if Instant::now() > deadline {
            bail!("the source never reported its verification and round trip");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let request = Request::Migrate(MigrateRequest {
        to,
        downtime_ms: 50,
        max_rounds: 30,
        on_limit: migration::LimitPolicy::Finish,
        debug_hash: true,
        unsafe_no_shadow: false,
        max_bandwidth: None,
        compress: None,
        tls: None,
        tls_server_name: None,
        insecure_no_auth: false,
        streams: None,
    });
    match api::call(&api_path, &request, |_| {})? {
        Response::Result {
            ok: true,
            data: Some(d),
            ..
        } => Ok(serde_json::from_value(d)?),
        Response::Result { error, .. } => bail!("{}", error.unwrap_or_default()),
        Response::Progress(_) => bail!("unexpected progress as the answer"),
    }
}

/// Collects the destination's summary after a migration (kills it after none); with `finish`,
/// first tells its workload to finish when that is due.
pub(crate) fn finish_destination(
    mut dest: Destination,
    migrated: bool,
    finish: Option<Finish>,
) -> Option<serde_json::Value> {
    if !migrated {
        let _ = dest.child.kill();
        let _ = dest.child.wait();
        return None;
    }
    if let Some(f) = finish {
        tell_to_finish(&mut dest, &f);
    }
    let summary = dest.summary.recv_timeout(Duration::from_secs(150)).ok();
    let _ = dest.child.wait();
    summary
}

/// Waits until `f` is due — its time come and the verifications it waits for answered, as the
/// destination's API reports them, bounded — and sends the destination SIGUSR2. Gives up
/// quietly when the destination ended (its summary says how) or never reports them (then its
/// own timers end it).
fn tell_to_finish(dest: &mut Destination, f: &Finish) {
    std::thread::sleep(f.at.saturating_duration_since(Instant::now()));
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if !matches!(dest.child.try_wait(), Ok(None)) {
            return;
        }
        if let Ok(Response::Result {
            ok: true,
            data: Some(d),
            ..
        }) = api::call(&dest.api, &Request::Status, |_| {})
        {
            if d["verifications"].as_u64().unwrap_or(0) >= f.verifications {
                break;
            }
        }
        if Instant::now() > deadline {
            eprintln!("ferry demo: the destination never reported its verification");
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    // SAFETY: kill(2) on our own child, not reaped yet (so the pid is still its own).
    if unsafe { libc::kill(dest.child.id() as libc::pid_t, libc::SIGUSR2) } != 0 {
        tracing::warn!(
            "telling the destination to finish: {}",
            std::io::Error::last_os_error()
        );
    }
}

fn print_report(r: &DemoReport) {
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
        "  dirty         {} MiB working set, {} page writes in all ({:.2} M/s)",
        r.working_set_mib,
        r.destination
            .as_ref()
            .and_then(|d| d["progress"].as_u64())
            .unwrap_or(r.source.progress),
        r.write_rate_per_s / 1e6
    );
    match r.source.verifications.first() {
        Some(v) => println!(
            "  ledger        verified mid-run on request: {} ({} pages, {} writes)",
            ok(v.status == 0),
            v.pages,
            v.writes
        ),
        None => println!("  ledger        mid-run verification: FAILED (no answer)"),
    }
    match &r.source.roundtrip {
        Some(rt) => println!(
            "  state         saved ({} KiB), restored into a fresh VM in {:.1} ms; the guest went on",
            rt.state_bytes / 1024,
            rt.pause_ms
        ),
        None => println!("  state         round trip: FAILED (not done)"),
    }
    match &r.migration {
        Some(m) => {
            println!(
                "  migration     to {} in {:.0} ms, downtime {:.1} ms (+{:.0} ms hashing all RAM on both sides for the check below), {} rounds, {:.1} MiB at {:.0} MB/s, {} zero pages skipped",
                m.destination,
                m.total_ms,
                m.downtime_ms,
                m.debug_hash_ms,
                m.rounds.len(),
                m.bytes as f64 / (1 << 20) as f64,
                m.bandwidth_mbps,
                m.zero_pages_skipped
            );
            for line in m.figures() {
                println!("                {line}");
            }
            print_memory_check("memory       ", m, r.destination.as_ref());
        }
        None => println!("  migration     FAILED"),
    }
    match &r.destination {
        Some(d) => {
            let v = d["verifications"].as_array().cloned().unwrap_or_default();
            println!(
                "  destination   ledger verified on request {} time(s) there: {}; guest finished (verifying its ledger): {}",
                v.len(),
                ok(v.iter().all(|x| x["status"] == 0)),
                d["detail"].as_str().unwrap_or("?")
            );
        }
        None => println!("  destination   FAILED (no report)"),
    }
    nvme_phase::print(&r.nvme);
    net_phase::print(&r.net);
    rdma_phase::print(&r.vrdma);
    println!(
        "  unclaimed     {} port and {} MMIO accesses answered with all ones",
        r.hello.unhandled_pio + r.source.unhandled_pio,
        r.hello.unhandled_mmio + r.source.unhandled_mmio
    );
    println!("  result        {}", if r.pass { "PASS" } else { "FAIL" });
}

/// "ok" or "FAILED".
pub(super) fn ok(b: bool) -> &'static str {
    if b {
        "ok"
    } else {
        "FAILED"
    }
}

/// The report line comparing the source's memory hash at the pause with the destination's
/// (from its JSON summary) at the resume.
pub(super) fn print_memory_check(
    label: &str,
    m: &MigrationReport,
    destination: Option<&serde_json::Value>,
) {
    let dest_hash =
        destination.and_then(|d| d["incoming"]["memory_hash"].as_str().map(str::to_string));
    println!(
        "  {label} hash at pause {} / at resume {} -> {}",
        m.memory_hash.as_deref().unwrap_or("-"),
        dest_hash.as_deref().unwrap_or("-"),
        ok(m.memory_hash.is_some() && m.memory_hash == dest_hash)
    );
}

//! The shadow engine end to end: real `ferry run` / `ferry receive` / `ferry device nvme`
//! processes under /dev/kvm, the guest's self-verifying `nvme-verify` workload (several queues,
//! QD 32, 4 KiB random reads and writes), live migration over loopback with shared storage (the
//! same backing file on both sides). Every process is killed if a test fails.
mod common;
use common::{
    last_json, spawn_receiver, status, text, wait_for_path, wait_for_socket, wait_progress,
    wait_until, Proc, TempDir, PATIENCE,
};

use std::{
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    time::Duration,
};

use migration::fault::{Action, Fault, FaultProxy, Position, Verdict};
use serde_json::Value;

/// The tests run one at a time: each runs two or three VMs whose vCPUs, devices and pollers
/// spin, and the machines they run on have two cores; in parallel the guests' timed workloads
/// could end before the migrations they exist for.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

fn ferry() -> Command {
    Command::new(env!("CARGO_BIN_EXE_ferry"))
}

const VERIFY: [&str; 12] = [
    "--workload",
    "nvme-verify",
    "--nvme-queues",
    "4",
    "--nvme-depth",
    "32",
    "--nvme-io-size",
    "4K",
    "--memory",
    "128M",
    "--serial",
    "off",
];

/// How long the guest's I/O phase may last: a bound only. The tests end it when they are done
/// with it ([`Proc::finish`]), whatever the machine's speed: a guest whose timed run ended
/// while a slow migration was still under way (a loaded machine) took the VM with it.
const IO_BOUND: &str = "120s";

/// The source: `ferry run` with nvme-verify doing I/O on a device over `disk` until it is told
/// to finish (or [`IO_BOUND`]), then reading the whole region back; returns once the guest's
/// queues are live.
fn source(dir: &TempDir, disk: &Path, extra: &[&str]) -> (Proc, PathBuf) {
    let api = dir.path("src.sock");
    let reads: &[&str] = if extra.contains(&"--nvme-read-percent") {
        &[]
    } else {
        &["--nvme-read-percent", "90"]
    };
    let child = ferry()
        .arg("run")
        .args(VERIFY)
        .args(reads)
        .args(["--duration", IO_BOUND, "--nvme-backing"])
        .arg(disk)
        .args(["--timeout", "240s", "--json", "--api-socket"])
        .arg(&api)
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for_socket(&api);
    wait_until("the guest creates its 4 I/O queues", PATIENCE, || {
        status(&api)["data"]["io_queues"].as_u64() == Some(4)
    });
    (Proc(Some(child), None), api)
}

/// The destination: `ferry receive` with its own device over the same `disk`.
fn destination(disk: Option<&Path>) -> (Proc, String) {
    destination_with(disk, &[])
}

fn destination_with(disk: Option<&Path>, extra: &[&str]) -> (Proc, String) {
    let mut cmd = ferry();
    cmd.args([
        "receive",
        "--listen",
        "127.0.0.1:0",
        "--serial",
        "off",
        "--json",
    ])
    .args([
        "--debug-hash",
        "--accept-timeout",
        "60s",
        "--timeout",
        "240s",
    ]);
    if let Some(d) = disk {
        cmd.arg("--nvme-backing").arg(d);
    }
    cmd.args(extra);
    spawn_receiver(&mut cmd)
}

fn migrate(api: &Path, to: &str, extra: &[&str]) -> Output {
    ferry()
        .args(["migrate", "--api-socket"])
        .arg(api)
        .args(["--to", to, "--debug-hash", "--json"])
        .args(extra)
        .output()
        .unwrap()
}

/// Waits until I/O got going on every queue: a thousand I/Os done.
fn warm_up(api: &Path) {
    wait_progress(api, 1000);
}

/// The guest received by `dst` (serving its API on `api`) does I/O there — another thousand
/// I/Os on the destination's device — and is then told to finish: it reads everything back,
/// verifies, and exits on its own.
fn run_on_then_finish(dst: &Proc, api: &Path) {
    wait_for_socket(api);
    let now = status(api)["data"]["progress"].as_u64().unwrap_or(0);
    wait_progress(api, now + 1000);
    dst.finish();
}

/// Migrates an nvme-verify guest during I/O and checks everything the issue asks for; returns
/// the destination's summary.
fn migrate_and_verify(tag: &str, extra: &[&str]) -> Value {
    let dir = TempDir::new(tag);
    let disk = dir.path("disk.img");
    let (src, api) = source(&dir, &disk, extra);
    let dst_api = dir.path("dst.sock");
    let mut dst_args = extra.to_vec();
    dst_args.extend(["--api-socket", dst_api.to_str().unwrap()]);
    let (dst, addr) = destination_with(Some(&disk), &dst_args);
    warm_up(&api);
    let out = migrate(&api, &addr, &[]);
    assert!(out.status.success(), "migrate: {}", text(&out.stderr));
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    let device_dirty: u64 = report["rounds"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["dirty_device"].as_u64().unwrap_or(0))
        .sum();
    assert!(
        device_dirty > 0,
        "no device-dirtied pages reported: {report}"
    );
    assert_eq!(report["devices"][0], "nvme0", "{report}");
    eprintln!(
        "{tag}: downtime {} ms, {} switchover retries, {device_dirty} device-dirtied pages",
        report["downtime_ms"], report["switchover_retries"]
    );

    let s = src.wait_output(Duration::from_secs(60));
    assert_eq!(last_json(&s)["outcome"], "migrated");
    run_on_then_finish(&dst, &dst_api);
    let d = dst.wait_output(Duration::from_secs(150));
    let summary = last_json(&d);
    let err = text(&d.stderr);
    assert_eq!(summary["outcome"], "exit", "{summary}\n{err}");
    assert_eq!(summary["status"], 0, "guest verification failed: {err}");
    assert_eq!(
        summary["incoming"]["memory_hash"], report["memory_hash"],
        "memory differs at switchover"
    );
    assert!(err.contains("re-aligned with"), "{err}");
    let designation = if extra.contains(&"device-buffer") {
        "copy = device buffer"
    } else {
        "copy = vCPU buffer"
    };
    assert!(err.contains(designation), "{err}");
    assert!(err.contains("without pausing the VM"), "{err}");
    // The guest sends no admin command while it migrates (unless it polls them), so the
    // destination's device was configured from the pre-copy state, outside the downtime.
    if !extra.contains(&"--nvme-admin-poll") {
        assert!(
            err.contains("configuration replayed during pre-copy"),
            "{err}"
        );
    }
    // After re-alignment the queues run direct: no shadowing, doorbell pages mapped again.
    let shadow = &summary["shadow"];
    assert_eq!(shadow["shadowed"], false, "{shadow}");
    assert_eq!(shadow["left"], 1, "{shadow}");
    let mapped: Vec<u64> = shadow["mapped_doorbell_pages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap())
        .collect();
    let dstrd0 = extra.windows(2).any(|w| w == ["--nvme-dstrd", "0"]);
    for qid in 1..=4u64 {
        // DSTRD 0 puts every doorbell on the admin page, which stays trapped (mediated).
        let page = if dstrd0 { 4096 } else { (1 + qid) * 4096 };
        assert_eq!(
            mapped.contains(&page),
            !dstrd0,
            "queue {qid}'s doorbell page {page:#x}: mapped pages {mapped:?}"
        );
    }
    summary
}

#[test]
fn migration_during_nvme_verify_passes_on_the_destination_with_identical_memory() {
    let _serial = serial();
    migrate_and_verify("poll", &[]);
}

#[test]
fn migration_in_trap_mode_passes() {
    let _serial = serial();
    migrate_and_verify("trap", &["--shadow-doorbells", "trap"]);
}

#[test]
fn migration_of_a_dstrd_0_device_passes() {
    let _serial = serial();
    migrate_and_verify("dstrd0", &["--nvme-dstrd", "0"]);
}

#[test]
fn migration_with_the_copy_as_device_buffer_passes() {
    let _serial = serial();
    // Up to 32 KiB per I/O: PRP lists, bounced on both sides.
    migrate_and_verify(
        "devbuf",
        &[
            "--shadow-designation",
            "device-buffer",
            "--nvme-io-max",
            "32K",
        ],
    );
}

#[test]
fn migration_with_the_copy_as_device_buffer_in_trap_mode_passes() {
    let _serial = serial();
    migrate_and_verify(
        "devbuf-trap",
        &[
            "--shadow-designation",
            "device-buffer",
            "--shadow-doorbells",
            "trap",
        ],
    );
}

#[test]
fn migration_with_interrupt_completions_passes_and_moves_the_msix_table() {
    let _serial = serial();
    let summary = migrate_and_verify(
        "irq",
        &["--nvme-interrupts", "--shadow-completions", "interrupt"],
    );
    // The guest programmed MSI-X on the source only: the destination's device and KVM routes
    // have it from the saved state, and the vectors the engine took are KVM's again.
    let routes = &summary["shadow"]["msix_routes"];
    for v in 1..=4u64 {
        assert!(
            routes.as_array().unwrap().iter().any(|r| r == v),
            "vector {v} not routed to the guest on the destination: {routes}"
        );
    }
    assert_eq!(summary["shadow"]["interrupts"], serde_json::json!([]));
}

#[test]
fn continuous_shadow_mode_with_interrupt_completions_runs_clean() {
    let _serial = serial();
    for doorbells in ["poll", "trap"] {
        let dir = TempDir::new(&format!("irq-{doorbells}"));
        let disk = dir.path("disk.img");
        let out = ferry()
            .arg("run")
            .args(VERIFY)
            .args(["--nvme-read-percent", "90", "--duration", "2s"])
            .args(["--nvme-interrupts", "--shadow", "continuous"])
            .args(["--shadow-completions", "interrupt"])
            .args(["--shadow-doorbells", doorbells, "--nvme-backing"])
            .arg(&disk)
            .args(["--timeout", "120s", "--json"])
            .output()
            .unwrap();
        let summary = last_json(&out);
        assert_eq!(summary["status"], 0, "{doorbells}: {}", text(&out.stderr));
        let shadow = &summary["shadow"];
        assert_eq!(shadow["shadowed"], true, "{shadow}");
        // Every CQ's vector was taken from KVM: the engine got the device's interrupts and
        // sent the guest its own after forwarding.
        let irqs = shadow["interrupts"].as_array().unwrap();
        assert_eq!(irqs.len(), 4, "{shadow}");
        for v in irqs {
            assert!(v["received"].as_u64().unwrap() > 0, "{doorbells}: {v}");
            assert!(v["injected"].as_u64().unwrap() > 0, "{doorbells}: {v}");
            let vector = v["vector"].as_u64().unwrap();
            assert!(
                !shadow["msix_routes"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|r| r.as_u64() == Some(vector)),
                "vector {vector} still routed by KVM while taken: {shadow}"
            );
        }
    }
}

#[test]
fn migration_while_the_guest_polls_admin_commands_passes() {
    let _serial = serial();
    // An Identify about every millisecond: the switchover waits for a moment with none
    // pending (the device state carries queue positions, not half-done commands), and the
    // Identify data the device writes joins the dirty pages like I/O data does.
    let summary = migrate_and_verify("admin", &["--nvme-admin-poll"]);
    let polled = summary["config_log"]["admin_submitted"].as_u64().unwrap();
    assert!(polled > 100, "the guest sent {polled} admin commands");
}

#[test]
fn a_to_b_to_a_keeps_verifying() {
    let _serial = serial();
    let dir = TempDir::new("aba");
    let disk = dir.path("disk.img");
    let (src, api) = source(&dir, &disk, &[]);
    let b_api = dir.path("b.sock");
    let (b, b_addr) = destination_with(Some(&disk), &["--api-socket", b_api.to_str().unwrap()]);
    warm_up(&api);
    let out = migrate(&api, &b_addr, &[]);
    assert!(out.status.success(), "A→B: {}", text(&out.stderr));
    assert_eq!(
        last_json(&src.wait_output(Duration::from_secs(60)))["outcome"],
        "migrated"
    );
    let a2_api = dir.path("a2.sock");
    let (a2, a2_addr) = destination_with(Some(&disk), &["--api-socket", a2_api.to_str().unwrap()]);
    wait_for_socket(&b_api);
    let out = migrate(&b_api, &a2_addr, &[]);
    assert!(out.status.success(), "B→A: {}", text(&out.stderr));
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        last_json(&b.wait_output(Duration::from_secs(60)))["outcome"],
        "migrated"
    );
    run_on_then_finish(&a2, &a2_api);
    let d = a2.wait_output(Duration::from_secs(150));
    let summary = last_json(&d);
    assert_eq!(summary["status"], 0, "{summary}\n{}", text(&d.stderr));
    assert_eq!(summary["incoming"]["memory_hash"], report["memory_hash"]);
}

/// `dirty` next to nvme-verify: the vCPU writes a 16 MiB ledger (KVM sees it) while the device
/// writes the guest's read buffers (KVM does not).
const WITH_DIRTY: [&str; 4] = ["--with-dirty", "16M", "--rate", "50000"];

/// Asks the guest behind `api` to verify its ledger; returns the answer's data.
fn verify_ledger(api: &Path) -> Value {
    let v = common::api(api, serde_json::json!({"cmd": "verify"}));
    assert_eq!(v["ok"], true, "{v}");
    v["data"].clone()
}

/// Starts nvme-verify with `dirty` (until told to finish), checks the ledger on the source while
/// the I/O runs, migrates the VM to a destination serving the API on the returned socket, and
/// checks that both kinds of dirty pages were sent. Returns the destination, its API socket
/// and the source's verification.
fn migrate_with_dirty(dir: &TempDir) -> (Proc, PathBuf, Value) {
    let disk = dir.path("disk.img");
    let (src, api) = source(dir, &disk, &WITH_DIRTY);
    let dst_api = dir.path("dst.sock");
    let (dst, addr) = destination_with(Some(&disk), &["--api-socket", dst_api.to_str().unwrap()]);
    warm_up(&api);
    let before = verify_ledger(&api);
    assert_eq!(before["status"], 0, "ledger broken on the source: {before}");
    assert_eq!(before["pages"], 4096, "{before}");
    let out = migrate(&api, &addr, &[]);
    assert!(out.status.success(), "migrate: {}", text(&out.stderr));
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    let sum = |key: &str| -> u64 {
        report["rounds"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r[key].as_u64().unwrap_or(0))
            .sum()
    };
    assert!(sum("dirty_device") > 0, "no device-dirtied pages: {report}");
    assert!(sum("dirty_kvm") > 0, "no KVM-dirtied pages: {report}");
    assert_eq!(
        last_json(&src.wait_output(Duration::from_secs(60)))["outcome"],
        "migrated"
    );
    wait_for_socket(&dst_api);
    (dst, dst_api, before)
}

#[test]
fn nvme_verify_with_dirty_migrates_and_both_verify_on_the_destination() {
    let _serial = serial();
    let dir = TempDir::new("withdirty");
    let (dst, dst_api, before) = migrate_with_dirty(&dir);
    // The ledger holds on the destination while nvme-verify goes on, and the guest kept
    // writing it there.
    let after = verify_ledger(&dst_api);
    assert_eq!(
        after["status"], 0,
        "ledger broken on the destination: {after}"
    );
    assert_eq!(after["pages"], 4096, "{after}");
    assert!(
        after["writes"].as_u64() > before["writes"].as_u64(),
        "no ledger writes since the source's verification: {before} then {after}"
    );
    // The guest's own end: every I/O read back and the ledger verified once more.
    run_on_then_finish(&dst, &dst_api);
    let d = dst.wait_output(Duration::from_secs(150));
    let summary = last_json(&d);
    assert_eq!(summary["outcome"], "exit", "{summary}\n{}", text(&d.stderr));
    assert_eq!(
        summary["status"],
        0,
        "nvme-verify or the ledger failed: {}",
        text(&d.stderr)
    );
    assert_eq!(summary["shadow"]["shadowed"], false, "{summary}");
    let v = summary["verifications"].as_array().unwrap();
    assert!(
        !v.is_empty() && v.iter().all(|x| x["status"] == 0),
        "{summary}"
    );
}

/// Offset in the guest RAM file of the ledger header of a `data_pages` working set.
fn find_ledger(ram: &std::fs::File, data_pages: u64) -> Option<u64> {
    use std::os::unix::fs::FileExt;
    let len = ram.metadata().unwrap().len();
    // The work area starts at 16 MiB (guest_abi::layout::WORK_BASE); the header is a page
    // that starts with the magic and the number of data pages.
    (0x100_0000..len).step_by(4096).find(|&off| {
        let mut w = [0u8; 16];
        ram.read_exact_at(&mut w, off).is_ok()
            && &w[..8] == b"LEDGER01"
            && u64::from_le_bytes(w[8..].try_into().unwrap()) == data_pages
    })
}

/// Breaks the ledger of the `dirty` working set in the VM of process `pid` from outside, as a
/// lost or stale page would: the ledger entry of data page 0 gets 2^32 added, through the
/// process's guest RAM memfd.
fn break_ledger(pid: u32, data_pages: u64) {
    use std::os::unix::fs::FileExt;
    let ram_link = format!("/memfd:{}", vmm::memory::MEMFD_NAME.to_string_lossy());
    for fd in std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap() {
        let fd = fd.unwrap().path();
        let is_ram =
            std::fs::read_link(&fd).is_ok_and(|t| t.to_string_lossy().starts_with(&ram_link));
        if !is_ram {
            continue;
        }
        let ram = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&fd)
            .unwrap();
        if let Some(header) = find_ledger(&ram, data_pages) {
            let entry = header + 4096;
            let mut w = [0u8; 8];
            ram.read_exact_at(&mut w, entry).unwrap();
            let broken = u64::from_le_bytes(w) + (1 << 32);
            ram.write_all_at(&broken.to_le_bytes(), entry).unwrap();
            return;
        }
    }
    panic!("no ledger of {data_pages} pages in the guest RAM of process {pid}");
}

#[test]
fn a_broken_ledger_on_the_destination_fails_its_verification() {
    let _serial = serial();
    let dir = TempDir::new("brokenledger");
    let (dst, dst_api, _) = migrate_with_dirty(&dir);
    let ok = verify_ledger(&dst_api);
    assert_eq!(ok["status"], 0, "{ok}");
    break_ledger(dst.0.as_ref().unwrap().id(), 4096);
    // LEDGER_PAGE_MISMATCH, or LEDGER_TOTAL_MISMATCH if the guest rewrote page 0 meanwhile.
    let broken = verify_ledger(&dst_api);
    let status = broken["status"].as_u64().unwrap();
    assert!(
        [10, 12].contains(&status),
        "the break went unnoticed: {broken}"
    );
    // The guest stops at the failed verification and exits with its status: what the demo and
    // the test above check for would fail.
    let d = dst.wait_output(Duration::from_secs(60));
    let summary = last_json(&d);
    assert_eq!(summary["outcome"], "exit", "{summary}");
    assert_eq!(summary["status"].as_u64(), Some(status), "{summary}");
}

#[test]
fn killing_the_destination_device_process_leaves_the_source_verifying() {
    let _serial = serial();
    let dir = TempDir::new("devkill");
    let disk = dir.path("disk.img");
    let (src, api) = source(&dir, &disk, &[]);
    let sock = dir.path("dst-dev.sock");
    let mut dev = Proc(
        Some(
            ferry()
                .args(["device", "nvme", "--size", "64M", "--socket"])
                .arg(&sock)
                .arg("--backing")
                .arg(&disk)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
        ),
        None,
    );
    wait_for_path(&sock);
    let pt = format!("nvme={}", sock.display());
    let (dst, addr) = destination_with(None, &["--passthrough", &pt]);
    warm_up(&api);
    dev.kill();
    let out = migrate(&api, &addr, &[]);
    assert!(!out.status.success(), "the migration should fail");
    let d = dst.wait_output(Duration::from_secs(60));
    assert_ne!(d.status.code(), Some(0), "no VM may run on the destination");
    // The VM runs on here and verifies when told to finish.
    src.finish();
    let s = src.wait_output(Duration::from_secs(150));
    let summary = last_json(&s);
    assert_eq!(summary["status"], 0, "{summary}\n{}", text(&s.stderr));
    assert_eq!(summary["shadow"]["shadowed"], false, "{summary}");
    assert_eq!(summary["shadow"]["left"], 1, "{summary}");
}

#[test]
fn negative_control_without_shadowing_is_detected() {
    let _serial = serial();
    let dir = TempDir::new("unsafe");
    let disk = dir.path("disk.img");
    // Data on the disk first; then a guest that only reads it (adopting it): every byte that
    // lands in its buffers is written by the device alone, which KVM's dirty log never sees.
    let fill = ferry()
        .arg("run")
        .args(VERIFY)
        .args([
            "--nvme-read-percent",
            "0",
            "--nvme-ios",
            "8000",
            "--nvme-backing",
        ])
        .arg(&disk)
        .args(["--timeout", "120s", "--json"])
        .output()
        .unwrap();
    assert_eq!(last_json(&fill)["status"], 0, "{}", text(&fill.stderr));
    // The unsafe migration is corrupt when the device writes a page after its last copy. The
    // guest's RAM is mostly zero, so an uncapped round 0 takes a millisecond or two and a guest
    // that happens not to run then (two cores, several busy threads) gives the device nothing
    // to write; a capped rate stretches pre-copy to about half a second of I/O. Three attempts
    // make a miss on every one vanishingly rare, and one detection is enough to show the
    // mechanism is what makes the safe migration correct.
    let mut seen = Vec::new();
    for attempt in 0..3 {
        let (src, api) = source(&dir, &disk, &["--nvme-read-percent", "100", "--nvme-adopt"]);
        let (dst, addr) = destination(Some(&disk));
        warm_up(&api);
        let out = migrate(
            &api,
            &addr,
            &["--unsafe-no-shadow", "--max-bandwidth", "2M"],
        );
        assert!(out.status.success(), "migrate: {}", text(&out.stderr));
        let report: Value = serde_json::from_slice(&out.stdout).unwrap();
        let _ = src.wait_output(Duration::from_secs(60));
        // The guest reads back and checks everything (unless it failed already).
        dst.finish();
        let d = dst.wait_output(Duration::from_secs(150));
        let summary = last_json(&d);
        let corrupt_memory = summary["incoming"]["memory_hash"] != report["memory_hash"];
        let guest_failed = summary["outcome"] != "exit" || summary["status"] != 0;
        eprintln!(
            "negative control, attempt {attempt}: memory hash {} at pause vs {} at resume; \
             destination guest: {}",
            report["memory_hash"], summary["incoming"]["memory_hash"], summary["detail"]
        );
        if corrupt_memory || guest_failed {
            return;
        }
        seen.push(summary);
    }
    panic!("the unsafe migration went unnoticed three times: {seen:?}");
}

#[test]
fn killing_the_destination_during_the_migration_leaves_the_source_verifying() {
    let _serial = serial();
    let dir = TempDir::new("kill");
    let disk = dir.path("disk.img");
    let (src, api) = source(&dir, &disk, &[]);
    let (dst, addr) = destination(Some(&disk));
    warm_up(&api);
    // Kill the destination when the first Memory frame of round 0 arrives: mid round 0,
    // whatever the machine's speed.
    let mut dst = dst;
    let fault = Fault {
        at: Position::round0(1),
        action: Action::Hold,
    };
    let proxy = FaultProxy::start(addr.as_str(), Some(fault)).unwrap();
    let to = proxy.addr().to_string();
    let api2 = api.clone();
    let migration = std::thread::spawn(move || migrate(&api2, &to, &["--streams", "0"]));
    assert!(proxy.wait_held(PATIENCE).is_some(), "round 0 never began");
    dst.kill();
    proxy.release(Verdict::Forward);
    let out = migration.join().unwrap();
    assert!(!out.status.success(), "migration should fail");
    // The VM runs on here and verifies when told to finish.
    src.finish();
    let s = src.wait_output(Duration::from_secs(150));
    let summary = last_json(&s);
    assert_eq!(summary["outcome"], "exit", "{summary}");
    assert_eq!(
        summary["status"],
        0,
        "guest verification failed: {}",
        text(&s.stderr)
    );
    assert!(!summary["failed_migrations"].as_array().unwrap().is_empty());
    // Rolled back: shadow mode left (if the migration got as far as entering it).
    assert_eq!(summary["shadow"]["shadowed"], false, "{summary}");
    assert_eq!(
        summary["shadow"]["left"], summary["shadow"]["entered"],
        "{summary}"
    );
}

/// Both designations: the hypervisor's copy as the vCPU buffer and as the device buffer.
const DESIGNATIONS: [&str; 2] = ["vcpu-buffer", "device-buffer"];

#[test]
fn continuous_shadow_mode_runs_nvme_verify_clean() {
    let _serial = serial();
    for designation in DESIGNATIONS {
        continuous_shadow_mode(designation);
    }
}

/// nvme-verify for 3 s (4–64 KiB I/Os), shadowed all along with `designation`: the guest's
/// verification passes, every I/O went through the engine and PRP lists reached the device as
/// the engine's copies. With the copy as the device buffer a device still
/// reaching the guest's rings would post every completion twice (once itself, once through
/// the engine), which the guest's command-id tags catch.
fn continuous_shadow_mode(designation: &str) {
    let dir = TempDir::new(&format!("continuous-{designation}"));
    let disk = dir.path("disk.img");
    let out = ferry()
        .arg("run")
        .args(VERIFY)
        .args(["--nvme-read-percent", "90"])
        .args([
            "--duration",
            "3s",
            "--shadow",
            "continuous",
            "--shadow-designation",
            designation,
            "--nvme-io-max",
            "64K",
            "--nvme-backing",
        ])
        .arg(&disk)
        .args(["--timeout", "120s", "--json"])
        .output()
        .unwrap();
    let summary = last_json(&out);
    assert_eq!(summary["status"], 0, "{designation}: {}", text(&out.stderr));
    let shadow = &summary["shadow"];
    assert_eq!(shadow["shadowed"], true, "{shadow}");
    assert_eq!(shadow["designation"], designation, "{shadow}");
    assert!(
        !shadow["remapped"].as_array().unwrap().is_empty(),
        "{shadow}"
    );
    let forwarded: u64 = shadow["queues"]
        .as_array()
        .unwrap()
        .iter()
        .map(|q| q["state"]["stats"]["forwarded"].as_u64().unwrap())
        .sum();
    assert!(forwarded > 0, "{shadow}");
    // I/Os of more than two pages carry PRP lists: the device read validated copies.
    let bounced: u64 = shadow["queues"]
        .as_array()
        .unwrap()
        .iter()
        .map(|q| q["state"]["stats"]["bounced"].as_u64().unwrap())
        .sum();
    assert!(bounced > 0, "{shadow}");
    // The stand-in device speaks the wake protocol: the poller sleeps on its completion
    // kick while commands are in flight, and the device's kicks end such sleeps.
    let poller = &shadow["poller"];
    assert!(poller["sleeps"].as_u64().unwrap() > 0, "{shadow}");
    assert!(poller["woken"].as_u64().unwrap() > 0, "{shadow}");
}

/// Continuous shadow mode with the whole VM process (vCPU, poller) and its device process
/// pinned to one CPU: the poller and the device hand the core to each other by `sched_yield`
/// (both see a one-CPU affinity), the guest's verification passes, and the device still goes
/// to sleep when it has nothing to do (a real SSD uses no host CPU).
#[test]
fn continuous_shadow_mode_pinned_to_one_core_hands_over_by_yield_and_verifies() {
    use std::os::unix::process::CommandExt;
    let _serial = serial();
    let dir = TempDir::new("continuous-pinned");
    let disk = dir.path("disk.img");
    // The first CPU this test may run on.
    // SAFETY: a zeroed cpu_set_t is a valid empty set; the call fills it for this thread.
    let cpu = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        assert_eq!(
            libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set),
            0
        );
        (0..libc::CPU_SETSIZE as usize)
            .find(|&c| libc::CPU_ISSET(c, &set))
            .unwrap()
    };
    let mut cmd = ferry();
    cmd.arg("run")
        .args(VERIFY)
        .args(["--nvme-read-percent", "90"])
        .args([
            "--duration",
            "2s",
            "--shadow",
            "continuous",
            "--nvme-backing",
        ])
        .arg(&disk)
        .args(["--timeout", "120s", "--json"]);
    // SAFETY: between fork and exec only sched_setaffinity (async-signal-safe) runs, on a set
    // built before the fork.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        cmd.pre_exec(move || {
            if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let out = cmd.output().unwrap();
    let summary = last_json(&out);
    let stderr = text(&out.stderr);
    assert_eq!(summary["status"], 0, "{stderr}");
    let shadow = &summary["shadow"];
    assert_eq!(shadow["shadowed"], true, "{shadow}");
    assert!(
        shadow["poller"]["yields"].as_u64().unwrap() > 0,
        "the pinned poller never yielded: {shadow}"
    );
    // The device process prints its counters when its client goes.
    let stats: Value = stderr
        .lines()
        .rev()
        .filter_map(|l| l.split_once("ferry device nvme: stats "))
        .find_map(|(_, j)| serde_json::from_str(j).ok())
        .unwrap_or_else(|| panic!("no device stats: {stderr}"));
    assert!(stats["reads"].as_u64().unwrap() > 0, "{stats}");
    assert!(
        stats["poll_yields"].as_u64().unwrap() > 0,
        "the pinned device never yielded: {stats}"
    );
    assert!(
        stats["poll_sleeps"].as_u64().unwrap() > 0,
        "the device never slept: {stats}"
    );
}

#[test]
fn garbage_in_shadowed_rings_gets_errors_and_everything_stays_up() {
    let _serial = serial();
    for designation in DESIGNATIONS {
        garbage_in_shadowed_rings(designation);
    }
}

/// nvme-malformed under continuous shadowing with `designation`: every hostile entry is
/// refused by the hypervisor (a device reading the guest's ring itself would answer with its
/// own statuses or act on them).
fn garbage_in_shadowed_rings(designation: &str) {
    let dir = TempDir::new(&format!("malformed-{designation}"));
    let disk = dir.path("disk.img");
    // `--duration` holds the malformed commands back until continuous shadowing has begun.
    let out = ferry()
        .args(["run", "--workload", "nvme-malformed", "--duration", "1s"])
        .args([
            "--shadow",
            "continuous",
            "--shadow-designation",
            designation,
            "--serial",
            "stdout",
            "--nvme-backing",
        ])
        .arg(&disk)
        .args(["--timeout", "60s", "--json"])
        .output()
        .unwrap();
    let stdout = text(&out.stdout);
    for what in [
        "unaligned PRP1: rejected (sct 0 sc 0x13)",
        "outside guest RAM: rejected (sct 0 sc 0x04)",
        "PRP list outside guest RAM: rejected (sct 0 sc 0x04)",
        "PRP list entry with an offset: rejected (sct 0 sc 0x13)",
        "unknown I/O opcode: rejected (sct 0 sc 0x01)",
        "read with an SGL: rejected (sct 0 sc 0x02)",
        "read from namespace 5: rejected (sct 0 sc 0x0b)",
        "identify into the hypervisor's bounce area: rejected (sct 0 sc 0x04)",
        "unknown admin opcode: rejected (sct 0 sc 0x01)",
        "all 16 malformed commands rejected with the right status; the device still works",
    ] {
        assert!(
            stdout.contains(what),
            "{designation}: missing {what:?} in {stdout}"
        );
    }
    let summary = last_json(&out);
    assert_eq!(summary["status"], 0, "{summary}");
    let q = &summary["shadow"]["queues"][0]["state"]["stats"];
    assert_eq!(summary["shadow"]["shadowed"], true, "{summary}");
    assert_eq!(summary["shadow"]["designation"], designation, "{summary}");
    // The hypervisor refused the hostile entries itself; the good commands went through.
    assert!(q["refused"].as_u64().unwrap() >= 7, "{q}");
    assert!(q["forwarded"].as_u64().unwrap() >= 2, "{q}");
    // Its admin commands too: the one aimed at the bounce area, the one outside guest RAM
    // and the unknown opcode never reached the device as the guest wrote them.
    let refused = summary["shadow"]["admin_refused"].as_u64();
    assert!(refused.is_some_and(|n| n >= 3), "{summary}");
}

#[test]
fn cutting_the_socket_mid_migration_leaves_the_source_verifying() {
    let _serial = serial();
    let dir = TempDir::new("cut");
    let disk = dir.path("disk.img");
    let (src, api) = source(&dir, &disk, &[]);
    let (dst, addr) = destination(Some(&disk));
    warm_up(&api);
    let proxy = FaultProxy::start(
        addr.as_str(),
        Some(Fault {
            at: Position::round0(1),
            action: Action::Cut,
        }),
    )
    .unwrap();
    let out = migrate(&api, &proxy.addr().to_string(), &["--streams", "0"]);
    assert!(proxy.reached(), "round 0 never began");
    assert!(!out.status.success(), "the migration should fail");
    let d = dst.wait_output(Duration::from_secs(60));
    assert_ne!(d.status.code(), Some(0), "no VM may run on the destination");
    // The VM runs on here and verifies when told to finish.
    src.finish();
    let s = src.wait_output(Duration::from_secs(150));
    let summary = last_json(&s);
    assert_eq!(summary["status"], 0, "{summary}\n{}", text(&s.stderr));
    assert_eq!(summary["shadow"]["shadowed"], false, "{summary}");
    assert_eq!(summary["shadow"]["left"], 1, "{summary}");
}

#[test]
fn bench_shadow_reports_ratios_and_migration_times() {
    let _serial = serial();
    let out = ferry()
        .args([
            "bench",
            "shadow",
            "--qd",
            "1",
            "--seconds",
            "2",
            "--migrations",
            "1",
            "--net-runs",
            "1",
            "--json",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let r: Value = serde_json::from_slice(&out.stdout).unwrap();
    // The virtio-net rows: packets per second direct, poll, trap, as ratios to direct.
    let net = r["net"].as_array().unwrap();
    let modes: Vec<&str> = net.iter().map(|x| x["mode"].as_str().unwrap()).collect();
    assert_eq!(modes, ["direct", "poll", "trap"], "{r}");
    for row in net {
        assert!(row["packets_per_s"].as_f64().unwrap() > 0.0, "{row}");
        assert!(row["ratio"].as_f64().unwrap() > 0.0, "{row}");
        assert_eq!(row["runs"], 1, "{row}");
    }
    assert_eq!(net[0]["ratio"], 1.0, "{r}");
    let modes: Vec<&str> = r["iops"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["mode"].as_str().unwrap())
        .collect();
    assert_eq!(
        modes,
        [
            "direct",
            "poll",
            "trap",
            "poll-device-buffer",
            "trap-interrupt"
        ],
        "{r}"
    );
    for row in r["iops"].as_array().unwrap() {
        assert!(row["iops"].as_f64().unwrap() > 0.0, "{row}");
        assert!(row["ratio"].as_f64().unwrap() > 0.0, "{row}");
    }
    let m = r["migration"].as_array().unwrap();
    assert_eq!(m.len(), 2, "{r}");
    assert!(m[1]["device_dirty_pages"].as_u64().unwrap() > 0, "{r}");
    let ratios = &r["with_device_vs_without"];
    assert!(ratios["downtime"].as_f64().unwrap() > 0.0, "{r}");
    assert!(ratios["total"].as_f64().unwrap() > 0.0, "{r}");
    for row in m {
        assert!(row["downtime_ms"].as_f64().unwrap() > 0.0, "{row}");
    }
}

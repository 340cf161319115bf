//! End-to-end tests: the real `ferry` binary, the real built-in guest, the real /dev/kvm.
use std::{
    io::{BufRead, BufReader},
    process::{Command, Output, Stdio},
    time::{Duration, Instant},
};

fn ferry() -> Command {
    Command::new(env!("CARGO_BIN_EXE_ferry"))
}

fn run(args: &[&str]) -> Output {
    let out = ferry().args(args).output().expect("start ferry");
    out
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn json_tail(out: &Output) -> serde_json::Value {
    let stdout = text(&out.stdout);
    let last = stdout.lines().last().expect("some stdout");
    serde_json::from_str(last).unwrap_or_else(|e| panic!("last line is not JSON ({e}): {last}"))
}

#[test]
fn hello_prints_enumerates_pci_and_exits_zero() {
    let out = run(&["run", "--workload", "hello"]);
    let stdout = text(&out.stdout);
    assert!(
        out.status.success(),
        "stdout: {stdout}\nstderr: {}",
        text(&out.stderr)
    );
    assert!(
        stdout.contains("Hello from the Ferry guest (ring 3)"),
        "{stdout}"
    );
    assert!(stdout.contains("memory: 256 MiB"), "{stdout}");
    assert!(
        stdout.contains("pci 00:00.0 8086:0d57 class 060000"),
        "{stdout}"
    );
    assert!(stdout.contains("hello: done"), "{stdout}");
}

#[test]
fn dirty_verifies_its_ledger() {
    let out = run(&[
        "run",
        "--workload",
        "dirty",
        "--memory",
        "128M",
        "--working-set",
        "16M",
        "--duration",
        "1s",
        "--verify-after",
        "300ms",
        "--json",
    ]);
    let stdout = text(&out.stdout);
    assert!(
        out.status.success(),
        "stdout: {stdout}\nstderr: {}",
        text(&out.stderr)
    );
    assert!(
        stdout.contains("dirty: ledger verified: OK (4096 pages"),
        "{stdout}"
    );
    let report = json_tail(&out);
    assert_eq!(report["outcome"], "exit");
    assert_eq!(report["verifications"][0]["status"], 0, "{report}");
    assert_eq!(report["verifications"][0]["pages"], 4096);
    assert!(report["progress"].as_u64().unwrap() > 4096, "{report}");
}

#[test]
fn rate_limited_dirty_keeps_to_its_rate() {
    // 2000 pages/s for 1 s: the ledger must count at most about 2000 writes, not millions. The
    // lower bound is only "it ran": on a loaded machine the vCPU may get a fraction of the second.
    let out = run(&[
        "run",
        "--workload",
        "dirty",
        "--working-set",
        "4M",
        "--rate",
        "2000",
        "--duration",
        "1s",
        "--json",
    ]);
    assert!(out.status.success(), "stderr: {}", text(&out.stderr));
    let writes = json_tail(&out)["progress"].as_u64().unwrap();
    assert!(
        (1..=4000).contains(&writes),
        "{writes} writes at 2000/s for 1 s"
    );
}

#[test]
fn unknown_ports_and_unbacked_mmio_do_not_crash_the_vmm() {
    let out = run(&["run", "--workload", "probe", "--json"]);
    let stdout = text(&out.stdout);
    assert!(
        out.status.success(),
        "stdout: {stdout}\nstderr: {}",
        text(&out.stderr)
    );
    assert!(
        stdout.contains("probe: mmio read 0xd0000000 -> 0xffffffff"),
        "{stdout}"
    );
    assert!(
        stdout.contains("probe: mmio write 0xd0000000 survived"),
        "{stdout}"
    );
    assert!(
        stdout.contains("probe: port 0x2f0 -> 0xff / 0xffffffff"),
        "{stdout}"
    );
    assert!(
        stdout.contains("probe: pci 00:1f.0 id -> 0xffffffff"),
        "{stdout}"
    );
    let report = json_tail(&out);
    assert!(report["unhandled_mmio"].as_u64().unwrap() >= 2);
    assert!(report["unhandled_pio"].as_u64().unwrap() >= 3);
}

#[test]
fn a_faulting_guest_is_reported_and_the_vmm_exits_cleanly() {
    let out = run(&["run", "--workload", "crash"]);
    assert_eq!(out.status.code(), Some(70), "stderr: {}", text(&out.stderr));
    let stderr = text(&out.stderr);
    assert!(stderr.contains("guest crashed: triple fault"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn state_saved_and_restored_into_a_fresh_vm_continues_correctly() {
    let out = run(&[
        "run",
        "--workload",
        "dirty",
        "--working-set",
        "32M",
        "--duration",
        "2s",
        "--state-roundtrip-after",
        "700ms",
        "--json",
    ]);
    let stdout = text(&out.stdout);
    let stderr = text(&out.stderr);
    assert!(out.status.success(), "stdout: {stdout}\nstderr: {stderr}");
    assert!(stderr.contains("VM state round trip"), "{stderr}");
    assert!(
        stdout.contains("dirty: ledger verified: OK (8192 pages"),
        "{stdout}"
    );
    let report = json_tail(&out);
    let before = report["roundtrip"]["progress_at_pause"]
        .as_u64()
        .expect("a round trip happened");
    assert!(before > 0);
    assert!(
        report["progress"].as_u64().unwrap() > before,
        "the restored guest kept working: {report}"
    );
}

#[test]
fn signals_verify_on_request_and_stop_cleanly() {
    let mut child = ferry()
        .args([
            "run",
            "--workload",
            "dirty",
            "--working-set",
            "8M",
            "--report-interval",
            "200ms",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id() as i32;
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let deadline = Instant::now() + Duration::from_secs(30);
    // wait for the first progress line, then ask for a verification
    loop {
        let l = lines.next().expect("guest output").unwrap();
        if l.contains("writes (") {
            break;
        }
        assert!(Instant::now() < deadline);
    }
    // SAFETY: sending a signal to our own child process.
    unsafe { libc::kill(pid, libc::SIGUSR1) };
    loop {
        let l = lines.next().expect("guest output").unwrap();
        if l.contains("ledger verified: OK") {
            break;
        }
        assert!(Instant::now() < deadline, "no verification after SIGUSR1");
    }
    // SAFETY: as above.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(128 + libc::SIGTERM));
    let stderr = text(&out.stderr);
    assert!(stderr.contains("SIGTERM received"), "{stderr}");
}

#[test]
fn timeout_stops_a_guest_that_runs_forever() {
    let out = run(&[
        "run",
        "--workload",
        "dirty",
        "--working-set",
        "4M",
        "--timeout",
        "500ms",
        "--serial",
        "off",
    ]);
    assert_eq!(
        out.status.code(),
        Some(124),
        "stderr: {}",
        text(&out.stderr)
    );
}

#[test]
fn guest_from_a_file_and_bad_images_or_options_give_clear_errors() {
    let dir = std::env::temp_dir().join(format!("ferry-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let good = dir.join("guest.elf");
    std::fs::write(&good, guest_image::GUEST_ELF).unwrap();
    let out = run(&[
        "run",
        "--guest",
        good.to_str().unwrap(),
        "--workload",
        "hello",
    ]);
    assert!(out.status.success(), "stderr: {}", text(&out.stderr));

    let bad = dir.join("garbage.elf");
    std::fs::write(&bad, b"\x7fELF but not really").unwrap();
    let out = run(&["run", "--guest", bad.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("invalid guest image"),
        "{}",
        text(&out.stderr)
    );

    let out = run(&["run", "--guest", dir.join("missing").to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("reading guest image"),
        "{}",
        text(&out.stderr)
    );

    let out = run(&["run", "--memory", "10M"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("smaller than the 32 MiB minimum"),
        "{}",
        text(&out.stderr)
    );

    let out = run(&["run", "--memory", "lots"]);
    assert_eq!(out.status.code(), Some(2), "clap usage error");

    let out = run(&["run", "--workload", "dirty", "--with-dirty", "16M"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("it needs --workload nvme-verify"),
        "{}",
        text(&out.stderr)
    );
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn console_to_a_file() {
    let path = std::env::temp_dir().join(format!("ferry-console-{}.log", std::process::id()));
    let out = run(&[
        "run",
        "--workload",
        "hello",
        "--serial",
        path.to_str().unwrap(),
    ]);
    assert!(out.status.success());
    let log = std::fs::read_to_string(&path).unwrap();
    assert!(log.contains("hello: done"), "{log}");
    assert!(!text(&out.stdout).contains("hello: done"));
    std::fs::remove_file(&path).ok();
}

#[test]
fn demo_passes() {
    let out = run(&["demo", "--duration", "3s", "--json"]);
    assert!(
        out.status.success(),
        "stdout: {}\nstderr: {}",
        text(&out.stdout),
        text(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["pass"], true);
    assert_eq!(report["source"]["verifications"][0]["status"], 0);
    assert_eq!(report["source"]["outcome"], "migrated");
    assert_eq!(report["destination"]["outcome"], "exit");
    assert_eq!(
        report["destination"]["status"], 0,
        "the guest's own final verification held"
    );
    // The NVMe phase: nvme-verify and dirty in one VM, migrated with I/O in flight; the device's
    // pages came through the shadow engine, the vCPU's through KVM's dirty log, and on the
    // destination the ledger held on request and the guest's final checks of both passed.
    let nvme = &report["nvme"];
    let rounds = nvme["migration"]["rounds"].as_array().unwrap();
    for key in ["dirty_device", "dirty_kvm"] {
        let pages: u64 = rounds.iter().map(|r| r[key].as_u64().unwrap()).sum();
        assert!(pages > 0, "no {key} pages: {nvme}");
    }
    let dest = &nvme["destination"];
    assert_eq!(dest["status"], 0, "{dest}");
    let v = dest["verifications"].as_array().unwrap();
    assert!(
        !v.is_empty(),
        "no ledger verification on the destination: {dest}"
    );
    for x in v {
        assert_eq!(x["status"], 0, "{dest}");
        assert_eq!(x["pages"], 4096, "{dest}");
    }
    // The RDMA phase: two host processes, a VM on each, connected through both multiplexers.
    assert_eq!(report["vrdma"]["pass"], true, "{}", report["vrdma"]);
    for host in report["vrdma"]["hosts"].as_array().unwrap() {
        assert!(
            host["host"]["mux"]["delivered"].as_u64().unwrap() >= 3,
            "{host}"
        );
        assert_eq!(host["host"]["mux"]["no_owner"], 0, "{host}");
    }
    let hash = report["migration"]["memory_hash"].as_str().unwrap();
    assert_eq!(
        report["destination"]["incoming"]["memory_hash"].as_str(),
        Some(hash)
    );
}

#[test]
fn bench_boot_reports_times_and_a_speed_ratio() {
    let out = run(&[
        "bench",
        "boot",
        "--boots",
        "2",
        "--iterations",
        "10000000",
        "--reps",
        "1",
        "--json",
    ]);
    assert!(out.status.success(), "stderr: {}", text(&out.stderr));
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(r["first_instruction_ms"]["median"].as_f64().unwrap() > 0.0);
    assert!(
        r["exit_ms"]["median"].as_f64().unwrap()
            >= r["first_instruction_ms"]["median"].as_f64().unwrap()
    );
    assert!(r["guest_speed_vs_native"].as_f64().unwrap() > 0.0);
}

#[test]
fn bench_migrate_measures_the_floor_and_each_sides_whole_memory() {
    let out = run(&[
        "bench",
        "migrate",
        "--sizes",
        "128M",
        "--loads",
        "idle",
        "--transports",
        "plain",
        "--runs",
        "1",
        "--capped",
        "none",
        "--json",
    ]);
    assert!(out.status.success(), "stderr: {}", text(&out.stderr));
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let row = &r["rows"][0];
    assert_eq!(row["ledger_ok_on_destination"], true, "{row}");
    assert!(row["floor_mbps"]["median"].as_f64().unwrap() > 0.0, "{row}");
    assert!(row["vs_floor"]["median"].as_f64().unwrap() > 0.0, "{row}");
    assert!(row["streams"].as_u64().unwrap() >= 1, "{row}");
    // The destination's receivers write the pages into the guest memfd without mapping
    // them: its peak must still count every one of them (an idle guest's pages are each
    // sent once), and stay within the budget of guest RAM + 64 MiB on both sides.
    let pages = row["guest_page_mib"].as_f64().unwrap();
    assert!(pages > 0.0, "{row}");
    assert!(
        row["peak_dst_mib"]["min"].as_f64().unwrap() >= pages,
        "{row}"
    );
    for side in ["peak_src_vs_budget", "peak_dst_vs_budget"] {
        let v = row[side]["max"].as_f64().unwrap();
        assert!(v > 0.0 && v <= 1.0, "{side} {v}: {row}");
    }
}

#[test]
fn bench_platform_reports_exit_and_hand_off_costs() {
    let out = run(&[
        "bench",
        "platform",
        "--exits",
        "1000",
        "--round-trips",
        "1000",
        "--json",
    ]);
    assert!(out.status.success(), "stderr: {}", text(&out.stderr));
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["exits"]["exits"], 1000, "{r}");
    assert_eq!(r["exits"]["ioeventfd_signals"], 1000, "{r}");
    assert!(r["exits"]["user_exit_us"].as_f64().unwrap() > 0.0, "{r}");
    assert!(r["ioeventfd_vs_user_exit"].as_f64().unwrap() > 0.0, "{r}");
    assert!(r["same_cpu_round_trip_us"].as_f64().unwrap() > 0.0, "{r}");
}

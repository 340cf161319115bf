//! Passthrough NVMe end to end: real `ferry` processes, a real `ferry device nvme` process
//! speaking vfio-user, the built-in guest's NVMe driver, under /dev/kvm. Every test has its own
//! temp directory and socket, every run is bounded by `--timeout` or a wait limit, and device
//! processes are killed when a test fails.
mod common;
use common::{text, wait_for_path, TempDir};

use std::{
    path::Path,
    process::{Child, Command, Output, Stdio},
    time::{Duration, Instant},
};

fn ferry() -> Command {
    Command::new(env!("CARGO_BIN_EXE_ferry"))
}

/// A `ferry device nvme` process, killed on drop.
struct Device(Child);

impl Device {
    fn start(socket: &Path, backing: &Path, extra: &[&str]) -> Device {
        let child = ferry()
            .args(["device", "nvme", "--create", "--size", "32M", "--socket"])
            .arg(socket)
            .arg("--backing")
            .arg(backing)
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start ferry device nvme");
        let d = Device(child);
        wait_for_path(socket);
        d
    }

    /// SIGTERM, then the device's stderr (its statistics).
    fn stop(mut self) -> String {
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        let mut out = String::new();
        if let Some(mut e) = self.0.stderr.take() {
            use std::io::Read;
            let _ = e.read_to_string(&mut out);
        }
        out
    }
}

impl Drop for Device {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn run(args: &[&str]) -> Output {
    let out = ferry().args(args).output().expect("start ferry");
    out
}

fn ok(out: &Output) -> String {
    let stdout = text(&out.stdout);
    assert!(
        out.status.success(),
        "status {:?}\nstdout: {stdout}\nstderr: {}",
        out.status,
        text(&out.stderr)
    );
    stdout
}

fn digest(stdout: &str, prefix: &str) -> String {
    let line = stdout
        .lines()
        .find(|l| l.contains(prefix))
        .unwrap_or_else(|| panic!("no {prefix:?} line in {stdout}"));
    line.split(prefix)
        .nth(1)
        .unwrap()
        .split(',')
        .next()
        .unwrap()
        .trim()
        .to_string()
}

#[test]
fn nvme_verify_with_several_queues_and_prp_lists_finishes_clean() {
    let dir = TempDir::new("verify");
    let backing = dir.path("disk.img");
    let out = run(&[
        "run",
        "--workload",
        "nvme-verify",
        "--nvme-backing",
        backing.to_str().unwrap(),
        "--nvme-queues",
        "4",
        "--nvme-depth",
        "16",
        "--nvme-ios",
        "4000",
        "--nvme-io-size",
        "4K",
        "--nvme-io-max",
        "64K",
        "--timeout",
        "120s",
        "--json",
    ]);
    let stdout = ok(&out);
    assert!(stdout.contains("4 I/O queue(s) of 16"), "{stdout}");
    assert!(stdout.contains("nvme-verify: result ios=4000 "), "{stdout}");
    assert!(
        stdout.contains("final verification read 32768 blocks"),
        "{stdout}"
    );
    assert!(
        stdout.contains("nvme-verify: done, every read verified"),
        "{stdout}"
    );
    let report: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    let log = &report["config_log"];
    assert_eq!(log["enables"], 1, "{log}");
    assert_eq!(log["admin_failed"], 0, "{log}");
    assert_eq!(log["queues_granted"], 3 | 3 << 16, "{log}");
    // 4 CQs + 4 SQs created, then deleted at the guest's shutdown; identify ×2, set features.
    assert!(
        log["admin_completed"].as_u64().unwrap() >= 3 + 8 + 8,
        "{log}"
    );
    assert_eq!(log["shutdowns"], 1, "{log}");
    let created = log["history"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|h| h["opcode"] == 1)
        .count();
    assert_eq!(created, 4, "CREATE_SQ recorded once per queue: {log}");
    let err = text(&out.stderr);
    assert!(err.contains("\"io_errors\":0"), "device stats: {err}");
    assert!(
        err.contains("\"io_queues_created\":4"),
        "device stats: {err}"
    );
}

#[test]
fn data_written_in_one_run_is_verified_by_the_next() {
    let dir = TempDir::new("persist");
    let backing = dir.path("disk.img");
    let b = backing.to_str().unwrap();
    let first = ok(&run(&[
        "run",
        "--workload",
        "nvme-verify",
        "--nvme-backing",
        b,
        "--nvme-ios",
        "3000",
        "--nvme-read-percent",
        "20",
        "--seed",
        "7",
        "--timeout",
        "120s",
    ]));
    let written = digest(&first, "nvme-verify: state digest ");
    // The second VM reads the whole region first, verifies every header and payload, and
    // adopts the generations it finds: the same state digest.
    let second = ok(&run(&[
        "run",
        "--workload",
        "nvme-verify",
        "--nvme-backing",
        b,
        "--nvme-ios",
        "2000",
        "--nvme-adopt",
        "--seed",
        "8",
        "--nvme-queues",
        "3",
        "--timeout",
        "120s",
    ]));
    let adopted = digest(&second, "nvme-verify: adopted existing data: digest ");
    assert_eq!(
        written, adopted,
        "first run:\n{first}\nsecond run:\n{second}"
    );
    assert!(
        second.contains("nvme-verify: done, every read verified"),
        "{second}"
    );
}

#[test]
fn dstrd_0_and_4k_blocks_work_with_every_doorbell_trapped() {
    let dir = TempDir::new("dstrd0");
    let backing = dir.path("disk.img");
    let out = run(&[
        "run",
        "--workload",
        "nvme-verify",
        "--nvme-backing",
        backing.to_str().unwrap(),
        "--nvme-dstrd",
        "0",
        "--nvme-block-size",
        "4096",
        "--nvme-ios",
        "500",
        "--nvme-io-max",
        "32K",
        "--nvme-depth",
        "4",
        "--timeout",
        "120s",
    ]);
    let stdout = ok(&out);
    assert!(
        stdout.contains("DSTRD 0, 16384 blocks of 4096 bytes"),
        "{stdout}"
    );
    assert!(
        stdout.contains("nvme-verify: done, every read verified"),
        "{stdout}"
    );
}

#[test]
fn malformed_commands_get_error_statuses_and_everything_stays_up() {
    let dir = TempDir::new("malformed");
    let socket = dir.path("nvme.sock");
    let dev = Device::start(&socket, &dir.path("disk.img"), &[]);
    let spec = format!("nvme={}", socket.display());
    let out = run(&[
        "run",
        "--workload",
        "nvme-malformed",
        "--passthrough",
        &spec,
        "--timeout",
        "60s",
        "--json",
    ]);
    let stdout = ok(&out);
    for what in [
        "unaligned PRP1: rejected (sct 0 sc 0x13)",
        "outside guest RAM: rejected (sct 0 sc 0x04)",
        "PRP list outside guest RAM: rejected (sct 0 sc 0x04)",
        "past the end of the namespace: rejected (sct 0 sc 0x80)",
        "create SQ 0: rejected (sct 1 sc 0x01)",
        "missing CQ 9: rejected (sct 1 sc 0x00)",
        "create CQ 2 outside guest RAM: rejected (sct 0 sc 0x04)",
        "identify into the hypervisor's bounce area: rejected (sct 0 sc 0x04)",
        "all 16 malformed commands rejected with the right status; the device still works",
    ] {
        assert!(stdout.contains(what), "missing {what:?} in {stdout}");
    }
    let report: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    assert_eq!(report["config_log"]["admin_failed"], 7, "{report}");
    // The same device process serves the next VM, which works normally (its region starts
    // after block 0, which the malformed run wrote a plain pattern to).
    let again = ok(&run(&[
        "run",
        "--workload",
        "nvme-verify",
        "--passthrough",
        &spec,
        "--nvme-ios",
        "500",
        "--nvme-lba-start",
        "8",
        "--timeout",
        "60s",
    ]));
    assert!(
        again.contains("nvme-verify: done, every read verified"),
        "{again}"
    );
    let stats = dev.stop();
    assert!(stats.contains("\"connections\":2"), "{stats}");
    assert!(stats.contains("\"prp_errors\":2"), "{stats}");
    assert!(stats.contains("\"fatal\":0"), "{stats}");
}

#[test]
fn killing_the_device_ends_the_vm_with_a_clear_error() {
    let dir = TempDir::new("kill");
    let socket = dir.path("nvme.sock");
    let mut dev = Device::start(&socket, &dir.path("disk.img"), &[]);
    let spec = format!("nvme={}", socket.display());
    let console = dir.path("console.log");
    let mut vm = ferry()
        .args([
            "run",
            "--workload",
            "nvme-verify",
            "--passthrough",
            &spec,
            "--duration",
            "60s",
            "--timeout",
            "90s",
            "--serial",
        ])
        .arg(&console)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start ferry run");
    // Wait until the guest reports progress, then kill the device.
    let t0 = Instant::now();
    while !std::fs::read_to_string(&console)
        .unwrap_or_default()
        .contains("I/Os")
    {
        if t0.elapsed() > Duration::from_secs(30) {
            let _ = vm.kill();
            panic!(
                "the guest never reported progress: {}",
                std::fs::read_to_string(&console).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    dev.0.kill().unwrap();
    let killed = Instant::now();
    let status = loop {
        if let Some(s) = vm.try_wait().unwrap() {
            break s;
        }
        if killed.elapsed() > Duration::from_secs(20) {
            let _ = vm.kill();
            panic!("ferry did not end after the device died");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let out = vm.wait_with_output().unwrap();
    let err = text(&out.stderr);
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(
        err.contains(&format!(
            "VMM failure: passthrough device nvme0 ({}) disconnected",
            socket.display()
        )),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn attaching_to_a_missing_socket_is_a_clear_error() {
    let dir = TempDir::new("missing");
    let spec = format!("nvme={}", dir.path("nope.sock").display());
    let out = run(&[
        "run",
        "--workload",
        "nvme-verify",
        "--passthrough",
        &spec,
        "--timeout",
        "30s",
    ]);
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(
        err.contains("cannot connect to passthrough device nvme0"),
        "{err}"
    );
    let out = run(&["run", "--passthrough", "virtio=/x"]);
    assert!(
        text(&out.stderr).contains("expected nvme=SOCKET"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn bench_nvme_only_one_side_runs_that_side_alone() {
    let out = run(&[
        "bench", "nvme", "--ios", "200", "--qd", "1", "--device", "spin", "--only", "guest",
        "--json",
    ]);
    let report: serde_json::Value = serde_json::from_str(&ok(&out)).unwrap();
    let rows = report["runs"].as_array().unwrap();
    assert_eq!(rows.len(), 1, "{report}");
    assert_eq!(rows[0]["guest"]["ios"], 200, "{report}");
    assert_eq!(
        rows[0]["host"]["ios"], 0,
        "the host client did not run: {report}"
    );
    // No idle measurement when profiling one side.
    assert_eq!(report["idle"].as_array().unwrap().len(), 0, "{report}");
}

#[test]
fn bench_nvme_compares_the_guest_with_a_host_client() {
    let out = run(&["bench", "nvme", "--ios", "300", "--runs", "2", "--json"]);
    let stdout = ok(&out);
    let report: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    // Both device modes (adaptive polling, always spinning), each at both queue depths.
    let rows = report["runs"].as_array().unwrap();
    assert_eq!(rows.len(), 4, "{report}");
    let expected = [("adaptive", 1), ("adaptive", 32), ("spin", 1), ("spin", 32)];
    for (r, (device, qd)) in rows.iter().zip(expected) {
        assert_eq!(r["device"], device, "{r}");
        assert_eq!(r["qd"], qd);
        assert_eq!(r["guest"]["ios"], 300, "{r}");
        assert_eq!(r["host"]["ios"], 300, "{r}");
        assert!(r["iops_ratio"].as_f64().unwrap() > 0.0, "{r}");
        // Two pairs of runs, each with its own ratio.
        let ratios = r["ratios"].as_array().unwrap();
        assert_eq!(ratios.len(), 2, "{r}");
        assert!(ratios.iter().all(|x| x.as_f64().unwrap() > 0.0), "{r}");
    }
    // The idle device's CPU is measured for each mode.
    let idle = report["idle"].as_array().unwrap();
    assert_eq!(idle.len(), 2, "{report}");
    for (i, device) in idle.iter().zip(["adaptive", "spin"]) {
        assert_eq!(i["device"], device, "{i}");
        assert!(i["cpu"].as_f64().is_some_and(|c| c >= 0.0), "{i}");
    }
}

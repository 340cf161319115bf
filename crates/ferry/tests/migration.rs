//! Live migration between real `ferry` processes under the real /dev/kvm: the guest's ledger
//! verifies on the destination, memory is byte-identical (hashes taken by each process), the
//! VM survives A→B→A, and every fault leaves the source running and verifiable.
mod common;
use common::{
    api, last_json, spawn_receiver, status, wait_for_socket, wait_progress, wait_until, Proc,
    PATIENCE,
};

use std::{
    io::{Read, Write},
    net::{TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

use migration::fault::{Action, Fault, FaultProxy, Position, Rounds, Verdict};
use serde_json::{json, Value};

/// Page writes of the `dirty` guest before a migration starts: a whole pass over its 32 MiB
/// working set on average, so round 0 carries many Memory frames.
const WARM: u64 = 8192;

fn ferry() -> Command {
    Command::new(env!("CARGO_BIN_EXE_ferry"))
}

fn tmp(name: &str) -> PathBuf {
    static N: AtomicU64 = AtomicU64::new(0);
    let n = N.fetch_add(1, Ordering::SeqCst);
    std::env::temp_dir().join(format!("ferry-mig-{}-{n}-{name}", std::process::id()))
}

/// A source VM: `ferry run` with the `dirty` workload and an API socket.
fn source(api: &Path, extra: &[&str]) -> Proc {
    let child = ferry()
        .args([
            "run",
            "--workload",
            "dirty",
            "--memory",
            "128M",
            "--working-set",
            "32M",
            "--serial",
            "off",
        ])
        .args([
            "--api-socket",
            api.to_str().unwrap(),
            "--json",
            "--timeout",
            "120s",
        ])
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for_socket(api);
    Proc(Some(child), None)
}

/// A destination: `ferry receive` on an ephemeral port; returns it and its address.
fn destination(api: Option<&Path>) -> (Proc, String) {
    let mut cmd = ferry();
    cmd.args([
        "receive",
        "--listen",
        "127.0.0.1:0",
        "--serial",
        "off",
        "--json",
        "--debug-hash",
    ])
    .args(["--accept-timeout", "60s", "--timeout", "120s"]);
    if let Some(api) = api {
        cmd.args(["--api-socket", api.to_str().unwrap()]);
    }
    spawn_receiver(&mut cmd)
}

fn assert_running_and_verifiable(p: &Path) {
    let progress = || status(p)["data"]["progress"].as_u64().unwrap();
    let a = progress();
    // a loaded machine may not schedule the vCPU for a while: wait, with a bound
    wait_until(
        format!("the VM behind {} runs", p.display()),
        PATIENCE,
        || progress() != a,
    );
    let v = api(p, json!({"cmd": "verify"}));
    assert_eq!(v["ok"], true, "{v}");
    assert_eq!(v["data"]["status"], 0, "ledger broken: {v}");
}

fn migrate(api_sock: &Path, to: &str) -> Output {
    ferry()
        .args([
            "migrate",
            "--api-socket",
            api_sock.to_str().unwrap(),
            "--to",
            to,
            "--debug-hash",
            "--json",
        ])
        .output()
        .unwrap()
}

#[test]
fn a_busy_guest_migrates_its_memory_is_identical_and_its_ledger_verifies() {
    let (sa, sb) = (tmp("a.sock"), tmp("b.sock"));
    let src = source(&sa, &[]);
    let (dst, addr) = destination(Some(&sb));
    wait_progress(&sa, WARM);
    let out = migrate(&sa, &addr);
    assert!(
        out.status.success(),
        "migrate: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(report["rounds"].as_array().unwrap().len() >= 2, "{report}");
    assert!(report["downtime_ms"].as_f64().unwrap() > 0.0);
    let src_out = src.wait_output(Duration::from_secs(30));
    assert_eq!(src_out.status.code(), Some(0));
    assert_eq!(last_json(&src_out)["outcome"], "migrated");
    wait_for_socket(&sb);
    assert_running_and_verifiable(&sb);
    assert_eq!(api(&sb, json!({"cmd": "stop"}))["ok"], true);
    let dst_out = dst.wait_output(Duration::from_secs(30));
    let summary = last_json(&dst_out);
    let dest_hash = summary["incoming"]["memory_hash"]
        .as_str()
        .expect("destination hash");
    assert_eq!(
        report["memory_hash"].as_str(),
        Some(dest_hash),
        "memory at pause differs from memory at resume"
    );
}

#[test]
fn the_guest_survives_a_to_b_to_a() {
    let (sa, sb, sa2) = (tmp("a.sock"), tmp("b.sock"), tmp("a2.sock"));
    let src = source(&sa, &[]);
    let (b, addr_b) = destination(Some(&sb));
    assert!(migrate(&sa, &addr_b).status.success());
    assert_eq!(
        src.wait_output(Duration::from_secs(30)).status.code(),
        Some(0)
    );
    wait_for_socket(&sb);
    assert_running_and_verifiable(&sb);
    let (a2, addr_a2) = destination(Some(&sa2));
    let out = migrate(&sb, &addr_a2);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        b.wait_output(Duration::from_secs(30)).status.code(),
        Some(0)
    );
    wait_for_socket(&sa2);
    assert_running_and_verifiable(&sa2);
    api(&sa2, json!({"cmd": "stop"}));
    drop(a2);
}

/// Migrates the source through a [`FaultProxy`] injecting `fault`; `act` runs when a held
/// frame is reached (with the destination process) and says what becomes of the frame. Checks
/// that the fault happened, the migration failed, the source runs and verifies its ledger,
/// the destination ran no VM (when it survives), and a second migration works.
fn fault_leaves_source_running(fault: Fault, act: impl FnOnce(&mut Proc) -> Verdict) {
    let sa = tmp("a.sock");
    let _src = source(&sa, &[]);
    let (mut dst, addr) = destination(None);
    wait_progress(&sa, WARM);
    let proxy = FaultProxy::start(addr.as_str(), Some(fault)).unwrap();
    let to = proxy.addr().to_string();
    let sa2 = sa.clone();
    let migration = std::thread::spawn(move || migrate(&sa2, &to));
    if fault.action == Action::Hold {
        assert!(
            proxy.wait_held(PATIENCE).is_some(),
            "the migration never reached {}",
            fault.at
        );
        proxy.release(act(&mut dst));
    }
    let out = migration.join().unwrap();
    assert!(proxy.reached(), "the migration never reached {}", fault.at);
    assert_eq!(
        out.status.code(),
        Some(1),
        "the migration must fail: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(err.contains("keeps running on the source"), "{err}");
    assert_running_and_verifiable(&sa);
    if dst.0.is_some() {
        proxy.close();
        let d = dst.wait_output(PATIENCE);
        assert_eq!(
            d.status.code(),
            Some(1),
            "the destination must not run a half-received VM"
        );
        let summary = last_json(&d);
        assert_eq!(summary["outcome"], "failed", "{summary}");
    }
    // the source can still migrate afterwards
    let (_dst2, addr2) = destination(None);
    assert!(
        migrate(&sa, &addr2).status.success(),
        "a second attempt works"
    );
}

#[test]
fn cutting_the_socket_mid_round_leaves_the_source_running() {
    let at = Position::round0(3);
    fault_leaves_source_running(
        Fault {
            at,
            action: Action::Cut,
        },
        |_| Verdict::Cut,
    );
}

#[test]
fn a_corrupted_message_is_caught_and_the_source_keeps_running() {
    let at = Position::RoundEnd(Rounds::Exactly(1));
    fault_leaves_source_running(
        Fault {
            at,
            action: Action::FlipBit,
        },
        |_| Verdict::Forward,
    );
}

#[test]
fn killing_the_destination_mid_round_leaves_the_source_running() {
    let at = Position::round0(3);
    fault_leaves_source_running(
        Fault {
            at,
            action: Action::Hold,
        },
        |d| {
            d.kill();
            d.0 = None;
            Verdict::Forward
        },
    );
}

#[test]
fn a_corrupted_vm_state_is_caught_and_the_source_keeps_running() {
    fault_leaves_source_running(
        Fault {
            at: Position::vm_state(),
            action: Action::FlipBit,
        },
        |_| Verdict::Forward,
    );
}

#[test]
fn a_ready_that_never_arrives_leaves_the_source_running_and_the_destination_unrun() {
    fault_leaves_source_running(
        Fault {
            at: Position::ready(),
            action: Action::Cut,
        },
        |_| Verdict::Cut,
    );
}

#[test]
fn killing_the_destination_after_ready_leaves_the_source_running() {
    fault_leaves_source_running(
        Fault {
            at: Position::ready(),
            action: Action::Hold,
        },
        |d| {
            d.kill();
            d.0 = None;
            Verdict::Cut
        },
    );
}

#[test]
fn a_destination_speaking_another_version_is_refused() {
    let sa = tmp("a.sock");
    let _src = source(&sa, &[]);
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let mut hello = [0u8; 24];
        let _ = s.read_exact(&mut hello);
        // answer with a well-formed hello of version 99
        let mut payload = b"FERRYMIG".to_vec();
        payload.extend_from_slice(&99u32.to_le_bytes());
        let mut frame = vec![1u8, 0, 0, 0];
        frame.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        frame.extend_from_slice(&crc32(&payload).to_le_bytes());
        frame.extend_from_slice(&payload);
        let _ = s.write_all(&frame);
        // keep the connection until the source closes it
        let _ = s.read_to_end(&mut Vec::new());
    });
    let out = migrate(&sa, &addr);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(err.contains("version 99"), "{err}");
    assert_running_and_verifiable(&sa);
}

#[test]
fn a_source_speaking_another_version_gets_no_vm_run() {
    let (dst, addr) = destination(None);
    let mut s = TcpStream::connect(&addr).unwrap();
    let mut payload = b"FERRYMIG".to_vec();
    payload.extend_from_slice(&2u32.to_le_bytes());
    let mut frame = vec![1u8, 0, 0, 0];
    frame.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    frame.extend_from_slice(&crc32(&payload).to_le_bytes());
    frame.extend_from_slice(&payload);
    s.write_all(&frame).unwrap();
    let mut answer = Vec::new();
    let _ = s.read_to_end(&mut answer);
    assert_eq!(answer.first(), Some(&11u8), "the destination answers Abort");
    assert!(String::from_utf8_lossy(&answer).contains("version 2"));
    let out = dst.wait_output(Duration::from_secs(30));
    assert_eq!(out.status.code(), Some(1));
    let s = String::from_utf8_lossy(&out.stderr);
    assert!(s.contains("no VM runs here"), "{s}");
}

#[test]
fn garbage_instead_of_a_migration_stream_is_refused() {
    let (dst, addr) = destination(None);
    let mut s = TcpStream::connect(&addr).unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: ferry\r\n\r\n")
        .unwrap();
    let out = dst.wait_output(Duration::from_secs(30));
    assert_eq!(out.status.code(), Some(1));
}

/// CRC-32 (zlib), written out so the test does not trust the code under test.
fn crc32(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= b as u32;
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xedb8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

#[test]
fn the_round_limit_can_abort_and_an_unreachable_destination_fails_cleanly() {
    let sa = tmp("a.sock");
    let _src = source(&sa, &[]);
    let (_dst, addr) = destination(None);
    let out = ferry()
        .args([
            "migrate",
            "--api-socket",
            sa.to_str().unwrap(),
            "--to",
            &addr,
        ])
        .args([
            "--downtime-ms",
            "0",
            "--max-rounds",
            "1",
            "--on-limit",
            "abort",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(err.contains("did not converge in 1 rounds"), "{err}");
    assert_running_and_verifiable(&sa);

    // nothing listens on this port
    let unused = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .to_string();
    let out = migrate(&sa, &unused);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("connect"));
    assert_running_and_verifiable(&sa);
}

#[test]
fn a_vm_with_a_passthrough_device_keeps_running_when_the_destination_has_no_device() {
    let sa = tmp("pt.sock");
    let disk = tmp("disk.img");
    let child = ferry()
        .args([
            "run",
            "--workload",
            "nvme-verify",
            "--memory",
            "128M",
            "--serial",
            "off",
        ])
        .args([
            "--nvme-backing",
            disk.to_str().unwrap(),
            "--duration",
            "60s",
            "--timeout",
            "120s",
        ])
        .args(["--api-socket", sa.to_str().unwrap(), "--json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let src = Proc(Some(child), None);
    wait_for_socket(&sa);
    // The guest created its I/O queues, so the source enters shadow mode and the failure is
    // the destination's.
    wait_until("the guest creates its I/O queues", PATIENCE, || {
        status(&sa)["data"]["io_queues"].as_u64() >= Some(1)
    });
    let (_dst, addr) = destination(None);
    let out = migrate(&sa, &addr);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(err.contains("this destination has none"), "{err}");
    let status = api(&sa, json!({"cmd": "status"}));
    assert_eq!(status["data"]["state"], "running", "{status}");
    assert_eq!(api(&sa, json!({"cmd": "stop"}))["ok"], true);
    let out = src.wait_output(Duration::from_secs(60));
    let summary = last_json(&out);
    assert_eq!(summary["outcome"], "stopped", "{summary}");
    assert!(summary["failed_migrations"][0]
        .as_str()
        .unwrap()
        .contains("this destination has none"));
    std::fs::remove_file(&disk).ok();
}

#[test]
fn the_fault_matrix_runs_and_reports_each_injection() {
    // Two cells of the matrix, one injection each: a cut and the destination killed in round
    // 0; both must leave exactly one VM, which verifies and whose guest ends clean.
    let out = ferry()
        .args(["bench", "migrate-faults", "--runs", "2", "--seed", "3"])
        .args(["--faults", "cut,kill-destination", "--phases", "round0"])
        .arg("--json")
        .output()
        .unwrap();
    let report: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "{e}: {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    assert_eq!(report["injections"], 2, "{report}");
    for run in report["runs"].as_array().unwrap() {
        assert_eq!(run["reached"], true, "{run}");
        assert_eq!(run["vms_running"], 1, "{run}");
        assert_eq!(run["verify_ok"], true, "{run}");
        assert_eq!(run["guest_exit"], 0, "{run}");
        assert_eq!(run["green"], true, "{run}");
    }
    assert_eq!(out.status.code(), Some(0));
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(text.contains("fault matrix: 2 injections"), "{text}");
    assert!(text.contains("PASS"), "{text}");
}

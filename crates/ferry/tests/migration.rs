//! Live migration between real `ferry` processes under the real /dev/kvm: the guest's ledger
//! verifies on the destination, memory is byte-identical (hashes taken by each process), the
//! VM survives A→B→A, and every fault leaves the source running and verifiable.
mod common;
use common::{
    api, assert_running_and_verifiable, last_json, spawn_receiver, status, wait_for_socket,
    wait_progress, wait_until, Proc, PATIENCE,
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

/// Migrates the VM behind `from` to the `ferry receive` at `to` (serving `dest_api`): the
/// migration succeeds, the source process exits 0, and the VM runs and verifies there.
fn hand_over(src: Proc, from: &Path, to: &str, dest_api: &Path) {
    let out = migrate(from, to);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(src.wait_output(PATIENCE).status.code(), Some(0));
    wait_for_socket(dest_api);
    assert_running_and_verifiable(dest_api);
}

fn migrate(api_sock: &Path, to: &str) -> Output {
    migrate_with(api_sock, to, &[])
}

fn migrate_with(api_sock: &Path, to: &str, extra: &[&str]) -> Output {
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
        .args(extra)
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

/// Migrates with `extra` flags; the memory at the pause equals the memory at the resume, the
/// ledger verifies on the destination, and the source's report comes back.
fn migrate_verified(extra: &[&str]) -> Value {
    let (sa, sb) = (tmp("a.sock"), tmp("b.sock"));
    let src = source(&sa, &[]);
    let (dst, addr) = destination(Some(&sb));
    wait_progress(&sa, WARM);
    let out = migrate_with(&sa, &addr, extra);
    assert!(
        out.status.success(),
        "migrate {extra:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(src.wait_output(PATIENCE).status.code(), Some(0));
    wait_for_socket(&sb);
    assert_running_and_verifiable(&sb);
    assert_eq!(api(&sb, json!({"cmd": "stop"}))["ok"], true);
    let summary = last_json(&dst.wait_output(PATIENCE));
    assert_eq!(
        report["memory_hash"].as_str(),
        summary["incoming"]["memory_hash"].as_str(),
        "memory at pause differs from memory at resume ({extra:?})"
    );
    assert_eq!(
        summary["incoming"]["compressed"],
        report.get("compression").is_some()
    );
    report
}

#[test]
fn compressed_and_capped_migrations_deliver_the_same_memory() {
    // zstd over the data channels, under a cap: the guest's pages (mostly sparse ledger pages)
    // go compressed, the wire carries fewer bytes than the pages, the ledger verifies there.
    for extra in [
        &["--compress", "zstd", "--max-bandwidth", "64M"][..],
        &["--compress", "zstd:3", "--streams", "0"][..],
    ] {
        let r = migrate_verified(extra);
        assert!(
            r["compression"].as_str().unwrap().starts_with("zstd:"),
            "{r}"
        );
        let (wire, pages) = (
            r["bytes"].as_u64().unwrap(),
            r["page_bytes"].as_u64().unwrap(),
        );
        assert!(r["zstd_pages"].as_u64().unwrap() > 0, "{r}");
        assert!(
            wire < pages,
            "{wire} bytes on the wire for {pages} bytes of pages: {r}"
        );
    }
    // A cap without compression: every pre-copy round goes no faster than the cap allows
    // (its bytes beyond the bucket's 4 MiB burst took at least bytes / rate), and the
    // report says which cap applied.
    let rate = 16u64 << 20;
    let r = migrate_verified(&["--max-bandwidth", "16M"]);
    assert_eq!(r["max_bandwidth"].as_u64(), Some(rate), "{r}");
    assert!(r.get("compression").is_none(), "{r}");
    let rounds = r["rounds"].as_array().unwrap();
    let round0 = &rounds[0];
    let bytes = round0["bytes"].as_u64().unwrap();
    assert!(bytes > 8 << 20, "round 0 too small to see the cap: {r}");
    let least_ms = (bytes - (4 << 20)) as f64 / rate as f64 * 1000.0;
    assert!(
        round0["ms"].as_f64().unwrap() >= least_ms * 0.95,
        "round 0 moved {bytes} bytes faster than 16 MiB/s allows: {r}"
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
    // One stream: every frame passes through the proxy.
    let migration = std::thread::spawn(move || migrate_with(&sa2, &to, &["--streams", "0"]));
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

/// A Hello frame of protocol `version`, built by hand.
fn hello_frame(version: u32) -> Vec<u8> {
    let mut payload = b"FERRYMIG".to_vec();
    payload.extend_from_slice(&version.to_le_bytes());
    let mut frame = vec![1u8, 0, 0, 0];
    frame.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    frame.extend_from_slice(&crc32(&payload).to_le_bytes());
    frame.extend_from_slice(&payload);
    frame
}

#[test]
fn another_version_and_garbage_are_refused_and_the_real_source_still_gets_in() {
    let (sa, sb) = (tmp("a.sock"), tmp("b.sock"));
    let src = source(&sa, &[]);
    let (dst, addr) = destination(Some(&sb));
    // A source speaking another version: told why, closed.
    let other = migration::wire::VERSION + 1;
    let mut s = TcpStream::connect(&addr).unwrap();
    s.write_all(&hello_frame(other)).unwrap();
    let mut answer = Vec::new();
    let _ = s.read_to_end(&mut answer);
    assert_eq!(answer.first(), Some(&11u8), "the destination answers Abort");
    assert!(String::from_utf8_lossy(&answer).contains(&format!("version {other}")));
    // Garbage: closed.
    let mut g = TcpStream::connect(&addr).unwrap();
    g.write_all(b"GET / HTTP/1.1\r\nHost: ferry\r\n\r\n")
        .unwrap();
    let _ = g.read_to_end(&mut answer);
    // The destination still waits, and takes the real source.
    hand_over(src, &sa, &addr, &sb);
    assert_eq!(api(&sb, json!({"cmd": "stop"}))["ok"], true);
    let out = dst.wait_output(Duration::from_secs(60));
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(log.contains("2 connection(s) refused"), "{log}");
}

#[test]
fn a_destination_that_only_ever_sees_strangers_runs_nothing() {
    let mut cmd = ferry();
    cmd.args([
        "receive",
        "--listen",
        "127.0.0.1:0",
        "--serial",
        "off",
        "--json",
    ])
    .args(["--accept-timeout", "3s"]);
    let (dst, addr) = spawn_receiver(&mut cmd);
    let mut s = TcpStream::connect(&addr).unwrap();
    s.write_all(&hello_frame(2)).unwrap();
    let mut answer = Vec::new();
    let _ = s.read_to_end(&mut answer);
    // The accept timeout ends it; it never ran a VM.
    let out = dst.wait_output(Duration::from_secs(60));
    assert_eq!(out.status.code(), Some(1));
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(log.contains("no migration arrived"), "{log}");
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
    assert!(err.contains("cannot rebuild (it has: none)"), "{err}");
    let status = api(&sa, json!({"cmd": "status"}));
    assert_eq!(status["data"]["state"], "running", "{status}");
    assert_eq!(api(&sa, json!({"cmd": "stop"}))["ok"], true);
    let out = src.wait_output(Duration::from_secs(60));
    let summary = last_json(&out);
    assert_eq!(summary["outcome"], "stopped", "{summary}");
    assert!(summary["failed_migrations"][0]
        .as_str()
        .unwrap()
        .contains("cannot rebuild"));
    std::fs::remove_file(&disk).ok();
}

/// Go reaches the destination, its confirmation never reaches the source (the proxy forwards
/// Go and cuts both connections). Exactly one VM runs — the destination's; the source reports
/// the outcome as unknown and stays paused; `resume` without force is refused; once the
/// destination is stopped (the operator's check), `ferry resume --force` brings the source back.
#[test]
fn a_connection_lost_right_after_go_leaves_exactly_one_vm_running() {
    let (sa, sb) = (tmp("a.sock"), tmp("b.sock"));
    let src = source(&sa, &[]);
    let (dst, addr) = destination(Some(&sb));
    wait_progress(&sa, WARM);
    let fault = Fault {
        at: Position::go(),
        action: Action::CutAfter,
    };
    let proxy = FaultProxy::start(addr.as_str(), Some(fault)).unwrap();
    let out = migrate(&sa, &proxy.addr().to_string());
    assert!(proxy.reached(), "the migration never reached Go");
    assert_eq!(
        out.status.code(),
        Some(3),
        "exit 3 = outcome unknown: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["outcome"], "unknown", "{report}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("OUTCOME UNKNOWN"));

    // The destination runs the VM (it had Go) and its ledger holds there.
    wait_for_socket(&sb);
    assert_running_and_verifiable(&sb);
    // The source is paused and says so; it does not run on its own.
    let st = status(&sa);
    assert_eq!(st["data"]["state"], "paused-after-go", "{st}");
    let p0 = st["data"]["progress"].as_u64().unwrap();
    // Meanwhile the destination made progress (above), so the source had every chance to
    // run too: its counter has not moved.
    assert_eq!(status(&sa)["data"]["progress"].as_u64().unwrap(), p0);
    let v = api(&sa, json!({"cmd": "verify"}));
    assert_eq!(v["ok"], false, "a paused guest cannot answer: {v}");
    let m = migrate(&sa, &addr);
    assert_eq!(
        m.status.code(),
        Some(1),
        "no new migration while paused after Go"
    );
    // Resume without force is refused.
    let r = ferry()
        .args(["resume", "--api-socket", sa.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(r.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&r.stderr).contains("force"));
    assert_eq!(status(&sa)["data"]["state"], "paused-after-go");

    // The operator's decision: the destination's copy goes, the source's resumes.
    assert_eq!(api(&sb, json!({"cmd": "stop"}))["ok"], true);
    let d = dst.wait_output(PATIENCE);
    assert_eq!(last_json(&d)["outcome"], "stopped");
    let r = ferry()
        .args(["resume", "--api-socket", sa.to_str().unwrap(), "--force"])
        .output()
        .unwrap();
    assert_eq!(
        r.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&r.stderr)
    );
    assert_eq!(status(&sa)["data"]["state"], "running");
    assert_running_and_verifiable(&sa);
    assert_eq!(api(&sa, json!({"cmd": "stop"}))["ok"], true);
    let s = src.wait_output(PATIENCE);
    let summary = last_json(&s);
    assert_eq!(summary["outcome"], "stopped", "{summary}");
    assert!(summary["failed_migrations"]
        .as_array()
        .unwrap()
        .iter()
        .any(|f| f.as_str().unwrap().contains("resumed by force")));
}

/// Starts a migration through a proxy that stalls it in round 1, so it is certainly running
/// (and waiting) when the test acts. Returns the proxy and the `ferry migrate` thread.
fn stalled_migration(sa: &Path, addr: &str) -> (FaultProxy, std::thread::JoinHandle<Output>) {
    let fault = Fault {
        at: Position::later_round(),
        action: Action::Stall,
    };
    let proxy = FaultProxy::start(addr, Some(fault)).unwrap();
    let to = proxy.addr().to_string();
    let sa2 = sa.to_path_buf();
    let migration = std::thread::spawn(move || migrate_with(&sa2, &to, &["--streams", "0"]));
    assert!(
        proxy.wait_reached(PATIENCE),
        "the migration never reached round 1"
    );
    wait_until("the source reports the migration", PATIENCE, || {
        status(sa)["data"]["state"] == "migrating"
    });
    (proxy, migration)
}

#[test]
fn stop_during_a_migration_cancels_it_and_no_vm_moves() {
    let sa = tmp("a.sock");
    let src = source(&sa, &[]);
    let (dst, addr) = destination(None);
    wait_progress(&sa, WARM);
    let (proxy, migration) = stalled_migration(&sa, &addr);
    assert_eq!(api(&sa, json!({"cmd": "stop"}))["ok"], true);
    let out = migration.join().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("cancelled"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let s = src.wait_output(PATIENCE);
    let summary = last_json(&s);
    assert_eq!(summary["outcome"], "stopped", "{summary}");
    assert!(summary["migration"].is_null(), "{summary}");
    proxy.close();
    let d = dst.wait_output(PATIENCE);
    assert_eq!(d.status.code(), Some(1), "the destination ran nothing");
}

#[test]
fn a_cancelled_migration_leaves_the_vm_running_and_a_later_one_works() {
    let (sa, sb) = (tmp("a.sock"), tmp("b.sock"));
    let src = source(&sa, &[]);
    let (_dst, addr) = destination(None);
    wait_progress(&sa, WARM);
    let (proxy, migration) = stalled_migration(&sa, &addr);
    let r = api(&sa, json!({"cmd": "cancel-migration"}));
    assert_eq!(r["ok"], true, "{r}");
    let out = migration.join().unwrap();
    assert_eq!(out.status.code(), Some(1));
    proxy.close();
    assert_eq!(status(&sa)["data"]["state"], "running");
    assert_running_and_verifiable(&sa);
    let r = api(&sa, json!({"cmd": "cancel-migration"}));
    assert_eq!(r["ok"], false, "nothing to cancel: {r}");
    let (dst2, addr2) = destination(Some(&sb));
    assert!(migrate(&sa, &addr2).status.success());
    assert_eq!(last_json(&src.wait_output(PATIENCE))["outcome"], "migrated");
    wait_for_socket(&sb);
    assert_running_and_verifiable(&sb);
    assert_eq!(api(&sb, json!({"cmd": "stop"}))["ok"], true);
    dst2.wait_output(PATIENCE);
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

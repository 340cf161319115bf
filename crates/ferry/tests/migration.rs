//! Live migration between real `ferry` processes under the real /dev/kvm: the guest's ledger
//! verifies on the destination, memory is byte-identical (hashes taken by each process), the
//! VM survives A→B→A, and every fault leaves the source running and verifiable.
mod common;
use common::{last_json, spawn_receiver, wait_for_socket, Proc};

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{TcpListener, TcpStream},
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    sync::atomic::{AtomicU64, Ordering},
    time::{Duration, Instant},
};

use serde_json::{json, Value};

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

/// One API call; returns the result line.
fn api(p: &Path, req: Value) -> Value {
    let mut s = UnixStream::connect(p).unwrap();
    writeln!(s, "{req}").unwrap();
    for line in BufReader::new(s).lines() {
        let v: Value = serde_json::from_str(&line.unwrap()).unwrap();
        if v["event"] == "result" {
            return v;
        }
    }
    panic!("no result from {}", p.display());
}

fn assert_running_and_verifiable(p: &Path) {
    let progress = || {
        api(p, json!({"cmd": "status"}))["data"]["progress"]
            .as_u64()
            .unwrap()
    };
    let a = progress();
    // a loaded machine may not schedule the vCPU for a while: wait, with a bound
    let deadline = Instant::now() + Duration::from_secs(20);
    while progress() == a {
        assert!(
            Instant::now() < deadline,
            "the VM behind {} is not running",
            p.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
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
    std::thread::sleep(Duration::from_millis(300));
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

/// What the proxy does once `after` bytes went from source to destination.
#[derive(Clone, Copy)]
enum Fault {
    /// Close both connections.
    Cut,
    /// Flip one bit in the stream.
    Corrupt,
    /// Kill the destination process (its pid is given).
    Kill(u32),
}

/// A TCP proxy in front of `target` that injects `fault`; returns its address.
fn faulty_proxy(target: String, after: u64, fault: Fault) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        let (mut from_src, _) = listener.accept().unwrap();
        let mut to_dst = TcpStream::connect(target).unwrap();
        let (mut back_src, mut back_dst) =
            (from_src.try_clone().unwrap(), to_dst.try_clone().unwrap());
        std::thread::spawn(move || {
            let _ = std::io::copy(&mut back_dst, &mut back_src);
        });
        let mut buf = vec![0u8; 64 << 10];
        let mut seen = 0u64;
        let mut done = false;
        loop {
            let n = match from_src.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            if !done && seen + n as u64 >= after {
                done = true;
                match fault {
                    Fault::Cut => {
                        let _ = from_src.shutdown(std::net::Shutdown::Both);
                        let _ = to_dst.shutdown(std::net::Shutdown::Both);
                        break;
                    }
                    Fault::Corrupt => buf[(after - seen) as usize] ^= 0x10,
                    // SAFETY: killing the destination process the test started.
                    Fault::Kill(pid) => unsafe {
                        libc::kill(pid as i32, libc::SIGKILL);
                    },
                }
            }
            seen += n as u64;
            if to_dst.write_all(&buf[..n]).is_err() {
                break;
            }
        }
    });
    addr
}

fn fault_leaves_source_running(fault: impl FnOnce(&Proc) -> Fault, dest_must_fail: bool) {
    let sa = tmp("a.sock");
    let _src = source(&sa, &[]);
    let (dst, addr) = destination(None);
    let f = fault(&dst);
    let proxy = faulty_proxy(addr, 8 << 20, f);
    let out = migrate(&sa, &proxy);
    assert_eq!(out.status.code(), Some(1), "the migration must fail");
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(err.contains("keeps running on the source"), "{err}");
    assert_running_and_verifiable(&sa);
    if dest_must_fail {
        let d = dst.wait_output(Duration::from_secs(30));
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
    fault_leaves_source_running(|_| Fault::Cut, true);
}

#[test]
fn a_corrupted_message_is_caught_and_the_source_keeps_running() {
    fault_leaves_source_running(|_| Fault::Corrupt, true);
}

#[test]
fn killing_the_destination_mid_round_leaves_the_source_running() {
    fault_leaves_source_running(|d| Fault::Kill(d.0.as_ref().unwrap().id()), false);
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
        std::thread::sleep(Duration::from_secs(1));
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
    // Let the guest create its I/O queues, so the source enters shadow mode and the failure
    // is the destination's.
    std::thread::sleep(Duration::from_millis(1500));
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

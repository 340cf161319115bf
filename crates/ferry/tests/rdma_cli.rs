//! End-to-end tests of `ferry rdma host` and `ferry rdma peer` as real processes talking over
//! real UDP sockets on loopback. Every test uses its own 127.N.*.* block and kills what it
//! started, also on failure.
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

fn ferry() -> Command {
    Command::new(env!("CARGO_BIN_EXE_ferry"))
}

/// A running `ferry rdma host`, killed on drop.
struct HostProc {
    child: Option<Child>,
    lines: mpsc::Receiver<String>,
}

impl HostProc {
    fn start(args: &[&str]) -> HostProc {
        let mut child = ferry()
            .args(["rdma", "host", "--json"])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start ferry rdma host");
        let out = child.stdout.take().expect("stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut h = HostProc {
            child: Some(child),
            lines: rx,
        };
        h.wait_for("ready on", Duration::from_secs(30));
        h
    }

    fn wait_for(&mut self, what: &str, limit: Duration) -> String {
        loop {
            match self.lines.recv_timeout(limit) {
                Ok(l) if l.contains(what) => return l,
                Ok(_) => {}
                Err(_) => panic!("host did not print '{what}' within {limit:?}"),
            }
        }
    }

    /// SIGTERM, then the JSON report (last stdout line).
    fn stop(mut self) -> serde_json::Value {
        let mut child = self.child.take().expect("child");
        // SAFETY: kill(2) on the pid of a child this test started and has not reaped.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let status = child.wait().expect("wait");
        assert!(status.success(), "host exit status {status}");
        let mut last = String::new();
        while let Ok(l) = self.lines.recv_timeout(Duration::from_secs(5)) {
            last = l;
        }
        serde_json::from_str(&last).unwrap_or_else(|e| panic!("not JSON ({e}): {last}"))
    }
}

impl Drop for HostProc {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn peer(args: &[&str]) -> Output {
    let child = ferry()
        .args(["rdma", "peer", "--json", "--timeout", "15s"])
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start ferry rdma peer");
    // Bounded: the peer's own timeouts end it well before this.
    let (tx, rx) = mpsc::channel();
    let id = child.id();
    let guard = std::thread::spawn(move || {
        if rx.recv_timeout(Duration::from_secs(60)).is_err() {
            // SAFETY: kill(2) on the pid of the peer this test started, still unreaped.
            unsafe { libc::kill(id as i32, libc::SIGKILL) };
        }
    });
    let out = child.wait_with_output().expect("peer output");
    let _ = tx.send(());
    let _ = guard.join();
    out
}

fn json_tail(out: &Output) -> serde_json::Value {
    let s = String::from_utf8_lossy(&out.stdout);
    let last = s.lines().last().unwrap_or_default().to_string();
    serde_json::from_str(&last).unwrap_or_else(|e| {
        panic!(
            "not JSON ({e}): {last}\nstderr: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

fn u(v: &serde_json::Value, path: &[&str]) -> u64 {
    let mut x = v;
    for p in path {
        x = &x[*p];
    }
    x.as_u64()
        .unwrap_or_else(|| panic!("{path:?} missing in {v}"))
}

/// Two host processes with several VMs each; host B's VMs connect to host A's VMs and to
/// each other (same host); a bare-metal peer connects to VMs on both hosts (RC and SIDR+UD);
/// every MAD reaches exactly its owner and nothing is dropped.
#[test]
fn rdma_two_host_processes_vms_connect_and_bare_metal_peer() {
    let a = HostProc::start(&[
        "--addr",
        "127.41.0.1",
        "--vms",
        "3",
        "--gid-base",
        "127.41.1.1",
        "--cm-timeout",
        "16",
    ]);
    let mut b = HostProc::start(&[
        "--addr",
        "127.41.0.2",
        "--vms",
        "2",
        "--gid-base",
        "127.41.2.1",
        "--cm-timeout",
        "16",
        "--connect",
        "127.41.1.1",
        "--connect",
        "127.41.1.3",
        "--connect",
        "127.41.2.1",
        "--connect",
        "127.41.2.2",
    ]);
    let peer_args = ["--addr", "127.41.0.9"];
    for gid in ["127.41.1.2", "127.41.2.2"] {
        let out = peer(
            &[
                &peer_args[..],
                &["--connect", gid, "--mode", "rc-connect", "--messages", "3"],
            ]
            .concat(),
        );
        assert!(
            out.status.success(),
            "rc to {gid}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let j = json_tail(&out);
        assert_eq!(j["rc"].as_array().map(Vec::len), Some(3));
        // RC data: rping-like WRITE + READ, and SEND echoed, each verified.
        for (mode, size) in [("rc", "20000"), ("rc-send", "3000")] {
            let out = peer(
                &[
                    &peer_args[..],
                    &[
                        "--connect",
                        gid,
                        "--mode",
                        mode,
                        "--messages",
                        "20",
                        "--size",
                        size,
                    ],
                ]
                .concat(),
            );
            assert!(
                out.status.success(),
                "{mode} to {gid}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            let j = json_tail(&out);
            assert_eq!(u(&j["rc"][0], &["verified"]), 20, "{j}");
            assert_eq!(
                j["rc"][0]["mode"],
                if mode == "rc" { "rping" } else { "send" }
            );
        }
        let out = peer(
            &[
                &peer_args[..],
                &[
                    "--connect",
                    gid,
                    "--mode",
                    "ud",
                    "--messages",
                    "25",
                    "--size",
                    "500",
                ],
            ]
            .concat(),
        );
        assert!(
            out.status.success(),
            "ud to {gid}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(u(&json_tail(&out), &["ud", "verified"]), 25);
    }
    b.wait_for("connects done", Duration::from_secs(60));
    let jb = b.stop();
    let ja = a.stop();
    assert_eq!(ja["connects_failed"].as_array().map(Vec::len), Some(0));
    assert_eq!(
        jb["connects_failed"].as_array().map(Vec::len),
        Some(0),
        "{jb}"
    );
    // 2 VMs × 4 targets, minus each VM's own GID.
    assert_eq!(u(&jb, &["connects_ok"]), 6);
    for j in [&ja, &jb] {
        for k in [
            "no_owner",
            "queue_full",
            "truncated",
            "malformed",
            "unknown_comm_id",
            "refused_spoofed",
        ] {
            assert_eq!(u(j, &["mux", k]), 0, "{k} in {j}");
        }
        for k in ["rx_bad_icrc", "rx_malformed", "rx_no_qp", "rx_bad_qkey"] {
            assert_eq!(u(j, &["port", k]), 0, "{k} in {j}");
        }
        for vm in j["vms"].as_array().expect("vms") {
            assert_eq!(u(vm, &["cm", "wrong_dgid"]), 0, "{vm}");
            assert_eq!(
                u(vm, &["mux", "delivered"]),
                u(vm, &["cm", "received"]),
                "{vm}"
            );
        }
    }
    // Host A's VMs 1 and 3 each accepted one connection from each of B's two VMs.
    let va = ja["vms"].as_array().expect("vms");
    assert_eq!(u(&va[0], &["cm", "established"]), 2);
    assert_eq!(
        u(&va[1], &["cm", "established"]),
        5,
        "peer's 3 rounds and 2 data sessions"
    );
    assert_eq!(u(&va[2], &["cm", "established"]), 2);
}

/// A peer connecting to a GID no VM registered fails (exit 1) and the host counts the drop.
#[test]
fn rdma_peer_to_unregistered_gid_fails_and_is_counted() {
    // The host's own address is one of its addresses that no VM registered.
    let a = HostProc::start(&[
        "--addr",
        "127.42.0.1",
        "--vms",
        "1",
        "--gid-base",
        "127.42.1.1",
    ]);
    let out = peer(&[
        "--addr",
        "127.42.0.9",
        "--connect",
        "127.42.0.1",
        "--cm-timeout",
        "12",
        "--cm-retries",
        "2",
    ]);
    assert_eq!(out.status.code(), Some(1));
    let j = json_tail(&out);
    assert_eq!(j["ok"], false);
    assert!(
        j["error"]
            .as_str()
            .unwrap_or_default()
            .contains("timed out"),
        "{j}"
    );
    let ja = a.stop();
    // REQ, 2 retries, and the REJ (timeout).
    assert_eq!(u(&ja, &["mux", "no_owner"]), 4, "{ja}");
    assert_eq!(u(&ja["vms"][0], &["cm", "received"]), 0);
}

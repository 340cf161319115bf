//! Migration you can trust, between real `ferry` processes: TLS with mutual authentication
//! (certificates made by the documented recipe, scripts/migration-tls-certs.sh), a destination
//! that refuses strangers and goes on listening for the real source.
mod common;
use common::{api, last_json, spawn_receiver, text, wait_for_socket, Proc, TempDir};

use std::{
    io::{Read, Write},
    net::TcpStream,
    path::Path,
    process::{Command, Output, Stdio},
    time::{Duration, Instant},
};

use serde_json::{json, Value};

fn ferry() -> Command {
    Command::new(env!("CARGO_BIN_EXE_ferry"))
}

/// Runs the documented recipe into `dir`.
fn certs(dir: &Path) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/migration-tls-certs.sh");
    let out = Command::new("bash")
        .arg(script)
        .arg(dir)
        .output()
        .expect("bash runs the certificate recipe");
    assert!(
        out.status.success(),
        "the certificate recipe failed (is openssl installed?): {}",
        text(&out.stderr)
    );
}

/// Waits until the VM behind `p` makes progress, then checks its ledger.
fn assert_running_and_verifiable(p: &Path) {
    let progress = || {
        api(p, json!({"cmd": "status"}))["data"]["progress"]
            .as_u64()
            .unwrap()
    };
    let a = progress();
    let deadline = Instant::now() + Duration::from_secs(30);
    while progress() == a {
        assert!(
            Instant::now() < deadline,
            "the VM behind {} is not running",
            p.display()
        );
        std::thread::yield_now();
    }
    let v = api(p, json!({"cmd": "verify"}));
    assert_eq!(v["ok"], true, "{v}");
    assert_eq!(v["data"]["status"], 0, "ledger broken: {v}");
}

fn tls_args(dir: &Path, node: &str, ca: &Path) -> Vec<String> {
    vec![
        "--tls-cert".into(),
        dir.join(format!("{node}.crt")).display().to_string(),
        "--tls-key".into(),
        dir.join(format!("{node}.key")).display().to_string(),
        "--tls-ca".into(),
        ca.display().to_string(),
    ]
}

fn migrate(api_sock: &Path, to: &str, extra: &[String]) -> Output {
    ferry()
        .args([
            "migrate",
            "--api-socket",
            api_sock.to_str().unwrap(),
            "--to",
            to,
        ])
        .args(["--json", "--debug-hash"])
        .args(extra)
        .output()
        .unwrap()
}

#[test]
fn strangers_are_refused_and_the_real_source_migrates_over_tls() {
    let dir = TempDir::new("mig-tls");
    let (pki, rogue) = (dir.path("pki"), dir.path("rogue"));
    certs(&pki);
    certs(&rogue);
    let ca = pki.join("ca.crt");
    let (sa, sb) = (dir.path("a.sock"), dir.path("b.sock"));

    let mut src = ferry();
    src.args([
        "run",
        "--workload",
        "dirty",
        "--memory",
        "128M",
        "--working-set",
        "16M",
    ])
    .args(["--serial", "off", "--json", "--timeout", "300s"])
    .args(["--api-socket", sa.to_str().unwrap()])
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let source = Proc(Some(src.spawn().unwrap()), None);
    wait_for_socket(&sa);

    let mut dst = ferry();
    dst.args([
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
        "300s",
        "--timeout",
        "300s",
    ])
    .args(["--api-socket", sb.to_str().unwrap()])
    .args(tls_args(&pki, "destination", &ca));
    let (dest, addr) = spawn_receiver(&mut dst);

    // No credentials: a plain-TCP source.
    let out = migrate(&sa, &addr, &[]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    // Garbage, and a peer that connects and says nothing at all.
    let _silent = TcpStream::connect(&addr).unwrap();
    let mut garbage = TcpStream::connect(&addr).unwrap();
    garbage
        .write_all(b"GET / HTTP/1.1\r\nHost: ferry\r\n\r\n")
        .unwrap();
    garbage
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let mut sink = Vec::new();
    let _ = garbage.read_to_end(&mut sink);
    // Wrong credentials: a certificate from another CA.
    let out = migrate(&sa, &addr, &tls_args(&rogue, "source", &ca));
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    // A source that does not trust the destination's CA refuses it.
    let out = migrate(&sa, &addr, &tls_args(&pki, "source", &rogue.join("ca.crt")));
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    // The source kept running through all of it.
    assert_running_and_verifiable(&sa);

    // The real source.
    let out = migrate(&sa, &addr, &tls_args(&pki, "source", &ca));
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["outcome"], "completed", "{report}");
    assert_eq!(report["tls"], true, "{report}");

    let src_out = source.wait_output(Duration::from_secs(60));
    let src_json = last_json(&src_out);
    assert_eq!(src_json["outcome"], "migrated", "{src_json}");
    assert_eq!(src_json["failed_migrations"].as_array().unwrap().len(), 3);

    wait_for_socket(&sb);
    assert_running_and_verifiable(&sb);
    assert_eq!(
        api(&sb, json!({"cmd": "stop"}))["ok"],
        true,
        "the destination stops on request"
    );
    let out = dest.wait_output(Duration::from_secs(60));
    let summary = last_json(&out);
    assert_eq!(summary["incoming"]["tls"], true, "{summary}");
    assert_eq!(
        summary["incoming"]["memory_hash"], report["memory_hash"],
        "memory identical at pause and resume"
    );
    let log = text(&out.stderr);
    assert!(
        log.contains("connection(s) refused before the source arrived"),
        "{log}"
    );
}

#[test]
fn a_plain_listener_off_loopback_is_refused_unless_asked_for() {
    let out = ferry()
        .args(["receive", "--listen", "0.0.0.0:0", "--accept-timeout", "1s"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(err.contains("without authentication"), "{err}");
}

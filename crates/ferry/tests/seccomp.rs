//! The system-call filters are on by default in `ferry run` (vCPU and event-loop threads say
//! so in their debug log) and `--seccomp=off` leaves them off; the guest runs either way.
use std::process::Command;

/// stderr without the ANSI colour sequences tracing writes.
fn plain(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

fn hello(extra: &[&str]) -> (std::process::ExitStatus, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args(extra)
        .args(["run", "--workload", "hello", "--timeout", "60s"])
        .env("RUST_LOG", "sandbox=debug")
        .env_remove("FERRY_SECCOMP")
        .output()
        .expect("run ferry");
    (out.status, plain(&out.stderr))
}

fn installed(stderr: &str, kind: &str) -> bool {
    stderr
        .lines()
        .any(|l| l.contains("seccomp filter installed") && l.contains(&format!("kind={kind} ")))
}

#[test]
fn filters_are_on_by_default() {
    let (status, stderr) = hello(&[]);
    assert!(status.success(), "{status:?}\n{stderr}");
    assert!(installed(&stderr, "vcpu"), "{stderr}");
    assert!(installed(&stderr, "event-loop"), "{stderr}");
    assert!(
        !stderr.contains("without its system-call filter"),
        "{stderr}"
    );
}

#[test]
fn seccomp_off_installs_none() {
    let (status, stderr) = hello(&["--seccomp=off"]);
    assert!(status.success(), "{status:?}\n{stderr}");
    assert!(!stderr.contains("seccomp filter installed"), "{stderr}");
}

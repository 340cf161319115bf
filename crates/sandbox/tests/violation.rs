//! A forbidden system call stops the process: a thread under the vCPU filter calls `unshare`
//! (a step out of a sandbox; no vCPU ever makes it) in a child process (this test binary run
//! again), which must die by SIGSYS after the handler's line naming the call and the thread's
//! kind. Opening a file is refused (EACCES) without a kill. With `log` both go through; with
//! `off` there is no filter.
use std::{os::unix::process::ExitStatusExt, process::Command};

/// In the child: which mode to run the forbidden call under.
const CHILD_ENV: &str = "SANDBOX_TEST_CHILD_MODE";

/// The child's part: install the vCPU filter on a thread, then open a file there.
#[test]
fn child() {
    let Ok(mode) = std::env::var(CHILD_ENV) else {
        return; // run as an ordinary test: nothing to do
    };
    // No core file from the SIGSYS death.
    let none = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: setrlimit reads the struct it is given; lowering our own limit is always allowed.
    unsafe { libc::setrlimit(libc::RLIMIT_CORE, &none) };
    sandbox::set_mode(mode.parse().expect("a mode"));
    std::thread::Builder::new()
        .name("vcpu0".into())
        .spawn(|| {
            let installed = sandbox::try_enter(sandbox::Kind::Vcpu).expect("filter installed");
            eprintln!("filter installed: {installed}");
            // Refused with EACCES (glibc's malloc opens files from any thread).
            let opened = std::fs::File::open("/proc/self/status");
            eprintln!("opened: {}", opened.is_ok());
            if let Err(e) = &opened {
                eprintln!("open error: {:?}", e.raw_os_error());
            }
            // SAFETY: unshare takes flags only; in the child this process may end here.
            let r = unsafe { libc::unshare(libc::CLONE_NEWUSER) };
            eprintln!("unshare returned {r}");
        })
        .expect("thread")
        .join()
        .expect("no panic");
    eprintln!("child survived");
}

fn run_child(mode: &str) -> (std::process::ExitStatus, String) {
    let out = Command::new(std::env::current_exe().expect("test binary"))
        .args(["--exact", "child", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, mode)
        .output()
        .expect("run the child");
    (
        out.status,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn a_forbidden_call_kills_the_process_by_sigsys_with_a_message() {
    let (status, stderr) = run_child("on");
    assert_eq!(
        status.signal(),
        Some(libc::SIGSYS),
        "status {status:?}, stderr:\n{stderr}"
    );
    let line = format!(
        "ferry: seccomp: a vcpu thread made the forbidden system call {};",
        libc::SYS_unshare
    );
    assert!(stderr.contains(&line), "stderr:\n{stderr}");
    assert!(stderr.contains("opened: false"), "stderr:\n{stderr}");
    assert!(
        stderr.contains(&format!("open error: Some({})", libc::EACCES)),
        "stderr:\n{stderr}"
    );
    assert!(!stderr.contains("unshare returned"), "stderr:\n{stderr}");
    assert!(!stderr.contains("child survived"), "stderr:\n{stderr}");
}

#[test]
fn log_mode_lets_the_call_through() {
    let (status, stderr) = run_child("log");
    assert!(status.success(), "status {status:?}, stderr:\n{stderr}");
    assert!(
        stderr.contains("filter installed: true"),
        "stderr:\n{stderr}"
    );
    assert!(
        stderr.contains("opened: true") && stderr.contains("child survived"),
        "stderr:\n{stderr}"
    );
}

#[test]
fn off_installs_nothing() {
    let (status, stderr) = run_child("off");
    assert!(status.success(), "status {status:?}, stderr:\n{stderr}");
    assert!(
        stderr.contains("filter installed: false"),
        "stderr:\n{stderr}"
    );
    assert!(
        stderr.contains("opened: true") && stderr.contains("child survived"),
        "stderr:\n{stderr}"
    );
}

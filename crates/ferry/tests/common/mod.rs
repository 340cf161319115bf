//! Helpers shared by the integration tests that start real `ferry` processes. Each test file
//! uses a part of them.
#![allow(dead_code)]
use std::{
    fmt::Display,
    io::{BufRead, BufReader, Read, Write},
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::{mpsc, Arc, Condvar, Mutex},
    time::{Duration, Instant},
};

use serde_json::{json, Value};

/// How long a test waits for anything a process reports: generous, since two noisy cores may
/// not schedule a vCPU for a while. Waits end as soon as the condition holds.
pub const PATIENCE: Duration = Duration::from_secs(60);

/// Polls `cond` until it holds; fails the test with `what` after `limit`.
pub fn wait_until(what: impl Display, limit: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !cond() {
        assert!(Instant::now() < deadline, "{what}: not within {limit:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits until a file (a device's socket, say) exists.
pub fn wait_for_path(p: &Path) {
    wait_until(format!("{} appears", p.display()), PATIENCE, || p.exists());
}

/// One control-API call; returns its result line.
pub fn api(p: &Path, req: Value) -> Value {
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

/// The VM's `status` through its API.
pub fn status(p: &Path) -> Value {
    api(p, json!({"cmd": "status"}))
}

/// Waits until the guest behind the API at `p` reports at least `n` units of progress (page
/// writes for `dirty`, I/Os for `nvme-verify`).
pub fn wait_progress(p: &Path, n: u64) {
    wait_until(
        format!("the guest behind {} makes {n} progress", p.display()),
        PATIENCE,
        || status(p)["data"]["progress"].as_u64() >= Some(n),
    );
}

/// A child's output stream, collected by a thread as it comes, so a test can wait for a line.
pub struct Stream(Arc<(Mutex<(String, bool)>, Condvar)>);

impl Stream {
    /// Starts collecting `r`.
    pub fn collect(r: impl Read + Send + 'static) -> Stream {
        let shared = Arc::new((Mutex::new((String::new(), false)), Condvar::new()));
        let sh = shared.clone();
        std::thread::spawn(move || {
            let mut r = BufReader::new(r);
            loop {
                let mut line = String::new();
                let n = r.read_line(&mut line).unwrap_or(0);
                let mut g = sh.0.lock().unwrap();
                g.0.push_str(&line);
                g.1 = n == 0;
                sh.1.notify_all();
                if n == 0 {
                    break;
                }
            }
        });
        Stream(shared)
    }

    /// Waits until `needle` occurs `count` times (fails the test after `limit` or at the
    /// stream's end without it).
    pub fn wait_for(&self, needle: &str, count: usize, limit: Duration) {
        let deadline = Instant::now() + limit;
        let mut g = self.0 .0.lock().unwrap();
        while g.0.matches(needle).count() < count {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero() && !g.1,
                "{count} x {needle:?} never came within {limit:?}:\n{}",
                g.0
            );
            g = self.0 .1.wait_timeout(g, left).unwrap().0;
        }
    }

    /// Everything up to the stream's end (waits up to `limit` for it).
    pub fn finish(&self, limit: Duration) -> String {
        let g = self.0 .0.lock().unwrap();
        let g = self.0 .1.wait_timeout_while(g, limit, |g| !g.1).unwrap().0;
        g.0.clone()
    }
}

/// Lossy UTF-8.
pub fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// The JSON summary a `--json` run prints as its last stdout line.
pub fn last_json(out: &Output) -> serde_json::Value {
    let s = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(s.lines().last().unwrap_or(""))
        .unwrap_or_else(|e| panic!("{e}: {s}\nstderr: {}", text(&out.stderr)))
}

/// Waits until a Unix socket at `p` accepts connections.
pub fn wait_for_socket(p: &Path) {
    wait_until(format!("{} accepts", p.display()), PATIENCE, || {
        UnixStream::connect(p).is_ok()
    });
}

/// Spawns a `ferry receive` command and returns it with the address it listens on (its first
/// stderr line); the rest of stderr is collected for [`Proc::wait_output`].
pub fn spawn_receiver(cmd: &mut Command) -> (Proc, String) {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut err = BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    err.read_line(&mut line).unwrap();
    let addr = line
        .trim()
        .strip_prefix("ferry: waiting for a migration on ")
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
        .to_string();
    let (tx, rx) = mpsc::channel::<String>();
    std::thread::spawn(move || {
        let mut rest = String::new();
        let _ = err.read_to_string(&mut rest);
        let _ = tx.send(rest);
    });
    (Proc(Some(child), Some(rx)), addr)
}

/// A temporary directory, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    /// `ferry-test-{tag}-{pid}` under the system temp directory, empty.
    pub fn new(tag: &str) -> Self {
        let p = std::env::temp_dir().join(format!("ferry-test-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }

    /// `name` inside it.
    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A child process killed on drop, so a failing test leaves nothing behind. `.1` collects
/// stderr when a reader thread took it over.
pub struct Proc(pub Option<Child>, pub Option<mpsc::Receiver<String>>);

impl Proc {
    /// Waits up to `limit` for the process to exit (killing it and failing the test after
    /// that) and returns its output.
    pub fn wait_output(mut self, limit: Duration) -> Output {
        let mut child = self.0.take().unwrap();
        let deadline = Instant::now() + limit;
        while child.try_wait().unwrap().is_none() {
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("process did not exit within {limit:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let mut out = child.wait_with_output().unwrap();
        if let Some(rx) = self.1.take() {
            out.stderr = rx
                .recv_timeout(Duration::from_secs(10))
                .unwrap_or_default()
                .into_bytes();
        }
        out
    }

    /// Kills the process (if still there) and reaps it.
    pub fn kill(&mut self) {
        if let Some(c) = self.0.as_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Waits (bounded) until the VM behind the API socket `p` makes progress, then asks its guest
/// to verify its ledger and checks that it holds.
pub fn assert_running_and_verifiable(p: &Path) {
    let progress = || status(p)["data"]["progress"].as_u64().unwrap();
    let a = progress();
    // a loaded machine may not schedule the vCPU for a while: wait, with a bound
    wait_until(
        format!("the VM behind {} runs", p.display()),
        PATIENCE,
        || progress() != a,
    );
    let v = api(p, serde_json::json!({"cmd": "verify"}));
    assert_eq!(v["ok"], true, "{v}");
    assert_eq!(v["data"]["status"], 0, "ledger broken: {v}");
}

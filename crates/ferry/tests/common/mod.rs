//! Helpers shared by the integration tests that start real `ferry` processes. Each test file
//! uses a part of them.
#![allow(dead_code)]
use std::{
    io::{BufRead, BufReader, Read},
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

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

/// Waits (up to 30 s) until a Unix socket at `p` accepts connections.
pub fn wait_for_socket(p: &Path) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while UnixStream::connect(p).is_err() {
        assert!(Instant::now() < deadline, "{} never appeared", p.display());
        std::thread::sleep(Duration::from_millis(20));
    }
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

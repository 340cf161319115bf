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

/// An HTTP answer read off the API socket (the server closes every connection after it).
#[derive(Debug)]
pub struct HttpReply {
    /// Status code.
    pub status: u16,
    /// Headers, names in lower case.
    pub headers: Vec<(String, String)>,
    /// The body, de-chunked.
    pub body: Vec<u8>,
    /// True when it came chunked.
    pub chunked: bool,
}

impl HttpReply {
    /// A header's value.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// The body as one JSON value.
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("{e}: body {:?}", text(&self.body)))
    }

    /// The body as NDJSON lines.
    pub fn lines(&self) -> Vec<Value> {
        text(&self.body)
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: line {l:?}")))
            .collect()
    }
}

/// Decodes a chunked body (strictly: every size line, chunk and CRLF in place).
fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let end = b
            .windows(2)
            .position(|w| w == b"\r\n")
            .expect("chunk size line");
        let size = std::str::from_utf8(&b[..end]).unwrap();
        let size = usize::from_str_radix(size.split(';').next().unwrap().trim(), 16)
            .unwrap_or_else(|_| panic!("bad chunk size {size:?}"));
        b = &b[end + 2..];
        if size == 0 {
            assert!(b.starts_with(b"\r\n"), "chunked body ends with CRLF");
            return out;
        }
        out.extend_from_slice(&b[..size]);
        assert_eq!(&b[size..size + 2], b"\r\n", "chunk ends with CRLF");
        b = &b[size + 2..];
    }
}

/// Parses a whole answer.
pub fn parse_reply(raw: &[u8]) -> HttpReply {
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no HTTP head in {:?}", text(raw)));
    let head = text(&raw[..split]);
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap();
    let mut parts = status_line.splitn(3, ' ');
    assert_eq!(parts.next(), Some("HTTP/1.1"), "{status_line}");
    let status = parts.next().unwrap().parse().unwrap();
    let headers: Vec<(String, String)> = lines
        .map(|l| {
            let (n, v) = l.split_once(':').unwrap_or_else(|| panic!("header {l:?}"));
            (n.trim().to_ascii_lowercase(), v.trim().to_string())
        })
        .collect();
    let chunked = headers
        .iter()
        .any(|(n, v)| n == "transfer-encoding" && v.contains("chunked"));
    let rest = &raw[split + 4..];
    let body = if chunked {
        dechunk(rest)
    } else {
        let len: usize = headers
            .iter()
            .find(|(n, _)| n == "content-length")
            .map(|(_, v)| v.parse().unwrap())
            .expect("Content-Length or chunked");
        assert_eq!(rest.len(), len, "body length");
        rest.to_vec()
    };
    HttpReply {
        status,
        headers,
        body,
        chunked,
    }
}

/// Sends `raw` bytes to the API at `p` and reads the whole answer.
pub fn http_raw(p: &Path, raw: &[u8]) -> HttpReply {
    let mut s = UnixStream::connect(p).unwrap();
    s.set_read_timeout(Some(PATIENCE * 4)).unwrap();
    // A server that refuses a connection at once may close it before the request is written:
    // its answer is still there to read.
    let _ = s.write_all(raw);
    let mut answer = Vec::new();
    if let Err(e) = s.read_to_end(&mut answer) {
        assert!(!answer.is_empty(), "reading the answer: {e}");
    }
    parse_reply(&answer)
}

/// One HTTP request to the API at `p`: `method` on `/api/v1{path}`, with a JSON body.
pub fn http(p: &Path, method: &str, path: &str, body: Option<&Value>) -> HttpReply {
    let mut req = format!("{method} /api/v1{path} HTTP/1.1\r\nHost: localhost\r\n");
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    if method != "GET" {
        req += &format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            body.len()
        );
    }
    req += "\r\n";
    req += &body;
    http_raw(p, req.as_bytes())
}

/// One control-API call, in the shape of the old JSON-lines API so call sites read the same:
/// `req` is `{"cmd": "status" | "verify" | "memory-hash" | "stop" | "cancel-migration" | "resume" |
/// "migrate", ...}`,
/// sent to its endpoint; the answer is `{"ok": bool, "data": ..., "error": ..., "status": code}`
/// (a migration's: its stream's last line, `progress` the events before it).
pub fn api(p: &Path, req: Value) -> Value {
    let mut body = req.clone();
    body.as_object_mut().unwrap().remove("cmd");
    let (method, path, body) = match req["cmd"].as_str().unwrap() {
        "status" => ("GET", "/vm.info", None),
        "verify" => ("PUT", "/vm.verify", None),
        "memory-hash" => ("GET", "/vm.memory-hash", None),
        "stop" => ("PUT", "/vm.shutdown", None),
        "cancel-migration" => ("PUT", "/vm.cancel-migration", None),
        "resume" => ("PUT", "/vm.resume", Some(body)),
        "migrate" => ("PUT", "/vm.send-migration", Some(body)),
        other => panic!("no endpoint for {other:?}"),
    };
    let r = http(p, method, path, body.as_ref());
    if r.chunked {
        let mut lines = r.lines();
        let mut last = lines.pop().expect("a result line");
        assert_eq!(last["event"], "result", "{last}");
        last["status"] = r.status.into();
        last["progress"] = lines.into();
        return last;
    }
    let v = r.json();
    if (200..300).contains(&r.status) {
        json!({"ok": true, "data": v, "status": r.status})
    } else {
        json!({"ok": false, "error": v["error"], "status": r.status})
    }
}

/// The VM's state (`GET /api/v1/vm.info`) through its API, as `{"ok": true, "data": ...}`.
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

    /// Sends SIGUSR2: the guest's `dirty` or `nvme-verify` workload finishes now as if its
    /// `--duration` had run out (it verifies, then exits with its own status).
    pub fn finish(&self) {
        let pid = self.0.as_ref().expect("a running process").id();
        // SAFETY: kill(2) on our own child, not reaped yet (so the pid is still its own).
        let r = unsafe { libc::kill(pid as libc::pid_t, libc::SIGUSR2) };
        assert_eq!(
            r,
            0,
            "SIGUSR2 to {pid}: {}",
            std::io::Error::last_os_error()
        );
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

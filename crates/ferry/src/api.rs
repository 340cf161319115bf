//! The control API of a running VM: a Unix socket speaking JSON lines (Cloud Hypervisor's
//! `ch-remote` is the model). A client sends one request line and reads response lines: zero
//! or more `progress` events, then one `result`.
//!
//! ```text
//! → {"cmd":"migrate","to":"127.0.0.1:7000","downtime_ms":50}
//! ← {"event":"progress","phase":"precopy","round":1,...}
//! ← {"event":"result","ok":true,"data":{...migration report...}}
//! ```
use std::{
    io::{BufRead, BufReader, Read, Write},
    os::unix::net::{UnixListener, UnixStream},
    path::{Path, PathBuf},
    sync::{
        mpsc::{self, Receiver, Sender},
        Arc, Condvar, Mutex,
    },
    time::Duration,
};

use anyhow::{bail, Context};
use vmm_sys_util::eventfd::EventFd;

/// Longest request line accepted.
const MAX_REQUEST: u64 = 64 << 10;

pub use control::command::{MigrateRequest, Pending, Request, Response};

/// Longest a dropped [`ApiServer`] waits for answers still being written to their clients.
const FLUSH_ANSWERS: Duration = Duration::from_secs(2);

/// A listening API socket; removed again when dropped.
pub struct ApiServer {
    path: PathBuf,
    /// Requests for the supervisor.
    pub requests: Receiver<Pending>,
    /// Written (incremented) after every request sent on `requests`: the supervisor's event
    /// loop waits on it.
    pub wake: Arc<EventFd>,
    /// Connections whose request went to the supervisor and whose answer is not written yet.
    answering: Arc<(Mutex<usize>, Condvar)>,
}

impl control::command::CommandSource for ApiServer {
    fn requests(&self) -> &Receiver<Pending> {
        &self.requests
    }

    fn wake_fd(&self) -> std::os::fd::RawFd {
        std::os::fd::AsRawFd::as_raw_fd(&*self.wake)
    }
}

impl Drop for ApiServer {
    /// Removes the socket, answers the requests the supervisor never took, and lets the answers
    /// it gave in its last moments (a verification that ended the guest, say) reach their
    /// clients before the process exits.
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
        for p in self.requests.try_iter() {
            let _ = p.reply.send(Response::err("the VM is gone"));
        }
        let (count, cv) = &*self.answering;
        let n = count.lock().unwrap_or_else(|e| e.into_inner());
        let _ = cv.wait_timeout_while(n, FLUSH_ANSWERS, |n| *n > 0);
    }
}

/// Counts a connection in [`ApiServer::answering`] while it lives.
struct Answering(Arc<(Mutex<usize>, Condvar)>);

impl Answering {
    fn new(a: &Arc<(Mutex<usize>, Condvar)>) -> Self {
        *a.0.lock().unwrap_or_else(|e| e.into_inner()) += 1;
        Answering(a.clone())
    }
}

impl Drop for Answering {
    fn drop(&mut self) {
        let (count, cv) = &*self.0;
        *count.lock().unwrap_or_else(|e| e.into_inner()) -= 1;
        cv.notify_all();
    }
}

/// Binds the API socket at `path` and serves it from background threads.
pub fn serve(path: &Path) -> anyhow::Result<ApiServer> {
    if path.exists() {
        if UnixStream::connect(path).is_ok() {
            bail!("API socket {} is in use by another process", path.display());
        }
        std::fs::remove_file(path)
            .with_context(|| format!("removing stale socket {}", path.display()))?;
    }
    let listener = UnixListener::bind(path)
        .with_context(|| format!("binding API socket {}", path.display()))?;
    let (tx, rx) = mpsc::channel();
    let answering = Arc::new((Mutex::new(0), Condvar::new()));
    let counter = answering.clone();
    let wake = Arc::new(EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)?);
    let waker = wake.clone();
    std::thread::Builder::new()
        .name("api".into())
        .spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                let tx = tx.clone();
                let counter = counter.clone();
                let waker = waker.clone();
                let _ = std::thread::Builder::new()
                    .name("api-conn".into())
                    .spawn(move || {
                        if let Err(e) = handle(conn, tx, &waker, &counter) {
                            tracing::debug!("API connection: {}", vmm::ErrorChain(e.as_ref()));
                        }
                    });
            }
        })?;
    Ok(ApiServer {
        path: path.to_path_buf(),
        requests: rx,
        wake,
        answering,
    })
}

fn handle(
    conn: UnixStream,
    supervisor: Sender<Pending>,
    wake: &EventFd,
    answering: &Arc<(Mutex<usize>, Condvar)>,
) -> anyhow::Result<()> {
    conn.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut out = conn.try_clone()?;
    let mut line = String::new();
    BufReader::new(conn.take(MAX_REQUEST)).read_line(&mut line)?;
    let request: Request = match serde_json::from_str(line.trim()) {
        Ok(r) => r,
        Err(e) => {
            writeln!(
                out,
                "{}",
                serde_json::to_string(&Response::err(format!("bad request: {e}")))?
            )?;
            return Ok(());
        }
    };
    let (reply, responses) = mpsc::channel();
    let _answering = Answering::new(answering);
    let sent = supervisor.send(Pending { request, reply });
    // The supervisor reads the counter back to zero; a full counter still wakes it.
    let _ = wake.write(1);
    if sent.is_err() {
        writeln!(
            out,
            "{}",
            serde_json::to_string(&Response::err("the VM is gone"))?
        )?;
        return Ok(());
    }
    for r in responses {
        let last = matches!(r, Response::Result { .. });
        writeln!(out, "{}", serde_json::to_string(&r)?)?;
        if last {
            break;
        }
    }
    Ok(())
}

/// Client side: sends `request` to the API at `path`; calls `on_progress` for each progress
/// event and returns the final result.
pub fn call(
    path: &Path,
    request: &Request,
    mut on_progress: impl FnMut(&migration::Progress),
) -> anyhow::Result<Response> {
    let mut conn = UnixStream::connect(path).with_context(|| {
        format!(
            "connecting to the API socket {} (is `ferry run --api-socket` running?)",
            path.display()
        )
    })?;
    writeln!(conn, "{}", serde_json::to_string(request)?)?;
    for line in BufReader::new(conn).lines() {
        let line = line.context("reading the API answer")?;
        match serde_json::from_str::<Response>(&line)
            .with_context(|| format!("API answered {line:?}"))?
        {
            Response::Progress(p) => on_progress(&p),
            r @ Response::Result { .. } => return Ok(r),
        }
    }
    bail!("the VM closed the API connection without an answer")
}

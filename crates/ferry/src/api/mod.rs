//! The control API of a running VM: HTTP/1.1 on a Unix socket, in Cloud Hypervisor's and
//! Firecracker's style (`PUT /api/v1/vm.shutdown`, JSON bodies, errors as status codes with a
//! `{"error": "..."}` body). docs/api/ferry-api.yaml is its OpenAPI document.
//!
//! ```text
//! PUT /api/v1/vm.send-migration  {"to":"127.0.0.1:7000","downtime_ms":50}
//! ← 200, chunked application/x-ndjson:
//!   {"event":"progress","phase":"precopy","round":1,...}
//!   {"event":"result","ok":true,"data":{...migration report...}}
//! ```
//!
//! The pieces: this module holds the types the supervisor sees ([`Request`], [`Response`],
//! [`Pending`], [`ApiServer`]) and binds the socket; `http` reads bounded requests and writes
//! responses; `routes` maps endpoints onto requests and answers onto status codes; `client`
//! is the other end (`ferry migrate`, `ferry resume`, `ferry remote`).
//!
//! The socket is created with mode 0600: only its owner (the VMM's user) may talk to it, since
//! whoever can reach it can stop the VM or send its memory anywhere. Put it in a directory only
//! that user can enter, too.
mod client;
mod http;
mod routes;

use std::{
    os::unix::{
        fs::{DirBuilderExt, PermissionsExt},
        net::{UnixListener, UnixStream},
    },
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicUsize, Ordering},
        mpsc::{self, Receiver, Sender},
        Arc, Condvar, Mutex,
    },
    time::Duration,
};

use anyhow::{bail, Context};
use vmm_sys_util::eventfd::EventFd;

pub use client::{call, send};
pub use routes::{route_of, route_of_ping};

/// Connections served at once; more are answered 503 at once and closed.
pub const MAX_CONNECTIONS: usize = 16;

pub use control::command::{MigrateRequest, Pending, Request, Response};

/// A listening API socket; removed again when dropped.
pub struct ApiServer {
    path: PathBuf,
    /// Requests for the supervisor.
    pub requests: Receiver<Pending>,
    /// Written (incremented) after every request sent on `requests`: the supervisor's event
    /// loop waits on it.
    #[allow(dead_code)] // for the supervisor's event loop, which polls it
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
            let _ = p.reply.send(Response::err(GONE));
        }
        let (count, cv) = &*self.answering;
        let n = count.lock().unwrap_or_else(|e| e.into_inner());
        let _ = cv.wait_timeout_while(n, FLUSH_ANSWERS, |n| *n > 0);
    }
}

/// The error text of a request the supervisor can no longer take (answered 503).
pub const GONE: &str = "the VM is gone";

/// Longest a dropped [`ApiServer`] waits for answers still being written to their clients.
const FLUSH_ANSWERS: Duration = Duration::from_secs(2);

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

/// What a connection thread needs to hand a request to the supervisor.
struct Supervisor {
    requests: Sender<Pending>,
    wake: Arc<EventFd>,
    answering: Arc<(Mutex<usize>, Condvar)>,
}

impl Supervisor {
    /// Hands `request` over and wakes the supervisor; returns where its answers come from,
    /// with the guard that keeps a dropped [`ApiServer`] waiting until they are written.
    fn submit(&self, request: Request) -> (Receiver<Response>, Answering) {
        let (reply, responses) = mpsc::channel();
        let answering = Answering::new(&self.answering);
        if let Err(mpsc::SendError(p)) = self.requests.send(Pending { request, reply }) {
            let _ = p.reply.send(Response::err(GONE));
        }
        // The supervisor reads the counter back to zero; a full counter still wakes it.
        let _ = self.wake.write(1);
        (responses, answering)
    }
}

/// A live connection, counted against [`MAX_CONNECTIONS`].
struct Slot(Arc<AtomicUsize>);

impl Slot {
    fn take(live: &Arc<AtomicUsize>) -> Option<Slot> {
        live.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
            (n < MAX_CONNECTIONS).then_some(n + 1)
        })
        .ok()
        .map(|_| Slot(live.clone()))
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Binds `path` with mode 0600 from the start: the socket is made inside a fresh directory only
/// this user can enter, given its mode there, and then renamed into place, so nobody else can
/// connect in between.
fn bind_private(path: &Path) -> anyhow::Result<UnixListener> {
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty());
    let dir = dir.unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .context("the API socket path has no file name")?;
    let private = dir.join(format!(
        ".{}.{}.tmp",
        name.to_string_lossy(),
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&private);
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&private)
        .with_context(|| format!("creating {}", private.display()))?;
    let inner = private.join("api.sock");
    let bound = (|| -> anyhow::Result<UnixListener> {
        let l = UnixListener::bind(&inner)
            .with_context(|| format!("binding API socket {}", path.display()))?;
        std::fs::set_permissions(&inner, std::fs::Permissions::from_mode(0o600))
            .with_context(|| format!("making {} private", path.display()))?;
        std::fs::rename(&inner, path)
            .with_context(|| format!("moving the API socket to {}", path.display()))?;
        Ok(l)
    })();
    let _ = std::fs::remove_dir_all(&private);
    bound
}

/// Binds the API socket at `path` (mode 0600) and serves it from background threads: one
/// accepting, one per connection (at most [`MAX_CONNECTIONS`]).
pub fn serve(path: &Path) -> anyhow::Result<ApiServer> {
    if path.exists() {
        if UnixStream::connect(path).is_ok() {
            bail!("API socket {} is in use by another process", path.display());
        }
        std::fs::remove_file(path)
            .with_context(|| format!("removing stale socket {}", path.display()))?;
    }
    let listener = bind_private(path)?;
    let (tx, rx) = mpsc::channel();
    let answering = Arc::new((Mutex::new(0), Condvar::new()));
    let wake = Arc::new(EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)?);
    let supervisor = Arc::new(Supervisor {
        requests: tx,
        wake: wake.clone(),
        answering: answering.clone(),
    });
    let live = Arc::new(AtomicUsize::new(0));
    std::thread::Builder::new()
        .name("api".into())
        .spawn(move || {
            sandbox::enter(sandbox::Kind::Api);
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                let Some(slot) = Slot::take(&live) else {
                    tracing::warn!("API: {MAX_CONNECTIONS} connections busy, refusing one");
                    routes::refuse_busy(conn);
                    continue;
                };
                let supervisor = supervisor.clone();
                let spawned =
                    std::thread::Builder::new()
                        .name("api-conn".into())
                        .spawn(move || {
                            let _slot = slot;
                            if let Err(e) = routes::handle(conn, &supervisor) {
                                tracing::debug!("API connection: {}", vmm::ErrorChain(e.as_ref()));
                            }
                        });
                if let Err(e) = spawned {
                    tracing::warn!("API: no thread for a connection: {e}");
                }
            }
        })?;
    Ok(ApiServer {
        path: path.to_path_buf(),
        requests: rx,
        wake,
        answering,
    })
}

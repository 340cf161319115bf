//! The vfio-user side: regions, interrupts, the backend that forwards to the controller, and
//! the doorbell-polling thread.
use std::{
    fs::File,
    os::fd::{AsRawFd, FromRawFd},
    path::PathBuf,
    sync::{
        atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, Ordering},
        Arc, Mutex, MutexGuard,
    },
    thread::JoinHandle,
    time::Instant,
};

use vfio_bindings::bindings::vfio::{vfio_region_sparse_mmap_area, VFIO_REGION_INFO_FLAG_MMAP};
use vfio_user::SparseArea;
use vfio_user_device::{
    dma::DmaSpace,
    server::{self, Function, FunctionHost},
    ConfigSpace,
};

use crate::{
    controller::{Controller, Doorbells},
    layout::{BAR0_SIZE, DOORBELL_AREA, DOORBELL_AREA_SIZE, MSIX_VECTORS},
    namespace::Namespace,
    stats::Stats,
    wake, Error, Result,
};

/// How the polling thread waits when the device has nothing to do.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum PollMode {
    /// Spin while there is work and for a short window after, then sleep on the wake word
    /// (see [`crate::wake`]): an idle device uses (almost) no CPU.
    #[default]
    Adaptive,
    /// Always spin: lowest latency, one core burnt even when idle.
    Spin,
}

/// How to build a device.
#[derive(Clone, Debug)]
pub struct DeviceConfig {
    /// vfio-user socket to listen on (must not exist).
    pub socket: PathBuf,
    /// Backing file of namespace 1.
    pub backing: PathBuf,
    /// Namespace size in bytes (0: the file's size).
    pub size: u64,
    /// 512 or 4096.
    pub block_size: u32,
    /// Doorbell stride exponent: 9 (a page per queue pair) or 0 (all on one page).
    pub dstrd: u8,
    /// Create (and size) the backing file if needed.
    pub create: bool,
}

struct Shared {
    ctrl: Mutex<Controller>,
    stop: AtomicBool,
    /// [`PollMode`] as a number (0 adaptive, 1 spin).
    mode: AtomicU8,
    /// A second mapping of the first doorbell page, for the wake word (the controller's
    /// mapping sits behind the lock).
    wake_page: Doorbells,
    /// Times the polling thread went to sleep, and how many of those ended by a kick.
    sleeps: AtomicU64,
    kicked: AtomicU64,
    /// Idle rounds ended with a `sched_yield` (the host kicks: see [`wake::YIELD_WINDOW_KICKED`]).
    yields: AtomicU64,
}

// SAFETY: `wake_page` is only used through `Doorbells::word`, an atomic view of shared memory.
unsafe impl Sync for Shared {}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Controller> {
        self.ctrl.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn wake_word(&self) -> Option<&AtomicU32> {
        self.wake_page.word(wake::WAKE_OFFSET)
    }

    /// Wakes the polling thread if it sleeps (after a host-side doorbell or register write).
    fn kick(&self) {
        if let Some(w) = self.wake_word() {
            wake::kick_word(w);
        }
    }

    /// Wakes a host-side waiter on completions if one sleeps (after a round that completed
    /// commands): one fence and one load when nobody sleeps.
    fn kick_host(&self) {
        if let Some(w) = self.wake_page.word(wake::HOST_WAKE_OFFSET) {
            wake::kick_word(w);
        }
    }

    /// The host side kicks after every I/O doorbell ([`wake::HOST_KICKS_OFFSET`]).
    fn host_kicks(&self) -> bool {
        self.wake_page
            .word(wake::HOST_KICKS_OFFSET)
            .is_some_and(|w| w.load(Ordering::Relaxed) != 0)
    }
}

/// A running stand-in controller: the listening socket and the polling thread.
pub struct NvmeDevice {
    shared: Arc<Shared>,
    server: server::Listening,
    poller: Option<JoinHandle<()>>,
    socket: PathBuf,
    _bar_memfd: File,
}

fn memfd(name: &std::ffi::CStr, size: u64) -> Result<File> {
    // SAFETY: valid NUL-terminated name; the result is checked.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(Error::Os {
            what: "memfd_create for BAR0",
            source: std::io::Error::last_os_error(),
        });
    }
    // SAFETY: a fresh descriptor owned by nobody else.
    let f = unsafe { File::from_raw_fd(fd) };
    f.set_len(size).map_err(|source| Error::Os {
        what: "sizing the BAR0 memfd",
        source,
    })?;
    Ok(f)
}

impl NvmeDevice {
    /// Opens the backing file, creates the BAR memory, binds the socket and starts polling.
    pub fn new(cfg: &DeviceConfig) -> Result<Self> {
        if cfg.dstrd != 0 && cfg.dstrd != 9 {
            return Err(Error::Config(format!(
                "DSTRD {} (0 or 9 supported)",
                cfg.dstrd
            )));
        }
        let ns = Namespace::open(&cfg.backing, cfg.size, cfg.block_size, cfg.create)?;
        let bar = memfd(c"ferry-nvme-bar0", BAR0_SIZE)?;
        let doorbells =
            Doorbells::map(&bar, DOORBELL_AREA, DOORBELL_AREA_SIZE as usize).map_err(|source| {
                Error::Os {
                    what: "mapping the doorbell pages",
                    source,
                }
            })?;
        let wake_page = Doorbells::map(&bar, DOORBELL_AREA, 4096).map_err(|source| Error::Os {
            what: "mapping the wake word",
            source,
        })?;
        if let Some(w) = wake_page.word(wake::MAGIC_OFFSET) {
            w.store(wake::MAGIC, Ordering::Release);
        }
        let ctrl = Controller::new(ns, doorbells, cfg.dstrd);

        let mut bar0 = server::region(0, BAR0_SIZE, server::RW | VFIO_REGION_INFO_FLAG_MMAP);
        // The whole mappable range is one sparse area so that the client gets the fd.
        bar0.sparse_areas.push(SparseArea {
            area: vfio_region_sparse_mmap_area {
                offset: DOORBELL_AREA,
                size: DOORBELL_AREA_SIZE,
            },
        });
        bar0.mmap_fd = Some(bar.as_raw_fd());
        let server =
            server::listen(&cfg.socket, bar0, MSIX_VECTORS).map_err(|source| Error::VfioUser {
                path: cfg.socket.clone(),
                source,
            })?;
        let shared = Arc::new(Shared {
            ctrl: Mutex::new(ctrl),
            stop: AtomicBool::new(false),
            mode: AtomicU8::new(0),
            wake_page,
            sleeps: AtomicU64::new(0),
            kicked: AtomicU64::new(0),
            yields: AtomicU64::new(0),
        });
        let s = shared.clone();
        let poller = std::thread::Builder::new()
            .name("nvme-poll".into())
            .spawn(move || {
                sandbox::enter(sandbox::Kind::DeviceProcess);
                poll_loop(&s)
            })
            .map_err(|source| Error::Os {
                what: "spawning the polling thread",
                source,
            })?;
        tracing::info!(socket = %cfg.socket.display(), backing = %cfg.backing.display(), dstrd = cfg.dstrd, "NVMe device listening");
        Ok(NvmeDevice {
            shared,
            server,
            poller: Some(poller),
            socket: cfg.socket.clone(),
            _bar_memfd: bar,
        })
    }

    /// Accepts one client and serves it until it disconnects; the controller is then reset.
    pub fn serve_one(&self) -> Result<()> {
        let (r, seen) = server::serve_one(&self.server, self.shared.clone(), BAR0_SIZE);
        let mut c = self.shared.lock();
        if seen {
            c.stats.connections += 1;
        }
        c.disconnect();
        drop(c);
        // The client's words of the wake protocol go with it (a client that died while it
        // forwarded must not leave the device sleeping early for the next one).
        for off in [wake::HOST_KICKS_OFFSET, wake::HOST_WAKE_OFFSET] {
            if let Some(w) = self.shared.wake_page.word(off) {
                w.store(0, Ordering::SeqCst);
            }
        }
        tracing::info!("vfio-user client disconnected");
        r.map_err(|source| Error::VfioUser {
            path: self.socket.clone(),
            source,
        })
    }

    /// The counters so far.
    pub fn stats(&self) -> Stats {
        let mut s = self.shared.lock().stats.clone();
        s.poll_sleeps = self.shared.sleeps.load(Ordering::Relaxed);
        s.poll_kicked = self.shared.kicked.load(Ordering::Relaxed);
        s.poll_yields = self.shared.yields.load(Ordering::Relaxed);
        s
    }

    /// The wake protocol's words in the device's first doorbell page ([`crate::wake`]), as a
    /// host-side client sees them.
    pub fn wake_words(&self) -> Option<wake::Words<'_>> {
        // The mapping is at least one page (see `new`); `wake_page` lives as long as `self`.
        let base = self.shared.wake_page.word(0)?.as_ptr().cast::<u8>();
        // SAFETY: `base` is the start of the page-sized mapping `wake_page`, which `self`
        // keeps alive for the returned lifetime.
        unsafe { wake::words(base) }
    }

    /// Chooses how the polling thread waits for work (default [`PollMode::Adaptive`]).
    pub fn set_poll_mode(&self, mode: PollMode) {
        let m = match mode {
            PollMode::Adaptive => 0,
            PollMode::Spin => 1,
        };
        self.shared.mode.store(m, Ordering::SeqCst);
        self.shared.kick();
    }

    /// The namespace geometry: (blocks, block size).
    pub fn geometry(&self) -> (u64, u32) {
        let c = self.shared.lock();
        (c.namespace().blocks(), c.namespace().block_size())
    }

    /// Flushes the backing file.
    pub fn flush(&self) -> std::io::Result<()> {
        self.shared.lock().namespace().flush()
    }
}

impl Drop for NvmeDevice {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        self.shared.kick();
        if let Some(p) = self.poller.take() {
            let _ = p.join();
        }
    }
}

fn poll_loop(shared: &Shared) {
    let mut last_work = Instant::now();
    let mut idle = 0u32;
    let mut sleep = wake::SLEEP_MIN;
    let mut yielding = false;
    let mut pinned = wake::Pinned::new();
    while !shared.stop.load(Ordering::Relaxed) {
        // Pinned beside a kicking host (the shadow engine's poller on the same core): take a
        // few commands per round and hand the core over after each productive one, so the
        // poller forwards those completions (and the guest's next submissions) while the rest
        // wait, instead of after the whole batch.
        let pipeline = shared.host_kicks() && pinned.get();
        let burst = if pipeline {
            wake::PIPELINE_BURST
        } else {
            usize::MAX
        };
        if shared.lock().poll_burst(burst) > 0 {
            shared.kick_host();
            idle = 0;
            yielding = false;
            sleep = wake::SLEEP_MIN;
            if pipeline {
                shared.yields.fetch_add(1, Ordering::Relaxed);
                std::thread::yield_now();
            }
            continue;
        }
        idle = idle.wrapping_add(1);
        if idle == 1 {
            last_work = Instant::now();
        }
        std::hint::spin_loop();
        if shared.mode.load(Ordering::Relaxed) == 1 {
            // Always spin; now and then let another runnable thread of this core have a go.
            if idle.is_multiple_of(1 << 16) {
                std::thread::yield_now();
            }
            continue;
        }
        // Reading the clock costs ~20 ns: look every 64 idle rounds (every round once
        // yielding, where a round is a system call anyway).
        if !yielding && !idle.is_multiple_of(64) {
            continue;
        }
        let quiet = last_work.elapsed();
        let kicks = shared.host_kicks();
        if quiet
            < if kicks {
                wake::SPIN_WINDOW_KICKED
            } else {
                wake::SPIN_WINDOW
            }
        {
            continue;
        }
        // The host side kicks and this thread is pinned (to the core of the shadow engine's
        // poller, see `wake::Pinned`): hand the core over between looks for a while before
        // sleeping; the poller forwarding the next doorbells runs meanwhile, no wake-up needed.
        if kicks && quiet < wake::YIELD_WINDOW_KICKED && pinned.get() {
            yielding = true;
            shared.yields.fetch_add(1, Ordering::Relaxed);
            std::thread::yield_now();
            continue;
        }
        yielding = false;
        let Some(word) = shared.wake_word() else {
            std::thread::sleep(sleep);
            continue;
        };
        wake::prepare(word);
        if shared.mode.load(Ordering::SeqCst) == 1 || shared.stop.load(Ordering::SeqCst) {
            word.store(wake::AWAKE, Ordering::SeqCst);
            continue;
        }
        // A doorbell stored before the word said SLEEPING: its writer saw no sleeper.
        if shared.lock().poll() > 0 {
            shared.kick_host();
            word.store(wake::AWAKE, Ordering::SeqCst);
            idle = 0;
            yielding = false;
            sleep = wake::SLEEP_MIN;
            continue;
        }
        shared.sleeps.fetch_add(1, Ordering::Relaxed);
        if wake::wait(word, sleep) {
            shared.kicked.fetch_add(1, Ordering::Relaxed);
            sleep = wake::SLEEP_MIN;
        } else {
            sleep = (sleep * 2).min(wake::SLEEP_MAX);
        }
    }
}

impl FunctionHost for Shared {
    type Model = Controller;

    fn lock(&self) -> MutexGuard<'_, Controller> {
        Shared::lock(self)
    }

    /// A trapped doorbell or a register write (CC.EN, ...): the poller has work.
    fn written(&self, _region: u32) {
        self.kick();
    }
}

impl Function for Controller {
    fn bar_read(&mut self, offset: u64, data: &mut [u8]) {
        Controller::bar_read(self, offset, data);
    }
    fn bar_write(&mut self, offset: u64, data: &[u8]) {
        Controller::bar_write(self, offset, data);
    }
    fn config(&mut self) -> &mut ConfigSpace {
        &mut self.config
    }
    fn dma(&mut self) -> &mut DmaSpace {
        &mut self.dma
    }
    fn reset(&mut self) {
        Controller::reset(self);
    }
    fn set_msix(&mut self, start: u32, count: u32, fds: Vec<File>) -> bool {
        Controller::set_msix(self, start, count, fds)
    }
}

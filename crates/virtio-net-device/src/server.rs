//! The vfio-user side: regions, interrupts, the backend that forwards to the device, and the
//! worker thread that moves frames. The worker sleeps in `poll` on an eventfd (set by every
//! BAR write: notifications, status changes) and on the wire (only while the RX queue has
//! buffers), so an idle device uses no CPU.
use std::{
    fs::File,
    os::fd::{AsRawFd, RawFd},
    path::PathBuf,
    sync::{Arc, Mutex, MutexGuard},
    thread::JoinHandle,
};

use vfio_user_device::{
    dma::DmaSpace,
    server::{self, Function, FunctionHost},
    ConfigSpace,
};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::{
    device::NetDevice,
    layout::{BAR0_SIZE, MSIX_VECTORS},
    stats::Stats,
    wire::Wire,
    Error, Result,
};

/// How to build a device.
#[derive(Clone, Debug)]
pub struct DeviceConfig {
    /// vfio-user socket to listen on (must not exist).
    pub socket: PathBuf,
    /// MAC address in the device configuration.
    pub mac: [u8; 6],
    /// Announce the MAC address on the wire (a broadcast RARP) each time the driver starts
    /// the device.
    pub announce: bool,
}

struct Shared {
    dev: Mutex<NetDevice>,
    kick: EventFd,
    stop: EventFd,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, NetDevice> {
        self.dev.lock().unwrap_or_else(|e| e.into_inner())
    }
    fn wake(&self) {
        if let Err(e) = self.kick.write(1) {
            tracing::warn!("waking the worker: {e}");
        }
    }
}

/// A running stand-in NIC: the listening socket and the worker thread.
pub struct VirtioNetDevice {
    shared: Arc<Shared>,
    server: server::Listening,
    worker: Option<JoinHandle<()>>,
    socket: PathBuf,
}

fn os(what: &'static str) -> impl FnOnce(std::io::Error) -> Error {
    move |source| Error::Os { what, source }
}

impl VirtioNetDevice {
    /// Binds the socket and starts the worker on `wire`.
    pub fn new(cfg: &DeviceConfig, wire: Box<dyn Wire>) -> Result<Self> {
        let bar0 = server::region(0, BAR0_SIZE, server::RW);
        let server =
            server::listen(&cfg.socket, bar0, MSIX_VECTORS).map_err(|source| Error::VfioUser {
                path: cfg.socket.clone(),
                source,
            })?;
        let shared = Arc::new(Shared {
            dev: Mutex::new(NetDevice::new(cfg.mac).with_announce(cfg.announce)),
            kick: EventFd::new(EFD_NONBLOCK).map_err(os("creating the kick eventfd"))?,
            stop: EventFd::new(EFD_NONBLOCK).map_err(os("creating the stop eventfd"))?,
        });
        let s = shared.clone();
        let worker = std::thread::Builder::new()
            .name("virtio-net".into())
            .spawn(move || {
                sandbox::enter(sandbox::Kind::DeviceProcess);
                worker(&s, wire)
            })
            .map_err(os("spawning the worker thread"))?;
        tracing::info!(socket = %cfg.socket.display(), "virtio-net device listening");
        Ok(VirtioNetDevice {
            shared,
            server,
            worker: Some(worker),
            socket: cfg.socket.clone(),
        })
    }

    /// Accepts one client and serves it until it disconnects; the device is then reset.
    pub fn serve_one(&self) -> Result<()> {
        let (r, seen) = server::serve_one(&self.server, self.shared.clone(), BAR0_SIZE);
        {
            let mut d = self.shared.lock();
            if seen {
                d.stats.connections += 1;
            }
            d.disconnect();
        }
        tracing::info!("vfio-user client disconnected");
        r.map_err(|source| Error::VfioUser {
            path: self.socket.clone(),
            source,
        })
    }

    /// The counters so far.
    pub fn stats(&self) -> Stats {
        self.shared.lock().stats.clone()
    }
}

impl Drop for VirtioNetDevice {
    fn drop(&mut self) {
        let _ = self.shared.stop.write(1);
        if let Some(w) = self.worker.take() {
            let _ = w.join();
        }
    }
}

/// Waits until one of `fds` is readable or `timeout_ms` passed (-1: no timeout).
fn wait(fds: &[RawFd], timeout_ms: i32) {
    let mut p: Vec<libc::pollfd> = fds
        .iter()
        .map(|&fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    // SAFETY: `p` is a valid array of `p.len()` pollfds for the call's duration.
    let r = unsafe { libc::poll(p.as_mut_ptr(), p.len() as libc::nfds_t, timeout_ms) };
    if r < 0 {
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            tracing::warn!("poll: {e}");
        }
    }
}

fn worker(shared: &Shared, mut wire: Box<dyn Wire>) {
    loop {
        let progress = shared.lock().process(wire.as_mut());
        if shared.stop.read().is_ok() {
            return;
        }
        if progress.completed > 0 && !progress.rx_starved && !progress.wire_error {
            // More may be waiting on the wire: go round again before sleeping.
            continue;
        }
        let mut fds = vec![shared.kick.as_raw_fd(), shared.stop.as_raw_fd()];
        // Nothing wakes the worker but notifications while the RX queue has no buffer; after
        // a wire error, it looks again in 100 ms rather than spin on a failing wire.
        let timeout = if progress.wire_error { 100 } else { -1 };
        if !progress.rx_starved && !progress.wire_error {
            fds.push(wire.fd());
        }
        wait(&fds, timeout);
        let _ = shared.kick.read();
    }
}

impl FunctionHost for Shared {
    type Model = NetDevice;

    fn lock(&self) -> MutexGuard<'_, NetDevice> {
        Shared::lock(self)
    }

    /// A BAR0 write (a notification, a status change): the worker has work.
    fn written(&self, region: u32) {
        if region == 0 {
            self.wake();
        }
    }
}

impl Function for NetDevice {
    fn bar_read(&mut self, offset: u64, data: &mut [u8]) {
        NetDevice::bar_read(self, offset, data);
    }
    fn bar_write(&mut self, offset: u64, data: &[u8]) {
        NetDevice::bar_write(self, offset, data);
    }
    fn config(&mut self) -> &mut ConfigSpace {
        &mut self.config
    }
    fn dma(&mut self) -> &mut DmaSpace {
        &mut self.dma
    }
    fn reset(&mut self) {
        NetDevice::reset(self);
    }
    fn set_msix(&mut self, start: u32, count: u32, fds: Vec<File>) -> bool {
        NetDevice::set_msix(self, start, count, fds)
    }
}

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

use vfio_bindings::bindings::vfio::{
    vfio_region_info, VFIO_IRQ_INFO_EVENTFD, VFIO_PCI_CONFIG_REGION_INDEX, VFIO_PCI_MSIX_IRQ_INDEX,
    VFIO_PCI_NUM_IRQS, VFIO_PCI_NUM_REGIONS, VFIO_REGION_INFO_FLAG_READ,
    VFIO_REGION_INFO_FLAG_WRITE,
};
use vfio_user::{DmaMapFlags, DmaUnmapFlags, IrqInfo, Server, ServerBackend, ServerRegion};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::{
    device::NetDevice,
    layout::{BAR0_SIZE, CONFIG_SIZE, MSIX_VECTORS},
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
    server: Server,
    worker: Option<JoinHandle<()>>,
    socket: PathBuf,
}

fn region(index: u32, size: u64, flags: u32) -> ServerRegion {
    ServerRegion {
        region_info: vfio_region_info {
            argsz: std::mem::size_of::<vfio_region_info>() as u32,
            flags,
            index,
            cap_offset: 0,
            size,
            offset: 0,
        },
        sparse_areas: Vec::new(),
        mmap_fd: None,
    }
}

fn os(what: &'static str) -> impl FnOnce(std::io::Error) -> Error {
    move |source| Error::Os { what, source }
}

impl VirtioNetDevice {
    /// Binds the socket and starts the worker on `wire`.
    pub fn new(cfg: &DeviceConfig, wire: Box<dyn Wire>) -> Result<Self> {
        let rw = VFIO_REGION_INFO_FLAG_READ | VFIO_REGION_INFO_FLAG_WRITE;
        let mut regions: Vec<ServerRegion> =
            (0..VFIO_PCI_NUM_REGIONS).map(|i| region(i, 0, 0)).collect();
        regions[0] = region(0, BAR0_SIZE, rw);
        regions[VFIO_PCI_CONFIG_REGION_INDEX as usize] =
            region(VFIO_PCI_CONFIG_REGION_INDEX, CONFIG_SIZE, rw);
        let irqs = (0..VFIO_PCI_NUM_IRQS)
            .map(|index| IrqInfo {
                index,
                flags: VFIO_IRQ_INFO_EVENTFD,
                count: if index == VFIO_PCI_MSIX_IRQ_INDEX {
                    u32::from(MSIX_VECTORS)
                } else {
                    0
                },
            })
            .collect();
        let server =
            Server::new(&cfg.socket, true, irqs, regions).map_err(|source| Error::VfioUser {
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
        let mut backend = Backend {
            shared: self.shared.clone(),
            seen: false,
        };
        // vfio_user 0.1.7 panics on some malformed messages: that ends this connection, not
        // the device process.
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            self.server.run(&mut backend)
        }))
        .unwrap_or_else(|_| {
            tracing::warn!("malformed vfio-user message; connection closed");
            Ok(())
        });
        {
            let mut d = self.shared.lock();
            if backend.seen {
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

struct Backend {
    shared: Arc<Shared>,
    /// The client sent at least one request that reached the backend.
    seen: bool,
}

/// Most bytes one region access may move (registers are 1 to 8 bytes; the vfio_user library
/// allocates what the client names before asking).
const MAX_ACCESS: usize = 4096;

fn check_access(region: u32, offset: u64, len: usize) -> std::io::Result<()> {
    let size = match region {
        0 => BAR0_SIZE,
        VFIO_PCI_CONFIG_REGION_INDEX => CONFIG_SIZE,
        _ => 0,
    };
    if len > MAX_ACCESS || offset > size {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("access of {len} bytes at {offset:#x} of region {region} ({size} bytes)"),
        ));
    }
    Ok(())
}

impl ServerBackend for Backend {
    fn region_read(&mut self, region: u32, offset: u64, data: &mut [u8]) -> std::io::Result<()> {
        self.seen = true;
        check_access(region, offset, data.len())?;
        let mut d = self.shared.lock();
        match region {
            0 => d.bar_read(offset, data),
            VFIO_PCI_CONFIG_REGION_INDEX => d.config.read(offset, data),
            _ => data.fill(0),
        }
        Ok(())
    }

    fn region_write(&mut self, region: u32, offset: u64, data: &[u8]) -> std::io::Result<()> {
        check_access(region, offset, data.len())?;
        let mut d = self.shared.lock();
        match region {
            0 => {
                d.bar_write(offset, data);
                drop(d);
                self.shared.wake();
            }
            VFIO_PCI_CONFIG_REGION_INDEX => d.config.write(offset, data),
            _ => tracing::debug!(region, offset, "write to an absent region dropped"),
        }
        Ok(())
    }

    fn dma_map(
        &mut self,
        _flags: DmaMapFlags,
        offset: u64,
        address: u64,
        size: u64,
        fd: Option<File>,
    ) -> std::io::Result<()> {
        let mut d = self.shared.lock();
        let r = match fd {
            Some(f) => d.dma.map(address, size, offset, &f),
            None => Err(nvme_device::dma::MapError::NoFd(address)),
        };
        r.map_err(|e| {
            tracing::warn!(error = &e as &dyn std::error::Error, "DMA_MAP refused");
            std::io::Error::new(std::io::ErrorKind::InvalidInput, e)
        })?;
        tracing::info!(
            iova = format_args!("{address:#x}"),
            size,
            "DMA region mapped"
        );
        Ok(())
    }

    fn dma_unmap(&mut self, _flags: DmaUnmapFlags, address: u64, size: u64) -> std::io::Result<()> {
        let n = self.shared.lock().dma.unmap(address, size);
        tracing::info!(
            iova = format_args!("{address:#x}"),
            size,
            regions = n,
            "DMA unmapped"
        );
        Ok(())
    }

    fn reset(&mut self) -> std::io::Result<()> {
        self.shared.lock().reset();
        Ok(())
    }

    fn set_irqs(
        &mut self,
        index: u32,
        _flags: u32,
        start: u32,
        count: u32,
        fds: Vec<File>,
    ) -> std::io::Result<()> {
        if index != VFIO_PCI_MSIX_IRQ_INDEX {
            return Ok(());
        }
        if self.shared.lock().set_msix(start, count, fds) {
            Ok(())
        } else {
            Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("MSI-X vectors {start}+{count} out of range"),
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn region_accesses_are_bounded_before_anything_is_touched() {
        assert!(check_access(0, 0, 0xe000_0000).is_err());
        assert!(check_access(0, BAR0_SIZE + 1, 4).is_err());
        assert!(check_access(0, 0x14, 1).is_ok());
        assert!(check_access(VFIO_PCI_CONFIG_REGION_INDEX, 0, 256).is_ok());
    }
}

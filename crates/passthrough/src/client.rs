//! The vfio-user connection shared by the PCI function, the BAR handler, the watchdog and the
//! hooks. The first failed request marks the device disconnected; later requests fail fast.
use std::{
    os::fd::AsRawFd,
    os::unix::net::UnixStream,
    path::Path,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Mutex,
    },
    time::{Duration, Instant},
};

use crate::vfio_user::{Client, ClientError};

struct Area {
    offset: u64,
    size: u64,
}

use crate::{Error, Result};

/// vfio-user region index of the PCI configuration space.
pub const CONFIG_REGION: u32 = 7;
/// vfio-user interrupt index of MSI-X.
pub const MSIX_IRQ: u32 = 2;
/// `VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER`.
pub const IRQ_SET_EVENTFD_TRIGGER: u32 = (1 << 2) | (1 << 5);

/// A mapped sparse area of a region.
pub struct MappedArea {
    /// Offset in the region.
    pub offset: u64,
    /// Length.
    pub size: u64,
    /// Host address of the mapping.
    pub host: *mut u8,
}

// SAFETY: the mapping is owned by this value and lives until drop; it is shared memory with
// the device process and only accessed with volatile operations.
unsafe impl Send for MappedArea {}
// SAFETY: as above.
unsafe impl Sync for MappedArea {}

impl Drop for MappedArea {
    fn drop(&mut self) {
        // SAFETY: mapped by `Connection::map_sparse` with this address and size.
        unsafe { libc::munmap(self.host.cast(), self.size as usize) };
    }
}

/// How long one request may wait for the device's reply before the device counts as gone.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// A vfio-user connection.
pub struct Connection {
    /// Device name for messages ("nvme0").
    pub name: String,
    /// Socket path.
    pub socket: String,
    client: Mutex<Client>,
    /// The socket, to shut it down without the client's lock.
    stream: UnixStream,
    timeout: Duration,
    /// When the request now holding the client started (ms since `epoch`; 0: none).
    busy_since: AtomicU64,
    epoch: Instant,
    lost: AtomicBool,
    lost_reason: Mutex<Option<String>>,
    /// Error replies the device sent (the request failed, the stream stayed in step).
    refused: AtomicU64,
}

impl Connection {
    /// Connects to `socket`.
    pub fn connect(name: &str, socket: &Path) -> Result<Self> {
        Self::connect_with(name, socket, REQUEST_TIMEOUT)
    }

    /// Connects to `socket`; each request waits at most `timeout` for its reply.
    pub fn connect_with(name: &str, socket: &Path, timeout: Duration) -> Result<Self> {
        // Ferry's devices publish their socket file only once it listens; other vfio-user
        // servers bind before they listen, and a device may still be starting: retry a refused
        // or missing socket for a short while (2 s), then fail (a killed device leaves its
        // file behind and refuses for good).
        let mut attempts = 0;
        let client = loop {
            match Client::connect(socket, timeout) {
                Ok(c) => break c,
                Err(ClientError::Connect(e))
                    if attempts < 100
                        && matches!(
                            e.kind(),
                            std::io::ErrorKind::ConnectionRefused | std::io::ErrorKind::NotFound
                        ) =>
                {
                    attempts += 1;
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(source) => {
                    return Err(Error::Connect {
                        name: name.into(),
                        socket: socket.display().to_string(),
                        source,
                    })
                }
            }
        };
        let stream = client.try_clone_stream().map_err(|source| Error::Os {
            what: "duplicating the device socket".into(),
            source,
        })?;
        Ok(Connection {
            name: name.into(),
            socket: socket.display().to_string(),
            client: Mutex::new(client),
            stream,
            timeout,
            busy_since: AtomicU64::new(0),
            epoch: Instant::now(),
            lost: AtomicBool::new(false),
            lost_reason: Mutex::new(None),
            refused: AtomicU64::new(0),
        })
    }

    /// True once a request failed.
    pub fn is_lost(&self) -> bool {
        self.lost.load(Ordering::SeqCst)
    }

    /// Why the connection was lost.
    pub fn lost_reason(&self) -> Option<String> {
        self.lost_reason
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Error replies the device sent so far.
    pub fn refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }

    fn mark_lost(&self, reason: String) {
        let mut r = self.lost_reason.lock().unwrap_or_else(|e| e.into_inner());
        r.get_or_insert(reason);
        self.lost.store(true, Ordering::SeqCst);
        // Whoever waits on the socket wakes up now.
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64 + 1
    }

    /// The watchdog's look at the device; never waits for the client's lock. True while the
    /// device answers: its register `offset` reads back when the client is free, or the
    /// request holding it has not been waiting longer than the request timeout (then the
    /// device counts as gone and the socket is shut down, which frees the waiter).
    pub fn check_alive(&self, offset: u64) -> bool {
        if self.is_lost() {
            return false;
        }
        match self.client.try_lock() {
            Ok(c) => {
                drop(c);
                let mut b = [0u8; 4];
                self.region_read(0, offset, &mut b).is_ok()
            }
            Err(_) => {
                let since = self.busy_since.load(Ordering::SeqCst);
                let limit = self.timeout.as_millis() as u64 * 2;
                if since != 0 && self.now_ms().saturating_sub(since) > limit {
                    self.mark_lost(format!(
                        "a request has waited over {} ms for the device",
                        limit
                    ));
                    return false;
                }
                true
            }
        }
    }

    fn with<T>(
        &self,
        what: &str,
        f: impl FnOnce(&mut Client) -> std::result::Result<T, ClientError>,
    ) -> Result<T> {
        if self.is_lost() {
            return Err(Error::Unsupported {
                name: self.name.clone(),
                reason: format!(
                    "{what}: device disconnected ({})",
                    self.lost_reason().unwrap_or_default()
                ),
            });
        }
        let mut c = self.client.lock().unwrap_or_else(|e| e.into_inner());
        self.busy_since.store(self.now_ms(), Ordering::SeqCst);
        let r = f(&mut c);
        self.busy_since.store(0, Ordering::SeqCst);
        drop(c);
        r.map_err(|source| {
            if source.is_fatal() {
                self.mark_lost(format!("{what}: {}", vmm::ErrorChain(&source)));
            } else {
                let n = self.refused.fetch_add(1, Ordering::Relaxed) + 1;
                if n.is_power_of_two() {
                    tracing::warn!(name = %self.name, refused = n, "{what}: {source}");
                }
            }
            Error::Request {
                name: self.name.clone(),
                what: what.into(),
                source,
            }
        })
    }

    /// Reads a region.
    pub fn region_read(&self, region: u32, offset: u64, data: &mut [u8]) -> Result<()> {
        self.with("region read", |c| c.region_read(region, offset, data))
    }

    /// Writes a region.
    pub fn region_write(&self, region: u32, offset: u64, data: &[u8]) -> Result<()> {
        self.with("region write", |c| c.region_write(region, offset, data))
    }

    /// Maps `size` bytes of `fd` at `offset` for the device at `iova`.
    pub fn dma_map(&self, offset: u64, iova: u64, size: u64, fd: &impl AsRawFd) -> Result<()> {
        let raw = fd.as_raw_fd();
        self.with("DMA_MAP", |c| c.dma_map(offset, iova, size, raw))
    }

    /// Unmaps a DMA range.
    pub fn dma_unmap(&self, iova: u64, size: u64) -> Result<()> {
        self.with("DMA_UNMAP", |c| c.dma_unmap(iova, size))
    }

    /// Gives the device eventfds for interrupts `start..start + fds.len()` of `index`.
    pub fn set_irqs(&self, index: u32, start: u32, fds: &[i32]) -> Result<()> {
        self.with("SET_IRQS", |c| {
            c.set_irqs(index, IRQ_SET_EVENTFD_TRIGGER, start, fds)
        })
    }

    /// Number of interrupts of `index`.
    pub fn irq_count(&self, index: u32) -> Result<u32> {
        self.with("GET_IRQ_INFO", |c| c.irq_count(index))
    }

    /// Size of region `index` (0 when absent).
    pub fn region_size(&self, index: u32) -> u64 {
        let c = self.client.lock().unwrap_or_else(|e| e.into_inner());
        c.region(index).map(|r| r.size).unwrap_or(0)
    }

    /// Maps every sparse (mappable) area of region `index`.
    pub fn map_sparse(&self, index: u32) -> Result<Vec<MappedArea>> {
        let c = self.client.lock().unwrap_or_else(|e| e.into_inner());
        let Some(region) = c.region(index) else {
            return Ok(Vec::new());
        };
        let Some((file, start)) = region.file.as_ref() else {
            return Ok(Vec::new());
        };
        let mut out = Vec::new();
        for &(offset, size) in &region.sparse_areas {
            let a = Area { offset, size };
            let end = a.offset.checked_add(a.size);
            if a.size == 0
                || !a.offset.is_multiple_of(4096)
                || !a.size.is_multiple_of(4096)
                || end.is_none_or(|e| e > region.size)
            {
                return Err(Error::Unsupported {
                    name: self.name.clone(),
                    reason: format!(
                        "sparse area {:#x}+{:#x} of region {index} is not page aligned or exceeds it",
                        a.offset, a.size
                    ),
                });
            }
            // SAFETY: a fresh shared mapping of the fd the device sent; checked below.
            let p = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    a.size as usize,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_SHARED,
                    file.as_raw_fd(),
                    (start + a.offset) as libc::off_t,
                )
            };
            if p == libc::MAP_FAILED {
                return Err(Error::Os {
                    what: format!("mapping BAR area {:#x}+{:#x}", a.offset, a.size),
                    source: std::io::Error::last_os_error(),
                });
            }
            out.push(MappedArea {
                offset: a.offset,
                size: a.size,
                host: p.cast(),
            });
        }
        Ok(out)
    }

    /// Closes the connection (the device then resets).
    pub fn shutdown(&self) {
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
    }
}

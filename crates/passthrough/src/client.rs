//! The vfio-user connection shared by the PCI function, the BAR handler, the watchdog and the
//! hooks. The first failed request marks the device disconnected; later requests fail fast.
use std::{
    os::fd::AsRawFd,
    path::Path,
    sync::{
        atomic::{AtomicBool, Ordering},
        Mutex,
    },
};

use vfio_user::Client;

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

/// A vfio-user connection.
pub struct Connection {
    /// Device name for messages ("nvme0").
    pub name: String,
    /// Socket path.
    pub socket: String,
    client: Mutex<Client>,
    lost: AtomicBool,
    lost_reason: Mutex<Option<String>>,
}

impl Connection {
    /// Connects to `socket`.
    pub fn connect(name: &str, socket: &Path) -> Result<Self> {
        // A socket file exists between the device's bind() and listen(): retry a refused or
        // missing socket for a short while.
        let mut attempts = 0;
        let client = loop {
            match Client::new(socket) {
                Ok(c) => break c,
                Err(vfio_user::Error::Connect(e))
                    if attempts < 100
                        && matches!(
                            e.kind(),
                            std::io::ErrorKind::ConnectionRefused | std::io::ErrorKind::NotFound
                        ) =>
                {
                    attempts += 1;
                    std::thread::sleep(std::time::Duration::from_millis(20));
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
        Ok(Connection {
            name: name.into(),
            socket: socket.display().to_string(),
            client: Mutex::new(client),
            lost: AtomicBool::new(false),
            lost_reason: Mutex::new(None),
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

    fn with<T>(
        &self,
        what: &str,
        f: impl FnOnce(&mut Client) -> std::result::Result<T, vfio_user::Error>,
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
        f(&mut c).map_err(|source| {
            let msg = source.to_string();
            let mut r = self.lost_reason.lock().unwrap_or_else(|e| e.into_inner());
            r.get_or_insert(format!("{what}: {msg}"));
            self.lost.store(true, Ordering::SeqCst);
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
            c.set_irqs(index, IRQ_SET_EVENTFD_TRIGGER, start, fds.len() as u32, fds)
        })
    }

    /// Number of interrupts of `index`.
    pub fn irq_count(&self, index: u32) -> Result<u32> {
        self.with("GET_IRQ_INFO", |c| c.get_irq_info(index).map(|i| i.count))
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
        let Some(fo) = region.file_offset.as_ref() else {
            return Ok(Vec::new());
        };
        let mut out = Vec::new();
        for a in &region.sparse_areas {
            let end = a.offset.checked_add(a.size);
            if a.size == 0
                || a.offset % 4096 != 0
                || a.size % 4096 != 0
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
                    fo.file().as_raw_fd(),
                    (fo.start() + a.offset) as libc::off_t,
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
        let c = self.client.lock().unwrap_or_else(|e| e.into_inner());
        let _ = c.shutdown();
    }
}

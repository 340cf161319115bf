//! The vfio-user side every stand-in function shares: the regions and interrupts it
//! announces, the bounds each region access passes before the device sees it, and the
//! [`Backend`] that serves one client by forwarding its requests to a [`Function`].
use std::{
    fs::File,
    os::unix::{ffi::OsStrExt, net::UnixListener},
    path::{Path, PathBuf},
    sync::{Arc, MutexGuard},
};

use vfio_bindings::bindings::vfio::{
    vfio_region_info, VFIO_IRQ_INFO_EVENTFD, VFIO_PCI_CONFIG_REGION_INDEX, VFIO_PCI_MSIX_IRQ_INDEX,
    VFIO_PCI_NUM_IRQS, VFIO_PCI_NUM_REGIONS, VFIO_REGION_INFO_FLAG_READ,
    VFIO_REGION_INFO_FLAG_WRITE,
};
use vfio_user::{DmaMapFlags, DmaUnmapFlags, IrqInfo, Server, ServerBackend, ServerRegion};

use crate::{
    config::{ConfigSpace, CONFIG_SIZE},
    dma::{DmaSpace, MapError},
};

/// Region flags of a readable and writable region.
pub const RW: u32 = VFIO_REGION_INFO_FLAG_READ | VFIO_REGION_INFO_FLAG_WRITE;

/// Most bytes one region access may move: registers are accessed 1 to 8 bytes at a time; the
/// client names the length and the vfio_user library allocates it before asking, so a read of
/// gigabytes (filled byte by byte) would stall the device and take its memory.
pub const MAX_ACCESS: usize = 4096;

/// The device model behind the socket.
pub trait Function: Send {
    /// A read of BAR0 (registers, MSI-X table; reads may have side effects).
    fn bar_read(&mut self, offset: u64, data: &mut [u8]);
    /// A write to BAR0.
    fn bar_write(&mut self, offset: u64, data: &[u8]);
    /// The configuration space.
    fn config(&mut self) -> &mut ConfigSpace;
    /// The regions the client mapped for DMA.
    fn dma(&mut self) -> &mut DmaSpace;
    /// The client asked for a device reset.
    fn reset(&mut self);
    /// The client set MSI-X vectors `start..start + count` to `fds` (none: disabled). False:
    /// the range is out of bounds.
    fn set_msix(&mut self, start: u32, count: u32, fds: Vec<File>) -> bool;
}

/// Where the device model lives: behind a lock shared with the device's own thread.
pub trait FunctionHost: Send + Sync {
    /// The device model.
    type Model: Function;
    /// Locks the model.
    fn lock(&self) -> MutexGuard<'_, Self::Model>;
    /// After a region write (`region`: 0 for BAR0): wake whoever processes the device's work.
    fn written(&self, region: u32);
}

/// A region with no sparse areas and no file descriptor.
pub fn region(index: u32, size: u64, flags: u32) -> ServerRegion {
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

/// A listening device socket. Its file appears at the path only once the socket listens (it is
/// bound under a temporary name and renamed), so a client that finds the file and is refused
/// talks to a device that is gone, not to one still starting; the file is removed on drop.
pub struct Listening {
    server: Server,
    path: PathBuf,
}

impl std::ops::Deref for Listening {
    type Target = Server;
    fn deref(&self) -> &Server {
        &self.server
    }
}

impl Drop for Listening {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Binds and listens on `socket`: under a temporary name in the same directory first, then
/// renamed onto `socket` (refused if something is there already).
fn bind_then_publish(socket: &Path) -> Result<UnixListener, vfio_user::Error> {
    if socket.exists() {
        return Err(vfio_user::Error::SocketPathExists);
    }
    let mut tmp = socket.as_os_str().to_owned();
    tmp.push(format!(".{}.bind", std::process::id()));
    let tmp = PathBuf::from(tmp);
    let _ = std::fs::remove_file(&tmp);
    // `bind` also listens (std calls listen(2) before it returns).
    let listener = UnixListener::bind(&tmp).map_err(vfio_user::Error::SocketBind)?;
    let c = |p: &Path| std::ffi::CString::new(p.as_os_str().as_bytes());
    let (Ok(from), Ok(to)) = (c(&tmp), c(socket)) else {
        let _ = std::fs::remove_file(&tmp);
        return Err(vfio_user::Error::SocketBind(std::io::Error::from(
            std::io::ErrorKind::InvalidInput,
        )));
    };
    // SAFETY: both are NUL-terminated paths that live across the call.
    let r = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            from.as_ptr(),
            libc::AT_FDCWD,
            to.as_ptr(),
            libc::RENAME_NOREPLACE,
        )
    };
    if r != 0 {
        let e = std::io::Error::last_os_error();
        let _ = std::fs::remove_file(&tmp);
        return Err(if e.kind() == std::io::ErrorKind::AlreadyExists {
            vfio_user::Error::SocketPathExists
        } else {
            vfio_user::Error::SocketBind(e)
        });
    }
    Ok(listener)
}

/// Binds `socket` (published once it listens: see [`Listening`]) and announces a PCI function with `bar0` (region 0), the configuration
/// space and `msix_vectors` MSI-X vectors delivered by eventfd; every other region and
/// interrupt index is empty.
pub fn listen(
    socket: &Path,
    bar0: ServerRegion,
    msix_vectors: u16,
) -> Result<Listening, vfio_user::Error> {
    let mut regions: Vec<ServerRegion> =
        (0..VFIO_PCI_NUM_REGIONS).map(|i| region(i, 0, 0)).collect();
    regions[0] = bar0;
    regions[VFIO_PCI_CONFIG_REGION_INDEX as usize] =
        region(VFIO_PCI_CONFIG_REGION_INDEX, CONFIG_SIZE, RW);
    let irqs = (0..VFIO_PCI_NUM_IRQS)
        .map(|index| IrqInfo {
            index,
            flags: VFIO_IRQ_INFO_EVENTFD,
            count: if index == VFIO_PCI_MSIX_IRQ_INDEX {
                u32::from(msix_vectors)
            } else {
                0
            },
        })
        .collect();
    let listener = bind_then_publish(socket)?;
    Ok(Listening {
        server: Server::from_owned_fd(listener.into(), true, irqs, regions),
        path: socket.to_path_buf(),
    })
}

/// Refuses an access longer than [`MAX_ACCESS`] or starting past the end of `region`. (A short
/// access that runs past the end is served: the bytes past the end read as 0 and writes to
/// them are dropped.)
pub fn check_access(region: u32, offset: u64, len: usize, bar0_size: u64) -> std::io::Result<()> {
    let size = match region {
        0 => bar0_size,
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

/// Serves one client of `server` until it disconnects. Returns the server's result and
/// whether the client sent at least one request that reached the device.
pub fn serve_one<H: FunctionHost>(
    server: &Server,
    host: Arc<H>,
    bar0_size: u64,
) -> (Result<(), vfio_user::Error>, bool) {
    let mut backend = Backend {
        host,
        bar0_size,
        seen: false,
    };
    // vfio_user 0.1.7 panics on some malformed messages (e.g. a VERSION whose capability
    // string is not NUL-terminated, or shorter than its header): that ends this connection,
    // not the device process.
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| server.run(&mut backend)))
        .unwrap_or_else(|_| {
            tracing::warn!("malformed vfio-user message; connection closed");
            Ok(())
        });
    (r, backend.seen)
}

/// The vfio-user backend of one client: every request is checked, then forwarded.
pub struct Backend<H> {
    host: Arc<H>,
    bar0_size: u64,
    /// The client sent at least one request that reached the backend.
    seen: bool,
}

fn invalid(e: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidInput, e)
}

impl<H: FunctionHost> ServerBackend for Backend<H> {
    fn region_read(&mut self, region: u32, offset: u64, data: &mut [u8]) -> std::io::Result<()> {
        self.seen = true;
        check_access(region, offset, data.len(), self.bar0_size)?;
        let mut f = self.host.lock();
        match region {
            0 => f.bar_read(offset, data),
            VFIO_PCI_CONFIG_REGION_INDEX => f.config().read(offset, data),
            _ => data.fill(0),
        }
        Ok(())
    }

    fn region_write(&mut self, region: u32, offset: u64, data: &[u8]) -> std::io::Result<()> {
        check_access(region, offset, data.len(), self.bar0_size)?;
        let mut f = self.host.lock();
        match region {
            0 => f.bar_write(offset, data),
            VFIO_PCI_CONFIG_REGION_INDEX => f.config().write(offset, data),
            _ => tracing::debug!(region, offset, "write to an absent region dropped"),
        }
        drop(f);
        self.host.written(region);
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
        let mut f = self.host.lock();
        let r = match fd {
            Some(file) => f.dma().map(address, size, offset, &file),
            None => Err(MapError::NoFd(address)),
        };
        r.map_err(|e| {
            tracing::warn!(error = &e as &dyn std::error::Error, "DMA_MAP refused");
            invalid(e)
        })?;
        tracing::info!(
            iova = format_args!("{address:#x}"),
            size,
            "DMA region mapped"
        );
        Ok(())
    }

    fn dma_unmap(&mut self, _flags: DmaUnmapFlags, address: u64, size: u64) -> std::io::Result<()> {
        let n = self.host.lock().dma().unmap(address, size);
        tracing::info!(
            iova = format_args!("{address:#x}"),
            size,
            regions = n,
            "DMA unmapped"
        );
        Ok(())
    }

    fn reset(&mut self) -> std::io::Result<()> {
        self.host.lock().reset();
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
        if self.host.lock().set_msix(start, count, fds) {
            Ok(())
        } else {
            Err(invalid(format!(
                "MSI-X vectors {start}+{count} out of range"
            )))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn region_accesses_are_bounded_before_anything_is_touched() {
        let bar = 0x4_0000;
        // What the vfio_user library would allocate and the device fill byte by byte.
        assert!(check_access(0, 0, 0xe000_0000, bar).is_err());
        assert!(check_access(VFIO_PCI_CONFIG_REGION_INDEX, 0, MAX_ACCESS + 1, bar).is_err());
        assert!(check_access(0, bar + 1, 4, bar).is_err());
        assert!(check_access(0, u64::MAX, 4, bar).is_err());
        assert!(check_access(5, 1, 4, bar).is_err(), "an empty region");
        // Register-sized accesses, also one running past the end, are served.
        assert!(check_access(0, 0x1c, 4, bar).is_ok());
        assert!(check_access(0, bar - 2, 4, bar).is_ok());
        assert!(check_access(VFIO_PCI_CONFIG_REGION_INDEX, 0, 256, bar).is_ok());
    }

    #[test]
    fn the_socket_file_appears_listening_and_goes_with_the_listener() {
        let dir = std::env::temp_dir().join(format!("vud-listen-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("dev.sock");
        let l = listen(&path, region(0, 0x1000, RW), 2).unwrap();
        // Listening as soon as the file is there: a connect succeeds without a retry.
        std::os::unix::net::UnixStream::connect(&path).unwrap();
        // Only the socket itself is left in the directory (no temporary name).
        let names: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("dev.sock")]);
        // A second device on the same path is refused, and leaves the first one's file.
        assert!(matches!(
            listen(&path, region(0, 0x1000, RW), 2),
            Err(vfio_user::Error::SocketPathExists)
        ));
        assert!(path.exists());
        drop(l);
        assert!(!path.exists(), "the file goes with the listener");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

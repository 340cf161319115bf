//! A host-side NVMe driver over vfio-user: it DMA-maps its own memfd, brings the controller up
//! with the same polled driver the guest uses (`nvme_spec::queue`), writes doorbells into the
//! mmapped doorbell pages and polls completions. `ferry bench nvme` uses it as the baseline;
//! the shadow engine can use it to replay a configuration log on a fresh device.
use std::{
    fs::File,
    os::fd::FromRawFd,
    path::Path,
    sync::Arc,
    time::{Duration, Instant},
};

use nvme_spec::{
    identify,
    opcode::{cns, io},
    queue::{Controller, DriverError, Platform, QueueMem, QueuePair},
    Sqe,
};

use crate::{
    client::{Connection, MappedArea},
    Error, Result,
};

/// IOVA of the client's DMA memory.
pub const IOVA_BASE: u64 = 0x1_0000_0000;

pub(crate) struct HostPlatform {
    pub(crate) conn: Arc<Connection>,
    pub(crate) doorbells: Arc<Vec<MappedArea>>,
    pub(crate) start: Instant,
    pub(crate) failed: bool,
}

impl Platform for HostPlatform {
    fn reg_read32(&mut self, offset: u64) -> u32 {
        let mut b = [0u8; 4];
        match self.conn.region_read(0, offset, &mut b) {
            Ok(()) => u32::from_le_bytes(b),
            Err(_) => {
                self.failed = true;
                u32::MAX
            }
        }
    }

    fn reg_write32(&mut self, offset: u64, value: u32) {
        if self
            .conn
            .region_write(0, offset, &value.to_le_bytes())
            .is_err()
        {
            self.failed = true;
        }
    }

    fn doorbell(&mut self, offset: u64) -> *mut u32 {
        match self
            .doorbells
            .iter()
            .find(|a| offset >= a.offset && offset + 4 <= a.offset + a.size)
        {
            // SAFETY: inside the mapped area (checked above).
            Some(a) => unsafe { a.host.add((offset - a.offset) as usize).cast() },
            None => std::ptr::null_mut(),
        }
    }

    fn now_us(&mut self) -> u64 {
        self.start.elapsed().as_micros() as u64
    }
}

/// Memory the client owns and the device reaches by DMA.
pub(crate) struct DmaMemory {
    host: *mut u8,
    size: u64,
    next: u64,
    iova: u64,
    pub(crate) _file: File,
}

// SAFETY: the mapping is owned by this value; the device and the owner share it as DMA
// memory.
unsafe impl Send for DmaMemory {}

impl DmaMemory {
    pub(crate) fn new(size: u64) -> Result<Self> {
        Self::at(size, IOVA_BASE)
    }

    /// DMA memory the device will see at `iova`.
    pub(crate) fn at(size: u64, iova: u64) -> Result<Self> {
        let os = |what: &str| {
            let what = what.to_string();
            move |source| Error::Os { what, source }
        };
        // SAFETY: valid name; the result is checked.
        let fd = unsafe { libc::memfd_create(c"ferry-host-client".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(os("memfd_create")(std::io::Error::last_os_error()));
        }
        // SAFETY: fresh fd.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(size).map_err(os("sizing the DMA memfd"))?;
        // SAFETY: shared mapping of our own memfd; checked.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                size as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                std::os::fd::AsRawFd::as_raw_fd(&file),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(os("mapping the DMA memfd")(std::io::Error::last_os_error()));
        }
        Ok(DmaMemory {
            host: p.cast(),
            size,
            next: 0,
            iova,
            _file: file,
        })
    }

    /// Copies `data` into the memory at `offset` (volatile: the device reads it); ignored
    /// past the end.
    pub(crate) fn write(&self, offset: u64, data: &[u8]) {
        if offset
            .checked_add(data.len() as u64)
            .is_some_and(|end| end <= self.size)
        {
            for (i, &b) in data.iter().enumerate() {
                // SAFETY: inside the mapping (checked above).
                unsafe { self.host.add(offset as usize + i).write_volatile(b) };
            }
        }
    }

    /// Copies the memory at `offset` into `buf` (volatile: the device writes it); zeroes past
    /// the end.
    pub(crate) fn read(&self, offset: u64, buf: &mut [u8]) {
        if offset
            .checked_add(buf.len() as u64)
            .is_some_and(|end| end <= self.size)
        {
            for (i, b) in buf.iter_mut().enumerate() {
                // SAFETY: inside the mapping (checked above).
                *b = unsafe { self.host.add(offset as usize + i).read_volatile() };
            }
        } else {
            buf.fill(0);
        }
    }

    /// Host address of the memory (for a guest memory slot over it).
    pub(crate) fn host_addr(&self) -> u64 {
        self.host as u64
    }

    /// `pages` zeroed pages: (host pointer, IOVA).
    pub(crate) fn alloc(&mut self, pages: u64) -> Option<(*mut u8, u64)> {
        let len = pages * 4096;
        if self.next + len > self.size {
            return None;
        }
        let off = self.next;
        self.next += len;
        // SAFETY: inside the mapping.
        Some((unsafe { self.host.add(off as usize) }, self.iova + off))
    }
}

/// Brings the controller behind `conn` up with an admin queue pair of `entries` in two pages
/// of `mem` (which must be DMA-mapped and outlive the controller).
pub(crate) fn admin_controller(
    conn: Arc<Connection>,
    doorbells: Arc<Vec<MappedArea>>,
    mem: &mut DmaMemory,
    entries: u16,
) -> std::result::Result<Controller<HostPlatform>, DriverError> {
    let no_mem = || DriverError::Timeout("admin queue memory");
    let (sq, sq_bus) = mem.alloc(1).ok_or_else(no_mem)?;
    let (cq, cq_bus) = mem.alloc(1).ok_or_else(no_mem)?;
    let platform = HostPlatform {
        conn,
        doorbells,
        start: Instant::now(),
        failed: false,
    };
    let qm = QueueMem {
        sq: sq.cast(),
        sq_bus,
        cq: cq.cast(),
        cq_bus,
        entries,
    };
    // SAFETY: the queue memory is two fresh zeroed pages of `mem`, DMA-mapped by the caller,
    // which keeps `mem` alive as long as the controller.
    unsafe { Controller::init(platform, qm) }
}

impl Drop for DmaMemory {
    fn drop(&mut self) {
        // SAFETY: mapped in `new` with this address and size.
        unsafe { libc::munmap(self.host.cast(), self.size as usize) };
    }
}

/// Latency figures of a run.
#[derive(Clone, Debug, serde::Serialize)]
pub struct RunStats {
    /// Commands completed.
    pub ios: u64,
    /// Wall time in seconds.
    pub seconds: f64,
    /// Commands per second.
    pub iops: f64,
    /// Median latency in µs.
    pub p50_us: f64,
    /// 99th percentile latency in µs.
    pub p99_us: f64,
}

impl RunStats {
    /// Computes the figures from per-command latencies (ns).
    pub fn from_latencies(mut lat_ns: Vec<u64>, elapsed: Duration) -> Self {
        lat_ns.sort_unstable();
        let pct = |p: f64| {
            if lat_ns.is_empty() {
                0.0
            } else {
                lat_ns[((lat_ns.len() - 1) as f64 * p) as usize] as f64 / 1000.0
            }
        };
        let s = elapsed.as_secs_f64().max(1e-9);
        RunStats {
            ios: lat_ns.len() as u64,
            seconds: s,
            iops: lat_ns.len() as f64 / s,
            p50_us: pct(0.5),
            p99_us: pct(0.99),
        }
    }
}

/// A host-side NVMe client.
pub struct HostClient {
    conn: Arc<Connection>,
    ctrl: Controller<HostPlatform>,
    mem: DmaMemory,
    queues: Vec<QueuePair>,
    /// Namespace size in blocks.
    pub blocks: u64,
    /// Block size in bytes.
    pub block_size: u32,
}

fn drv(name: &str) -> impl Fn(DriverError) -> Error + '_ {
    move |source| Error::Driver {
        name: name.into(),
        what: "NVMe bring-up",
        source,
    }
}

impl HostClient {
    /// Connects, maps `mem_size` bytes of DMA memory and creates `queues` I/O queue pairs of
    /// `depth` entries.
    pub fn connect(socket: &Path, mem_size: u64, queues: u16, depth: u16) -> Result<Self> {
        let conn = Arc::new(Connection::connect("host-client", socket)?);
        let mut mem = DmaMemory::new(mem_size)?;
        conn.dma_map(0, mem.iova, mem_size, &mem._file)?;
        let doorbells = Arc::new(conn.map_sparse(0)?);
        let platform = HostPlatform {
            conn: conn.clone(),
            doorbells,
            start: Instant::now(),
            failed: false,
        };
        let name = "host-client";
        let mut qmem = |entries: u16| -> Result<QueueMem> {
            let sq_pages = (entries as u64 * 64).div_ceil(4096);
            let cq_pages = (entries as u64 * 16).div_ceil(4096);
            let (sq, sq_bus) = mem.alloc(sq_pages).ok_or_else(|| Error::Unsupported {
                name: name.into(),
                reason: "DMA memory exhausted".into(),
            })?;
            let (cq, cq_bus) = mem.alloc(cq_pages).ok_or_else(|| Error::Unsupported {
                name: name.into(),
                reason: "DMA memory exhausted".into(),
            })?;
            Ok(QueueMem {
                sq: sq.cast(),
                sq_bus,
                cq: cq.cast(),
                cq_bus,
                entries,
            })
        };
        let admin = qmem(32)?;
        let mut io_mems = Vec::new();
        for _ in 0..queues {
            io_mems.push(qmem(depth)?);
        }
        // SAFETY: the queue memory is inside our DMA mapping, zeroed, owned by this client.
        let mut ctrl = unsafe { Controller::init(platform, admin) }.map_err(drv(name))?;
        let (page, page_bus) = mem.alloc(1).ok_or_else(|| Error::Unsupported {
            name: name.into(),
            reason: "DMA memory exhausted".into(),
        })?;
        ctrl.identify(cns::NAMESPACE, 1, page_bus)
            .map_err(drv(name))?;
        // SAFETY: the page is ours and the device finished writing it.
        let ns = unsafe { std::slice::from_raw_parts(page, 4096) };
        let blocks = identify::get_u64(ns, identify::ns::NSZE);
        let block_size = identify::lba_size(ns, 0) as u32;
        let granted = ctrl.set_queue_count(queues).map_err(drv(name))?;
        if granted < queues {
            return Err(Error::Unsupported {
                name: name.into(),
                reason: format!("{queues} queues asked, {granted} granted"),
            });
        }
        let mut qs = Vec::new();
        for (i, m) in io_mems.into_iter().enumerate() {
            // SAFETY: as above.
            qs.push(unsafe { ctrl.create_io_queue(i as u16 + 1, m) }.map_err(drv(name))?);
        }
        Ok(HostClient {
            conn,
            ctrl,
            mem,
            queues: qs,
            blocks,
            block_size,
        })
    }

    /// Random reads of `xfer` bytes over the first `span_blocks` blocks, `qd` outstanding on
    /// queue 1, until `ios` completed. Every command must succeed.
    pub fn random_reads(
        &mut self,
        qd: u16,
        ios: u64,
        xfer: u32,
        span_blocks: u64,
        seed: u64,
    ) -> Result<RunStats> {
        let name = "host-client";
        let fail = |reason: String| Error::Unsupported {
            name: name.into(),
            reason,
        };
        let q = self
            .queues
            .first_mut()
            .ok_or_else(|| fail("no I/O queue".into()))?;
        let qd = qd.min(q.entries() - 1).max(1);
        let pages = (xfer as u64).div_ceil(4096);
        if pages > 2 {
            return Err(fail(format!(
                "transfer of {xfer} bytes needs a PRP list; at most 8 KiB here"
            )));
        }
        let nlb = (xfer / self.block_size).max(1);
        let lbas = span_blocks.min(self.blocks) / nlb as u64;
        if lbas == 0 {
            return Err(fail("namespace too small".into()));
        }
        let mut bufs = Vec::new();
        for _ in 0..qd {
            let (_, bus) = self
                .mem
                .alloc(pages)
                .ok_or_else(|| fail("DMA memory exhausted".into()))?;
            bufs.push(bus);
        }
        let mut rng = seed | 1;
        let mut next = || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        let mut started = vec![Instant::now(); qd as usize];
        let mut lat = Vec::with_capacity(ios as usize);
        let mut submitted = 0u64;
        let t0 = Instant::now();
        let deadline = t0 + Duration::from_secs(120);
        let submit =
            |q: &mut QueuePair, slot: u16, lba: u64, started: &mut [Instant]| -> Result<()> {
                let buf = bufs[slot as usize];
                let mut s = Sqe::new(io::READ, slot);
                s.set_nsid(1)
                    .set_prps(buf, if pages == 2 { buf + 4096 } else { 0 })
                    .set_lba_range(lba * nlb as u64, nlb);
                started[slot as usize] = Instant::now();
                q.submit(&s).map_err(|source| Error::Driver {
                    name: "host-client".into(),
                    what: "submitting a read",
                    source,
                })
            };
        for slot in 0..qd.min(ios as u16) {
            submit(q, slot, next() % lbas, &mut started)?;
            submitted += 1;
        }
        while (lat.len() as u64) < ios {
            let Some(c) = q.poll() else {
                if Instant::now() > deadline || self.conn.is_lost() {
                    return Err(fail(format!("no completion ({} of {ios} done)", lat.len())));
                }
                std::hint::spin_loop();
                continue;
            };
            q.ack();
            let slot = c.cid();
            if slot >= qd || !c.status().is_success() {
                return Err(fail(format!("completion cid {slot} status {}", c.status())));
            }
            lat.push(started[slot as usize].elapsed().as_nanos() as u64);
            if submitted < ios {
                submit(q, slot, next() % lbas, &mut started)?;
                submitted += 1;
            }
        }
        Ok(RunStats::from_latencies(lat, t0.elapsed()))
    }

    /// Deletes the I/O queues and shuts the controller down.
    pub fn shutdown(mut self) -> Result<()> {
        let n = self.queues.len() as u16;
        for qid in (1..=n).rev() {
            self.ctrl.delete_io_queue(qid).map_err(drv("host-client"))?;
        }
        self.ctrl.shutdown().map_err(drv("host-client"))?;
        self.conn.shutdown();
        Ok(())
    }
}

//! Ferry's own vfio-user client: the few messages a passthrough NVMe device needs (QEMU's
//! `docs/interop/vfio-user.rst`: VERSION, DEVICE_GET_INFO, DEVICE_GET_REGION_INFO,
//! REGION_READ/WRITE, DMA_MAP/UNMAP, GET_IRQ_INFO, SET_IRQS).
//!
//! The device process is not trusted: every request has a deadline (a device that stalls is
//! a device that is gone), every reply is matched by message id and command, its size is
//! bounded before anything is allocated, and an error reply (`flags` bit 5, an errno) is
//! read whole and returned as an error — the stream stays in step.
use std::{
    fs::File,
    io::{Read, Write},
    os::{fd::RawFd, unix::net::UnixStream},
    path::Path,
    time::{Duration, Instant},
};

use vmm_sys_util::sock_ctrl_msg::ScmSocket;

/// Message header size.
const HEADER: usize = 16;
/// Largest reply accepted (a region read of up to 1 MiB plus its header).
pub const MAX_REPLY: usize = (1 << 20) + 64;
/// Most regions and sparse areas accepted from a device.
const MAX_REGIONS: u32 = 16;
const MAX_AREAS: u32 = 64;
/// Largest region info with capabilities accepted.
const MAX_REGION_INFO: u32 = 4096;

const FLAG_REPLY: u32 = 1;
const FLAG_ERROR: u32 = 1 << 5;
const TYPE_MASK: u32 = 0xf;

/// vfio-user commands.
mod cmd {
    pub const VERSION: u16 = 1;
    pub const DMA_MAP: u16 = 2;
    pub const DMA_UNMAP: u16 = 3;
    pub const DEVICE_GET_INFO: u16 = 4;
    pub const DEVICE_GET_REGION_INFO: u16 = 5;
    pub const GET_IRQ_INFO: u16 = 7;
    pub const SET_IRQS: u16 = 8;
    pub const REGION_READ: u16 = 9;
    pub const REGION_WRITE: u16 = 10;
}

const DEVICE_FLAGS_PCI: u32 = 1 << 1;
const REGION_CAP_SPARSE_MMAP: u16 = 1;
/// Region info without capabilities: argsz, flags, index, cap_offset, size, offset.
const REGION_INFO: usize = 32;

/// What can go wrong talking to a device process.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The socket could not be connected.
    #[error("connecting")]
    Connect(#[source] std::io::Error),
    /// Sending or receiving failed (the connection is gone).
    #[error("{what} on the socket")]
    Io {
        /// Sending or receiving.
        what: &'static str,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The device did not answer within the deadline.
    #[error("no reply within {0:?}")]
    Timeout(Duration),
    /// The device closed the connection.
    #[error("the device closed the connection")]
    Closed,
    /// The device answered with an error reply.
    #[error("the device refused the request (errno {0})")]
    Refused(u32),
    /// The device's reply makes no sense.
    #[error("bad reply: {0}")]
    Protocol(String),
}

impl ClientError {
    /// True when the stream may be out of step or gone (everything but an error reply).
    pub fn is_fatal(&self) -> bool {
        !matches!(self, ClientError::Refused(_))
    }
}

type Result<T> = std::result::Result<T, ClientError>;

/// One region of the device.
#[derive(Debug)]
pub struct Region {
    /// Region index.
    pub index: u32,
    /// VFIO region flags.
    pub flags: u32,
    /// Size in bytes.
    pub size: u64,
    /// The file to map it from, and the region's offset in it.
    pub file: Option<(File, u64)>,
    /// Mappable (offset, size) areas.
    pub sparse_areas: Vec<(u64, u64)>,
}

/// A connected vfio-user client.
pub struct Client {
    stream: UnixStream,
    next_id: u16,
    timeout: Duration,
    regions: Vec<Region>,
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    b.get(at..at + 4)
        .and_then(|s| s.try_into().ok())
        .map(u32::from_le_bytes)
        .unwrap_or(0)
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    b.get(at..at + 8)
        .and_then(|s| s.try_into().ok())
        .map(u64::from_le_bytes)
        .unwrap_or(0)
}

fn io(what: &'static str) -> impl Fn(std::io::Error) -> ClientError {
    move |source| match source.kind() {
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => {
            ClientError::Timeout(Duration::ZERO)
        }
        _ => ClientError::Io { what, source },
    }
}

impl Client {
    /// Connects to `path`, negotiates the version and reads the device's regions; every
    /// request waits at most `timeout` for its reply.
    pub fn connect(path: &Path, timeout: Duration) -> Result<Client> {
        let stream = UnixStream::connect(path).map_err(ClientError::Connect)?;
        Self::over(stream, timeout)
    }

    /// A client over a connected stream (tests hand in one end of a socket pair).
    pub fn over(stream: UnixStream, timeout: Duration) -> Result<Client> {
        let mut c = Client {
            stream,
            next_id: 0,
            timeout,
            regions: Vec::new(),
        };
        c.negotiate()?;
        c.regions = c.get_regions()?;
        Ok(c)
    }

    /// A clone of the socket (to shut it down from another thread without the client).
    pub fn try_clone_stream(&self) -> std::io::Result<UnixStream> {
        self.stream.try_clone()
    }

    /// Sends one command and returns its reply's payload (after the header) and the files
    /// that came with it.
    fn request(
        &mut self,
        command: u16,
        body: &[&[u8]],
        fds: &[RawFd],
    ) -> Result<(Vec<u8>, Vec<File>)> {
        let deadline = Instant::now() + self.timeout;
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1);
        let len: usize = HEADER + body.iter().map(|b| b.len()).sum::<usize>();
        let mut msg = Vec::with_capacity(len);
        msg.extend_from_slice(&id.to_le_bytes());
        msg.extend_from_slice(&command.to_le_bytes());
        msg.extend_from_slice(&(len as u32).to_le_bytes());
        msg.extend_from_slice(&0u32.to_le_bytes()); // flags: command
        msg.extend_from_slice(&0u32.to_le_bytes());
        for b in body {
            msg.extend_from_slice(b);
        }
        self.stream
            .set_write_timeout(Some(self.timeout))
            .map_err(io("configuring"))?;
        if fds.is_empty() {
            self.stream
                .write_all(&msg)
                .map_err(io("sending"))
                .map_err(|e| self.timed(e))?;
        } else {
            let sent = loop {
                match self.stream.send_with_fds(&[&msg[..]], fds) {
                    Ok(n) => break n,
                    Err(e) if e.errno() == libc::EINTR => {}
                    Err(e) => {
                        let source = std::io::Error::from_raw_os_error(e.errno());
                        return Err(self.timed(io("sending")(source)));
                    }
                }
            };
            if sent < msg.len() {
                self.stream
                    .write_all(&msg[sent..])
                    .map_err(io("sending"))
                    .map_err(|e| self.timed(e))?;
            }
        }
        // The header, with any files attached to it.
        let mut header = [0u8; HEADER];
        self.set_deadline(deadline)?;
        let mut fd_slots = [-1 as RawFd; 4];
        let mut iov = [libc::iovec {
            iov_base: header.as_mut_ptr().cast(),
            iov_len: HEADER,
        }];
        let (n, nfds) = loop {
            // SAFETY: the iovec points at `header`, which outlives the call, with its length;
            // `fd_slots` has room for the files the kernel may pass.
            match unsafe { self.stream.recv_with_fds(&mut iov, &mut fd_slots) } {
                Ok(got) => break got,
                // A signal (vCPU kicks) is no answer: wait on until the deadline.
                Err(e) if e.errno() == libc::EINTR => self.set_deadline(deadline)?,
                Err(e) => {
                    let source = std::io::Error::from_raw_os_error(e.errno());
                    return Err(self.timed(io("receiving")(source)));
                }
            }
        };
        let files: Vec<File> = fd_slots[..nfds.min(fd_slots.len())]
            .iter()
            .filter(|&&fd| fd >= 0)
            // SAFETY: the kernel gave us these descriptors with the message; nothing else
            // owns them.
            .map(|&fd| unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(fd) })
            .collect();
        if n == 0 {
            return Err(ClientError::Closed);
        }
        self.read_full(&mut header[n..], deadline)?;
        let (rid, rcmd) = (
            u16::from_le_bytes([header[0], header[1]]),
            u16::from_le_bytes([header[2], header[3]]),
        );
        let (size, flags, errno) = (
            u32_at(&header, 4) as usize,
            u32_at(&header, 8),
            u32_at(&header, 12),
        );
        if !(HEADER..=MAX_REPLY).contains(&size) {
            return Err(ClientError::Protocol(format!(
                "reply of {size} bytes to command {command}"
            )));
        }
        if rid != id || rcmd != command || flags & TYPE_MASK != FLAG_REPLY {
            return Err(ClientError::Protocol(format!(
                "expected the reply to message {id} (command {command}), got message {rid} \
                 command {rcmd} flags {flags:#x}"
            )));
        }
        let mut payload = vec![0u8; size - HEADER];
        self.read_full(&mut payload, deadline)?;
        if flags & FLAG_ERROR != 0 {
            return Err(ClientError::Refused(errno));
        }
        Ok((payload, files))
    }

    fn timed(&self, e: ClientError) -> ClientError {
        match e {
            ClientError::Timeout(_) => ClientError::Timeout(self.timeout),
            e => e,
        }
    }

    fn set_deadline(&self, deadline: Instant) -> Result<()> {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(ClientError::Timeout(self.timeout));
        }
        self.stream
            .set_read_timeout(Some(left))
            .map_err(io("configuring"))
    }

    fn read_full(&mut self, mut buf: &mut [u8], deadline: Instant) -> Result<()> {
        while !buf.is_empty() {
            self.set_deadline(deadline)?;
            match self.stream.read(buf) {
                Ok(0) => return Err(ClientError::Closed),
                Ok(n) => buf = &mut buf[n..],
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(self.timed(io("receiving")(e))),
            }
        }
        Ok(())
    }

    fn negotiate(&mut self) -> Result<()> {
        let caps = br#"{"capabilities":{"max_msg_fds":8,"max_data_xfer_size":1048576}}"#;
        let mut body = vec![0u8, 0, 1, 0]; // major 0, minor 1
        body.extend_from_slice(caps);
        body.push(0);
        let (reply, _) = self.request(cmd::VERSION, &[&body], &[])?;
        if reply.len() < 4 || u16::from_le_bytes([reply[0], reply[1]]) != 0 {
            return Err(ClientError::Protocol(format!(
                "version reply {:?}",
                &reply[..reply.len().min(4)]
            )));
        }
        Ok(())
    }

    fn get_regions(&mut self) -> Result<Vec<Region>> {
        let body = [16u32, 0, 0, 0].map(u32::to_le_bytes).concat();
        let (reply, _) = self.request(cmd::DEVICE_GET_INFO, &[&body], &[])?;
        if reply.len() < 16 {
            return Err(ClientError::Protocol("short device info".into()));
        }
        let (flags, regions) = (u32_at(&reply, 4), u32_at(&reply, 8));
        if flags & DEVICE_FLAGS_PCI == 0 {
            return Err(ClientError::Protocol("not a PCI device".into()));
        }
        if regions > MAX_REGIONS {
            return Err(ClientError::Protocol(format!("{regions} regions")));
        }
        (0..regions).map(|i| self.region_info(i)).collect()
    }

    fn region_info(&mut self, index: u32) -> Result<Region> {
        let ask = |argsz: u32| {
            let mut b = vec![0u8; REGION_INFO];
            b[0..4].copy_from_slice(&argsz.to_le_bytes());
            b[8..12].copy_from_slice(&index.to_le_bytes());
            b
        };
        let (mut reply, mut files) = self.request(
            cmd::DEVICE_GET_REGION_INFO,
            &[&ask(REGION_INFO as u32)],
            &[],
        )?;
        let want = u32_at(&reply, 0);
        if reply.len() >= REGION_INFO && want as usize > REGION_INFO {
            if want > MAX_REGION_INFO {
                return Err(ClientError::Protocol(format!(
                    "region {index} info of {want} bytes"
                )));
            }
            (reply, files) = self.request(cmd::DEVICE_GET_REGION_INFO, &[&ask(want)], &[])?;
        }
        if reply.len() < REGION_INFO {
            return Err(ClientError::Protocol(format!("short region {index} info")));
        }
        let (flags, cap_offset, size, offset) = (
            u32_at(&reply, 4),
            u32_at(&reply, 12) as usize,
            u64_at(&reply, 16),
            u64_at(&reply, 24),
        );
        let mut sparse_areas = Vec::new();
        let mut next = cap_offset;
        let mut hops = 0;
        while next != 0 {
            hops += 1;
            let cap = reply
                .get(next..next + 8)
                .filter(|_| next >= REGION_INFO && hops <= 16)
                .ok_or_else(|| {
                    ClientError::Protocol(format!("region {index} capability at {next}"))
                })?;
            let id = u16::from_le_bytes([cap[0], cap[1]]);
            let following = u32_at(cap, 4) as usize;
            if id == REGION_CAP_SPARSE_MMAP {
                let count = u32_at(&reply, next + 8);
                let areas = next + 16;
                if count > MAX_AREAS || reply.len() < areas + count as usize * 16 {
                    return Err(ClientError::Protocol(format!(
                        "region {index}: {count} sparse areas do not fit"
                    )));
                }
                sparse_areas.extend((0..count as usize).map(|i| {
                    (
                        u64_at(&reply, areas + i * 16),
                        u64_at(&reply, areas + i * 16 + 8),
                    )
                }));
            }
            if following != 0 && following <= next {
                return Err(ClientError::Protocol(format!(
                    "region {index}: capability list does not advance"
                )));
            }
            next = following;
        }
        Ok(Region {
            index,
            flags,
            size,
            file: files.into_iter().next().map(|f| (f, offset)),
            sparse_areas,
        })
    }

    /// The region with this index.
    pub fn region(&self, index: u32) -> Option<&Region> {
        self.regions.iter().find(|r| r.index == index)
    }

    /// Reads `data.len()` bytes of a region.
    pub fn region_read(&mut self, region: u32, offset: u64, data: &mut [u8]) -> Result<()> {
        let count = u32::try_from(data.len())
            .ok()
            .filter(|&c| c as usize <= MAX_REPLY - 64)
            .ok_or_else(|| ClientError::Protocol(format!("read of {} bytes", data.len())))?;
        let body = [
            &offset.to_le_bytes()[..],
            &region.to_le_bytes(),
            &count.to_le_bytes(),
        ]
        .concat();
        let (reply, _) = self.request(cmd::REGION_READ, &[&body], &[])?;
        if reply.len() != 16 + data.len() || u32_at(&reply, 12) != count {
            return Err(ClientError::Protocol(format!(
                "region read of {count} bytes answered with {} bytes",
                reply.len().saturating_sub(16)
            )));
        }
        data.copy_from_slice(&reply[16..]);
        Ok(())
    }

    /// Writes `data` into a region.
    pub fn region_write(&mut self, region: u32, offset: u64, data: &[u8]) -> Result<()> {
        let count = u32::try_from(data.len())
            .map_err(|_| ClientError::Protocol(format!("write of {} bytes", data.len())))?;
        let head = [
            &offset.to_le_bytes()[..],
            &region.to_le_bytes(),
            &count.to_le_bytes(),
        ]
        .concat();
        self.request(cmd::REGION_WRITE, &[&head, data], &[])?;
        Ok(())
    }

    /// Maps `size` bytes of `fd` at `offset` for the device at `iova` (read and write).
    pub fn dma_map(&mut self, offset: u64, iova: u64, size: u64, fd: RawFd) -> Result<()> {
        let body = [
            &32u32.to_le_bytes()[..],
            &3u32.to_le_bytes(),
            &offset.to_le_bytes(),
            &iova.to_le_bytes(),
            &size.to_le_bytes(),
        ]
        .concat();
        self.request(cmd::DMA_MAP, &[&body], &[fd])?;
        Ok(())
    }

    /// Unmaps a DMA range.
    pub fn dma_unmap(&mut self, iova: u64, size: u64) -> Result<()> {
        let body = [
            &24u32.to_le_bytes()[..],
            &0u32.to_le_bytes(),
            &iova.to_le_bytes(),
            &size.to_le_bytes(),
        ]
        .concat();
        self.request(cmd::DMA_UNMAP, &[&body], &[])?;
        Ok(())
    }

    /// Number of interrupts of `index`.
    pub fn irq_count(&mut self, index: u32) -> Result<u32> {
        let body = [16u32, 0, index, 0].map(u32::to_le_bytes).concat();
        let (reply, _) = self.request(cmd::GET_IRQ_INFO, &[&body], &[])?;
        if reply.len() < 16 {
            return Err(ClientError::Protocol("short IRQ info".into()));
        }
        Ok(u32_at(&reply, 12))
    }

    /// Gives the device `fds` for interrupts `start..` of `index` with `flags`.
    pub fn set_irqs(&mut self, index: u32, flags: u32, start: u32, fds: &[RawFd]) -> Result<()> {
        let body = [20u32, flags, index, start, fds.len() as u32]
            .map(u32::to_le_bytes)
            .concat();
        self.request(cmd::SET_IRQS, &[&body], fds)?;
        Ok(())
    }

    /// Closes the connection (the device then resets).
    pub fn shutdown(&self) {
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
    }
}

//! Data channels: guest memory over several connections in parallel (as QEMU's multifd), next
//! to the main connection that keeps the control messages.
//!
//! After the configuration the destination opens a listener of its own, on the address the
//! main connection reached, and sends its port, the number of channels and a random token
//! ([`Kind::Channels`]). The source connects that many times; each connection is secured
//! exactly as the main one (TLS 1.3 with mutual certificate authentication when TLS is on: the
//! listener runs the same [`transport::accept`]), then presents the token ([`Kind::Join`]).
//! A connection that fails either is dropped and counted; only the source that passed the main
//! handshake knows the token.
//!
//! On a data channel, chunks follow: a 24-byte header (guest-physical address, length, tag,
//! round, CRC-32 of the first 20 bytes) and, for data, the pages themselves. The source sends
//! them straight from the guest's memory (`sendfile` from the memfd for long runs and
//! `vmsplice` of the mapping for short ones on plain TCP, neither copying; `pread` into the
//! TLS record buffer under TLS) and the destination receives them straight into guest memory
//! (spliced into the memfd, or a `recv` into the mapping; the TLS reader decrypts into it).
//! On plain TCP, short runs (a heavy guest's scattered dirty pages) share one list chunk
//! ([`TAG_LIST`]): one header and a list of up to [`LIST_PAGES`] run addresses with its own
//! CRC-32, then the runs' pages back to back; the destination checks every run against guest
//! RAM (page-aligned, inside one region, ascending, exactly the announced length) before it
//! takes a byte of the pages. The pages carry no checksum of
//! their own: TCP's checksum (plain) or the AEAD tag (TLS) covers them. Each round ends with a
//! round-end chunk on every channel, and the destination's receivers wait for each other
//! there, so a page sent again in a later round never lands before its older copy.
//!
//! With compression negotiated, a data run may instead go out as a compressed chunk (tag
//! [`TAG_ZSTD`]): the header's length is the pages' length, and the chunk carries the length
//! of the zstd frame (u32 LE) and the frame, which the destination decompresses straight into
//! guest memory, refusing any frame that does not decode to exactly the announced pages. A run
//! that does not compress goes out raw as without compression; zero pages are zero chunks.
use std::{
    fs::File,
    io::{Read, Write},
    net::{IpAddr, SocketAddr, TcpListener, TcpStream},
    os::{fd::AsRawFd, unix::fs::FileExt},
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc, Condvar, Mutex,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use vmm::memory::GuestRam;

use crate::{
    compress::{Compressor, Decompressor, TokenBucket},
    error::chain,
    source::CancelToken,
    splice::{PageSplicer, SplicePipe},
    transport::{self, Conn, Security},
    wire::{self, Kind, PAGE},
    MigrationError, Result,
};

/// Most data channels a destination accepts.
pub const MAX_STREAMS: u32 = 16;
/// Token length.
const TOKEN: usize = 32;
/// Chunk header length.
const HEADER: usize = 24;
/// Most pages in one work item (and in one data chunk).
const ITEM_PAGES: u64 = 512;
/// Rounds of at most this many pages go out from the calling thread.
const SMALL_ROUND_PAGES: u64 = 1024;
/// Largest chunk the destination accepts.
const MAX_CHUNK: u64 = ITEM_PAGES * PAGE;
/// Bytes the destination populates ahead in one step.
const POPULATE_STEP: u64 = 8 << 20;

const TAG_DATA: u32 = 1;
const TAG_ZERO: u32 = 2;
const TAG_ROUND_END: u32 = 3;
const TAG_DONE: u32 = 4;
/// Pages compressed with zstd: frame length (u32 LE), then the frame.
const TAG_ZSTD: u32 = 5;
/// Scattered runs of pages under one header (see [`list_body`]): the header's address field
/// is the number of runs, its length the bytes of all their pages.
const TAG_LIST: u32 = 6;

fn encode(gpa: u64, len: u32, tag: u32, round: u32) -> [u8; HEADER] {
    let mut h = [0u8; HEADER];
    h[..8].copy_from_slice(&gpa.to_le_bytes());
    h[8..12].copy_from_slice(&len.to_le_bytes());
    h[12..16].copy_from_slice(&tag.to_le_bytes());
    h[16..20].copy_from_slice(&round.to_le_bytes());
    let crc = crc32fast::hash(&h[..20]);
    h[20..].copy_from_slice(&crc.to_le_bytes());
    h
}

fn le32(b: &[u8]) -> u32 {
    u32::from_le_bytes([b[0], b[1], b[2], b[3]])
}

fn le64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_le_bytes(a)
}

/// Where `[gpa, gpa + len)` lives when it lies inside one RAM region: its host address and
/// its offset in the memfd.
pub(crate) fn locate(ram: &GuestRam, gpa: u64, len: u64) -> Option<(*mut u8, u64)> {
    let end = gpa.checked_add(len)?;
    let r = ram
        .regions()
        .iter()
        .find(|r| gpa >= r.gpa && end <= r.gpa + r.size)?;
    let base = ram.host_address(r).ok()?;
    let off = (gpa - r.gpa) as usize;
    // The region's mapping is r.size bytes long and off + len <= r.size.
    Some((base.wrapping_add(off), r.file_offset + (gpa - r.gpa)))
}

/// True when the 4 KiB page at `p` reads all zero: 64-bit volatile loads, eight at a time,
/// stopping at the first non-zero group (a data page usually stops at once).
///
/// # Safety
/// `p` must point to 4 KiB of mapped guest memory, 8-byte aligned. Others may write it
/// concurrently: the result is then a snapshot, which is what pre-copy wants (a page written
/// while it is read is dirty again and goes out in a later round).
unsafe fn is_zero_page(p: *const u8) -> bool {
    let w = p as *const u64;
    let mut i = 0;
    while i < (PAGE / 8) as usize {
        let mut acc = 0u64;
        for k in 0..8 {
            // SAFETY: i + k < 512 words, inside the page the caller vouches for; volatile
            // because the guest may write the word at the same time.
            acc |= unsafe { std::ptr::read_volatile(w.add(i + k)) };
        }
        if acc != 0 {
            return false;
        }
        i += 8;
    }
    true
}

/// Pages ahead of the one checked for zeros whose first cache line is requested meanwhile.
const PREFETCH_AHEAD: u64 = 16;

/// Asks for the cache line at `p` ahead of its use: a hint, which never faults whatever the
/// address.
#[inline]
fn prefetch(p: *const u8) {
    // SAFETY: SSE is part of x86_64; a prefetch only hints the cache and never faults.
    #[cfg(target_arch = "x86_64")]
    unsafe {
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(p as *const i8)
    };
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

/// One page in this many is looked at first for zeros (see [`find_zero_pages`]).
const ZERO_SAMPLE: usize = 16;

/// Tells which of the pages at `starts` (one group of a round) read all zero, into `zeros`.
///
/// The check of a data page reads one cache line, and on this machine that first touch of a
/// page through the sender's mapping costs far more than a cache miss: 84-86% of the check's
/// samples sit on that one load although the lines ahead were prefetched (the page walk, by
/// the look of it, under nested paging: a prefetch does not hide it), 30% of the channel
/// threads' CPU at
/// 4 GiB heavy when every page was looked at. `sendfile` and `vmsplice` never touch the pages
/// through the mapping. So every [`ZERO_SAMPLE`]th page is looked at first; only when one of
/// them is zero is every page of the group checked. A group of data pages costs a sixteenth
/// of the touches; a run of at least [`ZERO_SAMPLE`] zero pages (64 KiB) inside a group is
/// always found, and with it every zero page of that group; a shorter run among data pages
/// may go out as data (correct, only not left out). The lines ahead are still requested
/// meanwhile (where the TLB holds them, the misses overlap).
///
/// # Safety
/// Each of `starts` must point to 4 KiB of mapped memory, 8-byte aligned (see
/// [`is_zero_page`]).
unsafe fn find_zero_pages(starts: &[*const u8], zeros: &mut Vec<bool>) {
    zeros.clear();
    let ahead = PREFETCH_AHEAD as usize;
    let sampled = starts.len().div_ceil(ZERO_SAMPLE);
    for k in 0..sampled.min(ahead) {
        prefetch(starts[k * ZERO_SAMPLE]);
    }
    let mut any = false;
    for k in 0..sampled {
        if let Some(&p) = starts.get((k + ahead) * ZERO_SAMPLE) {
            prefetch(p);
        }
        // SAFETY: one of `starts`, as the caller vouches.
        if unsafe { is_zero_page(starts[k * ZERO_SAMPLE]) } {
            any = true;
            break;
        }
    }
    if !any {
        zeros.resize(starts.len(), false);
        return;
    }
    for &p in starts.iter().take(ahead) {
        prefetch(p);
    }
    for (k, &p) in starts.iter().enumerate() {
        if let Some(&a) = starts.get(k + ahead) {
            prefetch(a);
        }
        // SAFETY: as above.
        zeros.push(unsafe { is_zero_page(p) });
    }
}

/// A random token (getrandom).
fn token() -> Result<[u8; TOKEN]> {
    let mut t = [0u8; TOKEN];
    let mut got = 0;
    while got < TOKEN {
        // SAFETY: getrandom writes at most TOKEN - got bytes into the rest of `t`.
        let n =
            unsafe { libc::getrandom(t[got..].as_mut_ptr() as *mut libc::c_void, TOKEN - got, 0) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(MigrationError::io("random token")(e));
        }
        got += n as usize;
    }
    Ok(t)
}

/// What the destination announces: where to connect, how many times, with which token.
pub(crate) struct Invitation {
    pub port: u16,
    pub count: u32,
    pub token: [u8; TOKEN],
}

impl Invitation {
    pub fn encode(&self) -> Vec<u8> {
        let mut v = self.port.to_le_bytes().to_vec();
        v.extend_from_slice(&self.count.to_le_bytes());
        v.extend_from_slice(&self.token);
        v
    }

    pub fn decode(b: &[u8]) -> Result<Invitation> {
        if b.len() != 6 + TOKEN {
            return Err(MigrationError::Protocol(format!(
                "channel invitation of {} bytes",
                b.len()
            )));
        }
        let count = le32(&b[2..6]);
        if count == 0 || count > MAX_STREAMS {
            return Err(MigrationError::Protocol(format!(
                "invitation to {count} data channels"
            )));
        }
        let mut token = [0u8; TOKEN];
        token.copy_from_slice(&b[6..]);
        Ok(Invitation {
            port: u16::from_le_bytes([b[0], b[1]]),
            count,
            token,
        })
    }
}

/// One data connection.
enum DataConn {
    /// Plain TCP: pages go out with `sendfile`, come in with `recv`.
    Plain(TcpStream),
    /// TLS over `tcp`.
    Tls { conn: Box<dyn Conn>, tcp: TcpStream },
}

impl DataConn {
    fn tcp(&self) -> &TcpStream {
        match self {
            DataConn::Plain(t) => t,
            DataConn::Tls { tcp, .. } => tcp,
        }
    }

    fn write_all(&mut self, b: &[u8]) -> std::io::Result<()> {
        match self {
            DataConn::Plain(t) => t.write_all(b),
            DataConn::Tls { conn, .. } => conn.write_all(b),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            DataConn::Plain(t) => t.flush(),
            DataConn::Tls { conn, .. } => conn.flush(),
        }
    }

    fn read_exact(&mut self, b: &mut [u8]) -> std::io::Result<()> {
        match self {
            DataConn::Plain(t) => t.read_exact(b),
            DataConn::Tls { conn, .. } => conn.read_exact(b),
        }
    }
}

fn from_stream(s: transport::Stream) -> DataConn {
    if s.tls {
        DataConn::Tls {
            conn: s.conn,
            tcp: s.tcp,
        }
    } else {
        DataConn::Plain(s.tcp)
    }
}

/// Sends a header that more bytes follow at once (`MSG_MORE`: one segment with the data).
fn send_header(tcp: &TcpStream, h: &[u8; HEADER]) -> std::io::Result<()> {
    let mut done = 0;
    while done < HEADER {
        // SAFETY: sends the rest of `h`, a live local array.
        let n = unsafe {
            libc::send(
                tcp.as_raw_fd(),
                h[done..].as_ptr() as *const libc::c_void,
                HEADER - done,
                libc::MSG_MORE | libc::MSG_NOSIGNAL,
            )
        };
        let Some(n) = counted(n)? else {
            continue;
        };
        done += n;
    }
    Ok(())
}

/// A syscall's count, `None` when it was interrupted (try again), the error otherwise.
pub(crate) fn counted(n: isize) -> std::io::Result<Option<usize>> {
    if n >= 0 {
        return Ok(Some(n as usize));
    }
    let e = std::io::Error::last_os_error();
    if e.kind() == std::io::ErrorKind::Interrupted {
        Ok(None)
    } else {
        Err(e)
    }
}

/// `len` bytes of `file` from `off` onto `tcp`, by the kernel (no copy through user space).
fn sendfile_all(tcp: &TcpStream, file: &File, off: u64, len: u64) -> std::io::Result<()> {
    let mut pos = off as libc::off_t;
    let end = (off + len) as libc::off_t;
    while pos < end {
        // SAFETY: sendfile between two descriptors this thread holds; `pos` is a valid off_t
        // the kernel advances.
        let n = unsafe {
            libc::sendfile(
                tcp.as_raw_fd(),
                file.as_raw_fd(),
                &mut pos,
                (end - pos) as usize,
            )
        };
        let Some(n) = counted(n)? else {
            continue;
        };
        if n == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::WriteZero,
                "sendfile sent nothing",
            ));
        }
    }
    Ok(())
}

/// Receives exactly `len` bytes into `p` with `recv`.
///
/// # Safety
/// `p` must be valid for writes of `len` bytes that nothing else accesses meanwhile.
unsafe fn recv_all(tcp: &TcpStream, p: *mut u8, len: usize) -> std::io::Result<()> {
    let mut got = 0;
    while got < len {
        // SAFETY: writes at most len - got bytes at p + got, inside what the caller vouches for.
        let n = unsafe {
            libc::recv(
                tcp.as_raw_fd(),
                p.add(got) as *mut libc::c_void,
                len - got,
                libc::MSG_WAITALL,
            )
        };
        let Some(n) = counted(n)? else {
            continue;
        };
        if n == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "data channel closed mid-chunk",
            ));
        }
        got += n;
    }
    Ok(())
}

/// Send buffer asked for on each data channel, bytes: the kernel doubles it (its own
/// bookkeeping) and caps it at `net.core.wmem_max` (4 MiB here, so 8 MiB a socket); the
/// autotuned buffer grows only to `net.ipv4.tcp_wmem`'s maximum (4 MiB).
///
/// Why larger: with more of the data queued, more segments go out when the destination's
/// ACKs open the window, in the destination's receiving threads, and fewer in the source's
/// `sendfile`. On loopback the thread that transmits a segment also runs the receiving
/// socket's processing of it (docs/migration-speed.md, "where the kernel's TCP work lands"):
/// that work, which belongs to the receiving side and lands there on two hosts, was charged to
/// the source in most runs and swung its CPU per GiB by ±0.3 of the floor's. Kernel memory:
/// at most 8 MiB a channel, mostly references to the memfd's own pages (`sendfile`), not in
/// any process's resident set.
const SEND_BUFFER: libc::c_int = 4 << 20;

/// Sets `fd`'s send buffer to [`SEND_BUFFER`]: the size the kernel granted (doubled), or
/// None when it refused.
fn set_send_buffer(fd: libc::c_int) -> Option<libc::c_int> {
    let int = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: setsockopt with a live int of the right size on a socket the caller holds.
    let r = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_SNDBUF,
            &SEND_BUFFER as *const libc::c_int as *const libc::c_void,
            int,
        )
    };
    if r < 0 {
        return None;
    }
    let (mut got, mut len): (libc::c_int, libc::socklen_t) = (0, int);
    // SAFETY: getsockopt into a live int whose size `len` gives.
    let r = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_SNDBUF,
            &mut got as *mut libc::c_int as *mut libc::c_void,
            &mut len,
        )
    };
    (r == 0).then_some(got)
}

/// Whether this host grants the whole [`SEND_BUFFER`] (tried on a socket of its own): a
/// fixed buffer turns the kernel's autotuning off, so where `net.core.wmem_max` is lower (the
/// kernel's default is 208 KiB) the channels keep the autotuned one, which may grow larger.
fn send_buffer_granted() -> bool {
    use std::os::fd::{FromRawFd, OwnedFd};
    // SAFETY: socket(2) with constant arguments; the result is checked.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return false;
    }
    // SAFETY: a fresh descriptor nobody else owns; closed when `probe` drops.
    let probe = unsafe { OwnedFd::from_raw_fd(fd) };
    let granted = set_send_buffer(probe.as_raw_fd());
    tracing::debug!(?granted, "data channel send buffer");
    granted.is_some_and(|g| g >= 2 * SEND_BUFFER)
}

/// Counts of one round on the source.
#[derive(Default)]
pub(crate) struct RoundStats {
    pub data: u64,
    pub zero: u64,
    pub skipped: u64,
    pub bytes: u64,
    /// Data pages that went out compressed.
    pub zstd_pages: u64,
}

/// The source's data channels.
pub(crate) struct SourceChannels {
    conns: Vec<DataConn>,
    /// One compressor per channel when compression was negotiated.
    codecs: Vec<Option<Compressor>>,
    /// CPU seconds the channel threads used.
    pub cpu_s: f64,
}

impl SourceChannels {
    /// Connects the channels the destination invited to (on `ip`), each secured as the main
    /// connection and introduced by the token.
    pub fn open(
        ip: IpAddr,
        inv: &Invitation,
        security: &Security,
        server_name: &str,
        timeout: Duration,
        cancel: Option<&CancelToken>,
        compression: crate::Compression,
    ) -> Result<SourceChannels> {
        let addr = SocketAddr::new(ip, inv.port);
        let mut conns = Vec::new();
        let large_buffer = send_buffer_granted();
        for i in 0..inv.count {
            let mut s = transport::connect(addr, security, server_name, timeout)?;
            if large_buffer {
                set_send_buffer(s.tcp.as_raw_fd());
            }
            if let Some(c) = cancel {
                c.attach_data(&s.tcp);
            }
            let mut join = inv.token.to_vec();
            join.extend_from_slice(&i.to_le_bytes());
            wire::send(&mut s.conn, Kind::Join, &join)?;
            s.conn.flush().map_err(MigrationError::io("write"))?;
            conns.push(from_stream(s));
        }
        let codecs = (0..conns.len())
            .map(|_| Compressor::new(compression))
            .collect::<Result<_>>()?;
        Ok(SourceChannels {
            conns,
            codecs,
            cpu_s: 0.0,
        })
    }

    /// Streams used.
    pub fn len(&self) -> usize {
        self.conns.len()
    }

    /// Sends the pages of `runs` ((first page, page count), within one RAM region each) over
    /// all channels in parallel, then a round end on each; `zeros` says what becomes of zero
    /// pages.
    pub fn send_round(
        &mut self,
        ram: &GuestRam,
        round: u32,
        runs: &[(u64, u64)],
        zeros: ZeroPages,
        throttle: Option<&TokenBucket>,
        cancel: Option<&CancelToken>,
    ) -> Result<RoundStats> {
        // Work items of at most ITEM_PAGES, handed out in address order.
        let mut items = Vec::new();
        for &(gpa, pages) in runs {
            let mut i = 0;
            while i < pages {
                let n = (pages - i).min(ITEM_PAGES);
                items.push((gpa + i * PAGE, n));
                i += n;
            }
        }
        // Items handed out in groups of at most ITEM_PAGES pages (many short runs of a
        // scattered dirty set make one group, not one hand-out each).
        let mut groups = Vec::new();
        let (mut first, mut in_group) = (0, 0);
        for (k, &(_, n)) in items.iter().enumerate() {
            if in_group > 0 && in_group + n > ITEM_PAGES {
                groups.push(first..k);
                (first, in_group) = (k, 0);
            }
            in_group += n;
        }
        if first < items.len() {
            groups.push(first..items.len());
        }
        let next = AtomicUsize::new(0);
        let failed = AtomicBool::new(false);
        let memfd = ram.memfd().clone();
        let pages: u64 = runs.iter().map(|r| r.1).sum();
        let results: Vec<Result<(RoundStats, f64)>> = if pages <= SMALL_ROUND_PAGES {
            // A small round (the paused one, usually): this thread sends it all on the first
            // channel and the round ends on the others, with no thread to wake up.
            let cpu = crate::cpu::ThreadCpu::start();
            let mut out = Vec::new();
            for (conn, codec) in self.conns.iter_mut().zip(&mut self.codecs) {
                let r = send_items(
                    conn,
                    codec.as_mut(),
                    ram,
                    &memfd,
                    round,
                    &items,
                    &groups,
                    &next,
                    zeros,
                    throttle,
                    cancel,
                    &failed,
                );
                let stop = r.is_err();
                out.push(r.map(|st| (st, 0.0)));
                if stop {
                    break;
                }
            }
            if let Some(Ok((_, c))) = out.first_mut() {
                *c = cpu.elapsed().as_secs_f64();
            }
            out
        } else {
            std::thread::scope(|s| {
                let handles: Vec<_> = self
                    .conns
                    .iter_mut()
                    .zip(&mut self.codecs)
                    .enumerate()
                    .map(|(i, (conn, codec))| {
                        let (items, groups, next, failed, memfd) =
                            (&items, &groups, &next, &failed, &memfd);
                        let send = move || {
                            let cpu = crate::cpu::ThreadCpu::start();
                            let r = send_items(
                                conn,
                                codec.as_mut(),
                                ram,
                                memfd,
                                round,
                                items,
                                groups,
                                next,
                                zeros,
                                throttle,
                                cancel,
                                failed,
                            );
                            if r.is_err() {
                                failed.store(true, Ordering::SeqCst);
                            }
                            r.map(|st| (st, cpu.elapsed().as_secs_f64()))
                        };
                        // Named, so a profile tells the senders apart.
                        std::thread::Builder::new()
                            .name(format!("migration-tx{i}"))
                            .spawn_scoped(s, send)
                    })
                    .collect();
                handles
                    .into_iter()
                    .map(|h| match h {
                        Ok(h) => h.join().unwrap_or_else(|_| {
                            Err(MigrationError::Protocol(
                                "data channel thread panicked".into(),
                            ))
                        }),
                        Err(e) => {
                            failed.store(true, Ordering::SeqCst);
                            Err(MigrationError::io("spawning a data channel thread")(e))
                        }
                    })
                    .collect()
            })
        };
        let mut total = RoundStats::default();
        let mut first_err = None;
        for r in results {
            match r {
                Ok((st, cpu)) => {
                    total.data += st.data;
                    total.zero += st.zero;
                    total.skipped += st.skipped;
                    total.bytes += st.bytes;
                    total.zstd_pages += st.zstd_pages;
                    self.cpu_s += cpu;
                }
                // The first real cause, not a channel that stopped because another failed.
                Err(MigrationError::Cancelled) => {
                    first_err.get_or_insert(MigrationError::Cancelled);
                }
                Err(e) => {
                    if matches!(first_err, None | Some(MigrationError::Cancelled)) {
                        first_err = Some(e);
                    }
                }
            }
        }
        match first_err {
            Some(e) => Err(e),
            None => Ok(total),
        }
    }

    /// Tells every channel that no more memory follows.
    pub fn finish(&mut self) -> Result<u64> {
        let h = encode(0, 0, TAG_DONE, 0);
        for c in &mut self.conns {
            c.write_all(&h).map_err(MigrationError::io("write"))?;
            c.flush().map_err(MigrationError::io("write"))?;
        }
        Ok((HEADER * self.conns.len()) as u64)
    }
}

/// What a round does with pages that read all zero.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ZeroPages {
    /// Found and left out (round 0: the destination starts zeroed).
    Skip,
    /// Found and sent as zero chunks (a header, no data).
    Chunk,
    /// Not looked for: every page goes as data, unread by the sender.
    Unchecked,
}

/// Runs of at most this many pages go out gathered with others (on plain TCP in list chunks,
/// `vmsplice`d into a pipe and spliced into the socket, or one `sendmsg` without a pipe);
/// longer ones with `sendfile` from the memfd.
const GATHER_MAX_PAGES: u64 = 8;
/// Most chunks sent together (two iovecs each, under the kernel's 1024).
const GATHER_CHUNKS: usize = 256;
/// A TLS channel seals what it gathered once it holds this much (full 16 KiB records, few
/// writes).
const TLS_GATHER_BYTES: usize = 256 << 10;
/// Most pages (and so most runs) in one list chunk: its header and address list fit one
/// page, and header and pages one pipe-full of 256 pages.
pub(crate) const LIST_PAGES: u64 = 240;
/// Pages queued in the splicer before they are sent (a few pipe-fulls).
const SPLICE_QUEUE_PAGES: u64 = 1024;

/// A list chunk's address list entry: the run's first page address, its page count less one
/// in the low 12 bits.
fn list_entry(gpa: u64, pages: u64) -> u64 {
    gpa | (pages - 1)
}

/// A list chunk (tag [`TAG_LIST`]) after its header: `entries` (u64 LE each, see
/// [`list_entry`]), then the CRC-32 of those bytes (u32 LE). The pages follow, run after run.
fn list_body(entries: &[u64]) -> Vec<u8> {
    let mut b = Vec::with_capacity(entries.len() * 8 + 4);
    for e in entries {
        b.extend_from_slice(&e.to_le_bytes());
    }
    let crc = crc32fast::hash(&b);
    b.extend_from_slice(&crc.to_le_bytes());
    b
}

/// A run of a list chunk as the destination found it in guest RAM.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct ListRun {
    pub gpa: u64,
    pub len: u64,
    pub host: *mut u8,
    pub foff: u64,
}

/// Checks a list chunk's body (`count` entries then their CRC, as the header announced with
/// `len` bytes of pages) against guest RAM: every run page-aligned, inside one RAM region,
/// after the one before (ascending, not overlapping), and the runs' pages exactly `len`.
pub(crate) fn parse_list(
    ram: &GuestRam,
    count: u64,
    len: u64,
    body: &[u8],
    runs: &mut Vec<ListRun>,
) -> std::result::Result<(), String> {
    runs.clear();
    if count == 0 || count > LIST_PAGES || body.len() as u64 != count * 8 + 4 {
        return Err(format!("list chunk of {count} runs"));
    }
    let (list, crc) = body.split_at(body.len() - 4);
    if crc32fast::hash(list) != le32(crc) {
        return Err("list chunk's address list fails its checksum".into());
    }
    let mut next = 0u64;
    let mut total = 0u64;
    for e in list.chunks_exact(8) {
        let e = le64(e);
        let (gpa, pages) = (e & !(PAGE - 1), (e & (PAGE - 1)) + 1);
        let run_len = pages * PAGE;
        total += run_len;
        if gpa < next || total > len {
            return Err(format!(
                "list chunk run of {pages} pages at {gpa:#x} is out of order or past its {len} bytes"
            ));
        }
        let (host, foff) = locate(ram, gpa, run_len)
            .ok_or_else(|| format!("{run_len} bytes at {gpa:#x} are not in RAM"))?;
        runs.push(ListRun {
            gpa,
            len: run_len,
            host,
            foff,
        });
        next = gpa + run_len;
    }
    if total != len {
        return Err(format!(
            "list chunk's runs hold {total} bytes, its header {len}"
        ));
    }
    Ok(())
}

/// Chunks waiting to go out together. On plain TCP with a pipe, short data runs are collected
/// into list chunks (one header and address list for up to [`LIST_PAGES`] pages, the pages
/// back to back) and queued in the splicer, which `vmsplice`s them (page references, no copy);
/// without a pipe, chunk headers and where their pages lie go out in one `sendmsg`; under TLS
/// the chunks themselves, pages copied in by the kernel (`pread` from the memfd), sealed in as
/// few records and writes as their size allows.
struct Gather {
    round: u32,
    headers: Vec<[u8; HEADER]>,
    /// Per header: the pages behind it (host address, length; 0 for none).
    data: Vec<(*const u8, usize)>,
    tls: Vec<u8>,
    /// Plain TCP: sends the queued chunks without copying them (`vmsplice`); `None` when no
    /// pipe could be made, and then `sendmsg` copies them.
    splicer: Option<PageSplicer>,
    /// The list chunk being collected: its entries and their pages (host address, length).
    list: Vec<u64>,
    list_pages: Vec<(*const u8, usize)>,
    list_len: u64,
    /// Pages queued in the splicer and not sent yet.
    queued: u64,
}

impl Gather {
    fn new(conn: &DataConn, round: u32) -> Gather {
        let splicer = match conn {
            DataConn::Plain(_) => PageSplicer::new()
                .inspect_err(|e| {
                    tracing::debug!("no pipe for the gathered pages ({e}): sendmsg copies them")
                })
                .ok(),
            DataConn::Tls { .. } => None,
        };
        Gather {
            round,
            headers: Vec::with_capacity(GATHER_CHUNKS),
            data: Vec::with_capacity(GATHER_CHUNKS),
            tls: Vec::new(),
            splicer,
            list: Vec::with_capacity(LIST_PAGES as usize),
            list_pages: Vec::with_capacity(LIST_PAGES as usize),
            list_len: 0,
            queued: 0,
        }
    }

    /// Queues the list chunk collected so far in the splicer.
    fn seal_list(&mut self) -> std::io::Result<()> {
        let Some(sp) = &mut self.splicer else {
            return Ok(());
        };
        if self.list.is_empty() {
            return Ok(());
        }
        let h = encode(
            self.list.len() as u64,
            self.list_len as u32,
            TAG_LIST,
            self.round,
        );
        let mut head = h.to_vec();
        head.extend_from_slice(&list_body(&self.list));
        let Some((first, rest)) = self.list_pages.split_first() else {
            return Ok(());
        };
        // SAFETY: the pages lie in the guest mapping that `locate` found inside a RAM region,
        // alive as long as the GuestRam the caller holds, which outlives the send (every
        // send_items call ends with a flush).
        let r = unsafe { sp.push(&head, first.0, first.1) };
        if r.is_ok() {
            for &(p, len) in rest {
                // SAFETY: as above.
                unsafe { sp.push_pages(p, len) };
            }
            self.queued += self.list_len / PAGE;
        }
        self.list.clear();
        self.list_pages.clear();
        self.list_len = 0;
        r
    }

    /// Queues a chunk header with no pages behind it.
    fn header(&mut self, conn: &mut DataConn, h: [u8; HEADER]) -> std::io::Result<()> {
        match conn {
            DataConn::Plain(tcp) => {
                if let Some(sp) = &mut self.splicer {
                    // SAFETY: no pages behind it.
                    unsafe { sp.push(&h, std::ptr::null(), 0) }?;
                    self.queued += 1;
                    if self.queued >= SPLICE_QUEUE_PAGES {
                        self.flush_plain(tcp)?;
                    }
                    return Ok(());
                }
                self.headers.push(h);
                self.data.push((std::ptr::null(), 0));
                if self.headers.len() >= GATHER_CHUNKS {
                    self.flush(conn)?;
                }
            }
            DataConn::Tls { .. } => {
                self.tls.extend_from_slice(&h);
                if self.tls.len() >= TLS_GATHER_BYTES {
                    self.flush(conn)?;
                }
            }
        }
        Ok(())
    }

    /// Sends a data run: the pages at `host` (memfd offset `off`, guest-physical `gpa`);
    /// returns the bytes it costs on the wire (its chunk header, or its list entry and, for the
    /// first of a list, the list's header and checksum).
    fn data(
        &mut self,
        conn: &mut DataConn,
        memfd: &File,
        gpa: u64,
        host: *const u8,
        off: u64,
        len: u64,
    ) -> std::io::Result<u64> {
        let round = self.round;
        let h = move || encode(gpa, len as u32, TAG_DATA, round);
        match conn {
            DataConn::Plain(tcp) => {
                if len > GATHER_MAX_PAGES * PAGE {
                    self.flush_plain(tcp)?;
                    send_header(tcp, &h())?;
                    sendfile_all(tcp, memfd, off, len)?;
                    return Ok(HEADER as u64 + len);
                }
                if self.splicer.is_some() {
                    if self.list_len + len > LIST_PAGES * PAGE {
                        self.seal_list()?;
                    }
                    let mut wire = 8 + len;
                    if self.list.is_empty() {
                        wire += HEADER as u64 + 4;
                    }
                    self.list.push(list_entry(gpa, len / PAGE));
                    self.list_pages.push((host, len as usize));
                    self.list_len += len;
                    if self.list_len >= LIST_PAGES * PAGE {
                        self.seal_list()?;
                    }
                    if self.queued >= SPLICE_QUEUE_PAGES {
                        self.flush_plain(tcp)?;
                    }
                    return Ok(wire);
                }
                self.headers.push(h());
                self.data.push((host, len as usize));
                if self.headers.len() >= GATHER_CHUNKS {
                    self.flush_plain(tcp)?;
                }
            }
            DataConn::Tls { conn, .. } => {
                self.tls.extend_from_slice(&h());
                // The kernel copies the pages out of the memfd into the buffer the records
                // are sealed from (no read of guest memory through a Rust reference).
                let at = self.tls.len();
                self.tls.resize(at + len as usize, 0);
                memfd.read_exact_at(&mut self.tls[at..], off)?;
                if self.tls.len() >= TLS_GATHER_BYTES {
                    conn.write_all(&self.tls)?;
                    self.tls.clear();
                }
            }
        }
        Ok(HEADER as u64 + len)
    }

    /// Sends whatever is queued.
    fn flush(&mut self, conn: &mut DataConn) -> std::io::Result<()> {
        match conn {
            DataConn::Plain(tcp) => self.flush_plain(tcp),
            DataConn::Tls { conn, .. } => {
                if !self.tls.is_empty() {
                    conn.write_all(&self.tls)?;
                    self.tls.clear();
                }
                Ok(())
            }
        }
    }

    fn flush_plain(&mut self, tcp: &TcpStream) -> std::io::Result<()> {
        if self.splicer.is_some() {
            let sealed = self.seal_list();
            self.queued = 0;
            // Whatever the seal did, the splicer's queue is sent (and emptied) now.
            let sent = self.splicer.as_mut().map_or(Ok(()), |sp| sp.send(tcp));
            return sealed.and(sent);
        }
        if self.headers.is_empty() {
            return Ok(());
        }
        let mut iov: Vec<libc::iovec> = Vec::with_capacity(2 * self.headers.len());
        for (h, &(p, len)) in self.headers.iter().zip(&self.data) {
            iov.push(libc::iovec {
                iov_base: h.as_ptr() as *mut libc::c_void,
                iov_len: HEADER,
            });
            if len > 0 {
                iov.push(libc::iovec {
                    iov_base: p as *mut libc::c_void,
                    iov_len: len,
                });
            }
        }
        // SAFETY: every iovec points at a live header of `self.headers` or at pages of the
        // guest mapping that `locate` found inside a RAM region (alive as long as the
        // GuestRam the caller holds); the kernel only reads them. The guest may write those
        // pages meanwhile: what goes out is a snapshot, as pre-copy wants.
        let r = unsafe { sendmsg_all(tcp, &mut iov) };
        self.headers.clear();
        self.data.clear();
        r
    }
}

/// Sends every byte the iovecs describe, with `sendmsg`, resuming after partial sends.
///
/// # Safety
/// Each iovec must describe memory readable for its length for the whole call.
unsafe fn sendmsg_all(tcp: &TcpStream, iov: &mut [libc::iovec]) -> std::io::Result<()> {
    let mut first = 0;
    while first < iov.len() {
        let rest = &mut iov[first..];
        // SAFETY: a zeroed msghdr is valid (no name, no control data).
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = rest.as_mut_ptr();
        msg.msg_iovlen = rest.len().min(1024);
        // SAFETY: the iovecs describe readable memory (the caller's promise).
        let n = unsafe { libc::sendmsg(tcp.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
        let Some(mut n) = counted(n)? else {
            continue;
        };
        if n == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::WriteZero,
                "sendmsg sent nothing",
            ));
        }
        // Skip what went out; the first iovec not sent whole is cut to its rest.
        while first < iov.len() && n >= iov[first].iov_len {
            n -= iov[first].iov_len;
            first += 1;
        }
        if n > 0 {
            let v = &mut iov[first];
            v.iov_base = (v.iov_base as *mut u8).wrapping_add(n) as *mut libc::c_void;
            v.iov_len -= n;
        }
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn send_items(
    conn: &mut DataConn,
    mut codec: Option<&mut Compressor>,
    ram: &GuestRam,
    memfd: &File,
    round: u32,
    items: &[(u64, u64)],
    groups: &[std::ops::Range<usize>],
    next: &AtomicUsize,
    zero_pages: ZeroPages,
    throttle: Option<&TokenBucket>,
    cancel: Option<&CancelToken>,
    failed: &AtomicBool,
) -> Result<RoundStats> {
    let io = MigrationError::io("write");
    let mut st = RoundStats::default();
    let mut out = Gather::new(conn, round);
    let mut zbuf = Vec::new();
    // Per group: its items located (gpa, pages, host address, memfd offset), the address of
    // each of their pages and whether it reads all zero.
    let mut located: Vec<(u64, u64, *mut u8, u64)> = Vec::new();
    let mut starts: Vec<*const u8> = Vec::with_capacity(ITEM_PAGES as usize);
    let mut zeros: Vec<bool> = Vec::with_capacity(ITEM_PAGES as usize);
    loop {
        if cancel.is_some_and(|c| c.is_cancelled()) || failed.load(Ordering::SeqCst) {
            return Err(MigrationError::Cancelled);
        }
        let Some(group) = groups.get(next.fetch_add(1, Ordering::Relaxed)) else {
            break;
        };
        let mut group_bytes = 0;
        located.clear();
        starts.clear();
        for &(gpa, pages) in &items[group.clone()] {
            let (host, foff) = locate(ram, gpa, pages * PAGE).ok_or_else(|| {
                MigrationError::Protocol(format!("pages at {gpa:#x} are not in one RAM region"))
            })?;
            for k in 0..pages {
                starts.push(host.wrapping_add((k * PAGE) as usize) as *const u8);
            }
            located.push((gpa, pages, host, foff));
        }
        zeros.clear();
        if zero_pages == ZeroPages::Unchecked {
            zeros.resize(starts.len(), false);
        } else {
            // SAFETY: each page lies inside its item's region mapping (located above), which
            // lives as long as `ram`; a racy snapshot is fine (see is_zero_page).
            unsafe { find_zero_pages(&starts, &mut zeros) };
        }
        let mut at = 0;
        for &(gpa, pages, host, foff) in &located {
            let zero_at = &zeros[at..at + pages as usize];
            at += pages as usize;
            // Split the item into runs of data pages and runs of zero pages.
            let mut i = 0;
            while i < pages {
                let zero = zero_at[i as usize];
                let mut j = i + 1;
                while j < pages && zero_at[j as usize] == zero {
                    j += 1;
                }
                let (g, n) = (gpa + i * PAGE, j - i);
                let len = n * PAGE;
                if zero {
                    if zero_pages == ZeroPages::Skip {
                        st.skipped += n;
                    } else {
                        out.header(conn, encode(g, len as u32, TAG_ZERO, round))
                            .map_err(MigrationError::io("write"))?;
                        st.zero += n;
                        st.bytes += HEADER as u64;
                    }
                } else if let Some(codec) = codec.as_deref_mut() {
                    // The kernel copies the pages out of the memfd (no read of guest memory
                    // through a Rust reference); they go out compressed when that is smaller,
                    // after what is queued (chunks stay in order).
                    out.flush(conn).map_err(MigrationError::io("write"))?;
                    zbuf.resize(len as usize, 0);
                    memfd
                        .read_exact_at(&mut zbuf, foff + i * PAGE)
                        .map_err(MigrationError::io("read guest memory"))?;
                    let wire_len = match codec.compress(&zbuf) {
                        Some(z) => {
                            let mut chunk = Vec::with_capacity(HEADER + 4 + z.len());
                            chunk.extend_from_slice(&encode(g, len as u32, TAG_ZSTD, round));
                            chunk.extend_from_slice(&(z.len() as u32).to_le_bytes());
                            chunk.extend_from_slice(z);
                            if let Some(t) = throttle {
                                t.take(chunk.len() as u64);
                            }
                            conn.write_all(&chunk)
                                .map_err(MigrationError::io("write"))?;
                            st.zstd_pages += n;
                            chunk.len() as u64
                        }
                        None => {
                            if let Some(t) = throttle {
                                t.take(HEADER as u64 + len);
                            }
                            let h = encode(g, len as u32, TAG_DATA, round);
                            if let DataConn::Plain(tcp) = conn {
                                send_header(tcp, &h).map_err(MigrationError::io("write"))?;
                            } else {
                                conn.write_all(&h).map_err(MigrationError::io("write"))?;
                            }
                            conn.write_all(&zbuf).map_err(MigrationError::io("write"))?;
                            HEADER as u64 + len
                        }
                    };
                    st.data += n;
                    st.bytes += wire_len;
                } else {
                    // SAFETY: page i of the item, inside the mapping (as above).
                    let p = unsafe { host.add((i * PAGE) as usize) };
                    let wire = out
                        .data(conn, memfd, g, p, foff + i * PAGE, len)
                        .map_err(MigrationError::io("write"))?;
                    st.data += n;
                    st.bytes += wire;
                    group_bytes += wire;
                }
                i = j;
            }
        }
        if let Some(t) = throttle {
            // Uncompressed chunks are paced per group: sent, then the bucket's wait.
            out.flush(conn).map_err(MigrationError::io("write"))?;
            t.take(group_bytes);
        }
    }
    out.header(conn, encode(0, 0, TAG_ROUND_END, round))
        .map_err(MigrationError::io("write"))?;
    out.flush(conn).map_err(MigrationError::io("write"))?;
    conn.flush().map_err(io)?;
    st.bytes += HEADER as u64;
    Ok(st)
}

/// Accepts the `count` data channels the source was invited to open on `listener`: each
/// must pass the same authentication as the main connection and present `token`. Anything
/// else is closed and counted; the wait ends at `deadline`.
fn accept_channels(
    listener: &TcpListener,
    security: &Security,
    count: u32,
    token: &[u8; TOKEN],
    handshake_timeout: Duration,
    deadline: Instant,
) -> Result<(Vec<DataConn>, u64)> {
    listener
        .set_nonblocking(true)
        .map_err(MigrationError::io("listen"))?;
    let mut conns: Vec<Option<DataConn>> = (0..count).map(|_| None).collect();
    let mut have = 0;
    let mut refused = 0u64;
    while have < count {
        if Instant::now() >= deadline {
            return Err(MigrationError::Io {
                what: "waiting for the data channels",
                source: std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("{have} of {count} data channels arrived"),
                ),
            });
        }
        if refused > 4 * u64::from(MAX_STREAMS) {
            return Err(MigrationError::Limit(format!(
                "{refused} strangers on the data channel port"
            )));
        }
        let tcp = match listener.accept() {
            Ok((tcp, _)) => tcp,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(1));
                continue;
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(MigrationError::io("accepting a data channel")(e)),
        };
        let _ = tcp.set_nonblocking(false);
        let left = deadline
            .saturating_duration_since(Instant::now())
            .min(handshake_timeout)
            .max(Duration::from_millis(1));
        let joined = (|| {
            let mut s = transport::accept(tcp, security, left)?;
            let mut buf = Vec::new();
            if wire::recv(&mut s.conn, &mut buf)? != Kind::Join {
                return Err(MigrationError::Protocol(
                    "a data channel must start with Join".into(),
                ));
            }
            if buf.len() != TOKEN + 4 {
                return Err(MigrationError::Protocol(format!(
                    "Join of {} bytes",
                    buf.len()
                )));
            }
            // Constant time: a stranger learns nothing from how long the refusal takes.
            let diff = buf[..TOKEN]
                .iter()
                .zip(token)
                .fold(0u8, |a, (x, y)| a | (x ^ y));
            if diff != 0 {
                return Err(MigrationError::Protocol(
                    "data channel with a wrong token".into(),
                ));
            }
            let idx = le32(&buf[TOKEN..]);
            Ok((idx, s))
        })();
        match joined {
            Ok((idx, s)) if idx < count && conns[idx as usize].is_none() => {
                conns[idx as usize] = Some(from_stream(s));
                have += 1;
            }
            Ok((idx, _)) => {
                refused += 1;
                tracing::warn!(idx, "data channel with a bad or repeated index; closed");
            }
            Err(e) => {
                refused += 1;
                tracing::warn!("data channel refused: {}", chain(&e));
            }
        }
    }
    Ok((conns.into_iter().flatten().collect(), refused))
}

/// The destination's side of the invitation: a listener on `ip` and a fresh token.
pub(crate) fn invite(ip: IpAddr, count: u32) -> Result<(TcpListener, Invitation)> {
    let listener =
        TcpListener::bind(SocketAddr::new(ip, 0)).map_err(MigrationError::io("listen"))?;
    let port = listener
        .local_addr()
        .map_err(MigrationError::io("listen"))?
        .port();
    Ok((
        listener,
        Invitation {
            port,
            count,
            token: token()?,
        },
    ))
}

/// A barrier for the receivers at each round end, which gives up when one of them failed or
/// the wait outlasts the timeout.
struct RoundBarrier {
    state: Mutex<(u64, u32, bool)>,
    cv: Condvar,
    n: u32,
}

impl RoundBarrier {
    fn wait(&self, timeout: Duration) -> bool {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if st.2 {
            return false;
        }
        let gen = st.0;
        st.1 += 1;
        if st.1 == self.n {
            st.1 = 0;
            st.0 += 1;
            self.cv.notify_all();
            return true;
        }
        let deadline = Instant::now() + timeout;
        while st.0 == gen && !st.2 {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                st.2 = true;
                self.cv.notify_all();
                return false;
            }
            st = self
                .cv
                .wait_timeout(st, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        !st.2
    }

    /// Waits until `rounds` rounds have passed the barrier; false when a channel failed or
    /// the wait timed out.
    fn wait_passed(&self, rounds: u64, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        while st.0 < rounds && !st.2 {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            st = self
                .cv
                .wait_timeout(st, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        !st.2
    }

    fn fail(&self) {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        st.2 = true;
        self.cv.notify_all();
    }
}

/// Counts of the destination's data channels.
#[derive(Default)]
pub(crate) struct RecvStats {
    pub pages: u64,
    pub zero_pages: u64,
    pub bytes: u64,
    pub cpu_s: f64,
    /// Pages that arrived compressed.
    pub zstd_pages: u64,
}

/// The destination's receivers, one thread per data channel, and the populating thread.
pub(crate) struct Receivers {
    handles: Vec<JoinHandle<Result<RecvStats>>>,
    populate: Option<JoinHandle<f64>>,
    stop_populate: Arc<AtomicBool>,
    error: Arc<Mutex<Option<MigrationError>>>,
    barrier: Arc<RoundBarrier>,
    timeout: Duration,
    /// The channels' sockets, shut down when the receivers are dropped unjoined.
    socks: Vec<TcpStream>,
    /// Strangers refused on the data channel port.
    pub refused: u64,
    /// Whether the receivers fault pages in themselves (`recv` into the mapping, TLS), so
    /// populating ahead helps; channels that splice into the memfd need no populating.
    populate_ahead: bool,
}

impl Receivers {
    /// Accepts the invited channels and starts receiving into `ram`. A receiver that fails
    /// records why and shuts down the reading side of `main` so the main loop stops too.
    /// With `compression`, chunks may come compressed.
    #[allow(clippy::too_many_arguments)]
    pub fn start(
        listener: TcpListener,
        inv: &Invitation,
        security: &Security,
        ram: &GuestRam,
        main: &TcpStream,
        handshake_timeout: Duration,
        timeout: Duration,
        compression: bool,
    ) -> Result<Receivers> {
        let (conns, refused) = accept_channels(
            &listener,
            security,
            inv.count,
            &inv.token,
            handshake_timeout,
            Instant::now() + handshake_timeout,
        )?;
        drop(listener);
        let barrier = Arc::new(RoundBarrier {
            state: Mutex::new((0, 0, false)),
            cv: Condvar::new(),
            n: conns.len() as u32,
        });
        let error = Arc::new(Mutex::new(None));
        let mut handles = Vec::new();
        let mut socks = Vec::new();
        let mut populate_ahead = false;
        let file_writes = Arc::new(Mutex::new(()));
        for (i, conn) in conns.into_iter().enumerate() {
            if let Ok(t) = conn.tcp().try_clone() {
                socks.push(t);
            }
            // Plain channels splice their pages into the memfd; without a pipe (a system
            // out of descriptors) they receive into the mapping as TLS channels do.
            let pipe = match &conn {
                DataConn::Plain(_) => SplicePipe::new()
                    .map(|p| p.with_file_lock(file_writes.clone()))
                    .map_err(|e| tracing::warn!("no pipe to splice data channel {i}: {e}"))
                    .ok(),
                DataConn::Tls { .. } => None,
            };
            populate_ahead |= pipe.is_none();
            let (ram, barrier, error) = (ram.clone(), barrier.clone(), error.clone());
            let main = main.try_clone().map_err(MigrationError::io("setup"))?;
            let _ = conn.tcp().set_read_timeout(Some(timeout));
            let _ = conn.tcp().set_write_timeout(Some(timeout));
            let h = std::thread::Builder::new()
                .name(format!("migration-rx{i}"))
                .spawn(move || {
                    let cpu = crate::cpu::ThreadCpu::start();
                    let r = Decompressor::new().and_then(|d| {
                        receive_channel(
                            conn,
                            pipe,
                            &ram,
                            &barrier,
                            timeout,
                            compression.then_some(d),
                        )
                    });
                    if let Err(e) = &r {
                        barrier.fail();
                        let mut slot = error.lock().unwrap_or_else(|p| p.into_inner());
                        if slot.is_none() {
                            *slot = Some(MigrationError::Protocol(format!(
                                "data channel {i}: {}",
                                chain(e)
                            )));
                        }
                        let _ = main.shutdown(std::net::Shutdown::Read);
                    }
                    r.map(|mut st| {
                        st.cpu_s = cpu.elapsed().as_secs_f64();
                        st
                    })
                })
                .map_err(MigrationError::io("spawning a receiver"))?;
            handles.push(h);
        }
        Ok(Receivers {
            handles,
            populate: None,
            stop_populate: Arc::new(AtomicBool::new(false)),
            error,
            barrier,
            timeout,
            socks,
            refused,
            populate_ahead,
        })
    }

    /// Populates the memory of `extents` (what round 0 will fill) in the background, ahead of
    /// the data, so the receivers find the pages there.
    /// Nothing to do when every channel splices into the memfd (writes that fill a page
    /// allocate it uncleared; populating would clear it first).
    pub fn populate(&mut self, ram: &GuestRam, extents: Vec<(u64, u64)>) {
        if !self.populate_ahead {
            return;
        }
        let ram = ram.clone();
        let stop = self.stop_populate.clone();
        self.populate = std::thread::Builder::new()
            .name("migration-populate".into())
            .spawn(move || {
                let cpu = crate::cpu::ThreadCpu::start();
                'all: for (gpa, len) in extents {
                    let mut off = 0;
                    while off < len {
                        if stop.load(Ordering::Relaxed) {
                            break 'all;
                        }
                        let n = (len - off).min(POPULATE_STEP);
                        if let Some((p, _)) = locate(&ram, gpa + off, n) {
                            // SAFETY: MADV_POPULATE_WRITE only faults in the pages of this
                            // range of the guest mapping (checked by `locate`); it changes
                            // no content.
                            unsafe {
                                libc::madvise(
                                    p as *mut libc::c_void,
                                    n as usize,
                                    libc::MADV_POPULATE_WRITE,
                                )
                            };
                        }
                        off += n;
                    }
                }
                cpu.elapsed().as_secs_f64()
            })
            .ok();
    }

    /// Waits until every channel has taken in the first `rounds` rounds (their pages are in
    /// guest memory here), so the source can pause with nothing of the earlier rounds still
    /// in flight.
    pub fn wait_rounds(&self, rounds: u64) -> Result<()> {
        if self.barrier.wait_passed(rounds, self.timeout) {
            return Ok(());
        }
        Err(self.error().unwrap_or_else(|| {
            MigrationError::Protocol(format!(
                "the data channels did not take in round {} in time",
                rounds.saturating_sub(1)
            ))
        }))
    }

    /// The error a receiver recorded, if any.
    pub fn error(&self) -> Option<MigrationError> {
        self.error.lock().unwrap_or_else(|p| p.into_inner()).take()
    }

    /// Waits for every receiver to end (after the source's Done) and sums their counts.
    pub fn join(mut self) -> Result<RecvStats> {
        let mut total = RecvStats::default();
        let mut first = None;
        for h in self.handles.drain(..) {
            match h.join() {
                Ok(Ok(st)) => {
                    total.pages += st.pages;
                    total.zero_pages += st.zero_pages;
                    total.bytes += st.bytes;
                    total.cpu_s += st.cpu_s;
                    total.zstd_pages += st.zstd_pages;
                }
                Ok(Err(e)) => {
                    first.get_or_insert(e);
                }
                Err(_) => {
                    first.get_or_insert(MigrationError::Protocol("receiver panicked".into()));
                }
            }
        }
        self.stop_populate.store(true, Ordering::Relaxed);
        if let Some(p) = self.populate.take() {
            total.cpu_s += p.join().unwrap_or(0.0);
        }
        if let Some(e) = self.error().or(first) {
            return Err(e);
        }
        Ok(total)
    }
}

impl Drop for Receivers {
    fn drop(&mut self) {
        self.stop_populate.store(true, Ordering::Relaxed);
        if !self.handles.is_empty() {
            for t in &self.socks {
                let _ = t.shutdown(std::net::Shutdown::Both);
            }
        }
    }
}

fn receive_channel(
    mut conn: DataConn,
    pipe: Option<SplicePipe>,
    ram: &GuestRam,
    barrier: &RoundBarrier,
    timeout: Duration,
    mut zstd: Option<Decompressor>,
) -> Result<RecvStats> {
    let protocol = |m: String| MigrationError::Protocol(m);
    let mut st = RecvStats::default();
    let mut zbuf = Vec::new();
    let mut last_round: Option<u32> = None;
    let memfd = ram.memfd().clone();
    let mut list = Vec::new();
    let mut runs = Vec::new();
    let mut file_runs = Vec::new();
    loop {
        let mut h = [0u8; HEADER];
        conn.read_exact(&mut h)
            .map_err(MigrationError::io("read"))?;
        st.bytes += HEADER as u64;
        if crc32fast::hash(&h[..20]) != le32(&h[20..]) {
            return Err(protocol("chunk header fails its checksum".into()));
        }
        let (gpa, len, tag, round) = (le64(&h), le32(&h[8..]), le32(&h[12..]), le32(&h[16..]));
        if last_round.is_some_and(|r| round < r) && tag != TAG_DONE {
            return Err(protocol(format!(
                "round {round} after round {last_round:?}"
            )));
        }
        let len = u64::from(len);
        match tag {
            TAG_DATA | TAG_ZERO | TAG_ZSTD => {
                if len == 0 || len % PAGE != 0 || gpa % PAGE != 0 || len > MAX_CHUNK {
                    return Err(protocol(format!("chunk of {len} bytes at {gpa:#x}")));
                }
                let (p, foff) = locate(ram, gpa, len)
                    .ok_or_else(|| protocol(format!("{len} bytes at {gpa:#x} are not in RAM")))?;
                if tag == TAG_ZSTD {
                    let Some(d) = zstd.as_mut() else {
                        return Err(protocol(
                            "compressed chunk, but compression was not negotiated".into(),
                        ));
                    };
                    let mut n = [0u8; 4];
                    conn.read_exact(&mut n)
                        .map_err(MigrationError::io("read"))?;
                    let zlen = u64::from(u32::from_le_bytes(n));
                    // A compressed chunk is smaller than its pages, or it would have gone raw.
                    if zlen == 0 || zlen >= len {
                        return Err(protocol(format!(
                            "compressed chunk of {zlen} bytes for {len} bytes at {gpa:#x}"
                        )));
                    }
                    zbuf.resize(zlen as usize, 0);
                    conn.read_exact(&mut zbuf)
                        .map_err(MigrationError::io("read"))?;
                    // SAFETY: as for data below; the slice lives only for this call.
                    let dst = unsafe { std::slice::from_raw_parts_mut(p, len as usize) };
                    d.decompress_exact(&zbuf, dst)?;
                    st.pages += len / PAGE;
                    st.zstd_pages += len / PAGE;
                    st.bytes += 4 + zlen;
                } else if tag == TAG_DATA {
                    match (&mut conn, &pipe) {
                        // The pages go through the pipe into the memfd at their offset (the
                        // same pages the mapping shows), uncleared and unfaulted.
                        (DataConn::Plain(tcp), Some(pp)) => pp
                            .socket_to_file(tcp, &memfd, foff, len)
                            .map_err(MigrationError::io("read"))?,
                        // SAFETY: [p, p+len) is guest memory (located above) of a VM that does
                        // not run yet and that no device reaches: nothing else accesses it, and
                        // no other receiver writes it at the same time (the source sends each
                        // page once per round, and rounds are fenced by the barrier).
                        (DataConn::Plain(tcp), None) => unsafe { recv_all(tcp, p, len as usize) }
                            .map_err(MigrationError::io("read"))?,
                        (DataConn::Tls { conn, .. }, _) => {
                            // SAFETY: as above; the slice lives only for this read.
                            let dst = unsafe { std::slice::from_raw_parts_mut(p, len as usize) };
                            conn.read_exact(dst).map_err(MigrationError::io("read"))?;
                        }
                    }
                    st.pages += len / PAGE;
                    st.bytes += len;
                } else {
                    // A hole, not written zeros, where the memfd allows it.
                    if ram.discard(gpa, len).is_err() {
                        // SAFETY: as for data above.
                        unsafe { std::ptr::write_bytes(p, 0, len as usize) };
                    }
                    st.zero_pages += len / PAGE;
                }
                last_round = Some(round);
            }
            TAG_LIST => {
                if len == 0 || len % PAGE != 0 || len > LIST_PAGES * PAGE || gpa > LIST_PAGES {
                    return Err(protocol(format!("list chunk of {gpa} runs, {len} bytes")));
                }
                list.resize(gpa as usize * 8 + 4, 0);
                conn.read_exact(&mut list)
                    .map_err(MigrationError::io("read"))?;
                parse_list(ram, gpa, len, &list, &mut runs).map_err(protocol)?;
                match (&mut conn, &pipe) {
                    // As data chunks: through the pipe into the memfd, run by run.
                    (DataConn::Plain(tcp), Some(pp)) => {
                        file_runs.clear();
                        file_runs.extend(runs.iter().map(|r| (r.foff, r.len)));
                        pp.socket_to_file_runs(tcp, &memfd, &file_runs)
                            .map_err(MigrationError::io("read"))?
                    }
                    (DataConn::Plain(tcp), None) => {
                        for r in &runs {
                            // SAFETY: as for data chunks: guest memory (checked by
                            // parse_list) that nothing else accesses meanwhile.
                            unsafe { recv_all(tcp, r.host, r.len as usize) }
                                .map_err(MigrationError::io("read"))?;
                        }
                    }
                    (DataConn::Tls { conn, .. }, _) => {
                        for r in &runs {
                            // SAFETY: as above; the slice lives only for this read.
                            let dst =
                                unsafe { std::slice::from_raw_parts_mut(r.host, r.len as usize) };
                            conn.read_exact(dst).map_err(MigrationError::io("read"))?;
                        }
                    }
                }
                st.pages += len / PAGE;
                st.bytes += list.len() as u64 + len;
                last_round = Some(round);
            }
            TAG_ROUND_END => {
                last_round = Some(round);
                if !barrier.wait(timeout) {
                    return Err(protocol(format!(
                        "another data channel failed or stalled at the end of round {round}"
                    )));
                }
            }
            TAG_DONE => return Ok(st),
            other => return Err(protocol(format!("unknown chunk tag {other}"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_pages_are_told_from_data_pages() {
        let mut page = vec![0u64; 512];
        // SAFETY: a live, aligned 4 KiB buffer.
        assert!(unsafe { is_zero_page(page.as_ptr() as *const u8) });
        page[511] = 1 << 63;
        // SAFETY: as above.
        assert!(!unsafe { is_zero_page(page.as_ptr() as *const u8) });
    }

    #[test]
    fn a_sample_of_the_pages_decides_whether_all_are_checked() {
        // 64 pages of data; page 3 zero (not a sampled page: ZERO_SAMPLE is 16).
        let mut mem = vec![1u64; 64 * 512];
        let page = |mem: &Vec<u64>, i: usize| mem[i * 512..].as_ptr() as *const u8;
        mem[3 * 512..4 * 512].fill(0);
        let starts: Vec<_> = (0..64).map(|i| page(&mem, i)).collect();
        let mut zeros = Vec::new();
        // SAFETY: every start is a live, aligned 4 KiB page of `mem`.
        unsafe { find_zero_pages(&starts, &mut zeros) };
        assert_eq!(
            zeros,
            vec![false; 64],
            "a lone zero page among data goes as data"
        );
        // A run of ZERO_SAMPLE zero pages, wherever it starts, is found, and with it every
        // other zero page of the group.
        for first in 20..20 + ZERO_SAMPLE {
            let mut mem = vec![1u64; 64 * 512];
            mem[3 * 512..4 * 512].fill(0);
            mem[first * 512..(first + ZERO_SAMPLE) * 512].fill(0);
            let starts: Vec<_> = (0..64).map(|i| page(&mem, i)).collect();
            // SAFETY: as above.
            unsafe { find_zero_pages(&starts, &mut zeros) };
            let want: Vec<bool> = (0..64)
                .map(|i| i == 3 || (first..first + ZERO_SAMPLE).contains(&i))
                .collect();
            assert_eq!(zeros, want, "run at {first}");
        }
        // A zero page whose last word is not zero is data.
        let mut mem = vec![0u64; 16 * 512];
        mem[9 * 512 + 511] = 1;
        let starts: Vec<_> = (0..16).map(|i| page(&mem, i)).collect();
        // SAFETY: as above.
        unsafe { find_zero_pages(&starts, &mut zeros) };
        assert_eq!(zeros, (0..16).map(|i| i != 9).collect::<Vec<_>>());
    }

    /// A page of `ram` at `gpa` filled with a pattern of its own.
    fn fill(ram: &GuestRam, gpa: u64) {
        let page: Vec<u8> = (0..PAGE)
            .map(|i| ((gpa / PAGE * 31 + i * 7) % 251) as u8 + 1)
            .collect();
        ram.write(gpa, &page).unwrap();
    }

    /// Scattered short runs (many list chunks, runs of 1-8 pages) and a long one (`sendfile`)
    /// sent by `send_items` arrive at their addresses and nowhere else, through the pipe into
    /// the memfd and with `recv` into the mapping alike.
    #[test]
    fn scattered_runs_arrive_in_list_chunks_at_their_addresses() {
        for with_pipe in [true, false] {
            let src = GuestRam::new(32 << 20).unwrap();
            let dst = GuestRam::new(32 << 20).unwrap();
            let mut items = Vec::new();
            let mut gpa = 3 * PAGE;
            for k in 0..700u64 {
                let pages = k % 8 + 1;
                items.push((gpa, pages));
                gpa += (pages + 1 + k % 3) * PAGE;
            }
            items.push((gpa, 100));
            for &(g, n) in &items {
                for i in 0..n {
                    fill(&src, g + i * PAGE);
                }
            }
            let groups: Vec<_> = (0..items.len()).map(|i| i..i + 1).collect();
            let l = TcpListener::bind("127.0.0.1:0").unwrap();
            let tx = TcpStream::connect(l.local_addr().unwrap()).unwrap();
            let (rx, _) = l.accept().unwrap();
            let receiver = {
                let dst = dst.clone();
                std::thread::spawn(move || {
                    let barrier = RoundBarrier {
                        state: Mutex::new((0, 0, false)),
                        cv: Condvar::new(),
                        n: 1,
                    };
                    let pipe = with_pipe.then(|| SplicePipe::new().unwrap());
                    receive_channel(
                        DataConn::Plain(rx),
                        pipe,
                        &dst,
                        &barrier,
                        Duration::from_secs(60),
                        None,
                    )
                })
            };
            let mut conn = DataConn::Plain(tx);
            let st = send_items(
                &mut conn,
                None,
                &src,
                &src.memfd().clone(),
                1,
                &items,
                &groups,
                &AtomicUsize::new(0),
                ZeroPages::Unchecked,
                None,
                None,
                &AtomicBool::new(false),
            )
            .unwrap();
            conn.write_all(&encode(0, 0, TAG_DONE, 0)).unwrap();
            let got = receiver.join().unwrap().unwrap();
            let sent: u64 = items.iter().map(|i| i.1).sum();
            assert_eq!((st.data, got.pages), (sent, sent));
            // Everything sent was taken in, byte for byte (round end and done included).
            assert_eq!(got.bytes, st.bytes + HEADER as u64);
            // Far fewer bytes than a header per run.
            assert!(
                st.bytes < sent * PAGE + items.len() as u64 * 12,
                "{}",
                st.bytes
            );
            let (mut a, mut b) = (vec![0u8; PAGE as usize], vec![0u8; PAGE as usize]);
            for p in 0..(32 << 20) / PAGE {
                src.read(p * PAGE, &mut a).unwrap();
                dst.read(p * PAGE, &mut b).unwrap();
                assert!(a == b, "page {p} differs (pipe: {with_pipe})");
            }
        }
    }

    /// The destination takes a list chunk's address list apart only when every run lies in
    /// guest RAM, in order, and the runs hold exactly the pages the header announced.
    #[test]
    fn list_chunks_are_checked_against_guest_ram() {
        let ram = GuestRam::new(32 << 20).unwrap();
        let mut runs = Vec::new();
        let good = [list_entry(0x1000, 2), list_entry(0x5000, 1)];
        parse_list(&ram, 2, 3 * PAGE, &list_body(&good), &mut runs).unwrap();
        assert_eq!(
            runs.iter().map(|r| (r.gpa, r.len)).collect::<Vec<_>>(),
            [(0x1000, 2 * PAGE), (0x5000, PAGE)]
        );
        let end = 32u64 << 20;
        let bad: [(&[u64], u64, &str); 7] = [
            (
                &[list_entry(0x5000, 1), list_entry(0x1000, 2)],
                3 * PAGE,
                "out of order",
            ),
            (
                &[list_entry(0x1000, 2), list_entry(0x2000, 1)],
                3 * PAGE,
                "overlapping",
            ),
            (
                &[list_entry(end - PAGE, 2)],
                2 * PAGE,
                "past the end of RAM",
            ),
            (&[list_entry(end, 1)], PAGE, "outside RAM"),
            (
                &[list_entry(0x1000, 2)],
                3 * PAGE,
                "fewer pages than announced",
            ),
            (
                &[list_entry(0x1000, 2), list_entry(0x5000, 1)],
                2 * PAGE,
                "more pages",
            ),
            (&[list_entry(!(PAGE - 1), 1)], PAGE, "an address past 2^64"),
        ];
        for (entries, len, what) in bad {
            let body = list_body(entries);
            let r = parse_list(&ram, entries.len() as u64, len, &body, &mut runs);
            assert!(r.is_err(), "{what} was taken");
        }
        let mut body = list_body(&good);
        body[3] ^= 1;
        assert!(
            parse_list(&ram, 2, 3 * PAGE, &body, &mut runs).is_err(),
            "checksum"
        );
        let body = list_body(&good);
        assert!(
            parse_list(&ram, 3, 3 * PAGE, &body, &mut runs).is_err(),
            "count"
        );
        assert!(
            parse_list(&ram, 0, 0, &list_body(&[]), &mut runs).is_err(),
            "empty"
        );
    }

    #[test]
    fn headers_are_checked() {
        let h = encode(0x1000, 4096, TAG_DATA, 3);
        assert_eq!(crc32fast::hash(&h[..20]), le32(&h[20..]));
        assert_eq!(le64(&h), 0x1000);
        let inv = Invitation {
            port: 7,
            count: 4,
            token: [9; TOKEN],
        };
        let back = Invitation::decode(&inv.encode()).unwrap();
        assert_eq!((back.port, back.count, back.token), (7, 4, [9; TOKEN]));
        let mut bad = inv.encode();
        bad[2] = 200;
        assert!(Invitation::decode(&bad).is_err());
    }
}

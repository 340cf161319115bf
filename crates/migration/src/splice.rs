//! Pages received straight into the destination's memfd: `splice` from the data channel's
//! socket into a pipe, then from the pipe into the memfd at the pages' offset.
//!
//! Why not `recv` into the guest mapping: every page the receive touches first is a page
//! fault in which the kernel clears a fresh page, and the copy then overwrites it. That
//! clearing (`clear_page_erms`) was the largest item of the destination's profile at 4 GiB,
//! more than the copy itself. A write through the file (what splicing into it is) allocates
//! the page cache page without clearing it when the write fills it whole, and takes no fault.
//! On loopback the socket's buffers refer to the source's own pages (`sendfile`), which the
//! first splice only moves into the pipe by reference: the one copy left is the one into the
//! memfd. No populating ahead is needed either (it would clear the pages first).
//!
//! The source's scattered pages (runs too short for a `sendfile` each) go the other way:
//! [`PageSplicer`] `vmsplice`s the chunk headers and the guest pages into a pipe (page
//! references, no copy) and `splice`s the pipe into the socket, so the sender copies nothing,
//! as `sendfile` does for long runs. Gathered into one `sendmsg` instead, the kernel copied
//! every page into the socket's buffers: a third of the source's CPU in a heavy guest's
//! migration, where most pages after round 0 are single-page runs.
use std::{
    fs::File,
    net::TcpStream,
    os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
    sync::{Arc, Mutex},
};

use crate::channels::counted;

/// Pipe size asked for (at most `/proc/sys/fs/pipe-max-size`, 1 MiB by default): fewer,
/// larger splices.
const PIPE_BYTES: libc::c_int = 1 << 20;

/// A pipe one receiver splices its data chunks through.
pub(crate) struct SplicePipe {
    read: OwnedFd,
    write: OwnedFd,
    /// Bytes the pipe holds (what one splice from the socket may move).
    capacity: usize,
    /// Held while the pipe's contents are written into the file, shared by the receivers
    /// of one file (see [`SplicePipe::with_file_lock`]).
    file_lock: Option<Arc<Mutex<()>>>,
}

/// Moves up to `len` bytes from `from` into `to` (at `*off` of `to` when given), again when
/// interrupted; moving nothing is an error of `kind` saying `what`.
fn splice_some(
    from: RawFd,
    to: RawFd,
    mut off: Option<&mut libc::loff_t>,
    len: usize,
    (kind, what): (std::io::ErrorKind, &'static str),
) -> std::io::Result<usize> {
    loop {
        let at = off
            .as_deref_mut()
            .map_or(std::ptr::null_mut(), |o| o as *mut libc::loff_t);
        // SAFETY: splice between descriptors the caller holds, one of them a pipe; `at` is
        // null or a live offset the kernel advances. No user memory is touched.
        let n =
            unsafe { libc::splice(from, std::ptr::null_mut(), to, at, len, libc::SPLICE_F_MOVE) };
        match counted(n)? {
            None => continue,
            Some(0) => return Err(std::io::Error::new(kind, what)),
            Some(n) => return Ok(n),
        }
    }
}

impl SplicePipe {
    /// A pipe as large as the system allows up to [`PIPE_BYTES`].
    pub fn new() -> std::io::Result<SplicePipe> {
        let mut fds = [0 as libc::c_int; 2];
        // SAFETY: pipe2 writes two descriptors into `fds`, a live array of two.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: both descriptors are fresh and owned by nobody else.
        let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        // SAFETY: fcntl on a pipe this function owns; a refusal (a lower system limit) keeps
        // the default size, which F_GETPIPE_SZ then reports.
        unsafe { libc::fcntl(write.as_raw_fd(), libc::F_SETPIPE_SZ, PIPE_BYTES) };
        // SAFETY: as above.
        let capacity = unsafe { libc::fcntl(write.as_raw_fd(), libc::F_GETPIPE_SZ) };
        Ok(SplicePipe {
            read,
            write,
            capacity: usize::try_from(capacity)
                .ok()
                .filter(|&c| c > 0)
                .unwrap_or(1 << 16),
            file_lock: None,
        })
    }

    /// Writes into the file only while holding `lock`, which the other pipes writing into the
    /// same file share. A write into a memfd holds the file's inode lock for the whole copy,
    /// and the kernel's waiters for it spin while its holder copies: with four receivers
    /// writing into one memfd, 20-40 % of their CPU time went to `rwsem_spin_on_owner`. The
    /// writes are one at a time either way; waiting on this lock sleeps instead.
    pub fn with_file_lock(mut self, lock: Arc<Mutex<()>>) -> SplicePipe {
        self.file_lock = Some(lock);
        self
    }

    /// Moves everything the pipe holds (`len` bytes) into `tcp`.
    fn pipe_to_socket(&self, tcp: &TcpStream, mut len: usize, more: bool) -> std::io::Result<()> {
        while len > 0 {
            let flags = if more { libc::SPLICE_F_MORE } else { 0 };
            // SAFETY: splice from the pipe this struct owns into the caller's socket; no user
            // memory is touched.
            let n = unsafe {
                libc::splice(
                    self.read.as_raw_fd(),
                    std::ptr::null_mut(),
                    tcp.as_raw_fd(),
                    std::ptr::null_mut(),
                    len,
                    flags | libc::SPLICE_F_MOVE,
                )
            };
            match counted(n)? {
                None => continue,
                Some(0) => {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::WriteZero,
                        "splice into the data channel sent nothing",
                    ))
                }
                Some(n) => len -= n.min(len),
            }
        }
        Ok(())
    }

    /// Moves exactly `len` bytes from `tcp` into `file` at offset `off`. The pipe is empty
    /// before and after (each batch taken from the socket is written out whole before the
    /// next), so a failed call leaves nothing behind for the next one to mistake for data.
    pub fn socket_to_file(
        &self,
        tcp: &TcpStream,
        file: &File,
        off: u64,
        len: u64,
    ) -> std::io::Result<()> {
        self.socket_to_file_runs(tcp, file, &[(off, len)])
    }

    /// Moves `runs` ((file offset, length) each) from `tcp` into `file`, one after the
    /// other as they come on the socket: a pipe-full is taken from the socket at once and
    /// written out run by run. As [`SplicePipe::socket_to_file`], the pipe is empty before and
    /// after.
    pub fn socket_to_file_runs(
        &self,
        tcp: &TcpStream,
        file: &File,
        runs: &[(u64, u64)],
    ) -> std::io::Result<()> {
        let total: u64 = runs.iter().map(|r| r.1).sum();
        let (mut run, mut in_run) = (0usize, 0u64);
        let mut done = 0u64;
        while done < total {
            let want = (total - done).min(self.capacity as u64) as usize;
            let mut left = splice_some(
                tcp.as_raw_fd(),
                self.write.as_raw_fd(),
                None,
                want,
                (
                    std::io::ErrorKind::UnexpectedEof,
                    "data channel closed mid-chunk",
                ),
            )?;
            let _writing = self
                .file_lock
                .as_ref()
                .map(|l| l.lock().unwrap_or_else(|p| p.into_inner()));
            while left > 0 {
                let Some(&(off, len)) = runs.get(run) else {
                    // More taken than the runs hold: impossible, as `want` never exceeds
                    // what is left of them.
                    return Err(std::io::Error::other("spliced past the runs"));
                };
                let mut at = (off + in_run) as libc::loff_t;
                let m = splice_some(
                    self.read.as_raw_fd(),
                    file.as_raw_fd(),
                    Some(&mut at),
                    left.min((len - in_run) as usize),
                    (
                        std::io::ErrorKind::WriteZero,
                        "splice into guest memory wrote nothing",
                    ),
                )?;
                left -= m;
                done += m as u64;
                in_run += m as u64;
                if in_run == len {
                    (run, in_run) = (run + 1, 0);
                }
            }
        }
        Ok(())
    }
}

/// Bytes of one header arena (a fresh anonymous mapping, filled once, then unmapped).
const ARENA_BYTES: usize = 64 << 10;

/// Where chunk headers live while the kernel still refers to them: `vmsplice` hands the
/// socket references to the pages they lie in, which stay in use until the receiver has read
/// them, long after the call returns. So a header's bytes are written once and never again:
/// each arena is a fresh private mapping filled from the start; a full one is unmapped (the
/// kernel keeps the pages it refers to, unchanged, until it lets them go) and a new one
/// mapped. Nothing is ever rewritten in place, whatever the receiver's pace.
struct HeaderArena {
    base: *mut u8,
    used: usize,
}

impl HeaderArena {
    fn new() -> std::io::Result<HeaderArena> {
        // SAFETY: a fresh anonymous private mapping; no existing memory is affected.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                ARENA_BYTES,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        Ok(HeaderArena {
            base: base as *mut u8,
            used: 0,
        })
    }

    /// Copies `h` into the arena; its stable address. `None` when the arena is full.
    fn put(&mut self, h: &[u8]) -> Option<*const u8> {
        if self.used + h.len() > ARENA_BYTES {
            return None;
        }
        // SAFETY: used + len <= ARENA_BYTES: inside the mapping, a range never written before
        // and not referenced by the kernel yet.
        let at = unsafe { self.base.add(self.used) };
        // SAFETY: `h` and the arena range do not overlap (the arena is ours alone).
        unsafe { std::ptr::copy_nonoverlapping(h.as_ptr(), at, h.len()) };
        self.used += h.len();
        Some(at)
    }
}

impl Drop for HeaderArena {
    fn drop(&mut self) {
        // SAFETY: unmaps the mapping `new` made; nothing reads it through this address any
        // more (pages the kernel still refers to stay alive, unchanged, on their own).
        unsafe { libc::munmap(self.base as *mut libc::c_void, ARENA_BYTES) };
    }
}

/// Sends chunks (a header, then pages of the guest mapping) without copying them: `vmsplice`
/// into a pipe, `splice` into the socket.
pub(crate) struct PageSplicer {
    pipe: SplicePipe,
    arena: HeaderArena,
    /// Full arenas whose headers are still queued: unmapped after the send, not before (the
    /// queued iovecs point into them).
    full: Vec<HeaderArena>,
    iov: Vec<libc::iovec>,
}

// SAFETY: the raw pointers are the arena's own mapping and the iovecs queued for one send,
// used only by the thread that holds the splicer.
unsafe impl Send for PageSplicer {}

impl PageSplicer {
    pub fn new() -> std::io::Result<PageSplicer> {
        Ok(PageSplicer {
            pipe: SplicePipe::new()?,
            arena: HeaderArena::new()?,
            full: Vec::new(),
            iov: Vec::new(),
        })
    }

    /// Queues a chunk: header `h`, then `len` bytes of guest pages at `pages` (none when
    /// `len` is 0).
    ///
    /// # Safety
    /// `pages` must point at `len` bytes of a mapping of guest memory that stays mapped until
    /// [`PageSplicer::send`] returns; the kernel keeps its own references to the pages after
    /// that (they may change meanwhile: a snapshot is what pre-copy wants, as with
    /// `sendfile`).
    pub unsafe fn push(&mut self, h: &[u8], pages: *const u8, len: usize) -> std::io::Result<()> {
        let at = match self.arena.put(h) {
            Some(at) => at,
            None => {
                let full = std::mem::replace(&mut self.arena, HeaderArena::new()?);
                self.full.push(full);
                self.arena.put(h).ok_or_else(|| {
                    std::io::Error::new(std::io::ErrorKind::InvalidInput, "header too long")
                })?
            }
        };
        self.iov.push(libc::iovec {
            iov_base: at as *mut libc::c_void,
            iov_len: h.len(),
        });
        if len > 0 {
            self.iov.push(libc::iovec {
                iov_base: pages as *mut libc::c_void,
                iov_len: len,
            });
        }
        Ok(())
    }

    /// Queues `len` bytes of guest pages at `pages` behind what is queued (the next pages of
    /// a chunk whose header went with [`PageSplicer::push`]).
    ///
    /// # Safety
    /// As for [`PageSplicer::push`].
    pub unsafe fn push_pages(&mut self, pages: *const u8, len: usize) {
        if len > 0 {
            self.iov.push(libc::iovec {
                iov_base: pages as *mut libc::c_void,
                iov_len: len,
            });
        }
    }

    /// Sends everything queued on `tcp`, a pipe-full at a time; the queue is empty after,
    /// whatever the outcome.
    pub fn send(&mut self, tcp: &TcpStream) -> std::io::Result<()> {
        let r = self.send_queued(tcp);
        self.iov.clear();
        self.full.clear();
        r
    }

    fn send_queued(&mut self, tcp: &TcpStream) -> std::io::Result<()> {
        let mut first = 0;
        while first < self.iov.len() {
            let rest = &self.iov[first..];
            let n = loop {
                // SAFETY: every iovec is an arena header or guest pages the caller of `push`
                // vouched for; vmsplice only reads them (takes page references). The pipe is
                // empty here (drained below), so the call does not block.
                let n = unsafe {
                    libc::vmsplice(
                        self.pipe.write.as_raw_fd(),
                        rest.as_ptr(),
                        rest.len().min(1024),
                        0,
                    )
                };
                if let Some(n) = counted(n)? {
                    break n;
                }
            };
            if n == 0 {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::WriteZero,
                    "vmsplice moved nothing",
                ));
            }
            // Skip what went in; the first iovec not taken whole is cut to its rest.
            let mut left = n;
            while first < self.iov.len() && left >= self.iov[first].iov_len {
                left -= self.iov[first].iov_len;
                first += 1;
            }
            if left > 0 {
                let v = &mut self.iov[first];
                v.iov_base = (v.iov_base as *mut u8).wrapping_add(left) as *mut libc::c_void;
                v.iov_len -= left;
            }
            self.pipe.pipe_to_socket(tcp, n, first < self.iov.len())?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::{
        io::{Read, Write},
        net::TcpListener,
        os::unix::fs::FileExt,
    };

    /// A loopback connection (sending end, receiving end) and a fresh memfd.
    fn fixture() -> (TcpStream, TcpStream, File) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let tx = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (rx, _) = l.accept().unwrap();
        // SAFETY: memfd_create with a valid name.
        let fd = unsafe { libc::memfd_create(c"splice-test".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: a fresh descriptor.
        (tx, rx, unsafe { File::from_raw_fd(fd) })
    }

    /// Bytes spliced from a socket land in the file at the offset asked for, in several
    /// pipe-fulls, and nothing around them changes.
    #[test]
    fn socket_bytes_land_in_the_file_at_the_offset() {
        let (mut tx, rx, file) = fixture();
        let size = 8u64 << 20;
        file.set_len(size).unwrap();
        let data: Vec<u8> = (0..3u32 << 20).map(|i| (i % 251) as u8 + 1).collect();
        let sender = std::thread::spawn(move || {
            tx.write_all(&data).unwrap();
            data
        });
        let pipe = SplicePipe::new().unwrap();
        pipe.socket_to_file(&rx, &file, 4096, 3 << 20).unwrap();
        let data = sender.join().unwrap();
        let mut back = vec![0u8; data.len()];
        file.read_exact_at(&mut back, 4096).unwrap();
        assert!(back == data, "the spliced bytes differ");
        let mut edge = [1u8; 4096];
        file.read_exact_at(&mut edge, 0).unwrap();
        assert_eq!(edge, [0u8; 4096]);
        file.read_exact_at(&mut edge, 4096 + (3 << 20)).unwrap();
        assert_eq!(edge, [0u8; 4096]);
    }

    /// Chunks spliced from header arenas and a shared mapping of a memfd arrive whole and in
    /// order, headers included after their arenas were unmapped (more headers than one arena
    /// holds, all read only after the splicer is gone).
    #[test]
    fn spliced_chunks_arrive_whole_after_their_arenas_are_unmapped() {
        let (tx, mut rx, file) = fixture();
        for s in [&tx, &rx] {
            let big: libc::c_int = 4 << 20;
            for opt in [libc::SO_SNDBUF, libc::SO_RCVBUF] {
                // SAFETY: setsockopt with a live int of the right size.
                unsafe {
                    libc::setsockopt(
                        s.as_raw_fd(),
                        libc::SOL_SOCKET,
                        opt,
                        &big as *const libc::c_int as *const libc::c_void,
                        std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                    )
                };
            }
        }
        let pages = 16usize;
        let data: Vec<u8> = (0..pages * 4096).map(|i| (i % 253) as u8 + 1).collect();
        file.write_all_at(&data, 0).unwrap();
        // SAFETY: a shared read-only mapping of the memfd's first pages, unmapped below.
        let map = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                data.len(),
                libc::PROT_READ,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        assert_ne!(map, libc::MAP_FAILED);
        let headers = ARENA_BYTES / 24 + 100;
        let mut want = Vec::new();
        let mut sp = PageSplicer::new().unwrap();
        for k in 0..headers {
            let h: Vec<u8> = (0..24).map(|b| (k * 7 + b) as u8).collect();
            want.extend_from_slice(&h);
            // Every 200th header has a page behind it.
            let (p, len) = if k % 200 == 0 {
                let page = (k / 200) % pages;
                want.extend_from_slice(&data[page * 4096..(page + 1) * 4096]);
                // SAFETY: page `page` of the mapping above.
                (unsafe { (map as *const u8).add(page * 4096) }, 4096)
            } else {
                (std::ptr::null(), 0)
            };
            // SAFETY: the mapping outlives the send below.
            unsafe { sp.push(&h, p, len) }.unwrap();
        }
        sp.send(&tx).unwrap();
        drop(sp);
        // SAFETY: unmaps the mapping made above, not used any more.
        unsafe { libc::munmap(map, data.len()) };
        drop(tx);
        let mut got = Vec::new();
        rx.read_to_end(&mut got).unwrap();
        assert_eq!(got.len(), want.len());
        assert!(got == want, "the spliced bytes differ");
    }

    /// A connection that closes mid-chunk is an error, not a short write taken for the whole.
    #[test]
    fn a_closed_socket_mid_chunk_is_an_error() {
        let (mut tx, rx, file) = fixture();
        file.set_len(1 << 20).unwrap();
        tx.write_all(&[7u8; 5000]).unwrap();
        drop(tx);
        let pipe = SplicePipe::new().unwrap();
        let e = pipe.socket_to_file(&rx, &file, 0, 8192).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::UnexpectedEof);
    }
}

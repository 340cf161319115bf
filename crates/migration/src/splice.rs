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
use std::{
    fs::File,
    net::TcpStream,
    os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
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
        })
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
        let mut done = 0u64;
        while done < len {
            let want = (len - done).min(self.capacity as u64) as usize;
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
            while left > 0 {
                let mut at = (off + done) as libc::loff_t;
                let m = splice_some(
                    self.read.as_raw_fd(),
                    file.as_raw_fd(),
                    Some(&mut at),
                    left,
                    (
                        std::io::ErrorKind::WriteZero,
                        "splice into guest memory wrote nothing",
                    ),
                )?;
                left -= m;
                done += m as u64;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::{io::Write, net::TcpListener, os::unix::fs::FileExt};

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

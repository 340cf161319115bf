//! Where the NIC's frames go: a [`Wire`] sends and receives whole Ethernet frames without
//! blocking and has a file descriptor the worker waits on. Two implementations: [`Tap`], a
//! host tap device (the real wire), and [`SocketWire`], one end of a datagram socket pair (a
//! test's peer, or a second device, on the other end).
use std::{
    fs::File,
    io,
    os::{
        fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
        unix::net::UnixDatagram,
    },
};

/// A frame pipe the device's worker drives.
pub trait Wire: Send {
    /// The descriptor that becomes readable when a frame waits.
    fn fd(&self) -> RawFd;
    /// Sends one frame; an error drops it (counted by the caller).
    fn send(&mut self, frame: &[u8]) -> io::Result<()>;
    /// Receives one frame into `buf`: `Ok(None)` when none waits. A frame longer than `buf`
    /// is truncated to it (the caller checks the length it got).
    fn recv(&mut self, buf: &mut [u8]) -> io::Result<Option<usize>>;
}

/// A host tap device (IFF_TAP | IFF_NO_PI), opened non-blocking.
pub struct Tap {
    file: File,
    name: String,
}

/// `TUNSETIFF` from `include/uapi/linux/if_tun.h`.
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;

impl Tap {
    /// Opens (or creates) the tap interface `name` in this process's network namespace.
    pub fn open(name: &str) -> io::Result<Self> {
        if name.is_empty() || name.len() >= libc::IFNAMSIZ {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("interface name {name:?} is empty or too long"),
            ));
        }
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")?;
        // SAFETY: ifreq is plain data; all zeroes is a valid value.
        let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
        for (d, s) in req.ifr_name.iter_mut().zip(name.bytes()) {
            *d = s as libc::c_char;
        }
        req.ifr_ifru.ifru_flags = IFF_TAP | IFF_NO_PI;
        // SAFETY: TUNSETIFF reads and writes a `struct ifreq`, which `req` is; fd is open.
        let r = unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF, &mut req) };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Tap {
            file,
            name: name.into(),
        })
    }

    /// The interface name.
    pub fn name(&self) -> &str {
        &self.name
    }
}

use std::os::unix::fs::OpenOptionsExt;

fn nonblocking_read(fd: RawFd, buf: &mut [u8]) -> io::Result<Option<usize>> {
    // SAFETY: `buf` is valid for `buf.len()` bytes; `fd` is owned by the caller.
    let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
    if n < 0 {
        let e = io::Error::last_os_error();
        return if e.kind() == io::ErrorKind::WouldBlock {
            Ok(None)
        } else {
            Err(e)
        };
    }
    Ok(Some(n as usize))
}

impl Wire for Tap {
    fn fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    fn send(&mut self, frame: &[u8]) -> io::Result<()> {
        // SAFETY: `frame` is valid for its length; the tap takes one frame per write.
        let n = unsafe { libc::write(self.file.as_raw_fd(), frame.as_ptr().cast(), frame.len()) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    fn recv(&mut self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        nonblocking_read(self.file.as_raw_fd(), buf)
    }
}

/// One end of a datagram socket pair: each datagram is a frame.
pub struct SocketWire {
    sock: UnixDatagram,
}

impl SocketWire {
    /// A connected pair: the device's end and the peer's end (both non-blocking).
    pub fn pair() -> io::Result<(SocketWire, SocketWire)> {
        let (a, b) = UnixDatagram::pair()?;
        a.set_nonblocking(true)?;
        b.set_nonblocking(true)?;
        Ok((SocketWire { sock: a }, SocketWire { sock: b }))
    }

    /// Wraps a datagram socket someone else made (non-blocking is set here).
    pub fn from_fd(fd: OwnedFd) -> io::Result<Self> {
        // SAFETY: the caller hands over ownership of a datagram socket.
        let sock = unsafe { UnixDatagram::from_raw_fd(std::os::fd::IntoRawFd::into_raw_fd(fd)) };
        sock.set_nonblocking(true)?;
        Ok(SocketWire { sock })
    }
}

impl Wire for SocketWire {
    fn fd(&self) -> RawFd {
        self.sock.as_raw_fd()
    }

    fn send(&mut self, frame: &[u8]) -> io::Result<()> {
        self.sock.send(frame).map(|_| ())
    }

    fn recv(&mut self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        match self.sock.recv(buf) {
            Ok(n) => Ok(Some(n)),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn socket_pair_moves_frames_both_ways_without_blocking() {
        let (mut a, mut b) = SocketWire::pair().unwrap();
        let mut buf = [0u8; 64];
        assert_eq!(b.recv(&mut buf).unwrap(), None);
        a.send(&[1, 2, 3]).unwrap();
        assert_eq!(b.recv(&mut buf).unwrap(), Some(3));
        assert_eq!(&buf[..3], &[1, 2, 3]);
        b.send(&[9; 60]).unwrap();
        assert_eq!(a.recv(&mut buf).unwrap(), Some(60));
    }

    #[test]
    fn tap_names_are_checked_before_the_kernel_is_asked() {
        assert!(Tap::open("").is_err());
        assert!(Tap::open("a-name-far-too-long-for-ifnamsiz").is_err());
    }
}

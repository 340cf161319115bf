//! The UDP sockets of the port: one per address (GID) the port receives and sends for.
//!
//! # Why one socket per GID (and not `IP_PKTINFO`)
//!
//! A RoCEv2 packet's destination GID is its IP destination. A socket bound to one address
//! receives only datagrams sent to that address, so the socket a datagram arrived on *is*
//! its destination GID, and a datagram sent from it carries that address as its source —
//! the kernel writes both, no sender can declare them. The alternative, one wildcard socket
//! (`0.0.0.0:4791`) with `IP_PKTINFO`, would let only one process per machine (or network
//! namespace) run a port, whereas Ferry runs several hosts side by side on loopback
//! addresses, each with its own VMs' GIDs; per-address sockets also make "a VM's GID is an
//! address its host owns" a check the kernel does at registration (binding an address the
//! host does not have fails).
//!
//! # The IP header the kernel writes
//!
//! The ICRC covers the IPv4 identification. Sockets here set `IP_MTU_DISCOVER` to
//! `IP_PMTUDISC_DO`: DF set, and Linux then writes identification 0 for datagrams of an
//! unconnected UDP socket (measured: without it, Linux 6.x numbers them), which is the header
//! [`rdma_wire::icrc::icrc_for_udp_socket`] assumes. A packet larger than the path MTU is
//! refused by the kernel (`EMSGSIZE`) rather than fragmented — as an RNIC never fragments.
//!
//! # Runs of packets: GSO out, GRO in
//!
//! A run of equal-size packets (the MIDDLE and LAST packets of an RC message) leaves in one
//! `sendmsg` with `UDP_SEGMENT` ([`send_segments`]): the kernel cuts it into datagrams and
//! numbers their identifications 0, 1, 2, … — the sender computes the `k`-th ICRC for
//! identification `k` ([`rdma_wire::icrc::IpIdEffect`]), so the packets on the wire are
//! exactly what separate sends of a stack numbering them that way would give, and a Linux
//! `rdma_rxe` peer (which checks the real header) accepts them. Receiving sockets set
//! `UDP_GRO` ([`enable_gro`]): a run sent that way over loopback arrives in one `recvmsg`
//! ([`recv`]), cut back into its datagrams by the port. A kernel that refuses a GSO send
//! (a device without checksum offload) turns it off for the socket; the packets then leave
//! one by one.
//!
//! Over loopback a run goes from socket to socket in one piece (coalesced for a GRO socket,
//! cut by the receiving UDP layer for others); towards a device (the interop tests' tap) the
//! kernel cuts it before the device, and Linux `rdma_rxe` accepts the packets: the test of
//! rping's multi-packet READ responses checks every ICRC in the capture over the real
//! headers.
use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::os::fd::AsRawFd;
use std::time::Duration;

/// How long an address in use is tried again (see [`bind`]).
pub const IN_USE_GRACE: Duration = Duration::from_secs(1);

/// Socket buffer size asked for (the kernel caps it at `net.core.{r,w}mem_max`).
const SOCKET_BUFFER: libc::c_int = 4 << 20;

/// Binds `addr:port` for RoCEv2: DF with identification 0, larger buffers, a read timeout so
/// the receive thread can notice a stop request. (Public so that benchmarks can give a raw
/// UDP baseline the same socket.)
///
/// An address still in use is tried again for up to [`IN_USE_GRACE`]: a socket this process
/// has just closed stays bound while any child forked in between has not yet reached `exec`
/// (the child holds a copy of the descriptor table until then, `SOCK_CLOEXEC` or not), and
/// this process forks device processes and tools. An address held for good (another
/// process's port) is still refused, after the grace.
pub fn bind(addr: Ipv4Addr, port: u16) -> std::io::Result<UdpSocket> {
    let at = SocketAddrV4::new(addr, port);
    let end = std::time::Instant::now() + IN_USE_GRACE;
    let mut pause = Duration::from_millis(1);
    let socket = loop {
        match UdpSocket::bind(at) {
            Err(e)
                if e.kind() == std::io::ErrorKind::AddrInUse
                    && std::time::Instant::now() + pause < end =>
            {
                // No event reports that a child has exec'd: a short bounded back-off.
                std::thread::sleep(pause);
                pause = (pause * 2).min(Duration::from_millis(50));
            }
            r => break r?,
        }
    };
    set_int(
        &socket,
        libc::IPPROTO_IP,
        libc::IP_MTU_DISCOVER,
        libc::IP_PMTUDISC_DO,
    )?;
    // Best effort: a smaller buffer only costs drops under bursts, which RC recovers.
    let _ = set_int(&socket, libc::SOL_SOCKET, libc::SO_RCVBUF, SOCKET_BUFFER);
    let _ = set_int(&socket, libc::SOL_SOCKET, libc::SO_SNDBUF, SOCKET_BUFFER);
    socket.set_read_timeout(Some(Duration::from_millis(50)))?;
    Ok(socket)
}

#[allow(unsafe_code)]
fn set_int(
    socket: &UdpSocket,
    level: libc::c_int,
    name: libc::c_int,
    value: libc::c_int,
) -> std::io::Result<()> {
    // SAFETY: the descriptor is a live socket owned by `socket` for the whole call; `value`
    // is a c_int on the stack and the length passed is its size, as setsockopt expects for
    // these integer options.
    let r = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            level,
            name,
            std::ptr::from_ref(&value).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// `SOL_UDP` and its GSO/GRO options (`linux/udp.h`; the libc crate has them only for
/// uclibc).
const SOL_UDP: libc::c_int = 17;
const UDP_SEGMENT: libc::c_int = 103;
const UDP_GRO: libc::c_int = 104;

/// Most segments one GSO send may carry (`UDP_MAX_SEGMENTS` of older kernels).
pub(crate) const MAX_GSO_SEGMENTS: usize = 64;
/// Most UDP payload bytes one send may carry over IPv4 (65535 - 20 - 8).
pub const MAX_GSO_BYTES: usize = 65_507;
/// A receive buffer that holds any datagram, coalesced (GRO) runs included.
pub(crate) const RECV_BUFFER: usize = 65_536;

/// Asks the kernel to hand runs of datagrams of one flow to `recv` coalesced (`UDP_GRO`):
/// a run a peer sent with one GSO send (or that the receiving NIC's GRO merged) comes back
/// in one call. Best effort: without it every datagram comes alone.
pub fn enable_gro(socket: &UdpSocket) -> bool {
    set_int(socket, SOL_UDP, UDP_GRO, 1).is_ok()
}

/// What one [`recv`] got.
pub struct Received {
    /// Bytes in the buffer.
    pub len: usize,
    /// The sender (IPv4 only; anything else is `None`).
    pub from: Option<SocketAddrV4>,
    /// The size of each datagram when the kernel coalesced a run (the last may be shorter).
    pub segment: Option<usize>,
    /// The datagram did not fit the buffer (cut).
    pub truncated: bool,
}

/// Receives one datagram, or a coalesced run of them (see [`enable_gro`]), into `buf`.
#[allow(unsafe_code)]
pub fn recv(socket: &UdpSocket, buf: &mut [u8]) -> std::io::Result<Received> {
    // SAFETY: an all-zero sockaddr_in is a valid value of the plain C struct.
    let mut name: libc::sockaddr_in = unsafe { std::mem::zeroed() };
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // Room for one cmsg with an int (the GRO segment size), 8-byte aligned.
    let mut control = [0u64; 8];
    // SAFETY: an all-zero msghdr is a valid value of the plain C struct; its pointers are
    // set below.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_name = std::ptr::from_mut(&mut name).cast();
    msg.msg_namelen = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&control);
    // SAFETY: every pointer in `msg` points at live memory of this frame (`name`, `iov` and
    // the buffer it describes, `control`) with the lengths given, for the whole call; the
    // descriptor is the live socket `socket` owns.
    let n = unsafe { libc::recvmsg(socket.as_raw_fd(), &mut msg, 0) };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let from = (name.sin_family == libc::AF_INET as libc::sa_family_t).then(|| {
        SocketAddrV4::new(
            Ipv4Addr::from(u32::from_be(name.sin_addr.s_addr)),
            u16::from_be(name.sin_port),
        )
    });
    let mut segment = None;
    // SAFETY: `msg` was filled by the kernel; the CMSG macros walk its control buffer
    // (inside `control`, bounded by msg_controllen) and return null at its end.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            if (*c).cmsg_level == SOL_UDP
                && (*c).cmsg_type == UDP_GRO
                && (*c).cmsg_len as usize
                    >= libc::CMSG_LEN(std::mem::size_of::<libc::c_int>() as u32) as usize
            {
                let v = std::ptr::read_unaligned(libc::CMSG_DATA(c).cast::<libc::c_int>());
                segment = usize::try_from(v).ok().filter(|&s| s > 0);
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
    }
    Ok(Received {
        len: n as usize,
        from,
        segment,
        truncated: msg.msg_flags & libc::MSG_TRUNC != 0,
    })
}

/// Sends `data`, a run of datagrams of `segment` bytes each (the last may be shorter), to
/// `to` in one call: the kernel cuts it into datagrams (UDP GSO, `UDP_SEGMENT`), numbering
/// their IPv4 identifications 0, 1, 2, … (DF, unconnected socket).
#[allow(unsafe_code)]
pub fn send_segments(
    socket: &UdpSocket,
    data: &[u8],
    segment: u16,
    to: SocketAddrV4,
) -> std::io::Result<()> {
    let name = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: to.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(*to.ip()).to_be(),
        },
        sin_zero: [0; 8],
    };
    let mut iov = libc::iovec {
        iov_base: data.as_ptr().cast_mut().cast(),
        iov_len: data.len(),
    };
    let mut control = [0u64; 4];
    // SAFETY: an all-zero msghdr is a valid value of the plain C struct; its pointers are
    // set below.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_name = std::ptr::from_ref(&name).cast_mut().cast();
    msg.msg_namelen = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    // SAFETY: CMSG_SPACE only computes a size.
    msg.msg_controllen = unsafe { libc::CMSG_SPACE(std::mem::size_of::<u16>() as u32) } as usize;
    // SAFETY: the control buffer (32 bytes, 8-byte aligned) holds one cmsg with a u16
    // (CMSG_SPACE(2) = 24 bytes); CMSG_FIRSTHDR returns its start, which is inside it.
    unsafe {
        let c = libc::CMSG_FIRSTHDR(&msg);
        (*c).cmsg_level = SOL_UDP;
        (*c).cmsg_type = UDP_SEGMENT;
        (*c).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<u16>() as u32) as usize;
        std::ptr::write_unaligned(libc::CMSG_DATA(c).cast::<u16>(), segment);
    }
    // SAFETY: every pointer in `msg` points at live memory of this frame (`name`, `iov` and
    // the data it describes, which the kernel only reads, `control`) with the lengths given,
    // for the whole call; the descriptor is the live socket `socket` owns.
    let n = unsafe { libc::sendmsg(socket.as_raw_fd(), &msg, 0) };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An address held by a live socket is refused (after the grace); once that socket is
    /// closed the address binds again.
    #[test]
    fn an_address_in_use_is_refused_and_binds_once_released() {
        let addr = Ipv4Addr::new(127, 47, 0, 1);
        let first = bind(addr, 4791).expect("first bind");
        let err = bind(addr, 4791).expect_err("the address is held");
        assert_eq!(err.kind(), std::io::ErrorKind::AddrInUse);
        drop(first);
        bind(addr, 4791).expect("binds again once released");
    }
}

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
use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::os::fd::AsRawFd;
use std::time::Duration;

/// Socket buffer size asked for (the kernel caps it at `net.core.{r,w}mem_max`).
const SOCKET_BUFFER: libc::c_int = 4 << 20;

/// Binds `addr:port` for RoCEv2: DF with identification 0, larger buffers, a read timeout so
/// the receive thread can notice a stop request. (Public so that benchmarks can give a raw
/// UDP baseline the same socket.)
pub fn bind(addr: Ipv4Addr, port: u16) -> std::io::Result<UdpSocket> {
    let socket = UdpSocket::bind(SocketAddrV4::new(addr, port))?;
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

//! Helpers for tests with real UDP sockets on loopback. Each test uses its own 127.N.0.0/16
//! block so tests run in parallel (every GID is an address a port binds).
#![allow(dead_code)]
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use rdma::addr::gid_v4;
use rdma::cm::CmConfig;
use rdma::host::{Host, HostConfig};
use rdma::peer::Peer;
use rdma::port::PortConfig;
use rdma::Gid;

pub const WAIT: Duration = Duration::from_secs(10);

/// Host `h` (1, 2, ...) of block `n`: 127.n.0.h, VMs 127.n.h.1..
pub fn host_addr(n: u8, h: u8) -> Ipv4Addr {
    Ipv4Addr::new(127, n, 0, h)
}

pub fn vm_gid(n: u8, h: u8, i: u8) -> Gid {
    gid_v4(Ipv4Addr::new(127, n, h, i))
}

pub fn fast_cm() -> CmConfig {
    CmConfig::fast()
}

/// Host `h` of block `n` with `vms` VMs. (`_hosts`, the number of hosts in the test, is
/// what a neighbour table once needed; IP routing on loopback needs nothing.)
pub fn start_host(n: u8, h: u8, _hosts: u8, vms: usize) -> Host {
    let mut cfg = HostConfig::new(host_addr(n, h), vms, Ipv4Addr::new(127, n, h, 1));
    cfg.cm = fast_cm();
    Host::start(cfg).expect("host starts")
}

/// A bare-metal peer at 127.n.0.200.
pub fn start_peer(n: u8, _hosts: u8) -> Peer {
    let port = PortConfig::new(Ipv4Addr::new(127, n, 0, 200));
    Peer::start(port, fast_cm()).expect("peer starts")
}

/// Polls `f` until true or `WAIT` passes.
pub fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let end = Instant::now() + WAIT;
    while Instant::now() < end {
        if f() {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!("timed out waiting for {what}");
}

/// Every MAD the multiplexer delivered to a VM was received by that VM's agent, and no agent
/// ever saw a MAD for a GID other than its own.
pub fn assert_exact_delivery(host: &Host) {
    for vm in host.vms() {
        assert_eq!(
            vm.endpoint().stats().wrong_dgid,
            0,
            "VM {} saw a MAD for another GID",
            vm.id()
        );
        // Counters of one MAD are bumped on both sides of the hand-over: let in-flight
        // traffic settle.
        eventually("delivered == received", || {
            let mux = host.mux().vm_report(vm.id()).expect("VM report").counters;
            mux.delivered == vm.endpoint().stats().received
        });
    }
}

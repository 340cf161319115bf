//! The loop both network workloads run: bring the NIC up, say `NAME: ready`, then take frames,
//! answer what the stack answers (ARP, ping, echoes) and hand other datagrams to the workload,
//! until stopped, `duration_ms`, or the workload says it is done; then wait for the last
//! frames to leave.
use guest_abi::{params::status, BootParams};

use super::{
    driver::{NetError, VirtioNet},
    Peer, Stack, Verdict,
};
use crate::{clock, nvme::Arena, params, println};

/// What a workload adds to the loop.
pub trait Service {
    /// The workload's name (prefix of its console lines).
    const NAME: &'static str;
    /// Echo datagrams to the port (the stack answers) instead of handing them over.
    const ECHO: bool;
    /// A datagram to the port from `peer` (only without [`Service::ECHO`]): build the answer,
    /// if any, with [`Stack::udp_frame`] in `out` and return its length (0: none).
    fn datagram(&mut self, stack: &Stack, peer: Peer, data: &[u8], out: &mut [u8]) -> usize;
    /// True once the workload has done what it was asked.
    fn done(&self, stack: &Stack) -> bool;
}

/// Runs `svc` on the NIC; returns the exit status of the loop (`OK` or a `NET_*` status).
pub fn run<S: Service>(p: &BootParams, svc: &mut S) -> (u32, Stack) {
    let args = p.args.net;
    let mut arena = Arena::new(p.ram_lo_size);
    let ip = args.ip.to_be_bytes();
    let mut stack = Stack {
        mac: [0; 6],
        ip,
        udp_port: args.udp_port as u16,
        echo: S::ECHO,
        counters: Default::default(),
    };
    let mut nic = match VirtioNet::init(&mut arena) {
        Ok(n) => n,
        Err(e) => {
            println!("{}: {}", S::NAME, e);
            let code = match e {
                NetError::NotFound => status::NET_NO_DEVICE,
                _ => status::NET_INIT_FAILED,
            };
            return (code, stack);
        }
    };
    stack.mac = nic.mac;
    let m = nic.mac;
    println!(
        "{}: ready mac {:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x} ip {}.{}.{}.{} udp {} count {}",
        S::NAME,
        m[0],
        m[1],
        m[2],
        m[3],
        m[4],
        m[5],
        ip[0],
        ip[1],
        ip[2],
        ip[3],
        args.udp_port,
        args.count
    );
    let t0 = clock::rdtsc();
    let mut out = [0u8; 1514];
    let mut code = status::OK;
    while !(params::stop_requested()
        || (p.args.duration_ms != 0
            && clock::ticks_to_ms(clock::rdtsc() - t0) >= p.args.duration_ms)
        || svc.done(&stack))
    {
        let mut reply = 0;
        let r = nic.recv(|f| match stack.handle(f, &mut out) {
            Verdict::Reply(n) => reply = n,
            Verdict::Udp(peer, data) => {
                let mut answer = [0u8; 1514];
                reply = svc.datagram(&stack, peer, data, &mut answer);
                out[..reply].copy_from_slice(&answer[..reply]);
            }
            Verdict::None => {}
        });
        let r = match r {
            Ok(false) if nic.needs_reset() => Err(NetError::Device("the device needs a reset")),
            Ok(false) => {
                core::hint::spin_loop();
                continue;
            }
            Ok(true) if reply > 0 => nic.send(|b| {
                b[..reply].copy_from_slice(&out[..reply]);
                reply
            }),
            other => other.map(|_| ()),
        };
        if let Err(e) = r {
            println!("{}: {}", S::NAME, e);
            code = status::NET_DEVICE_FAILED;
            break;
        }
        params::write64(guest_abi::params::OFF_PROGRESS, nic.rx_frames);
    }
    if let Err(e) = nic.drain_tx() {
        println!("{}: {}", S::NAME, e);
        if code == status::OK {
            code = status::NET_DEVICE_FAILED;
        }
    }
    let c = stack.counters;
    println!(
        "{}: nic rx {} tx {} runts {}; arp {} ping {} udp echoes {} ignored {} malformed {}",
        S::NAME,
        nic.rx_frames,
        nic.tx_frames,
        nic.rx_runts,
        c.arp_replies,
        c.pings,
        c.udp_echoes,
        c.ignored,
        c.malformed
    );
    (code, stack)
}

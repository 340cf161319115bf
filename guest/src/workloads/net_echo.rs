//! `net-echo`: brings up the passthrough virtio-net NIC and answers ARP for its address,
//! ping, and UDP datagrams to its port (echoed back), until stopped, `duration_ms`, or
//! `net.count` datagrams. Prints `net-echo: ready` once the NIC runs (tests wait for it).
use guest_abi::{params::status, BootParams};

use crate::{
    clock,
    net::{driver::VirtioNet, Stack, Verdict},
    nvme::Arena,
    params, println,
};

pub fn run(p: &BootParams) -> u32 {
    let args = p.args.net;
    let mut arena = Arena::new(p.ram_lo_size);
    let mut nic = match VirtioNet::init(&mut arena) {
        Ok(n) => n,
        Err(e @ crate::net::driver::NetError::NotFound) => {
            println!("net-echo: {}", e);
            return status::NET_NO_DEVICE;
        }
        Err(e) => {
            println!("net-echo: {}", e);
            return status::NET_INIT_FAILED;
        }
    };
    let ip = args.ip.to_be_bytes();
    let mut stack = Stack {
        mac: nic.mac,
        ip,
        udp_port: args.udp_port as u16,
        echo: true,
        counters: Default::default(),
    };
    let m = nic.mac;
    println!(
        "net-echo: ready mac {:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x} ip {}.{}.{}.{} udp {}",
        m[0], m[1], m[2], m[3], m[4], m[5], ip[0], ip[1], ip[2], ip[3], args.udp_port
    );
    let t0 = clock::rdtsc();
    let mut out = [0u8; 1514];
    let mut code = status::OK;
    loop {
        if params::stop_requested()
            || (p.args.duration_ms != 0
                && clock::ticks_to_ms(clock::rdtsc() - t0) >= p.args.duration_ms)
            || (args.count != 0 && stack.counters.udp_echoes >= args.count)
        {
            break;
        }
        let mut reply = 0;
        match nic.recv(|f| {
            if let Verdict::Reply(n) = stack.handle(f, &mut out) {
                reply = n;
            }
        }) {
            Ok(true) => {}
            Ok(false) => {
                if nic.needs_reset() {
                    println!("net-echo: the device needs a reset");
                    code = status::NET_DEVICE_FAILED;
                    break;
                }
                core::hint::spin_loop();
                continue;
            }
            Err(e) => {
                println!("net-echo: {}", e);
                code = status::NET_DEVICE_FAILED;
                break;
            }
        }
        if reply > 0 {
            let r = nic.send(|b| {
                b[..reply].copy_from_slice(&out[..reply]);
                reply
            });
            if let Err(e) = r {
                println!("net-echo: {}", e);
                code = status::NET_DEVICE_FAILED;
                break;
            }
        }
        params::write64(guest_abi::params::OFF_PROGRESS, stack.counters.udp_echoes);
    }
    let c = stack.counters;
    if let Err(e) = nic.drain_tx() {
        println!("net-echo: {}", e);
        if code == status::OK {
            code = status::NET_DEVICE_FAILED;
        }
    }
    println!(
        "net-echo: done rx {} tx {} arp {} ping {} udp {} ignored {} malformed {} runts {}",
        nic.rx_frames,
        nic.tx_frames,
        c.arp_replies,
        c.pings,
        c.udp_echoes,
        c.ignored,
        c.malformed,
        nic.rx_runts
    );
    code
}

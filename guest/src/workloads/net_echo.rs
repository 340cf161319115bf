//! `net-echo`: brings up the passthrough virtio-net NIC and answers ARP for its address,
//! ping, and UDP datagrams to its port (echoed back), until stopped, `duration_ms`, or
//! `net.count` datagrams. Prints `net-echo: ready` once the NIC runs (tests wait for it).
use guest_abi::BootParams;

use crate::net::{
    serve::{self, Service},
    Peer, Stack,
};

struct Echo {
    count: u64,
}

impl Service for Echo {
    const NAME: &'static str = "net-echo";
    const ECHO: bool = true;
    fn datagram(&mut self, _: &Stack, _: Peer, _: &[u8], _: &mut [u8]) -> usize {
        0
    }
    fn done(&self, stack: &Stack) -> bool {
        self.count != 0 && stack.counters.udp_echoes >= self.count
    }
}

pub fn run(p: &BootParams) -> u32 {
    serve::run(
        p,
        &mut Echo {
            count: p.args.net.count,
        },
    )
    .0
}

//! `net-stream`: a sequenced UDP stream both ways on the passthrough virtio-net NIC. The peer
//! sends datagrams `FPST | seq (u32 BE) | pattern` to `udp_port`; the guest checks each one's
//! order (duplicates, gaps) and content, and answers it with the next datagram of its own
//! stream, `FGST | seq | pattern`, of the same length, which the peer checks the same way.
//! The guest exits 0 once `net.count` datagrams went each way with no error, 53 if any
//! datagram came twice, out of order or corrupted. Prints `net-stream: ready` first.
use guest_abi::{params::status, BootParams};

use crate::{
    clock,
    net::{driver::VirtioNet, Stack, Verdict},
    nvme::Arena,
    params, println,
};

/// Magic of the peer's datagrams.
pub const PEER_MAGIC: [u8; 4] = *b"FPST";
/// Magic of the guest's datagrams.
pub const GUEST_MAGIC: [u8; 4] = *b"FGST";

/// Byte `i` (counted from the datagram's start) of datagram `seq` of a stream with `seed`.
pub fn pattern(seed: u8, seq: u32, i: usize) -> u8 {
    (seq.wrapping_mul(7) as usize).wrapping_add(i.wrapping_mul(13)) as u8 ^ seed
}

/// Seeds of the two streams' patterns.
const PEER_SEED: u8 = 0x5a;
const GUEST_SEED: u8 = 0xa5;

#[derive(Default)]
struct Tally {
    expected: u32,
    in_order: u64,
    duplicates: u64,
    gaps: u64,
    corrupt: u64,
}

impl Tally {
    fn errors(&self) -> u64 {
        self.duplicates + self.gaps + self.corrupt
    }

    /// Checks one datagram of the peer's stream.
    fn check(&mut self, d: &[u8]) {
        if d.len() < 8 || d[..4] != PEER_MAGIC {
            self.corrupt += 1;
            return;
        }
        let seq = u32::from_be_bytes([d[4], d[5], d[6], d[7]]);
        if (8..d.len()).any(|i| d[i] != pattern(PEER_SEED, seq, i)) {
            self.corrupt += 1;
            println!("net-stream: datagram {} corrupted", seq);
            return;
        }
        if seq == self.expected {
            self.in_order += 1;
            self.expected = seq.wrapping_add(1);
        } else if seq < self.expected {
            self.duplicates += 1;
            println!(
                "net-stream: datagram {} again (expected {})",
                seq, self.expected
            );
        } else {
            self.gaps += 1;
            println!(
                "net-stream: datagram {} while expecting {}",
                seq, self.expected
            );
            self.expected = seq.wrapping_add(1);
        }
    }
}

pub fn run(p: &BootParams) -> u32 {
    let args = p.args.net;
    let mut arena = Arena::new(p.ram_lo_size);
    let mut nic = match VirtioNet::init(&mut arena) {
        Ok(n) => n,
        Err(e @ crate::net::driver::NetError::NotFound) => {
            println!("net-stream: {}", e);
            return status::NET_NO_DEVICE;
        }
        Err(e) => {
            println!("net-stream: {}", e);
            return status::NET_INIT_FAILED;
        }
    };
    let ip = args.ip.to_be_bytes();
    let mut stack = Stack {
        mac: nic.mac,
        ip,
        udp_port: args.udp_port as u16,
        echo: false,
        counters: Default::default(),
    };
    println!(
        "net-stream: ready ip {}.{}.{}.{} udp {} count {}",
        ip[0], ip[1], ip[2], ip[3], args.udp_port, args.count
    );
    let t0 = clock::rdtsc();
    let mut tally = Tally::default();
    let mut sent: u32 = 0;
    let mut out = [0u8; 1514];
    let mut payload = [0u8; 1472];
    let mut code = status::OK;
    loop {
        if params::stop_requested()
            || (p.args.duration_ms != 0
                && clock::ticks_to_ms(clock::rdtsc() - t0) >= p.args.duration_ms)
            || (args.count != 0 && u64::from(sent) >= args.count)
        {
            break;
        }
        let mut reply = 0;
        let r = nic.recv(|f| match stack.handle(f, &mut out) {
            Verdict::Reply(n) => reply = n,
            Verdict::Udp(peer, data) => {
                tally.check(data);
                // The answer: the guest's next datagram, as long as the one received.
                let len = data.len().clamp(8, payload.len());
                payload[..4].copy_from_slice(&GUEST_MAGIC);
                payload[4..8].copy_from_slice(&sent.to_be_bytes());
                for (i, b) in payload.iter_mut().enumerate().take(len).skip(8) {
                    *b = pattern(GUEST_SEED, sent, i);
                }
                reply = stack.udp_frame(&peer, &payload[..len], &mut out);
                sent = sent.wrapping_add(1);
            }
            Verdict::None => {}
        });
        match r {
            Ok(true) => {}
            Ok(false) => {
                if nic.needs_reset() {
                    println!("net-stream: the device needs a reset");
                    code = status::NET_DEVICE_FAILED;
                    break;
                }
                core::hint::spin_loop();
                continue;
            }
            Err(e) => {
                println!("net-stream: {}", e);
                code = status::NET_DEVICE_FAILED;
                break;
            }
        }
        if reply > 0 {
            if let Err(e) = nic.send(|b| {
                b[..reply].copy_from_slice(&out[..reply]);
                reply
            }) {
                println!("net-stream: {}", e);
                code = status::NET_DEVICE_FAILED;
                break;
            }
        }
        params::write64(guest_abi::params::OFF_PROGRESS, tally.in_order);
    }
    if let Err(e) = nic.drain_tx() {
        println!("net-stream: {}", e);
        if code == status::OK {
            code = status::NET_DEVICE_FAILED;
        }
    }
    println!(
        "net-stream: done received {} in order, {} duplicated, {} gaps, {} corrupted; sent {}",
        tally.in_order, tally.duplicates, tally.gaps, tally.corrupt, sent
    );
    if code == status::OK && tally.errors() > 0 {
        code = status::NET_STREAM_MISMATCH;
    }
    code
}

//! `net-stream`: a sequenced UDP stream both ways on the passthrough virtio-net NIC. The peer
//! sends datagrams `FPST | seq (u32 BE) | pattern` to `udp_port`; the guest checks each one's
//! order (duplicates, gaps) and content, and answers it with the next datagram of its own
//! stream, `FGST | seq | pattern`, of the same length, which the peer checks the same way.
//! The guest exits 0 once `net.count` datagrams went each way with no error, 53 if any
//! datagram came twice, out of order or corrupted. Prints `net-stream: ready` first (the
//! loop around it is [`crate::net::serve`]).
use guest_abi::{params::status, BootParams};

use crate::{
    net::{
        serve::{self, Service},
        Peer, Stack,
    },
    println,
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

struct StreamService {
    tally: Tally,
    sent: u32,
    count: u64,
}

impl Service for StreamService {
    const NAME: &'static str = "net-stream";
    const ECHO: bool = false;

    fn datagram(&mut self, stack: &Stack, peer: Peer, data: &[u8], out: &mut [u8]) -> usize {
        self.tally.check(data);
        // The answer: the guest's next datagram, as long as the one received.
        let mut payload = [0u8; 1472];
        let len = data.len().clamp(8, payload.len());
        payload[..4].copy_from_slice(&GUEST_MAGIC);
        payload[4..8].copy_from_slice(&self.sent.to_be_bytes());
        for (i, b) in payload.iter_mut().enumerate().take(len).skip(8) {
            *b = pattern(GUEST_SEED, self.sent, i);
        }
        self.sent = self.sent.wrapping_add(1);
        stack.udp_frame(&peer, &payload[..len], out)
    }

    fn done(&self, _: &Stack) -> bool {
        self.count != 0 && u64::from(self.sent) >= self.count
    }
}

pub fn run(p: &BootParams) -> u32 {
    let mut svc = StreamService {
        tally: Tally::default(),
        sent: 0,
        count: p.args.net.count,
    };
    let (mut code, _) = serve::run(p, &mut svc);
    let t = &svc.tally;
    println!(
        "net-stream: done received {} in order, {} duplicated, {} gaps, {} corrupted; sent {}",
        t.in_order, t.duplicates, t.gaps, t.corrupt, svc.sent
    );
    if code == status::OK && t.errors() > 0 {
        code = status::NET_STREAM_MISMATCH;
    }
    code
}

//! `net-hostile`: garbles the passthrough virtio-net NIC's rings in every way a hostile driver
//! can (descriptor loops, chains through the whole table, oversized chains, out-of-RAM and
//! wrapping buffer addresses, heads and `next` indices beyond the queue, device-writable TX
//! and device-readable RX buffers, indirect descriptors that were never negotiated, zero-length
//! buffers, available indices that jump ahead, rings placed outside guest RAM, across its end,
//! wrapping the address space, misaligned, of a bad size) and checks what comes back: every
//! chain with a real head is given back (length 0) and the queue keeps running, or the device
//! reports DEVICE_NEEDS_RESET and is reset. Then it checks the NIC still works: it resolves the peer
//! (`net.peer_ip`) with ARP and pings it.
//!
//! With `duration_ms` (`--duration`) it waits that long between bringing the NIC up and the
//! first garbled ring (a hypervisor that shadows the rings once the driver settled is then in
//! place). The cases that end in DEVICE_NEEDS_RESET come last.
//!
//! TX batches end with a valid frame (an ARP request for the peer, descriptor 0): once it comes
//! back, the device has looked at everything before it. RX chains are only looked at when a
//! frame arrives, so RX batches end with a good buffer (descriptor 0) and the workload sends
//! ARP requests until a frame lands in it. Exit status: OK; `NET_HOSTILE_UNHANDLED` when a case
//! got another reaction than expected; `NET_DEVICE_FAILED` when the NIC no longer works.
use guest_abi::{params::status, BootParams};
use virtio_spec::{
    net::HDR_LEN,
    ring::{Descriptor, DESC_F_INDIRECT, DESC_F_NEXT, DESC_F_WRITE},
    status as vstatus,
};

use crate::{
    clock,
    net::{
        checksum,
        driver::{NetError, RingLayout, VirtioNet, Vq, BUF_SIZE},
        Stack, Verdict,
    },
    nvme::Arena,
    println,
};

/// How long the device gets to react to one case (generous: 2 shared cores).
const PATIENCE_MS: u64 = 20_000;
const ETH_ARP: u16 = 0x0806;
const ETH_IPV4: u16 = 0x0800;

/// What a case expects.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Expect {
    /// Every head below the queue size comes back (length 0), the queue keeps running.
    Refused,
    /// Every head below the queue size comes back with a frame dropped (RX: length 0).
    Dropped,
    /// The device sets DEVICE_NEEDS_RESET.
    NeedsReset,
}

/// What the device did.
enum Outcome {
    /// Chains came back: (ids in order, how many, all of length 0), then the end marker.
    Returned([u16; 16], usize, bool),
    NeedsReset,
    Timeout(&'static str),
}

fn d(addr: u64, len: u32, flags: u16, next: u16) -> Descriptor {
    Descriptor::new(addr, len, flags, next)
}

/// Writes `descs` into `q`'s table and offers `heads` (no notification); returns the queue
/// size.
fn garble(q: &mut Vq, descs: &[(u16, Descriptor)], heads: &[u16]) -> u16 {
    for (i, desc) in descs {
        q.set_desc(*i, *desc);
    }
    for h in heads {
        q.offer(*h);
    }
    q.size()
}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn elapsed_ms(t0: u64) -> u64 {
    clock::ticks_to_ms(clock::rdtsc() - t0)
}

struct Hostile {
    nic: VirtioNet,
    mac: [u8; 6],
    ip: [u8; 4],
    peer_ip: [u8; 4],
    /// First address above guest RAM.
    ram_end: u64,
    /// The marker frame is on TX and has not come back (it is not posted twice).
    marker_out: bool,
    cases: u32,
    failed: u32,
    resets: u32,
}

impl Hostile {
    /// An ARP request for the peer's address (60 bytes) at `out`.
    fn arp_request(&self, out: &mut [u8]) -> usize {
        out[..60].fill(0);
        out[0..6].fill(0xff);
        out[6..12].copy_from_slice(&self.mac);
        out[12..14].copy_from_slice(&ETH_ARP.to_be_bytes());
        let a = &mut out[14..42];
        a[0..6].copy_from_slice(&[0, 1, 8, 0, 6, 4]);
        a[6..8].copy_from_slice(&1u16.to_be_bytes());
        a[8..14].copy_from_slice(&self.mac);
        a[14..18].copy_from_slice(&self.ip);
        a[24..28].copy_from_slice(&self.peer_ip);
        60
    }

    /// An ICMP echo request to the peer (`peer_mac`), identifier 0x4e48, sequence `seq`.
    fn ping(&self, peer_mac: &[u8; 6], seq: u16, out: &mut [u8]) -> usize {
        const PAYLOAD: usize = 32;
        let len = 20 + 8 + PAYLOAD;
        out[0..6].copy_from_slice(peer_mac);
        out[6..12].copy_from_slice(&self.mac);
        out[12..14].copy_from_slice(&ETH_IPV4.to_be_bytes());
        let h = &mut out[14..34];
        h[0] = 0x45;
        h[1] = 0;
        h[2..4].copy_from_slice(&(len as u16).to_be_bytes());
        h[4..6].copy_from_slice(&seq.to_be_bytes());
        h[6..8].copy_from_slice(&0x4000u16.to_be_bytes());
        h[8] = 64;
        h[9] = 1;
        h[10..12].fill(0);
        h[12..16].copy_from_slice(&self.ip);
        h[16..20].copy_from_slice(&self.peer_ip);
        let c = checksum(h, 0);
        h[10..12].copy_from_slice(&c.to_be_bytes());
        let m = &mut out[34..34 + 8 + PAYLOAD];
        m[0] = 8;
        m[1] = 0;
        m[2..4].fill(0);
        m[4..6].copy_from_slice(&0x4e48u16.to_be_bytes());
        m[6..8].copy_from_slice(&seq.to_be_bytes());
        for (i, b) in m[8..].iter_mut().enumerate() {
            *b = (i as u8) ^ (seq as u8);
        }
        let c = checksum(m, 0);
        m[2..4].copy_from_slice(&c.to_be_bytes());
        14 + len
    }

    /// The peer's MAC when `f` is its ARP reply to us.
    fn arp_reply_from_peer(&self, f: &[u8]) -> Option<[u8; 6]> {
        if f.len() < 42 || be16(f, 12) != ETH_ARP || be16(f, 20) != 2 {
            return None;
        }
        if f[28..32] != self.peer_ip || f[38..42] != self.ip {
            return None;
        }
        let mut mac = [0u8; 6];
        mac.copy_from_slice(&f[22..28]);
        Some(mac)
    }

    /// True when `f` is the peer's echo reply `seq` with the payload [`Hostile::ping`] sent.
    fn is_pong(&self, f: &[u8], seq: u16) -> bool {
        if f.len() < 34 + 8 + 32 || be16(f, 12) != ETH_IPV4 || f[23] != 1 {
            return false;
        }
        if f[26..30] != self.peer_ip || f[30..34] != self.ip {
            return false;
        }
        let ihl = usize::from(f[14] & 0xf) * 4;
        let m = &f[14 + ihl..];
        if m.len() < 8 + 32 || m[0] != 0 || be16(m, 4) != 0x4e48 || be16(m, 6) != seq {
            return false;
        }
        m[8..40]
            .iter()
            .enumerate()
            .all(|(i, b)| *b == (i as u8) ^ (seq as u8))
    }

    fn needs_reset(&self) -> bool {
        self.nic.device_status() & vstatus::DEVICE_NEEDS_RESET != 0
    }

    /// Puts the ARP request on TX descriptor 0 and offers it (the end marker of a TX batch),
    /// unless it is still out.
    fn post_marker(&mut self) {
        if self.marker_out {
            return;
        }
        self.marker_out = true;
        let mut f = [0u8; 60];
        let n = self.arp_request(&mut f);
        let tx = self.nic.tx_queue();
        let buf = tx.buf(0);
        // SAFETY: TX buffer 0 (BUF_SIZE bytes of work-area RAM); the device has given back
        // every chain that used it (the caller waits for the marker before posting another).
        let b = unsafe { core::slice::from_raw_parts_mut(buf as *mut u8, BUF_SIZE as usize) };
        b[..HDR_LEN].fill(0);
        b[HDR_LEN..HDR_LEN + n].copy_from_slice(&f[..n]);
        tx.set_desc(0, d(buf, (HDR_LEN + n) as u32, 0, 0));
        tx.offer(0);
        tx.kick();
    }

    /// Collects what `q` gives back until `marker` comes back (then `Returned` with the other
    /// ids), DEVICE_NEEDS_RESET, or the patience runs out. `poke` runs every 20 ms (RX cases
    /// send ARP requests from it).
    fn collect(&mut self, rx: bool, marker: u16, mut poke: impl FnMut(&mut Self)) -> Outcome {
        let t0 = clock::rdtsc();
        let mut ids = [0u16; 16];
        let mut n = 0;
        let mut zero = true;
        let mut last_check = t0;
        let mut last_poke = t0;
        poke(self);
        loop {
            let q: &mut Vq = if rx {
                self.nic.rx_queue()
            } else {
                self.nic.tx_queue()
            };
            while let Some((id, len)) = q.take_used() {
                if !rx && id == 0 {
                    self.marker_out = false;
                }
                if id == u32::from(marker) {
                    // RX: the good buffer got a frame; TX: lengths are always 0.
                    return Outcome::Returned(ids, n, zero);
                }
                if n < ids.len() {
                    ids[n] = id as u16;
                }
                n += 1;
                zero &= len == 0;
            }
            if rx {
                // Marker frames of earlier pokes come back on TX.
                while let Some((id, _)) = self.nic.tx_queue().take_used() {
                    if id == 0 {
                        self.marker_out = false;
                    }
                }
            }
            let now = clock::rdtsc();
            if clock::ticks_to_ms(now - last_check) >= 1 {
                last_check = now;
                if self.needs_reset() {
                    return Outcome::NeedsReset;
                }
            }
            if clock::ticks_to_ms(now - last_poke) >= 20 {
                last_poke = now;
                poke(self);
            }
            if elapsed_ms(t0) > PATIENCE_MS {
                return Outcome::Timeout("no reaction");
            }
            core::hint::spin_loop();
        }
    }

    fn judge(&mut self, name: &str, heads: &[u16], size: u16, expect: Expect, got: Outcome) {
        self.cases += 1;
        let ok = match (&got, expect) {
            (Outcome::Returned(ids, n, zero), Expect::Refused | Expect::Dropped) => {
                // Each head in range exactly once, in any order (without IN_ORDER a device
                // may complete chains out of order); nothing else (no id beyond the queue).
                let ids = &ids[..(*n).min(16)];
                let want = heads.iter().filter(|h| **h < size);
                *zero
                    && *n == want.clone().count()
                    && want.clone().all(|w| {
                        ids.iter().filter(|i| *i == w).count()
                            == want.clone().filter(|x| *x == w).count()
                    })
            }
            (Outcome::NeedsReset, Expect::NeedsReset) => true,
            _ => false,
        };
        if let (false, Outcome::Returned(ids, n, zero)) = (ok, &got) {
            println!(
                "net-hostile: {}: {} chains came back (lengths all 0: {}), ids {:?}; offered {:?} (each in range once)",
                name,
                n,
                zero,
                &ids[..(*n).min(16)],
                heads
            );
        }
        let what = match got {
            Outcome::Returned(..) if expect == Expect::NeedsReset => "kept running",
            Outcome::Returned(..) if ok => "refused, given back",
            Outcome::Returned(..) => "given back wrong",
            Outcome::NeedsReset => "device needs reset",
            Outcome::Timeout(w) => w,
        };
        if ok {
            println!("net-hostile: {}: {} as expected", name, what);
        } else {
            self.failed += 1;
            println!("net-hostile: {}: unexpected: {}", name, what);
        }
        if matches!(got, Outcome::NeedsReset) || self.needs_reset() {
            self.resets += 1;
            self.marker_out = false;
            if let Err(e) = self.nic.bring_up(false) {
                println!("net-hostile: {}: reset failed: {}", name, e);
                self.failed += 1;
            }
        }
    }

    /// Writes `descs` into the TX table, offers `heads`, then the marker; judges the outcome.
    fn tx_case(&mut self, name: &str, descs: &[(u16, Descriptor)], heads: &[u16], expect: Expect) {
        let size = garble(self.nic.tx_queue(), descs, heads);
        self.post_marker();
        let got = self.collect(false, 0, |_| {});
        self.judge(name, heads, size, expect, got);
    }

    /// Writes `descs` into the RX table, offers `heads`, then a good buffer (descriptor 0);
    /// sends ARP requests until a frame lands in it; judges the outcome.
    fn rx_case(&mut self, name: &str, descs: &[(u16, Descriptor)], heads: &[u16], expect: Expect) {
        let size = garble(self.nic.rx_queue(), descs, heads);
        let rx = self.nic.rx_queue();
        rx.set_desc(0, d(rx.buf(0), BUF_SIZE as u32, DESC_F_WRITE, 0));
        rx.offer(0);
        rx.kick();
        let got = self.collect(true, 0, |h| h.post_marker());
        self.judge(name, heads, size, expect, got);
    }

    /// The available index moved `jump` entries ahead of what was posted.
    fn jump_case(&mut self, name: &str, rx: bool, jump: u16) {
        let q = if rx {
            self.nic.rx_queue()
        } else {
            self.nic.tx_queue()
        };
        let size = q.size();
        q.set_avail_idx(q.avail_idx().wrapping_add(jump));
        q.kick();
        let got = self.collect(rx, u16::MAX, |h| {
            if rx {
                h.post_marker()
            }
        });
        self.judge(name, &[], size, Expect::NeedsReset, got);
    }

    /// The device is told `layout` for the TX queue at bring-up, then TX is used (the marker):
    /// the device must refuse the layout or stop at the first ring access.
    fn layout_case(&mut self, name: &str, layout: RingLayout) {
        let size = self.nic.tx_queue().size();
        self.marker_out = false;
        let got = match self.nic.bring_up_with(false, Some(layout)) {
            Err(NetError::Init(_)) if self.needs_reset() => Outcome::NeedsReset,
            Err(_) => Outcome::Timeout("bring-up failed otherwise"),
            Ok(()) => {
                self.post_marker();
                self.collect(false, 0, |_| {})
            }
        };
        self.judge(name, &[], size, Expect::NeedsReset, got);
    }

    fn layout_cases(&mut self) {
        let own = self.nic.tx_queue().layout();
        let far = 1u64 << 46;
        let at = |size, desc, avail, used| RingLayout {
            size,
            desc,
            avail,
            used,
        };
        self.layout_case(
            "tx rings outside guest RAM",
            at(own.size, far, far + 0x1000, far + 0x2000),
        );
        self.layout_case(
            "tx used ring outside guest RAM",
            at(own.size, own.desc, own.avail, far),
        );
        self.layout_case(
            "tx used ring across the end of guest RAM",
            at(own.size, own.desc, own.avail, self.ram_end - 8),
        );
        self.layout_case(
            "tx rings wrapping the address space",
            at(own.size, own.desc, own.avail, u64::MAX - 3),
        );
        self.layout_case(
            "tx queue size not a power of two",
            at(3, own.desc, own.avail, own.used),
        );
        self.layout_case(
            "tx queue larger than offered",
            at(1024, own.desc, own.avail, own.used),
        );
        self.layout_case(
            "tx misaligned descriptor table",
            at(own.size, own.desc + 8, own.avail, own.used),
        );
    }

    fn tx_cases(&mut self) {
        let b = self.nic.tx_queue().buf(1);
        let size = self.nic.tx_queue().size();
        let hdr = HDR_LEN as u32;
        let far = 1u64 << 46;
        let nf = DESC_F_NEXT;
        self.tx_case(
            "tx descriptor loop",
            &[(1, d(b, hdr, nf, 2)), (2, d(b, 60, nf, 1))],
            &[1],
            Expect::Refused,
        );
        self.tx_case(
            "tx self loop",
            &[(1, d(b, hdr, nf, 1))],
            &[1],
            Expect::Refused,
        );
        // A chain through every descriptor but the marker's, then back to its start: longer
        // than the queue.
        let mut long = [(0u16, Descriptor::default()); 64];
        let n = usize::from(size - 1).min(long.len());
        for (k, slot) in long.iter_mut().take(n).enumerate() {
            let i = k as u16 + 1;
            let next = if i + 1 < size { i + 1 } else { 1 };
            *slot = (i, d(b, 1, nf, next));
        }
        self.tx_case(
            "tx chain longer than the queue",
            &long[..n],
            &[1],
            Expect::Refused,
        );
        self.tx_case(
            "tx oversized chain",
            &[(1, d(b, 0xffff_0000, nf, 2)), (2, d(b, 0xffff_0000, 0, 0))],
            &[1],
            Expect::Refused,
        );
        self.tx_case(
            "tx buffers outside guest RAM",
            &[
                (1, d(far, 1514, 0, 0)),
                (2, d(self.ram_end - 16, 64, 0, 0)),
                (3, d(b, hdr, nf, 4)),
                (4, d(self.ram_end, 60, 0, 0)),
            ],
            &[1, 2, 3],
            Expect::Refused,
        );
        self.tx_case(
            "tx wrapping addresses",
            &[(1, d(u64::MAX - 100, 200, 0, 0)), (2, d(u64::MAX, 1, 0, 0))],
            &[1, 2],
            Expect::Refused,
        );
        self.tx_case(
            "tx heads beyond the queue",
            &[],
            &[size, 0x7fff, 0xffff],
            Expect::Refused,
        );
        self.tx_case(
            "tx next beyond the queue",
            &[(1, d(b, hdr, nf, size)), (2, d(b, hdr, nf, 0xffff))],
            &[1, 2],
            Expect::Refused,
        );
        self.tx_case(
            "tx device-writable buffers",
            &[
                (1, d(b, 74, DESC_F_WRITE, 0)),
                (2, d(b, hdr, nf, 3)),
                (3, d(b + 64, 60, DESC_F_WRITE, 0)),
            ],
            &[1, 2],
            Expect::Refused,
        );
        self.tx_case(
            "tx readable after writable",
            &[(1, d(b, hdr, DESC_F_WRITE | nf, 2)), (2, d(b, 60, 0, 0))],
            &[1],
            Expect::Refused,
        );
        let table = b + 1024;
        self.tx_case(
            "tx indirect descriptors never negotiated",
            &[
                (1, d(table, 32, DESC_F_INDIRECT, 0)),
                (2, d(far, 16 * 1024, DESC_F_INDIRECT, 0)),
                (3, d(b, hdr, nf, 4)),
                (4, d(table, 16, DESC_F_INDIRECT, 0)),
            ],
            &[1, 2, 3],
            Expect::Refused,
        );
        self.tx_case(
            "tx zero-length buffers",
            &[
                (1, d(b, 0, 0, 0)),
                (2, d(0, 0, nf, 3)),
                (3, d(far, 0, 0, 0)),
                (4, d(b, hdr, nf, 5)),
                (5, d(b, 0, nf, 6)),
                (6, d(b + 64, 60, 0, 0)),
            ],
            &[1, 2, 4],
            Expect::Refused,
        );
    }

    fn rx_cases(&mut self) {
        let b = self.nic.rx_queue().buf(1);
        let size = self.nic.rx_queue().size();
        let far = 1u64 << 46;
        let w = DESC_F_WRITE;
        let nf = DESC_F_NEXT;
        let len = BUF_SIZE as u32;
        self.rx_case(
            "rx descriptor loop",
            &[(1, d(b, len, w | nf, 2)), (2, d(b, len, w | nf, 1))],
            &[1],
            Expect::Refused,
        );
        self.rx_case(
            "rx device-readable buffer",
            &[(1, d(b, len, 0, 0))],
            &[1],
            Expect::Refused,
        );
        self.rx_case(
            "rx buffer outside guest RAM",
            &[(1, d(far, len, w, 0))],
            &[1],
            Expect::Refused,
        );
        self.rx_case(
            "rx buffer across the end of guest RAM",
            &[(1, d(self.ram_end - 64, len, w, 0))],
            &[1],
            Expect::Refused,
        );
        self.rx_case(
            "rx oversized chain",
            &[
                (1, d(b, 0xffff_ffff, w | nf, 2)),
                (2, d(b, 0xffff_ffff, w, 0)),
            ],
            &[1],
            Expect::Refused,
        );
        self.rx_case(
            "rx wrapping address",
            &[(1, d(u64::MAX - 64, len, w, 0))],
            &[1],
            Expect::Refused,
        );
        self.rx_case(
            "rx head beyond the queue",
            &[],
            &[size + 3],
            Expect::Refused,
        );
        self.rx_case(
            "rx indirect descriptor never negotiated",
            &[(1, d(b, 32, DESC_F_INDIRECT, 0))],
            &[1],
            Expect::Refused,
        );
        self.rx_case(
            "rx zero-length buffer",
            &[(1, d(b, 0, w, 0))],
            &[1],
            Expect::Dropped,
        );
    }

    /// Cases the device answers with DEVICE_NEEDS_RESET (each followed by a reset).
    fn reset_cases(&mut self) {
        let size = self.nic.tx_queue().size();
        self.jump_case("tx available index far ahead", false, 0x8000);
        self.jump_case("tx available index one queue ahead", false, size + 1);
        self.jump_case("rx available index far ahead", true, 0x4000);
        self.layout_cases();
    }

    /// Resets the NIC to normal operation, resolves the peer and pings it three times.
    fn still_works(&mut self) -> Result<u32, NetError> {
        self.nic.bring_up(true)?;
        let mut stack = Stack {
            mac: self.mac,
            ip: self.ip,
            udp_port: 0,
            echo: false,
            counters: Default::default(),
        };
        let mut peer_mac = None;
        let mut pongs = 0u32;
        let mut seq = 0u16;
        let t0 = clock::rdtsc();
        let mut last = 0u64;
        let mut out = [0u8; 1514];
        while pongs < 3 {
            if elapsed_ms(t0) > 2 * PATIENCE_MS {
                return Err(NetError::Device("no answer from the peer after the reset"));
            }
            if self.needs_reset() {
                return Err(NetError::Device("the device needs a reset again"));
            }
            let now = clock::ticks_to_ms(clock::rdtsc() - t0);
            if now >= last + 200 || last == 0 {
                last = now.max(1);
                let mut f = [0u8; 128];
                let n = match peer_mac {
                    None => self.arp_request(&mut f),
                    Some(m) => {
                        seq += 1;
                        self.ping(&m, seq, &mut f)
                    }
                };
                self.nic.send(|b| {
                    b[..n].copy_from_slice(&f[..n]);
                    n
                })?;
            }
            let mut frame = [0u8; 1514];
            let mut flen = 0;
            let got = self.nic.recv(|f| {
                flen = f.len().min(frame.len());
                frame[..flen].copy_from_slice(&f[..flen]);
            })?;
            if !got {
                core::hint::spin_loop();
                continue;
            }
            let f = &frame[..flen];
            if let Some(m) = self.arp_reply_from_peer(f) {
                peer_mac.get_or_insert(m);
                last = 0;
            } else if self.is_pong(f, seq) {
                pongs += 1;
                last = 0;
            } else if let Verdict::Reply(n) = stack.handle(f, &mut out) {
                // ARP requests for our address (the peer resolving us before it answers).
                self.nic.send(|b| {
                    b[..n].copy_from_slice(&out[..n]);
                    n
                })?;
            }
        }
        Ok(pongs)
    }
}

pub fn run(p: &BootParams) -> u32 {
    let args = p.args.net;
    let mut arena = Arena::new(p.ram_lo_size);
    let nic = match VirtioNet::init(&mut arena) {
        Ok(n) => n,
        Err(e) => {
            println!("net-hostile: {}", e);
            return match e {
                NetError::NotFound => status::NET_NO_DEVICE,
                _ => status::NET_INIT_FAILED,
            };
        }
    };
    let ram_end = if p.ram_hi_size != 0 {
        guest_abi::layout::HIGH_RAM_START + p.ram_hi_size
    } else {
        p.ram_lo_size
    };
    let mut h = Hostile {
        mac: nic.mac,
        nic,
        ip: args.ip.to_be_bytes(),
        peer_ip: args.peer_ip.to_be_bytes(),
        ram_end,
        marker_out: false,
        cases: 0,
        failed: 0,
        resets: 0,
    };
    let (ip, peer) = (h.ip, h.peer_ip);
    println!(
        "net-hostile: ready ip {}.{}.{}.{} peer {}.{}.{}.{}",
        ip[0], ip[1], ip[2], ip[3], peer[0], peer[1], peer[2], peer[3]
    );
    // The peer answers before anything is garbled (otherwise RX cases could not be told
    // from a silent wire).
    match h.still_works() {
        Ok(n) => println!("net-hostile: before: peer answered {} pings", n),
        Err(e) => {
            println!("net-hostile: before: {}", e);
            return status::NET_DEVICE_FAILED;
        }
    }
    h.marker_out = false;
    if let Err(e) = h.nic.bring_up(false) {
        println!("net-hostile: {}", e);
        return status::NET_DEVICE_FAILED;
    }
    // Optional settle time (`--duration`): lets a hypervisor start shadowing the queues.
    let t0 = clock::rdtsc();
    while elapsed_ms(t0) < p.args.duration_ms {
        core::hint::spin_loop();
    }
    h.tx_cases();
    h.rx_cases();
    h.reset_cases();
    let after = h.still_works();
    match after {
        Ok(n) => println!("net-hostile: after: peer answered {} pings", n),
        Err(e) => println!("net-hostile: after: {}", e),
    }
    println!(
        "net-hostile: done {} cases, {} unexpected, {} device resets; the device {}",
        h.cases,
        h.failed,
        h.resets,
        if after.is_ok() {
            "still works"
        } else {
            "no longer works"
        }
    );
    if after.is_err() {
        status::NET_DEVICE_FAILED
    } else if h.failed != 0 {
        status::NET_HOSTILE_UNHANDLED
    } else {
        status::OK
    }
}

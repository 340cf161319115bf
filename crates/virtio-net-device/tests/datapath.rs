//! The NIC's register file and data path driven as a driver would, over a memfd standing in
//! for guest memory and a socket pair standing in for the wire; then the same with hostile
//! rings. No vfio-user here: the end-to-end path is in crates/ferry/tests/virtio_net.rs.
use std::{fs::File, os::fd::FromRawFd};

use virtio_net_device::{
    device::{NetDevice, DEVICE_FEATURES},
    layout::{COMMON, ISR, NOTIFY},
    wire::{SocketWire, Wire},
};
use virtio_spec::{
    features::{self, bit},
    net::{NetHdr, HDR_LEN},
    pci::common,
    ring::{self, Descriptor, UsedElem, DESC_F_INDIRECT, DESC_F_NEXT, DESC_F_WRITE},
    status,
};

const MEM: u64 = 0x10_0000;
const Q: u16 = 8;
/// Ring addresses of queue q.
fn rings(q: u64) -> (u64, u64, u64) {
    let base = 0x1000 + q * 0x4000;
    (base, base + 0x1000, base + 0x2000)
}

fn memfd(size: u64) -> File {
    // SAFETY: valid name, checked result.
    let fd = unsafe { libc::memfd_create(c"guest".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0);
    // SAFETY: fresh fd owned by nobody else.
    let f = unsafe { File::from_raw_fd(fd) };
    f.set_len(size).unwrap();
    f
}

struct Driver {
    dev: NetDevice,
    avail: [u16; 2],
    used_seen: [u16; 2],
}

impl Driver {
    fn w(&mut self, off: u64, v: u64, width: usize) {
        self.dev.bar_write(COMMON + off, &v.to_le_bytes()[..width]);
    }
    fn r(&mut self, off: u64, width: usize) -> u64 {
        let mut b = [0u8; 8];
        self.dev.bar_read(COMMON + off, &mut b[..width]);
        u64::from_le_bytes(b)
    }
    /// The Linux driver's bring-up order (virtio 1.1 §3.1.1) with `features`.
    fn new(features: u64) -> Self {
        let f = memfd(MEM);
        let mut dev = NetDevice::new([2, 0, 0, 0, 0, 1]);
        dev.dma.map(0, MEM, 0, &f).unwrap();
        let mut d = Driver {
            dev,
            avail: [0; 2],
            used_seen: [0; 2],
        };
        d.w(common::DEVICE_STATUS, 0, 1);
        d.w(
            common::DEVICE_STATUS,
            u64::from(status::ACKNOWLEDGE | status::DRIVER),
            1,
        );
        d.w(common::DEVICE_FEATURE_SELECT, 1, 4);
        assert_eq!(d.r(common::DEVICE_FEATURE, 4), DEVICE_FEATURES >> 32);
        for sel in 0..2 {
            d.w(common::DRIVER_FEATURE_SELECT, sel, 4);
            d.w(
                common::DRIVER_FEATURE,
                features >> (32 * sel) & 0xffff_ffff,
                4,
            );
        }
        d.w(
            common::DEVICE_STATUS,
            u64::from(status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK),
            1,
        );
        assert_eq!(d.r(common::NUM_QUEUES, 2), 2);
        for q in 0..2u64 {
            let (desc, avail, used) = rings(q);
            d.w(common::QUEUE_SELECT, q, 2);
            assert_eq!(d.r(common::QUEUE_NOTIFY_OFF, 2), q);
            d.w(common::QUEUE_SIZE, u64::from(Q), 2);
            // 64-bit fields written as two halves, as many drivers do.
            d.w(common::QUEUE_DESC, desc, 4);
            d.w(common::QUEUE_DESC + 4, desc >> 32, 4);
            d.w(common::QUEUE_DRIVER, avail, 8);
            d.w(common::QUEUE_DEVICE, used, 8);
            d.w(common::QUEUE_ENABLE, 1, 2);
            assert_eq!(d.r(common::QUEUE_ENABLE, 2), 1);
        }
        d.w(
            common::DEVICE_STATUS,
            u64::from(
                status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK,
            ),
            1,
        );
        d
    }
    fn desc(&self, q: u64, i: u16, desc: Descriptor) {
        self.dev
            .dma
            .write(rings(q).0 + 16 * u64::from(i), &desc.to_bytes())
            .unwrap();
    }
    fn offer(&mut self, q: usize, head: u16) {
        let (_, avail, _) = rings(q as u64);
        let slot = self.avail[q] % Q;
        self.dev
            .dma
            .write(avail + ring::avail::entry(slot), &head.to_le_bytes())
            .unwrap();
        self.avail[q] = self.avail[q].wrapping_add(1);
        self.dev
            .dma
            .write(avail + ring::avail::IDX, &self.avail[q].to_le_bytes())
            .unwrap();
        assert!(self
            .dev
            .bar_write(NOTIFY + 4 * q as u64, &(q as u16).to_le_bytes()));
    }
    fn set_avail_idx(&mut self, q: usize, idx: u16) {
        let (_, avail, _) = rings(q as u64);
        self.avail[q] = idx;
        self.dev
            .dma
            .write(avail + ring::avail::IDX, &idx.to_le_bytes())
            .unwrap();
    }
    fn used(&mut self, q: usize) -> Vec<UsedElem> {
        let (_, _, used) = rings(q as u64);
        let mut b = [0u8; 2];
        self.dev.dma.read(used + ring::used::IDX, &mut b).unwrap();
        let idx = u16::from_le_bytes(b);
        let mut out = Vec::new();
        while self.used_seen[q] != idx {
            let mut e = [0u8; 8];
            let slot = self.used_seen[q] % Q;
            self.dev
                .dma
                .read(used + ring::used::entry(slot), &mut e)
                .unwrap();
            out.push(UsedElem::from_bytes(&e));
            self.used_seen[q] = self.used_seen[q].wrapping_add(1);
        }
        out
    }
    fn write(&self, addr: u64, data: &[u8]) {
        self.dev.dma.write(addr, data).unwrap();
    }
}

fn features() -> u64 {
    bit(features::VERSION_1)
        | bit(features::RING_INDIRECT_DESC)
        | bit(virtio_spec::net::features::MAC)
}

fn frame(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(7).wrapping_add(seed))
        .collect()
}

#[test]
fn frames_cross_in_both_directions() {
    let mut d = Driver::new(features());
    assert!(status::is_running(d.dev.status()));
    let (mut dev_end, mut peer) = SocketWire::pair().unwrap();

    // TX: header and frame split over two descriptors.
    let f = frame(98, 1);
    d.write(0x40000, &NetHdr::default().to_bytes());
    d.write(0x41000, &f);
    d.desc(
        1,
        0,
        Descriptor {
            addr: 0x40000,
            len: HDR_LEN as u32,
            flags: DESC_F_NEXT,
            next: 1,
        },
    );
    d.desc(
        1,
        1,
        Descriptor {
            addr: 0x41000,
            len: 98,
            flags: 0,
            next: 0,
        },
    );
    d.offer(1, 0);
    // RX: two buffers offered, one used.
    for i in 0..2u16 {
        d.desc(
            0,
            i,
            Descriptor {
                addr: 0x50000 + 0x1000 * u64::from(i),
                len: 2048,
                flags: DESC_F_WRITE,
                next: 0,
            },
        );
        d.offer(0, i);
    }
    let back = frame(60, 9);
    peer.send(&back).unwrap();
    let p = d.dev.process(&mut dev_end);
    assert_eq!(p.completed, 2);
    let mut got = [0u8; 2048];
    assert_eq!(peer.recv(&mut got).unwrap(), Some(98));
    assert_eq!(&got[..98], &f[..]);
    assert_eq!(d.used(1), [UsedElem { id: 0, len: 0 }]);
    assert_eq!(
        d.used(0),
        [UsedElem {
            id: 0,
            len: (HDR_LEN + 60) as u32
        }]
    );
    let mut rx = vec![0u8; HDR_LEN + 60];
    d.dev.dma.read(0x50000, &mut rx).unwrap();
    let hdr = NetHdr::from_bytes(rx[..HDR_LEN].try_into().unwrap());
    assert_eq!(hdr.num_buffers, 1);
    assert_eq!(&rx[HDR_LEN..], &back[..]);
    // The second RX buffer waits; with nothing on the wire the device is not starved.
    assert!(!d.dev.process(&mut dev_end).rx_starved);

    // An indirect TX chain.
    d.write(
        0x60000,
        &Descriptor {
            addr: 0x40000,
            len: HDR_LEN as u32,
            flags: DESC_F_NEXT,
            next: 1,
        }
        .to_bytes(),
    );
    d.write(
        0x60010,
        &Descriptor {
            addr: 0x41000,
            len: 98,
            flags: 0,
            next: 0,
        }
        .to_bytes(),
    );
    d.desc(
        1,
        2,
        Descriptor {
            addr: 0x60000,
            len: 32,
            flags: DESC_F_INDIRECT,
            next: 0,
        },
    );
    d.offer(1, 2);
    d.dev.process(&mut dev_end);
    assert_eq!(peer.recv(&mut got).unwrap(), Some(98));
    let s = d.dev.stats.clone();
    assert_eq!(
        (s.tx_frames, s.rx_frames, s.chain_errors, s.dma_errors),
        (2, 1, 0, 0)
    );
    let mut isr = [0u8; 1];
    d.dev.bar_read(ISR, &mut isr);
    assert_eq!(isr[0], 1, "queue interrupt pending");
    d.dev.bar_read(ISR, &mut isr);
    assert_eq!(isr[0], 0, "read clears");
}

#[test]
fn hostile_rings_are_counted_and_survived() {
    let mut d = Driver::new(features());
    let (mut dev_end, mut peer) = SocketWire::pair().unwrap();
    // A loop, a next out of range, a buffer outside guest memory, a nested indirect table,
    // an oversized frame: each refused and given back with length 0.
    d.desc(
        1,
        0,
        Descriptor {
            addr: 0x40000,
            len: 12,
            flags: DESC_F_NEXT,
            next: 1,
        },
    );
    d.desc(
        1,
        1,
        Descriptor {
            addr: 0x40000,
            len: 12,
            flags: DESC_F_NEXT,
            next: 0,
        },
    );
    d.desc(
        1,
        2,
        Descriptor {
            addr: 0x40000,
            len: 12,
            flags: DESC_F_NEXT,
            next: 200,
        },
    );
    d.desc(
        1,
        3,
        Descriptor {
            addr: MEM - 8,
            len: 64,
            flags: 0,
            next: 0,
        },
    );
    d.write(
        0x60000,
        &Descriptor {
            addr: 0x60000,
            len: 16,
            flags: DESC_F_INDIRECT,
            next: 0,
        }
        .to_bytes(),
    );
    d.desc(
        1,
        4,
        Descriptor {
            addr: 0x60000,
            len: 16,
            flags: DESC_F_INDIRECT,
            next: 0,
        },
    );
    d.desc(
        1,
        5,
        Descriptor {
            addr: 0x40000,
            len: 4000,
            flags: 0,
            next: 0,
        },
    );
    for h in 0..6 {
        d.offer(1, h);
    }
    // A head out of range cannot be given back, only counted.
    d.offer(1, 77);
    d.dev.process(&mut dev_end);
    let s = d.dev.stats.clone();
    // Heads 0 and 1 (the loop from either end), 2, 4 and 77.
    assert_eq!(s.chain_errors, 5, "{s:?}");
    assert_eq!(
        (s.chain_loops, s.chain_bad_index, s.chain_bad_indirect),
        (2, 2, 1),
        "each refusal in its class: {s:?}"
    );
    assert_eq!(s.dma_errors, 1, "{s:?}");
    assert_eq!(s.tx_bad_frames, 1, "{s:?}");
    assert_eq!(s.tx_frames, 0);
    let ids: Vec<u32> = d.used(1).iter().map(|e| e.id).collect();
    assert_eq!(ids, [0, 1, 2, 3, 4, 5]);
    let mut got = [0u8; 64];
    assert_eq!(
        peer.recv(&mut got).unwrap(),
        None,
        "nothing reached the wire"
    );
    assert!(
        status::is_running(d.dev.status()),
        "bad chains do not stop the device"
    );

    // RX buffer too small for the frame: dropped and counted.
    d.desc(
        0,
        0,
        Descriptor {
            addr: 0x50000,
            len: 20,
            flags: DESC_F_WRITE,
            next: 0,
        },
    );
    d.offer(0, 0);
    peer.send(&frame(100, 3)).unwrap();
    d.dev.process(&mut dev_end);
    assert_eq!(d.dev.stats.rx_dropped, 1);
    assert_eq!(d.used(0), [UsedElem { id: 0, len: 0 }]);

    // An available index that jumps past the queue size breaks the queue: DEVICE_NEEDS_RESET.
    let next = d.avail[1].wrapping_add(Q + 1);
    d.set_avail_idx(1, next);
    d.dev.process(&mut dev_end);
    assert_eq!(d.dev.stats.bad_avail_idx, 1);
    assert_ne!(d.dev.status() & status::DEVICE_NEEDS_RESET, 0);
    // A reset brings it back.
    d.w(common::DEVICE_STATUS, 0, 1);
    assert_eq!(d.dev.status(), 0);
}

#[test]
fn buffers_in_the_wrong_direction_are_refused_and_zero_lengths_counted() {
    let mut d = Driver::new(features());
    let (mut dev_end, mut peer) = SocketWire::pair().unwrap();
    let f = frame(60, 4);
    d.write(0x40000, &NetHdr::default().to_bytes());
    d.write(0x41000, &f);
    let desc = Descriptor::new;
    // TX: a frame followed by a buffer for the device to write; a zero-length buffer inside a
    // good frame (sent); a zero-length chain (not a frame).
    d.desc(1, 0, desc(0x40000, HDR_LEN as u32, DESC_F_NEXT, 1));
    d.desc(1, 1, desc(0x41000, 60, DESC_F_NEXT, 2));
    d.desc(1, 2, desc(0x42000, 64, DESC_F_WRITE, 0));
    d.desc(1, 3, desc(0x40000, HDR_LEN as u32, DESC_F_NEXT, 4));
    d.desc(1, 4, desc(0x43000, 0, DESC_F_NEXT, 5));
    d.desc(1, 5, desc(0x41000, 60, 0, 0));
    d.desc(1, 6, desc(0x44000, 0, 0, 0));
    for h in [0, 3, 6] {
        d.offer(1, h);
    }
    // RX: a buffer the device may only read, then a good one.
    d.desc(0, 0, desc(0x50000, 2048, 0, 0));
    d.desc(0, 1, desc(0x51000, 2048, DESC_F_WRITE, 0));
    d.offer(0, 0);
    d.offer(0, 1);
    peer.send(&frame(70, 1)).unwrap();
    peer.send(&frame(80, 2)).unwrap();
    d.dev.process(&mut dev_end);
    let s = d.dev.stats.clone();
    assert_eq!(s.tx_writable_chains, 1, "{s:?}");
    assert_eq!(s.rx_readonly_chains, 1, "{s:?}");
    assert_eq!(s.zero_length_buffers, 2, "{s:?}");
    assert_eq!(
        (s.tx_frames, s.tx_bad_frames, s.rx_frames),
        (1, 1, 1),
        "{s:?}"
    );
    assert_eq!(s.chain_errors, 0, "{s:?}");
    let mut got = [0u8; 128];
    assert_eq!(peer.recv(&mut got).unwrap(), Some(60));
    assert_eq!(&got[..60], &f[..]);
    assert_eq!(peer.recv(&mut got).unwrap(), None, "one frame only");
    let ids: Vec<u32> = d.used(1).iter().map(|e| e.id).collect();
    assert_eq!(ids, [0, 3, 6]);
    // The read-only RX chain came back empty and took the first frame; the second landed in
    // the good buffer; the device never wrote the read-only one.
    assert_eq!(
        d.used(0),
        [
            UsedElem { id: 0, len: 0 },
            UsedElem {
                id: 1,
                len: (HDR_LEN + 80) as u32
            }
        ]
    );
    let mut untouched = [0xffu8; 16];
    d.dev.dma.read(0x50000, &mut untouched).unwrap();
    assert_eq!(untouched, [0; 16]);
    assert!(status::is_running(d.dev.status()));
}

#[test]
fn bad_negotiation_and_queue_config_are_refused() {
    // Without VERSION_1 FEATURES_OK does not stick (the driver asked twice: with FEATURES_OK
    // and again with DRIVER_OK), and the device never runs.
    let d = Driver::new(bit(virtio_spec::net::features::MAC));
    assert_eq!(d.dev.status() & status::FEATURES_OK, 0);
    assert_eq!(d.dev.stats.bad_features, 2);
    assert!(!status::is_running(d.dev.status()));
    // A feature the device never offered.
    let d = Driver::new(features() | bit(features::RING_PACKED));
    assert_eq!(d.dev.stats.bad_features, 2);
    // A queue size that is not a power of two.
    let mut d = Driver::new(features());
    d.w(common::DEVICE_STATUS, 0, 1);
    d.w(common::QUEUE_SELECT, 0, 2);
    d.w(common::QUEUE_SIZE, 100, 2);
    d.w(common::QUEUE_ENABLE, 1, 2);
    assert_eq!(d.dev.stats.bad_queue_config, 1);
    assert_ne!(d.dev.status() & status::DEVICE_NEEDS_RESET, 0);
    // Reads of a queue that does not exist are zero, writes go nowhere.
    d.w(common::QUEUE_SELECT, 9, 2);
    d.w(common::QUEUE_DESC, 0x1234, 8);
    assert_eq!(d.r(common::QUEUE_SIZE, 2), 0);
}

/// A wire whose receive side fails (a tap that went down).
struct BrokenWire(SocketWire);

impl Wire for BrokenWire {
    fn fd(&self) -> std::os::fd::RawFd {
        self.0.fd()
    }
    fn send(&mut self, frame: &[u8]) -> std::io::Result<()> {
        self.0.send(frame)
    }
    fn recv(&mut self, _: &mut [u8]) -> std::io::Result<Option<usize>> {
        Err(std::io::Error::from_raw_os_error(libc::EIO))
    }
}

#[test]
fn a_failing_wire_is_counted_and_reported_to_the_worker() {
    let mut d = Driver::new(features());
    let (dev_end, _peer) = SocketWire::pair().unwrap();
    let mut wire = BrokenWire(dev_end);
    d.desc(
        0,
        0,
        Descriptor {
            addr: 0x50000,
            len: 2048,
            flags: DESC_F_WRITE,
            next: 0,
        },
    );
    d.offer(0, 0);
    let p = d.dev.process(&mut wire);
    assert!(p.wire_error, "the worker must not wait on a failing wire");
    assert!(!p.rx_starved);
    assert_eq!(d.dev.stats.wire_errors, 1);
    assert!(d.used(0).is_empty(), "the RX buffer stays with the device");
    assert!(status::is_running(d.dev.status()));
}

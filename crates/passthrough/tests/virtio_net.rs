//! A virtio-net device in direct passthrough under KVM against an in-process stand-in NIC
//! whose wire is a socket pair: the class checks, the forwarded configuration space, and a
//! driver's bring-up, one frame sent and one received through BAR0 on the VM's MMIO bus and
//! guest RAM the device reaches through its DMA mappings.
use std::{path::PathBuf, sync::Arc, time::Duration};

use passthrough::virtio_net::NetAttachment;
use virtio_net_device::{
    layout::{COMMON, NOTIFY},
    wire::{SocketWire, Wire},
    DeviceConfig, VirtioNetDevice,
};
use virtio_spec::{
    features::{self, bit},
    net::{NetHdr, HDR_LEN},
    pci::common,
    ring::{self, Descriptor, UsedElem, DESC_F_NEXT, DESC_F_WRITE},
    status,
};
use vmm::{devices::serial::ConsoleSink, Vm, VmConfig};

struct Dir(PathBuf);
impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn nic(tag: &str) -> (Dir, Arc<VirtioNetDevice>, PathBuf, SocketWire) {
    let d = std::env::temp_dir().join(format!("ferry-pt-net-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    let socket = d.join("s");
    let (dev_end, peer) = SocketWire::pair().unwrap();
    let dev = Arc::new(
        VirtioNetDevice::new(
            &DeviceConfig {
                socket: socket.clone(),
                mac: [2, 0, 0, 0, 0, 7],
                announce: false,
            },
            Box::new(dev_end),
        )
        .unwrap(),
    );
    let server = dev.clone();
    std::thread::spawn(move || {
        let _ = server.serve_one();
    });
    (Dir(d), dev, socket, peer)
}

fn vm() -> Vm {
    Vm::new(&VmConfig {
        ram_size: 64 << 20,
        console: ConsoleSink::Null,
        ..Default::default()
    })
    .unwrap()
}

/// Waits (bounded) for `f` to return Some.
fn wait_for<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let t0 = std::time::Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[test]
fn a_driver_moves_frames_through_the_passthrough_bar() {
    let (_dir, dev, socket, mut peer) = nic("frames");
    let vm = vm();
    let bar0 = guest_abi::layout::PCI_MMIO_BASE;
    let a = NetAttachment::attach(&vm, "net0", &socket, bar0).unwrap();
    let slot = a.pci_slot();
    let pci = vm.pci_bus().clone();
    let cfg = |reg| pci.lock().unwrap().config_read(0, slot, 0, reg);
    assert_eq!(cfg(0), 0x1041_1af4, "virtio-net IDs forwarded");
    assert_eq!(cfg(2) >> 8, 0x02_00_00, "Ethernet class forwarded");
    assert_eq!(cfg(4), bar0 as u32 | 0x4, "BAR0 placed by the VMM");

    let bus = vm.mmio_bus();
    let w = |off: u64, v: u64, width: usize| {
        assert!(bus.write(bar0 + COMMON + off, &v.to_le_bytes()[..width]));
    };
    let r = |off: u64, width: usize| {
        let mut b = [0u8; 8];
        assert!(bus.read(bar0 + COMMON + off, &mut b[..width]));
        u64::from_le_bytes(b)
    };
    w(common::DEVICE_STATUS, 0, 1);
    w(
        common::DEVICE_STATUS,
        u64::from(status::ACKNOWLEDGE | status::DRIVER),
        1,
    );
    let feats = bit(features::VERSION_1) | bit(virtio_spec::net::features::MAC);
    w(common::DEVICE_FEATURE_SELECT, 1, 4);
    assert_eq!(r(common::DEVICE_FEATURE, 4) & 1, 1, "VERSION_1 offered");
    for sel in 0..2 {
        w(common::DRIVER_FEATURE_SELECT, sel, 4);
        w(common::DRIVER_FEATURE, feats >> (32 * sel) & 0xffff_ffff, 4);
    }
    let ok = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK;
    w(common::DEVICE_STATUS, u64::from(ok), 1);
    assert_eq!(r(common::DEVICE_STATUS, 1), u64::from(ok));
    let ram = vm.ram();
    let q: u16 = 8;
    let rings = |i: u64| {
        (
            0x10_0000 + i * 0x4000,
            0x10_1000 + i * 0x4000,
            0x10_2000 + i * 0x4000,
        )
    };
    for i in 0..2u64 {
        let (d, av, u) = rings(i);
        w(common::QUEUE_SELECT, i, 2);
        w(common::QUEUE_SIZE, u64::from(q), 2);
        w(common::QUEUE_DESC, d, 8);
        w(common::QUEUE_DRIVER, av, 8);
        w(common::QUEUE_DEVICE, u, 8);
        w(common::QUEUE_ENABLE, 1, 2);
    }
    w(common::DEVICE_STATUS, u64::from(ok | status::DRIVER_OK), 1);
    let mut mac = [0u8; 6];
    assert!(bus.read(bar0 + virtio_net_device::layout::DEVICE_CFG, &mut mac));
    assert_eq!(mac, [2, 0, 0, 0, 0, 7]);

    // One RX buffer, then a frame from the peer.
    let (d0, av0, u0) = rings(0);
    let rx = Descriptor {
        addr: 0x20_0000,
        len: 2048,
        flags: DESC_F_WRITE,
        next: 0,
    };
    ram.write(d0, &rx.to_bytes()).unwrap();
    ram.write(av0 + ring::avail::entry(0), &0u16.to_le_bytes())
        .unwrap();
    ram.write(av0 + ring::avail::IDX, &1u16.to_le_bytes())
        .unwrap();
    assert!(bus.write(bar0 + NOTIFY, &0u16.to_le_bytes()));
    let inbound: Vec<u8> = (0..200u32).map(|i| (i * 3) as u8).collect();
    peer.send(&inbound).unwrap();
    let used = wait_for("the RX used ring", || {
        let mut b = [0u8; 2];
        ram.read(u0 + ring::used::IDX, &mut b).unwrap();
        (u16::from_le_bytes(b) == 1).then(|| {
            let mut e = [0u8; 8];
            ram.read(u0 + ring::used::entry(0), &mut e).unwrap();
            UsedElem::from_bytes(&e)
        })
    });
    assert_eq!(
        used,
        UsedElem {
            id: 0,
            len: (HDR_LEN + 200) as u32
        }
    );
    let mut got = vec![0u8; HDR_LEN + 200];
    ram.read(0x20_0000, &mut got).unwrap();
    assert_eq!(&got[HDR_LEN..], &inbound[..]);

    // One frame out: header and payload in a chain.
    let (d1, av1, _) = rings(1);
    let outbound: Vec<u8> = (0..90u32).map(|i| (i * 5 + 1) as u8).collect();
    ram.write(0x21_0000, &NetHdr::default().to_bytes()).unwrap();
    ram.write(0x21_1000, &outbound).unwrap();
    let tx0 = Descriptor {
        addr: 0x21_0000,
        len: HDR_LEN as u32,
        flags: DESC_F_NEXT,
        next: 1,
    };
    let tx1 = Descriptor {
        addr: 0x21_1000,
        len: 90,
        flags: 0,
        next: 0,
    };
    ram.write(d1, &tx0.to_bytes()).unwrap();
    ram.write(d1 + 16, &tx1.to_bytes()).unwrap();
    ram.write(av1 + ring::avail::entry(0), &0u16.to_le_bytes())
        .unwrap();
    ram.write(av1 + ring::avail::IDX, &1u16.to_le_bytes())
        .unwrap();
    assert!(bus.write(bar0 + NOTIFY + 4, &1u16.to_le_bytes()));
    let mut buf = [0u8; 2048];
    let n = wait_for("the frame on the wire", || peer.recv(&mut buf).unwrap());
    assert_eq!(&buf[..n], &outbound[..]);
    let s = dev.stats();
    assert_eq!(
        (s.rx_frames, s.tx_frames, s.chain_errors, s.dma_errors),
        (1, 1, 0, 0)
    );
    a.detach();
}

#[test]
fn an_nvme_device_is_not_a_nic() {
    let d = std::env::temp_dir().join(format!("ferry-pt-net-nvme-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    let socket = d.join("s");
    let dev = Arc::new(
        nvme_device::NvmeDevice::new(&nvme_device::DeviceConfig {
            socket: socket.clone(),
            backing: d.join("disk"),
            size: 1 << 20,
            block_size: 512,
            dstrd: 9,
            create: true,
        })
        .unwrap(),
    );
    let server = dev.clone();
    std::thread::spawn(move || {
        let _ = server.serve_one();
    });
    let vm = vm();
    let e = NetAttachment::attach(&vm, "net0", &socket, guest_abi::layout::PCI_MMIO_BASE)
        .err()
        .expect("refused");
    assert!(
        e.to_string().contains("not a modern virtio-net device"),
        "{e}"
    );
    let _ = std::fs::remove_dir_all(&d);
}

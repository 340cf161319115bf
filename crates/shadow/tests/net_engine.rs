//! The virtio-net shadow engine under KVM against an in-process stand-in NIC on a socket
//! wire. The test is the guest's driver: it reaches the rings through the guest's view (the
//! KVM memory slots, which the engine swaps onto its copies) and BAR0 through the VM's MMIO
//! bus. Frames cross both ways while shadowed with the data, the used entries and the dirty
//! pages checked; shadow mode is left and traffic runs direct again; a hostile chain is refused
//! without reaching the device, a head beyond the queue dropped, an available index jump
//! reported as DEVICE_NEEDS_RESET; a guest reset while shadowed is held until the engine let go.
use std::{path::PathBuf, sync::Arc, time::Duration};

use passthrough::virtio_net::NetAttachment;
use shadow::{
    engine::{net::NetEngine, Interception},
    EngineOptions,
};
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

const Q: u16 = 8;
const RX_BUF: u64 = 0x20_0000;
const TX_BUF: u64 = 0x30_0000;

fn rings(i: u64) -> (u64, u64, u64) {
    (
        0x10_0000 + i * 0x4000,
        0x10_1000 + i * 0x4000,
        0x10_2000 + i * 0x4000,
    )
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

/// The guest's view of guest-physical memory: through the KVM slot covering the address
/// (guest RAM, or the engine's copy of a ring page while shadowed).
struct GuestView<'a>(&'a Vm);

impl GuestView<'_> {
    fn host(&self, gpa: u64, len: usize) -> *mut u8 {
        let (_, s) = self
            .0
            .memory_slots()
            .list()
            .into_iter()
            .find(|(_, s)| gpa >= s.gpa && gpa + len as u64 <= s.gpa + s.size)
            .unwrap_or_else(|| panic!("no slot covers {gpa:#x}"));
        (s.host + (gpa - s.gpa)) as *mut u8
    }
    fn write(&self, gpa: u64, data: &[u8]) {
        // SAFETY: inside a slot the VM keeps mapped; plain bytes.
        unsafe { std::ptr::copy(data.as_ptr(), self.host(gpa, data.len()), data.len()) }
    }
    fn read(&self, gpa: u64, buf: &mut [u8]) {
        // SAFETY: as for `write`.
        unsafe { std::ptr::copy(self.host(gpa, buf.len()), buf.as_mut_ptr(), buf.len()) }
    }
    fn u16(&self, gpa: u64) -> u16 {
        let mut b = [0u8; 2];
        self.read(gpa, &mut b);
        u16::from_le_bytes(b)
    }
}

/// The test's driver state: next available and used positions per queue.
struct Driver<'a> {
    vm: &'a Vm,
    bar0: u64,
    avail: [u16; 2],
    used: [u16; 2],
}

impl<'a> Driver<'a> {
    fn view(&self) -> GuestView<'a> {
        GuestView(self.vm)
    }
    fn common_w(&self, off: u64, v: u64, width: usize) {
        assert!(self
            .vm
            .mmio_bus()
            .write(self.bar0 + COMMON + off, &v.to_le_bytes()[..width]));
    }
    fn common_r(&self, off: u64, width: usize) -> u64 {
        let mut b = [0u8; 8];
        assert!(self
            .vm
            .mmio_bus()
            .read(self.bar0 + COMMON + off, &mut b[..width]));
        u64::from_le_bytes(b)
    }
    fn bring_up(&self) {
        self.common_w(common::DEVICE_STATUS, 0, 1);
        let feats = bit(features::VERSION_1) | bit(virtio_spec::net::features::MAC);
        self.common_w(
            common::DEVICE_STATUS,
            u64::from(status::ACKNOWLEDGE | status::DRIVER),
            1,
        );
        for sel in 0..2 {
            self.common_w(common::DRIVER_FEATURE_SELECT, sel, 4);
            self.common_w(common::DRIVER_FEATURE, feats >> (32 * sel) & 0xffff_ffff, 4);
        }
        let ok = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK;
        self.common_w(common::DEVICE_STATUS, u64::from(ok), 1);
        for i in 0..2u64 {
            let (d, av, u) = rings(i);
            self.common_w(common::QUEUE_SELECT, i, 2);
            self.common_w(common::QUEUE_SIZE, u64::from(Q), 2);
            self.common_w(common::QUEUE_DESC, d, 8);
            self.common_w(common::QUEUE_DRIVER, av, 8);
            self.common_w(common::QUEUE_DEVICE, u, 8);
            self.common_w(common::QUEUE_ENABLE, 1, 2);
        }
        self.common_w(common::DEVICE_STATUS, u64::from(ok | status::DRIVER_OK), 1);
    }
    /// Makes chain `head` (descriptors already written) available on queue `q` and notifies.
    fn publish(&mut self, q: usize, head: u16) {
        let (_, av, _) = rings(q as u64);
        let v = self.view();
        v.write(
            av + ring::avail::entry(self.avail[q] % Q),
            &head.to_le_bytes(),
        );
        self.avail[q] = self.avail[q].wrapping_add(1);
        v.write(av + ring::avail::IDX, &self.avail[q].to_le_bytes());
        assert!(self
            .vm
            .mmio_bus()
            .write(self.bar0 + NOTIFY + 4 * q as u64, &(q as u16).to_le_bytes()));
    }
    /// Posts receive buffer `head` (one 2 KiB buffer at RX_BUF + head * 4 KiB).
    fn post_rx(&mut self, head: u16) {
        let (d, _, _) = rings(0);
        let desc = Descriptor {
            addr: RX_BUF + u64::from(head) * 0x1000,
            len: 2048,
            flags: DESC_F_WRITE,
            next: 0,
        };
        self.view()
            .write(d + u64::from(head) * 16, &desc.to_bytes());
        self.publish(0, head);
    }
    /// The next used entry of queue `q` in the guest's view.
    fn next_used(&mut self, q: usize) -> UsedElem {
        let (_, _, u) = rings(q as u64);
        let want = self.used[q].wrapping_add(1);
        let e = wait_for(&format!("a used entry on queue {q}"), || {
            (self.view().u16(u + ring::used::IDX) == want).then(|| {
                let mut e = [0u8; 8];
                self.view()
                    .read(u + ring::used::entry(self.used[q] % Q), &mut e);
                UsedElem::from_bytes(&e)
            })
        });
        self.used[q] = want;
        e
    }
    /// Sends `payload` as a two-descriptor chain at head `head` of the transmit queue.
    fn send(&mut self, head: u16, payload: &[u8], addr: u64) {
        let (d, _, _) = rings(1);
        let v = self.view();
        v.write(TX_BUF, &NetHdr::default().to_bytes());
        v.write(TX_BUF + 0x1000 + u64::from(head) * 0x800, payload);
        let a = Descriptor {
            addr: TX_BUF,
            len: HDR_LEN as u32,
            flags: DESC_F_NEXT,
            next: head + 1,
        };
        let b = Descriptor {
            addr,
            len: payload.len() as u32,
            flags: 0,
            next: 0,
        };
        v.write(d + u64::from(head) * 16, &a.to_bytes());
        v.write(d + u64::from(head + 1) * 16, &b.to_bytes());
        self.publish(1, head);
    }
}

/// Frames both ways through the engine, then direct again after leaving; the received frame's
/// data and the pages the device wrote.
fn roundtrip(d: &mut Driver, peer: &mut SocketWire, rx_head: u16, tag: u8) {
    let inbound: Vec<u8> = (0..300u32).map(|i| (i as u8) ^ tag).collect();
    peer.send(&inbound).unwrap();
    let e = d.next_used(0);
    assert_eq!(
        e,
        UsedElem {
            id: u32::from(rx_head),
            len: (HDR_LEN + 300) as u32
        }
    );
    let mut got = vec![0u8; HDR_LEN + 300];
    d.view()
        .read(RX_BUF + u64::from(rx_head) * 0x1000, &mut got);
    assert_eq!(&got[HDR_LEN..], &inbound[..], "received data");
    let outbound: Vec<u8> = (0..120u32)
        .map(|i| (i as u8).wrapping_mul(3) ^ tag)
        .collect();
    d.send(0, &outbound, TX_BUF + 0x1000);
    let mut buf = [0u8; 2048];
    let n = wait_for("the frame on the wire", || peer.recv(&mut buf).unwrap());
    assert_eq!(&buf[..n], &outbound[..], "sent data");
    assert_eq!(d.next_used(1).id, 0);
}

#[test]
fn frames_cross_a_shadowed_nic_and_hostile_chains_and_resets_are_handled() {
    for interception in [Interception::Trap, Interception::Poll] {
        run(interception);
    }
}

/// A VM with a stand-in NIC on a socket wire attached: (temp dir, device, VM, attachment,
/// the wire's peer end).
fn setup(
    tag: &str,
) -> (
    Dir,
    Arc<VirtioNetDevice>,
    Vm,
    Arc<NetAttachment>,
    SocketWire,
) {
    let dir = std::env::temp_dir().join(format!("ferry-net-engine-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let socket = dir.join("s");
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
    let vm = Vm::new(&VmConfig {
        ram_size: 64 << 20,
        console: ConsoleSink::Null,
        ..Default::default()
    })
    .unwrap();
    let att = Arc::new(NetAttachment::attach(&vm, "net0", &socket, BAR0).unwrap());
    (Dir(dir), dev, vm, att, peer)
}

const BAR0: u64 = guest_abi::layout::PCI_MMIO_BASE;

fn run(interception: Interception) {
    let (_dir, dev, vm, att, mut peer) = setup(&format!("{interception:?}"));
    let bar0 = BAR0;
    let mut d = Driver {
        vm: &vm,
        bar0,
        avail: [0; 2],
        used: [0; 2],
    };
    d.bring_up();
    // Two receive buffers before shadowing: chains in flight when the engine attaches.
    d.post_rx(0);
    d.post_rx(1);
    let engine = NetEngine::new(
        att.clone(),
        EngineOptions {
            interception,
            ..Default::default()
        },
    )
    .unwrap();
    engine.enter(&vm).unwrap();
    assert!(engine.is_shadowed());
    let notify_slot = || {
        vm.memory_slots()
            .list()
            .iter()
            .any(|(_, s)| s.gpa == bar0 + NOTIFY)
    };
    assert_eq!(
        notify_slot(),
        interception == Interception::Poll,
        "poll mode backs the notification page with memory (no exits); trap mode does not"
    );

    // A buffer posted before shadowing, then one posted while shadowed.
    roundtrip(&mut d, &mut peer, 0, 0x11);
    d.post_rx(2);
    roundtrip(&mut d, &mut peer, 1, 0x22);
    roundtrip(&mut d, &mut peer, 2, 0x33);
    let dirty = engine.take_dirty();
    for head in 0..3u64 {
        assert!(
            dirty.contains(&(RX_BUF + head * 0x1000)),
            "receive buffer {head} not dirty: {dirty:x?}"
        );
    }
    let st = engine.status();
    assert_eq!(st.queues.len(), 2);
    assert_eq!(st.queues[1].state.stats.forwarded, 3, "{st:?}");
    assert_eq!(st.queues[0].state.stats.forwarded, 1, "{st:?}");
    assert_eq!(st.queues[0].state.stats.refused, 0, "{st:?}");
    if interception == Interception::Trap {
        assert!(st.trapped_notifies >= 4, "{st:?}");
    }

    // Leave: direct again, the rings in RAM are the guest's.
    d.post_rx(3);
    engine.leave(&vm).unwrap();
    assert!(!engine.is_shadowed());
    assert!(!notify_slot(), "the notification page exits again");
    roundtrip(&mut d, &mut peer, 3, 0x44);
    d.post_rx(4);

    // Enter again; a chain aiming the device outside guest RAM is refused: the guest gets
    // it back with length 0, the device never sees it.
    engine.enter(&vm).unwrap();
    d.send(0, &[1, 2, 3], 1 << 40);
    let e = d.next_used(1);
    assert_eq!(e, UsedElem { id: 0, len: 0 });
    let st = engine.status();
    assert_eq!(st.queues[1].state.stats.refusals.out_of_ram, 1, "{st:?}");
    let mut buf = [0u8; 64];
    assert!(peer.recv(&mut buf).unwrap().is_none(), "nothing sent");
    // Traffic still flows.
    roundtrip(&mut d, &mut peer, 4, 0x55);

    // A head beyond the queue names no buffer: dropped as the device drops it, no used entry
    // (the next one the guest sees is the next good chain's).
    d.publish(1, Q + 5);
    d.post_rx(5);
    roundtrip(&mut d, &mut peer, 5, 0x66);
    let st = engine.status();
    assert_eq!(st.queues[1].state.stats.dropped_heads, 1, "{st:?}");
    assert_eq!(st.queues[1].state.dropped, 1, "{st:?}");

    // The available index jumps more than a queue ahead: the engine breaks the queue and tells
    // the guest as the device would, DEVICE_NEEDS_RESET in the status it reads.
    let (_, av, _) = rings(1);
    d.avail[1] = d.avail[1].wrapping_add(Q + 1);
    d.view()
        .write(av + ring::avail::IDX, &d.avail[1].to_le_bytes());
    assert!(vm.mmio_bus().write(bar0 + NOTIFY + 4, &1u16.to_le_bytes()));
    wait_for("DEVICE_NEEDS_RESET in the status the guest reads", || {
        (d.common_r(common::DEVICE_STATUS, 1) as u8 & status::DEVICE_NEEDS_RESET != 0).then_some(())
    });
    let st = engine.status();
    assert_eq!(st.needs_reset, 1, "{st:?}");
    assert_eq!(st.queues[1].state.stats.bad_avail_idx, 1, "{st:?}");

    // A reset while shadowed is held (the status stays non-zero) until the engine let go.
    d.common_w(common::DEVICE_STATUS, 0, 1);
    assert_ne!(d.common_r(common::DEVICE_STATUS, 1), 0, "reset held");
    assert!(att.reset_pending());
    engine.reset(&vm).unwrap();
    assert!(!engine.is_shadowed());
    assert_eq!(d.common_r(common::DEVICE_STATUS, 1), 0, "reset done");
    // The counters outlive the sessions (two here).
    let st = engine.status();
    assert_eq!((st.entered, st.needs_reset), (2, 1), "{st:?}");
    let tx = &st.totals[1].stats;
    assert_eq!(
        (tx.dropped_heads, tx.bad_avail_idx, tx.refusals.out_of_ram),
        (1, 1, 1),
        "{st:?}"
    );
    let s = dev.stats();
    assert_eq!(
        (s.chain_errors, s.dma_errors, s.bad_avail_idx),
        (0, 0, 0),
        "{s:?}"
    );
    drop(engine);
    match Arc::try_unwrap(att) {
        Ok(a) => a.detach(),
        Err(_) => panic!("the attachment is still shared"),
    }
}

/// The device part of a migration: the source saves the shadowed NIC (receive buffers in
/// flight), its device resets and sends nothing more; a second VM gets the source's RAM and a
/// NIC of its own rebuilt from the state; the guest's driver carries on with its indexes:
/// a receive buffer made available on the source gets the destination's first frame, and
/// transmits work. A hostile saved state is refused.
#[test]
fn a_shadowed_nic_moves_to_another_vm() {
    let (_da, dev_a, vm_a, att_a, mut peer_a) = setup("mig-src");
    let mut d = Driver {
        vm: &vm_a,
        bar0: BAR0,
        avail: [0; 2],
        used: [0; 2],
    };
    d.bring_up();
    d.post_rx(0);
    d.post_rx(1);
    let opts = EngineOptions {
        interception: Interception::Poll,
        ..Default::default()
    };
    let src = NetEngine::new(att_a.clone(), opts).unwrap();
    src.enter(&vm_a).unwrap();
    roundtrip(&mut d, &mut peer_a, 0, 0x61);
    d.post_rx(2);
    wait_for("the engine to take receive buffer 2", || {
        (src.status().queues[0].state.guest_avail == 3).then_some(())
    });
    // Switchover: buffers 1 and 2 are in flight (receive only: no wait). Buffer 3, made
    // available once the queues are held, stays the guest's: the destination takes it.
    src.ready_for_switchover().unwrap();
    d.post_rx(3);
    let (saved, pages) = src.save(&vm_a).unwrap();
    assert!(pages.contains(&rings(0).0), "ring pages are sent again");
    assert_eq!(saved.queues[0].state.in_flight, vec![1, 2], "{saved:?}");
    assert_eq!(saved.queues[0].state.guest_avail, 3, "{saved:?}");
    // The source's device was reset: it uses no ring and writes no guest memory any more.
    assert_eq!(att_a.device_status().unwrap(), 0);
    assert!(dev_a.stats().resets >= 2, "bring-up and switchover resets");
    let (_, _, u0) = rings(0);
    assert_eq!(GuestView(&vm_a).u16(u0 + ring::used::IDX), 1);

    // The destination: the source's RAM (which holds the guest's view of the rings).
    let (_db, dev_b, vm_b, att_b, mut peer_b) = setup("mig-dst");
    for r in vm_a.ram().regions() {
        let mut b = vec![0u8; r.size as usize];
        vm_a.ram().read(r.gpa, &mut b).unwrap();
        vm_b.ram().write(r.gpa, &b).unwrap();
    }
    let mut hostile = saved.clone();
    hostile.queues[0].state.in_flight = vec![1, 1];
    assert!(NetEngine::restore(att_b.clone(), opts, &vm_b, &hostile).is_err());
    let mut hostile = saved.clone();
    hostile.queues[1].place.geo.index = 0;
    assert!(NetEngine::restore(att_b.clone(), opts, &vm_b, &hostile).is_err());
    let mut hostile = saved.clone();
    hostile.queues[1].place.geo.index = 5;
    hostile.queues[1].state.geometry.index = 5;
    assert!(
        NetEngine::restore(att_b.clone(), opts, &vm_b, &hostile).is_err(),
        "a queue the device does not have"
    );
    let mut hostile = saved.clone();
    hostile.features |= 1 << 60;
    for q in &mut hostile.queues {
        q.state.features = hostile.features;
    }
    assert!(
        NetEngine::restore(att_b.clone(), opts, &vm_b, &hostile).is_err(),
        "features the device does not offer"
    );
    // The refused attempts left the guest's rings as they arrived (the last one failed with
    // the device half programmed): the real state still restores.
    let dst = NetEngine::restore(att_b.clone(), opts, &vm_b, &saved).unwrap();
    assert!(dst.is_shadowed());
    d.vm = &vm_b;
    roundtrip(&mut d, &mut peer_b, 1, 0x62);
    roundtrip(&mut d, &mut peer_b, 2, 0x63);
    roundtrip(&mut d, &mut peer_b, 3, 0x64);
    let st = dst.status();
    assert!(
        st.queues
            .iter()
            .all(|q| q.errors == 0 && q.state.stats.refused == 0),
        "{st:?}"
    );
    let s = dev_b.stats();
    assert_eq!(
        (s.chain_errors, s.dma_errors, s.rx_frames, s.tx_frames),
        (0, 0, 3, 3),
        "{s:?}"
    );
    drop(dst);
    drop(src);
    for a in [att_a, att_b] {
        match Arc::try_unwrap(a) {
            Ok(a) => a.detach(),
            Err(_) => panic!("the attachment is still shared"),
        }
    }
}

/// The NIC as a migration source ([`NetMigratable`]): a migration that fails after the
/// switchover saved the device (which reset it) leaves the NIC working on the source — the
/// device is programmed again from the saved state, the receive buffers it held come back, the
/// guest's indexes carry on; one that fails while the queues are held releases them. The
/// state it sends decodes and rebuilds the NIC on another VM, and garbage is refused.
#[test]
fn a_failed_migration_leaves_the_nic_working_and_its_state_moves() {
    use migration::MigratableDevice;
    use shadow::engine::net_device::{restore_net, NetMigratable, NetMigrationState};
    let (_da, dev_a, vm_a, att_a, mut peer_a) = setup("rollback-src");
    let mut d = Driver {
        vm: &vm_a,
        bar0: BAR0,
        avail: [0; 2],
        used: [0; 2],
    };
    d.bring_up();
    d.post_rx(0);
    d.post_rx(1);
    let opts = EngineOptions {
        interception: Interception::Poll,
        ..Default::default()
    };
    // Migration mode: not shadowed until the migration prepares the device.
    let engine = Arc::new(NetEngine::new(att_a.clone(), opts).unwrap());
    let mut m = NetMigratable::new(engine.clone());
    assert_eq!(m.name(), "net0");
    m.prepare(&vm_a).unwrap();
    assert!(engine.is_shadowed());
    roundtrip(&mut d, &mut peer_a, 0, 0x71);
    assert!(
        m.take_dirty_pages().contains(&RX_BUF),
        "the receive buffer the device wrote is dirty"
    );
    d.post_rx(2);
    wait_for("the engine to take receive buffer 2", || {
        (engine.status().queues[0].state.guest_avail == 3).then_some(())
    });

    // Fails after the save: the device was reset, then programmed again.
    m.ready_for_switchover(&vm_a).unwrap();
    m.pause(&vm_a).unwrap();
    assert_eq!(
        att_a.device_status().unwrap(),
        0,
        "the save reset the device"
    );
    let pages = m.take_dirty_pages();
    assert!(pages.contains(&rings(0).0), "ring pages are sent again");
    let blob = m.save().unwrap();
    m.rollback(&vm_a);
    assert!(att_a.driver_ok(), "the device runs again");
    assert!(engine.is_shadowed());
    roundtrip(&mut d, &mut peer_a, 1, 0x72);
    roundtrip(&mut d, &mut peer_a, 2, 0x73);

    // Fails while the queues are held: they take the guest's chains again.
    m.prepare(&vm_a).unwrap();
    m.ready_for_switchover(&vm_a).unwrap();
    d.post_rx(3);
    m.rollback(&vm_a);
    roundtrip(&mut d, &mut peer_a, 3, 0x74);
    let st = engine.status();
    assert!(
        st.queues
            .iter()
            .all(|q| q.errors == 0 && q.state.stats.refused == 0),
        "{st:?}"
    );

    // The state sent: garbage refused, the real one decodes.
    for bad in [
        &[][..],
        &[1, 0, 0][..],
        &[9, 0, 0, 0, 1][..],
        &[1, 0, 0, 0, 0xff][..],
    ] {
        assert!(NetMigrationState::decode(bad).is_err(), "{bad:?}");
    }
    let state = NetMigrationState::decode(&blob).unwrap();
    assert_eq!(state.device.queues.len(), 2);
    assert_eq!(state.device.queues[0].state.in_flight, vec![1, 2]);

    // A full move now: the state as sent rebuilds the NIC of another VM with RAM as sent.
    d.post_rx(4);
    m.prepare(&vm_a).unwrap();
    m.ready_for_switchover(&vm_a).unwrap();
    m.pause(&vm_a).unwrap();
    let state = NetMigrationState::decode(&m.save().unwrap()).unwrap();
    let (_db, dev_b, vm_b, att_b, mut peer_b) = setup("rollback-dst");
    for r in vm_a.ram().regions() {
        let mut b = vec![0u8; r.size as usize];
        vm_a.ram().read(r.gpa, &mut b).unwrap();
        vm_b.ram().write(r.gpa, &b).unwrap();
    }
    let dst = restore_net(att_b.clone(), opts, &vm_b, &state).unwrap();
    assert_eq!(att_b.msix_state(), state.msix);
    d.vm = &vm_b;
    roundtrip(&mut d, &mut peer_b, 4, 0x75);
    let s = dev_b.stats();
    assert_eq!((s.chain_errors, s.dma_errors), (0, 0), "{s:?}");
    let s = dev_a.stats();
    assert_eq!((s.chain_errors, s.dma_errors), (0, 0), "{s:?}");
    drop(dst);
    drop(m);
    drop(engine);
    for a in [att_a, att_b] {
        match Arc::try_unwrap(a) {
            Ok(a) => a.detach(),
            Err(_) => panic!("the attachment is still shared"),
        }
    }
}

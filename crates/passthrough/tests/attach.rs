//! The attachment under KVM against an in-process stand-in controller: PCI configuration
//! space, BAR0 pages as memory slots, the three shadow-engine hooks, and the host client.
use std::{path::PathBuf, sync::Arc, time::Duration};

use nvme_device::{DeviceConfig, NvmeDevice};
use passthrough::{
    host_client::HostClient, AttachOptions, Attachment, DeviceHooks, DoorbellMode, GuestBacking,
};
use vmm::{devices::serial::ConsoleSink, memslots::SlotKind, Vm, VmConfig};

struct Dir(PathBuf);
impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn device(tag: &str, dstrd: u8) -> (Dir, Arc<NvmeDevice>, PathBuf) {
    let d = std::env::temp_dir().join(format!("ferry-pt-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    let socket = d.join("s");
    let dev = Arc::new(
        NvmeDevice::new(&DeviceConfig {
            socket: socket.clone(),
            backing: d.join("disk"),
            size: 8 << 20,
            block_size: 512,
            dstrd,
            create: true,
        })
        .unwrap(),
    );
    let server = dev.clone();
    std::thread::spawn(move || {
        let _ = server.serve_one();
    });
    (Dir(d), dev, socket)
}

fn vm() -> Vm {
    Vm::new(&VmConfig {
        ram_size: 64 << 20,
        console: ConsoleSink::Null,
        ..Default::default()
    })
    .unwrap()
}

#[test]
fn config_space_bar_pages_and_hooks() {
    let (_dir, _dev, socket) = device("hooks", 9);
    let vm = vm();
    let a = Attachment::attach(&vm, &AttachOptions::new("nvme0", &socket)).unwrap();
    // The hypervisor identified the device itself, before the guest did anything, and left
    // the controller disabled for the guest.
    let log = a.config_log();
    assert_eq!(log.mdts, Some(nvme_device::controller::MDTS));
    assert_eq!(
        log.namespaces.get(&1),
        Some(&passthrough::config_log::NamespaceInfo {
            block_size: 512,
            blocks: (8 << 20) / 512
        })
    );
    assert_eq!(a.identity().namespaces.len(), 1);
    assert_eq!(log.enables, 0, "the guest's own log starts clean");
    let slot = a.pci_slot();
    let pci = vm.pci_bus().clone();
    let cfg = |reg| pci.lock().unwrap().config_read(0, slot, 0, reg);
    assert_eq!(cfg(2) >> 8, 0x01_08_02, "class code forwarded");
    let (bar0, size) = a.bar0();
    assert_eq!(cfg(4), bar0 as u32 | 0x4, "BAR0 placed by the VMM, 64-bit");
    assert_eq!(cfg(5), 0);
    // BAR sizing answers with the device's region size.
    pci.lock()
        .unwrap()
        .config_write(0, slot, 0, 4, 0, &[0xff; 4]);
    assert_eq!(cfg(4), !(size as u32 - 1) | 0x4);
    pci.lock()
        .unwrap()
        .config_write(0, slot, 0, 4, 0, &(bar0 as u32).to_le_bytes());

    // Doorbell pages: all mapped except the admin page (0x1000).
    let pages = a.mapped_doorbell_pages();
    assert!(!pages.contains(&0x1000));
    assert!(
        pages.contains(&0x2000) && pages.contains(&0x20000),
        "{pages:x?}"
    );
    let device_slots = |vm: &Vm| {
        vm.memory_slots()
            .list()
            .into_iter()
            .filter(|(_, s)| s.kind == SlotKind::Device)
            .map(|(_, s)| s.gpa)
            .collect::<Vec<_>>()
    };
    assert!(device_slots(&vm).contains(&(bar0 + 0x2000)));
    // SAFETY: Trapped and Mapped use no foreign memory.
    unsafe {
        a.set_doorbell_mode(vm.memory_slots(), 0x2000, DoorbellMode::Trapped)
            .unwrap();
        assert!(!device_slots(&vm).contains(&(bar0 + 0x2000)));
        a.set_doorbell_mode(vm.memory_slots(), 0x1000, DoorbellMode::Mapped)
            .unwrap();
        assert!(device_slots(&vm).contains(&(bar0 + 0x1000)));
        assert!(
            a.set_doorbell_mode(vm.memory_slots(), 0x3_0000, DoorbellMode::Mapped)
                .is_err(),
            "MSI-X page is not mappable"
        );
        assert!(a
            .set_doorbell_mode(vm.memory_slots(), 0x1234, DoorbellMode::Trapped)
            .is_err());
    }
    // Redirect a doorbell page and remap a RAM range to hypervisor pages.
    let layout = std::alloc::Layout::from_size_align(0x4000, 4096).unwrap();
    // SAFETY: a fresh allocation, freed at the end of the test after the slots are gone.
    let mem = unsafe { std::alloc::alloc_zeroed(layout) };
    // SAFETY: `mem` outlives every slot that points to it (undone below).
    unsafe {
        a.set_doorbell_mode(
            vm.memory_slots(),
            0x2000,
            DoorbellMode::Redirected { host: mem as u64 },
        )
        .unwrap();
        a.remap_guest_range(
            vm.memory_slots(),
            0x200_0000,
            0x3000,
            GuestBacking::Host(mem as u64 + 0x1000),
        )
        .unwrap();
        assert!(
            a.remap_guest_range(
                vm.memory_slots(),
                0x200_1000,
                0x1000,
                GuestBacking::Host(mem as u64)
            )
            .is_err(),
            "overlap"
        );
        assert!(
            a.remap_guest_range(
                vm.memory_slots(),
                0x3ff_f000,
                0x2000,
                GuestBacking::Host(mem as u64)
            )
            .is_err(),
            "outside RAM"
        );
    }
    let ram_slots: Vec<_> = vm
        .memory_slots()
        .list()
        .into_iter()
        .map(|(_, s)| (s.gpa, s.size, s.kind))
        .filter(|s| s.0 < 64 << 20)
        .collect();
    assert!(
        ram_slots.contains(&(0, 0x200_0000, SlotKind::Ram)),
        "{ram_slots:x?}"
    );
    assert!(
        ram_slots.contains(&(0x200_0000, 0x3000, SlotKind::Device)),
        "{ram_slots:x?}"
    );
    assert!(
        ram_slots.contains(&(0x200_3000, (64 << 20) - 0x200_3000, SlotKind::Ram)),
        "{ram_slots:x?}"
    );
    // SAFETY: undoing the remap and the redirection.
    unsafe {
        a.remap_guest_range(vm.memory_slots(), 0x200_0000, 0x3000, GuestBacking::Ram)
            .unwrap();
        a.set_doorbell_mode(vm.memory_slots(), 0x2000, DoorbellMode::Trapped)
            .unwrap();
    }
    let ram_slots: Vec<_> = vm
        .memory_slots()
        .list()
        .into_iter()
        .map(|(_, s)| (s.gpa, s.size))
        .filter(|s| s.0 < 64 << 20)
        .collect();
    assert_eq!(ram_slots, vec![(0, 64 << 20)]);
    // SAFETY: no slot refers to `mem` any more.
    unsafe { std::alloc::dealloc(mem, layout) };

    // MSI-X: the guest programs vector 1 in the table (BAR0 0x30000) and enables MSI-X in
    // the capability (0x40): KVM gets an MSI route and the vector's irqfd.
    let mmio = vm.mmio_bus();
    let t = bar0 + 0x3_0000 + 16;
    for (i, v) in [0xfee0_0000u32, 0, 0x41, 0].iter().enumerate() {
        assert!(mmio.write(t + i as u64 * 4, &v.to_le_bytes()));
    }
    assert!(a.msix_routes().is_empty(), "MSI-X not enabled yet");
    pci.lock()
        .unwrap()
        .config_write(0, slot, 0, 0x40 / 4, 2, &[0x1f, 0x80]);
    assert_eq!(a.msix_routes(), vec![(1, 25, 0xfee0_0000, 0x41)]);
    assert_eq!(cfg(0x40 / 4) >> 31, 1, "enable forwarded to the device");
    // Masking the vector removes the route; unmasking restores it.
    assert!(mmio.write(t + 12, &1u32.to_le_bytes()));
    assert!(a.msix_routes().is_empty());
    assert!(mmio.write(t + 12, &0u32.to_le_bytes()));
    assert_eq!(a.msix_routes().len(), 1);
    // A hook taking the vector over removes KVM's irqfd.
    let _taken = a.take_interrupt(1).unwrap();
    assert!(a.msix_routes().is_empty());

    // Interrupt eventfds.
    let fd = a.take_interrupt(0).unwrap();
    assert_eq!(
        fd.read().map_err(|e| e.kind()),
        Err(std::io::ErrorKind::WouldBlock)
    );
    assert!(a.take_interrupt(32).is_err());
    assert_eq!(a.config_log().enables, 0);
    a.detach(vm.memory_slots());
}

#[test]
fn host_client_reads_through_the_doorbell_pages() {
    let (_dir, dev, socket) = device("host", 9);
    let mut c = HostClient::connect(&socket, 8 << 20, 2, 33).unwrap();
    assert_eq!((c.blocks, c.block_size), (16384, 512));
    let r = c.random_reads(32, 2000, 4096, 16384, 1).unwrap();
    assert_eq!(r.ios, 2000);
    assert!(r.p50_us > 0.0 && r.p99_us >= r.p50_us);
    c.shutdown().unwrap();
    // the device counts the shutdown once it handled it
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while dev.stats().shutdowns == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the device never saw the shutdown"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let s = dev.stats();
    assert_eq!(s.reads, 2000);
    assert_eq!(s.shutdowns, 1);
    assert_eq!(s.io_queues_created, 2);
}

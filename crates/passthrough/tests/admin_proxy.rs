//! The destination's admin proxy against a hostile guest: commands aimed at the hypervisor's
//! own admin queue, opcodes a guest has no business sending, an Asynchronous Event Request the
//! device never completes, and a guest that disables the controller under the proxy. The vCPU
//! (here: the test thread writing the doorbells) never waits on the device.
use std::{
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use nvme_device::{DeviceConfig, NvmeDevice};
use nvme_spec::{
    opcode::{admin, cns},
    regs::{self, aqa, cc},
    Cqe, Sqe, Status,
};
use passthrough::{
    admin_guard::GuardMode, config_log::ConfigLog, identity, AttachOptions, Attachment,
};
use vmm::{devices::serial::ConsoleSink, Vm, VmConfig};

struct Dir(PathBuf);
impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

const ASQ: u64 = 0x10000;
const ACQ: u64 = 0x20000;
const DATA: u64 = 0x30000;
const ENTRIES: u32 = 16;

fn sqe(op: u8, cid: u16, prp1: u64) -> Sqe {
    let mut s = Sqe::new(op, cid);
    s.set_prps(prp1, 0);
    s
}

/// Waits for `n` completions in the guest's admin CQ: cid → status.
fn completions(vm: &Vm, n: usize) -> Vec<(u16, Status)> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let mut out = Vec::new();
        for i in 0..ENTRIES as u64 {
            let mut b = [0u8; 16];
            vm.ram().read(ACQ + i * 16, &mut b).unwrap();
            let c = Cqe::from_bytes(&b);
            if !c.phase() {
                break;
            }
            out.push((c.cid(), c.status()));
        }
        if out.len() >= n {
            return out;
        }
        assert!(Instant::now() < deadline, "only {out:?} after 60 s");
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn setup(tag: &str) -> (Dir, Arc<NvmeDevice>, Vm, Attachment) {
    let d = std::env::temp_dir().join(format!("ferry-proxy-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    let socket = d.join("s");
    let dev = Arc::new(
        NvmeDevice::new(&DeviceConfig {
            socket: socket.clone(),
            backing: d.join("disk"),
            size: 8 << 20,
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
    let vm = Vm::new(&VmConfig {
        ram_size: 64 << 20,
        console: ConsoleSink::Null,
        ..Default::default()
    })
    .unwrap();
    let a = Attachment::attach(&vm, &AttachOptions::new("nvme0", &socket)).unwrap();
    (Dir(d), dev, vm, a)
}

#[test]
fn the_admin_proxy_validates_and_never_blocks_a_vcpu() {
    let (_dir, dev, vm, a) = setup("proxy");
    // The guest's admin queue as a migration source left it, served by the proxy.
    let log = ConfigLog {
        cc: cc::ENABLE,
        aqa: aqa::new(ENTRIES as u16, ENTRIES as u16),
        asq: ASQ,
        acq: ACQ,
        ..Default::default()
    };
    let iova = identity::hypervisor_iova(vm.ram());
    a.replay(&log, (0, 0), iova).unwrap();

    let mut ident = sqe(admin::IDENTIFY, 3, DATA);
    ident.set_cdw(10, cns::CONTROLLER as u32);
    let mut at_hypervisor = sqe(admin::IDENTIFY, 2, iova);
    at_hypervisor.set_cdw(10, cns::CONTROLLER as u32);
    // Half in the last page of RAM, half just above it.
    let mut straddling = sqe(admin::IDENTIFY, 5, 0);
    straddling
        .set_prps((64 << 20) - 0x800, 64 << 20)
        .set_cdw(10, cns::CONTROLLER as u32);
    let cmds = [
        sqe(admin::ASYNC_EVENT, 1, 0),
        at_hypervisor,
        ident,
        sqe(0x80, 4, DATA), // Format NVM
        straddling,
    ];
    for (i, c) in cmds.iter().enumerate() {
        vm.ram().write(ASQ + i as u64 * 64, &c.to_bytes()).unwrap();
    }
    let (bar0, _) = a.bar0();
    let mmio = vm.mmio_bus();
    assert!(mmio.write(bar0 + 0x1000, &(cmds.len() as u32).to_le_bytes()));

    let got = completions(&vm, 4);
    let status = |cid| got.iter().find(|c| c.0 == cid).map(|c| c.1);
    let is = |cid, want: Status| status(cid).is_some_and(|s| s.same(want));
    assert!(is(2, Status::DATA_TRANSFER_ERROR), "{got:?}");
    assert!(is(4, Status::INVALID_OPCODE), "{got:?}");
    assert!(is(5, Status::DATA_TRANSFER_ERROR), "{got:?}");
    assert!(is(3, Status::SUCCESS), "{got:?}");
    let mut mdts = [0u8; 1];
    vm.ram().read(DATA + 77, &mut mdts).unwrap();
    assert_eq!(
        mdts[0],
        nvme_device::controller::MDTS,
        "Identify data in guest RAM"
    );
    // The AER is held by the proxy: no completion, and nothing waited for it.
    assert_eq!(status(1), None, "{got:?}");
    let stats = a.admin_proxy_stats().unwrap();
    assert_eq!((stats.refused, stats.aers_held, stats.served), (3, 1, 4));
    // With no guest command on the device, the hypervisor's admin memory is not mapped:
    // nothing the guest aims at it (an I/O command running direct) reaches it.
    let deadline = Instant::now() + Duration::from_secs(60);
    while a.admin_proxy_stats().unwrap().mapped {
        assert!(
            Instant::now() < deadline,
            "the admin memory stays mapped while idle"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    // The next guest command maps it again for as long as it runs.
    let mut again = sqe(admin::IDENTIFY, 6, DATA);
    again.set_cdw(10, cns::CONTROLLER as u32);
    vm.ram().write(ASQ + 5 * 64, &again.to_bytes()).unwrap();
    assert!(mmio.write(bar0 + 0x1000, &6u32.to_le_bytes()));
    let got = completions(&vm, 5);
    assert!(
        got.iter().any(|c| c.0 == 6 && c.1.same(Status::SUCCESS)),
        "{got:?}"
    );
    assert!(a.admin_proxy_stats().unwrap().maps >= 1);
    assert_eq!(
        dev.stats().admin_errors,
        0,
        "no refused command reached the device"
    );

    // The device's admin queue registers are the hypervisor's while the proxy serves.
    assert!(mmio.write(bar0 + regs::ASQ, &0x5000u32.to_le_bytes()));
    let mut asq = [0u8; 4];
    assert!(mmio.read(bar0 + regs::ASQ, &mut asq));
    assert_ne!(u32::from_le_bytes(asq), 0x5000);
    assert!(mmio.write(bar0 + regs::ASQ, &(ASQ as u32).to_le_bytes()));

    // The guest disables the controller under the proxy: the proxy retires, the device's
    // admin queue registers get the guest's values back, and the next enable is the
    // guest's own.
    assert!(mmio.write(bar0 + regs::CC, &0u32.to_le_bytes()));
    assert!(a.admin_proxy_stats().is_none());
    let mut asq = [0u8; 4];
    assert!(mmio.read(bar0 + regs::ASQ, &mut asq));
    assert_eq!(u32::from_le_bytes(asq) as u64, ASQ);
    a.detach(vm.memory_slots());
}

/// While shadowed on the source, guest admin commands are checked before the device is rung
/// (the device reading a checked copy of the ring, or refused entries rewritten in place): a
/// command aimed at hypervisor memory the device can reach (a bounce area) fails there and
/// the memory stays untouched; a valid one runs.
#[test]
fn shadowed_admin_commands_reach_only_guest_ram() {
    for mode in [GuardMode::Copy, GuardMode::InPlace] {
        guarded(mode);
    }
}

fn guarded(mode: GuardMode) {
    let (_dir, _dev, vm, a) = setup(&format!("guard-{mode:?}"));
    let (bar0, _) = a.bar0();
    let mmio = vm.mmio_bus();
    // The guest brings the controller up on its own admin queue.
    let aqa = aqa::new(ENTRIES as u16, ENTRIES as u16);
    for (off, v) in [
        (regs::AQA, aqa),
        (regs::ASQ, ASQ as u32),
        (regs::ASQ + 4, 0),
        (regs::ACQ, ACQ as u32),
        (regs::ACQ + 4, 0),
        (regs::CC, cc::ENABLE),
    ] {
        assert!(mmio.write(bar0 + off, &v.to_le_bytes()));
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let mut b = [0u8; 4];
        assert!(mmio.read(bar0 + regs::CSTS, &mut b));
        if u32::from_le_bytes(b) & 1 == 1 {
            break;
        }
        assert!(Instant::now() < deadline, "CSTS.RDY never set");
        std::thread::sleep(Duration::from_millis(1));
    }
    // Hypervisor memory the device reaches (as the engine's bounce areas are while shadowed).
    let iova = identity::hypervisor_iova(vm.ram()) + (1 << 30);
    let mem = vmm::memory::GuestRam::new(32 << 20).unwrap();
    use passthrough::DeviceHooks;
    let fd = std::sync::Arc::new(std::os::fd::OwnedFd::from(mem.memfd().try_clone().unwrap()));
    a.map_device_memory(iova, 2 << 20, &fd).unwrap();
    a.guard_admin_sq(Some(mode)).unwrap();

    let mut at_bounce = sqe(admin::IDENTIFY, 1, iova);
    at_bounce.set_cdw(10, cns::CONTROLLER as u32);
    let mut ident = sqe(admin::IDENTIFY, 2, DATA);
    ident.set_cdw(10, cns::CONTROLLER as u32);
    let cmds = [at_bounce, sqe(0x80, 3, DATA), ident];
    for (i, c) in cmds.iter().enumerate() {
        vm.ram().write(ASQ + i as u64 * 64, &c.to_bytes()).unwrap();
    }
    assert!(mmio.write(bar0 + 0x1000, &(cmds.len() as u32).to_le_bytes()));
    let got = completions(&vm, 3);
    let is = |cid, want: Status| {
        got.iter()
            .find(|c| c.0 == cid)
            .is_some_and(|c| c.1.same(want))
    };
    assert!(is(1, Status::DATA_TRANSFER_ERROR), "{mode:?}: {got:?}");
    assert!(is(3, Status::INVALID_OPCODE), "{got:?}");
    assert!(is(2, Status::SUCCESS), "{got:?}");
    let mut page = [0u8; 4096];
    mem.read(0, &mut page).unwrap();
    assert!(
        page.iter().all(|&b| b == 0),
        "the device wrote hypervisor memory"
    );
    assert_eq!(a.admin_guard_refused(), Some(2));
    a.guard_admin_sq(None).unwrap();
    assert_eq!(a.admin_guard_refused(), None);
    a.unmap_device_memory(iova, 2 << 20).unwrap();
    a.detach(vm.memory_slots());
}

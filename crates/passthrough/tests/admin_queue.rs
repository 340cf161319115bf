//! The guest's admin queue where the hypervisor has memory of its own in the device's DMA
//! space, against a hostile guest: the destination rebuilds the device through the guest's
//! own admin ring (no hypervisor admin queue left for guest DMA to aim at), the guard checks
//! every admin command and the device fetches only the checked copy, and a guest that resets
//! its controller and moves its admin queue is followed. The test thread plays the vCPU: it
//! writes the guest's rings through the VM's memory slots (what a vCPU sees) and its
//! doorbells through the MMIO bus.
use std::{
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use nvme_device::{DeviceConfig, NvmeDevice};
use nvme_spec::{
    opcode::{admin, cns, io},
    regs::{self, aqa, cc},
    Cqe, Sqe, Status,
};
use passthrough::{
    admin_guard::GuardMode,
    config_log::{ConfigLog, CqConfig, SqConfig},
    identity, AttachOptions, Attachment, DeviceHooks,
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
const IOSQ: u64 = 0x40000;
const IOCQ: u64 = 0x50000;
const ASQ2: u64 = 0x60000;
const ACQ2: u64 = 0x70000;
const ENTRIES: u32 = 16;
const RAM: u64 = 64 << 20;
const DSTRD: u8 = 9;

fn sqe(op: u8, cid: u16, prp1: u64) -> Sqe {
    let mut s = Sqe::new(op, cid);
    s.set_prps(prp1, 0);
    s
}

fn identify(cid: u16, prp1: u64) -> Sqe {
    let mut s = sqe(admin::IDENTIFY, cid, prp1);
    s.set_cdw(10, cns::CONTROLLER as u32);
    s
}

/// Writes `data` at `gpa` as a vCPU does: through the memory slot that maps it.
fn vcpu_write(vm: &Vm, gpa: u64, data: &[u8]) {
    let (_, slot) = vm
        .memory_slots()
        .list()
        .into_iter()
        .find(|(_, s)| gpa >= s.gpa && gpa + data.len() as u64 <= s.gpa + s.size)
        .expect("a slot maps the range");
    for (i, b) in data.iter().enumerate() {
        // SAFETY: inside the slot's host mapping, which the VM keeps alive.
        unsafe {
            ((slot.host + gpa - slot.gpa) as *mut u8)
                .add(i)
                .write_volatile(*b)
        };
    }
}

/// Waits for the completion at `slot` of the CQ at `cq` to carry `phase`.
fn wait_cqe(vm: &Vm, cq: u64, slot: u32, phase: bool) -> Cqe {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let mut b = [0u8; 16];
        vm.ram().read(cq + slot as u64 * 16, &mut b).unwrap();
        let c = Cqe::from_bytes(&b);
        if c.phase() == phase {
            return c;
        }
        assert!(
            Instant::now() < deadline,
            "no completion at {cq:#x}[{slot}]"
        );
        std::thread::sleep(Duration::from_micros(200));
    }
}

/// The guest's side of an admin queue: submits through the vCPU's view, rings through the
/// MMIO bus, consumes completions.
struct AdminQ {
    sq: u64,
    cq: u64,
    tail: u32,
    head: u32,
    phase: bool,
}

impl AdminQ {
    fn run(&mut self, vm: &Vm, bar0: u64, cmds: &[Sqe]) -> Vec<Cqe> {
        for c in cmds {
            vcpu_write(vm, self.sq + self.tail as u64 * 64, &c.to_bytes());
            self.tail = (self.tail + 1) % ENTRIES;
        }
        assert!(vm.mmio_bus().write(bar0 + 0x1000, &self.tail.to_le_bytes()));
        let mut out = Vec::new();
        for _ in cmds {
            out.push(wait_cqe(vm, self.cq, self.head, self.phase));
            self.head = (self.head + 1) % ENTRIES;
            if self.head == 0 {
                self.phase = !self.phase;
            }
        }
        let cq_db = regs::cq_head_doorbell(0, DSTRD);
        assert!(vm.mmio_bus().write(bar0 + cq_db, &self.head.to_le_bytes()));
        out
    }
}

fn status(got: &[Cqe], cid: u16) -> Status {
    got.iter()
        .find(|c| c.cid() == cid)
        .unwrap_or_else(|| panic!("no completion for {cid}: {got:?}"))
        .status()
}

fn setup(tag: &str) -> (Dir, Arc<NvmeDevice>, Vm, Attachment) {
    let d = std::env::temp_dir().join(format!("ferry-adminq-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    let socket = d.join("s");
    let dev = Arc::new(
        NvmeDevice::new(&DeviceConfig {
            socket: socket.clone(),
            backing: d.join("disk"),
            size: 8 << 20,
            block_size: 512,
            dstrd: DSTRD,
            create: true,
        })
        .unwrap(),
    );
    let server = dev.clone();
    std::thread::spawn(move || {
        let _ = server.serve_one();
    });
    let vm = Vm::new(&VmConfig {
        ram_size: RAM,
        console: ConsoleSink::Null,
        ..Default::default()
    })
    .unwrap();
    let a = Attachment::attach(&vm, &AttachOptions::new("nvme0", &socket)).unwrap();
    (Dir(d), dev, vm, a)
}

fn wait_ready(vm: &Vm, bar0: u64, ready: bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let mut b = [0u8; 4];
        assert!(vm.mmio_bus().read(bar0 + regs::CSTS, &mut b));
        if (u32::from_le_bytes(b) & 1 == 1) == ready {
            return;
        }
        assert!(Instant::now() < deadline, "CSTS.RDY never {ready}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// The guest brings its controller up on the admin queue at `sq`/`cq`.
fn enable(vm: &Vm, bar0: u64, sq: u64, cq: u64) -> AdminQ {
    let aqa = aqa::new(ENTRIES as u16, ENTRIES as u16);
    for (off, v) in [
        (regs::AQA, aqa),
        (regs::ASQ, sq as u32),
        (regs::ASQ + 4, 0),
        (regs::ACQ, cq as u32),
        (regs::ACQ + 4, 0),
        (regs::CC, cc::ENABLE),
    ] {
        assert!(vm.mmio_bus().write(bar0 + off, &v.to_le_bytes()));
    }
    wait_ready(vm, bar0, true);
    AdminQ {
        sq,
        cq,
        tail: 0,
        head: 0,
        phase: true,
    }
}

/// Migration destination: the configuration is replayed through the guest's own admin ring,
/// the device lands on the guest's positions, and afterwards no hypervisor admin memory is in
/// the device's DMA space: guest I/O running straight on the device, aimed where the old
/// design kept its admin queue while a guest admin command ran, reaches nothing.
#[test]
fn the_destination_runs_the_guests_admin_queue_on_its_own_ring() {
    let (_dir, dev, vm, a) = setup("replay");
    let (bar0, _) = a.bar0();
    let mut log = ConfigLog {
        cc: cc::ENABLE,
        aqa: aqa::new(ENTRIES as u16, ENTRIES as u16),
        asq: ASQ,
        acq: ACQ,
        ..Default::default()
    };
    log.io_cqs.insert(
        1,
        CqConfig {
            base: IOCQ,
            entries: ENTRIES,
            interrupts: false,
            vector: 0,
        },
    );
    log.io_sqs.insert(
        1,
        SqConfig {
            base: IOSQ,
            entries: ENTRIES,
            cqid: 1,
            priority: 0,
        },
    );
    // The guest had submitted and consumed 21 admin commands on the source: one lap and 5.
    for i in 0..ENTRIES as u64 {
        let c = Cqe::new(0, 0, 0, i as u16, Status::SUCCESS, i < 5);
        vm.ram().write(ACQ + i * 16, &c.to_bytes()).unwrap();
    }
    a.replay(&log, (5, 5)).unwrap();

    // The device's admin queue is the guest's own.
    let reg = |off| {
        let mut b = [0u8; 8];
        assert!(vm.mmio_bus().read(bar0 + off, &mut b));
        u64::from_le_bytes(b)
    };
    assert_eq!((reg(regs::ASQ), reg(regs::ACQ)), (ASQ, ACQ));
    // Its next command is fetched from the guest's slot 5 and completes in slot 5 with the
    // phase the guest expects; one aimed above guest RAM is refused.
    let iova = identity::hypervisor_iova(vm.ram());
    let mut q = AdminQ {
        sq: ASQ,
        cq: ACQ,
        tail: 5,
        head: 5,
        phase: true,
    };
    let got = q.run(&vm, bar0, &[identify(40, DATA), identify(41, iova)]);
    assert!(status(&got, 40).same(Status::SUCCESS), "{got:?}");
    assert!(
        status(&got, 41).same(Status::DATA_TRANSFER_ERROR),
        "{got:?}"
    );
    let mut mdts = [0u8; 1];
    vm.ram().read(DATA + 77, &mut mdts).unwrap();
    assert_eq!(mdts[0], nvme_device::controller::MDTS);

    // Guest admin commands keep running while guest reads run straight on the device aimed
    // at the hypervisor's old admin queue IOVA: not one may land.
    let sq_db = a.device_page(regs::doorbell_page(1, DSTRD) * 4096).unwrap()
        + regs::sq_tail_doorbell(1, DSTRD) % 4096;
    let cq_db = a.device_page(regs::doorbell_page(1, DSTRD) * 4096).unwrap()
        + regs::cq_head_doorbell(1, DSTRD) % 4096;
    let (reads, landed, admin_ok) = std::thread::scope(|s| {
        let admin = s.spawn(|| {
            for i in 0..300u16 {
                let got = q.run(&vm, bar0, &[identify(100 + i % 64, DATA)]);
                assert!(got[0].status().is_success(), "{got:?}");
            }
        });
        let (mut tail, mut phase, mut reads, mut landed) = (0u32, true, 0u64, 0u64);
        // Until the admin thread is done (or failed).
        while !admin.is_finished() {
            let mut r = Sqe::new(io::READ, tail as u16);
            r.set_nsid(1).set_prps(iova + 0x1000 * (reads % 2), 0);
            vm.ram()
                .write(IOSQ + tail as u64 * 64, &r.to_bytes())
                .unwrap();
            tail = (tail + 1) % ENTRIES;
            // SAFETY: the device's mapped doorbell page, kept by the attachment.
            unsafe { (sq_db as *mut u32).write_volatile(tail) };
            let c = wait_cqe(&vm, IOCQ, (tail + ENTRIES - 1) % ENTRIES, phase);
            if tail == 0 {
                phase = !phase;
            }
            // SAFETY: as above.
            unsafe { (cq_db as *mut u32).write_volatile(tail) };
            reads += 1;
            if c.status().is_success() {
                landed += 1;
            }
        }
        (reads, landed, admin.join().is_ok())
    });
    assert!(reads > 0);
    assert_eq!(
        landed, 0,
        "{landed} of {reads} guest reads reached hypervisor memory"
    );
    assert!(admin_ok, "the guest's admin commands stopped completing");
    assert!(dev.stats().dma_errors >= reads, "{:?}", dev.stats());
    a.detach(vm.memory_slots());
}

/// While guarded, guest admin commands are checked before the device is rung, and the device
/// fetches only what was checked: a command aimed at hypervisor memory the device can reach
/// (a bounce area) fails there and the memory stays untouched; one aimed into the ring the
/// device fetches from is refused; a valid one runs; an entry the guest rewrites after the
/// doorbell does not change what the device fetches.
#[test]
fn guarded_admin_commands_reach_only_guest_ram() {
    for mode in [GuardMode::Copy, GuardMode::Swap] {
        guarded(mode);
    }
}

/// Hypervisor memory mapped for the device above guest RAM (as the engine's bounce areas).
fn bounce(vm: &Vm, a: &Attachment) -> (u64, vmm::memory::GuestRam) {
    let iova = identity::hypervisor_iova(vm.ram()) + (1 << 30);
    let mem = vmm::memory::GuestRam::new(32 << 20).unwrap();
    let fd = Arc::new(std::os::fd::OwnedFd::from(mem.memfd().try_clone().unwrap()));
    a.map_device_memory(iova, 2 << 20, &fd).unwrap();
    (iova, mem)
}

fn untouched(mem: &vmm::memory::GuestRam) -> bool {
    let mut page = vec![0u8; 2 << 20];
    mem.read(0, &mut page).unwrap();
    page.iter().all(|&b| b == 0)
}

fn guarded(mode: GuardMode) {
    let (_dir, _dev, vm, a) = setup(&format!("guard-{mode:?}"));
    let (bar0, _) = a.bar0();
    let mut q = enable(&vm, bar0, ASQ, ACQ);
    let (iova, mem) = bounce(&vm, &a);
    a.guard_admin_sq(vm.memory_slots(), Some(mode)).unwrap();
    assert_eq!(a.admin_guard_ring(), Some((ASQ, mode)));

    let got = q.run(
        &vm,
        bar0,
        &[
            identify(1, iova),
            sqe(0x80, 3, DATA),
            identify(2, DATA),
            identify(4, ASQ),
        ],
    );
    assert!(
        status(&got, 1).same(Status::DATA_TRANSFER_ERROR),
        "{mode:?}: {got:?}"
    );
    assert!(status(&got, 3).same(Status::INVALID_OPCODE), "{got:?}");
    assert!(status(&got, 2).same(Status::SUCCESS), "{got:?}");
    assert!(status(&got, 4).same(Status::DATA_TRANSFER_ERROR), "{got:?}");
    assert!(untouched(&mem), "the device wrote hypervisor memory");
    assert_eq!(a.admin_guard_refused(), Some(3));
    // The mediation saw the commands the device ran: none is left pending (a migration
    // waits for that before the switchover).
    assert_eq!(a.admin_positions().2, 0, "{mode:?}");

    if mode == GuardMode::Swap {
        // The guest rewrites the entry it just submitted (as another vCPU could between the
        // check and the device's fetch): the ring the device fetches from keeps the checked
        // command.
        let slot = ASQ + 64 * ((q.tail + ENTRIES - 1) % ENTRIES) as u64;
        vcpu_write(&vm, slot, &identify(9, iova).to_bytes());
        let mut fetched = [0u8; 64];
        vm.ram().read(slot, &mut fetched).unwrap();
        assert_eq!(
            Sqe::from_bytes(&fetched),
            {
                // Refused (aimed into the ring): its addresses moved where nothing is mapped.
                let unmapped = identity::hypervisor_iova(vm.ram()) - 4096;
                let mut s = identify(4, ASQ);
                s.set_prps(unmapped, unmapped);
                s
            },
            "the device's ring follows the guest's rewrite"
        );
        // A migration sends the guest's view: an entry written and not submitted yet reaches
        // RAM (checked) and the ring's pages join the dirty set (KVM's log saw neither write).
        let next = ASQ + 64 * q.tail as u64;
        vcpu_write(&vm, next, &identify(7, DATA).to_bytes());
        assert!(a.take_admin_device_written().contains(&ASQ));
        let mut entry = [0u8; 64];
        vm.ram().read(next, &mut entry).unwrap();
        assert_eq!(Sqe::from_bytes(&entry), identify(7, DATA));
    }
    // A new I/O queue would run direct (its doorbell is the device's), its commands never
    // checked: while guarded, Create I/O SQ is refused even when the device would take it.
    let mut ccq = sqe(admin::CREATE_CQ, 10, IOCQ);
    ccq.set_cdw(10, 15 << 16 | 1).set_cdw(11, 1);
    let mut csq = sqe(admin::CREATE_SQ, 11, IOSQ);
    csq.set_cdw(10, 15 << 16 | 1).set_cdw(11, 1 | 1 << 16);
    let before = a.admin_guard_refused().unwrap_or(0);
    let got = q.run(&vm, bar0, &[ccq, csq]);
    assert!(status(&got, 10).same(Status::SUCCESS), "{mode:?}: {got:?}");
    assert!(
        status(&got, 11).same(Status::INVALID_FIELD),
        "{mode:?}: {got:?}"
    );
    assert_eq!(a.admin_guard_refused(), Some(before + 1));
    a.guard_admin_sq(vm.memory_slots(), None).unwrap();
    assert_eq!(a.admin_guard_refused(), None);
    // Off: the guest's ring is plain RAM again for both.
    let got = q.run(&vm, bar0, &[identify(5, DATA)]);
    assert!(status(&got, 5).same(Status::SUCCESS), "{got:?}");
    a.unmap_device_memory(iova, 2 << 20).unwrap();
    a.detach(vm.memory_slots());
}

/// A guest that resets its controller and moves its admin queue while guarded: the guard
/// follows it to the new ring, whose commands are checked the same way.
#[test]
fn a_guest_that_moves_its_admin_queue_is_followed() {
    for mode in [GuardMode::Copy, GuardMode::Swap] {
        moved(mode);
    }
}

fn moved(mode: GuardMode) {
    let (_dir, _dev, vm, a) = setup(&format!("moved-{mode:?}"));
    let (bar0, _) = a.bar0();
    let mut q = enable(&vm, bar0, ASQ, ACQ);
    let (iova, mem) = bounce(&vm, &a);
    a.guard_admin_sq(vm.memory_slots(), Some(mode)).unwrap();
    let got = q.run(&vm, bar0, &[identify(1, DATA)]);
    assert!(status(&got, 1).same(Status::SUCCESS), "{got:?}");

    // Reset, then enable on a queue somewhere else.
    assert!(vm.mmio_bus().write(bar0 + regs::CC, &0u32.to_le_bytes()));
    wait_ready(&vm, bar0, false);
    let mut q = enable(&vm, bar0, ASQ2, ACQ2);
    assert_eq!(a.admin_guard_ring(), Some((ASQ2, GuardMode::Copy)));
    let got = q.run(
        &vm,
        bar0,
        &[
            identify(2, iova),
            identify(3, DATA),
            sqe(0x80, 4, DATA),
            identify(5, ASQ2),
        ],
    );
    assert!(
        status(&got, 2).same(Status::DATA_TRANSFER_ERROR),
        "{mode:?}: {got:?}"
    );
    assert!(status(&got, 3).same(Status::SUCCESS), "{got:?}");
    assert!(status(&got, 4).same(Status::INVALID_OPCODE), "{got:?}");
    assert!(status(&got, 5).same(Status::DATA_TRANSFER_ERROR), "{got:?}");
    assert!(untouched(&mem), "the device wrote hypervisor memory");

    // Off: every ring the guard held goes back (the old swapped one included).
    a.guard_admin_sq(vm.memory_slots(), None).unwrap();
    assert!(
        vm.memory_slots()
            .list()
            .iter()
            .all(|(_, s)| s.kind != vmm::memslots::SlotKind::Device || s.gpa >= RAM),
        "a guard copy still backs guest RAM"
    );
    let got = q.run(&vm, bar0, &[identify(6, DATA)]);
    assert!(status(&got, 6).same(Status::SUCCESS), "{got:?}");
    a.unmap_device_memory(iova, 2 << 20).unwrap();
    a.detach(vm.memory_slots());
}

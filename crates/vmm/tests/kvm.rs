//! VMM-core tests under the real /dev/kvm with the real built-in guest.
use std::time::Duration;

use guest_abi::{Workload, WorkloadArgs};
use vmm::{devices::serial::ConsoleSink, memory::GuestRam, Vm, VmConfig, VmOutcome};

fn config() -> VmConfig {
    VmConfig {
        ram_size: 64 << 20,
        console: ConsoleSink::Null,
        ..Default::default()
    }
}

fn boot(workload: Workload, args: WorkloadArgs) -> Vm {
    let mut vm = Vm::new(&config()).expect("KVM VM (is /dev/kvm usable?)");
    vm.boot(guest_image::GUEST_ELF, workload, args).unwrap();
    vm.start().unwrap();
    vm
}

/// Polls `cond` until it holds, for at most a generous minute.
fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !cond() {
        assert!(
            std::time::Instant::now() < deadline,
            "{what}: not within 60 s"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn progress(vm: &Vm) -> u64 {
    vm.mailbox().progress().unwrap()
}

fn console_has(vm: &Vm, needle: &str) -> bool {
    vm.console_tail().lines().iter().any(|l| l.contains(needle))
}

#[test]
fn hello_enumerates_pci_and_exits_zero() {
    let vm = boot(Workload::Hello, WorkloadArgs::default());
    let outcome = vm.wait(Some(Duration::from_secs(20)));
    assert_eq!(
        outcome,
        Some(VmOutcome::GuestExit(0)),
        "console: {:?}",
        vm.console_tail().lines()
    );
    assert!(
        console_has(&vm, "pci 00:00.0 8086:0d57 class 060000"),
        "{:?}",
        vm.console_tail().lines()
    );
    assert!(console_has(&vm, "pci: 1 function(s)"));
    assert!(vm
        .lifecycle()
        .event_time(guest_abi::ports::Event::Booted)
        .is_some());
}

#[test]
fn state_save_restore_into_a_fresh_vm_continues_the_guest() {
    let args = WorkloadArgs {
        working_set_bytes: 8 << 20,
        // until asked to stop: the guest must still run when it is paused, however slow
        duration_ms: 0,
        seed: 42,
        ..Default::default()
    };
    let vm = boot(Workload::Dirty, args);
    wait_until("the guest writes pages", || progress(&vm) > 0);
    vm.pause().unwrap();
    let progress_at_pause = vm.mailbox().progress().unwrap();
    assert!(
        progress_at_pause > 0,
        "the guest made progress before the pause"
    );
    let state = vm.save_state().unwrap();
    let bytes = postcard::to_allocvec(&state).unwrap();
    let ram: GuestRam = vm.ram().clone();
    drop(vm);

    let restored: vmm::state::VmState = postcard::from_bytes(&bytes).unwrap();
    assert_eq!(restored, state, "serialization round trip");
    let mut fresh = Vm::with_ram(&config(), ram).unwrap();
    fresh.restore_state(&restored).unwrap();
    // What KVM now holds must be what was saved.
    let again = fresh.save_state().unwrap();
    assert_eq!(again.vcpus[0].regs, state.vcpus[0].regs);
    assert_eq!(again.vcpus[0].sregs, state.vcpus[0].sregs);
    assert_eq!(again.vcpus[0].xsave, state.vcpus[0].xsave);
    assert_eq!(again.vcpus[0].lapic, state.vcpus[0].lapic);
    assert_eq!(again.kvm.irqchips, state.kvm.irqchips);
    fresh.start().unwrap();
    wait_until("the restored guest continues", || {
        progress(&fresh) > progress_at_pause
    });
    fresh.mailbox().request_stop().unwrap();
    let outcome = fresh.wait(Some(Duration::from_secs(60)));
    assert_eq!(
        outcome,
        Some(VmOutcome::GuestExit(0)),
        "console: {:?}",
        fresh.console_tail().lines()
    );
    assert!(
        console_has(&fresh, "ledger verified: OK"),
        "{:?}",
        fresh.console_tail().lines()
    );
    assert!(
        fresh.mailbox().progress().unwrap() > progress_at_pause,
        "the guest continued"
    );
}

#[test]
fn unbacked_mmio_and_unknown_ports_read_all_ones() {
    let vm = boot(Workload::Probe, WorkloadArgs::default());
    let outcome = vm.wait(Some(Duration::from_secs(20)));
    assert_eq!(
        outcome,
        Some(VmOutcome::GuestExit(0)),
        "console: {:?}",
        vm.console_tail().lines()
    );
    assert!(console_has(&vm, "mmio read 0xd0000000 -> 0xffffffff"));
    assert!(console_has(&vm, "port 0x2f0 -> 0xff / 0xffffffff"));
    assert!(console_has(&vm, "pci 00:1f.0 id -> 0xffffffff"));
    assert!(vm.mmio_bus().unhandled_count() >= 2);
    assert!(vm.pio_bus().unhandled_count() >= 3);
}

#[test]
fn a_guest_fault_is_reported_not_fatal() {
    let vm = boot(Workload::Crash, WorkloadArgs::default());
    match vm.wait(Some(Duration::from_secs(20))) {
        Some(VmOutcome::Crashed(why)) => assert!(why.contains("triple fault"), "{why}"),
        other => panic!("expected a crash, got {other:?}"),
    }
}

#[test]
fn the_vmm_can_stop_a_busy_guest() {
    let args = WorkloadArgs {
        working_set_bytes: 4 << 20,
        duration_ms: 0,
        seed: 1,
        ..Default::default()
    };
    let vm = boot(Workload::Dirty, args);
    wait_until("the guest writes pages", || progress(&vm) > 0);
    vm.stop("test").unwrap();
    assert_eq!(
        vm.wait(Some(Duration::from_secs(5))),
        Some(VmOutcome::Stopped("test".into()))
    );
}

#[test]
fn the_exit_probe_sees_every_exit_of_both_kinds() {
    let c = vmm::exit_cost::measure(2_000).expect("exit probe");
    assert_eq!(c.exits, 2_000);
    // Every port write of the timed ioeventfd run signalled the eventfd once.
    assert_eq!(c.ioeventfd_signals, 2_000);
    assert!(c.user_exit_us > 0.0 && c.ioeventfd_us > 0.0, "{c:?}");
}

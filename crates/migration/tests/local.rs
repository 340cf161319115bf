//! Migration between two VMs in one process over loopback TCP, under the real /dev/kvm.
mod common;

use std::{
    net::TcpListener,
    time::{Duration, Instant},
};

use migration::{DestinationOptions, NoDevices, SourceOptions};
use vmm::{Vm, VmConfig, VmOutcome};

use common::{progress, wait_until};

fn config() -> VmConfig {
    common::config(128 << 20)
}

fn dirty_vm() -> Vm {
    common::dirty_vm(128 << 20, 32 << 20, 9)
}

/// Waits until the guest made `n` page writes: with n = 4 x the 8192 pages of the working set,
/// nearly all of it (1 - e^-4 = 98 %) holds data.
fn wait_writes(vm: &Vm, n: u64) {
    wait_until("the guest writes its working set", || progress(vm) >= n);
}

fn verify(vm: &Vm) -> vmm::vm::VerifyResult {
    let req = vm.mailbox().request_verify().unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(r) = vm.mailbox().verify_result(req).unwrap() {
            return r;
        }
        assert!(Instant::now() < deadline, "no verification answer");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// A destination on a loopback port, hashing memory: (its address, the thread receiving).
fn destination() -> (String, std::thread::JoinHandle<migration::Incoming>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let dest = std::thread::spawn(move || {
        let (stream, _) = listener.accept().unwrap();
        let opts = DestinationOptions {
            debug_hash: true,
            ..Default::default()
        };
        migration::receive(stream, &config(), &opts, &mut NoDevices).unwrap()
    });
    (addr, dest)
}

#[test]
fn a_busy_guest_migrates_with_identical_memory_and_a_valid_ledger() {
    let (addr, dest) = destination();
    let vm = dirty_vm();
    wait_writes(&vm, 8192);
    let opts = SourceOptions {
        debug_hash: true,
        ..Default::default()
    };
    let report = migration::migrate(&vm, &mut [], &addr, &opts, &mut |_| {}).unwrap();
    let incoming = dest.join().unwrap();
    assert_eq!(
        report.memory_hash, incoming.report.memory_hash,
        "memory at pause == memory at resume"
    );
    assert!(report.rounds.len() >= 2);
    assert!(report.zero_pages_skipped > 0);
    assert_eq!(incoming.report.ram_bytes, 128 << 20);
    let before = progress(&vm);
    // the destination runs the guest, which goes on writing and keeps a valid ledger
    wait_until("the guest runs on the destination", || {
        progress(&incoming.vm) > before + 1000
    });
    let r = verify(&incoming.vm);
    assert_eq!(r.status, 0, "{r:?}");
    // the source stays paused: while the destination wrote a thousand pages and verified,
    // its progress did not move
    assert_eq!(progress(&vm), before);
    incoming.vm.stop("test over").unwrap();
}

#[test]
fn a_refusing_destination_leaves_the_source_running() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let dest = std::thread::spawn(move || {
        let (stream, _) = listener.accept().unwrap();
        // a destination with a 64 MiB limit refuses the 128 MiB guest
        let opts = DestinationOptions {
            max_ram: 64 << 20,
            ..Default::default()
        };
        migration::receive(stream, &config(), &opts, &mut NoDevices)
            .err()
            .unwrap()
            .to_string()
    });
    let vm = dirty_vm();
    let err = migration::migrate(&vm, &mut [], &addr, &SourceOptions::default(), &mut |_| {})
        .unwrap_err();
    let dest_err = dest.join().unwrap();
    assert!(dest_err.contains("exceeds this host's limit"), "{dest_err}");
    assert!(
        err.to_string().contains("exceeds this host's limit"),
        "the source learns why: {err}"
    );
    let p = progress(&vm);
    wait_until("the source VM keeps running", || progress(&vm) != p);
    assert_eq!(verify(&vm).status, 0);
    assert!(
        !vm.memory_slots().dirty_logging(),
        "dirty logging is off again"
    );
    assert_eq!(vm.wait(Some(Duration::from_millis(1))), None::<VmOutcome>);
}

#[test]
fn a_bandwidth_cap_holds_for_pre_copy_and_memory_stays_identical() {
    const CAP: u64 = 24 << 20;
    let (addr, dest) = destination();
    let vm = dirty_vm();
    wait_writes(&vm, 4 * 8192);
    let opts = SourceOptions {
        debug_hash: true,
        max_bandwidth: Some(CAP),
        // The guest dirties faster than the cap: the rounds never converge, so keep them few.
        max_rounds: 2,
        ..Default::default()
    };
    let report = migration::migrate(&vm, &mut [], &addr, &opts, &mut |_| {}).unwrap();
    let incoming = dest.join().unwrap();
    assert_eq!(report.memory_hash, incoming.report.memory_hash);
    // Every pre-copy byte went out no faster than the cap allows (the sender sleeps before it
    // may go on), so the unpaused rounds' bytes over the time before the pause stay under it.
    let precopy: u64 = report
        .rounds
        .iter()
        .filter(|r| !r.paused)
        .map(|r| r.bytes)
        .sum();
    assert!(
        precopy > 16 << 20,
        "round 0 carries the working set, written before the migration: {report:?}"
    );
    let before_pause_s = (report.total_ms - report.downtime_ms) / 1000.0;
    let rate = precopy as f64 / before_pause_s;
    assert!(
        rate <= CAP as f64 * 1.01,
        "{rate} B/s over a cap of {CAP}: {report:?}"
    );
    incoming.vm.stop("test over").unwrap();
}

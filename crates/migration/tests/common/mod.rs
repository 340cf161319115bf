//! Helpers shared by the migration crate's integration tests (each file uses a part of them).
#![allow(dead_code)]
use std::time::{Duration, Instant};

use guest_abi::{Workload, WorkloadArgs};
use vmm::{devices::serial::ConsoleSink, Vm, VmConfig};

/// A VM of `ram_size` bytes with its console discarded.
pub fn config(ram_size: u64) -> VmConfig {
    VmConfig {
        ram_size,
        console: ConsoleSink::Null,
        ..Default::default()
    }
}

/// A started VM of `ram_size` bytes running the dirty workload over `working_set` bytes.
pub fn dirty_vm(ram_size: u64, working_set: u64, seed: u64) -> Vm {
    let mut vm = Vm::new(&config(ram_size)).unwrap();
    let args = WorkloadArgs {
        working_set_bytes: working_set,
        duration_ms: 0,
        seed,
        ..Default::default()
    };
    vm.boot(guest_image::GUEST_ELF, Workload::Dirty, args)
        .unwrap();
    vm.start().unwrap();
    vm
}

/// Polls `cond` until it holds, for at most a generous minute.
pub fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !cond() {
        assert!(Instant::now() < deadline, "{what}: not within 60 s");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The guest's progress counter.
pub fn progress(vm: &Vm) -> u64 {
    vm.mailbox().progress().unwrap()
}

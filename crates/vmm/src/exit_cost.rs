//! What one guest→host transition costs on this host, measured with a minimal VM
//! (`ferry bench platform`).
//!
//! Every design choice that puts an exit on a hot path (a trapped doorbell, a "send now"
//! register, an idle wait) pays this price per exit, whatever the VMM does after it. The VM
//! here is the smallest Ferry can build: 32 MiB of RAM, the same ring-3 machine state as the
//! built-in guest ([`crate::x86`]), and a nine-byte loop that writes one port `count` times:
//!
//! ```text
//! loop: out dx, al      ; the exit being measured
//!       dec ecx
//!       jnz loop
//!       mov edx, DONE   ; an exit to user space that ends the run
//!       out dx, al
//!       jmp $
//! ```
//!
//! Two kinds of exit are timed, each over the same loop:
//! - **to user space**: the port is not registered, so every `out` returns from `KVM_RUN`
//!   and this thread calls it again at once (the cheapest a VMM's exit handler can be);
//! - **in the kernel**: the port is an ioeventfd, so KVM signals an eventfd and resumes the
//!   guest without leaving the kernel (a doorbell that wakes another thread).
use std::time::Instant;

use guest_abi::layout::IMAGE_BASE;
use kvm_ioctls::{IoEventAddress, NoDatamatch, VcpuExit, VcpuFd, VmFd};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::{memory::GuestRam, open_kvm, x86, Error, Result};

/// The port the loop writes.
const LOOP_PORT: u16 = 0x5f0;
/// The port whose write ends a run.
const DONE_PORT: u16 = 0x5f4;
/// RAM of the probe VM (the smallest Ferry lays out).
const PROBE_RAM: u64 = guest_abi::layout::MIN_RAM;
/// The KVM TSS area (outside RAM use, as in [`crate::Vm`]).
const KVM_TSS_ADDRESS: usize = 0xfffb_d000;

/// `loop: out dx, al; dec ecx; jnz loop; mov edx, DONE_PORT; out dx, al; jmp $`.
fn code() -> Vec<u8> {
    let mut c = vec![0xee, 0xff, 0xc9, 0x75, 0xfb, 0xba];
    c.extend_from_slice(&u32::from(DONE_PORT).to_le_bytes());
    c.extend_from_slice(&[0xee, 0xeb, 0xfe]);
    c
}

/// The measured cost of one exit of each kind.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct ExitCosts {
    /// Exits timed of each kind.
    pub exits: u32,
    /// Microseconds per exit to user space and back (`KVM_RUN` returns and is called again).
    pub user_exit_us: f64,
    /// Microseconds per exit handled in the kernel (an ioeventfd write).
    pub ioeventfd_us: f64,
    /// Eventfd signals counted for the ioeventfd run (equals `exits` when every write was
    /// seen).
    pub ioeventfd_signals: u64,
}

/// Builds the probe VM and times `count` exits of each kind (after a warm-up of
/// `count / 10`).
pub fn measure(count: u32) -> Result<ExitCosts> {
    let count = count.max(1);
    // RAM first: locals drop in reverse order, so the VM (and its memory slots) goes before
    // the mapping it points at.
    let ram = GuestRam::new(PROBE_RAM)?;
    let kvm = open_kvm()?;
    let vm = kvm.create_vm().map_err(Error::kvm("create VM"))?;
    vm.set_tss_address(KVM_TSS_ADDRESS)
        .map_err(Error::kvm("set TSS address"))?;
    vm.create_irq_chip().map_err(Error::kvm("create irqchip"))?;
    for (slot, r) in ram.regions().iter().enumerate() {
        let region = kvm_bindings::kvm_userspace_memory_region {
            slot: slot as u32,
            guest_phys_addr: r.gpa,
            memory_size: r.size,
            userspace_addr: ram.host_address(r)? as u64,
            flags: 0,
        };
        // SAFETY: the host range is a live mapping owned by `ram`, which is dropped after
        // `vm` (declared before it) and so outlives every use of the slot.
        unsafe { vm.set_user_memory_region(region) }.map_err(Error::kvm("set memory region"))?;
    }
    x86::setup_memory(&ram)?;
    ram.write(IMAGE_BASE, &code())?;
    let mut vcpu = vm.create_vcpu(0).map_err(Error::kvm("create vCPU"))?;
    let mut sregs = vcpu.get_sregs().map_err(Error::kvm("get sregs"))?;
    x86::setup_sregs(&mut sregs);
    vcpu.set_sregs(&sregs).map_err(Error::kvm("set sregs"))?;

    let warm = (count / 10).max(1);
    time_loop(&mut vcpu, warm)?;
    let user_exit_us = time_loop(&mut vcpu, count)?;

    let efd = EventFd::new(EFD_NONBLOCK).map_err(|source| Error::Io {
        what: "creating the probe's eventfd".into(),
        source,
    })?;
    vm.register_ioevent(
        &efd,
        &IoEventAddress::Pio(u64::from(LOOP_PORT)),
        NoDatamatch,
    )
    .map_err(Error::kvm("register ioeventfd"))?;
    time_loop(&mut vcpu, warm)?;
    let _ = efd.read();
    let ioeventfd_us = time_loop(&mut vcpu, count)?;
    let ioeventfd_signals = efd.read().unwrap_or(0);
    unregister(&vm, &efd)?;
    Ok(ExitCosts {
        exits: count,
        user_exit_us,
        ioeventfd_us,
        ioeventfd_signals,
    })
}

fn unregister(vm: &VmFd, efd: &EventFd) -> Result<()> {
    vm.unregister_ioevent(efd, &IoEventAddress::Pio(u64::from(LOOP_PORT)), NoDatamatch)
        .map_err(Error::kvm("unregister ioeventfd"))
}

/// Runs the loop `count` times from its first instruction; returns microseconds per write of
/// `LOOP_PORT` (user-space exits of that port are answered at once).
fn time_loop(vcpu: &mut VcpuFd, count: u32) -> Result<f64> {
    let mut regs = x86::initial_regs(IMAGE_BASE);
    regs.rdx = u64::from(LOOP_PORT);
    regs.rcx = u64::from(count);
    vcpu.set_regs(&regs).map_err(Error::kvm("set regs"))?;
    let start = Instant::now();
    let mut seen = 0u64;
    loop {
        match vcpu.run() {
            Ok(VcpuExit::IoOut(port, _)) if port == DONE_PORT => break,
            Ok(VcpuExit::IoOut(port, _)) if port == LOOP_PORT => seen += 1,
            Ok(VcpuExit::Intr) => {}
            Ok(other) => {
                return Err(Error::Vcpu {
                    id: 0,
                    reason: format!("exit probe: unexpected exit {other:?}"),
                })
            }
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {}
            Err(source) => {
                return Err(Error::Kvm {
                    op: "run the exit probe",
                    source,
                })
            }
        }
    }
    let elapsed = start.elapsed();
    if seen > u64::from(count) {
        return Err(Error::Vcpu {
            id: 0,
            reason: format!("exit probe: {seen} exits for a loop of {count}"),
        });
    }
    Ok(elapsed.as_secs_f64() * 1e6 / f64::from(count))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_loop_jumps_back_to_its_out() {
        let c = code();
        // `jnz` at offset 3 with displacement -5 lands on offset 0 (the `out`).
        assert_eq!(c[3], 0x75);
        assert_eq!(5 + (c[4] as i8 as i64), 0);
        assert_eq!(&c[5..10], &[0xba, 0xf4, 0x05, 0, 0]);
    }
}

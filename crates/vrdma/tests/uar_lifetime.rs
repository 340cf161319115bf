//! The UAR doorbell page is mapped into the guest by a KVM memory slot: it must stay mapped
//! for as long as anything can still run the guest, also after the device's handle and the
//! `Vm` are dropped while a vCPU thread (which holds the VM's MMIO bus) lives on.
use std::sync::Arc;

use rdma_wire::Gid;
use vrdma::{BackendError, BackendErrorKind, MadInbox, RdmaBackend, UdQueue};

/// A backend that refuses everything (the test never reaches it).
struct Nothing;

impl RdmaBackend for Nothing {
    fn bind_gid(&self, _gid: Gid) -> Result<(), BackendError> {
        Err(BackendError::new(BackendErrorKind::Refused, "test"))
    }
    fn unbind_gid(&self, _gid: Gid) -> Result<(), BackendError> {
        Ok(())
    }
    fn send_mad(&self, _sgid: Gid, _dgid: Gid, _mad: &[u8]) -> Result<(), BackendError> {
        Err(BackendError::new(BackendErrorKind::Refused, "test"))
    }
    fn receive_buffers_posted(&self) {}
    fn create_ud_qp(&self, _gid: Gid, _qkey: u32) -> Result<Box<dyn UdQueue>, BackendError> {
        Err(BackendError::new(BackendErrorKind::Refused, "test"))
    }
}

/// Whether `addr` (page-aligned) is mapped in this process.
fn mapped(addr: u64) -> bool {
    let mut v = [0u8; 1];
    // SAFETY: mincore only inspects the address range and writes one byte into `v`.
    let r = unsafe { libc::mincore(addr as *mut libc::c_void, 4096, v.as_mut_ptr()) };
    if r == 0 {
        return true;
    }
    let e = std::io::Error::last_os_error();
    assert_eq!(e.raw_os_error(), Some(libc::ENOMEM), "mincore: {e}");
    false
}

#[test]
fn the_doorbell_page_outlives_the_handle_while_a_vcpu_can_still_map_it() {
    let vm = vmm::Vm::new(&vmm::VmConfig {
        ram_size: 32 << 20,
        console: vmm::devices::serial::ConsoleSink::Null,
        ..Default::default()
    })
    .expect("a VM (needs /dev/kvm)");
    let handle = vrdma::attach(
        &vm,
        Arc::new(Nothing),
        Arc::new(MadInbox::default()),
        vrdma::DEFAULT_BAR_BASE,
    )
    .expect("attach");
    let uar_gpa = vrdma::DEFAULT_BAR_BASE + vrdma::attach::REG_BAR_SIZE;
    let (_, slot) = vm
        .memory_slots()
        .list()
        .into_iter()
        .find(|(_, s)| s.gpa == uar_gpa)
        .expect("the UAR memory slot");
    assert!(mapped(slot.host), "mapped while the device runs");
    // What a vCPU thread holds while it can run the guest (one left behind by its handle
    // keeps holding it after the VM is dropped).
    let vcpu_bus = vm.mmio_bus().clone();
    drop(handle);
    assert!(
        mapped(slot.host),
        "the slot still maps the page: it must stay mapped after the handle is dropped"
    );
    drop(vm);
    assert!(
        mapped(slot.host),
        "a vCPU thread still holds the MMIO bus: the page must stay mapped"
    );
    drop(vcpu_bus);
    assert!(
        !mapped(slot.host),
        "unmapped once nothing can run the guest"
    );
}

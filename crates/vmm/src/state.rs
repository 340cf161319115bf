//! Saved state of vCPUs and of the VM, as plain serde structs (migration sends these).
use kvm_bindings::{
    kvm_clock_data, kvm_debugregs, kvm_irqchip, kvm_lapic_state, kvm_mp_state, kvm_msr_entry,
    kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave,
};

use serde::{Deserialize, Serialize};

use crate::devices::serial::SerialDeviceState;

/// Everything KVM holds for one vCPU. The legacy FPU state is part of `xsave`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VcpuState {
    /// vCPU index.
    pub id: u32,
    /// Multiprocessing state.
    pub mp_state: kvm_mp_state,
    /// General registers.
    pub regs: kvm_regs,
    /// Segment and control registers.
    pub sregs: kvm_sregs,
    /// FPU/SSE/extended state: the 4 KiB `kvm_xsave` region as words.
    pub xsave: Vec<u32>,
    /// Extended control registers.
    pub xcrs: kvm_xcrs,
    /// Debug registers.
    pub debugregs: kvm_debugregs,
    /// Local APIC.
    pub lapic: kvm_lapic_state,
    /// MSRs from KVM's index list that could be read.
    pub msrs: Vec<kvm_msr_entry>,
    /// Pending exceptions, interrupts, NMIs.
    pub vcpu_events: kvm_vcpu_events,
    /// TSC frequency, if KVM reports one.
    pub tsc_khz: Option<u32>,
}

/// VM-wide KVM state (in-kernel irqchip, PIT, clock).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct KvmVmState {
    /// PIC master, PIC slave, IOAPIC.
    pub irqchips: Vec<IrqchipState>,
    /// PIT.
    pub pit: kvm_pit_state2,
    /// kvmclock.
    pub clock: kvm_clock_data,
}

/// Device state of the VMM's own devices.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct DeviceStates {
    /// COM1.
    pub serial: SerialDeviceState,
}

/// Everything needed to resume a VM elsewhere except guest RAM.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VmState {
    /// Guest RAM size (the destination must have the same layout).
    pub ram_size: u64,
    /// VM-wide KVM state.
    pub kvm: KvmVmState,
    /// Per-vCPU state, by index.
    pub vcpus: Vec<VcpuState>,
    /// The VMM's devices.
    pub devices: DeviceStates,
}

/// One in-kernel interrupt controller: `kvm_irqchip` as its chip id and raw 512-byte body.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IrqchipState {
    /// KVM_IRQCHIP_PIC_MASTER, _PIC_SLAVE or _IOAPIC.
    pub chip_id: u32,
    /// The chip's state as KVM lays it out.
    pub body: Vec<u8>,
}

/// Size of `kvm_irqchip`'s union body.
pub const IRQCHIP_BODY: usize = 512;

impl IrqchipState {
    /// Captures a `kvm_irqchip`.
    pub fn from_kvm(chip: &kvm_irqchip) -> Self {
        // SAFETY: every variant of the union is plain old data and `dummy` spans all of it.
        let dummy = unsafe { chip.chip.dummy };
        IrqchipState {
            chip_id: chip.chip_id,
            body: dummy.iter().map(|&b| b as u8).collect(),
        }
    }

    /// Rebuilds the `kvm_irqchip`; `None` if the body has the wrong size.
    pub fn to_kvm(&self) -> Option<kvm_irqchip> {
        if self.body.len() != IRQCHIP_BODY {
            return None;
        }
        let mut chip = kvm_irqchip {
            chip_id: self.chip_id,
            ..Default::default()
        };
        let mut dummy = [0 as std::os::raw::c_char; IRQCHIP_BODY];
        for (d, &b) in dummy.iter_mut().zip(&self.body) {
            *d = b as std::os::raw::c_char;
        }
        chip.chip.dummy = dummy;
        Some(chip)
    }
}

/// Captures the xsave region as words.
pub fn xsave_words(x: &kvm_xsave) -> Vec<u32> {
    x.region.to_vec()
}

/// Rebuilds a `kvm_xsave`; `None` if the word count is wrong.
pub fn xsave_from_words(words: &[u32]) -> Option<kvm_xsave> {
    let mut x = kvm_xsave::default();
    if words.len() != x.region.len() {
        return None;
    }
    x.region.copy_from_slice(words);
    Some(x)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn irqchip_and_xsave_round_trip() {
        let mut chip = kvm_irqchip {
            chip_id: 2,
            ..Default::default()
        };
        let mut dummy = [0 as std::os::raw::c_char; IRQCHIP_BODY];
        dummy[0] = 7;
        dummy[511] = -1;
        chip.chip.dummy = dummy;
        let s = IrqchipState::from_kvm(&chip);
        assert_eq!(s.body[511], 0xff);
        let back = s.to_kvm().unwrap();
        assert_eq!(IrqchipState::from_kvm(&back), s);
        assert!(IrqchipState {
            chip_id: 0,
            body: vec![0; 3]
        }
        .to_kvm()
        .is_none());

        let mut x = kvm_xsave::default();
        x.region[5] = 0xdead;
        let w = xsave_words(&x);
        assert_eq!(xsave_from_words(&w).unwrap().region[5], 0xdead);
        assert!(xsave_from_words(&w[1..]).is_none());
    }
}

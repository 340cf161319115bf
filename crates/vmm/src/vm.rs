//! A Ferry VM: KVM VM, guest RAM, buses, devices and vCPUs.
use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use guest_abi::{
    layout::PARAMS_GPA,
    params::{self, BootParams, Workload, WorkloadArgs},
    ports,
};
use kvm_bindings::{
    kvm_pit_config, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
    KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Kvm, VmFd};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::{
    bus::Bus,
    devices::{
        control::ControlDevice,
        serial::{ConsoleSink, ConsoleTail, ConsoleWriter, SerialDevice},
    },
    lifecycle::{Lifecycle, VmOutcome},
    loader::{self, LoadedImage},
    memory::GuestRam,
    memslots::{MemorySlots, SlotKind},
    pci::{HostBridge, PciBus, PciConfigIo},
    state::{DeviceStates, IrqchipState, KvmVmState, VmState},
    vcpu::{Vcpu, VcpuHandle},
    x86, Error, Result,
};

/// Where KVM puts its TSS on Intel hosts (three pages, in the MMIO hole above the PCI window).
const KVM_TSS_ADDRESS: usize = 0xfffb_d000;
/// The serial console's interrupt line.
const SERIAL_GSI: u32 = 4;

/// What to build.
#[derive(Clone, Debug)]
pub struct VmConfig {
    /// Guest RAM in bytes.
    pub ram_size: u64,
    /// Number of vCPUs (the built-in guest uses one).
    pub vcpus: usize,
    /// Where console output goes.
    pub console: ConsoleSink,
    /// Prefix of every console line ("" for none).
    pub console_prefix: String,
}

impl Default for VmConfig {
    fn default() -> Self {
        VmConfig {
            ram_size: 256 << 20,
            vcpus: 1,
            console: ConsoleSink::Stdout,
            console_prefix: String::new(),
        }
    }
}

/// Opens `/dev/kvm` and checks the API version.
pub fn open_kvm() -> Result<Kvm> {
    let kvm = Kvm::new().map_err(Error::KvmOpen)?;
    let v = kvm.get_api_version();
    if v != 12 {
        return Err(Error::KvmApiVersion(v));
    }
    Ok(kvm)
}

/// A VM.
pub struct Vm {
    kvm: Kvm,
    fd: Arc<VmFd>,
    ram: GuestRam,
    slots: MemorySlots,
    pio: Arc<Bus>,
    mmio: Arc<Bus>,
    pci: Arc<Mutex<PciBus>>,
    lifecycle: Arc<Lifecycle>,
    serial: Arc<Mutex<SerialDevice>>,
    console_tail: ConsoleTail,
    created: Vec<Vcpu>,
    running: Vec<VcpuHandle>,
    tsc_khz: Option<u32>,
}

impl Vm {
    /// Builds a VM with fresh, zeroed RAM.
    pub fn new(config: &VmConfig) -> Result<Self> {
        let ram = GuestRam::new(config.ram_size)?;
        Self::with_ram(config, ram)
    }

    /// Builds a VM around existing guest RAM (restore, migration).
    pub fn with_ram(config: &VmConfig, ram: GuestRam) -> Result<Self> {
        let kvm = open_kvm()?;
        let fd = Arc::new(kvm.create_vm().map_err(Error::kvm("create VM"))?);
        fd.set_tss_address(KVM_TSS_ADDRESS)
            .map_err(Error::kvm("set TSS address"))?;
        fd.create_irq_chip().map_err(Error::kvm("create irqchip"))?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        fd.create_pit2(pit).map_err(Error::kvm("create PIT"))?;

        let slots = MemorySlots::new(fd.clone(), kvm.get_nr_memslots());
        for r in ram.regions() {
            let host = ram.host_address(r)? as u64;
            // SAFETY: the host range is a live mapping owned by `ram`, which the VM keeps
            // alive for as long as the memory slot exists.
            unsafe { slots.add(r.gpa, r.size, host, SlotKind::Ram, false) }?;
        }

        let lifecycle = Arc::new(Lifecycle::default());
        let pio = Arc::new(Bus::new("pio"));
        let mmio = Arc::new(Bus::new("mmio"));
        mmio.set_ram_fallback(ram.clone());

        let console_tail = ConsoleTail::default();
        let writer = ConsoleWriter::new(
            &config.console,
            &config.console_prefix,
            console_tail.clone(),
        )
        .map_err(|source| Error::Io {
            what: format!("opening console {:?}", config.console),
            source,
        })?;
        let irq = EventFd::new(EFD_NONBLOCK).map_err(|source| Error::Io {
            what: "serial eventfd".into(),
            source,
        })?;
        fd.register_irqfd(&irq, SERIAL_GSI)
            .map_err(Error::kvm("register serial irqfd"))?;
        let serial = Arc::new(Mutex::new(SerialDevice::new(irq, writer)));
        pio.insert(
            ports::SERIAL_COM1 as u64,
            ports::SERIAL_LEN as u64,
            serial.clone(),
        )?;
        pio.insert(
            ports::FERRY_CTL_BASE as u64,
            ports::FERRY_CTL_LEN as u64,
            Arc::new(Mutex::new(ControlDevice::new(lifecycle.clone()))),
        )?;
        let pci = Arc::new(Mutex::new(PciBus::default()));
        pci.lock()
            .unwrap_or_else(|e| e.into_inner())
            .add(0, Arc::new(Mutex::new(HostBridge::new())))?;
        pio.insert(
            ports::PCI_CONFIG_ADDRESS as u64,
            8,
            Arc::new(Mutex::new(PciConfigIo::new(pci.clone()))),
        )?;

        let msr_index = Arc::new(
            kvm.get_msr_index_list()
                .map_err(Error::kvm("get MSR index list"))?
                .as_slice()
                .to_vec(),
        );
        let mut created = Vec::new();
        for id in 0..config.vcpus.max(1) {
            created.push(Vcpu::new(
                &kvm,
                &fd,
                id,
                pio.clone(),
                mmio.clone(),
                lifecycle.clone(),
                msr_index.clone(),
            )?);
        }
        let tsc_khz = created[0].tsc_khz();
        Ok(Vm {
            kvm,
            fd,
            ram,
            slots,
            pio,
            mmio,
            pci,
            lifecycle,
            serial,
            console_tail,
            created,
            running: Vec::new(),
            tsc_khz,
        })
    }

    /// Loads `image`, writes page tables and boot parameters, and points vCPU 0 at the entry.
    pub fn boot(
        &mut self,
        image: &[u8],
        workload: Workload,
        args: WorkloadArgs,
    ) -> Result<LoadedImage> {
        x86::setup_memory(&self.ram)?;
        let loaded = loader::load_elf(&self.ram, image)?;
        let (lo, hi) = guest_abi::layout::split_ram(self.ram.size());
        let params = BootParams {
            magic: params::MAGIC,
            version: params::VERSION,
            workload: workload as u32,
            tsc_khz: self.tsc_khz.map(u64::from).unwrap_or_else(host_tsc_khz),
            ram_lo_size: lo,
            ram_hi_size: hi,
            args,
            ..Default::default()
        };
        self.ram.write(PARAMS_GPA, params.as_bytes())?;
        let vcpu = self.created.first().ok_or(Error::Vcpu {
            id: 0,
            reason: "already started".into(),
        })?;
        vcpu.setup_boot(loaded.entry)?;
        Ok(loaded)
    }

    /// Starts every vCPU thread and runs the guest.
    pub fn start(&mut self) -> Result<()> {
        for vcpu in self.created.drain(..) {
            self.running.push(vcpu.spawn()?);
        }
        for h in &self.running {
            h.resume()?;
        }
        Ok(())
    }

    /// Pauses every vCPU (they leave KVM_RUN at an instruction boundary).
    pub fn pause(&self) -> Result<()> {
        self.running.iter().try_for_each(VcpuHandle::pause)
    }

    /// Resumes every vCPU.
    pub fn resume(&self) -> Result<()> {
        self.running.iter().try_for_each(VcpuHandle::resume)
    }

    /// Saves the state of a paused (or not yet started) VM.
    pub fn save_state(&self) -> Result<VmState> {
        let mut vcpus = Vec::new();
        for h in &self.running {
            vcpus.push(h.save_state()?);
        }
        for v in &self.created {
            vcpus.push(v.save_state()?);
        }
        Ok(VmState {
            ram_size: self.ram.size(),
            kvm: self.save_kvm_state()?,
            vcpus,
            devices: DeviceStates {
                serial: self
                    .serial
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .state(),
            },
        })
    }

    fn save_kvm_state(&self) -> Result<KvmVmState> {
        let mut irqchips = Vec::new();
        for chip_id in [
            KVM_IRQCHIP_PIC_MASTER,
            KVM_IRQCHIP_PIC_SLAVE,
            KVM_IRQCHIP_IOAPIC,
        ] {
            let mut chip = kvm_bindings::kvm_irqchip {
                chip_id,
                ..Default::default()
            };
            self.fd
                .get_irqchip(&mut chip)
                .map_err(Error::kvm("get irqchip"))?;
            irqchips.push(IrqchipState::from_kvm(&chip));
        }
        let pit = self.fd.get_pit2().map_err(Error::kvm("get PIT"))?;
        let clock = self.fd.get_clock().map_err(Error::kvm("get clock"))?;
        Ok(KvmVmState {
            irqchips,
            pit,
            clock,
        })
    }

    /// Restores a saved state into this VM before it starts (its RAM must already hold the
    /// saved guest memory).
    pub fn restore_state(&mut self, state: &VmState) -> Result<()> {
        if state.ram_size != self.ram.size() {
            return Err(Error::StateMismatch(format!(
                "state has {} bytes of RAM, this VM {}",
                state.ram_size,
                self.ram.size()
            )));
        }
        if state.vcpus.len() != self.created.len() {
            return Err(Error::StateMismatch(format!(
                "state has {} vCPUs, this VM {} unstarted ones",
                state.vcpus.len(),
                self.created.len()
            )));
        }
        for chip in &state.kvm.irqchips {
            let k = chip.to_kvm().ok_or_else(|| {
                Error::StateMismatch(format!(
                    "irqchip {} of {} bytes",
                    chip.chip_id,
                    chip.body.len()
                ))
            })?;
            self.fd.set_irqchip(&k).map_err(Error::kvm("set irqchip"))?;
        }
        self.fd
            .set_pit2(&state.kvm.pit)
            .map_err(Error::kvm("set PIT"))?;
        let mut clock = state.kvm.clock;
        clock.flags = 0; // KVM refuses flags it reports but does not accept
        self.fd.set_clock(&clock).map_err(Error::kvm("set clock"))?;
        for (v, s) in self.created.iter().zip(&state.vcpus) {
            v.restore_state(s)?;
        }
        self.serial
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .restore(&state.devices.serial)
            .map_err(|source| Error::Io {
                what: "restoring the serial console".into(),
                source,
            })?;
        Ok(())
    }

    /// Ends the VM with `VmOutcome::Stopped` and parks its vCPUs.
    pub fn stop(&self, reason: &str) -> Result<()> {
        self.lifecycle
            .finish(VmOutcome::Stopped(reason.to_string()));
        self.pause()
    }

    /// Waits for the VM to end (forever if `timeout` is `None`).
    pub fn wait(&self, timeout: Option<Duration>) -> Option<VmOutcome> {
        self.lifecycle.wait(timeout)
    }

    /// Guest RAM.
    pub fn ram(&self) -> &GuestRam {
        &self.ram
    }

    /// The KVM VM.
    pub fn vm_fd(&self) -> &Arc<VmFd> {
        &self.fd
    }

    /// The VM's KVM memory slots.
    pub fn memory_slots(&self) -> &MemorySlots {
        &self.slots
    }

    /// The KVM system handle.
    pub fn kvm(&self) -> &Kvm {
        &self.kvm
    }

    /// The port-IO bus.
    pub fn pio_bus(&self) -> &Arc<Bus> {
        &self.pio
    }

    /// The MMIO bus.
    pub fn mmio_bus(&self) -> &Arc<Bus> {
        &self.mmio
    }

    /// PCI bus 0.
    pub fn pci_bus(&self) -> &Arc<Mutex<PciBus>> {
        &self.pci
    }

    /// Lifecycle (outcome, event timestamps).
    pub fn lifecycle(&self) -> &Arc<Lifecycle> {
        &self.lifecycle
    }

    /// The last console lines.
    pub fn console_tail(&self) -> &ConsoleTail {
        &self.console_tail
    }

    /// The guest's mailbox in the boot parameter block.
    pub fn mailbox(&self) -> Mailbox<'_> {
        Mailbox { ram: &self.ram }
    }
}

/// Host TSC frequency when KVM does not report one (from the host's CPUID leaf 0x15/0x16 is
/// not portable; a short calibration against the monotonic clock is).
fn host_tsc_khz() -> u64 {
    let t0 = std::time::Instant::now();
    // SAFETY: rdtsc has no side effects.
    let c0 = unsafe { core::arch::x86_64::_rdtsc() };
    std::thread::sleep(Duration::from_millis(20));
    // SAFETY: as above.
    let c1 = unsafe { core::arch::x86_64::_rdtsc() };
    let us = t0.elapsed().as_micros().max(1) as u64;
    (c1 - c0) * 1000 / us
}

/// Result of a ledger verification the guest ran on request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VerifyResult {
    /// 0 when the ledger holds (see `guest_abi::params::status`).
    pub status: u32,
    /// Pages checked.
    pub pages: u64,
    /// Writes recorded in the ledger.
    pub writes: u64,
}

/// Access to the mailbox fields of the boot parameter block of a running guest.
pub struct Mailbox<'a> {
    pub(crate) ram: &'a GuestRam,
}

impl Mailbox<'_> {
    fn gpa(off: usize) -> u64 {
        PARAMS_GPA + off as u64
    }

    /// Asks the guest to verify its ledger; returns the request number.
    pub fn request_verify(&self) -> Result<u32> {
        let req = self
            .ram
            .load_u32(Self::gpa(params::OFF_VERIFY_REQ))?
            .wrapping_add(1);
        self.ram.store_u32(Self::gpa(params::OFF_VERIFY_REQ), req)?;
        Ok(req)
    }

    /// The result of verification `req`, once the guest published it.
    pub fn verify_result(&self, req: u32) -> Result<Option<VerifyResult>> {
        if self.ram.load_u32(Self::gpa(params::OFF_VERIFY_DONE))? != req {
            return Ok(None);
        }
        Ok(Some(VerifyResult {
            status: self.ram.load_u32(Self::gpa(params::OFF_VERIFY_STATUS))?,
            pages: self.ram.load_u64(Self::gpa(params::OFF_VERIFY_PAGES))?,
            writes: self.ram.load_u64(Self::gpa(params::OFF_VERIFY_WRITES))?,
        }))
    }

    /// Asks the workload to finish (it verifies, then exits).
    pub fn request_stop(&self) -> Result<()> {
        self.ram.store_u32(Self::gpa(params::OFF_STOP_REQ), 1)
    }

    /// Workload progress counter.
    pub fn progress(&self) -> Result<u64> {
        self.ram.load_u64(Self::gpa(params::OFF_PROGRESS))
    }

    /// (TSC cycles, result) of the `spin` workload.
    pub fn bench(&self) -> Result<(u64, u64)> {
        Ok((
            self.ram.load_u64(Self::gpa(params::OFF_BENCH_CYCLES))?,
            self.ram.load_u64(Self::gpa(params::OFF_BENCH_RESULT))?,
        ))
    }

    /// TSC frequency the guest was told.
    pub fn tsc_khz(&self) -> Result<u64> {
        self.ram
            .load_u64(PARAMS_GPA + std::mem::offset_of!(BootParams, tsc_khz) as u64)
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        self.lifecycle
            .finish(VmOutcome::Stopped("VM dropped".into()));
        // Joining the vCPU threads happens in VcpuHandle::drop.
        self.running.clear();
    }
}

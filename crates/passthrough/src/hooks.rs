//! The hooks the shadow engine needs from a passthrough attachment. vfio-user implements
//! them here; kernel VFIO would implement the same trait (EPT side by memory slots, doorbell
//! pages by memory slots over the mmapped BAR, interrupts by the VFIO eventfds).
use vmm::memslots::MemorySlots;
use vmm_sys_util::eventfd::EventFd;

use crate::Result;

/// How a guest reaches one doorbell page of BAR0.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DoorbellMode {
    /// The device's page is mapped into the guest: writes reach the device without an exit.
    Mapped,
    /// Not mapped: every access exits to the VMM, which forwards it.
    Trapped,
    /// A hypervisor page (host virtual address) is mapped in its place (poll mode).
    Redirected {
        /// Host address of a page-aligned, page-sized mapping.
        host: u64,
    },
}

/// What backs a guest-physical range.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GuestBacking {
    /// The VM's own RAM (undo a remap).
    Ram,
    /// Hypervisor memory at a host virtual address (a ring copy).
    Host(u64),
}

/// What backs a range of the device's DMA view (IOVA == GPA inside guest RAM).
#[derive(Clone, Debug)]
pub enum DeviceBacking {
    /// The VM's own RAM (undo a remap).
    Ram,
    /// Hypervisor memory: a shareable file (memfd) at `offset` (a ring copy the device uses).
    Host {
        /// The file.
        fd: std::sync::Arc<std::os::fd::OwnedFd>,
        /// Offset of the range's first byte in it.
        offset: u64,
    },
}

/// Hooks of a passthrough device for the shadow engine.
pub trait DeviceHooks {
    /// Backs guest-physical `[gpa, gpa + size)` (page aligned, inside one RAM region) with
    /// `backing` by swapping KVM memory slots. The device's DMA view (IOVA == GPA) is unchanged.
    /// Callers pause the vCPUs around it.
    ///
    /// # Safety
    /// With [`GuestBacking::Host`] the host range must stay mapped and writable until the
    /// range is remapped back to [`GuestBacking::Ram`] or the VM is gone.
    unsafe fn remap_guest_range(
        &self,
        slots: &MemorySlots,
        gpa: u64,
        size: u64,
        backing: GuestBacking,
    ) -> Result<()>;

    /// Changes how the doorbell page at BAR0 offset `bar_offset` is reached.
    ///
    /// # Safety
    /// With [`DoorbellMode::Redirected`] the host page must stay mapped until the mode changes
    /// or the VM is gone.
    unsafe fn set_doorbell_mode(
        &self,
        slots: &MemorySlots,
        bar_offset: u64,
        mode: DoorbellMode,
    ) -> Result<()>;

    /// Moves the device's DMA (IOMMU) mapping of `[gpa, gpa + size)` (page aligned, inside one
    /// RAM region) onto `backing`; the guest's view is unchanged. The device must not DMA to
    /// the RAM region holding the range meanwhile (its queues held and drained): the mapping
    /// around the range is re-made too, since a mapping can only be removed whole.
    fn remap_device_range(&self, gpa: u64, size: u64, backing: DeviceBacking) -> Result<()>;

    /// Gives the device DMA access to hypervisor memory (`size` bytes of `fd` from offset 0) at
    /// `iova`, which must lie outside guest RAM.
    fn map_device_memory(
        &self,
        iova: u64,
        size: u64,
        fd: &std::sync::Arc<std::os::fd::OwnedFd>,
    ) -> Result<()>;

    /// Takes away what [`DeviceHooks::map_device_memory`] mapped at `iova`.
    fn unmap_device_memory(&self, iova: u64, size: u64) -> Result<()>;

    /// Takes over MSI-X `vector`: returns the eventfd the device signals for it.
    fn take_interrupt(&self, vector: u16) -> Result<EventFd>;

    /// Gives MSI-X `vector` back to the guest (undoes [`DeviceHooks::take_interrupt`]).
    fn release_interrupt(&self, vector: u16);

    /// Sends the guest the message MSI-X `vector` is programmed with. Returns false when the
    /// guest masked it or has MSI-X off (nothing is sent).
    fn interrupt_guest(&self, vector: u16) -> Result<bool>;
}

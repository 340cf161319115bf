//! What the device is, asked by the hypervisor itself: at attach time, before the guest runs,
//! the controller is enabled with an admin queue in hypervisor memory, Identify Controller and
//! Identify Namespace are read into that memory, and the controller is disabled again. The
//! shadow engine's validator takes its limits (block size, MDTS) from here, never from
//! Identify data in guest RAM, which the guest can rewrite at will.
use std::{collections::BTreeMap, sync::Arc, time::Instant};

use nvme_spec::{
    identify,
    queue::{DriverError, Platform},
    regs::{self, csts},
};
use serde::{Deserialize, Serialize};

use crate::{
    client::{Connection, MappedArea},
    config_log::NamespaceInfo,
    host_client::{admin_controller, DmaMemory},
    Error, Result,
};

/// Most namespaces identified (the validator uses the first).
pub const MAX_PROBED_NAMESPACES: u32 = 16;

/// The device's own answers to Identify.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceIdentity {
    /// MDTS of Identify Controller.
    pub mdts: u8,
    /// Active namespaces (of the first [`MAX_PROBED_NAMESPACES`]) with a sane LBA format.
    pub namespaces: BTreeMap<u32, NamespaceInfo>,
}

/// The first IOVA above guest RAM the hypervisor places its own memory at.
pub fn hypervisor_iova(ram: &vmm::memory::GuestRam) -> u64 {
    let ram_end = ram
        .regions()
        .iter()
        .map(|r| r.gpa + r.size)
        .max()
        .unwrap_or(0);
    ram_end.next_multiple_of(1 << 30).max(1 << 32) + (1 << 30)
}

/// Copies a page of DMA memory the device wrote (volatile: another process writes it).
fn copy_page(host: *const u8) -> Vec<u8> {
    (0..identify::SIZE)
        // SAFETY: `host` is the start of a page of our DMA mapping, alive for the call.
        .map(|i| unsafe { std::ptr::read_volatile(host.add(i)) })
        .collect()
}

/// Asks the device behind `conn` what it is (see the module documentation). The controller
/// ends disabled, as a fresh device is.
pub(crate) fn probe(
    conn: Arc<Connection>,
    doorbells: Arc<Vec<MappedArea>>,
    iova: u64,
) -> Result<DeviceIdentity> {
    let name = conn.name.clone();
    let drv = |source: DriverError| Error::Driver {
        name: name.clone(),
        what: "identifying the device",
        source,
    };
    const SIZE: u64 = 4 * 4096;
    let mut mem = DmaMemory::at(SIZE, iova)?;
    conn.dma_map(0, iova, SIZE, &mem._file)?;
    let result = (|| {
        let mut ctrl = admin_controller(conn.clone(), doorbells, &mut mem, 8).map_err(drv)?;
        let (data, data_bus) = mem
            .alloc(1)
            .ok_or_else(|| drv(DriverError::Timeout("identify memory")))?;
        let mut out = DeviceIdentity::default();
        ctrl.identify_controller(data_bus).map_err(drv)?;
        let page = copy_page(data);
        out.mdts = page[identify::ctrl::MDTS];
        let nn = identify::get_u32(&page, identify::ctrl::NN).min(MAX_PROBED_NAMESPACES);
        for nsid in 1..=nn {
            if ctrl
                .identify(nvme_spec::opcode::cns::NAMESPACE, nsid, data_bus)
                .is_err()
            {
                continue;
            }
            let page = copy_page(data);
            let flbas = (page[identify::ns::FLBAS] & 0xf) as usize;
            let block_size = identify::lba_size(&page, flbas);
            let blocks = identify::get_u64(&page, identify::ns::NSZE);
            if blocks > 0 && block_size.is_power_of_two() && (512..=65536).contains(&block_size) {
                out.namespaces.insert(
                    nsid,
                    NamespaceInfo {
                        block_size: block_size as u32,
                        blocks,
                    },
                );
            }
        }
        // Back to a disabled controller for the guest.
        ctrl.platform.reg_write32(regs::CC, 0);
        let t = Instant::now();
        loop {
            let s = ctrl.platform.reg_read32(regs::CSTS);
            if s == u32::MAX {
                return Err(drv(DriverError::Fatal(s)));
            }
            if s & csts::RDY == 0 {
                break;
            }
            if t.elapsed() > crate::client::REQUEST_TIMEOUT {
                return Err(drv(DriverError::Timeout("CSTS.RDY = 0 after identifying")));
            }
            std::thread::yield_now();
        }
        Ok(out)
    })();
    let unmapped = conn.dma_unmap(iova, SIZE);
    let out = result?;
    unmapped?;
    tracing::info!(
        name = %conn.name,
        mdts = out.mdts,
        namespaces = ?out.namespaces,
        "identified the device through the hypervisor's own admin queue"
    );
    Ok(out)
}

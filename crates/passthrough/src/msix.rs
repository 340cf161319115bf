//! MSI-X of a passthrough device: the VMM watches the guest program the MSI-X table (BAR0) and
//! the enable/mask bits (configuration space), and routes each usable vector's eventfd to the
//! guest with an irqfd on a KVM MSI route. Vectors taken over by a hook are left alone.
//!
//! KVM_SET_GSI_ROUTING replaces the whole table, so the router re-installs KVM's default
//! irqchip routes (GSI 0-23) with its MSI routes; it is the only user of GSI routing in Ferry so
//! far (a VM-wide route table belongs in the VMM core once a second user appears).
use std::{collections::BTreeMap, sync::Arc};

use kvm_bindings::{
    kvm_irq_routing_entry, KvmIrqRouting, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE, KVM_IRQ_ROUTING_IRQCHIP, KVM_IRQ_ROUTING_MSI,
};
use kvm_ioctls::VmFd;
use vmm_sys_util::eventfd::EventFd;

/// First GSI used for MSI routes (after the IOAPIC's 24 pins).
pub const GSI_BASE: u32 = 24;
/// Bytes per MSI-X table entry.
pub const ENTRY_SIZE: u64 = 16;

/// An installed route: (vector, GSI, address, data).
pub type Route = (u16, u32, u64, u32);

/// What the guest programmed into MSI-X: the table and the message-control bits (device state
/// that moves with a migration).
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MsixState {
    /// Table entries: address low, address high, data, vector control.
    pub table: Vec<[u32; 4]>,
    /// MSI-X enable.
    pub enabled: bool,
    /// Function mask.
    pub function_masked: bool,
}

/// Checks an MSI-X state from another host against a device with `vectors` vectors: the
/// table may not be longer than the device's (its entries are written into BAR0).
pub fn check_state(state: &MsixState, vectors: usize) -> Result<(), crate::StateError> {
    if state.table.len() > vectors {
        return Err(crate::StateError::MsixTable {
            entries: state.table.len(),
            count: vectors,
        });
    }
    Ok(())
}

/// Migration destination: checks `state` (from another host) against the device's
/// `vectors`, writes its table into the device's MSI-X table and its enable and mask bits into
/// the message control of the capability at `cap` (which `pci` then presents to the guest),
/// and routes the vectors to the guest as `router` says.
pub(crate) fn restore_device(
    conn: &crate::client::Connection,
    router: &std::sync::Mutex<MsixRouter>,
    pci: &std::sync::Mutex<crate::pci::PassthroughPci>,
    cap: Option<usize>,
    vectors: usize,
    state: &MsixState,
) -> crate::Result<()> {
    check_state(state, vectors).map_err(|source| crate::Error::InvalidState {
        name: conn.name.clone(),
        source,
    })?;
    let mut router = router.lock().unwrap_or_else(|e| e.into_inner());
    if let (Some(table), Some(cap)) = (router.table_offset, cap) {
        // Whole entries, up to a page per message: one vfio-user round trip for a table of up
        // to 256 vectors instead of one per vector (this runs in the downtime).
        let per_write = (4096 / ENTRY_SIZE) as usize;
        for (i, chunk) in state.table.chunks(per_write).enumerate() {
            let bytes: Vec<u8> = chunk
                .iter()
                .flatten()
                .flat_map(|w| w.to_le_bytes())
                .collect();
            let first = (i * per_write) as u64;
            conn.region_write(0, table + first * ENTRY_SIZE, &bytes)?;
        }
        let mut b = [0u8; 2];
        conn.region_read(crate::client::CONFIG_REGION, cap as u64 + 2, &mut b)?;
        let control = u16::from_le_bytes(b) & !0xc000
            | if state.enabled { 0x8000 } else { 0 }
            | if state.function_masked { 0x4000 } else { 0 };
        conn.region_write(
            crate::client::CONFIG_REGION,
            cap as u64 + 2,
            &control.to_le_bytes(),
        )?;
        pci.lock()
            .unwrap_or_else(|e| e.into_inner())
            .set_msix_control(control);
    }
    router.restore(state);
    Ok(())
}

/// The MSI-X state the guest programmed, and the routes installed from it.
pub struct MsixRouter {
    vm: Arc<VmFd>,
    irqs: Arc<Vec<EventFd>>,
    table: Vec<[u32; 4]>,
    enabled: bool,
    function_masked: bool,
    taken: Vec<bool>,
    routed: BTreeMap<u16, Route>,
    /// BAR0 offset of the table (None: the device has no MSI-X table in BAR0).
    pub table_offset: Option<u64>,
}

fn irqchip(gsi: u32, chip: u32, pin: u32) -> kvm_irq_routing_entry {
    let mut e = kvm_irq_routing_entry {
        gsi,
        type_: KVM_IRQ_ROUTING_IRQCHIP,
        ..Default::default()
    };
    e.u.irqchip.irqchip = chip;
    e.u.irqchip.pin = pin;
    e
}

/// KVM's default routing after KVM_CREATE_IRQCHIP (arch/x86/kvm/irq_comm.c).
fn default_routes() -> Vec<kvm_irq_routing_entry> {
    let mut v = Vec::new();
    for gsi in 0..24 {
        v.push(irqchip(gsi, KVM_IRQCHIP_IOAPIC, gsi));
        if gsi < 16 {
            let chip = if gsi < 8 {
                KVM_IRQCHIP_PIC_MASTER
            } else {
                KVM_IRQCHIP_PIC_SLAVE
            };
            v.push(irqchip(gsi, chip, gsi % 8));
        }
    }
    v
}

impl MsixRouter {
    /// A router for `irqs` (one eventfd per vector) with the table at `table_offset` of BAR0.
    pub fn new(vm: Arc<VmFd>, irqs: Arc<Vec<EventFd>>, table_offset: Option<u64>) -> Self {
        let n = irqs.len();
        MsixRouter {
            vm,
            irqs,
            // Vector control bit 0 (masked) is set after reset.
            table: vec![[0, 0, 0, 1]; n],
            enabled: false,
            function_masked: false,
            taken: vec![false; n],
            routed: BTreeMap::new(),
            table_offset,
        }
    }

    /// True when `offset` of BAR0 falls in the table.
    pub fn in_table(&self, offset: u64) -> bool {
        self.table_offset
            .is_some_and(|t| offset >= t && offset < t + self.table.len() as u64 * ENTRY_SIZE)
    }

    /// A guest write of `data` at BAR0 `offset` inside the table.
    pub fn table_write(&mut self, offset: u64, data: &[u8]) {
        let Some(t) = self.table_offset else { return };
        if !data.len().is_multiple_of(4) || !offset.is_multiple_of(4) {
            return;
        }
        for (i, chunk) in data.chunks(4).enumerate() {
            let rel = offset - t + i as u64 * 4;
            let (v, w) = (
                (rel / ENTRY_SIZE) as usize,
                ((rel % ENTRY_SIZE) / 4) as usize,
            );
            if let Some(e) = self.table.get_mut(v) {
                e[w] = u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
            }
        }
        self.update();
    }

    /// The guest changed the MSI-X message control bits.
    pub fn control_write(&mut self, enabled: bool, function_masked: bool) {
        self.enabled = enabled;
        self.function_masked = function_masked;
        self.update();
    }

    /// A hook took `vector` over: KVM no longer consumes its eventfd.
    pub fn take(&mut self, vector: u16) {
        if let Some(t) = self.taken.get_mut(vector as usize) {
            *t = true;
        }
        self.update();
    }

    /// A hook gives `vector` back: KVM consumes its eventfd again (a signal pending on it is
    /// delivered when the irqfd is installed).
    pub fn release(&mut self, vector: u16) {
        if let Some(t) = self.taken.get_mut(vector as usize) {
            *t = false;
        }
        self.update();
    }

    /// The message `vector` sends now: (address, data), or None while MSI-X is off, the
    /// function or the vector is masked, or the entry is not programmed.
    pub fn message(&self, vector: u16) -> Option<(u64, u32)> {
        if !self.enabled || self.function_masked {
            return None;
        }
        let e = self.table.get(vector as usize)?;
        let addr = e[0] as u64 | (e[1] as u64) << 32;
        (e[3] & 1 == 0 && addr != 0).then_some((addr, e[2]))
    }

    /// What the guest programmed.
    pub fn state(&self) -> MsixState {
        MsixState {
            table: self.table.clone(),
            enabled: self.enabled,
            function_masked: self.function_masked,
        }
    }

    /// Takes over `state` (a migration destination); entries beyond this table are ignored.
    pub fn restore(&mut self, state: &MsixState) {
        for (dst, src) in self.table.iter_mut().zip(&state.table) {
            *dst = *src;
        }
        self.enabled = state.enabled;
        self.function_masked = state.function_masked;
        self.update();
    }

    /// The routes installed.
    pub fn routes(&self) -> Vec<Route> {
        self.routed.values().copied().collect()
    }

    fn wanted(&self) -> BTreeMap<u16, Route> {
        let mut m = BTreeMap::new();
        if !self.enabled || self.function_masked {
            return m;
        }
        for (v, e) in self.table.iter().enumerate() {
            let addr = e[0] as u64 | (e[1] as u64) << 32;
            if e[3] & 1 == 0 && addr != 0 && !self.taken[v] {
                m.insert(v as u16, (v as u16, GSI_BASE + v as u32, addr, e[2]));
            }
        }
        m
    }

    fn update(&mut self) {
        let wanted = self.wanted();
        if wanted == self.routed {
            return;
        }
        for (v, r) in &self.routed {
            if wanted.get(v) != Some(r) {
                if let Err(e) = self.vm.unregister_irqfd(&self.irqs[*v as usize], r.1) {
                    tracing::warn!(vector = v, error = %e, "removing an MSI-X irqfd");
                }
            }
        }
        let mut entries = default_routes();
        for &(_, gsi, addr, data) in wanted.values() {
            let mut e = kvm_irq_routing_entry {
                gsi,
                type_: KVM_IRQ_ROUTING_MSI,
                ..Default::default()
            };
            e.u.msi.address_lo = addr as u32;
            e.u.msi.address_hi = (addr >> 32) as u32;
            e.u.msi.data = data;
            entries.push(e);
        }
        let routing = match KvmIrqRouting::from_entries(&entries) {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = ?e, "building the GSI routing table");
                return;
            }
        };
        if let Err(e) = self.vm.set_gsi_routing(&routing) {
            tracing::warn!(error = %e, "KVM_SET_GSI_ROUTING failed; MSI-X vectors not routed");
            return;
        }
        let mut installed = BTreeMap::new();
        for (v, r) in wanted {
            if self.routed.get(&v) == Some(&r) {
                installed.insert(v, r);
                continue;
            }
            match self.vm.register_irqfd(&self.irqs[v as usize], r.1) {
                Ok(()) => {
                    installed.insert(v, r);
                }
                Err(e) => tracing::warn!(vector = v, error = %e, "registering an MSI-X irqfd"),
            }
        }
        tracing::debug!(routes = installed.len(), "MSI-X routes updated");
        self.routed = installed;
    }
}

/// Sends the guest MSI-X message `msg` of `vector` (device `name`) through KVM: false when
/// there is none (MSI-X off, the vector or the function masked).
pub fn signal(
    vm_fd: &VmFd,
    name: &str,
    vector: u16,
    msg: Option<(u64, u32)>,
) -> crate::Result<bool> {
    let Some((address, data)) = msg else {
        return Ok(false);
    };
    let msi = kvm_bindings::kvm_msi {
        address_lo: address as u32,
        address_hi: (address >> 32) as u32,
        data,
        ..Default::default()
    };
    vm_fd
        .signal_msi(msi)
        .map(|_| true)
        .map_err(|source| crate::Error::Hook {
            name: name.into(),
            source: crate::HookError::SignalMsi {
                vector,
                address,
                data,
                source,
            },
        })
}

/// Takes MSI-X `vector` of device `name` away from KVM's routes in `router`: returns a copy of
/// the eventfd the device signals for it (one of `irqs`).
pub fn take(
    router: &std::sync::Mutex<MsixRouter>,
    irqs: &[EventFd],
    name: &str,
    vector: u16,
) -> crate::Result<EventFd> {
    let fd = irqs
        .get(usize::from(vector))
        .ok_or_else(|| crate::Error::Hook {
            name: name.into(),
            source: crate::HookError::NoVector {
                vector,
                count: irqs.len(),
            },
        })?;
    let fd = fd.try_clone().map_err(|source| crate::Error::Os {
        what: format!("duplicating the eventfd of vector {vector}"),
        source,
    })?;
    router
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .take(vector);
    Ok(fd)
}

//! BAR0 accesses that exit: the register page, trapped doorbell pages (always the admin one)
//! and the MSI-X table. Admin doorbells go through the mediation before the device sees them.
use std::sync::{Arc, Mutex};

use nvme_spec::regs;
use vmm::{bus::BusDevice, lifecycle::Lifecycle, memory::GuestRam, VmOutcome};

use crate::{
    client::Connection, config_log::AdminMediator, dma_layout::DmaLayout, msix::MsixRouter,
};

/// Takes an I/O queue's doorbell write (queue id, CQ head?, value) that exited; returns true
/// when it consumed it (the write then does not reach the device).
pub type DoorbellHook = Arc<dyn Fn(u16, bool, u32) -> bool + Send + Sync>;

/// The doorbell hook slot shared by the attachment and the trap.
pub type HookSlot = Arc<Mutex<Option<DoorbellHook>>>;

/// Where trapped doorbell writes may be routed instead of the device.
#[derive(Clone, Default)]
pub struct Routes {
    /// The device's DMA mappings (the guard follows a moved admin SQ by re-making them).
    pub dma: Arc<Mutex<DmaLayout>>,
    /// The shadow engine's trap-mode hook.
    pub hook: HookSlot,
    /// The admin SQ copy the device reads while shadowed.
    pub guard: crate::admin_guard::GuardSlot,
}

/// The MMIO handler of BAR0.
pub struct Bar0Trap {
    conn: Arc<Connection>,
    mediator: Arc<Mutex<AdminMediator>>,
    ram: GuestRam,
    dstrd: u8,
    lifecycle: Arc<Lifecycle>,
    msix: Arc<Mutex<MsixRouter>>,
    dma: Arc<Mutex<DmaLayout>>,
    hook: HookSlot,
    guard: crate::admin_guard::GuardSlot,
}

impl Bar0Trap {
    /// A handler forwarding to `conn`.
    pub fn new(
        conn: Arc<Connection>,
        mediator: Arc<Mutex<AdminMediator>>,
        ram: GuestRam,
        dstrd: u8,
        lifecycle: Arc<Lifecycle>,
        msix: Arc<Mutex<MsixRouter>>,
        routes: Routes,
    ) -> Self {
        Bar0Trap {
            conn,
            mediator,
            ram,
            dstrd,
            lifecycle,
            msix,
            dma: routes.dma,
            hook: routes.hook,
            guard: routes.guard,
        }
    }

    fn lost(&self, e: &crate::Error) {
        self.lifecycle.finish(VmOutcome::Failed(disconnect_message(
            &self.conn,
            &vmm::ErrorChain(e).to_string(),
        )));
    }
}

impl Bar0Trap {
    /// The guest enables its controller while its admin SQ is guarded: the guard follows the
    /// ring to where the guest put it now. False when it cannot (the enable must not reach
    /// the device: it would fetch unchecked commands).
    fn guard_follows(&self, (asq, aqa): (u64, u32)) -> bool {
        let mut g = self.guard.lock().unwrap_or_else(|e| e.into_inner());
        let Some(g) = g.as_mut() else {
            return true;
        };
        let remap = |gpa, size, backing| {
            crate::attach::remap_dma(&self.conn, &self.ram, &self.dma, gpa, size, backing)
        };
        let entries = regs::aqa::sq_entries(aqa);
        let in_ram = entries >= 2 && self.ram.contains(asq, entries as u64 * 64);
        let followed = if in_ram && asq.is_multiple_of(4096) {
            g.follow(&self.ram, asq, entries, &remap)
        } else {
            Err(crate::Error::Unsupported {
                name: self.conn.name.clone(),
                reason: format!("admin SQ of {entries} entries at {asq:#x} outside guest RAM"),
            })
        };
        match followed {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(
                    "the guest's controller enable is not forwarded: its admin SQ cannot be \
                     guarded: {}",
                    vmm::ErrorChain(&e)
                );
                false
            }
        }
    }
}

/// The message a VM ends with when its passthrough device goes away.
pub fn disconnect_message(conn: &Connection, detail: &str) -> String {
    format!(
        "passthrough device {} ({}) disconnected: {}",
        conn.name,
        conn.socket,
        conn.lost_reason().unwrap_or_else(|| detail.to_string())
    )
}

impl BusDevice for Bar0Trap {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if let Err(e) = self.conn.region_read(0, offset, data) {
            data.fill(0xff);
            self.lost(&e);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        // The admin SQ guard, held from an admin SQ tail write's copy to its forwarding.
        let mut held_guard = None;
        {
            let mut m = self.msix.lock().unwrap_or_else(|e| e.into_inner());
            if m.in_table(offset) {
                m.table_write(offset, data);
            }
        }
        if offset < regs::DOORBELL_BASE {
            let (enabled, queue) = {
                let mut m = self.mediator.lock().unwrap_or_else(|e| e.into_inner());
                let before = m.log.enables;
                m.register_write(offset, data);
                (m.log.enables != before, (m.log.asq, m.log.aqa))
            };
            if enabled && !self.guard_follows(queue) {
                return;
            }
        } else if data.len() == 4 {
            let v = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
            match regs::decode_doorbell(offset, self.dstrd) {
                Some((0, false)) => {
                    let ram = &self.ram;
                    let from = self
                        .mediator
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .positions()
                        .0;
                    let mut g = self.guard.lock().unwrap_or_else(|e| e.into_inner());
                    if let Some(g) = g.as_mut() {
                        // Shadowed: the device reads the checked copy of the new commands.
                        // The guard stays locked until the doorbell reached the device, so
                        // it cannot be turned off in between (the device would read RAM).
                        g.submitted(ram, from, v);
                    }
                    held_guard = Some(g);
                    // The mediation reads the ring in RAM after the guard: with the vCPUs'
                    // view swapped onto a copy, RAM holds what the device fetches only once
                    // the guard wrote it.
                    self.mediator
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .sq_tail_write(v, |gpa, buf| {
                            ram.contains(gpa, buf.len() as u64) && ram.read(gpa, buf).is_ok()
                        });
                }
                Some((0, true)) => {
                    let ram = &self.ram;
                    self.mediator
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .cq_head_write(v, |gpa, buf| {
                            ram.contains(gpa, buf.len() as u64) && ram.read(gpa, buf).is_ok()
                        });
                }
                Some((qid, is_cq)) => {
                    let hook = self.hook.lock().unwrap_or_else(|e| e.into_inner()).clone();
                    if hook.is_some_and(|h| h(qid, is_cq, v)) {
                        return;
                    }
                }
                None => {}
            }
        }
        if let Err(e) = self.conn.region_write(0, offset, data) {
            self.lost(&e);
        }
        drop(held_guard);
    }
}

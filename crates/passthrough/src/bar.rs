//! BAR0 accesses that exit: the register page, trapped doorbell pages (always the admin one)
//! and the MSI-X table. Admin doorbells go through the mediation before the device sees them.
use std::sync::{Arc, Mutex};

use nvme_spec::regs;
use vmm::{bus::BusDevice, lifecycle::Lifecycle, memory::GuestRam, VmOutcome};

use crate::{client::Connection, config_log::AdminMediator, msix::MsixRouter, replay::AdminProxy};

/// Takes an I/O queue's doorbell write (queue id, CQ head?, value) that exited; returns true
/// when it consumed it (the write then does not reach the device).
pub type DoorbellHook = Arc<dyn Fn(u16, bool, u32) -> bool + Send + Sync>;

/// The doorbell hook slot shared by the attachment and the trap.
pub type HookSlot = Arc<Mutex<Option<DoorbellHook>>>;

/// The admin proxy slot shared by the attachment and the trap.
pub type ProxySlot = Arc<Mutex<Option<AdminProxy>>>;

/// Where trapped doorbell writes may be routed instead of the device.
#[derive(Clone, Default)]
pub struct Routes {
    /// The guest admin queue proxy (migration destination).
    pub proxy: ProxySlot,
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
    proxy: ProxySlot,
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
            proxy: routes.proxy,
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
    /// The guest disables the controller while the proxy serves its admin queue: the proxy
    /// stops, the controller is disabled, the hypervisor's admin memory is taken away from
    /// the device and the device's admin queue registers get the guest's values, so the
    /// guest's next enable runs on its own queue (as on a device it owns).
    fn retire_proxy(&mut self, p: &AdminProxy, (cc, aqa, asq, acq): (u32, u32, u64, u64)) {
        p.retire();
        *self.proxy.lock().unwrap_or_else(|e| e.into_inner()) = None;
        let writes = [
            (regs::CC, cc),
            (regs::AQA, aqa),
            (regs::ASQ, asq as u32),
            (regs::ASQ + 4, (asq >> 32) as u32),
            (regs::ACQ, acq as u32),
            (regs::ACQ + 4, (acq >> 32) as u32),
        ];
        for (off, v) in writes {
            if let Err(e) = self.conn.region_write(0, off, &v.to_le_bytes()) {
                self.lost(&e);
                return;
            }
            if off == regs::CC {
                // Disabled: the device no longer uses the hypervisor's queue.
                if let Err(e) = p.unmap() {
                    tracing::warn!(
                        "unmapping the admin proxy's memory: {}",
                        vmm::ErrorChain(&e)
                    );
                }
            }
        }
        tracing::info!(stats = ?p.stats(), "the guest reset the controller: admin proxy retired");
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
            let guest_queue = {
                let mut m = self.mediator.lock().unwrap_or_else(|e| e.into_inner());
                m.register_write(offset, data);
                (m.log.cc, m.log.aqa, m.log.asq, m.log.acq)
            };
            let proxy = self.proxy.lock().unwrap_or_else(|e| e.into_inner()).clone();
            if let Some(p) = proxy {
                if (regs::AQA..regs::ACQ + 8).contains(&offset) {
                    // The device's admin queue registers hold the hypervisor's queue while the
                    // proxy serves the guest's: they take the guest's values at its reset.
                    return;
                }
                let touches_cc = offset < regs::CC + 4 && offset + data.len() as u64 > regs::CC;
                if touches_cc && guest_queue.0 & nvme_spec::regs::cc::EN == 0 {
                    self.retire_proxy(&p, guest_queue);
                    return;
                }
            }
        } else if data.len() == 4 {
            let v = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
            match regs::decode_doorbell(offset, self.dstrd) {
                Some((0, false)) => {
                    let ram = &self.ram;
                    let from = {
                        let mut m = self.mediator.lock().unwrap_or_else(|e| e.into_inner());
                        let from = m.positions().0;
                        m.sq_tail_write(v, |gpa, buf| {
                            ram.contains(gpa, buf.len() as u64) && ram.read(gpa, buf).is_ok()
                        });
                        from
                    };
                    let mut g = self.guard.lock().unwrap_or_else(|e| e.into_inner());
                    if let Some(g) = g.as_mut() {
                        // Shadowed: the device reads the checked copy of the new commands.
                        // The guard stays locked until the doorbell reached the device, so
                        // it cannot be turned off in between (the device would read RAM).
                        g.submitted(ram, from, v);
                    }
                    held_guard = Some(g);
                    let proxy = self.proxy.lock().unwrap_or_else(|e| e.into_inner()).clone();
                    if let Some(p) = proxy {
                        // The device's admin queue is the hypervisor's: serve the guest's.
                        p.on_sq_tail(v);
                        return;
                    }
                }
                Some((0, true)) => {
                    let ram = &self.ram;
                    self.mediator
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .cq_head_write(v, |gpa, buf| {
                            ram.contains(gpa, buf.len() as u64) && ram.read(gpa, buf).is_ok()
                        });
                    let proxy = self.proxy.lock().unwrap_or_else(|e| e.into_inner()).clone();
                    if let Some(p) = proxy {
                        p.on_cq_head(v);
                        return; // the proxy consumes the device's completions itself
                    }
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

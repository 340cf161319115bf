//! The QP1 multiplexer: one physical QP1 shared by many VMs.
//!
//! - **Registrations** ([`Multiplexer::attach_vm`], [`Multiplexer::register_gid`],
//!   [`Multiplexer::unregister_gid`], [`Multiplexer::detach_vm`]): (VM, GID) pairs; GIDs are
//!   stored canonical (`::a.b.c.d` → `::ffff:a.b.c.d`) and compared on all 128 bits. A GID
//!   owned by another VM is refused with an error; detaching a VM unregisters everything it
//!   had in one call.
//! - **Inbound** ([`Multiplexer::route`], also the port's [`GsiHandler`]): the routing key is
//!   the packet's destination GID, looked up in one hash map (`RwLock<HashMap<Gid, Arc<VmSlot>>>`,
//!   read-locked): the cost does not depend on the number of VMs or GIDs. No owner → counted
//!   drop (a miss is never a hit). Not a whole, well-formed MAD of an allowed class → counted
//!   drop. Otherwise the MAD goes to the owner's [`Qp1Sink`] with the GRH area; when the VM
//!   has no receive buffer ([`Backpressure`]) it waits in a bounded per-VM queue
//!   ([`MuxConfig::queue_depth`]); beyond that it is dropped and counted. The port's receive
//!   thread is never blocked by a VM.
//! - **Communication-ID cross-check** ([`comm::CommTable`], one per VM; entries live with the
//!   connection and a time-wait after it, never expire for idleness): a reply-type MAD
//!   (REP, RTU, REJ, MRA, DREQ, DREP, LAP, APR, SIDR_REP) whose receiver ID the owner does not
//!   know is *still delivered to the DGID owner* — the owner's CM answers it as a real port's
//!   would (e.g. a DREP for an unknown DREQ) — and counted as `unknown_comm_id`. What never
//!   happens is delivery to a VM that does not own the DGID. The source GID is the datagram's
//!   IP source address (never a field of the packet): a REQ whose primary local GID is
//!   another address, and a reply naming a connection (or SIDR request) of the VM that was
//!   made with another peer, are dropped and counted (`spoofed_source`).
//! - **Outbound** ([`Multiplexer::send_from_vm`]): the MAD must be 256 bytes, of an allowed
//!   class, a well-formed CM message, from a source GID registered to this VM (and for a REQ,
//!   its primary local GID must be that GID); otherwise the send is refused with an error and
//!   counted (`refused_spoofed`, `refused_class`, `refused_malformed`).
pub mod addresses;
pub mod comm;

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use parking_lot::{Mutex, RwLock};
use rdma_wire::mad::{class, MadHeader, BASE_VERSION};
use rdma_wire::{CmMessage, Gid, Mad, MAD_SIZE};
use serde::{Deserialize, Serialize};

use crate::addr::{grh_area, GRH_LEN};
use crate::counters::{bump, counters};
use crate::port::{GsiHandler, GsiPacket, Qp1Tx};
use crate::RdmaError;

pub use comm::{CommEntry, CommState, CommTable};

/// A VM's identifier.
pub type VmId = u32;

/// The VM cannot take a MAD now (no receive buffer posted on its virtual QP1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backpressure;

/// The VM side of the multiplexer: its virtual QP1's receive queue.
pub trait Qp1Sink: Send + Sync {
    /// Delivers one MAD as the VM would receive it from its own port: the 40-byte GRH area
    /// (completion flag "GRH present") followed by the 256-byte MAD. Must not block and must
    /// not call back into [`Multiplexer::poll_pending`].
    fn deliver(&self, grh: &[u8; GRH_LEN], mad: &Mad) -> Result<(), Backpressure>;
}

/// Multiplexer settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MuxConfig {
    /// MADs kept per VM while it has no receive buffer.
    pub queue_depth: usize,
    /// Management classes VMs may send and receive (CM only by default).
    pub allowed_classes: Vec<u8>,
    /// Connections (and SIDR requests) tracked per VM.
    pub max_connections_per_vm: usize,
    /// How long a disconnected connection's IDs stay known (duplicate DREQ/DREP still match).
    pub timewait: std::time::Duration,
}

impl Default for MuxConfig {
    fn default() -> MuxConfig {
        MuxConfig {
            queue_depth: 64,
            allowed_classes: vec![class::CM],
            max_connections_per_vm: 4096,
            timewait: std::time::Duration::from_secs(4),
        }
    }
}

counters! {
    /// Multiplexer-wide counters.
    MuxCounters => MuxStats {
        /// QP1 packets seen.
        inbound,
        /// Delivered to the owner at once.
        delivered,
        /// Put in an owner's queue (no receive buffer).
        queued,
        /// Dropped: no VM owns the destination GID.
        no_owner,
        /// Dropped: the owner's queue was full.
        queue_full,
        /// Dropped: payload not a whole 256-byte MAD.
        truncated,
        /// Dropped: not a well-formed CM MAD.
        malformed,
        /// Dropped: management class not allowed.
        class_not_allowed,
        /// Delivered, but naming a communication ID the owner does not have.
        unknown_comm_id,
        /// Dropped: IP source not the REQ's primary (or alternate) local GID, a LAP's
        /// alternate local GID or the rdma_cm source address, or not the peer of the
        /// connection or SIDR request the MAD answers.
        spoofed_source,
        /// Dropped: a REQ whose primary or alternate remote GID, a LAP whose alternate remote
        /// GID, or an rdma_cm header whose destination is not the address it was sent to.
        misaddressed,
        /// Outbound MADs sent.
        sent,
        /// Outbound refused: source GID not the VM's, or an address in the MAD (REQ primary or
        /// alternate path, LAP, rdma_cm header) not the datagram's source or destination.
        refused_spoofed,
        /// Outbound refused: class not allowed.
        refused_class,
        /// Outbound refused: malformed MAD.
        refused_malformed,
        /// Outbound refused: the VM's connection table is full.
        refused_table_full,
        /// Outbound sends the port failed.
        send_errors,
        /// Registrations refused (GID owned by another VM, zero GID, unknown VM, GID outside
        /// the VM's allowed set).
        registrations_refused,
        /// Of those: the GID is not in the set the host allows the VM.
        registrations_not_allowed,
    }
}

counters! {
    /// Per-VM counters.
    VmCounters => VmCounterStats {
        /// MADs handed to the VM (directly or from its queue).
        delivered,
        /// MADs queued.
        queued,
        /// MADs dropped on a full queue.
        queue_full,
        /// Delivered MADs naming an unknown communication ID.
        unknown_comm_id,
        /// Inbound MADs dropped as spoofed (IP source not the claimed peer).
        spoofed_source,
        /// Inbound REQs dropped: primary remote GID not this VM's address they came to.
        misaddressed,
        /// MADs sent.
        sent,
        /// Sends refused.
        refused,
    }
}

/// One VM's report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmReport {
    /// VM.
    pub vm: VmId,
    /// Its GIDs.
    pub gids: Vec<String>,
    /// Counters.
    pub counters: VmCounterStats,
    /// MADs waiting in its queue.
    pub pending: usize,
    /// Connections tracked.
    pub connections: usize,
}

/// Everything the multiplexer holds about one VM.
pub struct VmSlot {
    id: VmId,
    sink: Arc<dyn Qp1Sink>,
    pending: Mutex<VecDeque<([u8; GRH_LEN], Box<Mad>)>>,
    comm: Mutex<CommTable>,
    gids: Mutex<Vec<Gid>>,
    /// The GIDs the host allows this VM to own (`None`: any the port can claim).
    allowed: Mutex<Option<Vec<Gid>>>,
    counters: VmCounters,
}

impl VmSlot {
    /// The VM.
    pub fn id(&self) -> VmId {
        self.id
    }
}

/// The multiplexer. Share it as `Arc<Multiplexer>`; install it as the port's GSI handler.
pub struct Multiplexer {
    cfg: MuxConfig,
    tx: Arc<dyn Qp1Tx>,
    owners: RwLock<HashMap<Gid, Arc<VmSlot>>>,
    vms: Mutex<HashMap<VmId, Arc<VmSlot>>>,
    counters: MuxCounters,
}

/// What happened to one inbound MAD.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouteOutcome {
    /// Handed to the VM.
    Delivered(VmId),
    /// Queued for the VM.
    Queued(VmId),
    /// Dropped (see the counters).
    Dropped(DropReason),
}

/// Why an inbound MAD was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    /// No VM owns the DGID.
    NoOwner,
    /// The owner's queue is full.
    QueueFull,
    /// Not 256 bytes.
    Truncated,
    /// Not a well-formed MAD of its class.
    Malformed,
    /// Class not allowed.
    ClassNotAllowed,
    /// The IP source is not the GID the MAD claims (a REQ's primary local GID) or not the
    /// peer of the connection (or SIDR request) it answers.
    SpoofedSource,
    /// A REQ naming as its primary remote GID another address than the one it came to.
    Misaddressed,
}

impl Multiplexer {
    /// A multiplexer sending through `tx` (the physical port's QP1).
    pub fn new(cfg: MuxConfig, tx: Arc<dyn Qp1Tx>) -> Arc<Multiplexer> {
        Arc::new(Multiplexer {
            cfg,
            tx,
            owners: RwLock::new(HashMap::new()),
            vms: Mutex::new(HashMap::new()),
            counters: MuxCounters::default(),
        })
    }

    /// Attaches a VM's virtual QP1 (its receive side is `sink`).
    pub fn attach_vm(&self, vm: VmId, sink: Arc<dyn Qp1Sink>) -> Result<(), RdmaError> {
        let mut vms = self.vms.lock();
        if vms.contains_key(&vm) {
            return Err(RdmaError::VmExists(vm));
        }
        vms.insert(
            vm,
            Arc::new(VmSlot {
                id: vm,
                sink,
                pending: Mutex::new(VecDeque::new()),
                comm: Mutex::new(CommTable::new(
                    self.cfg.max_connections_per_vm,
                    self.cfg.timewait,
                )),
                gids: Mutex::new(Vec::new()),
                allowed: Mutex::new(None),
                counters: VmCounters::default(),
            }),
        );
        Ok(())
    }

    /// Restricts the GIDs `vm` may register to `gids` (the host's configuration for the VM:
    /// a guest names GIDs, the host decides which it may own). Without this call a VM may
    /// register any GID the port can claim.
    pub fn set_allowed_gids(&self, vm: VmId, gids: &[Gid]) -> Result<(), RdmaError> {
        let slot = self.slot(vm).ok_or(RdmaError::UnknownVm(vm))?;
        *slot.allowed.lock() = Some(gids.iter().map(|g| g.canonical()).collect());
        Ok(())
    }

    /// Registers `gid` for `vm` (the virtual device's CREATE_BIND). Refused when another VM
    /// owns it or it is outside the VM's allowed set ([`Multiplexer::set_allowed_gids`]);
    /// registering a GID the VM already owns is accepted.
    pub fn register_gid(&self, vm: VmId, gid: Gid) -> Result<(), RdmaError> {
        let r = self.try_register(vm, gid);
        if let Err(e) = &r {
            if matches!(e, RdmaError::GidNotAllowed { .. }) {
                bump(&self.counters.registrations_not_allowed);
            }
            bump(&self.counters.registrations_refused);
            tracing::warn!(vm, %gid, error = e as &dyn std::error::Error, "registration refused");
        }
        r
    }

    fn try_register(&self, vm: VmId, gid: Gid) -> Result<(), RdmaError> {
        let gid = gid.canonical();
        if gid.is_zero() {
            return Err(RdmaError::InvalidGid(gid));
        }
        let slot = self
            .vms
            .lock()
            .get(&vm)
            .cloned()
            .ok_or(RdmaError::UnknownVm(vm))?;
        if slot
            .allowed
            .lock()
            .as_ref()
            .is_some_and(|a| !a.contains(&gid))
        {
            return Err(RdmaError::GidNotAllowed { gid, vm });
        }
        let mut owners = self.owners.write();
        if let Some(o) = owners.get(&gid) {
            return if o.id == vm {
                Ok(())
            } else {
                Err(RdmaError::GidOwned { gid, owner: o.id })
            };
        }
        // The port must be able to receive for the GID and send from it: the address is the
        // host's (binding fails otherwise).
        self.tx.claim_gid(gid)?;
        owners.insert(gid, slot.clone());
        slot.gids.lock().push(gid);
        Ok(())
    }

    /// Unregisters one GID of `vm` (DESTROY_BIND).
    pub fn unregister_gid(&self, vm: VmId, gid: Gid) -> Result<(), RdmaError> {
        let gid = gid.canonical();
        let mut owners = self.owners.write();
        match owners.get(&gid) {
            Some(o) if o.id == vm => {
                let slot = owners.remove(&gid);
                if let Some(s) = slot {
                    s.gids.lock().retain(|g| *g != gid);
                }
                drop(owners);
                self.tx.release_gid(gid);
                Ok(())
            }
            _ => Err(RdmaError::NotOwner { gid, vm }),
        }
    }

    /// Detaches a VM: unregisters all its GIDs, forgets its connections and queue (VM
    /// shutdown or migration away). Returns how many GIDs were unregistered.
    pub fn detach_vm(&self, vm: VmId) -> Result<usize, RdmaError> {
        let slot = self
            .vms
            .lock()
            .remove(&vm)
            .ok_or(RdmaError::UnknownVm(vm))?;
        let gids = std::mem::take(&mut *slot.gids.lock());
        {
            let mut owners = self.owners.write();
            for g in &gids {
                owners.remove(g);
            }
        }
        for g in &gids {
            self.tx.release_gid(*g);
        }
        slot.pending.lock().clear();
        Ok(gids.len())
    }

    /// The owner of a GID.
    pub fn owner_of(&self, gid: Gid) -> Option<VmId> {
        self.owners.read().get(&gid.canonical()).map(|s| s.id)
    }

    /// Number of registered GIDs.
    pub fn gid_count(&self) -> usize {
        self.owners.read().len()
    }

    fn slot(&self, vm: VmId) -> Option<Arc<VmSlot>> {
        self.vms.lock().get(&vm).cloned()
    }

    /// The connections the multiplexer tracks for `vm`.
    pub fn connections(&self, vm: VmId) -> Vec<CommEntry> {
        self.slot(vm)
            .map_or_else(Vec::new, |s| s.comm.lock().entries())
    }

    /// Whether `vm`'s table holds anything (connections, pending REQs, SIDR requests).
    pub fn has_comm_state(&self, vm: VmId) -> bool {
        self.slot(vm).is_some_and(|s| {
            let mut t = s.comm.lock();
            t.expire(std::time::Instant::now());
            !t.is_empty()
        })
    }

    /// Connections of `vm` not in time-wait.
    pub fn live_connections(&self, vm: VmId) -> usize {
        self.slot(vm).map_or(0, |s| s.comm.lock().live())
    }

    /// Routes one inbound QP1 payload by its destination GID.
    pub fn route(&self, sgid: Gid, dgid: Gid, grh: &[u8; GRH_LEN], payload: &[u8]) -> RouteOutcome {
        let c = &self.counters;
        bump(&c.inbound);
        let slot = self.owners.read().get(&dgid.canonical()).cloned();
        let Some(slot) = slot else {
            bump(&c.no_owner);
            return RouteOutcome::Dropped(DropReason::NoOwner);
        };
        let Ok(mad) = <&Mad>::try_from(payload) else {
            bump(&c.truncated);
            return RouteOutcome::Dropped(DropReason::Truncated);
        };
        let hdr = MadHeader::from_bytes(&mad[..24].try_into().unwrap_or([0; 24]));
        if !self.cfg.allowed_classes.contains(&hdr.mgmt_class) {
            bump(&c.class_not_allowed);
            return RouteOutcome::Dropped(DropReason::ClassNotAllowed);
        }
        if hdr.base_version != BASE_VERSION {
            bump(&c.malformed);
            return RouteOutcome::Dropped(DropReason::Malformed);
        }
        if hdr.mgmt_class == class::CM {
            let Ok(msg) = CmMessage::parse_mad(mad) else {
                bump(&c.malformed);
                return RouteOutcome::Dropped(DropReason::Malformed);
            };
            // The datagram's IP source is the sender's GID (the port takes it from the
            // socket); a REQ claiming another primary local GID is a spoof.
            if msg
                .primary_local_gid()
                .is_some_and(|g| g.canonical() != sgid.canonical())
            {
                bump(&c.spoofed_source);
                bump(&slot.counters.spoofed_source);
                return RouteOutcome::Dropped(DropReason::SpoofedSource);
            }
            // A REQ whose primary remote GID is another VM's than the address it came to.
            if msg
                .primary_remote_gid()
                .is_some_and(|g| g.canonical() != dgid.canonical())
            {
                bump(&c.misaddressed);
                bump(&slot.counters.misaddressed);
                return RouteOutcome::Dropped(DropReason::Misaddressed);
            }
            if let Some(out) = self.check_inbound_addresses(&slot, &msg, sgid, dgid) {
                return out;
            }
            match slot.comm.lock().on_inbound(sgid, &msg) {
                comm::Check::Known => {}
                comm::Check::Unknown => {
                    bump(&c.unknown_comm_id);
                    bump(&slot.counters.unknown_comm_id);
                }
                comm::Check::WrongSource => {
                    bump(&c.spoofed_source);
                    bump(&slot.counters.spoofed_source);
                    return RouteOutcome::Dropped(DropReason::SpoofedSource);
                }
            }
            let out = self.deliver(&slot, grh, mad);
            if let (RouteOutcome::Dropped(_), CmMessage::Req(r)) = (out, &msg) {
                // The VM never sees this REQ: it will not answer it either.
                slot.comm.lock().forget_passive(sgid, r.local_comm_id);
            }
            return out;
        }
        self.deliver(&slot, grh, mad)
    }

    /// The addresses an inbound CM message names beyond the primary path
    /// ([`addresses::check`]): another sender than the IP source is a spoof, another
    /// receiver than the destination a misaddressed MAD; both dropped and counted.
    fn check_inbound_addresses(
        &self,
        slot: &VmSlot,
        msg: &CmMessage,
        sgid: Gid,
        dgid: Gid,
    ) -> Option<RouteOutcome> {
        let c = &self.counters;
        match addresses::check(msg, sgid, dgid) {
            Ok(()) => None,
            Err(addresses::Mismatch::Source(what)) => {
                tracing::debug!(vm = slot.id, %sgid, "inbound MAD dropped: {what} is not the IP source");
                bump(&c.spoofed_source);
                bump(&slot.counters.spoofed_source);
                Some(RouteOutcome::Dropped(DropReason::SpoofedSource))
            }
            Err(addresses::Mismatch::Destination(what)) => {
                tracing::debug!(vm = slot.id, %dgid, "inbound MAD dropped: {what} is not the destination");
                bump(&c.misaddressed);
                bump(&slot.counters.misaddressed);
                Some(RouteOutcome::Dropped(DropReason::Misaddressed))
            }
        }
    }

    fn deliver(&self, slot: &VmSlot, grh: &[u8; GRH_LEN], mad: &Mad) -> RouteOutcome {
        let mut q = slot.pending.lock();
        Self::drain(slot, &mut q);
        if q.is_empty() && slot.sink.deliver(grh, mad).is_ok() {
            bump(&self.counters.delivered);
            bump(&slot.counters.delivered);
            return RouteOutcome::Delivered(slot.id);
        }
        if q.len() >= self.cfg.queue_depth {
            bump(&self.counters.queue_full);
            bump(&slot.counters.queue_full);
            return RouteOutcome::Dropped(DropReason::QueueFull);
        }
        q.push_back((*grh, Box::new(*mad)));
        bump(&self.counters.queued);
        bump(&slot.counters.queued);
        RouteOutcome::Queued(slot.id)
    }

    fn drain(slot: &VmSlot, q: &mut VecDeque<([u8; GRH_LEN], Box<Mad>)>) -> usize {
        let mut n = 0;
        while let Some((g, m)) = q.front() {
            if slot.sink.deliver(g, m).is_err() {
                break;
            }
            q.pop_front();
            bump(&slot.counters.delivered);
            n += 1;
        }
        n
    }

    /// Delivers what waits in `vm`'s queue, as far as the VM takes it (call when the VM posts
    /// receive buffers). Returns how many were delivered.
    pub fn poll_pending(&self, vm: VmId) -> usize {
        let Some(slot) = self.slot(vm) else {
            return 0;
        };
        let mut q = slot.pending.lock();
        let n = Self::drain(&slot, &mut q);
        self.counters
            .delivered
            .fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
        n
    }

    /// A VM's QP1 send: checked, recorded, and sent from the physical QP1.
    pub fn send_from_vm(
        &self,
        vm: VmId,
        sgid: Gid,
        dgid: Gid,
        mad: &[u8],
    ) -> Result<(), RdmaError> {
        let c = &self.counters;
        let slot = self.slot(vm).ok_or(RdmaError::UnknownVm(vm))?;
        let refuse = |counter: &std::sync::atomic::AtomicU64, reason: String| {
            bump(counter);
            bump(&slot.counters.refused);
            tracing::debug!(vm, "outbound refused: {reason}");
            Err(RdmaError::Refused { vm, reason })
        };
        let Ok(mad) = <&Mad>::try_from(mad) else {
            return refuse(
                &c.refused_malformed,
                format!("MAD of {} bytes, need {MAD_SIZE}", mad.len()),
            );
        };
        let hdr = MadHeader::from_bytes(&mad[..24].try_into().unwrap_or([0; 24]));
        if !self.cfg.allowed_classes.contains(&hdr.mgmt_class) {
            return refuse(
                &c.refused_class,
                format!("management class {:#04x} not allowed", hdr.mgmt_class),
            );
        }
        let sgid_c = sgid.canonical();
        let owner = self.owners.read().get(&sgid_c).map(|s| s.id);
        if owner != Some(vm) {
            return refuse(
                &c.refused_spoofed,
                format!("source GID {sgid} is not registered to VM {vm}"),
            );
        }
        if dgid.is_zero() || hdr.base_version != BASE_VERSION {
            return refuse(
                &c.refused_malformed,
                format!("bad destination {dgid} or base version"),
            );
        }
        if hdr.mgmt_class == class::CM {
            let msg = match CmMessage::parse_mad(mad) {
                Ok(m) => m,
                Err(e) => return refuse(&c.refused_malformed, format!("CM MAD: {e}")),
            };
            if let Some(g) = msg.primary_local_gid() {
                if g.canonical() != sgid_c {
                    return refuse(
                        &c.refused_spoofed,
                        format!("REQ primary local GID {g} differs from source GID {sgid}"),
                    );
                }
            }
            if let Err(m) = addresses::check(&msg, sgid_c, dgid) {
                let (addresses::Mismatch::Source(what) | addresses::Mismatch::Destination(what)) =
                    m;
                return refuse(
                    &c.refused_spoofed,
                    format!("{what} is not the datagram's ({sgid} to {dgid})"),
                );
            }
            let undo = {
                let mut t = slot.comm.lock();
                let undo = t.undo_point(&msg);
                if !t.on_outbound(sgid_c, dgid, &msg) {
                    return refuse(&c.refused_table_full, "connection table full".into());
                }
                undo
            };
            let r = self.transmit(&slot, sgid_c, dgid, mad);
            if r.is_err() {
                // Nothing left: the table must not keep what the MAD would have opened.
                slot.comm.lock().undo(undo);
            }
            return r;
        }
        self.transmit(&slot, sgid_c, dgid, mad)
    }

    fn transmit(&self, slot: &VmSlot, sgid: Gid, dgid: Gid, mad: &Mad) -> Result<(), RdmaError> {
        match self.tx.send_gsi(sgid, dgid, mad) {
            Ok(()) => {
                bump(&self.counters.sent);
                bump(&slot.counters.sent);
                Ok(())
            }
            Err(e) => {
                bump(&self.counters.send_errors);
                Err(e)
            }
        }
    }

    /// Counters.
    pub fn stats(&self) -> MuxStats {
        self.counters.snapshot()
    }

    /// Per-VM reports, by VM ID.
    pub fn vm_reports(&self) -> Vec<VmReport> {
        let slots: Vec<Arc<VmSlot>> = self.vms.lock().values().cloned().collect();
        let mut v: Vec<VmReport> = slots
            .iter()
            .map(|s| VmReport {
                vm: s.id,
                gids: s.gids.lock().iter().map(|g| g.to_string()).collect(),
                counters: s.counters.snapshot(),
                pending: s.pending.lock().len(),
                connections: s.comm.lock().live(),
            })
            .collect();
        v.sort_by_key(|r| r.vm);
        v
    }

    /// One VM's report.
    pub fn vm_report(&self, vm: VmId) -> Option<VmReport> {
        self.vm_reports().into_iter().find(|r| r.vm == vm)
    }
}

impl GsiHandler for Multiplexer {
    fn on_gsi(&self, pkt: &GsiPacket<'_>) {
        self.route(pkt.sgid, pkt.dgid, &pkt.grh, pkt.payload);
    }
}

/// The GRH area for a MAD from `sgid` to `dgid` (for callers of [`Multiplexer::route`]).
pub fn mad_grh(sgid: Gid, dgid: Gid) -> [u8; GRH_LEN] {
    grh_area(sgid, dgid, 12 + 8 + MAD_SIZE + 4)
}

#[cfg(test)]
mod tests;

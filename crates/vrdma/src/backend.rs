//! What the device needs from the host's RDMA stack: GID registration and the checked QP1
//! path of the CM multiplexer, and UD queue pairs on the host's software RoCEv2 port.
//!
//! [`crate::mux_backend`] implements it with Ferry's multiplexer and software port; tests use
//! in-memory implementations.
use std::{
    collections::VecDeque,
    sync::{
        atomic::{AtomicU64, AtomicUsize, Ordering},
        Arc, Mutex,
    },
};

use rdma_wire::{Gid, MAD_SIZE};

use crate::BackendError;

/// Size of the GRH area in front of every UD/GSI receive.
pub const GRH_LEN: usize = 40;

/// A datagram received on a UD queue pair.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UdDatagram {
    /// Sender's GID.
    pub sgid: Gid,
    /// Sender's QPN.
    pub src_qpn: u32,
    /// The GRH area the receive buffer starts with.
    pub grh: [u8; GRH_LEN],
    /// Immediate data.
    pub imm: Option<u32>,
    /// Payload.
    pub data: Vec<u8>,
}

/// One message of [`UdQueue::send_batch`].
#[derive(Debug, Clone, Copy)]
pub struct UdOut<'a> {
    /// Destination GID.
    pub dgid: Gid,
    /// Destination QPN.
    pub dqpn: u32,
    /// Q_Key.
    pub qkey: u32,
    /// Immediate data.
    pub imm: Option<u32>,
    /// Payload.
    pub data: &'a [u8],
}

/// A UD queue pair on the host port, owned by one virtual QP.
pub trait UdQueue: Send + Sync {
    /// Its QPN on the host port (what remote peers address).
    fn qpn(&self) -> u32;
    /// Sends `data` from this QP.
    fn send(
        &self,
        dgid: Gid,
        dqpn: u32,
        qkey: u32,
        imm: Option<u32>,
        data: &[u8],
    ) -> Result<(), BackendError>;
    /// Sends `msgs` in order and calls `done(i, result)` for each; an implementation may
    /// send consecutive messages to one destination together. One by one by default.
    fn send_batch(
        &self,
        msgs: &[UdOut<'_>],
        done: &mut dyn FnMut(usize, Result<(), BackendError>),
    ) {
        for (i, m) in msgs.iter().enumerate() {
            done(i, self.send(m.dgid, m.dqpn, m.qkey, m.imm, m.data));
        }
    }
    /// The next received datagram, if any (never blocks).
    fn try_recv(&self) -> Option<UdDatagram>;
    /// Calls `waker` whenever a datagram is queued for [`UdQueue::try_recv`], so the device
    /// thread can sleep instead of polling. Without it the device finds datagrams on its
    /// periodic passes only.
    fn set_waker(&self, _waker: Arc<dyn Fn() + Send + Sync>) {}
}

/// The host side of one VM's virtual RDMA port.
pub trait RdmaBackend: Send + Sync {
    /// Registers `gid` as this VM's (CREATE_BIND). A GID owned by another VM is refused.
    fn bind_gid(&self, gid: Gid) -> Result<(), BackendError>;
    /// Unregisters `gid` (DESTROY_BIND, reset, shutdown).
    fn unbind_gid(&self, gid: Gid) -> Result<(), BackendError>;
    /// Sends a MAD from the VM's QP1 through the checked outbound path.
    fn send_mad(&self, sgid: Gid, dgid: Gid, mad: &[u8]) -> Result<(), BackendError>;
    /// The VM posted QP1 receive buffers: deliver what waits for it.
    fn receive_buffers_posted(&self);
    /// Creates a UD queue pair bound to `gid` with Q_Key `qkey`.
    fn create_ud_qp(&self, gid: Gid, qkey: u32) -> Result<Box<dyn UdQueue>, BackendError>;
    /// Creates an RC queue pair sending from `gid`, whose remote accesses and READ responses
    /// use the regions of `mrs` (the VM's protection domain, over guest memory). A backend
    /// without RC refuses.
    fn create_rc_qp(
        &self,
        gid: Gid,
        mrs: Arc<rdma::rc::MrTable>,
    ) -> Result<Box<dyn RcQueue>, BackendError> {
        let _ = (gid, mrs);
        Err(BackendError::new(
            crate::BackendErrorKind::Refused,
            "this host has no RC queue pairs",
        ))
    }
}

/// An RC queue pair on the host port (crates/rdma's transport), owned by one virtual QP.
/// The device moves it through the states its guest asks for, posts the guest's work
/// requests (data already gathered from guest memory, READ targets as regions) and turns its
/// completions into CQEs. Dropping it destroys the host QP.
pub trait RcQueue: Send + Sync {
    /// Its QPN on the host port.
    fn qpn(&self) -> u32;
    /// RESET/INIT → RTR towards `remote` (packets from any other source are refused).
    fn modify_rtr(
        &self,
        remote: Gid,
        attrs: rdma::rc::RcAttrs,
        remote_write: bool,
        remote_read: bool,
    ) -> Result<(), rdma::rc::RcError>;
    /// RTR → RTS.
    fn modify_rts(
        &self,
        sq_psn: u32,
        timeout_us: u64,
        retry_count: u8,
        rnr_retry: u8,
    ) -> Result<(), rdma::rc::RcError>;
    /// RTS → SQD.
    fn drain(&self) -> Result<(), rdma::rc::RcError>;
    /// SQD → RTS.
    fn resume(&self) -> Result<(), rdma::rc::RcError>;
    /// Any state → ERR (outstanding work requests complete flushed).
    fn to_err(&self);
    /// Any state → RESET.
    fn reset(&self);
    /// Posts a send work request.
    fn post_send(&self, wr: rdma::rc::SendWr) -> Result<(), rdma::rc::RcError>;
    /// Posts a receive of up to `max_len` bytes.
    fn post_recv(&self, wr_id: u64, max_len: usize) -> Result<(), rdma::rc::RcError>;
    /// The next completion (never blocks).
    fn poll(&self) -> Option<rdma::rc::Completion>;
    /// Calls `waker` whenever completions wait.
    fn set_waker(&self, waker: Arc<dyn Fn() + Send + Sync>);
    /// A buffer for the next SEND or WRITE's data (one the transport reuses, when it keeps
    /// them: its length and bytes are stale, to be overwritten).
    fn spare_buffer(&self) -> Vec<u8> {
        Vec::new()
    }
    /// The transport's counters, if it keeps any.
    fn counters(&self) -> Option<rdma::rc::RcStats> {
        None
    }
}

/// [`RcQueue`] over a queue pair of crates/rdma's software port; destroys it when dropped.
pub struct PortRcQueue {
    /// The port.
    pub port: rdma::port::SoftPort,
    /// The queue pair.
    pub qp: Arc<rdma::rc::RcQp>,
}

impl PortRcQueue {
    /// A new RC QP on `port` sending from `gid`, over the regions of `mrs`, timed by the
    /// process's monotonic clock.
    pub fn create(
        port: &rdma::port::SoftPort,
        gid: Gid,
        mrs: Arc<rdma::rc::MrTable>,
    ) -> Box<dyn RcQueue> {
        let clock: Arc<dyn rdma::rc::Clock> = Arc::new(rdma::rc::MonotonicClock::default());
        Box::new(PortRcQueue {
            port: port.clone(),
            qp: port.create_rc_qp(gid, mrs, clock),
        })
    }
}

impl RcQueue for PortRcQueue {
    fn qpn(&self) -> u32 {
        self.qp.qpn_value()
    }
    fn modify_rtr(
        &self,
        remote: Gid,
        attrs: rdma::rc::RcAttrs,
        remote_write: bool,
        remote_read: bool,
    ) -> Result<(), rdma::rc::RcError> {
        self.qp.modify_rtr(remote, attrs, remote_write, remote_read)
    }
    fn modify_rts(
        &self,
        sq_psn: u32,
        timeout_us: u64,
        retry_count: u8,
        rnr_retry: u8,
    ) -> Result<(), rdma::rc::RcError> {
        self.qp
            .modify_rts(sq_psn, timeout_us, retry_count, rnr_retry)
    }
    fn drain(&self) -> Result<(), rdma::rc::RcError> {
        self.qp.drain()
    }
    fn resume(&self) -> Result<(), rdma::rc::RcError> {
        self.qp.resume()
    }
    fn to_err(&self) {
        self.qp.to_err();
    }
    fn reset(&self) {
        self.qp.reset();
    }
    fn post_send(&self, wr: rdma::rc::SendWr) -> Result<(), rdma::rc::RcError> {
        self.qp.post_send(wr)
    }
    fn post_recv(&self, wr_id: u64, max_len: usize) -> Result<(), rdma::rc::RcError> {
        self.qp.post_recv(wr_id, max_len)
    }
    fn poll(&self) -> Option<rdma::rc::Completion> {
        self.qp.poll()
    }
    fn set_waker(&self, waker: Arc<dyn Fn() + Send + Sync>) {
        self.qp.set_waker(waker);
    }
    fn counters(&self) -> Option<rdma::rc::RcStats> {
        Some(self.qp.stats())
    }
    fn spare_buffer(&self) -> Vec<u8> {
        self.qp.spare_buffer()
    }
}

impl Drop for PortRcQueue {
    fn drop(&mut self) {
        self.qp.shutdown();
        let _ = self.port.destroy_qp(self.qp.qpn_value());
    }
}

/// The VM has no QP1 receive buffer now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NoReceiveBuffer;

/// One inbound MAD: the GRH area and the 256-byte MAD.
pub type InboundMad = ([u8; GRH_LEN], Box<[u8; MAD_SIZE]>);

/// What [`MadInbox::wake`] tries first: delivers what arrived into the guest on the calling
/// thread, or leaves it to the thread holding the device, which runs it when it lets go;
/// `false` when there is no device any more (the device thread is then woken).
pub(crate) type DirectDelivery = Arc<dyn Fn() -> bool + Send + Sync>;

/// Inbound MADs on their way into the VM's QP1 receive queue: the multiplexer's callback
/// target. It accepts a MAD only while the guest has a receive buffer for it (credits set by
/// the device from the guest's receive ring), so the multiplexer keeps the rest in its bounded
/// per-VM queue; nothing here blocks.
#[derive(Default)]
pub struct MadInbox {
    queue: Mutex<VecDeque<InboundMad>>,
    credits: AtomicUsize,
    accepted: AtomicU64,
    refused: AtomicU64,
    waker: Mutex<Option<std::thread::Thread>>,
    direct: Mutex<Option<DirectDelivery>>,
}

impl std::fmt::Debug for MadInbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MadInbox")
            .field("queued", &self.len())
            .field("credits", &self.credits.load(Ordering::Relaxed))
            .field("counts", &self.counts())
            .finish()
    }
}

impl MadInbox {
    /// Takes one MAD (GRH area + 256 bytes) if the guest has a receive buffer for it.
    pub fn deliver(
        &self,
        grh: &[u8; GRH_LEN],
        mad: &[u8; MAD_SIZE],
    ) -> Result<(), NoReceiveBuffer> {
        let took = self
            .credits
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |c| c.checked_sub(1));
        if took.is_err() {
            self.refused.fetch_add(1, Ordering::Relaxed);
            // The multiplexer keeps the MAD; the device thread refreshes the credits from
            // the guest's receive ring and takes it from there.
            self.wake_device_thread();
            return Err(NoReceiveBuffer);
        }
        self.queue
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push_back((*grh, Box::new(*mad)));
        self.accepted.fetch_add(1, Ordering::Relaxed);
        self.wake();
        Ok(())
    }

    /// Something arrived for the guest (a MAD here, a datagram on a UD queue pair): it is
    /// delivered into the guest's receive queue and completion queue at once on the calling
    /// thread (the port's receive thread) when the device is free, else by the thread that
    /// holds it when it lets go (the attached device's direct delivery); the device thread
    /// is woken only without one. No hand-off to another thread on the common path.
    pub fn wake(&self) {
        let direct = self
            .direct
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        if !direct.is_some_and(|d| d()) {
            self.wake_device_thread();
        }
    }

    /// Wakes the device thread.
    pub(crate) fn wake_device_thread(&self) {
        if let Some(t) = &*self.waker.lock().unwrap_or_else(|e| e.into_inner()) {
            t.unpark();
        }
    }

    /// The thread to wake when a MAD arrives (the device thread).
    pub(crate) fn set_waker(&self, t: std::thread::Thread) {
        *self.waker.lock().unwrap_or_else(|e| e.into_inner()) = Some(t);
    }

    /// Sets (or with `None` removes) the direct delivery [`MadInbox::wake`] tries first.
    pub(crate) fn set_direct(&self, d: Option<DirectDelivery>) {
        *self.direct.lock().unwrap_or_else(|e| e.into_inner()) = d;
    }

    /// Sets the number of MADs the guest can take now (free receive buffers minus queued).
    pub(crate) fn set_credits(&self, free_buffers: usize) {
        let queued = self.len();
        self.credits
            .store(free_buffers.saturating_sub(queued), Ordering::Release);
    }

    /// Next MAD for the guest.
    pub(crate) fn pop(&self) -> Option<InboundMad> {
        self.queue
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .pop_front()
    }

    /// Puts a MAD back at the front (the guest's buffer turned out unusable).
    pub(crate) fn unpop(&self, m: InboundMad) {
        self.queue
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push_front(m);
    }

    /// MADs waiting.
    pub fn len(&self) -> usize {
        self.queue.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Whether none wait.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// (accepted, refused for lack of a buffer).
    pub fn counts(&self) -> (u64, u64) {
        (
            self.accepted.load(Ordering::Relaxed),
            self.refused.load(Ordering::Relaxed),
        )
    }

    /// Drops everything (device reset).
    pub(crate) fn clear(&self) {
        self.queue.lock().unwrap_or_else(|e| e.into_inner()).clear();
        self.credits.store(0, Ordering::Release);
    }
}

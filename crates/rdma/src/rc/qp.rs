//! An RC queue pair on the software port: the transport ([`RcCore`]) behind a lock, its
//! packets sent through the port as standard RoCEv2, a timer thread driven by the QP's
//! [`Clock`], and a completion queue callers poll or wait on.
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};
use rdma_wire::{Bth, Gid, ImmDt, RocePacket};

use super::core::RcCore;
use super::{Clock, Completion, OutPacket, QpState, RcAttrs, RcError, RcStats, SendWr};
use crate::port::{QpType, QueuePair, RxPacket, RxVerdict, SoftPort};

struct Shared {
    core: Mutex<RcCore>,
    /// Signalled on completions.
    cond: Condvar,
    /// Signalled when a deadline earlier than the timer thread's planned wake-up appears.
    timer_cond: Condvar,
    /// When the timer thread plans to wake next, µs of the QP's clock.
    timer_wake: std::sync::atomic::AtomicU64,
    remote: Mutex<Option<Gid>>,
    /// Told this QP's number when completions are waiting (an agent serving many QPs).
    notify: Mutex<Option<crossbeam_channel::Sender<u32>>>,
    /// Called when completions are waiting (a virtual device's thread).
    waker: Mutex<Option<Arc<dyn Fn() + Send + Sync>>>,
    stop: AtomicBool,
}

/// An RC queue pair bound to one local GID of a port.
pub struct RcQp {
    qpn: u32,
    gid: Gid,
    port: SoftPort,
    clock: Arc<dyn Clock>,
    shared: Arc<Shared>,
    timer: Mutex<Option<JoinHandle<()>>>,
}

impl std::fmt::Debug for RcQp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RcQp")
            .field("qpn", &self.qpn)
            .field("gid", &self.gid)
            .finish()
    }
}

impl RcQp {
    pub(crate) fn new(
        qpn: u32,
        gid: Gid,
        port: SoftPort,
        core: RcCore,
        clock: Arc<dyn Clock>,
    ) -> Arc<RcQp> {
        let shared = Arc::new(Shared {
            core: Mutex::new(core),
            cond: Condvar::new(),
            timer_cond: Condvar::new(),
            timer_wake: std::sync::atomic::AtomicU64::new(0),
            remote: Mutex::new(None),
            notify: Mutex::new(None),
            waker: Mutex::new(None),
            stop: AtomicBool::new(false),
        });
        let qp = Arc::new(RcQp {
            qpn,
            gid: gid.canonical(),
            port,
            clock,
            shared,
            timer: Mutex::new(None),
        });
        let weak = Arc::downgrade(&qp);
        let shared = qp.shared.clone();
        let t = std::thread::Builder::new()
            .name(format!("rc-timer-{qpn:#x}"))
            .spawn(move || {
                sandbox::enter(sandbox::Kind::RdmaPort);
                timer_loop(&shared, &weak)
            });
        match t {
            Ok(t) => *qp.timer.lock() = Some(t),
            Err(e) => tracing::warn!(qpn, "no RC timer thread: {e}"),
        }
        qp
    }

    /// Its QPN.
    pub fn qpn_value(&self) -> u32 {
        self.qpn
    }

    /// Its local GID.
    pub fn gid(&self) -> Gid {
        self.gid
    }

    /// Its state.
    pub fn state(&self) -> QpState {
        self.shared.core.lock().state()
    }

    /// Counters.
    pub fn stats(&self) -> RcStats {
        self.shared.core.lock().counters.snapshot()
    }

    /// RESET → INIT → RTR → RTS towards `remote` with `attrs` (what rdma_cm does after the
    /// REQ/REP exchange): packets from any other source are refused from now on.
    pub fn connect(
        &self,
        remote: Gid,
        attrs: RcAttrs,
        remote_write: bool,
        remote_read: bool,
    ) -> Result<(), RcError> {
        *self.shared.remote.lock() = Some(remote.canonical());
        let mut c = self.shared.core.lock();
        if c.state() == QpState::Reset {
            c.to_init(remote_write, remote_read)?;
        }
        c.to_rtr(attrs)?;
        c.to_rts()
    }

    /// RESET/INIT → INIT → RTR towards `remote` with `attrs` (a virtual device's MODIFY_QP to
    /// RTR): the responder runs; packets from any other source are refused.
    pub fn modify_rtr(
        &self,
        remote: Gid,
        attrs: RcAttrs,
        remote_write: bool,
        remote_read: bool,
    ) -> Result<(), RcError> {
        let mut c = self.shared.core.lock();
        if c.state() == QpState::Reset {
            c.to_init(remote_write, remote_read)?;
        } else if c.state() == QpState::Init {
            c.remote_write = remote_write;
            c.remote_read = remote_read;
        }
        c.to_rtr(attrs)?;
        *self.shared.remote.lock() = Some(remote.canonical());
        Ok(())
    }

    /// RTR → RTS with the requester's attributes (starting PSN, ACK timeout, retry counts).
    pub fn modify_rts(
        &self,
        sq_psn: u32,
        timeout_us: u64,
        retry_count: u8,
        rnr_retry: u8,
    ) -> Result<(), RcError> {
        let mut c = self.shared.core.lock();
        if c.state() != QpState::Rtr {
            return Err(RcError::BadState {
                qpn: self.qpn,
                state: c.state(),
            });
        }
        if retry_count > 7 || rnr_retry > 7 {
            return Err(RcError::BadAttr("retry counts ≤ 7".into()));
        }
        c.attrs.sq_psn = sq_psn & super::psn::PSN_MASK;
        c.attrs.timeout_us = timeout_us.max(1);
        c.attrs.retry_count = retry_count;
        c.attrs.rnr_retry = rnr_retry;
        c.to_rts()?;
        self.flush(&mut c);
        Ok(())
    }

    /// Any state → RESET: outstanding work flushed and dropped, the peer forgotten.
    pub fn reset(&self) {
        let mut c = self.shared.core.lock();
        c.reset();
        *self.shared.remote.lock() = None;
    }

    /// RTS → SQD.
    pub fn drain(&self) -> Result<(), RcError> {
        self.shared.core.lock().to_sqd()
    }

    /// SQD → RTS.
    pub fn resume(&self) -> Result<(), RcError> {
        let mut c = self.shared.core.lock();
        c.to_rts()?;
        self.flush(&mut c);
        Ok(())
    }

    /// Moves the QP to ERR (flushing its work requests).
    pub fn to_err(&self) {
        let mut c = self.shared.core.lock();
        c.to_err();
        self.flush(&mut c);
    }

    /// Posts a receive of up to `max_len` bytes.
    pub fn post_recv(&self, wr_id: u64, max_len: usize) -> Result<(), RcError> {
        let mut c = self.shared.core.lock();
        c.post_recv(wr_id, max_len)?;
        self.flush(&mut c);
        Ok(())
    }

    /// Posts a send work request.
    pub fn post_send(&self, wr: SendWr) -> Result<(), RcError> {
        let mut c = self.shared.core.lock();
        c.post_send(self.clock.now_us(), wr)?;
        self.flush(&mut c);
        Ok(())
    }

    /// A buffer for the next SEND or WRITE's data (stale bytes, to be overwritten), reusing
    /// one of a completed work request when there is one (see [`RcCore::spare_buffer`]).
    pub fn spare_buffer(&self) -> Vec<u8> {
        self.shared.core.lock().spare_buffer()
    }

    /// The next completion, if any.
    pub fn poll(&self) -> Option<Completion> {
        self.shared.core.lock().poll_cq()
    }

    /// The next completion, waiting up to `timeout`.
    pub fn wait(&self, timeout: Duration) -> Option<Completion> {
        let end = Instant::now() + timeout;
        let mut c = self.shared.core.lock();
        loop {
            if let Some(wc) = c.poll_cq() {
                return Some(wc);
            }
            if self.shared.cond.wait_until(&mut c, end).timed_out() {
                return c.poll_cq();
            }
        }
    }

    /// Sends this QP's number on `tx` whenever completions are waiting.
    pub fn set_notifier(&self, tx: crossbeam_channel::Sender<u32>) {
        *self.shared.notify.lock() = Some(tx);
    }

    /// Calls `waker` whenever completions are waiting.
    pub fn set_waker(&self, waker: Arc<dyn Fn() + Send + Sync>) {
        *self.shared.waker.lock() = Some(waker);
    }

    /// Sends what the transport queued (under the QP's lock, so packets leave in order) and
    /// wakes whoever waits for completions.
    fn flush(&self, c: &mut RcCore) {
        if c.next_deadline()
            .is_some_and(|d| d < self.shared.timer_wake.load(Ordering::Relaxed))
        {
            self.shared.timer_cond.notify_one();
        }
        if c.cq_len() > 0 {
            self.shared.cond.notify_all();
            if let Some(tx) = &*self.shared.notify.lock() {
                let _ = tx.try_send(self.qpn);
            }
            if let Some(w) = &*self.shared.waker.lock() {
                w();
            }
        }
        let out = c.take_out();
        if out.is_empty() {
            return;
        }
        let Some(remote) = *self.shared.remote.lock() else {
            return;
        };
        let (dqpn, p_key) = (c.attrs().dest_qpn, self.port.p_key());
        // Runs of equal-size packets (a message's MIDDLEs and LAST) leave in one GSO send.
        let pkts: Vec<RocePacket<'_>> = out.iter().map(|p| to_roce(p, dqpn, p_key)).collect();
        if let Err(e) = self.port.send_packets(self.gid, remote, &pkts) {
            tracing::debug!(qpn = self.qpn, "RC send failed: {e}");
        }
    }

    /// Stops the timer thread (the port's `destroy_qp` drops the QP from its table).
    pub fn shutdown(&self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        self.shared.cond.notify_all();
        self.shared.timer_cond.notify_all();
        if let Some(t) = self.timer.lock().take() {
            if t.thread().id() != std::thread::current().id() {
                let _ = t.join();
            }
        }
    }
}

impl Drop for RcQp {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// The RoCEv2 packet of `p` for QP `dqpn`.
pub(crate) fn to_roce(p: &OutPacket, dqpn: u32, p_key: u16) -> RocePacket<'_> {
    let pad = rdma_wire::padding_for(p.payload.len());
    RocePacket {
        bth: Bth {
            opcode: p.opcode,
            p_key,
            dest_qp: dqpn,
            psn: p.psn,
            ack_req: p.ack_req,
            pad_count: pad.len() as u8,
            ..Bth::default()
        },
        deth: None,
        reth: p.reth,
        atomic_eth: None,
        aeth: p.aeth,
        atomic_ack_eth: None,
        imm_dt: p.imm.map(|v| ImmDt(v.to_be_bytes())),
        ieth: None,
        payload: &p.payload,
        padding: pad,
        icrc: 0,
    }
}

fn timer_loop(shared: &Shared, qp: &std::sync::Weak<RcQp>) {
    let mut c = shared.core.lock();
    while !shared.stop.load(Ordering::Relaxed) {
        let Some(q) = qp.upgrade() else {
            return;
        };
        let now = q.clock.now_us();
        c.on_timer(now);
        q.flush(&mut c);
        let wait = c
            .next_deadline()
            .map_or(Duration::from_millis(50), |d| {
                Duration::from_micros(d.saturating_sub(now)).min(Duration::from_millis(50))
            })
            .max(Duration::from_micros(20));
        shared
            .timer_wake
            .store(now + wait.as_micros() as u64, Ordering::Relaxed);
        drop(q);
        shared.timer_cond.wait_for(&mut c, wait);
    }
}

impl QueuePair for RcQp {
    fn qpn(&self) -> u32 {
        self.qpn
    }

    fn qp_type(&self) -> QpType {
        QpType::Rc
    }

    fn receive(&self, rx: &RxPacket<'_>) -> RxVerdict {
        if rx.dgid.canonical() != self.gid {
            return RxVerdict::WrongDgid;
        }
        if *self.shared.remote.lock() != Some(rx.sgid.canonical()) {
            return RxVerdict::WrongSource;
        }
        if rx.packet.deth.is_some() {
            return RxVerdict::WrongTransport;
        }
        let mut c = self.shared.core.lock();
        c.on_packet(self.clock.now_us(), rx.packet);
        self.flush(&mut c);
        RxVerdict::Rc
    }
}

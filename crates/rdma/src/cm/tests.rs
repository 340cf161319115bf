//! CM endpoint state machines over an in-memory wire (no sockets): two endpoints whose
//! transmitters call each other's `on_mad`, with a switch to drop everything one side sends.
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use parking_lot::Mutex;
use rdma_wire::cm::{reason, Dreq, Rep};
use rdma_wire::mad::{attr, MadHeader};
use rdma_wire::{CmKind, CmMessage, Gid, Mad};

use super::*;

/// A transmitter that hands MADs to the other endpoint (unless muted) and records them.
#[derive(Default)]
struct Wire {
    to: OnceLock<CmEndpoint>,
    muted: AtomicBool,
    drop_once: Mutex<Option<CmKind>>,
    log: Mutex<Vec<(Gid, CmMessage)>>,
}

impl Qp1Tx for Wire {
    fn send_gsi(&self, sgid: Gid, dgid: Gid, mad: &Mad) -> Result<(), RdmaError> {
        if let Ok(m) = CmMessage::parse_mad(mad) {
            self.log.lock().push((dgid, m));
            let mut d = self.drop_once.lock();
            if *d == Some(m.kind()) {
                *d = None;
                return Ok(());
            }
        }
        if !self.muted.load(Ordering::SeqCst) {
            if let Some(ep) = self.to.get() {
                ep.on_mad(sgid, dgid, mad);
            }
        }
        Ok(())
    }
}

impl Wire {
    fn kinds(&self) -> Vec<CmKind> {
        self.log.lock().iter().map(|(_, m)| m.kind()).collect()
    }
}

const A: Gid = Gid([0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 10, 0, 0, 1]);
const B: Gid = Gid([0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 10, 0, 0, 2]);
const SVC: u64 = 0x0106_0000_0000_1c06;

/// Two endpoints on one manual clock: their timers fire only when a test advances it.
struct Pair {
    a: CmEndpoint,
    wa: Arc<Wire>,
    b: CmEndpoint,
    wb: Arc<Wire>,
    clock: Arc<ManualClock>,
}

impl Pair {
    /// Advances the clock by `d` and fires both endpoints' due timers.
    fn advance(&self, d: Duration) {
        self.clock.advance(d);
        self.a.run_timers();
        self.b.run_timers();
    }

    /// Advances the clock a response timeout at a time until `done` holds (at most `steps`).
    fn advance_until(&self, step: Duration, steps: u32, mut done: impl FnMut() -> bool) {
        for _ in 0..steps {
            if done() {
                return;
            }
            self.advance(step);
        }
        assert!(done(), "not done after {steps} steps of {step:?}");
    }
}

/// Waits (real time, bounded) for another thread to get somewhere, e.g. to send its request.
fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + WAIT;
    while !cond() {
        assert!(
            std::time::Instant::now() < deadline,
            "{what}: not within {WAIT:?}"
        );
        std::thread::yield_now();
    }
}

fn pair(cfg: CmConfig) -> Pair {
    let clock = Arc::new(ManualClock::new());
    let (wa, wb) = (Arc::new(Wire::default()), Arc::new(Wire::default()));
    let a = CmEndpoint::with_clock(A, cfg.clone(), wa.clone(), clock.clone());
    let b = CmEndpoint::with_clock(B, cfg, wb.clone(), clock.clone());
    let _ = wa.to.set(b.clone());
    let _ = wb.to.set(a.clone());
    b.listen(
        SVC,
        ListenOptions {
            qpn: 0x42,
            qkey: 0x1234_5678,
            accept: AcceptMode::Auto,
        },
    );
    Pair {
        a,
        wa,
        b,
        wb,
        clock,
    }
}

fn params() -> ConnectParams {
    ConnectParams {
        service_id: SVC,
        qpn: 0x11,
        private_data: b"hello".to_vec(),
    }
}

/// Bound on a blocking call's real-time wait (answers come synchronously over the in-memory
/// wire; timers move only with the manual clock).
const WAIT: Duration = Duration::from_secs(60);

#[test]
fn connect_disconnect_and_sidr_in_memory() {
    let p = pair(CmConfig::fast());
    let (a, wa, b, wb) = (&p.a, &p.wa, &p.b, &p.wb);
    let info = a.connect(B, params(), WAIT).unwrap();
    // The RTU has left before connect() returns, so a DREQ sent at once cannot overtake it.
    assert_eq!(wa.kinds(), [CmKind::Req, CmKind::Rtu]);
    assert_eq!(info.remote_qpn, 0x42);
    assert_eq!(
        a.connection_state(info.local_comm_id),
        Some(ConnState::Established)
    );
    assert_eq!(
        b.connection_state(info.remote_comm_id),
        Some(ConnState::Established)
    );
    a.disconnect(info.local_comm_id, WAIT).unwrap();
    assert_eq!(
        a.connection_state(info.local_comm_id),
        Some(ConnState::TimeWait)
    );
    assert_eq!(wa.kinds(), [CmKind::Req, CmKind::Rtu, CmKind::Dreq]);
    assert_eq!(wb.kinds(), [CmKind::Rep, CmKind::Drep]);
    let s = a.sidr_resolve(B, SVC, &[], WAIT).unwrap();
    assert_eq!((s.qpn, s.qkey), (0x42, 0x1234_5678));
    let e = a.sidr_resolve(B, SVC + 1, &[], WAIT).unwrap_err();
    assert!(matches!(e, RdmaError::SidrStatus { status: 1, .. }), "{e}");
    // Time-wait ends and frees the ID: not a moment before its time.
    p.advance(CmConfig::fast().timewait - Duration::from_millis(1));
    assert_eq!(
        a.connection_state(info.local_comm_id),
        Some(ConnState::TimeWait)
    );
    p.advance(Duration::from_millis(1));
    assert_eq!(a.connection_state(info.local_comm_id), None);
    assert_eq!(b.connection_count(), 0);
}

#[test]
fn unanswered_req_is_retried_then_rejected_with_timeout_and_remote_id_zero() {
    let cfg = CmConfig {
        response_timeout: 12, // ≈ 17 ms
        max_retries: 3,
        ..CmConfig::fast()
    };
    let timeout = cm_timeout(cfg.response_timeout);
    let p = pair(cfg);
    let (a, wa) = (&p.a, &p.wa);
    wa.muted.store(true, Ordering::SeqCst);
    let (_, rx) = a.connect_async(B, params());
    // Each response timeout brings one retry; nothing happens in between.
    for retry in 1..=3 {
        p.advance(timeout - Duration::from_nanos(1));
        assert_eq!(a.stats().retransmits, retry - 1);
        p.advance(Duration::from_nanos(1));
        assert_eq!(a.stats().retransmits, retry);
    }
    assert!(rx.try_recv().is_err(), "still waiting for the last try");
    p.advance(timeout);
    let e = rx.try_recv().expect("timed out by now").unwrap_err();
    assert!(
        matches!(
            e,
            RdmaError::Timeout {
                what: "REQ",
                retries: 3
            }
        ),
        "{e}"
    );
    let log = wa.log.lock();
    let kinds: Vec<CmKind> = log.iter().map(|(_, m)| m.kind()).collect();
    assert_eq!(
        kinds,
        [
            CmKind::Req,
            CmKind::Req,
            CmKind::Req,
            CmKind::Req,
            CmKind::Rej
        ]
    );
    let CmMessage::Rej(rej) = &log[4].1 else {
        panic!("not a REJ");
    };
    assert_eq!((rej.reason, rej.remote_comm_id), (reason::TIMEOUT, 0));
    assert_eq!(a.stats().retransmits, 3);
}

#[test]
fn passive_side_rejects_unknown_service_and_answers_unknown_dreq_with_drep() {
    let p = pair(CmConfig::fast());
    let (a, wa, b, wb) = (&p.a, &p.wa, &p.b, &p.wb);
    let e = a
        .connect(
            B,
            ConnectParams {
                service_id: 7,
                ..params()
            },
            WAIT,
        )
        .unwrap_err();
    assert!(
        matches!(
            e,
            RdmaError::Rejected {
                reason: reason::INVALID_SERVICE_ID,
                ..
            }
        ),
        "{e}"
    );
    // A DREQ for a connection B does not have: DREP anyway (as Linux's cm_issue_drep).
    let dreq = Dreq {
        hdr: MadHeader::cm(attr::DREQ, 5),
        local_comm_id: 0xaaaa,
        remote_comm_id: 0xbbbb,
        ..Dreq::default()
    };
    b.on_mad(A, B, &dreq.to_mad());
    let last = wb.log.lock().last().cloned().unwrap();
    let CmMessage::Drep(drep) = last.1 else {
        panic!("not a DREP");
    };
    assert_eq!((drep.local_comm_id, drep.remote_comm_id), (0xbbbb, 0xaaaa));
    // A REP naming a REQ A never sent: REJ (invalid comm ID).
    let rep = Rep {
        hdr: MadHeader::cm(attr::REP, 6),
        local_comm_id: 0x77,
        remote_comm_id: 0x1234,
        ..Rep::default()
    };
    a.on_mad(B, A, &rep.to_mad());
    let last = wa.log.lock().last().cloned().unwrap();
    assert!(matches!(last.1, CmMessage::Rej(r) if r.reason == reason::INVALID_COMM_ID));
    // Garbage and MADs for another GID are counted, not acted on.
    a.on_mad(B, A, &[0u8; 256]);
    a.on_mad(B, B, &rep.to_mad());
    assert_eq!((a.stats().malformed, a.stats().wrong_dgid), (1, 1));
}

#[test]
fn lost_rtu_is_recovered_by_rep_retransmission() {
    let p = pair(CmConfig::fast());
    let (a, wa, b, wb) = (&p.a, &p.wa, &p.b, &p.wb);
    *wa.drop_once.lock() = Some(CmKind::Rtu);
    let info = a.connect(B, params(), WAIT).unwrap();
    assert_eq!(
        b.connection_state(info.remote_comm_id),
        Some(ConnState::RepSent)
    );
    // B retransmits its REP after its response timeout; A, established, answers with the
    // RTU again.
    p.advance(cm_timeout(CmConfig::fast().response_timeout));
    assert_eq!(
        b.connection_state(info.remote_comm_id),
        Some(ConnState::Established)
    );
    assert_eq!(wa.kinds(), [CmKind::Req, CmKind::Rtu, CmKind::Rtu]);
    assert!(wb.kinds().iter().filter(|k| **k == CmKind::Rep).count() >= 2);
}

#[test]
fn unanswered_dreq_is_retried_then_the_connection_enters_time_wait() {
    let p = pair(CmConfig::fast());
    let (a, wa, b) = (&p.a, &p.wa, &p.b);
    let events = b.events();
    let info = a.connect(B, params(), WAIT).unwrap();
    wa.muted.store(true, Ordering::SeqCst);
    std::thread::scope(|s| {
        let disc = s.spawn(|| a.disconnect(info.local_comm_id, WAIT));
        wait_for("the DREQ is sent", || {
            a.connection_state(info.local_comm_id) == Some(ConnState::DreqSent)
        });
        // The DREQ goes out, then one retry per response timeout, then time-wait.
        let step = cm_timeout(CmConfig::fast().response_timeout);
        p.advance_until(step, 20, || {
            a.connection_state(info.local_comm_id) == Some(ConnState::TimeWait)
        });
        disc.join().unwrap().unwrap();
    });
    assert_eq!(
        a.stats().retransmits,
        u64::from(CmConfig::fast().max_retries)
    );
    assert_eq!(
        a.connection_state(info.local_comm_id),
        Some(ConnState::TimeWait)
    );
    assert!(events
        .try_iter()
        .any(|e| matches!(e, CmEvent::Established(_))));
}

#[test]
fn an_mra_from_a_slow_passive_side_extends_the_active_sides_wait() {
    let cfg = CmConfig::fast();
    let timeout = cm_timeout(cfg.response_timeout);
    let mra = cm_timeout(cfg.mra_service_timeout);
    let p = pair(cfg);
    p.b.listen(
        SVC + 1,
        ListenOptions {
            qpn: 0x43,
            qkey: 0x1234_5678,
            accept: AcceptMode::Manual,
        },
    );
    let events = p.b.events();
    let (_, rx) = p.a.connect_async(
        B,
        ConnectParams {
            service_id: SVC + 1,
            ..params()
        },
    );
    let req = events
        .try_iter()
        .find_map(|e| match e {
            CmEvent::ConnectRequest(i) => Some(i),
            _ => None,
        })
        .expect("B's application was told of the REQ");
    // B's application takes its time: A retries after its response timeout, and B answers the
    // duplicate REQ with an MRA.
    p.advance(timeout);
    assert_eq!(p.a.stats().retransmits, 1);
    assert_eq!((p.b.stats().mra_sent, p.a.stats().mra_received), (1, 1));
    // A now waits the MRA's service timeout on top of its own: no retry before that.
    p.advance(mra);
    assert_eq!(p.a.stats().retransmits, 1);
    p.advance(timeout);
    assert_eq!(p.a.stats().retransmits, 2);
    // The application accepts at last; the connection completes.
    p.b.accept(req.local_comm_id).unwrap();
    let info = rx.try_recv().expect("answered").unwrap();
    assert_eq!(info.remote_qpn, 0x43);
    assert_eq!(
        p.b.connection_state(req.local_comm_id),
        Some(ConnState::Established)
    );
}

#[test]
fn an_unanswered_sidr_request_is_retried_then_times_out() {
    let cfg = CmConfig::fast();
    let timeout = cm_timeout(cfg.response_timeout);
    let retries = cfg.max_retries;
    let p = pair(cfg);
    p.wa.muted.store(true, Ordering::SeqCst);
    std::thread::scope(|s| {
        let sidr = s.spawn(|| p.a.sidr_resolve(B, SVC, &[], WAIT));
        wait_for("the SIDR_REQ is sent", || {
            p.wa.kinds().contains(&CmKind::SidrReq)
        });
        p.advance_until(timeout, 2 * u32::from(retries) + 10, || {
            p.a.stats().timeouts == 1
        });
        let e = sidr.join().unwrap().unwrap_err();
        assert!(matches!(e, RdmaError::Timeout { what: "SIDR", .. }), "{e}");
    });
    assert_eq!(p.a.stats().retransmits, u64::from(retries));
}

mod hostile;

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

fn pair(cfg: CmConfig) -> (CmEndpoint, Arc<Wire>, CmEndpoint, Arc<Wire>) {
    let (wa, wb) = (Arc::new(Wire::default()), Arc::new(Wire::default()));
    let a = CmEndpoint::new(A, cfg.clone(), wa.clone());
    let b = CmEndpoint::new(B, cfg, wb.clone());
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
    (a, wa, b, wb)
}

fn params() -> ConnectParams {
    ConnectParams {
        service_id: SVC,
        qpn: 0x11,
        private_data: b"hello".to_vec(),
    }
}

const WAIT: Duration = Duration::from_secs(10);

#[test]
fn connect_disconnect_and_sidr_in_memory() {
    let (a, wa, b, wb) = pair(CmConfig::fast());
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
    // Time-wait ends and frees the ID.
    std::thread::sleep(Duration::from_millis(300));
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
    let (a, wa, _b, _wb) = pair(cfg);
    wa.muted.store(true, Ordering::SeqCst);
    let e = a.connect(B, params(), WAIT).unwrap_err();
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
    // Let the REJ go out after the caller was told.
    std::thread::sleep(Duration::from_millis(50));
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
    let (a, wa, b, wb) = pair(CmConfig::fast());
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
    let (a, wa, b, wb) = pair(CmConfig::fast());
    *wa.drop_once.lock() = Some(CmKind::Rtu);
    let info = a.connect(B, params(), WAIT).unwrap();
    // B retransmits its REP; A, established, answers with the RTU again.
    let end = std::time::Instant::now() + WAIT;
    while b.connection_state(info.remote_comm_id) != Some(ConnState::Established) {
        assert!(
            std::time::Instant::now() < end,
            "passive side never established"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(wa.kinds(), [CmKind::Req, CmKind::Rtu, CmKind::Rtu]);
    assert!(wb.kinds().iter().filter(|k| **k == CmKind::Rep).count() >= 2);
}

#[test]
fn unanswered_dreq_is_retried_then_the_connection_enters_time_wait() {
    let (a, wa, b, _wb) = pair(CmConfig::fast());
    let events = b.events();
    let info = a.connect(B, params(), WAIT).unwrap();
    wa.muted.store(true, Ordering::SeqCst);
    a.disconnect(info.local_comm_id, WAIT).unwrap();
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

//! Two RC transports connected by a simulated wire that can lose, duplicate and reorder
//! packets, on a manual clock: no sockets, no sleeps. Every packet is encoded to bytes and
//! parsed back, as on the port. (About 870 lines in one file on purpose: every scenario drives
//! the same simulated wire and replay helpers, and the rxe replays read best next to them.)
use std::sync::Arc;

use rdma_wire::{opcode, RocePacket};

use super::core::RcCore;
use super::mr::{Access, MemoryRegion, MrTable};
use super::qp::to_roce;
use super::*;

const A_QPN: u32 = 0x11;
const B_QPN: u32 = 0x22;

/// What the wire does with the n-th packet in one direction.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Fate {
    Deliver,
    Drop,
    Duplicate,
    /// Delivered after the next packet.
    Delay,
}

/// Decides the fate of the n-th packet of a direction.
type FateFn = Box<dyn FnMut(usize, &RocePacket<'_>) -> Fate>;

struct Pair {
    a: RcCore,
    b: RcCore,
    a_mrs: Arc<MrTable>,
    b_mrs: Arc<MrTable>,
    now: u64,
    /// Packets a → b sent so far (index for the fate function).
    n_ab: usize,
    n_ba: usize,
    fate_ab: FateFn,
    fate_ba: FateFn,
    held_ab: Option<Vec<u8>>,
    held_ba: Option<Vec<u8>>,
}

fn encode(p: &OutPacket, dqpn: u32) -> Vec<u8> {
    let mut buf = vec![0u8; 8192];
    let n = to_roce(p, dqpn, 0xffff)
        .encode_for_udp_socket(
            std::net::Ipv4Addr::new(127, 0, 0, 1).into(),
            std::net::Ipv4Addr::new(127, 0, 0, 2).into(),
            4791,
            4791,
            &mut buf,
        )
        .unwrap();
    buf.truncate(n);
    buf
}

fn attrs(mtu: usize, a_psn: u32, b_psn: u32, dest: u32) -> RcAttrs {
    RcAttrs {
        path_mtu: mtu,
        dest_qpn: dest,
        rq_psn: b_psn,
        sq_psn: a_psn,
        timeout_us: 1000,
        ..RcAttrs::default()
    }
}

impl Pair {
    /// Connected QPs with path MTU `mtu`; A starts at PSN `a_psn`, B at `b_psn`.
    fn new(mtu: usize, a_psn: u32, b_psn: u32) -> Pair {
        Pair::with(
            attrs(mtu, a_psn, b_psn, B_QPN),
            attrs(mtu, b_psn, a_psn, A_QPN),
        )
    }

    fn with(aa: RcAttrs, ba: RcAttrs) -> Pair {
        let (a_mrs, b_mrs) = (Arc::new(MrTable::new(16)), Arc::new(MrTable::new(16)));
        let mut a = RcCore::new(A_QPN, a_mrs.clone(), 64, 64);
        let mut b = RcCore::new(B_QPN, b_mrs.clone(), 64, 64);
        for (q, at) in [(&mut a, aa), (&mut b, ba)] {
            q.to_init(true, true).unwrap();
            q.to_rtr(at).unwrap();
            q.to_rts().unwrap();
        }
        Pair {
            a,
            b,
            a_mrs,
            b_mrs,
            now: 0,
            n_ab: 0,
            n_ba: 0,
            fate_ab: Box::new(|_, _| Fate::Deliver),
            fate_ba: Box::new(|_, _| Fate::Deliver),
            held_ab: None,
            held_ba: None,
        }
    }

    /// Moves packets until both sides are quiet, advancing the clock to the next timer
    /// when nothing is in flight; at most `steps` rounds.
    fn run(&mut self, steps: usize) {
        for _ in 0..steps {
            let ab: Vec<Vec<u8>> = self.a.take_out().iter().map(|p| encode(p, B_QPN)).collect();
            let ba: Vec<Vec<u8>> = self.b.take_out().iter().map(|p| encode(p, A_QPN)).collect();
            let moved = !ab.is_empty() || !ba.is_empty();
            for bytes in ab {
                self.carry(true, bytes);
            }
            for bytes in ba {
                self.carry(false, bytes);
            }
            if moved {
                continue;
            }
            // A packet held for reordering with nothing after it is lost.
            self.held_ab = None;
            self.held_ba = None;
            let next = [self.a.next_deadline(), self.b.next_deadline()]
                .into_iter()
                .flatten()
                .min();
            match next {
                Some(t) => {
                    self.now = self.now.max(t);
                    self.a.on_timer(self.now);
                    self.b.on_timer(self.now);
                }
                None => return,
            }
        }
        panic!("the pair did not settle");
    }

    fn carry(&mut self, to_b: bool, bytes: Vec<u8>) {
        let pkt = RocePacket::parse(&bytes).unwrap();
        let fate = if to_b {
            self.n_ab += 1;
            (self.fate_ab)(self.n_ab, &pkt)
        } else {
            self.n_ba += 1;
            (self.fate_ba)(self.n_ba, &pkt)
        };
        let deliver = |me: &mut Pair, b: &[u8]| {
            let p = RocePacket::parse(b).unwrap();
            rdma_wire::icrc::verify_for_udp_socket(
                std::net::Ipv4Addr::new(127, 0, 0, 1).into(),
                std::net::Ipv4Addr::new(127, 0, 0, 2).into(),
                4791,
                4791,
                b,
            )
            .unwrap();
            let now = me.now;
            if to_b {
                me.b.on_packet(now, &p);
            } else {
                me.a.on_packet(now, &p);
            }
        };
        match fate {
            Fate::Drop => {}
            Fate::Deliver => {
                deliver(self, &bytes);
                let held = if to_b {
                    self.held_ab.take()
                } else {
                    self.held_ba.take()
                };
                if let Some(h) = held {
                    deliver(self, &h);
                }
            }
            Fate::Duplicate => {
                deliver(self, &bytes);
                deliver(self, &bytes);
            }
            Fate::Delay => {
                let slot = if to_b {
                    &mut self.held_ab
                } else {
                    &mut self.held_ba
                };
                *slot = Some(bytes);
            }
        }
    }

    fn completions(q: &mut RcCore) -> Vec<Completion> {
        std::iter::from_fn(|| q.poll_cq()).collect()
    }
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(7).wrapping_add(seed))
        .collect()
}

fn send(wr_id: u64, data: Vec<u8>, imm: Option<u32>) -> SendWr {
    SendWr {
        wr_id,
        op: SendOp::Send { data, imm },
    }
}

fn write(wr_id: u64, mr: &MemoryRegion, off: u64, data: Vec<u8>, imm: Option<u32>) -> SendWr {
    SendWr {
        wr_id,
        op: SendOp::Write {
            data,
            remote_addr: mr.iova() + off,
            rkey: mr.key(),
            imm,
        },
    }
}

/// SEND with immediate over several packets across the 24-bit PSN wrap; both sides complete
/// once, in order, with the bytes.
#[test]
fn send_segmented_across_the_psn_wrap() {
    let mut p = Pair::new(256, psn::PSN_MASK - 1, psn::PSN_MASK - 2);
    for i in 0..3 {
        p.b.post_recv(100 + i, 4096).unwrap();
    }
    for i in 0..3u64 {
        p.a.post_send(
            0,
            send(i, pattern(1000 + i as usize, i as u8), Some(7 + i as u32)),
        )
        .unwrap();
    }
    p.run(100);
    let ca = Pair::completions(&mut p.a);
    let cb = Pair::completions(&mut p.b);
    assert_eq!(
        ca.iter().map(|c| (c.wr_id, c.status)).collect::<Vec<_>>(),
        [
            (0, WcStatus::Success),
            (1, WcStatus::Success),
            (2, WcStatus::Success)
        ]
    );
    for (i, c) in cb.iter().enumerate() {
        assert_eq!(c.wr_id, 100 + i as u64);
        assert_eq!(c.status, WcStatus::Success);
        assert_eq!(c.data, pattern(1000 + i, i as u8));
        assert_eq!(c.imm, Some(7 + i as u32));
    }
    assert_eq!(cb.len(), 3);
    let s = p.a.counters.snapshot();
    assert_eq!(s.tx_packets, 12, "4 packets of 256 bytes each");
    assert_eq!(s.tx_retransmits, 0);
    // ACKs coalesced: one per message.
    assert_eq!(p.b.counters.snapshot().tx_acks, 3);
    assert_eq!(p.a.una, psn::add(psn::PSN_MASK - 1, 12));
}

/// RDMA WRITE (64 KiB at 1024-byte MTU) lands in the remote region; WRITE with immediate
/// consumes a receive; RDMA READ brings a region's bytes back into a local region.
#[test]
fn write_and_read_through_regions() {
    let mut p = Pair::new(1024, 5, 9);
    let remote = p.b_mrs.register(0x10_0000, 128 << 10, Access::ALL).unwrap();
    let local = p.a_mrs.register(0x20_0000, 128 << 10, Access::ALL).unwrap();
    let data = pattern(64 << 10, 3);
    p.a.post_send(0, write(1, &remote, 0x100, data.clone(), None))
        .unwrap();
    p.b.post_recv(50, 0).unwrap();
    p.a.post_send(
        0,
        write(2, &remote, 0x1f000, b"tail".to_vec(), Some(0xbeef)),
    )
    .unwrap();
    p.a.post_send(
        0,
        SendWr {
            wr_id: 3,
            op: SendOp::Read {
                len: 10_000,
                remote_addr: remote.iova() + 0x100,
                rkey: remote.key(),
                lkey: local.key(),
                local_addr: local.iova() + 8,
            },
        },
    )
    .unwrap();
    p.run(200);
    assert_eq!(
        remote.read(remote.iova() + 0x100, data.len()).unwrap(),
        data
    );
    assert_eq!(remote.read(remote.iova() + 0x1f000, 4).unwrap(), b"tail");
    assert_eq!(
        local.read(local.iova() + 8, 10_000).unwrap(),
        data[..10_000]
    );
    let ca = Pair::completions(&mut p.a);
    assert_eq!(
        ca.iter()
            .map(|c| (c.wr_id, c.opcode, c.status))
            .collect::<Vec<_>>(),
        [
            (1, WcOpcode::RdmaWrite, WcStatus::Success),
            (2, WcOpcode::RdmaWrite, WcStatus::Success),
            (3, WcOpcode::RdmaRead, WcStatus::Success)
        ]
    );
    let cb = Pair::completions(&mut p.b);
    assert_eq!(cb.len(), 1);
    assert_eq!(
        (cb[0].wr_id, cb[0].opcode, cb[0].imm),
        (50, WcOpcode::RecvRdmaWithImm, Some(0xbeef))
    );
    assert_eq!(p.b.counters.snapshot().rx_bytes, (64 << 10) + 4);
}

/// A lost packet in the middle: the responder NAKs the gap once, the requester goes back and
/// the message completes once with the right bytes.
#[test]
fn loss_in_the_middle_is_repaired_by_a_sequence_nak() {
    let mut p = Pair::new(256, 100, 200);
    p.b.post_recv(1, 8192).unwrap();
    p.fate_ab = Box::new(|n, _| if n == 3 { Fate::Drop } else { Fate::Deliver });
    p.a.post_send(0, send(9, pattern(2000, 1), None)).unwrap();
    p.run(100);
    let cb = Pair::completions(&mut p.b);
    assert_eq!(cb.len(), 1);
    assert_eq!(cb[0].data, pattern(2000, 1));
    assert_eq!(Pair::completions(&mut p.a)[0].status, WcStatus::Success);
    let (sa, sb) = (p.a.counters.snapshot(), p.b.counters.snapshot());
    assert_eq!(sb.tx_naks, 1, "one NAK for the gap: {sb:?}");
    assert!(sb.rx_out_of_sequence >= 1);
    assert!(sa.tx_retransmits >= 6, "{sa:?}");
    assert_eq!(sa.timeouts, 0, "repaired without waiting");
}

/// The last packet (the one asking for the ACK) lost, then an ACK lost: the retransmission
/// timer repairs both; the duplicate is re-acknowledged, not delivered twice.
#[test]
fn lost_tail_and_lost_ack_are_repaired_by_the_timer() {
    let mut p = Pair::new(512, 0, 0);
    p.b.post_recv(1, 8192).unwrap();
    p.b.post_recv(2, 8192).unwrap();
    p.fate_ab = Box::new(|n, _| if n == 2 { Fate::Drop } else { Fate::Deliver });
    p.fate_ba = Box::new(|n, _| if n == 1 { Fate::Drop } else { Fate::Deliver });
    p.a.post_send(0, send(1, pattern(1000, 2), None)).unwrap();
    p.run(100);
    // First ACK lost: the requester timed out and sent again.
    assert_eq!(p.b.counters.snapshot().tx_acks, 2);
    p.a.post_send(p.now, send(2, pattern(10, 2), None)).unwrap();
    p.run(100);
    let cb = Pair::completions(&mut p.b);
    assert_eq!(cb.len(), 2, "each message delivered once");
    assert_eq!(cb[0].data, pattern(1000, 2));
    let sa = p.a.counters.snapshot();
    assert!(sa.timeouts >= 1, "{sa:?}");
    assert!(p.b.counters.snapshot().rx_duplicates >= 1);
    let ca = Pair::completions(&mut p.a);
    assert_eq!(
        ca.iter().filter(|c| c.status == WcStatus::Success).count(),
        2
    );
}

/// Duplicated and reordered packets: each message still arrives exactly once, intact.
#[test]
fn duplicates_and_reordering() {
    let mut p = Pair::new(256, 7, 7);
    for i in 0..4 {
        p.b.post_recv(i, 4096).unwrap();
    }
    p.fate_ab = Box::new(|n, _| match n {
        2 | 9 => Fate::Duplicate,
        4 | 11 => Fate::Delay,
        _ => Fate::Deliver,
    });
    p.fate_ba = Box::new(|n, _| {
        if n == 1 {
            Fate::Duplicate
        } else {
            Fate::Deliver
        }
    });
    for i in 0..4u64 {
        p.a.post_send(0, send(i, pattern(900, i as u8), None))
            .unwrap();
    }
    p.run(300);
    let cb = Pair::completions(&mut p.b);
    assert_eq!(cb.len(), 4);
    for (i, c) in cb.iter().enumerate() {
        assert_eq!(c.data, pattern(900, i as u8), "message {i}");
    }
    let ca = Pair::completions(&mut p.a);
    assert_eq!(ca.len(), 4);
    assert!(ca.iter().all(|c| c.status == WcStatus::Success));
    assert!(p.b.counters.snapshot().rx_duplicates >= 2);
}

/// A lost READ response: the requester asks again from the missing response (a partial
/// READ), and the local region ends up with the whole range.
#[test]
fn lost_read_response_is_asked_again_from_where_it_stopped() {
    let mut p = Pair::new(256, 1, 1);
    let remote = p.b_mrs.register(0x1000, 4096, Access::ALL).unwrap();
    let local = p.a_mrs.register(0x9000, 4096, Access::ALL).unwrap();
    assert!(remote.write(0x1000, &pattern(4096, 9)));
    p.fate_ba = Box::new(|n, _| if n == 5 { Fate::Drop } else { Fate::Deliver });
    p.a.post_send(
        0,
        SendWr {
            wr_id: 4,
            op: SendOp::Read {
                len: 3000,
                remote_addr: 0x1000,
                rkey: remote.key(),
                lkey: local.key(),
                local_addr: 0x9000,
            },
        },
    )
    .unwrap();
    p.run(200);
    assert_eq!(local.read(0x9000, 3000).unwrap(), pattern(4096, 9)[..3000]);
    let ca = Pair::completions(&mut p.a);
    assert_eq!((ca[0].status, ca.len()), (WcStatus::Success, 1));
    assert!(p.a.counters.snapshot().tx_retransmits >= 1);
}

/// Every packet lost: after the retry count's retransmissions the WR fails with
/// `RetryExcErr`, the QP goes to ERR and later WRs are flushed.
#[test]
fn retries_exhausted_fail_with_retry_exceeded_and_flush() {
    let mut aa = attrs(1024, 0, 0, B_QPN);
    aa.retry_count = 2;
    let mut p = Pair::with(aa, attrs(1024, 0, 0, A_QPN));
    p.fate_ab = Box::new(|_, _| Fate::Drop);
    p.a.post_send(0, send(1, vec![1; 10], None)).unwrap();
    p.a.post_send(0, send(2, vec![2; 10], None)).unwrap();
    p.run(100);
    let ca = Pair::completions(&mut p.a);
    assert_eq!(
        ca.iter().map(|c| (c.wr_id, c.status)).collect::<Vec<_>>(),
        [(1, WcStatus::RetryExcErr), (2, WcStatus::WrFlushErr)]
    );
    assert_eq!(p.a.state(), QpState::Err);
    assert_eq!(
        p.a.counters.snapshot().timeouts,
        3,
        "2 retries, then the failure"
    );
    p.a.post_send(0, send(3, vec![3], None)).unwrap();
    assert_eq!(p.a.poll_cq().unwrap().status, WcStatus::WrFlushErr);
}

/// No receive posted: RNR NAK, the requester waits the advertised RNR time and sends again;
/// with a receive posted meanwhile the message gets through. With RNR retry 1 and still no
/// receive: `RnrRetryExcErr`.
#[test]
fn rnr_nak_then_retry_then_exhaustion() {
    let mut p = Pair::new(256, 0, 0);
    p.a.post_send(0, send(1, pattern(300, 4), None)).unwrap();
    let out: Vec<Vec<u8>> = p.a.take_out().iter().map(|o| encode(o, B_QPN)).collect();
    for b in &out {
        p.b.on_packet(0, &RocePacket::parse(b).unwrap());
    }
    let nak = p.b.take_out();
    assert_eq!(
        nak.len(),
        1,
        "one RNR NAK, the MIDDLE/LAST are out of sequence and dropped"
    );
    assert_eq!(nak[0].aeth.unwrap().syndrome, 0x20 | 12);
    p.a.on_packet(0, &RocePacket::parse(&encode(&nak[0], A_QPN)).unwrap());
    assert_eq!(p.a.next_deadline(), Some(rnr_timer_us(12)));
    p.b.post_recv(77, 4096).unwrap();
    p.run(100);
    let cb = Pair::completions(&mut p.b);
    assert_eq!((cb[0].wr_id, cb[0].data.clone()), (77, pattern(300, 4)));
    assert_eq!(p.a.counters.snapshot().rnr_naks_received, 1);

    let mut aa = attrs(256, 0, 0, B_QPN);
    aa.rnr_retry = 1;
    let mut p = Pair::with(aa, attrs(256, 0, 0, A_QPN));
    p.a.post_send(0, send(1, vec![0; 10], None)).unwrap();
    p.run(100);
    let ca = Pair::completions(&mut p.a);
    assert_eq!(ca[0].status, WcStatus::RnrRetryExcErr);
    assert_eq!(p.b.counters.snapshot().rnr_naks_sent, 2);
}

/// Hostile remote accesses: a WRITE past the region's end, a wrong rkey, a READ of a region
/// without remote read — each refused with NAK remote-access-error (the requester completes
/// with `RemAccessErr`), counted, and nothing written.
#[test]
fn out_of_bounds_and_wrong_rkey_and_missing_access_are_refused() {
    for case in 0..3 {
        let mut p = Pair::new(1024, 0, 0);
        let mr = p
            .b_mrs
            .register(
                0x4000,
                2048,
                Access {
                    local_write: true,
                    remote_write: true,
                    remote_read: false,
                },
            )
            .unwrap();
        let local = p.a_mrs.register(0, 4096, Access::ALL).unwrap();
        let wr = match case {
            0 => write(1, &mr, 2000, vec![0xaa; 100], None),
            1 => SendWr {
                wr_id: 1,
                op: SendOp::Write {
                    data: vec![0xaa; 10],
                    remote_addr: 0x4000,
                    rkey: mr.key() ^ 0x0100_0000,
                    imm: None,
                },
            },
            _ => SendWr {
                wr_id: 1,
                op: SendOp::Read {
                    len: 16,
                    remote_addr: 0x4000,
                    rkey: mr.key(),
                    lkey: local.key(),
                    local_addr: 0,
                },
            },
        };
        p.a.post_send(0, wr).unwrap();
        p.run(50);
        let ca = Pair::completions(&mut p.a);
        assert_eq!(ca[0].status, WcStatus::RemAccessErr, "case {case}");
        assert_eq!(p.b.counters.snapshot().rx_access_refused, 1, "case {case}");
        assert_eq!(p.b.state(), QpState::Err);
        assert!(mr.read(0x4000, 2048).unwrap().iter().all(|&b| b == 0));
    }
}

/// Atomics are refused explicitly: NAK invalid request, counted.
#[test]
fn atomics_are_refused_with_nak_invalid_request() {
    let mut p = Pair::new(1024, 0, 0);
    let pkt = RocePacket {
        bth: rdma_wire::Bth {
            opcode: opcode::RC_FETCH_ADD,
            dest_qp: B_QPN,
            psn: 0,
            ack_req: true,
            p_key: 0xffff,
            ..rdma_wire::Bth::default()
        },
        deth: None,
        reth: None,
        atomic_eth: Some(rdma_wire::AtomicEth {
            virtual_address: 0,
            r_key: 1,
            swap_add: 1,
            compare: 0,
        }),
        aeth: None,
        atomic_ack_eth: None,
        imm_dt: None,
        ieth: None,
        payload: &[],
        padding: &[],
        icrc: 0,
    };
    assert!(p.b.on_packet(0, &pkt));
    let out = p.b.take_out();
    assert_eq!(out[0].aeth.unwrap().syndrome, 0x61);
    assert_eq!(p.b.counters.snapshot().atomics_refused, 1);
}

/// The state machine: sends need RTS, SQD finishes what started and holds the rest, ERR
/// flushes receives too, RESET clears.
#[test]
fn state_machine() {
    let mrs = Arc::new(MrTable::new(1));
    let mut q = RcCore::new(1, mrs, 4, 4);
    assert!(q.post_send(0, send(1, vec![], None)).is_err(), "RESET");
    assert!(q.to_rts().is_err());
    q.to_init(true, false).unwrap();
    q.post_recv(5, 10).unwrap();
    assert!(q.post_send(0, send(1, vec![], None)).is_err(), "INIT");
    assert!(q
        .to_rtr(RcAttrs {
            path_mtu: 300,
            ..RcAttrs::default()
        })
        .is_err());
    q.to_rtr(RcAttrs::default()).unwrap();
    q.to_rts().unwrap();
    q.to_sqd().unwrap();
    q.post_send(0, send(1, vec![1], None)).unwrap();
    assert!(!q.has_out(), "SQD starts nothing");
    assert!(q.drained());
    q.to_rts().unwrap();
    q.post_send(0, send(2, vec![2], None)).unwrap();
    assert_eq!(q.take_out().len(), 2);
    q.to_err();
    let c: Vec<_> = std::iter::from_fn(|| q.poll_cq())
        .map(|c| (c.wr_id, c.status))
        .collect();
    assert_eq!(
        c,
        [
            (1, WcStatus::WrFlushErr),
            (2, WcStatus::WrFlushErr),
            (5, WcStatus::WrFlushErr)
        ]
    );
    q.reset();
    assert_eq!(q.state(), QpState::Reset);
    for code in 1..=5 {
        assert_eq!(mtu_code(mtu_of_code(code).unwrap()), Some(code));
    }
}

/// The RC frames of the real captures (rping: SEND, READ request/responses, WRITE, ACK;
/// ucmatose: SENDs) parse, and their ACK syndromes read as ACKs.
#[test]
fn rc_frames_of_the_real_captures_parse() {
    for (name, file) in [
        (
            "rping",
            &include_bytes!("../../../rdma-wire/testdata/rping.pcap")[..],
        ),
        (
            "ucmatose",
            &include_bytes!("../../../rdma-wire/testdata/ucmatose.pcap")[..],
        ),
    ] {
        let mut rc = 0;
        let mut ops = std::collections::BTreeSet::new();
        for f in rc_frames(file) {
            let pkt = RocePacket::parse(&f.payload).unwrap_or_else(|e| panic!("{name}: {e}"));
            rc += 1;
            ops.insert(pkt.bth.opcode);
            if let Some(aeth) = pkt.aeth {
                assert_eq!(aeth.syndrome >> 5, 0, "{name}: an ACK");
            }
        }
        assert!(rc > 5, "{name}: {rc} RC frames");
        if name == "rping" {
            for op in [
                opcode::RC_SEND_ONLY,
                opcode::RC_RDMA_READ_REQUEST,
                opcode::RC_ACKNOWLEDGE,
            ] {
                assert!(ops.contains(&op), "rping has {op:#x}: {ops:?}");
            }
        }
    }
}

/// One RC frame of a capture: addresses, headers, UDP payload.
struct CapFrame {
    src: [u8; 4],
    ip: Vec<u8>,
    udp: Vec<u8>,
    payload: Vec<u8>,
}

fn rc_frames(file: &[u8]) -> Vec<CapFrame> {
    let mut v = Vec::new();
    let mut at = 24;
    while at + 16 <= file.len() {
        let len = u32::from_le_bytes(file[at + 8..at + 12].try_into().unwrap()) as usize;
        let f = &file[at + 16..at + 16 + len];
        at += 16 + len;
        if f.len() < 42 || f[12..14] != [8, 0] || f[23] != 17 || f[36..38] != [0x12, 0xb7] {
            continue;
        }
        let pkt = RocePacket::parse(&f[42..]).unwrap();
        if opcode::transport(pkt.bth.opcode) == opcode::Transport::Rc && pkt.bth.dest_qp != 1 {
            v.push(CapFrame {
                src: f[26..30].try_into().unwrap(),
                ip: f[14..34].to_vec(),
                udp: f[34..42].to_vec(),
                payload: f[42..].to_vec(),
            });
        }
    }
    v
}

fn is_response(op: u8) -> bool {
    matches!(
        op,
        opcode::RC_ACKNOWLEDGE
            | opcode::RC_RDMA_READ_RESPONSE_FIRST
            | opcode::RC_RDMA_READ_RESPONSE_MIDDLE
            | opcode::RC_RDMA_READ_RESPONSE_LAST
            | opcode::RC_RDMA_READ_RESPONSE_ONLY
    )
}

/// Linux rxe's requests from the real rping capture, fed to this responder in each
/// direction: every answer (ACK with its MSN, READ RESPONSE with its data) is the packet rxe
/// sent, byte for byte — ICRC included, computed over the captured frame's IPv4/UDP headers.
#[test]
fn answers_to_rxe_requests_are_the_packets_rxe_sent() {
    let rping = replay(include_bytes!("../../../rdma-wire/testdata/rping.pcap"));
    assert!(rping >= 10, "rping: {rping} answers compared");
    // ucmatose: two connections at once, SENDs both ways.
    let ucmatose = replay(include_bytes!("../../../rdma-wire/testdata/ucmatose.pcap"));
    assert!(ucmatose >= 4, "ucmatose: {ucmatose} answers compared");
}

/// Replays every (requester address, responder QPN) stream of RC requests of a capture into
/// a fresh responder and compares its answers with the capture's; the number compared.
fn replay(file: &[u8]) -> usize {
    let frames = rc_frames(file);
    let pkt = |f: &CapFrame| RocePacket::parse(&f.payload).unwrap().bth;
    let streams: std::collections::BTreeSet<([u8; 4], u32)> = frames
        .iter()
        .filter(|f| !is_response(f.payload[0]))
        .map(|f| (f.src, pkt(f).dest_qp))
        .collect();
    let mut checked = 0;
    for (requester, qpn) in &streams {
        let reqs: Vec<&CapFrame> = frames
            .iter()
            .filter(|f| f.src == *requester && !is_response(f.payload[0]))
            .filter(|f| pkt(f).dest_qp == *qpn)
            .collect();
        let psns: std::collections::BTreeSet<u32> = reqs.iter().map(|f| pkt(f).psn).collect();
        let resps: Vec<&CapFrame> = frames
            .iter()
            .filter(|f| f.src != *requester && is_response(f.payload[0]))
            .filter(|f| {
                // Answers carry a request's PSN (READ responses: the request's and after).
                let p = pkt(f).psn;
                psns.range(..=p)
                    .next_back()
                    .is_some_and(|q| psn::diff(p, *q) < 64)
            })
            .collect();
        let first = RocePacket::parse(&reqs[0].payload).unwrap();
        // Regions as the capture names them; before each READ they get what its responses
        // carried.
        let mrs = Arc::new(MrTable::new(8));
        let mut spans: std::collections::BTreeMap<u32, (u64, u64)> = Default::default();
        for f in &reqs {
            if let Some(r) = RocePacket::parse(&f.payload).unwrap().reth {
                let e = spans.entry(r.r_key).or_insert((u64::MAX, 0));
                e.0 = e.0.min(r.virtual_address);
                e.1 = e.1.max(r.virtual_address + u64::from(r.dma_length));
            }
        }
        let regions: std::collections::BTreeMap<u32, Arc<MemoryRegion>> = spans
            .iter()
            .map(|(k, (lo, hi))| {
                let data = vec![0u8; (hi - lo) as usize];
                (*k, mrs.register_with_key(*k, *lo, data, Access::ALL))
            })
            .collect();
        // What rxe's READ responses to `p` carried: the region held it at that moment.
        let read_data = |p: &RocePacket<'_>| -> Vec<u8> {
            let r = p.reth.unwrap();
            resps
                .iter()
                .map(|x| RocePacket::parse(&x.payload).unwrap())
                .filter(|x| {
                    let d = psn::diff(x.bth.psn, p.bth.psn);
                    x.bth.opcode != opcode::RC_ACKNOWLEDGE
                        && d >= 0
                        && d < r.dma_length.div_ceil(1024).max(1) as i32
                })
                .flat_map(|x| x.payload.to_vec())
                .collect()
        };
        let mut q = RcCore::new(0x11, mrs, 64, 64);
        q.to_init(true, true).unwrap();
        q.to_rtr(RcAttrs {
            path_mtu: 1024,
            dest_qpn: first.bth.dest_qp,
            rq_psn: first.bth.psn,
            ..RcAttrs::default()
        })
        .unwrap();
        for i in 0..32 {
            q.post_recv(i, 4096).unwrap();
        }
        let mut ours = Vec::new();
        for f in &reqs {
            let p = RocePacket::parse(&f.payload).unwrap();
            if p.bth.opcode == opcode::RC_RDMA_READ_REQUEST {
                let r = p.reth.unwrap();
                assert!(regions[&r.r_key].write(r.virtual_address, &read_data(&p)));
            }
            q.on_packet(0, &p);
            ours.extend(q.take_out());
        }
        assert_eq!(ours.len(), resps.len(), "as many answers as rxe sent");
        for (o, theirs) in ours.iter().zip(&resps) {
            let mut buf = vec![0u8; 8192];
            let dqpn = RocePacket::parse(&theirs.payload).unwrap().bth.dest_qp;
            let pkt = to_roce(o, dqpn, 0xffff);
            let len = pkt.encode(&theirs.ip, &theirs.udp, &mut buf).unwrap();
            assert_eq!(
                &buf[..len],
                &theirs.payload[..],
                "answer to PSN {:#x}",
                o.psn
            );
            checked += 1;
        }
        let s = q.counters.snapshot();
        assert_eq!(
            s.rx_invalid + s.rx_access_refused + s.rx_out_of_sequence,
            0,
            "{s:?}"
        );
    }
    checked
}

/// A duplicate READ is answered again only when it repeats a READ executed lately; an old
/// PSN with a made-up range gets nothing (counted).
#[test]
fn duplicate_reads_are_answered_only_for_recent_reads() {
    let mut p = Pair::new(1024, 50, 60);
    let remote = p.b_mrs.register(0x1000, 8192, Access::ALL).unwrap();
    let local = p.a_mrs.register(0x1000, 8192, Access::ALL).unwrap();
    let read = SendWr {
        wr_id: 1,
        op: SendOp::Read {
            len: 3000,
            remote_addr: 0x1000,
            rkey: remote.key(),
            lkey: local.key(),
            local_addr: 0x1000,
        },
    };
    p.a.post_send(0, read).unwrap();
    let req = p.a.take_out();
    assert_eq!(req.len(), 1);
    let bytes = encode(&req[0], B_QPN);
    let pkt = RocePacket::parse(&bytes).unwrap();
    p.b.on_packet(0, &pkt);
    assert_eq!(p.b.take_out().len(), 3, "3 responses");
    // The same request again (its responses were lost): answered again.
    p.b.on_packet(0, &pkt);
    assert_eq!(p.b.take_out().len(), 3);
    // The same PSN naming the whole region instead: dropped.
    let mut forged = req[0].clone();
    forged.reth = Some(rdma_wire::Reth {
        virtual_address: 0x1000,
        r_key: remote.key(),
        dma_length: 8192,
    });
    let fb = encode(&forged, B_QPN);
    p.b.on_packet(0, &RocePacket::parse(&fb).unwrap());
    assert!(p.b.take_out().is_empty());
    let s = p.b.counters.snapshot();
    assert_eq!((s.rx_duplicates, s.rx_unknown_duplicate_reads), (2, 1));
}

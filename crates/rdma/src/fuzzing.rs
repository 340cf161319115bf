//! Entry points for the coverage-guided fuzzer (`fuzz/` at the top of the repository) and for
//! the corpus replay test that runs the same bodies on the stable toolchain. Not an API.
//!
//! Inputs are sequences of records `[control: u8][length: u16 LE][bytes]` ([`Records`]);
//! the corpora seed them with the UDP payloads of real SoftRoCE captures.
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rdma_wire::fuzz_records::Records;
use rdma_wire::{icrc, CmMessage, Gid, Mad, RocePacket, ROCEV2_UDP_PORT};

use crate::addr::{grh_area, GRH_LEN};
use crate::cm::{AcceptMode, CmConfig, CmEndpoint, ListenOptions, ManualClock};
use crate::mux::{Backpressure, Multiplexer, MuxConfig, Qp1Sink};
use crate::port::Qp1Tx;
use crate::rc::{mtu_of_code, Access, RcAttrs, RcCore, SendOp, SendWr};
use crate::RdmaError;

/// The addresses of the captures (10.11.0.1 server, 10.11.0.2 client), a third host, and
/// the rdma_cm spelling (`::a.b.c.d`) of the server.
fn gids() -> [Gid; 4] {
    let v4 = |d| Gid::from_ipv4(Ipv4Addr::new(10, 11, 0, d));
    let mut zero_padded = [0u8; 16];
    zero_padded[12..].copy_from_slice(&[10, 11, 0, 1]);
    [v4(1), v4(2), v4(3), Gid::from_bytes(zero_padded)]
}

/// Sends nowhere; fails every `fail_every`-th send (a full socket, an unreachable peer).
#[derive(Default)]
struct NullTx {
    sends: AtomicUsize,
}

impl Qp1Tx for NullTx {
    fn send_gsi(&self, _sgid: Gid, _dgid: Gid, _mad: &Mad) -> Result<(), RdmaError> {
        let n = self.sends.fetch_add(1, Ordering::Relaxed);
        if n % 5 == 4 {
            return Err(RdmaError::io(
                "sending (fuzz)".to_string(),
                std::io::Error::from(std::io::ErrorKind::WouldBlock),
            ));
        }
        Ok(())
    }
}

/// A VM's QP1 with room for a few MADs; `poll` frees it.
#[derive(Default)]
struct Sink {
    held: AtomicUsize,
}

impl Qp1Sink for Sink {
    fn deliver(&self, _grh: &[u8; GRH_LEN], _mad: &Mad) -> Result<(), Backpressure> {
        if self.held.fetch_add(1, Ordering::Relaxed) >= 3 {
            self.held.fetch_sub(1, Ordering::Relaxed);
            return Err(Backpressure);
        }
        Ok(())
    }
}

/// Everything the codecs offer on one UDP payload: ICRC check, RoCE parse and re-encode,
/// MAD and CM decode and re-encode, rdma_cm private data.
fn decode(sgid: Gid, dgid: Gid, udp: &[u8]) -> Option<RocePacket<'_>> {
    let (src, dst) = (sgid.to_ip(), dgid.to_ip());
    let _ = icrc::verify_for_udp_socket_any_ip_id(src, dst, 0xc000, ROCEV2_UDP_PORT, udp);
    let pkt = RocePacket::parse(udp).ok()?;
    let _ = pkt.check_consistency();
    let mut buf = [0u8; 9000];
    if let Ok(n) = pkt.encode_with_stored_icrc(&mut buf) {
        // What parsed re-encodes to something that parses again.
        assert!(
            RocePacket::parse(&buf[..n]).is_ok(),
            "a parsed packet re-encodes to one that does not parse"
        );
    }
    let _ = pkt.encode_for_udp_socket(src, dst, 0xc000, ROCEV2_UDP_PORT, &mut buf);
    if let Some(mad) = pkt.mad() {
        if let Ok(msg) = CmMessage::parse_mad(mad) {
            let again = msg.to_mad();
            let _ = CmMessage::parse_mad(&again);
            let _ = rdma_wire::rdma_cm::CmaHeader::parse(msg.private_data());
            let _ = msg.service_id().map(rdma_wire::rdma_cm::parse_service_id);
        }
    }
    Some(pkt)
}

/// RoCEv2 parsing, MAD/CM decoding, the multiplexer's inbound (`route`) and outbound
/// (`send_from_vm`) paths, and a CM endpoint behind it. Each record is one UDP payload;
/// its control byte picks the source and destination address (bits 0–1, 2–3), the direction
/// (bit 4: outbound from the VM owning the source), and housekeeping (bit 5: the VMs take
/// their queued MADs; bit 6: time passes and the endpoint's timers run; bit 7: a VM detaches
/// and attaches again).
pub fn roce_mux(data: &[u8]) {
    let g = gids();
    let cfg = MuxConfig {
        queue_depth: 4,
        max_connections_per_vm: 8,
        timewait: Duration::from_millis(10),
        ..MuxConfig::default()
    };
    let max_conns = cfg.max_connections_per_vm;
    let mux = Multiplexer::new(cfg, Arc::new(NullTx::default()));
    let sinks = [Arc::new(Sink::default()), Arc::new(Sink::default())];
    for (vm, s) in sinks.iter().enumerate() {
        let _ = mux.attach_vm(vm as u32 + 1, s.clone());
        let _ = mux.register_gid(vm as u32 + 1, g[vm]);
    }
    let clock = Arc::new(ManualClock::new());
    let ep = CmEndpoint::with_clock(
        g[0],
        CmConfig {
            first_comm_id: Some(0x1000),
            ..CmConfig::fast()
        },
        Arc::new(NullTx::default()),
        clock.clone(),
    );
    for (ctl, udp) in Records(data) {
        let (sgid, dgid) = (g[(ctl & 3) as usize], g[(ctl >> 2 & 3) as usize]);
        if let Some(pkt) = decode(sgid, dgid, udp) {
            if let Some(mad) = pkt.mad() {
                if ctl & 0x10 != 0 {
                    let vm = if sgid.canonical() == g[1] { 2 } else { 1 };
                    let _ = mux.send_from_vm(vm, sgid, dgid, mad);
                } else {
                    let grh = grh_area(sgid, dgid, udp.len());
                    let _ = mux.route(sgid, dgid, &grh, mad);
                    if let Ok(msg) = CmMessage::parse_mad(mad) {
                        if let Some(sid) = msg.service_id() {
                            let accept = AcceptMode::Auto;
                            ep.listen(
                                sid,
                                ListenOptions {
                                    qpn: 0x11,
                                    qkey: 0,
                                    accept,
                                },
                            );
                        }
                    }
                    ep.on_mad(sgid, dgid, mad);
                }
            }
        }
        if ctl & 0x20 != 0 {
            for (vm, s) in sinks.iter().enumerate() {
                s.held.store(0, Ordering::Relaxed);
                mux.poll_pending(vm as u32 + 1);
            }
        }
        if ctl & 0x40 != 0 {
            clock.advance(Duration::from_millis(500));
            ep.run_timers();
        }
        if ctl == 0xff {
            let _ = mux.detach_vm(2);
            let _ = mux.attach_vm(2, sinks[1].clone());
            let _ = mux.register_gid(2, g[1]);
        }
        for vm in 1..=2 {
            let n = mux.connections(vm).len();
            assert!(n <= 2 * max_conns, "VM {vm} has {n} connection entries");
        }
    }
    ep.shutdown();
}

/// Header of an [`rc_responder`] input: path MTU code, the PSNs, access flags and the
/// region a peer may target.
const RC_HEADER: usize = 23;

/// The RC transport (responder and requester) of QP 0x11 in RTS, fed packets from a hostile
/// peer against a registered region. The input starts with [`RC_HEADER`] bytes: MTU code (1),
/// expected PSN (3, big-endian), our PSN (4, big-endian; 24 bits used), access flags (1: bit 0
/// remote write, bit 1 remote read), rkey (4, LE), region address (8, LE), region length (2,
/// LE); then records: control 0 a packet (UDP payload), 1 post a receive, 2 post a SEND, 3 post
/// an RDMA READ, 4 post an RDMA WRITE, 5 time passes (timers), 6 the QP goes to the error
/// state, anything else drains the completion queue and the outgoing packets.
pub fn rc_responder(data: &[u8]) {
    let Some((h, rest)) = data.split_first_chunk::<RC_HEADER>() else {
        return;
    };
    let be24 = |b: &[u8]| u32::from_be_bytes([0, b[0], b[1], b[2]]);
    let mtu = mtu_of_code(h[0]).unwrap_or(1024);
    let rq_psn = be24(&h[1..4]);
    let sq_psn = be24(&h[5..8]);
    let (remote_write, remote_read) = (h[8] & 1 != 0, h[8] & 2 != 0);
    let rkey = u32::from_le_bytes([h[9], h[10], h[11], h[12]]);
    let iova = u64::from_le_bytes(h[13..21].try_into().unwrap_or([0; 8]));
    let len = u16::from_le_bytes([h[21], h[22]]) as usize;

    let mrs = Arc::new(crate::rc::MrTable::new(4));
    let access = Access {
        local_write: true,
        remote_write,
        remote_read,
    };
    let _ = mrs.register_with_key(rkey, iova, vec![0x5a; len], access);
    let mut qp = RcCore::new(0x11, mrs, 8, 8);
    let attrs = RcAttrs {
        path_mtu: mtu,
        dest_qpn: 0x11,
        rq_psn,
        sq_psn,
        timeout_us: 1000,
        max_inflight: 8,
        ..RcAttrs::default()
    };
    if qp.to_init(true, true).is_err() || qp.to_rtr(attrs).is_err() || qp.to_rts().is_err() {
        return;
    }
    let mut now = 0u64;
    let mut wr_id = 0u64;
    // Work requests posted and completions taken: every completion is a posted request's.
    let (mut posted, mut polled) = (0u64, 0u64);
    for (ctl, bytes) in Records(rest) {
        wr_id += 1;
        let small = bytes.len() as u32;
        match ctl {
            0 => {
                if let Ok(pkt) = RocePacket::parse(bytes) {
                    qp.on_packet(now, &pkt);
                }
            }
            1 => {
                posted += u64::from(qp.post_recv(wr_id, bytes.len() * 64).is_ok());
            }
            2 => {
                let op = SendOp::Send {
                    data: bytes.to_vec(),
                    imm: None,
                };
                posted += u64::from(qp.post_send(now, SendWr { wr_id, op }).is_ok());
            }
            3 => {
                let op = SendOp::Read {
                    len: small * 97,
                    remote_addr: iova,
                    rkey,
                    lkey: rkey,
                    local_addr: iova,
                };
                posted += u64::from(qp.post_send(now, SendWr { wr_id, op }).is_ok());
            }
            4 => {
                let op = SendOp::Write {
                    data: bytes.to_vec(),
                    remote_addr: iova.wrapping_add(small as u64),
                    rkey,
                    imm: bytes.first().map(|&b| b as u32),
                };
                posted += u64::from(qp.post_send(now, SendWr { wr_id, op }).is_ok());
            }
            5 => {
                now += 1 + u64::from(small) * 1000;
                qp.on_timer(now);
            }
            6 => qp.to_err(),
            _ => {
                let _ = qp.take_out();
                while qp.poll_cq().is_some() {
                    polled += 1;
                }
            }
        }
        // Bounded by what the application posted, no matter what the peer sends.
        assert!(
            polled + qp.cq_len() as u64 <= posted,
            "{} completions for {posted} work requests",
            polled + qp.cq_len() as u64
        );
        let out = qp.take_out();
        assert!(
            out.len() <= 4096,
            "{} packets out after one step",
            out.len()
        );
    }
}

//! The RDMA agent: a CM endpoint on the PVRDMA device's QP1 and a UD queue pair.
//!
//! - `rdma-server`: binds its GID, answers REQ with REP (naming its UD QP), takes RTU,
//!   answers SIDR_REQ with SIDR_REP (UD QPN and Q_Key), echoes every UD message to its
//!   sender, answers DREQ with DREP. Exits 0 after `messages` disconnects (0: until the VMM
//!   asks it to stop).
//! - `rdma-client`: REQ → REP → RTU to the peer's RC service, SIDR_REQ → SIDR_REP for its UD
//!   service, `messages` UD messages (the pattern of `ferry rdma peer`) each echoed back and
//!   verified, then DREQ → DREP. Prints the connection setup time and the message rate.
//!   Variants: `BIND_OTHER` tries to bind another VM's GID, `SPOOF` sends a REQ claiming
//!   another GID as its source; both expect a refusal (exit status `RDMA_REFUSED`).
//!
//! The CM messages are rdma-wire's codecs; the state kept is the little a UD service needs.
//! `--rdma-mode rping|ucmatose|write-bw` run over RC queue pairs instead ([`rc`]).
use core::net::{IpAddr, Ipv4Addr};

use guest_abi::{
    params::{status, OFF_STOP_REQ},
    rdma_mode, BootParams, RdmaArgs,
};
use pvrdma_abi::{self as abi, qp_type};
use rdma_wire::{
    cm::{Drep, Dreq, Rep, Req, Rtu, SidrRep, SidrReq},
    mad::attr,
    rdma_cm::{service_id, CmaHeader, PortSpace, RDMA_CM_UD_QKEY},
    CmMessage, Gid, MadHeader, GSI_QKEY, MAD_SIZE,
};

mod rc;

use crate::{
    clock, params, println,
    pvrdma::{alloc_pages, read_bytes, write_bytes, Cq, Device, Qp, RQ_WQES},
};

const GRH: u64 = 40;
const GSI_RBUF: u64 = 512;
const UD_BUF: u64 = 4096;
/// The UD QP's send and receive slots: the whole window of the UD stream (`UD_WINDOW`), and
/// a burst of echoes to it, post before one exit sends them.
const UD_SQ_WQES: u32 = 64;
/// Messages in flight in the client's verified UD stream (`ferry bench vrdma`'s peers use
/// the same window); at most 64 (its bookkeeping).
const UD_WINDOW: u64 = 32;
const UD_RQ_WQES: u32 = 64;
/// Largest UD message the agent sends.
pub const MAX_MSG: u32 = 2048;

fn v4(a: u32) -> Ipv4Addr {
    Ipv4Addr::from(a)
}

fn gid_of(a: u32) -> Gid {
    Gid::from_ipv4(v4(a))
}

fn now_us() -> u64 {
    clock::ticks_to_us(clock::rdtsc())
}

fn stop_requested() -> bool {
    params::read32(OFF_STOP_REQ) != 0
}

/// A small pseudo-random number (communication IDs, transaction IDs, PSNs).
fn random(salt: u32) -> u32 {
    let t = clock::rdtsc();
    let x = (t ^ (t >> 29) ^ salt as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    ((x >> 32) as u32) | 1
}

/// The payload of UD message `seq` (`ferry rdma peer`'s pattern).
fn pattern_byte(seq: u64, i: usize) -> u8 {
    if i < 8 {
        seq.to_be_bytes()[i]
    } else {
        (seq as usize).wrapping_mul(31).wrapping_add(i) as u8
    }
}

/// Source GID from a receive buffer's GRH area (IPv4 header in its last 20 bytes for
/// RoCEv2 over IPv4, else an IPv6-style GRH).
fn grh_sgid(grh: &[u8; 40]) -> Gid {
    if grh[20] >> 4 == 4 {
        Gid::from_ipv4(Ipv4Addr::new(grh[32], grh[33], grh[34], grh[35]))
    } else {
        let mut g = [0u8; 16];
        g.copy_from_slice(&grh[8..24]);
        Gid(g).canonical()
    }
}

struct Agent {
    dev: Device,
    pd: u32,
    lkey: u32,
    me: Gid,
    gsi: Qp,
    gsi_scq: Cq,
    gsi_rcq: Cq,
    gsi_rbufs: u64,
    gsi_sbuf: u64,
    ud: Qp,
    ud_scq: Cq,
    ud_rcq: Cq,
    ud_rbufs: u64,
    ud_sbufs: u64,
    ud_send_errors: u64,
    /// The status of a QP1 send the device failed (sends are unsignaled: only failures
    /// complete), until taken.
    gsi_error: Option<u32>,
    /// When polling last started finding nothing (0: it found something last time).
    idle_since: u64,
    /// Sends were posted since the last exit: the next idle call exits at once, which
    /// sends them (the device runs the queues on the exiting vCPU).
    unsent: bool,
}

/// Polling that finds nothing for this long waits in the device instead (one VM exit, about
/// 28 µs here): spinning longer would only take the CPU from the port's receive threads and
/// the other vCPUs that are to produce the next completion (and a thread that spun is the
/// last the scheduler wakes).
const IDLE_SPIN_US: u64 = 10;

enum Setup {
    NoDevice,
    Failed(&'static str, u8),
}

impl Agent {
    /// Opens the device and binds `me` at GID index 0. `Err` says what failed.
    fn open(me: Gid) -> Result<Agent, Setup> {
        let dev = Device::open().ok_or(Setup::NoDevice)?;
        dev.bind(0, me.0)
            .map_err(|e| Setup::Failed("CREATE_BIND", e))?;
        Self::build(dev, me)
    }

    fn build(dev: Device, me: Gid) -> Result<Agent, Setup> {
        let f = |what| move |e| Setup::Failed(what, e);
        let pd = dev.create_pd().map_err(f("CREATE_PD"))?;
        let lkey = dev.dma_mr(pd).map_err(f("CREATE_MR"))?;
        let gsi_scq = dev.create_cq().map_err(f("CREATE_CQ"))?;
        let gsi_rcq = dev.create_cq().map_err(f("CREATE_CQ"))?;
        let gsi = dev
            .create_qp(pd, &gsi_scq, &gsi_rcq, qp_type::GSI)
            .map_err(f("CREATE_QP (GSI)"))?;
        let ud_scq = dev.create_cq().map_err(f("CREATE_CQ"))?;
        let ud_rcq = dev.create_cq().map_err(f("CREATE_CQ"))?;
        let ud = dev
            .create_qp_sized(pd, &ud_scq, &ud_rcq, qp_type::UD, UD_SQ_WQES, UD_RQ_WQES)
            .map_err(f("CREATE_QP (UD)"))?;
        dev.datagram_rts(&ud, qp_type::UD)
            .map_err(f("MODIFY_QP (UD)"))?;
        let gsi_rbufs = alloc_pages(RQ_WQES as u64 * GSI_RBUF / 4096);
        let gsi_sbuf = alloc_pages(1);
        let ud_rbufs = alloc_pages(UD_RQ_WQES as u64 * UD_BUF / 4096);
        let ud_sbufs = alloc_pages(UD_SQ_WQES as u64 * UD_BUF / 4096);
        for i in 0..RQ_WQES as u64 {
            gsi.post_recv(i, gsi_rbufs + i * GSI_RBUF, GSI_RBUF as u32, lkey);
        }
        for i in 0..UD_RQ_WQES as u64 {
            ud.post_recv(i, ud_rbufs + i * UD_BUF, UD_BUF as u32, lkey);
        }
        Ok(Agent {
            dev,
            pd,
            lkey,
            me,
            gsi,
            gsi_scq,
            gsi_rcq,
            gsi_rbufs,
            gsi_sbuf,
            ud,
            ud_scq,
            ud_rcq,
            ud_rbufs,
            ud_sbufs,
            ud_send_errors: 0,
            gsi_error: None,
            idle_since: 0,
            unsent: false,
        })
    }

    /// Polling found work.
    fn busy(&mut self) {
        self.idle_since = 0;
    }

    /// Polling found nothing. Sends posted since the last exit go out now, in the same exit
    /// as the wait that follows (the device runs the queues on the exiting vCPU, then
    /// waits); otherwise after `IDLE_SPIN_US` of finding nothing, waits in the device until
    /// a completion arrives or at most 5 ms pass (after a timeout the next idle
    /// call waits again at once).
    fn idle(&mut self) {
        self.reap_sends();
        let t = now_us();
        if self.unsent {
            self.unsent = false;
            self.dev.idle_wait();
            self.idle_since = 0;
        } else if self.idle_since == 0 {
            self.idle_since = t;
        } else if t - self.idle_since >= IDLE_SPIN_US {
            if self.dev.idle_wait() != 0 {
                self.idle_since = 0;
            }
        } else {
            core::hint::spin_loop();
        }
    }

    /// Posts a MAD on QP1 (unsignaled: only a failure completes) to go out with the next
    /// exit; `Err(status)` if the send queue stays full or an earlier send failed.
    fn post_mad(&mut self, dgid: Gid, mad: &[u8; MAD_SIZE]) -> Result<(), u32> {
        if let Some(s) = self.take_gsi_error() {
            return Err(s);
        }
        let t0 = now_us();
        let slot = loop {
            if let Some(s) = self.gsi.sq_free_slot() {
                break s;
            }
            if now_us() - t0 > 2_000_000 {
                return Err(abi::wc_status::GENERAL_ERR);
            }
            self.unsent = true;
            self.idle();
        };
        // One 256-byte buffer per send queue slot (16 in the page).
        let at = self.gsi_sbuf + slot as u64 * MAD_SIZE as u64;
        write_bytes(at, mad);
        if !self.gsi.post_send_ex(
            slot as u64,
            at,
            MAD_SIZE as u32,
            self.lkey,
            dgid.0,
            1,
            GSI_QKEY,
            0,
            None,
            false,
        ) {
            return Err(abi::wc_status::GENERAL_ERR);
        }
        self.unsent = true;
        Ok(())
    }

    /// Sends a MAD from QP1 now (one exit) and waits until the device took it;
    /// `Err(status)` if the device (or the multiplexer behind it) refused it.
    fn send_mad(&mut self, dgid: Gid, mad: &[u8; MAD_SIZE]) -> Result<(), u32> {
        self.post_mad(dgid, mad)?;
        self.unsent = false;
        self.dev.send_now();
        let t0 = now_us();
        while !self.gsi.sq_idle() {
            if now_us() - t0 > 2_000_000 {
                return Err(abi::wc_status::GENERAL_ERR);
            }
            self.idle();
        }
        self.reap_sends();
        match self.take_gsi_error() {
            Some(s) => Err(s),
            None => Ok(()),
        }
    }

    /// Takes the status of a failed QP1 send, if one failed.
    fn take_gsi_error(&mut self) -> Option<u32> {
        self.reap_sends();
        self.gsi_error.take()
    }

    /// The next CM message received on QP1, with its sender's GID.
    fn recv_mad(&mut self) -> Option<(Gid, CmMessage)> {
        let c = self.gsi_rcq.poll()?;
        let i = c.wr_id % RQ_WQES as u64;
        let at = self.gsi_rbufs + i * GSI_RBUF;
        let mut grh = [0u8; 40];
        let mut mad = [0u8; MAD_SIZE];
        let ok = c.status == 0 && c.byte_len as u64 >= GRH + MAD_SIZE as u64;
        if ok {
            read_bytes(at, &mut grh);
            read_bytes(at + GRH, &mut mad);
        }
        self.gsi.post_recv(i, at, GSI_RBUF as u32, self.lkey);
        if !ok {
            return None;
        }
        CmMessage::parse_mad(&mad).ok().map(|m| (grh_sgid(&grh), m))
    }

    /// Reaps send completions (sends are unsignaled: these are failures).
    fn reap_sends(&mut self) {
        while let Some(c) = self.ud_scq.poll() {
            if c.status != 0 {
                self.ud_send_errors += 1;
            }
        }
        while let Some(c) = self.gsi_scq.poll() {
            if c.status != 0 && self.gsi_error.is_none() {
                self.gsi_error = Some(c.status);
            }
        }
    }

    /// Sends `len` bytes produced by `fill` to (`dgid`, `dqpn`).
    fn ud_send(&mut self, dgid: Gid, dqpn: u32, len: u32, fill: impl Fn(usize) -> u8) -> bool {
        self.ud_send_ex(dgid, dqpn, RDMA_CM_UD_QKEY, None, len, fill)
    }

    /// [`Agent::ud_send`] with a Q_Key and optional immediate data.
    fn ud_send_ex(
        &mut self,
        dgid: Gid,
        dqpn: u32,
        qkey: u32,
        imm: Option<u32>,
        len: u32,
        fill: impl Fn(usize) -> u8,
    ) -> bool {
        self.reap_sends();
        let t0 = now_us();
        let slot = loop {
            if let Some(s) = self.ud.sq_free_slot() {
                break s;
            }
            if now_us() - t0 > 1_000_000 {
                return false;
            }
            self.unsent = true;
            self.idle();
        };
        let at = self.ud_sbufs + slot as u64 * UD_BUF;
        let mut chunk = [0u8; 256];
        let mut off = 0usize;
        while off < len as usize {
            let n = (len as usize - off).min(256);
            for (k, b) in chunk[..n].iter_mut().enumerate() {
                *b = fill(off + k);
            }
            write_bytes(at + off as u64, &chunk[..n]);
            off += n;
        }
        // Unsignaled: a send that fails still completes (with its error status).
        let ok = self.ud.post_send_ex(
            slot as u64,
            at,
            len,
            self.lkey,
            dgid.0,
            dqpn,
            qkey,
            0,
            imm,
            false,
        );
        if ok {
            self.unsent = true;
        }
        ok
    }

    /// The next UD datagram: (sender GID, sender QPN, payload address, payload length, slot).
    fn ud_recv(&mut self) -> Option<(Gid, u32, u64, u32, u64)> {
        self.ud_recv_imm()
            .map(|(g, q, at, len, i, _)| (g, q, at, len, i))
    }

    /// [`Agent::ud_recv`] with the datagram's immediate data, if it carried any.
    #[allow(clippy::type_complexity)]
    fn ud_recv_imm(&mut self) -> Option<(Gid, u32, u64, u32, u64, Option<u32>)> {
        let c = self.ud_rcq.poll()?;
        let i = c.wr_id % UD_RQ_WQES as u64;
        let at = self.ud_rbufs + i * UD_BUF;
        if c.status != 0 || (c.byte_len as u64) < GRH {
            self.ud.post_recv(i, at, UD_BUF as u32, self.lkey);
            return None;
        }
        let mut grh = [0u8; 40];
        read_bytes(at, &mut grh);
        let imm = (c.wc_flags & abi::wc_flags::WITH_IMM != 0).then_some(c.imm_data);
        Some((
            grh_sgid(&grh),
            c.src_qp,
            at + GRH,
            c.byte_len - GRH as u32,
            i,
            imm,
        ))
    }

    fn ud_repost(&mut self, i: u64) {
        let at = self.ud_rbufs + i * UD_BUF;
        self.ud.post_recv(i, at, UD_BUF as u32, self.lkey);
    }

    /// rdma_cm's REQ (TCP port space) from this agent to `peer`'s service `a.service_port`
    /// for QP `qpn`, starting PSN `psn`, path MTU code `mtu`.
    fn cm_req(
        &self,
        a: &RdmaArgs,
        peer: Gid,
        local_comm_id: u32,
        qpn: u32,
        psn: u32,
        mtu: u8,
    ) -> Req {
        let port = a.service_port as u16;
        let mut req = Req {
            hdr: MadHeader::cm(attr::REQ, random(3) as u64),
            local_comm_id,
            service_id: service_id(PortSpace::Tcp, port),
            local_ca_guid: 0x0200_00ff_fe00_0000 | a.local_gid as u64,
            local_qpn: qpn,
            responder_resources: 1,
            initiator_depth: 1,
            remote_cm_response_timeout: 20,
            starting_psn: psn,
            local_cm_response_timeout: 20,
            retry_count: 7,
            p_key: 0xffff,
            path_mtu: mtu,
            rnr_retry_count: 7,
            max_cm_retries: 15,
            ..Req::default()
        };
        req.primary_path.local_lid = 0xffff;
        req.primary_path.remote_lid = 0xffff;
        req.primary_path.local_gid = self.me;
        req.primary_path.remote_gid = peer;
        req.primary_path.hop_limit = 64;
        req.primary_path.local_ack_timeout = 18;
        req.private_data[..36].copy_from_slice(&self.cma_private_data(peer, port));
        req
    }

    fn cma_private_data(&self, peer: Gid, port: u16) -> [u8; 36] {
        let ip = |g: Gid| {
            g.to_ipv4()
                .map(IpAddr::V4)
                .unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED))
        };
        CmaHeader::new(ip(self.me), port, ip(peer))
            .map(|h| h.to_bytes())
            .unwrap_or([0; 36])
    }
}

fn setup_failed(s: Setup) -> u32 {
    match s {
        Setup::NoDevice => {
            println!("rdma: no PVRDMA device");
            status::RDMA_NO_DEVICE
        }
        Setup::Failed(what, e) => {
            println!("rdma: {} failed with error {}", what, e);
            status::RDMA_FAILED
        }
    }
}

#[derive(Clone, Copy, Default)]
struct Conn {
    used: bool,
    peer: Gid,
    local: u32,
    remote: u32,
    established: bool,
}

/// Whether `mode` runs over an RC queue pair ([`rc`]).
fn is_rc(mode: u32) -> bool {
    matches!(
        mode,
        rdma_mode::RPING | rdma_mode::UCMATOSE | rdma_mode::WRITE_BW
    )
}

/// `rdma-server`.
pub fn server(p: &BootParams) -> u32 {
    let a: RdmaArgs = p.args.rdma;
    let me = gid_of(a.local_gid);
    let mut ag = match Agent::open(me) {
        Ok(ag) => ag,
        Err(e) => return setup_failed(e),
    };
    if is_rc(a.mode) {
        return rc::server(&mut ag, &a, me);
    }
    println!(
        "rdma-server: {} listening on port {} (UD QPN {:#x})",
        me, a.service_port, ag.ud.qpn
    );
    let mut conns = [Conn::default(); 16];
    let (mut disconnects, mut echoed, mut sidr, mut bad) = (0u64, 0u64, 0u64, 0u64);
    // Connections are counted, not announced one by one: a console byte is a VM exit
    // (~40 µs here), and a line printed while a client connects or disconnects takes a
    // couple of milliseconds of CPU from the threads that serve it.
    let mut established = 0u64;
    loop {
        if stop_requested() {
            break;
        }
        let mut work = false;
        if let Some((sgid, msg)) = ag.recv_mad() {
            work = true;
            match msg {
                CmMessage::Req(req) => {
                    let peer = if req.primary_path.local_gid.is_zero() {
                        sgid
                    } else {
                        req.primary_path.local_gid.canonical()
                    };
                    let idx = conns
                        .iter()
                        .position(|c| c.used && c.peer == peer && c.remote == req.local_comm_id)
                        .or_else(|| conns.iter().position(|c| !c.used));
                    let Some(idx) = idx else { continue };
                    let c = &mut conns[idx];
                    if !c.used {
                        *c = Conn {
                            used: true,
                            peer,
                            local: random(req.local_comm_id),
                            remote: req.local_comm_id,
                            established: false,
                        };
                    }
                    let rep = Rep {
                        hdr: MadHeader::cm(attr::REP, req.hdr.transaction_id),
                        local_comm_id: c.local,
                        remote_comm_id: c.remote,
                        local_qkey: RDMA_CM_UD_QKEY,
                        local_qpn: ag.ud.qpn,
                        starting_psn: random(7) & 0xff_ffff,
                        responder_resources: req.initiator_depth,
                        initiator_depth: req.responder_resources,
                        target_ack_delay: 15,
                        rnr_retry_count: 7,
                        local_ca_guid: 0x0200_00ff_fe00_0000 | a.local_gid as u64,
                        ..Rep::default()
                    };
                    if let Err(s) = ag.post_mad(peer, &rep.to_mad()) {
                        println!("rdma-server: REP refused (status {})", s);
                    }
                }
                CmMessage::Rtu(rtu) => {
                    if let Some(c) = conns
                        .iter_mut()
                        .find(|c| c.used && c.local == rtu.remote_comm_id)
                    {
                        if !c.established {
                            c.established = true;
                            established += 1;
                        }
                    }
                }
                CmMessage::SidrReq(r) => {
                    let rep = SidrRep {
                        hdr: MadHeader::cm(attr::SIDR_REP, r.hdr.transaction_id),
                        request_id: r.request_id,
                        status: 0,
                        qpn: ag.ud.qpn,
                        service_id: r.service_id,
                        qkey: RDMA_CM_UD_QKEY,
                        ..SidrRep::default()
                    };
                    if ag.post_mad(sgid, &rep.to_mad()).is_ok() {
                        sidr += 1;
                    }
                }
                CmMessage::Dreq(d) => {
                    let pos = conns
                        .iter()
                        .position(|c| c.used && c.local == d.remote_comm_id);
                    let (local, remote, peer) = match pos {
                        Some(i) => (conns[i].local, conns[i].remote, conns[i].peer),
                        None => (d.remote_comm_id, d.local_comm_id, sgid),
                    };
                    let drep = Drep {
                        hdr: MadHeader::cm(attr::DREP, d.hdr.transaction_id),
                        local_comm_id: local,
                        remote_comm_id: remote,
                        ..Drep::default()
                    };
                    let _ = ag.post_mad(peer, &drep.to_mad());
                    if let Some(i) = pos {
                        conns[i].used = false;
                        disconnects += 1;
                    }
                    if a.messages != 0 && disconnects >= a.messages {
                        break;
                    }
                }
                _ => {}
            }
        }
        if let Some((sgid, sqpn, at, len, i, imm)) = ag.ud_recv_imm() {
            work = true;
            let len = len.min(MAX_MSG);
            let mut buf = [0u8; MAX_MSG as usize];
            read_bytes(at, &mut buf[..len as usize]);
            ag.ud_repost(i);
            if a.mode == rdma_mode::UDADDY {
                // udaddy sends SEND_WITH_IMM carrying its QPN and replies go to that QPN;
                // its payload is an unwritten buffer, so only the size can be checked.
                let want = udaddy_size(&a);
                if imm != Some(sqpn) || len != want {
                    println!(
                        "rdma-server: udaddy message from {} QPN {:#x}: {} bytes (want {}), immediate {:?}",
                        sgid, sqpn, len, want, imm
                    );
                    bad += 1;
                } else if ag.ud_send_ex(sgid, sqpn, RDMA_CM_UD_QKEY, Some(ag.ud.qpn), len, |k| {
                    buf[k]
                }) {
                    echoed += 1;
                }
                if a.messages != 0 && echoed + bad >= a.messages {
                    reap_all(&mut ag);
                    break;
                }
            } else if ag.ud_send(sgid, sqpn, len, |k| buf[k]) {
                echoed += 1;
            }
        }
        ag.reap_sends();
        if work {
            ag.busy();
        } else {
            ag.idle();
        }
    }
    // The last DREP (and echoes) may only be posted yet.
    reap_all(&mut ag);
    println!(
        "rdma-server: done: {} connections established, {} disconnects, {} SIDR answered, {} UD messages echoed, {} refused, {} send errors",
        established, disconnects, sidr, echoed, bad, ag.ud_send_errors
    );
    let _ = ag.dev.unbind(0, me.0);
    if bad != 0 || ag.ud_send_errors != 0 {
        return status::RDMA_VERIFY_FAILED;
    }
    status::OK
}

/// udaddy's message size (`-S`, default 100).
fn udaddy_size(a: &RdmaArgs) -> u32 {
    if a.msg_size == 0 {
        100
    } else {
        a.msg_size.clamp(GRH as u32 + 1, MAX_MSG)
    }
}

/// Sends everything posted and waits (bounded) until the device has taken it.
fn reap_all(ag: &mut Agent) {
    // Sends are unsignaled: everything posted goes out with a send-now exit, after which
    // the device has taken it (a queue pair not ready to send keeps its queue: bounded).
    let t0 = now_us();
    loop {
        ag.unsent = false;
        ag.dev.send_now();
        if (ag.ud.sq_idle() && ag.gsi.sq_idle()) || now_us() - t0 > 2_000_000 {
            break;
        }
        core::hint::spin_loop();
    }
    ag.reap_sends();
}

/// The byte at `i` of the message the udaddy client sends (every message the same, as
/// udaddy's are).
fn udaddy_byte(i: usize) -> u8 {
    pattern_byte(0x7564_6164, i)
}

/// SIDR_REQ → SIDR_REP for `peer`'s UD service on `port` (rdma_cm's header in the private
/// data); `Err` is the exit status.
fn sidr(ag: &mut Agent, peer: Gid, port: u16) -> Result<SidrRep, u32> {
    let request_id = random(11);
    let mut sreq = SidrReq {
        hdr: MadHeader::cm(attr::SIDR_REQ, random(13) as u64),
        request_id,
        p_key: 0xffff,
        service_id: service_id(PortSpace::Udp, port),
        ..SidrReq::default()
    };
    sreq.private_data[..36].copy_from_slice(&ag.cma_private_data(peer, port));
    let sreq_mad = sreq.to_mad();
    if ag.post_mad(peer, &sreq_mad).is_err() {
        return Err(status::RDMA_FAILED);
    }
    let srep = await_mad(ag, peer, &sreq_mad, 10_000_000, |m| match m {
        CmMessage::SidrRep(r) if r.request_id == request_id => Some(*r),
        _ => None,
    });
    let Some(srep) = srep else {
        println!("rdma-client: no SIDR_REP from {}", peer);
        return Err(status::RDMA_FAILED);
    };
    if srep.status != 0 {
        println!("rdma-client: SIDR_REP status {}", srep.status);
        return Err(status::RDMA_FAILED);
    }
    Ok(srep)
}

/// `rdma-client --rdma-mode udaddy`: SIDR for the UD service, `messages` SEND_WITH_IMM of
/// `msg_size` bytes (immediate: our QPN, where udaddy's server replies), then as many replies.
/// udaddy's server answers with its receive buffer's head: the GRH area (the IPv4 header in
/// its last 20 bytes) then our message, which is what is verified.
fn udaddy_client(ag: &mut Agent, a: &RdmaArgs, me: Gid, peer: Gid) -> u32 {
    let port = a.service_port as u16;
    let t0 = now_us();
    let srep = match sidr(ag, peer, port) {
        Ok(r) => r,
        Err(st) => return st,
    };
    let t_sidr = now_us();
    println!(
        "rdma-client: SIDR to {} in {} us: UD QPN {:#x} Q_Key {:#x}",
        peer,
        t_sidr - t0,
        srep.qpn,
        srep.qkey
    );
    let n = a.messages.clamp(1, RQ_WQES as u64);
    let size = udaddy_size(a);
    let my_qpn = ag.ud.qpn;
    let send_all = |ag: &mut Agent| {
        (0..n).all(|_| ag.ud_send_ex(peer, srep.qpn, srep.qkey, Some(my_qpn), size, udaddy_byte))
    };
    if !send_all(ag) {
        println!("rdma-client: UD send queue stuck");
        return status::RDMA_FAILED;
    }
    let (mut got, mut resends) = (0u64, 0u32);
    let mut last = now_us();
    while got < n {
        let Some((sgid, sqpn, at, len, i, imm)) = ag.ud_recv_imm() else {
            ag.reap_sends();
            ag.idle();
            if now_us() - last > 2_000_000 {
                // UD is unreliable: the server waits for all our messages before replying.
                resends += 1;
                if resends > 10 || !send_all(ag) {
                    println!("rdma-client: {} of {} udaddy replies", got, n);
                    return status::RDMA_FAILED;
                }
                last = now_us();
            }
            continue;
        };
        let mut buf = [0u8; MAX_MSG as usize];
        let l = len.min(MAX_MSG) as usize;
        read_bytes(at, &mut buf[..l]);
        ag.ud_repost(i);
        let g = GRH as usize;
        let ip_ok = buf[20] >> 4 == 4
            && buf[32..36] == me.to_ipv4().map(|v| v.octets()).unwrap_or([0; 4])
            && buf[36..40] == peer.to_ipv4().map(|v| v.octets()).unwrap_or([0; 4]);
        let good = sgid == peer
            && sqpn == srep.qpn
            && imm == Some(srep.qpn)
            && len == size
            && ip_ok
            && buf[g..l]
                .iter()
                .enumerate()
                .all(|(k, b)| *b == udaddy_byte(k));
        if !good {
            println!(
                "rdma-client: udaddy reply {} from {} QPN {:#x} ({} bytes, immediate {:?}) does not carry our message",
                got, sgid, sqpn, len, imm
            );
            return status::RDMA_VERIFY_FAILED;
        }
        got += 1;
        last = now_us();
    }
    reap_all(ag);
    let us = (now_us() - t_sidr).max(1);
    println!(
        "rdma-client: {} udaddy messages of {} bytes sent, {} replies verified in {} us ({} resends, {} send errors)",
        n, size, got, us, resends, ag.ud_send_errors
    );
    let _ = ag.dev.unbind(0, me.0);
    if ag.ud_send_errors != 0 {
        return status::RDMA_FAILED;
    }
    status::OK
}

/// Waits up to `timeout_us` for a CM message `pick` accepts, resending `resend` every second
/// (Linux waits about 4 s; a second keeps tests quick without duplicates on a busy machine).
fn await_mad<T>(
    ag: &mut Agent,
    dgid: Gid,
    resend: &[u8; MAD_SIZE],
    timeout_us: u64,
    mut pick: impl FnMut(&CmMessage) -> Option<T>,
) -> Option<T> {
    let t0 = now_us();
    let mut last = t0;
    loop {
        if let Some((_, m)) = ag.recv_mad() {
            ag.busy();
            if let Some(v) = pick(&m) {
                return Some(v);
            }
        } else {
            ag.idle();
        }
        if let Some(s) = ag.take_gsi_error() {
            println!("rdma: a QP1 send was refused (status {})", s);
            return None;
        }
        let t = now_us();
        if t - t0 > timeout_us {
            return None;
        }
        if t - last > 1_000_000 {
            last = t;
            if ag.post_mad(dgid, resend).is_err() {
                return None;
            }
        }
    }
}

/// `rdma-client`.
pub fn client(p: &BootParams) -> u32 {
    let a: RdmaArgs = p.args.rdma;
    let me = gid_of(a.local_gid);
    let peer = gid_of(a.peer_gid);
    let port = a.service_port as u16;
    if a.mode == rdma_mode::BIND_OTHER {
        let Some(dev) = Device::open() else {
            return setup_failed(Setup::NoDevice);
        };
        let other = gid_of(a.other_gid);
        return match dev.bind(0, other.0) {
            Err(e) => {
                println!("rdma-client: binding {} was refused (error {})", other, e);
                status::RDMA_REFUSED
            }
            Ok(()) => {
                println!("rdma-client: binding {} was accepted", other);
                status::RDMA_NOT_REFUSED
            }
        };
    }
    let mut ag = match Agent::open(me) {
        Ok(ag) => ag,
        Err(e) => return setup_failed(e),
    };
    if a.mode == rdma_mode::UDADDY {
        return udaddy_client(&mut ag, &a, me, peer);
    }
    if is_rc(a.mode) {
        return rc::client(&mut ag, &a, me, peer);
    }
    let t_start = now_us();
    let local_comm_id = random(a.local_gid);
    let mut req = ag.cm_req(&a, peer, local_comm_id, ag.ud.qpn, random(5) & 0xff_ffff, 3);
    req.local_qkey = RDMA_CM_UD_QKEY;
    if a.mode == rdma_mode::SPOOF {
        req.primary_path.local_gid = gid_of(a.other_gid);
        return match ag.send_mad(peer, &req.to_mad()) {
            Err(s) => {
                println!(
                    "rdma-client: REQ claiming {} was refused (status {})",
                    gid_of(a.other_gid),
                    s
                );
                status::RDMA_REFUSED
            }
            Ok(()) => {
                println!("rdma-client: REQ claiming {} was sent", gid_of(a.other_gid));
                status::RDMA_NOT_REFUSED
            }
        };
    }
    let req_mad = req.to_mad();
    if let Err(s) = ag.post_mad(peer, &req_mad) {
        println!("rdma-client: REQ refused (status {})", s);
        return status::RDMA_FAILED;
    }
    let rep = await_mad(&mut ag, peer, &req_mad, 10_000_000, |m| match m {
        CmMessage::Rep(r) if r.remote_comm_id == local_comm_id => Some(*r),
        _ => None,
    });
    let Some(rep) = rep else {
        println!("rdma-client: no REP from {}", peer);
        return status::RDMA_FAILED;
    };
    let rtu = Rtu {
        hdr: MadHeader::cm(attr::RTU, req.hdr.transaction_id),
        local_comm_id,
        remote_comm_id: rep.local_comm_id,
        ..Rtu::default()
    };
    if ag.send_mad(peer, &rtu.to_mad()).is_err() {
        return status::RDMA_FAILED;
    }
    let t_connected = now_us();

    // SIDR for the UD service.
    let srep = match sidr(&mut ag, peer, port) {
        Ok(r) => r,
        Err(st) => return st,
    };
    let t_sidr = now_us();
    println!(
        "rdma-client: connected to {} in {} us (REQ/REP/RTU), SIDR in {} us: UD QPN {:#x} Q_Key {:#x}",
        peer,
        t_connected - t_start,
        t_sidr - t_connected,
        srep.qpn,
        srep.qkey
    );

    // The verified UD stream: a window of messages in flight, each echoed and compared.
    let n = a.messages;
    let size = a.msg_size.clamp(8, MAX_MSG);
    const W: u64 = UD_WINDOW;
    let mut acked = [false; 64];
    let (mut base, mut next, mut resends) = (0u64, 0u64, 0u64);
    let t_ud = now_us();
    let mut last_progress = t_ud;
    while base < n {
        while next < n && next < base + W {
            if !ag.ud_send(peer, srep.qpn, size, |i| pattern_byte(next, i)) {
                println!("rdma-client: UD send queue stuck");
                return status::RDMA_FAILED;
            }
            next += 1;
        }
        if let Some((sgid, _, at, len, i)) = ag.ud_recv() {
            ag.busy();
            let mut head = [0u8; 8];
            read_bytes(at, &mut head);
            let seq = u64::from_be_bytes(head);
            let mut buf = [0u8; MAX_MSG as usize];
            let l = len.min(MAX_MSG) as usize;
            read_bytes(at, &mut buf[..l]);
            ag.ud_repost(i);
            if seq >= base && seq < next {
                let good = sgid == peer
                    && len == size
                    && buf[..l]
                        .iter()
                        .enumerate()
                        .all(|(k, b)| *b == pattern_byte(seq, k));
                if !good {
                    println!("rdma-client: UD message {} came back wrong", seq);
                    return status::RDMA_VERIFY_FAILED;
                }
                acked[(seq % 64) as usize] = true;
                last_progress = now_us();
            }
            while base < next && acked[(base % 64) as usize] {
                acked[(base % 64) as usize] = false;
                base += 1;
            }
        } else if now_us() - last_progress > 300_000 {
            // UD is unreliable: resend what is not echoed yet.
            resends += 1;
            if resends > 50 {
                println!("rdma-client: UD messages from {} not echoed", base);
                return status::RDMA_FAILED;
            }
            for s in base..next {
                if !acked[(s % 64) as usize] {
                    ag.ud_send(peer, srep.qpn, size, |i| pattern_byte(s, i));
                }
            }
            last_progress = now_us();
        } else {
            ag.idle();
        }
    }
    let t_ud_end = now_us();
    let ud_us = (t_ud_end - t_ud).max(1);
    println!(
        "rdma-client: {} UD messages of {} bytes echoed and verified in {} us ({} msg/s, {} resends)",
        n,
        size,
        ud_us,
        n * 1_000_000 / ud_us,
        resends
    );

    // Disconnect.
    let t_d = now_us();
    let dreq = Dreq {
        hdr: MadHeader::cm(attr::DREQ, random(17) as u64),
        local_comm_id,
        remote_comm_id: rep.local_comm_id,
        remote_qpn: rep.local_qpn,
        ..Dreq::default()
    };
    let dreq_mad = dreq.to_mad();
    if ag.post_mad(peer, &dreq_mad).is_err() {
        return status::RDMA_FAILED;
    }
    let drep = await_mad(&mut ag, peer, &dreq_mad, 10_000_000, |m| match m {
        CmMessage::Drep(d) if d.remote_comm_id == local_comm_id => Some(()),
        _ => None,
    });
    if drep.is_none() {
        println!("rdma-client: no DREP from {}", peer);
        return status::RDMA_FAILED;
    }
    println!("rdma-client: disconnected in {} us", now_us() - t_d);
    println!(
        "rdma-client: result connect_us={} sidr_us={} messages={} ud_us={} send_errors={}",
        t_connected - t_start,
        t_sidr - t_connected,
        n,
        ud_us,
        ag.ud_send_errors
    );
    let _ = ag.dev.unbind(0, me.0);
    status::OK
}

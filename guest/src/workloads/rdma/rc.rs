//! The RC workloads of the RDMA agent (`--rdma-mode rping|ucmatose|write-bw`): a connection
//! made with REQ/REP/RTU (the RC QP named in them, each side receiving from the PSN it
//! announced, as Linux's CM), then one of
//!
//! - **rping** (rdma-core's `rping.c`): the client fills its start buffer with
//!   `"rdma-ping-N: "` and a letter cycle, SENDs its address/rkey/size (16 bytes, big
//!   endian); the server RDMA READs it, verifies rping's pattern, SENDs a go-ahead; the
//!   client SENDs the address of its second buffer; the server RDMA WRITEs what it read (up
//!   to the NUL) there and SENDs a go-ahead; the client compares both buffers.
//! - **ucmatose**: the server SENDs 10 messages, the client receives them (checking sizes,
//!   and Ferry's pattern), SENDs as many copies of the last one back; the server checks
//!   them.
//! - **write-bw** (like `ib_write_bw`): the server SENDs its buffer's address; the client
//!   RDMA WRITEs `messages` messages into it, 128 in flight, one in 16 signaled, the last with immediate data
//!   (the count); the server verifies the buffer and SENDs the verdict back.
//!
//! The client disconnects (DREQ/DREP); the server serves `sessions` connections, one at a
//! time, and exits with `RDMA_VERIFY_FAILED` if any data was wrong.
use pvrdma_abi::wr_opcode as op;

use super::*;
use crate::pvrdma::{RcAttrs, RcSend};

/// Pages of each side's region (2 MiB).
const REGION_PAGES: u64 = 512;
/// Buffer A (rping's start buffer and the server's copy; write-bw's target) and B (rping's
/// second buffer), offsets in the region.
const BUF_A: u64 = 0;
const BUF_B: u64 = 768 << 10;
const BUF_LEN: u64 = 768 << 10;
/// Receive slots (one per RQ WQE) and send slots.
const RECV_AT: u64 = 1536 << 10;
const SEND_AT: u64 = 1792 << 10;
const SLOT: u64 = 8 << 10;
/// ucmatose's message count (its `-C` default).
const UCMATOSE_COUNT: u64 = 10;
/// Send slots (SENDs cycle through them; fewer are ever in flight).
const SEND_SLOTS: u64 = 16;
/// Largest SEND (one slot).
const MAX_SEND: u32 = SLOT as u32;
/// Send queue slots of the RC QP: ib_write_bw's default tx depth.
const RC_SQ_WQES: u32 = 128;
/// write-bw: WRITEs in flight (ib_write_bw's `--tx-depth`) and how often one is signaled
/// (its `--cq-mod`): one completion stands for the WRITEs before it too (RC completes in
/// order), so the guest handles one CQE per `WRITE_SIGNAL_EVERY` WRITEs.
const WRITE_DEPTH: u64 = RC_SQ_WQES as u64;
const WRITE_SIGNAL_EVERY: u64 = 16;
/// How long any step waits.
const STEP_US: u64 = 10_000_000;

/// Work request IDs of sends.
const ID_INFO: u64 = 1;
const ID_READ: u64 = 2;
const ID_WRITE: u64 = 3;
const ID_GO: u64 = 4;
const ID_MSG: u64 = 5;

/// rping's size limit here.
const RPING_MAX: u32 = 64 << 10;

/// An RC queue pair with its CQs and region.
struct Rc {
    qp: Qp,
    scq: Cq,
    rcq: Cq,
    base: u64,
    key: u32,
}

impl Rc {
    /// A QP in INIT with every receive slot posted.
    fn open(ag: &Agent, scq: Cq, rcq: Cq, base: u64, key: u32) -> Result<Rc, u32> {
        let qp = ag
            .dev
            .create_qp_sized(ag.pd, &scq, &rcq, qp_type::RC, RC_SQ_WQES, RQ_WQES)
            .map_err(|e| failed("CREATE_QP (RC)", e))?;
        ag.dev
            .rc_init(qp.qpn)
            .map_err(|e| failed("MODIFY_QP INIT", e))?;
        let rc = Rc {
            qp,
            scq,
            rcq,
            base,
            key,
        };
        for i in 0..RQ_WQES as u64 {
            rc.repost(i);
        }
        Ok(rc)
    }

    fn repost(&self, slot: u64) {
        let at = self.base + RECV_AT + (slot % RQ_WQES as u64) * SLOT;
        self.qp.post_recv(slot, at, SLOT as u32, self.key);
    }

    fn send(&self, wr_id: u64, s: RcSend) -> bool {
        self.qp.post_rc(wr_id, &s)
    }

    fn local(&self, opcode: u32, off: u64, len: u32) -> RcSend {
        RcSend {
            opcode,
            addr: self.base + off,
            len,
            lkey: self.key,
            remote_addr: 0,
            rkey: 0,
            imm: 0,
            signaled: true,
        }
    }

    /// SENDs `data` (≤ one slot) from send slot `slot`.
    fn send_bytes(&self, wr_id: u64, slot: u64, data: &[u8]) -> bool {
        let off = SEND_AT + (slot % SEND_SLOTS) * SLOT;
        write_bytes(self.base + off, data);
        self.send(wr_id, self.local(op::SEND, off, data.len() as u32))
    }

    /// The bytes of received slot `slot`.
    fn received(&self, slot: u64, buf: &mut [u8]) {
        read_bytes(self.base + RECV_AT + (slot % RQ_WQES as u64) * SLOT, buf);
    }
}

fn failed(what: &str, e: u8) -> u32 {
    println!("rdma: {} failed with error {}", what, e);
    status::RDMA_FAILED
}

/// Waits for a completion on `cq`; `Err` after `STEP_US`, or on an error status.
fn next(ag: &mut Agent, cq: &Cq, what: &str) -> Result<abi::Cqe, u32> {
    let t0 = now_us();
    loop {
        if let Some(c) = cq.poll() {
            ag.busy();
            if c.status != 0 {
                println!(
                    "rdma: {}: completion {:#x} status {} (opcode {})",
                    what, c.wr_id, c.status, c.opcode
                );
                return Err(status::RDMA_FAILED);
            }
            return Ok(c);
        }
        if now_us() - t0 > STEP_US {
            println!("rdma: no completion for {}", what);
            return Err(status::RDMA_FAILED);
        }
        ag.idle();
    }
}

/// `struct rping_rdma_info` (big endian).
fn info_bytes(buf: u64, rkey: u32, size: u32) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[..8].copy_from_slice(&buf.to_be_bytes());
    b[8..12].copy_from_slice(&rkey.to_be_bytes());
    b[12..].copy_from_slice(&size.to_be_bytes());
    b
}

fn parse_info(b: &[u8; 16]) -> (u64, u32, u32) {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    let mut k = [0u8; 4];
    k.copy_from_slice(&b[8..12]);
    let mut s = [0u8; 4];
    s.copy_from_slice(&b[12..]);
    (
        u64::from_be_bytes(a),
        u32::from_be_bytes(k),
        u32::from_be_bytes(s),
    )
}

/// Byte `k` of rping's buffer for ping `ping` of `size` bytes (`rping.c`: the text
/// `"rdma-ping-%d: "`, letters from `'A' + ping % 58` cycling through 65..=122, NUL last).
fn rping_byte(ping: u64, size: u32, k: u32) -> u8 {
    if k + 1 >= size {
        return 0;
    }
    let mut prefix = [0u8; 32];
    let n = rping_prefix(ping as u32, &mut prefix);
    if (k as usize) < n {
        return prefix[k as usize];
    }
    let c = (ping % 58) as u32 + (k - n as u32);
    65 + (c % 58) as u8
}

/// `"rdma-ping-N: "` into `out`; its length.
fn rping_prefix(ping: u32, out: &mut [u8; 32]) -> usize {
    let head = b"rdma-ping-";
    out[..head.len()].copy_from_slice(head);
    let mut n = head.len();
    let mut digits = [0u8; 10];
    let mut d = 0;
    let mut v = ping;
    loop {
        digits[d] = b'0' + (v % 10) as u8;
        d += 1;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    while d > 0 {
        d -= 1;
        out[n] = digits[d];
        n += 1;
    }
    out[n] = b':';
    out[n + 1] = b' ';
    n + 2
}

/// Byte `k` of Ferry's ucmatose message `i`.
fn ucmatose_byte(i: u64, k: usize) -> u8 {
    (i as usize).wrapping_mul(7).wrapping_add(k) as u8 ^ 0x5a
}

/// Byte `k` of write-bw's buffer for a stream of `n` messages.
fn write_bw_byte(n: u64, k: usize) -> u8 {
    (n as usize)
        .wrapping_mul(13)
        .wrapping_add(k.wrapping_mul(7)) as u8
}

/// Fills `len` bytes at `at` with `f(k)`.
fn fill(at: u64, len: u64, f: impl Fn(usize) -> u8) {
    let mut chunk = [0u8; 256];
    let mut off = 0u64;
    while off < len {
        let n = (len - off).min(256) as usize;
        for (k, b) in chunk[..n].iter_mut().enumerate() {
            *b = f(off as usize + k);
        }
        write_bytes(at + off, &chunk[..n]);
        off += n as u64;
    }
}

/// Whether `len` bytes at `at` are `f(k)`.
fn check(at: u64, len: u64, f: impl Fn(usize) -> u8) -> bool {
    let mut chunk = [0u8; 256];
    let mut off = 0u64;
    while off < len {
        let n = (len - off).min(256) as usize;
        read_bytes(at + off, &mut chunk[..n]);
        if chunk[..n]
            .iter()
            .enumerate()
            .any(|(k, b)| *b != f(off as usize + k))
        {
            return false;
        }
        off += n as u64;
    }
    true
}

/// The message size of a mode.
fn size_of(a: &RdmaArgs) -> u32 {
    match a.mode {
        rdma_mode::RPING => a.msg_size.clamp(16, RPING_MAX),
        rdma_mode::UCMATOSE => a.msg_size.clamp(1, MAX_SEND),
        _ => a.msg_size.clamp(1, BUF_LEN as u32),
    }
}

/// The RC CQs and region of a side.
fn resources(ag: &Agent) -> Result<(Cq, Cq, u64, u32), u32> {
    let scq = ag.dev.create_cq().map_err(|e| failed("CREATE_CQ", e))?;
    let rcq = ag.dev.create_cq().map_err(|e| failed("CREATE_CQ", e))?;
    let (base, key) = ag
        .dev
        .reg_mr(ag.pd, REGION_PAGES)
        .map_err(|e| failed("CREATE_MR", e))?;
    Ok((scq, rcq, base, key))
}

/// The server's connection.
struct Session {
    rc: Rc,
    peer: Gid,
    local: u32,
    remote: u32,
    /// The client's QPN (a DREQ names the QP of its recipient).
    remote_qpn: u32,
    established: bool,
    /// rping: waiting for the second buffer's address, with the length read.
    write_next: Option<u32>,
    /// The starting PSN this side announced in its REP.
    psn: u32,
    /// ucmatose: the server disconnects once the replies are verified (its DREQ is out).
    dreq_sent: bool,
    pings: u64,
    echoes: u64,
}

/// `rdma-server --rdma-mode rping|ucmatose|write-bw`.
pub fn server(ag: &mut Agent, a: &RdmaArgs, me: Gid) -> u32 {
    let (scq, rcq, base, key) = match resources(ag) {
        Ok(r) => r,
        Err(s) => return s,
    };
    println!(
        "rdma-server: {} listening on port {} (RC, mode {})",
        me, a.service_port, a.mode
    );
    let mut cur: Option<Session> = None;
    let (mut disconnects, mut bad, mut verified) = (0u64, 0u64, 0u64);
    // Counted, not announced: a console byte is a VM exit, and a line printed as the
    // client starts its first exchange would hold that exchange up by milliseconds.
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
                    let again = cur
                        .as_ref()
                        .is_some_and(|s| s.peer == peer && s.remote == req.local_comm_id);
                    if cur.is_some() && !again {
                        continue; // one connection at a time; the client retries
                    }
                    if cur.is_none() {
                        // Completions of an earlier connection's QP are stale.
                        while scq.poll().is_some() || rcq.poll().is_some() {}
                        let rc = match Rc::open(ag, scq, rcq, base, key) {
                            Ok(rc) => rc,
                            Err(s) => return s,
                        };
                        let my_psn = random(7) & 0xff_ffff;
                        let attrs = RcAttrs {
                            dgid: peer.0,
                            dest_qpn: req.local_qpn,
                            rq_psn: my_psn,
                            sq_psn: req.starting_psn,
                            mtu: (req.path_mtu as u32).clamp(1, 5),
                        };
                        if let Err(e) = ag.dev.rc_connect(rc.qp.qpn, &attrs) {
                            return failed("MODIFY_QP RTR/RTS", e);
                        }
                        cur = Some(Session {
                            rc,
                            peer,
                            local: random(req.local_comm_id),
                            remote: req.local_comm_id,
                            remote_qpn: req.local_qpn,
                            established: false,
                            write_next: None,
                            psn: my_psn,
                            dreq_sent: false,
                            pings: 0,
                            echoes: 0,
                        });
                    }
                    let Some(s) = cur.as_ref() else { continue };
                    let rep = Rep {
                        hdr: MadHeader::cm(attr::REP, req.hdr.transaction_id),
                        local_comm_id: s.local,
                        remote_comm_id: s.remote,
                        local_qpn: s.rc.qp.qpn,
                        starting_psn: s.psn,
                        responder_resources: req.initiator_depth.min(1),
                        initiator_depth: req.responder_resources.min(1),
                        target_ack_delay: 15,
                        rnr_retry_count: 7,
                        local_ca_guid: 0x0200_00ff_fe00_0000 | a.local_gid as u64,
                        ..Rep::default()
                    };
                    if let Err(st) = ag.send_mad(peer, &rep.to_mad()) {
                        println!("rdma-server: REP refused (status {})", st);
                    }
                }
                CmMessage::Rtu(rtu) => {
                    if let Some(s) = cur.as_mut().filter(|s| s.local == rtu.remote_comm_id) {
                        if !s.established {
                            s.established = true;
                            established += 1;
                            if let Err(st) = on_established(s, a) {
                                return st;
                            }
                        }
                    }
                }
                CmMessage::Drep(d) if cur.as_ref().is_some_and(|s| s.local == d.remote_comm_id) => {
                    if let Some(s) = cur.take() {
                        closed(ag, &s, &mut disconnects, &mut verified);
                    }
                    if a.messages != 0 && disconnects >= a.messages {
                        break;
                    }
                }
                CmMessage::Dreq(d) => {
                    let ours = cur.as_ref().is_some_and(|s| s.local == d.remote_comm_id);
                    let (local, remote, peer) = match &cur {
                        Some(s) if ours => (s.local, s.remote, s.peer),
                        _ => (d.remote_comm_id, d.local_comm_id, sgid),
                    };
                    let drep = Drep {
                        hdr: MadHeader::cm(attr::DREP, d.hdr.transaction_id),
                        local_comm_id: local,
                        remote_comm_id: remote,
                        ..Drep::default()
                    };
                    let _ = ag.send_mad(peer, &drep.to_mad());
                    if let Some(s) = cur.take().filter(|_| ours) {
                        closed(ag, &s, &mut disconnects, &mut verified);
                        if a.messages != 0 && disconnects >= a.messages {
                            break;
                        }
                    }
                }
                _ => {}
            }
        }
        if let Some(s) = cur.as_mut() {
            match serve_step(s, a) {
                Ok(true) => work = true,
                Ok(false) => {}
                Err(()) => bad += 1,
            }
            if a.mode == rdma_mode::UCMATOSE && s.echoes >= UCMATOSE_COUNT && !s.dreq_sent {
                // ucmatose's server disconnects once the replies are in.
                s.dreq_sent = true;
                let dreq = Dreq {
                    hdr: MadHeader::cm(attr::DREQ, random(19) as u64),
                    local_comm_id: s.local,
                    remote_comm_id: s.remote,
                    remote_qpn: s.remote_qpn,
                    ..Dreq::default()
                };
                let peer = s.peer;
                if let Err(st) = ag.send_mad(peer, &dreq.to_mad()) {
                    println!("rdma-server: DREQ refused (status {})", st);
                }
            }
        }
        if work {
            ag.busy();
        } else {
            ag.idle();
        }
    }
    println!(
        "rdma-server: done: {} established, {} disconnects, {} verified, {} wrong",
        established, disconnects, verified, bad
    );
    let _ = ag.dev.unbind(0, me.0);
    if bad != 0 {
        return status::RDMA_VERIFY_FAILED;
    }
    status::OK
}

/// A connection ended (DREQ or DREP): its counts, its QP destroyed.
fn closed(ag: &mut Agent, s: &Session, disconnects: &mut u64, verified: &mut u64) {
    *disconnects += 1;
    *verified += s.pings + s.echoes;
    println!(
        "rdma-server: RC connection {:#x} disconnected ({} pings, {} messages verified)",
        s.local, s.pings, s.echoes
    );
    let _ = ag.dev.destroy_qp(s.rc.qp.qpn);
}

/// What the server does once the connection is established: ucmatose's server SENDs its
/// messages, write-bw's advertises its buffer.
fn on_established(s: &mut Session, a: &RdmaArgs) -> Result<(), u32> {
    let size = size_of(a);
    match a.mode {
        rdma_mode::UCMATOSE => {
            for i in 0..UCMATOSE_COUNT {
                let off = SEND_AT + (i % SEND_SLOTS) * SLOT;
                fill(s.rc.base + off, size as u64, |k| ucmatose_byte(i, k));
                if !s.rc.send(ID_MSG, s.rc.local(op::SEND, off, size)) {
                    println!("rdma-server: send queue full");
                    return Err(status::RDMA_FAILED);
                }
            }
        }
        rdma_mode::WRITE_BW => {
            let info = info_bytes(s.rc.base + BUF_A, s.rc.key, BUF_LEN as u32);
            if !s.rc.send_bytes(ID_INFO, 0, &info) {
                return Err(status::RDMA_FAILED);
            }
        }
        _ => {}
    }
    Ok(())
}

/// One step of the server's data path: `Ok(true)` if something happened, `Err` if data was
/// wrong.
fn serve_step(s: &mut Session, a: &RdmaArgs) -> Result<bool, ()> {
    let mut wrong = false;
    let mut work = false;
    while let Some(c) = s.rc.scq.poll() {
        work = true;
        if c.status != 0 {
            println!(
                "rdma-server: send {:#x} completed with status {}",
                c.wr_id, c.status
            );
            wrong = true;
            continue;
        }
        match c.wr_id {
            ID_READ => {
                // rping's start buffer is here: check the pattern, then "go ahead".
                let len = c.byte_len;
                let ping = s.pings;
                if !check(s.rc.base + BUF_A, len as u64, |k| {
                    rping_byte(ping, len, k as u32)
                }) {
                    println!(
                        "rdma-server: rping {}: the buffer read is not rping's",
                        ping
                    );
                    wrong = true;
                }
                s.write_next = Some(len);
                s.rc.send_bytes(ID_GO, 1, &[0u8; 16]);
            }
            ID_WRITE => {
                s.pings += 1;
                s.rc.send_bytes(ID_GO, 2, &[0u8; 16]);
            }
            _ => {}
        }
    }
    while let Some(c) = s.rc.rcq.poll() {
        work = true;
        let slot = c.wr_id;
        if c.status != 0 {
            // Flushed receives (the QP is in ERR) are not posted again.
            if c.status != abi::wc_status::WR_FLUSH_ERR {
                println!("rdma-server: receive completed with status {}", c.status);
                wrong = true;
                s.rc.repost(slot);
            }
            continue;
        }
        match a.mode {
            rdma_mode::RPING => {
                let mut b = [0u8; 16];
                let ok = c.byte_len == 16;
                s.rc.received(slot, &mut b);
                s.rc.repost(slot);
                if !ok {
                    println!("rdma-server: rping: {} bytes, not 16", c.byte_len);
                    wrong = true;
                    continue;
                }
                let (buf, rkey, size) = parse_info(&b);
                match s.write_next.take() {
                    None => {
                        let len = size.min(RPING_MAX);
                        let mut r = s.rc.local(op::RDMA_READ, BUF_A, len);
                        r.remote_addr = buf;
                        r.rkey = rkey;
                        s.rc.send(ID_READ, r);
                    }
                    Some(len) => {
                        // rping writes the string with its NUL: up to the first NUL.
                        let mut n = 0u32;
                        let mut byte = [0u8];
                        while n < len {
                            read_bytes(s.rc.base + BUF_A + n as u64, &mut byte);
                            n += 1;
                            if byte[0] == 0 {
                                break;
                            }
                        }
                        let mut w = s.rc.local(op::RDMA_WRITE, BUF_A, n.min(size));
                        w.remote_addr = buf;
                        w.rkey = rkey;
                        s.rc.send(ID_WRITE, w);
                    }
                }
            }
            rdma_mode::UCMATOSE => {
                // ucmatose's client sends its receive buffer back: our last message.
                let size = size_of(a);
                let last = UCMATOSE_COUNT - 1;
                let at = s.rc.base + RECV_AT + (slot % RQ_WQES as u64) * SLOT;
                if c.byte_len != size || !check(at, size as u64, |k| ucmatose_byte(last, k)) {
                    println!("rdma-server: ucmatose: reply {} is wrong", s.echoes);
                    wrong = true;
                } else {
                    s.echoes += 1;
                }
                s.rc.repost(slot);
            }
            _ => {
                // write-bw: the last WRITE's immediate is the message count.
                let n = c.imm_data as u64;
                let good = c.opcode == abi::wc_opcode::RECV_RDMA_WITH_IMM
                    && c.byte_len as u64 <= BUF_LEN
                    && check(s.rc.base + BUF_A, c.byte_len as u64, |k| {
                        write_bw_byte(n, k)
                    });
                s.rc.repost(slot);
                if good {
                    s.echoes += n;
                } else {
                    println!("rdma-server: write-bw: the buffer is not what was written");
                    wrong = true;
                }
                let mut v = [0u8; 16];
                v[..8].copy_from_slice(&n.to_be_bytes());
                v[8] = good as u8;
                s.rc.send_bytes(ID_GO, 3, &v);
            }
        }
    }
    if wrong {
        Err(())
    } else {
        Ok(work)
    }
}

/// `rdma-client --rdma-mode rping|ucmatose|write-bw`.
pub fn client(ag: &mut Agent, a: &RdmaArgs, me: Gid, peer: Gid) -> u32 {
    let (scq, rcq, base, key) = match resources(ag) {
        Ok(r) => r,
        Err(s) => return s,
    };
    let rc = match Rc::open(ag, scq, rcq, base, key) {
        Ok(rc) => rc,
        Err(s) => return s,
    };
    let t_start = now_us();
    let local_comm_id = random(a.local_gid);
    let my_psn = random(5) & 0xff_ffff;
    // write-bw moves 4096-byte packets; rping and ucmatose use rdma_cm's usual 1024.
    let mtu = if a.mode == rdma_mode::WRITE_BW { 5 } else { 3 };
    let req = ag.cm_req(a, peer, local_comm_id, rc.qp.qpn, my_psn, mtu);
    let req_mad = req.to_mad();
    if let Err(s) = ag.send_mad(peer, &req_mad) {
        println!("rdma-client: REQ refused (status {})", s);
        return status::RDMA_FAILED;
    }
    let rep = await_mad(ag, peer, &req_mad, 10_000_000, |m| match m {
        CmMessage::Rep(r) if r.remote_comm_id == local_comm_id => Some(*r),
        _ => None,
    });
    let Some(rep) = rep else {
        println!("rdma-client: no REP from {}", peer);
        return status::RDMA_FAILED;
    };
    let attrs = RcAttrs {
        dgid: peer.0,
        dest_qpn: rep.local_qpn,
        rq_psn: my_psn,
        sq_psn: rep.starting_psn,
        mtu: mtu as u32,
    };
    if let Err(e) = ag.dev.rc_connect(rc.qp.qpn, &attrs) {
        return failed("MODIFY_QP RTR/RTS", e);
    }
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
    println!(
        "rdma-client: RC connection to {} in {} us (QPN {:#x} to {:#x})",
        peer,
        t_connected - t_start,
        rc.qp.qpn,
        rep.local_qpn
    );
    let size = size_of(a);
    let t_data = now_us();
    let r = match a.mode {
        rdma_mode::RPING => rping_client(ag, &rc, a.messages, size),
        rdma_mode::UCMATOSE => ucmatose_client(ag, &rc, a.messages, size),
        _ => write_bw_client(ag, &rc, a.messages, size),
    };
    let data_us = (now_us() - t_data).max(1);
    let (verified, bytes) = match r {
        Ok(v) => v,
        Err(st) => return st,
    };
    if let Err(st) = disconnect(ag, a, peer, local_comm_id, &rep) {
        return st;
    }
    let _ = ag.dev.destroy_qp(rc.qp.qpn);
    println!(
        "rdma-client: result mode={} connect_us={} messages={} size={} verified={} bytes={} data_us={} mbps={}",
        a.mode,
        t_connected - t_start,
        a.messages,
        size,
        verified,
        bytes,
        data_us,
        bytes * 8 / data_us
    );
    let _ = ag.dev.unbind(0, me.0);
    if verified != a.messages {
        return status::RDMA_VERIFY_FAILED;
    }
    status::OK
}

/// Ends the connection: ucmatose's server disconnects (the client answers its DREQ), for
/// the others the client sends DREQ and takes the DREP (or answers a DREQ that crossed it).
fn disconnect(ag: &mut Agent, a: &RdmaArgs, peer: Gid, local: u32, rep: &Rep) -> Result<(), u32> {
    let drep_for = |d: &Dreq| Drep {
        hdr: MadHeader::cm(attr::DREP, d.hdr.transaction_id),
        local_comm_id: local,
        remote_comm_id: rep.local_comm_id,
        ..Drep::default()
    };
    let dreq = Dreq {
        hdr: MadHeader::cm(attr::DREQ, random(17) as u64),
        local_comm_id: local,
        remote_comm_id: rep.local_comm_id,
        remote_qpn: rep.local_qpn,
        ..Dreq::default()
    };
    let dreq_mad = dreq.to_mad();
    let wait_first = a.mode == rdma_mode::UCMATOSE;
    if !wait_first && ag.send_mad(peer, &dreq_mad).is_err() {
        return Err(status::RDMA_FAILED);
    }
    let mut got = None;
    let t0 = now_us();
    let mut last = t0;
    while got.is_none() && now_us() - t0 < 10_000_000 {
        if !wait_first && now_us() - last > 1_000_000 {
            last = now_us();
            let _ = ag.send_mad(peer, &dreq_mad);
        }
        match ag.recv_mad() {
            Some((_, CmMessage::Drep(d))) if d.remote_comm_id == local => got = Some(None),
            Some((_, CmMessage::Dreq(d))) if d.remote_comm_id == local => got = Some(Some(d)),
            Some(_) => ag.busy(),
            None => ag.idle(),
        }
    }
    match got {
        Some(Some(d)) => {
            let _ = ag.send_mad(peer, &drep_for(&d).to_mad());
            Ok(())
        }
        Some(None) => Ok(()),
        None => {
            println!("rdma-client: no DREP/DREQ from {}", peer);
            Err(status::RDMA_FAILED)
        }
    }
}

/// rping's client: `n` pings of `size` bytes; (verified, bytes moved).
fn rping_client(ag: &mut Agent, rc: &Rc, n: u64, size: u32) -> Result<(u64, u64), u32> {
    let (a, b) = (rc.base + BUF_A, rc.base + BUF_B);
    let mut verified = 0;
    for ping in 0..n {
        fill(a, size as u64, |k| rping_byte(ping, size, k as u32));
        fill(b, size as u64, |_| 0);
        for (what, at) in [("the server's READ", a), ("the server's WRITE", b)] {
            if !rc.send_bytes(ID_INFO, ping, &info_bytes(at, rc.key, size)) {
                return Err(status::RDMA_FAILED);
            }
            next(ag, &rc.scq, what)?;
            let c = next(ag, &rc.rcq, what)?;
            rc.repost(c.wr_id);
            if c.byte_len != 16 {
                println!("rdma-client: rping: a go-ahead of {} bytes", c.byte_len);
                return Err(status::RDMA_VERIFY_FAILED);
            }
        }
        if !check(b, size as u64, |k| rping_byte(ping, size, k as u32)) {
            println!("rdma-client: ping {}: the server wrote other bytes", ping);
            return Err(status::RDMA_VERIFY_FAILED);
        }
        verified += 1;
    }
    Ok((verified, 2 * n * size as u64))
}

/// ucmatose's client: `n` messages in (sizes checked, Ferry's pattern counted), as many
/// copies of the last back.
fn ucmatose_client(ag: &mut Agent, rc: &Rc, n: u64, size: u32) -> Result<(u64, u64), u32> {
    let mut patterned = 0;
    let mut last = [0u8; SLOT as usize];
    for i in 0..n {
        let c = next(ag, &rc.rcq, "a ucmatose message")?;
        let at = rc.base + RECV_AT + (c.wr_id % RQ_WQES as u64) * SLOT;
        if c.byte_len != size {
            println!("rdma-client: ucmatose message {}: {} bytes", i, c.byte_len);
            return Err(status::RDMA_VERIFY_FAILED);
        }
        if check(at, size as u64, |k| ucmatose_byte(i, k)) {
            patterned += 1;
        }
        read_bytes(at, &mut last[..size as usize]);
        rc.repost(c.wr_id);
    }
    for i in 0..n {
        if !rc.send_bytes(ID_MSG, i, &last[..size as usize]) {
            return Err(status::RDMA_FAILED);
        }
        next(ag, &rc.scq, "a ucmatose reply")?;
    }
    println!(
        "rdma-client: ucmatose: {} messages of {} bytes, {} with Ferry's pattern",
        n, size, patterned
    );
    Ok((n, 2 * n * size as u64))
}

/// write-bw's client: `n` WRITEs of `size` bytes, up to `WRITE_DEPTH` in flight; (verified,
/// bytes).
fn write_bw_client(ag: &mut Agent, rc: &Rc, n: u64, size: u32) -> Result<(u64, u64), u32> {
    let c = next(ag, &rc.rcq, "the server's buffer")?;
    let mut b = [0u8; 16];
    rc.received(c.wr_id, &mut b);
    rc.repost(c.wr_id);
    let (buf, rkey, len) = parse_info(&b);
    if c.byte_len != 16 || len < size {
        println!(
            "rdma-client: write-bw: the server's buffer is {} bytes",
            len
        );
        return Err(status::RDMA_FAILED);
    }
    fill(rc.base + BUF_A, size as u64, |k| write_bw_byte(n, k));
    let t0 = now_us();
    // WRITE `i` has work request ID `i`; every `WRITE_SIGNAL_EVERY`-th and the last are
    // signaled, and the completion of WRITE `i` means WRITEs 0..=i are done.
    let (mut posted, mut done) = (0u64, 0u64);
    while done < n {
        while posted < n && posted - done < WRITE_DEPTH {
            let last = posted + 1 == n;
            let opcode = if last {
                op::RDMA_WRITE_WITH_IMM
            } else {
                op::RDMA_WRITE
            };
            let mut w = rc.local(opcode, BUF_A, size);
            w.remote_addr = buf;
            w.rkey = rkey;
            w.imm = n as u32;
            w.signaled = last || (posted + 1) % WRITE_SIGNAL_EVERY == 0;
            if !rc.send(posted, w) {
                break;
            }
            posted += 1;
        }
        let c = next(ag, &rc.scq, "an RDMA WRITE")?;
        if c.wr_id < done || c.wr_id >= posted {
            println!("rdma-client: write-bw: a completion for WRITE {}", c.wr_id);
            return Err(status::RDMA_FAILED);
        }
        done = c.wr_id + 1;
    }
    let us = (now_us() - t0).max(1);
    let c = next(ag, &rc.rcq, "the server's verdict")?;
    let mut v = [0u8; 16];
    rc.received(c.wr_id, &mut v);
    rc.repost(c.wr_id);
    let mut count = [0u8; 8];
    count.copy_from_slice(&v[..8]);
    if u64::from_be_bytes(count) != n || v[8] != 1 {
        println!("rdma-client: write-bw: the server did not verify the stream");
        return Err(status::RDMA_VERIFY_FAILED);
    }
    println!(
        "rdma-client: write-bw: {} WRITEs of {} bytes in {} us ({} MB/s)",
        n,
        size,
        us,
        n * size as u64 / us
    );
    Ok((n, n * size as u64))
}

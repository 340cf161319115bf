//! The data path: send queues (QP1 through the multiplexer, UD on the host port), receive
//! queues, completions and async events. Bad work requests complete with an error; bad ring
//! indexes move the queue pair to the error state.
use super::*;
use crate::backend::UdOut;

impl Device {
    /// Runs the queues once: UD and QP1 receives, then sends. Returns the work done.
    ///
    /// Receives first: they refresh the QP1 receive credits the multiplexer's deliveries
    /// need ([`crate::MadInbox`]), so the answer to a MAD sent here finds them up to date
    /// even when it comes back before this pass ends (on loopback it can): otherwise it
    /// would wait in the multiplexer's queue for the next pass.
    pub fn poll(&mut self) -> usize {
        if self.dsr_gpa.is_none() {
            return 0;
        }
        let handles: Vec<u32> = self.qps.keys().copied().collect();
        let mut work = 0;
        for &h in &handles {
            work += self.receive(h, true);
        }
        for h in handles {
            work += self.process_sq(h);
        }
        work
    }

    /// Delivers what arrived (MADs in the inbox, datagrams on the UD queue pairs) into the
    /// guest's receive queues; nothing is sent and the multiplexer is not called back, so
    /// the port's receive thread can run it while the multiplexer holds its locks. Returns
    /// the work done.
    pub fn poll_receives(&mut self) -> usize {
        if self.dsr_gpa.is_none() {
            return 0;
        }
        let handles: Vec<u32> = self.qps.keys().copied().collect();
        handles.into_iter().map(|h| self.receive(h, false)).sum()
    }

    pub(super) fn ring_error(&mut self, qp: u32, why: &str) {
        if let Some(q) = self.qps.get_mut(&qp) {
            if q.state != qp_state::ERR {
                tracing::info!(qp, "queue pair to the error state: {why}");
                q.state = qp_state::ERR;
                self.stats.qp_ring_errors += 1;
                self.async_event(abi::event::QP_FATAL, qp);
            }
        }
    }

    pub(super) fn async_event(&mut self, kind: u32, info: u32) {
        let Some(ring) = &self.async_ring else { return };
        let hdr = ring.pages[0];
        let ok = (|| -> Result<bool, VrdmaError> {
            let r = abi::Ring {
                prod_tail: self.mem.load_u32(hdr + abi::RING_STATE_RX_OFFSET)?,
                cons_head: self.mem.load_u32(hdr + abi::RING_STATE_RX_OFFSET + 4)?,
            };
            let Ok(Some(slot)) = abi::has_space(r, ring.elems) else {
                return Ok(false);
            };
            let at =
                elem_addr(&ring.pages, 1, slot, ring.elem_size).ok_or(VrdmaError::Invalid {
                    field: "async ring slot",
                    value: slot as u64,
                    why: "outside the ring",
                })?;
            write_obj(&*self.mem, at, &abi::Eqe { kind, info })?;
            self.mem.store_u32(
                hdr + abi::RING_STATE_RX_OFFSET,
                abi::idx_inc(r.prod_tail, ring.elems),
            )?;
            Ok(true)
        })();
        if matches!(ok, Ok(true)) {
            self.stats.async_events += 1;
            self.raise(1);
        }
    }

    /// Writes a completion into CQ `cq`; false if it could not (full or broken CQ).
    pub(super) fn complete(&mut self, cq: u32, cqe: &abi::Cqe) -> bool {
        let Some(c) = self.cqs.get(&cq) else {
            return false;
        };
        if c.error {
            self.stats.cq_overflows += 1;
            return false;
        }
        let hdr = c.pages[0] + abi::RING_STATE_RX_OFFSET;
        let res = (|| -> Result<Option<()>, VrdmaError> {
            let r = abi::Ring {
                prod_tail: self.mem.load_u32(hdr)?,
                cons_head: self.mem.load_u32(hdr + 4)?,
            };
            let slot = match abi::has_space(r, c.cqe) {
                Ok(Some(s)) => s,
                Ok(None) => return Ok(None),
                Err(()) => {
                    return Err(invalid(
                        "CQ ring index",
                        r.prod_tail as u64,
                        "beyond 2 x entries",
                    ))
                }
            };
            let at = elem_addr(&c.pages, 1, slot, 64).ok_or(invalid(
                "CQ slot",
                slot as u64,
                "outside the CQ pages",
            ))?;
            write_obj(&*self.mem, at, cqe)?;
            self.mem.store_u32(hdr, abi::idx_inc(r.prod_tail, c.cqe))?;
            Ok(Some(()))
        })();
        match res {
            Ok(Some(())) => {
                self.completions += 1;
                if self.msix.armed.remove(&cq) {
                    self.raise(2);
                }
                true
            }
            Ok(None) => {
                self.stats.cq_overflows += 1;
                if let Some(c) = self.cqs.get_mut(&cq) {
                    c.error = true;
                }
                self.async_event(abi::event::CQ_ERR, cq);
                false
            }
            Err(e) => {
                tracing::info!(
                    cq,
                    error = &e as &dyn std::error::Error,
                    "completion queue broken"
                );
                self.stats.cq_overflows += 1;
                if let Some(c) = self.cqs.get_mut(&cq) {
                    c.error = true;
                }
                self.async_event(abi::event::CQ_ERR, cq);
                false
            }
        }
    }

    /// Copies the bytes the SGEs describe (send), checking lkeys, PDs and bounds.
    pub(super) fn gather(&self, pd: u32, sges: &[abi::Sge], max: usize) -> Result<Vec<u8>, u32> {
        self.gather_into(pd, sges, max, Vec::new())
    }

    /// [`Device::gather`] into `out` (its capacity is reused; bytes it holds are overwritten,
    /// not zeroed first: every byte of the result comes from the SGEs, and on an error `out`
    /// is dropped).
    pub(super) fn gather_into(
        &self,
        pd: u32,
        sges: &[abi::Sge],
        max: usize,
        mut out: Vec<u8>,
    ) -> Result<Vec<u8>, u32> {
        let total: u64 = sges.iter().map(|s| s.length as u64).sum();
        if total > max as u64 {
            return Err(abi::wc_status::LOC_LEN_ERR);
        }
        // Only growth is zero-filled: a same-size buffer given back by the last WRITE costs
        // no 64 KiB memset.
        out.truncate(total as usize);
        out.resize(total as usize, 0);
        let mut at = 0usize;
        for s in sges {
            let part = &mut out[at..at + s.length as usize];
            self.sge_io(
                pd,
                s,
                |mem, gpa, range| mem.read(gpa, &mut part[range]).is_ok(),
                false,
            )?;
            at += s.length as usize;
        }
        Ok(out)
    }

    /// Copies `data` into the buffers the SGEs describe (receive).
    pub(super) fn scatter(&self, pd: u32, sges: &[abi::Sge], data: &[u8]) -> Result<(), u32> {
        let room: u64 = sges.iter().map(|s| s.length as u64).sum();
        if room < data.len() as u64 {
            return Err(abi::wc_status::LOC_LEN_ERR);
        }
        let mut done = 0usize;
        for s in sges {
            if done == data.len() {
                break;
            }
            let n = (s.length as usize).min(data.len() - done);
            let part = abi::Sge {
                length: n as u32,
                ..*s
            };
            let chunk = &data[done..done + n];
            self.sge_io(
                pd,
                &part,
                |mem, gpa, range| mem.write(gpa, &chunk[range]).is_ok(),
                true,
            )?;
            done += n;
        }
        Ok(())
    }

    /// Resolves an SGE to guest-physical pieces and runs `io` on each (`range` indexes the
    /// SGE's bytes).
    pub(super) fn sge_io(
        &self,
        pd: u32,
        s: &abi::Sge,
        mut io: impl FnMut(&dyn GuestMemory, u64, std::ops::Range<usize>) -> bool,
        write: bool,
    ) -> Result<(), u32> {
        use abi::wc_status::LOC_PROT_ERR;
        let handle = self.rc.handle_of(s.lkey).ok_or(LOC_PROT_ERR)?;
        let mr = self.mrs.get(&handle).ok_or(LOC_PROT_ERR)?;
        if mr.pd != pd {
            return Err(LOC_PROT_ERR);
        }
        if write && mr.access & 1 == 0 {
            // PVRDMA_ACCESS_LOCAL_WRITE is required for receive buffers.
            return Err(LOC_PROT_ERR);
        }
        let len = s.length as u64;
        if len == 0 {
            return Ok(());
        }
        let end = s.addr.checked_add(len).ok_or(LOC_PROT_ERR)?;
        if mr.dma {
            if !self.mem.contains(s.addr, len) {
                return Err(LOC_PROT_ERR);
            }
            return if io(&*self.mem, s.addr, 0..len as usize) {
                Ok(())
            } else {
                Err(LOC_PROT_ERR)
            };
        }
        if s.addr < mr.start || end > mr.start + mr.length {
            return Err(LOC_PROT_ERR);
        }
        let base = mr.start & !(abi::PVRDMA_PAGE_SIZE - 1);
        let mut va = s.addr;
        while va < end {
            let page = ((va - base) / abi::PVRDMA_PAGE_SIZE) as usize;
            let off = (va - base) % abi::PVRDMA_PAGE_SIZE;
            let n = (abi::PVRDMA_PAGE_SIZE - off).min(end - va);
            let gpa = mr.pages.get(page).ok_or(LOC_PROT_ERR)? + off;
            let r = (va - s.addr) as usize..(va - s.addr + n) as usize;
            if !io(&*self.mem, gpa, r) {
                return Err(LOC_PROT_ERR);
            }
            va += n;
        }
        Ok(())
    }

    pub(super) fn read_sges(&self, at: u64, n: u32) -> Option<Vec<abi::Sge>> {
        (0..n as u64)
            .map(|i| read_obj::<abi::Sge>(&*self.mem, at + 16 * i).ok())
            .collect()
    }

    pub(super) fn process_sq(&mut self, h: u32) -> usize {
        if self.qps.get(&h).is_some_and(|q| q.rc.is_some()) {
            return self.rc_process(h);
        }
        let Some(q) = self.qps.get(&h) else { return 0 };
        if q.state != qp_state::RTS {
            return 0;
        }
        let hdr = q.pages[0];
        let mut done = 0;
        // UD sends of this pass, gathered and checked: they leave together at its end (or
        // before a completion that has to follow theirs).
        let mut batch: Vec<PendingUd> = Vec::new();
        while done < WR_BUDGET {
            let Some(q) = self.qps.get(&h) else { break };
            let ring = match (self.mem.load_u32(hdr), self.mem.load_u32(hdr + 4)) {
                (Ok(t), Ok(hd)) => abi::Ring {
                    prod_tail: t,
                    cons_head: hd,
                },
                _ => break,
            };
            let slot = match abi::has_data(ring, q.sq_wqes) {
                Ok(Some(s)) => s,
                Ok(None) => break,
                Err(()) => {
                    self.ring_error(h, "send ring index beyond 2 x size");
                    break;
                }
            };
            let size = abi::sq_wqe_size(q.sq_sge);
            let Some(at) = elem_addr(&q.pages, 1, slot, size) else {
                self.ring_error(h, "send queue slot outside its pages");
                break;
            };
            let wqe: Option<abi::SqWqeHdr> = read_obj(&*self.mem, at).ok();
            let (status, wr_id, byte_len) = match wqe {
                None => (abi::wc_status::LOC_QP_OP_ERR, 0, 0),
                Some(w) => match self.prepare_send(h, &w, at + 80) {
                    Ok(Prepared::Ud(out)) => {
                        let Some(q) = self.qps.get(&h) else { break };
                        let signaled = q.sig_all || w.send_flags & abi::send_flags::SIGNALED != 0;
                        let _ = self
                            .mem
                            .store_u32(hdr + 4, abi::idx_inc(ring.cons_head, q.sq_wqes));
                        batch.push(PendingUd {
                            wr_id: w.wr_id,
                            signaled,
                            out,
                        });
                        done += 1;
                        continue;
                    }
                    Ok(Prepared::Sent(n)) => (0, w.wr_id, n),
                    Err(st) => (st, w.wr_id, 0),
                },
            };
            self.flush_ud(h, &mut batch);
            let Some(q) = self.qps.get(&h) else { break };
            let signaled = q.sig_all
                || wqe.is_none_or(|w| w.send_flags & abi::send_flags::SIGNALED != 0)
                || status != 0;
            let (send_cq, qpn) = (q.send_cq, q.qpn);
            let _ = self
                .mem
                .store_u32(hdr + 4, abi::idx_inc(ring.cons_head, q.sq_wqes));
            if status != 0 {
                self.stats.wr_errors += 1;
            }
            if signaled {
                let cqe = abi::Cqe {
                    wr_id,
                    qp: h as u64,
                    opcode: abi::wc_opcode::SEND,
                    status,
                    byte_len,
                    src_qp: qpn,
                    port_num: 1,
                    ..Default::default()
                };
                self.complete(send_cq, &cqe);
            }
            done += 1;
        }
        self.flush_ud(h, &mut batch);
        done
    }

    /// Sends the UD messages of `batch` (in one go: see [`crate::backend::UdQueue::send_batch`])
    /// and writes their completions, in order: the signaled ones and the failed ones.
    fn flush_ud(&mut self, h: u32, batch: &mut Vec<PendingUd>) {
        if batch.is_empty() {
            return;
        }
        let Some(q) = self.qps.get(&h) else {
            batch.clear();
            return;
        };
        let (send_cq, qpn) = (q.send_cq, q.qpn);
        let mut status = vec![abi::wc_status::GENERAL_ERR; batch.len()];
        if let Some(ud) = q.ud.as_ref() {
            let outs: Vec<UdOut<'_>> = batch.iter().map(|p| p.out.as_out()).collect();
            ud.send_batch(&outs, &mut |i, r| match r {
                Ok(()) => status[i] = 0,
                Err(e) => tracing::debug!(error = &e as &dyn std::error::Error, "UD send failed"),
            });
        }
        for (p, st) in batch.drain(..).zip(status) {
            if st == 0 {
                self.stats.ud_sent += 1;
            } else {
                self.stats.wr_errors += 1;
            }
            if p.signaled || st != 0 {
                let cqe = abi::Cqe {
                    wr_id: p.wr_id,
                    qp: h as u64,
                    opcode: abi::wc_opcode::SEND,
                    status: st,
                    byte_len: if st == 0 { p.out.data.len() as u32 } else { 0 },
                    src_qp: qpn,
                    port_num: 1,
                    ..Default::default()
                };
                self.complete(send_cq, &cqe);
            }
        }
    }

    /// Checks and gathers one send WQE: a QP1 send is sent at once (`Sent(bytes)`), a UD
    /// send is returned for the pass's batch; `Err(wc_status)` if it is refused.
    fn prepare_send(&mut self, h: u32, w: &abi::SqWqeHdr, sge_at: u64) -> Result<Prepared, u32> {
        use abi::wc_status::*;
        let q = self.qps.get(&h).ok_or(GENERAL_ERR)?;
        if w.num_sge > q.sq_sge {
            return Err(LOC_LEN_ERR);
        }
        if w.opcode != abi::wr_opcode::SEND && w.opcode != abi::wr_opcode::SEND_WITH_IMM {
            return Err(LOC_QP_OP_ERR);
        }
        let sges = self.read_sges(sge_at, w.num_sge).ok_or(LOC_PROT_ERR)?;
        let data = self.gather(q.pd, &sges, MAX_UD_PAYLOAD)?;
        let sgid = self
            .gids
            .get(w.ud_av.gid_index as usize)
            .copied()
            .flatten()
            .ok_or(LOC_QP_OP_ERR)?;
        let dgid = Gid(w.ud_av.dgid);
        match q.qp_type {
            qp_type::GSI => {
                if data.len() != MAD_SIZE || w.ud_remote_qpn != 1 {
                    return Err(LOC_LEN_ERR);
                }
                match self.backend.send_mad(sgid, dgid, &data) {
                    Ok(()) => {
                        self.stats.mads_sent += 1;
                        Ok(Prepared::Sent(data.len() as u32))
                    }
                    Err(e) => {
                        tracing::info!(%sgid, %dgid, error = &e as &dyn std::error::Error, "QP1 send refused");
                        self.stats.mads_refused += 1;
                        Err(GENERAL_ERR)
                    }
                }
            }
            _ => {
                q.ud.as_ref().ok_or(GENERAL_ERR)?;
                if Some(sgid.canonical()) != q.ud_gid {
                    // The host QP sends as the GID it was created on (still bound: unbinding
                    // drops it); another source would be spoofing.
                    return Err(LOC_QP_OP_ERR);
                }
                let imm = (w.opcode == abi::wr_opcode::SEND_WITH_IMM).then_some(w.ex);
                let qkey = if w.ud_remote_qkey & 0x8000_0000 != 0 {
                    q.qkey
                } else {
                    w.ud_remote_qkey
                };
                Ok(Prepared::Ud(UdMsg {
                    dgid,
                    dqpn: w.ud_remote_qpn & rdma_wire::MAX_U24,
                    qkey,
                    imm,
                    data,
                }))
            }
        }
    }

    /// Free receive WQEs of a QP (posted, not yet consumed), or `None` on a broken ring.
    pub(super) fn rq_posted(&self, q: &Qp) -> Option<u32> {
        let at = q.pages[0] + abi::QP_RQ_RING_OFFSET;
        let t = self.mem.load_u32(at).ok()?;
        let hd = self.mem.load_u32(at + 4).ok()?;
        if !abi::idx_valid(t, q.rq_wqes) || !abi::idx_valid(hd, q.rq_wqes) {
            return None;
        }
        Some(t.wrapping_sub(hd) & (2 * q.rq_wqes - 1))
    }

    /// Delivers one received buffer (GRH area + payload) into the next receive WQE.
    /// `Ok(false)` when no WQE is posted.
    pub(super) fn deliver(
        &mut self,
        h: u32,
        grh: &[u8; GRH_LEN],
        payload: &[u8],
        src_qp: u32,
        imm: Option<u32>,
    ) -> Result<bool, ()> {
        let q = self.qps.get(&h).ok_or(())?;
        let at = q.pages[0] + abi::QP_RQ_RING_OFFSET;
        let ring = abi::Ring {
            prod_tail: self.mem.load_u32(at).map_err(|_| ())?,
            cons_head: self.mem.load_u32(at + 4).map_err(|_| ())?,
        };
        let slot = match abi::has_data(ring, q.rq_wqes) {
            Ok(Some(s)) => s,
            Ok(None) => return Ok(false),
            Err(()) => return Err(()),
        };
        let size = abi::rq_wqe_size(q.rq_sge);
        let first = 1 + q.send_chunks as usize;
        let wat = elem_addr(&q.pages, first, slot, size).ok_or(())?;
        let (pd, rq_wqes, recv_cq) = (q.pd, q.rq_wqes, q.recv_cq);
        let wqe: Option<abi::RqWqeHdr> = read_obj(&*self.mem, wat).ok();
        let mut buf = Vec::with_capacity(GRH_LEN + payload.len());
        buf.extend_from_slice(grh);
        buf.extend_from_slice(payload);
        let status = match wqe {
            Some(w) if w.num_sge <= q.rq_sge => match self.read_sges(wat + 16, w.num_sge) {
                Some(sges) => self.scatter(pd, &sges, &buf).err().unwrap_or(0),
                None => abi::wc_status::LOC_PROT_ERR,
            },
            _ => abi::wc_status::LOC_LEN_ERR,
        };
        self.mem
            .store_u32(at + 4, abi::idx_inc(ring.cons_head, rq_wqes))
            .map_err(|_| ())?;
        if status != 0 {
            self.stats.wr_errors += 1;
        }
        let cqe = abi::Cqe {
            wr_id: wqe.map(|w| w.wr_id).unwrap_or(0),
            qp: h as u64,
            opcode: abi::wc_opcode::RECV,
            status,
            byte_len: if status == 0 { buf.len() as u32 } else { 0 },
            imm_data: imm.unwrap_or(0),
            src_qp,
            wc_flags: abi::wc_flags::GRH
                | if imm.is_some() {
                    abi::wc_flags::WITH_IMM
                } else {
                    0
                },
            port_num: 1,
            ..Default::default()
        };
        self.complete(recv_cq, &cqe);
        Ok(status == 0)
    }

    /// Runs the receive side of QP `h`; `drain_mux`: ask the multiplexer for the MADs it
    /// holds back for lack of buffers (not from inside the multiplexer's own call).
    pub(super) fn receive(&mut self, h: u32, drain_mux: bool) -> usize {
        if self.qps.get(&h).is_some_and(|q| q.rc.is_some()) {
            return 0; // rc_process did it
        }
        let Some(q) = self.qps.get(&h) else { return 0 };
        if q.state != qp_state::RTR && q.state != qp_state::RTS {
            return 0;
        }
        let mut done = 0;
        if q.qp_type == qp_type::GSI {
            let Some(posted) = self.rq_posted(q) else {
                self.ring_error(h, "receive ring index beyond 2 x size");
                return 0;
            };
            self.inbox.set_credits(posted as usize);
            if posted > 0 && drain_mux {
                self.backend.receive_buffers_posted();
            }
            while done < WR_BUDGET {
                let Some(m) = self.inbox.pop() else { break };
                match self.deliver(h, &m.0, &m.1[..], 1, None) {
                    Ok(true) => self.stats.mads_received += 1,
                    Ok(false) => {
                        self.inbox.unpop(m);
                        break;
                    }
                    Err(()) => {
                        self.ring_error(h, "receive ring index beyond 2 x size");
                        break;
                    }
                }
                done += 1;
            }
            if let Some(q) = self.qps.get(&h) {
                if let Some(p) = self.rq_posted(q) {
                    self.inbox.set_credits(p as usize);
                }
            }
        } else {
            while done < WR_BUDGET {
                let Some(q) = self.qps.get(&h) else { break };
                match self.rq_posted(q) {
                    Some(0) => break,
                    None => {
                        self.ring_error(h, "receive ring index beyond 2 x size");
                        break;
                    }
                    Some(_) => {}
                }
                let Some(d) = q.ud.as_ref().and_then(|u| u.try_recv()) else {
                    break;
                };
                match self.deliver(h, &d.grh, &d.data, d.src_qpn, d.imm) {
                    Ok(true) => self.stats.ud_received += 1,
                    Ok(false) => break,
                    Err(()) => {
                        self.ring_error(h, "receive ring index beyond 2 x size");
                        break;
                    }
                }
                done += 1;
            }
        }
        done
    }
}

/// What [`Device::prepare_send`] made of a send WQE.
enum Prepared {
    /// Sent at once (QP1), bytes.
    Sent(u32),
    /// A UD message for the pass's batch.
    Ud(UdMsg),
}

/// A UD message, gathered and checked.
struct UdMsg {
    dgid: Gid,
    dqpn: u32,
    qkey: u32,
    imm: Option<u32>,
    data: Vec<u8>,
}

impl UdMsg {
    fn as_out(&self) -> UdOut<'_> {
        UdOut {
            dgid: self.dgid,
            dqpn: self.dqpn,
            qkey: self.qkey,
            imm: self.imm,
            data: &self.data,
        }
    }
}

/// A UD send WQE taken off the ring, waiting for its batch.
struct PendingUd {
    wr_id: u64,
    signaled: bool,
    out: UdMsg,
}

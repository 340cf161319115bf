//! The command channel: handles, then every command the guest's driver sends (PD, MR, CQ,
//! QP, modify QP, GID bindings), each field checked against guest RAM and this VM's objects;
//! bad commands get the ABI's errno.
use super::*;

impl Device {
    pub(super) fn alloc_handle(&mut self) -> u32 {
        loop {
            let h = self.next_handle & abi::PVRDMA_UAR_HANDLE_MASK;
            self.next_handle = self.next_handle.wrapping_add(1);
            if h != 0
                && !self.pds.contains_key(&h)
                && !self.mrs.contains_key(&h)
                && !self.cqs.contains_key(&h)
                && !self.qps.contains_key(&h)
            {
                return h;
            }
        }
    }

    /// Executes the command in the command slot and writes the response.
    pub(super) fn request(&mut self) {
        if self.dsr_gpa.is_none() {
            self.err = errno::EINVAL as u32;
            self.stats.command_errors += 1;
            return;
        }
        let mut slot = [0u8; 256];
        if let Err(e) = self.mem.read(self.cmd_slot, &mut slot) {
            tracing::debug!(
                error = &e as &dyn std::error::Error,
                "reading the command slot"
            );
            self.err = e.errno() as u32;
            self.stats.command_errors += 1;
            return;
        }
        let hdr = abi::CmdHdr::read_from_prefix(&slot)
            .map(|(h, _)| h)
            .unwrap_or_default();
        self.stats.commands += 1;
        let mut resp = [0u8; 256];
        let result = self.execute(&hdr, &slot, &mut resp);
        let (err, len) = match result {
            Ok(len) => (0u8, len),
            Err(e) => {
                tracing::debug!(
                    cmd = hdr.cmd,
                    error = &e as &dyn std::error::Error,
                    "pvrdma command failed"
                );
                self.stats.command_errors += 1;
                (e.errno(), core::mem::size_of::<abi::RespHdr>())
            }
        };
        let rh = abi::RespHdr {
            response: hdr.response,
            ack: abi::resp_code::for_cmd(hdr.cmd.min(cmd_code::MAX)),
            err,
            reserved: [0; 3],
        };
        resp[..16].copy_from_slice(pvrdma_abi::IntoBytes::as_bytes(&rh));
        if let Err(e) = self.mem.write(self.resp_slot, &resp[..len.max(16)]) {
            tracing::debug!(
                error = &e as &dyn std::error::Error,
                "writing the response slot"
            );
        }
        self.err = err as u32;
        self.raise(0);
    }

    pub(super) fn execute(
        &mut self,
        hdr: &abi::CmdHdr,
        slot: &[u8; 256],
        resp: &mut [u8; 256],
    ) -> Result<usize, VrdmaError> {
        fn cmd<T: FromBytes + pvrdma_abi::KnownLayout + pvrdma_abi::Immutable>(slot: &[u8]) -> T {
            T::read_from_prefix(slot)
                .map(|(v, _)| v)
                .unwrap_or_else(|_| T::new_zeroed())
        }
        fn put<T: pvrdma_abi::IntoBytes + pvrdma_abi::Immutable>(
            resp: &mut [u8; 256],
            v: &T,
        ) -> usize {
            let b = v.as_bytes();
            resp[..b.len()].copy_from_slice(b);
            b.len()
        }
        match hdr.cmd {
            cmd_code::QUERY_PORT => {
                let c: abi::CmdQueryPort = cmd(slot);
                if c.port_num != 1 {
                    return Err(invalid(
                        "port_num",
                        c.port_num as u64,
                        "the device has port 1",
                    ));
                }
                let r = abi::RespQueryPort {
                    hdr: Default::default(),
                    attrs: abi::PortAttr {
                        state: abi::port_state::ACTIVE,
                        max_mtu: abi::mtu::MTU_4096,
                        active_mtu: abi::mtu::MTU_4096,
                        gid_tbl_len: GID_TBL_LEN as u32,
                        port_cap_flags: abi::PVRDMA_PORT_CM_SUP | abi::PVRDMA_PORT_IP_BASED_GIDS,
                        max_msg_sz: MAX_UD_PAYLOAD as u32,
                        pkey_tbl_len: 1,
                        active_width: 1,
                        active_speed: 1,
                        phys_state: 5,
                        ..Default::default()
                    },
                };
                Ok(put(resp, &r))
            }
            cmd_code::QUERY_PKEY => {
                let c: abi::CmdQueryPkey = cmd(slot);
                if c.port_num != 1 || c.index != 0 {
                    return Err(invalid(
                        "pkey index",
                        c.index as u64,
                        "one P_Key at index 0",
                    ));
                }
                Ok(put(
                    resp,
                    &abi::RespQueryPkey {
                        pkey: 0xffff,
                        ..Default::default()
                    },
                ))
            }
            cmd_code::CREATE_PD => {
                if self.pds.len() >= MAX_PD {
                    return Err(VrdmaError::TableFull {
                        kind: "PD",
                        max: MAX_PD,
                    });
                }
                let h = self.alloc_handle();
                self.pds.insert(h, Pd { handle: h });
                Ok(put(
                    resp,
                    &abi::RespCreatePd {
                        pd_handle: h,
                        ..Default::default()
                    },
                ))
            }
            cmd_code::DESTROY_PD => {
                let c: abi::CmdDestroyPd = cmd(slot);
                if !self.pds.contains_key(&c.pd_handle) {
                    return Err(no("PD", c.pd_handle));
                }
                let used = self.mrs.values().any(|m| m.pd == c.pd_handle)
                    || self.qps.values().any(|q| q.pd == c.pd_handle);
                if used {
                    return Err(VrdmaError::Busy {
                        kind: "PD",
                        handle: c.pd_handle,
                    });
                }
                self.pds.remove(&c.pd_handle);
                self.rc.drop_pd(c.pd_handle);
                Ok(16)
            }
            cmd_code::CREATE_MR => {
                let c: abi::CmdCreateMr = cmd(slot);
                let h = self.create_mr(&c)?;
                let key = self.mrs.get(&h).map_or(0, |m| m.key);
                Ok(put(
                    resp,
                    &abi::RespCreateMr {
                        mr_handle: h,
                        lkey: key,
                        rkey: key,
                        ..Default::default()
                    },
                ))
            }
            cmd_code::DESTROY_MR => {
                let c: abi::CmdDestroyMr = cmd(slot);
                let mr = self.mrs.remove(&c.mr_handle).ok_or(no("MR", c.mr_handle))?;
                self.rc_deregister_mr(&mr);
                Ok(16)
            }
            cmd_code::CREATE_CQ => {
                let c: abi::CmdCreateCq = cmd(slot);
                let (h, n) = self.create_cq(&c)?;
                Ok(put(
                    resp,
                    &abi::RespCreateCq {
                        cq_handle: h,
                        cqe: n,
                        ..Default::default()
                    },
                ))
            }
            cmd_code::DESTROY_CQ => {
                let c: abi::CmdDestroyCq = cmd(slot);
                if !self.cqs.contains_key(&c.cq_handle) {
                    return Err(no("CQ", c.cq_handle));
                }
                if self
                    .qps
                    .values()
                    .any(|q| q.send_cq == c.cq_handle || q.recv_cq == c.cq_handle)
                {
                    return Err(VrdmaError::Busy {
                        kind: "CQ",
                        handle: c.cq_handle,
                    });
                }
                self.cqs.remove(&c.cq_handle);
                Ok(16)
            }
            cmd_code::CREATE_QP => {
                let c: abi::CmdCreateQp = cmd(slot);
                let r = self.create_qp(&c)?;
                Ok(put(resp, &r))
            }
            cmd_code::MODIFY_QP => {
                let c: abi::CmdModifyQp = cmd(slot);
                self.modify_qp(&c)?;
                Ok(16)
            }
            cmd_code::QUERY_QP => {
                let c: abi::CmdQueryQp = cmd(slot);
                let q = self.qps.get(&c.qp_handle).ok_or(no("QP", c.qp_handle))?;
                let mut r = abi::RespQueryQp {
                    hdr: Default::default(),
                    attrs: abi::QpAttr {
                        qp_state: q.state,
                        cur_qp_state: q.state,
                        path_mtu: abi::mtu::MTU_4096,
                        qkey: q.qkey,
                        port_num: 1,
                        cap: abi::QpCap {
                            max_send_wr: q.sq_wqes,
                            max_recv_wr: q.rq_wqes,
                            max_send_sge: q.sq_sge,
                            max_recv_sge: q.rq_sge,
                            ..Default::default()
                        },
                        ..Default::default()
                    },
                };
                if let Some(st) = &q.rc {
                    st.query(&mut r.attrs);
                }
                Ok(put(resp, &r))
            }
            cmd_code::DESTROY_QP => {
                let c: abi::CmdDestroyQp = cmd(slot);
                let q = self.qps.remove(&c.qp_handle).ok_or(no("QP", c.qp_handle))?;
                self.rc_destroyed(&q);
                Ok(put(resp, &abi::RespDestroyQp::default()))
            }
            cmd_code::CREATE_BIND => {
                let c: abi::CmdCreateBind = cmd(slot);
                self.create_bind(&c)?;
                Ok(16)
            }
            cmd_code::DESTROY_BIND => {
                let c: abi::CmdDestroyBind = cmd(slot);
                let i = c.index as usize;
                let gid = self.gids.get(i).copied().flatten().ok_or(invalid(
                    "GID index",
                    c.index as u64,
                    "no GID bound there",
                ))?;
                if gid.canonical() != Gid(c.dest_gid).canonical() {
                    return Err(invalid("GID index", c.index as u64, "holds another GID"));
                }
                self.backend.unbind_gid(gid)?;
                self.gids[i] = None;
                self.cut_ud_qps(gid);
                Ok(16)
            }
            other => Err(VrdmaError::Unsupported(other)),
        }
    }

    pub(super) fn create_mr(&mut self, c: &abi::CmdCreateMr) -> Result<u32, VrdmaError> {
        if !self.pds.contains_key(&c.pd_handle) {
            return Err(no("PD", c.pd_handle));
        }
        if self.mrs.len() >= MAX_MR {
            return Err(VrdmaError::TableFull {
                kind: "MR",
                max: MAX_MR,
            });
        }
        let dma = c.flags & abi::PVRDMA_MR_FLAG_DMA != 0;
        if c.flags & !abi::PVRDMA_MR_FLAG_DMA != 0 {
            return Err(invalid(
                "MR flags",
                c.flags as u64,
                "only DMA and plain regions",
            ));
        }
        let mut mr = Mr {
            handle: 0,
            pd: c.pd_handle,
            access: c.access_flags,
            dma,
            start: c.start,
            length: c.length,
            pages: Vec::new(),
            key: 0,
        };
        if !dma {
            let end = c
                .start
                .checked_add(c.length)
                .filter(|_| c.length > 0)
                .ok_or(invalid("MR length", c.length, "empty or wraps"))?;
            let first = c.start / abi::PVRDMA_PAGE_SIZE;
            let last = (end - 1) / abi::PVRDMA_PAGE_SIZE;
            let need = last - first + 1;
            if need != c.nchunks as u64 {
                return Err(invalid(
                    "MR nchunks",
                    c.nchunks as u64,
                    "does not cover start..start+length",
                ));
            }
            mr.pages = walk_pdir(&*self.mem, c.pdir_dma, c.nchunks, MAX_MR_PAGES)?;
        }
        let h = self.alloc_handle();
        mr.handle = h;
        self.mrs.insert(h, mr);
        match self.rc_register_mr(h) {
            Ok(key) => {
                if let Some(m) = self.mrs.get_mut(&h) {
                    m.key = key;
                }
                Ok(h)
            }
            Err(e) => {
                self.mrs.remove(&h);
                Err(e)
            }
        }
    }

    pub(super) fn create_cq(&mut self, c: &abi::CmdCreateCq) -> Result<(u32, u32), VrdmaError> {
        if self.cqs.len() >= MAX_CQ {
            return Err(VrdmaError::TableFull {
                kind: "CQ",
                max: MAX_CQ,
            });
        }
        if c.cqe == 0 || c.cqe > MAX_CQE || !c.cqe.is_power_of_two() {
            return Err(invalid(
                "cqe",
                c.cqe as u64,
                "must be a power of two up to 4096",
            ));
        }
        let need = 1 + (c.cqe as u64 * 64).div_ceil(abi::PVRDMA_PAGE_SIZE);
        if (c.nchunks as u64) < need {
            return Err(invalid(
                "CQ nchunks",
                c.nchunks as u64,
                "too few pages for the entries",
            ));
        }
        let pages = walk_pdir(&*self.mem, c.pdir_dma, c.nchunks, need as u32)?;
        let h = self.alloc_handle();
        self.cqs.insert(
            h,
            Cq {
                handle: h,
                cqe: c.cqe,
                pages,
                error: false,
            },
        );
        Ok((h, c.cqe))
    }

    pub(super) fn create_qp(
        &mut self,
        c: &abi::CmdCreateQp,
    ) -> Result<abi::RespCreateQp, VrdmaError> {
        if self.qps.len() >= MAX_QP {
            return Err(VrdmaError::TableFull {
                kind: "QP",
                max: MAX_QP,
            });
        }
        if !self.pds.contains_key(&c.pd_handle) {
            return Err(no("PD", c.pd_handle));
        }
        for h in [c.send_cq_handle, c.recv_cq_handle] {
            if !self.cqs.contains_key(&h) {
                return Err(no("CQ", h));
            }
        }
        if c.is_srq != 0 {
            return Err(invalid(
                "is_srq",
                c.is_srq as u64,
                "shared receive queues are not supported",
            ));
        }
        let pow2 = |field, v: u32, max| {
            if v == 0 || v > max || !v.is_power_of_two() {
                Err(invalid(
                    field,
                    v as u64,
                    "must be a power of two within the device limit",
                ))
            } else {
                Ok(v)
            }
        };
        let sq_wqes = pow2("max_send_wr", c.max_send_wr, MAX_QP_WR)?;
        let rq_wqes = pow2("max_recv_wr", c.max_recv_wr, MAX_QP_WR)?;
        for (f, v) in [
            ("max_send_sge", c.max_send_sge),
            ("max_recv_sge", c.max_recv_sge),
        ] {
            if v == 0 || v > MAX_SGE {
                return Err(invalid(f, v as u64, "1 to 4 SGEs"));
            }
        }
        let sq_bytes = sq_wqes as u64 * abi::sq_wqe_size(c.max_send_sge) as u64;
        let rq_bytes = rq_wqes as u64 * abi::rq_wqe_size(c.max_recv_sge) as u64;
        let sq_pages = sq_bytes.div_ceil(abi::PVRDMA_PAGE_SIZE);
        let rq_pages = rq_bytes.div_ceil(abi::PVRDMA_PAGE_SIZE);
        if (c.send_chunks as u64) < sq_pages
            || (c.total_chunks as u64) < 1 + c.send_chunks as u64 + rq_pages
        {
            return Err(invalid(
                "QP chunks",
                c.total_chunks as u64,
                "too few pages for the queues",
            ));
        }
        let max_pages = (1 + sq_pages + rq_pages) as u32 + c.send_chunks as u32;
        let pages = walk_pdir(&*self.mem, c.pdir_dma, c.total_chunks as u32, max_pages)?;
        let mut rc = None;
        let (qpn, ud, ud_gid) = match c.qp_type {
            qp_type::GSI => {
                if self.qps.values().any(|q| q.qp_type == qp_type::GSI) {
                    return Err(VrdmaError::Invalid {
                        field: "qp_type",
                        value: c.qp_type as u64,
                        why: "the port already has its GSI QP",
                    });
                }
                (1, None, None)
            }
            qp_type::UD => {
                let gid = self.gids[0].ok_or(invalid(
                    "GID index",
                    0,
                    "bind a GID (CREATE_BIND index 0) before creating UD QPs",
                ))?;
                let q = self.backend.create_ud_qp(gid, UD_QKEY)?;
                // A datagram arriving is delivered on the port's receive thread when the device
                // is free, else it wakes the device thread (as MADs do).
                let inbox = self.inbox.clone();
                q.set_waker(Arc::new(move || inbox.wake()));
                (q.qpn(), Some(q), Some(gid.canonical()))
            }
            qp_type::RC => {
                let (qpn, st) = self.rc_create(c.pd_handle)?;
                rc = Some(st);
                // An RC QP sends from GID index 0: unbinding that GID cuts it off too.
                (qpn, None, self.gids[0].map(|g| g.canonical()))
            }
            other => {
                return Err(invalid(
                    "qp_type",
                    other as u64,
                    "only GSI, UD and RC QPs are supported",
                ))
            }
        };
        // The QP's handle is its number (as on VMware's device, where Linux uses the create
        // response's `qpn` both as the handle and as `qp_num`): 1 for GSI, the host port's QPN
        // for UD, which is unique on the port.
        let h = qpn;
        if self.qps.contains_key(&h) {
            return Err(invalid("QP number", h as u64, "already in use"));
        }
        self.qps.insert(
            h,
            Qp {
                handle: h,
                qpn,
                qp_type: c.qp_type,
                state: qp_state::RESET,
                pd: c.pd_handle,
                send_cq: c.send_cq_handle,
                recv_cq: c.recv_cq_handle,
                sq_wqes,
                rq_wqes,
                sq_sge: c.max_send_sge,
                rq_sge: c.max_recv_sge,
                send_chunks: c.send_chunks as u32,
                pages,
                sig_all: c.sq_sig_all != 0,
                qkey: if c.qp_type == qp_type::GSI {
                    rdma_wire::GSI_QKEY
                } else {
                    UD_QKEY
                },
                ud,
                ud_gid,
                rc,
            },
        );
        Ok(abi::RespCreateQp {
            hdr: Default::default(),
            qpn,
            max_send_wr: sq_wqes,
            max_recv_wr: rq_wqes,
            max_send_sge: c.max_send_sge,
            max_recv_sge: c.max_recv_sge,
            max_inline_data: 0,
        })
    }

    pub(super) fn modify_qp(&mut self, c: &abi::CmdModifyQp) -> Result<(), VrdmaError> {
        if self.qps.get(&c.qp_handle).is_some_and(|q| q.rc.is_some()) {
            return self.rc_modify(c);
        }
        let q = self
            .qps
            .get_mut(&c.qp_handle)
            .ok_or(no("QP", c.qp_handle))?;
        if c.attr_mask & !qp_attr_mask::ALL != 0 {
            return Err(invalid("attr_mask", c.attr_mask as u64, "unknown bits"));
        }
        if c.attr_mask & qp_attr_mask::QKEY != 0 {
            let want = if q.qp_type == qp_type::GSI {
                rdma_wire::GSI_QKEY
            } else {
                UD_QKEY
            };
            if c.attrs.qkey != want {
                return Err(invalid(
                    "qkey",
                    c.attrs.qkey as u64,
                    "UD QPs use the rdma_cm Q_Key 0x01234567",
                ));
            }
        }
        if c.attr_mask & qp_attr_mask::STATE != 0 {
            let to = c.attrs.qp_state;
            let ok = matches!(
                (q.state, to),
                (_, qp_state::RESET)
                    | (_, qp_state::ERR)
                    | (qp_state::RESET, qp_state::INIT)
                    | (qp_state::INIT, qp_state::INIT)
                    | (qp_state::INIT, qp_state::RTR)
                    | (qp_state::RTR, qp_state::RTS)
                    | (qp_state::RTS, qp_state::RTS)
            );
            if !ok {
                return Err(invalid("qp_state", to as u64, "not a valid transition"));
            }
            if to == qp_state::RESET {
                // Reset empties both queues: indexes back to zero.
                let hdr = q.pages[0];
                for off in [0u64, 4, 8, 12] {
                    self.mem.store_u32(hdr + off, 0)?;
                }
            }
            q.state = to;
        }
        Ok(())
    }

    pub(super) fn create_bind(&mut self, c: &abi::CmdCreateBind) -> Result<(), VrdmaError> {
        let i = c.index as usize;
        if i >= GID_TBL_LEN {
            return Err(invalid("GID index", c.index as u64, "beyond the GID table"));
        }
        let gid = Gid(c.new_gid);
        if gid.is_zero() {
            return Err(invalid("GID", 0, "the zero GID cannot be bound"));
        }
        if self.gids[i].is_some() {
            return Err(VrdmaError::Invalid {
                field: "GID index",
                value: c.index as u64,
                why: "already holds a GID",
            });
        }
        if let Err(e) = self.backend.bind_gid(gid) {
            self.stats.binds_refused += 1;
            tracing::info!(%gid, error = &e as &dyn std::error::Error, "GID registration refused");
            return Err(e.into());
        }
        self.stats.binds += 1;
        self.gids[i] = Some(gid.canonical());
        Ok(())
    }

    /// DESTROY_BIND of `gid`: every UD queue pair sending and receiving as it loses its host
    /// queue pair (an RC queue pair's transport moves to ERR) (the port stops delivering to it and it can send nothing more) and moves to
    /// the error state, with a QP_FATAL event. Another VM may own the GID next.
    pub(super) fn cut_ud_qps(&mut self, gid: Gid) {
        let gid = gid.canonical();
        let cut: Vec<u32> = self
            .qps
            .values_mut()
            .filter(|q| q.ud_gid == Some(gid))
            .map(|q| {
                q.ud = None;
                q.ud_gid = None;
                q.state = qp_state::ERR;
                // An RC QP's transport moves to ERR: its work requests flush, it sends nothing.
                if let Some(st) = &q.rc {
                    st.to_err();
                }
                q.handle
            })
            .collect();
        for h in cut {
            tracing::info!(qp = h, %gid, "GID unbound: UD queue pair cut off from the port");
            self.stats.ud_qps_unbound += 1;
            self.async_event(abi::event::QP_FATAL, h);
        }
    }
}

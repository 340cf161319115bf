//! One handler per CM message an endpoint receives (REQ, REP, RTU, MRA, REJ, DREQ, DREP,
//! SIDR_REQ, SIDR_REP), each following the IBA CM state machine as Linux's `cm.c` does. Every
//! handler checks that the message belongs to a connection of the sender (`sgid`) before it
//! acts: a message for another peer's connection is counted and dropped. `handle` in the parent
//! module only dispatches.
use std::time::Instant;

use rdma_wire::cm::{
    msg, reason, sidr_status, Drep, Dreq, Mra, Rej, Rep, Req, Rtu, SidrRep, SidrReq,
};
use rdma_wire::mad::{attr, MadHeader};
use rdma_wire::Gid;

use super::connection::{Conn, Out};
use super::{alloc_id, AcceptMode, CmEvent, ConnState, Inner, ListenOptions, SidrInfo, State};
use crate::counters::bump;
use crate::RdmaError;

impl Inner {
    /// A timeout a peer asked for, clamped ([`super::timers::peer_timeout`]) and counted.
    fn peer_timeout(&self, exp: u8) -> std::time::Duration {
        let (t, clamped) = super::timers::peer_timeout(exp);
        if clamped {
            bump(&self.stats.timeouts_clamped);
        }
        t
    }

    pub(super) fn on_req(&self, st: &mut State, sgid: Gid, r: &Req, now: Instant, out: &mut Out) {
        let key = (sgid, r.local_comm_id);
        if let Some(&id) = st.by_remote.get(&key) {
            bump(&self.stats.duplicate_req);
            let Some(c) = st.conns.get_mut(&id) else {
                return;
            };
            match c.state {
                ConnState::ReqRcvd | ConnState::MraReqSent => {
                    // The application is slow: ask the active side to wait (MRA).
                    let mra = Box::new(
                        Mra {
                            hdr: MadHeader::cm(attr::MRA, c.tid),
                            local_comm_id: c.local_id,
                            remote_comm_id: c.remote_id,
                            message_mraed: msg::REQ,
                            service_timeout: self.cfg.mra_service_timeout,
                            ..Mra::default()
                        }
                        .to_mad(),
                    );
                    c.state = ConnState::MraReqSent;
                    bump(&self.stats.mra_sent);
                    out.push((sgid, mra));
                }
                ConnState::RepSent => {
                    if let Some(l) = &c.last {
                        out.push((sgid, l.clone()));
                    }
                }
                _ => {}
            }
            return;
        }
        if st.conns.len() >= self.cfg.max_connections {
            bump(&self.stats.table_full);
            tracing::debug!(%sgid, "REQ dropped: connection table full");
            return;
        }
        let listener = st.listeners.get(&r.service_id).copied();
        let id = alloc_id(st);
        let opts = match listener {
            None
            | Some(ListenOptions {
                accept: AcceptMode::Reject(_),
                ..
            }) => {
                let why = match listener {
                    Some(ListenOptions {
                        accept: AcceptMode::Reject(w),
                        ..
                    }) => w,
                    _ => reason::INVALID_SERVICE_ID,
                };
                let rej = self.rej(r.hdr.transaction_id, id, r.local_comm_id, msg::REQ, why);
                out.push((sgid, rej));
                return;
            }
            Some(o) => o,
        };
        let mut c = Conn {
            local_id: id,
            remote_id: r.local_comm_id,
            remote_gid: sgid,
            active: false,
            state: ConnState::ReqRcvd,
            service_id: r.service_id,
            tid: r.hdr.transaction_id,
            local_qpn: opts.qpn,
            remote_qpn: r.local_qpn,
            local_psn: id & rdma_wire::MAX_U24,
            remote_psn: r.starting_psn & rdma_wire::MAX_U24,
            path_mtu: r.path_mtu,
            private_data: r.private_data.to_vec(),
            last: None,
            retries_left: 0,
            max_retries: r.max_cm_retries.min(15),
            timeout: self.peer_timeout(r.local_cm_response_timeout),
            deadline: None,
            waiter: None,
            disc_waiter: None,
        };
        match opts.accept {
            AcceptMode::Auto => self.send_rep(&mut c, now, out),
            _ => self.event(CmEvent::ConnectRequest(c.info())),
        }
        st.by_remote.insert(key, id);
        st.conns.insert(id, c);
    }

    /// REP received from `sgid`.
    pub(super) fn on_rep(&self, st: &mut State, sgid: Gid, r: &Rep, out: &mut Out) {
        let known = st
            .conns
            .get(&r.remote_comm_id)
            .is_some_and(|c| c.active && c.remote_gid == sgid);
        if !known {
            bump(&self.stats.unknown_comm_id);
            let rej = self.rej(
                r.hdr.transaction_id,
                r.remote_comm_id,
                r.local_comm_id,
                msg::OTHER,
                reason::INVALID_COMM_ID,
            );
            out.push((sgid, rej));
            return;
        }
        let Some(c) = st.conns.get_mut(&r.remote_comm_id) else {
            return;
        };
        match c.state {
            ConnState::ReqSent | ConnState::MraReqRcvd => {
                c.remote_id = r.local_comm_id;
                c.remote_qpn = r.local_qpn;
                c.remote_psn = r.starting_psn & rdma_wire::MAX_U24;
                c.private_data = r.private_data.to_vec();
                let rtu = Rtu {
                    hdr: MadHeader::cm(attr::RTU, c.tid),
                    local_comm_id: c.local_id,
                    remote_comm_id: c.remote_id,
                    ..Rtu::default()
                };
                let mad = Box::new(rtu.to_mad());
                c.last = Some(mad.clone());
                c.deadline = None;
                c.state = ConnState::Established;
                out.push((sgid, mad));
                let info = c.info();
                c.finish(Ok(info.clone()), out);
                let key = (sgid, r.local_comm_id);
                st.by_remote.insert(key, r.remote_comm_id);
                bump(&self.stats.established);
                self.event(CmEvent::Established(info));
            }
            ConnState::Established => {
                // Our RTU was lost: send it again.
                if let Some(l) = &c.last {
                    out.push((sgid, l.clone()));
                }
            }
            _ => {}
        }
    }

    /// RTU received from `sgid`.
    pub(super) fn on_rtu(&self, st: &mut State, sgid: Gid, r: &Rtu) {
        match st.conns.get_mut(&r.remote_comm_id) {
            Some(c) if c.remote_gid == sgid && c.state == ConnState::RepSent => {
                c.state = ConnState::Established;
                c.deadline = None;
                c.last = None;
                bump(&self.stats.established);
                self.event(CmEvent::Established(c.info()));
            }
            Some(c) if c.remote_gid == sgid => {}
            _ => bump(&self.stats.unknown_comm_id),
        }
    }

    /// MRA received from `sgid`.
    pub(super) fn on_mra(&self, st: &mut State, sgid: Gid, r: &Mra, now: Instant) {
        bump(&self.stats.mra_received);
        match st.conns.get_mut(&r.remote_comm_id) {
            Some(c) if c.remote_gid == sgid => {
                let extend = match (c.state, r.message_mraed) {
                    (ConnState::ReqSent, msg::REQ) => {
                        c.state = ConnState::MraReqRcvd;
                        true
                    }
                    (ConnState::MraReqRcvd, msg::REQ) | (ConnState::RepSent, msg::REP) => true,
                    _ => false,
                };
                if extend {
                    c.deadline = Some(now + self.peer_timeout(r.service_timeout) + c.timeout);
                }
            }
            _ => bump(&self.stats.unknown_comm_id),
        }
    }

    /// REJ received from `sgid`.
    pub(super) fn on_rej(&self, st: &mut State, sgid: Gid, r: &Rej, out: &mut Out) {
        bump(&self.stats.rej_received);
        let id = if r.remote_comm_id == 0 {
            st.by_remote.get(&(sgid, r.local_comm_id)).copied()
        } else {
            st.conns
                .get(&r.remote_comm_id)
                .filter(|c| c.remote_gid == sgid)
                .map(|c| c.local_id)
        };
        let Some(id) = id else {
            bump(&self.stats.unknown_comm_id);
            return;
        };
        let pre = st.conns.get(&id).is_some_and(|c| {
            !matches!(
                c.state,
                ConnState::Established | ConnState::DreqSent | ConnState::TimeWait
            )
        });
        if pre {
            if let Some(mut c) = st.conns.remove(&id) {
                st.by_remote.remove(&(c.remote_gid, c.remote_id));
                c.finish(
                    Err(RdmaError::Rejected {
                        gid: sgid,
                        reason: r.reason,
                    }),
                    out,
                );
                self.event(CmEvent::Rejected {
                    local_comm_id: id,
                    reason: r.reason,
                });
            }
        }
    }

    /// DREQ received from `sgid`.
    pub(super) fn on_dreq(&self, st: &mut State, sgid: Gid, r: &Dreq, now: Instant, out: &mut Out) {
        let Some(c) = st
            .conns
            .get_mut(&r.remote_comm_id)
            .filter(|c| c.remote_gid == sgid && c.remote_id == r.local_comm_id)
        else {
            // Linux answers a DREQ for an unknown ID with a DREP (cm_issue_drep).
            bump(&self.stats.unknown_comm_id);
            let drep = Drep {
                hdr: MadHeader::cm(attr::DREP, r.hdr.transaction_id),
                local_comm_id: r.remote_comm_id,
                remote_comm_id: r.local_comm_id,
                ..Drep::default()
            };
            out.push((sgid, Box::new(drep.to_mad())));
            return;
        };
        let drep = Box::new(
            Drep {
                hdr: MadHeader::cm(attr::DREP, r.hdr.transaction_id),
                local_comm_id: c.local_id,
                remote_comm_id: c.remote_id,
                ..Drep::default()
            }
            .to_mad(),
        );
        match c.state {
            ConnState::Established | ConnState::RepSent | ConnState::DreqSent => {
                c.state = ConnState::TimeWait;
                c.deadline = Some(now + self.cfg.timewait);
                c.last = Some(drep.clone());
                c.finish_disconnect(out);
                bump(&self.stats.disconnected);
                self.event(CmEvent::Disconnected {
                    local_comm_id: c.local_id,
                });
                out.push((sgid, drep));
            }
            ConnState::TimeWait => out.push((sgid, drep)),
            _ => {}
        }
    }

    /// DREP received from `sgid`.
    pub(super) fn on_drep(&self, st: &mut State, sgid: Gid, r: &Drep, now: Instant, out: &mut Out) {
        match st.conns.get_mut(&r.remote_comm_id) {
            Some(c) if c.remote_gid == sgid && c.state == ConnState::DreqSent => {
                c.state = ConnState::TimeWait;
                c.deadline = Some(now + self.cfg.timewait);
                c.last = None;
                c.finish_disconnect(out);
                bump(&self.stats.disconnected);
                self.event(CmEvent::Disconnected {
                    local_comm_id: c.local_id,
                });
            }
            Some(c) if c.remote_gid == sgid => {}
            _ => bump(&self.stats.unknown_comm_id),
        }
    }

    /// SIDR_REQ received from `sgid`.
    pub(super) fn on_sidr_req(&self, st: &mut State, sgid: Gid, r: &SidrReq, out: &mut Out) {
        let (status, qpn, qkey) = match st.listeners.get(&r.service_id) {
            Some(l) => match l.accept {
                AcceptMode::Reject(_) => (sidr_status::REJECT, 0, 0),
                _ => (sidr_status::SUCCESS, l.qpn, l.qkey),
            },
            None => (sidr_status::UNSUPPORTED, 0, 0),
        };
        let rep = SidrRep {
            hdr: MadHeader::cm(attr::SIDR_REP, r.hdr.transaction_id),
            request_id: r.request_id,
            status,
            qpn,
            service_id: r.service_id,
            qkey,
            ..SidrRep::default()
        };
        bump(&self.stats.sidr_answered);
        out.push((sgid, Box::new(rep.to_mad())));
    }

    /// SIDR_REP received from `sgid`.
    pub(super) fn on_sidr_rep(&self, st: &mut State, sgid: Gid, r: &SidrRep) {
        match st.sidr_out.remove(&r.request_id) {
            Some(s) if s.dgid == sgid => {
                let res = if r.status == sidr_status::SUCCESS {
                    bump(&self.stats.sidr_resolved);
                    Ok(SidrInfo {
                        qpn: r.qpn,
                        qkey: r.qkey,
                    })
                } else {
                    Err(RdmaError::SidrStatus {
                        gid: sgid,
                        service_id: s.service_id,
                        status: r.status,
                    })
                };
                let _ = s.waiter.try_send(res);
            }
            Some(s) => {
                st.sidr_out.insert(r.request_id, s);
                bump(&self.stats.unknown_comm_id);
            }
            None => bump(&self.stats.unknown_comm_id),
        }
    }
}

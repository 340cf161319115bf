//! Per-VM communication-ID tables: a cross-check on routing, keyed by full 128-bit GIDs.
//!
//! Two maps per VM: by the VM's *local* communication ID, and by (remote GID, remote
//! communication ID) — the second is how a REJ with remote ID 0 (the active side gave up on a
//! REQ) and duplicate REQs are recognized. Entries live as long as the connection: created by
//! a REQ or REP; a DREP (sent or received) moves the entry to time-wait, where duplicate
//! DREQs and DREPs still match it, and it is removed when the time-wait ends; a REJ (sent or
//! received) removes it at once. Nothing is ever removed for being idle. Each VM's table is bounded; a VM that fills it cannot start new connections
//! until some end, and other VMs are unaffected.
use std::collections::HashMap;
use std::time::{Duration, Instant};

use rdma_wire::{CmMessage, Gid};
use serde::{Deserialize, Serialize};

/// Where a connection is, as far as the multiplexer saw its MADs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum CommState {
    /// The VM sent a REQ.
    ReqSent,
    /// The VM received a REQ (its own ID not known yet).
    ReqReceived,
    /// The VM sent a REP.
    RepSent,
    /// The VM received a REP.
    RepReceived,
    /// RTU sent or received.
    Established,
    /// DREQ sent or received.
    Disconnecting,
    /// DREP sent or received; removed when the time-wait ends.
    TimeWait,
}

/// One connection of one VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommEntry {
    /// The VM's GID on this connection.
    #[serde(with = "crate::addr::gid_serde")]
    pub local_gid: Gid,
    /// The VM's communication ID (0 while unknown: a received REQ not yet answered).
    pub local_comm_id: u32,
    /// The other side's GID.
    #[serde(with = "crate::addr::gid_serde")]
    pub remote_gid: Gid,
    /// The other side's communication ID (0 while unknown).
    pub remote_comm_id: u32,
    /// State.
    pub state: CommState,
}

/// Result of checking an inbound MAD against the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Check {
    /// Matches a known connection (or needs none: REQ, SIDR_REQ).
    Known,
    /// Names a connection the VM does not have.
    Unknown,
    /// Names a connection (or SIDR request) the VM has with another peer: the sender is not
    /// who the reply must come from.
    WrongSource,
}

/// One VM's table.
#[derive(Debug, Default)]
pub struct CommTable {
    by_local: HashMap<u32, CommEntry>,
    by_remote: HashMap<(Gid, u32), u32>,
    /// REQs received and not answered yet (REP or REJ), by (remote GID, remote ID), with
    /// when they expire. Bounded separately, so that a flood of inbound REQs cannot fill the
    /// table the VM's own connections need, and expiring after [`PASSIVE_TTL`]: a REQ the VM
    /// never answers (it was dropped on the way, or the VM ignores it) does not stay forever.
    passive: HashMap<(Gid, u32), Instant>,
    /// When `passive` is scanned for expired entries next.
    passive_scan: Option<Instant>,
    sidr: HashMap<u32, Gid>,
    timewait: HashMap<u32, Instant>,
    timewait_len: Duration,
    cap: usize,
}

impl CommTable {
    /// An empty table holding at most `cap` connections (and `cap` SIDR requests), keeping
    /// disconnected entries for `timewait`.
    pub fn new(cap: usize, timewait: Duration) -> CommTable {
        CommTable {
            cap,
            timewait_len: timewait,
            ..CommTable::default()
        }
    }

    /// Removes entries whose time-wait is over and unanswered REQs older than [`PASSIVE_TTL`].
    pub fn expire(&mut self, now: Instant) {
        self.expire_passive(now);
        if self.timewait.is_empty() {
            return;
        }
        let done: Vec<u32> = self
            .timewait
            .iter()
            .filter(|(_, t)| **t <= now)
            .map(|(id, _)| *id)
            .collect();
        for id in done {
            self.timewait.remove(&id);
            if self
                .by_local
                .get(&id)
                .is_some_and(|e| e.state == CommState::TimeWait)
            {
                self.remove_local(id);
            }
        }
    }

    /// Connections not in time-wait.
    pub fn live(&self) -> usize {
        self.by_local
            .values()
            .filter(|e| e.state != CommState::TimeWait)
            .count()
    }

    fn enter_timewait(&mut self, local: u32) {
        if let Some(e) = self.by_local.get_mut(&local) {
            e.state = CommState::TimeWait;
            self.timewait
                .insert(local, Instant::now() + self.timewait_len);
        }
    }

    /// Connections known.
    pub fn len(&self) -> usize {
        self.by_local.len() + self.passive.len()
    }

    /// Whether there is nothing in it.
    pub fn is_empty(&self) -> bool {
        self.by_local.is_empty()
            && self.by_remote.is_empty()
            && self.passive.is_empty()
            && self.sidr.is_empty()
    }

    /// Outstanding SIDR requests.
    pub fn sidr_len(&self) -> usize {
        self.sidr.len()
    }

    /// Every entry, including answered-to-be REQs (local ID 0).
    pub fn entries(&self) -> Vec<CommEntry> {
        let mut v: Vec<CommEntry> = self.by_local.values().copied().collect();
        v.sort_by_key(|e| e.local_comm_id);
        v
    }

    /// The entry of the VM's local ID.
    pub fn get(&self, local_comm_id: u32) -> Option<&CommEntry> {
        self.by_local.get(&local_comm_id)
    }

    /// Whether the VM knows (remote GID, remote ID).
    pub fn knows_remote(&self, remote_gid: Gid, remote_comm_id: u32) -> bool {
        self.by_remote
            .contains_key(&(remote_gid.canonical(), remote_comm_id))
    }

    fn full(&self) -> bool {
        self.by_local.len() >= self.cap
    }

    fn remove_local(&mut self, id: u32) {
        self.timewait.remove(&id);
        if let Some(e) = self.by_local.remove(&id) {
            if e.remote_comm_id != 0 {
                self.by_remote.remove(&(e.remote_gid, e.remote_comm_id));
            }
        }
    }

    /// Records a MAD the VM sends (`sgid` its GID, `dgid` the destination). Returns `false`
    /// when it would open a connection and the table is full (the send is then refused).
    pub fn on_outbound(&mut self, sgid: Gid, dgid: Gid, msg: &CmMessage) -> bool {
        self.expire(Instant::now());
        let (sgid, dgid) = (sgid.canonical(), dgid.canonical());
        match msg {
            CmMessage::Req(m) => {
                if let Some(e) = self.by_local.get(&m.local_comm_id) {
                    if e.remote_gid == dgid {
                        return true; // a retransmission: the connection keeps its state
                    }
                } else if self.full() {
                    return false;
                }
                self.remove_local(m.local_comm_id);
                self.by_local.insert(
                    m.local_comm_id,
                    CommEntry {
                        local_gid: sgid,
                        local_comm_id: m.local_comm_id,
                        remote_gid: dgid,
                        remote_comm_id: 0,
                        state: CommState::ReqSent,
                    },
                );
            }
            CmMessage::Rep(m) => {
                if self
                    .by_local
                    .get(&m.local_comm_id)
                    .is_some_and(|e| e.remote_gid == dgid && e.remote_comm_id == m.remote_comm_id)
                {
                    return true; // a retransmission
                }
                if !self.by_local.contains_key(&m.local_comm_id) && self.full() {
                    return false;
                }
                // The ID's previous entry goes with its by-remote key (a REP naming another
                // remote ID must not leave the old key behind: the map would grow unbounded).
                self.remove_local(m.local_comm_id);
                self.passive.remove(&(dgid, m.remote_comm_id));
                self.by_local.insert(
                    m.local_comm_id,
                    CommEntry {
                        local_gid: sgid,
                        local_comm_id: m.local_comm_id,
                        remote_gid: dgid,
                        remote_comm_id: m.remote_comm_id,
                        state: CommState::RepSent,
                    },
                );
                self.by_remote
                    .insert((dgid, m.remote_comm_id), m.local_comm_id);
            }
            CmMessage::Rtu(m) => self.establish(m.local_comm_id),
            CmMessage::Dreq(m) => self.disconnecting(m.local_comm_id),
            CmMessage::Drep(m) => self.enter_timewait(m.local_comm_id),
            CmMessage::Rej(m) => {
                self.remove_local(m.local_comm_id);
                // A REJ answering a REQ: forget the pending (remote GID, remote ID).
                self.passive.remove(&(dgid, m.remote_comm_id));
            }
            CmMessage::SidrReq(m) => {
                if !self.sidr.contains_key(&m.request_id) && self.sidr.len() >= self.cap {
                    return false;
                }
                self.sidr.insert(m.request_id, dgid);
            }
            CmMessage::Mra(_) | CmMessage::Lap(_) | CmMessage::Apr(_) | CmMessage::SidrRep(_) => {}
        }
        true
    }

    /// DREQ seen: a connection not yet in time-wait is disconnecting.
    fn disconnecting(&mut self, local: u32) {
        if let Some(e) = self.by_local.get_mut(&local) {
            if e.state != CommState::TimeWait {
                e.state = CommState::Disconnecting;
            }
        }
    }

    /// RTU seen: a connection being set up is established. States only move forward: a
    /// late duplicate RTU never revives a disconnecting connection.
    fn establish(&mut self, local: u32) {
        if let Some(e) = self.by_local.get_mut(&local) {
            if matches!(
                e.state,
                CommState::ReqSent | CommState::RepSent | CommState::RepReceived
            ) {
                e.state = CommState::Established;
            }
        }
    }

    /// The VM's entry a reply-type message names: `Ok(Some)` from the right remote GID,
    /// `Ok(None)` unknown, `Err` known but from another GID.
    fn reply_target(&self, sgid: Gid, remote_comm_id: u32) -> Result<Option<u32>, Check> {
        match self.by_local.get(&remote_comm_id) {
            None => Ok(None),
            Some(e) if e.remote_gid == sgid => Ok(Some(remote_comm_id)),
            Some(_) => Err(Check::WrongSource),
        }
    }

    /// Checks and records a MAD for the VM, received from `sgid`.
    pub fn on_inbound(&mut self, sgid: Gid, msg: &CmMessage) -> Check {
        self.expire(Instant::now());
        let sgid = sgid.canonical();
        match msg {
            CmMessage::Req(m) => {
                let key = (sgid, m.local_comm_id);
                if !self.by_remote.contains_key(&key) && self.passive.len() < self.cap {
                    self.passive.insert(key, Instant::now() + PASSIVE_TTL);
                }
                Check::Known
            }
            CmMessage::SidrReq(_) => Check::Known,
            CmMessage::SidrRep(m) => match self.sidr.get(&m.request_id) {
                Some(g) if *g == sgid => {
                    self.sidr.remove(&m.request_id);
                    Check::Known
                }
                Some(_) => Check::WrongSource,
                None => Check::Unknown,
            },
            CmMessage::Rej(m) if m.remote_comm_id == 0 => {
                // The active side gave up on its REQ (Linux: REJ reason 4, timeout, sent when
                // the REQ's cm_id is destroyed): it names only its own ID.
                let key = (sgid, m.local_comm_id);
                if self.passive.remove(&key).is_some() {
                    return Check::Known;
                }
                match self.by_remote.get(&key).copied() {
                    Some(local) => {
                        self.remove_local(local);
                        Check::Known
                    }
                    None => Check::Unknown,
                }
            }
            CmMessage::Rej(m) => match self.reply_target(sgid, m.remote_comm_id) {
                Ok(Some(l)) => {
                    self.remove_local(l);
                    Check::Known
                }
                Ok(None) => Check::Unknown,
                Err(c) => c,
            },
            CmMessage::Rep(m) => match self.reply_target(sgid, m.remote_comm_id) {
                Ok(Some(l)) => {
                    if let Some(e) = self.by_local.get_mut(&l) {
                        let old = std::mem::replace(&mut e.remote_comm_id, m.local_comm_id);
                        e.state = CommState::RepReceived;
                        // Repeated REPs naming other IDs replace the key, never add to it.
                        if old != 0 && old != m.local_comm_id {
                            self.by_remote.remove(&(sgid, old));
                        }
                    }
                    self.by_remote.insert((sgid, m.local_comm_id), l);
                    Check::Known
                }
                Ok(None) => Check::Unknown,
                Err(c) => c,
            },
            _ => {
                let Some(remote) = msg.remote_comm_id() else {
                    return Check::Unknown;
                };
                let l = match self.reply_target(sgid, remote) {
                    Ok(Some(l)) => l,
                    Ok(None) => return Check::Unknown,
                    Err(c) => return c,
                };
                match msg {
                    CmMessage::Rtu(_) => self.establish(l),
                    CmMessage::Dreq(_) => self.disconnecting(l),
                    CmMessage::Drep(_) => self.enter_timewait(l),
                    _ => {}
                }
                Check::Known
            }
        }
    }
}

/// How long an unanswered inbound REQ stays known (beyond the longest wait a CM asks for:
/// 15 retries of the clamped ~69 s peer timeout take longer, but by then the active side has
/// given up with a REJ that is delivered anyway, counted as unknown).
pub const PASSIVE_TTL: Duration = Duration::from_secs(120);

/// What [`CommTable::undo_point`] saved: the table's entry for a MAD's ID before recording
/// it, to restore when the MAD could not be sent.
#[derive(Debug, Clone, Copy)]
pub enum Undo {
    /// Nothing to undo (the MAD opens nothing).
    Nothing,
    /// A REQ or REP: the VM's local ID and its entry before.
    Conn(u32, Option<CommEntry>),
    /// A SIDR_REQ: its request ID and the GID it had before.
    Sidr(u32, Option<Gid>),
}

impl CommTable {
    /// The REP/REJ-less REQs remembered now.
    pub fn passive_len(&self) -> usize {
        self.passive.len()
    }

    /// Keys of the by-remote map (each belongs to one connection of the VM).
    pub fn remote_len(&self) -> usize {
        self.by_remote.len()
    }

    /// Drops expired unanswered REQs: a scan at most once a second (the map holds up to
    /// `cap` entries; every MAD calls this).
    fn expire_passive(&mut self, now: Instant) {
        if self.passive.is_empty() || self.passive_scan.is_some_and(|t| now < t) {
            return;
        }
        self.passive.retain(|_, t| *t > now);
        self.passive_scan = Some(now + Duration::from_secs(1));
    }

    /// Forgets an inbound REQ that never reached the VM (dropped on a full queue).
    pub fn forget_passive(&mut self, sgid: Gid, remote_comm_id: u32) {
        self.passive.remove(&(sgid.canonical(), remote_comm_id));
    }

    /// Saves what [`CommTable::on_outbound`] is about to change for `msg`.
    pub fn undo_point(&self, msg: &CmMessage) -> Undo {
        match msg {
            CmMessage::Req(m) => Undo::Conn(
                m.local_comm_id,
                self.by_local.get(&m.local_comm_id).copied(),
            ),
            CmMessage::Rep(m) => Undo::Conn(
                m.local_comm_id,
                self.by_local.get(&m.local_comm_id).copied(),
            ),
            CmMessage::SidrReq(m) => {
                Undo::Sidr(m.request_id, self.sidr.get(&m.request_id).copied())
            }
            _ => Undo::Nothing,
        }
    }

    /// Restores the table as it was at `u` (the MAD recorded since could not be sent: a
    /// connection that never left must not hold an entry).
    pub fn undo(&mut self, u: Undo) {
        match u {
            Undo::Nothing => {}
            Undo::Conn(id, prev) => {
                self.remove_local(id);
                if let Some(e) = prev {
                    if e.remote_comm_id != 0 {
                        self.by_remote.insert((e.remote_gid, e.remote_comm_id), id);
                    }
                    if e.state == CommState::TimeWait {
                        self.timewait.insert(id, Instant::now() + self.timewait_len);
                    }
                    self.by_local.insert(id, e);
                }
            }
            Undo::Sidr(id, prev) => match prev {
                Some(g) => {
                    self.sidr.insert(id, g);
                }
                None => {
                    self.sidr.remove(&id);
                }
            },
        }
    }
}

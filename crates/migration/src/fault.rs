//! A frame-aware, fault-injecting TCP proxy for the migration protocol, for tests and the
//! fault matrix (`ferry bench migrate-faults`).
//!
//! It sits between a source and a destination, reads whole frames with [`wire::recv`] in both
//! directions, counts them by direction and kind, and forwards them. A [`Fault`] names a
//! protocol position — the n-th frame of a kind in one direction, the n-th Memory frame of a
//! round, a round's RoundEnd — and an [`Action`] to take there. Since the position is defined by
//! the protocol and not by bytes or time, the fault happens whenever the migration gets that
//! far, however fast or slow the machine is; [`FaultProxy::reached`] says whether it did.
//!
//! It must never be used on a production path: it holds whole frames in memory and trusts
//! nothing it did not parse with the wire module.
use std::{
    collections::BTreeMap,
    fmt,
    io::Write,
    net::{Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs},
    sync::{
        mpsc::{self, Receiver, Sender},
        Arc, Condvar, Mutex, MutexGuard,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use crate::{
    wire::{self, Kind},
    MigrationError, Result,
};

/// Which way a frame travels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// Source → destination (memory, state, Go).
    ToDestination,
    /// Destination → source (Hello, Ready, Resumed, Abort).
    ToSource,
}

impl Direction {
    fn index(self) -> usize {
        match self {
            Direction::ToDestination => 0,
            Direction::ToSource => 1,
        }
    }
}

/// Which rounds a position applies to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rounds {
    /// This round only.
    Exactly(u32),
    /// This round or any later one (counting continues across rounds).
    AtLeast(u32),
}

impl Rounds {
    fn contains(self, round: u32) -> bool {
        match self {
            Rounds::Exactly(r) => round == r,
            Rounds::AtLeast(r) => round >= r,
        }
    }
}

/// A point in the migration protocol. Counts are 1-based.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Position {
    /// The `nth` frame of `kind` travelling in `dir`.
    Frame {
        /// Direction.
        dir: Direction,
        /// Frame kind.
        kind: Kind,
        /// Which occurrence (1 = the first).
        nth: u64,
    },
    /// The `nth` Memory frame sent in the given rounds.
    Memory {
        /// Rounds that count.
        rounds: Rounds,
        /// Which occurrence among them (1 = the first).
        nth: u64,
    },
    /// The RoundEnd frame of the first round among the given ones.
    RoundEnd(Rounds),
}

impl Position {
    /// The `nth` Memory frame of round 0.
    pub fn round0(nth: u64) -> Self {
        Position::Memory {
            rounds: Rounds::Exactly(0),
            nth,
        }
    }

    /// The first Memory frame after round 0 (a later pre-copy round or the paused one).
    pub fn later_round() -> Self {
        Position::Memory {
            rounds: Rounds::AtLeast(1),
            nth: 1,
        }
    }

    /// The vCPU/VM state, sent while the VM is paused at the switchover.
    pub fn vm_state() -> Self {
        Position::to_destination(Kind::VmState, 1)
    }

    /// The first device's state (sent after the switchover's drain).
    pub fn device_state() -> Self {
        Position::to_destination(Kind::DeviceState, 1)
    }

    /// The destination's Ready: it restored everything and waits for Go.
    pub fn ready() -> Self {
        Position::Frame {
            dir: Direction::ToSource,
            kind: Kind::Ready,
            nth: 1,
        }
    }

    /// The source's Go: the commit point.
    pub fn go() -> Self {
        Position::to_destination(Kind::Go, 1)
    }

    /// The destination's Resumed.
    pub fn resumed() -> Self {
        Position::Frame {
            dir: Direction::ToSource,
            kind: Kind::Resumed,
            nth: 1,
        }
    }

    /// The `nth` frame of `kind` from the source.
    pub fn to_destination(kind: Kind, nth: u64) -> Self {
        Position::Frame {
            dir: Direction::ToDestination,
            kind,
            nth,
        }
    }
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let rounds = |r: &Rounds| match r {
            Rounds::Exactly(n) => format!("round {n}"),
            Rounds::AtLeast(n) => format!("round >= {n}"),
        };
        match self {
            Position::Frame { dir, kind, nth } => {
                let arrow = match dir {
                    Direction::ToDestination => "source->destination",
                    Direction::ToSource => "destination->source",
                };
                write!(f, "{kind:?} #{nth} {arrow}")
            }
            Position::Memory { rounds: r, nth } => write!(f, "Memory #{nth} of {}", rounds(r)),
            Position::RoundEnd(r) => write!(f, "RoundEnd of {}", rounds(r)),
        }
    }
}

/// What the proxy does when a frame reaches the position.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Close both connections; the frame is not forwarded.
    Cut,
    /// Forward the frame with one bit of it flipped (its checksum no longer matches).
    FlipBit,
    /// Forward nothing more in either direction but keep both connections open (a peer that
    /// stopped answering), until [`FaultProxy::close`] or the proxy is dropped.
    Stall,
    /// Stop before forwarding the frame and tell the harness ([`FaultProxy::wait_held`]); the
    /// harness may act (kill a process) and then says what next ([`FaultProxy::release`]).
    Hold,
    /// Forward the frame, then close both connections.
    CutAfter,
}

/// What a held frame becomes ([`FaultProxy::release`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Forward it and carry on as if nothing happened.
    Forward,
    /// Close both connections without forwarding it.
    Cut,
    /// Forward nothing more, keep the connections open.
    Stall,
    /// Forward it, then close both connections.
    CutAfter,
}

/// A fault: where and what.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fault {
    /// Where in the protocol.
    pub at: Position,
    /// What to do there.
    pub action: Action,
}

/// Frames seen so far, by direction and kind (frames read from each side, forwarded or not).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    frames: BTreeMap<(usize, u8), u64>,
    bytes: [u64; 2],
}

impl Counts {
    /// Frames of `kind` read travelling in `dir`.
    pub fn frames(&self, dir: Direction, kind: Kind) -> u64 {
        self.frames
            .get(&(dir.index(), kind as u8))
            .copied()
            .unwrap_or(0)
    }

    /// Bytes (headers included) read travelling in `dir`.
    pub fn bytes(&self, dir: Direction) -> u64 {
        self.bytes[dir.index()]
    }
}

/// Where the proxy is in the protocol and what happened.
#[derive(Default)]
struct State {
    counts: Counts,
    /// Memory frames seen in rounds matching the fault's [`Rounds`] (if it is a Memory fault).
    memory_matching: u64,
    reached: bool,
    stalled: bool,
    closed: bool,
    pumps_done: u8,
    error: Option<String>,
}

struct Shared {
    state: Mutex<State>,
    changed: Condvar,
    /// Both connections, once accepted, to close them from any thread.
    conns: Mutex<Option<(TcpStream, TcpStream)>>,
    fault: Option<Fault>,
    held_tx: Mutex<Option<Sender<Position>>>,
    verdict_rx: Mutex<Receiver<Verdict>>,
}

impl Shared {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn close(&self) {
        self.state().closed = true;
        self.changed.notify_all();
        if let Some((a, b)) = self
            .conns
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
        {
            let _ = a.shutdown(Shutdown::Both);
            let _ = b.shutdown(Shutdown::Both);
        }
    }

    /// Counts a frame; returns the action if it is the fault's position.
    fn account(&self, dir: Direction, kind: Kind, payload: &[u8]) -> Option<Action> {
        let mut st = self.state();
        *st.counts
            .frames
            .entry((dir.index(), kind as u8))
            .or_default() += 1;
        st.counts.bytes[dir.index()] += payload.len() as u64 + 12;
        self.changed.notify_all();
        let fault = self.fault?;
        if st.reached {
            return None;
        }
        let hit = match fault.at {
            Position::Frame {
                dir: d,
                kind: k,
                nth,
            } => d == dir && k == kind && st.counts.frames(dir, kind) == nth,
            Position::Memory { rounds, nth } => {
                dir == Direction::ToDestination
                    && kind == Kind::Memory
                    && memory_round(payload).is_some_and(|r| rounds.contains(r))
                    && {
                        st.memory_matching += 1;
                        st.memory_matching == nth
                    }
            }
            Position::RoundEnd(rounds) => {
                dir == Direction::ToDestination
                    && kind == Kind::RoundEnd
                    && payload
                        .get(..4)
                        .and_then(|b| b.try_into().ok())
                        .map(u32::from_le_bytes)
                        .is_some_and(|r| rounds.contains(r))
            }
        };
        if hit {
            st.reached = true;
            tracing::info!(position = %fault.at, action = ?fault.action, "fault proxy: position reached");
            drop(st);
            self.changed.notify_all();
            Some(fault.action)
        } else {
            None
        }
    }

    /// Blocks while the proxy is stalled; returns false once it is closed.
    fn wait_unless_stalled(&self) -> bool {
        let mut st = self.state();
        while st.stalled && !st.closed {
            st = self.changed.wait(st).unwrap_or_else(|p| p.into_inner());
        }
        !st.closed
    }

    /// Waits up to `timeout` for `cond`; gives up early once both directions ended.
    fn wait_until(&self, timeout: Duration, cond: impl Fn(&State) -> bool) -> bool {
        let deadline = Instant::now() + timeout;
        let mut st = self.state();
        loop {
            if cond(&st) {
                return true;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() || st.pumps_done == 2 {
                return false;
            }
            st = self
                .changed
                .wait_timeout(st, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    fn stall(&self) {
        self.state().stalled = true;
        self.changed.notify_all();
    }
}

/// The round a Memory frame belongs to, read with the wire module's parser.
fn memory_round(payload: &[u8]) -> Option<u32> {
    wire::parse_memory(payload, |_, _| true)
        .ok()
        .map(|(r, _)| r)
}

/// A running proxy. Dropping it closes both connections.
pub struct FaultProxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    held_rx: Mutex<Receiver<Position>>,
    verdict_tx: Sender<Verdict>,
    thread: Option<JoinHandle<()>>,
}

impl FaultProxy {
    /// Listens on an ephemeral loopback port for one source; on its connection, connects to
    /// `target` and forwards frames, injecting `fault` (none: a transparent counting proxy).
    pub fn start(target: impl ToSocketAddrs, fault: Option<Fault>) -> Result<FaultProxy> {
        let target = target
            .to_socket_addrs()
            .map_err(MigrationError::io("resolving the proxy's target"))?
            .next()
            .ok_or_else(|| {
                MigrationError::Protocol("the proxy's target resolves to nothing".into())
            })?;
        let listener =
            TcpListener::bind("127.0.0.1:0").map_err(MigrationError::io("binding the proxy"))?;
        let addr = listener
            .local_addr()
            .map_err(MigrationError::io("binding the proxy"))?;
        let (held_tx, held_rx) = mpsc::channel();
        let (verdict_tx, verdict_rx) = mpsc::channel();
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            changed: Condvar::new(),
            conns: Mutex::new(None),
            fault,
            held_tx: Mutex::new(Some(held_tx)),
            verdict_rx: Mutex::new(verdict_rx),
        });
        let sh = shared.clone();
        let thread = std::thread::Builder::new()
            .name("fault-proxy".into())
            .spawn(move || serve(listener, target, sh))
            .map_err(MigrationError::io("starting the proxy thread"))?;
        Ok(FaultProxy {
            addr,
            shared,
            held_rx: Mutex::new(held_rx),
            verdict_tx,
            thread: Some(thread),
        })
    }

    /// Where the source should connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// True once a frame reached the fault's position.
    pub fn reached(&self) -> bool {
        self.shared.state().reached
    }

    /// Waits up to `timeout` for the position; returns whether it was reached.
    pub fn wait_reached(&self, timeout: Duration) -> bool {
        self.shared.wait_until(timeout, |st| st.reached)
    }

    /// With [`Action::Hold`]: waits up to `timeout` for the frame to be held; returns its
    /// position. [`release`](Self::release) it afterwards.
    pub fn wait_held(&self, timeout: Duration) -> Option<Position> {
        self.held_rx
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .recv_timeout(timeout)
            .ok()
    }

    /// Says what becomes of the held frame.
    pub fn release(&self, verdict: Verdict) {
        let _ = self.verdict_tx.send(verdict);
    }

    /// A snapshot of the frames seen so far.
    pub fn counts(&self) -> Counts {
        self.shared.state().counts.clone()
    }

    /// Waits up to `timeout` until a frame of `kind` was seen travelling in `dir` `n` times.
    pub fn wait_frames(&self, dir: Direction, kind: Kind, n: u64, timeout: Duration) -> bool {
        self.shared
            .wait_until(timeout, |st| st.counts.frames(dir, kind) >= n)
    }

    /// Why the proxy stopped forwarding other than by its fault (a peer closed, a frame it
    /// could not parse), if it did.
    pub fn error(&self) -> Option<String> {
        self.shared.state().error.clone()
    }

    /// Waits up to `timeout` until both directions ended; returns whether they did.
    pub fn wait_done(&self, timeout: Duration) -> bool {
        self.shared.wait_until(timeout, |st| st.pumps_done == 2)
    }

    /// Closes both connections (ends a stall) and stops waiting for a source.
    pub fn close(&self) {
        self.shared.close();
        // Wake the accept if no source came.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.close();
        let _ = self.verdict_tx.send(Verdict::Cut);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn serve(listener: TcpListener, target: SocketAddr, shared: Arc<Shared>) {
    let from_source = match listener.accept() {
        Ok((s, _)) => s,
        Err(e) => {
            shared.state().error = Some(format!("accepting the source: {e}"));
            return;
        }
    };
    if shared.state().closed {
        return;
    }
    let to_dest = match TcpStream::connect_timeout(&target, Duration::from_secs(30)) {
        Ok(s) => s,
        Err(e) => {
            shared.state().error = Some(format!("connecting to the destination {target}: {e}"));
            let _ = from_source.shutdown(Shutdown::Both);
            return;
        }
    };
    let _ = from_source.set_nodelay(true);
    let _ = to_dest.set_nodelay(true);
    let clones = (|| {
        Ok::<_, std::io::Error>((
            from_source.try_clone()?,
            to_dest.try_clone()?,
            from_source.try_clone()?,
            to_dest.try_clone()?,
        ))
    })();
    let (src_r, dst_r, src_w, dst_w) = match clones {
        Ok(c) => c,
        Err(e) => {
            shared.state().error = Some(format!("cloning the proxy's sockets: {e}"));
            return;
        }
    };
    *shared.conns.lock().unwrap_or_else(|p| p.into_inner()) = Some((from_source, to_dest));
    if shared.state().closed {
        shared.close();
    }
    let sh = shared.clone();
    let back = std::thread::Builder::new()
        .name("fault-proxy-back".into())
        .spawn(move || pump(Direction::ToSource, dst_r, src_w, &sh));
    pump(Direction::ToDestination, src_r, dst_w, &shared);
    match back {
        Ok(t) => {
            let _ = t.join();
        }
        Err(e) => {
            shared.state().error = Some(format!("starting the proxy's second thread: {e}"));
            shared.close();
        }
    }
}

/// Forwards frames read from `from` to `to` until either side ends or the fault closes both.
fn pump(dir: Direction, from: TcpStream, mut to: TcpStream, shared: &Shared) {
    let mut reader = std::io::BufReader::with_capacity(1 << 20, &from);
    let mut payload = Vec::new();
    let mut frame = Vec::new();
    let end = |why: Option<String>| {
        let mut st = shared.state();
        if why.is_some() && st.error.is_none() && !st.reached && !st.closed {
            st.error = why;
        }
    };
    loop {
        let kind = match wire::recv(&mut reader, &mut payload) {
            Ok(k) => k,
            Err(e) => {
                // The peer closed or sent what the wire module refuses: pass the end on (a
                // half-close, so what the other way still carries arrives), unless stalled.
                let stalled = shared.state().stalled;
                if !stalled {
                    end(match &e {
                        MigrationError::Io { .. } => None,
                        other => Some(format!("{dir:?}: {other}")),
                    });
                    let _ = to.shutdown(Shutdown::Write);
                }
                break;
            }
        };
        let action = shared.account(dir, kind, &payload);
        let action = match action {
            Some(Action::Hold) => {
                let held = shared
                    .held_tx
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .take();
                let position = shared.fault.map(|f| f.at);
                if let (Some(tx), Some(p)) = (held, position) {
                    let _ = tx.send(p);
                }
                let verdict = shared
                    .verdict_rx
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .recv()
                    .unwrap_or(Verdict::Cut);
                match verdict {
                    Verdict::Forward => None,
                    Verdict::Cut => Some(Action::Cut),
                    Verdict::Stall => Some(Action::Stall),
                    Verdict::CutAfter => Some(Action::CutAfter),
                }
            }
            other => other,
        };
        if !shared.wait_unless_stalled() {
            break;
        }
        frame.clear();
        // Re-encoded by the wire module: the same bytes the peer sent.
        if wire::send(&mut frame, kind, &payload).is_err() {
            break;
        }
        match action {
            Some(Action::Cut) => {
                shared.close();
                break;
            }
            Some(Action::Stall) => {
                shared.stall();
                continue;
            }
            Some(Action::FlipBit) => {
                // One bit of the payload, or of the checksum when there is none.
                let at = if frame.len() > 12 {
                    12 + (frame.len() - 12) / 2
                } else {
                    8
                };
                frame[at] ^= 0x10;
            }
            Some(Action::CutAfter) => {
                // Nothing more goes either way once this frame is out (the answer to it
                // must not slip through before the cut).
                shared.state().closed = true;
            }
            Some(Action::Hold) | None => {}
        }
        if to.write_all(&frame).and_then(|_| to.flush()).is_err() {
            // The other side is gone: the sender should learn it as it would without a proxy.
            end(None);
            let _ = from.shutdown(Shutdown::Both);
            break;
        }
        if action == Some(Action::CutAfter) {
            shared.close();
            break;
        }
    }
    let mut st = shared.state();
    st.pumps_done += 1;
    drop(st);
    shared.changed.notify_all();
}

#[cfg(test)]
#[path = "fault_tests.rs"]
mod tests;

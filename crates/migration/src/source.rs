//! The sending side: pre-copy rounds with KVM dirty logging, then switchover.
use std::{
    collections::BTreeSet,
    io::{BufWriter, Write},
    net::{TcpStream, ToSocketAddrs},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};
use vmm::{memory::GuestRam, Vm};

use crate::{
    channels::ZeroPages,
    device::MigratableDevice,
    dirty::DirtyMap,
    error::chain,
    hash::memory_hash,
    report::{MigrationReport, Progress, RoundReport},
    transport::{self, Conn, Security},
    wire::{self, Kind, MemoryBatch, PAGE},
    MigrationError, Result,
};

/// Cancels a running migration from another thread, up to the commit point.
///
/// `cancel()` before Go makes the migration fail with [`MigrationError::Cancelled`] at its next
/// frame, or at once if it waits for the destination (the connection is shut down under it);
/// the VM keeps running on the source. After Go it does nothing: the commit stands.
#[derive(Debug, Default)]
pub struct CancelToken {
    state: std::sync::Mutex<CancelState>,
    flag: AtomicBool,
}

#[derive(Debug, Default)]
struct CancelState {
    committed: bool,
    tcp: Option<TcpStream>,
    /// The data channels' sockets.
    data: Vec<TcpStream>,
}

impl CancelToken {
    /// Asks the migration to stop. Returns false when it is past Go (too late).
    pub fn cancel(&self) -> bool {
        let st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if st.committed {
            return false;
        }
        self.flag.store(true, Ordering::SeqCst);
        for tcp in st.tcp.iter().chain(&st.data) {
            let _ = tcp.shutdown(std::net::Shutdown::Both);
        }
        true
    }

    /// True once cancelled (before Go).
    pub fn is_cancelled(&self) -> bool {
        self.flag.load(Ordering::SeqCst)
    }

    fn attach(&self, tcp: &TcpStream) {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        st.tcp = tcp.try_clone().ok();
        if self.flag.load(Ordering::SeqCst) {
            let _ = tcp.shutdown(std::net::Shutdown::Both);
        }
    }

    pub(crate) fn attach_data(&self, tcp: &TcpStream) {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if let Ok(t) = tcp.try_clone() {
            st.data.push(t);
        }
        if self.flag.load(Ordering::SeqCst) {
            let _ = tcp.shutdown(std::net::Shutdown::Both);
        }
    }

    /// The commit point: false if cancelled first; afterwards `cancel` no longer acts.
    fn commit(&self) -> bool {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if self.flag.load(Ordering::SeqCst) {
            return false;
        }
        st.committed = true;
        st.tcp = None;
        st.data.clear();
        true
    }
}

/// How a migration that got as far as Go ended, as far as the source can tell.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    /// The destination confirmed it runs the VM.
    #[default]
    Completed,
    /// Go was sent but the destination's confirmation never came: the destination may or may
    /// not run the VM. The source keeps it paused (never runs it again on its own); the
    /// operator checks the destination and then stops the source, or resumes it by force.
    Unknown,
}

/// What to do when the round limit is reached before the dirty set fits the downtime target.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LimitPolicy {
    /// Switch over anyway (longer downtime).
    Finish,
    /// Give up; the VM keeps running here.
    Abort,
}

/// Auto-converge: the first throttle, the step while the guest still outruns the link, the
/// most, and the period the duty cycle runs over.
const THROTTLE_INITIAL: u32 = 20;
const THROTTLE_STEP: u32 = 20;
const THROTTLE_MAX: u32 = 99;
const THROTTLE_PERIOD: Duration = Duration::from_millis(20);

/// Auto-converge (as QEMU's): holds the vCPUs off for `pct` percent of every period, so a
/// guest that dirties memory faster than the link carries it slows down until the rest fits
/// the downtime target.
struct VcpuThrottle {
    pct: std::sync::atomic::AtomicU32,
    stop: AtomicBool,
    /// Serialises the duty cycle with `halt`: when `halt` returns, the vCPUs run and stay
    /// untouched by the throttle.
    gate: std::sync::Mutex<()>,
}

impl VcpuThrottle {
    fn new() -> Self {
        VcpuThrottle {
            pct: Default::default(),
            stop: AtomicBool::new(false),
            gate: std::sync::Mutex::new(()),
        }
    }

    fn pct(&self) -> u32 {
        self.pct.load(Ordering::SeqCst)
    }

    /// The duty cycle, until `halt`.
    fn run(&self, vm: &Vm) {
        while !self.stop.load(Ordering::SeqCst) {
            let pct = self.pct();
            if pct == 0 {
                std::thread::sleep(THROTTLE_PERIOD);
                continue;
            }
            let off = THROTTLE_PERIOD * pct / 100;
            {
                let _g = self.gate.lock().unwrap_or_else(|e| e.into_inner());
                if self.stop.load(Ordering::SeqCst) {
                    break;
                }
                if vm.pause().is_ok() {
                    std::thread::sleep(off);
                    if let Err(e) = vm.resume() {
                        tracing::error!("auto-converge could not resume the vCPUs: {e}");
                        break;
                    }
                }
            }
            std::thread::sleep(THROTTLE_PERIOD - off);
        }
    }

    /// Ends the duty cycle with the vCPUs running.
    fn halt(&self) {
        self.stop.store(true, Ordering::SeqCst);
        let _g = self.gate.lock().unwrap_or_else(|e| e.into_inner());
    }
}

/// Times the switchover pauses the vCPUs to find every device ready before it goes ahead.
const SWITCHOVER_ATTEMPTS: u32 = 50;
/// How long the vCPUs run between two such attempts.
const SWITCHOVER_RETRY_DELAY: Duration = Duration::from_millis(2);

/// Tuning of a migration.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SourceOptions {
    /// Downtime the last round must fit in at the measured bandwidth.
    pub downtime: Duration,
    /// Most pre-copy rounds after round 0.
    pub max_rounds: u32,
    /// What to do at the limit.
    pub on_limit: LimitPolicy,
    /// Hash all of guest RAM at the pause (slower switchover; for tests).
    pub debug_hash: bool,
    /// Bound on connecting and on every wait for the destination.
    pub timeout: Duration,
    /// Cap on the pre-copy rounds' sending rate in bytes per second on the wire, all streams
    /// together (a token bucket; `None`: as fast as the network goes). The paused round is
    /// never throttled: it is the downtime.
    #[serde(default)]
    pub max_bandwidth: Option<u64>,
    /// Compression of guest memory on the wire (asked for in the configuration; a destination
    /// that does not accept it refuses the migration).
    #[serde(default)]
    pub compress: crate::Compression,
    /// TLS or plain TCP.
    #[serde(skip)]
    pub security: Security,
    /// Name the destination's certificate must carry (default: the host part of `to`).
    #[serde(default)]
    pub tls_server_name: Option<String>,
    /// Allow plain TCP to a destination that is not on loopback (unauthenticated, unencrypted).
    #[serde(default)]
    pub allow_insecure: bool,
    /// Cancels the migration from another thread; honoured up to Go (the VM keeps running
    /// here), ignored after it.
    #[serde(skip)]
    pub cancel: Option<Arc<CancelToken>>,
    /// Data channels for guest memory next to the main connection (each authenticated as
    /// the main one); 0 sends memory over the main connection (one stream, as a proxy that
    /// sees every frame needs).
    #[serde(default = "default_streams")]
    pub streams: u32,
}

/// Data channels unless told otherwise.
pub const DEFAULT_STREAMS: u32 = 4;

fn default_streams() -> u32 {
    DEFAULT_STREAMS
}

impl Default for SourceOptions {
    fn default() -> Self {
        SourceOptions {
            downtime: Duration::from_millis(50),
            max_rounds: 30,
            on_limit: LimitPolicy::Finish,
            debug_hash: false,
            timeout: Duration::from_secs(30),
            max_bandwidth: None,
            compress: crate::Compression::None,
            security: Security::Plain,
            tls_server_name: None,
            allow_insecure: false,
            cancel: None,
            streams: DEFAULT_STREAMS,
        }
    }
}

/// Configuration the destination needs to build the VM.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct MigrationConfig {
    /// Guest RAM size.
    pub ram_size: u64,
    /// vCPUs.
    pub vcpus: u32,
    /// External devices whose state follows.
    pub devices: Vec<String>,
    /// Data channels the source asks for (0: memory on the main connection).
    pub streams: u32,
    /// Memory may come compressed (zstd chunks on the data channels, `MemoryZstd` messages
    /// on the main connection).
    pub zstd: bool,
}

fn is_zero(page: &[u8]) -> bool {
    page.chunks_exact(8).all(|c| c == [0u8; 8])
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

struct Sender<'a> {
    out: BufWriter<Box<dyn Conn>>,
    cancel: Option<Arc<CancelToken>>,
    ram: &'a GuestRam,
    bytes: u64,
    /// The bandwidth cap of all streams while it applies.
    throttle: Option<crate::compress::TokenBucket>,
    /// The data channels, once open.
    channels: Option<crate::channels::SourceChannels>,
    /// Compresses memory messages on the main connection, when asked.
    codec: Option<crate::compress::Compressor>,
    /// Guest bytes of the data pages sent (before compression), and the pages that went
    /// compressed.
    page_bytes: u64,
    zstd_pages: u64,
    /// Where the main connection went and the name its certificate carries.
    peer: std::net::SocketAddr,
    name: String,
}

impl Sender<'_> {
    fn send(&mut self, kind: Kind, payload: &[u8]) -> Result<()> {
        if kind != Kind::Go && self.cancel.as_ref().is_some_and(|c| c.is_cancelled()) {
            return Err(MigrationError::Cancelled);
        }
        wire::send(&mut self.out, kind, payload)?;
        let n = payload.len() as u64 + 12;
        self.bytes += n;
        if let Some(t) = &self.throttle {
            let wait = t.reserve(n);
            if !wait.is_zero() {
                // What is buffered goes out first, so the wire sees the capped rate.
                self.out.flush().map_err(MigrationError::io("write"))?;
                std::thread::sleep(wait);
            }
        }
        Ok(())
    }

    /// Sends a memory message, compressed when that was asked for and makes it smaller.
    fn send_memory(&mut self, payload: &[u8], data_pages: u64) -> Result<()> {
        self.page_bytes += data_pages * PAGE;
        if let Some(z) = self
            .codec
            .as_mut()
            .and_then(|c| crate::compress::pack_batch(c, payload))
        {
            self.zstd_pages += data_pages;
            return self.send(Kind::MemoryZstd, &z);
        }
        self.send(Kind::Memory, payload)
    }

    /// Sends `runs` of pages over the data channels if open, else over the main connection
    /// (which copies every page and so always looks for zeros: `Unchecked` is `Chunk` there);
    /// returns (data pages, zero pages, skipped zero pages).
    fn send_runs(
        &mut self,
        round: u32,
        runs: &[(u64, u64)],
        zeros: ZeroPages,
    ) -> Result<(u64, u64, u64)> {
        let skip_zero = zeros == ZeroPages::Skip;
        if let Some(ch) = &mut self.channels {
            let st = ch.send_round(
                self.ram,
                round,
                runs,
                zeros,
                self.throttle.as_ref(),
                self.cancel.as_deref(),
            )?;
            self.bytes += st.bytes;
            self.page_bytes += st.data * PAGE;
            self.zstd_pages += st.zstd_pages;
            return Ok((st.data, st.zero, st.skipped));
        }
        let all = runs
            .iter()
            .flat_map(|&(gpa, n)| (0..n).map(move |i| gpa + i * PAGE));
        self.send_pages(round, all, skip_zero)
    }

    /// Sends `pages` (sorted guest-physical addresses); returns (data pages, zero pages).
    fn send_pages(
        &mut self,
        round: u32,
        pages: impl Iterator<Item = u64>,
        skip_zero: bool,
    ) -> Result<(u64, u64, u64)> {
        let (mut data, mut zero, mut skipped) = (0, 0, 0);
        let mut batch = MemoryBatch::new(round);
        let mut zero_run: Option<(u64, u32)> = None;
        let mut in_batch = 0;
        for gpa in pages {
            // A racy snapshot is what pre-copy wants: a page the guest writes while it is
            // copied is dirty again and goes out in a later round (or the paused one). It is
            // copied out with volatile accesses (the guest writes it concurrently).
            let mut copy = [0u8; PAGE as usize];
            if self.ram.read(gpa, &mut copy).is_err() {
                return Err(MigrationError::Protocol(format!(
                    "dirty page {gpa:#x} is not guest RAM"
                )));
            }
            let page = &copy[..];
            if is_zero(page) {
                if skip_zero {
                    skipped += 1;
                    continue;
                }
                zero += 1;
                zero_run = match zero_run {
                    Some((start, n)) if start + n as u64 * PAGE == gpa => Some((start, n + 1)),
                    Some((start, n)) => {
                        batch.push_zero(start, n);
                        Some((gpa, 1))
                    }
                    None => Some((gpa, 1)),
                };
            } else {
                data += 1;
                in_batch += 1;
                batch.push_page(gpa, page);
            }
            if batch.is_full() {
                if let Some((start, n)) = zero_run.take() {
                    batch.push_zero(start, n);
                }
                self.send_memory(batch.finish(), in_batch)?;
                batch = MemoryBatch::new(round);
                in_batch = 0;
            }
        }
        if let Some((start, n)) = zero_run.take() {
            batch.push_zero(start, n);
        }
        if !batch.is_empty() {
            self.send_memory(batch.finish(), in_batch)?;
        }
        Ok((data, zero, skipped))
    }
}

/// Dirty pages of a round, by source.
struct Dirty {
    pages: DirtyMap,
    kvm: u64,
    vmm: u64,
    /// Distinct pages the devices wrote (a data buffer read into twice is one page).
    device: u64,
    device_pages: BTreeSet<u64>,
}

/// Harvests the dirty set: KVM's bitmaps kept as they are, the VMM's and the devices' pages
/// set in them.
fn collect_dirty(vm: &Vm, devices: &mut [Box<dyn MigratableDevice>]) -> Result<Dirty> {
    let mut pages = DirtyMap::from_logs(vm.memory_slots().take_dirty_logs()?);
    let kvm = pages.count();
    let vmm_pages = vm.ram().take_vmm_writes();
    let vmm = vmm_pages.len() as u64;
    for p in vmm_pages {
        pages.set(p);
    }
    // A device reports a page once per command that wrote it: the report counts the set
    // (device pages are bounded by the buffers in flight, so a small set).
    let mut device_pages = BTreeSet::new();
    for d in devices.iter_mut() {
        for p in d.take_dirty_pages() {
            let p = p & !(PAGE - 1);
            if vm.ram().contains(p, PAGE) {
                pages.set(p);
                device_pages.insert(p);
            }
        }
    }
    Ok(Dirty {
        pages,
        kvm,
        vmm,
        device: device_pages.len() as u64,
        device_pages,
    })
}

/// A round after round 0 whose pages were fewer than one in this many zero...
const ZERO_SHARE: u64 = 64;
/// ...makes this many rounds after it send every page as data without looking for zeros.
const ZERO_PAUSE: u32 = 3;

/// Whether a round looks for zero pages. On the data channels the check is the sender's only
/// read of a page (`sendfile` and `vmsplice` hand the kernel references): a cache and TLB
/// miss per page, and the pages of later rounds are ones the guest just wrote, rarely zero
/// (none in the bench's heavy guests). So the rounds look only while looking pays: a round
/// that found almost none makes the next few send without looking, then one looks again,
/// so a guest that starts zeroing memory is noticed within a few rounds.
#[derive(Default)]
struct ZeroCheck {
    unchecked_left: u32,
}

impl ZeroCheck {
    /// What the next round does with zero pages.
    fn next(&self) -> ZeroPages {
        if self.unchecked_left > 0 {
            ZeroPages::Unchecked
        } else {
            ZeroPages::Chunk
        }
    }

    /// A round sent `data` pages and found `zero` zero pages (found only when it looked).
    fn observe(&mut self, looked: bool, data: u64, zero: u64) {
        if !looked {
            self.unchecked_left = self.unchecked_left.saturating_sub(1);
        } else if zero.saturating_mul(ZERO_SHARE) < data + zero {
            self.unchecked_left = ZERO_PAUSE;
        }
    }
}

/// Bytes a page costs on the wire besides itself, at worst (a chunk header of its own).
const CHUNK_OVERHEAD: u64 = 24;

/// Pre-copy rounds smaller than this say more about latency than about the rate.
const RATE_MIN_BYTES: u64 = 256 << 10;

/// The part of the downtime target the predicted paused round may take; the rest is margin
/// for what the prediction does not see (the vCPUs' pause, the state, the destination's
/// restore and answer, Go and Resumed) and for a rate that drops at the wrong moment on a
/// loaded machine. With the whole target, 1 GiB heavy guests had a median downtime of 42 ms
/// and a worst of 53 ms against 50 under load average 2-3: the rounds ended as soon as the
/// prediction fitted, so the paused round was always close to the target.
const PREDICTION_SHARE: f64 = 0.5;

/// The link as the rounds so far measured it, for predicting the paused round: the round trip
/// to the destination and back (what an empty round costs) plus bytes over the rate at which
/// the last rounds large enough to tell were taken in (sent and caught up with on the
/// destination), the slower of the last two (one fast round says little about the next on a
/// shared machine), not an average over all rounds, which the large round 0 dominates.
#[derive(Default)]
struct LinkEstimate {
    trip: Duration,
    /// Bytes per second, of the last round large enough to tell and of the one before.
    rate: f64,
    prev_rate: f64,
}

impl LinkEstimate {
    /// A round of `bytes` took `took` from its first byte until the destination had it all;
    /// a round trip took `trip` right after.
    fn observe(&mut self, bytes: u64, took: Duration, trip: Duration) {
        self.trip = trip;
        if bytes >= RATE_MIN_BYTES || self.rate == 0.0 {
            let t = took.saturating_sub(trip).as_secs_f64().max(1e-6);
            if bytes >= RATE_MIN_BYTES {
                self.prev_rate = self.rate;
            }
            self.rate = bytes as f64 / t;
        }
    }

    /// The rate predictions use: the slower of the last two measured.
    fn conservative_rate(&self) -> f64 {
        if self.prev_rate > 0.0 {
            self.rate.min(self.prev_rate)
        } else {
            self.rate
        }
    }

    /// How long `bytes` would take to send and be taken in, round trip included.
    fn predict(&self, bytes: u64) -> Duration {
        if bytes == 0 {
            return self.trip;
        }
        let rate = self.conservative_rate().max(1.0);
        self.trip + Duration::from_secs_f64((bytes as f64 / rate).min(1e6))
    }
}

/// Asks the destination to confirm that its data channels have taken in every round so far;
/// returns how long that took.
fn sync(tx: &mut Sender<'_>, buf: &mut Vec<u8>) -> Result<Duration> {
    let t = Instant::now();
    tx.send(Kind::Sync, &[])?;
    tx.out.flush().map_err(MigrationError::io("write"))?;
    expect(tx.out.get_mut(), Kind::Synced, buf)?;
    Ok(t.elapsed())
}

/// Reads the destination's next message, expecting `want`.
fn expect(stream: &mut dyn Conn, want: Kind, buf: &mut Vec<u8>) -> Result<()> {
    match wire::recv(stream, buf)? {
        k if k == want => Ok(()),
        Kind::Abort => Err(MigrationError::PeerAborted(
            String::from_utf8_lossy(buf).into_owned(),
        )),
        other => Err(MigrationError::Protocol(format!(
            "expected {want:?} from the destination, got {other:?}"
        ))),
    }
}

/// A write failed: the destination may have said why before closing.
fn explain(err: MigrationError, tcp: &TcpStream, stream: &mut dyn Conn) -> MigrationError {
    if !matches!(err, MigrationError::Io { .. }) {
        return err;
    }
    let _ = tcp.set_read_timeout(Some(Duration::from_millis(200)));
    let mut buf = Vec::new();
    match wire::recv(stream, &mut buf) {
        Ok(Kind::Abort) => MigrationError::PeerAborted(String::from_utf8_lossy(&buf).into_owned()),
        _ => err,
    }
}

/// Migrates the running `vm` to the `ferry receive` listening at `to`.
///
/// Go is the commit point. Any failure before Go returns an error with the VM running here as
/// before and devices rolled back. After Go the source never runs the VM on its own: when the
/// destination confirms, the report says [`Outcome::Completed`] and the caller ends the VM
/// here; when the confirmation does not come, the report says [`Outcome::Unknown`], the VM
/// stays paused with its devices quiesced, and the operator decides (resume by force after
/// checking that the destination does not run it, or stop).
pub fn migrate(
    vm: &Vm,
    devices: &mut [Box<dyn MigratableDevice>],
    to: &str,
    opts: &SourceOptions,
    progress: &mut dyn FnMut(&Progress),
) -> Result<MigrationReport> {
    let start = Instant::now();
    let cpu = crate::cpu::ThreadCpu::start();
    let addr = to
        .to_socket_addrs()
        .map_err(MigrationError::io("resolving the destination"))?
        .next()
        .ok_or_else(|| MigrationError::Protocol(format!("destination {to} resolves to nothing")))?;
    if !opts.security.is_tls() && !transport::is_loopback(&addr) && !opts.allow_insecure {
        return Err(MigrationError::NotMigratable(format!(
            "refusing to send the VM over plain TCP to {addr}, which is not loopback: anyone on \
             the path could read or replace it; configure TLS or allow it explicitly (insecure)"
        )));
    }
    let name = opts
        .tls_server_name
        .clone()
        .unwrap_or_else(|| transport::host_part(to).to_string());
    if opts.cancel.as_ref().is_some_and(|c| c.is_cancelled()) {
        return Err(MigrationError::Cancelled);
    }
    let stream = transport::connect(addr, &opts.security, &name, opts.timeout)?;
    let tcp = stream.tcp;
    if let Some(c) = &opts.cancel {
        c.attach(&tcp);
    }
    let tls = stream.tls;

    let mut paused = false;
    let mut prepared = Vec::new();
    let mut tx = Sender {
        out: BufWriter::with_capacity(1 << 20, stream.conn),
        cancel: opts.cancel.clone(),
        ram: vm.ram(),
        bytes: 0,
        throttle: opts
            .max_bandwidth
            .filter(|&r| r > 0)
            .map(crate::compress::TokenBucket::new),
        channels: None,
        codec: None,
        page_bytes: 0,
        zstd_pages: 0,
        peer: addr,
        name,
    };
    let throttle = VcpuThrottle::new();
    let result = std::thread::scope(|s| {
        s.spawn(|| throttle.run(vm));
        let r = run(
            vm,
            devices,
            &mut prepared,
            &mut tx,
            to,
            opts,
            start,
            &mut paused,
            progress,
            &throttle,
        );
        throttle.halt();
        r
    });
    let _ = vm.memory_slots().set_dirty_logging(false);
    vm.ram().track_vmm_writes(false);
    match result {
        Ok(mut r) => {
            r.tls = tls;
            r.cpu_s = crate::cpu::side_total(&cpu, r.cpu_s);
            r.streams = r.streams.max(1);
            if r.outcome == Outcome::Unknown {
                let _ = tcp.shutdown(std::net::Shutdown::Both);
            }
            Ok(r)
        }
        Err(e) => {
            // A cancelled migration reads as cut: say why it really ended.
            let e = if opts.cancel.as_ref().is_some_and(|c| c.is_cancelled()) {
                MigrationError::Cancelled
            } else {
                explain(e, &tcp, tx.out.get_mut().as_mut())
            };
            tracing::warn!(
                "migration to {to} failed: {}; the VM keeps running here",
                chain(&e)
            );
            for &i in &prepared {
                devices[i].rollback(vm);
            }
            if paused {
                if let Err(re) = vm.resume() {
                    tracing::error!("resuming the VM after the failed migration: {re}");
                }
            }
            Err(e)
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn run(
    vm: &Vm,
    devices: &mut [Box<dyn MigratableDevice>],
    prepared: &mut Vec<usize>,
    tx: &mut Sender<'_>,
    to: &str,
    opts: &SourceOptions,
    start: Instant,
    paused: &mut bool,
    progress: &mut dyn FnMut(&Progress),
    throttle: &VcpuThrottle,
) -> Result<MigrationReport> {
    let ram = vm.ram();
    let mut buf = Vec::new();
    tx.send(Kind::Hello, &wire::hello())?;
    tx.out.flush().map_err(MigrationError::io("write"))?;
    match wire::recv(tx.out.get_mut(), &mut buf)? {
        Kind::Hello => wire::check_hello(&buf)?,
        Kind::Abort => {
            return Err(MigrationError::PeerAborted(
                String::from_utf8_lossy(&buf).into_owned(),
            ))
        }
        other => {
            return Err(MigrationError::Protocol(format!(
                "expected Hello from the destination, got {other:?}"
            )))
        }
    }
    let config = MigrationConfig {
        ram_size: ram.size(),
        vcpus: 1,
        devices: devices.iter().map(|d| d.name()).collect(),
        streams: opts.streams.min(crate::channels::MAX_STREAMS),
        zstd: opts.compress.is_on(),
    };
    let cfg =
        postcard::to_allocvec(&config).map_err(|e| MigrationError::Encoding(e.to_string()))?;
    tx.send(Kind::Config, &cfg)?;
    if config.streams > 0 {
        tx.out.flush().map_err(MigrationError::io("write"))?;
        expect(tx.out.get_mut(), Kind::Channels, &mut buf)?;
        let inv = crate::channels::Invitation::decode(&buf)?;
        if inv.count > config.streams {
            return Err(MigrationError::Protocol(format!(
                "invited to {} data channels, asked for {}",
                inv.count, config.streams
            )));
        }
        let ch = crate::channels::SourceChannels::open(
            tx.peer.ip(),
            &inv,
            &opts.security,
            &tx.name,
            opts.timeout,
            tx.cancel.as_deref(),
            opts.compress,
        )?;
        tx.channels = Some(ch);
    } else {
        tx.codec = crate::compress::Compressor::new(opts.compress)?;
    }

    for (i, d) in devices.iter_mut().enumerate() {
        d.prepare(vm).map_err(|source| MigrationError::Device {
            name: d.name(),
            source,
        })?;
        prepared.push(i);
    }
    vm.memory_slots().set_dirty_logging(true)?;
    ram.track_vmm_writes(true);

    let mut report = MigrationReport {
        destination: to.to_string(),
        ram_bytes: ram.size(),
        downtime_target_ms: ms(opts.downtime),
        compression: opts.compress.is_on().then(|| opts.compress.to_string()),
        max_bandwidth: opts.max_bandwidth.filter(|&r| r > 0),
        ..Default::default()
    };
    let mut prog = Progress {
        phase: "precopy".into(),
        ram_bytes: ram.size(),
        ..Default::default()
    };

    tracing::debug!(at_ms = ms(start.elapsed()), "set up, round 0 starts");
    // Round 0: all non-zero memory (the destination starts zeroed).
    let t0 = Instant::now();
    let before = tx.bytes;
    // Only the memfd's data extents can hold non-zero pages; holes are skipped unread.
    let t = Instant::now();
    let extents = ram.data_ranges();
    tracing::debug!(
        ms = ms(t.elapsed()),
        extents = extents.len(),
        "data extents of the memfd"
    );
    let in_extents: u64 = extents.iter().map(|(_, len)| len / PAGE).sum();
    if tx.channels.is_some() {
        // The destination populates these ahead of the data.
        let mut payload = Vec::with_capacity(extents.len().min(1 << 20) * 16);
        for &(gpa, len) in extents.iter().take(1 << 20) {
            payload.extend_from_slice(&gpa.to_le_bytes());
            payload.extend_from_slice(&len.to_le_bytes());
        }
        tx.send(Kind::Extents, &payload)?;
        tx.out.flush().map_err(MigrationError::io("write"))?;
    }
    let runs: Vec<(u64, u64)> = extents
        .iter()
        .map(|&(gpa, len)| (gpa, len / PAGE))
        .collect();
    let (pages, _, skipped) = tx.send_runs(0, &runs, ZeroPages::Skip)?;
    let round0 = round_end(tx, 0, pages, 0, before, t0)?;
    tracing::debug!(
        at_ms = ms(start.elapsed()),
        ms = round0.ms,
        pages,
        skipped,
        "round 0 sent"
    );
    report.zero_pages_skipped = skipped + (ram.size() / PAGE).saturating_sub(in_extents);
    let mut zero_check = ZeroCheck::default();
    zero_check.observe(true, pages, skipped);

    let mut link = LinkEstimate::default();
    let mut last_send = t0.elapsed();
    report.rounds.push(round0);
    prog.bytes = tx.bytes;
    progress(&prog);

    // Later rounds: the dirty set, until what is dirty now goes out within half the target
    // (PREDICTION_SHARE) at the rate the last rounds were taken in.
    let mut round = 1;
    let mut prev_dirty: Option<u64> = None;
    let mut precopy_sent = vec![false; devices.len()];
    let final_dirty = loop {
        // With data channels the destination may still be taking in the last round from its
        // socket buffers (tens of MiB across the channels); wait until it has, so that
        // backlog is never part of the downtime, and the dirty set is harvested after it.
        // A second Sync right after measures the round trip alone (what even an empty
        // paused round costs).
        let (mut drain, mut trip) = (Duration::ZERO, Duration::ZERO);
        if tx.channels.is_some() {
            drain = sync(tx, &mut buf)?;
        }
        // Devices' pre-copy states go out once each, as soon as they have them: the
        // destination prepares the device with them while memory still arrives. A Sync
        // after them waits for that work, so it counts in neither the drain nor the trip.
        let precopy_now = send_precopy(vm, devices, tx, &mut precopy_sent)?;
        if precopy_now && tx.channels.is_some() {
            let t = Instant::now();
            sync(tx, &mut buf)?;
            tracing::debug!(ms = ms(t.elapsed()), "destination took the pre-copy states");
        }
        if tx.channels.is_some() {
            trip = sync(tx, &mut buf)?;
            tracing::debug!(
                round,
                drain_ms = ms(drain),
                trip_ms = ms(trip),
                "destination caught up"
            );
        }
        let last_bytes = report.rounds.last().map_or(0, |r| r.bytes);
        link.observe(last_bytes, last_send + drain, trip);
        let t = Instant::now();
        let dirty = collect_dirty(vm, devices)?;
        let n = dirty.pages.count();
        tracing::debug!(round, harvest_ms = ms(t.elapsed()), "dirty set harvested");
        let predicted = link.predict(n * (PAGE + CHUNK_OVERHEAD));
        tracing::debug!(
            round,
            dirty = n,
            predicted_ms = ms(predicted),
            rate_mbps = link.conservative_rate() / 1e6,
            "paused round predicted"
        );
        prog.round = round;
        prog.dirty_pages = n;
        // A target of zero means: no early switchover, run the rounds up to the limit. Right
        // after pre-copy states went out, the guest dirtied memory while the destination
        // prepared its devices: that goes out in one more round, not in the downtime.
        let budget = opts.downtime.mul_f64(PREDICTION_SHARE);
        if !opts.downtime.is_zero() && predicted <= budget && !precopy_now {
            progress(&prog);
            break dirty;
        }
        // Auto-converge: from round 2 on, a guest that dirtied more than half of what the
        // last round carried, or whose dirty set shrank by less than a quarter since the last
        // harvest, outruns the link: hold its vCPUs off more, twice the step when the paused
        // round would take over four times the target.
        let outruns = n * PAGE > last_bytes / 2;
        let stalled = prev_dirty.is_some_and(|p| n * 4 > p * 3);
        prev_dirty = Some(n);
        if round >= 2 && (outruns || stalled) {
            let step = if predicted > budget * 4 {
                2 * THROTTLE_STEP
            } else {
                THROTTLE_STEP
            };
            let pct = match throttle.pct() {
                0 => THROTTLE_INITIAL,
                p => (p + step).min(THROTTLE_MAX),
            };
            throttle.pct.store(pct, Ordering::SeqCst);
            report.throttle_pct = report.throttle_pct.max(pct);
            tracing::info!(round, pct, "auto-converge: vCPUs throttled");
        }
        prog.throttle_pct = throttle.pct();
        progress(&prog);
        if round > opts.max_rounds {
            if opts.on_limit == LimitPolicy::Abort {
                return Err(MigrationError::NoConvergence {
                    rounds: round - 1,
                    remaining: n,
                });
            }
            report.hit_round_limit = true;
            break dirty;
        }
        let t = Instant::now();
        let before = tx.bytes;
        let zeros = zero_check.next();
        let (pages, zero, _) = tx.send_runs(round, &dirty.pages.runs(), zeros)?;
        zero_check.observe(zeros != ZeroPages::Unchecked, pages, zero);
        let mut r = round_end(tx, round, pages, zero, before, t)?;
        last_send = t.elapsed();
        (r.dirty_kvm, r.dirty_vmm, r.dirty_device) = (dirty.kvm, dirty.vmm, dirty.device);
        r.throttle_pct = throttle.pct();
        report.rounds.push(r);
        prog.bytes = tx.bytes;
        round += 1;
    };

    // Switchover: pause, last dirty pages, state, devices. The duty cycle ends first, with
    // the vCPUs running, so the pause below is the only one.
    throttle.halt();
    prog.throttle_pct = 0;
    tx.throttle = None;
    prog.phase = "switchover".into();
    progress(&prog);
    let mut pause_at = Instant::now();
    vm.pause()?;
    *paused = true;
    // A device that cannot be captured right now gets the vCPUs back for a moment.
    for attempt in 1..=SWITCHOVER_ATTEMPTS {
        let Some((name, why)) = devices
            .iter()
            .find_map(|d| d.ready_for_switchover(vm).err().map(|why| (d.name(), why)))
        else {
            break;
        };
        if attempt == SWITCHOVER_ATTEMPTS {
            tracing::warn!(device = %name, "still not ready for the switchover ({why}); trying anyway");
            break;
        }
        tracing::debug!(device = %name, attempt, "not ready for the switchover: {why}");
        report.switchover_retries += 1;
        vm.resume()?;
        *paused = false;
        std::thread::sleep(SWITCHOVER_RETRY_DELAY);
        pause_at = Instant::now();
        vm.pause()?;
        *paused = true;
    }
    for d in devices.iter_mut() {
        d.pause(vm).map_err(|source| MigrationError::Device {
            name: d.name(),
            source,
        })?;
    }
    tracing::debug!(at_ms = ms(pause_at.elapsed()), "switchover: paused");
    let last = collect_dirty(vm, devices)?;
    let mut pages_final = final_dirty.pages;
    pages_final.merge(&last.pages);
    let t = Instant::now();
    let before = tx.bytes;
    let (pages, zero, _) = tx.send_runs(round, &pages_final.runs(), zero_check.next())?;
    let mut r = round_end(tx, round, pages, zero, before, t)?;
    (r.dirty_kvm, r.dirty_vmm, r.dirty_device) = (
        final_dirty.kvm + last.kvm,
        final_dirty.vmm + last.vmm,
        final_dirty.device_pages.union(&last.device_pages).count() as u64,
    );
    r.paused = true;
    tracing::debug!(
        at_ms = ms(pause_at.elapsed()),
        pages,
        "switchover: last pages sent"
    );
    report.rounds.push(r);
    if let Some(ch) = &mut tx.channels {
        tx.bytes += ch.finish()?;
        report.streams = ch.len() as u32;
        report.cpu_s = ch.cpu_s;
    }

    let state = vm.save_state()?;
    let state =
        postcard::to_allocvec(&state).map_err(|e| MigrationError::Encoding(e.to_string()))?;
    tx.send(Kind::VmState, &state)?;
    for d in devices.iter_mut() {
        let name = d.name();
        let blob = d.save().map_err(|source| MigrationError::Device {
            name: name.clone(),
            source,
        })?;
        tx.send(Kind::DeviceState, &wire::device_payload(&name, &blob)?)?;
        report.devices.push(name);
    }
    if opts.debug_hash {
        let t = Instant::now();
        report.memory_hash = Some(memory_hash(ram));
        report.debug_hash_ms = ms(t.elapsed());
    }
    tx.send(Kind::Complete, &[])?;
    tx.out.flush().map_err(MigrationError::io("write"))?;
    tracing::debug!(at_ms = ms(pause_at.elapsed()), "switchover: state sent");
    expect(tx.out.get_mut(), Kind::Ready, &mut buf)?;
    tracing::debug!(at_ms = ms(pause_at.elapsed()), "switchover: Ready");
    // Ready carries the destination's own hashing time (f64 ms), then the CPU seconds its
    // migration threads used so far (f64).
    let peer_f64 = |at: usize| {
        buf.get(at..at + 8)
            .and_then(|b| <[u8; 8]>::try_from(b).ok())
            .map(f64::from_le_bytes)
            .filter(|v| v.is_finite() && *v >= 0.0)
    };
    if let Some(peer) = peer_f64(0) {
        report.debug_hash_ms += peer;
    }
    report.dst_cpu_s = peer_f64(8).unwrap_or(0.0);
    if tx.cancel.as_ref().is_some_and(|c| !c.commit()) {
        return Err(MigrationError::Cancelled);
    }
    // The commit point: from the first byte of Go on, the destination may run the VM, so this
    // side never resumes it on its own again (no error below reaches the rollback).
    let confirmed = tx
        .send(Kind::Go, &[])
        .and_then(|_| tx.out.flush().map_err(MigrationError::io("write")))
        .and_then(|_| expect(tx.out.get_mut(), Kind::Resumed, &mut buf));
    if let Err(e) = confirmed {
        let why = chain(&e);
        tracing::error!(
            "Go was sent to {to} but its confirmation did not come ({why}): the destination may \
             be running the VM, so it stays paused here until an operator decides"
        );
        report.outcome = Outcome::Unknown;
        report.unknown_reason = Some(why);
        report.total_ms = ms(start.elapsed());
        report.bytes = tx.bytes;
        prog.phase = "unknown".into();
        progress(&prog);
        return Ok(report);
    }
    report.downtime_ms = (ms(pause_at.elapsed()) - report.debug_hash_ms).max(0.0);
    report.total_ms = ms(start.elapsed());
    report.bytes = tx.bytes;
    report.page_bytes = tx.page_bytes;
    report.zstd_pages = tx.zstd_pages;
    report.bandwidth_mbps = tx.bytes as f64 / start.elapsed().as_secs_f64() / 1e6;
    prog.phase = "done".into();
    prog.bytes = tx.bytes;
    prog.dirty_pages = 0;
    progress(&prog);
    Ok(report)
}

/// Sends the pre-copy state of every device not sent yet that has one now; true when any
/// went out (flushed).
fn send_precopy(
    vm: &Vm,
    devices: &mut [Box<dyn MigratableDevice>],
    tx: &mut Sender<'_>,
    sent: &mut [bool],
) -> Result<bool> {
    let mut any = false;
    for (d, sent) in devices.iter_mut().zip(sent.iter_mut()) {
        if *sent {
            continue;
        }
        let name = d.name();
        let t = Instant::now();
        let Some(blob) = d
            .precopy_state(vm)
            .map_err(|source| MigrationError::Device {
                name: name.clone(),
                source,
            })?
        else {
            continue;
        };
        tx.send(Kind::DevicePrecopy, &wire::device_payload(&name, &blob)?)?;
        tracing::debug!(
            device = %name,
            bytes = blob.len(),
            ms = ms(t.elapsed()),
            "pre-copy state sent"
        );
        *sent = true;
        any = true;
    }
    if any {
        tx.out.flush().map_err(MigrationError::io("write"))?;
    }
    Ok(any)
}

/// Ends a round that started at byte count `before`.
fn round_end(
    tx: &mut Sender<'_>,
    round: u32,
    pages: u64,
    zero: u64,
    before: u64,
    t: Instant,
) -> Result<RoundReport> {
    let bytes = tx.bytes - before;
    let mut payload = round.to_le_bytes().to_vec();
    payload.extend_from_slice(&pages.to_le_bytes());
    payload.extend_from_slice(&bytes.to_le_bytes());
    tx.send(Kind::RoundEnd, &payload)?;
    tx.out.flush().map_err(MigrationError::io("write"))?;
    Ok(RoundReport {
        round,
        pages,
        zero_pages: zero,
        bytes,
        ms: ms(t.elapsed()),
        ..Default::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Rounds stop looking for zero pages after one that found almost none, look again a
    /// few rounds later, and keep looking while they find some.
    #[test]
    fn rounds_look_for_zero_pages_while_that_pays() {
        let mut z = ZeroCheck::default();
        assert_eq!(z.next(), ZeroPages::Chunk);
        // A round with a quarter zero pages: keep looking.
        z.observe(true, 300, 100);
        assert_eq!(z.next(), ZeroPages::Chunk);
        // Fewer than one in 64: the next ZERO_PAUSE rounds send without looking.
        z.observe(true, 1000, 1);
        for _ in 0..ZERO_PAUSE {
            assert_eq!(z.next(), ZeroPages::Unchecked);
            z.observe(false, 1000, 0);
        }
        assert_eq!(z.next(), ZeroPages::Chunk);
        z.observe(true, 90, 10);
        assert_eq!(z.next(), ZeroPages::Chunk);
    }

    /// The paused round is predicted at the slower of the last two rounds large enough to
    /// tell; a small round changes only the round trip.
    #[test]
    fn the_prediction_uses_the_slower_of_the_last_two_rates() {
        let ms = Duration::from_millis;
        let close = |a: Duration, b: Duration| {
            assert!(a.abs_diff(b) < Duration::from_micros(1), "{a:?} vs {b:?}")
        };
        let mut link = LinkEstimate::default();
        // 100 MB in 1 s (after a 10 ms trip): 100 MB/s.
        link.observe(100_000_000, ms(1010), ms(10));
        assert_eq!(link.predict(0), ms(10));
        close(link.predict(10_000_000), ms(110));
        // A faster round (400 MB/s) does not make the prediction optimistic...
        link.observe(40_000_000, ms(110), ms(10));
        close(link.predict(10_000_000), ms(110));
        // ...a small one changes the trip only...
        link.observe(1000, ms(30), ms(20));
        close(link.predict(10_000_000), ms(120));
        // ...and a slow one counts at once.
        link.observe(50_000_000, ms(1020), ms(20));
        close(link.predict(10_000_000), ms(220));
    }
}

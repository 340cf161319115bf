//! `ferry bench migrate`: live migration over loopback of guests of several sizes under
//! several dirtying loads, each figure against raw loopback TCP bandwidth measured in the same
//! run. The source runs in this process; the destination is a child `ferry receive` process,
//! so each side's peak memory is its own process's.
//!
//! What the guests' memory holds (it decides what compression achieves): the `dirty` workload's
//! working set (a ledger page per 512 pages; each data page holds its generation, its number
//! and one pseudo-random 64-bit stamp per write, in a different word each time: a page written
//! a few times is nearly all zeros and compresses well, one written hundreds of times is mostly
//! random and does not), and the rest of RAM filled by the bench before the migration, each 4 KiB page
//! half pseudo-random bytes (unique per page) and half a repeating byte pattern, as a stand-in
//! for a guest's page cache: about 2:1 for zstd, like typical mixed memory.
use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{TcpListener, TcpStream},
    process::{Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::{bail, Context};
use guest_abi::{layout::WORK_BASE, Workload, WorkloadArgs};
use migration::{Compression, LimitPolicy, SourceOptions};
use serde::Serialize;
use vmm::{devices::serial::ConsoleSink, Vm, VmConfig};

use crate::cli::BenchMigrateArgs;

mod tls_floor;

/// Median and spread of one figure over the runs of a row.
#[derive(Clone, Copy, Serialize)]
struct Stat {
    median: f64,
    min: f64,
    max: f64,
}

impl Stat {
    fn of(values: impl IntoIterator<Item = f64>) -> Stat {
        let mut v: Vec<f64> = values.into_iter().filter(|x| x.is_finite()).collect();
        if v.is_empty() {
            return Stat {
                median: f64::NAN,
                min: f64::NAN,
                max: f64::NAN,
            };
        }
        v.sort_by(f64::total_cmp);
        let n = v.len();
        let median = if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        };
        Stat {
            median,
            min: v[0],
            max: v[n - 1],
        }
    }

    /// `median [min-max]` with `prec` decimals.
    fn show(&self, prec: usize) -> String {
        format!(
            "{:.p$} [{:.p$}-{:.p$}]",
            self.median,
            self.min,
            self.max,
            p = prec
        )
    }
}

/// One migration of a row.
struct Sample {
    total_ms: f64,
    downtime_ms: f64,
    rounds: usize,
    hit_round_limit: bool,
    sent_bytes: u64,
    streams: u32,
    src_cpu_s: f64,
    dst_cpu_s: f64,
    /// Peak memory of the source (this process, VmHWM reset before the migration) and of the
    /// destination (the `ferry receive` child), bytes: VmHWM plus the guest pages held
    /// unmapped (`peak_memory_of`).
    peak_src_bytes: u64,
    peak_dst_bytes: u64,
    throttle_pct: u32,
    /// Guest bytes of the data pages sent (before compression) and pages sent compressed.
    page_bytes: u64,
    zstd_pages: u64,
    ledger_ok: bool,
}

/// One run of the floor: the same bytes, memfd to fresh memfd, over as many connections.
struct FloorRun {
    secs: f64,
    send_cpu_s: f64,
    recv_cpu_s: f64,
}

#[derive(Serialize)]
struct Row {
    ram_mib: u64,
    load: String,
    /// "plain" or "tls".
    transport: String,
    /// The bandwidth cap of this row, bytes per second on the wire (absent: none).
    #[serde(skip_serializing_if = "Option::is_none")]
    max_bandwidth: Option<u64>,
    /// "zstd:LEVEL" or "none".
    compression: String,
    working_set_mib: u64,
    runs: usize,
    /// TCP connections that carried guest memory.
    streams: u32,
    total_ms: Stat,
    downtime_ms: Stat,
    rounds: usize,
    hit_round_limit: bool,
    /// Highest vCPU throttle auto-converge applied in any run, percent.
    throttle_pct: u32,
    sent_mib: f64,
    /// Guest bytes of the data pages sent (before compression), MiB (median).
    guest_page_mib: f64,
    /// Bytes on the wire over guest page bytes (below 1 with compression).
    wire_vs_guest: Stat,
    /// Data pages that went out compressed, share of all data pages (median).
    zstd_page_share: f64,
    /// Sent bytes over total time, MB/s (10^6 bytes).
    bandwidth_mbps: Stat,
    /// Guest page bytes (before compression) over total time, MB/s: what the link carried
    /// in guest terms.
    guest_mbps: Stat,
    /// CPU seconds per GiB of guest pages on each side (with compression the fair measure:
    /// the per-GiB-on-the-wire figures grow as the wire shrinks).
    src_cpu_s_per_guest_gib: Stat,
    dst_cpu_s_per_guest_gib: Stat,
    /// For capped rows: the rate over the cap (the whole migration, setup and the uncapped
    /// paused round included).
    #[serde(skip_serializing_if = "Option::is_none")]
    vs_cap: Option<Stat>,
    /// The floor's rate over the same bytes and connections, interleaved with the migrations.
    floor_mbps: Stat,
    /// Each migration's rate over the floor run next to it.
    vs_floor: Stat,
    bandwidth_vs_raw_tcp: f64,
    /// CPU seconds per GiB sent by the source's migration threads.
    src_cpu_s_per_gib: Stat,
    /// CPU seconds per GiB by the destination's migration threads.
    dst_cpu_s_per_gib: Stat,
    /// The floor's sender and receiver, CPU seconds per GiB.
    floor_send_cpu_s_per_gib: Stat,
    floor_recv_cpu_s_per_gib: Stat,
    /// Source CPU over the floor sender's, destination CPU over the floor receiver's (medians).
    src_cpu_vs_floor: f64,
    dst_cpu_vs_floor: f64,
    /// Peak memory of each side, MiB: the source (this process, VmHWM reset before the
    /// migration) and the destination (the child `ferry receive`), each VmHWM plus the guest
    /// pages it holds unmapped (`peak_memory_of`).
    peak_src_mib: Stat,
    peak_dst_mib: Stat,
    /// Each side's peak over the budget of guest RAM + 64 MiB (at most 1 is the target).
    peak_src_vs_budget: Stat,
    peak_dst_vs_budget: Stat,
    /// For TLS rows: this row's bandwidth over the plain row's of the same size and load.
    #[serde(skip_serializing_if = "Option::is_none")]
    tls_vs_plain_bandwidth: Option<f64>,
    /// For TLS rows: the TLS floor (the floor's bytes through the same rustls), its sender's
    /// and receiver's CPU seconds per GiB, and this row's CPU over them (medians).
    #[serde(skip_serializing_if = "Option::is_none")]
    tls_floor: Option<TlsFloor>,
    ledger_ok_on_destination: bool,
    /// Each migration with the floor run after it (uncapped rows; the capped rows have no
    /// floor runs): what the medians above are taken over, in the order they ran.
    per_run: Vec<RunFigures>,
}

/// One migration of a row and the floor run next to it, per GiB sent.
#[derive(Serialize)]
struct RunFigures {
    total_ms: f64,
    downtime_ms: f64,
    vs_floor: Option<f64>,
    src_cpu_s_per_gib: f64,
    dst_cpu_s_per_gib: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    floor_ms: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    floor_send_cpu_s_per_gib: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    floor_recv_cpu_s_per_gib: Option<f64>,
}

/// A TLS row's CPU against what the cipher allows.
#[derive(Serialize)]
struct TlsFloor {
    send_cpu_s_per_gib: Stat,
    recv_cpu_s_per_gib: Stat,
    src_cpu_vs_tls_floor: f64,
    dst_cpu_vs_tls_floor: f64,
}

/// The TLS floor's figures of a row (None for plain rows).
fn tls_floor_of(samples: &[Sample], floors: &[FloorRun]) -> Option<TlsFloor> {
    if floors.is_empty() {
        return None;
    }
    let gib = |s: &Sample| s.sent_bytes as f64 / (1u64 << 30) as f64;
    let send = Stat::of(
        samples
            .iter()
            .zip(floors)
            .map(|(s, f)| f.send_cpu_s / gib(s)),
    );
    let recv = Stat::of(
        samples
            .iter()
            .zip(floors)
            .map(|(s, f)| f.recv_cpu_s / gib(s)),
    );
    let src = Stat::of(samples.iter().map(|s| s.src_cpu_s / gib(s)));
    let dst = Stat::of(samples.iter().map(|s| s.dst_cpu_s / gib(s)));
    Some(TlsFloor {
        send_cpu_s_per_gib: send,
        recv_cpu_s_per_gib: recv,
        src_cpu_vs_tls_floor: src.median / send.median,
        dst_cpu_vs_tls_floor: dst.median / recv.median,
    })
}

fn print_tls_floor(t: &TlsFloor) {
    println!(
        "    TLS floor CPU s/GiB: sender {} (source x{:.2})   receiver {} (destination x{:.2})",
        t.send_cpu_s_per_gib.show(3),
        t.src_cpu_vs_tls_floor,
        t.recv_cpu_s_per_gib.show(3),
        t.dst_cpu_vs_tls_floor
    );
}

/// An ephemeral CA and one node certificate (both usages) for loopback TLS migrations.
struct BenchPki {
    dir: std::path::PathBuf,
    files: migration::TlsFiles,
}

impl BenchPki {
    fn new() -> anyhow::Result<Self> {
        use rcgen::{
            BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
        };
        let dir = control::scratch::fresh_dir("ferry-bench-pki")?;
        let ca_key = KeyPair::generate()?;
        let mut p = CertificateParams::new(Vec::<String>::new())?;
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.distinguished_name
            .push(DnType::CommonName, "ferry bench CA");
        let ca = p.self_signed(&ca_key)?;
        let key = KeyPair::generate()?;
        let mut p = CertificateParams::new(vec!["127.0.0.1".to_string()])?;
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let cert = p.signed_by(&key, &ca, &ca_key)?;
        let write = |name: &str, pem: String| -> anyhow::Result<std::path::PathBuf> {
            let path = dir.join(name);
            std::fs::write(&path, pem)?;
            Ok(path)
        };
        let files = migration::TlsFiles {
            cert: write("node.crt", cert.pem())?,
            key: write("node.key", key.serialize_pem())?,
            ca: write("ca.crt", ca.pem())?,
        };
        Ok(BenchPki { dir, files })
    }
}

impl Drop for BenchPki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[derive(Serialize)]
struct Bench {
    raw_tcp_mbps: f64,
    downtime_target_ms: u64,
    max_rounds: u32,
    rows: Vec<Row>,
}

/// Raw loopback TCP bandwidth: 2 GiB in 1 MiB writes over one connection, MB/s.
fn raw_tcp_mbps() -> anyhow::Result<f64> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    const TOTAL: usize = 2 << 30;
    let reader = std::thread::spawn(move || -> std::io::Result<usize> {
        let (mut s, _) = listener.accept()?;
        let mut buf = vec![0u8; 1 << 20];
        let mut n = 0;
        loop {
            match s.read(&mut buf)? {
                0 => return Ok(n),
                k => n += k,
            }
        }
    });
    let mut s = TcpStream::connect(addr)?;
    let chunk = vec![0x5au8; 1 << 20];
    let t = Instant::now();
    for _ in 0..TOTAL / chunk.len() {
        s.write_all(&chunk)?;
    }
    drop(s);
    let got = reader
        .join()
        .map_err(|_| anyhow::anyhow!("reader thread panicked"))??;
    if got != TOTAL {
        bail!("raw TCP: sent {TOTAL} bytes, received {got}");
    }
    Ok(TOTAL as f64 / t.elapsed().as_secs_f64() / 1e6)
}

fn rate(load: &str) -> anyhow::Result<u64> {
    Ok(match load {
        "idle" => 1,
        "moderate" => 50_000,
        "heavy" => 0,
        other => bail!("unknown load {other:?} (idle, moderate, heavy)"),
    })
}

/// Fills the RAM the workload does not use with non-zero data, as a guest's page cache would,
/// so that round 0 has real work: each page half pseudo-random (unique per page), half a
/// repeating pattern (about 2:1 for zstd).
fn fill_unused(vm: &Vm, working_set: u64) -> anyhow::Result<()> {
    let used = WORK_BASE + working_set + working_set / 512 + (4 << 20);
    let start = used.next_multiple_of(2 << 20);
    let mut page: Vec<u8> = (0..4096u32).map(|i| (i * 7 + 1) as u8).collect();
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    for r in vm.ram().regions() {
        let mut gpa = r.gpa.max(start);
        while gpa + 4096 <= r.gpa + r.size {
            for w in page[..2048].chunks_exact_mut(8) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                w.copy_from_slice(&x.to_le_bytes());
            }
            vm.ram().write(gpa, &page)?;
            gpa += 4096;
        }
    }
    vm.ram().track_vmm_writes(false);
    Ok(())
}

/// A memfd of `len` bytes (zeroed, unpopulated).
fn memfd(len: u64) -> anyhow::Result<std::fs::File> {
    use std::os::fd::FromRawFd;
    // SAFETY: memfd_create with a valid NUL-terminated name; the result is checked.
    let fd = unsafe { libc::memfd_create(c"ferry-bench-floor".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error()).context("memfd_create");
    }
    // SAFETY: fd is a fresh descriptor nobody else owns.
    let f = unsafe { std::fs::File::from_raw_fd(fd) };
    f.set_len(len)?;
    Ok(f)
}

/// The floor's source: a memfd of `len` non-zero bytes, written once (not timed). It holds
/// `resident` bytes (at least `len`), as the guest's RAM does, so that the floor takes its
/// fresh destination pages from the same pool of free memory the migration's destination does
/// (platform.md: a page the host has taken back through free page reporting costs a host fault
/// on first touch, and pages freed moments ago have not been reported yet).
fn floor_source(len: u64, resident: u64) -> anyhow::Result<std::fs::File> {
    use std::os::unix::fs::FileExt;
    let len = len.max(resident);
    let f = memfd(len)?;
    let chunk: Vec<u8> = (0..1u32 << 20).map(|i| (i * 7 + 1) as u8).collect();
    let mut off = 0;
    while off < len {
        let n = (len - off).min(chunk.len() as u64) as usize;
        f.write_all_at(&chunk[..n], off)?;
        off += n as u64;
    }
    Ok(f)
}

/// Takes `bytes` of free memory and gives it back, untimed, so that the pages the next
/// measured phase allocates (the destination's guest memory, the floor's fresh memfd) are
/// pages the host backs.
///
/// Why: this machine is itself a guest whose host takes back memory that stays free (free
/// page reporting through the balloon device). A page the host has taken back costs a host
/// fault on its first touch, inside whatever copy touches it: a fresh memfd of 4 GiB filled
/// in one go cost 2.1 CPU s/GiB, filled again right after being freed 0.7. Which phase of a
/// row met such pages depended on what ran before it (the first migration of a row took
/// 3.8 s/GiB on the destination, the ones after it 1.2-1.3), which made the speed and the
/// destination's CPU swing from run to run for reasons outside the job. On a real host
/// there are no such faults; here each phase now starts from the same state.
fn warm_free_memory(bytes: u64) -> anyhow::Result<()> {
    use std::os::unix::fs::FileExt;
    let f = memfd(bytes)?;
    let chunk = vec![0u8; 1 << 20];
    let mut off = 0;
    while off < bytes {
        let n = (bytes - off).min(chunk.len() as u64) as usize;
        f.write_all_at(&chunk[..n], off)?;
        off += n as u64;
    }
    Ok(())
}

/// A mapping of a file, unmapped on drop.
struct Mapping {
    addr: usize,
    len: usize,
}

impl Mapping {
    fn new(f: &std::fs::File, len: usize) -> anyhow::Result<Mapping> {
        use std::os::fd::AsRawFd;
        // SAFETY: a fresh shared mapping of `len` bytes of a file at least that long; nothing
        // else refers to the range.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                f.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error()).context("mmap");
        }
        Ok(Mapping {
            addr: p as usize,
            len,
        })
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping `new` made; no reference into it outlives self.
        unsafe { libc::munmap(self.addr as *mut libc::c_void, self.len) };
    }
}

/// The floor of the job: `src`'s `bytes` moved into a fresh memfd over `streams` loopback
/// connections, `sendfile` on the sending side and plain receives into the mapping on the
/// other, while a spinning thread stands in for the running guest.
fn floor_once(src: &std::fs::File, bytes: u64, streams: u32) -> anyhow::Result<FloorRun> {
    use std::os::fd::AsRawFd;
    let streams = streams.max(1) as u64;
    let dst = memfd(bytes)?;
    let map = Mapping::new(&dst, bytes as usize)?;
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let shard = (bytes / streams).next_multiple_of(4096);
    with_spinner(|| {
        std::thread::scope(|s| -> anyhow::Result<(f64, f64)> {
            let mut recv = Vec::new();
            for _ in 0..streams {
                let (listener, base) = (&listener, map.addr);
                recv.push(s.spawn(move || -> anyhow::Result<f64> {
                    let cpu = migration::cpu::ThreadCpu::start();
                    let (mut sock, _) = listener.accept()?;
                    let mut h = [0u8; 16];
                    sock.read_exact(&mut h)?;
                    let off = u64::from_le_bytes(h[..8].try_into()?);
                    let len = u64::from_le_bytes(h[8..].try_into()?);
                    if off.checked_add(len).is_none_or(|e| e > bytes) {
                        bail!("floor: shard {off}+{len} outside {bytes}");
                    }
                    let mut got = 0;
                    while got < len {
                        // SAFETY: [off+got, off+len) lies inside the mapping (checked above), which
                        // outlives this scope; each receiver writes only its own shard.
                        let n = unsafe {
                            libc::recv(
                                sock.as_raw_fd(),
                                (base + (off + got) as usize) as *mut libc::c_void,
                                (len - got) as usize,
                                0,
                            )
                        };
                        if n < 0 {
                            let e = std::io::Error::last_os_error();
                            if e.kind() == std::io::ErrorKind::Interrupted {
                                continue;
                            }
                            return Err(e.into());
                        }
                        if n == 0 {
                            bail!("floor: connection closed after {got} of {len} bytes");
                        }
                        got += n as u64;
                    }
                    Ok(cpu.elapsed().as_secs_f64())
                }));
            }
            let mut send = Vec::new();
            for i in 0..streams {
                send.push(s.spawn(move || -> anyhow::Result<f64> {
                    let cpu = migration::cpu::ThreadCpu::start();
                    let off = (i * shard).min(bytes);
                    let len = if i + 1 == streams {
                        bytes - off
                    } else {
                        shard.min(bytes - off)
                    };
                    let mut sock = TcpStream::connect(addr)?;
                    let mut h = [0u8; 16];
                    h[..8].copy_from_slice(&off.to_le_bytes());
                    h[8..].copy_from_slice(&len.to_le_bytes());
                    sock.write_all(&h)?;
                    let mut pos = off as libc::off_t;
                    let end = (off + len) as libc::off_t;
                    while pos < end {
                        // SAFETY: sendfile between two descriptors this thread holds; `pos` is a
                        // valid off_t the kernel advances.
                        let n = unsafe {
                            libc::sendfile(
                                sock.as_raw_fd(),
                                src.as_raw_fd(),
                                &mut pos,
                                (end - pos).min(1 << 30) as usize,
                            )
                        };
                        if n < 0 {
                            let e = std::io::Error::last_os_error();
                            if e.kind() == std::io::ErrorKind::Interrupted {
                                continue;
                            }
                            return Err(e.into());
                        }
                        if n == 0 {
                            bail!("floor: sendfile sent nothing");
                        }
                    }
                    Ok(cpu.elapsed().as_secs_f64())
                }));
            }
            cpu_sums(send, recv)
        })
    })
}

/// Joins a floor's sender and receiver threads: their CPU seconds, summed per side.
fn cpu_sums(
    send: Vec<std::thread::ScopedJoinHandle<'_, anyhow::Result<f64>>>,
    recv: Vec<std::thread::ScopedJoinHandle<'_, anyhow::Result<f64>>>,
) -> anyhow::Result<(f64, f64)> {
    let join = |h: std::thread::ScopedJoinHandle<'_, anyhow::Result<f64>>| {
        h.join()
            .map_err(|_| anyhow::anyhow!("floor thread panicked"))?
    };
    let mut sums = (0.0, 0.0);
    for h in send {
        sums.0 += join(h)?;
    }
    for h in recv {
        sums.1 += join(h)?;
    }
    Ok(sums)
}

/// Times `transfer` (which returns its sender's and receiver's CPU seconds) while a thread
/// spins in place of the running guest.
fn with_spinner(transfer: impl FnOnce() -> anyhow::Result<(f64, f64)>) -> anyhow::Result<FloorRun> {
    use std::sync::atomic::{AtomicBool, Ordering};
    let stop = std::sync::Arc::new(AtomicBool::new(false));
    let spinner = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                std::hint::spin_loop();
            }
        })
    };
    let t = Instant::now();
    let result = transfer();
    let secs = t.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    let _ = spinner.join();
    let (send_cpu_s, recv_cpu_s) = result?;
    Ok(FloorRun {
        secs,
        send_cpu_s,
        recv_cpu_s,
    })
}

/// A `kB` field of a `/proc/PID/status` text, in bytes (0 if absent).
fn status_field(status: &str, name: &str) -> u64 {
    status
        .lines()
        .find_map(|l| l.strip_prefix(name))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// Process `pid`'s peak memory (`self` for this one), bytes: its resident set's high-water
/// mark (VmHWM) plus the guest memory it holds without mapping it, that is the allocated
/// pages of its guest RAM memfds (`ferry-guest-ram`) less its resident shared memory. Pages
/// written into the memfd (the splicing receivers do) are memory the process holds, but not
/// in its resident set until the guest touches them. None if `/proc` does not say.
fn peak_memory_of(pid: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let guest = format!("/memfd:{}", vmm::memory::MEMFD_NAME.to_string_lossy());
    peak_from(&status, memfd_bytes(pid, &guest)?)
}

/// VmHWM of a `/proc/PID/status` text plus the `guest` memfd bytes not in its RssShmem.
fn peak_from(status: &str, guest: u64) -> Option<u64> {
    let hwm = status_field(status, "VmHWM:");
    (hwm > 0).then(|| hwm + guest.saturating_sub(status_field(status, "RssShmem:")))
}

/// Bytes allocated to process `pid`'s memfds whose link starts with `name`, each counted
/// once (by inode) however many descriptors the process holds of it.
fn memfd_bytes(pid: &str, name: &str) -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    let mut memfds = std::collections::BTreeMap::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.flatten() {
        let named =
            std::fs::read_link(entry.path()).is_ok_and(|t| t.to_string_lossy().starts_with(name));
        if named {
            if let Ok(m) = std::fs::metadata(entry.path()) {
                memfds.insert((m.dev(), m.ino()), m.blocks() * 512);
            }
        }
    }
    Some(memfds.values().sum())
}

/// Resets VmHWM to the current RSS (Linux `clear_refs` 5).
fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// How a row migrates: the transport, and the cap and compression (the capped rows).
#[derive(Clone, Copy)]
struct Mode<'a> {
    security: &'a migration::Security,
    tls: Option<&'a migration::TlsFiles>,
    max_bandwidth: Option<u64>,
    compress: Compression,
}

/// What the destination child says on stderr.
enum ChildLine {
    Listening(String),
    Verified,
}

/// The destination: a child `ferry receive` process.
struct Destination {
    child: std::process::Child,
    addr: String,
    events: mpsc::Receiver<ChildLine>,
    stderr: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    stdout: Option<std::thread::JoinHandle<String>>,
}

/// The destination's log filter: what the bench reads from it (where it listens, the ledger).
const CHILD_LOG: &str = "warn,control::supervisor=info";
/// Environment variable with directives added to [`CHILD_LOG`] (`migration=debug`), which
/// also echoes the child's log on this stderr (profiling).
const CHILD_LOG_VAR: &str = "FERRY_BENCH_RECEIVE_LOG";

impl Destination {
    /// Starts `ferry receive` on a loopback port for a guest of `ram` bytes; it verifies the
    /// guest's ledger as soon as the VM runs there.
    fn spawn(ram: u64, tls: Option<&migration::TlsFiles>) -> anyhow::Result<Destination> {
        let exe = std::env::current_exe().context("finding the ferry binary")?;
        // For profiling: the child's log filter, its lines echoed on this stderr.
        let child_log = std::env::var(CHILD_LOG_VAR).ok();
        let echo = child_log.is_some();
        let mut cmd = Command::new(exe);
        cmd.args(["receive", "--listen", "127.0.0.1:0", "--serial", "off"])
            .args(["--memory", &ram.to_string()])
            .args(["--verify-after", "0s", "--accept-timeout", "120s"])
            .args(["--timeout", "900s", "--json"])
            .env(
                "RUST_LOG",
                child_log.as_ref().map_or(CHILD_LOG.to_string(), |extra| {
                    format!("{CHILD_LOG},{extra}")
                }),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some(f) = tls {
            cmd.arg("--tls-cert")
                .arg(&f.cert)
                .arg("--tls-key")
                .arg(&f.key)
                .arg("--tls-ca")
                .arg(&f.ca);
        }
        let mut child = cmd.spawn().context("starting ferry receive")?;
        let err = child.stderr.take().context("child stderr")?;
        let mut out = child.stdout.take().context("child stdout")?;
        let (tx, events) = mpsc::channel();
        let stderr = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let lines = stderr.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines() {
                let Ok(line) = line else { break };
                if echo {
                    eprintln!("ferry receive: {line}");
                }
                if let Some(a) = line.strip_prefix("ferry: waiting for a migration on ") {
                    let _ = tx.send(ChildLine::Listening(a.trim().to_string()));
                } else if line.contains("ledger verification finished") {
                    let _ = tx.send(ChildLine::Verified);
                }
                let mut l = lines.lock().unwrap_or_else(|e| e.into_inner());
                if l.len() < 200 {
                    l.push(line);
                }
            }
        });
        let stdout = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = out.read_to_string(&mut s);
            s
        });
        let mut d = Destination {
            child,
            addr: String::new(),
            events,
            stderr,
            stdout: Some(stdout),
        };
        match d.events.recv_timeout(Duration::from_secs(60)) {
            Ok(ChildLine::Listening(a)) => d.addr = a,
            _ => bail!("ferry receive did not start listening: {}", d.said()),
        }
        Ok(d)
    }

    /// What the child wrote on stderr.
    fn said(&self) -> String {
        self.stderr
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .join(" | ")
    }

    /// Waits for the ledger verification, stops the child and reaps it: (its report, its
    /// peak memory in bytes, see `peak_memory_of`).
    fn finish(mut self) -> anyhow::Result<(serde_json::Value, u64)> {
        let verified = matches!(
            self.events.recv_timeout(Duration::from_secs(120)),
            Ok(ChildLine::Verified)
        );
        let pid = self.child.id() as libc::pid_t;
        // The child's own peak, read before it ends. Not `wait4`'s `ru_maxrss`: that starts
        // from this process's resident set at the spawn (the kernel carries the spawning
        // memory's high-water mark over `exec`), so it reported the source's peak whenever
        // that was the larger; and neither counts guest pages it holds unmapped.
        let peak = peak_memory_of(&pid.to_string());
        // SAFETY: signals the child this struct started and has not reaped yet.
        unsafe {
            libc::kill(
                pid,
                if verified {
                    libc::SIGTERM
                } else {
                    libc::SIGKILL
                },
            )
        };
        let status = reap(pid)?;
        let out = self.stdout.take().map(|h| h.join().unwrap_or_default());
        let report = out
            .as_deref()
            .and_then(|o| o.lines().rev().find(|l| l.starts_with('{')))
            .and_then(|l| serde_json::from_str(l).ok())
            .unwrap_or(serde_json::Value::Null);
        if !verified {
            bail!(
                "the destination never verified the guest's ledger (exit status {status}): {}",
                self.said()
            );
        }
        let peak = peak.with_context(|| {
            format!("could not read the destination's peak memory from /proc/{pid}")
        })?;
        Ok((report, peak))
    }
}

impl Drop for Destination {
    fn drop(&mut self) {
        if self.stdout.is_some() {
            // Not finished (a failed migration): end the child.
            let pid = self.child.id() as libc::pid_t;
            // SAFETY: signals and reaps the child this struct started, not reaped yet.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            let _ = reap(pid);
        }
    }
}

/// Waits for child `pid` to end: its wait status.
fn reap(pid: libc::pid_t) -> anyhow::Result<i32> {
    let mut status = 0;
    loop {
        // SAFETY: waitpid on our own child with a valid pointer to a local.
        let r = unsafe { libc::waitpid(pid, &mut status, 0) };
        if r == pid {
            return Ok(status);
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(e).context("waiting for ferry receive");
        }
    }
}

fn one(ram: u64, load: &str, mode: Mode<'_>, args: &BenchMigrateArgs) -> anyhow::Result<Sample> {
    let working_set = (ram / 4).min(1 << 30);
    let config = VmConfig {
        ram_size: ram,
        console: ConsoleSink::Null,
        ..Default::default()
    };
    // Both sides' guest memory: the source's (taken first, by the fill below) and the
    // destination's. Before the guest starts, so that the time it runs before the migration
    // (and so what a heavy guest has dirtied) stays as it was.
    warm_free_memory(2 * ram)?;
    let mut vm = Vm::new(&config)?;
    let wargs = WorkloadArgs {
        working_set_bytes: working_set,
        rate_pages_per_sec: rate(load)?,
        duration_ms: 0,
        seed: 7,
        ..Default::default()
    };
    vm.boot(guest_image::GUEST_ELF, Workload::Dirty, wargs)?;
    fill_unused(&vm, working_set)?;
    vm.start()?;
    std::thread::sleep(Duration::from_millis(500));

    let dest = Destination::spawn(ram, mode.tls)?;
    let opts = SourceOptions {
        security: mode.security.clone(),
        downtime: Duration::from_millis(args.downtime_ms),
        max_rounds: args.max_rounds,
        on_limit: LimitPolicy::Finish,
        max_bandwidth: mode.max_bandwidth,
        compress: mode.compress,
        ..Default::default()
    };
    reset_peak_rss();
    let report = migration::migrate(&vm, &mut [], &dest.addr, &opts, &mut |_| {})
        .map_err(|e| anyhow::anyhow!(migration::chain(&e)))
        .with_context(|| {
            format!(
                "migrating {} MiB / {load} (destination said: {})",
                ram >> 20,
                dest.said()
            )
        })?;
    let peak_src = peak_memory_of("self").context("reading this process's peak memory")?;
    drop(vm);
    // The guest must be intact on the destination: its ledger verified there.
    let (dreport, peak_dst) = dest.finish()?;
    let verifications = dreport["verifications"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let ok = !verifications.is_empty() && verifications.iter().all(|v| v["status"] == 0);
    Ok(Sample {
        total_ms: report.total_ms,
        downtime_ms: report.downtime_ms,
        rounds: report.rounds.len(),
        hit_round_limit: report.hit_round_limit,
        sent_bytes: report.bytes,
        streams: report.streams,
        src_cpu_s: report.cpu_s,
        dst_cpu_s: dreport["incoming"]["cpu_s"]
            .as_f64()
            .unwrap_or(report.dst_cpu_s),
        peak_src_bytes: peak_src,
        peak_dst_bytes: peak_dst,
        throttle_pct: report.throttle_pct,
        page_bytes: report.page_bytes,
        zstd_pages: report.zstd_pages,
        ledger_ok: ok,
    })
}

/// The runs of one row, each migration followed by a floor run over the same bytes (not for
/// the capped rows: their floor is the cap).
fn row(
    ram: u64,
    load: &str,
    mode: Mode<'_>,
    args: &BenchMigrateArgs,
    raw: f64,
) -> anyhow::Result<Row> {
    const GIB: f64 = (1u64 << 30) as f64;
    const MIB: f64 = (1u64 << 20) as f64;
    let mut samples = Vec::new();
    let mut floors = Vec::new();
    let mut tls_floors = Vec::new();
    for _ in 0..args.runs.max(1) {
        let s = one(ram, load, mode, args)?;
        if mode.max_bandwidth.is_none() {
            let bytes = s.sent_bytes.next_multiple_of(4096);
            let src = floor_source(bytes, ram)?;
            warm_free_memory(bytes)?;
            floors.push(floor_once(&src, bytes, s.streams)?);
            if mode.security.is_tls() {
                warm_free_memory(bytes)?;
                tls_floors.push(tls_floor::once(&src, bytes, s.streams, mode.security)?);
            }
        }
        samples.push(s);
    }
    let rate = |s: &Sample| s.sent_bytes as f64 / (s.total_ms / 1000.0) / 1e6;
    let frate = |f: &FloorRun, s: &Sample| s.sent_bytes as f64 / f.secs / 1e6;
    let gib = |s: &Sample| s.sent_bytes as f64 / GIB;
    let pairs = || samples.iter().zip(&floors);
    let src_cpu = Stat::of(samples.iter().map(|s| s.src_cpu_s / gib(s)));
    let dst_cpu = Stat::of(samples.iter().map(|s| s.dst_cpu_s / gib(s)));
    let fsend = Stat::of(pairs().map(|(s, f)| f.send_cpu_s / gib(s)));
    let frecv = Stat::of(pairs().map(|(s, f)| f.recv_cpu_s / gib(s)));
    let bw = Stat::of(samples.iter().map(rate));
    let working_set = (ram / 4).min(1 << 30);
    let budget = (ram + (64 << 20)) as f64;
    Ok(Row {
        ram_mib: ram >> 20,
        load: load.to_string(),
        transport: if mode.security.is_tls() {
            "tls"
        } else {
            "plain"
        }
        .into(),
        max_bandwidth: mode.max_bandwidth,
        compression: mode.compress.to_string(),
        working_set_mib: working_set >> 20,
        runs: samples.len(),
        streams: samples.iter().map(|s| s.streams).max().unwrap_or(1),
        total_ms: Stat::of(samples.iter().map(|s| s.total_ms)),
        downtime_ms: Stat::of(samples.iter().map(|s| s.downtime_ms)),
        rounds: samples.iter().map(|s| s.rounds).max().unwrap_or(0),
        hit_round_limit: samples.iter().any(|s| s.hit_round_limit),
        throttle_pct: samples.iter().map(|s| s.throttle_pct).max().unwrap_or(0),
        sent_mib: Stat::of(samples.iter().map(|s| s.sent_bytes as f64)).median / MIB,
        guest_page_mib: Stat::of(samples.iter().map(|s| s.page_bytes as f64)).median / MIB,
        wire_vs_guest: Stat::of(
            samples
                .iter()
                .map(|s| s.sent_bytes as f64 / s.page_bytes.max(1) as f64),
        ),
        zstd_page_share: Stat::of(
            samples
                .iter()
                .map(|s| s.zstd_pages as f64 * 4096.0 / s.page_bytes.max(1) as f64),
        )
        .median,
        bandwidth_mbps: bw,
        guest_mbps: Stat::of(
            samples
                .iter()
                .map(|s| s.page_bytes as f64 / (s.total_ms / 1000.0) / 1e6),
        ),
        src_cpu_s_per_guest_gib: Stat::of(
            samples
                .iter()
                .map(|s| s.src_cpu_s / (s.page_bytes.max(1) as f64 / GIB)),
        ),
        dst_cpu_s_per_guest_gib: Stat::of(
            samples
                .iter()
                .map(|s| s.dst_cpu_s / (s.page_bytes.max(1) as f64 / GIB)),
        ),
        vs_cap: mode
            .max_bandwidth
            .map(|cap| Stat::of(samples.iter().map(|s| rate(s) * 1e6 / cap as f64))),
        floor_mbps: Stat::of(pairs().map(|(s, f)| frate(f, s))),
        vs_floor: Stat::of(pairs().map(|(s, f)| rate(s) / frate(f, s))),
        bandwidth_vs_raw_tcp: bw.median / raw,
        src_cpu_s_per_gib: src_cpu,
        dst_cpu_s_per_gib: dst_cpu,
        floor_send_cpu_s_per_gib: fsend,
        floor_recv_cpu_s_per_gib: frecv,
        src_cpu_vs_floor: src_cpu.median / fsend.median,
        dst_cpu_vs_floor: dst_cpu.median / frecv.median,
        peak_src_mib: Stat::of(samples.iter().map(|s| s.peak_src_bytes as f64 / MIB)),
        peak_dst_mib: Stat::of(samples.iter().map(|s| s.peak_dst_bytes as f64 / MIB)),
        peak_src_vs_budget: Stat::of(samples.iter().map(|s| s.peak_src_bytes as f64 / budget)),
        peak_dst_vs_budget: Stat::of(samples.iter().map(|s| s.peak_dst_bytes as f64 / budget)),
        tls_vs_plain_bandwidth: None,
        tls_floor: tls_floor_of(&samples, &tls_floors),
        ledger_ok_on_destination: samples.iter().all(|s| s.ledger_ok),
        per_run: samples
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let f = floors.get(i);
                RunFigures {
                    total_ms: s.total_ms,
                    downtime_ms: s.downtime_ms,
                    vs_floor: f.map(|f| rate(s) / frate(f, s)),
                    src_cpu_s_per_gib: s.src_cpu_s / gib(s),
                    dst_cpu_s_per_gib: s.dst_cpu_s / gib(s),
                    floor_ms: f.map(|f| f.secs * 1000.0),
                    floor_send_cpu_s_per_gib: f.map(|f| f.send_cpu_s / gib(s)),
                    floor_recv_cpu_s_per_gib: f.map(|f| f.recv_cpu_s / gib(s)),
                }
            })
            .collect(),
    })
}

pub fn run(args: BenchMigrateArgs) -> anyhow::Result<i32> {
    for &s in &args.sizes {
        vmm::memory::validate_ram_size(s)?;
    }
    for l in &args.loads {
        rate(l)?;
    }
    let capped = match args.capped.as_str() {
        "none" | "0" | "" => None,
        c => Some(crate::units::parse_size(c).map_err(|e| anyhow::anyhow!(e))?),
    };
    let mut transports = Vec::new();
    let pki = if args.transports.iter().any(|t| t == "tls") {
        Some(BenchPki::new().context("making the bench's TLS certificates")?)
    } else {
        None
    };
    for t in &args.transports {
        transports.push(match (t.as_str(), &pki) {
            ("plain", _) => (migration::Security::Plain, None),
            ("tls", Some(pki)) => (
                migration::Security::from_files(Some(&pki.files))
                    .map_err(|e| anyhow::anyhow!(migration::chain(&e)))?,
                Some(&pki.files),
            ),
            (other, _) => bail!("unknown transport {other:?} (plain, tls)"),
        });
    }
    let raw = raw_tcp_mbps()?;
    if !args.json {
        println!(
            "ferry bench migrate: raw loopback TCP {raw:.0} MB/s (one stream, same run); \
             {} run(s) per row, median [min-max]",
            args.runs.max(1)
        );
        println!(
            "  floor = the same bytes memfd -> fresh memfd over the same connections (sendfile, \
             plain receives) with a spinning thread for the guest, run after each migration"
        );
        println!(
            "  guests: the dirty workload's working set (one random word per write in each \
             page), the rest of RAM half pseudo-random, half a repeating pattern per page (~2:1 for zstd); the \
             destination is a child `ferry receive` process"
        );
        println!(
            "  untimed warm-up: before each guest is built and before each floor run the bench \
             fills and frees as much memory as they take (a host that takes back free pages \
             charges a fault on their first touch to whichever side meets them)"
        );
    }
    let plain = migration::Security::Plain;
    let mut rows = Vec::new();
    for &ram in &args.sizes {
        for load in &args.loads {
            let mut plain_mbps = None;
            let mut modes: Vec<Mode<'_>> = transports
                .iter()
                .map(|(security, tls)| Mode {
                    security,
                    tls: *tls,
                    max_bandwidth: None,
                    compress: Compression::None,
                })
                .collect();
            if let Some(cap) = capped {
                for compress in [Compression::None, args.capped_compress] {
                    modes.push(Mode {
                        security: &plain,
                        tls: None,
                        max_bandwidth: Some(cap),
                        compress,
                    });
                }
            }
            for mode in modes {
                let mut row = row(ram, load, mode, &args, raw)?;
                if mode.max_bandwidth.is_none() {
                    if mode.security.is_tls() {
                        row.tls_vs_plain_bandwidth =
                            plain_mbps.map(|p: f64| row.bandwidth_mbps.median / p);
                    } else {
                        plain_mbps = Some(row.bandwidth_mbps.median);
                    }
                }
                if !args.json {
                    print_row(&row);
                }
                rows.push(row);
            }
        }
    }
    let all_ok = rows.iter().all(|r| r.ledger_ok_on_destination);
    if args.json {
        let b = Bench {
            raw_tcp_mbps: raw,
            downtime_target_ms: args.downtime_ms,
            max_rounds: args.max_rounds,
            rows,
        };
        println!("{}", serde_json::to_string_pretty(&b)?);
    } else {
        println!(
            "  (! = round limit reached, switched over anyway; downtime = pause -> destination \
             resumed; peak = each side's own process (this one, the child ferry receive): VmHWM plus the \
             guest pages it holds unmapped; budget = guest RAM + 64 MiB; \
             cap = --max-bandwidth, 1G = 2^30 bytes/s on the wire)"
        );
    }
    Ok(if all_ok { 0 } else { 1 })
}

fn print_row(row: &Row) {
    let mode = match row.max_bandwidth {
        Some(cap) => format!(
            "{} cap {:.0} MB/s, {}",
            row.transport,
            cap as f64 / 1e6,
            row.compression
        ),
        None => row.transport.clone(),
    };
    println!(
        "  {}M {} {} ({} stream(s), WS {}M, {:.0} MiB sent for {:.0} MiB of guest pages, {} round(s){}, vCPU throttle {}%): ledger {}",
        row.ram_mib,
        row.load,
        mode,
        row.streams,
        row.working_set_mib,
        row.sent_mib,
        row.guest_page_mib,
        row.rounds,
        if row.hit_round_limit { "!" } else { "" },
        row.throttle_pct,
        if row.ledger_ok_on_destination {
            "ok"
        } else {
            "FAILED"
        }
    );
    match &row.vs_cap {
        Some(vs_cap) => println!(
            "    MB/s {} (guest pages {})   vs cap {}   wire/guest bytes {}   pages compressed {:.0}%   vs raw {:.3}",
            row.bandwidth_mbps.show(0),
            row.guest_mbps.show(0),
            vs_cap.show(3),
            row.wire_vs_guest.show(3),
            row.zstd_page_share * 100.0,
            row.bandwidth_vs_raw_tcp,
        ),
        None => println!(
            "    MB/s {}   floor {}   vs floor {}   vs raw {:.3}{}",
            row.bandwidth_mbps.show(0),
            row.floor_mbps.show(0),
            row.vs_floor.show(3),
            row.bandwidth_vs_raw_tcp,
            row.tls_vs_plain_bandwidth
                .map_or_else(String::new, |r| format!("   vs plain {r:.3}"))
        ),
    }
    println!(
        "    total ms {}   downtime ms {}   peak MiB source {} (x{:.3} of budget)   destination {} (x{:.3})",
        row.total_ms.show(0),
        row.downtime_ms.show(1),
        row.peak_src_mib.show(0),
        row.peak_src_vs_budget.median,
        row.peak_dst_mib.show(0),
        row.peak_dst_vs_budget.median,
    );
    if row.max_bandwidth.is_some() {
        println!(
            "    CPU s/GiB of guest pages: source {}   destination {}   (per GiB on the wire: {} / {})",
            row.src_cpu_s_per_guest_gib.show(3),
            row.dst_cpu_s_per_guest_gib.show(3),
            row.src_cpu_s_per_gib.show(3),
            row.dst_cpu_s_per_gib.show(3),
        );
    } else {
        println!(
            "    CPU s/GiB: source {} (floor sender {}, x{:.2})   destination {} (floor receiver {}, x{:.2})",
            row.src_cpu_s_per_gib.show(3),
            row.floor_send_cpu_s_per_gib.show(3),
            row.src_cpu_vs_floor,
            row.dst_cpu_s_per_gib.show(3),
            row.floor_recv_cpu_s_per_gib.show(3),
            row.dst_cpu_vs_floor
        );
    }
    if let Some(t) = &row.tls_floor {
        print_tls_floor(t);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    #[test]
    fn the_peak_counts_guest_pages_held_unmapped_once() {
        let status =
            "Name:\tferry\nVmHWM:\t  102400 kB\nVmRSS:\t   51200 kB\nRssShmem:\t   20480 kB\n";
        // 100 MiB high-water mark; 50 MiB of guest memfd, of which 20 MiB mapped.
        assert_eq!(peak_from(status, 50 << 20), Some(130 << 20));
        // All of it mapped: nothing to add (and never less than the high-water mark).
        assert_eq!(peak_from(status, 10 << 20), Some(100 << 20));
        assert_eq!(peak_from("Name:\tx\n", 1 << 20), None);
    }

    #[test]
    fn pages_written_into_a_memfd_are_counted_once() {
        use std::os::fd::FromRawFd;
        // SAFETY: memfd_create with a valid NUL-terminated name; the result is checked.
        let fd = unsafe { libc::memfd_create(c"ferry-test-peak".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
        // SAFETY: fd is a fresh descriptor nobody else owns.
        let f = unsafe { std::fs::File::from_raw_fd(fd) };
        f.set_len(16 << 20).expect("set_len");
        let name = "/memfd:ferry-test-peak";
        assert_eq!(memfd_bytes("self", name), Some(0));
        // Written through the file, as the splicing receivers do: not in the resident set.
        f.write_all_at(&vec![0x5au8; 8 << 20], 0).expect("write");
        // A second descriptor of the same memfd must not count it twice.
        let dup = f.try_clone().expect("dup");
        assert_eq!(memfd_bytes("self", name), Some(8 << 20));
        drop(dup);
    }
}

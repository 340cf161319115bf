//! The passthrough virtio-net phase of `ferry demo` (root only: it builds a network): a
//! network namespace whose bridge has two taps, a `ferry device virtio-net` on each with the
//! same MAC address, a VM on the first running `net-stream` with its NIC shadowed, and a peer
//! on the bridge — this process, from a thread in the namespace — running a sequenced
//! closed-loop UDP stream with it. Mid-stream the VM live-migrates to a `ferry receive` whose
//! NIC is the second device; that device announces the MAC, the bridge moves the VM's traffic
//! to it, and the stream goes on. The peer counts what it saw; the guest verifies the peer's
//! whole stream on the destination before it exits 0.
use std::{
    net::{Ipv4Addr, SocketAddr, UdpSocket},
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        atomic::{AtomicBool, Ordering},
        mpsc, Arc,
    },
    time::{Duration, Instant},
};

use anyhow::{bail, Context};
use guest_abi::{params::NetArgs, Workload, WorkloadArgs};
use migration::MigrationReport;
use serde::Serialize;

use super::{finish_destination, join_migration, migrate_later, ok, start_destination, Before};
use crate::{
    session::{self, BootSpec, SessionReport, SessionSpec},
    signals::SignalState,
};

const PEER_IP: Ipv4Addr = Ipv4Addr::new(10, 79, 0, 1);
const GUEST_IP: Ipv4Addr = Ipv4Addr::new(10, 79, 0, 2);
const PORT: u16 = 7777;
const MAC: &str = "52:54:00:fe:d0:01";
/// Datagrams of the stream (one in flight; at most one a millisecond until the VM migrated,
/// then as fast as the guest answers): enough to outlast a slow migration.
const COUNT: u32 = 20_000;

/// What the peer saw of the guest's stream.
#[derive(Clone, Debug, Default, Serialize)]
pub struct PeerCounts {
    /// Datagrams the peer sent.
    pub sent: u32,
    /// Guest datagrams received in order.
    pub in_order: u32,
    /// Guest datagrams received twice.
    pub duplicated: u32,
    /// Guest datagrams ahead of the expected one.
    pub out_of_order: u32,
    /// Guest datagrams with wrong content.
    pub corrupted: u32,
    /// Longest time between two guest datagrams at the peer.
    pub longest_gap_ms: f64,
}

/// How the virtio-net migration went.
#[derive(Debug, Default, Serialize)]
pub struct NetMigration {
    /// Why the phase did not run (not root, no `ip`).
    pub skipped: Option<String>,
    /// What failed, if something did.
    pub error: Option<String>,
    /// The migration report.
    pub migration: Option<MigrationReport>,
    /// The destination's JSON summary.
    pub destination: Option<serde_json::Value>,
    /// What the peer saw.
    pub peer: PeerCounts,
}

impl NetMigration {
    /// Skipped, or: migrated, the whole stream in order at the peer (nothing twice, nothing
    /// corrupted) and the guest's verification passed on the destination.
    pub fn pass(&self) -> bool {
        if self.skipped.is_some() {
            return true;
        }
        let p = &self.peer;
        self.error.is_none()
            && self.migration.is_some()
            && self
                .destination
                .as_ref()
                .is_some_and(|d| d["outcome"] == "exit" && d["status"] == 0)
            && p.in_order == COUNT
            && p.duplicated + p.out_of_order + p.corrupted == 0
    }
}

/// A thread started before any system-call filter (the demo's first session installs one on
/// the thread that runs it): it joins the namespace and runs the peer when asked.
pub struct Peer {
    job: mpsc::Sender<(PathBuf, Arc<AtomicBool>)>,
    done: mpsc::Receiver<anyhow::Result<PeerCounts>>,
}

impl Peer {
    /// Starts the thread (call first thing in the demo).
    pub fn start() -> anyhow::Result<Peer> {
        let (job, jobs) = mpsc::channel::<(PathBuf, Arc<AtomicBool>)>();
        let (tx, done) = mpsc::channel();
        std::thread::Builder::new()
            .name("demo-net-peer".into())
            .spawn(move || {
                if let Ok((ns, fast)) = jobs.recv() {
                    let _ = tx.send(enter(&ns).and_then(|()| stream(&fast)));
                }
            })
            .context("starting the demo's network peer")?;
        Ok(Peer { job, done })
    }
}

/// Moves the calling thread into the network namespace at `path`.
fn enter(path: &Path) -> anyhow::Result<()> {
    let f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    // SAFETY: setns on a namespace descriptor this function holds open; it changes only this
    // thread's network namespace.
    if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(std::io::Error::last_os_error()).context("joining the demo's namespace");
    }
    Ok(())
}

/// Byte `i` of datagram `seq` of a stream with `seed` (as the guest's `net-stream`).
fn datagram(magic: &[u8; 4], seed: u8, seq: u32, len: usize) -> Vec<u8> {
    let mut d = vec![0u8; len];
    d[..4].copy_from_slice(magic);
    d[4..8].copy_from_slice(&seq.to_be_bytes());
    for (i, b) in d.iter_mut().enumerate().skip(8) {
        *b = (seq.wrapping_mul(7) as usize).wrapping_add(i.wrapping_mul(13)) as u8 ^ seed;
    }
    d
}

/// The peer: once the guest answers ping, a closed loop of [`COUNT`] datagrams (one in
/// flight, at most one a millisecond until `fast`), each answer checked and timed.
fn stream(fast: &AtomicBool) -> anyhow::Result<PeerCounts> {
    let t0 = Instant::now();
    while !Command::new("ping")
        .args(["-c", "1", "-W", "1", &GUEST_IP.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
    {
        if t0.elapsed() > Duration::from_secs(60) {
            bail!("the guest did not answer ping within 60 s");
        }
    }
    let sock = UdpSocket::bind((PEER_IP, 0)).context("binding the peer's socket")?;
    sock.set_nonblocking(true)?;
    let to = SocketAddr::from((GUEST_IP, PORT));
    let len = |seq: u32| 8 + (seq as usize * 37) % 1465;
    let mut c = PeerCounts::default();
    let (mut expected, mut last_send, mut last_recv) = (0u32, Instant::now(), None::<Instant>);
    let mut buf = [0u8; 2048];
    loop {
        let received = c.in_order + c.duplicated + c.out_of_order + c.corrupted;
        if received >= COUNT {
            return Ok(c);
        }
        if last_recv.unwrap_or(t0).elapsed() > Duration::from_secs(20) {
            bail!("no answer from the guest for 20 s ({c:?})");
        }
        let paced = fast.load(Ordering::SeqCst) || last_send.elapsed() >= Duration::from_millis(1);
        if c.sent == received && c.sent < COUNT && paced {
            sock.send_to(&datagram(b"FPST", 0x5a, c.sent, len(c.sent)), to)?;
            c.sent += 1;
            last_send = Instant::now();
        }
        let mut pfd = libc::pollfd {
            fd: sock.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd for the duration of the call.
        unsafe { libc::poll(&mut pfd, 1, 1) };
        let n = match sock.recv_from(&mut buf) {
            Ok((n, from)) if from == to => n,
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e).context("peer receive"),
        };
        let now = Instant::now();
        if let Some(prev) = last_recv {
            c.longest_gap_ms = c.longest_gap_ms.max((now - prev).as_secs_f64() * 1000.0);
        }
        last_recv = Some(now);
        let d = &buf[..n];
        let seq =
            (n >= 8 && d[..4] == *b"FGST").then(|| u32::from_be_bytes([d[4], d[5], d[6], d[7]]));
        match seq.filter(|&s| d[..] == datagram(b"FGST", 0xa5, s, n)[..]) {
            None => c.corrupted += 1,
            Some(s) if s == expected => {
                c.in_order += 1;
                expected += 1;
            }
            Some(s) if s < expected => c.duplicated += 1,
            Some(s) => {
                c.out_of_order += 1;
                expected = s + 1;
            }
        }
    }
}

/// The namespace, removed on drop, with the device processes in it.
struct Network {
    name: String,
    devices: Vec<Child>,
}

impl Network {
    fn ip(&self, args: &[&str]) -> anyhow::Result<()> {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.name, "ip"])
            .args(args)
            .output()
            .context("running ip")?;
        if !out.status.success() {
            bail!(
                "ip {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(())
    }

    /// `ferry device virtio-net` on `tap` with the VM's MAC, listening on `socket`.
    fn device(&mut self, tap: &str, socket: &Path) -> anyhow::Result<()> {
        let child = Command::new("ip")
            .args(["netns", "exec", &self.name])
            .arg(std::env::current_exe().context("locating the ferry binary")?)
            .args(["device", "virtio-net", "--once", "--mac", MAC, "--tap", tap])
            .arg("--socket")
            .arg(socket)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting ferry device virtio-net")?;
        self.devices.push(child);
        let t0 = Instant::now();
        while !socket.exists() {
            if t0.elapsed() > Duration::from_secs(30) {
                bail!("{} did not appear within 30 s", socket.display());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(())
    }
}

impl Drop for Network {
    fn drop(&mut self) {
        for d in &mut self.devices {
            let _ = d.kill();
            let _ = d.wait();
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

/// Runs the phase with `peer` (see [`Peer::start`]).
pub fn run(peer: Peer, echo: bool, signals: &SignalState) -> NetMigration {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return NetMigration {
            skipped: Some("needs root (a network namespace with a bridge and two taps)".into()),
            ..Default::default()
        };
    }
    if Command::new("ip").arg("-V").output().is_err() {
        return NetMigration {
            skipped: Some("no `ip` command (iproute2)".into()),
            ..Default::default()
        };
    }
    let mut out = NetMigration::default();
    if let Err(e) = run_phase(peer, echo, signals, &mut out) {
        out.error = Some(vmm::ErrorChain(e.as_ref()).to_string());
    }
    out
}

fn run_phase(
    peer: Peer,
    echo: bool,
    signals: &SignalState,
    out: &mut NetMigration,
) -> anyhow::Result<()> {
    let pid = std::process::id();
    let name = format!("ferry-demo-net-{pid}");
    let _ = Command::new("ip").args(["netns", "del", &name]).output();
    let st = Command::new("ip").args(["netns", "add", &name]).status()?;
    if !st.success() {
        bail!("ip netns add {name} failed");
    }
    let mut net = Network {
        name: name.clone(),
        devices: Vec::new(),
    };
    net.ip(&["link", "set", "lo", "up"])?;
    net.ip(&["link", "add", "fdbr0", "type", "bridge"])?;
    net.ip(&["addr", "add", &format!("{PEER_IP}/24"), "dev", "fdbr0"])?;
    net.ip(&["link", "set", "fdbr0", "up"])?;
    for tap in ["fdtapa", "fdtapb"] {
        net.ip(&["tuntap", "add", "dev", tap, "mode", "tap"])?;
        net.ip(&["link", "set", tap, "master", "fdbr0"])?;
        net.ip(&["link", "set", tap, "up"])?;
    }
    let dir = std::env::temp_dir().join(format!("ferry-demo-net-{pid}"));
    std::fs::create_dir_all(&dir)?;
    let (sock_a, sock_b) = (dir.join("a.sock"), dir.join("b.sock"));
    net.device("fdtapa", &sock_a)?;
    net.device("fdtapb", &sock_b)?;
    let pass_b = std::ffi::OsString::from(format!("virtio-net={}", sock_b.display()));
    let dest = start_destination(
        echo,
        Duration::ZERO,
        &["--passthrough".as_ref(), pass_b.as_os_str()],
    )?;
    let fast = Arc::new(AtomicBool::new(false));
    peer.job
        .send((PathBuf::from(format!("/run/netns/{name}")), fast.clone()))
        .context("starting the peer")?;
    let api_path = dir.join("a.api");
    let spec = SessionSpec {
        memory: 64 << 20,
        console: vmm::devices::serial::ConsoleSink::Null,
        timeout: Some(Duration::from_secs(120)),
        api_socket: Some(api_path.clone()),
        net: Some(sock_a),
        shadow_continuous: true,
        ..Default::default()
    };
    let boot = BootSpec {
        image: Arc::new(guest_image::GUEST_ELF.to_vec()),
        workload: Workload::NetStream,
        args: WorkloadArgs {
            net: NetArgs {
                ip: u32::from(GUEST_IP),
                udp_port: u32::from(PORT),
                count: u64::from(COUNT),
                peer_ip: u32::from(PEER_IP),
                reserved: 0,
            },
            ..Default::default()
        },
    };
    let to = dest.addr.clone();
    let before = Before {
        verifications: 0,
        roundtrip: false,
    };
    let migrator =
        std::thread::spawn(move || migrate_later(api_path, to, Duration::from_secs(1), before));
    let source = session::run(&boot, &spec, Instant::now(), signals);
    // The VM left (or ended): the rest of the stream as fast as it goes.
    fast.store(true, Ordering::SeqCst);
    let source: SessionReport = source.context("net-stream run")?;
    out.migration = join_migration(migrator, "virtio-net migration")?;
    out.destination = finish_destination(dest, out.migration.is_some(), None);
    out.peer = peer
        .done
        .recv_timeout(Duration::from_secs(60))
        .context("the peer did not finish")??;
    let _ = std::fs::remove_dir_all(&dir);
    if source.outcome != "migrated" {
        bail!(
            "the source ended with {}: {}",
            source.outcome,
            source.detail
        );
    }
    Ok(())
}

/// The phase's report lines.
pub fn print(r: &NetMigration) {
    println!(
        "  virtio-net NIC, live migration under a UDP stream (net-stream + peer on a bridge):"
    );
    if let Some(why) = &r.skipped {
        println!("    skipped: {why}");
        return;
    }
    if let Some(e) = &r.error {
        println!("    FAILED: {e}");
    }
    if let Some(m) = &r.migration {
        println!(
            "    migration: downtime {:.1} ms (+{:.0} ms hashing all RAM on both sides, which the \
             peer's gap includes), total {:.0} ms",
            m.downtime_ms, m.debug_hash_ms, m.total_ms
        );
    }
    let p = &r.peer;
    println!(
        "    peer: {} sent, {} answered in order, {} lost, {} twice, {} out of order, {} \
         corrupted, longest gap {:.1} ms  {}",
        p.sent,
        p.in_order,
        p.sent
            .saturating_sub(p.in_order + p.duplicated + p.out_of_order + p.corrupted),
        p.duplicated,
        p.out_of_order,
        p.corrupted,
        p.longest_gap_ms,
        ok(p.in_order == COUNT && p.duplicated + p.out_of_order + p.corrupted == 0)
    );
    let verified = r
        .destination
        .as_ref()
        .is_some_and(|d| d["outcome"] == "exit" && d["status"] == 0);
    println!(
        "    guest verified the peer's whole stream on the destination  {}",
        ok(verified)
    );
}

//! `ferry bench shadow`, virtio-net rows: packets per second through a passthrough
//! virtio-net NIC in direct mode against continuous shadow mode with polled and trapped
//! notifications, as ratios to direct in the same run.
//!
//! The NIC is the stand-in device (`virtio-net-device`) served in this process on a
//! [`SocketWire`] (no tap, no root); this process is the peer on the wire's other end. The
//! guest runs `net-echo`; the peer keeps [`WINDOW`] UDP datagrams in flight and counts echoes
//! (each one a frame received and a frame sent by the guest) per 250 ms interval, from the
//! first echo on (in poll and trap mode the first echo after the session reported shadow mode
//! entered: entering pauses the vCPUs, which takes what it takes on a loaded machine).
//! Intervals from 1 s after it count, for the run's seconds; then the peer has
//! the guest finish. The run checks afterwards that every counted echo went through the
//! engine (the transmit queue forwarded at least as many chains), so no counted interval ran
//! direct. Runs are interleaved (direct, poll, trap, direct, …); the medians count.
use std::{
    os::fd::AsRawFd,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use anyhow::{bail, Context};
use guest_abi::{params::NetArgs, Workload, WorkloadArgs};
use rdma::addr::ip_checksum;
use serde::Serialize;
use shadow::{engine::Interception, EngineOptions};
use virtio_net_device::{
    wire::{SocketWire, Wire},
    DeviceConfig, VirtioNetDevice,
};
use vmm::devices::serial::ConsoleSink;

use super::shadow_cost::median;
use crate::{
    session::{self, BootSpec, SessionSpec},
    signals::SignalState,
};

/// Datagrams the peer keeps in flight.
const WINDOW: u32 = 8;
/// Payload bytes of each datagram.
const PAYLOAD: usize = 64;
/// Counting intervals.
const INTERVAL: Duration = Duration::from_millis(250);
/// Intervals before this, from the first counted echo on, are not counted (settling).
const SKIP: Duration = Duration::from_secs(1);
/// How much longer than its counted time the guest's own timer runs: a bound only (the peer
/// has it finish once it counted; a slow boot on a loaded machine must not eat the run).
const RUN_BOUND: Duration = Duration::from_secs(60);

const GUEST_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0xfe, 0x00, 0x01];
const PEER_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0xfe, 0x00, 0x02];
const GUEST_IP: [u8; 4] = [10, 0, 77, 2];
const PEER_IP: [u8; 4] = [10, 0, 77, 1];
const GUEST_PORT: u16 = 7777;
const PEER_PORT: u16 = 40000;

/// How the NIC's queues run.
#[derive(Clone, Copy, Serialize, PartialEq, Eq, Debug)]
#[serde(rename_all = "kebab-case")]
pub enum NetMode {
    /// No shadowing.
    Direct,
    /// Shadowed, notifications polled from a hypervisor page.
    Poll,
    /// Shadowed, notifications trapped and forwarded on the vCPU.
    Trap,
}

impl NetMode {
    const ALL: [NetMode; 3] = [NetMode::Direct, NetMode::Poll, NetMode::Trap];

    fn label(self) -> &'static str {
        match self {
            NetMode::Direct => "direct",
            NetMode::Poll => "poll",
            NetMode::Trap => "trap",
        }
    }
}

/// One virtio-net row.
#[derive(Serialize)]
pub struct NetRow {
    /// How the queues ran.
    pub mode: NetMode,
    /// Median over runs of the median echoes per second of the counted intervals (each echo
    /// is one packet in and one out of the guest).
    pub echoes_per_s: f64,
    /// Packets per second through the NIC (both directions): 2 × echoes.
    pub packets_per_s: f64,
    /// Runs.
    pub runs: usize,
    /// Counted intervals, summed over runs.
    pub intervals: usize,
    /// Datagrams lost after the first echo (not echoed within 200 ms), summed over runs.
    pub lost: u64,
    /// packets_per_s / direct packets_per_s.
    pub ratio: f64,
}

/// An Ethernet/IPv4/UDP frame from the peer to the guest's echo port carrying `seq`.
fn frame(seq: u32) -> Vec<u8> {
    let udp_len = 8 + PAYLOAD;
    let ip_len = 20 + udp_len;
    let mut f = Vec::with_capacity(14 + ip_len);
    f.extend_from_slice(&GUEST_MAC);
    f.extend_from_slice(&PEER_MAC);
    f.extend_from_slice(&0x0800u16.to_be_bytes());
    let mut ip = [0u8; 20];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&(ip_len as u16).to_be_bytes());
    ip[8] = 64;
    ip[9] = 17;
    ip[12..16].copy_from_slice(&PEER_IP);
    ip[16..20].copy_from_slice(&GUEST_IP);
    let c = ip_checksum(&ip);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    f.extend_from_slice(&ip);
    f.extend_from_slice(&PEER_PORT.to_be_bytes());
    f.extend_from_slice(&GUEST_PORT.to_be_bytes());
    f.extend_from_slice(&(udp_len as u16).to_be_bytes());
    f.extend_from_slice(&[0, 0]); // no UDP checksum (allowed over IPv4)
    let mut payload = [0u8; PAYLOAD];
    payload[..4].copy_from_slice(&seq.to_be_bytes());
    for (i, b) in payload.iter_mut().enumerate().skip(4) {
        *b = (seq as usize).wrapping_mul(7).wrapping_add(i) as u8;
    }
    f.extend_from_slice(&payload);
    f
}

/// The sequence number of an echo from the guest to the peer, if `f` is one (and carries
/// the payload sent).
fn echo_seq(f: &[u8]) -> Option<u32> {
    let udp = f.get(14 + 20..)?;
    if f.get(..6)? != PEER_MAC
        || f.get(12..14)? != [0x08, 0x00]
        || udp.get(2..4)? != PEER_PORT.to_be_bytes()
    {
        return None;
    }
    let payload = udp.get(8..8 + PAYLOAD)?;
    let seq = u32::from_be_bytes(payload[..4].try_into().ok()?);
    (frame(seq)[14 + 28..] == *payload).then_some(seq)
}

fn wait_readable(fd: i32, timeout: Duration) -> bool {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd; the descriptor is the wire's, open for the call.
    unsafe { libc::poll(&mut p, 1, timeout.as_millis() as i32) > 0 }
}

/// What the peer saw: echoes per counted interval, lost datagrams.
struct PeerResult {
    rates: Vec<f64>,
    echoes_counted: u64,
    lost: u64,
}

/// The peer: keeps [`WINDOW`] datagrams in flight until `done`, counting echoes per interval
/// from the first one once `shadowed` is set (if given); sets `finish` once [`SKIP`] and
/// `counted` more have gone by since.
fn peer(
    mut wire: SocketWire,
    done: &AtomicBool,
    finish: &AtomicBool,
    shadowed: Option<&AtomicBool>,
    counted: Duration,
) -> PeerResult {
    let mut t0: Option<Instant> = None;
    let (mut next, mut in_flight, mut lost) = (0u32, 0u32, 0u64);
    let mut last_echo = Instant::now();
    let mut counts: Vec<u64> = Vec::new();
    let mut buf = [0u8; 2048];
    while !done.load(Ordering::SeqCst) {
        while in_flight < WINDOW {
            if wire.send(&frame(next)).is_err() {
                break;
            }
            next = next.wrapping_add(1);
            in_flight += 1;
        }
        if wait_readable(wire.fd().as_raw_fd(), Duration::from_millis(50)) {
            while let Ok(Some(n)) = wire.recv(&mut buf) {
                if echo_seq(&buf[..n]).is_some() {
                    in_flight = in_flight.saturating_sub(1);
                    last_echo = Instant::now();
                    if t0.is_none() && !shadowed.is_none_or(|s| s.load(Ordering::SeqCst)) {
                        continue;
                    }
                    let t0 = *t0.get_or_insert(last_echo);
                    let i = (t0.elapsed().as_nanos() / INTERVAL.as_nanos()) as usize;
                    if counts.len() <= i {
                        counts.resize(i + 1, 0);
                    }
                    counts[i] += 1;
                }
            }
        }
        // One interval more: the last one is cut short by the end.
        if t0.is_some_and(|t| t.elapsed() >= SKIP + counted + INTERVAL) {
            finish.store(true, Ordering::SeqCst);
        }
        if in_flight > 0 && last_echo.elapsed() > Duration::from_millis(200) {
            // Before the guest is up (not counted), or dropped on the way: a fresh window.
            if !counts.is_empty() {
                lost += u64::from(in_flight);
            }
            in_flight = 0;
            last_echo = Instant::now();
        }
    }
    // The last interval is cut short by the end: not counted.
    counts.pop();
    let skip = (SKIP.as_nanos() / INTERVAL.as_nanos()) as usize;
    let counted = counts.get(skip..).unwrap_or(&[]);
    PeerResult {
        rates: counted
            .iter()
            .map(|&c| c as f64 / INTERVAL.as_secs_f64())
            .collect(),
        echoes_counted: counted.iter().sum(),
        lost,
    }
}

/// One VM run in `mode` for `seconds`: the median echo rate of its counted intervals.
fn net_run(
    dir: &std::path::Path,
    mode: NetMode,
    seconds: u64,
    signals: &SignalState,
    n: usize,
) -> anyhow::Result<(f64, usize, u64)> {
    let socket = dir.join(format!("net-{}-{n}.sock", mode.label()));
    let (dev_end, peer_end) = SocketWire::pair().context("creating the wire")?;
    let device = Arc::new(
        VirtioNetDevice::new(
            &DeviceConfig {
                socket: socket.clone(),
                mac: GUEST_MAC,
                announce: false,
            },
            Box::new(dev_end),
        )
        .context("starting the virtio-net device")?,
    );
    let d = device.clone();
    let server = std::thread::Builder::new()
        .name("bench-vfio-user".into())
        .spawn(move || d.serve_one())
        .context("spawning the device's vfio-user thread")?;
    let done = Arc::new(AtomicBool::new(false));
    let finish = Arc::new(AtomicBool::new(false));
    let entered = Arc::new(AtomicBool::new(false));
    let (dn, fin) = (done.clone(), finish.clone());
    let shadowed = (mode != NetMode::Direct).then(|| entered.clone());
    let counted = Duration::from_secs(seconds);
    let peer = std::thread::Builder::new()
        .name("bench-net-peer".into())
        .spawn(move || peer(peer_end, &dn, &fin, shadowed.as_deref(), counted))
        .context("spawning the peer")?;
    let boot = BootSpec {
        image: Arc::new(guest_image::GUEST_ELF.to_vec()),
        workload: Workload::NetEcho,
        args: WorkloadArgs {
            duration_ms: (counted + SKIP + RUN_BOUND).as_millis() as u64,
            net: NetArgs {
                ip: u32::from_be_bytes(GUEST_IP),
                udp_port: u32::from(GUEST_PORT),
                count: 0,
                ..Default::default()
            },
            ..Default::default()
        },
    };
    let spec = SessionSpec {
        memory: 256 << 20,
        console: ConsoleSink::Null,
        timeout: Some(counted + SKIP + RUN_BOUND + Duration::from_secs(60)),
        net: Some(socket.clone()),
        finish: Some(finish),
        net_shadowed: Some(entered),
        shadow_continuous: mode != NetMode::Direct,
        shadow: EngineOptions {
            interception: if mode == NetMode::Trap {
                Interception::Trap
            } else {
                Interception::Poll
            },
            ..Default::default()
        },
        ..Default::default()
    };
    let r = session::run(&boot, &spec, Instant::now(), signals);
    done.store(true, Ordering::SeqCst);
    let seen = peer
        .join()
        .map_err(|_| anyhow::anyhow!("the peer thread panicked"))?;
    let _ = server.join();
    drop(device);
    let _ = std::fs::remove_file(&socket);
    let r = r?;
    if r.status != Some(0) {
        bail!("guest run ({mode:?}) failed: {}", r.detail);
    }
    let net = r.net_shadow.as_ref();
    let shadowed = net.is_some_and(|s| s.shadowed);
    if shadowed != (mode != NetMode::Direct) {
        bail!("run {mode:?}: shadow mode was {shadowed} at the end");
    }
    if let Some(s) = net.filter(|s| s.shadowed) {
        // Shadow mode is entered once and never left: the chains the transmit queue
        // forwarded are the run's last ones. At least as many as the counted echoes means
        // every counted interval ran shadowed.
        let tx = s
            .queues
            .iter()
            .find(|q| q.state.geometry.index == 1)
            .map_or(0, |q| q.state.stats.forwarded);
        if tx < seen.echoes_counted {
            bail!(
                "run {mode:?}: {} echoes counted but the engine forwarded {tx} transmitted \
                 frames: shadow mode began inside the counted intervals",
                seen.echoes_counted
            );
        }
        let refused: u64 = s.queues.iter().map(|q| q.state.stats.refused).sum();
        if refused > 0 {
            bail!("run {mode:?}: the engine refused {refused} chains of a correct guest");
        }
    }
    if seen.rates.is_empty() {
        bail!("run {mode:?}: no echo intervals after {SKIP:?}");
    }
    Ok((median(seen.rates.clone()), seen.rates.len(), seen.lost))
}

/// The virtio-net rows: `runs` rounds of direct, poll and trap, `seconds` each.
pub fn rows(
    dir: &std::path::Path,
    seconds: u64,
    runs: usize,
    signals: &SignalState,
) -> anyhow::Result<Vec<NetRow>> {
    let mut per_mode: Vec<(Vec<f64>, usize, u64)> = vec![(Vec::new(), 0, 0); NetMode::ALL.len()];
    for n in 0..runs.max(1) {
        for (i, mode) in NetMode::ALL.into_iter().enumerate() {
            let (rate, intervals, lost) = net_run(dir, mode, seconds, signals, n)?;
            per_mode[i].0.push(rate);
            per_mode[i].1 += intervals;
            per_mode[i].2 += lost;
        }
    }
    let direct = median(per_mode[0].0.clone());
    Ok(NetMode::ALL
        .into_iter()
        .zip(per_mode)
        .map(|(mode, (rates, intervals, lost))| {
            let eps = median(rates.clone());
            NetRow {
                mode,
                echoes_per_s: eps,
                packets_per_s: 2.0 * eps,
                runs: rates.len(),
                intervals,
                lost,
                ratio: eps / direct.max(1e-9),
            }
        })
        .collect())
}

/// Prints the rows as text.
pub fn print(rows: &[NetRow], seconds: u64) {
    println!(
        "virtio-net passthrough NIC (in-process device on a socket wire), net-echo with {WINDOW} \
         {PAYLOAD}-byte UDP datagrams in flight, median of 250 ms intervals after 1 s ({seconds} s runs)"
    );
    println!("  mode      packets/s   echoes/s   vs direct   runs   lost");
    for r in rows {
        println!(
            "  {:<7} {:>11.0} {:>10.0}   {:>8.2}x   {:>4}   {:>4}",
            r.mode.label(),
            r.packets_per_s,
            r.echoes_per_s,
            r.ratio,
            r.runs,
            r.lost
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_carry_valid_headers_and_echoes_are_recognised() {
        let f = frame(42);
        assert_eq!(f.len(), 14 + 20 + 8 + PAYLOAD);
        assert_eq!(ip_checksum(&f[14..34]), 0, "IPv4 header checksum");
        // The guest's echo: addresses and ports swapped, payload unchanged.
        let mut e = f.clone();
        e[..6].copy_from_slice(&PEER_MAC);
        e[6..12].copy_from_slice(&GUEST_MAC);
        e[14 + 20..14 + 22].copy_from_slice(&GUEST_PORT.to_be_bytes());
        e[14 + 22..14 + 24].copy_from_slice(&PEER_PORT.to_be_bytes());
        assert_eq!(echo_seq(&e), Some(42));
        e[14 + 28 + 10] ^= 1;
        assert_eq!(echo_seq(&e), None, "a corrupted payload is not counted");
        assert_eq!(echo_seq(&f), None, "the peer's own frame is not an echo");
    }
}

//! `ferry bench vrdma`: VMs with virtual RDMA devices on two hosts (two software RoCEv2 ports
//! and their multiplexers on loopback addresses, in this process) against two bare-metal
//! peers, in the same run:
//!
//! - connection setup latency (REQ → REP → RTU): measured inside the client VM from its first
//!   REQ to its RTU, one fresh client VM per round; the peers measure the same exchange with
//!   the CM endpoint library;
//! - UD message rate: a verified stream of echoed messages with 32 in flight, VM ↔ VM against
//!   peer ↔ peer with the same window, size and verification; the best of `rounds` streams on
//!   each side (one per client VM);
//! - the RC rows ([`super::rdma_vms_rc`]): WRITE bandwidth VM ↔ VM against raw UDP, rping
//!   latency VM ↔ VM against peer ↔ peer.
use std::{
    net::Ipv4Addr,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use anyhow::Context;
use clap::Args;
use guest_abi::{RdmaArgs, Workload};
use rdma::{
    addr::gid_v4,
    cm::{AcceptMode, CmConfig, ConnectParams, ListenOptions},
    host::rc_service,
    peer::{pattern, Peer},
    port::{PortConfig, UdDest, UdSend},
};
use rdma_wire::rdma_cm::RDMA_CM_UD_QKEY;
use serde::Serialize;

use crate::commands::vrdma::{run_vms, VmSpec, DEFAULT_PORT};
use crate::{signals::SignalState, vrdma_host::VrdmaHost};

/// `ferry bench vrdma`.
#[derive(Args, Debug)]
pub struct BenchVrdmaArgs {
    /// Connection setups measured on each side (one client VM per round).
    #[arg(long, default_value_t = 5)]
    pub rounds: u64,
    /// UD messages per stream.
    #[arg(long, default_value_t = 5000)]
    pub messages: u64,
    /// UD message size in bytes.
    #[arg(long, default_value_t = 64)]
    pub size: u32,
    /// Second octet of the loopback block used (127.X.*.*).
    #[arg(long, default_value_t = 241)]
    pub block: u8,
    /// RC WRITEs of 64 KiB in the VM<->VM bandwidth stream.
    #[arg(long, default_value_t = 2000)]
    pub rc_writes: u64,
    /// rping rounds of the RC latency rows.
    #[arg(long, default_value_t = 200)]
    pub rc_pings: u64,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

/// One side's figures.
#[derive(Debug, Clone, Serialize)]
pub struct Side {
    /// Connection setup latencies, µs.
    pub connect_us: Vec<f64>,
    /// Their median.
    pub connect_median_us: f64,
    /// UD messages echoed and verified per second (best round).
    pub ud_msgs_per_s: f64,
}

/// The report.
#[derive(Debug, Clone, Serialize)]
pub struct BenchVrdmaReport {
    /// VM ↔ VM through both multiplexers.
    pub vm: Side,
    /// Bare-metal peer ↔ bare-metal peer.
    pub peer: Side,
    /// VM connect median / peer connect median.
    pub connect_ratio: f64,
    /// VM UD rate / peer UD rate.
    pub ud_rate_ratio: f64,
    /// The peers' UD rate when they too send what they have in one batch (GSO runs), as the
    /// VMs' devices do: the per-message system calls gone, the stronger baseline.
    pub peer_batched_ud_msgs_per_s: f64,
    /// VM UD rate / batched peer UD rate.
    pub ud_rate_ratio_vs_batched_peer: f64,
    /// UD message size.
    pub size: u32,
    /// Messages per stream.
    pub messages: u64,
    /// RC rows: WRITE bandwidth against raw UDP, rping latency against the peers.
    pub rc: super::rdma_vms_rc::RcRows,
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        0.0
    } else {
        v[v.len() / 2]
    }
}

pub(super) fn field(line: &str, key: &str) -> Option<f64> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
        .and_then(|v| v.parse().ok())
}

fn vm_side(a: &BenchVrdmaArgs, signals: &Arc<SignalState>) -> anyhow::Result<Side> {
    let b = a.block;
    let ip = |c: u8, d: u8| Ipv4Addr::new(127, b, c, d);
    let ha = VrdmaHost::start(ip(0, 1), None)?;
    let hb = VrdmaHost::start(ip(0, 2), None)?;
    let server = VmSpec {
        workload: Workload::RdmaServer,
        rdma: RdmaArgs {
            local_gid: ip(1, 1).into(),
            service_port: DEFAULT_PORT as u32,
            messages: a.rounds,
            ..Default::default()
        },
        delay: Duration::ZERO,
        expect: 0,
        timeout: None,
    };
    let (ha2, sig2) = (ha.clone(), signals.clone());
    let server_thread = std::thread::spawn(move || {
        run_vms(
            &ha2,
            &[server],
            64 << 20,
            Duration::from_secs(600),
            "off",
            &sig2,
        )
    });
    std::thread::sleep(Duration::from_millis(500));
    let mut connect = Vec::new();
    let mut best_rate: f64 = 0.0;
    for round in 0..a.rounds {
        let client = VmSpec {
            workload: Workload::RdmaClient,
            rdma: RdmaArgs {
                local_gid: ip(2, 1).into(),
                peer_gid: ip(1, 1).into(),
                service_port: DEFAULT_PORT as u32,
                msg_size: a.size,
                messages: a.messages,
                ..Default::default()
            },
            delay: Duration::ZERO,
            expect: 0,
            timeout: None,
        };
        let r = run_vms(
            &hb,
            &[client],
            64 << 20,
            Duration::from_secs(300),
            "off",
            signals,
        )?;
        let r = &r[0];
        let line = r.result.clone().with_context(|| {
            format!(
                "client VM round {round} ended {} (status {:?}) without a result: {:?}",
                r.outcome, r.status, r.console_tail
            )
        })?;
        let (c, n, us) = (
            field(&line, "connect_us").context("connect_us")?,
            field(&line, "messages").context("messages")?,
            field(&line, "ud_us").context("ud_us")?,
        );
        connect.push(c);
        best_rate = best_rate.max(n * 1e6 / us.max(1.0));
    }
    let s = server_thread
        .join()
        .map_err(|_| anyhow::anyhow!("server thread panicked"))??;
    if s[0].status != Some(0) {
        anyhow::bail!(
            "server VM ended {} (status {:?})",
            s[0].outcome,
            s[0].status
        );
    }
    ha.shutdown();
    hb.shutdown();
    Ok(Side {
        connect_median_us: median(&mut connect.clone()),
        connect_us: connect,
        ud_msgs_per_s: best_rate,
    })
}

/// The peers' side, and their batched UD rate.
fn peer_side(a: &BenchVrdmaArgs) -> anyhow::Result<(Side, f64)> {
    let b = a.block;
    let (x, y) = (Ipv4Addr::new(127, b, 3, 1), Ipv4Addr::new(127, b, 3, 2));
    let cm = CmConfig {
        timewait: Duration::from_millis(200),
        ..CmConfig::default()
    };
    let px = Peer::start(PortConfig::new(x), cm.clone())?;
    let py = Peer::start(PortConfig::new(y), cm)?;
    py.endpoint().listen(
        rc_service(DEFAULT_PORT),
        ListenOptions {
            qpn: py.ud_qp().qpn_value(),
            qkey: RDMA_CM_UD_QKEY,
            accept: AcceptMode::Auto,
        },
    );
    let wait = Duration::from_secs(20);
    let mut connect = Vec::new();
    for _ in 0..a.rounds {
        let t = Instant::now();
        let info = px.endpoint().connect(
            gid_v4(y),
            ConnectParams {
                service_id: rc_service(DEFAULT_PORT),
                qpn: px.ud_qp().qpn_value(),
                private_data: vec![],
            },
            wait,
        )?;
        connect.push(t.elapsed().as_secs_f64() * 1e6);
        px.endpoint().disconnect(info.local_comm_id, wait)?;
    }
    // UD: an echo on y, a window of `UD_WINDOW` verified messages from x (as the guest agent
    // does), one send per message; then batched: both sides send what they have in one go,
    // as the VMs' devices do (the echo answers every message waiting, the client refills its
    // window at once).
    let stop = Arc::new(AtomicBool::new(false));
    let batched = Arc::new(AtomicBool::new(false));
    let (st, port_y, qy) = (stop.clone(), py.port().clone(), py.ud_qp().clone());
    let echo_batched = batched.clone();
    let echo = std::thread::spawn(move || {
        while !st.load(Ordering::Relaxed) {
            let Some(m) = qy.recv_timeout(Duration::from_millis(20)) else {
                continue;
            };
            let most = if echo_batched.load(Ordering::Relaxed) {
                2 * UD_WINDOW as usize
            } else {
                1
            };
            let burst: Vec<_> = std::iter::once(m)
                .chain(std::iter::from_fn(|| qy.try_recv()))
                .take(most)
                .collect();
            let sends: Vec<UdSend<'_>> = burst
                .iter()
                .map(|m| UdSend {
                    dest: UdDest {
                        dgid: m.sgid,
                        dqpn: m.src_qpn,
                        qkey: RDMA_CM_UD_QKEY,
                    },
                    imm: None,
                    data: &m.data,
                })
                .collect();
            port_y.post_send_ud_batch(&qy, &sends, |_, _| {});
        }
    });
    let dest = UdDest {
        dgid: gid_v4(y),
        dqpn: py.ud_qp().qpn_value(),
        qkey: RDMA_CM_UD_QKEY,
    };
    let size = a.size.clamp(8, 2048) as usize;
    // As many streams as the VM side runs (one per client VM), the best kept: the same
    // statistic on both sides.
    let mut best = [0f64; 2];
    for (i, batch) in [false, true].into_iter().enumerate() {
        batched.store(batch, Ordering::Relaxed);
        for _ in 0..a.rounds.max(1) {
            // A late echo of the previous stream is not this one's.
            while px.ud_qp().try_recv().is_some() {}
            let rate = peer_ud_stream(&px, dest, (a.messages, size), batch)?;
            best[i] = best[i].max(rate);
        }
    }
    stop.store(true, Ordering::Relaxed);
    let _ = echo.join();
    px.shutdown();
    py.shutdown();
    let side = Side {
        connect_median_us: median(&mut connect.clone()),
        connect_us: connect,
        ud_msgs_per_s: best[0],
    };
    Ok((side, best[1]))
}

/// Messages in flight in the UD streams (the guest agent's `UD_WINDOW`; at most 64).
const UD_WINDOW: u64 = 32;

/// One verified UD stream of `messages` of `size` bytes from `px` to the echo at `dest`,
/// `UD_WINDOW` in flight, refilled one send per message or in one batch; messages/s.
fn peer_ud_stream(
    px: &Peer,
    dest: UdDest,
    (messages, size): (u64, usize),
    batch: bool,
) -> anyhow::Result<f64> {
    let t = Instant::now();
    let (mut base, mut next) = (0u64, 0u64);
    let mut acked = [false; 64];
    let mut last = Instant::now();
    while base < messages {
        let end = messages.min(base + UD_WINDOW);
        if next < end {
            let datas: Vec<Vec<u8>> = (next..end).map(|s| pattern(s, size)).collect();
            let sends: Vec<UdSend<'_>> = datas
                .iter()
                .map(|d| UdSend {
                    dest,
                    imm: None,
                    data: d,
                })
                .collect();
            let mut failed = None;
            // Unbatched: one send (one system call) per message.
            let per_send = if batch { sends.len() } else { 1 };
            for run in sends.chunks(per_send) {
                px.port().post_send_ud_batch(px.ud_qp(), run, |_, r| {
                    if let Err(e) = r {
                        failed.get_or_insert(e);
                    }
                });
            }
            if let Some(e) = failed {
                return Err(e.into());
            }
            next = end;
        }
        if let Some(m) = px.ud_qp().recv_timeout(Duration::from_millis(300)) {
            // Batched: every echo waiting, then the window is refilled in one batch.
            let waiting = std::iter::from_fn(|| px.ud_qp().try_recv());
            let most = if batch { 2 * UD_WINDOW as usize } else { 1 };
            for m in std::iter::once(m).chain(waiting).take(most) {
                let seq = u64::from_be_bytes(m.data[..8].try_into().unwrap_or_default());
                if seq >= base && seq < next && m.data == pattern(seq, size) {
                    acked[(seq % 64) as usize] = true;
                    last = Instant::now();
                }
                while base < next && acked[(base % 64) as usize] {
                    acked[(base % 64) as usize] = false;
                    base += 1;
                }
            }
        } else if last.elapsed() > Duration::from_millis(300) {
            for s in base..next {
                if !acked[(s % 64) as usize] {
                    px.port()
                        .post_send_ud(px.ud_qp(), dest, None, &pattern(s, size))?;
                }
            }
            last = Instant::now();
        }
    }
    Ok(messages as f64 / t.elapsed().as_secs_f64())
}

pub fn run(a: BenchVrdmaArgs) -> anyhow::Result<i32> {
    let signals = SignalState::install()?;
    let (peer, peer_batched) = peer_side(&a).context("bare-metal peers")?;
    let vm = vm_side(&a, &signals).context("VMs")?;
    let rc = super::rdma_vms_rc::measure(a.block, a.rc_writes, a.rc_pings, &signals)
        .context("RC rows")?;
    let r = BenchVrdmaReport {
        connect_ratio: vm.connect_median_us / peer.connect_median_us.max(1e-9),
        ud_rate_ratio: vm.ud_msgs_per_s / peer.ud_msgs_per_s.max(1e-9),
        peer_batched_ud_msgs_per_s: peer_batched,
        ud_rate_ratio_vs_batched_peer: vm.ud_msgs_per_s / peer_batched.max(1e-9),
        vm,
        peer,
        size: a.size,
        messages: a.messages,
        rc,
    };
    if a.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
    } else {
        println!(
            "ferry bench vrdma ({} rounds, {} UD messages of {} bytes, {} in flight)",
            a.rounds, a.messages, a.size, UD_WINDOW
        );
        println!(
            "  connection setup (REQ/REP/RTU), median: VM<->VM through 2 multiplexers {:.0} us, peer<->peer {:.0} us, ratio {:.2}",
            r.vm.connect_median_us, r.peer.connect_median_us, r.connect_ratio
        );
        println!(
            "  UD messages echoed and verified: VM<->VM {:.0} msg/s, peer<->peer {:.0} msg/s, ratio {:.2}",
            r.vm.ud_msgs_per_s, r.peer.ud_msgs_per_s, r.ud_rate_ratio
        );
        println!(
            "  UD against peers that send in batches (GSO runs) too: peer<->peer {:.0} msg/s, ratio {:.2}",
            r.peer_batched_ud_msgs_per_s, r.ud_rate_ratio_vs_batched_peer
        );
        let rc = &r.rc;
        println!(
            "  RC WRITE bandwidth, {} x 64 KiB: VM<->VM {:.0} MB/s, raw UDP on loopback {:.0} MB/s, ratio {:.2}",
            rc.writes,
            rc.vm_write_bytes_per_s / 1e6,
            rc.raw_udp_bytes_per_s / 1e6,
            rc.write_ratio_vs_raw_udp
        );
        println!(
            "  RC WRITE bandwidth against raw UDP in GSO runs received coalesced (GRO): {:.0} MB/s, ratio {:.2}",
            rc.raw_udp_gso_bytes_per_s / 1e6,
            rc.write_ratio_vs_raw_udp_gso
        );
        println!(
            "  RC latency, one rping round (2 SEND exchanges, READ, WRITE; 64 bytes): VM<->VM {:.0} us, peer<->peer {:.0} us, ratio {:.2}",
            rc.vm_rping_us, rc.peer_rping_us, rc.rping_latency_ratio
        );
    }
    Ok(0)
}

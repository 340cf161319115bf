//! `ferry bench rdma`: the multiplexer's costs, each against a baseline measured in the same
//! run — connection setups through the multiplexer vs the same endpoints on bare ports,
//! handshake latency, routing throughput with 10 / 1 000 / 100 000 registered GIDs, and the
//! UD message rate of the software port vs raw UDP on loopback.
use std::net::{Ipv4Addr, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use rdma::addr::gid_v4;
use rdma::cm::{AcceptMode, CmConfig, CmEndpoint, ConnectParams, ListenOptions};
use rdma::host::{rc_service, Host, HostConfig};
use rdma::mux::{mad_grh, Backpressure, Multiplexer, MuxConfig, Qp1Sink};
use rdma::peer::Peer;
use rdma::port::{PortConfig, Qp1Tx, SoftPort, UdDest};
use rdma::{Gid, Mad, RdmaError};
use rdma_wire::cm::SidrReq;
use rdma_wire::mad::{attr, MadHeader};
use serde::Serialize;

/// `ferry bench rdma`.
#[derive(Args, Debug)]
pub struct BenchRdmaArgs {
    /// Connections set up per side of the setup comparison.
    #[arg(long, default_value_t = 300)]
    pub connections: usize,
    /// MADs routed per GID count.
    #[arg(long, default_value_t = 2_000_000)]
    pub mads: usize,
    /// UD, RC (and raw UDP) round trips.
    #[arg(long, default_value_t = 20_000)]
    pub messages: usize,
    /// Bytes moved by the bandwidth comparison (RC WRITE vs raw UDP, 64 KiB messages).
    #[arg(long, default_value_t = 256 << 20)]
    pub bw_bytes: usize,
    /// Repetitions of every measurement; the best of each counts (the machine is shared).
    #[arg(long, default_value_t = 3)]
    pub reps: usize,
    /// First octet pair of the loopback block used (127.X.*.*).
    #[arg(long, default_value_t = 250)]
    pub block: u8,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Serialize)]
struct Setup {
    connections: usize,
    per_second: f64,
    median_us: f64,
    p99_us: f64,
}

#[derive(Serialize)]
struct Routing {
    gids: usize,
    vms: usize,
    mads_per_second: f64,
    ratio_to_10_gids: f64,
}

#[derive(Serialize)]
struct Report {
    setup_bare: Setup,
    setup_mux: Setup,
    setup_rate_ratio_mux_vs_bare: f64,
    median_latency_ratio_mux_vs_bare: f64,
    routing: Vec<Routing>,
    routing_fixed_vms: Vec<Routing>,
    udp_raw_messages_per_second: f64,
    ud_messages_per_second: f64,
    ud_rate_ratio_vs_raw_udp: f64,
    rc_round_trips_per_second: f64,
    rc_latency_ratio_vs_ud: f64,
    udp_raw_bytes_per_second: f64,
    rc_write_bytes_per_second: f64,
    rc_write_bandwidth_ratio_vs_raw_udp: f64,
    /// Raw UDP in GSO runs received coalesced (GRO), the kernel help the port's RC runs get.
    udp_raw_gso_bytes_per_second: f64,
    rc_write_bandwidth_ratio_vs_raw_udp_gso: f64,
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn cm() -> CmConfig {
    // Linux response timeout; the benchmark should never need a retry.
    CmConfig {
        timewait: Duration::from_millis(200),
        ..CmConfig::default()
    }
}

/// Sequential connects from `connect` (returning the connect latency), then disconnects.
/// `n` connection setups (REQ/REP/RTU) from `ep` to the listener on `dgid`, each timed,
/// then their disconnects.
fn measure_cm_setups(n: usize, ep: &CmEndpoint, dgid: Gid) -> anyhow::Result<Setup> {
    let wait = Duration::from_secs(20);
    measure_setups(
        n,
        || {
            let t = Instant::now();
            let p = ConnectParams {
                service_id: rc_service(1),
                qpn: 7,
                private_data: vec![],
            };
            let info = ep.connect(dgid, p, wait)?;
            Ok((info.local_comm_id, t.elapsed()))
        },
        |id| ep.disconnect(id, wait),
    )
}

fn measure_setups(
    n: usize,
    mut connect: impl FnMut() -> Result<(u32, Duration), RdmaError>,
    mut disconnect: impl FnMut(u32) -> Result<(), RdmaError>,
) -> anyhow::Result<Setup> {
    let mut lat = Vec::with_capacity(n);
    let mut ids = Vec::with_capacity(n);
    let t0 = Instant::now();
    for _ in 0..n {
        let (id, d) = connect()?;
        lat.push(d.as_secs_f64() * 1e6);
        ids.push(id);
    }
    let total = t0.elapsed();
    for id in ids {
        disconnect(id)?;
    }
    lat.sort_by(f64::total_cmp);
    Ok(Setup {
        connections: n,
        per_second: n as f64 / total.as_secs_f64(),
        median_us: percentile(&lat, 0.5),
        p99_us: percentile(&lat, 0.99),
    })
}

fn setup_bare(a: &BenchRdmaArgs) -> anyhow::Result<Setup> {
    let b = a.block;
    let (x, y) = (Ipv4Addr::new(127, b, 0, 1), Ipv4Addr::new(127, b, 0, 2));
    let px = Peer::start(PortConfig::new(x), cm())?;
    let py = Peer::start(PortConfig::new(y), cm())?;
    py.endpoint().listen(
        rc_service(1),
        ListenOptions {
            qpn: py.ud_qp().qpn_value(),
            qkey: 0,
            accept: AcceptMode::Auto,
        },
    );
    let dgid = py.gid();
    let r = measure_cm_setups(a.connections, px.endpoint(), dgid);
    px.shutdown();
    py.shutdown();
    r
}

fn setup_mux(a: &BenchRdmaArgs) -> anyhow::Result<Setup> {
    let b = a.block;
    let mk = |h: u8| -> anyhow::Result<Host> {
        let mut c = HostConfig::new(
            Ipv4Addr::new(127, b, 0, 10 + h),
            1,
            Ipv4Addr::new(127, b, h, 1),
        );
        c.cm = cm();
        c.service_port = 1;
        // Handshakes only, answered at once like the bare peer's listener.
        c.rc_server = false;
        c.mux = MuxConfig {
            max_connections_per_vm: a.connections * 2 + 16,
            ..MuxConfig::default()
        };
        Ok(Host::start(c)?)
    };
    let (hx, hy) = (mk(1)?, mk(2)?);
    let vx = hx.vm(1).context("VM 1 on host 1")?;
    let dgid = hy.vm(1).context("VM 1 on host 2")?.gid();
    let r = measure_cm_setups(a.connections, vx.endpoint(), dgid);
    hx.shutdown();
    hy.shutdown();
    r
}

struct NullTx;
impl Qp1Tx for NullTx {
    fn send_gsi(&self, _: Gid, _: Gid, _: &Mad) -> Result<(), RdmaError> {
        Ok(())
    }
}

struct CountSink(AtomicU64);
impl Qp1Sink for CountSink {
    fn deliver(&self, _: &[u8; 40], _: &Mad) -> Result<(), Backpressure> {
        self.0.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

/// Routes `mads` SIDR_REQs to GIDs picked pseudo-randomly among `gids` registered ones
/// spread over `vms` VMs, in process: the multiplexer's own cost.
fn routing(gids: usize, vms: usize, mads: usize) -> anyhow::Result<Routing> {
    let mux = Multiplexer::new(MuxConfig::default(), Arc::new(NullTx));
    let per_vm = gids.div_ceil(vms);
    let sinks: Vec<Arc<CountSink>> = (0..vms)
        .map(|_| Arc::new(CountSink(AtomicU64::new(0))))
        .collect();
    for (vm, s) in sinks.iter().enumerate() {
        mux.attach_vm(vm as u32, s.clone())?;
    }
    let gid = |i: usize| gid_v4(Ipv4Addr::from_bits(0x0a00_0000 + i as u32));
    for i in 0..gids {
        mux.register_gid((i / per_vm) as u32, gid(i))?;
    }
    let src = gid_v4(Ipv4Addr::new(192, 0, 2, 1));
    let mad = SidrReq {
        hdr: MadHeader::cm(attr::SIDR_REQ, 1),
        request_id: 1,
        ..SidrReq::default()
    }
    .to_mad();
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    let targets: Vec<(Gid, [u8; 40])> = (0..4096)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let d = gid((x % gids as u64) as usize);
            (d, mad_grh(src, d))
        })
        .collect();
    // Warm-up: one pass over the targets (steady state, not first-touch page faults).
    for (d, grh) in &targets {
        mux.route(src, *d, grh, &mad);
    }
    let t = Instant::now();
    for i in 0..mads {
        let (d, grh) = &targets[i & 4095];
        mux.route(src, *d, grh, &mad);
    }
    let el = t.elapsed();
    let delivered: u64 = sinks.iter().map(|s| s.0.load(Ordering::Relaxed)).sum();
    let want = (mads + targets.len()) as u64;
    anyhow::ensure!(delivered == want, "routed {delivered} of {want} MADs");
    Ok(Routing {
        gids,
        vms,
        mads_per_second: mads as f64 / el.as_secs_f64(),
        ratio_to_10_gids: 0.0,
    })
}

const MSG: usize = 256;

/// Round trips of MSG-byte datagrams between two plain UDP sockets (one echoing).
fn raw_udp(a: &BenchRdmaArgs) -> anyhow::Result<f64> {
    let b = a.block;
    let s1 = UdpSocket::bind((Ipv4Addr::new(127, b, 3, 1), 0))?;
    let s2 = UdpSocket::bind((Ipv4Addr::new(127, b, 3, 2), 0))?;
    s1.set_read_timeout(Some(Duration::from_secs(2)))?;
    s2.set_read_timeout(Some(Duration::from_millis(50)))?;
    let to = s2.local_addr()?;
    let stop = Arc::new(AtomicBool::new(false));
    let st = stop.clone();
    let echo = std::thread::spawn(move || {
        let mut buf = [0u8; 2048];
        while !st.load(Ordering::Relaxed) {
            if let Ok((n, from)) = s2.recv_from(&mut buf) {
                let _ = s2.send_to(&buf[..n], from);
            }
        }
    });
    let msg = [0x5au8; MSG];
    let mut buf = [0u8; 2048];
    let t = Instant::now();
    let mut done = 0;
    for _ in 0..a.messages {
        s1.send_to(&msg, to)?;
        if s1.recv_from(&mut buf).is_ok() {
            done += 1;
        }
    }
    let el = t.elapsed();
    stop.store(true, Ordering::Relaxed);
    let _ = echo.join();
    Ok(done as f64 / el.as_secs_f64())
}

/// The same round trips between UD QPs of two software ports (ICRC, QP checks).
fn ud(a: &BenchRdmaArgs) -> anyhow::Result<f64> {
    let b = a.block;
    let (x, y) = (Ipv4Addr::new(127, b, 4, 1), Ipv4Addr::new(127, b, 4, 2));
    let px = SoftPort::bind(PortConfig::new(x))?;
    let py = SoftPort::bind(PortConfig::new(y))?;
    let qkey = rdma_wire::rdma_cm::RDMA_CM_UD_QKEY;
    let qx = px.create_ud_qp(gid_v4(x), qkey);
    let qy = py.create_ud_qp(gid_v4(y), qkey);
    let stop = Arc::new(AtomicBool::new(false));
    let (st, py2, qy2) = (stop.clone(), py.clone(), qy.clone());
    let echo = std::thread::spawn(move || {
        while !st.load(Ordering::Relaxed) {
            if let Some(m) = qy2.recv_timeout(Duration::from_millis(50)) {
                let d = UdDest {
                    dgid: m.sgid,
                    dqpn: m.src_qpn,
                    qkey,
                };
                let _ = py2.post_send_ud(&qy2, d, None, &m.data);
            }
        }
    });
    let dest = UdDest {
        dgid: gid_v4(y),
        dqpn: qy.qpn_value(),
        qkey,
    };
    let msg = [0x5au8; MSG];
    let t = Instant::now();
    let mut done = 0;
    for _ in 0..a.messages {
        px.post_send_ud(&qx, dest, None, &msg)?;
        if qx.recv_timeout(Duration::from_secs(2)).is_some() {
            done += 1;
        }
    }
    let el = t.elapsed();
    stop.store(true, Ordering::Relaxed);
    let _ = echo.join();
    px.shutdown();
    py.shutdown();
    Ok(done as f64 / el.as_secs_f64())
}

/// Runs the benchmark.
pub fn rdma(a: BenchRdmaArgs) -> anyhow::Result<i32> {
    let reps = a.reps.max(1);
    let best_setup = |best: Option<Setup>, s: Setup| match best {
        Some(b) if b.per_second >= s.per_second => Some(b),
        _ => Some(s),
    };
    let (mut setup_bare_b, mut setup_mux_b) = (None, None);
    for _ in 0..reps {
        // Interleaved, so that both sides see the same machine load.
        setup_bare_b = best_setup(
            setup_bare_b,
            setup_bare(&a).context("setups on bare ports")?,
        );
        setup_mux_b = best_setup(
            setup_mux_b,
            setup_mux(&a).context("setups through the multiplexer")?,
        );
    }
    let setup_bare = setup_bare_b.context("no setup measurement")?;
    let setup_mux = setup_mux_b.context("no setup measurement")?;
    let best_routing = |g: usize, vms: usize| -> anyhow::Result<Routing> {
        let mut best = routing(g, vms, a.mads)?;
        for _ in 1..reps {
            let r = routing(g, vms, a.mads)?;
            if r.mads_per_second > best.mads_per_second {
                best = r;
            }
        }
        Ok(best)
    };
    let mut routing_v = Vec::new();
    let mut routing_f = Vec::new();
    for g in [10, 1_000, 100_000] {
        routing_v.push(best_routing(g, g.div_ceil(10))?);
        routing_f.push(best_routing(g, 10)?);
    }
    for set in [&mut routing_v, &mut routing_f] {
        let base = set[0].mads_per_second;
        for r in set.iter_mut() {
            r.ratio_to_10_gids = r.mads_per_second / base;
        }
    }
    let (mut raw, mut udr, mut rcr, mut raw_bw, mut raw_gso, mut rc_bw) =
        (0f64, 0f64, 0f64, 0f64, 0f64, 0f64);
    for _ in 0..reps {
        raw = raw.max(raw_udp(&a)?);
        udr = udr.max(ud(&a)?);
        rcr = rcr.max(super::rc::rc_round_trips(a.block, a.messages)?);
        raw_bw = raw_bw.max(super::rc::raw_udp_bandwidth(a.block, a.bw_bytes, false)?);
        raw_gso = raw_gso.max(super::rc::raw_udp_bandwidth(a.block, a.bw_bytes, true)?);
        rc_bw = rc_bw.max(super::rc::rc_write_bandwidth(a.block, a.bw_bytes)?);
    }
    let report = Report {
        setup_rate_ratio_mux_vs_bare: setup_mux.per_second / setup_bare.per_second,
        median_latency_ratio_mux_vs_bare: setup_mux.median_us / setup_bare.median_us,
        setup_bare,
        setup_mux,
        routing: routing_v,
        routing_fixed_vms: routing_f,
        udp_raw_messages_per_second: raw,
        ud_messages_per_second: udr,
        ud_rate_ratio_vs_raw_udp: udr / raw,
        rc_round_trips_per_second: rcr,
        // Latency is the inverse of the round-trip rate of one outstanding message.
        rc_latency_ratio_vs_ud: udr / rcr,
        udp_raw_bytes_per_second: raw_bw,
        rc_write_bytes_per_second: rc_bw,
        rc_write_bandwidth_ratio_vs_raw_udp: rc_bw / raw_bw,
        udp_raw_gso_bytes_per_second: raw_gso,
        rc_write_bandwidth_ratio_vs_raw_udp_gso: rc_bw / raw_gso,
    };
    if a.json {
        println!("{}", serde_json::to_string(&report)?);
        return Ok(0);
    }
    let r = &report;
    let line = |name: &str, s: &Setup| {
        println!(
            "{name:<28} {:>8.0} setups/s   handshake median {:>7.1} µs   p99 {:>7.1} µs   ({} connections)",
            s.per_second, s.median_us, s.p99_us, s.connections
        )
    };
    line("setups, bare ports:", &r.setup_bare);
    line("setups, through the mux:", &r.setup_mux);
    println!(
        "setup rate mux/bare: {:.3}   median handshake latency mux/bare: {:.3}",
        r.setup_rate_ratio_mux_vs_bare, r.median_latency_ratio_mux_vs_bare
    );
    for x in r.routing.iter().chain(&r.routing_fixed_vms) {
        println!(
            "routing with {:>6} GIDs ({:>5} VMs): {:>10.0} MADs/s   ratio to 10 GIDs: {:.3}",
            x.gids, x.vms, x.mads_per_second, x.ratio_to_10_gids
        );
    }
    println!(
        "UD round trips: {:.0} msg/s vs raw UDP {:.0} msg/s on loopback ({} B): ratio {:.3}",
        r.ud_messages_per_second, r.udp_raw_messages_per_second, MSG, r.ud_rate_ratio_vs_raw_udp
    );
    println!(
        "RC SEND round trips: {:.0}/s ({:.1} µs) vs UD {:.1} µs: RC/UD latency ratio {:.3}",
        r.rc_round_trips_per_second,
        1e6 / r.rc_round_trips_per_second,
        1e6 / r.ud_messages_per_second,
        r.rc_latency_ratio_vs_ud
    );
    println!(
        "RC WRITE 64 KiB: {:.0} MB/s vs raw UDP {:.0} MB/s (64 KiB in 4 KiB datagrams, windowed): ratio {:.3}",
        r.rc_write_bytes_per_second / 1e6,
        r.udp_raw_bytes_per_second / 1e6,
        r.rc_write_bandwidth_ratio_vs_raw_udp
    );
    println!(
        "RC WRITE 64 KiB vs raw UDP in GSO runs, received coalesced (GRO): {:.0} MB/s: ratio {:.3}",
        r.udp_raw_gso_bytes_per_second / 1e6,
        r.rc_write_bandwidth_ratio_vs_raw_udp_gso
    );
    Ok(0)
}

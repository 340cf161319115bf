//! The RC rows of `ferry bench vrdma`, VMs with virtual RDMA devices on two hosts (two
//! software RoCEv2 ports and their multiplexers in this process):
//!
//! - RC RDMA WRITE bandwidth VM ↔ VM (the built-in guest's `write-bw` workload: 64 KiB
//!   WRITEs, 128 in flight and one in 16 signaled as ib_write_bw does, path MTU 4096, the
//!   server verifying the buffer) against raw UDP moving the same bytes on loopback
//!   ([`super::rc::raw_udp_bandwidth`]);
//! - RC latency: the time of one rping round (rping's protocol: two SEND/receive exchanges,
//!   an RDMA READ and an RDMA WRITE, 64 bytes) VM ↔ VM against Ferry's bare-metal peers
//!   speaking the same protocol.
use std::{net::Ipv4Addr, sync::Arc, time::Duration};

use anyhow::Context;
use guest_abi::{rdma_mode, RdmaArgs, Workload};
use rdma::{addr::gid_v4, cm::CmConfig, peer::Peer, port::PortConfig, rc_session::tools::Tool};
use serde::Serialize;

use super::rdma_vms::field;
use crate::commands::vrdma::{run_vms, VmSpec, DEFAULT_PORT};
use crate::{signals::SignalState, vrdma_host::VrdmaHost};

/// WRITE size of the bandwidth row.
pub const WRITE_SIZE: u32 = 64 << 10;
/// rping's message size.
const PING_SIZE: u32 = 64;

/// The RC figures.
#[derive(Debug, Clone, Serialize)]
pub struct RcRows {
    /// WRITEs in the VM ↔ VM stream.
    pub writes: u64,
    /// VM ↔ VM RC WRITE bandwidth, bytes/s.
    pub vm_write_bytes_per_s: f64,
    /// Raw UDP bandwidth on loopback, bytes/s.
    pub raw_udp_bytes_per_s: f64,
    /// VM WRITE bandwidth / raw UDP bandwidth.
    pub write_ratio_vs_raw_udp: f64,
    /// Raw UDP in GSO runs received coalesced (GRO) on loopback, bytes/s.
    pub raw_udp_gso_bytes_per_s: f64,
    /// VM WRITE bandwidth / raw UDP GSO bandwidth.
    pub write_ratio_vs_raw_udp_gso: f64,
    /// rping rounds per side.
    pub pings: u64,
    /// One rping round VM ↔ VM, µs.
    pub vm_rping_us: f64,
    /// One rping round peer ↔ peer, µs.
    pub peer_rping_us: f64,
    /// VM round / peer round (latency: lower is better).
    pub rping_latency_ratio: f64,
}

/// Runs a server VM on `ha` and a client VM on `hb` with `mode`; the client's result line.
fn vm_pair(
    ha: &Arc<VrdmaHost>,
    hb: &Arc<VrdmaHost>,
    ip: impl Fn(u8, u8) -> Ipv4Addr,
    (mode, messages, size): (u32, u64, u32),
    signals: &Arc<SignalState>,
) -> anyhow::Result<String> {
    let spec = |workload, local: Ipv4Addr, peer: Ipv4Addr, messages| VmSpec {
        workload,
        rdma: RdmaArgs {
            local_gid: local.into(),
            peer_gid: peer.into(),
            service_port: DEFAULT_PORT as u32,
            msg_size: size,
            mode,
            messages,
            ..Default::default()
        },
        delay: Duration::ZERO,
        expect: 0,
        timeout: None,
    };
    let server = spec(Workload::RdmaServer, ip(9, 1), Ipv4Addr::UNSPECIFIED, 1);
    let client = spec(Workload::RdmaClient, ip(9, 2), ip(9, 1), messages);
    let (ha2, sig2) = (ha.clone(), signals.clone());
    let server_thread = std::thread::spawn(move || {
        run_vms(
            &ha2,
            &[server],
            64 << 20,
            Duration::from_secs(300),
            "off",
            &sig2,
        )
    });
    // The client retries its REQ until the server VM listens.
    let c = run_vms(
        hb,
        &[client],
        64 << 20,
        Duration::from_secs(300),
        "off",
        signals,
    )?;
    let s = server_thread
        .join()
        .map_err(|_| anyhow::anyhow!("server thread panicked"))??;
    let (c, s) = (&c[0], &s[0]);
    anyhow::ensure!(
        s.status == Some(0),
        "server VM ended {} (status {:?}): {:?}",
        s.outcome,
        s.status,
        s.console_tail
    );
    c.result
        .clone()
        .filter(|_| c.status == Some(0))
        .with_context(|| {
            format!(
                "client VM ended {} (status {:?}) without a result: {:?}",
                c.outcome, c.status, c.console_tail
            )
        })
}

/// One rping round between two bare-metal peers, µs (best of the run's mean).
fn peer_rping(block: u8, pings: u64) -> anyhow::Result<f64> {
    let (x, y) = (
        Ipv4Addr::new(127, block, 10, 1),
        Ipv4Addr::new(127, block, 10, 2),
    );
    let px = Peer::start(PortConfig::new(x), CmConfig::default())?;
    let py = Arc::new(Peer::start(PortConfig::new(y), CmConfig::default())?);
    let wait = Duration::from_secs(20);
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let server = {
        let py = py.clone();
        std::thread::spawn(move || {
            py.tool_server(
                DEFAULT_PORT,
                Tool::Rping,
                pings,
                PING_SIZE as usize,
                wait,
                || {
                    let _ = ready_tx.send(());
                },
            )
        })
    };
    ready_rx
        .recv_timeout(wait)
        .context("the rping peer did not listen")?;
    let r = px.tool_client(
        gid_v4(y),
        DEFAULT_PORT,
        Tool::Rping,
        pings,
        PING_SIZE as usize,
        wait,
    );
    let s = server
        .join()
        .map_err(|_| anyhow::anyhow!("rping peer thread panicked"))?;
    px.shutdown();
    py.shutdown();
    let r = r.context("rping client peer")?;
    s.context("rping server peer")?;
    anyhow::ensure!(
        r.verified == pings,
        "{} of {pings} pings verified",
        r.verified
    );
    Ok(r.data_us as f64 / pings as f64)
}

/// Measures the RC rows in the block 127.`block`.8–10.*.
pub fn measure(
    block: u8,
    writes: u64,
    pings: u64,
    signals: &Arc<SignalState>,
) -> anyhow::Result<RcRows> {
    let ip = |c: u8, d: u8| Ipv4Addr::new(127, block, c, d);
    let ha = VrdmaHost::start(ip(8, 1), None)?;
    let hb = VrdmaHost::start(ip(8, 2), None)?;
    let bw = vm_pair(
        &ha,
        &hb,
        ip,
        (rdma_mode::WRITE_BW, writes, WRITE_SIZE),
        signals,
    )
    .context("RC WRITE bandwidth VM<->VM")?;
    let rp = vm_pair(&ha, &hb, ip, (rdma_mode::RPING, pings, PING_SIZE), signals)
        .context("rping VM<->VM")?;
    ha.shutdown();
    hb.shutdown();
    let per_s = |line: &str| -> anyhow::Result<f64> {
        let bytes = field(line, "bytes").context("bytes")?;
        let us = field(line, "data_us").context("data_us")?;
        Ok(bytes * 1e6 / us.max(1.0))
    };
    // write-bw's result counts the bytes written once.
    let vm_write = per_s(&bw)?;
    let vm_rping = field(&rp, "data_us").context("data_us")? / pings as f64;
    let raw_bytes = (writes * WRITE_SIZE as u64) as usize;
    let raw = super::rc::raw_udp_bandwidth(block, raw_bytes, false).context("raw UDP bandwidth")?;
    let raw_gso = super::rc::raw_udp_bandwidth(block, raw_bytes, true)
        .context("raw UDP bandwidth in GSO runs")?;
    let peer = peer_rping(block, pings).context("rping peer<->peer")?;
    Ok(RcRows {
        writes,
        vm_write_bytes_per_s: vm_write,
        raw_udp_bytes_per_s: raw,
        write_ratio_vs_raw_udp: vm_write / raw.max(1e-9),
        raw_udp_gso_bytes_per_s: raw_gso,
        write_ratio_vs_raw_udp_gso: vm_write / raw_gso.max(1e-9),
        pings,
        vm_rping_us: vm_rping,
        peer_rping_us: peer,
        rping_latency_ratio: vm_rping / peer.max(1e-9),
    })
}

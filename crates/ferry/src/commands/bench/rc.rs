//! The RC rows of `ferry bench rdma`: RC SEND round trips (latency against UD's), and RDMA
//! WRITE bandwidth with 64 KiB messages against raw UDP moving the same messages in 4 KiB
//! datagrams with the same window, on loopback (one datagram per send, and in GSO runs).
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use rdma::addr::gid_v4;
use rdma::port::{PortConfig, SoftPort};
use rdma::rc::{
    Access, MonotonicClock, MrTable, RcAttrs, RcQp, SendOp, SendWr, WcOpcode, WcStatus,
};

/// Message size of the bandwidth rows.
pub const BW_MESSAGE: usize = 64 << 10;
/// Datagram (MTU) size of the bandwidth rows.
const BW_MTU: usize = 4096;
/// Messages in flight in the bandwidth rows.
const WINDOW: usize = 8;
/// Message size of the round trips.
const RT_MESSAGE: usize = 64;

struct RcPair {
    ports: [SoftPort; 2],
    qps: [Arc<RcQp>; 2],
    mrs: [Arc<MrTable>; 2],
}

impl RcPair {
    fn new(block: u8, c: u8) -> anyhow::Result<RcPair> {
        let ip = |d| Ipv4Addr::new(127, block, c, d);
        let ports = [
            SoftPort::bind(PortConfig::new(ip(1)))?,
            SoftPort::bind(PortConfig::new(ip(2)))?,
        ];
        let clock = Arc::new(MonotonicClock::default());
        let mrs = [Arc::new(MrTable::new(4)), Arc::new(MrTable::new(4))];
        let qps = [
            ports[0].create_rc_qp(gid_v4(ip(1)), mrs[0].clone(), clock.clone()),
            ports[1].create_rc_qp(gid_v4(ip(2)), mrs[1].clone(), clock),
        ];
        for (i, q) in qps.iter().enumerate() {
            let other = &qps[1 - i];
            let attrs = RcAttrs {
                path_mtu: BW_MTU,
                dest_qpn: other.qpn_value(),
                sq_psn: 1000 * i as u32,
                rq_psn: 1000 * (1 - i) as u32,
                timeout_us: 100_000,
                ..RcAttrs::default()
            };
            q.connect(gid_v4(ip(2 - i as u8)), attrs, true, true)
                .map_err(|e| anyhow::anyhow!("connecting RC QPs: {e}"))?;
        }
        Ok(RcPair { ports, qps, mrs })
    }

    fn close(self) {
        for q in &self.qps {
            q.shutdown();
        }
        for p in &self.ports {
            p.shutdown();
        }
    }
}

fn ok(wc: Option<rdma::rc::Completion>, what: &str) -> anyhow::Result<rdma::rc::Completion> {
    let wc = wc.with_context(|| format!("no completion for {what}"))?;
    anyhow::ensure!(wc.status == WcStatus::Success, "{what}: {:?}", wc.status);
    Ok(wc)
}

/// RC SEND round trips of 64 bytes per second (one outstanding), echoed by a thread.
pub fn rc_round_trips(block: u8, messages: usize) -> anyhow::Result<f64> {
    let pair = RcPair::new(block, 5)?;
    let wait = Duration::from_secs(5);
    let stop = Arc::new(AtomicBool::new(false));
    let (st, qy) = (stop.clone(), pair.qps[1].clone());
    for i in 0..32 {
        qy.post_recv(i, 4096).ok();
        pair.qps[0].post_recv(i, 4096).ok();
    }
    let echo = std::thread::spawn(move || {
        while !st.load(Ordering::Relaxed) {
            let Some(wc) = qy.wait(Duration::from_millis(50)) else {
                continue;
            };
            if wc.opcode == WcOpcode::Recv {
                let _ = qy.post_send(SendWr {
                    wr_id: wc.wr_id,
                    op: SendOp::Send {
                        data: wc.data,
                        imm: None,
                    },
                });
                let _ = qy.post_recv(wc.wr_id, 4096);
            }
        }
    });
    let qx = &pair.qps[0];
    let msg = vec![0x5a; RT_MESSAGE];
    let t = Instant::now();
    for i in 0..messages as u64 {
        qx.post_send(SendWr {
            wr_id: i,
            op: SendOp::Send {
                data: msg.clone(),
                imm: None,
            },
        })
        .map_err(|e| anyhow::anyhow!("{e}"))?;
        let mut got = false;
        while !got {
            let wc = ok(qx.wait(wait), "an RC round trip")?;
            if wc.opcode == WcOpcode::Recv {
                got = true;
                qx.post_recv(wc.wr_id, 4096)
                    .map_err(|e| anyhow::anyhow!("{e}"))?;
            }
        }
    }
    let el = t.elapsed();
    stop.store(true, Ordering::Relaxed);
    let _ = echo.join();
    pair.close();
    Ok(messages as f64 / el.as_secs_f64())
}

/// RDMA WRITE bytes per second with 64 KiB messages, `WINDOW` in flight.
pub fn rc_write_bandwidth(block: u8, bytes: usize) -> anyhow::Result<f64> {
    let pair = RcPair::new(block, 6)?;
    let region = pair.mrs[1]
        .register(0x1_0000_0000, WINDOW * BW_MESSAGE, Access::ALL)
        .context("registering the target region")?;
    let qx = &pair.qps[0];
    let n = bytes.div_ceil(BW_MESSAGE).max(WINDOW);
    let data = vec![0xa5u8; BW_MESSAGE];
    let wait = Duration::from_secs(5);
    let post = |i: usize| {
        qx.post_send(SendWr {
            wr_id: i as u64,
            op: SendOp::Write {
                data: data.clone(),
                remote_addr: region.iova() + ((i % WINDOW) * BW_MESSAGE) as u64,
                rkey: region.key(),
                imm: None,
            },
        })
        .map_err(|e| anyhow::anyhow!("{e}"))
    };
    let t = Instant::now();
    for i in 0..WINDOW {
        post(i)?;
    }
    for i in WINDOW..n + WINDOW {
        ok(qx.wait(wait), "an RDMA WRITE")?;
        if i < n {
            post(i)?;
        }
    }
    let el = t.elapsed();
    let s = qx.stats();
    tracing::info!(
        packets = s.tx_packets,
        retransmits = s.tx_retransmits,
        timeouts = s.timeouts,
        "RC WRITE bandwidth run"
    );
    pair.close();
    Ok((n * BW_MESSAGE) as f64 / el.as_secs_f64())
}

/// The same messages as 4 KiB UDP datagrams: the receiver acknowledges each whole message
/// with a small datagram, the sender keeps `WINDOW` messages in flight; a message whose
/// acknowledgement does not come within a second counts as lost. With `gso` the datagrams
/// leave as the port sends its runs (as many 4 KiB datagrams per `sendmsg` as UDP GSO allows)
/// and arrive coalesced (UDP GRO): plain UDP with the same kernel help RC gets, the stronger
/// baseline.
pub fn raw_udp_bandwidth(block: u8, bytes: usize, gso: bool) -> anyhow::Result<f64> {
    let (x, y) = (
        Ipv4Addr::new(127, block, 7, 1),
        Ipv4Addr::new(127, block, 7, 2),
    );
    // The port's own socket set-up (buffers, DF), without RoCE.
    let s = rdma::port::bind_rocev2_socket(x, 0)?;
    let r = rdma::port::bind_rocev2_socket(y, 0)?;
    if gso && !rdma::port::enable_gro(&r) {
        anyhow::bail!("the kernel refused UDP_GRO");
    }
    let to = match r.local_addr()? {
        std::net::SocketAddr::V4(a) => a,
        other => anyhow::bail!("receiver bound to {other}"),
    };
    r.set_read_timeout(Some(Duration::from_millis(50)))?;
    s.set_read_timeout(Some(Duration::from_secs(1)))?;
    let stop = Arc::new(AtomicBool::new(false));
    let st = stop.clone();
    let rx = std::thread::spawn(move || {
        let mut buf = vec![0u8; 65536];
        // Bytes received, and how many whole messages they made so far.
        let (mut bytes, mut messages) = (0usize, 0usize);
        while !st.load(Ordering::Relaxed) {
            let Ok(got) = rdma::port::recv_datagrams(&r, &mut buf) else {
                continue;
            };
            bytes += got.len;
            while bytes / BW_MESSAGE > messages {
                messages += 1;
                if let Some(from) = got.from {
                    let _ = r.send_to(&[1], from);
                }
            }
        }
    });
    let n = bytes.div_ceil(BW_MESSAGE).max(WINDOW);
    let message = vec![0xa5u8; BW_MESSAGE];
    // Datagrams per GSO send: whole 4 KiB datagrams under the IPv4 limit.
    let run = (rdma::port::MAX_GSO_BYTES / BW_MTU) * BW_MTU;
    let send_msg = || -> std::io::Result<()> {
        if gso {
            for part in message.chunks(run) {
                rdma::port::send_segments(&s, part, BW_MTU as u16, to)?;
            }
        } else {
            for dgram in message.chunks(BW_MTU) {
                s.send_to(dgram, to)?;
            }
        }
        Ok(())
    };
    let mut ack = [0u8; 16];
    let t = Instant::now();
    let mut acked = 0usize;
    for _ in 0..WINDOW {
        send_msg()?;
    }
    for i in WINDOW..n + WINDOW {
        if s.recv_from(&mut ack).is_ok() {
            acked += 1;
        }
        if i < n {
            send_msg()?;
        }
    }
    let el = t.elapsed();
    stop.store(true, Ordering::Relaxed);
    let _ = rx.join();
    Ok((acked * BW_MESSAGE) as f64 / el.as_secs_f64())
}

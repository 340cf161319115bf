//! rdma-core's RC test tools' wire protocols, so Ferry's peer talks to Linux's `rping` and
//! `ucmatose` (librdmacm/examples) as client or server.
//!
//! - **rping**: the client SENDs a `struct rping_rdma_info` {buf: be64, rkey: be32, size: be32}
//!   naming its source buffer (filled with `"rdma-ping-N: "` and a letter cycle); the server
//!   RDMA READs it, SENDs a 16-byte go-ahead; the client SENDs the info of its sink buffer; the
//!   server RDMA WRITEs what it read (up to and including the first NUL) there and SENDs a
//!   go-ahead; the client compares source and sink (`-V`). The server ends when the client
//!   disconnects.
//! - **ucmatose**: the server SENDs `count` messages of `size` bytes; the client receives
//!   them all (into one buffer), then SENDs `count` copies of that buffer back; the server
//!   disconnects.
//!
//! Everything the other side sends is checked: sizes, rkeys and lengths are bounded by our
//! regions, and data is verified against the pattern the tool must produce.
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::rc::{Completion, MemoryRegion, RcQp, SendOp, SendWr, WcOpcode, WcStatus};
use crate::RdmaError;

/// Which Linux tool's protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Tool {
    /// rping: rping_rdma_info SENDs, RDMA READ and WRITE, verified.
    Rping,
    /// ucmatose: SENDs one way, then back.
    Ucmatose,
}

/// Size of `struct rping_rdma_info`.
pub const RPING_INFO_LEN: usize = 16;
/// rping's default message size (`-S`).
pub const RPING_DEFAULT_SIZE: usize = 64;
/// ucmatose's message size (`-S`, default 100).
pub const UCMATOSE_DEFAULT_SIZE: usize = 100;
/// Receives kept posted on a tool QP (ucmatose sends 10 messages by default).
pub const TOOL_RECVS: u64 = 64;

/// What a tool session did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ToolStats {
    /// Messages (pings) verified.
    pub verified: u64,
    /// Payload bytes moved.
    pub bytes: u64,
    /// Message phase, µs.
    pub data_us: u64,
}

fn err(what: impl Into<String>) -> RdmaError {
    RdmaError::Cm(what.into())
}

/// `struct rping_rdma_info` as it goes on the wire (big endian).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RpingInfo {
    /// Buffer address.
    pub buf: u64,
    /// Its rkey.
    pub rkey: u32,
    /// Its size.
    pub size: u32,
}

impl RpingInfo {
    /// The 16 bytes.
    pub fn to_bytes(self) -> Vec<u8> {
        let mut v = Vec::with_capacity(RPING_INFO_LEN);
        v.extend_from_slice(&self.buf.to_be_bytes());
        v.extend_from_slice(&self.rkey.to_be_bytes());
        v.extend_from_slice(&self.size.to_be_bytes());
        v
    }

    /// Parses exactly 16 bytes (rping refuses any other length: "Received bogus data").
    pub fn parse(b: &[u8]) -> Option<RpingInfo> {
        if b.len() != RPING_INFO_LEN {
            return None;
        }
        Some(RpingInfo {
            buf: u64::from_be_bytes(b[..8].try_into().ok()?),
            rkey: u32::from_be_bytes(b[8..12].try_into().ok()?),
            size: u32::from_be_bytes(b[12..16].try_into().ok()?),
        })
    }

    fn of(mr: &MemoryRegion, size: usize) -> RpingInfo {
        RpingInfo {
            buf: mr.iova(),
            rkey: mr.key(),
            size: size as u32,
        }
    }
}

/// The buffer rping's client fills for ping `ping` (0-based) of `size` bytes:
/// `snprintf("rdma-ping-%d: ")`, then letters from `'A' + ping % 58` cycling through
/// 65..=122, and a NUL in the last byte.
pub fn rping_pattern(ping: u64, size: usize) -> Vec<u8> {
    let mut v = vec![0u8; size];
    if size == 0 {
        return v;
    }
    let prefix = format!("rdma-ping-{}: ", ping as i32);
    let cc = prefix.len();
    let n = cc.min(size - 1);
    v[..n].copy_from_slice(&prefix.as_bytes()[..n]);
    let mut c = 65 + (ping % 58) as u8;
    for b in v.iter_mut().skip(cc) {
        *b = c;
        c = if c >= 122 { 65 } else { c + 1 };
    }
    v[size - 1] = 0;
    v
}

/// Waits for completions until `want` accepts one (it returns `Some`); other successful
/// completions go to `other`. Fails on an error completion, on `stop()` (checked every 50 ms)
/// or after `wait`.
fn wait_for<T>(
    qp: &RcQp,
    wait: Duration,
    what: &str,
    stop: &mut dyn FnMut() -> bool,
    mut want: impl FnMut(&Completion) -> Option<T>,
) -> Result<Result<T, Stopped>, RdmaError> {
    let end = Instant::now() + wait;
    loop {
        let left = end.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(err(format!("no completion for {what} within {wait:?}")));
        }
        let Some(wc) = qp.wait(left.min(Duration::from_millis(50))) else {
            if stop() {
                return Ok(Err(Stopped));
            }
            continue;
        };
        if wc.status != WcStatus::Success {
            return Err(err(format!(
                "{what}: {:?} completed with {:?}",
                wc.opcode, wc.status
            )));
        }
        if let Some(v) = want(&wc) {
            return Ok(Ok(v));
        }
    }
}

/// The other side ended the session (disconnected) while we waited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stopped;

fn post(qp: &RcQp, wr_id: u64, op: SendOp) -> Result<(), RdmaError> {
    qp.post_send(SendWr { wr_id, op })
        .map_err(|e| err(format!("posting: {e}")))
}

fn repost(qp: &RcQp, wc: &Completion, max: usize) -> Result<(), RdmaError> {
    qp.post_recv(wc.wr_id, max)
        .map_err(|e| err(format!("posting a receive: {e}")))
}

/// Posts the receives a tool QP keeps (before the connection is accepted or used).
pub fn post_recvs(qp: &RcQp, max: usize) -> Result<(), RdmaError> {
    (0..TOOL_RECVS).try_for_each(|i| {
        qp.post_recv(i, max)
            .map_err(|e| err(format!("posting a receive: {e}")))
    })
}

/// A received rping message: 16 bytes, else an error.
fn rping_recv(
    qp: &RcQp,
    wait: Duration,
    what: &str,
    stop: &mut dyn FnMut() -> bool,
) -> Result<Result<Vec<u8>, Stopped>, RdmaError> {
    let r = wait_for(qp, wait, what, stop, |wc| {
        (wc.opcode == WcOpcode::Recv).then(|| wc.clone())
    })?;
    let Ok(wc) = r else { return Ok(Err(Stopped)) };
    repost(qp, &wc, RPING_INFO_LEN.max(64))?;
    if wc.data.len() != RPING_INFO_LEN {
        return Err(err(format!(
            "{what}: {} bytes, rping sends {RPING_INFO_LEN}",
            wc.data.len()
        )));
    }
    Ok(Ok(wc.data))
}

/// The client side of rping (`rping -c -V`): `count` pings of `size` bytes from `source`
/// (readable remotely) into `sink` (writable remotely), each compared.
pub fn rping_client(
    qp: &RcQp,
    source: &MemoryRegion,
    sink: &MemoryRegion,
    count: u64,
    size: usize,
    wait: Duration,
) -> Result<ToolStats, RdmaError> {
    let size = size.clamp(1, source.len().min(sink.len()));
    let mut never = || false;
    let t = Instant::now();
    let mut st = ToolStats::default();
    for ping in 0..count {
        let data = rping_pattern(ping, size);
        if !source.write(source.iova(), &data) || !sink.write(sink.iova(), &vec![0u8; size]) {
            return Err(err("the session buffers are too small"));
        }
        post(
            qp,
            2 * ping,
            SendOp::Send {
                data: RpingInfo::of(source, size).to_bytes(),
                imm: None,
            },
        )?;
        let _ = rping_recv(qp, wait, "the server's READ go-ahead", &mut never)?;
        post(
            qp,
            2 * ping + 1,
            SendOp::Send {
                data: RpingInfo::of(sink, size).to_bytes(),
                imm: None,
            },
        )?;
        let _ = rping_recv(qp, wait, "the server's WRITE go-ahead", &mut never)?;
        if sink.read(sink.iova(), size).as_deref() != Some(&data[..]) {
            return Err(err(format!(
                "ping {ping}: the server wrote other bytes than it read"
            )));
        }
        st.verified += 1;
        st.bytes += 2 * size as u64;
    }
    // The pings are done (the last one verified); the time is theirs. The grace period
    // below only lets the last SENDs' acknowledgements arrive before the caller
    // disconnects: counting it added 200 ms to every run (1 ms per ping of 200).
    st.data_us = t.elapsed().as_micros() as u64;
    let _ = wait_for(
        qp,
        Duration::from_millis(200),
        "",
        &mut never,
        |_| None::<()>,
    );
    Ok(st)
}

/// The server side of rping (`rping -s`): per ping, READ the client's source buffer into
/// `buf` and verify it is ping N's pattern, go-ahead, WRITE it into the client's sink,
/// go-ahead; until `disconnected()` says the client left.
pub fn rping_server(
    qp: &RcQp,
    buf: &MemoryRegion,
    wait: Duration,
    disconnected: &mut dyn FnMut() -> bool,
) -> Result<ToolStats, RdmaError> {
    let mut never = || false;
    let t = Instant::now();
    let mut st = ToolStats::default();
    let go_ahead = || SendOp::Send {
        data: vec![0u8; RPING_INFO_LEN],
        imm: None,
    };
    for ping in 0u64.. {
        let info = match rping_recv(qp, wait, "the client's source buffer", disconnected)? {
            Ok(b) => RpingInfo::parse(&b).ok_or_else(|| err("rping info"))?,
            Err(Stopped) => break,
        };
        let len = info.size as usize;
        if len == 0 || len > buf.len() {
            return Err(err(format!(
                "ping {ping}: the client advertises {len} bytes, our buffer has {}",
                buf.len()
            )));
        }
        post(
            qp,
            ping,
            SendOp::Read {
                len: info.size,
                remote_addr: info.buf,
                rkey: info.rkey,
                lkey: buf.key(),
                local_addr: buf.iova(),
            },
        )?;
        wait_for(qp, wait, "the RDMA READ", &mut never, |wc| {
            (wc.opcode == WcOpcode::RdmaRead).then_some(())
        })?
        .map_err(|_| err("stopped"))?;
        let data = buf
            .read(buf.iova(), len)
            .ok_or_else(|| err("the READ's bytes"))?;
        if data != rping_pattern(ping, len) {
            return Err(err(format!(
                "ping {ping}: the client's buffer is not rping's pattern: {:?}",
                String::from_utf8_lossy(&data[..len.min(40)])
            )));
        }
        post(qp, ping, go_ahead())?;
        let sink = match rping_recv(qp, wait, "the client's sink buffer", &mut never)? {
            Ok(b) => RpingInfo::parse(&b).ok_or_else(|| err("rping info"))?,
            Err(Stopped) => break,
        };
        // rping writes strlen + 1 bytes.
        let n = data.iter().position(|&b| b == 0).map_or(len, |p| p + 1);
        if n > sink.size as usize {
            return Err(err(format!(
                "ping {ping}: the sink has {} bytes, the message {n}",
                sink.size
            )));
        }
        post(
            qp,
            ping,
            SendOp::Write {
                data: data[..n].to_vec(),
                remote_addr: sink.buf,
                rkey: sink.rkey,
                imm: None,
            },
        )?;
        wait_for(qp, wait, "the RDMA WRITE", &mut never, |wc| {
            (wc.opcode == WcOpcode::RdmaWrite).then_some(())
        })?
        .map_err(|_| err("stopped"))?;
        post(qp, ping, go_ahead())?;
        st.verified += 1;
        st.bytes += (len + n) as u64;
    }
    st.data_us = t.elapsed().as_micros() as u64;
    Ok(st)
}

/// The payload of ucmatose message `i` from Ferry (ucmatose itself sends an uninitialised
/// buffer; ours is a pattern so the echo can be checked).
fn ucmatose_message(i: u64, size: usize) -> Vec<u8> {
    (0..size)
        .map(|k| (i as usize).wrapping_mul(7).wrapping_add(k) as u8 ^ 0x5a)
        .collect()
}

/// Waits for `count` SENDs of exactly `size` bytes and returns them.
fn recv_messages(
    qp: &RcQp,
    count: u64,
    size: usize,
    wait: Duration,
) -> Result<Vec<Vec<u8>>, RdmaError> {
    let mut never = || false;
    let mut got = Vec::new();
    while (got.len() as u64) < count {
        let wc = wait_for(qp, wait, "a ucmatose message", &mut never, |wc| {
            (wc.opcode == WcOpcode::Recv).then(|| wc.clone())
        })?
        .map_err(|_| err("stopped"))?;
        repost(qp, &wc, size)?;
        if wc.data.len() != size {
            return Err(err(format!(
                "message {}: {} bytes, expected {size}",
                got.len(),
                wc.data.len()
            )));
        }
        got.push(wc.data);
    }
    Ok(got)
}

/// Posts `msgs` as SENDs and waits until every one completed (acknowledged).
fn send_all(qp: &RcQp, msgs: &[Vec<u8>], wait: Duration) -> Result<(), RdmaError> {
    let mut never = || false;
    for (i, m) in msgs.iter().enumerate() {
        post(
            qp,
            i as u64,
            SendOp::Send {
                data: m.clone(),
                imm: None,
            },
        )?;
    }
    let mut done = 0;
    while done < msgs.len() {
        wait_for(qp, wait, "a SEND completion", &mut never, |wc| {
            (wc.opcode == WcOpcode::Send).then_some(())
        })?
        .map_err(|_| err("stopped"))?;
        done += 1;
    }
    Ok(())
}

/// The server side of ucmatose: `count` messages of `size` bytes out, then `count` back;
/// ucmatose's client answers with its receive buffer, which holds our last message.
pub fn ucmatose_server(
    qp: &RcQp,
    count: u64,
    size: usize,
    wait: Duration,
) -> Result<ToolStats, RdmaError> {
    let t = Instant::now();
    let msgs: Vec<Vec<u8>> = (0..count).map(|i| ucmatose_message(i, size)).collect();
    send_all(qp, &msgs, wait)?;
    let back = recv_messages(qp, count, size, wait)?;
    let last = msgs.last().cloned().unwrap_or_default();
    if let Some(i) = back.iter().position(|m| *m != last) {
        return Err(err(format!(
            "reply {i} is not the last message sent (ucmatose echoes its receive buffer)"
        )));
    }
    Ok(ToolStats {
        verified: count,
        bytes: 2 * count * size as u64,
        data_us: t.elapsed().as_micros() as u64,
    })
}

/// The client side of ucmatose: `count` messages of exactly `size` bytes in (ucmatose's
/// server sends one unwritten buffer, so only sizes and count can be checked), then `count`
/// copies of the last one back, as ucmatose's client sends its receive buffer.
pub fn ucmatose_client(
    qp: &RcQp,
    count: u64,
    size: usize,
    wait: Duration,
) -> Result<ToolStats, RdmaError> {
    let t = Instant::now();
    let got = recv_messages(qp, count, size, wait)?;
    let last = got.last().cloned().unwrap_or_default();
    send_all(qp, &vec![last; count as usize], wait)?;
    Ok(ToolStats {
        verified: count,
        bytes: 2 * count * size as u64,
        data_us: t.elapsed().as_micros() as u64,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rping_pattern_matches_rping_c() {
        let p = rping_pattern(0, 64);
        assert_eq!(&p[..14], b"rdma-ping-0: A");
        assert_eq!(p[14], b'B');
        assert_eq!(p[63], 0);
        let p = rping_pattern(1, 64);
        assert_eq!(&p[..14], b"rdma-ping-1: B");
        // The letters wrap from 'z' (122) to 'A'.
        let p = rping_pattern(57, 64);
        assert_eq!(&p[..16], b"rdma-ping-57: zA");
        let p = rping_pattern(58, 64);
        assert_eq!(p[14], b'A');
        // Smaller than the prefix: truncated like snprintf, NUL last.
        let p = rping_pattern(3, 8);
        assert_eq!(&p, b"rdma-pi\0");
    }

    #[test]
    fn rping_info_round_trip_and_length() {
        let i = RpingInfo {
            buf: 0x7f00_0000_1000,
            rkey: 0x1234,
            size: 64,
        };
        assert_eq!(RpingInfo::parse(&i.to_bytes()), Some(i));
        assert_eq!(RpingInfo::parse(&[0u8; 15]), None);
        assert_eq!(RpingInfo::parse(&[0u8; 17]), None);
    }
}

//! What the Ferry↔Linux interoperability tests share: the capture checks (tshark clean, every
//! RoCE frame's ICRC verified over its real headers) and a Ferry process run inside a
//! [`LinuxGuest`]'s namespace whose stdout lines are watched.
//!
//! Include it after `linux_guest`: `#[path = "common/interop.rs"] mod interop;`.
#![allow(dead_code)]

use std::{
    io::{BufRead, BufReader},
    net::Ipv4Addr,
    path::Path,
    process::{Child, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use rdma_wire::icrc;

use crate::linux_guest::{dissect, roce_frames, LinuxGuest};

/// Every RoCEv2 frame in the capture has a valid ICRC over its real headers, tshark finds
/// nothing malformed, and the expected CM messages are there. Returns the BTH opcode and
/// addresses of each RoCE frame.
pub fn check_capture(
    pcap: &Path,
    expect: &[(u16, Ipv4Addr, Ipv4Addr)],
) -> Vec<(u8, Ipv4Addr, Ipv4Addr)> {
    let d = dissect(pcap);
    assert!(
        d.bad.is_empty(),
        "tshark flags frames of {} as malformed or erroneous:\n{}",
        pcap.display(),
        d.bad.join("\n")
    );
    for &(a, src, dst) in expect {
        assert!(
            !d.cm(a, src, dst).is_empty(),
            "no CM message {a:#06x} from {src} to {dst} in the capture; frames:\n{:#?}",
            d.frames
        );
    }
    let frames = roce_frames(pcap);
    assert_eq!(
        frames.len(),
        d.roce().count(),
        "tshark and the pcap reader disagree on the RoCE frames"
    );
    for f in &frames {
        icrc::verify(&f.ip_header, &f.udp_header, &f.payload).unwrap_or_else(|e| {
            panic!(
                "frame {} ({} -> {}): ICRC does not verify: {e}",
                f.number,
                f.src(),
                f.dst()
            )
        });
    }
    frames
        .iter()
        .map(|f| (f.payload.first().copied().unwrap_or(0xff), f.src(), f.dst()))
        .collect()
}

/// Asserts the capture holds a frame with one of `opcodes` (BTH opcodes) from `src` to `dst`.
pub fn assert_opcode(
    frames: &[(u8, Ipv4Addr, Ipv4Addr)],
    opcodes: &[u8],
    what: &str,
    src: Ipv4Addr,
    dst: Ipv4Addr,
) {
    assert!(
        frames
            .iter()
            .any(|&(o, s, d)| opcodes.contains(&o) && s == src && d == dst),
        "no {what} (BTH opcode {opcodes:#04x?}) from {src} to {dst} in the capture: {frames:?}"
    );
}

/// RC BTH opcodes.
pub mod op {
    /// SEND First/Middle/Last/Only (+ immediate).
    pub const SEND: &[u8] = &[0x00, 0x01, 0x02, 0x03, 0x04, 0x05];
    /// RDMA WRITE First/Middle/Last/Only (+ immediate).
    pub const WRITE: &[u8] = &[0x06, 0x07, 0x08, 0x09, 0x0a, 0x0b];
    /// RDMA READ Request.
    pub const READ_REQ: &[u8] = &[0x0c];
    /// RDMA READ Response First/Middle/Last/Only.
    pub const READ_RESP: &[u8] = &[0x0d, 0x0e, 0x0f, 0x10];
    /// Acknowledge.
    pub const ACK: &[u8] = &[0x11];
    /// UD SEND Only (+ immediate).
    pub const UD_SEND: &[u8] = &[0x64, 0x65];
}

/// A `ferry` process in the guest's namespace; killed on drop if still running.
pub struct FerryProc {
    child: Child,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
    what: String,
}

impl FerryProc {
    /// Starts `ferry args…` inside `g`'s namespace with stdout watched.
    pub fn start(g: &LinuxGuest, args: &[&str]) -> FerryProc {
        let mut c = g.netns_command(env!("CARGO_BIN_EXE_ferry"));
        c.args(args)
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let mut child = c.spawn().expect("start ferry in the namespace");
        let out = child.stdout.take().expect("ferry's stdout");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for l in BufReader::new(out).lines() {
                let Ok(l) = l else { break };
                eprintln!("ferry: {l}");
                if tx.send(l).is_err() {
                    break;
                }
            }
        });
        FerryProc {
            child,
            lines,
            seen: Vec::new(),
            what: format!("ferry {}", args.join(" ")),
        }
    }

    /// Waits (bounded) for a stdout line containing `needle`.
    pub fn wait_line(&mut self, needle: &str, limit: Duration) -> String {
        let end = Instant::now() + limit;
        loop {
            let left = end.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) => {
                    self.seen.push(l.clone());
                    if l.contains(needle) {
                        return l;
                    }
                }
                Err(e) => panic!(
                    "{}: no line with {needle:?} within {limit:?} ({e}); output:\n{}",
                    self.what,
                    self.seen.join("\n")
                ),
            }
        }
    }

    /// Waits (bounded) for the process to exit; returns its status code and every stdout line.
    pub fn finish(mut self, limit: Duration) -> (i32, Vec<String>) {
        let end = Instant::now() + limit;
        let status = loop {
            if let Some(s) = self.child.try_wait().expect("wait for ferry") {
                break s;
            }
            assert!(
                Instant::now() < end,
                "{} did not exit within {limit:?}; output:\n{}",
                self.what,
                self.seen.join("\n")
            );
            // The stdout thread ends with the process; collect what it read meanwhile.
            while let Ok(l) = self.lines.recv_timeout(Duration::from_millis(100)) {
                self.seen.push(l);
            }
        };
        while let Ok(l) = self.lines.recv_timeout(Duration::from_secs(5)) {
            self.seen.push(l);
        }
        (status.code().unwrap_or(-1), std::mem::take(&mut self.seen))
    }

    /// The last stdout line parsed as JSON (`--json` reports).
    pub fn json(lines: &[String]) -> serde_json::Value {
        let last = lines.last().map(String::as_str).unwrap_or("");
        serde_json::from_str(last).unwrap_or_else(|e| {
            panic!("ferry's last line is not JSON ({e}):\n{}", lines.join("\n"))
        })
    }
}

impl Drop for FerryProc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

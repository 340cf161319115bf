//! Ferry's bare-metal RC peer (`ferry rdma peer --mode rping|ucmatose`) against Linux's
//! rdma-core tools over rxe in a QEMU guest (docs/linux-interop.md), both directions:
//! `rping -V` (rping_rdma_info SENDs, RDMA READ and WRITE, data verified by both sides) and
//! `ucmatose` (SENDs each way). Ferry runs inside the guest's network namespace on the tap's
//! address; tshark captures the tap, must find nothing malformed, and every RoCE frame's ICRC
//! must verify over its real headers.
//!
//! They need root and the packages `scripts/linux-rdma-guest/setup.sh` installs.

#[path = "common/linux_guest.rs"]
mod linux_guest;

#[path = "common/interop.rs"]
mod interop;

use std::time::{Duration, Instant};

use interop::{assert_opcode, check_capture, op, FerryProc};
use linux_guest::{LinuxGuest, GUEST_IP, HOST_IP};
use rdma_wire::mad::attr;

/// rping's rdma_cm port.
const RPING_PORT: u16 = 7174;
/// ucmatose's rdma_cm port.
const UCMATOSE_PORT: u16 = 7471;
/// Pings / messages per test.
const COUNT: u64 = 5;
const LIMIT: Duration = Duration::from_secs(150);

fn peer_args<'a>(extra: &[&'a str]) -> Vec<&'a str> {
    let mut v = vec![
        "rdma",
        "peer",
        "--addr",
        "10.77.0.1",
        "--json",
        "--timeout",
        "90s",
    ];
    v.extend_from_slice(extra);
    v
}

/// Ferry's JSON report: ok, one RC session of `tool` with `COUNT` verified messages.
fn check_report(lines: &[String], rc: i32, tool: &str) -> serde_json::Value {
    let j = FerryProc::json(lines);
    assert_eq!(rc, 0, "ferry rdma peer failed: {j}");
    assert_eq!(j["ok"], true, "{j}");
    let s = &j["rc"][0];
    assert_eq!(s["tool"], tool, "{j}");
    assert_eq!(s["verified"], COUNT, "{j}");
    assert_eq!(j["port"]["rx_bad_icrc"], 0, "{j}");
    j
}

/// Linux `rping -c -V` against Ferry's peer serving rping's protocol: Ferry READs each ping
/// (checking rping's pattern) and WRITEs it back; rping compares.
#[test]
fn linux_rping_client_against_ferry_peer() {
    let t0 = Instant::now();
    let mut g = LinuxGuest::boot("rping-to-ferry");
    let mut f = FerryProc::start(
        &g,
        &peer_args(&[
            "--mode",
            "rping",
            "--listen",
            "--messages",
            &COUNT.to_string(),
        ]),
    );
    f.wait_line("listening", LIMIT);
    let cap = g.capture("rping-to-ferry");
    let out = g.run_timeout(&format!("rping -c -a {HOST_IP} -C {COUNT} -v -V"), LIMIT);
    assert_eq!(out.rc, 0, "rping client failed:\n{}", out.out);
    for i in 0..COUNT {
        assert!(
            out.out.contains(&format!("ping data: rdma-ping-{i}: ")),
            "rping did not verify ping {i}:\n{}",
            out.out
        );
    }
    let (rc, lines) = f.finish(LIMIT);
    let j = check_report(&lines, rc, "rping");
    let frames = check_capture(
        &cap.stop(),
        &[
            (attr::REQ, GUEST_IP, HOST_IP),
            (attr::REP, HOST_IP, GUEST_IP),
            (attr::RTU, GUEST_IP, HOST_IP),
            (attr::DREQ, GUEST_IP, HOST_IP),
            (attr::DREP, HOST_IP, GUEST_IP),
        ],
    );
    assert_opcode(&frames, op::SEND, "rping_rdma_info SEND", GUEST_IP, HOST_IP);
    assert_opcode(
        &frames,
        op::READ_REQ,
        "RDMA READ request",
        HOST_IP,
        GUEST_IP,
    );
    assert_opcode(
        &frames,
        op::READ_RESP,
        "RDMA READ response",
        GUEST_IP,
        HOST_IP,
    );
    assert_opcode(&frames, op::WRITE, "RDMA WRITE", HOST_IP, GUEST_IP);
    assert_opcode(&frames, op::SEND, "go-ahead SEND", HOST_IP, GUEST_IP);
    eprintln!(
        "rping linux->ferry: {} frames, boot {:?}, test {:?}; ferry: {}",
        frames.len(),
        g.boot_time(),
        t0.elapsed(),
        j["rc"][0]
    );
}

/// Ferry's peer as rping's client against Linux `rping -s`: Linux READs Ferry's source buffer
/// and WRITEs it into Ferry's sink; Ferry compares.
#[test]
fn ferry_peer_rping_client_against_linux_rping_server() {
    let t0 = Instant::now();
    let mut g = LinuxGuest::boot("ferry-to-rping");
    let server = g.spawn(&format!("rping -s -a {GUEST_IP} -v"));
    g.wait_cm_listen(RPING_PORT);
    let cap = g.capture("ferry-to-rping");
    let f = FerryProc::start(
        &g,
        &peer_args(&[
            "--mode",
            "rping",
            "--connect",
            "10.77.0.2",
            "--messages",
            &COUNT.to_string(),
            "--size",
            "64",
        ]),
    );
    let (rc, lines) = f.finish(LIMIT);
    let j = check_report(&lines, rc, "rping");
    let out = g.wait(server, LIMIT);
    assert_eq!(out.rc, 0, "rping server failed:\n{}", out.out);
    for i in 0..COUNT {
        assert!(
            out.out
                .contains(&format!("server ping data: rdma-ping-{i}: ")),
            "the rping server did not read ping {i}:\n{}",
            out.out
        );
    }
    let frames = check_capture(
        &cap.stop(),
        &[
            (attr::REQ, HOST_IP, GUEST_IP),
            (attr::REP, GUEST_IP, HOST_IP),
            (attr::RTU, HOST_IP, GUEST_IP),
            (attr::DREQ, HOST_IP, GUEST_IP),
            (attr::DREP, GUEST_IP, HOST_IP),
        ],
    );
    assert_opcode(
        &frames,
        op::READ_REQ,
        "RDMA READ request",
        GUEST_IP,
        HOST_IP,
    );
    assert_opcode(
        &frames,
        op::READ_RESP,
        "RDMA READ response",
        HOST_IP,
        GUEST_IP,
    );
    assert_opcode(&frames, op::WRITE, "RDMA WRITE", GUEST_IP, HOST_IP);
    eprintln!(
        "rping ferry->linux: {} frames, boot {:?}, test {:?}; ferry: {}",
        frames.len(),
        g.boot_time(),
        t0.elapsed(),
        j["rc"][0]
    );
}

/// Linux `ucmatose -s` (client) against Ferry's peer serving ucmatose's protocol: Ferry sends
/// `COUNT` messages, ucmatose sends its receive buffer back `COUNT` times (Ferry checks it is
/// its last message), Ferry disconnects.
#[test]
fn linux_ucmatose_client_against_ferry_peer() {
    let t0 = Instant::now();
    let mut g = LinuxGuest::boot("ucmatose-to-ferry");
    let n = COUNT.to_string();
    let mut f = FerryProc::start(
        &g,
        &peer_args(&[
            "--mode",
            "ucmatose",
            "--listen",
            "--listen-service",
            "7471",
            "--messages",
            &n,
            "--size",
            "100",
        ]),
    );
    f.wait_line("listening", LIMIT);
    let cap = g.capture("ucmatose-to-ferry");
    let out = g.run_timeout(&format!("ucmatose -s {HOST_IP} -C {COUNT}"), LIMIT);
    assert_eq!(out.rc, 0, "ucmatose client failed:\n{}", out.out);
    assert!(out.out.contains("data transfers complete"), "{}", out.out);
    let (rc, lines) = f.finish(LIMIT);
    let j = check_report(&lines, rc, "ucmatose");
    let frames = check_capture(
        &cap.stop(),
        &[
            (attr::REQ, GUEST_IP, HOST_IP),
            (attr::REP, HOST_IP, GUEST_IP),
            (attr::RTU, GUEST_IP, HOST_IP),
            (attr::DREQ, HOST_IP, GUEST_IP),
            (attr::DREP, GUEST_IP, HOST_IP),
        ],
    );
    assert_opcode(&frames, op::SEND, "SEND", HOST_IP, GUEST_IP);
    assert_opcode(&frames, op::SEND, "SEND", GUEST_IP, HOST_IP);
    assert_opcode(&frames, op::ACK, "ACK", HOST_IP, GUEST_IP);
    eprintln!(
        "ucmatose linux->ferry: {} frames, boot {:?}, test {:?}; ferry: {}",
        frames.len(),
        g.boot_time(),
        t0.elapsed(),
        j["rc"][0]
    );
}

/// Ferry's peer as ucmatose's client against Linux `ucmatose` (server): Linux sends `COUNT`
/// messages, Ferry sends them back, Linux disconnects and Ferry answers.
#[test]
fn ferry_peer_ucmatose_client_against_linux_ucmatose_server() {
    let t0 = Instant::now();
    let mut g = LinuxGuest::boot("ferry-to-ucmatose");
    let server = g.spawn(&format!("ucmatose -b {GUEST_IP} -C {COUNT}"));
    g.wait_cm_listen(UCMATOSE_PORT);
    let cap = g.capture("ferry-to-ucmatose");
    let n = COUNT.to_string();
    let f = FerryProc::start(
        &g,
        &peer_args(&[
            "--mode",
            "ucmatose",
            "--connect",
            "10.77.0.2",
            "--listen-service",
            "7471",
            "--messages",
            &n,
            "--size",
            "100",
        ]),
    );
    let (rc, lines) = f.finish(LIMIT);
    let j = check_report(&lines, rc, "ucmatose");
    let out = g.wait(server, LIMIT);
    assert_eq!(out.rc, 0, "ucmatose server failed:\n{}", out.out);
    assert!(out.out.contains("data transfers complete"), "{}", out.out);
    let frames = check_capture(
        &cap.stop(),
        &[
            (attr::REQ, HOST_IP, GUEST_IP),
            (attr::REP, GUEST_IP, HOST_IP),
            (attr::RTU, HOST_IP, GUEST_IP),
            (attr::DREQ, GUEST_IP, HOST_IP),
            (attr::DREP, HOST_IP, GUEST_IP),
        ],
    );
    assert_opcode(&frames, op::SEND, "SEND", GUEST_IP, HOST_IP);
    assert_opcode(&frames, op::SEND, "SEND", HOST_IP, GUEST_IP);
    eprintln!(
        "ucmatose ferry->linux: {} frames, boot {:?}, test {:?}; ferry: {}",
        frames.len(),
        g.boot_time(),
        t0.elapsed(),
        j["rc"][0]
    );
}

//! The passthrough virtio-net NIC end to end: a network namespace with a tap (created and
//! removed by the test), `ferry device virtio-net` on that tap inside the namespace, a Ferry VM
//! running `net-echo` with the device passed through, and the namespace's side talking to it:
//! the real `ping` (iputils) and UDP datagrams whose echoes are checked byte for byte. Then the
//! VM stops and the device reports what it moved and that no ring error happened.
//!
//! Needs root (namespaces, taps), KVM and `ping` (Debian package iputils-ping).
mod common;

use std::{
    net::{Ipv4Addr, SocketAddr, UdpSocket},
    os::fd::AsRawFd,
    process::{Command, Stdio},
    time::Duration,
};

use common::{wait_for_path, wait_until, Proc, Stream, TempDir, PATIENCE};

const TAP: &str = "fvtap0";
const HOST_IP: Ipv4Addr = Ipv4Addr::new(10, 78, 0, 1);
const GUEST_IP: Ipv4Addr = Ipv4Addr::new(10, 78, 0, 2);
const PORT: u16 = 7777;

fn ferry() -> Command {
    Command::new(env!("CARGO_BIN_EXE_ferry"))
}

fn sh(args: &[&str]) {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| {
            panic!("{args:?}: {e}");
        });
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A network namespace with a tap at [`HOST_IP`]/24, removed on drop.
struct NetNs(String);

impl NetNs {
    fn new(tag: &str) -> NetNs {
        // SAFETY: geteuid has no preconditions and cannot fail.
        let euid = unsafe { libc::geteuid() };
        assert_eq!(
            euid, 0,
            "the virtio-net test needs root (network namespaces, taps)"
        );
        let name = format!("ferry-{tag}-{}", std::process::id());
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        sh(&["ip", "netns", "add", &name]);
        let ns = NetNs(name);
        let ip = |a: &[&str]| {
            let mut v = vec!["ip", "netns", "exec", &ns.0, "ip"];
            v.extend_from_slice(a);
            sh(&v);
        };
        ip(&["link", "set", "lo", "up"]);
        ip(&["tuntap", "add", "dev", TAP, "mode", "tap"]);
        ip(&["addr", "add", &format!("{HOST_IP}/24"), "dev", TAP]);
        ip(&["link", "set", TAP, "up"]);
        ns
    }

    fn command(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.0, program]);
        c
    }

    /// Runs `f` on a thread inside the namespace.
    fn run<R: Send + 'static>(&self, f: impl FnOnce() -> R + Send + 'static) -> R {
        let path = format!("/run/netns/{}", self.0);
        std::thread::spawn(move || {
            let file = std::fs::File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
            // SAFETY: setns on a valid namespace fd only changes this (new, short-lived)
            // thread's network namespace; the fd outlives the call.
            let r = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(r, 0, "setns({path}): {}", std::io::Error::last_os_error());
            f()
        })
        .join()
        .expect("namespace thread")
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).output();
    }
}

/// A datagram of `len` bytes that names its sequence number.
fn datagram(seq: u32, len: usize) -> Vec<u8> {
    let mut d: Vec<u8> = (0..len)
        .map(|i| (i as u32).wrapping_mul(31).wrapping_add(seq) as u8)
        .collect();
    d[..4].copy_from_slice(&seq.to_be_bytes());
    d
}

#[test]
fn ping_and_udp_reach_a_vm_through_the_passthrough_nic() {
    let dir = TempDir::new("virtio-net");
    let ns = NetNs::new("vnet");
    let socket = dir.path("net.sock");

    // The device lives in the namespace, on its tap.
    let mut dev = ns.command(env!("CARGO_BIN_EXE_ferry"));
    dev.args(["device", "virtio-net", "--once", "--tap", TAP, "--socket"])
        .arg(&socket)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut dev = dev.spawn().expect("spawn ferry device virtio-net");
    let dev_err = Stream::collect(dev.stderr.take().expect("stderr"));
    let dev = Proc(Some(dev), None);
    wait_for_path(&socket);

    let console = dir.path("console.log");
    let mut vm = ferry();
    vm.args(["run", "--workload", "net-echo", "--timeout", "300s"])
        .args([
            "--net-ip",
            &GUEST_IP.to_string(),
            "--net-port",
            &PORT.to_string(),
        ])
        .arg("--passthrough")
        .arg(format!("virtio-net={}", socket.display()))
        .arg("--serial")
        .arg(&console)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let vm_proc = Proc(Some(vm.spawn().expect("spawn ferry run")), None);
    wait_until("net-echo says it is ready", PATIENCE, || {
        std::fs::read_to_string(&console).is_ok_and(|c| c.contains("net-echo: ready"))
    });

    // The real ping: ARP first, then ICMP echo.
    let out = ns
        .command("ping")
        .args(["-c", "5", "-i", "0.2", "-W", "10"])
        .arg(GUEST_IP.to_string())
        .output()
        .expect("run ping (Debian package iputils-ping)");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "ping failed:\n{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("5 received"), "{text}");

    // UDP: datagrams of many sizes, up to a full 1500-byte MTU, each echo checked.
    let sizes: Vec<usize> = (0..64)
        .map(|i| [1, 18, 64, 200, 512, 1000, 1400, 1472][i % 8])
        .collect();
    let echoed = ns.run(move || {
        let s = UdpSocket::bind((HOST_IP, 0)).expect("bind in the namespace");
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let to = SocketAddr::from((GUEST_IP, PORT));
        let mut n = 0;
        for (seq, len) in sizes.iter().enumerate() {
            let d = datagram(seq as u32, (*len).max(4));
            s.send_to(&d, to).expect("send");
            let mut buf = [0u8; 2048];
            let (got, from) = s.recv_from(&mut buf).expect("echo within 10 s");
            assert_eq!(from, to, "echo from the guest's port");
            assert_eq!(&buf[..got], &d[..], "echo {seq} ({len} bytes) differs");
            n += 1;
        }
        // A datagram to another port is not echoed (and nothing else comes back).
        s.send_to(b"not for you", (GUEST_IP, PORT + 1)).unwrap();
        s.set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        let mut buf = [0u8; 64];
        assert!(
            s.recv_from(&mut buf).is_err(),
            "a datagram to a closed port was answered"
        );
        n
    });
    assert_eq!(echoed, 64);

    // Stop the VM (SIGTERM) and then the device; the device's statistics show the traffic and
    // no ring, DMA or chain error.
    // SAFETY: kill(2) on our own child's pid.
    unsafe {
        libc::kill(
            vm_proc.0.as_ref().expect("child").id() as i32,
            libc::SIGTERM,
        )
    };
    let out = vm_proc.wait_output(PATIENCE);
    assert_eq!(
        out.status.code(),
        Some(128 + libc::SIGTERM),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // With --once the device exits after the VMM disconnected.
    let err = dev_err.finish(PATIENCE);
    drop(dev);
    let stats = err
        .lines()
        .find_map(|l| l.strip_prefix("ferry device virtio-net: stats "))
        .unwrap_or_else(|| panic!("no statistics:\n{err}"));
    let stats: serde_json::Value = serde_json::from_str(stats).unwrap();
    for zero in [
        "chain_errors",
        "dma_errors",
        "bad_avail_idx",
        "tx_bad_frames",
        "bad_features",
    ] {
        assert_eq!(stats[zero], 0, "{zero}: {stats}");
    }
    // 5 pings + 64 echoes (+ ARP) each way at least.
    assert!(stats["tx_frames"].as_u64() >= Some(69), "{stats}");
    assert!(stats["rx_frames"].as_u64() >= Some(70), "{stats}");
    assert_eq!(stats["driver_ok"], 1, "{stats}");
}

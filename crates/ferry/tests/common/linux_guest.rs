//! A Linux RDMA peer for interoperability tests: a Debian kernel with `rdma_rxe` (SoftRoCE) and
//! rdma-core's tools, booted under QEMU TCG on a tap inside a network namespace the guest
//! creates and removes (`scripts/linux-rdma-guest/`, docs/linux-interop.md).
//!
//! A test boots a [`LinuxGuest`], runs commands in it ([`LinuxGuest::run`],
//! [`LinuxGuest::spawn`]), runs its own processes or sockets in the namespace
//! ([`LinuxGuest::netns_command`], [`LinuxGuest::in_netns`]) where the tap's address
//! ([`HOST_IP`]) reaches the guest ([`GUEST_IP`]), and captures the tap with tshark
//! ([`LinuxGuest::capture`]). Everything waits on what the guest reports (files it writes on the
//! shared 9p directory), bounded by generous timeouts; nothing sleeps for readiness.
//!
//! Include it with `#[path = "common/linux_guest.rs"] mod linux_guest;`.
#![allow(dead_code)]

use std::{
    fs,
    io::{BufRead, BufReader},
    net::Ipv4Addr,
    os::unix::{fs::PermissionsExt, io::AsRawFd, process::CommandExt},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        atomic::{AtomicUsize, Ordering},
        mpsc, OnceLock,
    },
    time::{Duration, Instant},
};

/// The tap's address inside the namespace: a process in the namespace binds here.
pub const HOST_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 1);
/// The guest's eth0 (and so rxe0's RoCEv2 GID `::ffff:10.77.0.2`).
pub const GUEST_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 2);
/// The tap's name inside the namespace.
pub const TAP: &str = "tap0";
/// How long a boot may take before the test fails (a TCG boot takes a few seconds here; CI
/// machines are noisy).
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(300);
/// How long a guest command may take by default.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(120);

const POLL: Duration = Duration::from_millis(20);

/// The repository root (this file lives in crates/ferry/tests/common).
fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn script(name: &str) -> PathBuf {
    repo_root().join("scripts/linux-rdma-guest").join(name)
}

/// Runs `scripts/linux-rdma-guest/setup.sh` once per test process (it installs missing Debian
/// packages and builds the cached guest image). Fails the test with the script's output when
/// that cannot be done: the interop tests never pass without running.
pub fn setup() {
    static DONE: OnceLock<Result<(), String>> = OnceLock::new();
    let r = DONE.get_or_init(|| {
        // SAFETY: geteuid has no preconditions and cannot fail.
        if unsafe { libc::geteuid() } != 0 {
            return Err(
                "the Linux interop tests need root (network namespaces, taps, apt-get)".into(),
            );
        }
        let out = Command::new("bash")
            .arg(script("setup.sh"))
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("cannot run setup.sh: {e}"))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "scripts/linux-rdma-guest/setup.sh failed ({}):\n{}{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    });
    if let Err(e) = r {
        panic!("Linux RDMA guest unavailable: {e}");
    }
}

/// What a guest command left: its exit code and its stdout+stderr.
#[derive(Debug, Clone)]
pub struct GuestOutput {
    pub rc: i32,
    pub out: String,
}

impl GuestOutput {
    /// Fails the test unless the command exited 0.
    pub fn ok(self, what: &str) -> GuestOutput {
        assert_eq!(self.rc, 0, "guest command {what} failed:\n{}", self.out);
        self
    }
}

/// A command started in the background in the guest.
#[derive(Debug, Clone, Copy)]
pub struct GuestJob(usize);

/// A booted guest in its own network namespace. Dropping it powers the guest off and removes
/// the namespace (the runner script's traps also do that if the test process dies).
pub struct LinuxGuest {
    ns: String,
    dir: PathBuf,
    runner: Option<Child>,
    next: usize,
    booted_after: Duration,
}

impl LinuxGuest {
    /// Boots a guest (running [`setup`] first) and waits until it reports rxe0 up. Keep the
    /// guest on the thread that booted it: the runner is told to stop when that thread ends.
    pub fn boot(tag: &str) -> LinuxGuest {
        setup();
        static SEQ: AtomicUsize = AtomicUsize::new(0);
        let n = SEQ.fetch_add(1, Ordering::Relaxed);
        let ns = format!("ferry-rxe-{}-{n}", std::process::id());
        let dir = std::env::temp_dir().join(format!(
            "ferry-linux-guest-{tag}-{}-{n}",
            std::process::id()
        ));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(dir.join("share/out")).expect("create the share");
        fs::create_dir_all(dir.join("share/cmd")).expect("create the share");
        // Captures written by tshark's dumpcap land here too.
        let _ = fs::set_permissions(&dir, fs::Permissions::from_mode(0o777));
        let log = fs::File::create(dir.join("runner.log")).expect("runner log");
        let log2 = log.try_clone().expect("runner log");
        let start = Instant::now();
        let mut cmd = Command::new("bash");
        cmd.arg(script("run.sh"))
            .args(["--name", &ns, "--share"])
            .arg(dir.join("share"))
            .arg("--serial")
            .arg(dir.join("serial.log"))
            .args(["--host-ip", &format!("{HOST_IP}/24")])
            .args(["--guest-ip", &format!("{GUEST_IP}/24")])
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log2));
        // SAFETY: the closure only calls prctl, which is async-signal-safe; it runs in the
        // forked child before exec. PR_SET_PDEATHSIG makes the runner (whose traps remove the
        // namespace and stop QEMU) get SIGTERM if the test thread dies without dropping us.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM as libc::c_ulong) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let runner = cmd.spawn().expect("spawn scripts/linux-rdma-guest/run.sh");
        let mut g = LinuxGuest {
            ns,
            dir,
            runner: Some(runner),
            next: 0,
            booted_after: Duration::ZERO,
        };
        g.wait_file(
            "booted",
            BOOT_TIMEOUT,
            "the guest to boot and bring rxe0 up",
        );
        g.booted_after = start.elapsed();
        g
    }

    /// Wall time from starting QEMU until the guest reported rxe0 up.
    pub fn boot_time(&self) -> Duration {
        self.booted_after
    }

    /// The network namespace the tap and the guest's peer live in.
    pub fn netns(&self) -> &str {
        &self.ns
    }

    /// A directory for the test's own files (removed on drop).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The serial console so far.
    pub fn serial_log(&self) -> String {
        fs::read_to_string(self.dir.join("serial.log")).unwrap_or_default()
    }

    fn share(&self, rel: &str) -> PathBuf {
        self.dir.join("share").join(rel)
    }

    fn diagnostics(&self) -> String {
        let runner = fs::read_to_string(self.dir.join("runner.log")).unwrap_or_default();
        let serial = self.serial_log();
        let tail: Vec<&str> = serial.lines().rev().take(60).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        let failed = fs::read_to_string(self.share("out/boot-failed")).unwrap_or_default();
        format!(
            "{failed}\n--- runner ---\n{runner}\n--- serial console (last lines) ---\n{}",
            tail.join("\n")
        )
    }

    /// Waits until the guest wrote `out/<name>`, failing the test (with the serial console)
    /// when the guest stops or the time runs out.
    fn wait_file(&mut self, name: &str, limit: Duration, what: &str) -> PathBuf {
        let path = self.share(&format!("out/{name}"));
        let deadline = Instant::now() + limit;
        loop {
            if path.exists() {
                return path;
            }
            if self.share("out/boot-failed").exists() {
                panic!("the Linux guest failed to boot: {}", self.diagnostics());
            }
            if let Some(r) = self.runner.as_mut() {
                if let Ok(Some(status)) = r.try_wait() {
                    // The guest may have written the file just before powering off.
                    if path.exists() {
                        return path;
                    }
                    panic!(
                        "the Linux guest stopped ({status}) while waiting for {what}: {}",
                        self.diagnostics()
                    );
                }
            }
            if Instant::now() > deadline {
                panic!(
                    "timed out after {limit:?} waiting for {what}: {}",
                    self.diagnostics()
                );
            }
            std::thread::sleep(POLL);
        }
    }

    fn submit(&mut self, script: &str, background: bool) -> usize {
        let n = self.next;
        self.next += 1;
        let body = if background {
            format!("#bg\n{script}\n")
        } else {
            format!("#fg\n{script}\n")
        };
        let tmp = self.share(&format!("cmd/.{n}.tmp"));
        fs::write(&tmp, body).expect("write a guest command");
        fs::rename(&tmp, self.share(&format!("cmd/{n}.sh"))).expect("publish a guest command");
        n
    }

    fn collect(&mut self, n: usize, limit: Duration, what: &str) -> GuestOutput {
        let rc_path = self.wait_file(&format!("{n}.rc"), limit, what);
        let rc = fs::read_to_string(&rc_path)
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(-1);
        let out = fs::read_to_string(self.share(&format!("out/{n}.out"))).unwrap_or_default();
        GuestOutput { rc, out }
    }

    /// Runs a shell script (busybox sh) in the guest and waits for it to finish.
    pub fn run(&mut self, script: &str) -> GuestOutput {
        self.run_timeout(script, COMMAND_TIMEOUT)
    }

    /// [`LinuxGuest::run`] with a time limit.
    pub fn run_timeout(&mut self, script: &str, limit: Duration) -> GuestOutput {
        let n = self.submit(script, false);
        self.collect(n, limit, &format!("guest command {script:?}"))
    }

    /// Starts a shell script in the background in the guest; the next commands run while it
    /// does.
    pub fn spawn(&mut self, script: &str) -> GuestJob {
        let n = self.submit(script, true);
        self.wait_file(&format!("{n}.pid"), COMMAND_TIMEOUT, "a guest job to start");
        GuestJob(n)
    }

    /// Waits for a background job to finish.
    pub fn wait(&mut self, job: GuestJob, limit: Duration) -> GuestOutput {
        self.collect(job.0, limit, &format!("guest job {}", job.0))
    }

    /// Whether a background job has finished.
    pub fn finished(&self, job: GuestJob) -> bool {
        self.share(&format!("out/{}.rc", job.0)).exists()
    }

    /// The output a background job has written so far.
    pub fn job_output(&self, job: GuestJob) -> String {
        fs::read_to_string(self.share(&format!("out/{}.out", job.0))).unwrap_or_default()
    }

    /// Waits in the guest (bounded) until an rdma_cm ID listens on `port` (`rdma res show
    /// cm_id` shows it in state LISTEN): a server started with [`LinuxGuest::spawn`] is ready.
    pub fn wait_cm_listen(&mut self, port: u16) {
        let script = format!(
            "i=0\nuntil rdma res show cm_id | grep LISTEN | grep -q ':{port} '; do\n  \
             i=$((i + 1)); [ $i -lt 2400 ] || {{ echo 'no rdma_cm listener on port {port}'; \
             rdma res show cm_id; exit 1; }}\n  sleep 0.05\ndone\nrdma res show cm_id\n"
        );
        self.run(&script)
            .ok(&format!("waiting for a listener on port {port}"));
    }

    /// rxe0's hardware counters (`/sys/class/infiniband/rxe0/ports/1/hw_counters`), by name.
    pub fn rxe_counters(&mut self) -> std::collections::BTreeMap<String, u64> {
        let out = self
            .run("cd /sys/class/infiniband/rxe0/ports/1/hw_counters && grep . *")
            .ok("reading rxe0's counters");
        out.out
            .lines()
            .filter_map(|l| {
                let (k, v) = l.split_once(':')?;
                Some((k.to_string(), v.trim().parse().ok()?))
            })
            .collect()
    }

    /// Adds another address (e.g. a second VM's GID) to the tap inside the namespace, in the
    /// guest's /24.
    pub fn add_host_address(&self, ip: Ipv4Addr) {
        let out = Command::new("ip")
            .args([
                "-n",
                &self.ns,
                "addr",
                "add",
                &format!("{ip}/24"),
                "dev",
                TAP,
            ])
            .output()
            .expect("run ip addr add");
        assert!(
            out.status.success(),
            "ip addr add {ip}/24 dev {TAP} in {}: {}",
            self.ns,
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// A command that runs `program` inside the guest's network namespace.
    pub fn netns_command(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.ns, program]);
        c
    }

    /// Runs `f` on a thread that entered the namespace (sockets it creates stay in the
    /// namespace when they are handed back).
    pub fn in_netns<R: Send + 'static>(&self, f: impl FnOnce() -> R + Send + 'static) -> R {
        in_netns(&self.ns, f)
    }

    /// Starts tshark on the tap, writing `<dir>/<name>.pcap`, and returns once it captures.
    pub fn capture(&self, name: &str) -> Capture {
        let path = self.dir.join(format!("{name}.pcap"));
        let mut child = self
            .netns_command("tshark")
            .args(["-i", TAP, "-q", "-F", "pcap", "-w"])
            .arg(&path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn tshark (Debian package tshark; setup.sh installs it)");
        let mut err = BufReader::new(child.stderr.take().expect("tshark stderr"));
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut seen = String::new();
            let mut line = String::new();
            loop {
                line.clear();
                match err.read_line(&mut line) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {
                        seen.push_str(&line);
                        if line.contains("Capturing on") {
                            let _ = tx.send(Ok(()));
                        }
                    }
                }
            }
            let _ = tx.send(Err(seen));
        });
        match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(Ok(())) => {}
            Ok(Err(text)) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("tshark did not start capturing on {TAP}:\n{text}")
            }
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("tshark did not start capturing on {TAP} within 60 s")
            }
        }
        let cap = Capture {
            child: Some(child),
            path,
            ns: self.ns.clone(),
        };
        // tshark says "Capturing on" before dumpcap sees packets: wait until it does.
        mark(&self.ns, &cap.path, Duration::from_secs(60));
        cap
    }

    /// Powers the guest off and waits for QEMU and the runner to exit (the runner removes the
    /// namespace). Returns whether that happened in time.
    fn shutdown(&mut self) -> bool {
        let Some(mut runner) = self.runner.take() else {
            return true;
        };
        if matches!(runner.try_wait(), Ok(None)) {
            let n = self.next;
            self.next += 1;
            let _ = fs::write(self.share(&format!("cmd/{n}.poweroff")), "");
            let deadline = Instant::now() + Duration::from_secs(30);
            while matches!(runner.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(POLL);
            }
        }
        let clean = matches!(runner.try_wait(), Ok(Some(_)));
        if !clean {
            // SAFETY: kill on our own child's pid (not yet reaped, so not reused).
            unsafe { libc::kill(runner.id() as libc::pid_t, libc::SIGTERM) };
            let _ = runner.wait();
        }
        clean
    }
}

impl Drop for LinuxGuest {
    fn drop(&mut self) {
        self.shutdown();
        // Belt and braces: the runner's trap removes the namespace; make sure.
        let _ = Command::new("ip")
            .args(["netns", "del", &self.ns])
            .stderr(Stdio::null())
            .status();
        if std::env::var_os("FERRY_KEEP_LINUX_GUEST_DIR").is_none() {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}

/// Runs `f` on a new thread inside network namespace `ns`.
fn in_netns<R: Send + 'static>(ns: &str, f: impl FnOnce() -> R + Send + 'static) -> R {
    let path = format!("/run/netns/{ns}");
    std::thread::spawn(move || {
        let file = fs::File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
        // SAFETY: setns on a valid namespace fd only changes this (new, short-lived) thread's
        // network namespace; the fd outlives the call.
        let r = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(r, 0, "setns({path}): {}", std::io::Error::last_os_error());
        f()
    })
    .join()
    .expect("the thread in the namespace panicked")
}

/// Sends marker datagrams from the namespace to the guest (port 9; the guest answers with an
/// ICMP port unreachable, which is fine) until a capture file on the tap holds one: then the
/// capture has seen everything sent before. Fails the test after `limit`.
fn mark(ns: &str, pcap: &Path, limit: Duration) {
    static SEQ: AtomicUsize = AtomicUsize::new(0);
    let marker = format!(
        "ferry-capture-marker-{}-{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    );
    let sock = in_netns(ns, || std::net::UdpSocket::bind((HOST_IP, 0)))
        .expect("a UDP socket in the namespace");
    let deadline = Instant::now() + limit;
    let mut sent_at: Option<Instant> = None;
    loop {
        if sent_at.is_none_or(|t| t.elapsed() > Duration::from_millis(500)) {
            let _ = sock.send_to(marker.as_bytes(), (GUEST_IP, 9));
            sent_at = Some(Instant::now());
        }
        let data = fs::read(pcap).unwrap_or_default();
        if data.windows(marker.len()).any(|w| w == marker.as_bytes()) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the capture {} never showed a marker sent on the tap within {limit:?}",
            pcap.display()
        );
        std::thread::sleep(POLL);
    }
}

/// A running tshark capture on the tap.
pub struct Capture {
    child: Option<Child>,
    path: PathBuf,
    ns: String,
}

impl Capture {
    /// Stops the capture and returns the pcap's path. Everything sent on the tap before the
    /// call is in the file: the capture stops (SIGINT, so tshark closes the file) only once the
    /// file holds a marker sent after it.
    pub fn stop(mut self) -> PathBuf {
        mark(&self.ns, &self.path, Duration::from_secs(60));
        if let Some(mut c) = self.child.take() {
            // SAFETY: kill on our own child's pid (not yet reaped, so not reused).
            unsafe { libc::kill(c.id() as libc::pid_t, libc::SIGINT) };
            let deadline = Instant::now() + Duration::from_secs(30);
            while matches!(c.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(POLL);
            }
            let _ = c.kill();
            let _ = c.wait();
        }
        self.path.clone()
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// One frame of a capture as tshark dissects it.
#[derive(Debug, Clone)]
pub struct Frame {
    pub number: u32,
    pub src: String,
    pub dst: String,
    /// The CM attribute ID (`infiniband.mad.attributeid`) when the frame carries a MAD.
    pub mad_attribute: Option<u16>,
    pub protocols: String,
    pub info: String,
}

/// A capture dissected by tshark: every frame, and those tshark calls malformed or flags with
/// an error.
#[derive(Debug)]
pub struct Dissection {
    pub frames: Vec<Frame>,
    pub bad: Vec<String>,
}

impl Dissection {
    /// The RoCEv2 frames (UDP 4791, dissected as InfiniBand).
    pub fn roce(&self) -> impl Iterator<Item = &Frame> {
        self.frames
            .iter()
            .filter(|f| f.protocols.contains("infiniband"))
    }

    /// The frames carrying a CM MAD with this attribute ID, from `src` to `dst`.
    pub fn cm(&self, attribute: u16, src: Ipv4Addr, dst: Ipv4Addr) -> Vec<&Frame> {
        let (s, d) = (src.to_string(), dst.to_string());
        self.frames
            .iter()
            .filter(|f| f.mad_attribute == Some(attribute) && f.src == s && f.dst == d)
            .collect()
    }
}

/// Dissects a pcap with tshark (fails the test when tshark cannot read it).
pub fn dissect(pcap: &Path) -> Dissection {
    let tshark = |args: &[&str]| -> String {
        let out = Command::new("tshark")
            .arg("-r")
            .arg(pcap)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run tshark");
        assert!(
            out.status.success(),
            "tshark -r {} {args:?} failed: {}",
            pcap.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let fields = tshark(&[
        "-T",
        "fields",
        "-E",
        "separator=/t",
        "-e",
        "frame.number",
        "-e",
        "ip.src",
        "-e",
        "ip.dst",
        "-e",
        "infiniband.mad.attributeid",
        "-e",
        "frame.protocols",
        "-e",
        "_ws.col.Info",
    ]);
    let frames = fields
        .lines()
        .filter_map(|l| {
            let c: Vec<&str> = l.split('\t').collect();
            if c.len() < 6 {
                return None;
            }
            Some(Frame {
                number: c[0].parse().ok()?,
                src: c[1].to_string(),
                dst: c[2].to_string(),
                mad_attribute: c[3]
                    .split(',')
                    .next()
                    .and_then(|a| u16::from_str_radix(a.trim_start_matches("0x"), 16).ok()),
                protocols: c[4].to_string(),
                info: c[5].to_string(),
            })
        })
        .collect();
    let bad = tshark(&["-Y", "_ws.malformed || _ws.expert.severity == error"])
        .lines()
        .map(str::to_string)
        .collect();
    Dissection { frames, bad }
}

/// One RoCEv2 frame of a capture: the real IPv4 and UDP headers (what the ICRC covers) and the
/// UDP payload (BTH … ICRC).
#[derive(Debug, Clone)]
pub struct RoceFrame {
    /// 1-based frame number, as tshark counts.
    pub number: u32,
    pub ip_header: Vec<u8>,
    pub udp_header: Vec<u8>,
    pub payload: Vec<u8>,
}

impl RoceFrame {
    pub fn src(&self) -> Ipv4Addr {
        Ipv4Addr::new(
            self.ip_header[12],
            self.ip_header[13],
            self.ip_header[14],
            self.ip_header[15],
        )
    }

    pub fn dst(&self) -> Ipv4Addr {
        Ipv4Addr::new(
            self.ip_header[16],
            self.ip_header[17],
            self.ip_header[18],
            self.ip_header[19],
        )
    }
}

/// The IPv4 RoCEv2 frames (UDP destination port 4791) of a classic pcap file with Ethernet
/// framing (what [`LinuxGuest::capture`] writes). Frames too short for their headers are
/// skipped; a file that is not such a pcap fails the test.
pub fn roce_frames(pcap: &Path) -> Vec<RoceFrame> {
    let data = fs::read(pcap).unwrap_or_else(|e| panic!("read {}: {e}", pcap.display()));
    assert!(data.len() >= 24, "{} is not a pcap file", pcap.display());
    let magic = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
    let le = match magic {
        0xa1b2_c3d4 | 0xa1b2_3c4d => true,
        0xd4c3_b2a1 | 0x4d3c_b2a1 => false,
        _ => panic!(
            "{} is not a classic pcap file (magic {magic:#x})",
            pcap.display()
        ),
    };
    let u32_at = |b: &[u8], o: usize| {
        let a = [b[o], b[o + 1], b[o + 2], b[o + 3]];
        if le {
            u32::from_le_bytes(a)
        } else {
            u32::from_be_bytes(a)
        }
    };
    assert_eq!(
        u32_at(&data, 20),
        1,
        "{}: not Ethernet (DLT 1)",
        pcap.display()
    );
    let mut frames = Vec::new();
    let mut at = 24;
    let mut number = 0;
    while at + 16 <= data.len() {
        let caplen = u32_at(&data, at + 8) as usize;
        let start = at + 16;
        let Some(frame) = data.get(start..start + caplen) else {
            break;
        };
        at = start + caplen;
        number += 1;
        if frame.len() < 14 + 20 + 8 || frame[12..14] != [0x08, 0x00] {
            continue;
        }
        let ip = &frame[14..];
        let ihl = usize::from(ip[0] & 0x0f) * 4;
        let total = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
        if ip[0] >> 4 != 4 || ip[9] != 17 || ihl < 20 || total > ip.len() || total < ihl + 8 {
            continue;
        }
        let udp = &ip[ihl..ihl + 8];
        let udp_len = usize::from(u16::from_be_bytes([udp[4], udp[5]]));
        if u16::from_be_bytes([udp[2], udp[3]]) != 4791 || udp_len < 8 || ihl + udp_len > total {
            continue;
        }
        frames.push(RoceFrame {
            number,
            ip_header: ip[..ihl].to_vec(),
            udp_header: udp.to_vec(),
            payload: ip[ihl + 8..ihl + udp_len].to_vec(),
        });
    }
    frames
}

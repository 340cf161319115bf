//! `ferry bench migrate-faults`: the fault matrix. A VM with a passthrough NVMe device running
//! `nvme-verify --with-dirty` is migrated over loopback, again and again, through the migration
//! fault proxy ([`migration::fault`]), and each fault is injected at each protocol phase:
//! destination killed, source device process killed, destination device process killed,
//! socket cut, one bit flipped, peer stalled, connection lost right after a frame. Each run
//! records how many VMs run at the end (exactly one, or — after Go — the source reporting
//! itself paused with the outcome unknown), whether every running guest verifies (the API's
//! `verify`, then the guest's own exit status: 34/35 are lost or duplicated I/Os), and whether
//! a process died that should not have.
//!
//! Every process is a real `ferry` process this command starts and kills; nothing here runs
//! a VM itself.
use std::{
    collections::BTreeMap,
    io::{BufRead, BufReader, Read},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{bail, Context};
use clap::Args;
use migration::fault::{Action, Fault, FaultProxy, Position, Rounds, Verdict};
use serde::Serialize;
use serde_json::{json, Value};

use crate::api::{Request, Response};

/// `ferry bench migrate-faults`.
#[derive(Args, Debug)]
pub struct BenchFaultsArgs {
    /// Injections in all (spread evenly over the fault × phase cells, at least one each).
    #[arg(long, default_value_t = 70)]
    pub runs: usize,
    /// Seed of the randomized positions (which Memory frame of a round) and of the run order.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Only these faults (default: all).
    #[arg(long, value_enum, value_delimiter = ',')]
    pub faults: Vec<FaultKind>,
    /// Only these phases (default: all).
    #[arg(long, value_enum, value_delimiter = ',')]
    pub phases: Vec<Phase>,
    /// How long each guest runs before its final verification (it must outlast the
    /// migration and the fault).
    #[arg(long, default_value = "12s", value_parser = crate::units::parse_duration)]
    pub guest_time: Duration,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

/// A fault.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum FaultKind {
    /// SIGKILL the `ferry receive` process.
    KillDestination,
    /// SIGKILL the source's `ferry device nvme` process.
    KillSourceDevice,
    /// SIGKILL the destination's `ferry device nvme` process.
    KillDestinationDevice,
    /// Close both connections (the frame is not delivered).
    Cut,
    /// Flip one bit of the frame.
    FlipBit,
    /// Forward nothing more; keep the connections open.
    Stall,
    /// Deliver the frame, then lose the connection.
    LostAfter,
}

impl FaultKind {
    const ALL: [FaultKind; 7] = [
        FaultKind::KillDestination,
        FaultKind::KillSourceDevice,
        FaultKind::KillDestinationDevice,
        FaultKind::Cut,
        FaultKind::FlipBit,
        FaultKind::Stall,
        FaultKind::LostAfter,
    ];

    fn label(self) -> &'static str {
        match self {
            FaultKind::KillDestination => "destination killed",
            FaultKind::KillSourceDevice => "source device killed",
            FaultKind::KillDestinationDevice => "destination device killed",
            FaultKind::Cut => "socket cut",
            FaultKind::FlipBit => "one bit flipped",
            FaultKind::Stall => "peer stalls",
            FaultKind::LostAfter => "connection lost after",
        }
    }

    fn action(self) -> Action {
        match self {
            FaultKind::KillDestination
            | FaultKind::KillSourceDevice
            | FaultKind::KillDestinationDevice => Action::Hold,
            FaultKind::Cut => Action::Cut,
            FaultKind::FlipBit => Action::FlipBit,
            FaultKind::Stall => Action::Stall,
            FaultKind::LostAfter => Action::CutAfter,
        }
    }
}

/// Where in the protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Phase {
    /// A Memory frame of round 0.
    Round0,
    /// The first Memory frame or the RoundEnd of a later round (pre-copy or the paused one).
    LaterRound,
    /// The device state (after the switchover's drain, the VM paused).
    DeviceState,
    /// The destination's Ready.
    AfterReady,
    /// The source's Go.
    AfterGo,
}

impl Phase {
    const ALL: [Phase; 5] = [
        Phase::Round0,
        Phase::LaterRound,
        Phase::DeviceState,
        Phase::AfterReady,
        Phase::AfterGo,
    ];

    fn label(self) -> &'static str {
        match self {
            Phase::Round0 => "round 0",
            Phase::LaterRound => "later round",
            Phase::DeviceState => "device state",
            Phase::AfterReady => "after Ready",
            Phase::AfterGo => "after Go",
        }
    }

    /// The position, with a random choice among the Memory frames of a round.
    fn position(self, rng: &mut Rng) -> Position {
        match self {
            Phase::Round0 => Position::round0(1 + rng.below(4)),
            // A later round may carry a single Memory frame (the paused round of a migration
            // that converged at once), but always ends with a RoundEnd.
            Phase::LaterRound if rng.below(2) == 0 => Position::later_round(),
            Phase::LaterRound => Position::RoundEnd(Rounds::AtLeast(1)),
            Phase::DeviceState => Position::device_state(),
            Phase::AfterReady => Position::ready(),
            Phase::AfterGo => Position::go(),
        }
    }
}

/// xorshift64*: reproducible positions from `--seed`.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) % n.max(1)
    }
}

/// One injection and what came of it.
#[derive(Serialize, Debug, Default)]
struct RunRecord {
    fault: Option<FaultKind>,
    phase: Option<Phase>,
    position: String,
    /// The migration got as far as the position.
    reached: bool,
    /// `ferry migrate` exit status and JSON outcome ("completed", "failed", "unknown"; derived
    /// from the status when the JSON has none).
    migrate_status: Option<i32>,
    migrate_outcome: String,
    /// The source said it is paused after Go (outcome unknown).
    source_paused_after_go: bool,
    /// `resume --force` was used on the paused source (the destination ran nothing).
    forced_resume: bool,
    /// VMs running once the migration settled (source and destination).
    vms_running: u32,
    source_running: bool,
    destination_running: bool,
    /// API `verify` of every running VM passed.
    verify_ok: bool,
    /// The surviving guest's exit status at the end of its run (None: no guest survived).
    guest_exit: Option<i32>,
    /// Each side's guest exit status, when its guest ended by itself there.
    source_guest_exit: Option<i64>,
    destination_guest_exit: Option<i64>,
    /// The destination ran the VM at some point; the source ran it after the migration.
    destination_ran: bool,
    source_ran_after: bool,
    /// The source's guest finished its run (clean) before the harness checked it.
    source_ran_to_end: bool,
    /// Lost or duplicated I/Os (nvme-verify exit 34/35).
    io_lost_or_duplicated: bool,
    /// The source process ended other than by migrating or by its guest's end.
    source_died: bool,
    /// The expected way a VM ended with its device process ("passthrough device ...
    /// disconnected").
    device_disconnect: bool,
    green: bool,
    why: String,
    /// Last stderr lines of the source and the destination of a red run.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    tails: Vec<String>,
    ms: f64,
}

#[derive(Serialize)]
struct Cell {
    fault: FaultKind,
    phase: Phase,
    runs: usize,
    green: usize,
}

#[derive(Serialize)]
struct Report {
    seed: u64,
    injections: usize,
    green: usize,
    all_green: bool,
    cells: Vec<Cell>,
    runs: Vec<RunRecord>,
}

/// A child process killed on drop; its stderr (and stdout) collected as it comes.
struct Proc {
    child: Child,
    out: Output,
    err: Output,
}

/// One output stream of a child: the text so far and whether it ended.
type Output = Arc<Mutex<(String, bool)>>;

fn collect(r: impl Read + Send + 'static) -> Output {
    let buf: Output = Arc::new(Mutex::new((String::new(), false)));
    let b = buf.clone();
    std::thread::spawn(move || {
        let mut r = BufReader::new(r);
        let mut line = String::new();
        while matches!(r.read_line(&mut line), Ok(n) if n > 0) {
            b.lock()
                .unwrap_or_else(|e| e.into_inner())
                .0
                .push_str(&line);
            line.clear();
        }
        b.lock().unwrap_or_else(|e| e.into_inner()).1 = true;
    });
    buf
}

/// The text of `o`; once the process exited, everything it wrote (waits for the end).
fn text(o: &Output, exited: bool) -> String {
    if exited {
        wait_until(Duration::from_secs(10), || {
            o.lock().unwrap_or_else(|e| e.into_inner()).1
        });
    }
    o.lock().unwrap_or_else(|e| e.into_inner()).0.clone()
}

impl Proc {
    fn spawn(args: &[&str]) -> anyhow::Result<Proc> {
        let exe = std::env::current_exe().context("finding the ferry binary")?;
        let mut child = Command::new(exe)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting ferry {}", args.join(" ")))?;
        let out = collect(child.stdout.take().context("stdout")?);
        let err = collect(child.stderr.take().context("stderr")?);
        Ok(Proc { child, out, err })
    }

    fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Waits up to `limit` for the exit; its status (None: still running or killed).
    fn wait(&mut self, limit: Duration) -> Option<i32> {
        let deadline = Instant::now() + limit;
        loop {
            match self.child.try_wait() {
                Ok(Some(s)) => return s.code(),
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                _ => return None,
            }
        }
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    fn stderr(&mut self) -> String {
        let exited = !self.alive();
        text(&self.err, exited)
    }

    fn stdout(&mut self) -> String {
        let exited = !self.alive();
        text(&self.out, exited)
    }

    /// Waits for a stderr line starting with `prefix`; returns the rest of it.
    fn stderr_line(&self, prefix: &str, limit: Duration) -> Option<String> {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Some(l) = text(&self.err, false)
                .lines()
                .find_map(|l| l.strip_prefix(prefix))
            {
                return Some(l.trim().to_string());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        None
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// One control-API request, written as `{"cmd": ...}` (status, verify, stop, resume), sent
/// to its HTTP endpoint; its result as `{"ok", "data", "error"}`.
fn api(path: &Path, req: &Value) -> anyhow::Result<Value> {
    let request = match req["cmd"].as_str().unwrap_or_default() {
        "status" => Request::Status,
        "verify" => Request::Verify,
        "stop" => Request::Stop,
        "resume" => Request::Resume {
            force: req["force"] == true,
        },
        other => bail!("no API request {other:?}"),
    };
    Ok(match crate::api::call(path, &request, |_| {})? {
        Response::Result { ok, data, error } => json!({ "ok": ok, "data": data, "error": error }),
        Response::Progress(_) => bail!("a progress event as the answer"),
    })
}

/// Polls `cond` for up to `limit`.
fn wait_until(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The VM behind `api` answers `status` with this state ("running", "paused-after-go").
fn vm_state(api_sock: &Path) -> Option<String> {
    api(api_sock, &json!({"cmd": "status"}))
        .ok()
        .filter(|v| v["ok"] == true)
        .and_then(|v| v["data"]["state"].as_str().map(str::to_string))
}

/// Bounds every wait on a process or a report.
const PATIENCE: Duration = Duration::from_secs(60);

/// The processes of one run.
struct Setup {
    src_dev: Proc,
    dst_dev: Proc,
    source: Proc,
    dest: Proc,
    src_api: PathBuf,
    dst_api: PathBuf,
    dest_addr: String,
}

fn setup(dir: &Path, guest_time: Duration, seed: u64) -> anyhow::Result<Setup> {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let p = |n: &str| dir.join(n);
    let s = |p: &Path| p.to_string_lossy().into_owned();
    let (disk, sock_a, sock_b) = (p("disk.img"), p("dev-a.sock"), p("dev-b.sock"));
    let (src_api, dst_api) = (p("src.sock"), p("dst.sock"));
    let dev = |sock: &Path, create: bool| {
        let mut a = vec![
            "device",
            "nvme",
            "--size",
            "64M",
            "--socket",
            sock.to_str().unwrap_or_default(),
            "--backing",
            disk.to_str().unwrap_or_default(),
        ];
        if create {
            a.push("--create");
        }
        Proc::spawn(&a)
    };
    let src_dev = dev(&sock_a, true)?;
    if !wait_until(PATIENCE, || sock_a.exists()) {
        bail!("the source device's socket never appeared");
    }
    let dst_dev = dev(&sock_b, false)?;
    if !wait_until(PATIENCE, || sock_b.exists()) {
        bail!("the destination device's socket never appeared");
    }
    let duration = format!("{}ms", guest_time.as_millis());
    let limit = format!("{}s", guest_time.as_secs() + 300);
    let (pt_a, pt_b) = (
        format!("nvme={}", s(&sock_a)),
        format!("nvme={}", s(&sock_b)),
    );
    let seed = seed.to_string();
    let mut source = Proc::spawn(&[
        "run",
        "--workload",
        "nvme-verify",
        "--with-dirty",
        "16M",
        "--rate",
        "50000",
        "--memory",
        "128M",
        "--nvme-queues",
        "4",
        "--nvme-depth",
        "32",
        "--seed",
        &seed,
        "--passthrough",
        &pt_a,
        "--duration",
        &duration,
        "--timeout",
        &limit,
        "--serial",
        "off",
        "--json",
        "--api-socket",
        &s(&src_api),
    ])?;
    let dest = Proc::spawn(&[
        "receive",
        "--listen",
        "127.0.0.1:0",
        "--passthrough",
        &pt_b,
        "--serial",
        "off",
        "--json",
        "--accept-timeout",
        "300s",
        "--timeout",
        &limit,
        "--api-socket",
        &s(&dst_api),
    ])?;
    let dest_addr = dest
        .stderr_line("ferry: waiting for a migration on ", PATIENCE)
        .context("the destination never said where it listens")?;
    // The guest's I/O queues exist and I/O runs: a thousand I/Os done.
    let going = wait_until(PATIENCE, || {
        api(&src_api, &json!({"cmd": "status"}))
            .map(|v| {
                v["data"]["io_queues"].as_u64() == Some(4)
                    && v["data"]["progress"].as_u64() >= Some(1000)
            })
            .unwrap_or(false)
    });
    if !going {
        bail!(
            "the source guest's I/O never got going: {}",
            source.stderr()
        );
    }
    Ok(Setup {
        src_dev,
        dst_dev,
        source,
        dest,
        src_api,
        dst_api,
        dest_addr,
    })
}

/// Whether `ferry migrate` has `--timeout` (bounded waits for a stalled peer).
fn migrate_timeout_flag() -> bool {
    std::env::current_exe()
        .ok()
        .and_then(|exe| Command::new(exe).args(["migrate", "--help"]).output().ok())
        .is_some_and(|o| String::from_utf8_lossy(&o.stdout).contains("--timeout"))
}

fn one_run(
    dir: &Path,
    fault: FaultKind,
    phase: Phase,
    position: Position,
    args: &BenchFaultsArgs,
    has_timeout: bool,
    seed: u64,
) -> anyhow::Result<RunRecord> {
    let t0 = Instant::now();
    let mut rec = RunRecord {
        fault: Some(fault),
        phase: Some(phase),
        position: position.to_string(),
        ..Default::default()
    };
    // A stalled peer holds the migration until the source's bound on waits; the guest must
    // outlive that.
    let stall_bound = if has_timeout { 5 } else { 30 };
    let guest_time = if fault == FaultKind::Stall {
        args.guest_time + Duration::from_secs(stall_bound + 5)
    } else {
        args.guest_time
    };
    let mut s = setup(dir, guest_time, seed)?;
    let proxy = FaultProxy::start(
        s.dest_addr.as_str(),
        Some(Fault {
            at: position,
            action: fault.action(),
        }),
    )?;
    let to = proxy.addr().to_string();
    let api_a = s.src_api.to_string_lossy().into_owned();
    // One stream: every frame of the migration passes through the proxy.
    let mut margs = vec![
        "migrate",
        "--api-socket",
        &api_a,
        "--to",
        &to,
        "--json",
        "--streams",
        "0",
    ];
    let bound = format!("{stall_bound}s");
    if has_timeout {
        margs.extend(["--timeout", &bound]);
    }
    let mut migrate = Proc::spawn(&margs)?;
    if fault.action() == Action::Hold {
        // Held until the migration reaches the position or ends without reaching it.
        let held = loop {
            if let Some(p) = proxy.wait_held(Duration::from_millis(100)) {
                break Some(p);
            }
            if !migrate.alive() || t0.elapsed() > PATIENCE * 2 {
                break None;
            }
        };
        if held.is_some() {
            match fault {
                FaultKind::KillDestination => s.dest.kill(),
                FaultKind::KillSourceDevice => s.src_dev.kill(),
                _ => s.dst_dev.kill(),
            }
            proxy.release(Verdict::Forward);
        }
    }
    rec.migrate_status = migrate.wait(PATIENCE * 3);
    if rec.migrate_status.is_none() {
        migrate.kill();
    }
    rec.reached = proxy.reached();
    let mjson: Value = migrate
        .stdout()
        .lines()
        .collect::<String>()
        .parse()
        .unwrap_or(Value::Null);
    rec.migrate_outcome = match (mjson["outcome"].as_str(), rec.migrate_status) {
        (Some(o), _) => o.to_string(),
        (None, Some(0)) => "completed".into(),
        (None, Some(3)) => "unknown".into(),
        (None, Some(1)) => "failed".into(),
        (None, other) => format!("exit {other:?}"),
    };
    // Ends a stall; the destination sees the end of its stream.
    proxy.close();

    // Settle: the destination runs the VM (its API answers) or exits; the source runs, is
    // paused after Go, or exits.
    let dest_runs = |s: &mut Setup| s.dest.alive() && vm_state(&s.dst_api).is_some();
    wait_until(PATIENCE, || {
        !s.dest.alive() || s.dst_api.exists() && vm_state(&s.dst_api).is_some()
    });
    rec.destination_running = dest_runs(&mut s);
    let src_state = if s.source.alive() {
        vm_state(&s.src_api)
    } else {
        None
    };
    rec.source_paused_after_go = src_state.as_deref() == Some("paused-after-go");
    if rec.source_paused_after_go && !rec.destination_running {
        // The operator's decision: the destination runs nothing, so the source resumes.
        let r = api(&s.src_api, &json!({"cmd": "resume", "force": true}))?;
        rec.forced_resume = r["ok"] == true;
    }
    rec.source_running = s.source.alive() && vm_state(&s.src_api).as_deref() == Some("running");
    rec.vms_running = rec.source_running as u32 + rec.destination_running as u32;

    // Verify every running VM, then let its guest finish and read its exit status.
    rec.verify_ok = true;
    for (running, sock) in [
        (rec.source_running, &s.src_api),
        (rec.destination_running, &s.dst_api),
    ] {
        if running {
            let v = api(sock, &json!({"cmd": "verify"}))?;
            rec.verify_ok &= v["ok"] == true && v["data"]["status"] == 0;
        }
    }
    if rec.source_paused_after_go && rec.destination_running {
        // The operator's other decision: the destination runs the VM, the source lets go.
        api(&s.src_api, &json!({"cmd": "stop"}))?;
    }
    // The running guests finish by themselves; the rest ends soon after the migration.
    let end = guest_time + PATIENCE * 2;
    let src_exit = s
        .source
        .wait(if rec.source_running { end } else { PATIENCE });
    let dst_exit = s.dest.wait(if rec.destination_running {
        end
    } else {
        PATIENCE
    });
    let survivor = if rec.destination_running {
        dst_exit
    } else if rec.source_running {
        src_exit
    } else {
        None
    };
    rec.guest_exit = survivor;
    let src_err = s.source.stderr();
    let dst_err = s.dest.stderr();
    rec.device_disconnect = [&src_err, &dst_err]
        .iter()
        .any(|e| e.contains("passthrough device") && e.contains("disconnected"));
    // The source ends by migrating, by its guest's end, or stopped by the operator after Go;
    // anything else is a death.
    let summary = |p: &mut Proc| -> Value {
        p.stdout()
            .lines()
            .last()
            .and_then(|l| serde_json::from_str(l).ok())
            .unwrap_or(Value::Null)
    };
    let guest = |v: &Value| {
        (v["outcome"] == "exit")
            .then(|| v["status"].as_i64())
            .flatten()
    };
    let src_summary = summary(&mut s.source);
    let dst_summary = summary(&mut s.dest);
    rec.source_guest_exit = guest(&src_summary);
    rec.destination_guest_exit = guest(&dst_summary);
    rec.destination_ran = dst_err.contains("VM received from");
    rec.source_ran_after = rec.source_running || src_err.contains("keeps running here");
    // A stalled peer can hold the migration up (the destination's and the source's bounds)
    // until the guest's time is up: the one VM then ended by itself, clean, before the
    // harness looked. It ran to the end all the same.
    if rec.vms_running == 0
        && !rec.destination_ran
        && rec.source_guest_exit == Some(0)
        && src_err.contains("keeps running here")
    {
        rec.vms_running = 1;
        rec.guest_exit = Some(0);
        rec.source_ran_to_end = true;
    }
    rec.io_lost_or_duplicated = [rec.source_guest_exit, rec.destination_guest_exit]
        .iter()
        .any(|e| matches!(e, Some(34) | Some(35)));
    rec.source_died = !matches!(
        src_summary["outcome"].as_str(),
        Some("migrated") | Some("exit") | Some("stopped")
    );
    judge(&mut rec, fault, &src_err);
    if !rec.green {
        let tail = |t: &str| {
            let lines: Vec<&str> = t.lines().collect();
            lines[lines.len().saturating_sub(4)..].join(" | ")
        };
        rec.tails = vec![
            format!("source: {}", tail(&src_err)),
            format!("destination: {}", tail(&dst_err)),
        ];
    }
    rec.ms = t0.elapsed().as_secs_f64() * 1000.0;
    drop(s);
    let _ = std::fs::remove_dir_all(dir);
    Ok(rec)
}

/// Green or red, and why.
fn judge(rec: &mut RunRecord, fault: FaultKind, src_err: &str) {
    let mut why = Vec::new();
    if !rec.reached {
        why.push("the migration never reached the position".to_string());
    }
    if rec.vms_running > 1 || rec.destination_ran && rec.source_ran_after {
        why.push("two VMs ran (the source and the destination)".into());
    }
    for (side, exit) in [
        ("source", rec.source_guest_exit),
        ("destination", rec.destination_guest_exit),
    ] {
        match exit {
            None | Some(0) => {}
            Some(33) => why.push(format!("{side} guest: data mismatch (33)")),
            Some(34) => why.push(format!("{side} guest: duplicated I/O completion (34)")),
            Some(35) => why.push(format!("{side} guest: lost I/O completion (35)")),
            Some(n) => why.push(format!("{side} guest exited {n}")),
        }
    }
    if rec.destination_running && rec.migrate_outcome == "failed" {
        why.push("the destination runs a VM the source did not commit".into());
    }
    let device_fault = matches!(
        fault,
        FaultKind::KillSourceDevice | FaultKind::KillDestinationDevice
    );
    if rec.vms_running == 0 {
        let paused = rec.source_paused_after_go && !rec.forced_resume;
        if !(paused || device_fault && rec.device_disconnect) {
            why.push("no VM runs".into());
        }
    }
    if rec.vms_running >= 1 {
        if !rec.verify_ok {
            why.push("the ledger did not verify".into());
        }
        match rec.guest_exit {
            Some(0) | Some(33..=35) => {} // the latter reported above
            Some(1) if device_fault && rec.device_disconnect => {}
            other => why.push(format!("exit status {other:?} of the surviving VM")),
        }
    }
    let expected_death = fault == FaultKind::KillSourceDevice
        && src_err.contains("passthrough device")
        && src_err.contains("disconnected");
    if rec.source_died && !expected_death {
        why.push("the source process died".into());
    }
    rec.green = why.is_empty();
    rec.why = why.join("; ");
}

pub fn run(args: BenchFaultsArgs) -> anyhow::Result<i32> {
    let faults: Vec<FaultKind> = if args.faults.is_empty() {
        FaultKind::ALL.to_vec()
    } else {
        args.faults.clone()
    };
    let phases: Vec<Phase> = if args.phases.is_empty() {
        Phase::ALL.to_vec()
    } else {
        args.phases.clone()
    };
    let cells: Vec<(FaultKind, Phase)> = faults
        .iter()
        .flat_map(|f| phases.iter().map(move |p| (*f, *p)))
        .collect();
    if cells.is_empty() {
        bail!("no fault x phase cell selected");
    }
    let mut rng = Rng(args.seed.max(1) ^ 0x9e37_79b9_7f4a_7c15);
    let total = args.runs.max(cells.len());
    let mut plan: Vec<(FaultKind, Phase)> = (0..total).map(|i| cells[i % cells.len()]).collect();
    // Fisher-Yates, so no cell always follows the same one.
    for i in (1..plan.len()).rev() {
        let j = rng.below(i as u64 + 1) as usize;
        plan.swap(i, j);
    }
    let has_timeout = migrate_timeout_flag();
    let base = std::env::temp_dir().join(format!("ferry-faults-{}", std::process::id()));
    let mut runs = Vec::new();
    for (i, (fault, phase)) in plan.into_iter().enumerate() {
        let position = phase.position(&mut rng);
        let dir = base.join(format!("run{i}"));
        let rec = match one_run(
            &dir,
            fault,
            phase,
            position,
            &args,
            has_timeout,
            args.seed.wrapping_add(i as u64),
        ) {
            Ok(r) => r,
            Err(e) => RunRecord {
                fault: Some(fault),
                phase: Some(phase),
                position: position.to_string(),
                why: format!("harness: {e:#}"),
                ..Default::default()
            },
        };
        {
            eprintln!(
                "run {:>3}: {:<26} at {:<12} ({}): {} VM(s), migrate {}{} -> {}{}",
                i + 1,
                fault.label(),
                phase.label(),
                rec.position,
                rec.vms_running,
                rec.migrate_outcome,
                if rec.source_paused_after_go {
                    ", source paused after Go"
                } else {
                    ""
                },
                if rec.green { "green" } else { "RED" },
                if rec.why.is_empty() {
                    String::new()
                } else {
                    format!(" ({})", rec.why)
                }
            );
        }
        runs.push(rec);
    }
    let _ = std::fs::remove_dir_all(&base);
    let mut by_cell: BTreeMap<(FaultKind, Phase), (usize, usize)> = BTreeMap::new();
    for r in &runs {
        if let (Some(f), Some(p)) = (r.fault, r.phase) {
            let e = by_cell.entry((f, p)).or_default();
            e.0 += 1;
            e.1 += r.green as usize;
        }
    }
    let green = runs.iter().filter(|r| r.green).count();
    let report = Report {
        seed: args.seed,
        injections: runs.len(),
        green,
        all_green: green == runs.len(),
        cells: by_cell
            .iter()
            .map(|(&(fault, phase), &(runs, green))| Cell {
                fault,
                phase,
                runs,
                green,
            })
            .collect(),
        runs,
    };
    let text = matrix_text(&report, &faults, &phases, &by_cell, has_timeout);
    if args.json {
        // The matrix for people on stderr, the report for scripts on stdout.
        eprint!("{text}");
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print!("{text}");
    }
    Ok(if report.all_green { 0 } else { 1 })
}

fn matrix_text(
    r: &Report,
    faults: &[FaultKind],
    phases: &[Phase],
    by_cell: &BTreeMap<(FaultKind, Phase), (usize, usize)>,
    has_timeout: bool,
) -> String {
    use std::fmt::Write as _;
    let mut o = String::new();
    let _ = writeln!(
        o,
        "fault matrix: {} injections (seed {}), {} green; cells: green/runs",
        r.injections, r.seed, r.green
    );
    let _ = write!(o, "{:<28}", "");
    for p in phases {
        let _ = write!(o, "{:>14}", p.label());
    }
    let _ = writeln!(o);
    for f in faults {
        let _ = write!(o, "{:<28}", f.label());
        for p in phases {
            let cell = match by_cell.get(&(*f, *p)) {
                Some(&(n, g)) if g == n => format!("{g}/{n} ok"),
                Some(&(n, g)) => format!("{g}/{n} RED"),
                None => "-".into(),
            };
            let _ = write!(o, "{cell:>14}");
        }
        let _ = writeln!(o);
    }
    let sum = |f: fn(&RunRecord) -> bool| r.runs.iter().filter(|x| f(x)).count();
    let _ = writeln!(
        o,
        "VMs running at the end: exactly one in {} runs, none with the source paused after Go \
         in {}, none because the killed device's VM ended in {}",
        sum(|x| x.vms_running == 1),
        sum(|x| x.vms_running == 0 && x.source_paused_after_go),
        sum(|x| x.vms_running == 0 && x.device_disconnect),
    );
    let _ = writeln!(
        o,
        "guest verifications passed: {} of {} runs with a running VM; lost or duplicated I/Os: \
         {} runs; source process deaths: {} ({} expected: source device killed)",
        sum(|x| x.vms_running >= 1 && x.verify_ok && x.guest_exit == Some(0)),
        sum(|x| x.vms_running >= 1),
        sum(|x| x.io_lost_or_duplicated),
        sum(|x| x.source_died),
        sum(|x| x.source_died && x.fault == Some(FaultKind::KillSourceDevice)),
    );
    if !has_timeout {
        let _ = writeln!(
            o,
            "(`ferry migrate` has no --timeout here: a stalled peer is ended by the source's 30 s bound)"
        );
    }
    let _ = writeln!(o, "{}", if r.all_green { "PASS" } else { "FAIL" });
    o
}

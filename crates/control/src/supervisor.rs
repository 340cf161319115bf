//! The supervisor of a running VM: an event loop (epoll) over the VM's end, the control API,
//! process signals and the migration worker, with the session's deadlines (timeout, ledger
//! verification, state round trip) as the wait's timeout. It never sleep-polls: it sleeps in
//! `epoll_wait` until something happens or the next deadline is due. Two things have no
//! descriptor to wait on and are looked at on a short timer, only while they are pending: the
//! guest's verification answer (the boot-parameter mailbox has no doorbell) and a device waiting
//! to enter continuous shadow mode.
//!
//! A live migration runs on a worker thread, so the loop keeps answering the API while it runs:
//! `stop` (or a signal, or the timeout) cancels it before Go — the VM stays here and is then
//! stopped as asked — and `cancel-migration` cancels it and keeps the VM running.
use std::{
    os::fd::AsRawFd,
    sync::{
        atomic::{AtomicBool, Ordering},
        mpsc::{self, Receiver, Sender},
        Arc, Mutex,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use guest_abi::ports::Event;
use migration::{CancelToken, MigratableDevice, MigrationReport, Outcome, Progress, SourceOptions};
use vmm::{vm::VerifyResult, Vm, VmOutcome};
use vmm_sys_util::{
    epoll::{ControlOperation, Epoll, EpollEvent, EventSet},
    eventfd::EventFd,
};

use crate::{
    command::{CommandSource, MigrateRequest, Request, Response},
    passthrough::PassthroughSession,
    session::{ms, roundtrip, SessionReport, SessionSpec, Verification},
    signals::{self, SignalState},
    Error, Result,
};

/// How often a pending verification answer is looked for (the mailbox has no doorbell).
const VERIFY_POLL: Duration = Duration::from_millis(5);
/// How often a device waiting to enter continuous shadow mode is looked at.
const DEVICE_TICK: Duration = Duration::from_millis(20);
/// Longest single wait, so that a lost wake-up costs at most this much.
const MAX_WAIT: Duration = Duration::from_secs(1);

/// A ledger verification someone is waiting for.
struct PendingVerify {
    req: u32,
    reply: Option<Sender<Response>>,
}

impl PendingVerify {
    /// Records the guest's answer and passes it on to the API client that asked, if any.
    fn answer(self, r: VerifyResult, verifications: &mut Vec<Verification>) {
        tracing::info!(
            request = self.req,
            status = r.status,
            pages = r.pages,
            "ledger verification finished"
        );
        if let Some(reply) = &self.reply {
            let _ = reply.send(Response::ok(Verification::from(r)));
        }
        verifications.push(Verification::from(r));
    }
}

type Devices = Vec<Box<dyn MigratableDevice>>;

/// What the migration worker hands back.
struct MigrationDone {
    result: migration::Result<MigrationReport>,
    devices: Devices,
}

/// A migration running on its worker thread.
struct Running {
    to: String,
    cancel: Arc<CancelToken>,
    reply: Sender<Response>,
    progress: Arc<Mutex<Progress>>,
    done: Receiver<MigrationDone>,
    thread: Option<JoinHandle<()>>,
}

/// Why the loop ends once the running migration is over.
struct StopAfter {
    outcome: VmOutcome,
    reply: Option<Sender<Response>>,
}

/// The epoll set and the descriptors the loop owns.
struct Waits {
    epoll: Epoll,
    migration: Arc<EventFd>,
}

impl Waits {
    fn new() -> Result<Waits> {
        let epoll = Epoll::new().map_err(Error::io("creating the supervisor's epoll"))?;
        let migration = Arc::new(
            EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)
                .map_err(Error::io("creating the migration eventfd"))?,
        );
        let w = Waits { epoll, migration };
        w.add(w.migration.as_raw_fd())?;
        Ok(w)
    }

    fn add(&self, fd: i32) -> Result<()> {
        self.epoll
            .ctl(
                ControlOperation::Add,
                fd,
                EpollEvent::new(EventSet::IN, fd as u64),
            )
            .map_err(Error::io("adding a descriptor to the supervisor's epoll"))
    }

    /// Sleeps until a descriptor is readable or `timeout` passed; drains the eventfds.
    fn wait(&self, timeout: Duration) -> Result<()> {
        let mut events = [EpollEvent::default(); 8];
        let ms = timeout.min(MAX_WAIT).as_millis() as i32;
        match self.epoll.wait(ms, &mut events) {
            Ok(n) => {
                for e in &events[..n] {
                    // Every descriptor here is an eventfd: reading resets it. A spurious wake
                    // (EAGAIN) is harmless: the loop checks every source anyway.
                    let mut buf = [0u8; 8];
                    // SAFETY: reading 8 bytes into a local buffer from a descriptor this
                    // process owns for the loop's lifetime.
                    let _ =
                        unsafe { libc::read(e.data() as i32, buf.as_mut_ptr().cast(), buf.len()) };
                }
                Ok(())
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => Ok(()),
            Err(e) => Err(Error::io("waiting in the supervisor's epoll")(e)),
        }
    }
}

/// Everything the loop tracks.
struct State {
    started: Instant,
    pending: Vec<PendingVerify>,
    verify_asked: bool,
    verifications: Vec<Verification>,
    signal: Option<i32>,
    timed_out: bool,
    migrated: Option<MigrationReport>,
    failed_migrations: Vec<String>,
    /// A migration went past Go without the destination's confirmation: the VM stays paused
    /// (with its devices quiesced, kept for a forced resume) until the operator decides.
    after_go: Option<(MigrationReport, Devices)>,
    running: Option<Running>,
    stop_after: Option<StopAfter>,
    roundtrip_done: Option<crate::session::RoundTrip>,
}

/// Supervises a running VM until it ends, migrates away, or is stopped.
pub fn supervise(
    vm: Vm,
    spec: &SessionSpec,
    api: Option<Box<dyn CommandSource>>,
    process_start: Instant,
    signals: &SignalState,
    incoming: Option<migration::ReceiveReport>,
    mut device: Option<PassthroughSession>,
) -> Result<SessionReport> {
    let mut vm = Arc::new(vm);
    let waits = Waits::new()?;
    sandbox::enter(sandbox::Kind::EventLoop);
    if let Some(fd) = vm.lifecycle().ended_fd() {
        waits.add(fd.as_raw_fd())?;
    }
    if let Some(api) = &api {
        waits.add(api.wake_fd())?;
    }
    waits.add(signals.wake_fd())?;
    let mut st = State {
        started: Instant::now(),
        pending: Vec::new(),
        verify_asked: false,
        verifications: Vec::new(),
        signal: None,
        timed_out: false,
        migrated: None,
        failed_migrations: Vec::new(),
        after_go: None,
        running: None,
        stop_after: None,
        roundtrip_done: None,
    };
    let mut first_instruction = None;

    let outcome = loop {
        // A migration that finished hands the VM back (or away).
        if let Some(r) = &st.running {
            if let Ok(done) = r.done.try_recv() {
                let mut r = st.running.take().expect("checked above");
                if let Some(t) = r.thread.take() {
                    let _ = t.join();
                }
                if let Some(o) = finish_migration(&vm, r, done, &mut st)? {
                    break o;
                }
            }
        }
        if st.running.is_none() {
            if let Some(stop) = st.stop_after.take() {
                if let Some(reply) = stop.reply {
                    let _ = reply.send(Response::ok(serde_json::json!({ "stopped": true })));
                }
                vm.stop(&stop.outcome.to_string())
                    .map_err(Error::vmm("stopping the VM"))?;
                break stop.outcome;
            }
        }
        if let Some(o) = vm.lifecycle().outcome() {
            if let Some(r) = &st.running {
                // The guest ended under a running migration: it fails, then the loop ends.
                r.cancel.cancel();
            } else {
                vm.pause().map_err(Error::vmm("parking the vCPUs"))?;
                break o;
            }
        }
        let now = st.started.elapsed();
        if st.running.is_none() && st.after_go.is_none() {
            if let Some(d) = &mut device {
                d.tick(&vm);
            }
        }
        if first_instruction.is_none() {
            first_instruction = vm.lifecycle().event_time(Event::Booted);
        }
        if let Some(sig) = signals.stop_signal() {
            if st.stop_after.is_none() {
                st.signal = Some(sig);
                let why = format!("{} received", signals::name(sig));
                request_stop(&mut st, VmOutcome::Stopped(why), None);
            }
        }
        if let Some(t) = spec.timeout {
            if now >= t && st.stop_after.is_none() {
                st.timed_out = true;
                let why = format!("timeout of {} reached", humantime::format_duration(t));
                request_stop(&mut st, VmOutcome::Stopped(why), None);
            }
        }
        let can_ask = st.after_go.is_none() && st.stop_after.is_none();
        // SIGUSR2 or the caller's flag: the workload ends its timed phase, verifies and exits
        // on its own. Not under a migration (a write of the VMM's to guest RAM is not in the
        // dirty log): the request waits until the migration failed (the VM runs here) or
        // leaves with the process.
        let asked = |f: &Arc<AtomicBool>| f.swap(false, Ordering::SeqCst);
        if can_ask
            && st.running.is_none()
            && (signals.take_finish() || spec.finish.as_ref().is_some_and(asked))
        {
            tracing::info!("asking the workload to finish");
            vm.mailbox()
                .request_stop()
                .map_err(Error::vmm("asking the workload to finish"))?;
        }
        let due = spec.verify_after.is_some_and(|t| now >= t) && !st.verify_asked;
        if (due || signals.take_verify()) && can_ask {
            st.verify_asked |= due;
            st.pending.push(PendingVerify {
                req: vm
                    .mailbox()
                    .request_verify()
                    .map_err(Error::vmm("asking the guest to verify"))?,
                reply: None,
            });
        }
        let mut still = Vec::new();
        for p in st.pending.drain(..) {
            match vm
                .mailbox()
                .verify_result(p.req)
                .map_err(Error::vmm("reading the verification"))?
            {
                Some(r) => p.answer(r, &mut st.verifications),
                None => still.push(p),
            }
        }
        st.pending = still;
        if st.roundtrip_done.is_none()
            && st.running.is_none()
            && st.stop_after.is_none()
            && spec.roundtrip_after.is_some_and(|t| now >= t)
        {
            let owned = Arc::try_unwrap(vm).map_err(|_| {
                Error::Unsupported("the VM is still shared; no state round trip".into())
            })?;
            let (fresh, rt) = roundtrip(owned, spec)?;
            vm = Arc::new(fresh);
            if let Some(fd) = vm.lifecycle().ended_fd() {
                waits.add(fd.as_raw_fd())?;
            }
            st.roundtrip_done = Some(rt);
        }
        if let Some(api) = &api {
            while let Ok(p) = api.requests().try_recv() {
                handle_request(p.request, p.reply, &vm, &mut device, &waits, &mut st);
            }
        }

        if st.stop_after.is_some() && st.running.is_none() {
            continue;
        }
        // Sleep until something happens or the next deadline.
        let mut next = MAX_WAIT;
        let mut until = |t: Option<Duration>| {
            if let Some(t) = t {
                next = next.min(t.saturating_sub(now));
            }
        };
        until(spec.timeout);
        until(spec.verify_after.filter(|_| !st.verify_asked));
        until(spec.roundtrip_after.filter(|_| st.roundtrip_done.is_none()));
        if !st.pending.is_empty() {
            next = next.min(VERIFY_POLL);
        }
        if device.as_ref().is_some_and(|d| d.wants_tick()) {
            next = next.min(DEVICE_TICK);
        }
        if st.running.is_some() || st.stop_after.is_some() {
            // The worker wakes the loop itself; this bounds a wake-up lost to a race.
            next = next.min(Duration::from_millis(100));
        }
        waits.wait(next)?;
    };

    let end = process_start.elapsed();
    let first_instruction_ms = first_instruction
        .or_else(|| vm.lifecycle().event_time(Event::Booted))
        .map(|t| ms(t.duration_since(process_start)));
    // A verification the guest finished in its last moments still counts (a failed one ends
    // the guest); the API clients still waiting get an answer either way.
    for p in st.pending.drain(..) {
        match vm.mailbox().verify_result(p.req) {
            Ok(Some(r)) => p.answer(r, &mut st.verifications),
            _ => {
                if let Some(reply) = &p.reply {
                    let _ = reply.send(Response::err(format!(
                        "the VM ended ({outcome}) before the guest answered"
                    )));
                }
            }
        }
    }
    let (kind, status) = match &outcome {
        VmOutcome::GuestExit(s) => ("exit", Some(*s)),
        VmOutcome::Crashed(_) => ("crashed", None),
        VmOutcome::Stopped(_) if st.migrated.is_some() => ("migrated", None),
        VmOutcome::Stopped(_) if st.timed_out => ("timeout", None),
        VmOutcome::Stopped(_) => ("stopped", None),
        VmOutcome::Failed(_) => ("failed", None),
    };
    let config_log = device.as_ref().and_then(|d| d.config_log());
    let shadow = device.as_ref().and_then(|d| d.shadow_status());
    let net_shadow = device.as_ref().and_then(|d| d.net_shadow_status());
    if let Some(d) = device {
        d.finish(&vm);
    }
    Ok(SessionReport {
        outcome: kind.into(),
        status,
        detail: outcome.to_string(),
        first_instruction_ms,
        end_ms: ms(end),
        progress: vm.mailbox().progress().unwrap_or(0),
        verifications: st.verifications,
        roundtrip: st.roundtrip_done,
        incoming,
        migration: st.migrated,
        failed_migrations: st.failed_migrations,
        unhandled_pio: vm.pio_bus().unhandled_count(),
        unhandled_mmio: vm.mmio_bus().unhandled_count(),
        mmio_ram_fallbacks: vm.mmio_bus().ram_fallback_count(),
        signal: st.signal,
        config_log,
        vrdma: None,
        shadow,
        net_shadow,
        console_tail: vm.console_tail().lines(),
    })
}

/// A stop (API, signal, timeout): at once, or — with a migration running — after cancelling
/// it (before Go the VM stays here; then it stops as asked).
fn request_stop(st: &mut State, outcome: VmOutcome, reply: Option<Sender<Response>>) {
    if let Some(r) = &st.running {
        if r.cancel.cancel() {
            tracing::info!(to = %r.to, "stop: cancelling the running migration first");
        }
    }
    st.stop_after = Some(StopAfter { outcome, reply });
}

/// Starts a migration on its worker thread.
fn start_migration(
    m: MigrateRequest,
    reply: Sender<Response>,
    vm: &Arc<Vm>,
    device: &Option<PassthroughSession>,
    waits: &Waits,
) -> std::result::Result<Running, String> {
    let security =
        migration::Security::from_files(m.tls.as_ref()).map_err(|e| migration::chain(&e))?;
    let cancel = Arc::new(CancelToken::default());
    let opts = SourceOptions {
        security,
        tls_server_name: m.tls_server_name.clone(),
        allow_insecure: m.insecure_no_auth,
        downtime: Duration::from_millis(m.downtime_ms),
        max_rounds: m.max_rounds,
        on_limit: m.on_limit,
        debug_hash: m.debug_hash,
        max_bandwidth: m.max_bandwidth,
        compress: m.compress.unwrap_or_default(),
        cancel: Some(cancel.clone()),
        streams: m.streams.unwrap_or(migration::source::DEFAULT_STREAMS),
        ..Default::default()
    };
    let mut devices: Devices = device
        .as_ref()
        .and_then(|d| d.engine())
        .map(|e| {
            Box::new(shadow::engine::device::ShadowedDevice::new(
                e.clone(),
                "nvme0",
                m.unsafe_no_shadow,
            )) as Box<dyn MigratableDevice>
        })
        .into_iter()
        .chain(
            device
                .as_ref()
                .and_then(|d| d.net())
                .map(|n| n.migratable()),
        )
        .collect();
    let (tx, done) = mpsc::channel();
    let progress = Arc::new(Mutex::new(Progress::default()));
    let (vm2, to, prog, wake, events) = (
        vm.clone(),
        m.to.clone(),
        progress.clone(),
        waits.migration.clone(),
        reply.clone(),
    );
    let thread = std::thread::Builder::new()
        .name("migration".into())
        .spawn(move || {
            sandbox::enter(sandbox::Kind::Migration);
            let result = migration::migrate(&vm2, &mut devices, &to, &opts, &mut |p| {
                *prog.lock().unwrap_or_else(|e| e.into_inner()) = p.clone();
                let _ = events.send(Response::Progress(p.clone()));
            });
            let _ = tx.send(MigrationDone { result, devices });
            let _ = wake.write(1);
        })
        .map_err(|e| format!("starting the migration thread: {e}"))?;
    Ok(Running {
        to: m.to,
        cancel,
        reply,
        progress,
        done,
        thread: Some(thread),
    })
}

/// The worker finished: report, and say whether the loop ends (migrated away).
fn finish_migration(
    vm: &Vm,
    r: Running,
    done: MigrationDone,
    st: &mut State,
) -> Result<Option<VmOutcome>> {
    match done.result {
        Ok(report) if report.outcome == Outcome::Unknown => {
            eprintln!(
                "ferry: migration to {} went past Go but the destination never confirmed ({}): \
                 the VM stays PAUSED here. Check whether the destination runs it; then stop \
                 this one, or resume it with `ferry resume --force` if the destination does not",
                r.to,
                report.unknown_reason.as_deref().unwrap_or("no reason")
            );
            let _ = r.reply.send(Response::ok(&report));
            st.after_go = Some((report, done.devices));
            Ok(None)
        }
        Ok(report) => {
            eprintln!(
                "ferry: migrated to {} (downtime {:.1} ms, total {:.0} ms)",
                r.to, report.downtime_ms, report.total_ms
            );
            let _ = r.reply.send(Response::ok(&report));
            let outcome = VmOutcome::Stopped(format!("migrated to {}", r.to));
            vm.stop(&outcome.to_string())
                .map_err(Error::vmm("ending the migrated VM"))?;
            st.migrated = Some(report);
            // A stop asked for meanwhile came too late: the VM is gone from here anyway.
            if let Some(stop) = st.stop_after.take() {
                if let Some(reply) = stop.reply {
                    let _ = reply.send(Response::ok(serde_json::json!({ "stopped": true })));
                }
            }
            Ok(Some(outcome))
        }
        Err(e) => {
            let why = migration::chain(&e);
            eprintln!(
                "ferry: migration to {} failed, the VM keeps running here: {why}",
                r.to
            );
            st.failed_migrations.push(why.clone());
            let _ = r.reply.send(Response::err(why));
            Ok(None)
        }
    }
}

/// One API request.
fn handle_request(
    request: Request,
    reply: Sender<Response>,
    vm: &Arc<Vm>,
    device: &mut Option<PassthroughSession>,
    waits: &Waits,
    st: &mut State,
) {
    let busy = |what: &str| Response::err(format!("{what}: a migration is running"));
    match request {
        Request::Migrate(_) if st.after_go.is_some() => {
            let _ = reply.send(Response::err(
                "the VM is paused after Go of an earlier migration whose outcome is unknown; \
                 resume it by force or stop it first",
            ));
        }
        Request::Migrate(_) if st.running.is_some() => {
            let _ = reply.send(busy("not started"));
        }
        Request::Migrate(_) if st.stop_after.is_some() => {
            let _ = reply.send(Response::err("the VM is stopping"));
        }
        Request::Migrate(m) => match start_migration(m, reply.clone(), vm, device, waits) {
            Ok(r) => st.running = Some(r),
            Err(why) => {
                let _ = reply.send(Response::err(why));
            }
        },
        Request::CancelMigration => match &st.running {
            Some(r) if r.cancel.cancel() => {
                let _ = reply.send(Response::ok(serde_json::json!({ "cancelled": true })));
            }
            Some(_) => {
                let _ = reply.send(Response::err(
                    "too late: the migration is past Go (its commit point)",
                ));
            }
            None => {
                let _ = reply.send(Response::err("no migration is running"));
            }
        },
        Request::Verify if st.after_go.is_some() => {
            let _ = reply.send(Response::err(
                "the VM is paused after Go (migration outcome unknown): the guest cannot answer",
            ));
        }
        Request::Verify => match vm.mailbox().request_verify() {
            Ok(req) => st.pending.push(PendingVerify {
                req,
                reply: Some(reply),
            }),
            Err(e) => {
                let _ = reply.send(Response::err(e));
            }
        },
        Request::Resume { .. } if st.running.is_some() => {
            let _ = reply.send(busy("not resumed"));
        }
        Request::Resume { force } => match st.after_go.take() {
            None => {
                let _ = reply.send(Response::err(
                    "the VM is not paused after a migration; nothing to resume",
                ));
            }
            Some(held) if !force => {
                st.after_go = Some(held);
                let _ = reply.send(Response::err(
                    "refusing to resume without force: the destination may be running this VM \
                     (two running copies corrupt its disk); check it, then resume with force",
                ));
            }
            Some((report, mut devices)) => {
                tracing::warn!(to = %report.destination, "resuming by force after an unknown migration outcome");
                for d in devices.iter_mut() {
                    d.rollback(vm);
                }
                drop(devices);
                match vm.resume() {
                    Ok(()) => {
                        eprintln!(
                            "ferry: resumed by force after the unknown outcome of the migration to {}",
                            report.destination
                        );
                        st.failed_migrations.push(format!(
                            "outcome unknown after Go to {}; resumed by force",
                            report.destination
                        ));
                        let _ = reply.send(Response::ok(serde_json::json!({ "resumed": true })));
                    }
                    Err(e) => {
                        let _ = reply.send(Response::err(e));
                    }
                }
            }
        },
        Request::Status => {
            let state = if st.after_go.is_some() {
                "paused-after-go"
            } else if st.running.is_some() {
                "migrating"
            } else {
                "running"
            };
            let _ = reply.send(Response::ok(serde_json::json!({
                "state": state,
                "uptime_ms": ms(st.started.elapsed()),
                "progress": vm.mailbox().progress().unwrap_or(0),
                "ram_bytes": vm.ram().size(),
                "verifications": st.verifications.len(),
                "roundtrip": st.roundtrip_done.is_some(),
                "migration": st.running.as_ref().map(|r| {
                    r.progress.lock().unwrap_or_else(|e| e.into_inner()).clone()
                }),
                "unknown_migration": st.after_go.as_ref().map(|(r, _)| r),
                "shadow": device.as_ref().and_then(|d| d.shadow_status()),
                "io_queues": device
                    .as_ref()
                    .and_then(|d| d.config_log())
                    .map(|l| l.io_sqs.len()),
            })));
        }
        Request::MemoryHash if st.running.is_some() => {
            let _ = reply.send(busy("no hash"));
        }
        Request::MemoryHash => {
            let answer = vm.pause().map(|_| migration::hash::memory_hash(vm.ram()));
            // A VM paused after Go stays paused.
            let resumed = if st.after_go.is_some() {
                Ok(())
            } else {
                vm.resume()
            };
            let _ = reply.send(match (answer, resumed) {
                (Ok(h), Ok(())) => Response::ok(serde_json::json!({ "memory_hash": h })),
                (Err(e), _) | (_, Err(e)) => Response::err(e),
            });
        }
        Request::Stop => {
            if st.stop_after.is_some() {
                let _ = reply.send(Response::ok(serde_json::json!({ "stopped": true })));
            } else {
                request_stop(
                    st,
                    VmOutcome::Stopped("stop requested through the API".into()),
                    Some(reply),
                );
            }
        }
    }
}

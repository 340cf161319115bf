//! A passthrough NVMe device for one VM run: optionally a `ferry device nvme` child process
//! (temp socket, stopped at the end), the vfio-user attachment, and its configuration log.
use std::{
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use std::sync::Arc;

use migration::DeviceError;
use passthrough::{AttachOptions, Attachment, ConfigLog};
use shadow::{engine::PreparedRestore, Engine, EngineOptions, EngineStatus};
use vmm::Vm;

use crate::{Error, Result};

/// A `ferry device nvme`-compatible device process to start: `exe device nvme --socket S
/// --backing FILE --size N --block-size B --dstrd D [--create] [--once]`.
#[derive(Clone, Debug)]
pub struct DeviceSpec {
    /// The program (the `ferry` binary: `std::env::current_exe()`).
    pub exe: PathBuf,
    /// Backing file of namespace 1.
    pub backing: PathBuf,
    /// Namespace size (0 = the file's size).
    pub size: u64,
    /// Logical block size: 512 or 4096.
    pub block_size: u32,
    /// Doorbell stride exponent (9 or 0).
    pub dstrd: u8,
    /// Create and size the backing file if needed.
    pub create: bool,
    /// Exit after the first client disconnects.
    pub once: bool,
    /// Always spin on the doorbells (`--poll`) instead of adaptive polling.
    pub poll: bool,
}

/// Where the passthrough device comes from.
#[derive(Clone, Debug)]
pub enum PassthroughSource {
    /// A device process someone else runs.
    Socket(PathBuf),
    /// A device process started (and stopped) by this process.
    Spawn(DeviceSpec),
}

/// How long a started device process may take to listen.
const DEVICE_START: Duration = Duration::from_secs(30);

/// A `ferry device nvme` process this process started.
pub struct DeviceChild {
    child: Child,
    dir: PathBuf,
    /// Its socket.
    pub socket: PathBuf,
}

static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

impl DeviceChild {
    /// Starts `ferry device nvme` with `args` on a fresh socket in a temp directory.
    pub fn spawn(args: &DeviceSpec) -> Result<Self> {
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = crate::scratch::fresh_dir(&format!("ferry-nvme-{n}"))
            .map_err(Error::io("creating the device's scratch directory"))?;
        let socket = dir.join("nvme.sock");
        let mut cmd = Command::new(&args.exe);
        cmd.args(["device", "nvme", "--socket"])
            .arg(&socket)
            .arg("--backing")
            .arg(&args.backing)
            .args(["--size", &args.size.to_string()])
            .args(["--block-size", &args.block_size.to_string()])
            .args(["--dstrd", &args.dstrd.to_string()])
            .stdin(Stdio::null());
        if args.create {
            cmd.arg("--create");
        }
        if args.once {
            cmd.arg("--once");
        }
        if args.poll {
            cmd.arg("--poll");
        }
        // The device dies with this process (killed or crashed), instead of polling forever
        // for a VMM that will never connect.
        // SAFETY: prctl is async-signal-safe; the closure runs in the child between fork and
        // exec and touches nothing else.
        unsafe {
            use std::os::unix::process::CommandExt;
            cmd.pre_exec(|| {
                if libc::prctl(
                    libc::PR_SET_PDEATHSIG,
                    libc::SIGTERM as libc::c_ulong,
                    0,
                    0,
                    0,
                ) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().map_err(Error::io(format!(
            "starting the device process {}",
            args.exe.display()
        )))?;
        let mut c = DeviceChild { child, dir, socket };
        let t0 = Instant::now();
        while !c.socket.exists() {
            let gone = |reason: String| Error::DeviceProcess {
                exe: args.exe.clone(),
                reason,
            };
            if let Some(st) = c
                .child
                .try_wait()
                .map_err(Error::io("waiting for the device process"))?
            {
                return Err(gone(format!("exited with {st} before listening")));
            }
            if t0.elapsed() > DEVICE_START {
                return Err(gone(format!(
                    "socket {} did not appear within {DEVICE_START:?}",
                    c.socket.display()
                )));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(c)
    }

    /// The device process's id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Asks the device to exit (SIGTERM), waits up to 5 s, then kills it.
    pub fn stop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            // SAFETY: kill(2) on our own child's pid.
            unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
            let t0 = Instant::now();
            while matches!(self.child.try_wait(), Ok(None)) && t0.elapsed() < Duration::from_secs(5)
            {
                std::thread::sleep(Duration::from_millis(10));
            }
            if matches!(self.child.try_wait(), Ok(None)) {
                let _ = self.child.kill();
            }
        }
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Drop for DeviceChild {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Starts the device process if `source` asks for one; returns it and the socket to attach.
pub fn device_socket(source: &PassthroughSource) -> Result<(Option<DeviceChild>, PathBuf)> {
    Ok(match source {
        PassthroughSource::Spawn(args) => {
            let c = DeviceChild::spawn(args)?;
            let s = c.socket.clone();
            (Some(c), s)
        }
        PassthroughSource::Socket(s) => (None, s.clone()),
    })
}

/// The destination's restorer: attaches its own device to the arriving VM and rebuilds it
/// from the source's saved state (shadowed, held until [`Engine::realign`]).
pub struct NvmeRestorer {
    source: Option<PassthroughSource>,
    opts: EngineOptions,
    /// The device process started for the VM.
    pub child: Option<DeviceChild>,
    /// The engine, once restored.
    pub engine: Option<Arc<Engine>>,
    /// The device attached to the arriving VM before its state came (outside the downtime).
    attached: Option<Arc<Attachment>>,
    /// The device prepared from the source's pre-copy state (outside the downtime).
    prepared: Option<PreparedRestore>,
}

impl NvmeRestorer {
    /// A restorer that attaches `source` (None: refuse devices). A device process to start
    /// is started now, before any VM arrives, so that the switchover does not wait for it.
    pub fn new(source: Option<PassthroughSource>, opts: EngineOptions) -> Result<Self> {
        let (source, child) = match source {
            Some(s @ PassthroughSource::Spawn(_)) => {
                let (child, socket) = device_socket(&s)?;
                (Some(PassthroughSource::Socket(socket)), child)
            }
            other => (other, None),
        };
        Ok(NvmeRestorer {
            source,
            opts,
            child,
            engine: None,
            attached: None,
            prepared: None,
        })
    }

    /// Attaches the destination's device to `vm` (its process started if needed).
    fn attach(&mut self, vm: &Vm) -> std::result::Result<Attachment, DeviceError> {
        let source = self.source.as_ref().ok_or_else(not_configured)?;
        let (child, socket) = device_socket(source)
            .map_err(|e| DeviceError::failed("starting the destination's device", e))?;
        if child.is_some() {
            self.child = child;
        }
        Attachment::attach(vm, &AttachOptions::new("nvme0", &socket)).map_err(
            DeviceError::while_doing("attaching the destination's device"),
        )
    }
}

impl migration::DeviceRestorer for NvmeRestorer {
    fn prepare(&mut self, vm: &Vm, names: &[String]) -> std::result::Result<(), DeviceError> {
        // The device is attached while the memory arrives: connecting, mapping guest RAM for
        // its DMA and the hypervisor's Identify are then not part of the downtime.
        // A failure here is not final: the restore tries again (and reports it there, once
        // the source has entered shadow mode and can leave it cleanly).
        if names.iter().any(|n| n == "nvme0") && self.source.is_some() && self.engine.is_none() {
            match self.attach(vm) {
                Ok(att) => self.attached = Some(Arc::new(att)),
                Err(e) => tracing::warn!(
                    "attaching the destination's device before the transfer: {}",
                    vmm::ErrorChain(&e)
                ),
            }
        }
        Ok(())
    }

    fn restore(
        &mut self,
        vm: &Vm,
        name: &str,
        state: &[u8],
    ) -> std::result::Result<(), DeviceError> {
        if name != "nvme0" || self.engine.is_some() {
            return Err(DeviceError::NoSlot { name: name.into() });
        }
        if self.source.is_none() {
            return Err(not_configured());
        }
        // Refuse garbage before a device process or an attachment is touched.
        let saved = shadow::engine::device::SavedDevice::decode(state)
            .map_err(|e| DeviceError::InvalidState(e.into()))?;
        let att = match self.attached.take() {
            Some(att) => att,
            None => Arc::new(self.attach(vm)?),
        };
        let prepared = self.prepared.take();
        let engine = Engine::restore_prepared(vm, att, &saved, self.opts, prepared).map_err(
            |e| match e {
                shadow::Error::State(e) => DeviceError::InvalidState(e.into()),
                e => DeviceError::failed("rebuilding the device from its state", e),
            },
        )?;
        self.engine = Some(Arc::new(engine));
        Ok(())
    }

    fn precopy(
        &mut self,
        vm: &Vm,
        name: &str,
        state: &[u8],
    ) -> std::result::Result<(), DeviceError> {
        if name != "nvme0" || self.engine.is_some() || self.prepared.is_some() {
            return Err(DeviceError::NoSlot { name: name.into() });
        }
        if self.source.is_none() {
            return Err(not_configured());
        }
        let pre = shadow::engine::device::PrecopyDevice::decode(state)
            .map_err(|e| DeviceError::InvalidState(e.into()))?;
        let att = match &self.attached {
            Some(att) => att.clone(),
            None => match self.attach(vm) {
                Ok(att) => {
                    let att = Arc::new(att);
                    self.attached = Some(att.clone());
                    att
                }
                Err(e) => {
                    // Not final: the restore attaches again and replays in full.
                    tracing::warn!(
                        "attaching the destination's device for the pre-copy state: {}",
                        vmm::ErrorChain(&e)
                    );
                    return Ok(());
                }
            },
        };
        match Engine::prepare_restore(vm, att, &pre, self.opts) {
            Ok(p) => self.prepared = Some(p),
            Err(shadow::Error::State(e)) => return Err(DeviceError::InvalidState(e.into())),
            // The preparation was undone: the restore replays in full.
            Err(e) => tracing::warn!(
                "preparing the device from its pre-copy state: {}",
                vmm::ErrorChain(&e)
            ),
        }
        Ok(())
    }
}

/// A VM with a passthrough device arrived at a destination started without one.
fn not_configured() -> DeviceError {
    DeviceError::NotConfigured(
        "the VM has a passthrough NVMe device and this destination has none (start `ferry \
         receive` with --nvme-backing FILE or --passthrough nvme=SOCKET)"
            .into(),
    )
}

/// The passthrough device of one session.
pub struct PassthroughSession {
    attachment: Option<Arc<Attachment>>,
    engine: Option<Arc<Engine>>,
    child: Option<DeviceChild>,
    /// Shadow continuously once the guest's queues exist.
    continuous: bool,
    /// When the configuration log last changed (continuous mode waits for it to settle).
    settled: Option<(u64, Instant)>,
    /// Entering continuous shadow mode failed with this (not retried).
    pub shadow_error: Option<String>,
    /// A passthrough virtio-net device of the same VM.
    net: Option<crate::net_session::NetSession>,
}

impl PassthroughSession {
    /// Starts the device if asked and attaches it to `vm` (before the VM starts).
    pub fn start(
        source: &PassthroughSource,
        vm: &Vm,
        continuous: bool,
        opts: EngineOptions,
    ) -> Result<Self> {
        let (child, socket) = device_socket(source)?;
        let attachment = Arc::new(
            Attachment::attach(vm, &AttachOptions::new("nvme0", &socket)).map_err(|source| {
                Error::Passthrough {
                    what: "attaching the passthrough NVMe device",
                    source,
                }
            })?,
        );
        Ok(Self::with(attachment, child, continuous, opts))
    }

    /// A session around an attachment made elsewhere (the migration destination).
    pub fn with(
        attachment: Arc<Attachment>,
        child: Option<DeviceChild>,
        continuous: bool,
        opts: EngineOptions,
    ) -> Self {
        let engine = Arc::new(Engine::new(attachment.clone(), opts));
        PassthroughSession {
            attachment: Some(attachment),
            engine: Some(engine),
            child,
            continuous,
            settled: None,
            shadow_error: None,
            net: None,
        }
    }

    /// An existing engine (the destination built it while restoring).
    pub fn with_engine(engine: Arc<Engine>, child: Option<DeviceChild>, continuous: bool) -> Self {
        PassthroughSession {
            attachment: Some(engine.attachment().clone()),
            engine: Some(engine),
            child,
            continuous,
            settled: None,
            shadow_error: None,
            net: None,
        }
    }

    /// A session of a virtio-net device alone (no NVMe device).
    pub fn net_only(net: crate::net_session::NetSession) -> Self {
        PassthroughSession {
            attachment: None,
            engine: None,
            child: None,
            continuous: false,
            settled: None,
            shadow_error: None,
            net: Some(net),
        }
    }

    /// Adds the VM's virtio-net device.
    pub fn with_net(mut self, net: crate::net_session::NetSession) -> Self {
        self.net = Some(net);
        self
    }

    /// The VM's virtio-net device.
    pub fn net(&self) -> Option<&crate::net_session::NetSession> {
        self.net.as_ref()
    }

    /// The virtio-net shadow engine's status.
    pub fn net_shadow_status(&self) -> Option<shadow::engine::net::NetEngineStatus> {
        self.net.as_ref().and_then(|n| n.shadow_status())
    }

    /// The shadow engine.
    pub fn engine(&self) -> Option<&Arc<Engine>> {
        self.engine.as_ref()
    }

    /// The engine's status.
    pub fn shadow_status(&self) -> Option<EngineStatus> {
        self.engine.as_ref().map(|e| e.status())
    }

    /// True while [`PassthroughSession::tick`] has work to do (continuous mode not entered yet).
    pub fn wants_tick(&self) -> bool {
        self.net.as_ref().is_some_and(|n| n.wants_tick())
            || self.continuous
                && self.shadow_error.is_none()
                && self.engine.as_ref().is_some_and(|e| !e.is_shadowed())
    }

    /// Continuous mode: enters shadow mode once the guest created its I/O queues and its
    /// admin traffic settled (no admin completion for 200 ms).
    pub fn tick(&mut self, vm: &Vm) {
        if let Some(n) = &mut self.net {
            n.tick(vm);
        }
        let (Some(engine), true, None) = (&self.engine, self.continuous, &self.shadow_error) else {
            return;
        };
        if engine.is_shadowed() {
            return;
        }
        let log = engine.attachment().config_log();
        if log.io_sqs.is_empty() {
            return;
        }
        match self.settled {
            Some((n, t)) if n == log.admin_completed => {
                if t.elapsed() < Duration::from_millis(200) {
                    return;
                }
            }
            _ => {
                self.settled = Some((log.admin_completed, Instant::now()));
                return;
            }
        }
        if let Err(e) = engine.enter(vm) {
            let why = vmm::ErrorChain(&e).to_string();
            tracing::error!("entering continuous shadow mode: {why}");
            eprintln!("ferry: continuous shadow mode not entered: {why}");
            self.shadow_error = Some(why);
        }
    }

    /// The configuration log the admin mediation kept.
    pub fn config_log(&self) -> Option<ConfigLog> {
        self.attachment.as_ref().map(|a| a.config_log())
    }

    /// Detaches (the device resets) and stops a device this process started.
    pub fn finish(mut self, vm: &Vm) {
        if let Some(n) = self.net.take() {
            n.finish();
        }
        // The engine stops its poller when the last reference goes.
        self.engine.take();
        if let Some(a) = self.attachment.take() {
            match Arc::try_unwrap(a) {
                Ok(a) => a.detach(vm.memory_slots()),
                Err(_) => tracing::warn!("the attachment is still shared; not detaching"),
            }
        }
        if let Some(mut c) = self.child.take() {
            c.stop();
        }
    }
}

#[cfg(test)]
mod tests {
    use migration::{DeviceError, MigrationError};

    /// What `main` prints (the chain of the anyhow error) names each cause exactly once.
    #[test]
    fn the_edge_prints_each_cause_once() {
        let hook = passthrough::Error::Hook {
            name: "nvme0".into(),
            source: passthrough::HookError::NotInRam {
                gpa: 0x1000,
                size: 0x2000,
            },
        };
        let engine = shadow::Error::Hook {
            what: "moving ring pages onto the copy".into(),
            source: hook,
        };
        let e = MigrationError::Device {
            name: "nvme0".into(),
            source: DeviceError::failed("rebuilding the device from its state", engine),
        };
        let e = anyhow::Error::from(e).context("incoming migration");
        // anyhow's own `{:#}` (what the binary's edge prints) agrees: no Ferry error repeats
        // its source.
        assert_eq!(format!("{e:#}"), vmm::ErrorChain(e.as_ref()).to_string());
        let text = vmm::ErrorChain(e.as_ref()).to_string();
        assert_eq!(
            text,
            "incoming migration: device nvme0: rebuilding the device from its state: shadow \
             engine: moving ring pages onto the copy: passthrough device nvme0: range \
             0x1000+0x2000 is not inside one guest RAM region"
        );
        for part in [
            "rebuilding",
            "moving ring pages",
            "not inside one guest RAM",
        ] {
            assert_eq!(text.matches(part).count(), 1, "{part} in {text}");
        }
    }

    /// An error of another crate that prints its own source too (vfio_user's `Connect` does)
    /// still shows the cause once.
    #[test]
    fn a_cause_repeated_by_another_crate_shows_once() {
        #[derive(Debug)]
        struct Repeats(std::io::Error);
        impl std::fmt::Display for Repeats {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                write!(f, "Error connecting: {}", self.0)
            }
        }
        impl std::error::Error for Repeats {
            fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
                Some(&self.0)
            }
        }
        let os = std::io::Error::from(std::io::ErrorKind::NotFound);
        let e = anyhow::Error::from(Repeats(os)).context("attaching the passthrough NVMe device");
        let text = vmm::ErrorChain(e.as_ref()).to_string();
        assert_eq!(
            text,
            "attaching the passthrough NVMe device: Error connecting: entity not found"
        );
    }

    /// The destination's restorer refuses a garbage or truncated state before it attaches a
    /// device (the socket here does not even exist), a device it has no slot for, and any
    /// device when it was started without one.
    #[test]
    fn the_restorer_refuses_bad_states_before_attaching() {
        use migration::DeviceRestorer;
        let vm = vmm::Vm::new(&vmm::VmConfig {
            ram_size: 32 << 20,
            console: vmm::devices::serial::ConsoleSink::Null,
            ..Default::default()
        })
        .unwrap();
        let missing = std::env::temp_dir().join("ferry-no-such-device.sock");
        let mut r = super::NvmeRestorer::new(
            Some(super::PassthroughSource::Socket(missing)),
            shadow::EngineOptions::default(),
        )
        .unwrap();
        for blob in [
            &[][..],
            &[2, 0, 0, 0][..],
            &[2, 0, 0, 0, 0xff, 0xff, 0xff, 0xff][..],
        ] {
            match r.restore(&vm, "nvme0", blob) {
                Err(DeviceError::InvalidState(_)) => {}
                other => panic!("{blob:?}: {other:?}"),
            }
        }
        assert!(matches!(
            r.restore(&vm, "disk7", &[2, 0, 0, 0]),
            Err(DeviceError::NoSlot { .. })
        ));
        let mut none = super::NvmeRestorer::new(None, shadow::EngineOptions::default()).unwrap();
        assert!(matches!(
            none.restore(&vm, "nvme0", &[2, 0, 0, 0]),
            Err(DeviceError::NotConfigured(_))
        ));
    }
}

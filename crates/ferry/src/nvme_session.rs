//! A passthrough NVMe device for one VM run: optionally a `ferry device nvme` child process
//! (temp socket, stopped at the end), the vfio-user attachment, and its configuration log.
use std::{
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use passthrough::{AttachOptions, Attachment, ConfigLog};
use vmm::Vm;

use crate::nvme_args::{wait_for_socket, DeviceNvmeArgs, PassthroughSource};

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
    pub fn spawn(args: &DeviceNvmeArgs) -> Result<Self> {
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("ferry-nvme-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let socket = dir.join("nvme.sock");
        let exe = std::env::current_exe().context("locating the ferry binary")?;
        let mut cmd = Command::new(exe);
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
        let child = cmd.spawn().context("starting `ferry device nvme`")?;
        let mut c = DeviceChild { child, dir, socket };
        let t0 = Instant::now();
        while !c.socket.exists() {
            if let Some(st) = c
                .child
                .try_wait()
                .context("waiting for the device process")?
            {
                anyhow::bail!("`ferry device nvme` exited with {st} before listening");
            }
            if t0.elapsed() > Duration::from_secs(10) {
                wait_for_socket(&c.socket, Duration::ZERO)?;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(c)
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

/// The passthrough device of one session.
pub struct PassthroughSession {
    attachment: Option<Attachment>,
    child: Option<DeviceChild>,
}

impl PassthroughSession {
    /// Starts the device if asked and attaches it to `vm` (before the VM starts).
    pub fn start(source: &PassthroughSource, vm: &Vm) -> Result<Self> {
        let (child, socket) = match source {
            PassthroughSource::Spawn(args) => {
                let c = DeviceChild::spawn(args)?;
                let s = c.socket.clone();
                (Some(c), s)
            }
            PassthroughSource::Socket(s) => (None, s.clone()),
        };
        let attachment = Attachment::attach(vm, &AttachOptions::new("nvme0", &socket))
            .context("attaching the passthrough NVMe device")?;
        Ok(PassthroughSession {
            attachment: Some(attachment),
            child,
        })
    }

    /// The configuration log the admin mediation kept.
    pub fn config_log(&self) -> Option<ConfigLog> {
        self.attachment.as_ref().map(|a| a.config_log())
    }

    /// Detaches (the device resets) and stops a device this process started.
    pub fn finish(mut self, vm: &Vm) {
        if let Some(a) = self.attachment.take() {
            a.detach(vm.memory_slots());
        }
        if let Some(mut c) = self.child.take() {
            c.stop();
        }
    }
}

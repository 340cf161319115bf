//! A passthrough virtio-net device for one VM run: the attachment and, in continuous shadow
//! mode, its shadow engine, entered once the guest's driver started the device.
use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use passthrough::virtio_net::NetAttachment;
use shadow::{engine::net::NetEngine, engine::net::NetEngineStatus, EngineOptions};
use vmm::Vm;

/// How long the device must have stayed started before the engine enters (the driver's
/// bring-up writes are over).
const SETTLE: Duration = Duration::from_millis(200);

/// The NIC of a session.
pub struct NetSession {
    att: Arc<NetAttachment>,
    engine: Option<Arc<NetEngine>>,
    /// Since when the driver has had DRIVER_OK set.
    running_since: Option<Instant>,
    /// Entering shadow mode failed with this (not retried).
    pub shadow_error: Option<String>,
}

impl NetSession {
    /// `att`, with an engine entering shadow mode continuously when `continuous`.
    pub fn new(att: NetAttachment, continuous: bool, opts: EngineOptions) -> crate::Result<Self> {
        let att = Arc::new(att);
        let engine = continuous
            .then(|| NetEngine::new(att.clone(), opts))
            .transpose()
            .map_err(|source| crate::Error::Shadow {
                what: "starting the virtio-net shadow engine",
                source: Box::new(source),
            })?
            .map(Arc::new);
        Ok(NetSession {
            att,
            engine,
            running_since: None,
            shadow_error: None,
        })
    }

    /// True while [`NetSession::tick`] has work to do (an engine that is not in error: it
    /// waits to enter, or watches for a guest reset to hand over).
    pub fn wants_tick(&self) -> bool {
        self.shadow_error.is_none() && self.engine.is_some()
    }

    /// Enters shadow mode once the driver has run the device for [`SETTLE`]; while shadowed,
    /// hands a guest reset the attachment held to the engine (which lets go of the rings,
    /// then the device resets; shadow mode is entered again once the driver restarted it).
    pub fn tick(&mut self, vm: &Vm) {
        if !self.wants_tick() {
            return;
        }
        let Some(engine) = &self.engine else {
            return;
        };
        if engine.is_shadowed() {
            if self.att.reset_pending() {
                self.running_since = None;
                match engine.reset(vm) {
                    Ok(()) => eprintln!("ferry: virtio-net guest reset; shadow state dropped"),
                    Err(e) => {
                        let why = vmm::ErrorChain(&e).to_string();
                        tracing::error!("handing a guest reset over: {why}");
                        eprintln!("ferry: virtio-net shadow mode abandoned: {why}");
                        // The guest waits for its reset: give it, whatever the rings hold.
                        self.att.set_shadowed(false);
                        if let Err(e) = self.att.finish_reset() {
                            tracing::error!("resetting the device: {}", vmm::ErrorChain(&e));
                        }
                        self.shadow_error = Some(why);
                    }
                }
            }
            return;
        }
        if !self.att.driver_ok() {
            self.running_since = None;
            return;
        }
        let since = *self.running_since.get_or_insert_with(Instant::now);
        if since.elapsed() < SETTLE {
            return;
        }
        match engine.enter(vm) {
            Ok(()) => eprintln!(
                "ferry: virtio-net shadow mode entered ({:?} notifications)",
                engine.options().interception
            ),
            Err(e) => {
                let why = vmm::ErrorChain(&e).to_string();
                tracing::error!("entering continuous virtio-net shadow mode: {why}");
                eprintln!("ferry: continuous virtio-net shadow mode not entered: {why}");
                self.shadow_error = Some(why);
            }
        }
    }

    /// The engine's status (None without an engine).
    pub fn shadow_status(&self) -> Option<NetEngineStatus> {
        self.engine.as_ref().map(|e| e.status())
    }

    /// Stops the engine and detaches the device.
    pub fn finish(mut self) {
        self.engine.take();
        match Arc::try_unwrap(self.att) {
            Ok(a) => a.detach(),
            Err(_) => tracing::warn!("the virtio-net attachment is still shared; not detaching"),
        }
    }
}

//! Devices' pre-copy states between two VMs in one process over loopback TCP, under the real
//! /dev/kvm: sent once during pre-copy, before the switchover state; devices without one
//! migrate as before; a destination that fails to take one leaves the VM running on the
//! source.
mod common;

use std::{
    net::TcpListener,
    sync::{Arc, Mutex},
    time::Duration,
};

use migration::{DestinationOptions, DeviceError, DeviceRestorer, MigratableDevice, SourceOptions};
use vmm::{Vm, VmConfig};

use common::{progress, wait_until};

fn config() -> VmConfig {
    common::config(64 << 20)
}

fn dirty_vm() -> Vm {
    common::dirty_vm(64 << 20, 8 << 20, 3)
}

/// A source device whose pre-copy state is ready only from its `ready_at`-th asking on
/// (None: it has none), and which records what the migration asked of it.
struct FakeDevice {
    name: &'static str,
    ready_at: Option<u32>,
    asked: u32,
    log: Arc<Mutex<Vec<String>>>,
}

impl MigratableDevice for FakeDevice {
    fn name(&self) -> String {
        self.name.into()
    }
    fn prepare(&mut self, _vm: &Vm) -> Result<(), DeviceError> {
        Ok(())
    }
    fn take_dirty_pages(&mut self) -> Vec<u64> {
        Vec::new()
    }
    fn precopy_state(&mut self, _vm: &Vm) -> Result<Option<Vec<u8>>, DeviceError> {
        let Some(at) = self.ready_at else {
            return Ok(None);
        };
        self.asked += 1;
        self.log
            .lock()
            .unwrap()
            .push(format!("asked {}", self.name));
        Ok((self.asked >= at).then(|| format!("pre {}", self.name).into_bytes()))
    }
    fn pause(&mut self, _vm: &Vm) -> Result<(), DeviceError> {
        self.log
            .lock()
            .unwrap()
            .push(format!("pause {}", self.name));
        Ok(())
    }
    fn save(&mut self) -> Result<Vec<u8>, DeviceError> {
        Ok(format!("final {}", self.name).into_bytes())
    }
    fn rollback(&mut self, _vm: &Vm) {
        self.log
            .lock()
            .unwrap()
            .push(format!("rollback {}", self.name));
    }
}

/// Records what it was given; refuses pre-copy states when `refuse`.
struct Recorder {
    got: Vec<String>,
    refuse: bool,
}

impl DeviceRestorer for Recorder {
    fn precopy(&mut self, _vm: &Vm, name: &str, state: &[u8]) -> Result<(), DeviceError> {
        if self.refuse {
            return Err(DeviceError::NotConfigured("no pre-copy here".into()));
        }
        self.got.push(format!(
            "precopy {name}: {}",
            String::from_utf8_lossy(state)
        ));
        Ok(())
    }
    fn restore(&mut self, _vm: &Vm, name: &str, state: &[u8]) -> Result<(), DeviceError> {
        self.got.push(format!(
            "restore {name}: {}",
            String::from_utf8_lossy(state)
        ));
        Ok(())
    }
}

type Received = migration::Result<(migration::Incoming, Vec<String>)>;

fn destination(refuse: bool) -> (String, std::thread::JoinHandle<Received>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let dest = std::thread::spawn(move || {
        let (stream, _) = listener.accept().unwrap();
        let opts = DestinationOptions {
            devices: vec!["dev0".into(), "dev1".into()],
            ..Default::default()
        };
        let mut r = Recorder {
            got: Vec::new(),
            refuse,
        };
        migration::receive(stream, &config(), &opts, &mut r).map(|i| (i, r.got))
    });
    (addr, dest)
}

fn devices(log: &Arc<Mutex<Vec<String>>>) -> Vec<Box<dyn MigratableDevice>> {
    vec![
        Box::new(FakeDevice {
            name: "dev0",
            ready_at: Some(2),
            asked: 0,
            log: log.clone(),
        }),
        Box::new(FakeDevice {
            name: "dev1",
            ready_at: None,
            asked: 0,
            log: log.clone(),
        }),
    ]
}

/// The pre-copy round limit and a zero downtime target make the migration run several
/// rounds, so a state that is ready only at the second asking still goes out in pre-copy.
fn opts() -> SourceOptions {
    SourceOptions {
        downtime: Duration::ZERO,
        max_rounds: 4,
        ..Default::default()
    }
}

#[test]
fn a_precopy_state_goes_once_before_the_switchover_state() {
    let (addr, dest) = destination(false);
    let vm = dirty_vm();
    let log = Arc::new(Mutex::new(Vec::new()));
    let mut devs = devices(&log);
    migration::migrate(&vm, &mut devs, &addr, &opts(), &mut |_| {}).unwrap();
    let (incoming, got) = dest.join().unwrap().unwrap();
    assert_eq!(
        got,
        [
            "precopy dev0: pre dev0",
            "restore dev0: final dev0",
            "restore dev1: final dev1"
        ]
    );
    let log = log.lock().unwrap().clone();
    // Asked until it had one (twice), then never again; before the pause.
    assert_eq!(
        log,
        ["asked dev0", "asked dev0", "pause dev0", "pause dev1"]
    );
    incoming.vm.stop("test over").unwrap();
}

#[test]
fn a_destination_refusing_a_precopy_state_leaves_the_source_running() {
    let (addr, dest) = destination(true);
    let vm = dirty_vm();
    let log = Arc::new(Mutex::new(Vec::new()));
    let mut devs = devices(&log);
    let err = migration::migrate(&vm, &mut devs, &addr, &opts(), &mut |_| {}).unwrap_err();
    let dest_err = dest.join().unwrap().err().unwrap();
    assert!(
        dest_err.to_string().contains("dev0"),
        "the destination names the device: {dest_err}"
    );
    assert!(
        migration::chain(&err).contains("no pre-copy here"),
        "the source learns why: {}",
        migration::chain(&err)
    );
    let log = log.lock().unwrap().clone();
    assert!(log.contains(&"rollback dev0".to_string()), "{log:?}");
    assert!(!log.iter().any(|l| l.starts_with("pause")), "{log:?}");
    let p = progress(&vm);
    wait_until("the source VM keeps running", || progress(&vm) != p);
}

//! The device's polling thread: adaptive polling sleeps when there is nothing to do and a kick
//! (a host-side doorbell or register write) wakes it; `--poll` (always spin) never sleeps.
use std::time::{Duration, Instant};

use nvme_device::{DeviceConfig, NvmeDevice, PollMode};

const LIMIT: Duration = Duration::from_secs(30);

fn device(tag: &str) -> (NvmeDevice, std::path::PathBuf) {
    let dir = std::env::temp_dir().join(format!("nvme-poll-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let dev = NvmeDevice::new(&DeviceConfig {
        socket: dir.join("s.sock"),
        backing: dir.join("disk"),
        size: 1 << 20,
        block_size: 512,
        dstrd: 9,
        create: true,
    })
    .unwrap();
    (dev, dir)
}

/// Waits (bounded) until `f` holds for the device's counters.
fn until(dev: &NvmeDevice, what: &str, f: impl Fn(&nvme_device::Stats) -> bool) {
    let t0 = Instant::now();
    while !f(&dev.stats()) {
        assert!(t0.elapsed() < LIMIT, "{what}: {:?}", dev.stats());
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[test]
fn an_idle_device_sleeps_and_a_kick_wakes_it() {
    let (dev, dir) = device("adaptive");
    // Nothing to do (no client): the poller goes to sleep, again and again.
    until(&dev, "the idle poller never slept", |s| s.poll_sleeps >= 3);
    // A kick (here: the mode set again, which kicks like a trapped doorbell write) ends a sleep.
    let t0 = Instant::now();
    while dev.stats().poll_kicked == 0 {
        assert!(
            t0.elapsed() < LIMIT,
            "no sleep ended by a kick: {:?}",
            dev.stats()
        );
        dev.set_poll_mode(PollMode::Adaptive);
        std::thread::sleep(Duration::from_millis(1));
    }
    drop(dev);
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn an_always_spinning_device_never_sleeps() {
    let (dev, dir) = device("spin");
    dev.set_poll_mode(PollMode::Spin);
    // At most one sleep begun before the mode took effect may still be counted; over an
    // observation window (any length: a descheduled device only makes it pass trivially) no
    // further sleep may start.
    let before = dev.stats().poll_sleeps;
    std::thread::sleep(Duration::from_millis(50));
    let after = dev.stats().poll_sleeps;
    assert!(
        after <= before + 1,
        "{before} -> {after}: {:?}",
        dev.stats()
    );
    drop(dev);
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn the_device_advertises_the_wake_protocol_and_sleeps_while_the_host_kicks() {
    let (dev, dir) = device("protocol");
    let w = dev
        .wake_words()
        .expect("the device advertises the wake protocol");
    // A host-side forwarder says it kicks after every doorbell: the idle device still sleeps
    // (sooner), and the forwarder's kick ends a sleep.
    w.host_kicks.store(1, std::sync::atomic::Ordering::SeqCst);
    until(&dev, "the idle poller never slept", |s| s.poll_sleeps >= 3);
    let t0 = Instant::now();
    let kicked = dev.stats().poll_kicked;
    while dev.stats().poll_kicked == kicked {
        assert!(
            t0.elapsed() < LIMIT,
            "no sleep ended by a kick: {:?}",
            dev.stats()
        );
        nvme_device::wake::kick_word(w.device);
        std::thread::sleep(Duration::from_millis(1));
    }
    // Nobody waits on the host word: it stays awake.
    assert_eq!(
        w.host.load(std::sync::atomic::Ordering::SeqCst),
        nvme_device::wake::AWAKE
    );
    drop(dev);
    let _ = std::fs::remove_dir_all(dir);
}

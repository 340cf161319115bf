//! Every file of every target's corpus (`fuzz/corpus/TARGET`: the seeds, what the fuzzer
//! kept, and the reproducers of every crash it found) goes through the target's body, as
//! the fuzzer runs it, on the stable toolchain. A file that panics fails the test, named.
use std::panic::{catch_unwind, AssertUnwindSafe};

fn replay(target: &str) {
    let body = fuzz_replay::body(target).expect("a known target");
    let dir = fuzz_replay::fuzz_dir().join("corpus").join(target);
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.expect("directory entry").path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    assert!(!files.is_empty(), "{} has no corpus", dir.display());
    let mut failed = Vec::new();
    for f in &files {
        let data = std::fs::read(f).expect("corpus file");
        if catch_unwind(AssertUnwindSafe(|| body(&data))).is_err() {
            failed.push(f.display().to_string());
        }
    }
    if target == "vfio_user_stream" {
        // Its device listens on a scratch socket for the process's life.
        let socket = format!("ferry-fuzz-{}-vfio-user.sock", std::process::id());
        let _ = std::fs::remove_file(std::env::temp_dir().join(socket));
    }
    assert!(
        failed.is_empty(),
        "{target}: these inputs panic: {failed:#?}"
    );
    eprintln!("{target}: {} inputs replayed", files.len());
}

macro_rules! targets {
    ($($name:ident),* $(,)?) => {
        $(#[test] fn $name() { replay(stringify!($name)); })*

        #[test]
        fn every_target_is_replayed() {
            let here = [$(stringify!($name)),*];
            for (t, _) in fuzz_replay::TARGETS {
                assert!(here.contains(t), "no replay test for target {t}");
            }
            // And every target has its fuzz/fuzz_targets file.
            for (t, _) in fuzz_replay::TARGETS {
                let f = fuzz_replay::fuzz_dir().join("fuzz_targets").join(format!("{t}.rs"));
                assert!(f.is_file(), "{} is missing", f.display());
            }
        }
    };
}

targets!(
    migration_destination,
    roce_mux,
    rc_responder,
    pvrdma_commands,
    nvme_submission,
    virtio_queue,
    nvme_registers,
    vfio_user_stream,
    guest_abi,
    device_state,
);

/// Writes the seed corpora: `FUZZ_WRITE_SEEDS=1 cargo test -p fuzz-replay --test corpus
/// write_seeds -- --ignored`.
#[test]
#[ignore = "writes fuzz/corpus; run on purpose"]
fn write_seeds() {
    let n = fuzz_replay::seeds::write_all().expect("writing seeds");
    eprintln!("{n} seed files written");
}

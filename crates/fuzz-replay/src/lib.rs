//! The fuzz targets of `fuzz/` (cargo-fuzz, nightly) as a table of the library bodies they
//! call, so that a stable `cargo test` can replay every corpus file through the same code
//! (`tests/corpus.rs`), and the writer of the seed corpora (`seeds`).
#![deny(missing_docs)]

use std::path::PathBuf;

pub mod seeds;

/// A fuzz target's body.
pub type Body = fn(&[u8]);

/// Every fuzz target: its name (the `fuzz/fuzz_targets/NAME.rs` binary and the
/// `fuzz/corpus/NAME` directory) and the body it runs.
pub const TARGETS: &[(&str, Body)] = &[
    (
        "migration_destination",
        migration::fuzzing::destination_stream,
    ),
    ("roce_mux", rdma::fuzzing::roce_mux),
    ("rc_responder", rdma::fuzzing::rc_responder),
    ("pvrdma_commands", vrdma::fuzzing::command_channel),
    ("nvme_submission", shadow::fuzzing::nvme_submission),
    ("virtio_queue", shadow::fuzzing::virtio_queue),
    ("nvme_registers", nvme_device::fuzzing::register_file),
    ("vfio_user_stream", nvme_device::fuzzing::vfio_user_stream),
    ("guest_abi", vmm::fuzzing::guest_abi),
    ("device_state", shadow::fuzzing::device_state),
];

/// `fuzz/` at the top of the repository.
pub fn fuzz_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fuzz")
}

/// The body of target `name`.
pub fn body(name: &str) -> Option<Body> {
    TARGETS.iter().find(|(n, _)| *n == name).map(|(_, b)| *b)
}

//! The binary's side of a VM session: the HTTP control API on its Unix socket in front of the
//! library's supervisor (`control`), and errors turned into the binary's `anyhow` at the edge.
use std::time::Instant;

pub use control::session::{BootSpec, SessionReport, SessionSpec, Verification};
use control::{command::CommandSource, passthrough::PassthroughSession, signals::SignalState};

/// Serves `spec.api_socket` (if any) before anything else, so that a client waiting for the
/// socket finds it as soon as the process runs.
fn serve(spec: &SessionSpec) -> anyhow::Result<Option<Box<dyn CommandSource>>> {
    Ok(spec
        .api_socket
        .as_deref()
        .map(crate::api::serve)
        .transpose()?
        .map(|a| Box::new(a) as Box<dyn CommandSource>))
}

/// Builds a VM, boots the guest, and supervises it to its end (control API included).
pub fn run(
    boot: &BootSpec,
    spec: &SessionSpec,
    process_start: Instant,
    signals: &SignalState,
) -> anyhow::Result<SessionReport> {
    control::session::check(spec)?;
    let api = serve(spec)?;
    Ok(control::session::run(
        boot,
        spec,
        api,
        process_start,
        signals,
    )?)
}

/// Supervises a VM that arrived by migration.
pub fn supervise(
    vm: vmm::Vm,
    spec: &SessionSpec,
    process_start: Instant,
    signals: &SignalState,
    incoming: migration::ReceiveReport,
    device: Option<PassthroughSession>,
) -> anyhow::Result<SessionReport> {
    let api = serve(spec)?;
    Ok(control::supervisor::supervise(
        vm,
        spec,
        api,
        process_start,
        signals,
        Some(incoming),
        device,
    )?)
}

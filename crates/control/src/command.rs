//! The typed command interface of a running VM: [`Request`]s in, [`Response`]s out (zero or
//! more progress events, then one result). A [`CommandSource`] delivers them to the
//! supervisor's event loop: the `ferry` binary's HTTP API on a Unix socket is one; anything
//! with a channel and an eventfd can be another (an in-process controller, a test).
use std::{
    os::fd::RawFd,
    sync::mpsc::{Receiver, Sender},
};

use serde::{Deserialize, Serialize};

/// Delivers requests to the supervisor and wakes its event loop.
pub trait CommandSource: Send {
    /// Requests waiting for the supervisor.
    fn requests(&self) -> &Receiver<Pending>;
    /// A descriptor that becomes readable after requests were sent (an eventfd the source
    /// writes; the loop reads it back to zero).
    fn wake_fd(&self) -> RawFd;
}

/// Parameters of a migration request.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MigrateRequest {
    /// `ADDR:PORT` of a `ferry receive`.
    pub to: String,
    /// Downtime target in milliseconds.
    #[serde(default = "default_downtime")]
    pub downtime_ms: u64,
    /// Most pre-copy rounds after round 0.
    #[serde(default = "default_rounds")]
    pub max_rounds: u32,
    /// "finish" or "abort" when the round limit is hit.
    #[serde(default = "default_limit")]
    pub on_limit: migration::LimitPolicy,
    /// Hash guest RAM at the pause (debug; compare with the destination's).
    #[serde(default)]
    pub debug_hash: bool,
    /// Cap on the pre-copy sending rate in bytes per second on the wire, all streams together
    /// (absent: no cap).
    #[serde(default)]
    pub max_bandwidth: Option<u64>,
    /// Compression of guest memory on the wire: "none" (absent), "zstd" or "zstd:LEVEL".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compress: Option<migration::Compression>,
    /// Negative control: migrate a passthrough device without reporting the pages it writes
    /// (unsafe: the destination's memory is expected to be corrupt).
    #[serde(default)]
    pub unsafe_no_shadow: bool,
    /// TLS files (paths read by the VM's process); absent: plain TCP.
    #[serde(default)]
    pub tls: Option<migration::TlsFiles>,
    /// Name the destination's certificate must carry.
    #[serde(default)]
    pub tls_server_name: Option<String>,
    /// Allow plain TCP to a destination that is not loopback.
    #[serde(default)]
    pub insecure_no_auth: bool,
    /// Data channels for guest memory (absent: the default; 0: the main connection only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub streams: Option<u32>,
}

fn default_downtime() -> u64 {
    50
}
fn default_rounds() -> u32 {
    30
}
fn default_limit() -> migration::LimitPolicy {
    migration::LimitPolicy::Finish
}

/// A request.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "kebab-case")]
pub enum Request {
    /// Live-migrate the VM.
    Migrate(MigrateRequest),
    /// Ask the guest to verify its ledger and wait for the answer.
    Verify,
    /// State and progress of the VM.
    Status,
    /// Hash of all guest RAM, taken with the vCPUs briefly paused (debug).
    MemoryHash,
    /// Stop the VM.
    Stop,
    /// Cancel the running migration (before Go; the VM keeps running here).
    CancelMigration,
    /// Resume a VM paused after Go whose migration outcome is unknown (`force` required).
    Resume {
        /// The operator checked that the destination does not run the VM.
        #[serde(default)]
        force: bool,
    },
}

/// A response line.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "kebab-case")]
pub enum Response {
    /// Migration progress.
    Progress(migration::Progress),
    /// The final answer.
    Result {
        /// Whether the request succeeded.
        ok: bool,
        /// What it produced.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        data: Option<serde_json::Value>,
        /// Why it failed.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        error: Option<String>,
    },
}

impl Response {
    /// A successful result.
    pub fn ok(data: impl Serialize) -> Response {
        Response::Result {
            ok: true,
            data: serde_json::to_value(data).ok(),
            error: None,
        }
    }

    /// A failed result.
    pub fn err(e: impl std::fmt::Display) -> Response {
        Response::Result {
            ok: false,
            data: None,
            error: Some(e.to_string()),
        }
    }
}

/// A request waiting for the supervisor, with the channel its responses go to.
pub struct Pending {
    /// The request.
    pub request: Request,
    /// Where responses go (the connection thread writes them to the client).
    pub reply: Sender<Response>,
}

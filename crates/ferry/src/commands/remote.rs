//! `ferry remote`: a small client of the HTTP API (Cloud Hypervisor's `ch-remote` is the
//! model). Prints each answer as JSON on stdout — a migration's events one line each as they
//! come — and exits 1 when the API answered an error.
use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Subcommand};

use crate::api::{self, MigrateRequest, Request};

/// `ferry remote`.
#[derive(Args, Debug)]
pub struct RemoteArgs {
    /// The VM's API socket (`ferry run --api-socket`, `ferry receive --api-socket`).
    #[arg(long, value_name = "PATH")]
    pub api_socket: PathBuf,
    #[command(subcommand)]
    pub call: RemoteCall,
}

/// The endpoints.
#[derive(Subcommand, Debug)]
pub enum RemoteCall {
    /// `GET /api/v1/vmm.ping`: is the VMM there.
    Ping,
    /// `GET /api/v1/vm.info`: state and progress of the VM.
    Info,
    /// `PUT /api/v1/vm.verify`: the guest checks its ledger.
    Verify,
    /// `GET /api/v1/vm.memory-hash`: hash of all guest RAM (debug).
    MemoryHash,
    /// `PUT /api/v1/vm.shutdown`: stop the VM.
    Shutdown,
    /// `PUT /api/v1/vm.resume`: resume a VM paused after Go of a migration whose outcome is
    /// unknown.
    Resume {
        /// You checked that the destination does not run this VM.
        #[arg(long)]
        force: bool,
    },
    /// `PUT /api/v1/vm.send-migration`: live-migrate to a `ferry receive`, printing each
    /// progress event and then the result (NDJSON).
    SendMigration {
        /// `ADDR:PORT` of the destination.
        #[arg(long)]
        to: String,
        /// The whole request body as JSON, for options without a flag here (`tls`, ...);
        /// `--to` still sets the destination.
        #[arg(long, value_name = "JSON")]
        body: Option<String>,
    },
}

pub fn run(args: RemoteArgs) -> anyhow::Result<i32> {
    let request = match args.call {
        RemoteCall::Ping => None,
        RemoteCall::Info => Some(Request::Status),
        RemoteCall::Verify => Some(Request::Verify),
        RemoteCall::MemoryHash => Some(Request::MemoryHash),
        RemoteCall::Shutdown => Some(Request::Stop),
        RemoteCall::Resume { force } => Some(Request::Resume { force }),
        RemoteCall::SendMigration { to, body } => {
            let mut b: serde_json::Value = match body {
                Some(b) => serde_json::from_str(&b).context("--body is not JSON")?,
                None => serde_json::json!({}),
            };
            let obj = b.as_object_mut().context("--body must be a JSON object")?;
            obj.insert("to".into(), to.into());
            let m: MigrateRequest =
                serde_json::from_value(b).context("--body is not a migration request")?;
            Some(Request::Migrate(m))
        }
    };
    let (method, path, body) = match &request {
        Some(r) => api::route_of(r),
        None => api::route_of_ping(),
    };
    let answer = api::send(&args.api_socket, method, &path, body.as_ref(), |line| {
        println!("{line}");
    })?;
    if !answer.streamed {
        println!("{}", answer.body);
    }
    let failed = !(200..300).contains(&answer.status) || answer.body["ok"] == false;
    if failed {
        let why = answer.body["error"].as_str().unwrap_or("no reason given");
        eprintln!("ferry: {method} {path}: {} {why}", answer.status);
        return Ok(1);
    }
    Ok(0)
}

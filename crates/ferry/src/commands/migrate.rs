//! `ferry migrate`: ask a running `ferry run --api-socket` to live-migrate its VM, show the
//! progress, print the report.
use std::io::IsTerminal;

use anyhow::Context;
use indicatif::{ProgressBar, ProgressStyle};
use migration::{LimitPolicy, MigrationReport, Outcome};

use crate::{
    api::{self, MigrateRequest, Request, Response},
    cli::{MigrateArgs, OnLimit, ResumeArgs},
};

/// Exit status of `ferry migrate` when Go was sent but the destination never confirmed.
pub const EXIT_UNKNOWN: i32 = 3;

/// `ferry resume --force`: resume a source VM paused after Go.
pub fn resume(args: ResumeArgs) -> anyhow::Result<i32> {
    let answer = api::call(
        &args.api_socket,
        &Request::Resume { force: args.force },
        |_| {},
    )?;
    match answer {
        Response::Result { ok: true, data, .. } => {
            if args.json {
                println!("{}", data.unwrap_or_default());
            } else {
                println!("resumed");
            }
            Ok(0)
        }
        Response::Result { error, .. } => {
            let why = error.unwrap_or_else(|| "no reason given".into());
            if args.json {
                println!("{}", serde_json::json!({ "ok": false, "error": why }));
            }
            eprintln!("ferry: not resumed: {why}");
            Ok(1)
        }
        Response::Progress(_) => unreachable!("api::call returns only results"),
    }
}

pub fn run(args: MigrateArgs) -> anyhow::Result<i32> {
    // The files are read by the VM's process, which may run elsewhere in the file tree.
    let tls = args
        .tls
        .files()
        .map(|f| -> anyhow::Result<migration::TlsFiles> {
            let abs = |p: &std::path::Path| {
                std::path::absolute(p).with_context(|| format!("TLS file {}", p.display()))
            };
            Ok(migration::TlsFiles {
                cert: abs(&f.cert)?,
                key: abs(&f.key)?,
                ca: abs(&f.ca)?,
            })
        })
        .transpose()?;
    let request = Request::Migrate(MigrateRequest {
        to: args.to.clone(),
        downtime_ms: args.downtime_ms,
        max_rounds: args.max_rounds,
        on_limit: match args.on_limit {
            OnLimit::Finish => LimitPolicy::Finish,
            OnLimit::Abort => LimitPolicy::Abort,
        },
        debug_hash: args.debug_hash,
        max_bandwidth: args.max_bandwidth,
        compress: args.compress,
        unsafe_no_shadow: args.unsafe_no_shadow,
        tls,
        tls_server_name: args.tls_server_name.clone(),
        insecure_no_auth: args.tls.insecure_no_auth,
        streams: args.streams,
    });
    let bar = if std::io::stderr().is_terminal() && !args.json {
        let b = ProgressBar::new_spinner();
        b.set_style(
            ProgressStyle::with_template("{spinner} {elapsed} {msg}").expect("valid template"),
        );
        b.enable_steady_tick(std::time::Duration::from_millis(100));
        Some(b)
    } else {
        None
    };
    let answer = api::call(&args.api_socket, &request, |p| {
        if let Some(b) = &bar {
            b.set_message(format!(
                "{} round {}: {} MiB sent, {} pages dirty{}",
                p.phase,
                p.round,
                p.bytes >> 20,
                p.dirty_pages,
                if p.throttle_pct > 0 {
                    format!(", vCPUs throttled {}%", p.throttle_pct)
                } else {
                    String::new()
                }
            ));
        }
    });
    if let Some(b) = &bar {
        b.finish_and_clear();
    }
    match answer? {
        Response::Result { ok: true, data, .. } => {
            let data = data.unwrap_or_default();
            let report: MigrationReport = serde_json::from_value(data.clone())?;
            if args.json {
                println!("{}", serde_json::to_string_pretty(&data)?);
            } else if report.outcome == Outcome::Completed {
                print_human(&report);
            }
            if report.outcome == Outcome::Unknown {
                eprintln!(
                    "ferry: OUTCOME UNKNOWN: Go was sent to {} but it never confirmed ({}). The VM \
                     is paused on the source and will not run there on its own. Check the \
                     destination: if it runs the VM, stop the source; if not, `ferry resume \
                     --api-socket {} --force`.",
                    report.destination,
                    report.unknown_reason.as_deref().unwrap_or("no reason"),
                    args.api_socket.display()
                );
                return Ok(EXIT_UNKNOWN);
            }
            Ok(0)
        }
        Response::Result { error, .. } => {
            let why = error.unwrap_or_else(|| "no reason given".into());
            if args.json {
                println!(
                    "{}",
                    serde_json::json!({ "ok": false, "outcome": "failed", "error": why })
                );
            }
            eprintln!("ferry: migration failed (the VM keeps running on the source): {why}");
            Ok(1)
        }
        Response::Progress(_) => unreachable!("api::call returns only results"),
    }
}

fn print_human(r: &MigrationReport) {
    println!(
        "migrated {} MiB to {} in {:.0} ms, downtime {:.1} ms (target {:.0} ms){}{}",
        r.ram_bytes >> 20,
        r.destination,
        r.total_ms,
        r.downtime_ms,
        r.downtime_target_ms,
        if r.debug_hash_ms > 0.0 {
            format!(", +{:.0} ms debug hashing", r.debug_hash_ms)
        } else {
            String::new()
        },
        if r.hit_round_limit {
            ", round limit reached"
        } else {
            ""
        }
    );
    println!("  round  pages     zero   MiB      ms   dirty(kvm/vmm/dev)");
    for x in &r.rounds {
        println!(
            "  {:>5}{} {:>8} {:>6} {:>6.1} {:>7.1}   {}/{}/{}",
            x.round,
            if x.paused { "*" } else { " " },
            x.pages,
            x.zero_pages,
            x.bytes as f64 / (1 << 20) as f64,
            x.ms,
            x.dirty_kvm,
            x.dirty_vmm,
            x.dirty_device
        );
    }
    println!(
        "  zero pages skipped {}, {:.1} MiB sent, {:.0} MB/s  (* = vCPUs paused)",
        r.zero_pages_skipped,
        r.bytes as f64 / (1 << 20) as f64,
        r.bandwidth_mbps
    );
    for line in r.figures() {
        println!("  {line}");
    }
    if let Some(h) = &r.memory_hash {
        println!("  memory hash at pause {h}");
    }
}

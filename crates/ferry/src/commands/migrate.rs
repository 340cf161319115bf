//! `ferry migrate`: ask a running `ferry run --api-socket` to live-migrate its VM, show the
//! progress, print the report.
use std::io::IsTerminal;

use indicatif::{ProgressBar, ProgressStyle};
use migration::{LimitPolicy, MigrationReport};

use crate::{
    api::{self, MigrateRequest, Request, Response},
    cli::{MigrateArgs, OnLimit},
};

pub fn run(args: MigrateArgs) -> anyhow::Result<i32> {
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
        unsafe_no_shadow: args.unsafe_no_shadow,
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
                "{} round {}: {} MiB sent, {} pages dirty",
                p.phase,
                p.round,
                p.bytes >> 20,
                p.dirty_pages
            ));
        }
    });
    if let Some(b) = &bar {
        b.finish_and_clear();
    }
    match answer? {
        Response::Result { ok: true, data, .. } => {
            let data = data.unwrap_or_default();
            if args.json {
                println!("{}", serde_json::to_string_pretty(&data)?);
            } else {
                let report: MigrationReport = serde_json::from_value(data)?;
                print_human(&report);
            }
            Ok(0)
        }
        Response::Result { error, .. } => {
            let why = error.unwrap_or_else(|| "no reason given".into());
            if args.json {
                println!("{}", serde_json::json!({ "ok": false, "error": why }));
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
    if let Some(h) = &r.memory_hash {
        println!("  memory hash at pause {h}");
    }
}

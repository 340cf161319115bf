#!/bin/sh
# Runs fuzz targets one after the other, then merges what increased coverage into the
# checked-in corpus. Usage: fuzz/run.sh [SECONDS [TARGET...]] (default: 600 s, every target).
# Needs the nightly toolchain and cargo-fuzz (see README.md). Logs: fuzz/logs/TARGET.log.
set -eu
cd "$(dirname "$0")"
secs=${1:-600}
[ $# -gt 0 ] && shift
targets=${*:-$(cargo +nightly fuzz list)}
cargo +nightly fuzz build -s none -a $targets 2>/dev/null || cargo +nightly fuzz build -s none -a
bin=target/x86_64-unknown-linux-gnu/release
mkdir -p logs
for t in $targets; do
    mkdir -p "work/$t" "artifacts/$t"
    # New inputs go to work/TARGET; corpus/TARGET is read as seeds.
    "$bin/$t" "work/$t" "corpus/$t" -max_total_time="$secs" -timeout=20 -rss_limit_mb=2048 \
        -print_final_stats=1 -artifact_prefix="artifacts/$t/" >"logs/$t.log" 2>&1 || {
        echo "$t: crashed, see logs/$t.log and artifacts/$t/" >&2
        continue
    }
    # Keep only what adds coverage to the checked-in corpus.
    "$bin/$t" -merge=1 "corpus/$t" "work/$t" >>"logs/$t.log" 2>&1
    grep -E '^#[0-9]+ +DONE' "logs/$t.log" | tail -1 | sed "s/^/$t: /"
done

#!/bin/sh
# Shrinks each checked-in corpus to a smallest set of inputs with the same edge coverage
# (libFuzzer -merge=1 -use_counters=0 into an empty directory), keeping the named files: the
# seeds and the crash reproducers. Usage: fuzz/minimize.sh [TARGET...] (default: every target).
set -eu
cd "$(dirname "$0")"
targets=${*:-$(cargo +nightly fuzz list)}
cargo +nightly fuzz build -s none -a >/dev/null 2>&1
bin=target/x86_64-unknown-linux-gnu/release
for t in $targets; do
    rm -rf "min/$t"
    mkdir -p "min/$t"
    "$bin/$t" -merge=1 -use_counters=0 "min/$t" "corpus/$t" >/dev/null 2>&1
    # Inputs the fuzzer kept are named by their SHA-1; they are replaced by the minimized set.
    find "corpus/$t" -type f -regextype posix-extended -regex '.*/[0-9a-f]{40}' -delete
    cp "min/$t"/* "corpus/$t"/ 2>/dev/null || true
    # A minimized input that is a named file already goes again.
    for f in "corpus/$t"/*; do
        case "$(basename "$f")" in
        ????????????????????????????????????????) ;;
        *) rm -f "corpus/$t/$(sha1sum "$f" | cut -c1-40)" ;;
        esac
    done
    echo "$t: $(ls "corpus/$t" | wc -l) files, $(cat "corpus/$t"/* | wc -c) bytes"
done
rm -rf min

#!/usr/bin/env bash
# Fuzz every target in fuzz/ for SECONDS each (default 30), with libFuzzer
# through cargo-fuzz; fail if any target crashes, hangs (> 30 s on one input)
# or runs out of memory (> 2 GiB).
#
#   scripts/fuzz.sh [SECONDS]        e.g. scripts/fuzz.sh 10
#   FUZZ_TARGETS="body path_normalize" scripts/fuzz.sh 60   only these
#   FUZZ_SANITIZER=address scripts/fuzz.sh                  with ASan (slower)
#
# Works on the stable toolchain: cargo-fuzz passes nightly-only rustc flags,
# which RUSTC_BOOTSTRAP=1 lets stable accept. The build (the gateway and
# Pingora with coverage instrumentation) goes to fuzz/target and is kept
# between runs. The committed seeds in fuzz/corpus/<target>/ are read, never
# written: new inputs go to a scratch directory removed at the end. A crash
# leaves its input in fuzz/artifacts/<target>/ (with the run's log); replay it
# with  fuzz/target/<triple>/release/<target> fuzz/artifacts/<target>/crash-...
# (ASan builds: fuzz/target/sanitizer-address/<triple>/release/<target>).
set -euo pipefail

seconds=${1:-30}
[[ $seconds =~ ^[0-9]+$ && $seconds -gt 0 ]] || { echo "usage: $0 [SECONDS]" >&2; exit 2; }
sanitizer=${FUZZ_SANITIZER:-none}
cd "$(dirname "$0")/.."
root=$PWD
export RUSTC_BOOTSTRAP=1

if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "installing cargo-fuzz"
  cargo install cargo-fuzz --version 0.13.2 --locked
fi

# a sanitizer build has its own target directory, so switching does not rebuild the other
target_dir=$root/fuzz/target
if [[ $sanitizer != none ]]; then
  target_dir=$root/fuzz/target/sanitizer-$sanitizer
  # ASan's ODR check stops every target at start-up, before any input, on a global of
  # rusqlite's bundled SQLite (C, not instrumented, not under test)
  export ASAN_OPTIONS=detect_odr_violation=0${ASAN_OPTIONS:+:$ASAN_OPTIONS}
fi
echo "building the fuzz targets (sanitizer: $sanitizer)"
build_start=$SECONDS
cargo fuzz build --sanitizer "$sanitizer" --fuzz-dir fuzz --target-dir "$target_dir"
echo "build: $((SECONDS - build_start)) s"

triple=$(rustc -vV | sed -n 's/^host: //p')
bin_dir=$target_dir/$triple/release
targets=${FUZZ_TARGETS:-$(cargo fuzz list --fuzz-dir fuzz)}

scratch=$(mktemp -d "${TMPDIR:-/tmp}/infergate-fuzz.XXXXXX")
trap 'rm -rf "$scratch"' EXIT
mkdir -p "$scratch/tmp"

failed=()
printf '%-18s %12s %8s  %s\n' target executions exec/s result
for t in $targets; do
  bin=$bin_dir/$t
  [[ -x $bin ]] || { echo "$t: no binary at $bin" >&2; failed+=("$t"); continue; }
  mkdir -p "$scratch/corpus/$t" "fuzz/artifacts/$t"
  log=$scratch/$t.log
  rc=0
  # new inputs go to the first corpus directory (scratch); the seeds are only read.
  # The auth targets write their fixture files under TMPDIR (the scratch directory).
  TMPDIR=$scratch/tmp "$bin" "$scratch/corpus/$t" "fuzz/corpus/$t" \
    -max_total_time="$seconds" -timeout=30 -rss_limit_mb=2048 -print_final_stats=1 \
    -artifact_prefix="fuzz/artifacts/$t/" >"$log" 2>&1 || rc=$?
  execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n1)
  [[ -n $execs ]] || execs=$(grep -o '^#[0-9]*' "$log" | tail -n1 | tr -d '#')
  per_sec=$(( ${execs:-0} / seconds ))
  if [[ $rc -eq 0 ]]; then
    printf '%-18s %12s %8s  %s\n' "$t" "${execs:-?}" "$per_sec" ok
  else
    printf '%-18s %12s %8s  %s\n' "$t" "${execs:-?}" "$per_sec" "FAILED (exit $rc)"
    cp "$log" "fuzz/artifacts/$t/fuzz.log"
    failed+=("$t")
  fi
done

if ((${#failed[@]})); then
  for t in "${failed[@]}"; do
    echo
    echo "=== $t: fuzz/artifacts/$t/fuzz.log (end)"
    tail -n 40 "fuzz/artifacts/$t/fuzz.log" 2>/dev/null || true
    ls -1 "fuzz/artifacts/$t" 2>/dev/null | grep -v '^fuzz.log$' | sed "s|^|  input: fuzz/artifacts/$t/|" || true
  done
  echo
  echo "fuzzing failed: ${failed[*]}" >&2
  exit 1
fi
echo "fuzzing: all targets ran ${seconds} s each without a crash"

#!/usr/bin/env bash
# Runs every fuzz target for SECONDS (default 600) each, JOBS (default 2) at a time, starting from
# the committed seeds (seeds/TARGET: a valid input of each kind), and prints each one's executions
# and outcome. cargo-fuzz needs nightly's -Z flags: RUSTC_BOOTSTRAP lets the
# stable toolchain pass them, and `-s none` leaves out AddressSanitizer (all of this is safe Rust;
# libFuzzer still finds panics, overflows in debug assertions, and hangs).
#
#   cargo install cargo-fuzz && fuzz/run.sh [SECONDS]
set -uo pipefail
cd "$(dirname "$0")"
seconds=${1:-600}
jobs=${JOBS:-2}
export RUSTC_BOOTSTRAP=1
cargo fuzz build -s none >&2 || exit 2
mkdir -p logs
targets=$(cargo fuzz list)
printf '%s\n' $targets | xargs -P "$jobs" -I{} sh -c \
  "mkdir -p corpus/{} && cargo fuzz run -s none {} corpus/{} seeds/{} -- -max_total_time=$seconds -print_final_stats=1 > logs/{}.log 2>&1; echo \$? > logs/{}.rc"
status=0
for t in $targets; do
  runs=$(grep -m1 'stat::number_of_executed_units' "logs/$t.log" | awk '{print $2}')
  cov=$(grep -o 'cov: [0-9]*' "logs/$t.log" | tail -1)
  rc=$(cat "logs/$t.rc")
  [ "$rc" = 0 ] || status=1
  echo "$t: ${runs:-?} executions in ${seconds} s, ${cov:-cov ?}, exit $rc"
done
exit $status
